//! Adapters in Hugging Face PEFT's format: those PEFT 0.21.2 made for the tiny Llama, Qwen3,
//! Gemma 2/3 and Phi-3 (fused projections), and a DoRA adapter for Qwen2, load in Graft and give PEFT's logits (written by `tests/oracle/peft_adapter.py`); what Graft
//! writes has PEFT's keys, dtype and metadata, and reads back to the same model.

mod common;

use std::collections::BTreeSet;

use candle_core::Device;
use common::{max_abs_diff, model, peft_adapter, reference, tiny};
use graft_engine::{
    adapters::{Adapter, Site},
    models::Precision,
};
use safetensors::SafeTensors;

fn peft_files(name: &str) -> (Vec<u8>, Vec<u8>) {
    let dir = tiny(&format!("{name}-peft"));
    (
        std::fs::read(dir.join("adapter_config.json")).expect("config"),
        std::fs::read(dir.join("adapter_model.safetensors")).expect("weights"),
    )
}

#[test]
fn a_peft_adapter_gives_pefts_logits_within_1e_4() {
    for name in ["llama", "qwen3", "gemma3", "gemma2", "phi3"] {
        let (config, weights) = peft_files(name);
        let adapter =
            Adapter::from_bytes(&config, &weights, &Device::Cpu).expect("PEFT's adapter loads");
        // Phi-3's four: qkv_proj, o_proj, gate_up_proj, down_proj.
        let sites = if name == "phi3" { 4 } else { 7 };
        assert_eq!(adapter.weights.len(), 2 * sites, "two layers, every site");
        let mut with_adapter = model(name, Precision::Dense);
        with_adapter
            .apply_adapter(&adapter)
            .expect("fits the model");

        let (ids, expected) = reference(&tiny(&format!("{name}-peft")));
        let diff = max_abs_diff(&with_adapter.forward(&ids).expect("forward"), &expected);
        assert!(diff < 1e-4, "{name}: logits differ by {diff}");
        let plain = model(name, Precision::Dense)
            .forward(&ids)
            .expect("forward");
        assert!(
            max_abs_diff(&plain, &expected) > 1e-2,
            "{name}: the adapter matters"
        );
    }
}

/// PEFT's `rank_pattern` / `alpha_pattern`: each pair gets the rank and alpha of the first key
/// matching its module (regular expressions), the others `r` and `lora_alpha`.
#[test]
fn an_adapter_with_rank_and_alpha_patterns_gives_pefts_logits() {
    let dir = tiny("llama-peft-patterns");
    let adapter = peft_adapter("llama-peft-patterns");
    let rank = |layer, site| adapter.weights[&(layer, site)].rank().expect("rank");
    assert_eq!(rank(0, Site::QProj), 8);
    assert_eq!(rank(1, Site::QProj), 8);
    assert_eq!(rank(0, Site::UpProj), 6);
    assert_eq!(rank(1, Site::UpProj), 4, "layer 1 is not matched");
    assert_eq!(rank(1, Site::DownProj), 2);
    assert_eq!(rank(0, Site::DownProj), 4);
    let scale = |layer, site| adapter.weights[&(layer, site)].scale;
    assert!((scale(0, Site::VProj) - 16.0 / 4.0).abs() < 1e-12);
    assert!((scale(1, Site::QProj) - 8.0 / 8.0).abs() < 1e-12);

    let mut with_adapter = model("llama", Precision::Dense);
    with_adapter.apply_adapter(&adapter).expect("fits");
    let (ids, expected) = reference(&dir);
    let diff = max_abs_diff(&with_adapter.forward(&ids).expect("forward"), &expected);
    assert!(diff < 1e-4, "logits differ by {diff}");

    // Written back with its patterns in the same order, and read back the same.
    let (config, weights) = adapter.to_bytes().expect("writes");
    let again = Adapter::from_bytes(&config, &weights, &Device::Cpu).expect("reads back");
    assert_eq!(again.config, adapter.config);
}

/// DoRA (PEFT's `use_dora`): a magnitude per output row of each projection, the adapted rows
/// rescaled to it. Qwen2's q/k/v have a bias, which the rescaling leaves out; Phi-3's
/// magnitudes are per row of its fused q/k/v and gate/up.
#[test]
fn a_peft_dora_adapter_gives_pefts_logits_within_1e_4() {
    for (name, sites) in [("qwen2", 7), ("phi3", 4)] {
        let dir = format!("{name}-peft-dora");
        let adapter = peft_adapter(&dir);
        assert!(adapter.config.use_dora);
        assert_eq!(adapter.weights.len(), 2 * sites, "two layers, every site");
        assert!(adapter.weights.values().all(|l| l.magnitude.is_some()));
        let (ids, expected) = reference(&tiny(&dir));
        let mut with_adapter = model(name, Precision::Dense);
        with_adapter.apply_adapter(&adapter).expect("fits");
        let diff = max_abs_diff(&with_adapter.forward(&ids).expect("forward"), &expected);
        assert!(diff < 1e-4, "{name}: logits differ from PEFT's by {diff}");

        // The magnitudes matter: the same pairs as plain LoRA are far off.
        let mut plain = model(name, Precision::Dense);
        for (&(layer, site), lora) in &adapter.weights {
            let mut lora = lora.clone();
            lora.magnitude = None;
            plain.set_lora(layer, site, Some(lora));
        }
        let off = max_abs_diff(&plain.forward(&ids).expect("forward"), &expected);
        assert!(
            off > 1e-2,
            "{name}: without magnitudes the logits differ by only {off}"
        );
    }
    let adapter = peft_adapter("qwen2-peft-dora");
    let (ids, expected) = reference(&tiny("qwen2-peft-dora"));

    // Written with PEFT's key for the magnitude, and read back the same.
    let (config, weights) = adapter.to_bytes().expect("writes");
    let file = SafeTensors::deserialize(&weights).expect("our file");
    let magnitude = file
        .tensor("base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector")
        .expect("PEFT's name for the magnitude");
    assert_eq!(magnitude.shape(), [64]);
    let again = Adapter::from_bytes(&config, &weights, &Device::Cpu).expect("reads back");
    let mut reread = model("qwen2", Precision::Dense);
    reread.apply_adapter(&again).expect("fits");
    let diff = max_abs_diff(&reread.forward(&ids).expect("forward"), &expected);
    assert!(diff < 1e-4, "read back, the logits differ by {diff}");
}

/// A magnitude of the wrong length, or missing where `use_dora` says there are magnitudes, is
/// refused by name.
#[test]
fn a_dora_adapter_that_does_not_fit_is_refused() {
    let adapter = peft_adapter("qwen2-peft-dora");
    let qwen2 = model("qwen2", Precision::Dense);
    let mut short = adapter.clone();
    let lora = short
        .weights
        .get_mut(&(0, Site::VProj))
        .expect("v_proj of layer 0");
    lora.magnitude = Some(
        lora.magnitude
            .as_ref()
            .expect("DoRA")
            .narrow(0, 0, 16)
            .expect("narrowed"),
    );
    let error = qwen2.check_adapter(&short).expect_err("too short");
    assert!(error.to_string().contains("DoRA magnitude"), "{error}");

    let mut missing = adapter.clone();
    missing
        .weights
        .get_mut(&(1, Site::UpProj))
        .expect("up_proj of layer 1")
        .magnitude = None;
    let (config, weights) = missing.to_bytes().expect("writes");
    let error = Adapter::from_bytes(&config, &weights, &Device::Cpu).expect_err("no magnitude");
    assert!(
        error.to_string().contains("lora_magnitude_vector"),
        "{error}"
    );

    let mut not_dora = adapter;
    not_dora.config.use_dora = false;
    let (config, weights) = not_dora.to_bytes().expect("writes");
    let error = Adapter::from_bytes(&config, &weights, &Device::Cpu).expect_err("stray magnitude");
    assert!(
        error.to_string().contains("lora_magnitude_vector"),
        "{error}"
    );
}

#[test]
fn what_graft_writes_has_pefts_layout_and_reads_back_the_same() {
    let (config, weights) = peft_files("llama");
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
