//! `Tokenizer::from_dir` on the files transformers writes, and the loss masks of the three
//! dataset shapes, on a small BPE tokenizer trained here with the ChatML template of
//! `graft_trainer::tiny`.

use std::path::Path;

use graft_engine::text::{
    chat::Message,
    tokenizer::{Encoded, Tokenizer, TokenizerError},
};
use graft_trainer::tiny::{BOS_TOKEN, EOS_TOKEN, IM_END, write_tokenizer};

fn corpus() -> Vec<String> {
    [
        "The quick brown fox jumps over the lazy dog.",
        "Hello there! How can I help you today?",
        "Sure. The answer is 42, as always.",
        "You are a helpful assistant.",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// A fresh model directory with a trained tokenizer and the tiny ChatML template.
fn tokenizer_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    write_tokenizer(dir.path(), &corpus(), 400, 256).expect("tokenizer");
    dir
}

fn write_config(dir: &Path, config: &serde_json::Value) {
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string(config).expect("json"),
    )
    .expect("write");
}

fn conversation() -> Vec<Message> {
    vec![
        Message::new("system", "You are a helpful assistant."),
        Message::new("user", "Hello there!"),
        Message::new("assistant", "Hi! How can I help?"),
        Message::new("user", "What is the answer?"),
        Message::new("assistant", "  The answer is 42.\n"),
    ]
}

/// The labelled tokens, decoded run by run.
fn labelled_runs(tokenizer: &Tokenizer, encoded: &Encoded) -> Vec<String> {
    assert_eq!(encoded.ids.len(), encoded.loss_mask.len());
    let mut runs = Vec::new();
    let mut run = Vec::new();
    for (&id, &label) in encoded.ids.iter().zip(&encoded.loss_mask) {
        if label {
            run.push(id);
        } else if !run.is_empty() {
            runs.push(std::mem::take(&mut run));
        }
    }
    if !run.is_empty() {
        runs.push(run);
    }
    runs.iter()
        .map(|ids| tokenizer.decode(ids, false).expect("decode"))
        .collect()
}

fn unlabelled(tokenizer: &Tokenizer, encoded: &Encoded) -> String {
    let ids: Vec<u32> = encoded
        .ids
        .iter()
        .zip(&encoded.loss_mask)
        .filter(|(_, label)| !**label)
        .map(|(id, _)| *id)
        .collect();
    tokenizer.decode(&ids, false).expect("decode")
}

#[test]
fn chat_labels_are_exactly_each_assistant_turn_and_its_end_token() {
    let dir = tokenizer_dir();
    let tokenizer = Tokenizer::from_dir(dir.path()).expect("tokenizer");
    let messages = conversation();
    let encoded = tokenizer.encode_chat(&messages).expect("encode");

    let text = tokenizer
        .apply_chat_template(&messages, false)
        .expect("render");
    assert!(
        text.starts_with(BOS_TOKEN),
        "the template writes bos: {text}"
    );
    assert_eq!(
        encoded.ids,
        tokenizer.encode(&text, false).expect("encode"),
        "the ids are the rendered conversation's, with no second bos"
    );
    assert_eq!(
        labelled_runs(&tokenizer, &encoded),
        [
            format!("Hi! How can I help?{IM_END}"),
            format!("The answer is 42.{IM_END}")
        ]
    );
    let prompt = unlabelled(&tokenizer, &encoded);
    for part in [
        "You are a helpful assistant.",
        "Hello there!",
        "What is the answer?",
        "<|im_start|>assistant\n",
    ] {
        assert!(prompt.contains(part), "{part:?} is not a label: {prompt:?}");
    }
}

/// OpenAI's `weight: 0` keeps an assistant turn as context: the same ids, that turn's tokens
/// no longer labels, the other turn's still.
#[test]
fn an_assistant_turn_of_weight_0_is_context_not_a_label() {
    let dir = tokenizer_dir();
    let tokenizer = Tokenizer::from_dir(dir.path()).expect("tokenizer");
    let messages: Vec<serde_json::Value> = conversation()
        .iter()
        .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
        .collect();
    let all = tokenizer.encode_chat(&conversation()).expect("encode");
    let weighted = tokenizer
        .encode_conversation(&messages, None, &[false, false, false, false, true])
        .expect("encode");
    assert_eq!(weighted.ids, all.ids, "the same text");
    assert_eq!(
        labelled_runs(&tokenizer, &weighted),
        [format!("The answer is 42.{IM_END}")]
    );
    assert!(unlabelled(&tokenizer, &weighted).contains("Hi! How can I help?"));
}

/// `tools` reach the template, as `apply_chat_template(messages, tools=...)` passes them.
#[test]
fn tools_are_rendered_by_the_template() {
    let dir = tokenizer_dir();
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}\
         {{ m.role }}:{{ m.content }}{% for c in m.tool_calls %}{{ c.function.name }}(){% endfor %}\
         \n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}",
    )
    .expect("write");
    let tokenizer = Tokenizer::from_dir(dir.path()).expect("tokenizer");
    let messages = [
        serde_json::json!({"role": "user", "content": "fox?"}),
        serde_json::json!({"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "lookup", "arguments": "{}"}}]}),
    ];
    let tools = [serde_json::json!({"type": "function", "function": {"name": "lookup"}})];
    let encoded = tokenizer
        .encode_conversation(&messages, Some(&tools), &[false, true])
        .expect("encode");
    let text = tokenizer.decode(&encoded.ids, false).expect("decode");
    assert!(text.starts_with("[lookup]"), "{text}");
    assert_eq!(labelled_runs(&tokenizer, &encoded), ["lookup()"]);
}

#[test]
fn a_template_that_is_not_prefix_stable_is_refused() {
    let dir = tokenizer_dir();
    // The turn count at the end changes with every message.
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{% for m in messages %}{{ m.content }}{% endfor %}{{ messages | length }}",
    )
    .expect("write");
    let tokenizer = Tokenizer::from_dir(dir.path()).expect("tokenizer");
    let error = tokenizer
        .encode_chat(&conversation())
        .expect_err("not prefix-stable");
    assert!(
        matches!(error, TokenizerError::NotPrefixStable { index: 2, .. }),
        "{error}"
    );
}

#[test]
fn prompt_completion_labels_are_the_completion_and_eos() {
    let dir = tokenizer_dir();
    let tokenizer = Tokenizer::from_dir(dir.path()).expect("tokenizer");
    let encoded = tokenizer
        .encode_prompt_completion("The quick brown fox", " jumps over the lazy dog.")
        .expect("encode");
    let bos = tokenizer.token_to_id(BOS_TOKEN).expect("bos");
    assert_eq!(encoded.ids[0], bos, "the prompt gets the tokenizer's bos");
    assert_eq!(encoded.ids.last().copied(), tokenizer.eos_token_id());
    assert_eq!(
        labelled_runs(&tokenizer, &encoded),
        [format!(" jumps over the lazy dog.{EOS_TOKEN}")]
    );
    assert_eq!(
        unlabelled(&tokenizer, &encoded),
        format!("{BOS_TOKEN}The quick brown fox")
    );
}

#[test]
fn text_labels_every_token_and_ends_with_one_eos() {
    let dir = tokenizer_dir();
    let tokenizer = Tokenizer::from_dir(dir.path()).expect("tokenizer");
    let encoded = tokenizer.encode_text("Hello there!").expect("encode");
    assert!(encoded.loss_mask.iter().all(|&label| label));
    assert_eq!(
        tokenizer.decode(&encoded.ids, false).expect("decode"),
        format!("{BOS_TOKEN}Hello there!{EOS_TOKEN}")
    );
    let ended = tokenizer
        .encode_text(&format!("Hello there!{EOS_TOKEN}"))
        .expect("encode");
    assert_eq!(
        ended.ids, encoded.ids,
        "an eos already there is not doubled"
    );
}

#[test]
fn added_token_objects_and_a_list_of_templates_are_read() {
    let dir = tokenizer_dir();
    write_config(
        dir.path(),
        &serde_json::json!({
            "bos_token": {"__type": "AddedToken", "content": BOS_TOKEN, "lstrip": false,
                          "normalized": false, "rstrip": false, "single_word": false},
            "eos_token": {"content": EOS_TOKEN},
            "chat_template": [
                {"name": "tool_use", "template": "tools"},
                {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"},
            ],
        }),
    );
    let tokenizer = Tokenizer::from_dir(dir.path()).expect("tokenizer");
    assert_eq!(tokenizer.bos_token(), Some(BOS_TOKEN));
    assert_eq!(tokenizer.eos_token(), Some(EOS_TOKEN));
    assert_eq!(tokenizer.eos_token_id(), Some(1));
    assert_eq!(
        tokenizer
            .apply_chat_template(&[Message::new("user", "x")], false)
            .expect("render"),
        format!("{BOS_TOKEN}x{EOS_TOKEN}")
    );
}

#[test]
fn a_list_of_templates_without_default_is_an_error_naming_the_file() {
    let dir = tokenizer_dir();
    write_config(
        dir.path(),
        &serde_json::json!({"chat_template": [{"name": "rag", "template": "x"}]}),
    );
    let error = Tokenizer::from_dir(dir.path()).expect_err("no default");
    let message = error.to_string();
    assert!(
        message.contains("tokenizer_config.json: chat_template:") && message.contains("default"),
        "{message}"
    );
}

#[test]
fn chat_template_jinja_wins_over_tokenizer_config() {
    let dir = tokenizer_dir();
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "jinja file {{ messages | length }}\n",
    )
    .expect("write");
    let tokenizer = Tokenizer::from_dir(dir.path()).expect("tokenizer");
    assert_eq!(
        tokenizer
            .apply_chat_template(&[Message::new("user", "x")], false)
            .expect("render"),
        "jinja file 1"
    );
}

#[test]
fn raise_exception_in_the_template_is_an_error() {
    let dir = tokenizer_dir();
    let tokenizer = Tokenizer::from_dir(dir.path()).expect("tokenizer");
    let error = tokenizer
        .encode_chat(&[Message::new("tool", "{}"), Message::new("assistant", "ok")])
        .expect_err("unknown role");
    assert!(
        matches!(error, TokenizerError::Render { .. })
            && error.to_string().contains("Unknown role: tool"),
        "{error}"
    );
}

#[test]
fn a_chat_template_is_needed_only_for_chats() {
    let dir = tokenizer_dir();
    write_config(dir.path(), &serde_json::json!({"eos_token": EOS_TOKEN}));
    let tokenizer = Tokenizer::from_dir(dir.path()).expect("tokenizer");
    assert!(tokenizer.encode_text("plain text").is_ok());
    let error = tokenizer
        .encode_chat(&conversation())
        .expect_err("no template");
    assert!(
        matches!(error, TokenizerError::NoChatTemplate { .. }),
        "{error}"
    );

    std::fs::write(dir.path().join("chat_template.jinja"), "{% for %}").expect("write");
    let tokenizer = Tokenizer::from_dir(dir.path()).expect("a bad template is not fatal");
    assert!(tokenizer.encode_text("plain text").is_ok());
    let error = tokenizer
        .apply_chat_template(&conversation(), false)
        .expect_err("syntax");
    assert!(
        error
            .to_string()
            .contains("chat_template.jinja: the chat template does not compile"),
        "{error}"
    );
}

#[test]
fn missing_and_malformed_files_are_named() {
    let empty = tempfile::tempdir().expect("tempdir");
    let error = Tokenizer::from_dir(empty.path()).expect_err("no tokenizer.json");
    assert!(matches!(error, TokenizerError::Missing { .. }));
    assert!(
        error.to_string().contains("tokenizer.json: not found"),
        "{error}"
    );

    let dir = tokenizer_dir();
    std::fs::write(dir.path().join("tokenizer_config.json"), "{not json").expect("write");
    let error = Tokenizer::from_dir(dir.path()).expect_err("bad config");
    assert!(
        error
            .to_string()
            .contains("tokenizer_config.json: not JSON"),
        "{error}"
    );

    std::fs::write(dir.path().join("tokenizer.json"), "{}").expect("write");
    let error = Tokenizer::from_dir(dir.path()).expect_err("bad tokenizer");
    assert!(
        error
            .to_string()
            .contains("tokenizer.json: not a tokenizer"),
        "{error}"
    );

    let dir = tokenizer_dir();
    write_config(dir.path(), &serde_json::json!({"bos_token": 7}));
    let error = Tokenizer::from_dir(dir.path()).expect_err("bad bos");
    assert!(
        error.to_string().contains("bos_token: expected a string"),
        "{error}"
    );
}

#[test]
fn without_eos_a_training_example_cannot_end() {
    let dir = tokenizer_dir();
    write_config(dir.path(), &serde_json::json!({}));
    let tokenizer = Tokenizer::from_dir(dir.path()).expect("tokenizer");
    assert!(matches!(
        tokenizer.encode_text("x"),
        Err(TokenizerError::NoEosToken)
    ));
    assert!(matches!(
        tokenizer.encode_prompt_completion("x", "y"),
        Err(TokenizerError::NoEosToken)
    ));
}
