//! DoRA (weight-decomposed LoRA) as PEFT computes it for a linear layer. The adapted weight
//! `W + s·B·A` is split into a direction and a magnitude `m` `[out]`, trained with `A` and `B`:
//!
//! `y = r ⊙ (W·x + s·B·A·x) + b`, with `r = m / ‖W + s·B·A‖` (row norms, out of the graph:
//! PEFT detaches the norm, as the DoRA paper suggests, so `m` and `A`, `B` get PEFT's gradients).
//!
//! The norm is computed without forming `W + s·B·A`: row `i` of it squared is
//! `‖Wᵢ‖² + 2s·Bᵢ·(A·Wᵢᵀ) + s²·Bᵢ·(A·Aᵀ)·Bᵢᵀ`, where `‖Wᵢ‖²` is computed once per base weight
//! and `A·Wᵀ` is the frozen projection of `A`'s rows (`rank` rows through the base layer). So
//! an NF4 weight is never expanded for it beyond what a forward pass does.
//!
//! With dropout on the adapter's input while training, PEFT computes
//! `y = W·x + b + (r − 1) ⊙ W·drop(x) + r ⊙ s·B·A·drop(x)`; written as
//! `adapted(x, mask) + (r − 1) ⊙ (adapted(drop(x)) − b)`, it costs a second adapted projection.

use candle_core::{DType, Result, Tensor};

use super::{Lora, SegmentLora};

/// `‖W + s·B·A‖` per output row, `[out]` in f32, out of the graph. `base_sq` is `‖Wᵢ‖²`
/// `[out]`; `a_w` is `A·Wᵀ` `[rank, out]` (no bias).
pub fn weight_norm(base_sq: &Tensor, a_w: &Tensor, lora: &Lora) -> Result<Tensor> {
    let f32 = |t: &Tensor| t.detach().to_dtype(DType::F32);
    let (a, b, a_w) = (f32(&lora.a)?, f32(&lora.b)?, f32(a_w)?);
    let cross = (&b * a_w.t()?)?.sum(1)?;
    let gram = a.matmul(&a.t()?)?;
    let quadratic = (b.matmul(&gram)? * &b)?.sum(1)?;
    let s = lora.scale;
    let squared =
        ((f32(base_sq)? + cross.affine(2.0 * s, 0.0)?)? + quadratic.affine(s * s, 0.0)?)?;
    // Rounding may take a zero row a hair below zero.
    squared.relu()?.sqrt()
}

/// `r = m / norm` `[out]` in f32, differentiable in the magnitude alone.
pub fn scale(magnitude: &Tensor, norm: &Tensor) -> Result<Tensor> {
    magnitude.to_dtype(DType::F32)? / norm.detach().to_dtype(DType::F32)?
}

/// `r ⊙ (z − b) + b` for `z` `[.., out]`: an adapted projection's output (bias included)
/// rescaled row by row, the bias left as it is. In `z`'s dtype.
pub fn rescale(z: &Tensor, r: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let r = r.to_dtype(z.dtype())?;
    match bias {
        Some(b) => {
            let b = b.to_dtype(z.dtype())?;
            z.broadcast_sub(&b)?.broadcast_mul(&r)?.broadcast_add(&b)
        }
        None => z.broadcast_mul(&r),
    }
}

/// A mixed serving batch's projection `y` `[rows, out]` (base plus each segment's LoRA, as
/// `Backend::mixed` computes it) with each DoRA segment's rows rescaled by its `r`; the other
/// rows are returned as they are. Shared by every backend.
pub fn rescale_segments(
    y: Tensor,
    segments: &[SegmentLora<'_>],
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    if !segments
        .iter()
        .any(|s| s.lora.is_some_and(|l| l.dora.is_some()))
    {
        return Ok(y);
    }
    let parts: Vec<_> = segments
        .iter()
        .map(|s| (s.rows.clone(), s.lora.and_then(|l| l.dora.as_ref())))
        .collect();
    super::batch::map_segment_rows(y, &parts, "DoRA", |own, r| rescale(own, r, bias))
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// The expansion gives the norm of the dense `W + s·B·A` (as PEFT's `get_weight_norm`).
    #[test]
    fn the_norm_without_a_dense_weight_is_the_dense_weights() -> Result<()> {
        let device = Device::Cpu;
        let w = Tensor::new(&[[1f32, -2.0, 0.5], [0.0, 3.0, 1.0]], &device)?;
        let lora = Lora {
            a: Tensor::new(&[[0.5f32, 1.0, -1.0], [2.0, 0.0, 1.5]], &device)?,
            b: Tensor::new(&[[1f32, -0.5], [0.25, 2.0]], &device)?,
            scale: 1.5,
            magnitude: None,
        };
        let dense = (&w + (lora.b.matmul(&lora.a)? * 1.5)?)?;
        let expected = dense.sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()?;
        let norm = weight_norm(&w.sqr()?.sum(1)?, &lora.a.matmul(&w.t()?)?, &lora)?;
        for (ours, theirs) in norm.to_vec1::<f32>()?.iter().zip(&expected) {
            assert!((ours - theirs).abs() < 1e-5, "{ours} != {theirs}");
        }
        Ok(())
    }

    #[test]
    fn rescaling_leaves_the_bias_out() -> Result<()> {
        let device = Device::Cpu;
        let z = Tensor::new(&[[3f32, 5.0]], &device)?;
        let r = Tensor::new(&[2f32, 0.5], &device)?;
        let b = Tensor::new(&[1f32, 1.0], &device)?;
        assert_eq!(rescale(&z, &r, Some(&b))?.to_vec2::<f32>()?, [[5.0, 3.0]]);
        assert_eq!(rescale(&z, &r, None)?.to_vec2::<f32>()?, [[6.0, 2.5]]);
        Ok(())
    }
}
