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
