//! Models made by `graft_trainer::tiny::write_tiny_model`, checked against Hugging Face
//! transformers 5.23 (CPU, f32): `engine/tests/data/tiny/made/` is what the maker writes for
//! [`made_spec`] and [`made_corpus`], and `tests/oracle/tokenizer_reference.py` loaded it with
//! `AutoTokenizer` / `LlamaForCausalLM.from_pretrained` and recorded
//! `tokenizer_reference.json` (ids, decodes, chat templates, assistant masks) and
//! `reference.safetensors` (input ids, logits).
//!
//! After a deliberate change to the maker, rewrite the directory and the references:
//!
//!     GRAFT_BLESS_TINY=1 cargo test -p graft-trainer --test tiny_made made_directory
//!     /tmp/bnbvenv/bin/python tests/oracle/tokenizer_reference.py

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, reference, tiny};
use graft_engine::{
    models::{Config, Llama, Precision, load_weights},
    text::{
        chat::{ChatTemplate, Message, SpecialTokens},
        tokenizer::Tokenizer,
    },
};
use graft_trainer::tiny::{TinySpec, write_tiny_model};
use serde::Deserialize;

/// Small enough to commit (about 170 KB of weights), with weights large enough (std 0.2) that
/// attention is far from uniform and a positional mistake shows in the logits.
fn made_spec() -> TinySpec {
    TinySpec {
        vocab_size: 384,
        hidden_size: 32,
        intermediate_size: 64,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        max_position_embeddings: 128,
        init_std: 0.2,
        seed: 7,
        ..TinySpec::default()
    }
}

fn made_corpus() -> Vec<String> {
    [
        "The quick brown fox jumps over the lazy dog.",
        "Hello there! How can I help you today?",
        "You are a helpful assistant. Answer briefly and politely.",
        "What is the capital of France? The capital of France is Paris.",
        "Fine-tuning adapts a pretrained model to a task with a few examples.",
        "LoRA trains two small matrices per layer; QLoRA keeps the base in 4 bits.",
        "Café, naïve, über, señor: accents are bytes too.",
        "日本語のテキストも学習できます。",
        "Emoji 😀 and rockets 🚀 encode as bytes.",
        "    indented code\n\tand tabs\n\nand blank lines",
        "def add(a, b):\n    return a + b\n",
        "1 + 1 = 2, 2 * 21 = 42, 3.14159",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

const WRITTEN: [&str; 5] = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];

fn read(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn made_directory_is_what_write_tiny_model_writes() {
    let committed = tiny("made");
    let fresh = tempfile::tempdir().expect("tempdir");
    write_tiny_model(fresh.path(), &made_spec(), &made_corpus()).expect("write");
    if std::env::var_os("GRAFT_BLESS_TINY").is_some() {
        std::fs::create_dir_all(&committed).expect("mkdir");
        for name in WRITTEN {
            std::fs::copy(fresh.path().join(name), committed.join(name)).expect("copy");
        }
        return;
    }
    for name in WRITTEN {
        assert!(
            read(fresh.path(), name) == read(&committed, name),
            "{name} differs from the committed engine/tests/data/tiny/made/{name}: \
             rerun the commands at the top of this file if the maker changed on purpose"
        );
    }
}

#[test]
fn write_tiny_model_is_deterministic_for_a_seed() {
    let spec = TinySpec::default();
    let corpus = made_corpus();
    let [a, b, c] = [(); 3].map(|()| tempfile::tempdir().expect("tempdir"));
    write_tiny_model(a.path(), &spec, &corpus).expect("write");
    write_tiny_model(b.path(), &spec, &corpus).expect("write");
    for name in WRITTEN {
        assert!(
            read(a.path(), name) == read(b.path(), name),
            "{name} differs"
        );
    }
    let reseeded = TinySpec { seed: 1, ..spec };
    write_tiny_model(c.path(), &reseeded, &corpus).expect("write");
    assert!(read(a.path(), "model.safetensors") != read(c.path(), "model.safetensors"));
    assert!(read(a.path(), "tokenizer.json") == read(c.path(), "tokenizer.json"));
}

fn load(dir: &Path) -> Llama {
    let text = std::fs::read_to_string(dir.join("config.json")).expect("config.json");
    let config = Config::from_json(&text).expect("config");
    let vb = load_weights(dir, DType::F32, &Device::Cpu).expect("weights");
    Llama::load(&vb, &config, Precision::Dense).expect("model")
}

#[test]
fn the_default_spec_makes_a_model_the_engine_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let made = write_tiny_model(dir.path(), &TinySpec::default(), &made_corpus()).expect("write");
    assert!(made.num_parameters < 1_000_000, "{made:?}");
    let tokenizer = Tokenizer::from_dir(dir.path()).expect("tokenizer");
    assert_eq!(tokenizer.vocab_size(), made.vocab_size);
    let model = load(dir.path());
    assert_eq!(model.config().vocab_size, made.vocab_size);

    let encoded = tokenizer
        .encode_chat(&[
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello!"),
        ])
        .expect("encode");
    let ids = Tensor::new(encoded.ids.as_slice(), &Device::Cpu)
        .and_then(|t| t.unsqueeze(0))
        .expect("ids");
    let logits = model.forward(&ids).expect("forward");
    assert_eq!(logits.dims(), [1, encoded.ids.len(), made.vocab_size]);
    let finite = logits
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("values")
        .iter()
        .all(|v| v.is_finite());
    assert!(finite);
}

#[test]
fn made_model_logits_match_transformers_within_1e_4() {
    let dir = tiny("made");
    let (ids, expected) = reference(&dir);
    let logits = load(&dir).forward(&ids).expect("forward");
    let diff = max_abs_diff(&logits, &expected);
    assert!(diff < 1e-4, "logits differ by {diff}");
}

#[derive(Deserialize)]
struct TokenizerReference {
    vocab_size: usize,
    eos_token_id: u32,
    texts: Vec<TextCase>,
    chats: Vec<ChatCase>,
    templates: Vec<TemplateCase>,
}

#[derive(Deserialize)]
struct TextCase {
    text: String,
    ids: Vec<u32>,
    ids_without_special: Vec<u32>,
    decoded: String,
    decoded_skipping_special: String,
}

#[derive(Deserialize)]
struct ChatCase {
    messages: Vec<Message>,
    add_generation_prompt: bool,
    rendered: String,
    ids: Vec<u32>,
    /// transformers' `return_assistant_tokens_mask` (from the template's generation tags).
    assistant_masks: Option<Vec<u8>>,
}

#[derive(Deserialize)]
struct TemplateCase {
    template: String,
    messages: Vec<Message>,
    add_generation_prompt: bool,
    rendered: String,
}

fn tokenizer_reference() -> TokenizerReference {
    let text = std::fs::read_to_string(tiny("made").join("tokenizer_reference.json"))
        .expect("tokenizer_reference.json");
    serde_json::from_str(&text).expect("reference parses")
}

#[test]
fn made_tokenizer_encodes_and_decodes_as_transformers_does() {
    let reference = tokenizer_reference();
    let tokenizer = Tokenizer::from_dir(&tiny("made")).expect("tokenizer");
    assert_eq!(tokenizer.vocab_size(), reference.vocab_size);
    assert_eq!(tokenizer.eos_token_id(), Some(reference.eos_token_id));
    assert!(reference.texts.len() >= 5);
    for case in &reference.texts {
        let text = &case.text;
        assert_eq!(
            tokenizer.encode(text, true).expect("encode"),
            case.ids,
            "{text:?}"
        );
        assert_eq!(
            tokenizer.encode(text, false).expect("encode"),
            case.ids_without_special,
            "{text:?}"
        );
        assert_eq!(
            tokenizer.decode(&case.ids, false).expect("decode"),
            case.decoded
        );
        assert_eq!(
            tokenizer.decode(&case.ids, true).expect("decode"),
            case.decoded_skipping_special
        );
    }
}

#[test]
fn made_chat_template_renders_tokenizes_and_masks_as_transformers_does() {
    let reference = tokenizer_reference();
    let tokenizer = Tokenizer::from_dir(&tiny("made")).expect("tokenizer");
    let mut masks_checked = 0;
    for case in &reference.chats {
        let rendered = tokenizer
            .apply_chat_template(&case.messages, case.add_generation_prompt)
            .expect("render");
        assert_eq!(rendered, case.rendered);
        assert_eq!(
            tokenizer.encode(&rendered, false).expect("encode"),
            case.ids
        );
        if let Some(expected) = &case.assistant_masks {
            let encoded = tokenizer.encode_chat(&case.messages).expect("encode");
            assert_eq!(encoded.ids, case.ids);
            let mask: Vec<u8> = encoded.loss_mask.iter().map(|&l| u8::from(l)).collect();
            assert_eq!(&mask, expected, "{:?}", case.messages);
            masks_checked += 1;
        }
    }
    assert!(masks_checked >= 2, "the reference has assistant masks");
}

#[test]
fn chat_template_features_render_as_transformers_renders_them() {
    let reference = tokenizer_reference();
    let tokenizer = Tokenizer::from_dir(&tiny("made")).expect("tokenizer");
    let special = SpecialTokens {
        bos_token: tokenizer.bos_token().map(str::to_owned),
        eos_token: tokenizer.eos_token().map(str::to_owned),
        ..SpecialTokens::default()
    };
    assert!(reference.templates.len() >= 5);
    for case in &reference.templates {
        let rendered = ChatTemplate::new(&case.template)
            .and_then(|t| t.render(&case.messages, case.add_generation_prompt, &special))
            .unwrap_or_else(|e| panic!("{:?}: {e:#}", case.template));
        assert_eq!(rendered, case.rendered, "{:?}", case.template);
    }
}
