//! The HTTP API of a real `graft-server` process: OpenAI-style answers and errors, the admin
//! API's checks on adapters, eviction and reloading, start-up adapters, graceful shutdown.

mod common;

use std::time::Duration;

use common::{BASE, Server, TOKEN, random_adapter, store, text, upload};
use graft_engine::adapters::Site;
use graft_testenv::S3Server;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const SITES: [Site; 3] = [Site::QProj, Site::VProj, Site::DownProj];

fn error_of(body: &Value) -> &Value {
    assert!(
        body["error"]["message"].is_string(),
        "an OpenAI error object: {body}"
    );
    assert!(
        body["error"]["type"].is_string(),
        "an OpenAI error object: {body}"
    );
    &body["error"]
}

/// Requests the server must refuse: `(path, body, status, the parameter named)`.
fn bad_requests() -> Vec<(&'static str, Value, u16, Option<&'static str>)> {
    let long = "colour red fox ".repeat(200);
    vec![
        (
            "/v1/completions",
            json!({"model": "nope", "prompt": "hi"}),
            404,
            Some("model"),
        ),
        (
            "/v1/completions",
            json!({"model": BASE, "prompt": long}),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"model": BASE, "prompt": "hi", "max_tokens": 1000}),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            json!({"model": BASE, "prompt": "hi", "temperature": 3}),
            400,
            Some("temperature"),
        ),
        (
            "/v1/completions",
            json!({"model": BASE, "prompt": "hi", "top_p": 0}),
            400,
            Some("top_p"),
        ),
        (
            "/v1/completions",
            json!({"model": BASE, "prompt": "hi", "top_k": -2}),
            400,
            Some("top_k"),
        ),
        (
            "/v1/completions",
            json!({"model": BASE, "prompt": "hi", "n": 0}),
            400,
            Some("n"),
        ),
        (
            "/v1/completions",
            json!({"model": BASE, "prompt": "hi", "logprobs": 50}),
            400,
            Some("logprobs"),
        ),
        (
            "/v1/completions",
            json!({"model": BASE, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}),
            400,
            Some("stop"),
        ),
        (
            "/v1/completions",
            json!({"model": BASE, "prompt": []}),
            400,
            Some("prompt"),
        ),
        ("/v1/completions", json!({"model": BASE}), 400, None),
        (
            "/v1/completions",
            json!({"model": BASE, "prompt": "hi", "temperature": "hot"}),
            400,
            None,
        ),
        (
            "/v1/chat/completions",
            json!({"model": BASE, "messages": []}),
            400,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            json!({"model": BASE, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            400,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            json!({"model": BASE, "messages": [{"role": "wizard", "content": "hi"}]}),
            400,
            Some("messages"),
        ),
    ]
}

/// Fields the server does not implement, or values it cannot honour, each named.
fn unsupported_requests() -> Vec<(&'static str, Value, u16, Option<&'static str>)> {
    vec![
        (
            "/v1/completions",
            json!({"model": BASE, "prompt": "hi", "n": 2, "best_of": 3, "stream": true}),
            400,
            Some("best_of"),
        ),
        (
            "/v1/completions",
            json!({"model": BASE, "prompt": "hi", "frobnicate": true}),
            400,
            Some("frobnicate"),
        ),
        (
            "/v1/completions",
            json!({"model": BASE, "prompt": "hi", "suffix": "there"}),
            400,
            Some("suffix"),
        ),
        (
            "/v1/completions",
            json!({"model": BASE, "prompt": [1, 99999]}),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"model": BASE, "prompt": "hi", "logit_bias": {"7": 500}}),
            400,
            Some("logit_bias"),
        ),
        (
            "/v1/completions",
            json!({"model": BASE, "prompt": "hi", "response_format": {"type": "json_object"}, "guided_regex": "a+"}),
            400,
            Some("guided_regex"),
        ),
        (
            "/v1/completions",
            json!({"model": BASE, "prompt": "hi", "guided_regex": "(unclosed"}),
            400,
            Some("guided_regex"),
        ),
        (
            "/v1/chat/completions",
            json!({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}),
            400,
            Some("tool_choice"),
        ),
        (
            "/v1/chat/completions",
            json!({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}]}),
            400,
            Some("tools"),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let server = Server::start(&[]).await;
    let mut cases = bad_requests();
    cases.extend(unsupported_requests());
    let healthy = server.complete(BASE, "colour red", 4).await;
    for (path, body, status, param) in cases {
        let (got, answer) = server.post(path, body.clone()).await;
        assert_eq!(got, status, "{body} → {answer}");
        let error = error_of(&answer);
        if let Some(param) = param {
            assert_eq!(error["param"], param, "{body} → {answer}");
        }
        assert_eq!(
            server.complete(BASE, "colour red", 4).await["choices"],
            healthy["choices"]
        );
    }
    let malformed = server
        .client()
        .post(format!("{}/v1/completions", server.url))
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .expect("answers");
    assert_eq!(malformed.status(), 400);
    let body: Value = malformed.json().await.expect("json error");
    assert!(
        error_of(&body)["message"]
            .as_str()
            .expect("message")
            .contains("parse"),
        "{body}"
    );
    assert!(server.daemon.is_running());
}

#[tokio::test(flavor = "multi_thread")]
async fn completions_are_deterministic_count_usage_and_honour_stop_strings() {
    let server = Server::start(&[]).await;
    let first = server.complete(BASE, "colour blue", 12).await;
    let again = server.complete(BASE, "colour blue", 12).await;
    assert_eq!(text(&first), text(&again));
    assert_eq!(first["object"], "text_completion");
    assert_eq!(first["choices"][0]["finish_reason"], "length");
    assert_eq!(first["usage"]["completion_tokens"], 12);
    let prompt_tokens = first["usage"]["prompt_tokens"].as_u64().expect("count");
    assert!(prompt_tokens >= 2);
    assert_eq!(
        first["usage"]["total_tokens"].as_u64(),
        Some(prompt_tokens + 12)
    );

    // A stop string from the middle of the greedy answer cuts it there.
    let full = text(&first).to_owned();
    let chars: Vec<char> = full.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = full.find(&stop).expect("in the text");
    let (status, stopped) = server
        .post(
            "/v1/completions",
            json!({"model": BASE, "prompt": "colour blue", "max_tokens": 12, "temperature": 0, "stop": stop}),
        )
        .await;
    assert_eq!(status, 200, "{stopped}");
    assert_eq!(text(&stopped), &full[..cut]);
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");

    // Sampling with a seed repeats; without temperature 0 it differs from greedy somewhere.
    let sample = async |seed: u64| {
        let (_, body) = server
            .post(
                "/v1/completions",
                json!({"model": BASE, "prompt": "colour", "max_tokens": 16, "temperature": 1.5, "seed": seed}),
            )
            .await;
        text(&body).to_owned()
    };
    assert_eq!(sample(5).await, sample(5).await);
    let mut distinct = std::collections::HashSet::new();
    for seed in 1..=4 {
        distinct.insert(sample(seed).await);
    }
    assert!(distinct.len() > 1, "different seeds, different samples");

    let (status, chat) = server
        .post(
            "/v1/chat/completions",
            json!({"model": BASE, "messages": [{"role": "user", "content": "colour red"}], "max_tokens": 6, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{chat}");
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["choices"][0]["message"]["role"], "assistant");
    assert!(chat["choices"][0]["message"]["content"].is_string());
    assert!(
        chat["usage"]["prompt_tokens"].as_u64().expect("count") > 4,
        "the template adds tokens"
    );

    assert!(server.metric("graft_server_generated_tokens_total").await >= 12.0 * 2.0 + 6.0);
    assert!(
        server
            .metric("graft_server_requests_total{endpoint=\"/v1/completions\",status=\"200\"}")
            .await
            >= 3.0
    );
}

/// Adapters the server must refuse, each with a phrase its reason must contain.
async fn bad_adapters(
    s3: &S3Server,
    bucket: &str,
    good: &common::TestAdapter,
) -> Vec<(common::TestAdapter, &'static str)> {
    let mut bad_digest = good.clone();
    bad_digest.sha256 = format!("{:x}", Sha256::digest(b"something else"));
    let high_rank = store(s3, bucket, "rank16", &random_adapter(16, 2, &SITES)).await;
    let (config, weights) = random_adapter(4, 3, &SITES).to_bytes().expect("bytes");
    let other_base = {
        let graft_json = json!({
            "baseModel": {"uri": "s3://models/other/", "sha256": "0".repeat(64)},
            "dataset": {"uri": "s3://data/x.jsonl", "sha256": "1".repeat(64)},
            "adapter": {"uri": "s3://x/", "sha256": format!("{:x}", Sha256::digest(&weights)), "sizeBytes": weights.len(), "trainableParameters": 1},
            "metrics": {"steps": 1, "trainExamples": 1, "evalExamples": 0, "finalLoss": null, "evalLoss": null, "tokensPerSecond": null},
        });
        let uri = upload(
            s3,
            bucket,
            "other-base",
            &[
                ("adapter_config.json", config.clone()),
                ("adapter_model.safetensors", weights.clone()),
                ("graft.json", graft_json.to_string().into_bytes()),
            ],
        )
        .await;
        common::TestAdapter {
            uri,
            sha256: format!("{:x}", Sha256::digest(&weights)),
        }
    };
    let garbage = b"not a safetensors file".to_vec();
    let corrupt = common::TestAdapter {
        uri: upload(
            s3,
            bucket,
            "corrupt",
            &[
                ("adapter_config.json", config.clone()),
                ("adapter_model.safetensors", garbage.clone()),
            ],
        )
        .await,
        sha256: format!("{:x}", Sha256::digest(&garbage)),
    };
    let other_shape = {
        let dir = graft_testenv::repo_root().join("engine/tests/data/tiny/llama-peft");
        let weights = std::fs::read(dir.join("adapter_model.safetensors")).expect("weights");
        common::TestAdapter {
            uri: upload(
                s3,
                bucket,
                "other-shape",
                &[
                    (
                        "adapter_config.json",
                        std::fs::read(dir.join("adapter_config.json")).expect("config"),
                    ),
                    ("adapter_model.safetensors", weights.clone()),
                ],
            )
            .await,
            sha256: format!("{:x}", Sha256::digest(&weights)),
        }
    };
    let missing = common::TestAdapter {
        uri: format!("s3://{bucket}/nothing-here/"),
        sha256: "a".repeat(64),
    };
    vec![
        (bad_digest, "digest mismatch"),
        (high_rank, "rank 16"),
        (other_base, "another base model"),
        (corrupt, "adapter_model.safetensors"),
        (other_shape, "the model needs"),
        (missing, "has no adapter_model.safetensors"),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_api_needs_the_token_and_refuses_bad_adapters_with_reasons() {
    let s3 = S3Server::shared().await;
    let bucket = s3.bucket("admin");
    let server = Server::start(&["--max-lora-rank", "8"]).await;
    let good = store(s3, &bucket, "good", &random_adapter(4, 1, &SITES)).await;

    for token in [None, Some("wrong")] {
        let (status, body) = server
            .request(reqwest::Method::GET, "/admin/adapters", None, token)
            .await;
        assert_eq!(status, 401, "{body}");
        error_of(&body);
    }
    let (status, body) = server.put_adapter("good", &[(&good, 100)]).await;
    assert_eq!(status, 200, "{body}");
    let base = text(&server.complete(BASE, "colour red", 8).await).to_owned();
    let adapted = server.complete("good", "colour red", 8).await;
    assert_ne!(text(&adapted), base, "the adapter changes the answer");
    assert_eq!(adapted["model"], "good");

    // Every bad adapter is refused with its reason, and nothing else changes.
    let cases = bad_adapters(s3, &bucket, &good).await;
    for (adapter, reason) in cases {
        let (status, body) = server.put_adapter("good", &[(&adapter, 100)]).await;
        assert_eq!(status, 422, "{adapter:?} → {body}");
        let message = error_of(&body)["message"].as_str().expect("message");
        assert!(message.contains(reason), "{reason:?} not in {message:?}");
        assert_eq!(
            text(&server.complete("good", "colour red", 8).await),
            text(&adapted)
        );
    }
    let (status, body) = server.put_adapter("made", &[(&good, 100)]).await;
    assert_eq!(status, 422, "the base model's name is taken: {body}");
    let (_, listing) = server.admin_get("/admin/adapters").await;
    let versions = listing["adapters"]["good"]
        .as_array()
        .expect("good is listed");
    assert_eq!(versions.len(), 1);
    assert_eq!(versions[0]["state"], "loaded");
    assert_eq!(versions[0]["sha256"], good.sha256);
    assert!(versions[0]["loaded_at"].is_string());

    let (_, info) = server.admin_get("/admin/info").await;
    assert_eq!(info["model"], BASE);
    assert_eq!(info["maxLoraRank"], 8);
    assert_eq!(info["architecture"], "llama");

    let (_, models) = server
        .request(reqwest::Method::GET, "/v1/models", None, None)
        .await;
    let ids: Vec<(&str, &Value)> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|m| (m["id"].as_str().expect("id"), &m["parent"]))
        .collect();
    assert_eq!(ids, [(BASE, &Value::Null), ("good", &json!(BASE))]);

    let (status, _) = server
        .request(
            reqwest::Method::DELETE,
            "/admin/adapters/good",
            None,
            Some(TOKEN),
        )
        .await;
    assert_eq!(status, 204);
    let (status, _) = server
        .post("/v1/completions", json!({"model": "good", "prompt": "hi"}))
        .await;
    assert_eq!(status, 404);
    let (status, _) = server
        .request(
            reqwest::Method::DELETE,
            "/admin/adapters/good",
            None,
            Some(TOKEN),
        )
        .await;
    assert_eq!(status, 404);
    assert!(
        server
            .metric("graft_server_adapter_load_failures_total")
            .await
            >= 5.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn least_recently_used_adapters_leave_memory_and_come_back_on_demand() {
    let s3 = S3Server::shared().await;
    let bucket = s3.bucket("lru");
    let server = Server::start(&["--max-loaded-adapters", "2"]).await;
    let mut answers = Vec::new();
    for (i, name) in ["one", "two", "three"].into_iter().enumerate() {
        let adapter = store(s3, &bucket, name, &random_adapter(4, 10 + i as u64, &SITES)).await;
        let (status, body) = server.put_adapter(name, &[(&adapter, 100)]).await;
        assert_eq!(status, 200, "{body}");
        answers.push(text(&server.complete(name, "colour gold", 8).await).to_owned());
    }
    assert!((server.metric("graft_server_loaded_adapters").await - 2.0).abs() < 0.5);
    let (_, listing) = server.admin_get("/admin/adapters").await;
    assert_eq!(
        listing["adapters"]["one"][0]["state"], "offloaded",
        "{listing}"
    );
    // Reloaded from the local disk cache: the same weights, the same answer.
    assert_eq!(
        text(&server.complete("one", "colour gold", 8).await),
        answers[0]
    );
    assert!((server.metric("graft_server_loaded_adapters").await - 2.0).abs() < 0.5);
    let (_, listing) = server.admin_get("/admin/adapters").await;
    assert_eq!(
        listing["adapters"]["one"][0]["state"], "loaded",
        "{listing}"
    );
    assert_eq!(
        listing["adapters"]["two"][0]["state"], "offloaded",
        "{listing}"
    );
    for (name, answer) in ["one", "two", "three"].iter().zip(&answers) {
        assert_eq!(
            text(&server.complete(name, "colour gold", 8).await),
            *answer
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn start_up_adapters_load_before_ready_and_failures_are_listed() {
    let s3 = S3Server::shared().await;
    let bucket = s3.bucket("startup");
    let good = store(s3, &bucket, "good", &random_adapter(4, 21, &SITES)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("adapters.json");
    let adapters = json!({"adapters": {
        "ready-one": {"versions": [{"uri": good.uri, "sha256": good.sha256, "weight": 100}]},
        "broken": {"versions": [{"uri": format!("s3://{bucket}/absent/"), "sha256": "a".repeat(64), "weight": 100}]},
    }});
    std::fs::write(&file, adapters.to_string()).expect("adapters file");
    let path = file.display().to_string();
    let server = Server::start(&["--adapters-file", &path]).await;
    let (_, listing) = server.admin_get("/admin/adapters").await;
    assert_eq!(
        listing["adapters"]["ready-one"][0]["state"], "loaded",
        "{listing}"
    );
    assert_eq!(
        listing["adapters"]["broken"][0]["state"], "failed",
        "{listing}"
    );
    assert!(
        listing["adapters"]["broken"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("absent")),
        "{listing}"
    );
    let adapted = server.complete("ready-one", "colour teal", 6).await;
    assert_eq!(adapted["model"], "ready-one");
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_drains_the_requests_in_flight() {
    let server = Server::start(&[]).await;
    let request = {
        let client = server.client().clone();
        let url = format!("{}/v1/completions", server.url);
        tokio::spawn(async move {
            client
                .post(url)
                .json(&json!({"model": BASE, "prompt": "hi", "max_tokens": 120, "temperature": 0, "stop": []}))
                .send()
                .await
                .expect("answered")
                .json::<Value>()
                .await
                .expect("json")
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let daemon = &server.daemon;
    daemon.terminate(Duration::from_secs(30));
    let body = request.await.expect("the request task");
    assert!(
        body["choices"][0]["finish_reason"].is_string(),
        "finished, not cut: {body}"
    );
    assert!(body["usage"]["completion_tokens"].as_u64().expect("count") > 0);
}

#[test]
fn an_empty_admin_token_file_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "  \n").expect("token file");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_graft-server"))
        .arg("--model")
        .arg(format!("file://{}", common::model_dir().display()))
        .args(["--listen", "127.0.0.1:0", "--admin-token-file"])
        .arg(&token)
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .output()
        .expect("graft-server runs");
    assert!(
        !output.status.success(),
        "an empty token would match a request without one"
    );
    let log = String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
    assert!(log.contains("it is empty"), "{log}");
}

#[test]
fn a_model_quantized_by_an_unsupported_method_is_refused_at_start_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("model");
    std::fs::create_dir(&model).expect("model dir");
    for entry in std::fs::read_dir(common::model_dir()).expect("the tiny model") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), model.join(entry.file_name())).expect("copy");
    }
    let config = model.join("config.json");
    let text = std::fs::read_to_string(&config).expect("config.json");
    let awq = r#""quantization_config": {"quant_method": "awq", "bits": 4}, "model_type""#;
    std::fs::write(&config, text.replace("\"model_type\"", awq)).expect("write");
    let termination_log = dir.path().join("termination-log");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_graft-server"))
        .arg("--model")
        .arg(format!("file://{}", model.display()))
        .args(["--listen", "127.0.0.1:0", "--cache-dir"])
        .arg(dir.path().join("cache"))
        .arg("--termination-log")
        .arg(&termination_log)
        .output()
        .expect("graft-server runs");
    assert!(!output.status.success(), "the server does not serve it");
    let log = String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
    let line = log
        .lines()
        .find(|l| l.contains("graft-server failed"))
        .unwrap_or_else(|| panic!("an error line in the log: {log}"));
    assert!(line.contains("awq checkpoints are not supported"), "{line}");
    let reason = std::fs::read_to_string(&termination_log).expect("a termination message");
    assert!(
        reason.contains("awq checkpoints are not supported"),
        "{reason}"
    );
    assert_eq!(reason.lines().count(), 1, "one line: {reason}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_answers_429_and_the_server_keeps_serving() {
    let server = Server::start(&["--max-batch-size", "1", "--max-waiting", "1"]).await;
    let long =
        json!({"model": BASE, "prompt": "hi", "max_tokens": 100, "temperature": 0, "stop": []});
    let answers =
        futures::future::join_all((0..6).map(|_| server.post("/v1/completions", long.clone())))
            .await;
    let busy: Vec<&Value> = answers
        .iter()
        .filter(|(s, _)| *s == 429)
        .map(|(_, b)| b)
        .collect();
    assert!(
        !busy.is_empty(),
        "six requests for one running and one waiting place: {answers:?}"
    );
    assert_eq!(error_of(busy[0])["type"], "rate_limit_error");
    assert!(
        answers.iter().all(|(s, _)| *s == 200 || *s == 429),
        "{answers:?}"
    );
    assert_eq!(
        server.complete(BASE, "colour red", 4).await["choices"][0]["finish_reason"],
        "length"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_for_an_evicted_adapter_are_served_after_one_reload() {
    let s3 = S3Server::shared().await;
    let bucket = s3.bucket("reload");
    // Room for one adapter: "one" is evicted when "two" loads.
    let server = Server::start(&["--max-loaded-adapters", "1"]).await;
    for (i, name) in ["one", "two"].into_iter().enumerate() {
        let adapter = store(s3, &bucket, name, &random_adapter(4, 40 + i as u64, &SITES)).await;
        assert_eq!(server.put_adapter(name, &[(&adapter, 100)]).await.0, 200);
    }
    let loads = server.metric("graft_server_adapter_loads_total").await;
    let short = json!({"model": "one", "prompt": "hi", "max_tokens": 1, "temperature": 0});
    let answers =
        futures::future::join_all((0..8).map(|_| server.post("/v1/completions", short.clone())))
            .await;
    assert!(answers.iter().all(|(s, _)| *s == 200), "{answers:?}");
    let reloads = server.metric("graft_server_adapter_loads_total").await - loads;
    assert!(
        (reloads - 1.0).abs() < 0.5,
        "{reloads} reloads for 8 concurrent requests"
    );
}

/// Token ids of a completion, read back through vLLM's `return_tokens_as_token_ids`.
fn token_ids(choice: &Value) -> Vec<u32> {
    choice["logprobs"]["tokens"]
        .as_array()
        .expect("logprobs.tokens")
        .iter()
        .map(|t| {
            t.as_str()
                .and_then(|t| t.strip_prefix("token_id:"))
                .and_then(|t| t.parse().ok())
                .expect("token_id:<id>")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn prompts_choices_and_the_sampling_options_vllm_clients_send() {
    let server = Server::start(&[]).await;
    let post = async |body: Value| {
        let (status, answer) = server.post("/v1/completions", body.clone()).await;
        assert_eq!(status, 200, "{body} → {answer}");
        answer
    };
    let greedy = json!({"model": BASE, "max_tokens": 8, "temperature": 0, "logprobs": 0, "return_tokens_as_token_ids": true});
    let with = |extra: Value| {
        let mut body = greedy.clone();
        body.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        body
    };
    let alone = post(with(json!({"prompt": "colour blue"}))).await;
    let ids = token_ids(&alone["choices"][0]);

    // Several prompts, as text and as token ids, each answered as if alone.
    let tokenizer = graft_engine::text::tokenizer::Tokenizer::from_dir(&common::model_dir())
        .expect("tokenizer");
    let prompt_ids = tokenizer.encode("colour blue", true).expect("encode");
    let several = post(with(json!({"prompt": ["colour red", "colour blue"]}))).await;
    let by_ids = post(with(json!({"prompt": [prompt_ids.clone(), prompt_ids]}))).await;
    for answer in [
        &several["choices"][1],
        &by_ids["choices"][0],
        &by_ids["choices"][1],
    ] {
        assert_eq!(answer["text"], alone["choices"][0]["text"], "{answer}");
    }
    assert_eq!(
        by_ids["usage"]["prompt_tokens"].as_u64(),
        alone["usage"]["prompt_tokens"].as_u64().map(|n| n * 2),
        "two prompts: {by_ids}"
    );
    assert_eq!(several["choices"][1]["index"], 1);

    // echo repeats the prompt; stop_token_ids stop on (and keep) a token.
    let echoed = post(json!({"model": BASE, "prompt": "colour blue", "max_tokens": 8, "temperature": 0, "echo": true})).await;
    assert_eq!(
        text(&echoed),
        format!("colour blue{}", text(&alone)),
        "{echoed}"
    );
    let stopped = post(with(
        json!({"prompt": "colour blue", "stop_token_ids": [ids[2]]}),
    ))
    .await;
    let first_stop = ids.iter().position(|&t| t == ids[2]).expect("in it") + 1;
    assert_eq!(token_ids(&stopped["choices"][0]), ids[..first_stop]);
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");

    // min_tokens holds back every stop; ignore_eos makes the length the only one.
    let cut = post(with(
        json!({"prompt": "colour blue", "stop_token_ids": [ids[0]], "min_tokens": 4}),
    ))
    .await;
    assert!(
        token_ids(&cut["choices"][0]).len() >= 4,
        "min_tokens: {cut}"
    );
    let long = post(json!({"model": BASE, "prompt": "colour", "max_tokens": 40, "temperature": 1, "seed": 3, "ignore_eos": true})).await;
    assert_eq!(long["usage"]["completion_tokens"], 40, "{long}");

    // A penalty changes a greedy answer that repeats itself.
    let repeats =
        |ids: &[u32]| ids.len() - ids.iter().collect::<std::collections::HashSet<_>>().len();
    let plain = post(with(json!({"prompt": "colour", "max_tokens": 24}))).await;
    let penalised = post(with(
        json!({"prompt": "colour", "max_tokens": 24, "frequency_penalty": 2.0}),
    ))
    .await;
    assert!(
        repeats(&token_ids(&penalised["choices"][0])) < repeats(&token_ids(&plain["choices"][0])),
        "{plain} vs {penalised}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn best_of_returns_the_likeliest_sample_and_the_router_gauges_are_served() {
    let server = Server::start(&[]).await;
    let post = async |body: Value| {
        let (status, answer) = server.post("/v1/completions", body.clone()).await;
        assert_eq!(status, 200, "{body} → {answer}");
        answer
    };
    // best_of returns the most likely of its samples: the same seed draws the same three.
    let three = post(json!({"model": BASE, "prompt": "colour", "max_tokens": 6, "temperature": 1, "seed": 11, "n": 3, "logprobs": 0})).await;
    let best = post(json!({"model": BASE, "prompt": "colour", "max_tokens": 6, "temperature": 1, "seed": 11, "best_of": 3})).await;
    let choices = three["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 3);
    let likeliest = choices
        .iter()
        .max_by(|a, b| {
            let sum = |c: &Value| -> f64 {
                c["logprobs"]["token_logprobs"]
                    .as_array()
                    .expect("logprobs")
                    .iter()
                    .filter_map(Value::as_f64)
                    .sum()
            };
            sum(a).total_cmp(&sum(b))
        })
        .expect("one");
    assert_eq!(best["choices"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        best["choices"][0]["text"], likeliest["text"],
        "{three} vs {best}"
    );
    assert!(best["choices"][0]["logprobs"].is_null(), "not asked for");

    // The router's gauges, under vLLM's names.
    for name in [
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:lora_requests_info",
    ] {
        let text = server
            .client()
            .get(format!("{}/metrics", server.url))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        assert!(text.contains(&format!("\n{name}{{")), "{name} in\n{text}");
    }
}
