//! What an adapter is, independent of where it is computed: the projections it targets, the
//! LoRA pair and its math, PEFT's files, and a mixed serving batch's adapters.

mod batch;
pub mod decompose;
pub mod dora;
mod lora;
mod patterns;
mod peft;
mod site;

pub use batch::{SegmentLora, ServingAdapter, ServingLora, per_segment_delta};
pub use lora::{Init, Lora, scaling};
pub use patterns::Patterns;
pub use peft::{Adapter, AdapterConfig, PeftError, TargetModules};
pub use site::Site;
