//! Shared by the server's tests: a real `graft-server` process on 127.0.0.1 serving the
//! committed tiny model, adapters made for it and stored in the test S3 server, and a small
//! HTTP client.

#![allow(dead_code)] // each test binary uses a subset

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use candle_core::{Device, Tensor};

use graft_engine::{
    adapters::{
        Adapter, Bottleneck, BottleneckAdapter, BottleneckConfig, Ia3, Ia3Adapter, Ia3Config,
        PeftAdapter, Placement, Site,
        bottleneck::{AdapterHubFile, Architecture, NonLinearity},
    },
    models::Config,
};
use graft_testenv::{Daemon, S3Server, eventually, repo_root};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub const TOKEN: &str = "admin-token-for-tests";
/// The served name of the base model (the last segment of its URI).
pub const BASE: &str = "made";

/// `engine/tests/data/tiny/made`: what `graft-trainer make-tiny-model` writes.
pub fn model_dir() -> PathBuf {
    repo_root().join("engine/tests/data/tiny/made")
}

pub fn model_config() -> Config {
    let text = std::fs::read_to_string(model_dir().join("config.json")).expect("config.json");
    Config::from_json(&text).expect("config")
}

#[derive(Debug)]
pub struct Server {
    pub daemon: Daemon,
    pub url: String,
    pub dir: PathBuf,
    client: reqwest::Client,
}

impl Server {
    /// Starts `graft-server` on the tiny model with the admin token, the test S3 server's
    /// credentials and `extra` arguments, and waits until it is ready.
    pub async fn start(extra: &[&str]) -> Self {
        Self::start_with_model(&model_dir(), extra).await
    }

    /// [`Server::start`] with another model directory.
    pub async fn start_with_model(model: &std::path::Path, extra: &[&str]) -> Self {
        let s3 = S3Server::shared().await;
        let dir = tempfile::tempdir().expect("tempdir").keep();
        std::fs::write(dir.join("token"), format!("{TOKEN}\n")).expect("token file");
        let model = format!("file://{}", model.display());
        let token = dir.join("token").display().to_string();
        let cache = dir.join("cache").display().to_string();
        let mut args = vec![
            "--model",
            &model,
            "--listen",
            "127.0.0.1:{port}",
            "--admin-token-file",
            &token,
            "--cache-dir",
            &cache,
            "--s3-endpoint",
            s3.endpoint(),
            "--s3-region",
            s3.region(),
        ];
        args.extend_from_slice(extra);
        let daemon = Daemon::start_with_env(
            "graft-server",
            env!("CARGO_BIN_EXE_graft-server"),
            &args,
            &[
                ("AWS_ACCESS_KEY_ID", s3.access_key_id()),
                ("AWS_SECRET_ACCESS_KEY", s3.secret_access_key()),
                ("RUST_LOG", "info"),
            ],
        )
        .await;
        let server = Self {
            url: format!("http://127.0.0.1:{}", daemon.port()),
            daemon,
            dir,
            client: reqwest::Client::new(),
        };
        server.wait_ready().await;
        server
    }

    pub async fn wait_ready(&self) {
        let url = format!("{}/readyz", self.url);
        eventually("graft-server ready", Duration::from_secs(60), async || {
            self.client
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// `(status, body)`; a body that is not JSON comes back as a JSON string.
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let mut request = self.client.request(method, format!("{}{path}", self.url));
        if let Some(body) = body {
            request = request.json(&body);
        }
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("the server answers");
        let status = response.status().as_u16();
        let text = response.text().await.expect("a body");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body)
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.request(reqwest::Method::POST, path, Some(body), None)
            .await
    }

    /// A greedy completion of `prompt` by `model`, asserting success.
    pub async fn complete(&self, model: &str, prompt: &str, max_tokens: usize) -> Value {
        let (status, body) = self
            .post(
                "/v1/completions",
                json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}),
            )
            .await;
        assert_eq!(status, 200, "completion failed: {body}");
        body
    }

    pub async fn put_adapter(&self, name: &str, versions: &[(&TestAdapter, u32)]) -> (u16, Value) {
        let versions: Vec<Value> = versions
            .iter()
            .map(|(a, w)| json!({"uri": a.uri, "sha256": a.sha256, "weight": w}))
            .collect();
        self.request(
            reqwest::Method::PUT,
            &format!("/admin/adapters/{name}"),
            Some(json!({"versions": versions})),
            Some(TOKEN),
        )
        .await
    }

    pub async fn admin_get(&self, path: &str) -> (u16, Value) {
        self.request(reqwest::Method::GET, path, None, Some(TOKEN))
            .await
    }

    pub async fn metric(&self, name: &str) -> f64 {
        let text = self
            .client
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// An adapter version stored somewhere the server can read.
#[derive(Clone, Debug)]
pub struct TestAdapter {
    pub uri: String,
    pub sha256: String,
}

/// A random adapter for the tiny model: every B non-zero so it changes what the model says.
pub fn random_adapter(rank: usize, seed: u64, sites: &[Site]) -> Adapter {
    random_adapter_for(&model_config(), rank, seed, sites)
}

/// [`random_adapter`] for the model `config` describes.
pub fn random_adapter_for(config: &Config, rank: usize, seed: u64, sites: &[Site]) -> Adapter {
    graft_trainer::tiny::random_adapter(config, rank, seed, sites).expect("a random adapter")
}

/// PEFT's default modules for Llama, with vectors drawn around ones (far enough to change the
/// answers).
pub fn random_ia3(seed: u64) -> Ia3Adapter {
    let config = model_config();
    let sites = [Site::KProj, Site::VProj, Site::DownProj];
    let ia3_config = Ia3Config::new(&sites, &[Site::DownProj]);
    let mut rng = graft_engine::rng::Rng::seed(seed);
    let mut vectors = BTreeMap::new();
    for layer in 0..config.num_layers {
        for site in sites {
            let (out, input) = config.site_shape(site).expect("a site of the model");
            let feedforward = ia3_config.is_feedforward(layer, site);
            let len = if feedforward { input } else { out };
            let values: Vec<f32> = (0..len).map(|_| rng.uniform(0.0, 3.0)).collect();
            let vector = Tensor::from_vec(values, len, &Device::Cpu).expect("vector");
            vectors.insert(
                (layer, site),
                Ia3 {
                    vector,
                    feedforward,
                },
            );
        }
    }
    Ia3Adapter {
        config: ia3_config,
        vectors,
    }
}

/// Houlsby's bottleneck modules (after attention and after the feed-forward block, a quarter
/// of the width) on every layer of the tiny model, with weights far enough from the library's
/// start (standard deviation 0.5) to change the answers.
pub fn random_bottleneck(seed: u64) -> BottleneckAdapter {
    let config = model_config();
    let hidden = config.hidden_size;
    let size = hidden / 4;
    let mut rng = graft_engine::rng::Rng::seed(seed);
    let mut draw = |shape: &[usize]| {
        let values: Vec<f32> = (0..shape.iter().product())
            .map(|_| rng.normal(0.5))
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).expect("tensor")
    };
    let mut modules = BTreeMap::new();
    for layer in 0..config.num_layers {
        for placement in Placement::ALL {
            let module = Bottleneck {
                down: draw(&[size, hidden]),
                down_bias: draw(&[size]),
                up: draw(&[hidden, size]),
                up_bias: draw(&[hidden]),
                scaling: 1.0,
                activation: NonLinearity::Silu,
                reads_stream: false,
            };
            modules.insert((layer, placement), module);
        }
    }
    BottleneckAdapter {
        file: AdapterHubFile {
            config: BottleneckConfig::new(Architecture::Houlsby, 4.0, "swish"),
            hidden_size: hidden,
            model_class: None,
            model_name: None,
            model_type: Some(config.model_type.clone()),
            name: "served".to_owned(),
            version: None,
        },
        modules,
    }
}

/// Writes `files` under `s3://<bucket>/<prefix>/`.
pub async fn upload(
    s3: &S3Server,
    bucket: &str,
    prefix: &str,
    files: &[(&str, Vec<u8>)],
) -> String {
    let uri = format!("s3://{bucket}/{prefix}/");
    let location = s3.location(&uri);
    for (name, bytes) in files {
        location.put(name, bytes.clone()).await.expect("upload");
    }
    uri
}

/// Stores `adapter` in PEFT's format under `s3://<bucket>/<prefix>/`.
pub async fn store(s3: &S3Server, bucket: &str, prefix: &str, adapter: &Adapter) -> TestAdapter {
    store_peft(s3, bucket, prefix, &PeftAdapter::Lora(adapter.clone())).await
}

/// [`store`] for an adapter of any method.
pub async fn store_peft(
    s3: &S3Server,
    bucket: &str,
    prefix: &str,
    adapter: &PeftAdapter,
) -> TestAdapter {
    let (config, weights) = adapter.to_bytes().expect("serialise");
    let sha256 = format!("{:x}", Sha256::digest(&weights));
    let uri = upload(
        s3,
        bucket,
        prefix,
        &[
            ("adapter_config.json", config),
            (adapter.weights_file(), weights),
        ],
    )
    .await;
    TestAdapter { uri, sha256 }
}

/// The text of a completion response.
pub fn text(body: &Value) -> &str {
    body["choices"][0]["text"]
        .as_str()
        .expect("choices[0].text")
}
