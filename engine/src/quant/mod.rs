//! Quantized storage of frozen weights.

mod bnb;
mod nf4;
mod nf4_tensor;

pub use bnb::{is_bnb_nf4, load_bnb_nf4};
pub use nf4::{
    BLOCK_SIZE, NESTED_BLOCK_SIZE, NF4_LEVELS, Nf4Matrix, dequantize_parts, dynamic_code,
};
pub use nf4_tensor::Nf4Tensor;
