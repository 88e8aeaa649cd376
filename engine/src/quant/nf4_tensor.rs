//! An NF4 weight held as tensors on the model's device, and its dequantization as a candle op:
//! on CPU the reference arithmetic of [`super::nf4`], on CUDA the kernel in `backend/cuda/nf4.cu`. A
//! frozen QLoRA weight so stays packed (≈ 4.13 bits per weight) in GPU memory and is expanded
//! only inside the operation that uses it.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};

use super::nf4::{Nf4Matrix, dequantize_parts};

/// A `[rows, cols]` NF4 matrix on a device.
#[derive(Clone, Debug)]
pub struct Nf4Tensor {
    shape: (usize, usize),
    /// u8, two indices per byte.
    packed: Tensor,
    /// u8, one 8-bit code index per block of 64 weights.
    absmax: Tensor,
    /// f32, one scale per 256 entries of `absmax`.
    nested_absmax: Tensor,
    offset: f32,
}

impl Nf4Tensor {
    pub fn new(matrix: &Nf4Matrix, device: &Device) -> Result<Self> {
        let packed = matrix.packed();
        let absmax = matrix.absmax();
        let nested = matrix.nested_absmax();
        Ok(Self {
            shape: matrix.shape(),
            packed: Tensor::from_slice(packed, packed.len(), device)?,
            absmax: Tensor::from_slice(absmax, absmax.len(), device)?,
            nested_absmax: Tensor::from_slice(nested, nested.len(), device)?,
            offset: matrix.offset(),
        })
    }

    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        self.shape
    }

    pub fn device(&self) -> &Device {
        self.packed.device()
    }

    /// Bytes held, for memory accounting.
    pub fn size_bytes(&self) -> usize {
        self.packed.elem_count()
            + self.absmax.elem_count()
            + 4 * self.nested_absmax.elem_count()
            + 4
    }

    /// The dense `[rows, cols]` weight in `dtype`, on this tensor's device. Each value is the
    /// f32 dequantized weight rounded once to `dtype`.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        self.packed
            .apply_op3_no_bwd(
                &self.absmax,
                &self.nested_absmax,
                &Dequantize {
                    shape: self.shape,
                    offset: self.offset,
                    dtype,
                },
            )?
            .to_dtype(dtype)
    }
}

/// `packed, absmax, nested_absmax → weights`. The CPU side answers in f32 (the caller casts);
/// the CUDA side writes `dtype` directly, so no f32 copy of a large weight exists on the GPU.
struct Dequantize {
    shape: (usize, usize),
    offset: f32,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    dtype: DType,
}

impl Dequantize {
    fn elements(&self) -> usize {
        self.shape.0 * self.shape.1
    }
}

fn contiguous<'a, T>(name: &str, values: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&values[start..end]),
        None => candle_core::bail!("{name}: NF4 parts must be contiguous"),
    }
}

impl CustomOp3 for Dequantize {
    fn name(&self) -> &'static str {
        "nf4-dequantize"
    }

    fn cpu_fwd(
        &self,
        packed: &CpuStorage,
        packed_layout: &Layout,
        absmax: &CpuStorage,
        absmax_layout: &Layout,
        nested: &CpuStorage,
        nested_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::U8(packed), CpuStorage::U8(absmax), CpuStorage::F32(nested)) =
            (packed, absmax, nested)
        else {
            candle_core::bail!("{}: expects u8, u8 and f32 parts", self.name());
        };
        let weights = dequantize_parts(
            contiguous(self.name(), packed, packed_layout)?,
            contiguous(self.name(), absmax, absmax_layout)?,
            contiguous(self.name(), nested, nested_layout)?,
            self.offset,
            self.elements(),
        );
        Ok((CpuStorage::F32(weights), Shape::from(self.shape)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        packed: &candle_core::CudaStorage,
        packed_layout: &Layout,
        absmax: &candle_core::CudaStorage,
        absmax_layout: &Layout,
        nested: &candle_core::CudaStorage,
        nested_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let storage = crate::backend::cuda::kernels::nf4_dequantize(
            crate::backend::cuda::kernels::Nf4Parts {
                packed: (packed, packed_layout),
                absmax: (absmax, absmax_layout),
                nested_absmax: (nested, nested_layout),
                offset: self.offset,
                elements: self.elements(),
            },
            self.dtype,
        )?;
        Ok((storage, Shape::from(self.shape)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tensor_form_dequantizes_to_the_reference_values() -> Result<()> {
        let weights: Vec<f32> = (0u16..300)
            .map(|i| (f32::from(i * 37 % 101) - 50.0) / 7.0)
            .collect();
        let matrix = Nf4Matrix::quantize(&weights, (3, 100)).map_err(candle_core::Error::wrap)?;
        let tensor = Nf4Tensor::new(&matrix, &Device::Cpu)?;
        let dense = tensor.dequantize(DType::F32)?;
        assert_eq!(dense.dims(), [3, 100]);
        assert_eq!(dense.flatten_all()?.to_vec1::<f32>()?, matrix.dequantize());
        let bf16 = tensor.dequantize(DType::BF16)?;
        assert_eq!(bf16.dtype(), DType::BF16);
        assert_eq!(
            bf16.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            Tensor::new(matrix.dequantize(), &Device::Cpu)?
                .to_dtype(DType::BF16)?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?
        );
        assert_eq!(tensor.size_bytes(), matrix.size_bytes());
        Ok(())
    }
}
