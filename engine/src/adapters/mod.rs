//! What an adapter is, independent of where it is computed: the projections it targets, the
//! LoRA pair and its math, (IA)³'s vectors, prompt learning's virtual tokens, bottleneck
//! adapters, PEFT's and AdapterHub's files, the registry of methods, and a mixed serving
//! batch's adapters.

mod batch;
pub mod bottleneck;
pub mod decompose;
pub mod dora;
mod ia3;
mod lora;
mod methods;
mod patterns;
mod peft;
mod prompt;
mod prompt_encoder;
mod site;

pub use batch::{SegmentLora, ServingAdapter, ServingLora, per_segment_delta};
pub use bottleneck::{Bottleneck, BottleneckAdapter, BottleneckConfig, Placement};
pub use ia3::{Ia3, Ia3Adapter, Ia3Config, scale_segments};
pub use lora::{Init, Lora, scaling};
pub use methods::{PEFT_WEIGHTS, PeftAdapter, WEIGHTS_FILES, peft_type};
pub use patterns::Patterns;
pub use peft::{Adapter, AdapterConfig, PeftError, TargetModules};
pub use prompt::{
    PROMPT_EMBEDDINGS, PromptAdapter, PromptConfig, PromptMethod, is_prompt_learning, prefix_kv,
    prepend, text_init_ids,
};
pub use prompt_encoder::{EncoderKind, PromptEncoder};
pub use site::Site;
