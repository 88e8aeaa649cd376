//! The adapted projections of a serving step on the CPU, against the same step without
//! adapters, side by side in one process: SmolLM2-135M's seven projections × 30 layers, 32
//! sequences, rank-16 adapters (f32 and bf16), in a decode step (one row each) and a prefill
//! step (a 40-token prompt each).
//!
//!     RAYON_NUM_THREADS=2 cargo bench -p graft-engine --bench mixed_lora
//!
//! (with the thread count set, as graft-server sets it: unset, candle parses `/proc/cpuinfo`
//! for it on every product).
//!
//! It times `Backend::mixed`, what the model's serving pass calls per projection, from one of
//! the pool's threads as the server's scheduler does. Random weights: only the shapes matter.

#![allow(clippy::print_stdout)] // a benchmark reports on stdout

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use graft_engine::{
    adapters::{Lora, SegmentLora, ServingLora},
    backend::{Backend, FrozenLinear, FrozenWeight, cpu::Cpu},
    rng::Rng,
};

/// SmolLM2-135M's projections, `(out, in)`: q, k, v, o, gate, up, down.
const SHAPES: [(usize, usize); 7] = [
    (576, 576),
    (192, 576),
    (192, 576),
    (576, 576),
    (1536, 576),
    (1536, 576),
    (576, 1536),
];
const LAYERS: usize = 30;
const SEQUENCES: usize = 32;
const RANK: usize = 16;
const REPEATS: usize = 5;

/// One adapter: a pair per projection of every layer, B non-zero so that it computes.
fn adapter(rng: &mut Rng) -> Result<Vec<ServingLora>> {
    let mut pairs = Vec::with_capacity(LAYERS * SHAPES.len());
    for _ in 0..LAYERS {
        for &(out, input) in &SHAPES {
            let mut lora = Lora::init(RANK, (out, input), 2.0, rng, &Device::Cpu)?;
            lora.b = Tensor::randn(0f32, 0.02, (out, RANK), &Device::Cpu)?;
            pairs.push(ServingLora::new(&lora)?);
        }
    }
    Ok(pairs)
}

/// The best of `REPEATS` steps, in ms: every projection of every layer over `rows` rows per
/// sequence, sequence `s` through `adapters[s % len]` (none when `adapters` is empty).
fn step(
    bases: &[FrozenLinear],
    inputs: &[Tensor; 2],
    adapters: &[Vec<ServingLora>],
    rows: usize,
) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..REPEATS {
        let start = Instant::now();
        for (k, base) in bases.iter().enumerate() {
            let x = &inputs[usize::from(SHAPES[k % SHAPES.len()].1 != 576)];
            let segments: Vec<SegmentLora<'_>> = (0..SEQUENCES)
                .map(|s| SegmentLora {
                    rows: s * rows..(s + 1) * rows,
                    lora: (!adapters.is_empty()).then(|| &adapters[s % adapters.len()][k]),
                })
                .collect();
            std::hint::black_box(Cpu.mixed(x, base, &segments)?);
        }
        best = best.min(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(best)
}

fn main() -> Result<()> {
    let mut rng = Rng::seed(7);
    let mut bases = Vec::with_capacity(LAYERS * SHAPES.len());
    for _ in 0..LAYERS {
        for &shape in &SHAPES {
            let weight = Tensor::randn(0f32, 0.02, shape, &Device::Cpu)?;
            bases.push(FrozenLinear::new(FrozenWeight::Dense(weight), None));
        }
    }
    let f32_adapters = (0..SEQUENCES)
        .map(|_| adapter(&mut rng))
        .collect::<Result<Vec<_>>>()?;
    let bf16_adapters = f32_adapters
        .iter()
        .map(|pairs| {
            pairs
                .iter()
                .map(|p| p.to(&Device::Cpu, DType::F32, DType::BF16))
                .collect()
        })
        .collect::<Result<Vec<_>>>()?;
    println!("{SEQUENCES} sequences, SmolLM2-135M's projections, rank {RANK}; best of {REPEATS}");
    println!("step          adapters      ms   / base-only");
    for (name, rows) in [("decode", 1), ("prefill", 40)] {
        let inputs = [576, 1536].map(|width| {
            Tensor::randn(0f32, 1.0, (SEQUENCES * rows, width), &Device::Cpu)
                .expect("a random input")
        });
        // On a pool thread, as the server's scheduler runs its steps.
        rayon::scope(|_| -> Result<()> {
            let base = step(&bases, &inputs, &[], rows)?;
            println!("{name:<13} none     {base:>8.1}");
            for (label, adapters) in [
                ("1 f32", &f32_adapters[..1]),
                ("32 f32", &f32_adapters[..]),
                ("32 bf16", &bf16_adapters[..]),
            ] {
                let ms = step(&bases, &inputs, adapters, rows)?;
                println!("{name:<13} {label:<8} {ms:>8.1}   {:.2}", base / ms);
            }
            Ok(())
        })?;
    }
    Ok(())
}
