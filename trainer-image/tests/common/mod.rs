//! Shared by the trainer's integration tests: the tiny reference Llama, adapters on it, a
//! learnable mapping and gradient comparison.

#![allow(dead_code)] // each test binary uses a subset

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use graft_engine::{
    adapters::{AdapterConfig, Site},
    models::{Config, Llama, Precision, load_weights},
};
use graft_trainer::{adapters::Adapters, train::Example};

/// `engine/tests/data/tiny/<name>`: the reference models every crate's tests share. Read at
/// run time, not baked in with `env!`: a shared, cached target directory may hold a binary
/// compiled in another checkout.
pub fn tiny(name: &str) -> PathBuf {
    PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("run through cargo"))
        .join("../engine/tests/data/tiny")
        .join(name)
}

/// Input ids (u32) and logits from `<dir>/reference.safetensors`.
pub fn reference(dir: &Path) -> (Tensor, Tensor) {
    let tensors = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
        .expect("reference");
    let ids = tensors["input_ids"].to_dtype(DType::U32).expect("ids");
    (ids, tensors["logits"].clone())
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("comparable tensors")
}

/// engine/tests/data/tiny/llama on the CPU in f32.
pub fn tiny_llama(precision: Precision) -> Llama {
    tiny_llama_on(precision, &Device::Cpu, DType::F32)
}

pub fn tiny_llama_on(precision: Precision, device: &Device, dtype: DType) -> Llama {
    let dir = tiny("llama");
    let text = std::fs::read_to_string(dir.join("config.json")).expect("config.json");
    let config = Config::from_json(&text).expect("config");
    let vb = load_weights(&dir, dtype, device).expect("weights");
    Llama::load(&vb, &config, precision).expect("model")
}

pub fn attach(model: &mut Llama, seed: u64) -> Adapters {
    let config = AdapterConfig::new(4, 8.0, 0.1, false, &Site::ALL);
    Adapters::attach(model, config, &Site::ALL, seed).expect("adapters")
}

/// Prompts `[1, k, k+1]` answered by `[(3k) mod 90 + 3, 2]`: learned on the answer only.
pub fn mapping(n: u32) -> Vec<Example> {
    (0..n)
        .map(|k| {
            let k = k + 3;
            Example {
                ids: vec![1, k, k + 1, (3 * k) % 90 + 3, 2],
                labels: vec![false, false, false, true, true],
            }
        })
        .collect()
}

/// B starts at zero, which would leave A without a gradient: moves every B off zero.
pub fn move_b_off_zero(adapters: &Adapters) {
    for pair in &adapters.pairs {
        let b = Tensor::randn(0f32, 0.1, pair.b.shape(), &Device::Cpu)
            .and_then(|b| b.to_device(pair.b.device()))
            .expect("b");
        pair.b.set(&b).expect("set");
    }
}

/// Asserts both sets hold the same gradients (relative 1e-5); returns how many were compared.
pub fn assert_same_gradients(
    left: &[Option<Tensor>],
    right: &[Option<Tensor>],
    what: &str,
) -> usize {
    let mut compared = 0;
    for (l, r) in left.iter().zip(right) {
        let (l, r) = (
            l.as_ref().expect("a gradient"),
            r.as_ref().expect("a gradient"),
        );
        let diff = (l - r)
            .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
            .expect("diff");
        let size = l
            .abs()
            .and_then(|t| t.max_all()?.to_scalar::<f32>())
            .expect("max");
        assert!(diff <= 1e-5 * size.max(1.0), "{what}: {diff} of {size}");
        compared += 1;
    }
    compared
}
