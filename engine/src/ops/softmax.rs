//! Causal attention probabilities.

use candle_core::{D, Result, Tensor};

use super::{exp, softmax_last_dim, sum};

/// Attention probabilities from scores `[.., queries, keys]`: softmax of `scores · scale` over
/// the keys each query may see — causal, and within `window` when the model has a sliding
/// window — with the rest exactly 0. The last `queries` of `keys` positions are the queries
/// (all of them in training; the new ones after a KV cache). Tensor ops: scaled, a −∞ mask
/// added, then [`softmax_last_dim`]; the CPU paths have their own ([`super::causal_attention`]
/// in training, the server's host attention).
pub fn causal_softmax(scores: &Tensor, scale: f64, window: Option<usize>) -> Result<Tensor> {
    let scores = (scores * scale)?;
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

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::ops::check::{reference_causal_softmax, same_values_and_gradients};

    #[test]
    fn causal_softmax_masks_the_keys_each_query_may_not_see() -> Result<()> {
        for (queries, window) in [(5, None), (5, Some(2)), (2, None), (3, Some(3))] {
            let x = Tensor::randn(0f32, 2.0, (2, 3, queries, 5), &Device::Cpu)?;
            same_values_and_gradients(
                &[x],
                |t| causal_softmax(&t[0], 0.3, window),
                |t| reference_causal_softmax(&t[0], 0.3, window),
                1e-6,
            )?;
        }
        Ok(())
    }
}
