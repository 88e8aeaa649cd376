//! RMSNorm on the CPU in f32.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::{
    gemm::{f32_values, with_f32, with_f32s},
    math::{dot, vectorized},
};

/// RMSNorm as transformers computes it, as one op whose backward is
/// `dx = (g⊙w − x̂ · mean(g⊙w⊙x̂)) / rms` with `x̂ = x / rms`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op1(RmsNorm {
        weight: weight.detach().contiguous()?,
        eps,
    })
}

struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// `sqrt(mean(x²) + eps)` of one row, in f32 as the composed form computes it (the sum
    /// in eight lanes: one running sum is a chain of dependent adds the length of the row).
    #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
    #[inline(always)]
    fn rms(&self, row: &[f32]) -> f32 {
        let mean = dot(row, row) / row.len() as f32;
        (mean + self.eps as f32).sqrt()
    }
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_values(storage, layout, self.name())?;
        let out = with_f32(&self.weight, self.name(), |w| {
            if layout.dims().last() != Some(&w.len()) {
                candle_core::bail!(
                    "{}: x {:?} is not [.., {}]",
                    self.name(),
                    layout.dims(),
                    w.len()
                );
            }
            let mut out = vec![0f32; x.len()];
            vectorized(
                #[inline(always)]
                || {
                    for (row, o) in x.chunks_exact(w.len()).zip(out.chunks_exact_mut(w.len())) {
                        let rms = self.rms(row);
                        for ((o, &x), &w) in o.iter_mut().zip(row).zip(w) {
                            *o = x / rms * w;
                        }
                    }
                },
            );
            Ok(out)
        })?;
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    #[allow(clippy::cast_precision_loss)]
    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_f32s([x, grad, &self.weight], self.name(), |[x, g, w]| {
            let n = w.len();
            let mut dx = vec![0f32; x.len()];
            // `g ⊙ w` of a row, so its dot with the row vectorises like the norm's own sum.
            let mut scaled = vec![0f32; n];
            vectorized(
                #[inline(always)]
                || {
                    for ((row, g), dx) in x
                        .chunks_exact(n)
                        .zip(g.chunks_exact(n))
                        .zip(dx.chunks_exact_mut(n))
                    {
                        let inverse = 1.0 / self.rms(row);
                        for ((s, g), w) in scaled.iter_mut().zip(g).zip(w) {
                            *s = g * w;
                        }
                        let mean = dot(&scaled, row) * inverse / n as f32;
                        for (((dx, x), g), w) in dx.iter_mut().zip(row).zip(g).zip(w) {
                            *dx = (g * w - x * inverse * mean) * inverse;
                        }
                    }
                },
            );
            Ok(dx)
        })?;
        Tensor::from_vec(dx, x.shape(), x.device()).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::backend::{check::same_values_and_gradients, cuda::composed_rms_norm};

    #[test]
    fn the_fused_norm_equals_the_composed_one_with_the_same_gradient() -> Result<()> {
        let device = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (2, 3, 16), &device)?;
        let weight = Tensor::randn(1f32, 0.5, 16, &device)?;
        same_values_and_gradients(
            &[x],
            |t| rms_norm(&t[0], &weight, 1e-5),
            |t| composed_rms_norm(&t[0], &weight, 1e-5),
            1e-5,
        )
    }
}
