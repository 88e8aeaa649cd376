//! vLLM's structural tags (`response_format: {"type": "structural_tag", "structures": [...],
//! "triggers": [...]}`): free text in which every occurrence of a trigger must go on as one of
//! the structures that begin with it — `begin`, JSON of its schema, `end` — and then free
//! text again. Written as a Lark grammar for llguidance.

use std::fmt::Write;

use serde_json::{Value, json};

/// One structure: its opening text (starting with a trigger), the schema of the JSON that
/// follows, and its closing text.
#[derive(Clone, Debug, PartialEq)]
pub struct Structure {
    pub begin: String,
    pub schema: Value,
    pub end: String,
}

/// A structural tag, read and checked.
#[derive(Clone, Debug, PartialEq)]
pub struct StructuralTag {
    pub structures: Vec<Structure>,
    pub triggers: Vec<String>,
}

impl StructuralTag {
    /// Reads the `structures` and `triggers` of `tag` (the object of `response_format`, or
    /// the JSON text `structured_outputs.structural_tag` holds).
    pub fn from_value(tag: &Value) -> Result<Self, String> {
        if tag.get("format").is_some() {
            return Err(
                "the structural tag's \"format\" form is not supported; give structures and triggers"
                    .to_owned(),
            );
        }
        let text = |v: &Value, what: &str| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("{what} must be a string"))
        };
        let structures = tag
            .get("structures")
            .and_then(Value::as_array)
            .filter(|s| !s.is_empty())
            .ok_or("a structural tag needs a non-empty structures list")?
            .iter()
            .map(|s| {
                Ok(Structure {
                    begin: text(&s["begin"], "a structure's begin")?,
                    schema: match &s["schema"] {
                        Value::Null => json!({}),
                        schema @ (Value::Object(_) | Value::Bool(true)) => schema.clone(),
                        _ => return Err("a structure's schema must be a JSON schema".to_owned()),
                    },
                    end: text(&s["end"], "a structure's end")?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let triggers = tag
            .get("triggers")
            .and_then(Value::as_array)
            .filter(|t| !t.is_empty())
            .ok_or("a structural tag needs a non-empty triggers list")?
            .iter()
            .map(|t| text(t, "a trigger").and_then(|t| non_empty(t, "a trigger")))
            .collect::<Result<Vec<_>, String>>()?;
        for s in &structures {
            if !triggers.iter().any(|t| s.begin.starts_with(t.as_str())) {
                return Err(format!(
                    "the structure beginning {:?} starts with none of the triggers",
                    s.begin
                ));
            }
        }
        Ok(Self {
            structures,
            triggers,
        })
    }

    /// The Lark grammar: text without a trigger, and after each trigger one of its
    /// structures. A trigger's text ends lazily, the moment the trigger is complete.
    pub fn lark(&self) -> String {
        let any_trigger = self
            .triggers
            .iter()
            .map(|t| regex_literal(t))
            .collect::<Vec<_>>()
            .join("|");
        let mut out = String::new();
        let mut alternatives = Vec::new();
        for (i, trigger) in self.triggers.iter().enumerate() {
            let mut rests = Vec::new();
            let mut rules = String::new();
            for (j, s) in self.structures.iter().enumerate() {
                if let Some(rest) = s.begin.strip_prefix(trigger.as_str()) {
                    rests.push(format!("s{i}_{j}"));
                    let _ = writeln!(
                        rules,
                        "s{i}_{j}: {} %json {} {}",
                        quoted(rest),
                        compact(&s.schema),
                        quoted(&s.end)
                    );
                }
            }
            if rests.is_empty() {
                continue;
            }
            // Text up to and including this trigger, with no trigger before it.
            let _ = writeln!(
                out,
                "t{i}[lazy]: /(?s:.*){}/ & ~/(?s:.*)({any_trigger})(?s:.+)/",
                regex_literal(trigger)
            );
            alternatives.push(format!("t{i} ({})", rests.join(" | ")));
            out.push_str(&rules);
        }
        format!(
            "start: ({})* TEXT?\nTEXT: /(?s:.+)/ & ~/(?s:.*)({any_trigger})(?s:.*)/\n{out}",
            alternatives.join(" | ")
        )
    }
}

fn non_empty(text: String, what: &str) -> Result<String, String> {
    if text.is_empty() {
        Err(format!("{what} must not be empty"))
    } else {
        Ok(text)
    }
}

fn compact(schema: &Value) -> Value {
    let mut schema = schema.clone();
    if let Some(object) = schema.as_object_mut() {
        object.entry("x-guidance").or_insert_with(
            || json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    schema
}

/// A Lark string literal (JSON's escapes).
fn quoted(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_default()
}

/// `text` matched literally inside a Lark `/regex/`: every character escaped by its code
/// point, so neither the regex nor the `/` delimiters see a metacharacter.
fn regex_literal(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_string()
            } else {
                format!("\\x{{{:X}}}", u32::from(c))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structures_need_a_trigger_and_the_format_form_is_refused() {
        let ok = json!({"type": "structural_tag", "structures": [{"begin": "<f=a>", "schema": {"type": "object"}, "end": "</f>"}], "triggers": ["<f="]});
        let tag = StructuralTag::from_value(&ok).expect("valid");
        let lark = tag.lark();
        assert!(lark.starts_with("start: (t0 (s0_0))* TEXT?\n"), "{lark}");
        assert!(lark.contains("s0_0: \"a>\" %json {"), "{lark}");
        let orphan = json!({"structures": [{"begin": "<g>", "end": "</g>"}], "triggers": ["<f="]});
        assert!(StructuralTag::from_value(&orphan).is_err());
        assert!(StructuralTag::from_value(&json!({"format": {}})).is_err());
        assert!(StructuralTag::from_value(&json!({"structures": [], "triggers": ["x"]})).is_err());
    }
}
