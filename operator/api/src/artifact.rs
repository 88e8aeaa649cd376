//! Contracts outside Kubernetes: the `graft.json` record the trainer writes beside an adapter,
//! and the server's admin API that the operator drives.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::AdapterArtifact;

/// `graft.json`, written last: its presence means the adapter beside it is complete.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GraftJson {
    pub base_model: Digested,
    pub dataset: Digested,
    pub adapter: AdapterArtifact,
    pub metrics: Metrics,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fine_tune_job: Option<StatusTarget>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Digested {
    pub uri: String,
    /// SHA-256 of the content (for a model: of its files' names and digests, in order).
    pub sha256: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metrics {
    pub steps: u64,
    pub train_examples: usize,
    pub eval_examples: usize,
    pub final_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub tokens_per_second: Option<f64>,
    /// The step whose adapter was published (`training.keepBest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_step: Option<u64>,
    /// The step after which early stopping ended the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_early_at: Option<u64>,
}

/// The FineTuneJob a trainer reports to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusTarget {
    pub namespace: String,
    pub name: String,
}

/// `PUT /admin/adapters/{name}`: the versions an adapter name serves, with their traffic
/// weights. It is also one entry of the adapters file a server loads at start-up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterAssignment {
    pub versions: Vec<AssignedVersion>,
    /// The uid of the AdapterDeployment that assigns the name, and the generation of its spec
    /// this assignment comes from. A server refuses (409) an assignment of an older generation
    /// than the last it accepted from the same owner, so a deposed operator's late request
    /// cannot undo a newer one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
}

/// Who assigned an adapter name, at which generation of its spec.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub uid: String,
    pub generation: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignedVersion {
    /// The prefix holding `adapter_config.json` and the weights file.
    pub uri: String,
    /// SHA-256 of the weights file (`adapter_model.safetensors`; `adapter.safetensors` for
    /// bottleneck adapters, in AdapterHub's format).
    pub sha256: String,
    #[serde(default = "full_weight")]
    pub weight: u32,
}

fn full_weight() -> u32 {
    100
}

/// The adapters a server must load before it reports ready, as one file. The operator's
/// `<deployment>-graft-adapters` ConfigMap holds the same as one key per adapter
/// (`<name>.json`, an [`AdapterAssignment`]), so that each AdapterDeployment owns its key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdaptersFile {
    #[serde(default)]
    pub adapters: BTreeMap<String, AdapterAssignment>,
}

/// `GET /admin/adapters`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterListing {
    pub adapters: BTreeMap<String, Vec<VersionState>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VersionState {
    pub uri: String,
    pub sha256: String,
    pub weight: u32,
    pub state: LoadState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loaded_at: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadState {
    /// In memory and serving.
    Loaded,
    /// Evicted from memory (least recently used); on local disk, reloaded on the next request.
    Offloaded,
    Failed,
}

/// `GET /admin/info`: what an adapter must match to load on this server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerInfo {
    /// The served name of the base model (the `model` that selects no adapter).
    pub model: String,
    pub model_uri: String,
    /// The base model's digest, as `graft.json` records it.
    pub model_sha256: String,
    pub architecture: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub vocab_size: usize,
    pub target_modules: Vec<String>,
    pub max_lora_rank: usize,
    pub max_loaded_adapters: usize,
}
