//! Dataset JSONL in its three shapes, read strictly: a bad line is an error that names its
//! line number, so the trainer can exit with a one-line reason instead of training on less
//! than it was given. Fields a shape does not use (an `id`, a `source`, other metadata) are
//! ignored; conversations are OpenAI's fine-tuning format, `tools`, `tool_calls`, `tool`
//! turns and per-turn `weight` included.

use graft_api::DatasetFormat;
use serde::Deserialize;

use graft_engine::rng::Rng;
use serde_json::Value;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DatasetError {
    #[error("dataset {line}: not JSON ({reason})")]
    NotJson { line: Place, reason: String },
    #[error("dataset {line}: expected {expected}")]
    Shape { line: Place, expected: String },
    #[error("dataset {line}: {reason}")]
    Invalid { line: Place, reason: String },
    #[error("the dataset is not a Parquet file Graft reads: {0}")]
    Parquet(String),
    #[error("the dataset has no records")]
    Empty,
}

/// Where a record is: a JSON Lines file's line, or a Parquet file's row (both from 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    Line(usize),
    Row(usize),
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Line(n) => write!(f, "line {n}"),
            Self::Row(n) => write!(f, "row {n}"),
        }
    }
}

/// One training record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// Chat template applied; loss on the assistant turns it learns.
    Messages(Conversation),
    /// Loss on the completion only.
    PromptCompletion { prompt: String, completion: String },
    /// Loss on every token.
    Text(String),
}

/// A conversation as the chat template receives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conversation {
    /// OpenAI-shaped messages (`role`, `content`, `tool_calls`, `tool_call_id`, `name`), with
    /// `weight` taken out.
    pub messages: Vec<Value>,
    /// Function definitions the template lists (`tools=` of `apply_chat_template`).
    pub tools: Option<Vec<Value>>,
    /// Per message: an assistant turn that is a label (`weight` 1, the default).
    pub learned: Vec<bool>,
}

impl Conversation {
    /// Plain turns, every assistant turn learned.
    pub fn of(turns: &[(&str, &str)]) -> Self {
        Self {
            messages: turns
                .iter()
                .map(|(role, content)| serde_json::json!({"role": role, "content": content}))
                .collect(),
            tools: None,
            learned: vec![true; turns.len()],
        }
    }
}

#[derive(Deserialize)]
struct MessagesLine {
    messages: Vec<Value>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
}

#[derive(Deserialize)]
struct PromptCompletionLine {
    prompt: String,
    completion: String,
}

#[derive(Deserialize)]
struct TextLine {
    text: String,
}

const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// Parses `text` (JSONL; blank lines skipped) as `format`; `auto` takes the shape of the
/// first record and holds every later line to it.
pub fn parse(text: &str, format: DatasetFormat) -> Result<Vec<Record>, DatasetError> {
    let values = text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| {
            let place = Place::Line(index + 1);
            serde_json::from_str(line)
                .map(|value| (place, value))
                .map_err(|e| DatasetError::NotJson {
                    line: place,
                    reason: e.to_string(),
                })
        });
    records(values, format)
}

/// Parses a Parquet file's rows as `format`, each row a record with its columns as fields
/// (a `messages` column of lists of structs is a conversation).
pub fn parse_parquet(
    bytes: &bytes::Bytes,
    format: DatasetFormat,
) -> Result<Vec<Record>, DatasetError> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let unreadable = |e: parquet::errors::ParquetError| DatasetError::Parquet(e.to_string());
    let reader = SerializedFileReader::new(bytes.clone()).map_err(unreadable)?;
    let rows = reader.get_row_iter(None).map_err(unreadable)?;
    let values = rows.enumerate().map(|(index, row)| {
        row.map(|row| (Place::Row(index + 1), row.to_json_value()))
            .map_err(unreadable)
    });
    records(values, format)
}

fn records(
    values: impl Iterator<Item = Result<(Place, Value), DatasetError>>,
    format: DatasetFormat,
) -> Result<Vec<Record>, DatasetError> {
    let mut format = format;
    let mut records = Vec::new();
    for value in values {
        let (line_number, value) = value?;
        if format == DatasetFormat::Auto {
            format = detect(&value).ok_or_else(|| DatasetError::Shape {
                line: line_number,
                expected: "an object with \"messages\", \"prompt\" and \"completion\", or \"text\""
                    .to_owned(),
            })?;
        }
        records.push(record(value, format, line_number)?);
    }
    if records.is_empty() {
        return Err(DatasetError::Empty);
    }
    Ok(records)
}

fn detect(value: &serde_json::Value) -> Option<DatasetFormat> {
    let object = value.as_object()?;
    if object.contains_key("messages") {
        Some(DatasetFormat::Messages)
    } else if object.contains_key("prompt") {
        Some(DatasetFormat::PromptCompletion)
    } else if object.contains_key("text") {
        Some(DatasetFormat::Text)
    } else {
        None
    }
}

fn record(value: Value, format: DatasetFormat, line: Place) -> Result<Record, DatasetError> {
    let shape = |expected: &str| DatasetError::Shape {
        line,
        expected: expected.to_owned(),
    };
    match format {
        DatasetFormat::Messages | DatasetFormat::Auto => {
            let parsed: MessagesLine = serde_json::from_value(value)
                .map_err(|_| shape(r#"{"messages": [{"role": "...", "content": "..."}, ...]}"#))?;
            Ok(Record::Messages(conversation(parsed, line)?))
        }
        DatasetFormat::PromptCompletion => {
            let parsed: PromptCompletionLine = serde_json::from_value(value)
                .map_err(|_| shape(r#"{"prompt": "...", "completion": "..."}"#))?;
            if parsed.completion.is_empty() {
                return Err(DatasetError::Invalid {
                    line,
                    reason: "empty completion: nothing to learn".to_owned(),
                });
            }
            Ok(Record::PromptCompletion {
                prompt: parsed.prompt,
                completion: parsed.completion,
            })
        }
        DatasetFormat::Text => {
            let parsed: TextLine =
                serde_json::from_value(value).map_err(|_| shape(r#"{"text": "..."}"#))?;
            if parsed.text.is_empty() {
                return Err(DatasetError::Invalid {
                    line,
                    reason: "empty text".to_owned(),
                });
            }
            Ok(Record::Text(parsed.text))
        }
    }
}

/// Checks each turn and takes its `weight` out: 1 (or absent) learns an assistant turn, 0
/// keeps it as context, as OpenAI's fine-tuning format defines it.
fn conversation(parsed: MessagesLine, line: Place) -> Result<Conversation, DatasetError> {
    let invalid = |reason: String| DatasetError::Invalid { line, reason };
    let (mut messages, mut learned) = (Vec::new(), Vec::new());
    for (turn, message) in parsed.messages.into_iter().enumerate() {
        let Value::Object(mut fields) = message else {
            return Err(invalid(format!("message {turn} is not an object")));
        };
        let role = fields
            .get("role")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let role = role.as_str();
        if !ROLES.contains(&role) {
            return Err(invalid(format!(
                "message {turn}: unknown role {:?} (use system, user, assistant or tool)",
                fields.get("role").unwrap_or(&Value::Null)
            )));
        }
        let has_calls = fields.get("tool_calls").is_some_and(|c| !c.is_null());
        match fields.get("content") {
            Some(Value::String(_)) => {}
            None | Some(Value::Null) if role == "assistant" && has_calls => {}
            _ => {
                return Err(invalid(format!(
                    "message {turn} ({role}) needs a string content"
                )));
            }
        }
        let weight = match fields.remove("weight") {
            None => 1.0,
            Some(Value::Number(n)) if role == "assistant" => n.as_f64().unwrap_or(-1.0),
            Some(_) => {
                return Err(invalid(format!(
                    "message {turn}: weight is for assistant turns, 0 or 1"
                )));
            }
        };
        if weight != 0.0 && (weight - 1.0).abs() > f64::EPSILON {
            return Err(invalid(format!(
                "message {turn}: weight {weight} (OpenAI's format allows 0 or 1)"
            )));
        }
        learned.push(role == "assistant" && weight != 0.0);
        messages.push(Value::Object(fields));
    }
    if !learned.contains(&true) {
        return Err(invalid(
            "no assistant turn with weight 1: nothing to learn".to_owned(),
        ));
    }
    Ok(Conversation {
        messages,
        tools: parsed.tools,
        learned,
    })
}

/// How a dataset file is read, by its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// One JSON object per line (`.jsonl`, and `.json` as the hub names JSON Lines too).
    JsonLines,
    /// Apache Parquet, a row per record (most hub datasets).
    Parquet,
}

impl FileKind {
    pub fn of(name: &str) -> Option<Self> {
        let extension = std::path::Path::new(name).extension()?.to_ascii_lowercase();
        match extension.to_str()? {
            "jsonl" | "json" => Some(Self::JsonLines),
            "parquet" => Some(Self::Parquet),
            _ => None,
        }
    }
}

/// The records of every file, in order. A single file of any other name is read as JSON
/// Lines; errors name the file when there are several.
pub fn parse_files(
    files: &[(String, bytes::Bytes)],
    format: DatasetFormat,
) -> Result<Vec<Record>, String> {
    let mut records = Vec::new();
    for (name, bytes) in files {
        let named = |e: &dyn std::fmt::Display| {
            if files.len() > 1 {
                format!("{name}: {e}")
            } else {
                e.to_string()
            }
        };
        let parsed = if FileKind::of(name) == Some(FileKind::Parquet) {
            parse_parquet(bytes, format)
        } else {
            let text = std::str::from_utf8(bytes)
                .map_err(|e| named(&format!("the dataset is not UTF-8: {e}")))?;
            parse(text, format)
        };
        match parsed {
            Ok(mut more) => records.append(&mut more),
            // One empty file among several is not an empty dataset.
            Err(DatasetError::Empty) if files.len() > 1 => {}
            Err(e) => return Err(named(&e)),
        }
    }
    if records.is_empty() {
        return Err(DatasetError::Empty.to_string());
    }
    Ok(records)
}

/// The dataset's identity in `graft.json`: the sha256 of its one file, or, for several, of
/// their names and digests as a model's files are digested.
pub fn digest(files: &[(String, bytes::Bytes)]) -> String {
    use sha2::{Digest, Sha256};
    let sha256 = |bytes: &[u8]| format!("{:x}", Sha256::digest(bytes));
    if let [(_, bytes)] = files {
        return sha256(bytes);
    }
    let named: Vec<(String, String)> = files
        .iter()
        .map(|(name, bytes)| (name.clone(), sha256(bytes)))
        .collect();
    graft_engine::models::source::digest_named(&named)
}

/// Splits off `fraction` of the records (at least one when the fraction is positive and
/// there are two or more) for evaluation, chosen by a seeded shuffle.
pub fn split(records: Vec<Record>, fraction: f64, seed: u64) -> (Vec<Record>, Vec<Record>) {
    let n = records.len();
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let mut held = (n as f64 * fraction).round() as usize;
    if fraction > 0.0 && n >= 2 {
        held = held.clamp(1, n - 1);
    }
    let order = Rng::seed(seed).permutation(n);
    let held_out: std::collections::BTreeSet<usize> = order[..held].iter().copied().collect();
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (i, record) in records.into_iter().enumerate() {
        if held_out.contains(&i) {
            eval.push(record);
        } else {
            train.push(record);
        }
    }
    (train, eval)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_shapes_parse_and_auto_follows_the_first_line() {
        let chat = r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]}"#;
        assert!(matches!(
            parse(chat, DatasetFormat::Auto).expect("chat")[0],
            Record::Messages(ref c) if c.messages.len() == 2 && c.learned == [false, true]
        ));
        let pc = "{\"prompt\":\"2+2=\",\"completion\":\"4\"}\n\n{\"prompt\":\"3+3=\",\"completion\":\"6\"}";
        assert_eq!(parse(pc, DatasetFormat::Auto).expect("pc").len(), 2);
        let text = r#"{"text":"the quick brown fox"}"#;
        assert_eq!(
            parse(text, DatasetFormat::Text).expect("text"),
            [Record::Text("the quick brown fox".to_owned())]
        );
    }

    #[test]
    fn bad_lines_are_named_by_number() {
        let broken = "{\"text\":\"ok\"}\n{\"text\": oops}\n";
        assert!(matches!(
            parse(broken, DatasetFormat::Auto),
            Err(DatasetError::NotJson {
                line: Place::Line(2),
                ..
            })
        ));
        let mixed = "{\"text\":\"ok\"}\n{\"prompt\":\"a\",\"completion\":\"b\"}\n";
        let error = parse(mixed, DatasetFormat::Auto).expect_err("mixed shapes");
        assert!(
            error
                .to_string()
                .starts_with("dataset line 2: expected {\"text\""),
            "{error}"
        );
        let no_assistant = r#"{"messages":[{"role":"user","content":"hi"}]}"#;
        assert!(
            parse(no_assistant, DatasetFormat::Messages)
                .expect_err("no assistant")
                .to_string()
                .contains("line 1: no assistant turn")
        );
        let bad_role =
            r#"{"messages":[{"role":"robot","content":"x"},{"role":"assistant","content":"y"}]}"#;
        assert!(
            parse(bad_role, DatasetFormat::Auto)
                .expect_err("role")
                .to_string()
                .contains("\"robot\"")
        );
    }

    /// OpenAI's fine-tuning format as users export it: metadata beside the messages, tools,
    /// a tool call and its result, and an assistant turn kept as context with `weight: 0`.
    #[test]
    fn openai_conversations_keep_tools_and_per_turn_weights() {
        let line = r#"{"id": "c-17", "source": "support", "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
            "messages": [{"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "It rains.", "weight": 0},
            {"role": "user", "content": "Check it."},
            {"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
            {"role": "tool", "tool_call_id": "1", "content": "sun"},
            {"role": "assistant", "content": "Sunny.", "weight": 1}]}"#
            .replace('\n', " ");
        let records = parse(&line, DatasetFormat::Auto).expect("parses");
        let Record::Messages(conversation) = &records[0] else {
            panic!("a conversation");
        };
        assert_eq!(
            conversation.learned,
            [false, false, false, true, false, true]
        );
        assert!(
            conversation
                .messages
                .iter()
                .all(|m| m.get("weight").is_none())
        );
        assert_eq!(conversation.tools.as_ref().map(Vec::len), Some(1));
        assert_eq!(
            conversation.messages[3]["tool_calls"][0]["function"]["name"],
            "weather"
        );

        let all_context = r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b","weight":0}]}"#;
        let error = parse(all_context, DatasetFormat::Auto).expect_err("nothing learned");
        assert!(error.to_string().contains("weight 1"), "{error}");
        let half = r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b","weight":0.5}]}"#;
        let error = parse(half, DatasetFormat::Auto).expect_err("0 or 1");
        assert!(error.to_string().contains("0 or 1"), "{error}");
        let extra = r#"{"prompt":"2+2=","completion":"4","meta":{"k":1}}"#;
        assert_eq!(
            parse(extra, DatasetFormat::Auto)
                .expect("metadata ignored")
                .len(),
            1
        );
    }

    #[test]
    fn several_files_are_one_dataset_and_errors_name_the_file() {
        let file = |name: &str, text: &str| (name.to_owned(), bytes::Bytes::from(text.to_owned()));
        let good = file("a.jsonl", "{\"text\":\"one\"}\n{\"text\":\"two\"}\n");
        let empty = file("b.jsonl", "\n");
        let records = parse_files(&[good.clone(), empty], DatasetFormat::Auto).expect("parses");
        assert_eq!(records.len(), 2, "an empty file among several adds nothing");
        let bad = file("c.jsonl", "{\"text\":\"ok\"}\n{oops}\n");
        let error = parse_files(&[good, bad], DatasetFormat::Auto).expect_err("bad line");
        assert!(error.starts_with("c.jsonl: dataset line 2"), "{error}");
        let not_parquet = file("d.parquet", "PAR1 not really");
        let error = parse_files(&[not_parquet], DatasetFormat::Auto).expect_err("not Parquet");
        assert!(error.contains("Parquet"), "{error}");
    }

    #[test]
    fn an_empty_dataset_is_an_error() {
        assert_eq!(
            parse("\n  \n", DatasetFormat::Auto),
            Err(DatasetError::Empty)
        );
    }

    #[test]
    fn the_split_is_seeded_and_keeps_every_record() {
        let records: Vec<Record> = (0..40).map(|i| Record::Text(i.to_string())).collect();
        let (train, eval) = split(records.clone(), 0.1, 42);
        assert_eq!((train.len(), eval.len()), (36, 4));
        assert_eq!(
            split(records.clone(), 0.1, 42).1,
            eval,
            "same seed, same split"
        );
        assert_ne!(
            split(records.clone(), 0.1, 7).1,
            eval,
            "another seed, another split"
        );
        let (train, eval) = split(records[..3].to_vec(), 0.05, 1);
        assert_eq!(
            (train.len(), eval.len()),
            (2, 1),
            "a positive fraction holds out one"
        );
    }
}
