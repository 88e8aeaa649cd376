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
use crate::{
    lora::batched::{SegmentLora, batched_delta},
    ops::{apply_rotary, causal_softmax},
    peft::Adapter,
};

/// One sequence's keys and values, per layer `[kv_heads, tokens, head_dim]`.
#[derive(Clone, Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    pub fn new(model: &Llama) -> Self {
        Self {
            layers: vec![None; model.num_layers()],
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
        let slot = &mut self.layers[layer];
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
    pub adapter: Option<&'a Adapter>,
}

struct Packed {
    rows: Range<usize>,
    offset: usize,
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
        let mut start = 0;
        for segment in segments.iter() {
            let (len, offset) = (segment.tokens.len(), segment.cache.len());
            let (cos, sin) = self.rotary_range(offset, len, &device)?;
            packed.push(Packed {
                rows: start..start + len,
                offset,
                cos,
                sin,
            });
            start += len;
        }
        let ids = Tensor::new(ids.as_slice(), &device)?;
        let mut h = self.embed_tokens.index_select(&ids, 0)?;
        for layer in 0..self.layers.len() {
            h = self.serve_layer(layer, &h, segments, &packed)?;
        }
        for segment in segments.iter_mut() {
            segment.cache.len += segment.tokens.len();
        }
        #[allow(clippy::cast_possible_truncation)]
        let last: Vec<u32> = packed.iter().map(|p| (p.rows.end - 1) as u32).collect();
        let last = h.index_select(&Tensor::new(last.as_slice(), &device)?, 0)?;
        let normed = candle_nn::ops::rms_norm(&last, &self.norm, self.config.rms_norm_eps as f32)?;
        self.lm_head.infer(&normed)
    }

    fn serve_layer(
        &self,
        layer: usize,
        h: &Tensor,
        segments: &mut [Segment<'_>],
        packed: &[Packed],
    ) -> Result<Tensor> {
        let block = &self.layers[layer];
        #[allow(clippy::cast_possible_truncation)]
        let eps = self.config.rms_norm_eps as f32;
        let loras = |site: Site| -> Vec<SegmentLora<'_>> {
            segments
                .iter()
                .zip(packed)
                .map(|(s, p)| SegmentLora {
                    rows: p.rows.clone(),
                    lora: s.adapter.and_then(|a| a.weights.get(&(layer, site))),
                })
                .collect()
        };
        let project = |site: Site, x: &Tensor, loras: &[SegmentLora<'_>]| -> Result<Tensor> {
            let y = block.projections[site as usize].base().infer(x)?;
            match batched_delta(x, loras, self.site_shape(site).0)? {
                Some(delta) => y + delta,
                None => Ok(y),
            }
        };
        let x = candle_nn::ops::rms_norm(h, &block.input_norm, eps)?;
        let site_loras: Vec<Vec<SegmentLora<'_>>> = Site::ALL.iter().map(|&s| loras(s)).collect();
        let q = project(Site::QProj, &x, &site_loras[Site::QProj as usize])?;
        let k = project(Site::KProj, &x, &site_loras[Site::KProj as usize])?;
        let v = project(Site::VProj, &x, &site_loras[Site::VProj as usize])?;
        let attended = self.packed_attention(layer, &q, &k, &v, segments, packed)?;
        let o = project(Site::OProj, &attended, &site_loras[Site::OProj as usize])?;
        let x = (h + o)?;
        let normed = candle_nn::ops::rms_norm(&x, &block.post_attention_norm, eps)?;
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
        x + mlp
    }

    fn packed_attention(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        segments: &mut [Segment<'_>],
        packed: &[Packed],
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (heads, kv_heads, dim) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        #[allow(clippy::cast_precision_loss)]
        let scale = 1.0 / (dim as f64).sqrt();
        let split = |t: &Tensor, rows: &Range<usize>, n: usize| {
            t.narrow(0, rows.start, rows.len())?
                .reshape((rows.len(), n, dim))?
                .transpose(0, 1)?
                .contiguous()
        };
        let mut outputs = Vec::with_capacity(packed.len());
        for (segment, p) in segments.iter_mut().zip(packed) {
            let q = apply_rotary(&split(q, &p.rows, heads)?, &p.cos, &p.sin)?;
            let k_new = apply_rotary(&split(k, &p.rows, kv_heads)?, &p.cos, &p.sin)?;
            let v_new = split(v, &p.rows, kv_heads)?;
            debug_assert_eq!(segment.cache.len(), p.offset);
            let (k, v) = segment.cache.append(layer, k_new, v_new)?;
            let k = repeat_kv(&k.unsqueeze(0)?, heads / kv_heads)?.squeeze(0)?;
            let v = repeat_kv(&v.unsqueeze(0)?, heads / kv_heads)?.squeeze(0)?;
            let scores = (q.matmul(&k.t()?)? * scale)?
                .to_dtype(DType::F32)?
                .contiguous()?;
            let probs = causal_softmax(&scores, cfg.sliding_window)?.to_dtype(v.dtype())?;
            outputs.push(
                probs
                    .matmul(&v)?
                    .transpose(0, 1)?
                    .reshape((p.rows.len(), heads * dim))?,
            );
        }
        Tensor::cat(&outputs, 0)
    }

    /// `cos`, `sin` `[len, head_dim]` for positions `start..start + len`.
    pub(super) fn rotary_range(
        &self,
        start: usize,
        len: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let inv_freq = Tensor::new(self.inv_freq.as_slice(), device)?;
        #[allow(clippy::cast_precision_loss)]
        let positions: Vec<f32> = (start..start + len).map(|p| p as f32).collect();
        let positions = Tensor::new(positions.as_slice(), device)?;
        let freqs = positions
            .unsqueeze(1)?
            .broadcast_mul(&inv_freq.unsqueeze(0)?)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?;
        Ok((emb.cos()?, emb.sin()?))
    }
}
