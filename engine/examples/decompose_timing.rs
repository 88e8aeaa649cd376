//! Seconds OLoRA's and PiSSA's starts take for one projection of Llama-3-8B's shapes
//! (`[4096, 4096]` and `[4096, 14336]`, rank 16) on this machine's CPU, for two spectra: a
//! weight with a decaying spectrum, as trained projections have, and plain Gaussian noise,
//! whose flat top spectrum is the subspace iteration's worst case.
//!
//!     cargo run --release -p graft-engine --example decompose_timing

#![allow(clippy::print_stdout)]

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use graft_engine::{adapters::decompose, rng::Rng};

fn gaussian(shape: (usize, usize), std: f32, rng: &mut Rng) -> Result<Tensor> {
    let values: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.normal(std)).collect();
    Tensor::from_vec(values, shape, &Device::Cpu)
}

/// `Σ sᵢ·xᵢ·yᵢᵀ` over 256 random directions with `sᵢ = 1/(1 + i/8)`, plus noise.
fn decaying(shape: (usize, usize), rng: &mut Rng) -> Result<Tensor> {
    let k = 256;
    #[allow(clippy::cast_precision_loss)]
    let decay: Vec<f32> = (0..k).map(|i| 1.0 / (1.0 + i as f32 / 8.0)).collect();
    let x = gaussian((shape.0, k), 1.0, rng)?.broadcast_mul(&Tensor::from_vec(
        decay,
        (1, k),
        &Device::Cpu,
    )?)?;
    let y = gaussian((k, shape.1), 1.0, rng)?;
    x.matmul(&y)? + gaussian(shape, 0.5, rng)?
}

fn main() -> Result<()> {
    let mut rng = Rng::seed(7);
    let rank = 16;
    println!("shape           spectrum   olora (s)  pissa (s)  rounds  pissa residual");
    for shape in [(4096, 4096), (4096, 14336)] {
        for (name, w) in [
            ("decaying", decaying(shape, &mut rng)?),
            ("gaussian", gaussian(shape, 0.02, &mut rng)?),
        ] {
            let w = w.to_dtype(DType::F32)?;
            let started = Instant::now();
            decompose::olora(&w, rank, 2.0)?;
            let olora = started.elapsed().as_secs_f64();
            let started = Instant::now();
            let pissa = decompose::pissa(&w, rank, 2.0)?;
            let seconds = started.elapsed().as_secs_f64();
            println!(
                "{:<15} {name:<10} {olora:>9.2} {seconds:>10.2}  {:>6}  {:.1e}",
                format!("{}x{}", shape.0, shape.1),
                pissa.rounds,
                pissa.residual_norm
            );
        }
    }
    Ok(())
}
