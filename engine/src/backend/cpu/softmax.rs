//! Attention probabilities of one query row on the CPU.

use super::math::{exp, sum};

/// Softmax of a row in place.
#[inline(always)]
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
#[inline(always)]
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
    use candle_core::{Device, Result, Tensor};

    use super::*;
    use crate::backend::check::{max_diff, softmax_last_dim};

    #[test]
    fn a_row_in_place_equals_the_tensor_softmax_and_keys_are_visible_causally() -> Result<()> {
        let mut row = vec![1f32, 2.0, 3.0, -1.0, 0.0, 100.0, 0.5, 0.25, 7.0];
        let expected = softmax_last_dim(&Tensor::new(row.as_slice(), &Device::Cpu)?)?;
        softmax_in_place(&mut row);
        assert!(max_diff(&Tensor::new(row.as_slice(), &Device::Cpu)?, &expected)? < 1e-6);
        // Query 1 of 2 new ones after 3 cached keys sees keys 0..=4, within a window of 2
        // keys 3..=4.
        assert_eq!(visible(None, 1, 2, 5), (0, 4));
        assert_eq!(visible(Some(2), 1, 2, 5), (3, 4));
        Ok(())
    }
}
