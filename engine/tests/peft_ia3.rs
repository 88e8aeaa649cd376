//! (IA)³ adapters in Hugging Face PEFT's format: those PEFT 0.21.2 made for the tiny Llama
//! (PEFT's default modules: `k_proj`, `v_proj` and feed-forward `down_proj`) and Qwen2 (q/k/v
//! with a bias; `up_proj` and `down_proj` feed-forward) load in Graft and give PEFT's logits
//! (written by `tests/oracle/peft_adapter.py`: `PeftModel(...)(input_ids).logits`); what Graft
//! writes has PEFT's keys, shapes and metadata and reads back to the same model; misfits are
//! refused by name.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, model, reference, tiny};
use graft_engine::{
    adapters::{Ia3, Ia3Adapter, PeftAdapter, PeftError, Site},
    models::{Checkpoint, Llama, ModelFiles, Precision, load_weights, merged_files},
};
use safetensors::SafeTensors;

fn files(name: &str) -> (Vec<u8>, Vec<u8>) {
    let dir = tiny(name);
    (
        std::fs::read(dir.join("adapter_config.json")).expect("config"),
        std::fs::read(dir.join("adapter_model.safetensors")).expect("weights"),
    )
}

fn ia3_adapter(name: &str) -> Ia3Adapter {
    let (config, weights) = files(name);
    match PeftAdapter::from_bytes(&config, &weights, &Device::Cpu).expect("PEFT's adapter loads") {
        PeftAdapter::Ia3(adapter) => adapter,
        _ => panic!("{name} is an (IA)³ adapter"),
    }
}

#[test]
fn a_peft_ia3_adapter_gives_pefts_logits_within_1e_4() {
    for (name, sites, feedforward) in [
        ("llama", 3, [Site::DownProj].as_slice()),
        ("qwen2", 6, [Site::UpProj, Site::DownProj].as_slice()),
    ] {
        let dir = format!("{name}-peft-ia3");
        let adapter = ia3_adapter(&dir);
        assert_eq!(adapter.vectors.len(), 2 * sites, "two layers, every site");
        for (&(_, site), ia3) in &adapter.vectors {
            assert_eq!(ia3.feedforward, feedforward.contains(&site), "{site:?}");
        }
        let mut with_adapter = model(name, Precision::Dense);
        with_adapter
            .apply(&PeftAdapter::Ia3(adapter))
            .expect("fits the model");
        let (ids, expected) = reference(&tiny(&dir));
        let diff = max_abs_diff(&with_adapter.forward(&ids).expect("forward"), &expected);
        eprintln!("{name}: (IA)³ logits within {diff:e} of PEFT's");
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

/// `output.merged` for (IA)³: PEFT's adapters merged into their bases (rows, and Qwen2's q/k/v
/// biases, scaled by output vectors; columns by feed-forward ones) are plain models that give
/// PEFT's adapted logits.
#[test]
fn an_ia3_adapter_merged_into_its_base_gives_pefts_logits() {
    for name in ["llama", "qwen2"] {
        let dir = format!("{name}-peft-ia3");
        let adapter = PeftAdapter::Ia3(ia3_adapter(&dir));
        let base = Checkpoint::open(ModelFiles::Directory(tiny(name))).expect("the base");
        let merged = tempfile::tempdir().expect("tempdir");
        merged_files(&base, &adapter, |file, bytes| {
            std::fs::write(merged.path().join(file), bytes).expect("write");
            Ok(())
        })
        .expect("merged");
        let vb = load_weights(merged.path(), DType::F32, &Device::Cpu).expect("weights");
        let model = Llama::load(&vb, &common::config(name), Precision::Dense).expect("model");
        let (ids, expected) = reference(&tiny(&dir));
        let diff = max_abs_diff(&model.forward(&ids).expect("forward"), &expected);
        eprintln!("{name}: the merged (IA)³ model's logits within {diff:e} of PEFT's");
        assert!(diff < 1e-4, "{name}: merged logits differ by {diff}");
    }
    // Virtual tokens have no weights to merge into.
    let dir = tiny("llama-peft-prompt");
    let prompt = PeftAdapter::from_bytes(
        &std::fs::read(dir.join("adapter_config.json")).expect("config"),
        &std::fs::read(dir.join("adapter_model.safetensors")).expect("weights"),
        &Device::Cpu,
    )
    .expect("PEFT's prompt adapter");
    let base = Checkpoint::open(ModelFiles::Directory(tiny("llama"))).expect("the base");
    let error = merged_files(&base, &prompt, |_, _| Ok(())).expect_err("not mergeable");
    assert!(error.to_string().contains("PROMPT_TUNING"), "{error}");
}

#[test]
fn what_graft_writes_has_pefts_keys_and_shapes_and_reads_back_the_same() {
    let adapter = ia3_adapter("qwen2-peft-ia3");
    let (config, weights) = PeftAdapter::Ia3(adapter.clone())
        .to_bytes()
        .expect("writes");
    let (_, theirs) = files("qwen2-peft-ia3");
    let (ours, theirs) = (
        SafeTensors::deserialize(&weights).expect("ours"),
        SafeTensors::deserialize(&theirs).expect("theirs"),
    );
    let mut names: Vec<_> = ours.names();
    names.sort_unstable();
    let mut expected: Vec<_> = theirs.names();
    expected.sort_unstable();
    assert_eq!(names, expected);
    for name in names {
        let (a, b) = (
            ours.tensor(name).expect("ours"),
            theirs.tensor(name).expect("theirs"),
        );
        assert_eq!((a.dtype(), a.shape()), (b.dtype(), b.shape()), "{name}");
        assert_eq!(a.data(), b.data(), "{name}: the same values");
    }
    let json: serde_json::Value = serde_json::from_slice(&config).expect("json");
    assert_eq!(json["peft_type"], "IA3");
    let again = ia3_adapter_from(&config, &weights);
    assert_eq!(again.config, adapter.config);
    assert_eq!(again.vectors.len(), adapter.vectors.len());
}

fn ia3_adapter_from(config: &[u8], weights: &[u8]) -> Ia3Adapter {
    match PeftAdapter::from_bytes(config, weights, &Device::Cpu).expect("reads") {
        PeftAdapter::Ia3(adapter) => adapter,
        _ => panic!("an (IA)³ adapter"),
    }
}

#[test]
fn an_ia3_adapter_that_does_not_fit_is_refused_naming_what() {
    let model = model("llama", Precision::Dense);
    let mut short = ia3_adapter("llama-peft-ia3");
    let k = short
        .vectors
        .get_mut(&(1, Site::KProj))
        .expect("k_proj of layer 1");
    k.vector = k.vector.narrow(0, 0, 16).expect("shorter");
    let error = model
        .check(&PeftAdapter::Ia3(short))
        .expect_err("a short vector");
    assert!(
        error
            .to_string()
            .contains("k_proj of layer 1 has 16 entries"),
        "{error}"
    );

    let mut deep = ia3_adapter("llama-peft-ia3");
    let vector = Ia3::ones(32, false, &Device::Cpu).expect("ones");
    deep.vectors.insert((7, Site::VProj), vector);
    let error = model
        .check(&PeftAdapter::Ia3(deep))
        .expect_err("a layer the model lacks");
    assert!(
        error.to_string().contains("layer 7 does not exist"),
        "{error}"
    );

    let phi3 = common::model("phi3", Precision::Dense);
    let error = phi3
        .check(&PeftAdapter::Ia3(ia3_adapter("llama-peft-ia3")))
        .expect_err("Phi-3 fuses q/k/v");
    assert!(error.to_string().contains("no k_proj"), "{error}");

    // A vector laid out for the other side than the config says: `[1, out]` where a
    // non-feed-forward module's is `[out, 1]`.
    let (config, _) = files("llama-peft-ia3");
    let wrong = Tensor::ones((1, 32), DType::F32, &Device::Cpu).expect("ones");
    let key = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l".to_owned();
    let weights = safetensors::serialize([(key, wrong)], None).expect("serialize");
    let error = PeftAdapter::from_bytes(&config, &weights, &Device::Cpu).expect_err("wrong side");
    assert!(
        error
            .to_string()
            .contains("non-feed-forward module's ia3_l is [out, 1]"),
        "{error}"
    );
}

#[test]
fn other_peft_types_are_refused_by_name() {
    let config = br#"{"peft_type": "LOHA", "num_virtual_tokens": 8}"#;
    let error = PeftAdapter::from_bytes(config, &[], &Device::Cpu).expect_err("not computed");
    assert!(matches!(error, PeftError::Unsupported(_)), "{error}");
    assert!(error.to_string().contains("LOHA"), "{error}");
}

/// Served one token at a time through the KV cache, an (IA)³ adapter gives PEFT's logits at
/// every position.
#[test]
fn decoding_with_an_ia3_adapter_gives_pefts_logits_at_every_position() {
    use candle_core::IndexOp;
    use graft_engine::{backend::KvCache, models::Segment};
    for name in ["llama", "qwen2"] {
        let dir = format!("{name}-peft-ia3");
        let model = model(name, Precision::Dense);
        let serving = model
            .serving(&PeftAdapter::Ia3(ia3_adapter(&dir)))
            .expect("serving layout");
        let (ids, expected) = reference(&tiny(&dir));
        let row = ids.i(0).and_then(|r| r.to_vec1::<u32>()).expect("row");
        let mut cache = KvCache::new(model.num_layers());
        let mut logits = Vec::new();
        let mut chunks = vec![&row[..3]];
        chunks.extend(row[3..].chunks(1));
        for chunk in chunks {
            let mut segment = [Segment {
                tokens: chunk,
                cache: &mut cache,
                adapter: Some(&serving),
            }];
            logits.push(model.forward_packed(&mut segment).expect("step"));
        }
        let last = Tensor::cat(&logits, 0).expect("cat");
        // The prompt's step returns its last row only: positions 2.. of the reference.
        let want = expected.i((0, 2..)).expect("rows");
        let diff = max_abs_diff(&last, &want);
        eprintln!("{name}: served (IA)³ logits within {diff:e} of PEFT's");
        assert!(diff < 1e-4, "{name}: served logits differ by {diff}");
    }
}
