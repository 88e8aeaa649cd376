//! DoRA on a frozen projection of the model (the math is in [`crate::adapters::dora`]): the
//! norm of the adapted weight from the base rows' norms (computed once per projection) and the
//! frozen projection of `A`'s rows, then the adapted projection rescaled, through the
//! [`Backend`], so it runs wherever the model does.

use std::sync::OnceLock;

use candle_core::{DType, Device, Result, Tensor};

use crate::{
    adapters::{Lora, dora},
    backend::{Backend, DropoutMask, FrozenLinear},
};

/// A frozen projection's row norms squared, `‖Wᵢ‖²` `[out]` in f32, computed on first use
/// (from the dequantized weight where it is NF4, as PEFT computes them).
#[derive(Clone, Debug, Default)]
pub(super) struct RowNorms(OnceLock<Tensor>);

impl RowNorms {
    pub(super) fn squared(&self, base: &FrozenLinear, device: &Device) -> Result<Tensor> {
        if let Some(norms) = self.0.get() {
            return Ok(norms.clone());
        }
        let norms = base
            .weight()
            .to_dense(device, DType::F32)?
            .sqr()?
            .sum(1)?
            .detach();
        Ok(self.0.get_or_init(|| norms).clone())
    }
}

/// DoRA's `r = m / ‖W + s·B·A‖` `[out]` in f32 for `lora` on `base`, differentiable in the
/// magnitude alone. `dtype` is the model's compute dtype.
pub(super) fn scale(
    backend: &dyn Backend,
    base: &FrozenLinear,
    norms: &RowNorms,
    lora: &Lora,
    dtype: DType,
) -> Result<Tensor> {
    let Some(magnitude) = &lora.magnitude else {
        candle_core::bail!("DoRA's scale of a pair without a magnitude");
    };
    let device = magnitude.device();
    let a_w = backend.frozen(&lora.a.detach().to_dtype(dtype)?, base)?;
    let a_w = without_bias(&a_w, base)?;
    let norm = dora::weight_norm(&norms.squared(base, device)?, &a_w, lora)?;
    dora::scale(magnitude, &norm)
}

/// The DoRA projection of training and evaluation: PEFT's
/// `W·x + b + (r − 1) ⊙ W·drop(x) + r ⊙ s·B·A·drop(x)`, differentiable in `x`, `A`, `B` and
/// the magnitude. Without dropout that is `r ⊙ (adapted(x) − b) + b`; with it,
/// `adapted(x, mask) + (r − 1) ⊙ (adapted(drop(x)) − b)`, which costs a second adapted
/// projection (PEFT, too, runs the base layer twice then).
pub(super) fn adapted(
    backend: &dyn Backend,
    base: &FrozenLinear,
    norms: &RowNorms,
    x: &Tensor,
    lora: &Lora,
    mask: Option<DropoutMask>,
) -> Result<Tensor> {
    let r = scale(backend, base, norms, lora, x.dtype())?;
    match mask {
        None => backend.rescale_rows(&backend.adapted(x, base, lora, None)?, &r, base.bias()),
        Some(mask) => {
            let dropped = (x * mask.tensor(x.dims(), x.device(), x.dtype())?)?;
            let again = without_bias(&backend.adapted(&dropped, base, lora, None)?, base)?;
            let extra = backend.rescale_rows(&again, &r.affine(1.0, -1.0)?, None)?;
            backend.adapted(x, base, lora, Some(mask))? + extra
        }
    }
}

fn without_bias(y: &Tensor, base: &FrozenLinear) -> Result<Tensor> {
    match base.bias() {
        Some(b) => y.broadcast_sub(&b.to_dtype(y.dtype())?),
        None => Ok(y.clone()),
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::{
        adapters::Site,
        backend::{Dropout, FrozenWeight, check, cpu::Cpu, cuda::Cuda},
    };

    /// PEFT's DoRA forward for a linear (`DoraLinearVariant.forward` with dropout, peft 0.21),
    /// written out with candle's ops on a dense weight: `W·x + b + (r − 1) ⊙ W·drop(x) +
    /// r ⊙ s·B·A·drop(x)`, `r = m / ‖W + s·B·A‖` with the norm detached.
    fn pefts(
        weight: &Tensor,
        bias: &Tensor,
        [x, lora_a, lora_b, magnitude]: [&Tensor; 4],
        scale: f64,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let dense = (weight + (lora_b.matmul(lora_a)? * scale)?)?;
        let norm = dense.sqr()?.sum(1)?.sqrt()?.detach();
        let ratio = (magnitude / norm)?;
        let dropped = match mask {
            Some(mask) => (x * mask)?,
            None => x.clone(),
        };
        let base = x.broadcast_matmul(&weight.t()?)?.broadcast_add(bias)?;
        let base_dropped = dropped.broadcast_matmul(&weight.t()?)?;
        let lora = (dropped
            .broadcast_matmul(&lora_a.t()?)?
            .broadcast_matmul(&lora_b.t()?)?
            * scale)?;
        (base + base_dropped.broadcast_mul(&ratio.affine(1.0, -1.0)?)?)?
            + lora.broadcast_mul(&ratio)?
    }

    /// Both backends' DoRA projection, with and without dropout, against PEFT's form: the
    /// same values and the same gradients for `x`, `A`, `B` and the magnitude.
    #[test]
    fn dora_with_and_without_dropout_is_pefts() -> Result<()> {
        let device = Device::Cpu;
        let (out, input, rank, scale) = (6, 8, 3, 1.5);
        let w = Tensor::randn(0f32, 0.5, (out, input), &device)?;
        let bias = Tensor::randn(0f32, 1.0, out, &device)?;
        let base = FrozenLinear::new(FrozenWeight::Dense(w.clone()), Some(bias.clone()));
        let inputs = [
            Tensor::randn(0f32, 1.0, (2, 5, input), &device)?,
            Tensor::randn(0f32, 0.4, (rank, input), &device)?,
            Tensor::randn(0f32, 0.4, (out, rank), &device)?,
            (w.sqr()?.sum(1)?.sqrt()? * 1.3)?,
        ];
        for backend in [&Cpu as &dyn Backend, &Cuda] {
            for p in [0.0, 0.3] {
                let mask = (p > 0.0).then(|| {
                    Dropout {
                        p,
                        seed: 7,
                        first_row: 0,
                    }
                    .at(1, Site::VProj)
                });
                let mask_tensor = mask
                    .map(|m| m.tensor(&[2, 5, input], &device, DType::F32))
                    .transpose()?;
                let norms = RowNorms::default();
                check::same_values_and_gradients(
                    &inputs,
                    |t| {
                        let lora = Lora {
                            a: t[1].clone(),
                            b: t[2].clone(),
                            scale,
                            magnitude: Some(t[3].clone()),
                        };
                        adapted(backend, &base, &norms, &t[0], &lora, mask)
                    },
                    |t| {
                        pefts(
                            &w,
                            &bias,
                            [&t[0], &t[1], &t[2], &t[3]],
                            scale,
                            mask_tensor.as_ref(),
                        )
                    },
                    1e-4,
                )?;
            }
        }
        Ok(())
    }
}
