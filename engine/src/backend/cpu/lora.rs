//! An adapted projection as one op on the CPU in f32:
//! `y = x · Wᵀ + scale · (x ⊙ m) · Aᵀ · Bᵀ`, with `W` frozen and `m` the dropout mask.
//!
//! Built from candle's ops, the same layer is a frozen product, two adapter products, a scale
//! and an add, and candle's backward gives every one of them a zeroed gradient buffer it then
//! adds into: passes over activation-sized tensors that cost more than the products on a small
//! model. Here the forward adds the adapter's product onto the frozen one in place, and the
//! backward writes `dx = grad · W + scale · (grad · B) · A ⊙ m`, `dA` and `dB` directly.
//! `x · Aᵀ` (`[rows, rank]`) is recomputed in the backward rather than kept, and so is the
//! dropout mask, from its hash.

use std::borrow::Cow;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::{
    gemm::{Mat, f32_values, matmul, matmul_into, with_f32s},
    linear::with_weight,
};
use crate::{
    adapters::Lora,
    backend::{DropoutMask, FrozenLinear, FrozenWeight, rows_and_output},
};

/// The adapted projection of `x` (f32 on the CPU), with the adapter's input masked by
/// `dropout`.
pub fn adapted(
    x: &Tensor,
    base: &FrozenLinear,
    lora: &Lora,
    dropout: Option<DropoutMask>,
) -> Result<Tensor> {
    #[allow(clippy::cast_possible_truncation)]
    let op = LoraMatmul {
        weight: base.weight().clone(),
        scale: lora.scale as f32,
        dropout,
    };
    base.add_bias(x.apply_op3(&lora.a, &lora.b, op)?)
}

struct LoraMatmul {
    weight: FrozenWeight,
    scale: f32,
    dropout: Option<DropoutMask>,
}

impl LoraMatmul {
    /// `x ⊙ m` for `x` of `cols` columns, or `x` without dropout.
    fn masked<'a>(&self, x: &'a [f32], cols: usize) -> Cow<'a, [f32]> {
        let Some(mask) = &self.dropout else {
            return Cow::Borrowed(x);
        };
        let mut masked = vec![0f32; x.len()];
        mask.fill(&mut masked, cols);
        for (m, x) in masked.iter_mut().zip(x) {
            *m *= x;
        }
        Cow::Owned(masked)
    }
}

impl CustomOp3 for LoraMatmul {
    fn name(&self) -> &'static str {
        "lora-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        a: &CpuStorage,
        a_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_values(x, x_layout, self.name())?;
        let (a, b) = (
            f32_values(a, a_layout, self.name())?,
            f32_values(b, b_layout, self.name())?,
        );
        let (out, input) = self.weight.shape()?;
        let (rank, a_input) = a_layout.shape().dims2()?;
        if a_input != input || b_layout.shape().dims2()? != (out, rank) {
            candle_core::bail!(
                "{}: A {:?} and B {:?} do not fit a [{out}, {input}] projection",
                self.name(),
                a_layout.dims(),
                b_layout.dims()
            );
        }
        let (rows, shape) = rows_and_output(x_layout.dims(), input, out, self.name())?;
        let xa = matmul(
            Mat::new(&self.masked(x, input), rows, input),
            Mat::new(a, rank, input).t(),
            1.0,
        );
        let mut y = with_weight(&self.weight, |w| {
            Ok(matmul(
                Mat::new(x, rows, input),
                Mat::new(w, out, input).t(),
                1.0,
            ))
        })?;
        matmul_into(
            &mut y,
            Mat::new(&xa, rows, rank),
            Mat::new(b, out, rank).t(),
            self.scale,
            true,
        );
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out, input) = self.weight.shape()?;
        let rank = a.dim(0)?;
        let rows = x.elem_count() / input;
        let scale = self.scale;
        let (grad_x, grad_a, grad_b) =
            with_f32s([grad, x, a, b], self.name(), |[g, xv, av, bv]| {
                let g = Mat::new(g, rows, out);
                let a = Mat::new(av, rank, input);
                let gb = matmul(g, Mat::new(bv, out, rank), 1.0);
                let gb = Mat::new(&gb, rows, rank);
                let mut grad_x = with_weight(&self.weight, |w| {
                    Ok(matmul(g, Mat::new(w, out, input), 1.0))
                })?;
                if self.dropout.is_some() {
                    // The adapter's path goes back through the same mask: `(gB · A) ⊙ m`.
                    let through = matmul(gb, a, scale);
                    let through = self.masked(&through, input);
                    for (dx, t) in grad_x.iter_mut().zip(through.iter()) {
                        *dx += t;
                    }
                } else {
                    matmul_into(&mut grad_x, gb, a, scale, true);
                }
                let masked = self.masked(xv, input);
                let masked = Mat::new(&masked, rows, input);
                let xa = matmul(masked, a.t(), 1.0);
                let grad_a = matmul(gb.t(), masked, scale);
                let grad_b = matmul(g.t(), Mat::new(&xa, rows, rank), scale);
                Ok((grad_x, grad_a, grad_b))
            })?;
        Ok((
            Some(Tensor::from_vec(grad_x, x.shape(), x.device())?),
            Some(Tensor::from_vec(grad_a, a.shape(), a.device())?),
            Some(Tensor::from_vec(grad_b, b.shape(), b.device())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::{
        adapters::Site,
        backend::{
            Dropout,
            check::{max_diff, same_values_and_gradients},
        },
        rng::Rng,
    };

    /// The adapted projection from candle's own ops, written out independently.
    fn reference(
        weight: &Tensor,
        bias: Option<&Tensor>,
        lora: &Lora,
        x: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let input = match mask {
            Some(m) => (x * m)?,
            None => x.clone(),
        };
        let through_adapter = input
            .broadcast_matmul(&lora.a.t()?)?
            .broadcast_matmul(&lora.b.t()?)?;
        let y = (x.broadcast_matmul(&weight.t()?)? + (through_adapter * lora.scale)?)?;
        match bias {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    }

    #[test]
    fn values_and_gradients_equal_the_unfused_layer_with_and_without_dropout() -> Result<()> {
        let device = Device::Cpu;
        let (out, input, rank) = (24, 64, 4);
        for (nf4, dropout, with_bias) in [
            (false, false, false),
            (false, true, true),
            (true, true, false),
        ] {
            let weight = Tensor::randn(0f32, 1.0, (out, input), &device)?;
            let bias = with_bias
                .then(|| Tensor::randn(0f32, 1.0, out, &device))
                .transpose()?;
            let base = if nf4 {
                FrozenLinear::quantize_nf4(&weight, bias.clone(), &device)?
            } else {
                FrozenLinear::new(FrozenWeight::Dense(weight), bias.clone())
            };
            let dense = base.weight().to_dense(&device, DType::F32)?;
            let dropout = dropout.then(|| {
                Dropout {
                    p: 0.25,
                    seed: 5,
                    first_row: 0,
                }
                .at(0, Site::QProj)
            });
            let mask = dropout
                .map(|d| d.tensor(&[2, 3, input], &device, DType::F32))
                .transpose()?;
            let lora = |t: &[Tensor]| Lora {
                a: t[1].clone(),
                b: t[2].clone(),
                scale: 2.0,
                magnitude: None,
            };
            // x, A and B (random, not zero as at init, so B's path matters too).
            let inputs = [
                Tensor::randn(0f32, 1.0, (2, 3, input), &device)?,
                Tensor::randn(0f32, 0.3, (rank, input), &device)?,
                Tensor::randn(0f32, 0.3, (out, rank), &device)?,
            ];
            same_values_and_gradients(
                &inputs,
                |t| adapted(&t[0], &base, &lora(t), dropout),
                |t| reference(&dense, bias.as_ref(), &lora(t), &t[0], mask.as_ref()),
                1e-4,
            )?;
        }
        Ok(())
    }

    #[test]
    fn a_fresh_adapter_leaves_the_frozen_product() -> Result<()> {
        let device = Device::Cpu;
        let weight = Tensor::randn(0f32, 1.0, (8, 16), &device)?;
        let base = FrozenLinear::new(FrozenWeight::Dense(weight.clone()), None);
        let lora = Lora::init(4, (8, 16), 2.0, &mut Rng::seed(1), &device)?;
        let x = Tensor::randn(0f32, 1.0, (3, 16), &device)?;
        let y = adapted(&x, &base, &lora, None)?;
        assert!(max_diff(&y, &x.matmul(&weight.t()?)?)? < 1e-5);
        Ok(())
    }
}
