//! Serving benchmark, CPU: generated tokens/s of a real graft-server process with 1, 8 and 32
//! distinct adapters in the batch against the base model alone (same load: 32 concurrent
//! clients), and hot-load latency (admin `PUT` of a new rank-16 adapter from the local S3
//! server until it serves) on the committed tiny model.
//!
//!     cargo bench -p graft-server --bench serving
//!
//! Targets (issue 5): 32 adapters ≥ 70% of base-only throughput; hot-load p99 < 100 ms.

#![allow(clippy::print_stdout)] // a benchmark reports on stdout

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Server, TestAdapter, random_adapter, random_adapter_for, store};
use graft_engine::{adapters::Site, models::Config};
use graft_testenv::S3Server;
use graft_trainer::tiny::{TinySpec, write_tiny_model};
use serde_json::json;

const CLIENTS: usize = 32;
const MAX_TOKENS: usize = 32;
const RUN: Duration = Duration::from_secs(8);
const RANK: usize = 16;

fn small_model(dir: &std::path::Path) -> Config {
    let spec = TinySpec {
        vocab_size: 1024,
        hidden_size: 256,
        intermediate_size: 688,
        num_layers: 4,
        num_heads: 8,
        num_kv_heads: 4,
        max_position_embeddings: 512,
        init_std: 0.05,
        ..TinySpec::default()
    };
    let words = [
        "colour", "red", "fox", "blue", "owl", "the", "quick", "jumps", "over", "lazy",
    ];
    let corpus: Vec<String> = (0..400)
        .map(|i| {
            (0..12)
                .map(|j| words[(i * 7 + j * 3) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let made = write_tiny_model(dir, &spec, &corpus).expect("small model");
    println!(
        "small model: {} parameters, vocabulary {}",
        made.num_parameters, made.vocab_size
    );
    let text = std::fs::read_to_string(dir.join("config.json")).expect("config");
    Config::from_json(&text).expect("config parses")
}

/// Generated tokens per second with `CLIENTS` clients looping over `models`.
async fn throughput(server: &Arc<Server>, models: &[String]) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let tokens = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (server, stop, tokens) = (server.clone(), stop.clone(), tokens.clone());
            let model = models[i % models.len()].clone();
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let (status, body) = server
                        .post(
                            "/v1/completions",
                            json!({"model": model, "prompt": "the quick colour", "max_tokens": MAX_TOKENS,
                                   "temperature": 0.8, "seed": i, "stop": []}),
                        )
                        .await;
                    assert_eq!(status, 200, "{body}");
                    tokens.fetch_add(body["usage"]["completion_tokens"].as_u64().unwrap_or(0), Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(RUN).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.expect("client");
    }
    #[allow(clippy::cast_precision_loss)]
    let rate = tokens.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    rate
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

#[tokio::main]
async fn main() {
    let s3 = S3Server::shared().await;
    let bucket = s3.bucket("bench");

    // Hot-load latency on the tiny model.
    let tiny = Server::start(&["--max-loaded-adapters", "256"]).await;
    let mut latencies = Vec::new();
    for i in 0..100 {
        let adapter = store(
            s3,
            &bucket,
            &format!("hot/{i}"),
            &random_adapter(RANK, 1000 + i, &Site::SEPARATE),
        )
        .await;
        let started = Instant::now();
        let (status, body) = tiny
            .put_adapter(&format!("hot-{i}"), &[(&adapter, 100)])
            .await;
        latencies.push(started.elapsed());
        assert_eq!(status, 200, "{body}");
    }
    latencies.sort();
    println!(
        "hot-load (tiny model, rank {RANK}, 7 targets, from local S3, 100 adapters): p50 {:.1} ms, p99 {:.1} ms",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3
    );
    drop(tiny);

    // Throughput on a small model.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = small_model(dir.path());
    let server = Arc::new(
        Server::start_with_model(
            dir.path(),
            &["--max-batch-size", "32", "--max-loaded-adapters", "64"],
        )
        .await,
    );
    let base = dir
        .path()
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let mut names = Vec::new();
    for i in 0..32 {
        let adapter: TestAdapter = store(
            s3,
            &bucket,
            &format!("small/{i}"),
            &random_adapter_for(&config, RANK, 2000 + i, &Site::SEPARATE),
        )
        .await;
        let name = format!("a{i}");
        let (status, body) = server.put_adapter(&name, &[(&adapter, 100)]).await;
        assert_eq!(status, 200, "{body}");
        names.push(name);
    }
    // Warm up allocator and caches.
    throughput(&server, std::slice::from_ref(&base)).await;
    let base_rate = throughput(&server, std::slice::from_ref(&base)).await;
    println!("{CLIENTS} clients, {MAX_TOKENS} tokens each, rank {RANK} on all 7 projections:");
    println!("  base only      {base_rate:8.1} tokens/s");
    for n in [1, 8, 32] {
        let rate = throughput(&server, &names[..n]).await;
        println!(
            "  {n:2} adapters    {rate:8.1} tokens/s  ratio {:.2}",
            rate / base_rate
        );
    }
}
