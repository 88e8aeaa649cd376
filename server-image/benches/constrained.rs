//! Structured output's cost, CPU: the grammar mask per token on its own (llguidance over a
//! 32k-token BPE vocabulary, a JSON schema), then a real graft-server process decoding with
//! 16 concurrent clients — all unconstrained, all constrained by a JSON schema, and half and
//! half — reported as milliseconds per generated token and ratios, side by side.
//!
//!     cargo bench -p graft-server --bench constrained

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

use common::Server;
use graft_engine::{
    rng::Rng,
    tiny::{TinySpec, write_tiny_model},
    tokenizer::Tokenizer,
};
use graft_server::constrain::{Grammar, Grammars};
use serde_json::{Value, json};

const CLIENTS: usize = 16;
const MAX_TOKENS: usize = 48;
const RUN: Duration = Duration::from_secs(8);

/// Words of the repository's own sources: enough text for a 32k-token BPE vocabulary.
fn corpus() -> Vec<String> {
    let root = graft_testenv::repo_root();
    let mut texts = Vec::new();
    let mut dirs = vec![
        root.join("engine"),
        root.join("server-image"),
        root.join("operator"),
        root.join("trainer-image"),
        root.join("charts"),
    ];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() && !path.ends_with("data") {
                dirs.push(path);
            } else if path
                .extension()
                .is_some_and(|e| e == "rs" || e == "md" || e == "yaml")
                && let Ok(text) = std::fs::read_to_string(&path)
            {
                texts.extend(text.lines().map(str::to_owned));
            }
        }
    }
    texts
}

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 99999},
            "name": {"type": "string", "maxLength": 24},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
            "colour": {"enum": ["red", "green", "blue"]},
            "paid": {"type": "boolean"},
            "address": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"}
            }, "required": ["city", "zip"], "additionalProperties": false}
        },
        "required": ["id", "name", "tags", "colour", "paid", "address"],
        "additionalProperties": false
    })
}

/// Mask and commit time per token, following random allowed tokens through the schema.
fn mask_cost(dir: &std::path::Path) {
    let tokenizer = Tokenizer::from_dir(dir).expect("tokenizer");
    let vocab = tokenizer.vocab_size();
    let eos = tokenizer.eos_token_id().expect("eos");
    let grammars = Grammars::load(&tokenizer.path(), vocab, &[eos]).expect("grammars");
    let started = Instant::now();
    let compiled = grammars
        .compile(&Grammar::JsonSchema(schema()))
        .expect("compiles");
    let compile = started.elapsed();
    let mut rng = Rng::seed(7);
    let (mut masks, mut commits, mut tokens) = (Vec::new(), Duration::ZERO, 0usize);
    for _ in 0..20 {
        let mut constraint = compiled.clone();
        for _ in 0..400 {
            let started = Instant::now();
            let mask = constraint.mask().expect("mask");
            masks.push(started.elapsed());
            let mut logits: Vec<f32> = (0..vocab).map(|_| rng.next_f32()).collect();
            mask.apply(&mut logits);
            let token = logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| u32::try_from(i).expect("id"))
                .expect("a token");
            if token == eos {
                break;
            }
            let started = Instant::now();
            constraint.commit(token).expect("allowed");
            commits += started.elapsed();
            tokens += 1;
            if constraint.is_finished() {
                break;
            }
        }
    }
    masks.sort();
    #[allow(clippy::cast_precision_loss)]
    let commit = commits.as_secs_f64() * 1e6 / tokens.max(1) as f64;
    let mean = masks.iter().sum::<Duration>() / u32::try_from(masks.len()).expect("count");
    println!(
        "grammar mask, {vocab}-token vocabulary, JSON schema (compiled in {:.1} ms), {tokens} tokens: \
         mean {:.0} µs, p50 {:.0} µs, p99 {:.0} µs per token; commit {:.1} µs per token",
        compile.as_secs_f64() * 1e3,
        mean.as_secs_f64() * 1e6,
        masks[masks.len() / 2].as_secs_f64() * 1e6,
        masks[masks.len() * 99 / 100].as_secs_f64() * 1e6,
        commit,
    );
}

/// Milliseconds per generated token for each of the two client groups, running together.
async fn decode(server: &Arc<Server>, model: &str, constrained: &[bool]) -> (f64, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (server, stop, counts) = (server.clone(), stop.clone(), counts.clone());
            let group = usize::from(constrained[i % constrained.len()]);
            let mut body = json!({"model": model, "messages": [{"role": "user", "content": "an order"}],
                                  "max_tokens": MAX_TOKENS, "temperature": 0.8, "seed": i});
            if group == 1 {
                body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "order", "schema": schema()}});
            }
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let (status, answer) = server.post("/v1/chat/completions", body.clone()).await;
                    assert_eq!(status, 200, "{answer}");
                    let tokens = answer["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                    counts[group].fetch_add(tokens, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(RUN).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.expect("client");
    }
    let elapsed = started.elapsed().as_secs_f64() * 1e3;
    #[allow(clippy::cast_precision_loss)]
    let per_token = |group: usize| {
        let n = counts[group].load(Ordering::Relaxed);
        let share = constrained
            .iter()
            .filter(|&&c| usize::from(c) == group)
            .count();
        if n == 0 {
            f64::NAN
        } else {
            // Each group's clients' time over their tokens.
            elapsed * (CLIENTS * share / constrained.len()) as f64 / n as f64
        }
    };
    (per_token(0), per_token(1))
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("bench");
    let spec = TinySpec {
        vocab_size: 32_000,
        hidden_size: 256,
        intermediate_size: 688,
        num_layers: 4,
        num_heads: 8,
        num_kv_heads: 4,
        max_position_embeddings: 512,
        init_std: 0.05,
        ..TinySpec::default()
    };
    let made = write_tiny_model(&model, &spec, &corpus()).expect("model");
    println!(
        "model: {} parameters, vocabulary {}",
        made.num_parameters, made.vocab_size
    );
    mask_cost(&model);

    let server = Arc::new(Server::start_with_model(&model, &["--max-batch-size", "32"]).await);
    decode(&server, "bench", &[false]).await; // warm-up
    let (free, _) = decode(&server, "bench", &[false]).await;
    let (_, forced) = decode(&server, "bench", &[true]).await;
    let (mixed_free, mixed_forced) = decode(&server, "bench", &[false, true]).await;
    println!(
        "{CLIENTS} clients, chat, up to {MAX_TOKENS} tokens, ms per generated token per client:"
    );
    println!("  all unconstrained            {free:7.2}");
    println!(
        "  all JSON-schema constrained  {forced:7.2}  ratio {:.2}",
        forced / free
    );
    println!(
        "  half and half: unconstrained {mixed_free:7.2}  ratio {:.2}; constrained {mixed_forced:7.2}  ratio {:.2}",
        mixed_free / free,
        mixed_forced / free
    );
}
