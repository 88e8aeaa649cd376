//! f32 matrix products on the CPU written straight into a caller's buffer, and read access to a
//! tensor's f32 data: the pieces of the fused CPU ops of this backend,
//! which need a product added onto another without the separate output
//! buffer, add pass and gradient bookkeeping that candle's `matmul` then `add` cost.

use std::borrow::Cow;

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};
use gemm::Parallelism;

/// A row-major `[rows, cols]` matrix, used as it is or transposed.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    transposed: bool,
}

impl<'a> Mat<'a> {
    /// # Panics
    /// When `data` does not hold exactly `rows · cols` values.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "a [{rows}, {cols}] matrix");
        Self {
            data,
            rows,
            cols,
            transposed: false,
        }
    }

    /// The transpose (no copy).
    #[must_use]
    pub fn t(self) -> Self {
        Self {
            transposed: !self.transposed,
            ..self
        }
    }

    /// `(rows, cols)` as used.
    pub fn shape(&self) -> (usize, usize) {
        if self.transposed {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }

    /// `(row stride, column stride)` as used.
    #[allow(clippy::cast_possible_wrap)]
    fn strides(&self) -> (isize, isize) {
        if self.transposed {
            (1, self.cols as isize)
        } else {
            (self.cols as isize, 1)
        }
    }
}

/// `out = scale · lhs · rhs`, or `out += scale · lhs · rhs` with `accumulate`; `out` is
/// row-major `[lhs rows, rhs cols]`. Threads as candle's own matmul (`RAYON_NUM_THREADS`).
///
/// # Panics
/// When the shapes disagree.
pub fn matmul_into(out: &mut [f32], lhs: Mat<'_>, rhs: Mat<'_>, scale: f32, accumulate: bool) {
    assert_eq!(
        out.len(),
        lhs.shape().0 * rhs.shape().1,
        "the product's size"
    );
    #[allow(unsafe_code)]
    // SAFETY: `out` holds the whole product and is initialised.
    unsafe {
        product(out.as_mut_ptr(), lhs, rhs, scale, accumulate);
    }
}

/// `scale · lhs · rhs` in a new row-major buffer.
pub fn matmul(lhs: Mat<'_>, rhs: Mat<'_>, scale: f32) -> Vec<f32> {
    let len = lhs.shape().0 * rhs.shape().1;
    // Not zeroed first: the product overwrites every element, and zeroing was a pass over
    // every activation-sized output of a step.
    let mut out = Vec::<f32>::with_capacity(len);
    #[allow(unsafe_code)]
    // SAFETY: the buffer has room for the product, which (not accumulating) writes every
    // element and reads none, so all `len` are initialised before `set_len`.
    unsafe {
        product(out.as_mut_ptr(), lhs, rhs, scale, false);
        out.set_len(len);
    }
    out
}

/// Outputs with fewer columns than this are computed column-major, then transposed into
/// place, when `lhs` is a transpose.
///
/// `gemm` computes a row-major output as its transpose, so an output's columns become the
/// rows its kernels block over, 64 at a time with AVX-512: a LoRA gradient `dB = gᵀ · (x·Aᵀ)`
/// (`[out, rank]`) has 16 of 64, a quarter of a kernel, and ran at a third of the speed per
/// multiply-add of the frozen products. Column-major it has `out`, and `gᵀ` already runs
/// along them in memory, so nothing is repacked; the transpose afterwards is one pass over a
/// small output. (A row-major `lhs`, as in `x · Aᵀ`, would be repacked by gemm instead, which
/// costs what the narrow kernel does.)
const NARROW: usize = 64;

/// The product into `out`, which must have room for `[lhs rows, rhs cols]` values and be
/// initialised when `accumulate`.
#[allow(unsafe_code)]
unsafe fn product(out: *mut f32, lhs: Mat<'_>, rhs: Mat<'_>, scale: f32, accumulate: bool) {
    let ((rows, _), (_, cols)) = (lhs.shape(), rhs.shape());
    if cols >= NARROW || rows <= cols || !lhs.transposed {
        // SAFETY: as the caller's.
        unsafe { gemm_into(out, (cols, 1), lhs, rhs, scale, accumulate) };
        return;
    }
    let mut column_major = Vec::<f32>::with_capacity(rows * cols);
    // SAFETY: the buffer has room for the product, which (not accumulating) writes every
    // element, so all are initialised before `set_len`.
    unsafe {
        gemm_into(column_major.as_mut_ptr(), (1, rows), lhs, rhs, scale, false);
        column_major.set_len(rows * cols);
    }
    // SAFETY: the caller gives room for rows · cols values, initialised when accumulating.
    let out = unsafe {
        std::slice::from_raw_parts_mut(out.cast::<std::mem::MaybeUninit<f32>>(), rows * cols)
    };
    for (i, row) in out.chunks_exact_mut(cols).enumerate() {
        for (j, o) in row.iter_mut().enumerate() {
            let v = column_major[j * rows + i];
            // SAFETY: initialised when accumulating (the caller's promise).
            o.write(if accumulate {
                (unsafe { o.assume_init() }) + v
            } else {
                v
            });
        }
    }
}

thread_local! {
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the products it computes kept on the calling thread: for an op that already
/// spreads its work over the threads, where each small product asking the pool for threads
/// again costs more than it computes.
pub fn serial<R>(f: impl FnOnce() -> R) -> R {
    /// Puts the thread's setting back even when `f` panics: a pool thread outlives the task.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SERIAL.set(self.0);
        }
    }
    let _restore = Restore(SERIAL.replace(true));
    f()
}

/// `gemm` of `scale · lhs · rhs` into `out` laid out with `(row, column)` strides
/// `out_strides`.
#[allow(unsafe_code, clippy::cast_possible_wrap)]
unsafe fn gemm_into(
    out: *mut f32,
    out_strides: (usize, usize),
    lhs: Mat<'_>,
    rhs: Mat<'_>,
    scale: f32,
    accumulate: bool,
) {
    let ((rows, inner), (rhs_inner, cols)) = (lhs.shape(), rhs.shape());
    assert_eq!(inner, rhs_inner, "inner dimensions");
    if rows == 0 || cols == 0 {
        return;
    }
    let (out_row, out_col) = (out_strides.0 as isize, out_strides.1 as isize);
    if inner == 0 {
        if !accumulate {
            for i in 0..rows as isize {
                for j in 0..cols as isize {
                    // SAFETY: the caller gives room for the product under these strides.
                    unsafe { out.offset(i * out_row + j * out_col).write(0.0) };
                }
            }
        }
        return;
    }
    let threads = if SERIAL.get() {
        1
    } else {
        candle_core::utils::get_num_threads()
    };
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    let ((lhs_row, lhs_col), (rhs_row, rhs_col)) = (lhs.strides(), rhs.strides());
    // SAFETY: `Mat::new` ties each input's length to its dimensions and strides, and the
    // caller gives room for the product under `out_strides`, so gemm reads and writes inside
    // them; `out` is the caller's own buffer, so it overlaps neither input. Not accumulating,
    // gemm writes `out` without reading it.
    unsafe {
        gemm::gemm(
            rows,
            cols,
            inner,
            out,
            out_col,
            out_row,
            accumulate,
            lhs.data.as_ptr(),
            lhs_col,
            lhs_row,
            rhs.data.as_ptr(),
            rhs_col,
            rhs_row,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The values of a contiguous f32 CPU storage under `layout`.
pub fn f32_values<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(values), Some((start, end))) => Ok(&values[start..end]),
        _ => candle_core::bail!("{op}: needs contiguous f32 tensors on the CPU"),
    }
}

/// Whether `x` takes the fused CPU ops' path: f32 on the CPU.
pub fn is_cpu_f32(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// Runs `f` on the f32 values of a CPU tensor, in place when contiguous.
pub fn with_f32<R>(tensor: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    with_f32s([tensor], op, |[values]| f(values))
}

/// [`with_f32`] for several tensors at once.
pub fn with_f32s<const N: usize, R>(
    tensors: [&Tensor; N],
    op: &str,
    f: impl FnOnce([&[f32]; N]) -> Result<R>,
) -> Result<R> {
    let tensors = tensors
        .map(|t| -> Result<Cow<'_, Tensor>> {
            Ok(if t.is_contiguous() {
                Cow::Borrowed(t)
            } else {
                Cow::Owned(t.contiguous()?)
            })
        })
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let values = guards
        .iter()
        .map(|(storage, layout)| match &**storage {
            Storage::Cpu(storage) => f32_values(storage, layout, op),
            _ => candle_core::bail!("{op}: needs tensors on the CPU"),
        })
        .collect::<Result<Vec<_>>>()?;
    f(values.try_into().expect("one slice per tensor"))
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn products_of_transposes_match_candle_and_accumulate() -> Result<()> {
        let device = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (5, 3), &device)?;
        let b = Tensor::randn(0f32, 1.0, (4, 3), &device)?;
        let c = Tensor::randn(0f32, 1.0, (5, 4), &device)?;
        let (av, bv) = (
            a.flatten_all()?.to_vec1::<f32>()?,
            b.flatten_all()?.to_vec1::<f32>()?,
        );
        // 2 · a · bᵀ, then c + that, then aᵀ · (a · bᵀ)-shaped checks through transposes.
        let ours = matmul(Mat::new(&av, 5, 3), Mat::new(&bv, 4, 3).t(), 2.0);
        let expected = (a.matmul(&b.t()?)? * 2.0)?;
        let mut accumulated = c.flatten_all()?.to_vec1::<f32>()?;
        matmul_into(
            &mut accumulated,
            Mat::new(&av, 5, 3),
            Mat::new(&bv, 4, 3).t(),
            2.0,
            true,
        );
        let transposed = matmul(Mat::new(&av, 5, 3).t(), Mat::new(&ours, 5, 4), 1.0);
        let close = |ours: &[f32], expected: &Tensor| -> Result<()> {
            let expected = expected.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(ours.len(), expected.len());
            for (o, e) in ours.iter().zip(&expected) {
                assert!((o - e).abs() < 1e-5, "{o} vs {e}");
            }
            Ok(())
        };
        close(&ours, &expected)?;
        close(&accumulated, &(&c + &expected)?)?;
        close(&transposed, &a.t()?.matmul(&expected)?)?;
        Ok(())
    }

    #[test]
    fn narrow_products_of_a_transposed_lhs_match_candle_and_accumulate() -> Result<()> {
        let device = Device::Cpu;
        // `gᵀ · xa` as in a LoRA `dB`: 70 output rows of 16 columns, computed column-major.
        let g = Tensor::randn(0f32, 1.0, (40, 70), &device)?;
        let xa = Tensor::randn(0f32, 1.0, (40, 16), &device)?;
        let start = Tensor::randn(0f32, 1.0, (70, 16), &device)?;
        let (gv, xav) = (
            g.flatten_all()?.to_vec1::<f32>()?,
            xa.flatten_all()?.to_vec1::<f32>()?,
        );
        let (lhs, rhs) = (Mat::new(&gv, 40, 70).t(), Mat::new(&xav, 40, 16));
        let product = (g.t()?.matmul(&xa)? * 0.5)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let ours = matmul(lhs, rhs, 0.5);
        let mut accumulated = start.flatten_all()?.to_vec1::<f32>()?;
        matmul_into(&mut accumulated, lhs, rhs, 0.5, true);
        let start = start.flatten_all()?.to_vec1::<f32>()?;
        for i in 0..product.len() {
            assert!(
                (ours[i] - product[i]).abs() < 1e-4,
                "{i}: {} vs {}",
                ours[i],
                product[i]
            );
            let expected = start[i] + product[i];
            assert!((accumulated[i] - expected).abs() < 1e-4, "{i}: accumulated");
        }
        Ok(())
    }

    #[test]
    fn non_contiguous_tensors_are_read_in_logical_order() -> Result<()> {
        let t = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu)?.t()?;
        let values = with_f32(&t, "test", |v| Ok(v.to_vec()))?;
        assert_eq!(values, [1.0, 3.0, 2.0, 4.0]);
        Ok(())
    }
}
