//! Model architectures and loading their weights.

mod config;
mod llama;
pub mod source;
mod weights;

pub use config::{Config, ConfigError, HfConfig, Rope, RopeParameters};
pub use llama::{Llama, Mode, Precision, Segment};
pub use weights::{WeightsError, load_weights};
