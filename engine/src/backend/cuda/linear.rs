//! The frozen projection on a device: `x · Wᵀ` straight into the op's output through the
//! device's matmul (cuBLAS on a GPU), with the weight dequantized by our kernel when NF4 and
//! dropped after the product; the backward is `grad · W` for `x` alone.

use candle_core::{
    CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor, backend::BackendStorage,
};

use crate::backend::{FrozenLinear, FrozenWeight, rows_and_output};

/// `x · Wᵀ (+ b)`.
pub fn frozen(x: &Tensor, layer: &FrozenLinear) -> Result<Tensor> {
    let y = x.contiguous()?.apply_op1(FrozenMatmul {
        weight: layer.weight().clone(),
        dtype: x.dtype(),
        device: x.device().clone(),
    })?;
    layer.add_bias(y)
}

struct FrozenMatmul {
    weight: FrozenWeight,
    dtype: candle_core::DType,
    device: candle_core::Device,
}

impl FrozenMatmul {
    /// `x · Wᵀ` for `x` in `storage` under `layout`, the weight read through `pick`.
    fn product<S: BackendStorage>(
        &self,
        x: &S,
        layout: &Layout,
        pick: impl Fn(&Storage) -> Option<&S>,
    ) -> Result<(S, Shape)> {
        let (out, input) = self.weight.shape()?;
        let (rows, shape) = rows_and_output(layout.dims(), input, out, "frozen-matmul")?;
        let w = self.weight.to_dense(&self.device, self.dtype)?;
        let (w_storage, w_layout) = w.storage_and_layout();
        let Some(w_storage) = pick(&w_storage) else {
            candle_core::bail!("frozen-matmul: the weight is on another device");
        };
        let x_layout = Layout::contiguous_with_offset((rows, input), layout.start_offset());
        let w_t = Layout::contiguous_with_offset((out, input), w_layout.start_offset())
            .transpose(0, 1)?;
        let y = x.matmul(w_storage, (1, rows, out, input), &x_layout, &w_t)?;
        Ok((y, shape))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.product(storage, layout, |s| match s {
            Storage::Cpu(s) => Some(s),
            _ => None,
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.product(storage, layout, |s| match s {
            Storage::Cuda(s) => Some(s),
            _ => None,
        })
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let w = self.weight.to_dense(grad.device(), grad.dtype())?;
        let (_, input) = self.weight.shape()?;
        let rows = x.elem_count() / input;
        let out = grad.dim(candle_core::D::Minus1)?;
        let grad_x = grad.reshape((rows, out))?.matmul(&w)?.reshape(x.shape())?;
        Ok(Some(grad_x))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};

    use super::*;
    use crate::backend::check::max_diff;

    #[test]
    fn the_device_product_equals_candles_and_only_x_gets_a_gradient() -> Result<()> {
        let device = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (24, 64), &device)?;
        for layer in [
            FrozenLinear::new(FrozenWeight::Dense(w.clone()), None),
            FrozenLinear::quantize_nf4(&w, None, &device)?,
        ] {
            let dense = layer.weight().to_dense(&device, DType::F32)?;
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 64), &device)?)?;
            let y = frozen(x.as_tensor(), &layer)?;
            let expected = x.as_tensor().broadcast_matmul(&dense.t()?)?;
            assert!(max_diff(&y, &expected)? < 1e-4);
            let grads = y.sqr()?.sum_all()?.backward()?;
            let grad = grads.get(x.as_tensor()).expect("a gradient for x");
            let want = (expected * 2.0)?.broadcast_matmul(&dense)?;
            assert!(max_diff(grad, &want)? < 1e-3);
            assert!(
                !grads
                    .get_ids()
                    .filter_map(|id| grads.get_id(*id))
                    .any(|g| g.dims() == [24, 64]),
                "no weight-sized gradient"
            );
        }
        Ok(())
    }
}
