//! The OpenAI-compatible endpoints: `/v1/completions`, `/v1/chat/completions` (both with SSE
//! streaming) and `/v1/models`. `model` selects an adapter by name, or none by the base
//! model's own name.

use std::sync::Arc;

use axum::{
    Json,
    extract::{State, rejection::JsonRejection},
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{
    AppState,
    chat::{ChatFields, ToolUse, template_messages, tool_use},
    error::ApiError,
    request::{CHAT_FIELDS, COMPLETION_FIELDS, Common, check_logprobs, parse},
    response::{Kind, Meta, collect, sse},
    unix_now,
};
use crate::{
    adapters::LoadedAdapter,
    constrain::{Constraint, Grammar},
    scheduler::{Refused, Request},
};

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    prompt: Prompt,
    max_tokens: Option<usize>,
    logprobs: Option<usize>,
    echo: Option<bool>,
    suffix: Option<String>,
    #[serde(flatten)]
    common: Common,
}

/// A prompt, or several: text, or token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(flatten)]
    chat: ChatFields,
    #[serde(flatten)]
    common: Common,
}

/// A request, read: ready to be checked against the model and run.
struct Plan {
    kind: Kind,
    common: Common,
    /// Token ids, and the text `echo` repeats before the completion.
    prompts: Vec<(Vec<u32>, String)>,
    max_tokens: Option<usize>,
    logprobs: Option<usize>,
    /// Score the prompt too (`echo` with `logprobs`).
    prompt_logprobs: bool,
    tools: Option<ToolUse>,
    skip_special_tokens: bool,
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let body: CompletionRequest = parse(body, COMPLETION_FIELDS)?;
    if body.suffix.is_some() {
        return Err(ApiError::unsupported("suffix"));
    }
    let echo = body.echo == Some(true);
    let logprobs = check_logprobs("logprobs", body.logprobs)?;
    let tokenizer = &state.model.tokenizer;
    let encode = |text: &str| {
        tokenizer
            .encode(text, true)
            .map_err(|e| ApiError::invalid("prompt", e.to_string()))
    };
    let decode = |ids: &[u32]| {
        let vocab = state.model.info.vocab_size;
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(ApiError::invalid(
                "prompt",
                format!("token id {bad} is not below the vocabulary size {vocab}"),
            ));
        }
        Ok(tokenizer.decode(ids, false).unwrap_or_default())
    };
    let prompts: Vec<(Vec<u32>, String)> = match body.prompt {
        Prompt::Text(text) => vec![(encode(&text)?, text)],
        Prompt::Texts(texts) => texts
            .into_iter()
            .map(|t| Ok((encode(&t)?, t)))
            .collect::<Result<_, ApiError>>()?,
        Prompt::Ids(ids) => vec![(ids.clone(), decode(&ids)?)],
        Prompt::IdLists(lists) => lists
            .into_iter()
            .map(|ids| Ok((ids.clone(), decode(&ids)?)))
            .collect::<Result<_, ApiError>>()?,
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid("prompt", "give at least one prompt"));
    }
    let prompts = prompts
        .into_iter()
        .map(|(ids, text)| (ids, if echo { text } else { String::new() }))
        .collect();
    let skip_special_tokens = body.common.skip_special_tokens != Some(false);
    run(
        state,
        Plan {
            kind: Kind::Completion,
            common: body.common,
            prompts,
            max_tokens: body.max_tokens.or(Some(16)),
            logprobs,
            prompt_logprobs: echo && logprobs.is_some(),
            tools: None,
            skip_special_tokens,
        },
    )
    .await
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let ChatRequest { chat, common } = parse(body, CHAT_FIELDS)?;
    let model = &state.model;
    let literal = |marker: &str| match model.tokenizer.token_to_id(marker) {
        Some(id) if model.grammars.as_ref().is_ok_and(|g| g.is_special(id)) => format!("<[{id}]>"),
        _ => serde_json::to_string(marker).unwrap_or_default(),
    };
    let tools = tool_use(model, &chat, literal)?;
    let messages = template_messages(chat.messages)?;
    let text = model
        .tokenizer
        .apply_chat_template_with_tools(
            &messages,
            chat.tools.as_deref().filter(|t| !t.is_empty()),
            chat.add_generation_prompt != Some(false),
        )
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    // The template writes the special tokens itself.
    let ids = model
        .tokenizer
        .encode(&text, false)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let logprobs = if chat.logprobs == Some(true) {
        Some(check_logprobs("top_logprobs", Some(chat.top_logprobs.unwrap_or(0)))?.unwrap_or(0))
    } else {
        if chat.top_logprobs.is_some_and(|n| n > 0) {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs needs logprobs: true",
            ));
        }
        None
    };
    // A call's opening marker must stay in the text to be found.
    let keeps_marker = tools
        .as_ref()
        .and_then(|t| t.format.marker())
        .and_then(|m| model.tokenizer.token_to_id(m))
        .is_some_and(|id| model.grammars.as_ref().is_ok_and(|g| g.is_special(id)));
    let skip_special_tokens = common.skip_special_tokens != Some(false) && !keeps_marker;
    run(
        state,
        Plan {
            kind: Kind::Chat,
            common,
            prompts: vec![(ids, String::new())],
            max_tokens: chat.max_completion_tokens.or(chat.max_tokens),
            logprobs,
            prompt_logprobs: false,
            tools,
            skip_special_tokens,
        },
    )
    .await
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

/// Checks `plan` against the model, queues one scheduler request per prompt, and answers.
async fn run(state: Arc<AppState>, plan: Plan) -> Result<Response, ApiError> {
    let model = &state.model;
    let vocab = model.info.vocab_size;
    let choices = plan.common.choices()?;
    // best_of ranks choices by their log-probability, so it needs them even unasked.
    let ranked = choices.best_of > choices.n;
    let sampling = plan
        .common
        .sampling(plan.logprobs.or(ranked.then_some(0)), vocab)?;
    let name = plan.common.model.clone();
    let adapter = pick_adapter(&state, &name).await?;
    // A prompt-learning adapter's virtual tokens take the first positions of the context.
    let context = model.max_model_len
        - adapter
            .as_ref()
            .map_or(0, |a| a.serving.virtual_len().min(model.max_model_len));
    let longest = plan.prompts.iter().map(|(p, _)| p.len()).max().unwrap_or(0);
    let max_tokens = max_tokens(context, &plan.prompts, longest, plan.max_tokens)?;
    let stopping = plan.common.stopping(max_tokens, vocab)?;
    let grammar = match (
        plan.common.grammar()?,
        plan.tools.as_ref().and_then(|t| t.forced.clone()),
    ) {
        (Some((param, _)), Some(_)) => {
            return Err(ApiError::invalid(
                param,
                "an output constraint cannot be combined with tool_choice required or a named function",
            ));
        }
        (Some((param, grammar)), None) => Some((param, grammar)),
        (None, Some(forced)) => Some(("tool_choice", forced)),
        (None, None) => None,
    };
    let constraint = match grammar {
        Some((param, grammar)) => Some(compile(&state, param, grammar).await?),
        None => None,
    };
    state
        .metrics
        .adapter_request(if adapter.is_some() { &name } else { "" });
    let (events_tx, events) = mpsc::unbounded_channel();
    let meta = Meta {
        id: format!(
            "{}-{:016x}",
            if plan.kind == Kind::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            sampling.seed ^ state.next_id()
        ),
        created: unix_now(),
        model: name.clone(),
        fingerprint: fingerprint(&state, adapter.as_deref()),
        kind: plan.kind,
        logprobs: plan.logprobs.is_some(),
        token_ids: plan.common.return_tokens_as_token_ids == Some(true),
        prompts: plan
            .prompts
            .iter()
            .map(|(ids, echo)| (ids.len(), echo.clone()))
            .collect(),
        prompt_logprobs: plan.prompt_logprobs,
        n: choices.n,
        best_of: choices.best_of,
        tools: plan.tools.as_ref().map(|t| t.format),
        call_seed: state.next_id(),
    };
    let request = Request {
        prompt: Vec::new(),
        stopping,
        sampling,
        choices: choices.best_of,
        first_index: 0,
        constraint,
        prompt_logprobs: plan.logprobs.filter(|_| plan.prompt_logprobs),
        skip_special_tokens: plan.skip_special_tokens,
        adapter_name: if adapter.is_some() {
            name.clone()
        } else {
            String::new()
        },
        adapter,
        events: events_tx,
    };
    submit(&state, &request, plan.prompts)?;
    drop(request);
    if plan.common.stream() {
        let include_usage = plan
            .common
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage);
        Ok(sse(state.clone(), meta, events, include_usage))
    } else {
        Ok(collect(state.clone(), meta, events).await.into_response())
    }
}

/// Queues `request` once for each prompt, its choices numbered after the previous prompt's.
fn submit(
    state: &AppState,
    request: &Request,
    prompts: Vec<(Vec<u32>, String)>,
) -> Result<(), ApiError> {
    for (i, (prompt, _)) in prompts.into_iter().enumerate() {
        let first_index = i * request.choices;
        let mut sampling = request.sampling.clone();
        sampling.seed = sampling
            .seed
            .wrapping_add((first_index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let request = Request {
            prompt,
            sampling,
            first_index,
            ..request.clone()
        };
        match state.scheduler.submit(request) {
            Ok(()) => {}
            Err(Refused::Busy) => return Err(ApiError::busy()),
            Err(Refused::Stopped) => {
                return Err(ApiError::unavailable("the server is shutting down"));
            }
        }
    }
    Ok(())
}

/// `max_tokens`, checked against the context the longest prompt leaves; by default all of it.
fn max_tokens(
    context: usize,
    prompts: &[(Vec<u32>, String)],
    longest: usize,
    asked: Option<usize>,
) -> Result<usize, ApiError> {
    if prompts.iter().any(|(p, _)| p.is_empty()) {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    if longest >= context {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "This model's maximum context length is {context} tokens. However, your prompt has {longest} tokens."
            ),
        ));
    }
    match asked {
        Some(0) => Err(ApiError::invalid(
            "max_tokens",
            "max_tokens must be at least 1",
        )),
        Some(n) if n > context - longest => Err(ApiError::invalid(
            "max_tokens",
            format!(
                "This model's maximum context length is {context} tokens. However, you requested {} tokens ({longest} in the prompt, {n} for the completion).",
                longest.saturating_add(n),
            ),
        )),
        Some(n) => Ok(n),
        None => Ok(context - longest),
    }
}

/// Compiles a grammar off the async threads (a large schema takes milliseconds).
async fn compile(
    state: &Arc<AppState>,
    param: &'static str,
    grammar: Grammar,
) -> Result<Constraint, ApiError> {
    let model = state.model.clone();
    tokio::task::spawn_blocking(move || match &model.grammars {
        Ok(grammars) => grammars.compile(&grammar),
        Err(reason) => Err(format!(
            "structured output is unavailable for this model: {reason}"
        )),
    })
    .await
    .map_err(|e| ApiError::unavailable(e.to_string()))?
    .map_err(|e| ApiError::invalid(param, e))
}

async fn pick_adapter(
    state: &AppState,
    model: &str,
) -> Result<Option<Arc<LoadedAdapter>>, ApiError> {
    if model == state.model.info.model {
        return Ok(None);
    }
    let picked = state
        .registry
        .pick(model)
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    Ok(Some(
        picked.ok_or_else(|| ApiError::model_not_found(model))?,
    ))
}

/// Identifies what produced a response: the adapter version's digest (or the base model's),
/// so a client can tell which version of a canary answered.
fn fingerprint(state: &AppState, adapter: Option<&LoadedAdapter>) -> String {
    let sha = adapter.map_or(&state.model.info.model_sha256, |a| &a.sha256);
    format!("graft-{}", &sha[..16.min(sha.len())])
}
