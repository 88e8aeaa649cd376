//! Chat requests: OpenAI's messages (text parts, assistant `tool_calls`, `tool` results) and
//! `tools` rendered by the model's chat template as transformers renders them, and what
//! `tool_choice` asks of the answer.

use serde::Deserialize;
use serde_json::{Value, json};

use super::error::ApiError;
use crate::{
    constrain::Grammar,
    model::BaseModel,
    tool_calls::{Function, ToolFormat},
};

#[derive(Debug, Deserialize)]
pub struct ChatFields {
    pub messages: Vec<Value>,
    pub max_completion_tokens: Option<usize>,
    pub max_tokens: Option<usize>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<usize>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub add_generation_prompt: Option<bool>,
}

/// What the answer's text is read as.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolUse {
    pub format: ToolFormat,
    /// The grammar that forces calls (`tool_choice` `required` or a named function).
    pub forced: Option<Grammar>,
}

/// The conversation as the template sees it: roles, text content, tool calls with their
/// arguments as objects (transformers' templates index into them), tool results.
pub fn template_messages(messages: Vec<Value>) -> Result<Vec<Value>, ApiError> {
    let invalid = |message: String| ApiError::invalid("messages", message);
    if messages.is_empty() {
        return Err(invalid("messages must not be empty".to_owned()));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, message)| {
            let Value::Object(mut message) = message else {
                return Err(invalid(format!("messages[{i}] must be an object")));
            };
            let role = match message.get("role").and_then(Value::as_str) {
                // OpenAI's newer name for the system turn.
                Some("developer") => "system".to_owned(),
                Some(role) => role.to_owned(),
                None => return Err(invalid(format!("messages[{i}] needs a role"))),
            };
            message.insert("role".to_owned(), Value::String(role));
            let content = match message.remove("content") {
                None | Some(Value::Null) => Value::String(String::new()),
                Some(Value::String(text)) => Value::String(text),
                Some(Value::Array(parts)) => Value::String(text_parts(i, &parts)?),
                Some(_) => {
                    return Err(invalid(format!(
                        "messages[{i}].content must be a string or a list of parts"
                    )));
                }
            };
            message.insert("content".to_owned(), content);
            if let Some(Value::Array(calls)) = message.get_mut("tool_calls") {
                for call in calls {
                    if let Some(arguments) = call.pointer_mut("/function/arguments")
                        && let Some(text) = arguments.as_str()
                        && let Ok(parsed) = serde_json::from_str::<Value>(text)
                    {
                        *arguments = parsed;
                    }
                }
            }
            Ok(Value::Object(message))
        })
        .collect()
}

fn text_parts(i: usize, parts: &[Value]) -> Result<String, ApiError> {
    parts
        .iter()
        .map(
            |part| match (part["type"].as_str(), part["text"].as_str()) {
                (Some("text"), Some(text)) => Ok(text),
                (kind, _) => Err(ApiError::invalid(
                    "messages",
                    format!(
                        "messages[{i}]: content parts of type {:?} are not supported (text only)",
                        kind.unwrap_or("?")
                    ),
                )),
            },
        )
        .collect::<Result<Vec<_>, _>>()
        .map(|texts| texts.concat())
}

/// The offered functions, checked, from `tools`.
pub fn functions(tools: &[Value]) -> Result<Vec<Function>, ApiError> {
    tools
        .iter()
        .enumerate()
        .map(|(i, tool)| {
            let invalid = |m: &str| ApiError::invalid("tools", format!("tools[{i}]: {m}"));
            if tool["type"].as_str() != Some("function") {
                return Err(invalid("only tools of type \"function\" are supported"));
            }
            let name = tool["function"]["name"]
                .as_str()
                .filter(|n| !n.is_empty())
                .ok_or_else(|| invalid("a function needs a name"))?;
            let parameters = match &tool["function"]["parameters"] {
                Value::Null => json!({"type": "object", "properties": {}}),
                schema @ Value::Object(_) => schema.clone(),
                _ => return Err(invalid("parameters must be a JSON schema object")),
            };
            Ok(Function {
                name: name.to_owned(),
                parameters,
            })
        })
        .collect()
}

/// What `tool_choice` asks: `None` when the answer is plain text.
pub fn tool_use(
    model: &BaseModel,
    fields: &ChatFields,
    literal: impl Fn(&str) -> String,
) -> Result<Option<ToolUse>, ApiError> {
    let tools = fields.tools.as_deref().unwrap_or_default();
    let choice = fields.tool_choice.as_ref();
    if tools.is_empty() {
        return match choice {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s == "none" => Ok(None),
            Some(_) => Err(ApiError::invalid("tool_choice", "tool_choice needs tools")),
        };
    }
    let functions = functions(tools)?;
    let named = match choice {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match s.as_str() {
            "none" => return Ok(None),
            "auto" => None,
            "required" => Some(None),
            other => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("tool_choice {other:?} is not one of none, auto, required"),
                ));
            }
        },
        Some(object) => {
            let name = object["function"]["name"].as_str().ok_or_else(|| {
                ApiError::invalid(
                    "tool_choice",
                    "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": ...}}",
                )
            })?;
            if !functions.iter().any(|f| f.name == name) {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("tool_choice names {name:?}, which is not among the tools"),
                ));
            }
            Some(Some(name.to_owned()))
        }
    };
    let format = model.tool_format.ok_or_else(|| {
        ApiError::invalid(
            "tools",
            "this model's chat template writes tool calls in no format graft-server knows; \
             start it with --tool-call-parser hermes, llama3_json or mistral",
        )
    })?;
    let forced = named.map(|only| {
        let offered: Vec<Function> = functions
            .iter()
            .filter(|f| only.as_ref().is_none_or(|n| *n == f.name))
            .cloned()
            .collect();
        let parallel = only.is_none() && fields.parallel_tool_calls != Some(false);
        Grammar::Lark(format.grammar(&offered, parallel, literal))
    });
    Ok(Some(ToolUse { format, forced }))
}
