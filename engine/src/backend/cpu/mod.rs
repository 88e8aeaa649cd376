//! The CPU backend: f32 ops fused into custom ops with their own backward, over slices and the
//! `gemm` crate. Composed from candle's elementwise ops, each would be several graph nodes,
//! and candle's backward gives every node a zeroed gradient buffer it adds into: on a small
//! model those passes over activations cost more than the matmuls. Each op is tested against
//! an independently composed form, values and gradients (`backend::check`).

// The kernels a vectorised loop calls must be inlined into it to be compiled for the CPU's
// vector instructions (`math::vectorized`): there `#[inline(always)]` is the point.
#![allow(clippy::inline_always)]

use candle_core::{DType, Result, Tensor};

use super::{Backend, CachedRows, DropoutMask, FrozenLinear, Heads, KvCache, Rotary};
use std::ops::Range;

use crate::adapters::{Bottleneck, Lora, SegmentLora};

mod attention;
mod batch;
mod bottleneck;
mod cached_attention;
mod gemm;
mod linear;
mod lora;
mod math;
mod norm;
mod rescale;
mod rotary;
mod softmax;
mod swiglu;

/// See the module's documentation.
#[derive(Debug)]
pub struct Cpu;

impl Backend for Cpu {
    fn name(&self) -> &'static str {
        "cpu"
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
        lora::adapted(x, layer, lora, dropout)
    }

    fn mixed(
        &self,
        x: &Tensor,
        layer: &FrozenLinear,
        segments: &[SegmentLora<'_>],
    ) -> Result<Tensor> {
        batch::mixed(x, layer, segments)
    }

    fn bottlenecks(
        &self,
        out: &Tensor,
        stream: Tensor,
        segments: &[(Range<usize>, Option<&Bottleneck>)],
    ) -> Result<Tensor> {
        bottleneck::add_bottlenecks(out, stream, segments)
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
        norm::rms_norm(x, weight, eps)
    }

    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        swiglu::swiglu(gate, up)
    }

    fn rescale_rows(&self, z: &Tensor, r: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        if gemm::is_cpu_f32(z) && gemm::is_cpu_f32(r) {
            rescale::rescale(z, r, bias)
        } else {
            crate::adapters::dora::rescale(z, r, bias)
        }
    }

    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        rotary: &Rotary,
        heads: Heads,
    ) -> Result<Tensor> {
        attention::causal_attention(
            q,
            k,
            v,
            (&rotary.cos, &rotary.sin),
            rotary.documents.as_ref(),
            heads,
        )
    }

    fn cached_attention(
        &self,
        layer: usize,
        qkv: [&Tensor; 3],
        rotary: &Rotary,
        heads: Heads,
        sequences: &mut [CachedRows<'_>],
    ) -> Result<Tensor> {
        cached_attention::cached_attention(layer, qkv, rotary, heads, sequences)
    }

    fn append_kv(
        &self,
        cache: &mut KvCache,
        layer: usize,
        [k, v]: [&Tensor; 2],
        _: usize,
    ) -> Result<()> {
        // Rows of f32, as the cached attention appends its rotated keys.
        let rows = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
        let (k, v) = (rows(k)?, rows(v)?);
        let tail = &mut cache.tail[layer];
        tail.k.extend(k);
        tail.v.extend(v);
        Ok(())
    }
}
