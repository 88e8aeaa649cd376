//! Graft's API: the `FineTuneJob` and `AdapterDeployment` custom resources (group `graft.dev`,
//! version `v1alpha1`) and the types shared by the operator, the trainer and the server.
//!
//! Validation lives in the schema so that `kubectl apply` rejects a bad manifest before any
//! controller sees it: ranges, enums and URI patterns through `schemars`, cross-field rules
//! as CEL (`x-kubernetes-validations`).

mod adapter_deployment;
mod artifact;
mod common;
mod crd;
mod fine_tune_job;
mod reference;
mod server_grant;

pub use adapter_deployment::{
    AdapterDeployment, AdapterDeploymentPhase, AdapterDeploymentSpec, AdapterDeploymentStatus,
    AdapterSource, AdapterVersion, ReplicaCounts, ServerRef, VersionStatus,
};
pub use artifact::{
    AdapterAssignment, AdapterListing, AdaptersFile, AssignedVersion, Digested, GraftJson,
    LoadState, Metrics, Owner, ServerInfo, StatusTarget, VersionState,
};
pub use common::{LocalObjectRef, SecretRef};
pub use crd::{all_crds, crds_yaml};
pub use fine_tune_job::{
    AdapterArtifact, BottleneckConfig, BottleneckPlacement, DatasetFormat, DatasetSource,
    FineTuneJob, FineTuneJobPhase, FineTuneJobSpec, FineTuneJobStatus, Ia3Config, LoraConfig,
    LoraInit, LossPoint, MAX_HISTORY_POINTS, Method, MethodKind, ModelSource, NonLinearity,
    OutputTarget, PTuningConfig, PrefixTuningConfig, Progress, PromptEncoder, PromptInit,
    PromptTuningConfig, Quantization, Resources, SUPPORTED_MODEL_TYPES, Scheduler, StorageConfig,
    TargetModule, TrainerResult, Training,
};
pub use reference::api_reference;

pub use server_grant::{GrantFrom, GrantTo, ServerGrant, ServerGrantSpec};

/// The API group of every Graft resource.
pub const GROUP: &str = "graft.dev";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";
