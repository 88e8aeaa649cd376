//! Causal attention probabilities.

use candle_core::{CpuStorage, CustomOp1, D, DType, Layout, Result, Shape, Tensor};

use super::{exp, softmax_last_dim, sum};
use crate::gemm::f32_values;

/// Attention probabilities from f32 scores `[.., queries, keys]`: softmax of `scores · scale`
/// over the keys each query may see — causal, and within `window` when the model has a
/// sliding window — with the rest exactly 0. The last `queries` of `keys` positions are the
/// queries (all of them in training; the new ones after a KV cache).
///
/// On the CPU one op with the scale and the mask inside; attention scores are the largest
/// activations of a training step. Its backward uses the saved probabilities:
/// `dscores = scale · p · (dp − Σ dp·p)`. Elsewhere (a GPU, or f16/bf16 scores) the same from
/// tensor ops: scaled, a −∞ mask added, then [`softmax_last_dim`].
pub fn causal_softmax(scores: &Tensor, scale: f64, window: Option<usize>) -> Result<Tensor> {
    if scores.device().is_cpu() && scores.dtype() == DType::F32 {
        scores.apply_op1(CausalSoftmax { window, scale })
    } else {
        masked_softmax(&(scores * scale)?, window)
    }
}

/// [`causal_softmax`] of already scaled scores, from candle's own ops.
fn masked_softmax(scores: &Tensor, window: Option<usize>) -> Result<Tensor> {
    let (queries, keys) = (scores.dim(D::Minus2)?, scores.dim(D::Minus1)?);
    let mask: Vec<f32> = (0..queries)
        .flat_map(|q| {
            let (first, last) = visible(window, q, queries, keys);
            (0..keys).map(move |k| {
                if (first..=last).contains(&k) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    let mask =
        Tensor::from_vec(mask, (queries, keys), scores.device())?.to_dtype(scores.dtype())?;
    softmax_last_dim(&scores.broadcast_add(&mask)?)
}

/// Softmax of a row in place.
pub(super) fn softmax_in_place(row: &mut [f32]) {
    // Eight running maxima, so the compiler vectorises the search.
    let mut maxima = [f32::NEG_INFINITY; 8];
    let chunks = row.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for chunk in chunks {
        for i in 0..8 {
            maxima[i] = if chunk[i] > maxima[i] {
                chunk[i]
            } else {
                maxima[i]
            };
        }
    }
    let max = maxima.into_iter().fold(tail, f32::max);
    for v in row.iter_mut() {
        *v = exp(*v - max);
    }
    let inverse = 1.0 / sum(row);
    for v in row.iter_mut() {
        *v *= inverse;
    }
}

/// The keys query `q` (of `queries`) may see: `first..=last`.
pub(super) fn visible(
    window: Option<usize>,
    q: usize,
    queries: usize,
    keys: usize,
) -> (usize, usize) {
    let last = keys - queries + q;
    let first = window.map_or(0, |w| (last + 1).saturating_sub(w));
    (first, last)
}

struct CausalSoftmax {
    window: Option<usize>,
    scale: f64,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let values = f32_values(storage, layout, self.name())?;
        let dims = layout.dims();
        let (queries, keys) = match dims {
            [.., q, k] if k >= q => (*q, *k),
            _ => candle_core::bail!(
                "{}: scores {dims:?} are not [.., queries, keys]",
                self.name()
            ),
        };
        #[allow(clippy::cast_possible_truncation)]
        let scale = self.scale as f32;
        let mut out = vec![0f32; values.len()];
        for (row, (input, output)) in values
            .chunks_exact(keys)
            .zip(out.chunks_exact_mut(keys))
            .enumerate()
        {
            let (first, last) = visible(self.window, row % queries, queries, keys);
            let (input, output) = (&input[first..=last], &mut output[first..=last]);
            for (o, &x) in output.iter_mut().zip(input) {
                *o = x * scale;
            }
            softmax_in_place(output);
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _: &Tensor, probs: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // Masked positions have p = 0, so they get no gradient without a mask here.
        let dot = (grad * probs)?.sum_keepdim(D::Minus1)?;
        Ok(Some(((grad.broadcast_sub(&dot)? * probs)? * self.scale)?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::ops::check::{max_diff, reference_causal_softmax as reference_softmax};

    #[test]
    fn causal_softmax_equals_masking_then_softmax_with_the_same_gradient() -> Result<()> {
        let device = Device::Cpu;
        for (queries, window) in [(5, None), (5, Some(2)), (2, None), (3, Some(3))] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (2, 3, queries, 5), &device)?)?;
            let weights = Tensor::randn(0f32, 1.0, (2, 3, queries, 5), &device)?;
            let scale = 0.3;
            let fused = causal_softmax(x.as_tensor(), scale, window)?;
            let reference = reference_softmax(x.as_tensor(), scale, window)?;
            // The tensor-op form other devices take, checked here on the CPU.
            let fallback = masked_softmax(&(x.as_tensor() * scale)?, window)?;
            for ours in [&fused, &fallback] {
                let diff = max_diff(ours, &reference)?;
                assert!(diff < 1e-6, "{queries} queries, window {window:?}: {diff}");
            }
            let grad = |y: &Tensor| -> Result<Tensor> {
                let grads = (y * &weights)?.sum_all()?.backward()?;
                Ok(grads.get(x.as_tensor()).expect("a gradient").clone())
            };
            let diff = max_diff(&grad(&fused)?, &grad(&reference)?)?;
            assert!(
                diff < 1e-5,
                "gradient, {queries} queries, window {window:?}: {diff}"
            );
        }
        Ok(())
    }
}
