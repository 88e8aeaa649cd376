//! The pieces of `graft-trainer` that are not the command line: dataset, optimiser, schedule.

pub mod dataset;
pub mod optim;
pub mod schedule;
