//! A mixed serving batch's adapters: every sequence may use its own adapter (or none), and no
//! adapter is ever merged into a copy of the base weights. The backends add each sequence's
//! `B · A · x · scale` onto the base projection of its rows (`Backend::mixed`).

use std::{collections::BTreeMap, ops::Range};

use candle_core::{DType, Device, Result, Tensor};

use super::{Adapter, Lora, Site};

/// One pair laid out for serving: `A` `[rank, in]` and `Bᵀ` `[rank, out]`, contiguous, so
/// both halves of the product read memory in order.
#[derive(Clone, Debug)]
pub struct ServingLora {
    pub(crate) a: Tensor,
    pub(crate) b_t: Tensor,
    pub(crate) scale: f64,
}

impl ServingLora {
    pub fn new(lora: &Lora) -> Result<Self> {
        Ok(Self {
            a: lora.a.detach().contiguous()?,
            b_t: lora.b.detach().t()?.contiguous()?,
            scale: lora.scale,
        })
    }

    /// The pair on `device` in `dtype` (the model's), so serving never converts it per step.
    fn to(&self, device: &Device, dtype: DType) -> Result<Self> {
        let place = |t: &Tensor| t.to_device(device)?.to_dtype(dtype)?.contiguous();
        Ok(Self {
            a: place(&self.a)?,
            b_t: place(&self.b_t)?,
            scale: self.scale,
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

/// An adapter's pairs in serving layout, by layer and projection.
#[derive(Clone, Debug)]
pub struct ServingAdapter {
    pairs: BTreeMap<(usize, Site), ServingLora>,
}

impl ServingAdapter {
    pub fn new(adapter: &Adapter) -> Result<Self> {
        let pairs = adapter
            .weights
            .iter()
            .map(|(&key, lora)| Ok((key, ServingLora::new(lora)?)))
            .collect::<Result<_>>()?;
        Ok(Self { pairs })
    }

    /// This adapter on `device` in `dtype`: where the model is, in its compute dtype.
    pub fn to(&self, device: &Device, dtype: DType) -> Result<Self> {
        let pairs = self
            .pairs
            .iter()
            .map(|(&key, lora)| Ok((key, lora.to(device, dtype)?)))
            .collect::<Result<_>>()?;
        Ok(Self { pairs })
    }

    pub fn get(&self, layer: usize, site: Site) -> Option<&ServingLora> {
        self.pairs.get(&(layer, site))
    }
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
