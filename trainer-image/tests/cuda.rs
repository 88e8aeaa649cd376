//! The trainer on CUDA against the CPU, on a machine with an NVIDIA GPU (built with
//! `--features cuda`; CI compiles this, only a GPU machine runs it — see cuda/README.md). One
//! micro-step with layer recomputation and dropout, from the same adapter weights (the same
//! comparison runs on the CPU in `training.rs`, with the device backend there):
//! - in f32 the loss and every adapter gradient equal the CPU's within 1e-4 (relative to the
//!   largest value);
//! - in bf16, the GPU's compute dtype (f32 adapter weights and gradients), within 2% for the
//!   loss and 10% for the gradients: bf16 keeps 8 bits of mantissa, and a tiny model's few
//!   activations give no averaging that would shrink its rounding.
#![cfg(feature = "cuda")]

mod common;

use candle_core::Device;

#[test]
fn a_micro_step_on_the_gpu_gives_the_cpus_loss_and_gradients() {
    let gpu = Device::new_cuda(0).expect("this test needs an NVIDIA GPU and its driver");
    common::device_step_matches_the_cpu_backend(&gpu);
}
