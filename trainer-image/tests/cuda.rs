//! The trainer on CUDA against the CPU, on a machine with an NVIDIA GPU (built with
//! `--features cuda`; CI compiles this, only a GPU machine runs it — see cuda/README.md). One
//! micro-step with layer recomputation, from the same adapter weights:
//! - in f32 the loss and every adapter gradient equal the CPU's within 1e-4 (relative to the
//!   largest value);
//! - in bf16, the GPU's compute dtype (f32 adapter weights and gradients), within 2% for the
//!   loss and 10% for the gradients: bf16 keeps 8 bits of mantissa, and a tiny model's few
//!   activations give no averaging that would shrink its rounding.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor};
use common::{attach, mapping, move_b_off_zero, tiny_llama, tiny_llama_on};
use graft_engine::models::Precision;
use graft_trainer::{backward::micro_step, train::collate};

fn largest(t: &Tensor) -> f32 {
    t.abs()
        .and_then(|a| a.max_all()?.to_scalar::<f32>())
        .expect("max")
}

#[test]
fn a_micro_step_on_the_gpu_gives_the_cpus_loss_and_gradients() {
    let gpu = Device::new_cuda(0).expect("this test needs an NVIDIA GPU and its driver");
    let examples = mapping(4);
    let rows: Vec<_> = examples.iter().collect();
    for precision in [Precision::Dense, Precision::Nf4] {
        let mut cpu_model = tiny_llama(precision);
        let cpu_adapters = attach(&mut cpu_model, 5);
        move_b_off_zero(&cpu_adapters);
        let batch = collate(&rows, 0, &Device::Cpu).expect("batch");
        let expected = micro_step(&cpu_model, &cpu_adapters.vars(), &batch, 8.0, None, true)
            .expect("cpu step");
        let weights = cpu_adapters.snapshot().expect("snapshot");
        for (dtype, loss_tolerance, grad_tolerance) in
            [(DType::F32, 1e-4, 1e-4), (DType::BF16, 2e-2, 1e-1)]
        {
            let what = format!("{precision:?} {dtype:?}");
            let mut model = tiny_llama_on(precision, &gpu, dtype);
            let adapters = attach(&mut model, 5);
            adapters.load(&weights).expect("same adapter weights");
            let batch = collate(&rows, 0, &gpu).expect("batch");
            let actual =
                micro_step(&model, &adapters.vars(), &batch, 8.0, None, true).expect("gpu step");
            let loss_error = (actual.loss_sum - expected.loss_sum).abs() / expected.loss_sum;
            assert!(
                loss_error < loss_tolerance,
                "{what}: loss off by {loss_error}"
            );
            for (gpu_grad, cpu_grad) in actual.grads.iter().zip(&expected.grads) {
                let (g, c) = (
                    gpu_grad
                        .as_ref()
                        .expect("a gradient")
                        .to_device(&Device::Cpu),
                    cpu_grad.as_ref().expect("a gradient"),
                );
                let g = g.expect("to the host");
                assert_eq!(g.dtype(), DType::F32, "{what}: adapter gradients stay f32");
                let error = largest(&(&g - c).expect("diff")) / largest(c).max(1e-12);
                assert!(error < grad_tolerance, "{what}: gradient off by {error}");
            }
        }
    }
}
