//! A mixed serving batch's adapters on the CPU in f32: one op walks the rows (as punica's
//! SGMV does on a GPU), adding each row's adapter product into the base output. A batch of 32
//! sequences with 32 adapters costs one op per projection, not 32 × (slice, two matmuls,
//! scale, add): at serving batch sizes those per-op costs, not the arithmetic, would dominate.
//!
//! A decode step reads every distinct adapter's A and B once, which with many adapters is as
//! many bytes as the model; adapters kept in bf16 (the server's `--lora-dtype bfloat16`) halve
//! them, widened to f32 in the loop. Decode rows' products run beside the base product (see
//! [`mixed`]), with AVX2 and FMA where the CPU has them. A segment of many rows (a prompt's
//! prefill) takes two matrix products instead of the loop, added into the base output in
//! place. Segments are the tasks, spread over the threads: a decode row each, or a prompt's
//! rows.

use std::ops::Range;

use candle_core::{CpuStorage, InplaceOp2, Layout, Result, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::{
    gemm::{Mat, f32_values, matmul, matmul_into, serial, with_f32},
    linear,
    math::Widen,
};
use crate::{
    adapters::{SegmentLora, ServingLora},
    backend::FrozenLinear,
};

/// `x · Wᵀ (+ b)` plus, on each segment's rows of `x` (`[rows, in]`), that segment's adapter.
///
/// Decode rows' adapter products are computed while the base product runs, into a buffer of
/// their own, and added once both are done. The base product is bound by arithmetic (and
/// gemm's repacking of the weight), the row loop by memory, since it streams every distinct
/// adapter: one after the other, each left the other's resource idle, and the pool's second
/// thread was put to sleep and woken twice per projection. A decode step of 32 sequences
/// through 32 distinct f32 adapters took about 153 ms one after the other and 131 ms side by
/// side, against 117–120 ms without adapters (`benches/mixed_lora.rs`, 2 threads). A prompt's
/// rows share their adapter and take matrix products as costly as the base's, so they follow
/// it, added into its output in place.
pub fn mixed(x: &Tensor, layer: &FrozenLinear, segments: &[SegmentLora<'_>]) -> Result<Tensor> {
    let mut adapted: Vec<Adapted<'_>> = segments
        .iter()
        .filter_map(|s| Some((s.rows.clone(), s.lora?)))
        .collect();
    if adapted.is_empty() {
        return linear::frozen(x, layer);
    }
    adapted.sort_by_key(|(rows, _)| rows.start);
    if let Some(pair) = adapted.windows(2).find(|w| w[0].0.end > w[1].0.start) {
        candle_core::bail!("batched-lora: segments overlap at row {}", pair[1].0.start);
    }
    let (decode, prompts): (Vec<_>, Vec<_>) = adapted
        .into_iter()
        .partition(|(rows, _)| rows.len() < GEMM_ROWS);
    let x = x.contiguous()?;
    let out = layer.weight().shape()?.0;
    let (y, deltas) = if decode.is_empty() {
        (linear::frozen(&x, layer)?, Vec::new())
    } else {
        let (y, deltas) = rayon::join(
            || linear::frozen(&x, layer),
            || row_deltas(&x, &decode, out),
        );
        (y?, deltas?)
    };
    let y = y.contiguous()?;
    y.inplace_op2(
        &x,
        &BatchedLora {
            decode: &decode,
            deltas: &deltas,
            prompts: &prompts,
        },
    )?;
    Ok(y)
}

/// A segment's rows and its adapter.
type Adapted<'a> = (Range<usize>, &'a ServingLora);

/// The adapter products of `segments` (each shorter than [`GEMM_ROWS`], in row order), row by
/// row, a task per row: their rows one after another, `[Σ rows, out]`.
fn row_deltas(x: &Tensor, segments: &[Adapted<'_>], out: usize) -> Result<Vec<f32>> {
    let input = x.dim(1)?;
    with_f32(x, "batched-lora", |x| {
        with_pairs(segments, (x.len() / input, input, out), |pairs| {
            let rows: Vec<_> = segments
                .iter()
                .zip(pairs)
                .flat_map(|((span, _), pair)| {
                    x[span.start * input..span.end * input]
                        .chunks_exact(input)
                        .map(move |x_row| (x_row, pair))
                })
                .collect();
            let mut deltas = vec![0f32; rows.len() * out];
            deltas
                .par_chunks_mut(out)
                .zip(rows)
                .for_each(|(out_row, (x_row, &(pair, scale)))| match pair {
                    Pair::F32(a, b_t) => add_row_fastest(out_row, x_row, a, b_t, scale),
                    Pair::Bf16(a, b_t) => add_row_fastest(out_row, x_row, a, b_t, scale),
                });
            Ok(deltas)
        })
    })
}

/// Runs `f` on each segment's adapter weights and scale, after checking that they fit rows
/// of `[rows, input]` → `out`.
fn with_pairs<R>(
    segments: &[Adapted<'_>],
    (rows, input, out): (usize, usize, usize),
    f: impl FnOnce(&[(Pair<'_>, f32)]) -> Result<R>,
) -> Result<R> {
    let guards: Vec<_> = segments
        .iter()
        .map(|(_, l)| {
            (
                l.a.storage_and_layout(),
                l.b_t.storage_and_layout(),
                l.scale,
            )
        })
        .collect();
    let mut pairs = Vec::with_capacity(guards.len());
    for (((a, a_layout), (b_t, b_layout), scale), (span, _)) in guards.iter().zip(segments) {
        let (rank, a_in) = (a_layout.dims()[0], a_layout.dims()[1]);
        let (b_rank, b_out) = (b_layout.dims()[0], b_layout.dims()[1]);
        if a_in != input || b_out != out || b_rank != rank || span.end > rows {
            candle_core::bail!(
                "batched-lora: adapter A [{rank}, {a_in}] / Bᵀ [{b_rank}, {b_out}] does not fit rows {span:?} of [{rows}, {input}] → {out}"
            );
        }
        #[allow(clippy::cast_possible_truncation)]
        pairs.push((Pair::of(a, a_layout, b_t, b_layout)?, *scale as f32));
    }
    f(&pairs)
}

/// Adds into the base output `y` the decode rows' precomputed `deltas`, and the prompts'
/// adapter products, one task per prompt.
struct BatchedLora<'a> {
    decode: &'a [Adapted<'a>],
    deltas: &'a [f32],
    prompts: &'a [Adapted<'a>],
}

impl InplaceOp2 for BatchedLora<'_> {
    fn name(&self) -> &'static str {
        "batched-lora"
    }

    fn cpu_fwd(
        &self,
        y_storage: &mut CpuStorage,
        y_layout: &Layout,
        x_storage: &CpuStorage,
        x_layout: &Layout,
    ) -> Result<()> {
        let (CpuStorage::F32(y_values), Some((y_start, y_end)), &[rows, out], &[x_rows, input]) = (
            y_storage,
            y_layout.contiguous_offsets(),
            y_layout.dims(),
            x_layout.dims(),
        ) else {
            candle_core::bail!(
                "{}: needs contiguous f32 x [rows, in] and y [rows, out]",
                self.name()
            );
        };
        if x_rows != rows {
            candle_core::bail!("{}: x has {x_rows} rows, y {rows}", self.name());
        }
        let x = f32_values(x_storage, x_layout, self.name())?;
        let y = &mut y_values[y_start..y_end];
        let mut deltas = self.deltas.chunks_exact(out);
        for (span, _) in self.decode {
            for (y_row, delta) in y[span.start * out..span.end * out]
                .chunks_exact_mut(out)
                .zip(&mut deltas)
            {
                y_row.iter_mut().zip(delta).for_each(|(y, d)| *y += d);
            }
        }
        with_pairs(self.prompts, (rows, input, out), |pairs| {
            // Each prompt's rows of `y`, split off in row order so that the threads can each
            // add into their own.
            let mut work = Vec::with_capacity(pairs.len());
            let (mut rest, mut at) = (&mut *y, 0);
            for ((span, _), pair) in self.prompts.iter().zip(pairs) {
                let (_, tail) = std::mem::take(&mut rest).split_at_mut((span.start - at) * out);
                let (mine, tail) = tail.split_at_mut(span.len() * out);
                rest = tail;
                at = span.end;
                work.push((mine, &x[span.start * input..span.end * input], pair));
            }
            // One task per prompt, its matrix products computed on the task's own thread (a
            // product that asked the pool for threads of its own, once per prompt and
            // projection, cost more than a prompt's arithmetic).
            work.into_par_iter().for_each(|(y, x, &(pair, scale))| {
                serial(|| match pair {
                    Pair::F32(a, b_t) => add_product(y, x, a, b_t, scale, input),
                    Pair::Bf16(a, b_t) => {
                        let widen = |t: &[bf16]| t.iter().map(|v| v.widen()).collect::<Vec<f32>>();
                        add_product(y, x, &widen(a), &widen(b_t), scale, input);
                    }
                });
            });
            Ok(())
        })
    }
}

/// Rows of one segment from which its adapter is applied as two matrix products rather than
/// row by row: a prompt's prefill, whose rows share the adapter, then runs as the base
/// projection's own gemm does, where the row loop reads `A` and `B` again for every row. On a
/// 256-row chunk of SmolLM2's rank-16 projections the products took 1.0× (576 → 576) to
/// 1.4× (576 → 1536, 1536 → 576) less time than the loop. Decode rows (one per sequence) stay
/// in the loop. Which path a segment takes depends on its own length, not on the other
/// sequences of the step.
const GEMM_ROWS: usize = 8;

/// `y += scale · (x · Aᵀ) · Bᵀ` for rows `x` `[rows, input]` and `y` `[rows, out]` sharing
/// one adapter.
fn add_product(y: &mut [f32], x: &[f32], a: &[f32], b_t: &[f32], scale: f32, input: usize) {
    let (rows, rank) = (x.len() / input, a.len() / input);
    let hidden = matmul(
        Mat::new(x, rows, input),
        Mat::new(a, rank, input).t(),
        scale,
    );
    matmul_into(
        y,
        Mat::new(&hidden, rows, rank),
        Mat::new(b_t, rank, y.len() / rows),
        1.0,
        true,
    );
}

/// One adapter's `A` and `Bᵀ` as stored.
#[derive(Clone, Copy)]
enum Pair<'a> {
    F32(&'a [f32], &'a [f32]),
    Bf16(&'a [bf16], &'a [bf16]),
}

impl<'a> Pair<'a> {
    fn of(a: &'a Storage, a_layout: &Layout, b_t: &'a Storage, b_layout: &Layout) -> Result<Self> {
        let offsets = |layout: &Layout| {
            layout.contiguous_offsets().ok_or_else(|| {
                candle_core::Error::Msg("batched-lora: adapter weights must be contiguous".into())
            })
        };
        let ((a_start, a_end), (b_start, b_end)) = (offsets(a_layout)?, offsets(b_layout)?);
        match (a, b_t) {
            (Storage::Cpu(CpuStorage::F32(a)), Storage::Cpu(CpuStorage::F32(b))) => {
                Ok(Self::F32(&a[a_start..a_end], &b[b_start..b_end]))
            }
            (Storage::Cpu(CpuStorage::BF16(a)), Storage::Cpu(CpuStorage::BF16(b))) => {
                Ok(Self::Bf16(&a[a_start..a_end], &b[b_start..b_end]))
            }
            _ => candle_core::bail!(
                "batched-lora: adapter weights must be f32 or bf16 on the CPU, both alike"
            ),
        }
    }
}

/// [`add_row`] compiled for AVX2 and FMA where the CPU has them: the build targets baseline
/// x86-64 (SSE2, four lanes, no fused multiply-add), and a step with many adapters spends its
/// extra time in this loop.
fn add_row_fastest<T: Widen>(out_row: &mut [f32], x_row: &[f32], a: &[T], b_t: &[T], scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA, checked just above.
        #[allow(unsafe_code)]
        unsafe {
            add_row_avx2(out_row, x_row, a, b_t, scale);
        }
        return;
    }
    add_row::<T, Separate>(out_row, x_row, a, b_t, scale);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn add_row_avx2<T: Widen>(out_row: &mut [f32], x_row: &[f32], a: &[T], b_t: &[T], scale: f32) {
    add_row::<T, Fused>(out_row, x_row, a, b_t, scale);
}

/// How `acc + a · b` is computed: as two operations, or fused, which is one instruction where
/// the CPU has FMA (and a slow library call where it has not).
trait MulAdd {
    fn mul_add(acc: f32, a: f32, b: f32) -> f32;
}

struct Separate;

impl MulAdd for Separate {
    #[inline(always)]
    fn mul_add(acc: f32, a: f32, b: f32) -> f32 {
        acc + a * b
    }
}

struct Fused;

impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(acc: f32, a: f32, b: f32) -> f32 {
        a.mul_add(b, acc)
    }
}

/// `out_row += scale · (x_row · Aᵀ) · Bᵀ`, a rank at a time. The dot products keep 32 running
/// sums, four vectors' worth: with one (eight sums) each multiply-add waited for the one
/// before it, and a decode step through one adapter took 37 ms of arithmetic on one thread
/// where this takes 30 (SmolLM2's seven projections, 32 rows, rank 16).
#[inline(always)]
fn add_row<T: Widen, M: MulAdd>(
    out_row: &mut [f32],
    x_row: &[f32],
    a: &[T],
    b_t: &[T],
    scale: f32,
) {
    let (input, out) = (x_row.len(), out_row.len());
    for (a_row, b_row) in a.chunks_exact(input).zip(b_t.chunks_exact(out)) {
        let mut sums = [0f32; 32];
        let (a_chunks, x_chunks) = (a_row.chunks_exact(32), x_row.chunks_exact(32));
        let mut tail = 0f32;
        for (a, x) in a_chunks.remainder().iter().zip(x_chunks.remainder()) {
            tail = M::mul_add(tail, a.widen(), *x);
        }
        for (a, x) in a_chunks.zip(x_chunks) {
            for i in 0..32 {
                sums[i] = M::mul_add(sums[i], a[i].widen(), x[i]);
            }
        }
        let h = (sums.iter().sum::<f32>() + tail) * scale;
        for (o, b) in out_row.iter_mut().zip(b_row) {
            *o = M::mul_add(*o, h, b.widen());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ops::Range;

    use candle_core::{DType, Device};

    use super::*;
    use crate::{
        adapters::{Lora, ServingLora, per_segment_delta},
        backend::{FrozenWeight, cuda::grouped_adapters},
        rng::Rng,
    };

    /// A random frozen projection `in` → `out`, and its output on `x` without adapters.
    fn base(x: &Tensor, out: usize) -> Result<(FrozenLinear, Tensor)> {
        let weight = Tensor::randn(0f32, 1.0, (out, x.dim(1)?), &Device::Cpu)?;
        let layer = FrozenLinear::new(FrozenWeight::Dense(weight), None);
        let y = linear::frozen(x, &layer)?;
        Ok((layer, y))
    }

    fn pair(rank: usize, (out, input): (usize, usize), seed: u64) -> Result<Lora> {
        let mut rng = Rng::seed(seed);
        let mut lora = Lora::init(rank, (out, input), 0.5, &mut rng, &Device::Cpu)?;
        let b: Vec<f32> = (0..out * rank).map(|_| rng.uniform(-1.0, 1.0)).collect();
        lora.b = Tensor::from_vec(b, (out, rank), &Device::Cpu)?;
        Ok(lora)
    }

    #[test]
    fn each_segment_goes_through_its_own_adapter_and_bare_rows_get_nothing() -> Result<()> {
        let (input, out) = (40, 24);
        let first = pair(4, (out, input), 1)?;
        let second = pair(8, (out, input), 2)?;
        let (first_s, second_s) = (ServingLora::new(&first)?, ServingLora::new(&second)?);
        let x = Tensor::randn(0f32, 1.0, (9 + GEMM_ROWS, input), &Device::Cpu)?;
        let segment = |rows: Range<usize>, lora| SegmentLora { rows, lora };
        // The last segment is long enough for the matrix products, the others go row by row.
        let segments = [
            segment(0..3, Some(&first_s)),
            segment(3..4, None),
            segment(4..8, Some(&second_s)),
            segment(8..9, Some(&first_s)),
            segment(9..9 + GEMM_ROWS, Some(&second_s)),
        ];
        let (layer, base) = base(&x, out)?;
        let fused = (mixed(&x, &layer, &segments)? - &base)?;
        let reference = per_segment_delta(&x, &segments, out)?;
        // The GPU's grouped form, run here on the CPU.
        let gathered = (grouped_adapters(&x, &base, &segments)? - &base)?;
        let max_abs = |t: Tensor| -> Result<f32> { t.abs()?.max_all()?.to_scalar::<f32>() };
        let diff = max_abs((&fused - &reference)?)?;
        assert!(diff < 1e-5, "fused and per-segment sums differ by {diff}");
        let diff = max_abs((&gathered - &reference)?)?;
        assert!(diff < 1e-5, "grouped and per-segment sums differ by {diff}");
        assert!(
            max_abs(fused.narrow(0, 3, 1)?)? < 1e-6,
            "a bare row gets nothing"
        );
        let alone = first.delta(&x.narrow(0, 8, 1)?)?;
        assert!(max_abs((fused.narrow(0, 8, 1)? - alone)?)? < 1e-5);
        let alone = second.delta(&x.narrow(0, 9, GEMM_ROWS)?)?;
        assert!(max_abs((fused.narrow(0, 9, GEMM_ROWS)? - alone)?)? < 1e-5);
        Ok(())
    }

    /// Pairs kept in bf16 give, through the same op, the product of their rounded weights; a
    /// batch may mix them with f32 pairs.
    #[test]
    fn bf16_pairs_give_the_product_of_their_rounded_weights() -> Result<()> {
        fn segments<'a>(kept: &'a ServingLora, other: &'a ServingLora) -> [SegmentLora<'a>; 3] {
            [
                SegmentLora {
                    rows: 0..3,
                    lora: Some(kept),
                },
                SegmentLora {
                    rows: 3..5 + GEMM_ROWS,
                    lora: Some(kept),
                },
                SegmentLora {
                    rows: 5 + GEMM_ROWS..7 + GEMM_ROWS,
                    lora: Some(other),
                },
            ]
        }
        let (input, out) = (40, 24);
        let exact = ServingLora::new(&pair(8, (out, input), 3)?)?;
        let cast = |lora: &ServingLora, dtype| -> Result<ServingLora> {
            Ok(ServingLora {
                a: lora.a.to_dtype(dtype)?,
                b_t: lora.b_t.to_dtype(dtype)?,
                scale: lora.scale,
                dora: None,
            })
        };
        let halved = cast(&exact, DType::BF16)?;
        let rounded = cast(&halved, DType::F32)?;
        // Row by row, and as matrix products.
        let x = Tensor::randn(0f32, 1.0, (7 + GEMM_ROWS, input), &Device::Cpu)?;
        let (layer, base) = base(&x, out)?;
        let fused = (mixed(&x, &layer, &segments(&halved, &exact))? - &base)?;
        let reference = per_segment_delta(&x, &segments(&rounded, &exact), out)?;
        let max_abs = |t: Tensor| -> Result<f32> { t.abs()?.max_all()?.to_scalar::<f32>() };
        let diff = max_abs((&fused - &reference)?)?;
        assert!(
            diff < 1e-5,
            "bf16 pairs differ from their rounded product by {diff}"
        );
        let exact_delta = per_segment_delta(&x, &segments(&exact, &exact), out)?;
        let rounding = max_abs((&fused - &exact_delta)?)?;
        let size = max_abs(exact_delta)?;
        assert!(
            rounding > 0.0 && rounding < 1e-2 * size,
            "bf16's rounding moves the product by {rounding} of {size}"
        );
        Ok(())
    }

    #[test]
    fn a_batch_without_adapters_adds_nothing() -> Result<()> {
        let x = Tensor::ones((2, 8), DType::F32, &Device::Cpu)?;
        let (layer, y) = base(&x, 4)?;
        let segments = [SegmentLora {
            rows: 0..2,
            lora: None,
        }];
        assert_eq!(
            mixed(&x, &layer, &segments)?.to_vec2::<f32>()?,
            y.to_vec2::<f32>()?
        );
        Ok(())
    }
}
