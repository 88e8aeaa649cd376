//! The Graft operator: reconcilers for `FineTuneJob` and `AdapterDeployment`.

pub mod fine_tune_job;

/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "graft-operator";
