//! Mistral's tool calls through a real server: both of its formats (`[TOOL_CALLS]` and a JSON
//! array; since the v11 tokenizer `[TOOL_CALLS]name[ARGS]{...}`), picked from the chat
//! template, forced by `tool_choice` through constrained decoding, parsed into OpenAI's
//! `tool_calls`, streamed, and a round trip through a `tool` message.

mod common;

use std::path::{Path, PathBuf};

use common::{Server, model_dir};
use serde_json::{Value, json};

/// Mistral v3's template (Mistral 7B Instruct v0.3), cut to what the test needs.
const ARRAY_TEMPLATE: &str = r"{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}
{%- for message in messages %}
{%- if message.role == 'user' %}[INST]{{ message.content }}[/INST]
{%- elif message.role == 'assistant' %}{{ message.content }}
{%- if message.tool_calls %}[TOOL_CALLS][{% for call in message.tool_calls %}{{ {'name': call.function.name, 'arguments': call.function.arguments, 'id': call.id} | tojson }}{% if not loop.last %}, {% endif %}{% endfor %}]{% endif %}</s>
{%- elif message.role == 'tool' %}[TOOL_RESULTS]{{ {'content': message.content, 'call_id': message.tool_call_id} | tojson }}[/TOOL_RESULTS]
{%- endif %}
{%- endfor %}";

/// The v11+ template (Mistral Small 3.2), cut likewise.
const NAMED_TEMPLATE: &str = r"{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}
{%- for message in messages %}
{%- if message.role == 'user' %}[INST]{{ message.content }}[/INST]
{%- elif message.role == 'assistant' %}{{ message.content }}
{%- for call in message.tool_calls or [] %}[TOOL_CALLS]{{ call.function.name }}[ARGS]{{ call.function.arguments | tojson }}{% endfor %}</s>
{%- elif message.role == 'tool' %}[TOOL_RESULTS]{{ message.content }}[/TOOL_RESULTS]
{%- endif %}
{%- endfor %}";

/// The tiny model under `work/<name>` with `template` as its chat template.
fn model_with(work: &Path, name: &str, template: &str) -> PathBuf {
    let dir = work.join(name);
    std::fs::create_dir_all(&dir).expect("model dir");
    for entry in std::fs::read_dir(model_dir()).expect("the tiny model") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, dir.join(path.file_name().expect("name"))).expect("copy");
    }
    std::fs::write(dir.join("chat_template.jinja"), template).expect("template");
    dir
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "days"], "additionalProperties": false,
        }}},
        {"type": "function", "function": {"name": "get_time", "parameters": {
            "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"], "additionalProperties": false,
        }}},
    ])
}

/// The SSE chunks of a streamed request.
async fn stream(server: &Server, body: &Value) -> Vec<Value> {
    let response = server
        .client()
        .post(format!("{}/v1/chat/completions", server.url))
        .json(body)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("body");
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|l| *l != "[DONE]")
        .map(|l| serde_json::from_str(l).expect("a JSON chunk"))
        .collect()
}

async fn calls_in_both_formats(name: &str, template: &str) {
    let work = tempfile::tempdir().expect("tempdir");
    let model = model_with(work.path(), name, template);
    let server = Server::start_with_model(&model, &["--max-model-len", "2048"]).await;
    let question = json!([{"role": "user", "content": "Weather in Paris for 3 days?"}]);
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let body = json!({"model": name, "messages": question, "tools": tools(), "tool_choice": named, "max_tokens": 200, "temperature": 0});
    let (status, answer) = server.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{name}: {answer}");
    let calls = choice["message"]["tool_calls"]
        .as_array()
        .expect("tool_calls");
    assert_eq!(calls.len(), 1, "{name}: {answer}");
    let call = &calls[0];
    assert_eq!(call["function"]["name"], "get_weather", "{answer}");
    let id = call["id"].as_str().expect("an id");
    assert!(
        id.len() == 9 && id.chars().all(|c| c.is_ascii_alphanumeric()),
        "Mistral's ids are nine letters or digits: {id}"
    );
    let arguments: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().expect("a string"))
            .expect("the arguments are JSON");
    assert!(arguments["city"].is_string(), "{name}: {arguments}");
    assert!(
        arguments["days"]
            .as_u64()
            .is_some_and(|d| (1..=7).contains(&d)),
        "{name}: {arguments}"
    );
    assert!(choice["message"]["content"].is_null(), "{answer}");

    // Streamed: the same call, its name first, its arguments in pieces.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let chunks = stream(&server, &streamed).await;
    let deltas: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array())
        .flatten()
        .collect();
    assert_eq!(deltas[0]["function"]["name"], "get_weather", "{chunks:?}");
    assert!(deltas[0]["id"].is_string(), "{chunks:?}");
    let pieces: String = deltas
        .iter()
        .filter_map(|d| d["function"]["arguments"].as_str())
        .collect();
    assert_eq!(pieces, call["function"]["arguments"], "{name}");
    assert!(deltas.len() > 2, "{name}: arguments come in pieces");
    let finishes: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, [&json!("tool_calls")], "{name}");

    // required, one call: either function, by its own schema.
    let mut required = body.clone();
    required["tool_choice"] = json!("required");
    required["parallel_tool_calls"] = json!(false);
    let (status, answer) = server.post("/v1/chat/completions", required).await;
    assert_eq!(status, 200, "{answer}");
    let calls = answer["choices"][0]["message"]["tool_calls"]
        .as_array()
        .expect("a call");
    assert_eq!(calls.len(), 1, "{name}: {answer}");
    let called = calls[0]["function"]["name"].as_str().expect("a name");
    let arguments: Value = serde_json::from_str(
        calls[0]["function"]["arguments"]
            .as_str()
            .expect("a string"),
    )
    .expect("JSON");
    match called {
        "get_weather" => assert!(arguments["city"].is_string(), "{arguments}"),
        "get_time" => assert!(
            ["UTC", "CET"].contains(&arguments["zone"].as_str().unwrap_or("")),
            "{arguments}"
        ),
        other => panic!("{name}: called {other}"),
    }

    round_trip(&server, name, call, &question).await;
}

/// The call and its result go back in the conversation, and the model answers.
async fn round_trip(server: &Server, name: &str, call: &Value, question: &Value) {
    let id = call["id"].as_str().expect("an id");
    let conversation = json!([
        {"role": "user", "content": "Weather in Paris for 3 days?"},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": id, "content": "{\"forecast\": \"snow\"}"},
    ]);
    let body = json!({"model": name, "messages": conversation, "tools": tools(), "tool_choice": "none", "max_tokens": 6, "temperature": 0});
    let (status, answer) = server.post("/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer["choices"][0]["message"]["content"].is_string(),
        "{answer}"
    );
    assert!(
        answer["choices"][0]["message"]["tool_calls"].is_null(),
        "{answer}"
    );
    let longer = answer["usage"]["prompt_tokens"].as_u64().expect("usage");
    let (_, without) = server
        .post(
            "/v1/chat/completions",
            json!({"model": name, "messages": question, "tools": tools(), "max_tokens": 1}),
        )
        .await;
    assert!(
        longer > without["usage"]["prompt_tokens"].as_u64().expect("usage") + 20,
        "{name}: the call and its result are in the prompt"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn mistral_array_calls_are_forced_parsed_and_streamed() {
    calls_in_both_formats("mistral-v3", ARRAY_TEMPLATE).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mistral_named_calls_are_forced_parsed_and_streamed() {
    calls_in_both_formats("mistral-v11", NAMED_TEMPLATE).await;
}
