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
use graft_engine::{rng::Rng, text::tokenizer::Tokenizer};
use graft_server::constrain::{Grammar, Grammars};
use graft_trainer::tiny::{TinySpec, write_tiny_model};
use serde_json::{Value, json};

const CLIENTS: usize = 16;
const MAX_TOKENS: usize = 48;
const RUN: Duration = Duration::from_secs(8);
const CORPUS_BYTES: usize = 24 << 20;

/// Text for a 32k-token BPE vocabulary: the repository's sources and then its dependencies'
/// (from cargo's registry), up to `CORPUS_BYTES`.
fn corpus() -> Vec<String> {
    let root = graft_testenv::repo_root();
    let mut dirs = vec![root.clone()];
    if let Some(home) = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cargo")))
    {
        dirs.insert(0, home.join("registry/src"));
    }
    let mut texts = Vec::new();
    let mut bytes = 0;
    while let Some(dir) = dirs.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for path in entries {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if path.is_dir() && !name.starts_with('.') && name != "target" && name != "data" {
                dirs.push(path);
            } else if path
                .extension()
                .is_some_and(|e| e == "rs" || e == "md" || e == "yaml")
                && let Ok(text) = std::fs::read_to_string(&path)
            {
                bytes += text.len();
                texts.extend(text.lines().map(str::to_owned));
                if bytes > CORPUS_BYTES {
                    return texts;
                }
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
    let grammars = Grammars::load(&dir.join("tokenizer.json"), vocab, &[eos]).expect("grammars");
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

/// Milliseconds per generated token per client, `constrained` saying which clients (in turn)
/// ask for a JSON schema.
async fn decode(server: &Arc<Server>, model: &str, constrained: &[bool]) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let tokens = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (server, stop, tokens) = (server.clone(), stop.clone(), tokens.clone());
            let mut body = json!({"model": model, "messages": [{"role": "user", "content": "an order"}],
                                  "max_tokens": MAX_TOKENS, "temperature": 0.8, "seed": i});
            if constrained[i % constrained.len()] {
                body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "order", "schema": schema()}});
            }
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let (status, answer) = server.post("/v1/chat/completions", body.clone()).await;
                    assert_eq!(status, 200, "{answer}");
                    let n = answer["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                    tokens.fetch_add(n, Ordering::Relaxed);
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
    let per_token = started.elapsed().as_secs_f64() * 1e3 * CLIENTS as f64
        / tokens.load(Ordering::Relaxed).max(1) as f64;
    per_token
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("bench");
    std::fs::create_dir_all(&model).expect("model dir");
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
    // Each mix twice, alternating, the better run kept: other work on the machine shows as
    // noise otherwise.
    let mixes: [(&str, &[bool]); 3] = [
        ("all unconstrained          ", &[false]),
        ("all JSON-schema constrained", &[true]),
        ("half and half              ", &[false, true]),
    ];
    let mut best = [f64::INFINITY; 3];
    for _ in 0..2 {
        for (slot, (_, mix)) in best.iter_mut().zip(&mixes) {
            *slot = slot.min(decode(&server, "bench", mix).await);
        }
    }
    println!(
        "{CLIENTS} clients, chat, up to {MAX_TOKENS} tokens, ms per generated token per client \
         (every row of a batch advances once per step, so this is the step time any row pays):"
    );
    for ((name, _), ms) in mixes.iter().zip(best) {
        println!("  {name}  {ms:7.2}  ratio {:.2}", ms / best[0]);
    }
}
