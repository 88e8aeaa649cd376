//! OLoRA and PiSSA (`method.lora.init: olora | pissa`): the trainer trains on the residual base
//! `W − scale·B₀·A₀` and publishes `B·A − B₀·A₀` as a plain LoRA of rank 2r for the original
//! base. What it publishes must give, on the unmodified base, the logits of the model it
//! trained; a resumed run must recompute the same residual; bases it cannot rewrite are refused.

use std::{path::Path, process::Command};

use candle_core::{DType, Device, Tensor};
use graft_engine::{
    adapters::{Adapter, AdapterConfig, Patterns, Site},
    models::{Checkpoint, ModelFiles, Precision},
    rng::Rng,
};
use graft_trainer::adapters::{Adapters, Decomposer};

mod common;

const TRAINER: &str = env!("CARGO_BIN_EXE_graft-trainer");

fn ids() -> Tensor {
    Tensor::new(
        &[
            [1u32, 17, 40, 3, 77, 21, 9, 60],
            [8, 8, 30, 2, 91, 44, 12, 6],
        ],
        &Device::Cpu,
    )
    .expect("ids")
}

/// The tiny Llama with `config`'s start taken out of `sites`, and its adapters; each A and B
/// then moved by noise, as training would move them.
fn trained_on_the_residual(config: AdapterConfig, sites: &[Site]) -> (Tensor, Adapter) {
    let base = Checkpoint::open(ModelFiles::Directory(common::tiny("llama"))).expect("opens");
    let decomposer = Decomposer::new(&config, sites);
    let mut model = base
        .load_rewritten(
            Precision::Dense,
            DType::F32,
            &Device::Cpu,
            Some(&decomposer),
        )
        .expect("loads");
    let (starts, _) = decomposer.into_starts();
    let adapters = Adapters::attach_decomposed(&mut model, config, starts).expect("attach");
    let before = model.forward(&ids()).expect("forward");
    let untouched = common::tiny_llama(Precision::Dense)
        .forward(&ids())
        .expect("forward");
    assert!(
        common::max_abs_diff(&before, &untouched) < 1e-4,
        "the residual plus the start is the base"
    );
    let mut rng = Rng::seed(3);
    for pair in &adapters.pairs {
        for var in [&pair.a, &pair.b] {
            let noise: Vec<f32> = (0..var.elem_count()).map(|_| rng.normal(0.2)).collect();
            let noise = Tensor::from_vec(noise, var.shape(), &Device::Cpu).expect("noise");
            var.set(&(var.as_tensor() + noise).expect("add"))
                .expect("set");
        }
    }
    let logits = model.forward(&ids()).expect("forward");
    assert!(
        common::max_abs_diff(&logits, &before) > 1e-2,
        "training moved it"
    );
    let published = adapters
        .publishable(&adapters.snapshot().expect("snapshot"))
        .expect("converts")
        .lora()
        .expect("a LoRA")
        .clone();
    (logits, published)
}

/// For both inits, plain scaling with rank and alpha patterns and rsLoRA: the published
/// adapter, written to PEFT's files, read back (as a plain LoRA) and applied to the unmodified
/// base, gives the logits of the residual model with the trained adapter.
#[test]
fn a_published_olora_or_pissa_adapter_gives_the_trained_models_logits_on_the_original_base() {
    let sites = [Site::QProj, Site::VProj, Site::UpProj, Site::DownProj];
    for init in ["olora", "pissa"] {
        for rslora in [false, true] {
            let config = AdapterConfig {
                init_lora_weights: init.into(),
                rank_pattern: Patterns::new(vec![("q_proj".to_owned(), 2)]),
                alpha_pattern: Patterns::new(vec![("v_proj".to_owned(), 3.0)]),
                ..AdapterConfig::new(4, 8.0, 0.0, rslora, &sites)
            };
            let (trained, published) = trained_on_the_residual(config, &sites);
            let (config_json, weights) = published.to_bytes().expect("PEFT's files");
            let read = Adapter::from_bytes(&config_json, &weights, &Device::Cpu)
                .expect("a plain LoRA any PEFT reader takes");
            assert_eq!(read.weights[&(0, Site::QProj)].rank().expect("rank"), 4);
            assert_eq!(read.weights[&(1, Site::UpProj)].rank().expect("rank"), 8);
            let mut model = common::tiny_llama(Precision::Dense);
            model.apply_adapter(&read).expect("fits the base");
            let logits = model.forward(&ids()).expect("forward");
            let diff = common::max_abs_diff(&logits, &trained);
            assert!(diff < 1e-4, "{init} (rsLoRA {rslora}): {diff}");
        }
    }
}

fn run(dir: &Path, method: &str, epochs: u32) -> std::process::Output {
    let dataset = dir.join("train.jsonl");
    std::fs::write(&dataset, common::colour_questions_jsonl()).expect("dataset");
    let model = dir.join("model");
    if !model.exists() {
        std::fs::create_dir_all(&model).expect("model dir");
        for entry in std::fs::read_dir(common::tiny("made")).expect("tiny") {
            let entry = entry.expect("entry");
            std::fs::copy(entry.path(), model.join(entry.file_name())).expect("copy");
        }
    }
    let yaml = format!(
        r"
baseModel: {{uri: 'file://{model}'}}
dataset: {{uri: 'file://{dataset}'}}
method: {method}
training: {{epochs: {epochs}, learningRate: 0.01, batchSize: 2, maxSequenceLength: 32,
           seed: 5, checkpointEverySteps: 2}}
output: {{uri: 'file://{output}/'}}
resources: {{gpus: 0}}
",
        model = model.display(),
        dataset = dataset.display(),
        output = dir.join("adapter").display(),
    );
    let config = dir.join("config.yaml");
    std::fs::write(&config, yaml).expect("config");
    Command::new(TRAINER)
        .args(["train", "--config"])
        .arg(&config)
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .env("GRAFT_TERMINATION_LOG", dir.join("termination-log"))
        .output()
        .expect("the trainer runs")
}

fn published(dir: &Path) -> Adapter {
    let (config, weights) = common::adapter_files(&dir.join("adapter"));
    Adapter::from_bytes(&config, &weights, &Device::Cpu).expect("a plain LoRA")
}

/// A PiSSA run (QLoRA) resumed from its step-2 checkpoint — which holds only A and B, the
/// residual being recomputed from the base — publishes the adapter of the uninterrupted run.
#[test]
fn a_resumed_pissa_run_recomputes_its_residual_and_ends_as_an_uninterrupted_one() {
    let method = "{quantization: nf4, lora: {rank: 4, alpha: 8, dropout: 0.05, init: pissa, \
                  targetModules: [q_proj, v_proj, down_proj]}}";
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(dir.path(), method, 2);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let whole = published(dir.path());
    let adapter = dir.path().join("adapter");
    let checkpoints = adapter.join("checkpoints");
    let config = std::fs::read_to_string(checkpoints.join("step-2/adapter_config.json"))
        .expect("a checkpoint");
    assert!(
        config.contains("\"pissa\""),
        "the checkpoint says: {config}"
    );
    // Back to step 2: later checkpoints and the published adapter are gone.
    for entry in std::fs::read_dir(&checkpoints).expect("checkpoints") {
        let path = entry.expect("entry").path();
        if !path.ends_with("step-2") {
            std::fs::remove_dir_all(path).expect("remove");
        }
    }
    for name in [
        "graft.json",
        "adapter_config.json",
        "adapter_model.safetensors",
    ] {
        std::fs::remove_file(adapter.join(name)).expect("remove");
    }
    let out = run(dir.path(), method, 2);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("resuming after step 2"), "{stderr}");
    let resumed = published(dir.path());
    for (key, lora) in &whole.weights {
        let other = &resumed.weights[key];
        for (x, y) in [(&lora.a, &other.a), (&lora.b, &other.b)] {
            let diff = common::max_abs_diff(x, y);
            assert!(
                diff <= 1e-5,
                "{key:?}: the resumed adapter differs by {diff}"
            );
        }
    }
}

/// A GGUF or pre-quantized base cannot be rewritten: refused before training, by name.
#[test]
fn olora_on_a_prequantized_base_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).expect("model dir");
    let prequantized = common::tiny("llama-bnb-4bit");
    for source in [prequantized.as_path(), &common::tiny("made")] {
        for entry in std::fs::read_dir(source).expect("tiny") {
            let entry = entry.expect("entry");
            let target = model.join(entry.file_name());
            if !target.exists() {
                std::fs::copy(entry.path(), target).expect("copy");
            }
        }
    }
    let out = run(
        dir.path(),
        "{quantization: nf4, lora: {rank: 4, alpha: 8, init: olora}}",
        1,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("init: olora") && stderr.contains("pre-quantized"),
        "{stderr}"
    );
}
