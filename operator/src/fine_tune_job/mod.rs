//! The FineTuneJob reconciler, as a pipeline: `build` turns a spec into the Kubernetes
//! objects that run it (pure, unit-tested here); applying them and writing status follow.

mod apply;
mod build;
#[cfg(test)]
mod fixtures;

pub use apply::{ApplyError, apply_children};
pub use build::{BuildError, CONFIG_ERROR_EXIT_CODE, Children, TrainerDefaults, build};
