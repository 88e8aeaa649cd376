//! The Graft operator: reconcilers for `FineTuneJob` and `AdapterDeployment`, and what the
//! `graft-operator run` process around them needs (leader election, health and metrics).

pub mod adapter_deployment;
pub mod conditions;
pub mod fine_tune_job;
pub mod http;
pub mod leader;
pub mod metrics;

/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "graft-operator";

/// An `Api` over `namespace`, or over all namespaces: what a controller watches.
pub fn scoped<K>(client: &kube::Client, namespace: Option<&str>) -> kube::Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => kube::Api::namespaced(client.clone(), ns),
        None => kube::Api::all(client.clone()),
    }
}
