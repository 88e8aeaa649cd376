//! The small interface the model computes through, and its two implementations:
//!
//! - [`cpu`]: fused f32 ops on the CPU, each a custom op with its own backward, written over
//!   slices with the `gemm` crate. On a small CPU model the per-op costs of candle's graph
//!   (a zeroed gradient buffer and an add per node) would cost more than the arithmetic.
//! - [`cuda`]: candle's ops (cuBLAS and its kernels on a GPU) plus our own kernels, each with a
//!   CPU twin, so the whole backend also runs — and is tested — on the CPU.
//!
//! The model (`models::llama`) is written once over [`Backend`] and never asks which device it
//! runs on: [`for_device`] picks the backend once, when the model is loaded.

use candle_core::{DType, Device, Result, Tensor};

use std::ops::Range;

use crate::adapters::{Bottleneck, Lora, SegmentLora};

mod cache;
#[cfg(test)]
pub(crate) mod check;
pub mod cpu;
pub mod cuda;
mod dropout;
mod linear;
pub(crate) mod rotation;

pub use cache::{BLOCK_TOKENS, Block, KvCache};
pub use dropout::{Dropout, DropoutMask};
pub(crate) use linear::rows_and_output;
pub use linear::{FrozenLinear, FrozenWeight};

/// The attention's geometry.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Applied to the scores (`1 / √head_dim`).
    pub scale: f64,
    /// Sliding window: a query sees at most this many keys, itself included.
    pub window: Option<usize>,
    /// Scaled scores become `cap · tanh(score / cap)` before the mask and softmax (Gemma 2).
    pub softcap: Option<f64>,
}

/// Rotary tables and position ids, built once per forward pass and shared by every layer.
#[derive(Clone, Debug)]
pub struct Rotary {
    /// `cos` and `sin` `[rows, head_dim]` in f32, one row per position computed (training:
    /// positions `0..seq`, or with [`Self::documents`] `[batch·seq, head_dim]`, each batch
    /// row's tokens at the positions they have in their own example; serving: each packed row
    /// at its own position).
    pub cos: Tensor,
    pub sin: Tensor,
    /// `0, 1, 2, …` up to the last position any key has, f32 on the model's device: attention
    /// masks are comparisons of these, made on the device.
    pub positions: Tensor,
    /// Packed training rows: several examples per row, each attending only to itself.
    pub documents: Option<Documents>,
}

/// Where the examples of packed training rows lie, so that attention stays within each
/// (block-diagonal causal attention, as flash-attn's variable-length kernels compute it).
#[derive(Clone, Debug)]
pub struct Documents {
    /// Per batch row, the first position of each of its examples, ascending from 0; the
    /// row's padding is one more example (no real token can see it, being after them all).
    pub starts: Vec<Vec<usize>>,
    /// `[batch, seq]` f32 on the model's device: each token's example, numbered within its
    /// row. Masks compare these on the device.
    pub ids: Tensor,
}

impl Documents {
    /// The first position of the example that position `q` of batch row `row` is in.
    pub fn start(&self, row: usize, q: usize) -> usize {
        let starts = &self.starts[row];
        starts[starts.partition_point(|&s| s <= q).saturating_sub(1)]
    }
}

/// One sequence's share of a serving step's attention: its rows in the packed batch, and its
/// cache (which holds the keys before them and receives theirs).
#[derive(Debug)]
pub struct CachedRows<'a> {
    pub rows: std::ops::Range<usize>,
    pub cache: &'a mut KvCache,
}

/// What the model computes with. Inputs are `[.., features]`; training inputs are
/// `[batch, seq, features]`, serving inputs the packed rows of a batch `[rows, features]`.
pub trait Backend: std::fmt::Debug + Send + Sync {
    fn name(&self) -> &'static str;

    /// `x · Wᵀ (+ b)`, differentiable in `x` alone.
    fn frozen(&self, x: &Tensor, layer: &FrozenLinear) -> Result<Tensor>;

    /// The adapted projection of training, one adapter for every row:
    /// `x · Wᵀ (+ b) + scale · (x ⊙ mask) · Aᵀ · Bᵀ`, differentiable in `x`, `A` and `B`.
    fn adapted(
        &self,
        x: &Tensor,
        layer: &FrozenLinear,
        lora: &Lora,
        dropout: Option<DropoutMask>,
    ) -> Result<Tensor>;

    /// The projection of a mixed serving batch: `x · Wᵀ (+ b)` plus, on each segment's rows,
    /// that segment's adapter (if any). No gradient.
    fn mixed(
        &self,
        x: &Tensor,
        layer: &FrozenLinear,
        segments: &[SegmentLora<'_>],
    ) -> Result<Tensor>;

    /// The residual stream `[rows, hidden]` of a mixed serving batch after a sub-block whose
    /// output was `out`, with each segment's bottleneck module (if any) added on its rows. No
    /// gradient. Composed of candle's ops, one segment at a time, unless a backend batches it.
    fn bottlenecks(
        &self,
        out: &Tensor,
        stream: Tensor,
        segments: &[(Range<usize>, Option<&Bottleneck>)],
    ) -> Result<Tensor> {
        crate::adapters::bottleneck::apply_segments(out, stream, segments)
    }

    /// RMSNorm as transformers computes it: in f32, cast back, times the (frozen) weight.
    fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor>;

    /// `silu(gate) · up`.
    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor>;

    /// DoRA's `r ⊙ (z − b) + b` for `z` `[.., out]` and `r` `[out]` (`b` frozen),
    /// differentiable in `z` and `r`. Composed of candle's ops unless a backend fuses it.
    fn rescale_rows(&self, z: &Tensor, r: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        crate::adapters::dora::rescale(z, r, bias)
    }

    /// `gelu_tanh(gate) · up` (Gemma's MLP), differentiable. Composed of candle's ops (the
    /// tanh approximation, with a backward) on every backend until one has a reason to fuse it.
    fn gelu_tanh_gated(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        gate.gelu()? * up
    }

    /// Causal self-attention of whole sequences: `q` `[batch, seq, heads·head_dim]`, `k` and
    /// `v` `[batch, seq, kv_heads·head_dim]`, rotated by `rotary` (`[seq, head_dim]`, or per
    /// row `[batch·seq, head_dim]` with its `documents`), to `[batch, seq, heads·head_dim]`.
    /// With `documents`, a query sees only the keys of its own example. No
    /// `[batch, heads, seq, seq]` tensor outlives the call; the backward recomputes what it
    /// needs.
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        rotary: &Rotary,
        heads: Heads,
    ) -> Result<Tensor>;

    /// Attention of a serving step: the packed new rows `q` `[rows, heads·head_dim]`, `k`, `v`
    /// `[rows, kv_heads·head_dim]` (`qkv`), each row rotated for its own position by `rotary`
    /// (`[rows, head_dim]`), each sequence attending to its cache and its own new rows.
    /// Appends the new keys and values to the caches for layer `layer`. No gradient.
    fn cached_attention(
        &self,
        layer: usize,
        qkv: [&Tensor; 3],
        rotary: &Rotary,
        heads: Heads,
        sequences: &mut [CachedRows<'_>],
    ) -> Result<Tensor>;

    /// Appends keys and values `[tokens, kv_heads·head_dim]` as they are (prefix tuning's,
    /// which are not rotated) to layer `layer` of `cache`, in this backend's form;
    /// `KvCache::advance` counts them once every layer holds them.
    fn append_kv(
        &self,
        cache: &mut KvCache,
        layer: usize,
        kv: [&Tensor; 2],
        kv_heads: usize,
    ) -> Result<()>;
}

/// The backend for a model on `device` computing in `dtype`: the fused ops for f32 on the
/// CPU, candle's ops and our kernels everywhere else.
pub fn for_device(device: &Device, dtype: DType) -> &'static dyn Backend {
    if device.is_cpu() && dtype == DType::F32 {
        &cpu::Cpu
    } else {
        &cuda::Cuda
    }
}
