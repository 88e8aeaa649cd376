//! Shared by the trainer's integration tests: the tiny reference Llama, adapters on it, a
//! learnable mapping and gradient comparison.

#![allow(dead_code)] // each test binary uses a subset

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use candle_core::{DType, Device, Tensor};
use graft_engine::{
    adapters::{AdapterConfig, Site},
    backend::{Dropout, cuda::Cuda},
    models::{Config, Llama, Precision, load_weights},
};
use graft_trainer::{
    adapters::Adapters,
    backward::{StepOptions, micro_step},
    train::{Example, collate},
};

/// `engine/tests/data/tiny/<name>`: the reference models every crate's tests share. Read at
/// run time, not baked in with `env!`: a shared, cached target directory may hold a binary
/// compiled in another checkout.
pub fn tiny(name: &str) -> PathBuf {
    PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("run through cargo"))
        .join("../engine/tests/data/tiny")
        .join(name)
}

/// The two files of the adapter in `dir`: `adapter_config.json` and its weights file
/// ([`weights_file`]).
pub fn adapter_files(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let read =
        |path: PathBuf| std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (
        read(dir.join("adapter_config.json")),
        read(weights_file(dir)),
    )
}

/// The weights file of the adapter in `dir`: PEFT's, or AdapterHub's for bottleneck adapters;
/// exactly one of them.
pub fn weights_file(dir: &Path) -> PathBuf {
    let present: Vec<_> = graft_engine::adapters::WEIGHTS_FILES
        .into_iter()
        .map(|name| dir.join(name))
        .filter(|path| path.is_file())
        .collect();
    assert_eq!(
        present.len(),
        1,
        "one weights file in {}: {present:?}",
        dir.display()
    );
    present.into_iter().next().expect("one")
}

/// `{"prompt","completion"}` lines of questions naming a colour answered by a fixed animal:
/// something a tiny model can learn, so an adapter moves far from its zero-B start.
pub fn colour_questions_jsonl() -> String {
    let colours = [
        "red", "blue", "green", "gold", "pink", "grey", "teal", "plum",
    ];
    let animals = ["fox", "owl", "cat", "yak", "emu", "eel", "ant", "bee"];
    colours
        .iter()
        .zip(animals)
        .map(|(c, a)| {
            let record = serde_json::json!({
                "prompt": format!("Which animal is {c}?"),
                "completion": format!(" The {a}."),
            });
            record.to_string() + "\n"
        })
        .collect()
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

/// The largest magnitude in `t`.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .and_then(|t| t.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("max")
}

/// A model on its dense f32 weights, as `from_pretrained(dtype=float32)` loads it.
pub fn dense_model(dir: &Path) -> Llama {
    let text = std::fs::read_to_string(dir.join("config.json")).expect("config.json");
    let config = Config::from_json(&text).expect("config");
    let vb = load_weights(dir, DType::F32, &Device::Cpu).expect("weights");
    Llama::load(&vb, &config, Precision::Dense).expect("model")
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
    attach_with(model, seed, false)
}

/// [`attach`], with DoRA's magnitudes where `use_dora`.
pub fn attach_with(model: &mut Llama, seed: u64, use_dora: bool) -> Adapters {
    let config = AdapterConfig {
        use_dora,
        ..AdapterConfig::new(4, 8.0, 0.1, false, &Site::SEPARATE)
    };
    Adapters::attach(model, config, &Site::SEPARATE, seed).expect("adapters")
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

/// B starts at zero, which would leave A without a gradient: moves every B off zero, the same
/// way every run (uniform in ±0.17, a spread of 0.1), so tolerances are measured, not drawn.
pub fn move_b_off_zero(adapters: &Adapters) {
    let mut rng = graft_engine::rng::Rng::seed(17);
    for pair in &adapters.pairs {
        let values: Vec<f32> = (0..pair.b.elem_count())
            .map(|_| rng.uniform(-0.17, 0.17))
            .collect();
        let b = Tensor::from_vec(values, pair.b.shape(), &Device::Cpu)
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

fn largest(t: &Tensor) -> f32 {
    t.abs()
        .and_then(|a| a.max_all()?.to_scalar::<f32>())
        .expect("max")
}

/// One micro-step with recomputation and dropout through the device backend on `device`,
/// against the fused CPU backend, from the same adapter weights: in f32 the loss and every
/// adapter gradient within 1e-4 (relative to the largest value); in bf16 (f32 adapter weights
/// and gradients) within 2% for the loss and 50% for the gradients — bf16 keeps 8 bits of
/// mantissa, and a tiny model's few activations give no averaging to shrink its rounding.
/// Measured with these fixed inputs: loss 0.17% (dense) and 1.0% (NF4), the worst gradient
/// 8.7% (dense) and 37% (NF4, whose bf16 dequantized weights round once more); a wrong
/// gradient (a missing term, a transposed weight) is off by 100% or more. With DoRA too (A, B
/// and the magnitudes).
pub fn device_step_matches_the_cpu_backend(device: &Device) {
    let examples = mapping(4);
    let rows: Vec<_> = examples.iter().collect();
    let dropout = Some(Dropout {
        p: 0.1,
        seed: 21,
        first_row: 0,
    });
    let cases = [false, true]
        .into_iter()
        .flat_map(|dora| [(dora, Precision::Dense), (dora, Precision::Nf4)]);
    for (use_dora, precision) in cases {
        let mut cpu_model = tiny_llama(precision);
        let cpu_adapters = attach_with(&mut cpu_model, 5, use_dora);
        move_b_off_zero(&cpu_adapters);
        let batch = collate(&rows, 0, &Device::Cpu).expect("batch");
        let expected = micro_step(
            &cpu_model,
            &cpu_adapters.vars(),
            &batch,
            8.0,
            StepOptions::new(dropout, true),
        )
        .expect("cpu step");
        let weights = cpu_adapters.snapshot().expect("snapshot");
        for (dtype, loss_tolerance, grad_tolerance) in
            [(DType::F32, 1e-4, 1e-4), (DType::BF16, 2e-2, 0.5)]
        {
            let what = format!("{precision:?} {dtype:?} on {device:?}, DoRA {use_dora}");
            let mut model = tiny_llama_on(precision, device, dtype).with_backend(&Cuda);
            let adapters = attach_with(&mut model, 5, use_dora);
            adapters.load(&weights).expect("same adapter weights");
            let batch = collate(&rows, 0, device).expect("batch");
            let actual = micro_step(
                &model,
                &adapters.vars(),
                &batch,
                8.0,
                StepOptions::new(dropout, true),
            )
            .expect("device step");
            let loss_error = (actual.loss_sum - expected.loss_sum).abs() / expected.loss_sum;
            assert!(
                loss_error < loss_tolerance,
                "{what}: loss off by {loss_error}"
            );
            let per_pair = if use_dora { 3 } else { 2 };
            assert_eq!(
                actual.grads.len(),
                per_pair * 7 * 2,
                "{what}: every tensor of 14 pairs"
            );
            for (device_grad, cpu_grad) in actual.grads.iter().zip(&expected.grads) {
                let c = cpu_grad.as_ref().expect("a gradient");
                let g = device_grad
                    .as_ref()
                    .expect("a gradient")
                    .to_device(&Device::Cpu)
                    .expect("to the host");
                assert_eq!(g.dtype(), DType::F32, "{what}: adapter gradients stay f32");
                let error = largest(&(&g - c).expect("diff")) / largest(c).max(1e-12);
                assert!(error < grad_tolerance, "{what}: gradient off by {error}");
            }
        }
    }
}

/// Trains `model` with `method` (the YAML of `spec.method`) and returns the published
/// adapter's directory.
pub fn train(dir: &Path, model: &Path, method: &str) -> PathBuf {
    let (out, output) = run_trainer(dir, model, method);
    assert!(
        out.status.success(),
        "graft-trainer train failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        output.join("graft.json").is_file(),
        "the adapter is published"
    );
    output
}

/// Runs the trainer on a job it must refuse: its exit code and one-line reason.
pub fn train_refused(dir: &Path, model: &Path, method: &str) -> (i32, String) {
    let (out, output) = run_trainer(dir, model, method);
    assert!(!output.join("graft.json").exists(), "nothing is published");
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    (out.status.code().unwrap_or(-1), stderr)
}

/// `graft-trainer train` on `model` with `method`; its output and the adapter's directory.
pub fn run_trainer(dir: &Path, model: &Path, method: &str) -> (std::process::Output, PathBuf) {
    run_trainer_with(dir, model, method, "")
}

/// [`run_trainer`] with more fields of `spec.output` (`, merged: true`).
pub fn run_trainer_with(
    dir: &Path,
    model: &Path,
    method: &str,
    output_fields: &str,
) -> (std::process::Output, PathBuf) {
    let dataset = dir.join("train.jsonl");
    std::fs::write(&dataset, colour_questions_jsonl()).expect("dataset");
    let output = dir.join("adapter");
    let yaml = format!(
        r"
baseModel: {{uri: 'file://{model}'}}
dataset: {{uri: 'file://{dataset}', validationFraction: 0.25}}
method: {method}
training: {{epochs: 12, learningRate: 0.01, batchSize: 2, gradientAccumulationSteps: 1,
           maxSequenceLength: 32, warmupSteps: 2, scheduler: cosine, seed: 5}}
output: {{uri: 'file://{output}/'{output_fields}}}
resources: {{gpus: 0}}
",
        model = model.display(),
        dataset = dataset.display(),
        output = output.display(),
    );
    let config = dir.join("config.yaml");
    std::fs::write(&config, yaml).expect("config");
    let out = Command::new(env!("CARGO_BIN_EXE_graft-trainer"))
        .args(["train", "--config"])
        .arg(&config)
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .env("GRAFT_TERMINATION_LOG", dir.join("termination-log"))
        .stdin(Stdio::null())
        .output()
        .expect("the trainer runs");
    (out, output)
}
