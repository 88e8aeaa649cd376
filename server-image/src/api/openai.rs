//! The OpenAI-compatible endpoints: `/v1/completions`, `/v1/chat/completions` (both with SSE
//! streaming) and `/v1/models`. `model` selects an adapter by name, or none by the base
//! model's own name.

use std::{convert::Infallible, sync::Arc};

use axum::{
    Json,
    extract::{State, rejection::JsonRejection},
    response::{
        IntoResponse, Response,
        sse::{Event as SseEvent, Sse},
    },
};
use futures::{Stream, StreamExt, stream};
use graft_engine::text::chat::Message;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{AppState, error::ApiError, unix_now};
use crate::{
    adapters::LoadedAdapter,
    sampling::{Choice, Sampling, clock_seed},
    scheduler::{Event, FinishReason, Refused, Request, Usage},
};

/// OpenAI caps `logprobs` at 5 for completions and `top_logprobs` at 20 for chat; vLLM allows
/// 20 for both, and so do we.
const MAX_LOGPROBS: usize = 20;
const MAX_STOP: usize = 4;
/// Stop strings are matched on every generated token; long ones would slow every sequence.
const MAX_STOP_BYTES: usize = 256;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// The sampling fields both endpoints share.
#[derive(Debug, Default, Deserialize)]
struct SamplingFields {
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    seed: Option<u64>,
    stop: Option<OneOrMany>,
    n: Option<usize>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    /// vLLM's extension: logprobs name tokens `token_id:<id>` instead of by their text, which
    /// several ids can share.
    #[serde(default)]
    return_tokens_as_token_ids: bool,
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    model: String,
    prompt: OneOrMany,
    max_tokens: Option<usize>,
    logprobs: Option<usize>,
    echo: Option<bool>,
    #[serde(flatten)]
    sampling: SamplingFields,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    logprobs: Option<bool>,
    top_logprobs: Option<usize>,
    #[serde(flatten)]
    sampling: SamplingFields,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

/// A validated request, ready for the scheduler.
struct Generation {
    model: String,
    adapter: Option<Arc<LoadedAdapter>>,
    request: Request,
    stream: bool,
    include_usage: bool,
    token_ids: bool,
    events: mpsc::UnboundedReceiver<Event>,
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    if body.echo == Some(true) {
        return Err(ApiError::invalid("echo", "echo is not supported"));
    }
    let prompts = body.prompt.into_vec();
    let [prompt] = prompts.as_slice() else {
        return Err(ApiError::invalid(
            "prompt",
            "give one prompt per request (a string or a list of one string)",
        ));
    };
    let ids = state
        .model
        .tokenizer
        .encode(prompt, true)
        .map_err(|e| ApiError::invalid("prompt", e.to_string()))?;
    let logprobs = check_logprobs("logprobs", body.logprobs)?;
    let generation = prepare(
        &state,
        body.model,
        ids,
        body.max_tokens.or(Some(16)),
        logprobs,
        body.sampling,
    )
    .await?;
    Ok(respond(state, generation, Kind::Completion).await)
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    if body.messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    let messages = body
        .messages
        .into_iter()
        .map(|m| {
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(text)) => text,
                Some(Content::Parts(parts)) => parts
                    .into_iter()
                    .map(|p| match (p.kind.as_str(), p.text) {
                        ("text", Some(text)) => Ok(text),
                        (kind, _) => Err(ApiError::invalid(
                            "messages",
                            format!("content parts of type {kind:?} are not supported (text only)"),
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .concat(),
            };
            Ok(Message::new(m.role, content))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let text = state
        .model
        .tokenizer
        .apply_chat_template(&messages, true)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    // The template writes the special tokens itself.
    let ids = state
        .model
        .tokenizer
        .encode(&text, false)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let logprobs = if body.logprobs == Some(true) {
        Some(check_logprobs("top_logprobs", Some(body.top_logprobs.unwrap_or(0)))?.unwrap_or(0))
    } else {
        if body.top_logprobs.is_some_and(|n| n > 0) {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs needs logprobs: true",
            ));
        }
        None
    };
    let generation = prepare(
        &state,
        body.model,
        ids,
        body.max_completion_tokens.or(body.max_tokens),
        logprobs,
        body.sampling,
    )
    .await?;
    Ok(respond(state, generation, Kind::Chat).await)
}

pub async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    let base = &state.model.info.model;
    let created = state.started_at;
    let mut data = vec![json!({
        "id": base, "object": "model", "created": created, "owned_by": "graft",
        "root": state.model.info.model_uri, "parent": null,
        "max_model_len": state.model.max_model_len,
    })];
    for name in state.registry.names() {
        data.push(json!({
            "id": name, "object": "model", "created": created, "owned_by": "graft",
            "root": name, "parent": base,
            "max_model_len": state.model.max_model_len,
        }));
    }
    Json(json!({"object": "list", "data": data}))
}

fn check_logprobs(param: &'static str, n: Option<usize>) -> Result<Option<usize>, ApiError> {
    match n {
        Some(n) if n > MAX_LOGPROBS => Err(ApiError::invalid(
            param,
            format!("{param} must be at most {MAX_LOGPROBS}"),
        )),
        n => Ok(n),
    }
}

async fn prepare(
    state: &AppState,
    model: String,
    prompt: Vec<u32>,
    max_tokens: Option<usize>,
    logprobs: Option<usize>,
    fields: SamplingFields,
) -> Result<Generation, ApiError> {
    let sampling = sampling(&fields, logprobs)?;
    let stop = fields.stop.map(OneOrMany::into_vec).unwrap_or_default();
    if stop.len() > MAX_STOP
        || stop
            .iter()
            .any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "stop takes up to {MAX_STOP} non-empty strings of at most {MAX_STOP_BYTES} bytes"
            ),
        ));
    }
    let context = state.model.max_model_len;
    if prompt.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    if prompt.len() >= context {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "This model's maximum context length is {context} tokens. However, your prompt has {} tokens.",
                prompt.len()
            ),
        ));
    }
    let max_tokens = match max_tokens {
        Some(0) => {
            return Err(ApiError::invalid(
                "max_tokens",
                "max_tokens must be at least 1",
            ));
        }
        Some(n) if n > context - prompt.len() => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "This model's maximum context length is {context} tokens. However, you requested {} tokens ({} in the prompt, {n} for the completion).",
                    prompt.len().saturating_add(n),
                    prompt.len()
                ),
            ));
        }
        Some(n) => n,
        None => context - prompt.len(),
    };
    let adapter = if model == state.model.info.model {
        None
    } else {
        let picked = state
            .registry
            .pick(&model)
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        Some(picked.ok_or_else(|| ApiError::model_not_found(&model))?)
    };
    state
        .metrics
        .adapter_request(if adapter.is_some() { &model } else { "" });
    let (events_tx, events) = mpsc::unbounded_channel();
    Ok(Generation {
        model,
        adapter: adapter.clone(),
        request: Request {
            prompt,
            max_tokens,
            stop,
            sampling,
            adapter,
            events: events_tx,
        },
        stream: fields.stream,
        include_usage: fields.stream_options.is_some_and(|o| o.include_usage),
        token_ids: fields.return_tokens_as_token_ids,
        events,
    })
}

fn sampling(fields: &SamplingFields, logprobs: Option<usize>) -> Result<Sampling, ApiError> {
    let temperature = fields.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            "temperature must be between 0 and 2",
        ));
    }
    let top_p = fields.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid("top_p", "top_p must be in (0, 1]"));
    }
    let top_k = match fields.top_k {
        None | Some(-1 | 0) => 0,
        Some(k) if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
        Some(_) => {
            return Err(ApiError::invalid(
                "top_k",
                "top_k must be -1 (off) or at least 1",
            ));
        }
    };
    if fields.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("n", "only n = 1 is supported"));
    }
    for (param, value) in [
        ("frequency_penalty", fields.frequency_penalty),
        ("presence_penalty", fields.presence_penalty),
    ] {
        if value.is_some_and(|v| v != 0.0) {
            return Err(ApiError::invalid(
                param,
                format!("{param} is not supported"),
            ));
        }
    }
    let seed = fields.seed.unwrap_or_else(clock_seed);
    Ok(Sampling {
        temperature,
        top_p,
        top_k,
        seed,
        logprobs,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

async fn respond(state: Arc<AppState>, generation: Generation, kind: Kind) -> Response {
    let Generation {
        model,
        adapter,
        request,
        stream,
        include_usage,
        token_ids,
        events,
    } = generation;
    let logprobs = request.sampling.logprobs.is_some();
    let fingerprint = fingerprint(&state, adapter.as_deref());
    let meta = Meta {
        id: format!(
            "{}-{:016x}",
            if kind == Kind::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            request.sampling.seed ^ state.next_id()
        ),
        created: unix_now(),
        model,
        fingerprint,
        kind,
        logprobs,
        token_ids,
    };
    match state.scheduler.submit(request) {
        Ok(()) => {}
        Err(Refused::Busy) => return ApiError::busy().into_response(),
        Err(Refused::Stopped) => {
            return ApiError::unavailable("the server is shutting down").into_response();
        }
    }
    if stream {
        let sse = sse_stream(state, meta, events, include_usage);
        Sse::new(sse).into_response()
    } else {
        collect(state, meta, events).await
    }
}

/// The fields every response and chunk repeats.
#[derive(Clone, Debug)]
struct Meta {
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
    kind: Kind,
    logprobs: bool,
    token_ids: bool,
}

/// Identifies what produced a response: the adapter version's digest (or the base model's),
/// so a client can tell which version of a canary answered.
fn fingerprint(state: &AppState, adapter: Option<&LoadedAdapter>) -> String {
    let sha = adapter.map_or(&state.model.info.model_sha256, |a| &a.sha256);
    format!("graft-{}", &sha[..16.min(sha.len())])
}

async fn collect(
    state: Arc<AppState>,
    meta: Meta,
    mut events: mpsc::UnboundedReceiver<Event>,
) -> Response {
    let mut text = String::new();
    let mut tokens = Vec::new();
    while let Some(event) = events.recv().await {
        match event {
            Event::Token {
                text: delta,
                choice,
            } => {
                text.push_str(&delta);
                tokens.push(choice);
            }
            Event::Done { reason, usage } => {
                let logprobs = meta.logprobs.then(|| logprobs_json(&state, &meta, &tokens));
                return Json(full_response(
                    &meta,
                    &text,
                    logprobs.as_ref(),
                    reason,
                    usage,
                ))
                .into_response();
            }
            Event::Failed(message) => {
                return ApiError {
                    status: axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    message,
                    kind: "server_error",
                    param: None,
                    code: None,
                }
                .into_response();
            }
        }
    }
    ApiError::unavailable("the generation was interrupted").into_response()
}

fn full_response(
    meta: &Meta,
    text: &str,
    logprobs: Option<&Value>,
    reason: FinishReason,
    usage: Usage,
) -> Value {
    let choice = match meta.kind {
        Kind::Completion => json!({
            "index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason.as_str(),
        }),
        Kind::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": logprobs,
            "finish_reason": reason.as_str(),
        }),
    };
    json!({
        "id": meta.id,
        "object": if meta.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": meta.fingerprint,
        "choices": [choice],
        "usage": usage_json(usage),
    })
}

fn usage_json(usage: Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    })
}

fn token_text(state: &AppState, meta: &Meta, token: u32) -> String {
    if meta.token_ids {
        format!("token_id:{token}")
    } else {
        state
            .model
            .tokenizer
            .decode(&[token], false)
            .unwrap_or_default()
    }
}

/// Completions: `{tokens, token_logprobs, top_logprobs, text_offset}`; chat: `{content: [..]}`.
fn logprobs_json(state: &AppState, meta: &Meta, tokens: &[Choice]) -> Value {
    let tokens: Vec<&Choice> = tokens.iter().filter(|c| c.logprob.is_some()).collect();
    match meta.kind {
        Kind::Completion => {
            let mut offset = 0;
            let mut offsets = Vec::new();
            for c in &tokens {
                offsets.push(offset);
                offset += token_text(state, meta, c.token).len();
            }
            json!({
                "tokens": tokens.iter().map(|c| token_text(state, meta, c.token)).collect::<Vec<_>>(),
                "token_logprobs": tokens.iter().map(|c| c.logprob).collect::<Vec<_>>(),
                "top_logprobs": tokens.iter().map(|c| {
                    c.top.iter().map(|(t, lp)| (token_text(state, meta, *t), json!(lp))).collect::<serde_json::Map<_, _>>()
                }).collect::<Vec<_>>(),
                "text_offset": offsets,
            })
        }
        Kind::Chat => json!({
            "content": tokens.iter().map(|c| {
                let text = token_text(state, meta, c.token);
                json!({
                    "token": text, "logprob": c.logprob, "bytes": text.as_bytes(),
                    "top_logprobs": c.top.iter().map(|(t, lp)| {
                        let text = token_text(state, meta, *t);
                        json!({"token": text, "logprob": lp, "bytes": text.as_bytes()})
                    }).collect::<Vec<_>>(),
                })
            }).collect::<Vec<_>>(),
        }),
    }
}

fn sse_stream(
    state: Arc<AppState>,
    meta: Meta,
    events: mpsc::UnboundedReceiver<Event>,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let first = (meta.kind == Kind::Chat).then(|| {
        chunk(
            &meta,
            &json!({"role": "assistant", "content": ""}),
            None,
            None,
        )
    });
    let body = stream::unfold(Some(events), move |events| {
        let (state, meta) = (state.clone(), meta.clone());
        async move {
            let mut events = events?;
            let out = match events.recv().await {
                Some(Event::Token { text, .. }) if text.is_empty() && !meta.logprobs => Vec::new(),
                Some(Event::Token { text, choice }) => {
                    let logprobs = meta.logprobs.then(|| logprobs_json(&state, &meta, std::slice::from_ref(&choice)));
                    vec![chunk(&meta, &delta(&meta, &text), logprobs.as_ref(), None)]
                }
                Some(Event::Done { reason, usage }) => {
                    let mut last = vec![chunk(&meta, &delta(&meta, ""), None, Some(reason))];
                    if include_usage {
                        last.push(json!({
                            "id": meta.id, "object": chunk_object(&meta), "created": meta.created,
                            "model": meta.model, "system_fingerprint": meta.fingerprint,
                            "choices": [], "usage": usage_json(usage),
                        }));
                    }
                    let events: Vec<SseEvent> = last.iter().map(data).chain([done()]).collect();
                    return Some((stream::iter(events), None));
                }
                Some(Event::Failed(message)) => {
                    let error = json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}});
                    return Some((stream::iter(vec![data(&error), done()]), None));
                }
                None => return Some((stream::iter(vec![done()]), None)),
            };
            Some((stream::iter(out.iter().map(data).collect::<Vec<_>>()), Some(events)))
        }
    })
    .flatten();
    stream::iter(first.iter().map(data).collect::<Vec<_>>())
        .chain(body)
        .map(Ok)
}

fn chunk_object(meta: &Meta) -> &'static str {
    match meta.kind {
        Kind::Chat => "chat.completion.chunk",
        Kind::Completion => "text_completion",
    }
}

fn delta(meta: &Meta, text: &str) -> Value {
    match meta.kind {
        Kind::Chat if text.is_empty() => json!({}),
        Kind::Chat => json!({"content": text}),
        Kind::Completion => json!(text),
    }
}

fn chunk(
    meta: &Meta,
    delta: &Value,
    logprobs: Option<&Value>,
    finish: Option<FinishReason>,
) -> Value {
    let choice = match meta.kind {
        Kind::Chat => {
            json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish.map(FinishReason::as_str)})
        }
        Kind::Completion => {
            json!({"index": 0, "text": delta, "logprobs": logprobs, "finish_reason": finish.map(FinishReason::as_str)})
        }
    };
    json!({
        "id": meta.id, "object": chunk_object(meta), "created": meta.created, "model": meta.model,
        "system_fingerprint": meta.fingerprint, "choices": [choice],
    })
}

fn data(value: &Value) -> SseEvent {
    SseEvent::default().data(value.to_string())
}

fn done() -> SseEvent {
    SseEvent::default().data("[DONE]")
}
