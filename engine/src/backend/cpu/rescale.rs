//! DoRA's rescaling of an adapted projection's rows on the CPU in f32.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::{
    gemm::{f32_values, with_f32s},
    math::vectorized,
};

/// `r ⊙ (z − b) + b` for `z` `[.., out]` and `r` `[out]` (the bias `b` frozen), as one op
/// whose backward is `dz = g ⊙ r`, `dr = Σ_rows g ⊙ (z − b)`. Composed of candle's broadcast
/// ops, its backward's reduction over rows cost more than the LoRA step it scales.
pub fn rescale(z: &Tensor, r: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let bias = bias
        .map(|b| b.detach().to_dtype(candle_core::DType::F32)?.contiguous())
        .transpose()?;
    z.contiguous()?
        .apply_op2(&r.contiguous()?, Rescale { bias })
}

struct Rescale {
    bias: Option<Tensor>,
}

impl Rescale {
    /// `z − b` where there is a bias.
    fn unbiased(&self, z: &[f32], out: usize) -> Result<Vec<f32>> {
        let mut values = z.to_vec();
        if let Some(bias) = &self.bias {
            with_f32s([bias], "dora_rescale", |[bias]| {
                for row in values.chunks_exact_mut(out) {
                    for (v, b) in row.iter_mut().zip(bias) {
                        *v -= b;
                    }
                }
                Ok(())
            })?;
        }
        Ok(values)
    }
}

impl CustomOp2 for Rescale {
    fn name(&self) -> &'static str {
        "dora_rescale"
    }

    fn cpu_fwd(
        &self,
        z: &CpuStorage,
        z_layout: &Layout,
        r: &CpuStorage,
        r_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let z = f32_values(z, z_layout, self.name())?;
        let r = f32_values(r, r_layout, self.name())?;
        let out = r.len();
        if out == 0 || z.len() % out != 0 || z_layout.dims().last() != Some(&out) {
            candle_core::bail!("{}: z is not [.., {out}]", self.name());
        }
        let mut y = self.unbiased(z, out)?;
        let zeros = vec![0f32; out];
        let bias = match &self.bias {
            Some(b) => b.to_vec1::<f32>()?,
            None => zeros,
        };
        vectorized(
            #[inline(always)]
            || {
                for row in y.chunks_exact_mut(out) {
                    for ((v, &s), &b) in row.iter_mut().zip(r).zip(&bias) {
                        *v = *v * s + b;
                    }
                }
            },
        );
        Ok((CpuStorage::F32(y), z_layout.shape().clone()))
    }

    fn bwd(
        &self,
        z: &Tensor,
        r: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (d_z, d_r) = with_f32s([z, r, grad], self.name(), |[z, r, grad]| {
            let out = r.len();
            let unbiased = self.unbiased(z, out)?;
            let mut d_z = vec![0f32; z.len()];
            let mut d_r = vec![0f32; out];
            vectorized(
                #[inline(always)]
                || {
                    let rows = d_z
                        .chunks_exact_mut(out)
                        .zip(unbiased.chunks_exact(out))
                        .zip(grad.chunks_exact(out));
                    for ((d_z, z), g) in rows {
                        for ((((d_z, d_r), &z), &g), &s) in
                            d_z.iter_mut().zip(d_r.iter_mut()).zip(z).zip(g).zip(r)
                        {
                            *d_z = g * s;
                            *d_r += g * z;
                        }
                    }
                },
            );
            Ok((d_z, d_r))
        })?;
        Ok((
            Some(Tensor::from_vec(d_z, z.shape(), z.device())?),
            Some(Tensor::from_vec(d_r, r.shape(), r.device())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::{adapters::dora, backend::check::same_values_and_gradients};

    #[test]
    fn the_fused_rescaling_equals_the_composed_one_with_the_same_gradient() -> Result<()> {
        let device = Device::Cpu;
        let z = Tensor::randn(0f32, 2.0, (2, 5, 12), &device)?;
        let r = Tensor::randn(1f32, 0.3, 12, &device)?;
        let bias = Tensor::randn(0f32, 1.0, 12, &device)?;
        for bias in [None, Some(&bias)] {
            same_values_and_gradients(
                &[z.clone(), r.clone()],
                |t| rescale(&t[0], &t[1], bias),
                |t| dora::rescale(&t[0], &t[1], bias),
                1e-5,
            )?;
        }
        Ok(())
    }
}
