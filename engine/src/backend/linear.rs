//! Frozen linear layers: the base model's projections, dense (`quantization: none`) or NF4
//! (QLoRA). Each backend computes them with a backward that returns only the input's
//! gradient: candle's matmul backward would compute a weight-sized gradient for a frozen
//! weight and keep it alive, and an NF4 weight is expanded only inside the op that uses it.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};

use crate::quant::{Nf4Matrix, Nf4Tensor};

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

    /// `(out, in)`.
    pub fn shape(&self) -> Result<(usize, usize)> {
        match self {
            Self::Dense(w) => w.dims2(),
            Self::Nf4(m) => Ok(m.shape()),
        }
    }

    /// Bytes held, for memory accounting.
    pub fn size_bytes(&self) -> usize {
        match self {
            Self::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Self::Nf4(m) => m.size_bytes(),
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
        Self {
            weight,
            bias: bias.map(|b| b.detach()),
        }
    }

    /// Quantizes a dense `[out, in]` weight to NF4 (on the CPU, in parallel) and keeps the
    /// packed form on `device`. Reading the weight from the CPU copy of the checkpoint saves
    /// uploading a dense weight only to download it again.
    pub fn quantize_nf4(weight: &Tensor, bias: Option<Tensor>, device: &Device) -> Result<Self> {
        let shape = weight.dims2()?;
        let values = weight
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let matrix = Nf4Matrix::quantize(&values, shape).map_err(candle_core::Error::wrap)?;
        let tensor = Nf4Tensor::new(&matrix, device)?;
        Ok(Self::new(FrozenWeight::Nf4(Arc::new(tensor)), bias))
    }

    pub fn weight(&self) -> &FrozenWeight {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `y + b` when there is a bias, in `y`'s dtype.
    pub fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
            None => Ok(y),
        }
    }
}

/// For an input of `dims` `[.., input]`: its rows, and the output's shape `[.., out]`.
pub(crate) fn rows_and_output(
    dims: &[usize],
    input: usize,
    out: usize,
    op: &str,
) -> Result<(usize, candle_core::Shape)> {
    let Some((&last, batch)) = dims.split_last() else {
        candle_core::bail!("{op}: a scalar input");
    };
    if last != input {
        candle_core::bail!("{op}: input {dims:?} is not [.., {input}]");
    }
    let shape: Vec<usize> = batch.iter().copied().chain([out]).collect();
    Ok((batch.iter().product(), candle_core::Shape::from(shape)))
}
