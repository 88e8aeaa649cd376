//! The model code shared by `graft-trainer` and `graft-server`.
//!
//! Imports point downward: `adapters` (what an adapter is) and `quant` (how frozen weights are
//! stored) know nothing of the backends; `backend` (what the model computes with) knows the
//! adapters; `models` (the architectures) is written over `backend`.

pub mod adapters;
pub mod backend;
pub mod device;
pub mod models;
pub mod quant;
pub mod rng;
pub mod storage;
pub mod text;
