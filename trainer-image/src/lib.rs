//! The pieces of `graft-trainer` that are not the command line: optimiser and schedule.

pub mod optim;
pub mod schedule;
