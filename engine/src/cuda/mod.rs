//! Launching Graft's own CUDA kernels, compiled to PTX from the `.cu` files beside this one by
//! `build.rs`. Candle loads each module once per device and keeps it.

use candle_core::{
    CudaDevice, CudaStorage, DType, Layout, Result,
    cuda_backend::{
        CudaDType, WrapErr,
        cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg},
    },
};

use crate::nf4::{NF4_LEVELS, dynamic_code};

const NF4_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/nf4.ptx"));
const NF4_MODULE: &str = "graft-nf4";

/// The stored parts of an NF4 matrix on one GPU, with their layouts.
#[derive(Clone, Copy, Debug)]
pub struct Nf4Parts<'a> {
    pub packed: (&'a CudaStorage, &'a Layout),
    pub absmax: (&'a CudaStorage, &'a Layout),
    pub nested_absmax: (&'a CudaStorage, &'a Layout),
    pub offset: f32,
    pub elements: usize,
}

/// The dense weights of `parts` in `dtype` (f32, bf16 or f16), one thread per packed byte.
pub fn nf4_dequantize(parts: Nf4Parts<'_>, dtype: DType) -> Result<CudaStorage> {
    let device = parts.packed.0.device.clone();
    let packed = view::<u8>(parts.packed)?;
    let absmax = view::<u8>(parts.absmax)?;
    let nested = view::<f32>(parts.nested_absmax)?;
    let mut tables = NF4_LEVELS.to_vec();
    tables.extend_from_slice(dynamic_code());
    let tables = device.clone_htod(&tables)?;
    let launch = Launch {
        device: &device,
        packed: &packed,
        absmax: &absmax,
        nested: &nested,
        tables: &tables,
        offset: parts.offset,
        elements: parts.elements,
    };
    match dtype {
        DType::F32 => launch.run::<f32>("nf4_dequantize_f32"),
        DType::BF16 => launch.run::<half::bf16>("nf4_dequantize_bf16"),
        DType::F16 => launch.run::<half::f16>("nf4_dequantize_f16"),
        other => candle_core::bail!("NF4 dequantizes to f32, bf16 or f16, not {other:?}"),
    }
}

fn view<'a, T: CudaDType>(
    (storage, layout): (&'a CudaStorage, &Layout),
) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("NF4 parts must be contiguous");
    };
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}

struct Launch<'a> {
    device: &'a CudaDevice,
    packed: &'a CudaView<'a, u8>,
    absmax: &'a CudaView<'a, u8>,
    nested: &'a CudaView<'a, f32>,
    tables: &'a CudaSlice<f32>,
    offset: f32,
    elements: usize,
}

impl Launch<'_> {
    #[allow(unsafe_code)]
    fn run<T: CudaDType + DeviceRepr>(&self, kernel: &str) -> Result<CudaStorage> {
        let func = self
            .device
            .get_or_load_custom_func(kernel, NF4_MODULE, NF4_PTX)?;
        let pairs = u32::try_from(self.elements.div_ceil(2))
            .map_err(|_| candle_core::Error::Msg("NF4 weight too large for one launch".into()))?;
        // SAFETY: the kernel writes every one of the `elements` values before anything reads
        // the buffer.
        let out = unsafe { self.device.alloc::<T>(self.elements)? };
        let mut builder = func.builder();
        builder.arg(self.packed);
        builder.arg(self.absmax);
        builder.arg(self.nested);
        builder.arg(self.tables);
        builder.arg(&self.offset);
        builder.arg(&self.elements);
        builder.arg(&out);
        // SAFETY: the arguments match the kernel's parameters in nf4.cu in number, order and
        // type, and every buffer outlives the launch (candle's stream orders later uses).
        unsafe { builder.launch(LaunchConfig::for_num_elems(pairs)) }.w()?;
        Ok(T::wrap_cuda_slice(out, self.device.clone()))
    }
}
