//! Many adapters in one batch, and versions swapped under load: every request is answered,
//! by exactly one version, with what that version answers alone.

mod common;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use common::{BASE, Server, TestAdapter, random_adapter, store, text};
use graft_engine::adapters::Site;
use graft_testenv::S3Server;
use serde_json::{Value, json};

const PROMPT: &str = "colour plum";
const TOKENS: usize = 10;

async fn adapters(s3: &S3Server, bucket: &str, n: usize) -> Vec<TestAdapter> {
    let mut out = Vec::new();
    for i in 0..n {
        let adapter = random_adapter(4, 100 + i as u64, &Site::SEPARATE);
        out.push(store(s3, bucket, &format!("v{i}"), &adapter).await);
    }
    out
}

fn fingerprint(adapter: &TestAdapter) -> String {
    format!("graft-{}", &adapter.sha256[..16])
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_of_different_adapters_answers_each_as_it_answers_alone() {
    let s3 = S3Server::shared().await;
    let bucket = s3.bucket("mixed");
    let server = Server::start(&[]).await;
    let versions = adapters(s3, &bucket, 6).await;
    let mut names = vec![BASE.to_owned()];
    for (i, v) in versions.iter().enumerate() {
        let name = format!("a{i}");
        let (status, body) = server.put_adapter(&name, &[(v, 100)]).await;
        assert_eq!(status, 200, "{body}");
        names.push(name);
    }
    let mut alone = BTreeMap::new();
    for name in &names {
        alone.insert(
            name.clone(),
            text(&server.complete(name, PROMPT, TOKENS).await).to_owned(),
        );
    }
    let distinct: std::collections::HashSet<&String> = alone.values().collect();
    assert_eq!(
        distinct.len(),
        names.len(),
        "every adapter answers differently: {alone:?}"
    );

    let steps_before = server.metric("graft_server_batch_sequences_count").await;
    let rows_before = server.metric("graft_server_batch_sequences_sum").await;
    for _ in 0..3 {
        let requests = names.iter().map(|name| {
            let name = name.clone();
            let server = &server;
            async move {
                (
                    name.clone(),
                    text(&server.complete(&name, PROMPT, TOKENS).await).to_owned(),
                )
            }
        });
        for (name, answer) in futures::future::join_all(requests).await {
            assert_eq!(answer, alone[&name], "{name} in a mixed batch");
        }
    }
    let steps = server.metric("graft_server_batch_sequences_count").await - steps_before;
    let rows = server.metric("graft_server_batch_sequences_sum").await - rows_before;
    assert!(
        rows / steps > 2.0,
        "requests shared forward steps ({rows} sequence-steps in {steps} steps)"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn swapping_versions_under_load_fails_no_request_and_mixes_no_versions() {
    let s3 = S3Server::shared().await;
    let bucket = s3.bucket("swap");
    let server = Arc::new(Server::start(&[]).await);
    let versions = adapters(s3, &bucket, 3).await;
    // What each version answers alone, by the fingerprint responses carry.
    let mut expected = HashMap::new();
    for v in &versions {
        let (status, body) = server.put_adapter("bot", &[(v, 100)]).await;
        assert_eq!(status, 200, "{body}");
        let answer = server.complete("bot", PROMPT, TOKENS).await;
        assert_eq!(answer["system_fingerprint"], fingerprint(v));
        expected.insert(fingerprint(v), text(&answer).to_owned());
    }

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (server, stop) = (server.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seen: Vec<(String, String)> = Vec::new();
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let (status, body) = server
                        .post(
                            "/v1/completions",
                            json!({"model": "bot", "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0}),
                        )
                        .await;
                    if status == 200 {
                        seen.push((
                            body["system_fingerprint"].as_str().unwrap_or_default().to_owned(),
                            text(&body).to_owned(),
                        ));
                    } else {
                        failures.push(format!("{status}: {body}"));
                    }
                }
                (seen, failures)
            })
        })
        .collect();

    for i in 0..20 {
        let v = &versions[i % 2];
        let (status, body) = server.put_adapter("bot", &[(v, 100)]).await;
        assert_eq!(status, 200, "swap {i}: {body}");
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    }
    // A canary, then its split changed: old 90 / new 10, then 50 / 50.
    for (old, new) in [(90, 10), (50, 50)] {
        let (status, body) = server
            .put_adapter("bot", &[(&versions[1], old), (&versions[2], new)])
            .await;
        assert_eq!(status, 200, "{body}");
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    }
    stop.store(true, Ordering::Relaxed);

    let mut by_version: HashMap<String, usize> = HashMap::new();
    let mut total = 0;
    for client in clients {
        let (seen, failures) = client.await.expect("client task");
        assert!(failures.is_empty(), "failed requests: {failures:?}");
        for (fingerprint, answer) in seen {
            let Some(want) = expected.get(&fingerprint) else {
                panic!("a response from no known version: {fingerprint}");
            };
            assert_eq!(
                &answer, want,
                "a response mixing versions (claims {fingerprint})"
            );
            *by_version.entry(fingerprint).or_default() += 1;
            total += 1;
        }
    }
    assert!(total > 40, "the clients kept sending ({total} responses)");
    for v in &versions {
        assert!(
            by_version.get(&fingerprint(v)).is_some_and(|&n| n > 0),
            "{} served: {by_version:?}",
            v.uri
        );
    }
    let (_, listing) = server.admin_get("/admin/adapters").await;
    let listed: Vec<&Value> = listing["adapters"]["bot"]
        .as_array()
        .expect("bot")
        .iter()
        .collect();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["weight"], 50);
    assert_eq!(listed[1]["sha256"], versions[2].sha256);
}
