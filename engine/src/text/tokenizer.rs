//! A model's tokenizer as Hugging Face transformers loads it from the model directory
//! (`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`), and the encodings the
//! trainer learns from: token ids with a mask of the tokens that count in the loss.

use std::path::{Path, PathBuf};

use super::chat::{ChatTemplate, Message, SpecialTokens};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: not found (a model directory needs the tokenizer.json transformers writes)")]
    Missing { path: PathBuf },
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a tokenizer ({source})")]
    Load {
        path: PathBuf,
        source: tokenizers::Error,
    },
    #[error("{path}: not JSON ({source})")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: GGUF metadata {key}: {reason}", path.display())]
    Gguf {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("{path}: {field}: {reason}")]
    Field {
        path: PathBuf,
        field: &'static str,
        reason: String,
    },
    #[error("{}: no chat template ({looked_in})", origin.display())]
    NoChatTemplate {
        origin: PathBuf,
        looked_in: &'static str,
    },
    #[error("{path}: the chat template does not compile: {reason}")]
    TemplateSyntax { path: PathBuf, reason: String },
    #[error("rendering the chat template: {source}")]
    Render { source: minijinja::Error },
    #[error(
        "the chat template is not prefix-stable: rendering the conversation up to message {index} \
         ({what}) is not a prefix of rendering all of it, so the assistant's tokens cannot be found"
    )]
    NotPrefixStable { index: usize, what: &'static str },
    #[error("the tokenizer has no eos_token in its vocabulary to end a training example with")]
    NoEosToken,
    #[error("tokenizing: {0}")]
    Encode(tokenizers::Error),
    #[error("decoding: {0}")]
    Decode(tokenizers::Error),
}

pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// Token ids and, for each, whether it is a label: whether predicting it counts in the loss.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub loss_mask: Vec<bool>,
}

/// The chat template and where it came from, for error messages; a template that does not
/// compile is kept as its error so that a model can still tokenize plain text.
#[derive(Debug)]
struct Template {
    path: PathBuf,
    source: String,
    compiled: std::result::Result<ChatTemplate, String>,
}

#[derive(Debug)]
pub struct Tokenizer {
    /// The model directory or file it was read from, for error messages.
    origin: PathBuf,
    /// Where a chat template would have been, for the error when there is none.
    template_places: &'static str,
    inner: tokenizers::Tokenizer,
    special: SpecialTokens,
    eos_token_id: Option<u32>,
    template: Option<Template>,
}

impl Tokenizer {
    /// Reads the tokenizer of the model in `dir`. `tokenizer_config.json` is optional (without
    /// it there are no named special tokens and no chat template); a `chat_template.jinja`
    /// beside it, as transformers 4.43+ saves, wins over its `chat_template`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                TokenizerError::Missing { path: path.clone() }
            } else {
                TokenizerError::Read {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|source| TokenizerError::Load { path, source })?;

        let config_path = dir.join("tokenizer_config.json");
        let config = match read_optional(&config_path)? {
            Some(text) => serde_json::from_str(&text).map_err(|source| TokenizerError::Json {
                path: config_path.clone(),
                source,
            })?,
            None => serde_json::Value::Object(serde_json::Map::new()),
        };
        let token = |field: &'static str| special_token(&config, field, &config_path);
        let special = SpecialTokens {
            bos_token: token("bos_token")?,
            eos_token: token("eos_token")?,
            unk_token: token("unk_token")?,
            pad_token: token("pad_token")?,
        };
        let jinja_path = dir.join("chat_template.jinja");
        let source = match read_optional(&jinja_path)? {
            Some(source) => Some((jinja_path, source)),
            None => config_template(&config, &config_path)?.map(|s| (config_path.clone(), s)),
        };
        Ok(Self::from_parts(
            dir,
            inner,
            special,
            source,
            "neither chat_template.jinja nor a chat_template in tokenizer_config.json",
        ))
    }

    /// A tokenizer built elsewhere (from a GGUF file's metadata), its named special tokens,
    /// and its chat template with the path it came from (or where it was looked for).
    pub(crate) fn from_parts(
        origin: &Path,
        inner: tokenizers::Tokenizer,
        special: SpecialTokens,
        template: Option<(PathBuf, String)>,
        template_places: &'static str,
    ) -> Self {
        let eos_token_id = special
            .eos_token
            .as_deref()
            .and_then(|eos| inner.token_to_id(eos));
        let template = template.map(|(path, source)| Template {
            path,
            compiled: ChatTemplate::new(&source).map_err(|e| e.to_string()),
            source,
        });
        Self {
            origin: origin.to_owned(),
            template_places,
            inner,
            special,
            eos_token_id,
            template,
        }
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(TokenizerError::Encode)?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(TokenizerError::Decode)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.special.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.special.eos_token.as_deref()
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token_id
    }

    /// Ids the model must have embeddings for: the vocabulary and the added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The tokenizer as a `tokenizer.json` document (the directory's own, or the one built
    /// from a GGUF file's metadata), for readers of that format such as structured output's.
    ///
    /// # Errors
    /// When the tokenizer cannot be serialized (it always can, having been built).
    pub fn to_json(&self) -> std::result::Result<serde_json::Value, String> {
        let text = self.inner.to_string(false).map_err(|e| e.to_string())?;
        serde_json::from_str(&text).map_err(|e| e.to_string())
    }

    /// The chat template's Jinja source, if the model has one.
    pub fn chat_template_source(&self) -> Option<&str> {
        self.template.as_ref().map(|t| t.source.as_str())
    }

    /// The conversation as the model's chat template writes it, as transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` does.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.compiled_template()?
            .render(messages, add_generation_prompt, &self.special)
            .map_err(|source| TokenizerError::Render { source })
    }

    /// [`Tokenizer::apply_chat_template`] for OpenAI-shaped messages (with `tool_calls` and
    /// `tool` turns) and a list of tools, as `apply_chat_template(messages, tools=tools)`.
    pub fn apply_chat_template_with_tools(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.compiled_template()?
            .render_with_tools(
                &minijinja::Value::from_serialize(messages),
                tools.map(minijinja::Value::from_serialize).as_ref(),
                add_generation_prompt,
                &self.special,
            )
            .map_err(|source| TokenizerError::Render { source })
    }

    fn compiled_template(&self) -> Result<&ChatTemplate> {
        let template = self
            .template
            .as_ref()
            .ok_or_else(|| TokenizerError::NoChatTemplate {
                origin: self.origin.clone(),
                looked_in: self.template_places,
            })?;
        template
            .compiled
            .as_ref()
            .map_err(|reason| TokenizerError::TemplateSyntax {
                path: template.path.clone(),
                reason: reason.clone(),
            })
    }

    /// Plain text, every token a label: the tokenizer's special tokens, then eos.
    pub fn encode_text(&self, text: &str) -> Result<Encoded> {
        let eos = self.eos_token_id.ok_or(TokenizerError::NoEosToken)?;
        let mut ids = self.encode(text, true)?;
        if ids.last() != Some(&eos) {
            ids.push(eos);
        }
        let loss_mask = vec![true; ids.len()];
        Ok(Encoded { ids, loss_mask })
    }

    /// The prompt (with the tokenizer's special tokens) then the completion and eos, the
    /// completion and eos the only labels.
    pub fn encode_prompt_completion(&self, prompt: &str, completion: &str) -> Result<Encoded> {
        let eos = self.eos_token_id.ok_or(TokenizerError::NoEosToken)?;
        let mut ids = self.encode(prompt, true)?;
        let prompt_len = ids.len();
        ids.extend(self.encode(completion, false)?);
        ids.push(eos);
        let loss_mask = (0..ids.len()).map(|i| i >= prompt_len).collect();
        Ok(Encoded { ids, loss_mask })
    }

    /// The conversation through the chat template, labels on each assistant turn: its content
    /// and what the template closes the turn with (`<|im_end|>`, `<|eot_id|>`, ...), as TRL's
    /// assistant-only loss trains.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Encoded> {
        let values: Vec<serde_json::Value> = messages
            .iter()
            .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
            .collect();
        self.encode_conversation(&values, None, &vec![true; messages.len()])
    }

    /// [`Tokenizer::encode_chat`] for OpenAI-shaped messages (`tool_calls`, `tool` turns) with
    /// the `tools` the template lists; `learned[i]` says whether assistant turn `i` is a label
    /// (OpenAI's per-turn `weight`): a turn not learned is context, like a user's.
    pub fn encode_conversation(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&[serde_json::Value]>,
        learned: &[bool],
    ) -> Result<Encoded> {
        let render = |upto: &[serde_json::Value], prompt: bool| {
            self.apply_chat_template_with_tools(upto, tools, prompt)
        };
        let full = render(messages, false)?;
        // The template adds bos itself; the post-processor would add a second.
        let encoding = self
            .inner
            .encode(full.as_str(), false)
            .map_err(TokenizerError::Encode)?;

        // An assistant turn is the text between the conversation before it rendered with the
        // generation prompt (so the role header is excluded) and the conversation through it;
        // whitespace after the end token belongs to the next turn's header. The spans are
        // mapped onto the tokens of the one encoding of the whole text, through its offsets,
        // rather than by tokenizing the prefixes: BPE may merge across a boundary, so a prefix's
        // tokens need not be a prefix of the whole's, and these ids are the ones trained on.
        // A token straddling a boundary is a label, as in transformers' assistant masks.
        let mut spans = Vec::new();
        for (index, message) in messages.iter().enumerate() {
            if message["role"] != "assistant" || !learned.get(index).copied().unwrap_or(true) {
                continue;
            }
            let start = render(&messages[..index], true)?;
            if !full.starts_with(&start) {
                return Err(TokenizerError::NotPrefixStable {
                    index,
                    what: "with the generation prompt",
                });
            }
            let through = render(&messages[..=index], false)?;
            if !full.starts_with(&through) || through.len() < start.len() {
                return Err(TokenizerError::NotPrefixStable {
                    index,
                    what: "through the assistant turn",
                });
            }
            let end = start.len() + through[start.len()..].trim_end().len();
            spans.push(start.len()..end);
        }
        let loss_mask = encoding
            .get_offsets()
            .iter()
            .map(|&(from, to)| {
                from < to && spans.iter().any(|span| from < span.end && to > span.start)
            })
            .collect();
        Ok(Encoded {
            ids: encoding.get_ids().to_vec(),
            loss_mask,
        })
    }
}

fn read_optional(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(source) if source.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TokenizerError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// A special token in `tokenizer_config.json`: a string, or an `AddedToken` object.
fn special_token(
    config: &serde_json::Value,
    field: &'static str,
    path: &Path,
) -> Result<Option<String>> {
    match config.get(field) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(token)) => Ok(Some(token.clone())),
        Some(serde_json::Value::Object(token)) => match token.get("content") {
            Some(serde_json::Value::String(content)) => Ok(Some(content.clone())),
            _ => Err(TokenizerError::Field {
                path: path.to_owned(),
                field,
                reason: "an AddedToken object without a string \"content\"".to_owned(),
            }),
        },
        Some(other) => Err(TokenizerError::Field {
            path: path.to_owned(),
            field,
            reason: format!("expected a string or an AddedToken object, found {other}"),
        }),
    }
}

/// `chat_template` in `tokenizer_config.json`: a string, or a list of named templates of which
/// transformers uses the one named `default`.
fn config_template(config: &serde_json::Value, path: &Path) -> Result<Option<String>> {
    let field = |reason: &str| TokenizerError::Field {
        path: path.to_owned(),
        field: "chat_template",
        reason: reason.to_owned(),
    };
    match config.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(template)) => Ok(Some(template.clone())),
        Some(serde_json::Value::Array(templates)) => {
            for entry in templates {
                let name = entry.get("name").and_then(serde_json::Value::as_str);
                let template = entry.get("template").and_then(serde_json::Value::as_str);
                match (name, template) {
                    (Some("default"), Some(template)) => return Ok(Some(template.to_owned())),
                    (Some(_), Some(_)) => {}
                    _ => {
                        return Err(field(
                            "a list entry without string \"name\" and \"template\"",
                        ));
                    }
                }
            }
            Err(field("a list of templates without one named \"default\""))
        }
        Some(_) => Err(field("expected a string or a list of {name, template}")),
    }
}
