//! Bottleneck adapters in the AdapterHub `adapters` library's format: those `adapters` 1.3.0
//! made for the tiny Llama (Houlsby's, after attention and after the feed-forward block;
//! Pfeiffer's, after the feed-forward block with a per-layer reduction factor and a scaling)
//! load in Graft and give the library's logits (written by
//! `tests/oracle/adapterhub_bottleneck.py`); what Graft writes has the library's names, shapes
//! and config and reads back to the same model; a mixed batch applies each sequence's own;
//! what Graft cannot compute is refused by name.

mod common;

use candle_core::{Device, IndexOp, Tensor};
use common::{max_abs_diff, model, reference, tiny};
use graft_engine::{
    adapters::{
        BottleneckAdapter, BottleneckConfig, PeftAdapter, PeftError, Placement,
        bottleneck::Architecture,
    },
    backend::KvCache,
    models::{Checkpoint, ModelFiles, Precision, Segment, merged_files},
};
use safetensors::SafeTensors;

fn files(name: &str) -> (Vec<u8>, Vec<u8>) {
    let dir = tiny(name);
    (
        std::fs::read(dir.join("adapter_config.json")).expect("config"),
        std::fs::read(dir.join("adapter.safetensors")).expect("weights"),
    )
}

fn bottleneck(name: &str) -> BottleneckAdapter {
    let (config, weights) = files(name);
    match PeftAdapter::from_bytes(&config, &weights, &Device::Cpu).expect("the library's adapter") {
        PeftAdapter::Bottleneck(adapter) => adapter,
        _ => panic!("{name} is a bottleneck adapter"),
    }
}

#[test]
fn an_adapterhub_bottleneck_adapter_gives_the_librarys_logits_within_1e_4() {
    for (kind, modules, sizes) in [
        ("houlsby", 4, [16, 16]),
        // reduction_factor {"1": 8, "default": 4} on width 64.
        ("pfeiffer", 2, [16, 8]),
    ] {
        let dir = format!("llama-adapterhub-{kind}");
        let adapter = bottleneck(&dir);
        assert_eq!(adapter.modules.len(), modules, "{kind}");
        for (&(layer, placement), module) in &adapter.modules {
            assert_eq!(module.size(), sizes[layer], "{kind} layer {layer}");
            assert!(kind == "houlsby" || placement == Placement::Output);
        }
        let mut with_adapter = model("llama", Precision::Dense);
        with_adapter
            .apply(&PeftAdapter::Bottleneck(adapter))
            .expect("fits the model");
        let (ids, expected) = reference(&tiny(&dir));
        let diff = max_abs_diff(&with_adapter.forward(&ids).expect("forward"), &expected);
        eprintln!("{kind}: bottleneck logits within {diff:e} of the library's");
        assert!(diff < 1e-4, "{kind}: logits differ by {diff}");
        let plain = model("llama", Precision::Dense)
            .forward(&ids)
            .expect("forward");
        assert!(
            max_abs_diff(&plain, &expected) > 1e-2,
            "{kind}: the adapter matters"
        );
    }
}

#[test]
fn what_graft_writes_has_the_librarys_names_shapes_and_config_and_reads_back_the_same() {
    for kind in ["houlsby", "pfeiffer"] {
        let dir = format!("llama-adapterhub-{kind}");
        let adapter = PeftAdapter::Bottleneck(bottleneck(&dir));
        assert_eq!(adapter.weights_file(), "adapter.safetensors");
        let (config, weights) = adapter.to_bytes().expect("writes");
        let (their_config, theirs) = files(&dir);
        let (ours, theirs) = (
            SafeTensors::deserialize(&weights).expect("ours"),
            SafeTensors::deserialize(&theirs).expect("theirs"),
        );
        let mut names = ours.names();
        names.sort_unstable();
        let mut expected = theirs.names();
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
        let json =
            |bytes: &[u8]| -> serde_json::Value { serde_json::from_slice(bytes).expect("json") };
        assert_eq!(
            json(&config),
            json(&their_config),
            "{kind}: the config as the library wrote it"
        );
        let PeftAdapter::Bottleneck(again) =
            PeftAdapter::from_bytes(&config, &weights, &Device::Cpu).expect("reads")
        else {
            panic!("a bottleneck adapter");
        };
        assert_eq!(again.modules.len(), bottleneck(&dir).modules.len());
    }
}

/// The config Graft writes for a run is the one the library writes for the same choice.
#[test]
fn a_fresh_config_is_the_librarys_for_the_same_architecture() {
    let theirs = |kind: &str| {
        let (config, _) = files(&format!("llama-adapterhub-{kind}"));
        let json: serde_json::Value = serde_json::from_slice(&config).expect("json");
        json["config"].clone()
    };
    let ours = |architecture, factor, non_linearity| {
        serde_json::to_value(BottleneckConfig::new(architecture, factor, non_linearity))
            .expect("json")
    };
    // DoubleSeqBnConfig(reduction_factor=4).
    assert_eq!(ours(Architecture::Houlsby, 4.0, "swish"), theirs("houlsby"));
    // SeqBnConfig(reduction_factor={"1": 8, "default": 4}, scaling=0.5).
    let mut pfeiffer = ours(Architecture::Pfeiffer, 4.0, "relu");
    pfeiffer["reduction_factor"] = serde_json::json!({"1": 8, "default": 4});
    pfeiffer["scaling"] = serde_json::json!(0.5);
    assert_eq!(pfeiffer, theirs("pfeiffer"));
}

/// One served step over three sequences (Houlsby's, the base's, Pfeiffer's) gives each the
/// logits it has alone.
#[test]
fn a_mixed_batch_applies_each_sequences_own_adapter() {
    let model = model("llama", Precision::Dense);
    let adapters: Vec<_> = ["houlsby", "pfeiffer"]
        .into_iter()
        .map(|kind| {
            let adapter = PeftAdapter::Bottleneck(bottleneck(&format!("llama-adapterhub-{kind}")));
            model.check(&adapter).expect("fits");
            model.serving(&adapter).expect("laid out")
        })
        .collect();
    let prompts: [&[u32]; 3] = [&[1, 5, 9, 2], &[3, 4], &[7, 8, 9, 10, 11]];
    let which = [Some(&adapters[0]), None, Some(&adapters[1])];
    let alone: Vec<Tensor> = prompts
        .iter()
        .zip(which)
        .map(|(tokens, adapter)| {
            let mut cache = KvCache::new(model.num_layers());
            let mut segment = [Segment {
                tokens,
                cache: &mut cache,
                adapter,
            }];
            model.forward_packed(&mut segment).expect("alone")
        })
        .collect();
    let mut caches: Vec<KvCache> = (0..3).map(|_| KvCache::new(model.num_layers())).collect();
    let mut segments: Vec<Segment<'_>> = caches
        .iter_mut()
        .zip(prompts.iter().zip(which))
        .map(|(cache, (tokens, adapter))| Segment {
            tokens,
            cache,
            adapter,
        })
        .collect();
    let together = model.forward_packed(&mut segments).expect("together");
    for (i, alone) in alone.iter().enumerate() {
        let diff = max_abs_diff(&together.i(i..=i).expect("row"), alone);
        assert!(diff < 1e-5, "sequence {i}: {diff}");
    }
    // The served rows (the backend's batched op) give what the training forward gives.
    for (i, kind) in [(0, "houlsby"), (2, "pfeiffer")] {
        let mut with_adapter = common::model("llama", Precision::Dense);
        with_adapter
            .apply(&PeftAdapter::Bottleneck(bottleneck(&format!(
                "llama-adapterhub-{kind}"
            ))))
            .expect("fits");
        let ids = Tensor::new(prompts[i], &Device::Cpu).and_then(|t| t.unsqueeze(0));
        let whole = with_adapter.forward(&ids.expect("ids")).expect("forward");
        let last = whole.i((0, prompts[i].len() - 1)).expect("last row");
        let diff = max_abs_diff(&last.unsqueeze(0).expect("row"), &alone[i]);
        assert!(
            diff < 1e-4,
            "{kind}: served {diff} from the training forward"
        );
    }
    let base = alone[0].clone();
    let mut cache = KvCache::new(model.num_layers());
    let plain = model
        .forward_packed(&mut [Segment {
            tokens: prompts[0],
            cache: &mut cache,
            adapter: None,
        }])
        .expect("base");
    assert!(
        max_abs_diff(&base, &plain) > 1e-2,
        "the adapter matters in the batch"
    );
}

#[test]
fn what_graft_cannot_compute_or_does_not_fit_is_refused_naming_it() {
    let (config, weights) = files("llama-adapterhub-houlsby");
    let mut json: serde_json::Value = serde_json::from_slice(&config).expect("json");
    for (field, value, named) in [
        ("use_gating", serde_json::json!(true), "use_gating"),
        ("ln_after", serde_json::json!(true), "ln_after"),
        ("is_parallel", serde_json::json!(true), "is_parallel"),
        ("phm_layer", serde_json::json!(true), "Compacter"),
        ("scaling", serde_json::json!("learned"), "learned"),
        ("non_linearity", serde_json::json!("mish"), "mish"),
        (
            "residual_before_ln",
            serde_json::json!("post_add"),
            "post_add",
        ),
    ] {
        let mut changed = json.clone();
        changed["config"][field] = value;
        let bytes = serde_json::to_vec(&changed).expect("json");
        let error = PeftAdapter::from_bytes(&bytes, &weights, &Device::Cpu).expect_err(field);
        assert!(
            matches!(error, PeftError::Unsupported(_)),
            "{field}: {error}"
        );
        assert!(error.to_string().contains(named), "{field}: {error}");
    }
    // A damaged weights file, named as the library names it.
    let error =
        PeftAdapter::from_bytes(&config, b"not safetensors", &Device::Cpu).expect_err("damaged");
    assert!(error.to_string().contains("adapter.safetensors"), "{error}");
    // Another width: refused against the model, naming both.
    json["hidden_size"] = serde_json::json!(32);
    let bytes = serde_json::to_vec(&json).expect("json");
    let error = PeftAdapter::from_bytes(&bytes, &weights, &Device::Cpu).expect_err("shapes");
    assert!(error.to_string().contains("hidden_size 32"), "{error}");
    let adapter = PeftAdapter::Bottleneck(bottleneck("llama-adapterhub-houlsby"));
    let narrow = model("made", Precision::Dense);
    assert_eq!(narrow.config().hidden_size, 32);
    let error = narrow.check(&adapter).expect_err("another width");
    assert!(error.to_string().contains("hidden_size 64"), "{error}");
    // Not mergeable: the modules are not weights of the base.
    let base = Checkpoint::open(ModelFiles::Directory(tiny("llama"))).expect("the base");
    let error = merged_files(&base, &adapter, |_, _| Ok(())).expect_err("not mergeable");
    assert!(error.to_string().contains("bottleneck"), "{error}");
}
