//! The model code shared by `graft-trainer` and `graft-server`.

pub mod chat;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod gemm;
pub mod linear;
pub mod lora;
pub mod models;
pub mod nf4;
pub mod nf4_tensor;
pub mod ops;
pub mod peft;
pub mod rng;
pub mod storage;
pub mod tiny;
pub mod tokenizer;
