//! Model architectures and loading their weights.

mod checkpoint;
mod config;
mod gguf;
mod llama;
mod quantization;
pub mod source;
mod weights;

pub use checkpoint::{Checkpoint, CheckpointError};
pub use config::{Config, ConfigError, HfConfig, Rope, RopeParameters};
pub use gguf::{GgufError, GgufFile};
pub use llama::{Llama, Mode, Precision, Segment};
pub use quantization::{Prequantized, QuantizationError};
pub use source::ModelFiles;
pub use weights::{WeightsError, load_weights};
