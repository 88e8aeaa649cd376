//! Model architectures and loading their weights.

mod config;
mod llama;
mod rope;
pub mod source;
mod weights;

pub use config::{Activation, AttentionKind, Config, ConfigError, HfConfig};
pub use llama::{Llama, Mode, Precision, Segment};
pub use rope::{Rope, RopeParameters, RopeParametersField, Yarn};
pub use weights::{WeightsError, load_weights};
