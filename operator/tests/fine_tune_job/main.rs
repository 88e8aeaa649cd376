//! FineTuneJob against the local control plane (apiserver, etcd, controller-manager and
//! scheduler; no kubelet). One test binary, so one control plane for every test here.

mod children;
#[path = "../common/health.rs"]
mod health;
mod lifecycle;
mod outcome;
mod rbac;
mod restart;
mod support;
mod waiting;
