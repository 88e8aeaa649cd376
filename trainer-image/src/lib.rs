//! The pieces of `graft-trainer` that are not the command line.

pub mod adapters;
pub mod backward;
pub mod checkpoint;
pub mod dataset;
pub mod history;
pub mod job;
pub mod loss;
pub mod memory;
pub mod optim;
pub mod packing;
pub mod progress;
pub mod schedule;
pub mod tensorboard;
pub mod tiny;
pub mod train;
