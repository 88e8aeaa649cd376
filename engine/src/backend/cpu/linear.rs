//! The frozen projection on the CPU in f32: one op that computes `x · Wᵀ` itself and whose
//! backward is `grad · W` for `x` alone, reading an NF4 weight through a dequantized copy that
//! lives only for the product.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};

use super::gemm::{Mat, f32_values, is_cpu_f32, matmul, with_f32};
use crate::backend::{FrozenLinear, FrozenWeight, rows_and_output};

/// `x · Wᵀ (+ b)`.
pub fn frozen(x: &Tensor, layer: &FrozenLinear) -> Result<Tensor> {
    let y = x.apply_op1(FrozenMatmul {
        weight: layer.weight().clone(),
    })?;
    layer.add_bias(y)
}

/// Runs `f` on the `[out, in]` weight as f32 values: in place when dense f32 on the CPU, else
/// a copy (dequantized when NF4) that lives only for `f`.
pub fn with_weight<R>(weight: &FrozenWeight, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    match weight {
        FrozenWeight::Dense(w) if is_cpu_f32(w) => with_f32(w, "frozen weight", f),
        weight => with_f32(
            &weight.to_dense(&Device::Cpu, DType::F32)?,
            "frozen weight",
            f,
        ),
    }
}

/// `x · Wᵀ`, whose backward is `grad · W` for `x` alone.
struct FrozenMatmul {
    weight: FrozenWeight,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_values(storage, layout, self.name())?;
        let (out, input) = self.weight.shape()?;
        let (rows, shape) = rows_and_output(layout.dims(), input, out, self.name())?;
        let y = with_weight(&self.weight, |w| {
            Ok(matmul(
                Mat::new(x, rows, input),
                Mat::new(w, out, input).t(),
                1.0,
            ))
        })?;
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (out, input) = self.weight.shape()?;
        let rows = x.elem_count() / input;
        let grad_x = with_f32(grad, self.name(), |grad| {
            with_weight(&self.weight, |w| {
                Ok(matmul(
                    Mat::new(grad, rows, out),
                    Mat::new(w, out, input),
                    1.0,
                ))
            })
        })?;
        Tensor::from_vec(grad_x, x.shape(), x.device()).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Var;

    use super::*;
    use crate::backend::check::max_diff;

    #[test]
    fn the_input_gradient_is_the_dense_one_and_no_weight_gradient_exists() -> Result<()> {
        let device = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (24, 64), &device)?;
        let layer = FrozenLinear::quantize_nf4(&w, None, &device)?;
        let dense = layer.weight().to_dense(&device, DType::F32)?;

        let x = Var::new(
            Tensor::randn(0f32, 1.0, (2, 3, 64), &device)?.to_vec3::<f32>()?,
            &device,
        )?;
        let y = frozen(x.as_tensor(), &layer)?;
        let grads = (y.sqr()?.sum_all()?).backward()?;
        let ours = grads.get(x.as_tensor()).expect("a gradient for x").clone();

        let x_ref = Var::new(x.as_tensor().to_vec3::<f32>()?, &device)?;
        let w_ref = Var::from_tensor(&dense)?;
        let y_ref = x_ref
            .as_tensor()
            .broadcast_matmul(&w_ref.as_tensor().t()?)?;
        let ref_grads = y_ref.sqr()?.sum_all()?.backward()?;
        let expected = ref_grads
            .get(x_ref.as_tensor())
            .expect("reference gradient");

        assert!(max_diff(&y, &y_ref)? < 1e-4);
        assert!(max_diff(&ours, expected)? < 1e-3);
        // Only `x` (and the graph between it and the loss) has gradients: nothing
        // weight-sized was computed.
        let weight_sized = grads
            .get_ids()
            .filter_map(|id| grads.get_id(*id))
            .any(|g| g.dims() == [24, 64]);
        assert!(!weight_sized);
        Ok(())
    }

    #[test]
    fn a_dense_frozen_layer_adds_its_bias() -> Result<()> {
        let device = Device::Cpu;
        let w = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &device)?;
        let b = Tensor::new(&[10f32, 20.0], &device)?;
        let layer = FrozenLinear::new(FrozenWeight::Dense(w), Some(b));
        let y = frozen(&Tensor::new(&[[1f32, 1.0]], &device)?, &layer)?;
        assert_eq!(y.to_vec2::<f32>()?, [[13.0, 27.0]]);
        Ok(())
    }
}
