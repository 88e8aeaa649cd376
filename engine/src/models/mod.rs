//! Model architectures and loading their weights.

mod checkpoint;
mod config;
mod dora;
mod gguf;
mod llama;
mod merge;
mod quantization;
mod rope;
pub mod source;
mod weights;

pub use checkpoint::{Checkpoint, CheckpointError};
pub use config::{Activation, AttentionKind, Config, ConfigError, HfConfig};
pub use gguf::{GgufError, GgufFile};
pub use llama::{BaseRewrite, Llama, Mode, Positions, Precision, Segment};
pub use merge::{MergeError, check_mergeable, merged_files};
pub use quantization::{Prequantized, QuantizationError};
pub use rope::{Rope, RopeParameters, RopeParametersField, Yarn};
pub use source::ModelFiles;
pub use weights::{WeightsError, load_weights};
