//! Inference for the server: one forward pass over a packed batch of sequences, each with
//! its own KV cache, its own position and its own adapter (or none). New prompts and decoding
//! sequences share a step: a segment is a whole prompt, a chunk of one, or one new token.
//!
//! Rows are packed without padding, so the projections — nearly all the arithmetic — run
//! once over every row of the batch; only attention, which reads each sequence's own cache,
//! goes segment by segment.

use std::ops::Range;

use candle_core::{D, DType, Device, Result, Tensor};

use super::{Llama, Site, repeat_kv};
use rayon::prelude::*;

use crate::{
    gemm::is_cpu_f32,
    lora::batched::{SegmentLora, ServingAdapter, add_batched},
    ops::{apply_rotary, causal_softmax, dot, rms_norm},
};

/// One sequence's keys and values.
#[derive(Clone, Debug)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
}

#[derive(Clone, Debug, Default)]
struct LayerCache {
    /// On CPU: `[tokens, kv_heads, head_dim]` f32, appended in place.
    k: Vec<f32>,
    v: Vec<f32>,
    /// Elsewhere: `[kv_heads, tokens, head_dim]` tensors.
    tensors: Option<(Tensor, Tensor)>,
}

impl KvCache {
    pub fn new(model: &Llama) -> Self {
        Self {
            layers: vec![LayerCache::default(); model.num_layers()],
            len: 0,
        }
    }

    /// Tokens cached so far: the position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let slot = &mut self.layers[layer].tensors;
        let (k, v) = match slot.take() {
            Some((old_k, old_v)) => (Tensor::cat(&[old_k, k], 1)?, Tensor::cat(&[old_v, v], 1)?),
            None => (k, v),
        };
        *slot = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
}

/// One sequence's share of a step: its new tokens, its cache (extended by them) and the
/// adapter its rows go through.
#[derive(Debug)]
pub struct Segment<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub adapter: Option<&'a ServingAdapter>,
}

struct Packed {
    rows: Range<usize>,
    offset: usize,
}

/// Rotary tables `[rows, head_dim]` for every packed row at its own position.
struct Tables {
    cos: Tensor,
    sin: Tensor,
}

impl Llama {
    /// Logits `[segments, vocab]` for the last new token of each segment; each cache grows by
    /// its segment's tokens. On error the caches are left inconsistent and must be dropped.
    pub fn forward_packed(&self, segments: &mut [Segment<'_>]) -> Result<Tensor> {
        let device = self.embed_tokens.device().clone();
        let ids: Vec<u32> = segments
            .iter()
            .flat_map(|s| s.tokens.iter().copied())
            .collect();
        if segments.iter().any(|s| s.tokens.is_empty()) {
            candle_core::bail!("forward_packed: every segment needs at least one token");
        }
        let mut packed = Vec::with_capacity(segments.len());
        let mut positions = Vec::with_capacity(ids.len());
        let mut start = 0;
        for segment in segments.iter() {
            let (len, offset) = (segment.tokens.len(), segment.cache.len());
            packed.push(Packed {
                rows: start..start + len,
                offset,
            });
            positions.extend(offset..offset + len);
            start += len;
        }
        let (cos, sin) = self.rotary_at(&positions, &device)?;
        let tables = Tables { cos, sin };
        let ids = Tensor::new(ids.as_slice(), &device)?;
        let mut h = self.embed_tokens.index_select(&ids, 0)?;
        for layer in 0..self.layers.len() {
            h = self.serve_layer(layer, &h, segments, &packed, &tables)?;
        }
        for segment in segments.iter_mut() {
            segment.cache.len += segment.tokens.len();
        }
        #[allow(clippy::cast_possible_truncation)]
        let last: Vec<u32> = packed.iter().map(|p| (p.rows.end - 1) as u32).collect();
        let last = h.index_select(&Tensor::new(last.as_slice(), &device)?, 0)?;
        let normed = norm(&last, &self.norm, self.config.rms_norm_eps)?;
        self.lm_head.infer(&normed)
    }

    fn serve_layer(
        &self,
        layer: usize,
        hidden: &Tensor,
        segments: &mut [Segment<'_>],
        packed: &[Packed],
        tables: &Tables,
    ) -> Result<Tensor> {
        let block = &self.layers[layer];
        let eps = self.config.rms_norm_eps;
        let loras = |site: Site| -> Vec<SegmentLora<'_>> {
            segments
                .iter()
                .zip(packed)
                .map(|(s, p)| SegmentLora {
                    rows: p.rows.clone(),
                    lora: s.adapter.and_then(|a| a.get(layer, site)),
                })
                .collect()
        };
        let project = |site: Site, x: &Tensor, loras: &[SegmentLora<'_>]| -> Result<Tensor> {
            let y = block.projections[site as usize].base().infer(x)?;
            add_batched(x, &y, loras)
        };
        let normed_in = norm(hidden, &block.input_norm, eps)?;
        let site_loras: Vec<Vec<SegmentLora<'_>>> = Site::ALL.iter().map(|&s| loras(s)).collect();
        let q = project(Site::QProj, &normed_in, &site_loras[Site::QProj as usize])?;
        let k = project(Site::KProj, &normed_in, &site_loras[Site::KProj as usize])?;
        let v = project(Site::VProj, &normed_in, &site_loras[Site::VProj as usize])?;
        let attended = self.packed_attention(layer, [&q, &k, &v], segments, packed, tables)?;
        let o = project(Site::OProj, &attended, &site_loras[Site::OProj as usize])?;
        let residual = (hidden + o)?;
        let normed = norm(&residual, &block.post_attention_norm, eps)?;
        let gate = project(
            Site::GateProj,
            &normed,
            &site_loras[Site::GateProj as usize],
        )?;
        let up = project(Site::UpProj, &normed, &site_loras[Site::UpProj as usize])?;
        let mlp = project(
            Site::DownProj,
            &(gate.silu()? * up)?,
            &site_loras[Site::DownProj as usize],
        )?;
        residual + mlp
    }

    fn packed_attention(
        &self,
        layer: usize,
        [q, k, v]: [&Tensor; 3],
        segments: &mut [Segment<'_>],
        packed: &[Packed],
        tables: &Tables,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (heads, kv_heads, dim) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let rows = q.dim(0)?;
        let (cos, sin) = (tables.cos.unsqueeze(1)?, tables.sin.unsqueeze(1)?);
        let q = apply_rotary(&q.reshape((rows, heads, dim))?, &cos, &sin)?;
        let k = apply_rotary(&k.reshape((rows, kv_heads, dim))?, &cos, &sin)?;
        let v = v.reshape((rows, kv_heads, dim))?;
        if is_cpu_f32(&q) {
            return self.host_attention(layer, [&q, &k, &v], segments, packed);
        }
        #[allow(clippy::cast_precision_loss)]
        let scale = 1.0 / (dim as f64).sqrt();
        let split = |t: &Tensor, rows: &Range<usize>| {
            t.narrow(0, rows.start, rows.len())?
                .transpose(0, 1)?
                .contiguous()
        };
        let mut outputs = Vec::with_capacity(packed.len());
        for (segment, p) in segments.iter_mut().zip(packed) {
            debug_assert_eq!(segment.cache.len(), p.offset);
            let (k, v) = segment
                .cache
                .append(layer, split(&k, &p.rows)?, split(&v, &p.rows)?)?;
            let k = repeat_kv(&k.unsqueeze(0)?, heads / kv_heads)?.squeeze(0)?;
            let v = repeat_kv(&v.unsqueeze(0)?, heads / kv_heads)?.squeeze(0)?;
            let scores = split(&q, &p.rows)?
                .matmul(&k.t()?)?
                .to_dtype(DType::F32)?
                .contiguous()?;
            let probs = causal_softmax(&scores, scale, cfg.sliding_window)?.to_dtype(v.dtype())?;
            outputs.push(
                probs
                    .matmul(&v)?
                    .transpose(0, 1)?
                    .reshape((p.rows.len(), heads * dim))?,
            );
        }
        Tensor::cat(&outputs, 0)
    }

    /// Attention on CPU straight over each sequence's cache, every query row in parallel: a
    /// decoding batch is many sequences of one row each, and per-sequence tensor ops (slice,
    /// transpose, repeat the kv heads, two matmuls, softmax) would cost more than the arithmetic.
    fn host_attention(
        &self,
        layer: usize,
        [q, k, v]: [&Tensor; 3],
        segments: &mut [Segment<'_>],
        packed: &[Packed],
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (heads, kv_heads, dim) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let group = heads / kv_heads;
        let kv_row = kv_heads * dim;
        let q = q.flatten_all()?.to_vec1::<f32>()?;
        let k = k.flatten_all()?.to_vec1::<f32>()?;
        let v = v.flatten_all()?.to_vec1::<f32>()?;
        for (segment, p) in segments.iter_mut().zip(packed.iter()) {
            debug_assert_eq!(segment.cache.len(), p.offset);
            let cache = &mut segment.cache.layers[layer];
            let rows = p.rows.start * kv_row..p.rows.end * kv_row;
            cache.k.extend_from_slice(&k[rows.clone()]);
            cache.v.extend_from_slice(&v[rows]);
        }
        // Each query row: its cache and its position.
        let mut work = Vec::with_capacity(q.len() / (heads * dim));
        for (segment, p) in segments.iter().zip(packed) {
            let cache = &segment.cache.layers[layer];
            for i in 0..p.rows.len() {
                work.push((&cache.k, &cache.v, p.offset + i));
            }
        }
        #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
        let scale = (1.0 / (dim as f64).sqrt()) as f32;
        let window = cfg.sliding_window;
        let mut out = vec![0f32; q.len()];
        out.par_chunks_mut(heads * dim)
            .zip(q.par_chunks(heads * dim))
            .zip(work.par_iter())
            .for_each(|((out_row, q_row), (keys, values, position))| {
                let first = window.map_or(0, |w| (position + 1).saturating_sub(w));
                let mut scores = Vec::with_capacity(position + 1 - first);
                for h in 0..heads {
                    let kv = (h / group) * dim;
                    let q_head = &q_row[h * dim..(h + 1) * dim];
                    scores.clear();
                    scores.extend((first..=*position).map(|j| {
                        dot(q_head, &keys[j * kv_row + kv..j * kv_row + kv + dim]) * scale
                    }));
                    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut total = 0.0;
                    for s in &mut scores {
                        *s = (*s - max).exp();
                        total += *s;
                    }
                    let out_head = &mut out_row[h * dim..(h + 1) * dim];
                    for (j, weight) in (first..=*position).zip(&scores) {
                        let value = &values[j * kv_row + kv..j * kv_row + kv + dim];
                        let weight = weight / total;
                        for (o, x) in out_head.iter_mut().zip(value) {
                            *o += weight * x;
                        }
                    }
                }
            });
        Tensor::from_vec(out, (work.len(), heads * dim), self.embed_tokens.device())
    }

    /// `cos`, `sin` `[positions, head_dim]`, one row per position.
    pub(super) fn rotary_at(
        &self,
        positions: &[usize],
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let inv_freq = Tensor::new(self.inv_freq.as_slice(), device)?;
        #[allow(clippy::cast_precision_loss)]
        let positions: Vec<f32> = positions.iter().map(|&p| p as f32).collect();
        let positions = Tensor::new(positions.as_slice(), device)?;
        let freqs = positions
            .unsqueeze(1)?
            .broadcast_mul(&inv_freq.unsqueeze(0)?)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?;
        Ok((emb.cos()?, emb.sin()?))
    }
}

/// candle's fused RMSNorm (f32, f16, bf16); the op-by-op form for other dtypes.
fn norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    match x.dtype() {
        #[allow(clippy::cast_possible_truncation)]
        DType::F32 | DType::F16 | DType::BF16 => candle_nn::ops::rms_norm(x, weight, eps as f32),
        _ => rms_norm(x, weight, eps),
    }
}
