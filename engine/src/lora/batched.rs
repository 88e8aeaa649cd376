//! LoRA over a packed serving batch in which every sequence may use its own adapter (or
//! none): the base projection runs once for all rows, and each sequence's rows add their own
//! adapter's `B · A · x · scale`. No adapter is ever merged into a copy of the base weights.
//!
//! On CPU one op walks the segments (as punica's SGMV does on GPU): a batch of 32 sequences
//! with 32 adapters costs one op per projection, not 32 × (slice, two matmuls, scale, copy)
//! — at serving batch sizes those per-op costs, not the arithmetic, would dominate. Other
//! devices take the same sum through candle's ops, one segment at a time.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};

use rayon::prelude::*;

use super::Lora;
use crate::ops::dot;

/// The rows of one sequence in the packed batch and the adapter pair they go through.
#[derive(Clone, Debug)]
pub struct SegmentLora<'a> {
    pub rows: Range<usize>,
    pub lora: Option<&'a Lora>,
}

/// The adapters' contribution `[rows, out]` for `x` `[rows, in]`, or `None` when no segment
/// has an adapter on this projection (the caller then adds nothing).
pub fn batched_delta(
    x: &Tensor,
    segments: &[SegmentLora<'_>],
    out: usize,
) -> Result<Option<Tensor>> {
    if segments.iter().all(|s| s.lora.is_none()) {
        return Ok(None);
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        let op = BatchedLora { segments, out };
        return x.contiguous()?.apply_op1_no_bwd(&op).map(Some);
    }
    per_segment_delta(x, segments, out).map(Some)
}

/// The same sum from candle's ops: the reference the fused op is tested against, and the
/// path on devices without the fused op.
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

struct BatchedLora<'a> {
    segments: &'a [SegmentLora<'a>],
    out: usize,
}

impl CustomOp1 for BatchedLora<'_> {
    fn name(&self) -> &'static str {
        "batched-lora"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(values), Some((start, end)), &[rows, input]) =
            (storage, layout.contiguous_offsets(), layout.dims())
        else {
            candle_core::bail!("{}: needs contiguous f32 rows [rows, in]", self.name());
        };
        let x = &values[start..end];
        // Each segment's A and B as slices, borrowed for the parallel pass below.
        let pairs = self
            .segments
            .iter()
            .map(|segment| {
                let Some(lora) = segment.lora else {
                    return Ok(None);
                };
                let (a, b) = (lora.a.contiguous()?, lora.b.contiguous()?);
                let (rank, a_in) = a.dims2()?;
                let (b_out, b_rank) = b.dims2()?;
                if a_in != input || b_out != self.out || b_rank != rank || segment.rows.end > rows {
                    candle_core::bail!(
                        "{}: adapter A {:?} / B {:?} does not fit rows {:?} of [{rows}, {input}] → {}",
                        self.name(),
                        a.dims(),
                        b.dims(),
                        segment.rows,
                        self.out
                    );
                }
                #[allow(clippy::cast_possible_truncation)]
                Ok(Some((a, b, rank, lora.scale as f32)))
            })
            .collect::<Result<Vec<_>>>()?;
        let guards: Vec<_> = pairs
            .iter()
            .map(|pair| {
                pair.as_ref()
                    .map(|(a, b, _, _)| (a.storage_and_layout(), b.storage_and_layout()))
            })
            .collect();
        let mut slices = Vec::with_capacity(guards.len());
        for (guard, pair) in guards.iter().zip(&pairs) {
            slices.push(match (guard, pair) {
                (Some(((a, a_layout), (b, b_layout))), Some((_, _, rank, scale))) => Some((
                    f32_slice(a, a_layout)?,
                    f32_slice(b, b_layout)?,
                    *rank,
                    *scale,
                )),
                _ => None,
            });
        }
        let mut owner = vec![usize::MAX; rows];
        for (index, segment) in self.segments.iter().enumerate() {
            owner[segment.rows.clone()].fill(index);
        }
        let mut delta = vec![0f32; rows * self.out];
        delta
            .par_chunks_mut(self.out)
            .zip(x.par_chunks(input))
            .zip(owner.par_iter())
            .for_each(|((out_row, x_row), &segment)| {
                let Some(Some((a, b, rank, scale))) = slices.get(segment) else {
                    return;
                };
                let hidden: Vec<f32> = a
                    .chunks_exact(input)
                    .map(|a_row| dot(a_row, x_row) * scale)
                    .collect();
                for (o, b_row) in out_row.iter_mut().zip(b.chunks_exact(*rank)) {
                    *o = dot(b_row, &hidden);
                }
            });
        Ok((CpuStorage::F32(delta), Shape::from((rows, self.out))))
    }
}

fn f32_slice<'s>(storage: &'s Storage, layout: &Layout) -> Result<&'s [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(values)), Some((start, end))) => Ok(&values[start..end]),
        _ => candle_core::bail!("batched-lora: adapter weights must be contiguous f32 on CPU"),
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::rng::Rng;

    fn pair(rank: usize, (out, input): (usize, usize), seed: u64) -> Result<Lora> {
        let mut rng = Rng::seed(seed);
        let mut lora = Lora::init(rank, (out, input), 0.5, &mut rng, &Device::Cpu)?;
        let b: Vec<f32> = (0..out * rank).map(|_| rng.uniform(-1.0, 1.0)).collect();
        lora.b = Tensor::from_vec(b, (out, rank), &Device::Cpu)?;
        Ok(lora)
    }

    #[test]
    fn each_segment_goes_through_its_own_adapter_and_bare_rows_get_nothing() -> Result<()> {
        let (input, out) = (40, 24);
        let first = pair(4, (out, input), 1)?;
        let second = pair(8, (out, input), 2)?;
        let x = Tensor::randn(0f32, 1.0, (9, input), &Device::Cpu)?;
        let segments = [
            SegmentLora {
                rows: 0..3,
                lora: Some(&first),
            },
            SegmentLora {
                rows: 3..4,
                lora: None,
            },
            SegmentLora {
                rows: 4..8,
                lora: Some(&second),
            },
            SegmentLora {
                rows: 8..9,
                lora: Some(&first),
            },
        ];
        let fused = batched_delta(&x, &segments, out)?.expect("adapters present");
        let reference = per_segment_delta(&x, &segments, out)?;
        let diff = (&fused - &reference)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "fused and per-segment sums differ by {diff}");
        let bare = fused
            .narrow(0, 3, 1)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(bare == 0.0);
        let alone = first.delta(&x.narrow(0, 8, 1)?)?;
        let diff = (fused.narrow(0, 8, 1)? - alone)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5);
        Ok(())
    }

    #[test]
    fn a_batch_without_adapters_adds_nothing() -> Result<()> {
        let x = Tensor::zeros((2, 8), DType::F32, &Device::Cpu)?;
        let segments = [SegmentLora {
            rows: 0..2,
            lora: None,
        }];
        assert!(batched_delta(&x, &segments, 4)?.is_none());
        Ok(())
    }
}
