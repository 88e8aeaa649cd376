//! Frozen linear layers: the base model's projections, dense (`quantization: none`) or NF4
//! (QLoRA). Their backward returns only the input's gradient.
//!
//! Candle's matmul backward would compute a weight-sized gradient for a frozen weight and keep
//! it alive. Here the forward computes `y = x.detach() · Wᵀ` (no graph through the weight) and
//! ties `y` back to `x` with [`InputGradient`], a custom op whose forward passes `y` through and
//! whose backward returns `grad · W`, rebuilding `W` from its packed NF4 form when needed: no
//! dense copy of an NF4 weight outlives the call that uses it.
//!
//! On the CPU in f32 one op, [`FrozenMatmul`], does both: it computes the product itself, so
//! the pass-through copy is saved too.

use std::sync::Arc;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Module, Result, Shape, Tensor,
};

use crate::{
    gemm::{Mat, f32_values, is_cpu_f32, matmul, with_f32},
    nf4::Nf4Matrix,
    nf4_tensor::Nf4Tensor,
};

/// A frozen `[out, in]` weight.
#[derive(Clone, Debug)]
pub enum FrozenWeight {
    Dense(Tensor),
    /// Packed on the model's device.
    Nf4(Arc<Nf4Tensor>),
}

impl FrozenWeight {
    /// The dense `[out, in]` weight on `device` in `dtype`.
    pub fn to_dense(&self, device: &Device, dtype: DType) -> Result<Tensor> {
        match self {
            Self::Dense(w) => w.to_device(device)?.to_dtype(dtype),
            Self::Nf4(m) => m.dequantize(dtype)?.to_device(device),
        }
    }

    /// Runs `f` on the `[out, in]` weight as f32 values on the CPU: in place when dense f32
    /// there, else a copy (dequantized when NF4) that lives only for `f`.
    pub fn with_cpu_f32<R>(&self, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
        match self {
            Self::Dense(w) if is_cpu_f32(w) => with_f32(w, "frozen weight", f),
            weight => with_f32(
                &weight.to_dense(&Device::Cpu, DType::F32)?,
                "frozen weight",
                f,
            ),
        }
    }

    /// `(out, in)`.
    pub fn shape(&self) -> Result<(usize, usize)> {
        match self {
            Self::Dense(w) => w.dims2(),
            Self::Nf4(m) => Ok(m.shape()),
        }
    }
}

/// `y = x · Wᵀ (+ b)` with a frozen `W` and `b`.
#[derive(Clone, Debug)]
pub struct FrozenLinear {
    weight: FrozenWeight,
    bias: Option<Tensor>,
}

impl FrozenLinear {
    pub fn new(weight: FrozenWeight, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// Quantizes a dense `[out, in]` weight to NF4 (on the CPU), kept on the weight's device.
    pub fn quantize_nf4(weight: &Tensor, bias: Option<Tensor>) -> Result<Self> {
        let shape = weight.dims2()?;
        let values = weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let matrix = Nf4Matrix::quantize(&values, shape).map_err(candle_core::Error::wrap)?;
        let tensor = Nf4Tensor::new(&matrix, weight.device())?;
        Ok(Self::new(FrozenWeight::Nf4(Arc::new(tensor)), bias))
    }

    pub fn weight(&self) -> &FrozenWeight {
        &self.weight
    }

    /// `x · Wᵀ (+ b)` for inference: no gradient op, and a dense weight is used in place.
    pub fn infer(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            FrozenWeight::Dense(w) if w.dtype() == x.dtype() => x.broadcast_matmul(&w.t()?)?,
            weight => x.broadcast_matmul(&weight.to_dense(x.device(), x.dtype())?.t()?)?,
        };
        self.add_bias(y)
    }

    /// `y + b` when there is a bias, `b` frozen.
    pub fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => y.broadcast_add(&b.detach().to_dtype(y.dtype())?),
            None => Ok(y),
        }
    }
}

impl Module for FrozenLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let weight = self.weight.clone();
        let y = if is_cpu_f32(x) {
            x.apply_op1(FrozenMatmul { weight })?
        } else {
            let w = self.weight.to_dense(x.device(), x.dtype())?;
            let y = x.detach().broadcast_matmul(&w.t()?)?.contiguous()?;
            drop(w);
            x.apply_op2(&y, InputGradient { weight })?
        };
        self.add_bias(y)
    }
}

/// `x · Wᵀ` on the CPU in f32, whose backward is `grad · W` for `x` alone.
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
        let y = self.weight.with_cpu_f32(|w| {
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
            self.weight.with_cpu_f32(|w| {
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

/// For an input of `dims` `[.., input]`: its rows, and the output's shape `[.., out]`.
pub(crate) fn rows_and_output(
    dims: &[usize],
    input: usize,
    out: usize,
    op: &str,
) -> Result<(usize, Shape)> {
    let Some((&last, batch)) = dims.split_last() else {
        candle_core::bail!("{op}: a scalar input");
    };
    if last != input {
        candle_core::bail!("{op}: input {dims:?} is not [.., {input}]");
    }
    let shape: Vec<usize> = batch.iter().copied().chain([out]).collect();
    Ok((batch.iter().product(), Shape::from(shape)))
}

/// Forward: its second argument, unchanged. Backward: `grad · W` for the first, nothing for
/// the second.
struct InputGradient {
    weight: FrozenWeight,
}

impl CustomOp2 for InputGradient {
    fn name(&self) -> &'static str {
        "frozen-linear-input-gradient"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        y: &CpuStorage,
        layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{}: the product must be contiguous", self.name());
        };
        let copy = match y {
            CpuStorage::F32(v) => CpuStorage::F32(v[start..end].to_vec()),
            CpuStorage::F64(v) => CpuStorage::F64(v[start..end].to_vec()),
            CpuStorage::BF16(v) => CpuStorage::BF16(v[start..end].to_vec()),
            CpuStorage::F16(v) => CpuStorage::F16(v[start..end].to_vec()),
            _ => candle_core::bail!("{}: only float dtypes are supported", self.name()),
        };
        Ok((copy, layout.shape().clone()))
    }

    /// The same pass-through on the GPU: a copy of the product (made contiguous by the caller).
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        y: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        if layout.contiguous_offsets() != Some((0, layout.shape().elem_count())) {
            candle_core::bail!(
                "{}: the product must be contiguous from its start",
                self.name()
            );
        }
        Ok((y.try_clone(layout)?, layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let w = self.weight.to_dense(grad.device(), grad.dtype())?;
        let grad_x = grad.broadcast_matmul(&w)?;
        debug_assert_eq!(grad_x.dims(), x.dims());
        Ok((Some(grad_x), None))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Var;

    use super::*;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
            .expect("comparable tensors")
    }

    #[test]
    fn the_input_gradient_is_the_dense_one_and_no_weight_gradient_exists() -> Result<()> {
        let device = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (24, 64), &device)?;
        let layer = FrozenLinear::quantize_nf4(&w, None)?;
        let dense = layer.weight().to_dense(&device, DType::F32)?;

        let x = Var::new(
            Tensor::randn(0f32, 1.0, (2, 3, 64), &device)?.to_vec3::<f32>()?,
            &device,
        )?;
        let y = layer.forward(x.as_tensor())?;
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

        assert!(max_abs_diff(&y, &y_ref) < 1e-4);
        assert!(max_abs_diff(&ours, expected) < 1e-3);
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
        let y = layer.forward(&Tensor::new(&[[1f32, 1.0]], &device)?)?;
        assert_eq!(y.to_vec2::<f32>()?, [[13.0, 27.0]]);
        Ok(())
    }
}
