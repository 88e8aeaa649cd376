//! The FineTuneJob reconciler, as a pipeline with one file per step: `validate` (what the
//! schema cannot check) → `build` (spec in, objects out; pure) → `apply` (server-side apply)
//! → `status` (derived from the Job and its pods; pure). `controller` wires them together.

mod apply;
mod build;
mod controller;
#[cfg(test)]
mod fixtures;
mod status;
mod validate;

pub use apply::{ApplyError, Taken, apply_children, taken_name};
pub use build::{
    BuildError, CONFIG_ERROR_EXIT_CODE, Children, QUEUE_LABEL, TrainerDefaults, build,
};
pub use controller::{Context, Error, Settings, controller};
pub use validate::Schemes;
