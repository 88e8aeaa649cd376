//! A linear weight as bitsandbytes serializes a 4-bit `Linear4bit` (transformers'
//! `save_pretrained` of a `load_in_4bit` model): `weight` (u8, two NF4 indices per byte),
//! `weight.absmax` (u8 codes of the block scales), `weight.nested_absmax` (f32, one per 256
//! scales), `weight.quant_map` (the 16 NF4 levels), `weight.nested_quant_map` (the 8-bit
//! dynamic code) and `weight.quant_state.bitsandbytes__nf4` (JSON bytes: block sizes, shape,
//! offset). That is [`Nf4Matrix`]'s layout, so the parts are taken as they are.

use candle_core::{DType, Result};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::nf4::{BLOCK_SIZE, NESTED_BLOCK_SIZE, NF4_LEVELS, Nf4Matrix, dynamic_code};

const STATE: &str = "weight.quant_state.bitsandbytes__nf4";

/// `weight.quant_state.bitsandbytes__nf4`, as bitsandbytes' `QuantState.as_dict(packed=True)`
/// writes it.
#[derive(Debug, Deserialize)]
struct QuantState {
    quant_type: String,
    blocksize: usize,
    shape: Vec<usize>,
    nested_blocksize: Option<usize>,
    nested_offset: Option<f64>,
}

/// Whether the module `vb` points at holds a bitsandbytes 4-bit NF4 weight.
pub fn is_bnb_nf4(vb: &VarBuilder<'_>) -> bool {
    vb.contains_tensor(STATE)
}

/// The NF4 weight of the module `vb` points at, which must be `(out, in)`. Anything that is
/// not exactly Graft's layout (another block size, code map or quantization type) is an
/// error naming the tensor.
pub fn load_bnb_nf4(vb: &VarBuilder<'_>, shape: (usize, usize)) -> Result<Nf4Matrix> {
    let name = |part: &str| format!("{}.{part}", vb.prefix());
    let fail =
        |part: &str, reason: String| candle_core::Error::Msg(format!("{}: {reason}", name(part)));
    let bytes = |part: &str| -> Result<Vec<u8>> {
        vb.get_unchecked_dtype(part, DType::U8)?
            .flatten_all()?
            .to_vec1::<u8>()
    };
    let floats = |part: &str| -> Result<Vec<f32>> {
        vb.get_unchecked_dtype(part, DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()
    };

    let state: QuantState = serde_json::from_slice(&bytes(STATE)?)
        .map_err(|e| fail(STATE, format!("not bitsandbytes' quant state: {e}")))?;
    if state.quant_type != "nf4" {
        return Err(fail(
            STATE,
            format!("quant_type {:?}, Graft reads nf4", state.quant_type),
        ));
    }
    if state.blocksize != BLOCK_SIZE || state.nested_blocksize != Some(NESTED_BLOCK_SIZE) {
        return Err(fail(
            STATE,
            format!(
                "block sizes {} and {:?}, Graft's NF4 layout has {BLOCK_SIZE} and {NESTED_BLOCK_SIZE}",
                state.blocksize, state.nested_blocksize
            ),
        ));
    }
    if state.shape != [shape.0, shape.1] {
        return Err(fail(
            STATE,
            format!(
                "shape {:?}, the model's config makes it {shape:?}",
                state.shape
            ),
        ));
    }
    let offset = state
        .nested_offset
        .ok_or_else(|| fail(STATE, "no nested_offset (not double-quantized)".to_owned()))?;
    if floats("weight.quant_map")? != NF4_LEVELS {
        return Err(fail("weight.quant_map", "not the NF4 levels".to_owned()));
    }
    if floats("weight.nested_quant_map")? != dynamic_code() {
        return Err(fail(
            "weight.nested_quant_map",
            "not bitsandbytes' signed dynamic 8-bit code".to_owned(),
        ));
    }
    #[allow(clippy::cast_possible_truncation)]
    Nf4Matrix::from_parts(
        shape,
        bytes("weight")?,
        bytes("weight.absmax")?,
        floats("weight.nested_absmax")?,
        // bitsandbytes writes the f32 offset as a Python float: the cast is exact.
        offset as f32,
    )
    .map_err(|e| fail("weight", e.to_string()))
}
