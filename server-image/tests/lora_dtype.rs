//! `--lora-dtype bfloat16`: LoRA adapters kept in bf16 beside the f32 model on the CPU give,
//! through a running server, the f32 server's greedy answer with log-probabilities within
//! bf16's rounding, and still share batches with the base.

mod common;

use common::{BASE, Server, random_adapter, store, text};
use graft_engine::adapters::Site;
use graft_testenv::S3Server;
use serde_json::json;

/// The first generated token's log-probability and the whole greedy text.
async fn greedy(server: &Server, model: &str, prompt: &str) -> (f64, String) {
    let (status, body) = server
        .post(
            "/v1/completions",
            json!({"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0,
                   "logprobs": 1}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let logprob = body["choices"][0]["logprobs"]["token_logprobs"][0]
        .as_f64()
        .expect("a log-probability");
    (logprob, text(&body).to_owned())
}

#[tokio::test]
async fn bf16_adapters_answer_as_f32_ones_within_their_rounding() {
    let s3 = S3Server::shared().await;
    let bucket = s3.bucket("lora-dtype");
    let adapter = random_adapter(8, 7, &[Site::QProj, Site::VProj, Site::DownProj]);
    let adapter = store(s3, &bucket, "a", &adapter).await;
    let exact = Server::start(&[]).await;
    let halved = Server::start(&["--lora-dtype", "bfloat16"]).await;
    for server in [&exact, &halved] {
        let (status, body) = server.put_adapter("tuned", &[(&adapter, 100)]).await;
        assert_eq!(status, 200, "{body}");
    }
    let prompt = "colour blue";
    let (exact_logprob, exact_text) = greedy(&exact, "tuned", prompt).await;
    let (halved_logprob, halved_text) = greedy(&halved, "tuned", prompt).await;
    let (_, base_text) = greedy(&halved, BASE, prompt).await;
    assert_ne!(
        halved_text, base_text,
        "the bf16 adapter changes the answer"
    );
    assert_eq!(
        halved_text, exact_text,
        "bf16's rounding keeps the greedy answer"
    );
    let moved = (halved_logprob - exact_logprob).abs();
    assert!(
        moved > 0.0 && moved < 1e-2,
        "the first token's log-probability moved by {moved}"
    );
    let together = futures::future::join_all(
        ["tuned", BASE, "tuned"].map(|model| halved.complete(model, prompt, 12)),
    )
    .await;
    for (body, expected) in together
        .iter()
        .zip([&halved_text, &base_text, &halved_text])
    {
        assert_eq!(text(body), expected, "in a mixed batch");
    }
}
