//! A mixed serving batch's bottleneck modules on the CPU in f32: one op walks the rows and adds
//! each row's module, `scaling · (U · act(D · x + b_D) + b_U)`, into the residual stream in
//! place. Through candle's ops a decode step took about ten small ops per sequence, layer and
//! placement (slice, two matrix products, bias adds, the activation, the scaling, the add, the
//! concatenation), and those per-op costs, not the arithmetic, were the step's extra time.

use std::ops::Range;

use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

use super::math::{self, dot};
use crate::adapters::{Bottleneck, bottleneck::NonLinearity};

/// `stream` (`[rows, hidden]`) with each segment's module applied on its rows, reading
/// `out` (the sub-block's output, `[rows, hidden]`) or the stream itself as the module asks;
/// added into `stream` in place: pass a stream nothing else reads.
pub fn add_bottlenecks(
    out: &Tensor,
    stream: Tensor,
    segments: &[(Range<usize>, Option<&Bottleneck>)],
) -> Result<Tensor> {
    if segments.iter().all(|(_, module)| module.is_none()) {
        return Ok(stream);
    }
    if stream.dtype() != DType::F32 || out.dtype() != DType::F32 {
        candle_core::bail!("bottlenecks: the CPU backend computes in f32");
    }
    let stream = stream.contiguous()?;
    stream.inplace_op2(&out.contiguous()?, &Bottlenecks { segments })?;
    Ok(stream)
}

struct Bottlenecks<'a> {
    segments: &'a [(Range<usize>, Option<&'a Bottleneck>)],
}

/// One module's tensors as f32 slices, and its math.
struct Module<'a> {
    down: &'a [f32],
    down_bias: &'a [f32],
    up: &'a [f32],
    up_bias: &'a [f32],
    size: usize,
    scaling: f32,
    activation: NonLinearity,
    reads_stream: bool,
}

impl Module<'_> {
    /// Adds this module's output for `input` (the row it reads) into `row`.
    #[inline(always)]
    fn add(&self, row: &mut [f32], input: Option<&[f32]>, hidden: &mut [f32]) {
        let width = row.len();
        let input = input.unwrap_or(row);
        for (j, h) in hidden.iter_mut().enumerate() {
            let pre = dot(&self.down[j * width..(j + 1) * width], input) + self.down_bias[j];
            *h = activate(self.activation, pre);
        }
        for (i, value) in row.iter_mut().enumerate() {
            let up = dot(&self.up[i * self.size..(i + 1) * self.size], hidden) + self.up_bias[i];
            *value += self.scaling * up;
        }
    }
}

/// The activations transformers' `get_activation` gives these names, in f32.
#[inline(always)]
fn activate(activation: NonLinearity, x: f32) -> f32 {
    match activation {
        NonLinearity::Relu => x.max(0.0),
        NonLinearity::Silu => x * math::sigmoid(x),
        NonLinearity::Gelu => {
            0.5 * x * (1.0 + candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
        }
        NonLinearity::GeluTanh => {
            let inner = (2.0 / std::f32::consts::PI).sqrt() * (x + 0.044_715 * x * x * x);
            0.5 * x * (1.0 + inner.tanh())
        }
        NonLinearity::Tanh => x.tanh(),
        NonLinearity::Sigmoid => math::sigmoid(x),
    }
}

impl InplaceOp2 for Bottlenecks<'_> {
    fn name(&self) -> &'static str {
        "bottlenecks"
    }

    fn cpu_fwd(
        &self,
        stream_storage: &mut CpuStorage,
        stream_layout: &Layout,
        out_storage: &CpuStorage,
        out_layout: &Layout,
    ) -> Result<()> {
        let (
            CpuStorage::F32(stream_values),
            Some((stream_start, stream_end)),
            &[rows, width],
            CpuStorage::F32(out_values),
            Some((out_start, out_end)),
            &[out_rows, out_width],
        ) = (
            stream_storage,
            stream_layout.contiguous_offsets(),
            stream_layout.dims(),
            out_storage,
            out_layout.contiguous_offsets(),
            out_layout.dims(),
        )
        else {
            candle_core::bail!(
                "{}: needs a contiguous f32 stream and output [rows, hidden]",
                self.name()
            );
        };
        if (out_rows, out_width) != (rows, width) {
            candle_core::bail!(
                "{}: the stream is [{rows}, {width}], the output [{out_rows}, {out_width}]",
                self.name()
            );
        }
        let guards: Vec<_> = self
            .segments
            .iter()
            .map(|(_, module)| {
                module.map(|m| {
                    [&m.down, &m.down_bias, &m.up, &m.up_bias].map(Tensor::storage_and_layout)
                })
            })
            .collect();
        let mut modules = Vec::with_capacity(guards.len());
        let mut owner = vec![usize::MAX; rows];
        for (index, (guard, (range, module))) in guards.iter().zip(self.segments).enumerate() {
            let (Some(guard), Some(module)) = (guard, module) else {
                modules.push(None);
                continue;
            };
            let size = module.size();
            let mut slices = Vec::with_capacity(4);
            for ((storage, layout), len) in
                guard.iter().zip([size * width, size, width * size, width])
            {
                let (Storage::Cpu(CpuStorage::F32(values)), Some((start, end))) =
                    (&**storage, layout.contiguous_offsets())
                else {
                    candle_core::bail!("{}: a module's tensors are contiguous f32", self.name());
                };
                if end - start != len {
                    candle_core::bail!(
                        "{}: a module of {size} units does not fit width {width}",
                        self.name()
                    );
                }
                slices.push(&values[start..end]);
            }
            if range.end > rows {
                candle_core::bail!(
                    "{}: rows {range:?} outside the batch of {rows}",
                    self.name()
                );
            }
            owner[range.clone()].fill(index);
            #[allow(clippy::cast_possible_truncation)]
            modules.push(Some(Module {
                down: slices[0],
                down_bias: slices[1],
                up: slices[2],
                up_bias: slices[3],
                size,
                scaling: module.scaling as f32,
                activation: module.activation,
                reads_stream: module.reads_stream,
            }));
        }
        let stream = &mut stream_values[stream_start..stream_end];
        let out = &out_values[out_start..out_end];
        stream
            .par_chunks_mut(width)
            .zip(out.par_chunks(width))
            .zip(owner.par_iter())
            .for_each(|((row, out_row), &segment)| {
                let Some(Some(module)) = modules.get(segment) else {
                    return;
                };
                let mut hidden = vec![0f32; module.size];
                let input = (!module.reads_stream).then_some(out_row);
                math::vectorized(
                    #[inline(always)]
                    || module.add(row, input, &mut hidden),
                );
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::adapters::bottleneck::apply_segments;

    fn module(
        seed: u64,
        size: usize,
        width: usize,
        activation: NonLinearity,
        reads_stream: bool,
    ) -> Bottleneck {
        let mut rng = crate::rng::Rng::seed(seed);
        let mut draw = |shape: &[usize]| {
            let values: Vec<f32> = (0..shape.iter().product())
                .map(|_| rng.normal(0.5))
                .collect();
            Tensor::from_vec(values, shape, &Device::Cpu).expect("tensor")
        };
        Bottleneck {
            down: draw(&[size, width]),
            down_bias: draw(&[size]),
            up: draw(&[width, size]),
            up_bias: draw(&[width]),
            scaling: 0.7,
            activation,
            reads_stream,
        }
    }

    /// Every activation, both inputs, a row without a module, a long segment and single rows:
    /// the op gives what candle's ops give one segment at a time.
    #[test]
    fn the_row_op_equals_the_per_segment_ops() -> Result<()> {
        let width = 24;
        let activations = [
            NonLinearity::Relu,
            NonLinearity::Silu,
            NonLinearity::Gelu,
            NonLinearity::GeluTanh,
            NonLinearity::Tanh,
            NonLinearity::Sigmoid,
        ];
        for (i, activation) in activations.into_iter().enumerate() {
            let seed = i as u64;
            let houlsby = module(seed, 6, width, activation, false);
            let pfeiffer = module(seed + 10, 3, width, activation, true);
            let out = Tensor::randn(0f32, 1.0, (13, width), &Device::Cpu)?;
            let stream = Tensor::randn(0f32, 1.0, (13, width), &Device::Cpu)?;
            let segments = [
                (0..1, Some(&houlsby)),
                (1..2, None),
                (2..12, Some(&pfeiffer)),
                (12..13, Some(&houlsby)),
            ];
            let expected = apply_segments(&out, stream.copy()?, &segments)?;
            let got = add_bottlenecks(&out, stream.copy()?, &segments)?;
            let diff = (got - &expected)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-4, "{activation:?}: differs by {diff}");
            let untouched = (expected.narrow(0, 1, 1)? - stream.narrow(0, 1, 1)?)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(
                untouched == 0.0,
                "the row without a module is left as it is"
            );
        }
        Ok(())
    }
}
