//! Prompt-learning adapters in Hugging Face PEFT's format: those PEFT 0.21.2 made (prompt
//! tuning; P-tuning with an MLP and an LSTM encoder, saved as the encoder's output) for the
//! tiny Llama and Gemma 3 load in Graft and give PEFT's logits on the input's positions
//! (written by `tests/oracle/peft_prompt.py`); what Graft writes PEFT reads to Graft's logits
//! (`tests/oracle/graft_adapter_in_peft.py`, live, with `$GRAFT_ORACLE_PYTHON`); and one
//! step's gradient of the virtual tokens' embeddings is PEFT's
//! (`tests/oracle/peft_prompt_gradients.py`, live); Graft's P-tuning encoders (MLP, LSTM) turn
//! PEFT's encoder parameters into the embeddings PEFT saved.

mod common;

use std::process::{Command, Stdio};

use candle_core::{DType, Device, Tensor, Var};
use common::{max_abs_diff, model, reference, tiny};
use graft_engine::{
    adapters::{EncoderKind, PromptAdapter, PromptConfig, PromptEncoder, prepend, text_init_ids},
    models::{Llama, Precision},
    text::tokenizer::Tokenizer,
};

fn prompt_files(dir: &str) -> (Vec<u8>, Vec<u8>) {
    let dir = tiny(dir);
    (
        std::fs::read(dir.join("adapter_config.json")).expect("config"),
        std::fs::read(dir.join("adapter_model.safetensors")).expect("weights"),
    )
}

/// The logits of the input's positions with the adapter's virtual tokens before them.
fn prompted_logits(model: &Llama, adapter: &PromptAdapter, ids: &Tensor) -> Tensor {
    let h = prepend(&adapter.embeddings, &model.embed(ids).expect("embed")).expect("prepend");
    let logits = model.forward_embeddings(h).expect("forward");
    let seq = ids.dim(1).expect("seq");
    logits
        .narrow(1, adapter.num_virtual_tokens(), seq)
        .expect("the input's rows")
}

#[test]
fn peft_prompt_tuning_and_p_tuning_adapters_give_pefts_logits_within_1e_4() {
    for (name, method) in [
        ("llama", "prompt"),
        ("llama", "ptuning-mlp"),
        ("llama", "ptuning-lstm"),
        ("gemma3", "prompt"),
    ] {
        let dir = format!("{name}-peft-{method}");
        let (config, weights) = prompt_files(&dir);
        let adapter = PromptAdapter::from_bytes(&config, &weights, &Device::Cpu)
            .expect("PEFT's adapter loads");
        let model = model(name, Precision::Dense);
        adapter
            .check_fits(model.config().hidden_size, 256)
            .expect("fits the model");
        let (ids, expected) = reference(&tiny(&dir));
        let diff = max_abs_diff(&prompted_logits(&model, &adapter, &ids), &expected);
        eprintln!("{dir}: max abs diff {diff:.3e}");
        assert!(diff < 1e-4, "{dir}: logits differ by {diff}");
        let plain = model.forward(&ids).expect("forward");
        assert!(
            max_abs_diff(&plain, &expected) > 1e-2,
            "{dir}: the virtual tokens matter"
        );
    }
}

/// A prompt-tuning adapter Graft writes (random embeddings, as a trained one would be) is read
/// by PEFT's `PeftModel.from_pretrained`, whose logits on the input's positions are Graft's.
#[test]
fn a_prompt_adapter_graft_writes_gives_graft_logits_in_peft() {
    let python = oracle_python();
    let (json, _) = prompt_files("llama-peft-prompt");
    let template: PromptConfig = serde_json::from_slice(&json).expect("config");
    let model = model("llama", Precision::Dense);
    for (peft_type, virtual_tokens) in [("PROMPT_TUNING", 7), ("P_TUNING", 2)] {
        let config = PromptConfig {
            peft_type: peft_type.to_owned(),
            num_virtual_tokens: virtual_tokens,
            base_model_name_or_path: None,
            prompt_tuning_init: None,
            encoder_reparameterization_type: (peft_type == "P_TUNING").then(|| "MLP".to_owned()),
            encoder_hidden_size: (peft_type == "P_TUNING").then_some(24),
            ..template.clone()
        };
        let embeddings =
            Tensor::randn(0f32, 1.0, (virtual_tokens, 64), &Device::Cpu).expect("embeddings");
        let adapter = PromptAdapter { config, embeddings };
        let dir = tempfile::tempdir().expect("tempdir");
        let (config, weights) = adapter.to_bytes().expect("files");
        std::fs::write(dir.path().join("adapter_config.json"), config).expect("write");
        std::fs::write(dir.path().join("adapter_model.safetensors"), weights).expect("write");
        let ids = Tensor::new(
            &[[3u32, 17, 40, 9, 81, 2], [5, 5, 60, 1, 0, 33]],
            &Device::Cpu,
        )
        .expect("ids");
        let logits = prompted_logits(&model, &adapter, &ids);
        let reference = dir.path().join("reference.safetensors");
        candle_core::safetensors::save(
            &std::collections::HashMap::from([
                (
                    "input_ids".to_owned(),
                    ids.to_dtype(DType::I64).expect("i64"),
                ),
                (
                    "logits".to_owned(),
                    logits.contiguous().expect("contiguous"),
                ),
            ]),
            &reference,
        )
        .expect("reference");
        let out = Command::new(&python)
            .arg(oracle_script("graft_adapter_in_peft.py"))
            .arg("--model")
            .arg(tiny("llama"))
            .arg("--adapter")
            .arg(dir.path())
            .arg("--reference")
            .arg(&reference)
            .stdin(Stdio::null())
            .output()
            .expect("running the oracle");
        let stdout = String::from_utf8_lossy(&out.stdout);
        eprintln!("{peft_type}: {}", stdout.trim());
        assert!(
            out.status.success(),
            "{peft_type}: PEFT disagrees with Graft:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn oracle_python() -> std::ffi::OsString {
    std::env::var_os("GRAFT_ORACLE_PYTHON").unwrap_or_else(|| {
        panic!(
            "GRAFT_ORACLE_PYTHON is not set: run `export GRAFT_ORACLE_PYTHON=$(bash \
             tests/oracle/venv.sh)` (tests/run.sh does this)"
        )
    })
}

fn oracle_script(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/oracle")
        .join(name)
}

/// PEFT's causal-LM loss with the adapter's virtual tokens: the last virtual token's logits
/// score the first input token, each input token's the next; the mean over input tokens.
fn prompted_loss(model: &Llama, prompt: &Tensor, ids: &Tensor) -> Tensor {
    let (batch, seq) = ids.dims2().expect("ids");
    let virtual_tokens = prompt.dim(0).expect("prompt");
    let h = prepend(prompt, &model.embed(ids).expect("embed")).expect("prepend");
    let logits = model.forward_embeddings(h).expect("forward");
    let scoring = logits
        .narrow(1, virtual_tokens - 1, seq)
        .expect("rows that score the input")
        .reshape((batch * seq, ()))
        .expect("flat");
    let log_probs = candle_nn::ops::log_softmax(&scoring, 1).expect("log_softmax");
    let picked = log_probs
        .gather(
            &ids.flatten_all().expect("flat").unsqueeze(1).expect("col"),
            1,
        )
        .expect("gather");
    (picked.mean_all().expect("mean") * -1.0).expect("negate")
}

/// One step of prompt tuning on PEFT's own adapter: Graft's loss and the gradient of the
/// virtual tokens' embeddings are PEFT's.
#[test]
fn one_prompt_tuning_steps_gradient_is_pefts() {
    let python = oracle_python();
    let dir = tiny("llama-peft-prompt");
    let (config, weights) = prompt_files("llama-peft-prompt");
    let adapter = PromptAdapter::from_bytes(&config, &weights, &Device::Cpu).expect("adapter");
    let model = model("llama", Precision::Dense);
    let (ids, _) = reference(&dir);
    let work = tempfile::tempdir().expect("tempdir");
    let ids_file = work.path().join("ids.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([(
            "input_ids".to_owned(),
            ids.to_dtype(DType::I64).expect("i64"),
        )]),
        &ids_file,
    )
    .expect("ids");
    let out_file = work.path().join("out.safetensors");
    let out = Command::new(&python)
        .arg(oracle_script("peft_prompt_gradients.py"))
        .args(["--model".as_ref(), tiny("llama").as_os_str()])
        .args(["--adapter".as_ref(), dir.as_os_str()])
        .args(["--ids".as_ref(), ids_file.as_os_str()])
        .args(["--out".as_ref(), out_file.as_os_str()])
        .stdin(Stdio::null())
        .output()
        .expect("running the oracle");
    assert!(
        out.status.success(),
        "the oracle failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let peft = candle_core::safetensors::load(&out_file, &Device::Cpu).expect("PEFT's step");

    let prompt = Var::from_tensor(&adapter.embeddings).expect("var");
    let loss = prompted_loss(&model, prompt.as_tensor(), &ids);
    let grads = loss.backward().expect("backward");
    let grad = grads
        .get(prompt.as_tensor())
        .expect("the prompt gets a gradient");
    let loss_diff = max_abs_diff(&loss, &peft["loss"]);
    let grad_diff = max_abs_diff(grad, &peft["grad"]);
    let scale = peft["grad"]
        .abs()
        .and_then(|g| g.max_all())
        .and_then(|g| g.to_scalar::<f32>())
        .expect("scale");
    eprintln!("loss diff {loss_diff:.3e}, gradient diff {grad_diff:.3e} (largest {scale:.3e})");
    assert!(loss_diff < 1e-5, "loss differs by {loss_diff}");
    assert!(scale > 1e-4, "a gradient worth comparing");
    assert!(grad_diff < 1e-5, "gradient differs by {grad_diff}");
}

/// PEFT's P-tuning encoders (their parameters, saved beside the adapter by
/// `tests/oracle/peft_prompt.py`) give, through Graft's MLP and LSTM, the `prompt_embeddings`
/// PEFT saved; every parameter gets a gradient.
#[test]
fn graft_p_tuning_encoders_give_pefts_saved_embeddings() {
    for (kind, method) in [
        (EncoderKind::Mlp, "ptuning-mlp"),
        (EncoderKind::Lstm, "ptuning-lstm"),
    ] {
        let dir = tiny(&format!("llama-peft-{method}"));
        let params = candle_core::safetensors::load(dir.join("encoder.safetensors"), &Device::Cpu)
            .expect("PEFT's encoder");
        let (config, _) = prompt_files(&format!("llama-peft-{method}"));
        let config: PromptConfig = serde_json::from_slice(&config).expect("config");
        // The shapes a trainer draws a fresh encoder in are PEFT's modules'.
        let hidden = config.encoder_hidden_size.expect("hidden size");
        for (name, shape) in PromptEncoder::param_shapes(
            kind,
            config.num_virtual_tokens,
            (config.token_dim, hidden, config.token_dim),
        ) {
            assert_eq!(params[&name].dims(), shape.as_slice(), "{method}: {name}");
        }
        let vars: std::collections::HashMap<String, Var> = params
            .into_iter()
            .map(|(name, t)| (name, Var::from_tensor(&t).expect("var")))
            .collect();
        let encoder = PromptEncoder::new(
            kind,
            vars.iter()
                .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                .collect(),
        )
        .expect("PEFT's parameter names");
        let output = encoder.forward().expect("forward");
        let (config, weights) = prompt_files(&format!("llama-peft-{method}"));
        let saved = PromptAdapter::from_bytes(&config, &weights, &Device::Cpu).expect("adapter");
        let diff = max_abs_diff(&output, &saved.embeddings);
        eprintln!("{method}: encoder output differs from PEFT's saved by {diff:.3e}");
        assert!(diff < 1e-5, "{method}: {diff}");
        let grads = output
            .sqr()
            .expect("sqr")
            .sum_all()
            .expect("sum")
            .backward()
            .expect("backward");
        for (name, var) in &vars {
            assert!(
                grads.get(var.as_tensor()).is_some(),
                "{method}: no gradient for {name}"
            );
        }
    }
}

/// PEFT's `TEXT` init (an untrained adapter PEFT saved, `tests/oracle/peft_prompt.py`): the
/// init text tokenized by Graft, repeated to the virtual tokens and embedded by Graft's model,
/// is PEFT's starting table.
#[test]
fn text_init_gives_pefts_starting_embeddings() {
    let (config, weights) = prompt_files("made-peft-prompt-text");
    let adapter = PromptAdapter::from_bytes(&config, &weights, &Device::Cpu).expect("adapter");
    let text = adapter
        .config
        .prompt_tuning_init_text
        .clone()
        .expect("the init text");
    let tokenizer = Tokenizer::from_dir(&tiny("made")).expect("tokenizer");
    let ids = tokenizer.encode(&text, true).expect("encode");
    let virtual_tokens = adapter.num_virtual_tokens();
    assert!(ids.len() < virtual_tokens, "the text is repeated");
    let ids = text_init_ids(&ids, virtual_tokens).expect("a text");
    let model = model("made", Precision::Dense);
    let ids = Tensor::new(ids.as_slice(), &Device::Cpu)
        .and_then(|t| t.unsqueeze(0))
        .expect("ids");
    let table = model.embed(&ids).and_then(|t| t.squeeze(0)).expect("embed");
    let diff = max_abs_diff(&table, &adapter.embeddings);
    eprintln!("text init differs from PEFT's by {diff:.3e}");
    assert!(diff == 0.0, "text init differs by {diff}");
}
