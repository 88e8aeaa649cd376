//! Launching Graft's own CUDA kernels, compiled to PTX from the `.cu` files beside this one by
//! `build.rs`. Candle loads each module once per device and keeps it; constant tables are
//! uploaded once per device too.

use std::{
    collections::HashMap,
    sync::{Mutex, OnceLock},
};

use candle_core::{
    CudaDevice, CudaStorage, DType, Device, Layout, Result, Shape, Storage, Tensor,
    cuda_backend::{
        CudaDType, DeviceId, WrapErr,
        cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg},
    },
};

use crate::{
    backend::DropoutMask,
    quant::{NF4_LEVELS, dynamic_code},
};

const NF4_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/nf4.ptx"));
const NF4_MODULE: &str = "graft-nf4";
const DROPOUT_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/dropout.ptx"));
const DROPOUT_MODULE: &str = "graft-dropout";
const LORA_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/lora.ptx"));
const LORA_MODULE: &str = "graft-lora";

/// Sequences one pair of LoRA launches takes (`MAX_SEGMENTS` in lora.cu); more are added in
/// further pairs.
pub const LORA_SEGMENTS: usize = 32;

/// One sequence's rows and the storages of its pair, `A` `[rank, in]` and `Bᵀ`
/// `[rank, out]`, contiguous, in the batch's dtype.
#[derive(Clone, Copy, Debug)]
pub struct LoraRows<'a> {
    pub rows: (usize, usize),
    pub a: (&'a CudaStorage, &'a Layout),
    pub b_t: (&'a CudaStorage, &'a Layout),
    pub rank: usize,
    pub scale: f32,
}

/// `Segment` and `Table` of lora.cu, passed by value in the launch's parameters.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SegmentArg {
    a: u64,
    b_t: u64,
    start: i32,
    end: i32,
    rank: i32,
    scale: f32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct TableArg {
    segments: [SegmentArg; LORA_SEGMENTS],
    count: i32,
}

// SAFETY: plain old data laid out as lora.cu's `Table` (`repr(C)`, the same field types and
// order), so the launch copies it as the kernel reads it.
#[allow(unsafe_code)]
unsafe impl DeviceRepr for TableArg {}

fn int(value: usize, what: &str) -> Result<i32> {
    i32::try_from(value)
        .map_err(|_| candle_core::Error::Msg(format!("grouped LoRA: {what} too large")))
}

/// `y` `[rows, out]` plus, on each sequence's rows, `scale · x · Aᵀ · B` with its own pair
/// (`x` `[rows, in]`): two launches per [`LORA_SEGMENTS`] sequences, any mix of ranks.
pub fn grouped_lora(
    x: (&CudaStorage, &Layout),
    y: (&CudaStorage, &Layout),
    (rows, input, out): (usize, usize, usize),
    segments: &[LoraRows<'_>],
    dtype: DType,
) -> Result<CudaStorage> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let device = x.0.device.clone();
    let stream = device.cuda_stream();
    let max_rank = segments.iter().map(|s| s.rank).max().unwrap_or(1).max(1);
    let t = device.alloc_zeros::<f32>(rows * max_rank)?;
    let (rows_arg, input_arg, out_arg, max_rank_arg) = (
        u32::try_from(rows)
            .map_err(|_| candle_core::Error::Msg("grouped LoRA: too many rows".into()))?,
        int(input, "in")?,
        int(out, "out")?,
        int(max_rank, "rank")?,
    );
    let shrink_config = LaunchConfig {
        grid_dim: (rows_arg, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let expand_config = LaunchConfig {
        grid_dim: (
            rows_arg,
            u32::try_from(out.div_ceil(256)).unwrap_or(u32::MAX),
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    macro_rules! run {
        ($t:ty, $shrink:expr, $expand:expr) => {{
            let shrink = device.get_or_load_custom_func($shrink, LORA_MODULE, LORA_PTX)?;
            let expand = device.get_or_load_custom_func($expand, LORA_MODULE, LORA_PTX)?;
            let x = view::<$t>(x)?;
            let mut current: Option<CudaSlice<$t>> = None;
            let y = view::<$t>(y)?;
            for chunk in segments.chunks(LORA_SEGMENTS) {
                let weights = chunk
                    .iter()
                    .map(|s| Ok((view::<$t>(s.a)?, view::<$t>(s.b_t)?)))
                    .collect::<Result<Vec<_>>>()?;
                let mut table = TableArg {
                    segments: [SegmentArg::default(); LORA_SEGMENTS],
                    count: int(chunk.len(), "segments")?,
                };
                let mut reads = Vec::with_capacity(2 * chunk.len());
                for ((slot, segment), (a, b_t)) in
                    table.segments.iter_mut().zip(chunk).zip(&weights)
                {
                    let (a_ptr, a_read) = a.device_ptr(&stream);
                    let (b_ptr, b_read) = b_t.device_ptr(&stream);
                    reads.push(a_read);
                    reads.push(b_read);
                    *slot = SegmentArg {
                        a: a_ptr,
                        b_t: b_ptr,
                        start: int(segment.rows.0, "rows")?,
                        end: int(segment.rows.1, "rows")?,
                        rank: int(segment.rank, "rank")?,
                        scale: segment.scale,
                    };
                }
                let mut builder = shrink.builder();
                builder.arg(&x);
                builder.arg(&input_arg);
                builder.arg(&table);
                builder.arg(&t);
                builder.arg(&max_rank_arg);
                // SAFETY: the arguments match `lora_shrink_*` in lora.cu in number, order and
                // type; the table's pointers are to contiguous pairs of `rank` rows that stay
                // alive (their storages are borrowed) until the launches are queued.
                #[allow(unsafe_code)]
                unsafe { builder.launch(shrink_config) }.w()?;
                // SAFETY: `expand` writes every one of the `rows · out` values.
                #[allow(unsafe_code)]
                let next = unsafe { device.alloc::<$t>(rows * out)? };
                let mut builder = expand.builder();
                builder.arg(&t);
                builder.arg(&max_rank_arg);
                match &current {
                    Some(previous) => builder.arg(previous),
                    None => builder.arg(&y),
                };
                builder.arg(&out_arg);
                builder.arg(&table);
                builder.arg(&next);
                // SAFETY: as above, for `lora_expand_*`; `t` holds this chunk's products.
                #[allow(unsafe_code)]
                unsafe { builder.launch(expand_config) }.w()?;
                drop(reads);
                current = Some(next);
            }
            match current {
                Some(out) => Ok(<$t as CudaDType>::wrap_cuda_slice(out, device.clone())),
                None => candle_core::bail!("grouped LoRA: no adapter rows"),
            }
        }};
    }
    match dtype {
        DType::F32 => run!(f32, "lora_shrink_f32", "lora_expand_f32"),
        DType::BF16 => run!(half::bf16, "lora_shrink_bf16", "lora_expand_bf16"),
        DType::F16 => run!(half::f16, "lora_shrink_f16", "lora_expand_f16"),
        other => candle_core::bail!("grouped LoRA computes in f32, bf16 or f16, not {other:?}"),
    }
}

/// The stored parts of an NF4 matrix on one GPU, with their layouts.
#[derive(Clone, Copy, Debug)]
pub struct Nf4Parts<'a> {
    pub packed: (&'a CudaStorage, &'a Layout),
    pub absmax: (&'a CudaStorage, &'a Layout),
    pub nested_absmax: (&'a CudaStorage, &'a Layout),
    pub offset: f32,
    pub elements: usize,
}

/// The 16 NF4 levels followed by bitsandbytes' 256-entry dynamic code, on `device`: uploaded
/// the first time a device dequantizes, then kept for the process.
fn nf4_tables(device: &CudaDevice) -> Result<Tensor> {
    static TABLES: OnceLock<Mutex<HashMap<DeviceId, Tensor>>> = OnceLock::new();
    let mut tables = TABLES
        .get_or_init(Mutex::default)
        .lock()
        .map_err(|_| candle_core::Error::Msg("NF4 tables: poisoned".into()))?;
    if let Some(t) = tables.get(&device.id()) {
        return Ok(t.clone());
    }
    let mut values = NF4_LEVELS.to_vec();
    values.extend_from_slice(dynamic_code());
    let t = Tensor::new(values.as_slice(), &Device::Cuda(device.clone()))?;
    tables.insert(device.id(), t.clone());
    Ok(t)
}

/// The dense weights of `parts` in `dtype` (f32, bf16 or f16), one thread per packed byte.
pub fn nf4_dequantize(parts: Nf4Parts<'_>, dtype: DType) -> Result<CudaStorage> {
    let device = parts.packed.0.device.clone();
    let packed = view::<u8>(parts.packed)?;
    let absmax = view::<u8>(parts.absmax)?;
    let nested = view::<f32>(parts.nested_absmax)?;
    let tables = nf4_tables(&device)?;
    let (tables_storage, tables_layout) = tables.storage_and_layout();
    let Storage::Cuda(tables_storage) = &*tables_storage else {
        candle_core::bail!("NF4 tables are not on the GPU");
    };
    let tables = view::<f32>((tables_storage, tables_layout))?;
    let pairs = u32::try_from(parts.elements.div_ceil(2))
        .map_err(|_| candle_core::Error::Msg("NF4 weight too large for one launch".into()))?;
    macro_rules! run {
        ($t:ty, $kernel:expr) => {{
            let func = device.get_or_load_custom_func($kernel, NF4_MODULE, NF4_PTX)?;
            // SAFETY: the kernel writes every one of the `elements` values before anything
            // reads the buffer.
            #[allow(unsafe_code)]
            let out = unsafe { device.alloc::<$t>(parts.elements)? };
            let mut builder = func.builder();
            builder.arg(&packed);
            builder.arg(&absmax);
            builder.arg(&nested);
            builder.arg(&tables);
            builder.arg(&parts.offset);
            builder.arg(&parts.elements);
            builder.arg(&out);
            // SAFETY: the arguments match the kernel's parameters in nf4.cu in number, order
            // and type, and every buffer outlives the launch (candle's stream orders later
            // uses).
            #[allow(unsafe_code)]
            unsafe { builder.launch(LaunchConfig::for_num_elems(pairs)) }.w()?;
            Ok(<$t as CudaDType>::wrap_cuda_slice(out, device.clone()))
        }};
    }
    match dtype {
        DType::F32 => run!(f32, "nf4_dequantize_f32"),
        DType::BF16 => run!(half::bf16, "nf4_dequantize_bf16"),
        DType::F16 => run!(half::f16, "nf4_dequantize_f16"),
        other => candle_core::bail!("NF4 dequantizes to f32, bf16 or f16, not {other:?}"),
    }
}

/// `mask`'s values for an input of `shape`, in `dtype`, computed on the GPU.
pub fn dropout_mask(
    device: &CudaDevice,
    mask: &DropoutMask,
    shape: &[usize],
    dtype: DType,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let cols = shape.last().copied().unwrap_or(1).max(1) as u64;
    let threads = u32::try_from(n)
        .map_err(|_| candle_core::Error::Msg("dropout mask too large for one launch".into()))?;
    macro_rules! run {
        ($t:ty, $kernel:expr) => {{
            let func = device.get_or_load_custom_func($kernel, DROPOUT_MODULE, DROPOUT_PTX)?;
            // SAFETY: the kernel writes every one of the `n` values before anything reads
            // the buffer.
            #[allow(unsafe_code)]
            let out = unsafe { device.alloc::<$t>(n)? };
            let mut builder = func.builder();
            builder.arg(&mask.key);
            builder.arg(&mask.first_row);
            builder.arg(&cols);
            builder.arg(&mask.threshold);
            builder.arg(&mask.scale);
            builder.arg(&n);
            builder.arg(&out);
            // SAFETY: the arguments match the kernel's parameters in dropout.cu in number,
            // order and type; the buffer outlives the launch.
            #[allow(unsafe_code)]
            unsafe { builder.launch(LaunchConfig::for_num_elems(threads)) }.w()?;
            <$t as CudaDType>::wrap_cuda_slice(out, device.clone())
        }};
    }
    let storage = match dtype {
        DType::F32 => run!(f32, "dropout_mask_f32"),
        DType::BF16 => run!(half::bf16, "dropout_mask_bf16"),
        DType::F16 => run!(half::f16, "dropout_mask_f16"),
        other => candle_core::bail!("dropout masks are f32, bf16 or f16, not {other:?}"),
    };
    Ok(Tensor::from_storage(
        Storage::Cuda(storage),
        Shape::from(shape),
        candle_core::op::BackpropOp::none(),
        false,
    ))
}

fn view<'a, T: CudaDType + DeviceRepr>(
    (storage, layout): (&'a CudaStorage, &Layout),
) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("kernel inputs must be contiguous");
    };
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}
