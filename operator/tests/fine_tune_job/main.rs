//! FineTuneJob against the local control plane (apiserver, etcd, controller-manager and
//! scheduler; no kubelet). One test binary, so one control plane for every test here.

mod children;
mod lifecycle;
mod rbac;
mod restart;
mod support;
mod waiting;
