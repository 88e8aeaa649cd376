//! Checkpoints of the methods other than LoRA: an (IA)³ run, a P-tuning run, a prefix-tuning
//! run and a bottleneck run resumed from their step-2 checkpoints (the adapter in PEFT's or
//! AdapterHub's format, the encoder beside it, the optimizer's moments) publish the adapter of
//! the uninterrupted run.

use std::{path::Path, process::Command};

use candle_core::{Device, Tensor};
use graft_engine::adapters::PeftAdapter;

mod common;

const TRAINER: &str = env!("CARGO_BIN_EXE_graft-trainer");

fn run(dir: &Path, method: &str) -> std::process::Output {
    let dataset = dir.join("train.jsonl");
    std::fs::write(&dataset, common::colour_questions_jsonl()).expect("dataset");
    let yaml = format!(
        r"
baseModel: {{uri: 'file://{model}'}}
dataset: {{uri: 'file://{dataset}'}}
method: {method}
training: {{epochs: 2, learningRate: 0.02, batchSize: 2, maxSequenceLength: 32,
           seed: 5, checkpointEverySteps: 2}}
output: {{uri: 'file://{output}/'}}
resources: {{gpus: 0}}
",
        model = common::tiny("made").display(),
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

/// The published adapter's tensors, by a name of each.
fn published(dir: &Path) -> Vec<(String, Tensor)> {
    let (config, weights) = common::adapter_files(&dir.join("adapter"));
    let adapter = PeftAdapter::from_bytes(&config, &weights, &Device::Cpu).expect("a PEFT adapter");
    match adapter {
        PeftAdapter::Ia3(adapter) => adapter
            .vectors
            .iter()
            .map(|(key, ia3)| (format!("{key:?}"), ia3.vector.clone()))
            .collect(),
        PeftAdapter::Prompt(adapter) => vec![("prompt_embeddings".to_owned(), adapter.embeddings)],
        PeftAdapter::Bottleneck(adapter) => adapter
            .modules
            .iter()
            .flat_map(|(key, m)| {
                [&m.down, &m.down_bias, &m.up, &m.up_bias]
                    .into_iter()
                    .enumerate()
                    .map(move |(i, t)| (format!("{key:?} {i}"), t.clone()))
            })
            .collect(),
        PeftAdapter::Lora(_) => panic!("a LoRA adapter"),
    }
}

#[test]
fn a_resumed_ia3_run_ends_as_an_uninterrupted_one() {
    let whole = resumed_as_whole("{quantization: nf4, ia3: {}}", "\"IA3\"", &[]);
    for (key, vector) in &whole {
        let moved = common::max_abs_diff(vector, &vector.ones_like().expect("ones"));
        assert!(moved > 1e-3, "{key}: training moved the vector ({moved})");
    }
}

/// Houlsby's bottleneck modules on the tiny model (width 32, reduction factor 4: 8 units),
/// published in AdapterHub's format.
#[test]
fn a_resumed_bottleneck_run_ends_as_an_uninterrupted_one() {
    let method = "{quantization: nf4, bottleneck: {placement: houlsby, reductionFactor: 4}}";
    let whole = resumed_as_whole(method, "\"reduction_factor\"", &[]);
    // Two layers, two placements, four tensors each.
    assert_eq!(whole.len(), 16);
    assert!(
        whole.iter().any(|(_, t)| t.dims() == [8, 32]),
        "8 units on width 32"
    );
}

/// Prefix tuning through its reparameterisation MLP keeps the MLP in its checkpoints, as
/// P-tuning keeps its encoder.
#[test]
fn a_resumed_prefix_tuning_run_ends_as_an_uninterrupted_one() {
    let method = "{quantization: nf4, prefixTuning: {numVirtualTokens: 2, prefixProjection: true, \
                  encoderHiddenSize: 8}}";
    resumed_as_whole(method, "\"PREFIX_TUNING\"", &["prompt_encoder.safetensors"]);
}

/// P-tuning publishes the encoder's output; a resumed run continues from the encoder itself,
/// which the checkpoint keeps beside the adapter. Without it the run refuses to resume.
#[test]
fn a_resumed_p_tuning_run_ends_as_an_uninterrupted_one() {
    let method =
        "{quantization: nf4, pTuning: {numVirtualTokens: 3, encoder: lstm, encoderHiddenSize: 8}}";
    resumed_as_whole(method, "\"P_TUNING\"", &["prompt_encoder.safetensors"]);

    let dir = tempfile::tempdir().expect("tempdir");
    assert!(run(dir.path(), method).status.success());
    let adapter = dir.path().join("adapter");
    keep_only_step_2(&adapter);
    std::fs::remove_file(adapter.join("checkpoints/step-2/prompt_encoder.safetensors"))
        .expect("remove");
    let out = run(dir.path(), method);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "resumed without its encoder: {stderr}"
    );
    assert!(stderr.contains("prompt encoder"), "{stderr}");
}

/// Removes every checkpoint but step 2's, and the published adapter.
fn keep_only_step_2(adapter: &Path) {
    let checkpoints = adapter.join("checkpoints");
    for entry in std::fs::read_dir(&checkpoints).expect("checkpoints") {
        let path = entry.expect("entry").path();
        if !path.ends_with("step-2") {
            std::fs::remove_dir_all(path).expect("remove");
        }
    }
    for name in ["graft.json", "adapter_config.json"] {
        std::fs::remove_file(adapter.join(name)).expect("remove");
    }
    std::fs::remove_file(common::weights_file(adapter)).expect("remove");
}

/// Trains with `method` to the end, then again from its step-2 checkpoint (whose config names
/// `peft_type` and which holds `files`): the two publish the same tensors, which it returns.
fn resumed_as_whole(method: &str, peft_type: &str, files: &[&str]) -> Vec<(String, Tensor)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(dir.path(), method);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let whole = published(dir.path());
    let adapter = dir.path().join("adapter");
    let step = adapter.join("checkpoints/step-2");
    let config = std::fs::read_to_string(step.join("adapter_config.json")).expect("a checkpoint");
    assert!(config.contains(peft_type), "the checkpoint says: {config}");
    for file in files {
        assert!(step.join(file).is_file(), "the checkpoint holds {file}");
    }
    keep_only_step_2(&adapter);
    let out = run(dir.path(), method);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("resuming after step 2"), "{stderr}");
    let resumed = published(dir.path());
    assert_eq!(resumed.len(), whole.len());
    for ((key, whole), (_, resumed)) in whole.iter().zip(&resumed) {
        let diff = common::max_abs_diff(whole, resumed);
        assert!(diff <= 1e-6, "{key}: the resumed adapter differs by {diff}");
    }
    whole
}
