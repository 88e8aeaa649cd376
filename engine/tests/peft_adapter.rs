//! Adapters in Hugging Face PEFT's format: one PEFT 0.21.2 made for the tiny Llama loads in
//! Graft and gives PEFT's logits (written by `tests/oracle/peft_adapter.py`); what Graft
//! writes has PEFT's keys, dtype and metadata, and reads back to the same model.

use std::{collections::BTreeSet, path::Path};

use candle_core::{DType, Device, Tensor};
use graft_engine::{
    models::{Config, Llama, Precision, load_weights},
    peft::Adapter,
};
use safetensors::SafeTensors;

fn data(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/tiny")
        .join(name)
}

fn base_model() -> Llama {
    let dir = data("llama");
    let config =
        Config::from_json(&std::fs::read_to_string(dir.join("config.json")).expect("config"))
            .expect("config parses");
    let vb = load_weights(&dir, DType::F32, &Device::Cpu).expect("weights");
    Llama::load(&vb, &config, Precision::Dense).expect("model")
}

fn peft_files() -> (Vec<u8>, Vec<u8>) {
    let dir = data("llama-peft");
    (
        std::fs::read(dir.join("adapter_config.json")).expect("config"),
        std::fs::read(dir.join("adapter_model.safetensors")).expect("weights"),
    )
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("comparable")
}

#[test]
fn a_peft_adapter_gives_pefts_logits_within_1e_4() {
    let (config, weights) = peft_files();
    let adapter =
        Adapter::from_bytes(&config, &weights, &Device::Cpu).expect("PEFT's adapter loads");
    assert_eq!(adapter.weights.len(), 2 * 7, "two layers, seven sites");
    let mut model = base_model();
    adapter.apply(&mut model).expect("fits the model");

    let reference = candle_core::safetensors::load(
        data("llama-peft").join("reference.safetensors"),
        &Device::Cpu,
    )
    .expect("reference");
    let ids = reference["input_ids"].to_dtype(DType::U32).expect("ids");
    let logits = model.forward(&ids).expect("forward");
    let diff = max_abs_diff(&logits, &reference["logits"]);
    assert!(diff < 1e-4, "logits differ by {diff}");
    let plain = base_model().forward(&ids).expect("forward");
    assert!(
        max_abs_diff(&plain, &reference["logits"]) > 1e-2,
        "the adapter matters"
    );
}

#[test]
fn what_graft_writes_has_pefts_layout_and_reads_back_the_same() {
    let (config, weights) = peft_files();
    let adapter = Adapter::from_bytes(&config, &weights, &Device::Cpu).expect("loads");
    let (our_config, our_weights) = adapter.to_bytes().expect("writes");

    let theirs = SafeTensors::deserialize(&weights).expect("PEFT's file");
    let ours = SafeTensors::deserialize(&our_weights).expect("our file");
    let names = |f: &SafeTensors<'_>| {
        f.names()
            .into_iter()
            .map(str::to_owned)
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(names(&ours), names(&theirs));
    for name in names(&theirs) {
        let (a, b) = (
            ours.tensor(&name).expect("ours"),
            theirs.tensor(&name).expect("theirs"),
        );
        assert_eq!((a.dtype(), a.shape()), (b.dtype(), b.shape()), "{name}");
        assert_eq!(a.data(), b.data(), "{name}");
    }
    let (_, metadata) = SafeTensors::read_metadata(&our_weights).expect("header");
    let format = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get("format").cloned());
    assert_eq!(format.as_deref(), Some("pt"));

    let json: serde_json::Value = serde_json::from_slice(&our_config).expect("JSON");
    for field in [
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "target_modules",
        "bias",
        "use_rslora",
    ] {
        assert!(!json[field].is_null(), "adapter_config.json lacks {field}");
    }
    let again = Adapter::from_bytes(&our_config, &our_weights, &Device::Cpu).expect("reads back");
    assert_eq!(again.config, adapter.config);
}
