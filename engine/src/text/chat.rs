//! Chat templates as Hugging Face transformers renders them: the Jinja source from a model's
//! tokenizer files, run by minijinja in the environment transformers sets up
//! (`trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, a `tojson` that writes
//! what Python's `json.dumps` writes, and Python's string and dict methods).

use std::fmt::Write as _;

use minijinja::{
    Environment, Error, ErrorKind, Value, context,
    value::{Kwargs, ValueKind},
};
use serde::{Deserialize, Serialize};

/// One chat turn.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The special-token strings a template may refer to by name (`bos_token`, `eos_token`, ...).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
}

const NAME: &str = "chat_template";

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error names the line.
    pub fn new(source: &str) -> Result<Self, Error> {
        let mut env = Environment::new();
        // What transformers' `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`
        // does; Jinja's default of dropping one trailing newline is minijinja's default too.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(python_formatter);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, without_generation_tags(source))?;
        Ok(Self { env })
    }

    /// The conversation as text, with the variables transformers' `apply_chat_template` passes:
    /// `messages`, `add_generation_prompt`, the special tokens, and `tools` / `documents` as none.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        special_tokens: &SpecialTokens,
    ) -> Result<String, Error> {
        self.render_with_tools(
            &Value::from_serialize(messages),
            None,
            add_generation_prompt,
            special_tokens,
        )
    }

    /// [`ChatTemplate::render`] for messages of any shape (OpenAI's, with `tool_calls`,
    /// `tool_call_id`, `name`), and `tools` — a list of OpenAI function definitions — as
    /// transformers passes `apply_chat_template(messages, tools=...)`.
    pub fn render_with_tools(
        &self,
        messages: &Value,
        tools: Option<&Value>,
        add_generation_prompt: bool,
        special_tokens: &SpecialTokens,
    ) -> Result<String, Error> {
        let SpecialTokens {
            bos_token,
            eos_token,
            unk_token,
            pad_token,
        } = special_tokens;
        self.env.get_template(NAME)?.render(context! {
            messages,
            add_generation_prompt,
            tools => tools.cloned().unwrap_or_else(|| Value::from(())),
            documents => Value::from(()),
            bos_token,
            eos_token,
            unk_token,
            pad_token,
        })
    }
}

/// Jinja prints Python's `True`, `False` and `None`; minijinja would print `true`, `false`, `none`.
fn python_formatter(
    out: &mut minijinja::Output,
    state: &minijinja::State,
    value: &Value,
) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Bool => out.write_str(if value.is_true() { "True" } else { "False" })?,
        ValueKind::None => out.write_str("None")?,
        _ => minijinja::escape_formatter(out, state, value)?,
    }
    Ok(())
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// transformers' `{% generation %}` ... `{% endgeneration %}` tags mark the assistant's tokens
/// for its own masks; they render their body unchanged. Rewriting them to `if true` / `endif`
/// keeps the body and any `-` / `+` whitespace control, so such templates (TRL's training
/// templates among them) render here too.
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(open) = rest.find("{%") {
        out.push_str(&rest[..open]);
        let tag = &rest[open..];
        let Some(close) = tag.find("%}") else {
            break;
        };
        let inner = &tag[2..close];
        let left = inner.starts_with(['-', '+']).then(|| &inner[..1]);
        let body = inner.strip_prefix(['-', '+']).unwrap_or(inner);
        let right = body.ends_with(['-', '+']).then(|| &body[body.len() - 1..]);
        let body = body.strip_suffix(['-', '+']).unwrap_or(body);
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(word) => {
                let _ = write!(
                    out,
                    "{{%{} {word} {}%}}",
                    left.unwrap_or(""),
                    right.unwrap_or("")
                );
            }
            None => out.push_str(&tag[..close + 2]),
        }
        rest = &tag[close + 2..];
    }
    out.push_str(rest);
    out
}

/// transformers replaces Jinja's HTML-escaping `tojson` with
/// `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`;
/// this writes the same text, Python's float spellings and separators included.
#[allow(clippy::needless_pass_by_value)] // minijinja hands keyword arguments over by value
fn tojson(value: &Value, kwargs: Kwargs) -> Result<String, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_usize() {
            Some(n) => " ".repeat(n),
            None => v
                .as_str()
                .ok_or_else(|| invalid("tojson: indent must be an integer or a string"))?
                .to_owned(),
        }),
    };
    let separators = match kwargs.get::<Option<Vec<String>>>("separators")? {
        Some(pair) => match <[String; 2]>::try_from(pair) {
            Ok([item, key]) => (item, key),
            Err(_) => return Err(invalid("tojson: separators must be two strings")),
        },
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let options = JsonOptions {
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
        indent,
        item_separator: separators.0,
        key_separator: separators.1,
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, value, &options, 0)?;
    Ok(out)
}

fn invalid(message: &str) -> Error {
    Error::new(ErrorKind::InvalidOperation, message.to_owned())
}

struct JsonOptions {
    ensure_ascii: bool,
    sort_keys: bool,
    indent: Option<String>,
    item_separator: String,
    key_separator: String,
}

impl JsonOptions {
    /// Between items (and after the opening bracket when `first`), as `json.dumps` lays out.
    fn break_line(&self, out: &mut String, level: usize, first: bool) {
        if !first {
            out.push_str(&self.item_separator);
        }
        if let Some(indent) = &self.indent {
            out.push('\n');
            out.push_str(&indent.repeat(level));
        }
    }
}

fn write_json(
    out: &mut String,
    value: &Value,
    options: &JsonOptions,
    level: usize,
) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => {
            out.push_str("null");
        }
        ValueKind::Bool => {
            out.push_str(if value.is_true() { "true" } else { "false" });
        }
        ValueKind::Number => {
            if value.is_integer() {
                let _ = write!(out, "{value}");
            } else {
                out.push_str(&python_float(f64::try_from(value.clone())?));
            }
        }
        ValueKind::String => {
            write_string(
                out,
                value.as_str().unwrap_or_default(),
                options.ensure_ascii,
            );
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if options.sort_keys {
                keys.sort_by_key(key_string);
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                options.break_line(out, level + 1, i == 0);
                write_string(out, &key_string(key), options.ensure_ascii);
                out.push_str(&options.key_separator);
                write_json(out, &value.get_item(key)?, options, level + 1)?;
            }
            options.break_line(out, level, true);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                options.break_line(out, level + 1, i == 0);
                write_json(out, item, options, level + 1)?;
            }
            options.break_line(out, level, true);
            out.push(']');
        }
        kind => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a {kind} is not JSON serializable"),
            ));
        }
    }
    Ok(())
}

/// Python turns non-string keys into their JSON spelling.
fn key_string(key: &Value) -> String {
    if let Some(s) = key.as_str() {
        return s.to_owned();
    }
    let options = JsonOptions {
        ensure_ascii: false,
        sort_keys: false,
        indent: None,
        item_separator: String::new(),
        key_separator: String::new(),
    };
    let mut out = String::new();
    match write_json(&mut out, key, &options, 0) {
        Ok(()) => out,
        Err(_) => key.to_string(),
    }
}

fn write_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if c < ' ' || (ensure_ascii && !(' '..='~').contains(&c)) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: the shortest round-trip digits, in exponent form below 1e-4 and
/// from 1e16 on, with at least two exponent digits and a `.0` on whole numbers.
fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".to_owned();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.to_owned();
    }
    let scientific = format!("{x:e}");
    let (mantissa, exponent) = scientific
        .split_once('e')
        .expect("`{:e}` always writes an exponent");
    let exponent: i32 = exponent.parse().expect("`{:e}` writes an integer exponent");
    if x != 0.0 && !(-4..16).contains(&exponent) {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exponent.abs())
    } else {
        let plain = format!("{x}");
        if plain.contains('.') {
            plain
        } else {
            plain + ".0"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, messages: &[Message]) -> Result<String, Error> {
        ChatTemplate::new(source)?.render(messages, false, &SpecialTokens::default())
    }

    #[test]
    fn raise_exception_becomes_an_error_with_its_message() {
        let source = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversations must start with a user turn') }}{% endif %}ok";
        let error = render(source, &[Message::new("assistant", "hi")]).expect_err("raises");
        assert!(
            error
                .to_string()
                .contains("Conversations must start with a user turn"),
            "{error}"
        );
        assert_eq!(
            render(source, &[Message::new("user", "hi")]).expect("renders"),
            "ok"
        );
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let messages = [Message::new("user", "<b>\"é\" & 😀\n")];
        assert_eq!(
            render("{{ messages | tojson }}", &messages).expect("renders"),
            r#"[{"role": "user", "content": "<b>\"é\" & 😀\n"}]"#,
            "no HTML escaping, non-ASCII kept, Python's separators, keys in order"
        );
        assert_eq!(
            render(
                "{{ messages[0] | tojson(indent=2, sort_keys=true) }}",
                &messages
            )
            .expect("renders"),
            "{\n  \"content\": \"<b>\\\"é\\\" & 😀\\n\",\n  \"role\": \"user\"\n}"
        );
        assert_eq!(
            render("{{ 'é😀' | tojson(ensure_ascii=true) }}", &[]).expect("renders"),
            r#""\u00e9\ud83d\ude00""#
        );
        assert_eq!(
            render(
                "{{ [1, 2.0, 0.1, 1e-7, 1e16, 123456789.5, none, true, [], {}] | tojson }}",
                &[]
            )
            .expect("renders"),
            "[1, 2.0, 0.1, 1e-07, 1e+16, 123456789.5, null, true, [], {}]"
        );
    }

    #[test]
    fn python_string_methods_and_loop_controls_work() {
        let source = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content.strip().upper() }}|{{ m.role.startswith('us') }}{% endfor %}";
        let messages = [Message::new("user", "  hi \n"), Message::new("user", "no")];
        assert_eq!(render(source, &messages).expect("renders"), "HI|True");
    }

    #[test]
    fn blocks_are_trimmed_like_transformers_environment() {
        let source = "  {% if true %}\nA\n  {% endif %}\nB\n";
        assert_eq!(
            render(source, &[]).expect("renders"),
            "A\nB",
            "lstrip_blocks, trim_blocks, and the final newline dropped"
        );
    }

    #[test]
    fn generation_tags_render_their_body() {
        let source = "{% for m in messages %}<{%- generation -%}\n {{ m.content }} {%- endgeneration %}>{% endfor %}";
        assert_eq!(
            render(source, &[Message::new("assistant", "x")]).expect("renders"),
            "<x>"
        );
    }

    #[test]
    fn booleans_and_none_print_as_python_prints_them() {
        assert_eq!(
            render("{{ true }} {{ false }} {{ none }} {{ 1 }}", &[]).expect("renders"),
            "True False None 1"
        );
    }

    #[test]
    fn special_tokens_and_generation_prompt_are_variables() {
        let template = ChatTemplate::new(
            "{{ bos_token }}{% if add_generation_prompt %}go{% endif %}{{ eos_token }}",
        )
        .expect("compiles");
        let tokens = SpecialTokens {
            bos_token: Some("<s>".to_owned()),
            eos_token: Some("</s>".to_owned()),
            ..SpecialTokens::default()
        };
        assert_eq!(
            template.render(&[], true, &tokens).expect("renders"),
            "<s>go</s>"
        );
        assert_eq!(
            template.render(&[], false, &tokens).expect("renders"),
            "<s></s>"
        );
    }

    #[test]
    fn tools_and_tool_call_messages_reach_the_template() {
        let template = ChatTemplate::new(
            "{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}{% for c in m.tool_calls %}{{ c.function.name }}({{ c.function.arguments | tojson }}){% endfor %}{{ m.tool_call_id }}{% endfor %}{{ tools is none }}",
        )
        .expect("compiles");
        let messages = Value::from_serialize(serde_json::json!([
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "2"},
        ]));
        let tools = Value::from_serialize(
            serde_json::json!([{"type": "function", "function": {"name": "f"}}]),
        );
        let special = SpecialTokens::default();
        assert_eq!(
            template
                .render_with_tools(&messages, Some(&tools), false, &special)
                .expect("renders"),
            r#"[f]f({"x": 1})c1False"#
        );
        assert_eq!(
            template
                .render_with_tools(&messages, None, false, &special)
                .expect("renders"),
            r#"f({"x": 1})c1True"#
        );
    }

    #[test]
    fn python_float_spellings() {
        for (x, python) in [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.5, "1.5"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (1.25e-300, "1.25e-300"),
            (1e15, "1000000000000000.0"),
            (1.5e16, "1.5e+16"),
            (f64::INFINITY, "Infinity"),
        ] {
            assert_eq!(python_float(x), python, "{x}");
        }
    }
}
