//! Prometheus metrics of the server: requests by endpoint and status, tokens, latencies,
//! requests per adapter, adapters in memory, adapter loads and their failures.

use std::time::Duration;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AdapterLabels {
    adapter: String,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    adapter_requests: Family<AdapterLabels, Counter>,
    prompt_tokens: Counter,
    generated_tokens: Counter,
    request_seconds: Histogram,
    first_token_seconds: Histogram,
    batch_rows: Histogram,
    loaded_adapters: Gauge,
    adapter_loads: Counter,
    adapter_load_failures: Counter,
    adapter_load_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("graft_server");
        // 1 ms to ~65 s.
        let seconds = || Histogram::new(exponential_buckets(0.001, 2.0, 17));
        let metrics = Self {
            requests: Family::default(),
            adapter_requests: Family::default(),
            prompt_tokens: Counter::default(),
            generated_tokens: Counter::default(),
            request_seconds: seconds(),
            first_token_seconds: seconds(),
            batch_rows: Histogram::new(exponential_buckets(1.0, 2.0, 9)),
            loaded_adapters: Gauge::default(),
            adapter_loads: Counter::default(),
            adapter_load_failures: Counter::default(),
            adapter_load_seconds: seconds(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "HTTP requests by endpoint and status",
            metrics.requests.clone(),
        );
        registry.register(
            "adapter_requests",
            "Generation requests by adapter name",
            metrics.adapter_requests.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens processed",
            metrics.prompt_tokens.clone(),
        );
        registry.register(
            "generated_tokens",
            "Tokens generated",
            metrics.generated_tokens.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Generation request latency",
            metrics.request_seconds.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "Time to the first generated token",
            metrics.first_token_seconds.clone(),
        );
        registry.register(
            "batch_sequences",
            "Sequences in each forward step",
            metrics.batch_rows.clone(),
        );
        registry.register(
            "loaded_adapters",
            "Adapter versions in memory",
            metrics.loaded_adapters.clone(),
        );
        registry.register(
            "adapter_loads",
            "Adapter versions loaded into memory",
            metrics.adapter_loads.clone(),
        );
        registry.register(
            "adapter_load_failures",
            "Adapter versions that failed to load",
            metrics.adapter_load_failures.clone(),
        );
        registry.register(
            "adapter_load_duration_seconds",
            "Time to load an adapter version",
            metrics.adapter_load_seconds.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }
}

impl Metrics {
    pub fn request(&self, endpoint: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                endpoint: endpoint.to_owned(),
                status,
            })
            .inc();
    }

    pub fn adapter_request(&self, adapter: &str) {
        self.adapter_requests
            .get_or_create(&AdapterLabels {
                adapter: adapter.to_owned(),
            })
            .inc();
    }

    pub fn finished(&self, prompt_tokens: usize, generated: usize, elapsed: Duration) {
        self.prompt_tokens.inc_by(prompt_tokens as u64);
        self.generated_tokens.inc_by(generated as u64);
        self.request_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn first_token(&self, elapsed: Duration) {
        self.first_token_seconds.observe(elapsed.as_secs_f64());
    }

    #[allow(clippy::cast_precision_loss)]
    pub fn step(&self, sequences: usize) {
        self.batch_rows.observe(sequences as f64);
    }

    pub fn set_loaded_adapters(&self, count: usize) {
        self.loaded_adapters
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub fn adapter_loaded(&self, elapsed: Duration) {
        self.adapter_loads.inc();
        self.adapter_load_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn adapter_load_failed(&self) {
        self.adapter_load_failures.inc();
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}
