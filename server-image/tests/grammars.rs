//! The grammars vLLM clients send, through a real server: `guided_regex`, `guided_choice`,
//! `guided_grammar` (Lark or GBNF), `structured_outputs` (`regex`, `choice`, `grammar`, `json`,
//! `structural_tag`) and `response_format: structural_tag`; what is not implemented is
//! refused by name.

mod common;

use common::{BASE, Server, model_dir, text};
use serde_json::{Value, json};

fn is_code(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 6
        && b[..2].iter().all(u8::is_ascii_uppercase)
        && b[2] == b'-'
        && b[3..].iter().all(u8::is_ascii_digit)
}

#[tokio::test(flavor = "multi_thread")]
async fn regexes_choices_lark_grammars_and_structural_tags_constrain_the_output() {
    let server = Server::start(&["--max-model-len", "512"]).await;
    let post = async |extra: Value| {
        let mut body = json!({"model": BASE, "prompt": "colour", "max_tokens": 60, "temperature": 1, "seed": 7});
        body.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        let (status, answer) = server.post("/v1/completions", body.clone()).await;
        assert_eq!(status, 200, "{body} → {answer}");
        answer
    };
    let code = r"[A-Z]{2}-[0-9]{3}";
    for extra in [
        json!({"guided_regex": code}),
        json!({"structured_outputs": {"regex": code}}),
    ] {
        let answer = post(extra.clone()).await;
        assert!(is_code(text(&answer)), "{extra}: {answer}");
        assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    }
    let choices = ["left", "right", "straight on"];
    for extra in [
        json!({"guided_choice": choices}),
        json!({"structured_outputs": {"choice": choices}}),
    ] {
        let answer = post(extra.clone()).await;
        assert!(choices.contains(&text(&answer)), "{extra}: {answer}");
    }
    let lark = "start: \"x=\" NUMBER (\", \" NUMBER)*\nNUMBER: /[1-9][0-9]?/\n";
    for extra in [
        json!({"guided_grammar": lark, "max_tokens": 12}),
        json!({"structured_outputs": {"grammar": lark}, "max_tokens": 12}),
    ] {
        let answer = post(extra.clone()).await;
        let out = text(&answer);
        let numbers = out.strip_prefix("x=").expect("x=");
        // Cut by max_tokens, the last number may be unfinished; the rest follow the rule.
        for n in numbers.split(", ").filter(|n| !n.is_empty()) {
            assert!(
                n.len() <= 2 && !n.starts_with('0') && n.bytes().all(|b| b.is_ascii_digit()),
                "{extra}: {out:?}"
            );
        }
    }
    // GBNF, as vLLM's xgrammar backend takes it.
    let gbnf = "root ::= answer (\", \" answer)*\nanswer ::= \"yes\" | \"no\" | [0-9]{2}\n";
    let answer = post(json!({"guided_grammar": gbnf, "max_tokens": 40})).await;
    let out = text(&answer);
    let parts: Vec<&str> = out.split(", ").collect();
    let whole = |p: &str| {
        p == "yes" || p == "no" || (p.len() == 2 && p.bytes().all(|b| b.is_ascii_digit()))
    };
    // All but a last one cut by max_tokens are whole answers.
    assert!(parts[..parts.len() - 1].iter().all(|p| whole(p)), "{out:?}");
    let last = parts[parts.len() - 1];
    assert!(
        whole(last)
            || answer["choices"][0]["finish_reason"] == "length"
                && ("yes".starts_with(last) || "no".starts_with(last) || last.len() < 2),
        "{out:?}"
    );
    let schema = json!({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": false});
    let answer = post(json!({"structured_outputs": {"json": schema}})).await;
    let value: Value = serde_json::from_str(text(&answer)).expect("JSON");
    assert!(value["n"].is_i64(), "{answer}");

    // Structural tags: free text, and after each trigger its structure. Biased towards the
    // trigger, the model opens one structure after another.
    let tokenizer =
        graft_engine::text::tokenizer::Tokenizer::from_dir(&model_dir()).expect("tokenizer");
    let at = tokenizer.token_to_id("@").expect("an @ token");
    let tag = json!({
        "type": "structural_tag",
        "structures": [{"begin": "@call>", "schema": {"type": "object", "properties": {"k": {"enum": ["a", "b"]}}, "required": ["k"], "additionalProperties": false}, "end": "</call>"}],
        "triggers": ["@"],
    });
    let structural_text = tag.to_string();
    for extra in [
        json!({"response_format": tag, "logit_bias": {at.to_string(): 30}, "max_tokens": 90}),
        json!({"structured_outputs": {"structural_tag": structural_text}, "logit_bias": {at.to_string(): 30}, "max_tokens": 90}),
    ] {
        let answer = post(extra.clone()).await;
        let out = text(&answer);
        let parts: Vec<&str> = out.split('@').collect();
        assert!(
            parts.len() >= 3,
            "{extra}: at least two structures in {out:?}"
        );
        // Every structure but a last one cut short is complete and valid.
        for part in &parts[1..parts.len() - 1] {
            let inner = part
                .strip_prefix("call>")
                .and_then(|p| p.split_once("</call>"))
                .map_or_else(|| panic!("{extra}: {part:?} in {out:?}"), |(json, _)| json);
            let value: Value = serde_json::from_str(inner).expect("the structure's JSON");
            assert!(
                ["a", "b"].contains(&value["k"].as_str().unwrap_or("")),
                "{out:?}"
            );
        }
    }
    // Without the bias the tiny model writes text and no structure: still a valid answer.
    let plain = post(json!({"response_format": tag, "max_tokens": 8})).await;
    assert!(plain["choices"][0]["text"].is_string(), "{plain}");
}

#[tokio::test(flavor = "multi_thread")]
async fn grammar_options_this_server_does_not_implement_are_refused_by_name() {
    let server = Server::start(&[]).await;
    let tag_format =
        json!({"type": "structural_tag", "format": {"type": "const_string", "value": "x"}});
    for (extra, param) in [
        (
            json!({"structured_outputs": {"regex": "a+", "whitespace_pattern": " "}}),
            "structured_outputs.whitespace_pattern",
        ),
        (
            json!({"structured_outputs": {"json": {"type": "object"}, "disable_additional_properties": true}}),
            "structured_outputs.disable_additional_properties",
        ),
        (
            json!({"guided_decoding_backend": "xgrammar"}),
            "guided_decoding_backend",
        ),
        (
            json!({"guided_whitespace_pattern": " "}),
            "guided_whitespace_pattern",
        ),
        (json!({"response_format": tag_format}), "response_format"),
        (
            json!({"guided_grammar": "root ::= \"yes\" | undefined-rule"}),
            "guided_grammar",
        ),
        (
            json!({"structured_outputs": {"structural_tag": "{\"structures\": []}"}}),
            "structured_outputs",
        ),
    ] {
        let mut body = json!({"model": BASE, "prompt": "hi", "max_tokens": 2});
        body.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        let (status, answer) = server.post("/v1/completions", body.clone()).await;
        assert_eq!(status, 400, "{body} → {answer}");
        assert_eq!(answer["error"]["param"], param, "{body} → {answer}");
    }
    // Accepted and met: there is one backend, and JSON never has free whitespace.
    let body = json!({"model": BASE, "prompt": "hi", "max_tokens": 30, "structured_outputs": {"json": {"type": "object"}, "disable_any_whitespace": true, "disable_fallback": true}});
    let (status, answer) = server.post("/v1/completions", body).await;
    assert_eq!(status, 200, "{answer}");
}
