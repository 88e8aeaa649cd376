//! Builders for the reconciler's unit tests.

use graft_api::FineTuneJob;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::TrainerDefaults;

/// A FineTuneJob as the apiserver returns it: with the uid and namespace a fixture file sets.
pub(crate) fn job_from_yaml(yaml: &str) -> FineTuneJob {
    serde_yaml::from_str(yaml).expect("fixture parses as a FineTuneJob")
}

pub(crate) fn defaults() -> TrainerDefaults {
    TrainerDefaults {
        image: "ghcr.io/graft-dev/graft-trainer:0.1.0".to_owned(),
        model_cache_size: Quantity("100Gi".to_owned()),
        backoff_limit: 3,
    }
}
