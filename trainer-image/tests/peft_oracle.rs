//! Parity with the reference implementation: an adapter `graft-trainer train` publishes loads
//! in Hugging Face PEFT and gives, there, the logits Graft's engine gives with it, within 1e-4.
//!
//! The trainer trains on the committed tiny model `engine/tests/data/tiny/made/` (a Hugging
//! Face Llama directory with its tokenizer); the engine computes logits with the adapter
//! applied; `tests/oracle/graft_adapter_in_peft.py` loads the same model with
//! `AutoModelForCausalLM.from_pretrained(dtype=float32)` + `PeftModel.from_pretrained`
//! (PEFT 0.21.2, transformers 5.23, CPU) and compares. The Python is
//! `$GRAFT_ORACLE_PYTHON`, the environment `tests/oracle/venv.sh` makes (tests/run.sh sets it).

use std::{
    collections::HashMap,
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use candle_core::{DType, Device, Tensor, Var};
use graft_engine::{
    adapters::{
        Adapter, AdapterConfig, EncoderKind, Ia3, Ia3Adapter, PeftAdapter, PromptAdapter,
        PromptConfig, PromptMethod, Site, prefix_kv, prepend,
    },
    models::{Checkpoint, Config, Llama, Mode, ModelFiles, Precision, load_weights},
};
use graft_trainer::{
    adapters::{Adapters, Decomposer, PromptStart},
    backward::{Batch, StepOptions, sharded_step},
};

use graft_testenv::{oracle_python, repo_root};

mod common;

use common::{dense_model, max_abs, run_trainer_with, train, train_refused};

fn tiny_model() -> PathBuf {
    repo_root().join("engine/tests/data/tiny/made")
}

/// A tiny model transformers made (`engine/tests/data/tiny/<name>`: Qwen3, Gemma 2 and 3, Phi-3), with the
/// tiny model's tokenizer (the same 384-token vocabulary) beside it, as a checkpoint directory
/// in `dir`.
fn tiny_checkpoint(dir: &Path, name: &str) -> PathBuf {
    let model = dir.join(name);
    std::fs::create_dir_all(&model).expect("model dir");
    let made = repo_root().join("engine/tests/data/tiny").join(name);
    for (from, name) in [
        (&made, "config.json"),
        (&made, "model.safetensors"),
        (&tiny_model(), "tokenizer.json"),
        (&tiny_model(), "tokenizer_config.json"),
        (&tiny_model(), "generation_config.json"),
    ] {
        std::fs::copy(from.join(name), model.join(name)).expect("copy the checkpoint");
    }
    model
}

fn read_adapter(dir: &Path) -> Adapter {
    let (config, weights) = common::adapter_files(dir);
    Adapter::from_bytes(&config, &weights, &Device::Cpu).expect("a PEFT adapter")
}

fn read_ia3(dir: &Path) -> Ia3Adapter {
    let (config, weights) = common::adapter_files(dir);
    match PeftAdapter::from_bytes(&config, &weights, &Device::Cpu).expect("a PEFT adapter") {
        PeftAdapter::Ia3(adapter) => adapter,
        _ => panic!("{} holds no (IA)³ adapter", dir.display()),
    }
}

/// Fixed rows of token ids (the model's vocabulary is 384): no padding, no special meaning.
fn input_ids() -> Tensor {
    let rows: [[u32; 12]; 3] = [
        [0, 17, 250, 3, 99, 383, 42, 42, 7, 128, 64, 300],
        [0, 200, 201, 202, 5, 6, 1, 77, 310, 11, 12, 13],
        [9, 8, 7, 6, 5, 4, 3, 2, 100, 150, 180, 360],
    ];
    Tensor::new(&rows, &Device::Cpu).expect("ids")
}

/// Runs `tests/oracle/<script>` with `args`; its line goes to stderr, and it must succeed.
/// One step on the oracle scripts' fixed batch: the next-token loss's gradients, and the
/// reference file's `input_ids` and `loss` entries the scripts read.
fn one_step(model: &Llama) -> (candle_core::backprop::GradStore, HashMap<String, Tensor>) {
    let ids = Tensor::new(
        &[
            [5u32, 17, 40, 3, 77, 21, 9, 60],
            [8, 8, 30, 2, 91, 44, 12, 6],
        ],
        &Device::Cpu,
    )
    .expect("ids");
    let logits = model.forward(&ids).expect("forward");
    let (batch, seq, vocab) = logits.dims3().expect("dims");
    let predicted = logits
        .narrow(1, 0, seq - 1)
        .and_then(|l| l.reshape((batch * (seq - 1), vocab)));
    let targets = ids.narrow(1, 1, seq - 1).and_then(|t| t.flatten_all());
    let loss =
        candle_nn::loss::cross_entropy(&predicted.expect("logits"), &targets.expect("targets"))
            .expect("loss");
    let grads = loss.backward().expect("backward");
    let tensors = HashMap::from([
        (
            "input_ids".to_owned(),
            ids.to_dtype(DType::I64).expect("i64"),
        ),
        ("loss".to_owned(), loss.reshape(1).expect("loss")),
    ]);
    (grads, tensors)
}

fn run_oracle(label: &str, script: &str, args: &[(&str, &Path)]) {
    let args: Vec<(&str, &OsStr)> = args.iter().map(|(f, p)| (*f, p.as_os_str())).collect();
    run_oracle_with(label, script, &args);
}

/// [`run_oracle`] with any arguments.
fn run_oracle_with(label: &str, script: &str, args: &[(&str, &OsStr)]) {
    let mut command = Command::new(oracle_python());
    command.arg(repo_root().join("tests/oracle").join(script));
    for (flag, value) in args {
        command.arg(flag).arg(value);
    }
    let out = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{label}: {}", stdout.trim());
    assert!(
        out.status.success(),
        "{label}: the oracle disagrees with Graft:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Trains with `method`, computes Graft's logits with the adapter on the dense base, and has
/// PEFT compare its own (the oracle's line, with the largest difference, goes to stderr).
fn graft_and_peft_agree(name: &str, method: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    agree_on(name, dir.path(), &tiny_model(), method);
}

fn agree_on(name: &str, dir: &Path, model_dir: &Path, method: &str) {
    let adapter_dir = train(dir, model_dir, method);
    let adapter = read_adapter(&adapter_dir);
    for ((layer, site), lora) in &adapter.weights {
        let b = max_abs(&lora.b);
        assert!(
            b > 1e-3,
            "B of layer {layer} {} is still ~0 ({b}): training did not move it",
            site.name()
        );
    }

    let ids = input_ids();
    let base = dense_model(model_dir).forward(&ids).expect("forward");
    let mut model = dense_model(model_dir);
    model
        .apply_adapter(&adapter)
        .expect("the adapter fits its base");
    let logits = model.forward(&ids).expect("forward");
    let effect = max_abs(&(&logits - &base).expect("diff"));
    assert!(
        effect > 1e-3,
        "the adapter moves the logits by only {effect}: the comparison would prove nothing"
    );

    peft_gives_graft_logits(name, dir, model_dir, &adapter_dir, &ids, logits);
}

/// Writes Graft's `logits` for `ids` into `work` and has PEFT load `adapter_dir` on
/// `model_dir` and compare its own (the oracle's line, with the largest difference, goes to
/// stderr).
fn peft_gives_graft_logits(
    label: &str,
    work: &Path,
    model_dir: &Path,
    adapter_dir: &Path,
    ids: &Tensor,
    logits: Tensor,
) {
    peft_gives_graft_logits_with(label, work, [model_dir, adapter_dir], ids, logits, &[]);
}

/// [`peft_gives_graft_logits`] with more of the oracle's arguments (`--merged`).
fn peft_gives_graft_logits_with(
    label: &str,
    work: &Path,
    [model_dir, adapter_dir]: [&Path; 2],
    ids: &Tensor,
    logits: Tensor,
    more: &[(&str, &Path)],
) {
    let reference = work.join("graft-logits.safetensors");
    let tensors = HashMap::from([
        (
            "input_ids".to_owned(),
            ids.to_dtype(DType::I64).expect("i64"),
        ),
        ("logits".to_owned(), logits),
    ]);
    candle_core::safetensors::save(&tensors, &reference).expect("write the reference");
    let mut args = vec![
        ("--model", model_dir),
        ("--adapter", adapter_dir),
        ("--reference", reference.as_path()),
    ];
    args.extend_from_slice(more);
    run_oracle(label, "graft_adapter_in_peft.py", &args);
}

/// `output.merged`: the base with the adapter merged in, as a standalone model, gives the
/// base + adapter logits in Graft and, loaded by transformers alone, in transformers.
#[test]
fn a_merged_model_gives_base_plus_adapter_logits_in_graft_and_transformers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let method = "{quantization: nf4, lora: {rank: 4, alpha: 8, dropout: 0.0, targetModules: \
                  [q_proj, v_proj, o_proj, up_proj, down_proj]}}";
    let (out, adapter_dir) = run_trainer_with(dir.path(), &tiny_model(), method, ", merged: true");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    merged_and_peft_agree("merged", dir.path(), &adapter_dir);
}

/// `output.merged` of an (IA)³ run: output vectors scale the weight's rows, feed-forward ones
/// its columns, as PEFT merges them.
#[test]
fn a_merged_ia3_model_gives_base_plus_adapter_logits_in_graft_and_transformers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let method = "{quantization: nf4, ia3: {targetModules: [q_proj, v_proj, up_proj, down_proj], \
                  feedforwardModules: [down_proj]}}";
    let (out, adapter_dir) = run_trainer_with(dir.path(), &tiny_model(), method, ", merged: true");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    merged_and_peft_agree("merged ia3", dir.path(), &adapter_dir);
}

/// The merged model `output.merged` wrote beside the adapter in `adapter_dir` gives Graft's
/// base + adapter logits, in Graft and (loaded by transformers alone) in transformers, and
/// PEFT gives them from the adapter.
fn merged_and_peft_agree(label: &str, dir: &Path, adapter_dir: &Path) {
    let merged_dir = adapter_dir.join("merged");
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(merged_dir.join(file).is_file(), "merged/{file}");
    }
    let (config, weights) = common::adapter_files(adapter_dir);
    let adapter = PeftAdapter::from_bytes(&config, &weights, &Device::Cpu).expect("a PEFT adapter");
    let ids = input_ids();
    let mut with_adapter = dense_model(&tiny_model());
    with_adapter.apply(&adapter).expect("fits");
    let logits = with_adapter.forward(&ids).expect("forward");
    let merged = dense_model(&merged_dir).forward(&ids).expect("forward");
    let base = dense_model(&tiny_model()).forward(&ids).expect("forward");
    let (diff, effect) = (
        max_abs(&(&merged - &logits).expect("diff")),
        max_abs(&(&logits - &base).expect("diff")),
    );
    assert!(
        effect > 1e-3,
        "the adapter moves the logits by only {effect}"
    );
    assert!(
        diff < 1e-4,
        "merged logits differ from base + adapter by {diff}"
    );

    let model_dir = tiny_model();
    peft_gives_graft_logits_with(
        label,
        dir,
        [&model_dir, adapter_dir],
        &ids,
        logits,
        &[("--merged", &merged_dir)],
    );
}

/// A pre-quantized base has no dense weights to merge into: refused before training.
#[test]
fn a_merged_model_of_a_prequantized_base_is_refused_before_training() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), "qwen2-bnb-4bit");
    let (out, adapter_dir) = run_trainer_with(
        dir.path(),
        &model,
        "{quantization: nf4, lora: {rank: 4, alpha: 8}}",
        ", merged: true",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("output.merged") && stderr.contains("pre-quantized"),
        "{stderr}"
    );
    assert!(
        !adapter_dir.join("graft.json").exists(),
        "nothing published"
    );
}

/// One step's gradients: Graft's backward pass through PEFT-made adapters (per-module ranks and
/// alphas on Llama; Phi-3's fused projections and partial rotary; DoRA on Qwen2, whose q/k/v
/// have a bias, and on Phi-3) gives PEFT's gradients for every lora_A, lora_B and DoRA magnitude, within
/// 1e-3 of each tensor's largest entry.
#[test]
fn one_steps_gradients_equal_pefts() {
    for (model_name, adapter_name) in [
        ("llama", "llama-peft-patterns"),
        ("phi3", "phi3-peft"),
        ("qwen2", "qwen2-peft-dora"),
        ("phi3", "phi3-peft-dora"),
    ] {
        let data = repo_root().join("engine/tests/data/tiny");
        let (model_dir, adapter_dir) = (data.join(model_name), data.join(adapter_name));
        let adapter = read_adapter(&adapter_dir);
        let mut model = dense_model(&model_dir);
        let mut vars = Vec::new();
        for (&(layer, site), lora) in &adapter.weights {
            let (a, b) = (
                Var::from_tensor(&lora.a).expect("var"),
                Var::from_tensor(&lora.b).expect("var"),
            );
            let magnitude = lora
                .magnitude
                .as_ref()
                .map(|m| Var::from_tensor(m).expect("var"));
            let pair = graft_engine::adapters::Lora {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                scale: lora.scale,
                magnitude: magnitude.as_ref().map(|m| m.as_tensor().clone()),
            };
            model.set_lora(layer, site, Some(pair));
            vars.push((layer, site, a, b, magnitude));
        }
        let (grads, mut tensors) = one_step(&model);
        for (layer, site, a, b, magnitude) in &vars {
            // Named as PEFT's parameters are (`oracle/peft_gradients.py` drops `.default`).
            let halves = [
                ("A", Some(a)),
                ("B", Some(b)),
                ("magnitude_vector", magnitude.as_ref()),
            ];
            for (half, var) in halves {
                let Some(var) = var else { continue };
                let key = format!(
                    "base_model.model.model.layers.{layer}.{}.lora_{half}.weight",
                    site.path()
                );
                let grad = grads.get(var.as_tensor()).expect("a gradient").clone();
                tensors.insert(key, grad);
            }
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let reference = dir.path().join("graft-gradients.safetensors");
        candle_core::safetensors::save(&tensors, &reference).expect("write");
        run_oracle(
            adapter_name,
            "peft_gradients.py",
            &[
                ("--model", &model_dir),
                ("--adapter", &adapter_dir),
                ("--reference", &reference),
            ],
        );
    }
}

/// `useDora`: trained on the NF4 base with dropout (the magnitudes from the dequantized
/// weights' norms, as PEFT's), published with PEFT's `lora_magnitude_vector`s, and merged
/// (`output.merged`). PEFT computes Graft's logits from the adapter on the dense base, and the
/// merged model gives them too, in Graft and in transformers.
#[test]
fn a_dora_adapter_trained_by_graft_gives_graft_logits_in_peft_and_merged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let method = "{quantization: nf4, lora: {rank: 4, alpha: 8, dropout: 0.1, useDora: true, \
                  targetModules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}}";
    let (out, adapter_dir) = run_trainer_with(dir.path(), &tiny_model(), method, ", merged: true");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let adapter = read_adapter(&adapter_dir);
    assert!(adapter.config.use_dora);
    // The magnitudes start at the norms of the NF4 base's rows, dequantized, and training
    // moves them.
    let nf4 = {
        let text = std::fs::read_to_string(tiny_model().join("config.json")).expect("config");
        let config = Config::from_json(&text).expect("config");
        let vb = load_weights(&tiny_model(), DType::F32, &Device::Cpu).expect("weights");
        Llama::load(&vb, &config, Precision::Nf4).expect("NF4 model")
    };
    for (&(layer, site), lora) in &adapter.weights {
        let magnitude = lora.magnitude.as_ref().expect("a magnitude per module");
        let start = nf4.row_norms(layer, site).expect("norms");
        let moved = max_abs(&(magnitude - &start).expect("diff"));
        assert!(
            moved > 1e-3,
            "the magnitude of layer {layer} {} did not move from the base norms ({moved})",
            site.name()
        );
    }
    merged_and_peft_agree(
        "DoRA (NF4, dropout), applied to the f32 base",
        dir.path(),
        &adapter_dir,
    );
}

/// OLoRA and PiSSA on every projection of the tiny Llama (rank 4, alpha 8: scale 2, which
/// PiSSA divides into its singular values): Graft's start B₀·A₀ and the residual base weight
/// it freezes equal PEFT's `init_lora_weights="olora"` / `"pissa"` within 1e-4 (OLoRA's A and
/// B themselves too), and one step's loss and gradients from that start equal PEFT's
/// (`tests/oracle/peft_init.py`; PiSSA's rank components matched by sign).
#[test]
fn olora_and_pissa_starts_residuals_and_one_steps_gradients_equal_pefts() {
    let model_dir = tiny_model();
    let targets = [
        Site::QProj,
        Site::KProj,
        Site::VProj,
        Site::OProj,
        Site::GateProj,
        Site::UpProj,
        Site::DownProj,
    ];
    for init in ["olora", "pissa"] {
        let config = AdapterConfig {
            init_lora_weights: init.into(),
            ..AdapterConfig::new(4, 8.0, 0.0, false, &targets)
        };
        let base = Checkpoint::open(ModelFiles::Directory(model_dir.clone())).expect("opens");
        let decomposer = Decomposer::new(&config, &targets);
        let mut model = base
            .load_rewritten(
                Precision::Dense,
                DType::F32,
                &Device::Cpu,
                Some(&decomposer),
            )
            .expect("the base loads with its residual");
        let (starts, worst) = decomposer.into_starts();
        assert!(worst <= 1e-9, "{init}: the iteration converged ({worst})");
        let adapters =
            Adapters::attach_decomposed(&mut model, config, starts).expect("adapters attach");
        assert_eq!(adapters.pairs.len(), 2 * targets.len());

        let (grads, mut tensors) = one_step(&model);
        for pair in &adapters.pairs {
            let module = format!(
                "base_model.model.model.layers.{}.{}",
                pair.layer,
                pair.site.path()
            );
            let residual = model
                .frozen_weight(pair.layer, pair.site)
                .expect("a projection")
                .to_dense(&Device::Cpu, DType::F32)
                .expect("dense");
            tensors.insert(format!("{module}.residual"), residual);
            for (half, var) in [("A", &pair.a), ("B", &pair.b)] {
                let grad = grads.get(var.as_tensor()).expect("a gradient").clone();
                tensors.insert(
                    format!("{module}.lora_{half}.weight"),
                    var.as_tensor().clone(),
                );
                tensors.insert(format!("{module}.lora_{half}.grad"), grad);
            }
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let reference = dir.path().join("graft-init.safetensors");
        candle_core::safetensors::save(&tensors, &reference).expect("write");
        let names = targets.map(Site::name).join(",");
        run_oracle_with(
            init,
            "peft_init.py",
            &[
                ("--model", model_dir.as_os_str()),
                ("--init", OsStr::new(init)),
                ("--rank", OsStr::new("4")),
                ("--alpha", OsStr::new("8")),
                ("--targets", OsStr::new(&names)),
                ("--reference", reference.as_os_str()),
            ],
        );
    }
}

/// `init: olora` (f32 base, rank and alpha patterns) and `init: pissa` (QLoRA, rsLoRA): trained
/// on the residual base, published as PEFT's weight conversion publishes (a plain LoRA of rank
/// 2r, alphas doubled, ×√2 with rsLoRA), which PEFT loads on the unmodified base to Graft's
/// logits.
#[test]
fn olora_and_pissa_adapters_trained_by_graft_give_graft_logits_in_peft_on_the_original_base() {
    for (init, method, alpha) in [
        (
            "olora",
            "{quantization: none, lora: {rank: 4, alpha: 8, dropout: 0.0, init: olora, \
             targetModules: [q_proj, v_proj, down_proj], rankPattern: {q_proj: 2}, \
             alphaPattern: {v_proj: 2}}}",
            16.0,
        ),
        (
            "pissa",
            "{quantization: nf4, lora: {rank: 4, alpha: 8, dropout: 0.05, init: pissa, \
             useRslora: true, targetModules: [q_proj, k_proj, v_proj, o_proj, gate_proj, \
             up_proj, down_proj]}}",
            8.0 * std::f64::consts::SQRT_2,
        ),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        agree_on(
            &format!("{init}, published for the original base"),
            dir.path(),
            &tiny_model(),
            method,
        );
        let adapter = read_adapter(&dir.path().join("adapter"));
        assert_eq!(adapter.config.r, 8, "{init}: rank 2r");
        assert_eq!(adapter.config.init_lora_weights, serde_json::json!(true));
        assert!((adapter.config.lora_alpha - alpha).abs() < 1e-9, "{init}");
        for (&(layer, site), lora) in &adapter.weights {
            let rank = lora.rank().expect("rank");
            let expected = if init == "olora" && site == Site::QProj {
                4
            } else {
                8
            };
            assert_eq!(rank, expected, "{init}: {} of layer {layer}", site.name());
        }
    }
}

#[test]
fn a_lora_adapter_trained_by_graft_gives_graft_logits_in_peft() {
    graft_and_peft_agree(
        "LoRA on the f32 base",
        "{quantization: none, lora: {rank: 4, alpha: 8, dropout: 0.0, targetModules: \
         [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}}",
    );
}

/// The adapter is trained against the NF4-quantized base, but PEFT loads it on the f32 base,
/// as users load a QLoRA adapter for inference; so Graft's logits here are computed on the
/// dense base too (`Precision::Dense`), and the comparison is of the adapter's files, config
/// (rsLoRA scaling included) and placement, not of NF4.
#[test]
fn a_qlora_adapter_trained_on_nf4_gives_graft_logits_in_peft_on_the_dense_base() {
    graft_and_peft_agree(
        "QLoRA (NF4), applied to the f32 base",
        "{quantization: nf4, lora: {rank: 8, alpha: 16, dropout: 0.05, useRslora: true, \
         targetModules: [q_proj, v_proj, o_proj, up_proj, down_proj]}}",
    );
}

/// `rankPattern` / `alphaPattern`: the published adapter has each module's own rank, its
/// adapter_config.json PEFT's patterns, and PEFT computes Graft's logits from it.
#[test]
fn an_adapter_trained_with_rank_and_alpha_patterns_gives_graft_logits_in_peft() {
    let dir = tempfile::tempdir().expect("tempdir");
    let method = "{quantization: none, lora: {rank: 4, alpha: 8, dropout: 0.0, targetModules: \
                  [q_proj, v_proj, down_proj], rankPattern: {q_proj: 8, 'layers\\.1\\..*down_proj': 2}, \
                  alphaPattern: {v_proj: 2}}}";
    agree_on(
        "LoRA with rank and alpha patterns",
        dir.path(),
        &tiny_model(),
        method,
    );
    let adapter = read_adapter(&dir.path().join("adapter"));
    let rank = |layer, site| adapter.weights[&(layer, site)].rank().expect("rank");
    assert_eq!(
        (rank(0, Site::QProj), rank(0, Site::VProj)),
        (8, 4),
        "q_proj's pattern"
    );
    assert_eq!(
        (rank(0, Site::DownProj), rank(1, Site::DownProj)),
        (4, 2),
        "layer 1's pattern"
    );
    assert!((adapter.weights[&(0, Site::VProj)].scale - 0.5).abs() < 1e-12);
}

#[test]
fn qlora_adapters_trained_on_qwen3_gemmas_and_phi3_give_graft_logits_in_peft() {
    let separate = "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]";
    let fused = "[qkv_proj, o_proj, gate_up_proj, down_proj]";
    for (name, targets) in [
        ("qwen3", separate),
        ("gemma3", separate),
        ("gemma2", separate),
        ("phi3", fused),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = tiny_checkpoint(dir.path(), name);
        agree_on(
            &format!("QLoRA on {name}, applied to the f32 base"),
            dir.path(),
            &model,
            &format!(
                "{{quantization: nf4, lora: {{rank: 4, alpha: 8, dropout: 0.05, targetModules: \
                 {targets}}}}}"
            ),
        );
    }
}

/// DoRA on a GGUF base is refused by name before anything is read (the schema refuses a
/// `.gguf` URI at apply; the trainer refuses a GGUF file however it got there).
#[test]
fn dora_on_a_gguf_base_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("model.Q4_1.gguf");
    std::fs::write(&model, b"GGUF").expect("a file");
    let (code, message) = train_refused(
        dir.path(),
        &model,
        "{quantization: nf4, lora: {rank: 4, alpha: 8, useDora: true}}",
    );
    assert_eq!(code, 2, "{message}");
    assert!(
        message.contains("useDora") && message.contains("GGUF"),
        "{message}"
    );
}

/// A Phi-3 model has no separate q/k/v (PEFT would find no such module either): targeting
/// them is refused by name, listing the projections it has.
#[test]
fn separate_targets_on_a_fused_model_are_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), "phi3");
    let (code, message) = train_refused(
        dir.path(),
        &model,
        "{quantization: none, lora: {rank: 4, alpha: 8, targetModules: [q_proj, v_proj]}}",
    );
    assert_eq!(code, 2, "{message}");
    assert!(
        message.contains("q_proj") && message.contains("qkv_proj"),
        "{message}"
    );
}

/// (IA)³ (`method.ia3`): trained on the NF4 base with PEFT's default modules for Llama (k/v
/// scaled at the output, `down_proj` at the input), and on the dense base on all seven
/// projections with `up_proj` and `down_proj` feed-forward; published in PEFT's format, PEFT
/// computes Graft's logits from it on the dense base, within 1e-4.
#[test]
fn an_ia3_adapter_trained_by_graft_gives_graft_logits_in_peft() {
    for (label, method, vectors) in [
        ("ia3 nf4", "{quantization: nf4, ia3: {}}", 3),
        (
            "ia3 dense",
            "{quantization: none, ia3: {targetModules: [q_proj, k_proj, v_proj, o_proj, \
             gate_proj, up_proj, down_proj], feedforwardModules: [up_proj, down_proj]}}",
            7,
        ),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let adapter_dir = train(dir.path(), &tiny_model(), method);
        let adapter = read_ia3(&adapter_dir);
        assert_eq!(adapter.vectors.len(), 2 * vectors, "{label}: two layers");
        for ((layer, site), ia3) in &adapter.vectors {
            let moved = max_abs(&(ia3.vector.clone() - 1.0).expect("diff"));
            assert!(
                moved > 1e-3,
                "{label}: the vector of layer {layer} {} is still ~1 ({moved})",
                site.name()
            );
        }
        let ids = input_ids();
        let base = dense_model(&tiny_model()).forward(&ids).expect("forward");
        let mut model = dense_model(&tiny_model());
        model.apply_ia3(&adapter).expect("fits its base");
        let logits = model.forward(&ids).expect("forward");
        let effect = max_abs(&(&logits - &base).expect("diff"));
        assert!(
            effect > 1e-3,
            "{label}: the adapter moves the logits by {effect}"
        );
        let model_dir = tiny_model();
        peft_gives_graft_logits(label, dir.path(), &model_dir, &adapter_dir, &ids, logits);
    }
}

/// One step's gradients of PEFT-made (IA)³ adapters (Llama's defaults; Qwen2 with biased
/// q/k/v and two feed-forward modules) through Graft's backward pass equal PEFT's, within
/// 1e-3 of each tensor's largest entry.
#[test]
fn one_steps_ia3_gradients_equal_pefts() {
    for (model_name, adapter_name) in [("llama", "llama-peft-ia3"), ("qwen2", "qwen2-peft-ia3")] {
        let data = repo_root().join("engine/tests/data/tiny");
        let (model_dir, adapter_dir) = (data.join(model_name), data.join(adapter_name));
        let adapter = read_ia3(&adapter_dir);
        let mut model = dense_model(&model_dir);
        let mut vars = Vec::new();
        for (&(layer, site), ia3) in &adapter.vectors {
            let var = Var::from_tensor(&ia3.vector).expect("var");
            let vector = Ia3 {
                vector: var.as_tensor().clone(),
                feedforward: ia3.feedforward,
            };
            model.set_ia3(layer, site, Some(vector));
            vars.push((layer, site, var, ia3.feedforward));
        }
        let (grads, mut tensors) = one_step(&model);
        for (layer, site, var, feedforward) in &vars {
            let grad = grads.get(var.as_tensor()).expect("a gradient");
            let len = grad.elem_count();
            // PEFT's parameter's own shape: `[1, in]` feed-forward, `[out, 1]` otherwise.
            let shape = if *feedforward { (1, len) } else { (len, 1) };
            let key = format!(
                "base_model.model.model.layers.{layer}.{}.ia3_l",
                site.path()
            );
            tensors.insert(key, grad.reshape(shape).expect("shape"));
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let reference = dir.path().join("graft-gradients.safetensors");
        candle_core::safetensors::save(&tensors, &reference).expect("write");
        run_oracle(
            adapter_name,
            "peft_gradients.py",
            &[
                ("--model", &model_dir),
                ("--adapter", &adapter_dir),
                ("--reference", &reference),
            ],
        );
    }
}

fn read_prompt(dir: &Path) -> PromptAdapter {
    let (config, weights) = common::adapter_files(dir);
    PromptAdapter::from_bytes(&config, &weights, &Device::Cpu).expect("a PEFT adapter")
}

/// The logits of `ids`' positions with `prompt`'s virtual tokens before them.
fn prompted_logits(model: &Llama, prompt: &Tensor, ids: &Tensor) -> Tensor {
    let h = prepend(prompt, &model.embed(ids).expect("embed")).expect("prepend");
    let logits = model.forward_embeddings(h).expect("forward");
    let seq = ids.dim(1).expect("seq");
    logits
        .narrow(1, prompt.dim(0).expect("virtual"), seq)
        .expect("the input's rows")
}

/// The logits of `ids`' positions behind prefix tuning's keys and values `rows`
/// `[n, layers · 2 · kv_width]`, through the trainer's evaluation path.
fn prefixed_logits(model: &Llama, rows: &Tensor, ids: &Tensor) -> Tensor {
    let n = rows.dim(0).expect("virtual");
    let embedded = model.embed(ids).expect("embed");
    let hidden = embedded.dim(2).expect("hidden");
    let placeholders = Tensor::zeros((n, hidden), DType::F32, &Device::Cpu).expect("zeros");
    let mut h = prepend(&placeholders, &embedded).expect("prepend");
    let positions = model
        .positions(h.dim(1).expect("seq"), &Device::Cpu)
        .expect("positions");
    for layer in 0..model.num_layers() {
        let [k, v] = prefix_kv(rows, model.num_layers(), layer).expect("layer's prefix");
        h = model
            .layer_with_prefix(layer, &h, &positions, Mode::Eval, Some([&k, &v]))
            .expect("layer");
    }
    let seq = ids.dim(1).expect("seq");
    model
        .head(&h.narrow(1, n, seq).expect("the input's rows"))
        .expect("head")
}

/// Prompt tuning (random and text starts), P-tuning (MLP and LSTM encoders) and prefix tuning
/// (a table, and the reparameterisation MLP) trained by `graft-trainer train` publish adapters
/// PEFT loads to Graft's logits; training moved a text start away from its text's embeddings.
#[test]
fn prompt_learning_adapters_trained_by_graft_give_graft_logits_in_peft() {
    let model_dir = tiny_model();
    let model = dense_model(&model_dir);
    let tokenizer = graft_engine::text::tokenizer::Tokenizer::from_dir(&model_dir).expect("tok");
    let ids = input_ids();
    let base = model.forward(&ids).expect("forward");
    for (name, method, peft_type) in [
        (
            "random",
            "{promptTuning: {numVirtualTokens: 6}}",
            "PROMPT_TUNING",
        ),
        (
            "text",
            "{promptTuning: {numVirtualTokens: 5, init: text, initText: 'Name an animal'}}",
            "PROMPT_TUNING",
        ),
        (
            "mlp",
            "{pTuning: {numVirtualTokens: 4, encoderHiddenSize: 16}}",
            "P_TUNING",
        ),
        (
            "lstm",
            "{pTuning: {numVirtualTokens: 3, encoder: lstm, encoderHiddenSize: 8}}",
            "P_TUNING",
        ),
        (
            "prefix",
            "{prefixTuning: {numVirtualTokens: 4}}",
            "PREFIX_TUNING",
        ),
        (
            "prefix-mlp",
            "{prefixTuning: {numVirtualTokens: 3, prefixProjection: true, encoderHiddenSize: 16}}",
            "PREFIX_TUNING",
        ),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let adapter_dir = train(dir.path(), &model_dir, method);
        let adapter = read_prompt(&adapter_dir);
        assert_eq!(adapter.config.peft_type, peft_type, "{name}");
        if name == "text" {
            let text_ids = tokenizer.encode("Name an animal", true).expect("encode");
            let start = graft_engine::adapters::text_init_ids(&text_ids, 5).expect("ids");
            let start = Tensor::new(start.as_slice(), &Device::Cpu).expect("ids");
            let start = model
                .embed(&start.unsqueeze(0).expect("row"))
                .and_then(|t| t.squeeze(0))
                .expect("embed");
            let moved = max_abs(&(&adapter.embeddings - &start).expect("diff"));
            assert!(
                moved > 1e-3,
                "{name}: training moved the table by only {moved}"
            );
            assert_eq!(
                adapter.config.prompt_tuning_init_text.as_deref(),
                Some("Name an animal")
            );
        }
        let logits = if peft_type == "PREFIX_TUNING" {
            assert_eq!(
                adapter.config.prefix_projection,
                Some(name == "prefix-mlp"),
                "{name}"
            );
            prefixed_logits(&model, &adapter.embeddings, &ids)
        } else {
            prompted_logits(&model, &adapter.embeddings, &ids)
        };
        let effect = max_abs(&(&logits - &base).expect("diff"));
        assert!(
            effect > 1e-3,
            "{name}: the virtual tokens move the logits by only {effect}"
        );
        peft_gives_graft_logits(name, dir.path(), &model_dir, &adapter_dir, &ids, logits);
    }
}

/// A trainer's virtual tokens holding the PEFT-made adapter in `dir`: its table, or (with an
/// `encoder`) the encoder parameters PEFT saved beside it.
fn pefts_prompt_adapters(model: &Llama, dir: &Path, encoder: Option<EncoderKind>) -> Adapters {
    let adapter = read_prompt(dir);
    let size = adapter.config.encoder_hidden_size.unwrap_or_default();
    let adapters = Adapters::attach_prompt(
        model,
        adapter.config.clone(),
        &PromptStart::Random,
        encoder.map(|kind| (kind, size)),
        1,
    )
    .expect("attach");
    if encoder.is_some() {
        let params = candle_core::safetensors::load(dir.join("encoder.safetensors"), &Device::Cpu)
            .expect("PEFT's encoder");
        let prompt = adapters.prompt.as_ref().expect("virtual tokens");
        prompt.load(&params).expect("PEFT's encoder");
    } else {
        adapters
            .load(&PeftAdapter::Prompt(adapter))
            .expect("PEFT's table");
    }
    adapters
}

/// A prefix-tuning run's fresh reparameterisation MLP (`virtual` tokens, hidden size
/// `hidden`) written as the oracle reads it: PEFT's adapter files of its output, and its
/// parameters beside them (`encoder.safetensors`, by PEFT's names).
fn fresh_prefix_projection(model: &Llama, dir: &Path, virtual_tokens: usize, hidden: usize) {
    let config = PromptConfig {
        prefix_projection: Some(true),
        encoder_hidden_size: Some(hidden),
        ..PromptConfig::for_model(PromptMethod::PrefixTuning, virtual_tokens, model.config())
    };
    let encoder = Some((EncoderKind::PrefixMlp, hidden));
    let adapters = Adapters::attach_prompt(model, config.clone(), &PromptStart::Random, encoder, 7)
        .expect("attach");
    let prompt = adapters.prompt.as_ref().expect("virtual tokens");
    let embeddings = prompt.embeddings().expect("the MLP's output");
    let (config, weights) = PromptAdapter { config, embeddings }
        .to_bytes()
        .expect("PEFT's files");
    std::fs::create_dir_all(dir).expect("dir");
    std::fs::write(dir.join("adapter_config.json"), config).expect("config");
    std::fs::write(dir.join("adapter_model.safetensors"), weights).expect("weights");
    candle_core::safetensors::save(
        &prompt.snapshot().expect("parameters"),
        dir.join("encoder.safetensors"),
    )
    .expect("encoder");
}

/// Two rows of tokens, every one learned, and their ids written for the oracle into `work`.
fn learned_batch(work: &Path) -> (Batch, PathBuf) {
    let ids = Tensor::new(
        &[
            [5u32, 17, 40, 3, 77, 21, 9, 60],
            [8, 8, 30, 2, 91, 44, 12, 6],
        ],
        &Device::Cpu,
    )
    .expect("ids");
    let (rows, seq) = ids.dims2().expect("dims");
    let ids_file = work.join("ids.safetensors");
    let saved = HashMap::from([(
        "input_ids".to_owned(),
        ids.to_dtype(DType::I64).expect("i64"),
    )]);
    candle_core::safetensors::save(&saved, &ids_file).expect("ids");
    let batch = Batch {
        ids,
        labels: Tensor::ones((rows, seq), DType::F32, &Device::Cpu).expect("labels"),
        label_tokens: rows * (seq - 1),
        tokens: rows * seq,
        lengths: None,
    };
    (batch, ids_file)
}

/// One step of prompt tuning, P-tuning (MLP, LSTM) and prefix tuning (a table, and the
/// reparameterisation MLP) through the trainer's micro-step, whole-graph and recomputed, one
/// shard and two: the loss and every parameter's gradient are PEFT's
/// (`tests/oracle/peft_prompt_gradients.py`), within 1e-3 of each tensor's largest entry. The
/// adapters are PEFT-made, but for the prefix MLP's, which PEFT does not save: the trainer
/// draws it, and PEFT loads its parameters by PEFT's own names and shapes.
#[test]
fn one_prompt_learning_steps_gradients_equal_pefts() {
    let data = repo_root().join("engine/tests/data/tiny");
    let model_dir = data.join("llama");
    let model = dense_model(&model_dir);
    let work = tempfile::tempdir().expect("tempdir");
    let (batch, ids_file) = learned_batch(work.path());
    let (rows, seq) = batch.ids.dims2().expect("dims");
    let projection_dir = work.path().join("llama-prefix-projection");
    fresh_prefix_projection(&model, &projection_dir, 3, 8);
    for (adapter_name, encoder) in [
        ("llama-peft-prompt", None),
        ("llama-peft-ptuning-mlp", Some(EncoderKind::Mlp)),
        ("llama-peft-ptuning-lstm", Some(EncoderKind::Lstm)),
        ("llama-peft-prefix", None),
        ("llama-prefix-projection", Some(EncoderKind::PrefixMlp)),
    ] {
        let adapter_dir = if encoder == Some(EncoderKind::PrefixMlp) {
            projection_dir.clone()
        } else {
            data.join(adapter_name)
        };
        let adapters = pefts_prompt_adapters(&model, &adapter_dir, encoder);
        let prompt = adapters.prompt.as_ref().expect("virtual tokens");
        let out_file = work.path().join(format!("{adapter_name}.safetensors"));
        run_oracle_with(
            adapter_name,
            "peft_prompt_gradients.py",
            &[
                ("--model", model_dir.as_os_str()),
                ("--adapter", adapter_dir.as_os_str()),
                ("--ids", ids_file.as_os_str()),
                ("--out", out_file.as_os_str()),
            ],
        );
        let peft = candle_core::safetensors::load(&out_file, &Device::Cpu).expect("PEFT's step");
        let vars = adapters.vars();
        let made = prompt.embeddings().expect("embeddings");
        let virtual_tokens = adapters.virtual_tokens_of(&made);
        let denominator = batch.scored_tokens(Some(virtual_tokens)).expect("tokens");
        let prefix = adapter_name.contains("prefix");
        // Behind virtual tokens' embeddings PEFT scores every input token; behind a prefix,
        // all but the first, as without one.
        let scored = if prefix { rows * (seq - 1) } else { rows * seq };
        assert_eq!(
            denominator, scored,
            "{adapter_name}: the tokens PEFT scores"
        );
        for (recompute, shards) in [(false, 1), (true, 1), (true, 2)] {
            let options = StepOptions {
                dropout: None,
                recompute,
                prompt: Some(virtual_tokens),
            };
            #[allow(clippy::cast_precision_loss)]
            let step = sharded_step(shards, &model, &vars, &batch, denominator as f64, options)
                .expect("step");
            let label = format!("{adapter_name} (recompute {recompute}, {shards} shards)");
            #[allow(clippy::cast_precision_loss)]
            let loss = step.loss_sum / denominator as f32;
            let peft_loss = peft["loss"].to_scalar::<f32>().expect("loss");
            assert!(
                (loss - peft_loss).abs() < 1e-5,
                "{label}: loss {loss} vs PEFT's {peft_loss}"
            );
            for ((name, _), grad) in prompt.params.iter().zip(&step.grads) {
                let key = if encoder.is_some() {
                    format!("grad.{name}")
                } else {
                    "grad".to_owned()
                };
                let expected = &peft[&key];
                let grad = grad
                    .as_ref()
                    .unwrap_or_else(|| panic!("{label}: no gradient for {name}"));
                let scale = max_abs(expected);
                let diff = max_abs(&(grad - expected).expect("diff"));
                eprintln!("{label}: {name} differs by {diff:.3e} (largest {scale:.3e})");
                assert!(
                    scale > 1e-6,
                    "{label}: {name}'s gradient is worth comparing"
                );
                assert!(diff <= 1e-3 * scale, "{label}: {name} differs by {diff}");
            }
        }
    }
}
