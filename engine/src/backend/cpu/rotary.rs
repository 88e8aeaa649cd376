//! Rotary position embedding of one head's row, in transformers' (non-interleaved) layout,
//! inside the CPU attention op.

/// One head's row `x` rotated into `out`, with its position's `cos` and `sin` rows:
/// transformers' arithmetic, term for term, `x·cos + (−x₂, x₁)·sin`. Only the first
/// `cos.len()` dimensions rotate (Phi-4-mini's partial rotary); the rest pass through.
#[inline(always)]
pub(super) fn rotate(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = cos.len() / 2;
    for i in 0..half {
        out[i] = x[i] * cos[i] + -x[i + half] * sin[i];
        out[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
    }
    out[2 * half..].copy_from_slice(&x[2 * half..]);
}

/// The gradient of [`rotate`]'s input from its output's `g`: `g·cos + rotate_halfᵀ(g·sin)`.
#[inline(always)]
pub(super) fn rotate_back(g: &[f32], cos: &[f32], sin: &[f32], dx: &mut [f32]) {
    let half = cos.len() / 2;
    for i in 0..half {
        dx[i] = g[i] * cos[i] + g[i + half] * sin[i + half];
        dx[i + half] = g[i + half] * cos[i + half] - g[i] * sin[i];
    }
    dx[2 * half..].copy_from_slice(&g[2 * half..]);
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Result, Tensor};

    use super::*;
    use crate::backend::check::reference_rotary;

    #[test]
    fn rotating_a_row_equals_the_tensor_form_and_rotating_back_is_its_transpose() -> Result<()> {
        let device = Device::Cpu;
        let row = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        let (x, g) = (
            Tensor::randn(0f32, 1.0, (1, 8), &device)?,
            Tensor::randn(0f32, 1.0, (1, 8), &device)?,
        );
        let angles = Tensor::randn(0f32, 2.0, (1, 8), &device)?;
        let (cos, sin) = (row(&angles.cos()?)?, row(&angles.sin()?)?);
        let (mut rotated, mut back) = ([0f32; 8], [0f32; 8]);
        rotate(&row(&x)?, &cos, &sin, &mut rotated);
        rotate_back(&row(&g)?, &cos, &sin, &mut back);
        let expected = row(&reference_rotary(&x, &angles.cos()?, &angles.sin()?)?)?;
        assert_eq!(rotated.to_vec(), expected, "the same arithmetic");
        // ⟨rotate(x), g⟩ = ⟨x, rotate_back(g)⟩: rotate_back is the gradient.
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(a, b)| a * b).sum::<f32>();
        let (lhs, rhs) = (dot(&rotated, &row(&g)?), dot(&row(&x)?, &back));
        assert!((lhs - rhs).abs() < 1e-5, "{lhs} vs {rhs}");
        Ok(())
    }
}
