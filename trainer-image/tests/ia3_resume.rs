//! An (IA)³ run's checkpoints: a run resumed from its step-2 checkpoint (the vectors in PEFT's
//! format, the optimizer's moments) publishes the adapter of the uninterrupted run.

use std::{path::Path, process::Command};

use candle_core::Device;
use graft_engine::adapters::{Ia3Adapter, PeftAdapter};

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

fn published(dir: &Path) -> Ia3Adapter {
    let out = dir.join("adapter");
    let adapter = PeftAdapter::from_bytes(
        &std::fs::read(out.join("adapter_config.json")).expect("config"),
        &std::fs::read(out.join("adapter_model.safetensors")).expect("weights"),
        &Device::Cpu,
    )
    .expect("a PEFT adapter");
    match adapter {
        PeftAdapter::Ia3(adapter) => adapter,
        _ => panic!("an (IA)³ adapter"),
    }
}

#[test]
fn a_resumed_ia3_run_ends_as_an_uninterrupted_one() {
    let method = "{quantization: nf4, ia3: {}}";
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(dir.path(), method);
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
    assert!(config.contains("\"IA3\""), "the checkpoint says: {config}");
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
    let out = run(dir.path(), method);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("resuming after step 2"), "{stderr}");
    let resumed = published(dir.path());
    assert_eq!(resumed.vectors.len(), whole.vectors.len());
    for (key, ia3) in &whole.vectors {
        let diff = common::max_abs_diff(&ia3.vector, &resumed.vectors[key].vector);
        assert!(
            diff <= 1e-6,
            "{key:?}: the resumed adapter differs by {diff}"
        );
        let moved = common::max_abs_diff(&ia3.vector, &ia3.vector.ones_like().expect("ones"));
        assert!(moved > 1e-3, "{key:?}: training moved the vector ({moved})");
    }
}
