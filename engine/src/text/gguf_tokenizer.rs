//! The tokenizer a GGUF file describes in its `tokenizer.*` metadata, built as transformers'
//! `AutoTokenizer.from_pretrained(..., gguf_file=...)` builds it: byte-level BPE (llama.cpp's
//! `gpt2` tokenizer model, used by SmolLM, Llama 3 and Qwen2 files) from the vocabulary and
//! merges, control tokens as special tokens, bos / eos / unk / pad by id, `add_bos_token`, and
//! `tokenizer.chat_template`.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use candle_core::quantized::gguf_file::Value;
use tokenizers::{
    AddedToken, DecoderWrapper, PostProcessorWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
    models::bpe::{BPE, Vocab},
    pre_tokenizers::{
        byte_level::ByteLevel,
        sequence::Sequence,
        split::{Split, SplitPattern},
    },
    processors::template::TemplateProcessing,
};

use super::{
    chat::SpecialTokens,
    tokenizer::{Tokenizer, TokenizerError},
};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const CONTROL: i128 = 3;
const USER_DEFINED: i128 = 4;

/// Llama 3's split (llama.cpp's `llama-bpe` pre-tokenizer and the files that share it).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split: Llama 3's with single digits.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `tokenizer.ggml.pre` values whose text split is not GPT-2's. Any other value (`smollm`,
/// `gpt2`, `default`, ...) splits as GPT-2 does, as in transformers.
const SPLITS: [(&str, &str); 9] = [
    ("llama3", LLAMA3_SPLIT),
    ("llama-v3", LLAMA3_SPLIT),
    ("llama-bpe", LLAMA3_SPLIT),
    ("smaug-bpe", LLAMA3_SPLIT),
    ("dbrx", LLAMA3_SPLIT),
    ("falcon3", LLAMA3_SPLIT),
    ("qwen2", QWEN2_SPLIT),
    ("deepseek-r1-qwen", QWEN2_SPLIT),
    ("megrez", QWEN2_SPLIT),
];

/// The tokenizer of the GGUF file at `path`, from its `metadata`.
pub(crate) fn from_gguf(
    path: &Path,
    metadata: &HashMap<String, Value>,
) -> Result<Tokenizer, TokenizerError> {
    let meta = Metadata { path, metadata };
    let model = meta.string("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(meta.error(
            "tokenizer.ggml.model",
            format!(
                "{model:?} is not supported: Graft builds byte-level BPE (\"gpt2\") tokenizers \
                 from GGUF files; use the model's Hugging Face directory instead"
            ),
        ));
    }
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let merges = merges(&meta)?;
    let types = match metadata.get("tokenizer.ggml.token_type") {
        Some(_) => meta.integers("tokenizer.ggml.token_type")?,
        None => Vec::new(),
    };

    // The file spells tokens as text; the BPE model needs them in the byte alphabet. Tokens
    // already in it (every real byte-level token) stay as they are.
    let spelling = byte_alphabet();
    let in_alphabet = |token: &str| token.chars().all(|c| spelling.contains(&c));
    let vocab: Vocab = tokens
        .iter()
        .zip(0u32..)
        .map(|(token, id)| {
            let spelled = if in_alphabet(token) {
                (*token).to_owned()
            } else {
                token.bytes().map(|b| spelling[usize::from(b)]).collect()
            };
            (spelled, id)
        })
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.clone(), merges)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix(String::new())
        .fuse_unk(false)
        .build()
        .map_err(|e| meta.error("tokenizer.ggml.merges", e.to_string()))?;

    let mut inner = tokenizers::Tokenizer::new(bpe);
    let pre_tokenizer = pre_tokenizer(&meta)?;
    inner.with_pre_tokenizer(Some(pre_tokenizer));
    inner.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));

    // Control tokens match whole and are special (skipped when decoding); one spelled
    // outside the byte alphabet is a mislabelled ordinary token and is left alone, as
    // transformers does.
    let control: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(token, kind)| **kind == CONTROL && in_alphabet(token))
        .map(|(token, _)| AddedToken::from((*token).to_owned(), true))
        .collect();
    inner
        .add_special_tokens(control)
        .map_err(|e| meta.error("tokenizer.ggml.token_type", e.to_string()))?;
    let user_defined: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(token, kind)| **kind == USER_DEFINED && vocab.contains_key(**token))
        .map(|(token, _)| AddedToken::from((*token).to_owned(), false).normalized(false))
        .collect();
    inner
        .add_tokens(user_defined)
        .map_err(|e| meta.error("tokenizer.ggml.token_type", e.to_string()))?;

    let special = special_tokens(&meta, &tokens)?;
    // The named special tokens are special whatever their type says.
    let named: Vec<AddedToken> = [
        &special.bos_token,
        &special.eos_token,
        &special.unk_token,
        &special.pad_token,
    ]
    .into_iter()
    .flatten()
    .map(|t| AddedToken::from(t.clone(), true))
    .collect();
    inner
        .add_special_tokens(named)
        .map_err(|e| meta.error("tokenizer.ggml.bos_token_id", e.to_string()))?;

    let prepend_bos = meta
        .optional_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(false);
    let append_eos = meta
        .optional_bool("tokenizer.ggml.add_eos_token")?
        .unwrap_or(false);
    let processor = post_processor(&meta, &inner, &special, prepend_bos, append_eos)?;
    inner.with_post_processor(Some(processor));

    let template = meta
        .optional_string("tokenizer.chat_template")?
        .map(|source| (path.to_owned(), source.to_owned()));
    Ok(Tokenizer::from_parts(
        path,
        inner,
        special,
        template,
        "no tokenizer.chat_template in the GGUF metadata",
    ))
}

/// `tokenizer.ggml.merges`: "a b" strings as pairs.
fn merges(meta: &Metadata<'_>) -> Result<Vec<(String, String)>, TokenizerError> {
    meta.strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|merge| {
            merge
                .split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| {
                    meta.error("tokenizer.ggml.merges", format!("{merge:?} is not a pair"))
                })
        })
        .collect::<Result<Vec<_>, _>>()
}

/// llama.cpp's pre-tokenizer name (`tokenizer.ggml.pre`) as the split transformers uses,
/// followed by the byte-level mapping; plain byte-level splitting for names it does not know.
fn pre_tokenizer(meta: &Metadata<'_>) -> Result<PreTokenizerWrapper, TokenizerError> {
    let split = meta
        .optional_string("tokenizer.ggml.pre")?
        .and_then(|pre| SPLITS.iter().find(|(name, _)| *name == pre))
        .map(|(_, pattern)| *pattern);
    Ok(match split {
        Some(pattern) => {
            let split = Split::new(
                SplitPattern::Regex(pattern.to_owned()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| meta.error("tokenizer.ggml.pre", e.to_string()))?;
            Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into()
        }
        None => ByteLevel::new(false, true, true).into(),
    })
}

/// bos / eos / unk / pad, by their ids in the metadata.
fn special_tokens(meta: &Metadata<'_>, tokens: &[&str]) -> Result<SpecialTokens, TokenizerError> {
    let token = |key: &str| -> Result<Option<String>, TokenizerError> {
        meta.optional_integer(key)?
            .map(|id| {
                usize::try_from(id)
                    .ok()
                    .and_then(|id| tokens.get(id))
                    .map(|t| (*t).to_owned())
                    .ok_or_else(|| meta.error(key, format!("{id} is not a token id")))
            })
            .transpose()
    };
    Ok(SpecialTokens {
        bos_token: token("tokenizer.ggml.bos_token_id")?,
        eos_token: token("tokenizer.ggml.eos_token_id")?,
        unk_token: token("tokenizer.ggml.unknown_token_id")?,
        pad_token: token("tokenizer.ggml.padding_token_id")?,
    })
}

/// transformers' `update_post_processor`: bos before and eos after the text when the file
/// asks for them.
fn post_processor(
    meta: &Metadata<'_>,
    inner: &tokenizers::Tokenizer,
    special: &SpecialTokens,
    prepend_bos: bool,
    append_eos: bool,
) -> Result<PostProcessorWrapper, TokenizerError> {
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut special_ids = Vec::new();
    let mut named = |token: &Option<String>, key: &str| -> Result<String, TokenizerError> {
        let token = token.clone().ok_or_else(|| {
            meta.error(
                key,
                "needed by add_bos/add_eos_token but missing".to_owned(),
            )
        })?;
        let id = inner
            .token_to_id(&token)
            .ok_or_else(|| meta.error(key, format!("{token:?} is not in the vocabulary")))?;
        special_ids.push((token.clone(), id));
        Ok(token)
    };
    let bos = if prepend_bos {
        Some(named(&special.bos_token, "tokenizer.ggml.bos_token_id")?)
    } else {
        None
    };
    let eos = if append_eos {
        Some(named(&special.eos_token, "tokenizer.ggml.eos_token_id")?)
    } else {
        None
    };
    for (sequence, type_id, out) in [("$A", 0, &mut single), ("$B", 1, &mut pair)] {
        if let Some(bos) = &bos {
            out.push(format!("{bos}:{type_id}"));
        }
        out.push(format!("{sequence}:{type_id}"));
        if let Some(eos) = &eos {
            out.push(format!("{eos}:{type_id}"));
        }
    }
    let pair: Vec<String> = single.iter().cloned().chain(pair).collect();
    special_ids.dedup();
    let template = TemplateProcessing::builder()
        .try_single(single)
        .and_then(|b| b.try_pair(pair))
        .map_err(|e| meta.error("tokenizer.ggml.add_bos_token", e))?
        .special_tokens(special_ids)
        .build()
        .map_err(|e| meta.error("tokenizer.ggml.add_bos_token", e.to_string()))?;
    Ok(template.into())
}

/// GPT-2's byte-to-character table: printable bytes stand for themselves, the others for the
/// characters from U+0100 up, in byte order.
fn byte_alphabet() -> Vec<char> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                char::from(b)
            } else {
                let c = char::from_u32(next).unwrap_or(char::REPLACEMENT_CHARACTER);
                next += 1;
                c
            }
        })
        .collect()
}

/// An integer metadata value of any width.
pub(crate) fn integer(value: &Value) -> Option<i128> {
    Some(match *value {
        Value::U8(n) => n.into(),
        Value::I8(n) => n.into(),
        Value::U16(n) => n.into(),
        Value::I16(n) => n.into(),
        Value::U32(n) => n.into(),
        Value::I32(n) => n.into(),
        Value::U64(n) => n.into(),
        Value::I64(n) => n.into(),
        _ => return None,
    })
}

/// Typed reads of the metadata, with errors naming the file and key.
struct Metadata<'a> {
    path: &'a Path,
    metadata: &'a HashMap<String, Value>,
}

impl Metadata<'_> {
    fn error(&self, key: &str, reason: impl Into<String>) -> TokenizerError {
        TokenizerError::Gguf {
            path: PathBuf::from(self.path),
            key: key.to_owned(),
            reason: reason.into(),
        }
    }

    fn optional_string(&self, key: &str) -> Result<Option<&str>, TokenizerError> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.error(key, "not a string")),
        }
    }

    fn string(&self, key: &str) -> Result<&str, TokenizerError> {
        self.optional_string(key)?
            .ok_or_else(|| self.error(key, "missing"))
    }

    fn array(&self, key: &str) -> Result<&[Value], TokenizerError> {
        match self.metadata.get(key) {
            Some(Value::Array(values)) => Ok(values),
            Some(_) => Err(self.error(key, "not an array")),
            None => Err(self.error(key, "missing")),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<&str>, TokenizerError> {
        self.array(key)?
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                _ => Err(self.error(key, "not an array of strings")),
            })
            .collect()
    }

    fn integers(&self, key: &str) -> Result<Vec<i128>, TokenizerError> {
        self.array(key)?
            .iter()
            .map(|v| integer(v).ok_or_else(|| self.error(key, "not an array of integers")))
            .collect()
    }

    fn optional_integer(&self, key: &str) -> Result<Option<i128>, TokenizerError> {
        self.metadata
            .get(key)
            .map(|v| integer(v).ok_or_else(|| self.error(key, "not an integer")))
            .transpose()
    }

    fn optional_bool(&self, key: &str) -> Result<Option<bool>, TokenizerError> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(self.error(key, "not a boolean")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_alphabet_is_gpt2_s() {
        let alphabet = byte_alphabet();
        assert_eq!(alphabet[usize::from(b'A')], 'A');
        assert_eq!(alphabet[usize::from(b' ')], 'Ġ', "space");
        assert_eq!(alphabet[usize::from(b'\n')], 'Ċ', "newline");
        assert_eq!(alphabet[0], 'Ā');
        assert_eq!(alphabet[0xAD], 'Ń', "the soft hyphen is not printable");
        let distinct: std::collections::HashSet<char> = alphabet.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }
}
