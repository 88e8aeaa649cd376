//! Rotary position embedding.

use candle_core::{CpuStorage, CustomOp1, D, DType, Layout, Result, Shape, Tensor};

use crate::gemm::{f32_values, with_f32};

/// Rotary embedding in transformers' (non-interleaved) layout: `x·cos + rotate_half(x)·sin`
/// with `cos`, `sin` broadcast against `x` (`[batch, heads, seq, head_dim]` against
/// `[seq, head_dim]` in training). On the CPU in f32 with `[seq, head_dim]` tables, one op
/// whose backward is the inverse rotation: `dx = g·cos + rotate_halfᵀ(g·sin)`.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let rank = x.rank();
    let fused = x.device().is_cpu()
        && x.dtype() == DType::F32
        && rank >= 2
        && x.dim(D::Minus1)? % 2 == 0
        && cos.dims() == &x.dims()[rank - 2..]
        && sin.dims() == cos.dims();
    if fused {
        let tables = |t: &Tensor| t.detach().to_dtype(DType::F32)?.contiguous();
        x.contiguous()?.apply_op1(Rotary {
            cos: tables(cos)?,
            sin: tables(sin)?,
        })
    } else {
        composed(x, cos, sin)
    }
}

pub(super) fn composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    // transformers casts the tables to the activations' dtype (bf16 on GPU).
    let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// One head's row `x` rotated into `out`, with its position's `cos` and `sin` rows: the
/// composed form's arithmetic, term for term, `x·cos + (−x₂, x₁)·sin`.
pub(super) fn rotate(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = x.len() / 2;
    for i in 0..half {
        out[i] = x[i] * cos[i] + -x[i + half] * sin[i];
        out[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
    }
}

/// The gradient of [`rotate`]'s input from its output's `g`: `g·cos + rotate_halfᵀ(g·sin)`.
pub(super) fn rotate_back(g: &[f32], cos: &[f32], sin: &[f32], dx: &mut [f32]) {
    let half = g.len() / 2;
    for i in 0..half {
        dx[i] = g[i] * cos[i] + g[i + half] * sin[i + half];
        dx[i + half] = g[i + half] * cos[i + half] - g[i] * sin[i];
    }
}

struct Rotary {
    /// `[seq, head_dim]`.
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    /// Applies `rotate` to every `head_dim` row of `x` with its position's `cos` and `sin`
    /// rows, into a new buffer.
    fn map(
        &self,
        x: &[f32],
        rotate: impl Fn(&[f32], &[f32], &[f32], &mut [f32]),
    ) -> Result<Vec<f32>> {
        with_f32(&self.cos, "rotary", |cos| {
            with_f32(&self.sin, "rotary", |sin| {
                let (seq, dim) = self.cos.dims2()?;
                let mut out = vec![0f32; x.len()];
                for (row, (x, o)) in x
                    .chunks_exact(dim)
                    .zip(out.chunks_exact_mut(dim))
                    .enumerate()
                {
                    let at = (row % seq) * dim..(row % seq + 1) * dim;
                    rotate(x, &cos[at.clone()], &sin[at], o);
                }
                Ok(out)
            })
        })
    }
}

impl CustomOp1 for Rotary {
    fn name(&self) -> &'static str {
        "rotary"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_values(storage, layout, self.name())?;
        let out = self.map(x, rotate)?;
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_f32(grad, self.name(), |g| self.map(g, rotate_back))?;
        Tensor::from_vec(dx, x.shape(), x.device()).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::ops::check::same_values_and_gradients;

    #[test]
    fn the_fused_rotation_equals_the_composed_one_with_the_same_gradient() -> Result<()> {
        let device = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &device)?;
        let angles = Tensor::randn(0f32, 2.0, (5, 8), &device)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        same_values_and_gradients(
            &[x],
            |t| apply_rotary(&t[0], &cos, &sin),
            |t| composed(&t[0], &cos, &sin),
            1e-6,
        )
    }
}
