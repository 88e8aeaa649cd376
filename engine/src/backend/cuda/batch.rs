//! A mixed serving batch's adapters through candle's ops: each distinct adapter's rows are
//! gathered, multiplied once, and added back into their rows of the base output — one pair of
//! matmuls per adapter in the batch, not per sequence.

use candle_core::{Result, Tensor};

use crate::adapters::{SegmentLora, ServingLora};

/// `y + Σ` each segment's adapter applied to its rows of `x` (`[rows, in]` → `[rows, out]`).
pub fn grouped_adapters(x: &Tensor, y: &Tensor, segments: &[SegmentLora<'_>]) -> Result<Tensor> {
    let mut groups: Vec<(&ServingLora, Vec<u32>)> = Vec::new();
    for segment in segments {
        let Some(lora) = segment.lora else { continue };
        let rows = segment
            .rows
            .clone()
            .map(|r| u32::try_from(r).expect("rows fit u32"));
        match groups.iter_mut().find(|(l, _)| std::ptr::eq(*l, lora)) {
            Some((_, group)) => group.extend(rows),
            None => groups.push((lora, rows.collect())),
        }
    }
    let mut y = y.clone();
    for (lora, rows) in groups {
        let index = Tensor::new(rows.as_slice(), x.device())?;
        let delta = lora.delta(&x.index_select(&index, 0)?)?;
        y = y.index_add(&index, &delta.to_dtype(y.dtype())?, 0)?;
    }
    Ok(y)
}
