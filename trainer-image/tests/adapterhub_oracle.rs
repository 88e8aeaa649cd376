//! Parity with the reference of bottleneck adapters, the AdapterHub `adapters` library (1.3.0,
//! on transformers 4.57.6, CPU; `$GRAFT_ADAPTERHUB_PYTHON`, the environment
//! `tests/oracle/venv.sh adapterhub` makes):
//! - an adapter `graft-trainer train` publishes (Houlsby's and Pfeiffer's, on the NF4 base)
//!   loads in the library by its own `load_adapter` and gives there the logits Graft gives with
//!   it on the dense base, within 1e-4;
//! - one training step through the trainer's micro-step (whole-graph and recomputed, one shard
//!   and two) gives the library's loss and gradients for its own adapters.

use std::{collections::HashMap, ffi::OsStr, path::Path, process::Command};

use candle_core::{DType, Device, Tensor};
use graft_engine::adapters::{BottleneckAdapter, PeftAdapter, bottleneck::AdapterHubFile};
use graft_testenv::{adapterhub_python, repo_root};
use graft_trainer::{
    adapters::Adapters,
    backward::{Batch, StepOptions, sharded_step},
};

mod common;

use common::{dense_model, max_abs};

fn read_bottleneck(dir: &Path) -> BottleneckAdapter {
    let (config, weights) = common::adapter_files(dir);
    match PeftAdapter::from_bytes(&config, &weights, &Device::Cpu).expect("an AdapterHub adapter") {
        PeftAdapter::Bottleneck(adapter) => adapter,
        other => panic!("a bottleneck adapter, not {}", other.peft_type()),
    }
}

/// Runs `tests/oracle/graft_bottleneck_in_adapterhub.py` with `args`; its line goes to
/// stderr, and it must succeed.
fn run_oracle(label: &str, args: &[(&str, &OsStr)], gradients: bool) {
    let mut command = Command::new(adapterhub_python());
    command.arg(repo_root().join("tests/oracle/graft_bottleneck_in_adapterhub.py"));
    for (flag, value) in args {
        command.arg(flag).arg(value);
    }
    if gradients {
        command.arg("--gradients");
    }
    let out = command.output().expect("the oracle runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{label}: {}", stdout.trim());
    assert!(
        out.status.success(),
        "{label}: the library disagrees with Graft:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Fixed rows of token ids within the tiny models' vocabularies (96 and 384).
fn ids() -> Tensor {
    Tensor::new(
        &[
            [5u32, 17, 40, 3, 77, 21, 9, 60],
            [8, 8, 30, 2, 91, 44, 12, 6],
        ],
        &Device::Cpu,
    )
    .expect("ids")
}

#[test]
fn a_bottleneck_adapter_trained_by_graft_gives_graft_logits_in_adapterhub() {
    let model_dir = common::tiny("made");
    for (label, method, sizes) in [
        (
            "houlsby",
            "{quantization: nf4, bottleneck: {placement: houlsby, reductionFactor: 4}}",
            (4, 8),
        ),
        (
            "pfeiffer",
            "{quantization: nf4, bottleneck: {placement: pfeiffer, size: 12, nonLinearity: gelu}}",
            (2, 12),
        ),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let adapter_dir = common::train(dir.path(), &model_dir, method);
        assert!(
            adapter_dir.join("adapter.safetensors").is_file(),
            "AdapterHub's file"
        );
        assert!(
            !adapter_dir.join("adapter_model.safetensors").exists(),
            "not PEFT's"
        );
        let adapter = read_bottleneck(&adapter_dir);
        assert_eq!(
            adapter.modules.len(),
            sizes.0,
            "{label}: two layers' modules"
        );
        for module in adapter.modules.values() {
            assert_eq!(module.size(), sizes.1, "{label}: the width asked for");
        }
        let ids = ids();
        let base = dense_model(&model_dir).forward(&ids).expect("forward");
        let mut model = dense_model(&model_dir);
        model
            .apply(&PeftAdapter::Bottleneck(adapter))
            .expect("fits its base");
        let logits = model.forward(&ids).expect("forward");
        let effect = max_abs(&(&logits - &base).expect("diff"));
        assert!(
            effect > 1e-3,
            "{label}: the adapter moves the logits by only {effect}"
        );
        let reference = dir.path().join("graft-logits.safetensors");
        let tensors = HashMap::from([
            (
                "input_ids".to_owned(),
                ids.to_dtype(DType::I64).expect("i64"),
            ),
            ("logits".to_owned(), logits),
        ]);
        candle_core::safetensors::save(&tensors, &reference).expect("write");
        run_oracle(
            label,
            &[
                ("--model", model_dir.as_os_str()),
                ("--adapter", adapter_dir.as_os_str()),
                ("--reference", reference.as_os_str()),
            ],
            false,
        );
    }
}

#[test]
fn one_steps_bottleneck_gradients_equal_the_librarys() {
    let data = repo_root().join("engine/tests/data/tiny");
    let model_dir = data.join("llama");
    let ids = ids();
    let (rows, seq) = ids.dims2().expect("dims");
    let batch = Batch {
        ids: ids.clone(),
        labels: Tensor::ones((rows, seq), DType::F32, &Device::Cpu).expect("labels"),
        label_tokens: rows * (seq - 1),
        tokens: rows * seq,
        lengths: None,
    };
    for kind in ["houlsby", "pfeiffer"] {
        let adapter_dir = data.join(format!("llama-adapterhub-{kind}"));
        let theirs = read_bottleneck(&adapter_dir);
        let mut model = dense_model(&model_dir);
        let file: AdapterHubFile = theirs.file.clone();
        let adapters = Adapters::attach_bottleneck(&mut model, file, 1).expect("attached");
        adapters
            .load(&PeftAdapter::Bottleneck(theirs.clone()))
            .expect("the library's weights");
        let vars = adapters.vars();
        for (recompute, shards) in [(false, 1), (true, 1), (true, 2)] {
            let options = StepOptions::new(None, recompute);
            #[allow(clippy::cast_precision_loss)]
            let denominator = batch.label_tokens as f64;
            let step =
                sharded_step(shards, &model, &vars, &batch, denominator, options).expect("step");
            let label = format!("{kind} (recompute {recompute}, {shards} shards)");
            let mut tensors = HashMap::from([
                (
                    "input_ids".to_owned(),
                    ids.to_dtype(DType::I64).expect("i64"),
                ),
                (
                    "loss".to_owned(),
                    #[allow(clippy::cast_possible_truncation)]
                    Tensor::new(&[step.loss_sum / denominator as f32], &Device::Cpu).expect("loss"),
                ),
            ]);
            let names = [
                "adapter_down.0.weight",
                "adapter_down.0.bias",
                "adapter_up.weight",
                "adapter_up.bias",
            ];
            let grads = step.grads.iter();
            let modules = adapters.modules.iter().flat_map(|m| names.map(|n| (m, n)));
            for ((module, name), grad) in modules.zip(grads) {
                let location = match module.placement {
                    graft_engine::adapters::Placement::Attention => "attention_adapters",
                    graft_engine::adapters::Placement::Output => "output_adapters",
                };
                let key = format!(
                    "model.layers.{}.{location}.adapters.{}.{name}",
                    module.layer, theirs.file.name
                );
                let grad = grad
                    .clone()
                    .unwrap_or_else(|| panic!("{label}: no gradient for {key}"));
                assert!(
                    max_abs(&grad) > 1e-6,
                    "{label}: {key}'s gradient is worth comparing"
                );
                tensors.insert(key, grad);
            }
            let work = tempfile::tempdir().expect("tempdir");
            let reference = work.path().join("graft-step.safetensors");
            candle_core::safetensors::save(&tensors, &reference).expect("write");
            run_oracle(
                &label,
                &[
                    ("--model", model_dir.as_os_str()),
                    ("--adapter", adapter_dir.as_os_str()),
                    ("--reference", reference.as_os_str()),
                ],
                true,
            );
        }
    }
}
