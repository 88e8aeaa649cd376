//! A mixed serving batch's adapters: every sequence may use its own adapter (or none), and no
//! adapter is ever merged into a copy of the base weights. The backends add each sequence's
//! `B · A · x · scale` onto the base projection of its rows (`Backend::mixed`); a DoRA
//! adapter's rows are then rescaled by its `r` ([`super::dora::rescale_segments`]); an (IA)³
//! adapter's rows are scaled by its vectors, before the projection or after it
//! ([`super::scale_segments`]). A prompt-learning adapter changes no projection: its
//! sequences start from its virtual tokens' keys and values, computed once when it is laid
//! out ([`ServingAdapter::virtual_prefix`]).

use std::{collections::BTreeMap, ops::Range};

use candle_core::{DType, Device, Result, Tensor};

use super::{Adapter, Bottleneck, BottleneckAdapter, Ia3, Ia3Adapter, Lora, Placement, Site};
use crate::backend::KvCache;

/// One pair laid out for serving: `A` `[rank, in]` and `Bᵀ` `[rank, out]`, contiguous, so
/// both halves of the product read memory in order.
#[derive(Clone, Debug)]
pub struct ServingLora {
    pub(crate) a: Tensor,
    pub(crate) b_t: Tensor,
    pub(crate) scale: f64,
    /// DoRA's `r = m / ‖W + s·B·A‖` `[out]`, computed once against the base weights.
    pub(crate) dora: Option<Tensor>,
}

impl ServingLora {
    /// A plain LoRA pair; a DoRA pair needs its `r` ([`Self::with_dora`]).
    pub fn new(lora: &Lora) -> Result<Self> {
        if lora.magnitude.is_some() {
            candle_core::bail!(
                "a DoRA pair is served with its scale against the base weights (Llama::serving_adapter)"
            );
        }
        Self::with_dora(lora, None)
    }

    /// The pair, with DoRA's `r` `[out]` where it has a magnitude.
    pub fn with_dora(lora: &Lora, dora: Option<Tensor>) -> Result<Self> {
        if lora.magnitude.is_some() != dora.is_some() {
            candle_core::bail!("a DoRA pair needs its scale, and only a DoRA pair has one");
        }
        Ok(Self {
            a: lora.a.detach().contiguous()?,
            b_t: lora.b.detach().t()?.contiguous()?,
            scale: lora.scale,
            dora: dora.map(|r| r.detach()),
        })
    }

    /// The pair on `device`, `A` and `Bᵀ` in `lora_dtype` and DoRA's scale in `dtype` (the
    /// model's), so serving never converts it per step.
    pub fn to(&self, device: &Device, dtype: DType, lora_dtype: DType) -> Result<Self> {
        let place = |t: &Tensor, dtype| t.to_device(device)?.to_dtype(dtype)?.contiguous();
        Ok(Self {
            a: place(&self.a, lora_dtype)?,
            b_t: place(&self.b_t, lora_dtype)?,
            scale: self.scale,
            dora: self.dora.as_ref().map(|r| place(r, dtype)).transpose()?,
        })
    }

    /// `x · Aᵀ · B · scale` through candle's ops.
    pub(crate) fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.a.to_dtype(x.dtype())?;
        let b_t = self.b_t.to_dtype(x.dtype())?;
        x.broadcast_matmul(&a.t()?)?
            .broadcast_matmul(&b_t)?
            .affine(self.scale, 0.0)
    }
}

/// An adapter's parts in serving layout, by layer and projection: LoRA pairs, or (IA)³
/// vectors; or by layer and placement: bottleneck modules.
#[derive(Clone, Debug, Default)]
pub struct ServingAdapter {
    pairs: BTreeMap<(usize, Site), ServingLora>,
    vectors: BTreeMap<(usize, Site), Ia3>,
    bottlenecks: BTreeMap<(usize, Placement), Bottleneck>,
    /// A prompt-learning adapter's virtual tokens, in a cache of their own.
    prefix: Option<KvCache>,
}

impl ServingAdapter {
    /// A plain LoRA adapter; a DoRA adapter is laid out by `Llama::serving_adapter`, which
    /// has the base weights its scales need.
    pub fn new(adapter: &Adapter) -> Result<Self> {
        Self::with_dora(adapter, |_, _, _| {
            candle_core::bail!(
                "a DoRA adapter is served with its scales against the base weights (Llama::serving_adapter)"
            )
        })
    }

    /// Every pair, each DoRA pair with the `r` that `dora` gives for it.
    pub fn with_dora(
        adapter: &Adapter,
        mut dora: impl FnMut(usize, Site, &Lora) -> Result<Tensor>,
    ) -> Result<Self> {
        let pairs = adapter
            .weights
            .iter()
            .map(|(&(layer, site), lora)| {
                let r = match lora.magnitude {
                    Some(_) => Some(dora(layer, site, lora)?),
                    None => None,
                };
                Ok(((layer, site), ServingLora::with_dora(lora, r)?))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            pairs,
            ..Self::default()
        })
    }

    /// A prompt-learning adapter: `prefix`, its virtual tokens' keys and values on the
    /// model's device (`Llama::prefill_embeddings`), which every sequence of it starts from.
    pub fn virtual_tokens(prefix: KvCache) -> Self {
        Self {
            prefix: Some(prefix),
            ..Self::default()
        }
    }

    /// The cache a sequence through this adapter starts with, if the adapter has virtual
    /// tokens: their full blocks shared, the tokens after them copied.
    pub fn virtual_prefix(&self) -> Option<&KvCache> {
        self.prefix.as_ref()
    }

    /// Virtual tokens before every sequence of this adapter (0 but for prompt learning).
    pub fn virtual_len(&self) -> usize {
        self.prefix.as_ref().map_or(0, KvCache::len)
    }

    /// An (IA)³ adapter's vectors.
    pub fn ia3(adapter: &Ia3Adapter) -> Self {
        let vectors = adapter
            .vectors
            .iter()
            .map(|(&key, ia3)| (key, ia3.detach()))
            .collect();
        Self {
            vectors,
            ..Self::default()
        }
    }

    /// A bottleneck adapter's modules.
    pub fn bottleneck(adapter: &BottleneckAdapter) -> Self {
        let bottlenecks = adapter
            .modules
            .iter()
            .map(|(&key, module)| (key, module.detach()))
            .collect();
        Self {
            bottlenecks,
            ..Self::default()
        }
    }

    /// This adapter on `device` in `dtype`: where the model is, in its compute dtype.
    pub fn to(&self, device: &Device, dtype: DType) -> Result<Self> {
        self.to_with(device, dtype, dtype)
    }

    /// [`Self::to`] with LoRA's `A` and `Bᵀ` in `lora_dtype` (vLLM's `--lora-dtype`): bf16
    /// beside an f32 model halves what a step reads of them, at bf16's rounding of the
    /// adapter's weights.
    pub fn to_with(&self, device: &Device, dtype: DType, lora_dtype: DType) -> Result<Self> {
        let pairs = self
            .pairs
            .iter()
            .map(|(&key, lora)| Ok((key, lora.to(device, dtype, lora_dtype)?)))
            .collect::<Result<_>>()?;
        let vectors = self
            .vectors
            .iter()
            .map(|(&key, ia3)| Ok((key, ia3.to(device, dtype)?)))
            .collect::<Result<_>>()?;
        let bottlenecks = self
            .bottlenecks
            .iter()
            .map(|(&key, module)| Ok((key, module.to(device, dtype)?)))
            .collect::<Result<_>>()?;
        Ok(Self {
            pairs,
            vectors,
            bottlenecks,
            // Computed on the model's device in its dtype already.
            prefix: self.prefix.clone(),
        })
    }

    pub fn get(&self, layer: usize, site: Site) -> Option<&ServingLora> {
        self.pairs.get(&(layer, site))
    }

    /// The (IA)³ vector on `site` of `layer`, if the adapter has one there.
    pub fn vector(&self, layer: usize, site: Site) -> Option<&Ia3> {
        self.vectors.get(&(layer, site))
    }

    /// The bottleneck module at `placement` of `layer`, if the adapter has one there.
    pub fn bottleneck_at(&self, layer: usize, placement: Placement) -> Option<&Bottleneck> {
        self.bottlenecks.get(&(layer, placement))
    }
}

/// `t` `[rows, ..]` with each segment's rows passed through `f` where the segment has a part
/// (`Some`); the other rows are returned as they are. The per-row steps of a mixed batch that
/// are not LoRA's (DoRA's rescale, (IA)³'s scale) share it; `what` names the method in the
/// error for segments out of order or outside the batch.
pub(crate) fn map_segment_rows<T>(
    t: Tensor,
    segments: &[(Range<usize>, Option<T>)],
    what: &str,
    f: impl Fn(&Tensor, &T) -> Result<Tensor>,
) -> Result<Tensor> {
    if segments.iter().all(|(_, part)| part.is_none()) {
        return Ok(t);
    }
    let rows = t.dim(0)?;
    let mut parts = Vec::with_capacity(segments.len() + 1);
    let mut at = 0;
    for (range, part) in segments {
        if range.start < at || range.end > rows {
            candle_core::bail!("{what}: segments must be in order and within the batch");
        }
        if range.start > at {
            parts.push(t.narrow(0, at, range.start - at)?);
        }
        let own = t.narrow(0, range.start, range.len())?;
        parts.push(match part {
            Some(part) => f(&own, part)?,
            None => own,
        });
        at = range.end;
    }
    if at < rows {
        parts.push(t.narrow(0, at, rows - at)?);
    }
    Tensor::cat(&parts, 0)
}

/// The rows of one sequence in the packed batch and the adapter pair they go through.
#[derive(Clone, Debug)]
pub struct SegmentLora<'a> {
    pub rows: Range<usize>,
    pub lora: Option<&'a ServingLora>,
}

/// The adapters' contribution through candle's ops, one segment at a time: the reference the
/// backends' batched forms are tested against.
pub fn per_segment_delta(x: &Tensor, segments: &[SegmentLora<'_>], out: usize) -> Result<Tensor> {
    let parts = segments
        .iter()
        .map(|segment| {
            let rows = x.narrow(0, segment.rows.start, segment.rows.len())?;
            match segment.lora {
                Some(lora) => lora.delta(&rows),
                None => Tensor::zeros((segment.rows.len(), out), x.dtype(), x.device()),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 0)
}
