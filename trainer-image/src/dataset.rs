//! Dataset JSONL in its three shapes, read strictly: a bad line is an error that names its
//! line number, so the trainer can exit with a one-line reason instead of training on less
//! than it was given.

use graft_api::DatasetFormat;
use serde::Deserialize;

use graft_engine::rng::Rng;
pub use graft_engine::text::chat::Message;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DatasetError {
    #[error("dataset line {line}: not JSON ({reason})")]
    NotJson { line: usize, reason: String },
    #[error("dataset line {line}: expected {expected}")]
    Shape { line: usize, expected: String },
    #[error("dataset line {line}: {reason}")]
    Invalid { line: usize, reason: String },
    #[error("the dataset has no records")]
    Empty,
}

/// One training record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// Chat template applied; loss on the assistant turns.
    Messages(Vec<Message>),
    /// Loss on the completion only.
    PromptCompletion { prompt: String, completion: String },
    /// Loss on every token.
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessagesLine {
    messages: Vec<Message>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptCompletionLine {
    prompt: String,
    completion: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TextLine {
    text: String,
}

const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// Parses `text` (JSONL; blank lines skipped) as `format`; `auto` takes the shape of the
/// first record and holds every later line to it.
pub fn parse(text: &str, format: DatasetFormat) -> Result<Vec<Record>, DatasetError> {
    let mut format = format;
    let mut records = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_number = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| DatasetError::NotJson {
                line: line_number,
                reason: e.to_string(),
            })?;
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

fn record(
    value: serde_json::Value,
    format: DatasetFormat,
    line: usize,
) -> Result<Record, DatasetError> {
    let shape = |expected: &str| DatasetError::Shape {
        line,
        expected: expected.to_owned(),
    };
    match format {
        DatasetFormat::Messages | DatasetFormat::Auto => {
            let parsed: MessagesLine = serde_json::from_value(value)
                .map_err(|_| shape(r#"{"messages": [{"role": "...", "content": "..."}, ...]}"#))?;
            check_messages(&parsed.messages, line)?;
            Ok(Record::Messages(parsed.messages))
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

fn check_messages(messages: &[Message], line: usize) -> Result<(), DatasetError> {
    let invalid = |reason: String| Err(DatasetError::Invalid { line, reason });
    if let Some(bad) = messages.iter().find(|m| !ROLES.contains(&m.role.as_str())) {
        return invalid(format!(
            "unknown role {:?} (use system, user or assistant)",
            bad.role
        ));
    }
    if !messages.iter().any(|m| m.role == "assistant") {
        return invalid("no assistant turn: nothing to learn".to_owned());
    }
    Ok(())
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
            Record::Messages(ref m) if m.len() == 2
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
            Err(DatasetError::NotJson { line: 2, .. })
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
