//! The device backend: candle's ops (cuBLAS and candle's kernels on a GPU) and our own
//! kernels (`*.cu`, compiled to PTX by `build.rs`), each kernel with a CPU twin it is compared
//! against, so that everything here also runs on the CPU, where the tests check it against the
//! fused CPU backend and against independently composed references.
//!
//! Where no gradient is needed (evaluation, serving) the forward takes candle's fused kernels
//! (RMSNorm); where one is, the differentiable forms.

use candle_core::{D, DType, Result, Tensor};

use super::{Backend, CachedRows, DropoutMask, FrozenLinear, Heads, KvCache, Rotary};
use crate::adapters::{Lora, SegmentLora};

mod attention;
mod batch;
#[cfg(feature = "cuda")]
pub(crate) mod kernels;
mod linear;

pub use attention::SCORES_BUDGET;
pub(crate) use batch::grouped_adapters;

/// See the module's documentation.
#[derive(Debug)]
pub struct Cuda;

impl Backend for Cuda {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn frozen(&self, x: &Tensor, layer: &FrozenLinear) -> Result<Tensor> {
        linear::frozen(x, layer)
    }

    fn adapted(
        &self,
        x: &Tensor,
        layer: &FrozenLinear,
        lora: &Lora,
        dropout: Option<DropoutMask>,
    ) -> Result<Tensor> {
        let y = linear::frozen(x, layer)?;
        let input = match dropout {
            Some(mask) => (x * mask.tensor(x.dims(), x.device(), x.dtype())?)?,
            None => x.clone(),
        };
        // A and B are the optimizer's f32 master weights, cast for each use.
        let (a, b) = (lora.a.to_dtype(x.dtype())?, lora.b.to_dtype(x.dtype())?);
        let rows = input.elem_count() / input.dim(D::Minus1)?;
        let delta = input
            .reshape((rows, a.dim(1)?))?
            .matmul(&a.t()?)?
            .matmul(&b.t()?)?
            .affine(lora.scale, 0.0)?
            .reshape(y.shape())?;
        y + delta
    }

    fn mixed(
        &self,
        x: &Tensor,
        layer: &FrozenLinear,
        segments: &[SegmentLora<'_>],
    ) -> Result<Tensor> {
        grouped_adapters(x, &linear::frozen(x, layer)?, segments)
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
        let fused = matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16);
        if x.track_op() || !fused {
            composed_rms_norm(x, weight, eps)
        } else {
            #[allow(clippy::cast_possible_truncation)]
            candle_nn::ops::rms_norm(x, &weight.to_dtype(x.dtype())?, eps as f32)
        }
    }

    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        composed_swiglu(gate, up)
    }

    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        rotary: &Rotary,
        heads: Heads,
    ) -> Result<Tensor> {
        attention::attention(q, k, v, rotary, heads)
    }

    fn cached_attention(
        &self,
        layer: usize,
        qkv: [&Tensor; 3],
        rotary: &Rotary,
        heads: Heads,
        sequences: &mut [CachedRows<'_>],
    ) -> Result<Tensor> {
        attention::cached_attention(layer, qkv, rotary, heads, sequences)
    }

    fn append_kv(
        &self,
        cache: &mut KvCache,
        layer: usize,
        [k, v]: [&Tensor; 2],
        kv_heads: usize,
    ) -> Result<()> {
        // `[kv_heads, tokens, head_dim]`, as the cached attention keeps its rotated keys.
        let heads = |t: &Tensor| -> Result<Tensor> {
            let (tokens, width) = t.dims2()?;
            t.reshape((tokens, kv_heads, width / kv_heads))?
                .transpose(0, 1)?
                .contiguous()
        };
        attention::append_tail(&mut cache.tail[layer].tensors, heads(k)?, heads(v)?)
    }
}

/// RMSNorm from candle's differentiable ops, as transformers computes it: in f32, then cast
/// back, then times the weight.
pub(crate) fn composed_rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let variance = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x
        .broadcast_div(&(variance + eps)?.sqrt()?)?
        .to_dtype(dtype)?;
    normed.broadcast_mul(&weight.detach().to_dtype(dtype)?)
}

/// `silu(gate) · up` from candle's differentiable ops.
pub(crate) fn composed_swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}
