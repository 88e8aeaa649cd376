//! Prompt-learning adapters (prompt tuning, P-tuning, prefix tuning) through a running
//! `graft-server`: hot-loaded with the admin API like LoRA adapters, their virtual tokens'
//! keys and values computed once at load; served in the same batches as LoRA, (IA)³,
//! bottleneck and base requests (each answer what it is alone); the prompt counted as the client
//! sent it; the context shortened by the virtual tokens; refused with the reason when they do
//! not fit.

mod common;

use candle_core::{Device, Tensor};
use common::{
    BASE, Server, model_config, random_adapter, random_bottleneck, random_ia3, store_peft, text,
};
use graft_engine::{
    adapters::{PeftAdapter, PromptAdapter, PromptConfig, PromptMethod, Site},
    rng::Rng,
};
use graft_testenv::S3Server;
use serde_json::json;

/// Virtual tokens drawn as a fresh prompt-tuning table is (standard normal), far from the
/// model's own embeddings (or, prefix tuning, keys and values), so they change the answers.
fn random_prompt(method: PromptMethod, virtual_tokens: usize, seed: u64) -> PeftAdapter {
    let config = PromptConfig::for_model(method, virtual_tokens, &model_config());
    let width = config.row_width().expect("a prompt-learning method");
    let mut rng = Rng::seed(seed);
    let values: Vec<f32> = (0..virtual_tokens * width)
        .map(|_| rng.normal(1.0))
        .collect();
    let embeddings =
        Tensor::from_vec(values, (virtual_tokens, width), &Device::Cpu).expect("embeddings");
    PeftAdapter::Prompt(PromptAdapter { config, embeddings })
}

#[tokio::test]
async fn prompt_adapters_hot_load_and_share_batches_with_lora_and_the_base() {
    let s3 = S3Server::shared().await;
    let bucket = s3.bucket("prompt");
    let server = Server::start(&["--max-batch-size", "12"]).await;
    // 20 virtual tokens cross a KV block; P-tuning's published form is the same table; the
    // bottleneck adapter is stored as AdapterHub's files (adapter.safetensors).
    let made = [
        ("tuned", random_prompt(PromptMethod::PromptTuning, 20, 3)),
        ("p-tuned", random_prompt(PromptMethod::PTuning, 5, 4)),
        ("prefixed", random_prompt(PromptMethod::PrefixTuning, 7, 8)),
        (
            "lora",
            PeftAdapter::Lora(random_adapter(4, 1, &[Site::QProj, Site::VProj])),
        ),
        ("scaled", PeftAdapter::Ia3(random_ia3(9))),
        ("bottleneck", PeftAdapter::Bottleneck(random_bottleneck(10))),
    ];
    for (name, adapter) in &made {
        let stored = store_peft(s3, &bucket, name, adapter).await;
        let (status, body) = server.put_adapter(name, &[(&stored, 100)]).await;
        assert_eq!(status, 200, "{name}: {body}");
    }

    let prompt = "colour red";
    // Every method Graft serves, and the base, in one batch.
    let models = [
        "tuned",
        "p-tuned",
        "prefixed",
        "lora",
        "scaled",
        "bottleneck",
        BASE,
    ];
    let base = models.len() - 1;
    let mut alone = Vec::new();
    for model in models {
        let body = server.complete(model, prompt, 12).await;
        // The prompt as the client sent it: the virtual tokens are not the client's.
        let base = server.complete(BASE, prompt, 1).await;
        assert_eq!(
            body["usage"]["prompt_tokens"], base["usage"]["prompt_tokens"],
            "{model}: {body}"
        );
        alone.push(text(&body).to_owned());
    }
    assert_ne!(
        alone[0], alone[base],
        "the virtual tokens change the answer"
    );
    assert_ne!(alone[1], alone[base], "so do P-tuning's");
    assert_ne!(alone[2], alone[base], "and prefix tuning's keys and values");
    assert_ne!(alone[4], alone[base], "and the (IA)³ vectors");
    assert_ne!(alone[5], alone[base], "and the bottleneck modules");
    assert_ne!(alone[0], alone[1], "and the two differ");
    // All at once, twice over: they decode in the same steps.
    let together = futures::future::join_all(
        models
            .iter()
            .chain(&models)
            .map(|model| server.complete(model, prompt, 12)),
    )
    .await;
    for (i, body) in together.iter().enumerate() {
        assert_eq!(
            text(body),
            alone[i % models.len()],
            "request {i} in a mixed batch"
        );
    }

    // The virtual tokens take positions of the context: what fits the base does not fit.
    let (_, models_list) = server
        .request(reqwest::Method::GET, "/v1/models", None, None)
        .await;
    let context = models_list["data"][0]["max_model_len"]
        .as_u64()
        .expect("max_model_len");
    let prompt_tokens = server.complete(BASE, prompt, 1).await["usage"]["prompt_tokens"]
        .as_u64()
        .expect("prompt tokens");
    let whole = context - prompt_tokens;
    let ask = |model: &str, max_tokens: u64| json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0});
    let (status, body) = server.post("/v1/completions", ask(BASE, whole)).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server.post("/v1/completions", ask("tuned", whole)).await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("maximum context length"), "{message}");
    let (status, body) = server
        .post("/v1/completions", ask("tuned", whole - 20))
        .await;
    assert_eq!(status, 200, "{body}");

    // Too many virtual tokens for the context, or for an adapter's share of the cache:
    // refused with the reason, and the adapter keeps serving.
    let long = usize::try_from(context).expect("fits");
    let long = store_peft(
        s3,
        &bucket,
        "long",
        &random_prompt(PromptMethod::PromptTuning, long, 5),
    )
    .await;
    let (status, body) = server.put_adapter("tuned", &[(&long, 100)]).await;
    assert_eq!(status, 422, "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("virtual tokens leave no room"),
        "{message}"
    );
    assert_eq!(text(&server.complete("tuned", prompt, 12).await), alone[0]);
}

/// A server whose adapter shares are small (`--max-lora-rank 1`) refuses virtual tokens whose
/// keys and values would not fit one, and bottleneck modules that would not, naming the flag.
#[tokio::test]
async fn virtual_tokens_or_bottleneck_modules_beyond_an_adapter_share_are_refused() {
    let s3 = S3Server::shared().await;
    let bucket = s3.bucket("prompt-share");
    let server = Server::start(&["--max-lora-rank", "1"]).await;
    let config = model_config();
    let per_layer: usize = config
        .sites()
        .iter()
        .filter_map(|&s| config.site_shape(s))
        .map(|(out, input)| out + input)
        .sum();
    // One rank-1 share over 2·kv_heads·head_dim values a token and layer, plus one.
    let fits = per_layer / (2 * config.num_kv_heads * config.head_dim);
    let too_many = store_peft(
        s3,
        &bucket,
        "many",
        &random_prompt(PromptMethod::PromptTuning, fits + 1, 6),
    )
    .await;
    let (status, body) = server.put_adapter("many", &[(&too_many, 100)]).await;
    assert_eq!(status, 422, "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("adapter's share") && message.contains("--max-lora-rank"),
        "{message}"
    );
    let few = store_peft(
        s3,
        &bucket,
        "few",
        &random_prompt(PromptMethod::PromptTuning, fits, 6),
    )
    .await;
    let (status, body) = server.put_adapter("few", &[(&few, 100)]).await;
    assert_eq!(status, 200, "{body}");

    // A quarter of the width after both blocks: about twice a rank-1 share per layer.
    let wide = random_bottleneck(7);
    assert!(
        wide.parameters() > per_layer * config.num_layers,
        "more than a share"
    );
    let wide = store_peft(s3, &bucket, "wide", &PeftAdapter::Bottleneck(wide)).await;
    let (status, body) = server.put_adapter("wide", &[(&wide, 100)]).await;
    assert_eq!(status, 422, "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("bottleneck modules") && message.contains("--max-lora-rank"),
        "{message}"
    );
    // The server goes on serving.
    assert_eq!(
        server.complete("few", "colour red", 4).await["object"],
        "text_completion"
    );
}

/// Sequences behind virtual tokens share their prompts' blocks through the prefix cache, as the
/// base's do: a second request with the same long prompt through the same version starts from
/// the blocks after the virtual tokens that the first filled, and answers as the first did. The
/// blocks are named by the version: another version with as many virtual tokens finds none.
#[tokio::test]
async fn prompts_behind_virtual_tokens_share_blocks_through_the_prefix_cache() {
    let s3 = S3Server::shared().await;
    let bucket = s3.bucket("prompt-prefix-cache");
    let server = Server::start(&[]).await;
    // 20 virtual tokens fill a block of their own and part of the next; 7 part of one.
    for (name, method, virtual_tokens, seed) in [
        ("tuned", PromptMethod::PromptTuning, 20, 11),
        ("tuned-again", PromptMethod::PromptTuning, 20, 12),
        ("prefixed", PromptMethod::PrefixTuning, 7, 13),
    ] {
        let adapter = random_prompt(method, virtual_tokens, seed);
        let stored = store_peft(s3, &bucket, name, &adapter).await;
        let (status, body) = server.put_adapter(name, &[(&stored, 100)]).await;
        assert_eq!(status, 200, "{name}: {body}");
    }
    // About 50 tokens: past the first block after the virtual tokens, within the context.
    let prompt = "colour red colour green colour blue colour red colour green colour";
    let hits = || server.metric("graft_server_prefix_cache_hit_tokens_total");
    for model in ["tuned", "prefixed"] {
        let before = hits().await;
        let first = server.complete(model, prompt, 8).await;
        let between = hits().await;
        let second = server.complete(model, prompt, 8).await;
        let after = hits().await;
        assert!(
            (between - before).abs() < f64::EPSILON,
            "{model}: the first request finds nothing ({before} → {between})"
        );
        assert!(
            after - between >= 16.0,
            "{model}: the second starts from the first's blocks ({between} → {after})"
        );
        assert_eq!(text(&second), text(&first), "{model}");
    }
    let before = hits().await;
    server.complete("tuned-again", prompt, 8).await;
    assert!(
        (hits().await - before).abs() < f64::EPSILON,
        "another version's blocks are not this one's"
    );
}
