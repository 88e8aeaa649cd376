//! The generated CRDs against a real kube-apiserver: a valid FineTuneJob is stored with its
//! defaults, and every class of bad manifest is refused at admission with a message that names
//! the offending field.

use graft_api::{AdapterDeployment, FineTuneJob, all_crds};
use graft_testenv::{ControlPlane, install_crds};
use kube::{
    Api, Client,
    api::{DynamicObject, Patch, PatchParams, PostParams},
    core::{ApiResource, GroupVersionKind},
    discovery::ApiCapabilities,
};
use serde_json::{Value, json};

async fn setup(prefix: &str) -> (Client, String) {
    let cp = ControlPlane::shared().await;
    let client = cp.client().await;
    install_crds(&client, &all_crds()).await;
    (client, cp.namespace(prefix).await)
}

fn valid_job(name: &str) -> Value {
    json!({
        "apiVersion": "graft.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": "s3://models/llama-3.1-8b-instruct/"},
            "dataset": {"uri": "s3://datasets/support/train.jsonl"},
            "method": {"quantization": "nf4", "lora": {"rank": 16, "alpha": 32,
                "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
            "output": {"uri": "s3://adapters/support-bot/v3/"},
            "storage": {"secretRef": {"name": "s3-credentials"}, "endpoint": "http://minio.minio:9000"}
        }
    })
}

fn valid_deployment(name: &str) -> Value {
    json!({
        "apiVersion": "graft.dev/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": name},
        "spec": {
            "server": {"name": "llama-3-8b"},
            "adapterName": "support-bot",
            "versions": [
                {"source": {"fineTuneJobRef": {"name": "support-bot-v3"}}, "weight": 90},
                {"source": {"uri": "s3://adapters/support-bot/v4/", "sha256": "a".repeat(64)}, "weight": 10}
            ]
        }
    })
}

fn dynamic_api<K: kube::Resource<DynamicType = ()>>(
    client: &Client,
    ns: &str,
) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk(&K::group(&()), &K::version(&()), &K::kind(&()));
    let resource = ApiResource::from_gvk_with_plural(&gvk, &K::plural(&()));
    Api::namespaced_with(client.clone(), ns, &resource)
}

/// Creates `manifest` and returns the apiserver's refusal, failing the test if it was accepted.
async fn rejected(api: &Api<DynamicObject>, manifest: Value) -> String {
    let object: DynamicObject = serde_json::from_value(manifest).expect("manifest");
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => panic!("the apiserver accepted an invalid manifest"),
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            status.message.clone()
        }
        Err(other) => panic!("unexpected error: {other}"),
    }
}

fn assert_names(message: &str, needles: &[&str]) {
    for needle in needles {
        assert!(
            message.contains(needle),
            "expected {needle:?} in: {message}"
        );
    }
}

#[tokio::test]
async fn valid_finetunejob_is_stored_with_schema_defaults() {
    let (client, ns) = setup("ftj-valid").await;
    let raw = dynamic_api::<FineTuneJob>(&client, &ns);
    let object: DynamicObject =
        serde_json::from_value(valid_job("support-bot-v3")).expect("manifest");
    raw.create(&PostParams::default(), &object)
        .await
        .expect("a valid job is accepted");

    let typed: Api<FineTuneJob> = Api::namespaced(client, &ns);
    let job = typed.get("support-bot-v3").await.expect("read back");
    let lora = job.spec.method.lora().expect("a LoRA job");
    assert_eq!(lora.rank, 16);
    assert!(
        (lora.dropout - 0.05).abs() < 1e-12,
        "the schema's default for an unnamed field: {}",
        lora.dropout
    );
    // Defaults come from the schema, applied by the apiserver, not by our deserialiser.
    let stored = raw.get("support-bot-v3").await.expect("read back raw");
    let training = &stored.data["spec"]["training"];
    assert_eq!(training["learningRate"], json!(0.0002), "{stored:?}");
    assert_eq!(training["scheduler"], json!("cosine"));
    assert_eq!(
        stored.data["spec"]["dataset"]["validationFraction"],
        json!(0.05)
    );
    assert_eq!(
        stored.data["spec"]["resources"]["gpuResourceName"],
        json!("nvidia.com/gpu")
    );
}

#[tokio::test]
async fn a_job_naming_no_method_trains_a_default_lora() {
    let (client, ns) = setup("ftj-no-method").await;
    let raw = dynamic_api::<FineTuneJob>(&client, &ns);
    let mut job = valid_job("no-method");
    job["spec"].as_object_mut().expect("spec").remove("method");
    let object: DynamicObject = serde_json::from_value(job).expect("manifest");
    raw.create(&PostParams::default(), &object)
        .await
        .expect("a job naming no method is accepted");
    let stored = raw.get("no-method").await.expect("read back raw");
    // No LoRA is written into it: a default there would stop any other method being named.
    assert_eq!(
        stored.data["spec"]["method"],
        json!({"quantization": "nf4"}),
        "{stored:?}"
    );
    let typed: Api<FineTuneJob> = Api::namespaced(client, &ns);
    let job = typed.get("no-method").await.expect("read back");
    let lora = job
        .spec
        .method
        .lora()
        .expect("LoRA when no method is named");
    assert_eq!((lora.rank, lora.alpha), (16, 32.0));
}

/// `ia3` is a method of its own: stored with PEFT's defaults for Llama, refused beside another
/// method, and refused when a feed-forward module is not targeted (PEFT's own check).
#[tokio::test]
async fn ia3_is_one_method_with_its_feedforward_modules_among_its_targets() {
    let (client, ns) = setup("ftj-ia3").await;
    let raw = dynamic_api::<FineTuneJob>(&client, &ns);
    let mut job = valid_job("ia3");
    job["spec"]["method"] = json!({"quantization": "nf4", "ia3": {}});
    let object: DynamicObject = serde_json::from_value(job).expect("manifest");
    raw.create(&PostParams::default(), &object)
        .await
        .expect("an ia3 job is accepted");
    let stored = raw.get("ia3").await.expect("read back raw");
    assert_eq!(
        stored.data["spec"]["method"]["ia3"],
        json!({"targetModules": ["k_proj", "v_proj", "down_proj"], "feedforwardModules": ["down_proj"]}),
        "{stored:?}"
    );

    let mut both = valid_job("ia3-and-lora");
    both["spec"]["method"]["ia3"] = json!({});
    let message = rejected(&raw, both).await;
    assert_names(&message, &["spec.method", "names at most one method"]);

    let mut outside = valid_job("ia3-outside");
    outside["spec"]["method"] = json!({"ia3": {
        "targetModules": ["k_proj", "v_proj"], "feedforwardModules": ["down_proj"]}});
    let message = rejected(&raw, outside).await;
    assert_names(
        &message,
        &[
            "spec.method.ia3",
            "feedforwardModules must all be in targetModules",
        ],
    );
    // The default feed-forward module, down_proj, is not among these targets either.
    let mut defaulted = valid_job("ia3-defaulted");
    defaulted["spec"]["method"] = json!({"ia3": {"targetModules": ["q_proj", "v_proj"]}});
    let message = rejected(&raw, defaulted).await;
    assert_names(&message, &["defaults to [down_proj]"]);
    let mut none = valid_job("ia3-no-feedforward");
    none["spec"]["method"] = json!({"ia3": {"targetModules": ["q_proj", "v_proj"],
        "feedforwardModules": []}});
    let object: DynamicObject = serde_json::from_value(none).expect("manifest");
    raw.create(&PostParams::default(), &object)
        .await
        .expect("no feed-forward module is accepted");
}

#[tokio::test]
async fn prompt_tuning_p_tuning_and_prefix_tuning_are_methods_of_their_own() {
    let (client, ns) = setup("ftj-prompt").await;
    let raw = dynamic_api::<FineTuneJob>(&client, &ns);
    let mut job = valid_job("prompt");
    job["spec"]["method"] = json!({"promptTuning": {"numVirtualTokens": 20}});
    let object: DynamicObject = serde_json::from_value(job.clone()).expect("manifest");
    raw.create(&PostParams::default(), &object)
        .await
        .expect("a prompt-tuning job is accepted");
    let typed: Api<FineTuneJob> = Api::namespaced(client.clone(), &ns);
    let stored = typed.get("prompt").await.expect("read back");
    assert!(stored.spec.method.lora().is_none(), "not a LoRA job");
    assert_eq!(
        stored.spec.method.kind(),
        graft_api::MethodKind::PromptTuning(&graft_api::PromptTuningConfig {
            num_virtual_tokens: 20,
            init: graft_api::PromptInit::Random,
            init_text: None,
        })
    );

    job["metadata"]["name"] = json!("p-tuning");
    job["spec"]["method"] = json!({"pTuning": {"numVirtualTokens": 8, "encoder": "lstm"}});
    let object: DynamicObject = serde_json::from_value(job.clone()).expect("manifest");
    raw.create(&PostParams::default(), &object)
        .await
        .expect("a P-tuning job is accepted");
    let stored = raw.get("p-tuning").await.expect("read back raw");
    assert_eq!(
        stored.data["spec"]["method"]["pTuning"]["encoderHiddenSize"],
        json!(128),
        "the schema's default: {stored:?}"
    );

    job["metadata"]["name"] = json!("prefix-tuning");
    job["spec"]["method"] = json!({"prefixTuning": {"numVirtualTokens": 10}});
    let object: DynamicObject = serde_json::from_value(job.clone()).expect("manifest");
    raw.create(&PostParams::default(), &object)
        .await
        .expect("a prefix-tuning job is accepted");
    let stored = typed.get("prefix-tuning").await.expect("read back");
    assert_eq!(
        stored.spec.method.kind(),
        graft_api::MethodKind::PrefixTuning(&graft_api::PrefixTuningConfig {
            num_virtual_tokens: 10,
            prefix_projection: false,
            encoder_hidden_size: 128,
        }),
        "the schema's defaults"
    );

    job["metadata"]["name"] = json!("two-methods");
    job["spec"]["method"] = json!({
        "lora": {"rank": 8},
        "promptTuning": {"numVirtualTokens": 20}
    });
    let message = rejected(&raw, job.clone()).await;
    assert_names(&message, &["spec.method", "at most one method"]);
    job["spec"]["method"] = json!({
        "promptTuning": {"numVirtualTokens": 20},
        "pTuning": {"numVirtualTokens": 20}
    });
    let message = rejected(&raw, job.clone()).await;
    assert_names(&message, &["spec.method", "at most one method"]);
    job["spec"]["method"] = json!({
        "pTuning": {"numVirtualTokens": 20},
        "prefixTuning": {"numVirtualTokens": 20}
    });
    let message = rejected(&raw, job.clone()).await;
    assert_names(&message, &["spec.method", "at most one method"]);

    job["spec"]["method"] = json!({"promptTuning": {"numVirtualTokens": 20, "init": "text"}});
    let message = rejected(&raw, job.clone()).await;
    assert_names(
        &message,
        &["spec.method.promptTuning", "text needs initText"],
    );
    job["spec"]["method"] = json!({"promptTuning": {"numVirtualTokens": 0}});
    let message = rejected(&raw, job.clone()).await;
    assert_names(&message, &["spec.method.promptTuning.numVirtualTokens"]);
    job["spec"]["method"] = json!({"pTuning": {"numVirtualTokens": 4, "encoder": "gru"}});
    let message = rejected(&raw, job.clone()).await;
    assert_names(
        &message,
        &["spec.method.pTuning.encoder", "Unsupported value"],
    );

    // Virtual tokens go before each sequence (no packing) and change no weight (no merge).
    job["spec"]["method"] = json!({"pTuning": {"numVirtualTokens": 4}});
    job["spec"]["training"]["packing"] = json!(true);
    let message = rejected(&raw, job.clone()).await;
    assert_names(&message, &["spec.training.packing", "pTuning"]);
    job["spec"]["training"]["packing"] = json!(false);
    job["spec"]["method"] = json!({"promptTuning": {"numVirtualTokens": 4}});
    job["spec"]["output"]["merged"] = json!(true);
    let message = rejected(&raw, job.clone()).await;
    assert_names(&message, &["spec.output.merged", "promptTuning"]);
    job["spec"]["output"]["merged"] = json!(false);
    job["spec"]["method"] = json!({"prefixTuning": {"numVirtualTokens": 4}});
    job["spec"]["training"]["packing"] = json!(true);
    let message = rejected(&raw, job).await;
    assert_names(&message, &["spec.training.packing", "prefixTuning"]);
}

#[tokio::test]
async fn bottleneck_adapters_are_a_method_of_their_own() {
    let (client, ns) = setup("ftj-bottleneck").await;
    let raw = dynamic_api::<FineTuneJob>(&client, &ns);
    let mut job = valid_job("bottleneck");
    job["spec"]["method"] = json!({"bottleneck": {"size": 64}});
    let object: DynamicObject = serde_json::from_value(job.clone()).expect("manifest");
    raw.create(&PostParams::default(), &object)
        .await
        .expect("a bottleneck job is accepted");
    let typed: Api<FineTuneJob> = Api::namespaced(client.clone(), &ns);
    let stored = typed.get("bottleneck").await.expect("read back");
    assert_eq!(
        stored.spec.method.kind(),
        graft_api::MethodKind::Bottleneck(&graft_api::BottleneckConfig {
            placement: graft_api::BottleneckPlacement::Pfeiffer,
            reduction_factor: None,
            size: Some(64),
            non_linearity: None,
        }),
        "Pfeiffer's placement by default"
    );
    // Packed rows are fine: the modules act on each token alone.
    job["metadata"]["name"] = json!("bottleneck-packed");
    job["spec"]["method"] =
        json!({"bottleneck": {"placement": "houlsby", "nonLinearity": "geluNew"}});
    job["spec"]["training"]["packing"] = json!(true);
    let object: DynamicObject = serde_json::from_value(job.clone()).expect("manifest");
    raw.create(&PostParams::default(), &object)
        .await
        .expect("a packed Houlsby job is accepted");
    job["spec"]["training"]["packing"] = json!(false);

    job["metadata"]["name"] = json!("refused");
    job["spec"]["method"] = json!({"ia3": {}, "bottleneck": {}});
    let message = rejected(&raw, job.clone()).await;
    assert_names(&message, &["spec.method", "at most one method"]);
    job["spec"]["method"] = json!({"bottleneck": {"reductionFactor": 16, "size": 64}});
    let message = rejected(&raw, job.clone()).await;
    assert_names(
        &message,
        &["spec.method.bottleneck", "reductionFactor or size"],
    );
    job["spec"]["method"] = json!({"bottleneck": {"placement": "parallel"}});
    let message = rejected(&raw, job.clone()).await;
    assert_names(
        &message,
        &["spec.method.bottleneck.placement", "Unsupported value"],
    );
    // The modules sit between the layers: no merged weight holds them.
    job["spec"]["method"] = json!({"bottleneck": {"placement": "houlsby"}});
    job["spec"]["output"]["merged"] = json!(true);
    let message = rejected(&raw, job).await;
    assert_names(&message, &["spec.output.merged", "bottleneck"]);
}

#[tokio::test]
async fn rank_zero_is_rejected_naming_the_field() {
    let (client, ns) = setup("ftj-rank").await;
    let mut job = valid_job("rank-zero");
    job["spec"]["method"]["lora"]["rank"] = json!(0);
    let message = rejected(&dynamic_api::<FineTuneJob>(&client, &ns), job).await;
    assert_names(
        &message,
        &["spec.method.lora.rank", "greater than or equal to 1"],
    );

    let mut job = valid_job("rank-huge");
    job["spec"]["method"]["lora"]["rank"] = json!(513);
    let message = rejected(&dynamic_api::<FineTuneJob>(&client, &ns), job).await;
    assert_names(
        &message,
        &["spec.method.lora.rank", "less than or equal to 512"],
    );
}

/// `init`: PEFT's `init_lora_weights` names Graft trains (`olora` and `pissa` among them) are
/// accepted, others refused by the enum, `loftq` with its reason, and `olora` / `pissa` on a
/// GGUF base (which holds no dense weights to rewrite) by name.
#[tokio::test]
async fn init_takes_olora_and_pissa_and_refuses_loftq_and_residual_inits_on_gguf() {
    let (client, ns) = setup("ftj-init").await;
    let api = dynamic_api::<FineTuneJob>(&client, &ns);
    let mut job = valid_job("init-loftq");
    job["spec"]["method"]["lora"]["init"] = json!("loftq");
    let message = rejected(&api, job).await;
    assert_names(&message, &["init: loftq is not supported", "re-quantized"]);

    let mut job = valid_job("init-svd");
    job["spec"]["method"]["lora"]["init"] = json!("svd");
    let message = rejected(&api, job).await;
    assert_names(
        &message,
        &["spec.method.lora.init", "\"olora\"", "\"pissa\""],
    );

    let mut job = valid_job("init-pissa-gguf");
    job["spec"]["method"]["lora"]["init"] = json!("pissa");
    job["spec"]["baseModel"]["uri"] = json!("s3://models/smollm2/model.Q4_1.GGUF");
    let message = rejected(&api, job).await;
    assert_names(
        &message,
        &["olora and pissa rewrite the base weights", "GGUF"],
    );

    for init in ["olora", "pissa"] {
        let mut job = valid_job(&format!("init-{init}"));
        job["spec"]["method"]["lora"]["init"] = json!(init);
        let object: DynamicObject = serde_json::from_value(job).expect("manifest");
        let stored = api
            .create(&PostParams::default(), &object)
            .await
            .unwrap_or_else(|e| panic!("init {init} on a Hugging Face base is accepted: {e}"));
        assert_eq!(stored.data["spec"]["method"]["lora"]["init"], json!(init));
    }
}

#[tokio::test]
async fn rank_and_alpha_patterns_are_bounded_like_rank_and_alpha() {
    let (client, ns) = setup("ftj-patterns").await;
    let api = dynamic_api::<FineTuneJob>(&client, &ns);
    let mut job = valid_job("pattern-rank-zero");
    job["spec"]["method"]["lora"]["rankPattern"] = json!({"q_proj": 0});
    let message = rejected(&api, job).await;
    assert_names(
        &message,
        &[
            "spec.method.lora.rankPattern.q_proj",
            "greater than or equal to 1",
        ],
    );

    let mut job = valid_job("pattern-rank-huge");
    job["spec"]["method"]["lora"]["rankPattern"] = json!({"q_proj": 513});
    let message = rejected(&api, job).await;
    assert_names(
        &message,
        &["rankPattern.q_proj", "less than or equal to 512"],
    );

    let mut job = valid_job("pattern-alpha-zero");
    job["spec"]["method"]["lora"]["alphaPattern"] = json!({"v_proj": 0});
    let message = rejected(&api, job).await;
    assert_names(&message, &["alphaPattern.v_proj", "greater than 0"]);

    let mut job = valid_job("patterns-fit");
    job["spec"]["method"]["lora"]["rankPattern"] = json!({"q_proj": 8, "layers\\.1\\..*": 2});
    job["spec"]["method"]["lora"]["alphaPattern"] = json!({"v_proj": 4.5});
    let object: DynamicObject = serde_json::from_value(job).expect("manifest");
    let stored = api
        .create(&PostParams::default(), &object)
        .await
        .expect("patterns within bounds are accepted");
    assert_eq!(
        stored.data["spec"]["method"]["lora"]["rankPattern"]["q_proj"],
        json!(8)
    );
}

#[tokio::test]
async fn keeping_the_best_and_stopping_early_need_a_validation_split() {
    let (client, ns) = setup("ftj-best").await;
    let api = dynamic_api::<FineTuneJob>(&client, &ns);
    for (name, field, value) in [
        ("best-no-split", "keepBest", json!(true)),
        ("early-no-split", "earlyStoppingPatience", json!(3)),
    ] {
        let mut job = valid_job(name);
        job["spec"]["training"][field] = value.clone();
        job["spec"]["dataset"]["validationFraction"] = json!(0);
        let message = rejected(&api, job).await;
        assert_names(
            &message,
            &["keepBest", "earlyStoppingPatience", "validationFraction"],
        );

        let mut job = valid_job(&format!("{name}-ok"));
        job["spec"]["training"][field] = value;
        job["spec"]["dataset"]["validationFraction"] = json!(0.1);
        let object: DynamicObject = serde_json::from_value(job).expect("manifest");
        api.create(&PostParams::default(), &object)
            .await
            .expect("with a validation split it is accepted");
    }
    let mut job = valid_job("early-zero");
    job["spec"]["training"]["earlyStoppingPatience"] = json!(0);
    let message = rejected(&api, job).await;
    assert_names(
        &message,
        &[
            "spec.training.earlyStoppingPatience",
            "greater than or equal to 1",
        ],
    );
}

/// DoRA's magnitudes are norms of the exact base weights, and GGUF runtimes have no DoRA:
/// `useDora` with a `.gguf` base is refused at apply; with a safetensors base it is stored.
#[tokio::test]
async fn dora_needs_a_safetensors_base_model() {
    let (client, ns) = setup("ftj-dora").await;
    let api = dynamic_api::<FineTuneJob>(&client, &ns);
    let mut job = valid_job("dora-gguf");
    job["spec"]["baseModel"]["uri"] = json!("s3://models/llama-3.2-1b/model-q8_0.gguf");
    job["spec"]["method"]["lora"]["useDora"] = json!(true);
    let message = rejected(&api, job).await;
    assert_names(&message, &["spec.method.lora.useDora", ".gguf"]);

    let mut job = valid_job("lora-gguf");
    job["spec"]["baseModel"]["uri"] = json!("s3://models/llama-3.2-1b/model-q8_0.gguf");
    let object: DynamicObject = serde_json::from_value(job).expect("manifest");
    api.create(&PostParams::default(), &object)
        .await
        .expect("plain LoRA on a GGUF base is accepted");

    let mut job = valid_job("dora");
    job["spec"]["method"]["lora"]["useDora"] = json!(true);
    let object: DynamicObject = serde_json::from_value(job).expect("manifest");
    let stored = api
        .create(&PostParams::default(), &object)
        .await
        .expect("DoRA on a safetensors base is accepted");
    assert_eq!(
        stored.data["spec"]["method"]["lora"]["useDora"],
        json!(true)
    );

    for init in ["olora", "pissa"] {
        let mut job = valid_job(&format!("dora-{init}"));
        job["spec"]["method"]["lora"]["useDora"] = json!(true);
        job["spec"]["method"]["lora"]["init"] = json!(init);
        let message = rejected(&api, job).await;
        assert_names(&message, &["spec.method.lora.useDora", "olora or pissa"]);
    }
}

#[tokio::test]
async fn packing_is_accepted_alone_and_refused_with_length_grouping() {
    let (client, ns) = setup("ftj-packing").await;
    let api = dynamic_api::<FineTuneJob>(&client, &ns);
    let mut job = valid_job("packed-grouped");
    job["spec"]["training"] = json!({"packing": true, "groupByLength": true});
    let message = rejected(&api, job).await;
    assert_names(&message, &["spec.training.packing", "groupByLength"]);

    for (name, training) in [
        ("packed", json!({"packing": true})),
        (
            "packed-ungrouped",
            json!({"packing": true, "groupByLength": false}),
        ),
        ("grouped", json!({"groupByLength": true, "packing": false})),
    ] {
        let mut job = valid_job(name);
        job["spec"]["training"] = training.clone();
        let object: DynamicObject = serde_json::from_value(job).expect("manifest");
        let stored = api
            .create(&PostParams::default(), &object)
            .await
            .unwrap_or_else(|e| panic!("{training} is accepted: {e}"));
        assert_eq!(
            stored.data["spec"]["training"]["packing"],
            training["packing"]
        );
    }
}

#[tokio::test]
async fn weight_decay_is_between_0_and_1() {
    let (client, ns) = setup("ftj-decay").await;
    let api = dynamic_api::<FineTuneJob>(&client, &ns);
    for (name, value, limit) in [
        ("decay-negative", -0.1, "greater than or equal to 0"),
        ("decay-huge", 1.5, "less than or equal to 1"),
    ] {
        let mut job = valid_job(name);
        job["spec"]["training"]["weightDecay"] = json!(value);
        let message = rejected(&api, job).await;
        assert_names(&message, &["spec.training.weightDecay", limit]);
    }
}

#[tokio::test]
async fn a_name_longer_than_a_job_name_may_be_is_rejected() {
    let (client, ns) = setup("ftj-name").await;
    let long = "a".repeat(64);
    let message = rejected(&dynamic_api::<FineTuneJob>(&client, &ns), valid_job(&long)).await;
    assert_names(&message, &["metadata.name", "at most 63 characters"]);
    let fits = "b".repeat(63);
    let object: DynamicObject = serde_json::from_value(valid_job(&fits)).expect("manifest");
    dynamic_api::<FineTuneJob>(&client, &ns)
        .create(&PostParams::default(), &object)
        .await
        .expect("63 characters fit");
}

#[tokio::test]
async fn non_positive_alpha_and_learning_rate_are_rejected() {
    let (client, ns) = setup("ftj-positive").await;
    let mut job = valid_job("alpha-zero");
    job["spec"]["method"]["lora"]["alpha"] = json!(0);
    job["spec"]["training"] = json!({"learningRate": 0});
    let message = rejected(&dynamic_api::<FineTuneJob>(&client, &ns), job).await;
    assert_names(
        &message,
        &[
            "spec.method.lora.alpha",
            "spec.training.learningRate",
            "greater than 0",
        ],
    );
}

#[tokio::test]
async fn unknown_enum_values_are_rejected() {
    let (client, ns) = setup("ftj-enum").await;
    let mut job = valid_job("int3");
    job["spec"]["method"]["quantization"] = json!("int3");
    job["spec"]["training"] = json!({"scheduler": "exponential"});
    job["spec"]["dataset"]["format"] = json!("csv");
    job["spec"]["method"]["lora"]["targetModules"] = json!(["q_proj", "lm_head"]);
    let message = rejected(&dynamic_api::<FineTuneJob>(&client, &ns), job).await;
    assert_names(
        &message,
        &[
            "spec.method.quantization: Unsupported value: \"int3\"",
            "spec.training.scheduler: Unsupported value: \"exponential\"",
            "spec.dataset.format: Unsupported value: \"csv\"",
            "spec.method.lora.targetModules[1]: Unsupported value: \"lm_head\"",
        ],
    );
}

#[tokio::test]
async fn bad_uris_are_rejected_naming_the_field() {
    let (client, ns) = setup("ftj-uri").await;
    let mut job = valid_job("bad-uri");
    job["spec"]["baseModel"]["uri"] = json!("gs://models/llama");
    job["spec"]["output"]["uri"] = json!("hf://org/adapter");
    job["spec"]["dataset"]["uri"] = json!("s3://");
    let message = rejected(&dynamic_api::<FineTuneJob>(&client, &ns), job).await;
    assert_names(
        &message,
        &[
            "spec.baseModel.uri",
            "spec.output.uri",
            "spec.dataset.uri",
            "should match",
        ],
    );
}

#[tokio::test]
async fn resources_must_be_quantities_and_gpus_a_domain_prefixed_resource() {
    let (client, ns) = setup("ftj-resources").await;
    let api = dynamic_api::<FineTuneJob>(&client, &ns);
    let mut job = valid_job("bad-resources");
    job["spec"]["resources"] = json!({"memory": "lots", "cpu": "-2", "gpuResourceName": "gpu"});
    job["spec"]["activeDeadlineSeconds"] = json!(0);
    let message = rejected(&api, job).await;
    assert_names(
        &message,
        &[
            "memory: a quantity such as 32Gi",
            "cpu: a quantity such as 8 or 500m",
            "spec.resources.gpuResourceName",
            "spec.activeDeadlineSeconds",
        ],
    );
    let mut job = valid_job("kubernetes-gpu");
    job["spec"]["resources"] = json!({"gpuResourceName": "kubernetes.io/gpu"});
    let message = rejected(&api, job).await;
    assert_names(&message, &["outside the kubernetes.io domain"]);

    let mut good = valid_job("good-resources");
    good["spec"]["resources"] =
        json!({"memory": "32Gi", "cpu": 8, "gpuResourceName": "amd.com/gpu", "gpus": 2});
    good["spec"]["activeDeadlineSeconds"] = json!(86_400);
    let object: DynamicObject = serde_json::from_value(good).expect("manifest");
    api.create(&PostParams::default(), &object)
        .await
        .expect("quantities, an integer CPU count and a vendor's GPU resource are accepted");
}

#[tokio::test]
async fn a_server_grant_names_namespaces_and_servers_of_the_kinds_it_admits() {
    let (client, ns) = setup("grant").await;
    let api = dynamic_api::<graft_api::ServerGrant>(&client, &ns);
    let grant = |from: Value, to: Value| {
        json!({"apiVersion": "graft.dev/v1alpha1", "kind": "ServerGrant",
               "metadata": {"name": "team-a"}, "spec": {"from": from, "to": to}})
    };
    let message = rejected(
        &api,
        grant(
            json!([{"kind": "Pod", "namespace": "team-a"}]),
            json!([{"name": "Not_A_Name"}]),
        ),
    )
    .await;
    assert_names(
        &message,
        &[
            "spec.from[0].kind: Unsupported value: \"Pod\"",
            "spec.to[0].name",
        ],
    );
    let message = rejected(&api, grant(json!([]), json!([{}]))).await;
    assert_names(&message, &["spec.from"]);
    let object: DynamicObject =
        serde_json::from_value(grant(json!([{"namespace": "team-a"}]), json!([{}])))
            .expect("manifest");
    let stored = api
        .create(&PostParams::default(), &object)
        .await
        .expect("a grant to every server here");
    assert_eq!(stored.data["spec"]["from"][0]["kind"], "AdapterDeployment");
    assert_eq!(stored.data["spec"]["to"][0]["group"], "apps");
}

#[tokio::test]
async fn missing_required_fields_are_rejected() {
    let (client, ns) = setup("ftj-required").await;
    let mut job = valid_job("no-output");
    job["spec"].as_object_mut().expect("spec").remove("output");
    let message = rejected(&dynamic_api::<FineTuneJob>(&client, &ns), job).await;
    assert_names(&message, &["spec.output: Required value"]);
}

#[tokio::test]
async fn adapter_weights_must_sum_to_100() {
    let (client, ns) = setup("ad-weights").await;
    let api = dynamic_api::<AdapterDeployment>(&client, &ns);
    let mut ad = valid_deployment("weights");
    ad["spec"]["versions"][1]["weight"] = json!(20);
    let message = rejected(&api, ad).await;
    assert_names(&message, &["spec.versions", "weights must sum to 100"]);

    let mut ad = valid_deployment("weight-range");
    ad["spec"]["versions"][0]["weight"] = json!(101);
    let message = rejected(&api, ad).await;
    assert_names(
        &message,
        &["spec.versions[0].weight", "less than or equal to 100"],
    );
}

#[tokio::test]
async fn adapter_deployment_takes_at_most_two_versions_each_with_one_source() {
    let (client, ns) = setup("ad-versions").await;
    let api = dynamic_api::<AdapterDeployment>(&client, &ns);
    let mut ad = valid_deployment("three");
    ad["spec"]["versions"] = json!([
        {"source": {"fineTuneJobRef": {"name": "a"}}, "weight": 34},
        {"source": {"fineTuneJobRef": {"name": "b"}}, "weight": 33},
        {"source": {"fineTuneJobRef": {"name": "c"}}, "weight": 33}
    ]);
    assert_names(
        &rejected(&api, ad).await,
        &["spec.versions", "at most 2 versions"],
    );

    let mut ad = valid_deployment("both-sources");
    ad["spec"]["versions"][0]["source"]["uri"] = json!("s3://adapters/x/");
    assert_names(
        &rejected(&api, ad).await,
        &[
            "spec.versions[0].source",
            "exactly one of fineTuneJobRef or uri",
        ],
    );

    let mut ad = valid_deployment("no-digest");
    ad["spec"]["versions"][1]["source"]
        .as_object_mut()
        .expect("source")
        .remove("sha256");
    assert_names(
        &rejected(&api, ad).await,
        &["spec.versions[1].source.sha256", "required with source.uri"],
    );

    // The valid canary itself is accepted, and a single version defaults to all the traffic.
    let object: DynamicObject =
        serde_json::from_value(valid_deployment("canary")).expect("manifest");
    api.create(&PostParams::default(), &object)
        .await
        .expect("a valid canary is accepted");
    let mut single = valid_deployment("single");
    single["spec"]["versions"] = json!([{"source": {"fineTuneJobRef": {"name": "a"}}}]);
    let object: DynamicObject = serde_json::from_value(single).expect("manifest");
    let stored = api
        .create(&PostParams::default(), &object)
        .await
        .expect("a single version is accepted");
    assert_eq!(stored.data["spec"]["versions"][0]["weight"], json!(100));
}

#[tokio::test]
async fn spec_is_immutable_once_the_job_started_except_suspend() {
    let (client, ns) = setup("ftj-immutable").await;
    let api: Api<FineTuneJob> = Api::namespaced(client.clone(), &ns);
    let object: FineTuneJob = serde_json::from_value(valid_job("started")).expect("manifest");
    api.create(&PostParams::default(), &object)
        .await
        .expect("create");
    let params = PatchParams::default();

    // Before the start the spec may change freely.
    let change_lr = |lr: f64| Patch::Merge(json!({"spec": {"training": {"learningRate": lr}}}));
    api.patch("started", &params, &change_lr(1e-4))
        .await
        .expect("editable before start");

    // The operator marks the job started through the status subresource.
    let started = json!({"status": {"phase": "Running", "startTime": "2026-11-23T10:00:00Z"}});
    api.patch_status("started", &params, &Patch::Merge(started))
        .await
        .expect("status");

    let err = api
        .patch("started", &params, &change_lr(3e-4))
        .await
        .expect_err("immutable after start");
    let kube::Error::Api(status) = err else {
        panic!("unexpected error: {err}")
    };
    assert_eq!(status.code, 422);
    assert_names(
        &status.message,
        &["spec", "immutable once the job has started"],
    );

    // suspend stays mutable, so Kueue can preempt a running job.
    let suspended = api
        .patch(
            "started",
            &params,
            &Patch::Merge(json!({"spec": {"suspend": true}})),
        )
        .await
        .expect("suspend is allowed after start");
    assert!(suspended.spec.suspend);
    assert!((suspended.spec.training.learning_rate - 1e-4).abs() < 1e-12);
}

#[tokio::test]
async fn kubectl_shows_short_names_and_printer_columns_from_the_status_subresource() {
    let (client, ns) = setup("columns").await;
    let discovery = kube::Discovery::new(client.clone())
        .filter(&["graft.dev"])
        .run()
        .await
        .expect("discovery");
    let group = discovery.groups().next().expect("graft.dev is served");
    let kinds: Vec<(ApiResource, ApiCapabilities)> = group.recommended_resources();
    let mut plurals: Vec<_> = kinds.iter().map(|(r, _)| r.plural.clone()).collect();
    plurals.sort();
    assert_eq!(
        plurals,
        ["adapterdeployments", "finetunejobs", "servergrants"]
    );
    for (resource, caps) in kinds.iter().filter(|(r, _)| r.plural != "servergrants") {
        assert!(
            caps.subresources.iter().any(|(s, _)| s.plural == "status"),
            "{} has /status",
            resource.plural
        );
    }

    let api: Api<FineTuneJob> = Api::namespaced(client, &ns);
    let object: FineTuneJob = serde_json::from_value(valid_job("columns")).expect("manifest");
    api.create(&PostParams::default(), &object)
        .await
        .expect("create");
    let progress = json!({"status": {"phase": "Running", "method": "lora",
        "progress": {"step": 40, "totalSteps": 300, "loss": 1.25}}});
    api.patch_status("columns", &PatchParams::default(), &Patch::Merge(progress))
        .await
        .expect("status");

    let out = ControlPlane::shared()
        .await
        .command("kubectl")
        .args(["get", "ftj", "-n", &ns])
        .output()
        .expect("kubectl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    let mut lines = table.lines();
    let header: Vec<_> = lines.next().expect("header").split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "PHASE", "METHOD", "STEP", "TOTAL", "LOSS", "AGE"],
        "{table}"
    );
    let row: Vec<_> = lines.next().expect("row").split_whitespace().collect();
    assert_eq!(
        row[..6],
        ["columns", "Running", "lora", "40", "300", "1.25"],
        "{table}"
    );
}

#[tokio::test]
async fn shipped_examples_pass_server_side_validation() {
    let (_client, ns) = setup("examples").await;
    let examples = graft_testenv::repo_root().join("examples");
    // The GitOps example's manifests too; its Argo CD objects need Argo's CRDs, not ours.
    let mut files: Vec<_> = [examples.clone(), examples.join("gitops/team-a")]
        .iter()
        .flat_map(|dir| std::fs::read_dir(dir).expect("examples/"))
        .map(|e| e.expect("entry").path())
        .filter(|f| f.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut manifests = Vec::new();
    for file in &files {
        manifests.extend(b"---\n");
        manifests.extend(std::fs::read(file).expect("example"));
    }
    let stdout = ControlPlane::shared().await.server_dry_run(&ns, &manifests);
    for object in [
        "finetunejob.graft.dev/support-bot-v3",
        "finetunejob.graft.dev/support-bot-ia3",
        "finetunejob.graft.dev/support-bot-prompt",
        "adapterdeployment.graft.dev/support-bot",
        "secret/s3-credentials",
    ] {
        assert!(stdout.contains(object), "{object} missing in:\n{stdout}");
    }
}

#[tokio::test]
async fn an_adapter_deployments_server_and_name_are_immutable_but_versions_are_not() {
    let (client, ns) = setup("ad-immutable").await;
    let api = dynamic_api::<AdapterDeployment>(&client, &ns);
    let object: DynamicObject = serde_json::from_value(valid_deployment("bot")).expect("manifest");
    api.create(&PostParams::default(), &object)
        .await
        .expect("create");
    let params = PatchParams::default();
    for (change, field) in [
        (
            json!({"spec": {"server": {"name": "other"}}}),
            "spec.server",
        ),
        (
            json!({"spec": {"adapterName": "other"}}),
            "spec.adapterName",
        ),
    ] {
        let err = api
            .patch("bot", &params, &Patch::Merge(change))
            .await
            .expect_err("immutable");
        let kube::Error::Api(status) = err else {
            panic!("unexpected error: {err}")
        };
        assert_eq!(status.code, 422);
        assert_names(&status.message, &[field, "immutable"]);
    }
    let promoted = json!({"spec": {"versions": [
        {"source": {"uri": "s3://adapters/support-bot/v4/", "sha256": "a".repeat(64)}, "weight": 100}
    ]}});
    api.patch("bot", &params, &Patch::Merge(promoted))
        .await
        .expect("versions stay editable: that is how a promotion is made");
}
