//! `echo` with `logprobs` on `/v1/completions`: the prompt's own log-probabilities, as
//! OpenAI and vLLM return them, across prefill chunks, for every choice and streamed.
//! (tests/oracle/server_logits.py checks their values against transformers.)

mod common;

use common::{BASE, Server, model_dir};
use serde_json::{Value, json};

fn ids_of(tokens: &Value) -> Vec<u32> {
    tokens
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| {
            t.as_str()
                .and_then(|t| t.strip_prefix("token_id:"))
                .and_then(|t| t.parse().ok())
                .expect("token_id:<id>")
        })
        .collect()
}

/// `{id: logprob}` of one `top_logprobs` entry.
fn top_of(entry: &Value) -> Vec<(u32, f64)> {
    let mut top: Vec<(u32, f64)> = entry
        .as_object()
        .expect("an object")
        .iter()
        .map(|(k, v)| {
            (
                k.strip_prefix("token_id:")
                    .and_then(|k| k.parse().ok())
                    .expect("id"),
                v.as_f64().expect("a number"),
            )
        })
        .collect();
    top.sort_by_key(|&(id, _)| id);
    top
}

#[tokio::test(flavor = "multi_thread")]
async fn echo_with_logprobs_scores_the_prompt_as_decoding_would() {
    // Long enough for a prompt of more than one prefill chunk (256 tokens).
    let server = Server::start(&["--max-model-len", "640"]).await;
    let tokenizer =
        graft_engine::text::tokenizer::Tokenizer::from_dir(&model_dir()).expect("tokenizer");
    let text = "colour blue owl and red fox ".repeat(30);
    let prompt = tokenizer.encode(&text, true).expect("encode");
    assert!(prompt.len() > 300, "{} tokens", prompt.len());
    let post = async |body: Value| {
        let (status, answer) = server.post("/v1/completions", body.clone()).await;
        assert_eq!(status, 200, "{body} → {answer}");
        answer
    };
    let echoed = post(json!({
        "model": BASE, "prompt": prompt, "max_tokens": 3, "temperature": 0, "echo": true,
        "logprobs": 5, "n": 2, "return_tokens_as_token_ids": true,
    }))
    .await;
    let plain = post(json!({
        "model": BASE, "prompt": prompt, "max_tokens": 3, "temperature": 0, "logprobs": 5,
        "return_tokens_as_token_ids": true,
    }))
    .await;
    let generated = ids_of(&plain["choices"][0]["logprobs"]["tokens"]);
    for choice in echoed["choices"].as_array().expect("choices") {
        let logprobs = &choice["logprobs"];
        let tokens = ids_of(&logprobs["tokens"]);
        assert_eq!(tokens[..prompt.len()], prompt, "the prompt's tokens first");
        assert_eq!(tokens[prompt.len()..], generated, "then the completion's");
        assert!(logprobs["token_logprobs"][0].is_null(), "{logprobs}");
        assert!(logprobs["top_logprobs"][0].is_null(), "{logprobs}");
        let offsets = logprobs["text_offset"].as_array().expect("offsets");
        assert_eq!(offsets.len(), tokens.len());
        for (i, entry) in logprobs["top_logprobs"]
            .as_array()
            .expect("tops")
            .iter()
            .enumerate()
            .skip(1)
        {
            assert_eq!(top_of(entry).len(), 5, "position {i}");
            let lp = logprobs["token_logprobs"][i].as_f64().expect("a number");
            assert!(lp <= 0.0, "position {i}: {lp}");
        }
        // The completion's part is what the same request without echo reports.
        let ours = &logprobs["token_logprobs"].as_array().expect("lps")[prompt.len()..];
        let theirs = plain["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .expect("lps");
        for (a, b) in ours.iter().zip(theirs) {
            let (a, b) = (a.as_f64().expect("lp"), b.as_f64().expect("lp"));
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
    assert_eq!(
        echoed["choices"][0]["logprobs"],
        echoed["choices"][1]["logprobs"]
    );

    // Position i's scores are the next-token distribution after the first i tokens, the one
    // a completion of that prefix samples from: in the first chunk, at its edge, after it.
    let scores = &echoed["choices"][0]["logprobs"];
    for i in [1, 2, 17, 255, 256, 257, prompt.len() - 1] {
        let prefix = post(json!({
            "model": BASE, "prompt": &prompt[..i], "max_tokens": 1, "temperature": 0,
            "logprobs": 5, "return_tokens_as_token_ids": true,
        }))
        .await;
        let expected = top_of(&prefix["choices"][0]["logprobs"]["top_logprobs"][0]);
        let got = top_of(&scores["top_logprobs"][i]);
        assert_eq!(
            got.iter().map(|t| t.0).collect::<Vec<_>>(),
            expected.iter().map(|t| t.0).collect::<Vec<_>>(),
            "position {i}"
        );
        for ((_, a), (_, b)) in got.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-4, "position {i}: {a} vs {b}");
        }
        let own = scores["token_logprobs"][i].as_f64().expect("lp");
        if let Some((_, lp)) = expected.iter().find(|t| t.0 == prompt[i]) {
            assert!((own - lp).abs() < 1e-4, "position {i}: {own} vs {lp}");
        }
    }
}

/// Streamed, the echo comes first, with the prompt's scores.
#[tokio::test(flavor = "multi_thread")]
async fn a_streamed_echo_carries_the_prompts_logprobs() {
    let server = Server::start(&[]).await;
    let tokenizer =
        graft_engine::text::tokenizer::Tokenizer::from_dir(&model_dir()).expect("tokenizer");
    let response = server
        .client()
        .post(format!("{}/v1/completions", server.url))
        .json(&json!({
            "model": BASE, "prompt": "colour blue", "max_tokens": 2, "temperature": 0,
            "echo": true, "logprobs": 1, "stream": true,
        }))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let body = response.text().await.expect("body");
    let chunks: Vec<Value> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|l| *l != "[DONE]")
        .map(|l| serde_json::from_str(l).expect("a JSON chunk"))
        .collect();
    let first = &chunks[0]["choices"][0];
    assert_eq!(first["text"], "colour blue", "{body}");
    let prompt_len = tokenizer.encode("colour blue", true).expect("encode").len();
    assert_eq!(
        first["logprobs"]["tokens"].as_array().map(Vec::len),
        Some(prompt_len),
        "{body}"
    );
    assert!(first["logprobs"]["token_logprobs"][0].is_null(), "{body}");
    assert!(
        first["logprobs"]["token_logprobs"][prompt_len - 1].is_number(),
        "{body}"
    );
}
