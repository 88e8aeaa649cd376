//! Tool calls in the formats of the model families served: Hermes / Qwen
//! (`<tool_call>{json}</tool_call>`), Llama 3 (a bare `{"name", "parameters"}` object) and
//! Mistral (`[TOOL_CALLS][{"name", "arguments"}, ...]`, and since its v11 tokenizer
//! `[TOOL_CALLS]name[ARGS]{arguments}`). Each format gives the grammar that
//! forces a call when a request requires one, and a parser that turns the model's text into
//! OpenAI's `tool_calls` as it streams.

use serde_json::{Value, json};

mod named;
mod scan;

use scan::ObjectScan;

/// How a model writes its tool calls (vLLM's `--tool-call-parser` names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolFormat {
    Hermes,
    Llama3Json,
    /// `[TOOL_CALLS]` and a JSON array of calls (Mistral's tokenizers up to v7).
    Mistral,
    /// `[TOOL_CALLS]name[ARGS]{...}` per call (Mistral's v11+ tokenizers).
    MistralNamed,
}

impl ToolFormat {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "hermes" => Some(Self::Hermes),
            "llama3_json" => Some(Self::Llama3Json),
            "mistral" => Some(Self::Mistral),
            _ => None,
        }
    }

    /// The format a chat template teaches, from what it writes around calls.
    pub fn detect(template: &str) -> Option<Self> {
        if template.contains("<tool_call>") {
            Some(Self::Hermes)
        } else if template.contains("[TOOL_CALLS]") && template.contains("[ARGS]") {
            Some(Self::MistralNamed)
        } else if template.contains("[TOOL_CALLS]") {
            Some(Self::Mistral)
        } else if template.contains("<|python_tag|>") || template.contains("ipython") {
            Some(Self::Llama3Json)
        } else {
            None
        }
    }

    /// Mistral's format is the tokenizer's: one with an `[ARGS]` token (v11+) names calls.
    #[must_use]
    pub fn for_tokenizer(self, has_token: impl Fn(&str) -> bool) -> Self {
        match self {
            Self::Mistral if has_token("[ARGS]") => Self::MistralNamed,
            other => other,
        }
    }

    /// The special token that opens calls, which must stay in the decoded text.
    pub fn marker(self) -> Option<&'static str> {
        match self {
            Self::Hermes => Some("<tool_call>"),
            Self::Mistral | Self::MistralNamed => Some("[TOOL_CALLS]"),
            Self::Llama3Json => None,
        }
    }

    fn arguments_key(self) -> &'static str {
        match self {
            Self::Llama3Json => "parameters",
            Self::Hermes | Self::Mistral | Self::MistralNamed => "arguments",
        }
    }

    /// A Lark grammar that forces calls of `functions` in this format: one or, when
    /// `parallel`, several. `literal` spells a marker: `<[id]>` when it is a special token.
    pub fn grammar(
        self,
        functions: &[Function],
        parallel: bool,
        literal: impl Fn(&str) -> String,
    ) -> String {
        if self == Self::MistralNamed {
            return named::grammar(functions, parallel, literal);
        }
        let compact =
            json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "});
        let mut call = json!({
            "anyOf": functions.iter().map(|f| json!({
                "type": "object",
                "properties": {"name": {"const": f.name}, self.arguments_key(): f.parameters},
                "required": ["name", self.arguments_key()],
                "additionalProperties": false,
            })).collect::<Vec<_>>(),
        });
        let (newline, semicolon) = if parallel {
            (" (\"\\n\" call)*", " (\"; \" call)*")
        } else {
            ("", "")
        };
        if self != Self::Mistral {
            call["x-guidance"] = compact.clone();
        }
        match self {
            Self::Hermes => format!(
                "start: call{newline}\ncall: {} \"\\n\" %json {call} \"\\n</tool_call>\"\n",
                literal("<tool_call>")
            ),
            Self::Llama3Json => format!("start: call{semicolon}\ncall: %json {call}\n"),
            Self::Mistral => {
                let mut array = json!({"type": "array", "items": call, "minItems": 1});
                if !parallel {
                    array["maxItems"] = json!(1);
                }
                array["x-guidance"] = compact;
                format!("start: {} %json {array}\n", literal("[TOOL_CALLS]"))
            }
            Self::MistralNamed => unreachable!("returned above"),
        }
    }
}

/// A function the client offers, from `tools`.
#[derive(Clone, Debug, PartialEq)]
pub struct Function {
    pub name: String,
    /// A JSON schema of the arguments object.
    pub parameters: Value,
}

/// A piece of a streamed answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delta {
    Content(String),
    /// A call begins.
    Call {
        index: usize,
        id: String,
        name: String,
    },
    /// More of a call's arguments (a JSON text, in pieces).
    Arguments {
        index: usize,
        fragment: String,
    },
}

/// Text between calls that is not content.
const SEPARATORS: [&str; 8] = [
    "<tool_call>",
    "</tool_call>",
    "[TOOL_CALLS]",
    "<|python_tag|>",
    "[",
    "]",
    ",",
    ";",
];

/// Turns a model's text, fed as it grows, into content and tool calls.
pub struct ToolCallParser {
    format: ToolFormat,
    text: String,
    /// Bytes of `text` dealt with.
    done: usize,
    in_calls: bool,
    object: Option<ObjectScan>,
    /// A named call's index and its arguments object (`MistralNamed`).
    named: Option<(usize, ObjectScan)>,
    calls: usize,
    ids: Box<dyn FnMut() -> String + Send>,
}

impl std::fmt::Debug for ToolCallParser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolCallParser")
            .field("format", &self.format)
            .field("calls", &self.calls)
            .finish_non_exhaustive()
    }
}

impl ToolCallParser {
    /// `ids` names each call (`call_...`; Mistral's templates want nine letters or digits).
    pub fn new(format: ToolFormat, ids: impl FnMut() -> String + Send + 'static) -> Self {
        Self {
            format,
            text: String::new(),
            done: 0,
            in_calls: false,
            object: None,
            named: None,
            calls: 0,
            ids: Box::new(ids),
        }
    }

    /// Calls found so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// What `more` text settles; a possible start of a marker waits for the next piece.
    pub fn push(&mut self, more: &str) -> Vec<Delta> {
        self.text.push_str(more);
        let mut out = Vec::new();
        self.advance(&mut out, false);
        out
    }

    /// The rest, at the end of the output.
    pub fn finish(&mut self) -> Vec<Delta> {
        let mut out = Vec::new();
        self.advance(&mut out, true);
        if self.named.take().is_some() {
            // Its arguments, cut short, were sent as they came.
            self.done = self.text.len();
        }
        if let Some(object) = self.object.take() {
            // An unfinished call without a name is not a call; one with a name keeps the
            // arguments it had (the output was cut short).
            if object.header_sent.is_none() {
                out.push(Delta::Content(self.text[object.start..].to_owned()));
            }
            self.done = self.text.len();
        }
        if self.done < self.text.len() {
            out.push(Delta::Content(self.text[self.done..].to_owned()));
            self.done = self.text.len();
        }
        out
    }

    fn advance(&mut self, out: &mut Vec<Delta>, end: bool) {
        loop {
            if !self.in_calls {
                if !self.find_calls(out, end) {
                    return;
                }
                continue;
            }
            if self.format == ToolFormat::MistralNamed {
                if self.advance_named(out, end) {
                    return;
                }
                self.in_calls = false;
                continue;
            }
            if let Some(object) = self.object.as_mut() {
                object.scan(&self.text);
                let finished = object.end.is_some();
                self.emit(out);
                if !finished {
                    return;
                }
                continue;
            }
            let rest = &self.text[self.done..];
            let trimmed = rest.trim_start();
            self.done += rest.len() - trimmed.len();
            if trimmed.is_empty() {
                return;
            }
            if trimmed.starts_with('{') {
                self.object = Some(ObjectScan::new(self.done));
                continue;
            }
            if let Some(sep) = SEPARATORS.iter().find(|s| trimmed.starts_with(**s)) {
                self.done += sep.len();
                continue;
            }
            if !end && SEPARATORS.iter().any(|s| s.starts_with(trimmed)) {
                return;
            }
            // Text after the calls is content again.
            self.in_calls = false;
        }
    }

    /// In content: sends what cannot start a call; true once calls begin.
    fn find_calls(&mut self, out: &mut Vec<Delta>, end: bool) -> bool {
        let rest = &self.text[self.done..];
        let start = match self.format.marker() {
            Some(marker) => {
                let Some(at) = rest.find(marker) else {
                    let send = rest.len() - if end { 0 } else { held_back(rest, marker) };
                    if send > 0 {
                        out.push(Delta::Content(rest[..send].to_owned()));
                        self.done += send;
                    }
                    return false;
                };
                Some((at, marker.len()))
            }
            // Llama 3 calls are the whole output: a `{` first (after whitespace).
            None if self.done == 0 && self.calls == 0 => {
                let trimmed = rest.trim_start();
                if trimmed.is_empty() && !end {
                    return false;
                }
                trimmed
                    .starts_with('{')
                    .then_some((rest.len() - trimmed.len(), 0))
            }
            None => None,
        };
        let Some((at, skip)) = start else {
            if !rest.is_empty() {
                out.push(Delta::Content(rest.to_owned()));
                self.done = self.text.len();
            }
            return false;
        };
        let content = rest[..at].trim_end();
        if !content.is_empty() {
            out.push(Delta::Content(content.to_owned()));
        }
        self.done += at + skip;
        self.in_calls = true;
        true
    }

    /// Sends what the current object settles: its name, arguments, and at its end the call.
    fn emit(&mut self, out: &mut Vec<Delta>) {
        let Some(object) = self.object.as_mut() else {
            return;
        };
        if object.header_sent.is_none()
            && let Some(name) = &object.name
        {
            let index = self.calls;
            out.push(Delta::Call {
                index,
                id: (self.ids)(),
                name: name.clone(),
            });
            object.header_sent = Some(index);
            self.calls += 1;
        }
        let Some(index) = object.header_sent else {
            if let Some(end) = object.end {
                // A complete object without a name: content, not a call.
                out.push(Delta::Content(self.text[object.start..end].to_owned()));
                self.done = end;
                self.object = None;
                self.in_calls = false;
            }
            return;
        };
        if let Some((start, end)) = object.arguments
            && !object.arguments_is_string
        {
            let upto = end.unwrap_or(object.at);
            let from = object.arguments_sent.max(start);
            if upto > from {
                out.push(Delta::Arguments {
                    index,
                    fragment: self.text[from..upto].to_owned(),
                });
                object.arguments_sent = upto;
            }
        }
        if let Some(end) = object.end {
            match object.arguments {
                None => out.push(Delta::Arguments {
                    index,
                    fragment: "{}".to_owned(),
                }),
                Some((start, Some(stop))) if object.arguments_is_string => {
                    let text =
                        serde_json::from_str::<String>(&self.text[start..stop]).unwrap_or_default();
                    out.push(Delta::Arguments {
                        index,
                        fragment: text,
                    });
                }
                Some(_) => {}
            }
            self.done = end;
            self.object = None;
        }
    }
}

/// How much of the end of `text` to hold back: a tail that may be the beginning of `marker`,
/// and the whitespace before it, which a call's start would drop.
fn held_back(text: &str, marker: &str) -> usize {
    let partial = (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0);
    let before = &text[..text.len() - partial];
    partial + before.len() - before.trim_end().len()
}

/// A parsed answer: the content and the calls, each `(id, name, arguments)`.
pub fn collect(deltas: impl IntoIterator<Item = Delta>) -> (String, Vec<(String, String, String)>) {
    let mut content = String::new();
    let mut calls: Vec<(String, String, String)> = Vec::new();
    for delta in deltas {
        match delta {
            Delta::Content(text) => content.push_str(&text),
            Delta::Call { id, name, .. } => calls.push((id, name, String::new())),
            Delta::Arguments { index, fragment } => {
                if let Some(call) = calls.get_mut(index) {
                    call.2.push_str(&fragment);
                }
            }
        }
    }
    (content, calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> impl FnMut() -> String + Send + 'static {
        let mut n = 0;
        move || {
            n += 1;
            format!("call_{n}")
        }
    }

    /// Parses `text` fed in pieces of `step` bytes (on character boundaries).
    pub(super) fn parse(
        format: ToolFormat,
        text: &str,
        step: usize,
    ) -> (String, Vec<(String, String, String)>) {
        let mut parser = ToolCallParser::new(format, ids());
        let mut deltas = Vec::new();
        let mut piece = String::new();
        for c in text.chars() {
            piece.push(c);
            if piece.len() >= step {
                deltas.extend(parser.push(&piece));
                piece.clear();
            }
        }
        deltas.extend(parser.push(&piece));
        deltas.extend(parser.finish());
        collect(deltas)
    }

    fn call(name: &str, arguments: &str, n: usize) -> (String, String, String) {
        (format!("call_{n}"), name.to_owned(), arguments.to_owned())
    }

    #[test]
    fn hermes_calls_parse_the_same_in_any_pieces() {
        let text = "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris \\\"}\", \"days\": [1, 2]}}\n</tool_call>\n<tool_call>\n{\"arguments\": {}, \"name\": \"now\"}\n</tool_call>";
        for step in [1, 2, 3, 7, 1000] {
            let (content, calls) = parse(ToolFormat::Hermes, text, step);
            assert_eq!(content, "Let me look.", "step {step}");
            assert_eq!(
                calls,
                [
                    call(
                        "get_weather",
                        "{\"city\": \"Paris \\\"}\", \"days\": [1, 2]}",
                        1
                    ),
                    call("now", "{}", 2)
                ],
                "step {step}"
            );
        }
    }

    #[test]
    fn llama3_and_mistral_calls_parse() {
        let (content, calls) = parse(
            ToolFormat::Llama3Json,
            " {\"name\": \"f\", \"parameters\": {\"x\": 1}}; {\"name\": \"g\", \"parameters\": {\"y\": \"é\"}}",
            2,
        );
        assert_eq!(content, "");
        assert_eq!(
            calls,
            [call("f", "{\"x\": 1}", 1), call("g", "{\"y\": \"é\"}", 2)]
        );
        let (content, calls) = parse(
            ToolFormat::Mistral,
            "[TOOL_CALLS][{\"name\": \"f\", \"arguments\": \"{\\\"x\\\": 2}\"}]",
            4,
        );
        assert_eq!(content, "");
        assert_eq!(calls, [call("f", "{\"x\": 2}", 1)], "string arguments");
    }

    #[test]
    fn text_without_calls_is_content() {
        for (format, text) in [
            (ToolFormat::Hermes, "a < b and <tool is fine"),
            (ToolFormat::Llama3Json, "The answer is {x}."),
            (ToolFormat::Mistral, "[TOOL] no"),
        ] {
            assert_eq!(parse(format, text, 1), (text.to_owned(), Vec::new()));
        }
        // An object without a name is not a call.
        let (content, calls) = parse(ToolFormat::Hermes, "<tool_call>{\"x\": 1}", 3);
        assert_eq!((content.as_str(), calls.len()), ("{\"x\": 1}", 0));
    }

    #[test]
    fn an_unfinished_call_keeps_its_name_and_partial_arguments() {
        let (content, calls) = parse(
            ToolFormat::Hermes,
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": [1, 2",
            5,
        );
        assert_eq!(content, "");
        assert_eq!(calls, [call("f", "{\"x\": [1, 2", 1)]);
    }

    #[test]
    fn forcing_grammars_name_the_functions_in_each_format() {
        let functions = [Function {
            name: "get_weather".to_owned(),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}}),
        }];
        let quoted = |m: &str| serde_json::to_string(m).expect("a string");
        let hermes = ToolFormat::Hermes.grammar(&functions, false, quoted);
        assert!(
            hermes.starts_with("start: call\ncall: \"<tool_call>\" \"\\n\" %json {"),
            "{hermes}"
        );
        assert!(hermes.contains(r#""const":"get_weather""#), "{hermes}");
        let llama = ToolFormat::Llama3Json.grammar(&functions, true, quoted);
        assert!(llama.starts_with("start: call (\"; \" call)*\n"), "{llama}");
        assert!(llama.contains(r#""parameters":{"#), "{llama}");
        let mistral = ToolFormat::Mistral.grammar(&functions, false, |_| "<[5]>".to_owned());
        assert!(mistral.starts_with("start: <[5]> %json {"), "{mistral}");
        assert!(mistral.contains(r#""maxItems":1"#), "{mistral}");
    }

    #[test]
    fn formats_are_detected_from_templates() {
        assert_eq!(
            ToolFormat::detect("{{ '<tool_call>' }}"),
            Some(ToolFormat::Hermes)
        );
        assert_eq!(
            ToolFormat::detect("[TOOL_CALLS] {{ x }}"),
            Some(ToolFormat::Mistral)
        );
        assert_eq!(
            ToolFormat::detect("<|python_tag|>"),
            Some(ToolFormat::Llama3Json)
        );
        assert_eq!(ToolFormat::detect("{{ messages }}"), None);
    }
}
