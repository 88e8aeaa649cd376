//! Structured output: a grammar (a JSON schema, a regex, a list of choices, or llguidance's
//! Lark-like syntax) compiled by llguidance against the model's vocabulary, and for each
//! constrained sequence a matcher that says which tokens may come next. Unconstrained
//! sequences carry none and pay nothing.

use std::{path::Path, sync::Arc};

use llguidance::{
    Matcher, ParserFactory,
    api::TopLevelGrammar,
    toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie},
};
use serde_json::{Value, json};

mod gbnf;
mod structural;

pub use structural::StructuralTag;

/// What a request constrains its output to.
#[derive(Clone, Debug, PartialEq)]
pub enum Grammar {
    /// A JSON schema; `{"type": "object"}` for `response_format: json_object`.
    JsonSchema(Value),
    /// The whole output matches this regex (Rust `regex` syntax, as vLLM's guidance backend).
    Regex(String),
    /// The output is exactly one of these strings.
    Choice(Vec<String>),
    /// llguidance's Lark-like grammar (what vLLM's `grammar` takes with the guidance
    /// backend), or GBNF (what it takes with xgrammar), told apart by GBNF's `::=`.
    Lark(String),
    /// Free text with JSON structures after triggers (vLLM's structural tags).
    StructuralTag(StructuralTag),
}

/// The model's vocabulary as llguidance sees it, and the compiler of grammars over it.
pub struct Grammars {
    factory: ParserFactory,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field(
                "vocab_size",
                &self.factory.tok_env().tok_trie().vocab_size(),
            )
            .finish_non_exhaustive()
    }
}

impl Grammars {
    /// Reads the bytes of every token from `tokenizer.json` (byte-level BPE as Llama 3 and
    /// Qwen use, or SentencePiece with byte fallback as Llama 2 and Mistral use). Ids the
    /// model has beyond the tokenizer's are never allowed; `eos_ids` end a finished grammar.
    pub fn load(tokenizer_json: &Path, vocab_size: usize, eos_ids: &[u32]) -> Result<Self, String> {
        let text = std::fs::read_to_string(tokenizer_json)
            .map_err(|e| format!("{}: {e}", tokenizer_json.display()))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| format!("{}: {e}", tokenizer_json.display()))?;
        Self::from_json(&value, vocab_size, eos_ids)
            .map_err(|e| format!("{}: {e}", tokenizer_json.display()))
    }

    /// [`Grammars::load`] from the `tokenizer.json` document itself (a GGUF file's tokenizer
    /// has no file).
    pub fn from_json(
        tokenizer_json: &Value,
        vocab_size: usize,
        eos_ids: &[u32],
    ) -> Result<Self, String> {
        let mut words = llguidance::token_bytes_from_tokenizer_json(tokenizer_json)
            .map_err(|e| e.to_string())?;
        words.resize(vocab_size.max(words.len()), Vec::new());
        let size = u32::try_from(words.len()).map_err(|_| "the vocabulary is too large")?;
        let eos = *eos_ids
            .first()
            .ok_or("the model has no end-of-sequence token")?;
        let trie = TokTrie::from(&TokRxInfo::new(size, eos), &words).with_eos_tokens(eos_ids);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Self { factory })
    }

    /// Compiles `grammar` into a fresh matcher, or says why it cannot be used.
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint, String> {
        let top = match grammar {
            Grammar::JsonSchema(schema) => TopLevelGrammar::from_json_schema(compact(schema)),
            Grammar::Regex(regex) => TopLevelGrammar::from_regex(regex),
            Grammar::Choice(choices) => {
                if choices.is_empty() {
                    return Err("choice needs at least one string".to_owned());
                }
                let alternatives: Vec<String> = choices.iter().map(|c| escape_regex(c)).collect();
                TopLevelGrammar::from_regex(&alternatives.join("|"))
            }
            Grammar::Lark(source) => {
                if gbnf::is_gbnf(source) {
                    TopLevelGrammar::from_lark(gbnf::to_lark(source)?)
                } else {
                    TopLevelGrammar::from_lark(source.clone())
                }
            }
            Grammar::StructuralTag(tag) => TopLevelGrammar::from_lark(tag.lark()),
        };
        let matcher = Matcher::new(self.factory.create_parser(top));
        match matcher.get_error() {
            Some(error) => Err(error),
            None => Ok(Constraint { matcher }),
        }
    }

    /// Whether `token` is one of the tokenizer's special tokens (written `<[id]>` in Lark).
    pub fn is_special(&self, token: u32) -> bool {
        self.factory.tok_env().tok_trie().is_special_token(token)
    }
}

/// JSON is written compactly (`{"a": 1, "b": [2, 3]}`, `json.dumps`'s separators) unless the
/// schema's own `x-guidance` says otherwise: free whitespace lets a model pad forever.
fn compact(schema: &Value) -> Value {
    let mut schema = schema.clone();
    if let Some(object) = schema.as_object_mut() {
        object.entry("x-guidance").or_insert_with(
            || json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    schema
}

fn escape_regex(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One sequence's progress through its grammar.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("finished", &self.matcher.is_stopped())
            .finish_non_exhaustive()
    }
}

impl Constraint {
    /// The tokens allowed next: end-of-sequence alone once the grammar is complete.
    pub fn mask(&mut self) -> Result<Mask, String> {
        self.matcher
            .compute_mask_or_eos()
            .map(Mask)
            .map_err(|e| e.to_string())
    }

    /// Advances past the sampled `token`.
    pub fn commit(&mut self, token: u32) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    /// The grammar is complete and nothing more can follow.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

/// The tokens a constrained sequence may sample next.
#[derive(Clone, Debug)]
pub struct Mask(SimpleVob);

impl Mask {
    /// Sets every forbidden token's logit to -inf.
    pub fn apply(&self, logits: &mut [f32]) {
        let allowed = &self.0;
        for (token, logit) in logits.iter_mut().enumerate() {
            if !u32::try_from(token).is_ok_and(|t| allowed.is_allowed(t)) {
                *logit = f32::NEG_INFINITY;
            }
        }
    }

    pub fn allows(&self, token: u32) -> bool {
        self.0.is_allowed(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grammars() -> Grammars {
        let dir = graft_testenv::repo_root().join("engine/tests/data/tiny/made");
        Grammars::load(&dir.join("tokenizer.json"), 384, &[1, 3]).expect("the tiny tokenizer")
    }

    /// Greedily follows the lowest allowed id until the grammar is done: whatever the model
    /// says, the output is in the language.
    fn drive(grammars: &Grammars, grammar: &Grammar, prefer: &[u8]) -> String {
        let tokenizer = graft_engine::text::tokenizer::Tokenizer::from_dir(
            &graft_testenv::repo_root().join("engine/tests/data/tiny/made"),
        )
        .expect("tokenizer");
        let mut constraint = grammars.compile(grammar).expect("compiles");
        let mut out = Vec::new();
        for step in 0..200 {
            let mask = constraint.mask().expect("a mask");
            let mut logits = vec![0.0f32; 384];
            // Prefer the bytes of `prefer` in turn, so different paths get exercised.
            let byte = prefer[step % prefer.len()];
            if let Some(t) = tokenizer.token_to_id(&char::from(byte).to_string()) {
                logits[t as usize] = 1.0;
            }
            mask.apply(&mut logits);
            let token = logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| u32::try_from(i).expect("id"))
                .expect("a token");
            assert!(mask.allows(token));
            if [1, 3].contains(&token) {
                break;
            }
            constraint.commit(token).expect("an allowed token");
            out.push(token);
            if constraint.is_finished() {
                break;
            }
        }
        tokenizer.decode(&out, true).expect("decodes")
    }

    #[test]
    fn a_schema_a_regex_and_choices_constrain_every_token() {
        let grammars = grammars();
        let schema = json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}}, "required": ["n", "ok"], "additionalProperties": false});
        let text = drive(&grammars, &Grammar::JsonSchema(schema), b"x9}");
        let value: Value = serde_json::from_str(&text).expect("valid JSON");
        assert!(value["n"].as_u64().is_some_and(|n| n < 100), "{text}");
        assert!(value["ok"].is_boolean(), "{text}");
        assert!(!text.contains("  "), "compact: {text}");

        let text = drive(
            &grammars,
            &Grammar::Regex("[a-c]{2}-[0-9]".to_owned()),
            b"b-7",
        );
        assert_eq!(text.len(), 4, "{text}");
        assert!(text.as_bytes()[2] == b'-', "{text}");

        let choices = vec!["yes".to_owned(), "no (maybe)".to_owned()];
        let text = drive(&grammars, &Grammar::Choice(choices.clone()), b"n");
        assert!(choices.contains(&text), "{text}");
    }

    #[test]
    fn a_bad_grammar_is_an_error() {
        let grammars = grammars();
        assert!(
            grammars
                .compile(&Grammar::Regex("(unclosed".to_owned()))
                .is_err()
        );
        assert!(
            grammars
                .compile(&Grammar::JsonSchema(json!({"type": "nonsense"})))
                .is_err()
        );
    }
}
