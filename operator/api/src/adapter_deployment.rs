use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    DNS_LABEL_PATTERN, LocalObjectRef, NAME_PATTERN, SHA256_PATTERN, SOURCE_URI_PATTERN,
};

/// Puts an adapter into a running base-model server Deployment without restarting it; two
/// versions with weights make a canary.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "graft.dev",
    version = "v1alpha1",
    kind = "AdapterDeployment",
    plural = "adapterdeployments",
    shortname = "ad",
    category = "graft",
    namespaced,
    status = "AdapterDeploymentStatus",
    printcolumn = r#"{"name":"Server","type":"string","jsonPath":".spec.server.name"}"#,
    printcolumn = r#"{"name":"Server-Namespace","type":"string","priority":1,"jsonPath":".spec.server.namespace"}"#,
    printcolumn = r#"{"name":"Adapter","type":"string","jsonPath":".spec.adapterName"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.replicas.ready"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AdapterDeploymentSpec {
    /// The graft-server Deployment that serves the adapter.
    // Immutable: the operator unloads an adapter from the server and name it was deployed
    // under; moving it means a new AdapterDeployment (and deleting this one).
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self == oldSelf",
        "message": "spec.server is immutable: create another AdapterDeployment for another server",
        "reason": "FieldValueForbidden",
    }]))]
    pub server: ServerRef,
    /// The name clients put in the OpenAI `model` field.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"),
        extend("x-kubernetes-validations" = [{
            "rule": "self == oldSelf",
            "message": "spec.adapterName is immutable: create another AdapterDeployment for another name",
            "reason": "FieldValueForbidden",
        }])
    )]
    pub adapter_name: String,
    /// One version for a plain rollout, two with weights for a canary. Weights sum to 100.
    #[schemars(
        length(min = 1),
        extend("x-kubernetes-validations" = [
            {
                "rule": "self.size() <= 2",
                "message": "spec.versions: at most 2 versions (a stable one and a canary)",
                "reason": "FieldValueInvalid",
            },
            {
                "rule": "self.map(v, v.weight).sum() == 100",
                "message": "spec.versions: the weights must sum to 100",
                "reason": "FieldValueInvalid",
            },
        ])
    )]
    pub versions: Vec<AdapterVersion>,
}

/// The Deployment running graft-server.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerRef {
    /// Name of the Deployment.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub name: String,
    /// Namespace of the Deployment; the AdapterDeployment's own when unset. A server in
    /// another namespace serves this AdapterDeployment only once a ServerGrant there admits
    /// this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    pub namespace: Option<String>,
}

impl AdapterDeployment {
    /// The namespace of the server Deployment this AdapterDeployment names.
    pub fn server_namespace(&self) -> Option<&str> {
        self.spec
            .server
            .namespace
            .as_deref()
            .or(self.metadata.namespace.as_deref())
    }
}

/// One version of the adapter and its share of the traffic.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdapterVersion {
    /// Where the adapter comes from.
    pub source: AdapterSource,
    /// Percentage of requests for `adapterName` that this version answers.
    #[serde(default = "full_weight")]
    #[schemars(range(min = 0, max = 100))]
    pub weight: u32,
}

fn full_weight() -> u32 {
    100
}

/// Exactly one of `fineTuneJobRef` or `uri` (with `sha256`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.fineTuneJobRef) != has(self.uri)",
        "message": "source: set exactly one of fineTuneJobRef or uri",
        "reason": "FieldValueInvalid",
    },
    {
        "rule": "!has(self.uri) || has(self.sha256)",
        "message": "source.sha256 is required with source.uri",
        "fieldPath": ".sha256",
        "reason": "FieldValueRequired",
    },
]))]
pub struct AdapterSource {
    /// A FineTuneJob in the same namespace; its `status.adapter` is used once it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fine_tune_job_ref: Option<LocalObjectRef>,
    /// The adapter's prefix in object storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = SOURCE_URI_PATTERN))]
    pub uri: Option<String>,
    /// SHA-256 of the weights file (`adapter_model.safetensors`, or a bottleneck adapter's
    /// `adapter.safetensors`); required with `uri`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = SHA256_PATTERN))]
    pub sha256: Option<String>,
}

/// Observed state of an AdapterDeployment.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdapterDeploymentStatus {
    /// Summary of the conditions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<AdapterDeploymentPhase>,
    /// Ready, Reconciling and Stalled (kstatus), with the reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Server pods that have every version loaded and verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<ReplicaCounts>,
    /// Each resolved version and the pods that serve it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<VersionStatus>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Summary of an AdapterDeployment's state.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum AdapterDeploymentPhase {
    Pending,
    Loading,
    Ready,
    Degraded,
    Failed,
}

/// Server pods wanted and ready.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaCounts {
    /// Ready pods of the server Deployment.
    pub desired: u32,
    /// Of those, pods with every version loaded and verified.
    pub ready: u32,
}

/// A resolved version.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VersionStatus {
    /// The adapter's prefix in object storage.
    pub uri: String,
    /// SHA-256 of the weights file (`adapter_model.safetensors`, or a bottleneck adapter's
    /// `adapter.safetensors`).
    pub sha256: String,
    /// Share of the traffic.
    pub weight: u32,
    /// Pods that have this version loaded and verified.
    pub ready_replicas: u32,
}
