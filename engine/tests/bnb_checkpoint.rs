//! Checkpoints transformers + bitsandbytes 0.50.2 saved in 4-bit NF4 (as the `*-bnb-4bit`
//! checkpoints on the hub are), read through their `quantization_config` and loaded into
//! Graft's NF4 layout as stored: `engine/tests/data/tiny/<name>-bnb-4bit/` (written by
//! `tests/oracle/bnb_reference.py` on the CPU) holds the checkpoint, each projection as
//! bitsandbytes' `dequantize_4bit` expands it, and the quantized model's logits.

mod common;

use candle_core::{DType, Device};
use common::{max_abs_diff, reference, tiny};
use graft_engine::{
    models::{Checkpoint, ModelFiles, Precision, Prequantized},
    quant::{is_bnb_nf4, load_bnb_nf4},
};

const MODELS: [&str; 2] = ["llama-bnb-4bit", "qwen2-bnb-4bit"];

fn open(name: &str) -> Checkpoint {
    Checkpoint::open(ModelFiles::Directory(tiny(name))).expect("the checkpoint opens")
}

#[test]
fn quantization_config_marks_the_checkpoint_as_bitsandbytes_nf4() {
    for name in MODELS {
        assert_eq!(
            open(name).prequantized(),
            Some(Prequantized::BitsAndBytesNf4),
            "{name}"
        );
    }
}

#[test]
fn each_projection_dequantizes_to_bitsandbytes_values_bit_for_bit() {
    for name in MODELS {
        let checkpoint = open(name);
        let config = checkpoint.config().clone();
        let vb = checkpoint
            .weights(DType::F32, &Device::Cpu)
            .expect("weights");
        let expected =
            candle_core::safetensors::load(tiny(name).join("reference.safetensors"), &Device::Cpu)
                .expect("reference");
        let mut compared = 0;
        for (key, dequantized) in &expected {
            let Some(module) = key.strip_suffix(".dequantized") else {
                continue;
            };
            let site = module.rsplit('.').next().expect("a projection");
            let shape = dequantized.dims2().expect("a matrix");
            let vb = vb.pp(module);
            assert!(is_bnb_nf4(&vb), "{module} is stored in 4 bits");
            let matrix = load_bnb_nf4(&vb, shape).expect("loads");
            let ours: Vec<u32> = matrix.dequantize().iter().map(|v| v.to_bits()).collect();
            let theirs: Vec<u32> = dequantized
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("values")
                .iter()
                .map(|v| v.to_bits())
                .collect();
            assert_eq!(ours, theirs, "{name}: {module} ({site})");
            compared += 1;
        }
        assert_eq!(compared, 7 * config.num_layers, "{name}: every projection");
        assert!(
            !is_bnb_nf4(&vb.pp("lm_head")),
            "transformers leaves the head dense"
        );
    }
}

#[test]
fn logits_match_the_bitsandbytes_model_within_1e_4_whatever_precision_is_asked() {
    for name in MODELS {
        let (ids, expected) = reference(&tiny(name));
        let checkpoint = open(name);
        for precision in [Precision::Dense, Precision::Nf4] {
            let model = checkpoint
                .load(precision, DType::F32, &Device::Cpu)
                .expect("the model loads");
            let logits = model.forward(&ids).expect("forward");
            let diff = max_abs_diff(&logits, &expected);
            assert!(
                diff < 1e-4,
                "{name} ({precision:?}): logits differ by {diff}"
            );
        }
    }
}

#[test]
fn a_pre_quantized_model_keeps_its_four_bit_weights_in_memory() {
    let name = "llama-bnb-4bit";
    let checkpoint = open(name);
    let model = checkpoint
        .load(Precision::Dense, DType::F32, &Device::Cpu)
        .expect("the model loads");
    let dense = Checkpoint::open(ModelFiles::Directory(tiny("llama")))
        .expect("the original")
        .load(Precision::Dense, DType::F32, &Device::Cpu)
        .expect("the model loads");
    // Projections at about half a byte per weight instead of four.
    assert!(
        model.frozen_bytes() * 2 < dense.frozen_bytes(),
        "{} bytes against {}",
        model.frozen_bytes(),
        dense.frozen_bytes()
    );
}

#[test]
fn other_quantization_methods_are_refused_naming_the_method() {
    for (method, config) in [
        (
            "gptq",
            r#"{"quant_method": "gptq", "bits": 4, "group_size": 128}"#,
        ),
        (
            "awq",
            r#"{"quant_method": "awq", "bits": 4, "version": "gemm"}"#,
        ),
        (
            "fp8",
            r#"{"quant_method": "fp8", "activation_scheme": "dynamic"}"#,
        ),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = std::fs::read_to_string(tiny("llama").join("config.json")).expect("config");
        let mut json: serde_json::Value = serde_json::from_str(&text).expect("json");
        json["quantization_config"] = serde_json::from_str(config).expect("json");
        std::fs::write(dir.path().join("config.json"), json.to_string()).expect("write");
        let error = Checkpoint::open(ModelFiles::Directory(dir.path().to_owned()))
            .expect_err("refused")
            .to_string();
        assert!(
            error.contains(&format!("{method} checkpoints are not supported")),
            "{error}"
        );
        assert!(!error.contains('\n'), "one line: {error}");
    }
}
