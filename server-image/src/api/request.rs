//! The request bodies both OpenAI endpoints take, checked field by field: every field is
//! either used, or accepted because it changes nothing a server does (`user`, `metadata`),
//! or refused with a 400 that names it — never silently dropped.

use std::collections::HashMap;

use serde::{Deserialize, de::DeserializeOwned};
use serde_json::Value;

use super::error::ApiError;
use crate::{
    constrain::{Grammar, StructuralTag},
    sampling::{Sampling, clock_seed},
    scheduler::Stopping,
};

/// OpenAI caps `logprobs` at 5 for completions and `top_logprobs` at 20 for chat; vLLM allows
/// 20 for both, and so do we.
pub const MAX_LOGPROBS: usize = 20;
const MAX_STOP: usize = 4;
/// Stop strings are matched on every generated token; long ones would slow every sequence.
const MAX_STOP_BYTES: usize = 256;
/// Choices per prompt (`n`, `best_of`): each is a sequence in the batch.
pub const MAX_CHOICES: usize = 128;

/// Fields both endpoints take: OpenAI's, and vLLM's extensions this server implements.
const COMMON_FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "response_format",
    // Identify the caller or tag the request for the client's own records.
    "user",
    "metadata",
    "store",
    // vLLM's sampling extensions.
    "best_of",
    "top_k",
    "min_p",
    "repetition_penalty",
    "stop_token_ids",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
    "return_tokens_as_token_ids",
    // vLLM's structured outputs, and the `guided_*` fields older clients send.
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
];

pub const COMPLETION_FIELDS: &[&str] = &["prompt", "echo", "suffix"];
pub const CHAT_FIELDS: &[&str] = &[
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "add_generation_prompt",
];

/// Deserialises `body` after checking that it names no field outside `COMMON_FIELDS` and
/// `extra`.
pub fn parse<T: DeserializeOwned>(body: Value, extra: &[&str]) -> Result<T, ApiError> {
    let Value::Object(fields) = &body else {
        return Err(ApiError::invalid("body", "the body must be a JSON object"));
    };
    if let Some(unknown) = fields
        .keys()
        .find(|k| !COMMON_FIELDS.contains(&k.as_str()) && !extra.contains(&k.as_str()))
    {
        return Err(ApiError::unsupported(unknown));
    }
    serde_json::from_value(body).map_err(|e| ApiError {
        param: None,
        ..ApiError::invalid("body", e.to_string())
    })
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// The fields both endpoints share.
#[derive(Debug, Default, Deserialize)]
pub struct Common {
    pub model: String,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<OneOrMany>,
    stop_token_ids: Option<Vec<u32>>,
    pub n: Option<usize>,
    pub best_of: Option<usize>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    repetition_penalty: Option<f32>,
    logit_bias: Option<HashMap<String, f32>>,
    ignore_eos: Option<bool>,
    min_tokens: Option<usize>,
    pub skip_special_tokens: Option<bool>,
    #[serde(default)]
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// vLLM's extension: logprobs name tokens `token_id:<id>` instead of by their text, which
    /// several ids can share.
    pub return_tokens_as_token_ids: Option<bool>,
    response_format: Option<Value>,
    structured_outputs: Option<StructuredOutputs>,
    guided_json: Option<Value>,
    guided_regex: Option<String>,
    guided_choice: Option<Vec<String>>,
    guided_grammar: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// vLLM's `structured_outputs`: one of its constraints, and its options.
#[derive(Debug, Default, Deserialize)]
struct StructuredOutputs {
    json: Option<Value>,
    regex: Option<String>,
    choice: Option<Vec<String>>,
    grammar: Option<String>,
    json_object: Option<bool>,
    /// A structural tag's JSON text.
    structural_tag: Option<String>,
    /// There is one backend, so nothing to fall back from.
    #[allow(dead_code)]
    disable_fallback: Option<bool>,
    /// JSON is always written without free whitespace, so `true` is what happens and `false`
    /// (whitespace allowed, not required) is met too.
    #[allow(dead_code)]
    disable_any_whitespace: Option<bool>,
    disable_additional_properties: Option<bool>,
    /// Fields this server does not implement (`whitespace_pattern`, vLLM's private ones),
    /// refused by name.
    #[serde(flatten)]
    other: serde_json::Map<String, Value>,
}

/// How many sequences a request generates per prompt and how many it returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choices {
    pub n: usize,
    pub best_of: usize,
}

impl Common {
    pub fn stream(&self) -> bool {
        self.stream == Some(true)
    }

    pub fn choices(&self) -> Result<Choices, ApiError> {
        let n = self.n.unwrap_or(1);
        if !(1..=MAX_CHOICES).contains(&n) {
            return Err(ApiError::invalid(
                "n",
                format!("n must be between 1 and {MAX_CHOICES}"),
            ));
        }
        let best_of = self.best_of.unwrap_or(n);
        if !(n..=MAX_CHOICES).contains(&best_of) {
            return Err(ApiError::invalid(
                "best_of",
                format!("best_of must be at least n ({n}) and at most {MAX_CHOICES}"),
            ));
        }
        if best_of > n && self.stream() {
            return Err(ApiError::invalid(
                "best_of",
                "best_of greater than n cannot be streamed",
            ));
        }
        Ok(Choices { n, best_of })
    }

    /// The sampling settings; `logprobs` is how many alternatives each token reports.
    pub fn sampling(&self, logprobs: Option<usize>, vocab: usize) -> Result<Sampling, ApiError> {
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                "temperature",
                "temperature must be between 0 and 2",
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid("top_p", "top_p must be in (0, 1]"));
        }
        let top_k = match self.top_k {
            None | Some(-1 | 0) => 0,
            Some(k) if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
            Some(_) => {
                return Err(ApiError::invalid(
                    "top_k",
                    "top_k must be -1 (off) or at least 1",
                ));
            }
        };
        let min_p = self.min_p.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&min_p) {
            return Err(ApiError::invalid("min_p", "min_p must be between 0 and 1"));
        }
        let mut penalties = [0.0; 2];
        for (slot, (param, value)) in penalties.iter_mut().zip([
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ]) {
            let value = value.unwrap_or(0.0);
            if !(-2.0..=2.0).contains(&value) {
                return Err(ApiError::invalid(
                    param,
                    format!("{param} must be between -2 and 2"),
                ));
            }
            *slot = value;
        }
        let repetition_penalty = self.repetition_penalty.unwrap_or(1.0);
        if !(repetition_penalty > 0.0 && repetition_penalty.is_finite()) {
            return Err(ApiError::invalid(
                "repetition_penalty",
                "repetition_penalty must be greater than 0 (1 is off)",
            ));
        }
        let mut logit_bias = Vec::new();
        for (token, &bias) in self.logit_bias.iter().flatten() {
            let id = token
                .parse::<u32>()
                .ok()
                .filter(|&id| (id as usize) < vocab)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "logit_bias",
                        format!("logit_bias key {token:?} is not a token id below {vocab}"),
                    )
                })?;
            if !(-100.0..=100.0).contains(&bias) {
                return Err(ApiError::invalid(
                    "logit_bias",
                    "logit_bias values must be between -100 and 100",
                ));
            }
            logit_bias.push((id, bias));
        }
        logit_bias.sort_by_key(|&(id, _)| id);
        Ok(Sampling {
            temperature,
            top_p,
            top_k,
            min_p,
            seed: self.seed.unwrap_or_else(clock_seed),
            logprobs,
            presence_penalty: penalties[1],
            frequency_penalty: penalties[0],
            repetition_penalty,
            logit_bias,
        })
    }

    /// When each sequence ends, for a completion of at most `max_tokens`.
    pub fn stopping(&self, max_tokens: usize, vocab: usize) -> Result<Stopping, ApiError> {
        let stop = self
            .stop
            .as_ref()
            .map(|s| match s {
                OneOrMany::One(s) => vec![s.clone()],
                OneOrMany::Many(v) => v.clone(),
            })
            .unwrap_or_default();
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
        let stop_token_ids = self.stop_token_ids.clone().unwrap_or_default();
        if stop_token_ids.iter().any(|&t| t as usize >= vocab) {
            return Err(ApiError::invalid(
                "stop_token_ids",
                format!("stop_token_ids must be token ids below {vocab}"),
            ));
        }
        let min_tokens = self.min_tokens.unwrap_or(0);
        if min_tokens > max_tokens {
            return Err(ApiError::invalid(
                "min_tokens",
                format!("min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})"),
            ));
        }
        Ok(Stopping {
            max_tokens,
            min_tokens,
            stop,
            stop_token_ids,
            ignore_eos: self.ignore_eos == Some(true),
        })
    }

    /// The one grammar the output must follow, from `response_format`, `structured_outputs`
    /// or a `guided_*` field.
    pub fn grammar(&self) -> Result<Option<(&'static str, Grammar)>, ApiError> {
        let mut found: Vec<(&'static str, Grammar)> = Vec::new();
        if let Some(format) = &self.response_format
            && let Some(grammar) = response_format(format)?
        {
            found.push(("response_format", grammar));
        }
        if let Some(outputs) = &self.structured_outputs {
            let param = "structured_outputs";
            if let Some(field) = outputs.other.keys().next() {
                return Err(ApiError::unsupported(&format!(
                    "structured_outputs.{field}"
                )));
            }
            if outputs.disable_additional_properties == Some(true) {
                return Err(ApiError::unsupported(
                    "structured_outputs.disable_additional_properties",
                ));
            }
            if let Some(text) = &outputs.structural_tag {
                let tag = serde_json::from_str(text)
                    .map_err(|e| e.to_string())
                    .and_then(|tag| StructuralTag::from_value(&tag))
                    .map_err(|e| ApiError::invalid(param, format!("structural_tag: {e}")))?;
                found.push((param, Grammar::StructuralTag(tag)));
            }
            if let Some(schema) = &outputs.json {
                found.push((param, Grammar::JsonSchema(schema_value(param, schema)?)));
            }
            if let Some(regex) = &outputs.regex {
                found.push((param, Grammar::Regex(regex.clone())));
            }
            if let Some(choice) = &outputs.choice {
                found.push((param, Grammar::Choice(choice.clone())));
            }
            if let Some(grammar) = &outputs.grammar {
                found.push((param, Grammar::Lark(grammar.clone())));
            }
            if outputs.json_object == Some(true) {
                found.push((param, any_object()));
            }
        }
        if let Some(schema) = &self.guided_json {
            let param = "guided_json";
            found.push((param, Grammar::JsonSchema(schema_value(param, schema)?)));
        }
        if let Some(regex) = &self.guided_regex {
            found.push(("guided_regex", Grammar::Regex(regex.clone())));
        }
        if let Some(choice) = &self.guided_choice {
            found.push(("guided_choice", Grammar::Choice(choice.clone())));
        }
        if let Some(grammar) = &self.guided_grammar {
            found.push(("guided_grammar", Grammar::Lark(grammar.clone())));
        }
        if found.len() > 1 {
            return Err(ApiError::invalid(
                found[1].0,
                "give one output constraint (response_format, structured_outputs or a guided_* field)",
            ));
        }
        Ok(found.pop())
    }
}

fn any_object() -> Grammar {
    Grammar::JsonSchema(serde_json::json!({"type": "object"}))
}

/// A schema given as an object or as its JSON text.
fn schema_value(param: &'static str, schema: &Value) -> Result<Value, ApiError> {
    match schema {
        Value::String(text) => serde_json::from_str(text)
            .map_err(|e| ApiError::invalid(param, format!("the schema is not JSON: {e}"))),
        Value::Object(_) | Value::Bool(true) => Ok(schema.clone()),
        _ => Err(ApiError::invalid(param, "the schema must be a JSON object")),
    }
}

/// OpenAI's `response_format`: `text`, `json_object`, or `json_schema` (strict or not; both
/// are enforced).
fn response_format(format: &Value) -> Result<Option<Grammar>, ApiError> {
    let param = "response_format";
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(any_object())),
        Some("json_schema") => {
            let spec = format.get("json_schema").ok_or_else(|| {
                ApiError::invalid(param, "json_schema needs a json_schema object")
            })?;
            if spec.get("name").and_then(Value::as_str).is_none() {
                return Err(ApiError::invalid(param, "json_schema needs a name"));
            }
            match spec.get("schema") {
                Some(schema) => Ok(Some(Grammar::JsonSchema(schema_value(param, schema)?))),
                None => Ok(Some(any_object())),
            }
        }
        Some("structural_tag") => StructuralTag::from_value(format)
            .map(|tag| Some(Grammar::StructuralTag(tag)))
            .map_err(|e| ApiError::invalid(param, e)),
        Some(other) => Err(ApiError::invalid(
            param,
            format!(
                "response_format type {other:?} is not supported (text, json_object, json_schema, structural_tag)"
            ),
        )),
        None => Err(ApiError::invalid(param, "response_format needs a type")),
    }
}

/// `logprobs` for completions (a count), checked.
pub fn check_logprobs(param: &'static str, n: Option<usize>) -> Result<Option<usize>, ApiError> {
    match n {
        Some(n) if n > MAX_LOGPROBS => Err(ApiError::invalid(
            param,
            format!("{param} must be at most {MAX_LOGPROBS}"),
        )),
        n => Ok(n),
    }
}
