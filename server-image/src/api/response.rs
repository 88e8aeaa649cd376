//! Answers as OpenAI writes them: one JSON body with every choice, or server-sent events —
//! a chunk per piece of text or tool call, each naming its choice, then usage and `[DONE]`.

use std::{convert::Infallible, sync::Arc};

use axum::{
    Json,
    response::{
        IntoResponse, Response,
        sse::{Event as SseEvent, Sse},
    },
};
use futures::{StreamExt, stream};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{AppState, error::ApiError};
use crate::{
    sampling::Choice,
    scheduler::{Event, FinishReason},
    tool_calls::{Delta, ToolCallParser, ToolFormat, collect as collect_calls},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Completion,
    Chat,
}

/// The fields every response and chunk repeats, and how its choices are shaped.
#[derive(Clone, Debug)]
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub fingerprint: String,
    pub kind: Kind,
    /// The client asked for logprobs (they may also be computed for `best_of`).
    pub logprobs: bool,
    pub token_ids: bool,
    /// Prompt lengths, and what each choice of that prompt starts with (`echo`).
    pub prompts: Vec<(usize, String)>,
    /// The echoed prompt comes with its log-probabilities (`echo` with `logprobs`).
    pub prompt_logprobs: bool,
    pub n: usize,
    pub best_of: usize,
    /// Tool calls are parsed out of the text in this format.
    pub tools: Option<ToolFormat>,
    /// Seeds the calls' ids.
    pub call_seed: u64,
}

impl Meta {
    fn sequences(&self) -> usize {
        self.prompts.len() * self.best_of
    }

    fn prompt_tokens(&self) -> usize {
        self.prompts.iter().map(|(len, _)| len).sum()
    }

    fn parser(&self, index: usize) -> Option<ToolCallParser> {
        let format = self.tools?;
        let mut state = self.call_seed ^ (index as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
        Some(ToolCallParser::new(format, move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            if matches!(format, ToolFormat::Mistral | ToolFormat::MistralNamed) {
                // Mistral's templates accept only nine letters or digits.
                let alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
                (0..9)
                    .map(|i| char::from(alphabet[((z >> (i * 6)) % 62) as usize]))
                    .collect()
            } else {
                format!("call_{z:016x}")
            }
        }))
    }
}

/// One generated sequence, as collected.
#[derive(Debug, Default)]
struct Sequence {
    text: String,
    /// The echoed prompt's tokens, scored.
    prompt: Vec<Choice>,
    tokens: Vec<Choice>,
    reason: Option<FinishReason>,
    completion_tokens: usize,
}

impl Sequence {
    fn cumulative_logprob(&self) -> f32 {
        self.tokens.iter().filter_map(|c| c.logprob).sum()
    }
}

pub async fn collect(
    state: Arc<AppState>,
    meta: Meta,
    mut events: mpsc::UnboundedReceiver<Event>,
) -> Response {
    let mut sequences: Vec<Sequence> = (0..meta.sequences()).map(|_| Sequence::default()).collect();
    let mut remaining = sequences.len();
    while remaining > 0 {
        match events.recv().await {
            Some(Event::Prompt { index, tokens }) => sequences[index].prompt = tokens,
            Some(Event::Token {
                index,
                text,
                choice,
            }) => {
                let sequence = &mut sequences[index];
                sequence.text.push_str(&text);
                sequence.tokens.push(choice);
            }
            Some(Event::Done {
                index,
                reason,
                completion_tokens,
            }) => {
                sequences[index].reason = Some(reason);
                sequences[index].completion_tokens = completion_tokens;
                remaining -= 1;
            }
            Some(Event::Failed(message)) => {
                return ApiError {
                    status: axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    message,
                    kind: "server_error",
                    param: None,
                    code: None,
                }
                .into_response();
            }
            None => {
                return ApiError::unavailable("the generation was interrupted").into_response();
            }
        }
    }
    let completion_tokens: usize = sequences.iter().map(|s| s.completion_tokens).sum();
    let mut choices = Vec::new();
    for (prompt, chunk) in sequences.chunks(meta.best_of).enumerate() {
        // best_of: the n choices most likely under the model.
        let mut order: Vec<usize> = (0..chunk.len()).collect();
        if meta.best_of > meta.n {
            order.sort_by(|&a, &b| {
                chunk[b]
                    .cumulative_logprob()
                    .total_cmp(&chunk[a].cumulative_logprob())
            });
        }
        for (j, &k) in order.iter().take(meta.n).enumerate() {
            let index = prompt * meta.n + j;
            choices.push(full_choice(&state, &meta, index, prompt, &chunk[k]));
        }
    }
    Json(json!({
        "id": meta.id,
        "object": if meta.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": meta.fingerprint,
        "choices": choices,
        "usage": usage_json(meta.prompt_tokens(), completion_tokens),
    }))
    .into_response()
}

fn full_choice(
    state: &AppState,
    meta: &Meta,
    index: usize,
    prompt: usize,
    sequence: &Sequence,
) -> Value {
    let logprobs = meta
        .logprobs
        .then(|| logprobs_json(state, meta, &sequence.prompt, &sequence.tokens));
    let reason = sequence.reason.unwrap_or(FinishReason::Length);
    match meta.kind {
        Kind::Completion => json!({
            "index": index,
            "text": format!("{}{}", meta.prompts[prompt].1, sequence.text),
            "logprobs": logprobs,
            "finish_reason": reason.as_str(),
        }),
        Kind::Chat => {
            let mut message = json!({"role": "assistant", "content": sequence.text});
            let mut finish = reason.as_str();
            if let Some(mut parser) = meta.parser(index) {
                let mut deltas = parser.push(&sequence.text);
                deltas.extend(parser.finish());
                let (content, calls) = collect_calls(deltas);
                if !calls.is_empty() {
                    message["content"] = if content.is_empty() {
                        Value::Null
                    } else {
                        json!(content)
                    };
                    message["tool_calls"] = calls
                        .into_iter()
                        .map(|(id, name, arguments)| {
                            json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}})
                        })
                        .collect();
                    if reason == FinishReason::Stop {
                        finish = "tool_calls";
                    }
                }
            }
            json!({
                "index": index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": finish,
            })
        }
    }
}

fn usage_json(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
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

/// Completions: `{tokens, token_logprobs, top_logprobs, text_offset}`, the echoed `prompt`'s
/// tokens first (the very first with `null`s, as OpenAI and vLLM write it); chat:
/// `{content: [..]}`.
fn logprobs_json(state: &AppState, meta: &Meta, prompt: &[Choice], tokens: &[Choice]) -> Value {
    let tokens: Vec<&Choice> = tokens.iter().filter(|c| c.logprob.is_some()).collect();
    match meta.kind {
        Kind::Completion => {
            let all: Vec<&Choice> = prompt.iter().chain(tokens.iter().copied()).collect();
            let mut offset = 0;
            let mut offsets = Vec::new();
            for c in &all {
                offsets.push(offset);
                offset += token_text(state, meta, c.token).len();
            }
            json!({
                "tokens": all.iter().map(|c| token_text(state, meta, c.token)).collect::<Vec<_>>(),
                "token_logprobs": all.iter().map(|c| c.logprob).collect::<Vec<_>>(),
                "top_logprobs": all.iter().map(|c| {
                    c.logprob.map(|_| c.top.iter().map(|(t, lp)| (token_text(state, meta, *t), json!(lp))).collect::<serde_json::Map<_, _>>())
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

/// The state of a stream between events.
struct Streaming {
    state: Arc<AppState>,
    meta: Meta,
    events: mpsc::UnboundedReceiver<Event>,
    parsers: Vec<Option<ToolCallParser>>,
    remaining: usize,
    completion_tokens: usize,
    include_usage: bool,
}

pub fn sse(
    state: Arc<AppState>,
    meta: Meta,
    events: mpsc::UnboundedReceiver<Event>,
    include_usage: bool,
) -> Response {
    let sequences = meta.sequences();
    // Each choice opens with the assistant's role (chat) or its echoed prompt (completions).
    let first: Vec<Value> = (0..sequences)
        .filter_map(|index| match meta.kind {
            Kind::Chat => Some(chunk(
                &meta,
                index,
                &json!({"role": "assistant", "content": ""}),
                None,
                None,
            )),
            // With its log-probabilities, the echo waits for the prompt to be scored.
            Kind::Completion if meta.prompt_logprobs => None,
            Kind::Completion => {
                let echo = &meta.prompts[index / meta.best_of].1;
                (!echo.is_empty()).then(|| chunk(&meta, index, &json!(echo), None, None))
            }
        })
        .collect();
    let streaming = Streaming {
        parsers: (0..sequences).map(|i| meta.parser(i)).collect(),
        state,
        meta,
        events,
        remaining: sequences,
        completion_tokens: 0,
        include_usage,
    };
    let body = stream::unfold(Some(streaming), |streaming| async move {
        let mut s = streaming?;
        let (out, more) = s.next().await;
        let out: Vec<SseEvent> = out.iter().map(data).collect();
        if more {
            Some((stream::iter(out), Some(s)))
        } else {
            Some((
                stream::iter(out.into_iter().chain([done()]).collect::<Vec<_>>()),
                None,
            ))
        }
    })
    .flatten();
    let events = stream::iter(first.iter().map(data).collect::<Vec<_>>())
        .chain(body)
        .map(Ok::<_, Infallible>);
    Sse::new(events).into_response()
}

impl Streaming {
    /// The chunks of the next event, and whether more follow.
    async fn next(&mut self) -> (Vec<Value>, bool) {
        let meta = &self.meta;
        match self.events.recv().await {
            Some(Event::Prompt { index, tokens }) => {
                let echo = &meta.prompts[index / meta.best_of].1;
                let logprobs = logprobs_json(&self.state, meta, &tokens, &[]);
                (
                    vec![chunk(meta, index, &json!(echo), Some(&logprobs), None)],
                    true,
                )
            }
            Some(Event::Token {
                index,
                text,
                choice,
            }) => {
                let logprobs = meta
                    .logprobs
                    .then(|| logprobs_json(&self.state, meta, &[], std::slice::from_ref(&choice)));
                let deltas = match self.parsers[index].as_mut() {
                    Some(parser) => parser.push(&text),
                    None if text.is_empty() => Vec::new(),
                    None => vec![Delta::Content(text)],
                };
                let mut out: Vec<Value> = deltas
                    .iter()
                    .map(|d| chunk(meta, index, &delta_json(meta, d), None, None))
                    .collect();
                if let Some(logprobs) = logprobs {
                    match out.first_mut() {
                        Some(first) => first["choices"][0]["logprobs"] = logprobs,
                        None => out.push(chunk(
                            meta,
                            index,
                            &empty_delta(meta),
                            Some(&logprobs),
                            None,
                        )),
                    }
                }
                (out, true)
            }
            Some(Event::Done {
                index,
                reason,
                completion_tokens,
            }) => {
                self.completion_tokens += completion_tokens;
                self.remaining -= 1;
                let mut out = Vec::new();
                let mut finish = reason.as_str();
                if let Some(parser) = self.parsers[index].as_mut() {
                    for delta in parser.finish() {
                        out.push(chunk(meta, index, &delta_json(meta, &delta), None, None));
                    }
                    if parser.calls() > 0 && reason == FinishReason::Stop {
                        finish = "tool_calls";
                    }
                }
                let mut last = chunk(meta, index, &empty_delta(meta), None, None);
                last["choices"][0]["finish_reason"] = json!(finish);
                out.push(last);
                if self.remaining > 0 {
                    return (out, true);
                }
                if self.include_usage {
                    out.push(json!({
                        "id": meta.id, "object": chunk_object(meta), "created": meta.created,
                        "model": meta.model, "system_fingerprint": meta.fingerprint,
                        "choices": [], "usage": usage_json(meta.prompt_tokens(), self.completion_tokens),
                    }));
                }
                (out, false)
            }
            Some(Event::Failed(message)) => {
                let error = json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}});
                (vec![error], false)
            }
            None => (Vec::new(), false),
        }
    }
}

fn chunk_object(meta: &Meta) -> &'static str {
    match meta.kind {
        Kind::Chat => "chat.completion.chunk",
        Kind::Completion => "text_completion",
    }
}

fn empty_delta(meta: &Meta) -> Value {
    match meta.kind {
        Kind::Chat => json!({}),
        Kind::Completion => json!(""),
    }
}

fn delta_json(meta: &Meta, delta: &Delta) -> Value {
    match (meta.kind, delta) {
        (Kind::Completion, Delta::Content(text)) => json!(text),
        (Kind::Chat, Delta::Content(text)) => json!({"content": text}),
        (_, Delta::Call { index, id, name }) => json!({"tool_calls": [{
            "index": index, "id": id, "type": "function",
            "function": {"name": name, "arguments": ""},
        }]}),
        (_, Delta::Arguments { index, fragment }) => json!({"tool_calls": [{
            "index": index, "function": {"arguments": fragment},
        }]}),
    }
}

fn chunk(
    meta: &Meta,
    index: usize,
    delta: &Value,
    logprobs: Option<&Value>,
    finish: Option<FinishReason>,
) -> Value {
    let finish = finish.map(FinishReason::as_str);
    let choice = match meta.kind {
        Kind::Chat => {
            json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
        }
        Kind::Completion => {
            json!({"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish})
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
