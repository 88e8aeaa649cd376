//! Client load for the chaos scenarios: many clients at once, each sending greedy completions
//! for one adapter name to the server pods in turn, recording every answer's version.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use serde_json::json;

/// What the clients saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub requests: usize,
    /// Answers by the version fingerprint that gave them.
    pub by_version: BTreeMap<String, usize>,
    pub failures: Vec<String>,
}

pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Seen>>,
}

impl Load {
    /// `clients` clients for `model`, spread over `urls`.
    pub fn start(urls: &[String], model: &str, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let http = reqwest::Client::new();
        let tasks = (0..clients)
            .map(|c| {
                let (stop, http, urls, model) =
                    (stop.clone(), http.clone(), urls.to_vec(), model.to_owned());
                tokio::spawn(async move {
                    let mut seen = Seen::default();
                    let mut i = c;
                    while !stop.load(Ordering::Relaxed) {
                        let url = &urls[i % urls.len()];
                        i += 1;
                        seen.requests += 1;
                        let answer = http
                            .post(format!("{url}/v1/completions"))
                            .json(&json!({"model": model, "prompt": "colour red",
                                          "max_tokens": 4, "temperature": 0}))
                            .send()
                            .await;
                        match answer {
                            Ok(r) if r.status().is_success() => {
                                let body: serde_json::Value = r.json().await.unwrap_or_default();
                                let version = body["system_fingerprint"]
                                    .as_str()
                                    .unwrap_or_default()
                                    .to_owned();
                                *seen.by_version.entry(version).or_default() += 1;
                            }
                            Ok(r) => {
                                let code = r.status();
                                let text = r.text().await.unwrap_or_default();
                                seen.failures.push(format!("{url}: {code} {text}"));
                            }
                            Err(e) => seen.failures.push(format!("{url}: {e}")),
                        }
                    }
                    seen
                })
            })
            .collect();
        Self { stop, tasks }
    }

    /// Stops every client and adds up what they saw.
    pub async fn finish(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Seen::default();
        for task in self.tasks {
            let seen = task.await.expect("a load client");
            total.requests += seen.requests;
            for (version, n) in seen.by_version {
                *total.by_version.entry(version).or_default() += n;
            }
            total.failures.extend(seen.failures);
        }
        total
    }
}
