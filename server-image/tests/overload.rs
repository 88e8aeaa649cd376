//! A real `graft-server` with a KV cache far smaller than its load: sequences are admitted as
//! their blocks fit, the newest give theirs back when decoding needs more and are computed
//! again later, shared prompt blocks are reused per adapter — and no request fails or changes
//! its answer for it.

mod common;

use common::{BASE, Server, random_adapter, store, text};
use graft_engine::adapters::Site;
use graft_testenv::S3Server;
use serde_json::{Value, json};

/// The request `i` of the load: two prompts out of three share a long opening, half go
/// through an adapter.
fn request(i: usize) -> Value {
    let shared = "colour red fox blue owl green cat gold yak pink emu teal eel ";
    let own = ["red", "blue", "green", "gold", "pink", "teal", "fox", "owl"][i % 8];
    let prompt = if i.is_multiple_of(3) {
        format!("{own} {i} colour")
    } else {
        format!("{shared}{own} {i}")
    };
    json!({
        "model": if i.is_multiple_of(2) { BASE } else { "tuned" },
        "prompt": prompt,
        "max_tokens": 48,
        "temperature": 0,
        "ignore_eos": true,
        "stop": [],
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn an_overloaded_kv_cache_preempts_and_every_answer_is_the_one_given_alone() {
    let s3 = S3Server::shared().await;
    let bucket = s3.bucket("overload");
    // Room for two sequences of the whole context (128 tokens) at once, asked for by 64.
    let server = Server::start(&[
        "--max-model-len",
        "128",
        "--kv-cache-tokens",
        "256",
        "--max-batch-size",
        "64",
    ])
    .await;
    let stored = store(
        s3,
        &bucket,
        "tuned",
        &random_adapter(4, 7, &[Site::QProj, Site::VProj]),
    )
    .await;
    let (status, body) = server.put_adapter("tuned", &[(&stored, 100)]).await;
    assert_eq!(status, 200, "{body}");

    let answers =
        futures::future::join_all((0..64).map(|i| server.post("/v1/completions", request(i))))
            .await;
    let preemptions = server.metric("graft_server_preemptions_total").await;
    let hits = server
        .metric("graft_server_prefix_cache_hit_tokens_total")
        .await;
    for (i, (status, body)) in answers.iter().enumerate() {
        assert_eq!(*status, 200, "request {i} failed: {body}");
        assert_eq!(
            body["usage"]["completion_tokens"], 48,
            "request {i}: {body}"
        );
    }
    assert!(preemptions > 0.0, "64 sequences in room for 2 preempt");
    assert!(hits > 0.0, "shared openings come from the prefix cache");
    for (i, (_, body)) in answers.iter().enumerate() {
        let (status, alone) = server.post("/v1/completions", request(i)).await;
        assert_eq!(status, 200, "{alone}");
        assert_eq!(text(body), text(&alone), "request {i} under load and alone");
    }
    // The adapter's sequences did not take the base model's cached blocks, or the reverse.
    let through_it = server.post("/v1/completions", request(1)).await.1;
    let mut as_base = request(1);
    as_base["model"] = json!(BASE);
    let base = server.post("/v1/completions", as_base).await.1;
    assert_ne!(
        text(&through_it),
        text(&base),
        "the adapter changes the answer"
    );
    eprintln!("preemptions {preemptions}, prefix-cache hit tokens {hits}");
}
