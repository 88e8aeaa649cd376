//! Mistral's calls since its v11 tokenizer (Mistral Small 3.1+, Magistral, Devstral): each
//! call is `[TOOL_CALLS]name[ARGS]{arguments}`, optionally with `[CALL_ID]id` before
//! `[ARGS]`; the name is bare text, so it is read up to the next marker.

use std::fmt::Write;

use serde_json::json;

use super::{Delta, Function, ToolCallParser, scan::ObjectScan};

const ARGS: &str = "[ARGS]";
const CALL_ID: &str = "[CALL_ID]";
const OPEN: &str = "[TOOL_CALLS]";
/// A name longer than this without `[ARGS]` is not a call's name but content.
const MAX_NAME: usize = 256;

/// A Lark grammar that forces calls of `functions`: one or, when `parallel`, several, each
/// function's arguments by its own schema.
pub(super) fn grammar(
    functions: &[Function],
    parallel: bool,
    literal: impl Fn(&str) -> String,
) -> String {
    let (open, args) = (literal(OPEN), literal(ARGS));
    let mut out = format!("start: call{}\n", if parallel { "+" } else { "" });
    let names: Vec<String> = (0..functions.len()).map(|i| format!("f{i}")).collect();
    let _ = writeln!(out, "call: {}", names.join(" | "));
    for (rule, f) in names.iter().zip(functions) {
        let mut schema = f.parameters.clone();
        if let Some(object) = schema.as_object_mut() {
            object.insert(
                "x-guidance".to_owned(),
                json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
            );
        }
        let name = serde_json::to_string(&f.name).unwrap_or_default();
        let _ = writeln!(out, "{rule}: {open} {name} {args} %json {schema}");
    }
    out
}

impl ToolCallParser {
    /// In calls: a name, its arguments object streamed as it grows, another `[TOOL_CALLS]`;
    /// false when what follows is content.
    pub(super) fn advance_named(&mut self, out: &mut Vec<Delta>, end: bool) -> bool {
        loop {
            if let Some((index, scan)) = self.named.as_mut() {
                let index = *index;
                scan.scan(&self.text);
                let upto = scan.end.unwrap_or(scan.at);
                if upto > self.done {
                    out.push(Delta::Arguments {
                        index,
                        fragment: self.text[self.done..upto].to_owned(),
                    });
                    self.done = upto;
                }
                if scan.end.is_none() {
                    return true;
                }
                self.named = None;
                continue;
            }
            let rest = &self.text[self.done..];
            let trimmed = rest.trim_start();
            if trimmed.is_empty() {
                return true;
            }
            if let Some(after) = trimmed.strip_prefix(OPEN) {
                self.done = self.text.len() - after.len();
                continue;
            }
            let Some(at) = rest.find(ARGS) else {
                let may_be_name = rest.len() <= MAX_NAME && !rest.contains(['\n', '{']);
                return !end && (may_be_name || OPEN.starts_with(trimmed));
            };
            let head = &rest[..at];
            let (name, id) = match head.split_once(CALL_ID) {
                Some((name, id)) => (name.trim(), Some(id.trim().to_owned())),
                None => (head.trim(), None),
            };
            if name.is_empty() || name.len() > MAX_NAME || name.contains(['\n', '{', '[']) {
                return false;
            }
            let index = self.calls;
            out.push(Delta::Call {
                index,
                id: id.filter(|i| !i.is_empty()).unwrap_or_else(|| (self.ids)()),
                name: name.to_owned(),
            });
            self.calls += 1;
            self.done += at + ARGS.len();
            self.named = Some((index, ObjectScan::new(self.done)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ToolFormat, tests::parse};
    use serde_json::json;

    use super::*;

    fn call(name: &str, arguments: &str, id: &str) -> (String, String, String) {
        (id.to_owned(), name.to_owned(), arguments.to_owned())
    }

    #[test]
    fn named_calls_parse_the_same_in_any_pieces() {
        let text = "Checking.[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris [ARGS] }\", \"days\": [1, 2]}[TOOL_CALLS]now[CALL_ID]a1b2c3d4e[ARGS]{}";
        for step in [1, 2, 3, 5, 1000] {
            let (content, calls) = parse(ToolFormat::MistralNamed, text, step);
            assert_eq!(content, "Checking.", "step {step}");
            assert_eq!(
                calls,
                [
                    call(
                        "get_weather",
                        "{\"city\": \"Paris [ARGS] }\", \"days\": [1, 2]}",
                        "call_1"
                    ),
                    call("now", "{}", "a1b2c3d4e"),
                ],
                "step {step}"
            );
        }
    }

    #[test]
    fn text_that_is_not_a_named_call_stays_content() {
        for text in ["No calls [here].", "[TOOL_CALLS]\n{\"x\": 1}"] {
            let (content, calls) = parse(ToolFormat::MistralNamed, text, 2);
            assert!(calls.is_empty(), "{text}");
            assert!(
                content.contains(text.trim_start_matches("[TOOL_CALLS]")),
                "{text} → {content}"
            );
        }
        // Cut short: the call keeps its name and the arguments it had.
        let (_, calls) = parse(ToolFormat::MistralNamed, "[TOOL_CALLS]f[ARGS]{\"x\": [1", 3);
        assert_eq!(calls, [call("f", "{\"x\": [1", "call_1")]);
    }

    #[test]
    fn the_forcing_grammar_names_each_function_with_its_own_schema() {
        let functions = [
            Function {
                name: "get_weather".to_owned(),
                parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}}),
            },
            Function {
                name: "now".to_owned(),
                parameters: json!({"type": "object"}),
            },
        ];
        let special = |m: &str| if m == OPEN { "<[9]>" } else { "<[11]>" }.to_owned();
        let one = grammar(&functions, false, special);
        assert!(one.starts_with("start: call\ncall: f0 | f1\n"), "{one}");
        assert!(
            one.contains("f0: <[9]> \"get_weather\" <[11]> %json {"),
            "{one}"
        );
        assert!(one.contains("f1: <[9]> \"now\" <[11]> %json {"), "{one}");
        assert!(grammar(&functions, true, special).starts_with("start: call+\n"));
    }
}
