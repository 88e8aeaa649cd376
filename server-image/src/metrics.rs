//! Prometheus metrics of the server: requests by endpoint and status, tokens, latencies,
//! requests per adapter, adapters in memory, adapter loads and their failures; and, under
//! vLLM's names, the gauges the Gateway API Inference Extension's endpoint picker reads from a
//! model server (queue, batch, KV-cache usage, adapters running and waiting), so an
//! `InferencePool` of graft-server pods gets load- and adapter-aware routing.

use std::{collections::BTreeMap, fmt::Write as _, sync::Mutex, time::Duration};

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
    preemptions: Counter,
    prefix_queried_tokens: Counter,
    prefix_hit_tokens: Counter,
    loaded_adapters: Gauge,
    adapter_loads: Counter,
    adapter_load_failures: Counter,
    adapter_load_seconds: Histogram,
    router: Mutex<RouterState>,
}

/// What the scheduler reports after each step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Load {
    /// Sequences in the batch.
    pub running: usize,
    /// 0 to 1.
    pub kv_cache_usage: f64,
    /// Adapter names with a sequence in the batch.
    pub running_adapters: Vec<String>,
}

#[derive(Debug, Default)]
struct RouterState {
    model: String,
    max_lora: usize,
    load: Load,
    /// Queued requests per adapter name (empty for the base model).
    waiting: BTreeMap<String, usize>,
    /// When the adapter sets last changed, in Unix seconds: `vllm:lora_requests_info`'s value.
    changed: f64,
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
            preemptions: Counter::default(),
            prefix_queried_tokens: Counter::default(),
            prefix_hit_tokens: Counter::default(),
            loaded_adapters: Gauge::default(),
            adapter_loads: Counter::default(),
            adapter_load_failures: Counter::default(),
            adapter_load_seconds: seconds(),
            registry: Registry::default(),
            router: Mutex::default(),
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
            "preemptions",
            "Sequences that gave their KV blocks back to make room, to be computed again",
            metrics.preemptions.clone(),
        );
        registry.register(
            "prefix_cache_queried_tokens",
            "Tokens of sequences looked up in the prefix cache",
            metrics.prefix_queried_tokens.clone(),
        );
        registry.register(
            "prefix_cache_hit_tokens",
            "Tokens whose keys and values came from the prefix cache",
            metrics.prefix_hit_tokens.clone(),
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

    pub fn preempted(&self) {
        self.preemptions.inc();
    }

    /// A sequence of `queried` tokens found its first `hit` in the prefix cache.
    pub fn prefix_lookup(&self, queried: usize, hit: usize) {
        self.prefix_queried_tokens.inc_by(queried as u64);
        self.prefix_hit_tokens.inc_by(hit as u64);
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

    /// The served model's name (the `model_name` label) and the adapters this server keeps
    /// in memory at once (`max_lora`).
    pub fn set_served_model(&self, model: &str, max_lora: usize) {
        let mut router = self.router();
        model.clone_into(&mut router.model);
        router.max_lora = max_lora;
    }

    /// A request for `adapter` joined (`true`) or left (`false`) the queue.
    pub fn queued(&self, adapter: &str, joined: bool) {
        let mut router = self.router();
        let before = router.waiting.keys().filter(|a| !a.is_empty()).count();
        let count = router.waiting.entry(adapter.to_owned()).or_default();
        if joined {
            *count += 1;
        } else {
            *count = count.saturating_sub(1);
            if *count == 0 {
                router.waiting.remove(adapter);
            }
        }
        if router.waiting.keys().filter(|a| !a.is_empty()).count() != before {
            router.changed = unix_seconds();
        }
    }

    pub fn set_load(&self, load: &Load) {
        let mut router = self.router();
        if router.load.running_adapters != load.running_adapters {
            router.changed = unix_seconds();
        }
        router.load.clone_from(load);
    }

    fn router(&self) -> std::sync::MutexGuard<'_, RouterState> {
        self.router
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        let router = self.router().render();
        match text.strip_suffix("# EOF\n") {
            Some(head) => format!("{head}{router}# EOF\n"),
            None => text + &router,
        }
    }
}

impl RouterState {
    /// vLLM's gauges, with its `model_name` label.
    fn render(&self) -> String {
        let label = format!("model_name=\"{}\"", escape(&self.model));
        let waiting: usize = self.waiting.values().sum();
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, labels: &str, value: String| {
            let _ = write!(
                out,
                "# TYPE {name} gauge\n# HELP {name} {help}\n{name}{{{labels}}} {value}\n"
            );
        };
        gauge(
            "vllm:num_requests_waiting",
            "Requests waiting for a place in the batch.",
            &label,
            waiting.to_string(),
        );
        gauge(
            "vllm:num_requests_running",
            "Sequences in the batch.",
            &label,
            self.load.running.to_string(),
        );
        for name in ["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"] {
            gauge(
                name,
                "KV-cache usage: 1 is full.",
                &label,
                self.load.kv_cache_usage.to_string(),
            );
        }
        let waiting_adapters: Vec<&str> = self
            .waiting
            .keys()
            .map(String::as_str)
            .filter(|a| !a.is_empty())
            .collect();
        let lora = format!(
            "max_lora=\"{}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"",
            self.max_lora,
            escape(&self.load.running_adapters.join(",")),
            escape(&waiting_adapters.join(",")),
        );
        gauge(
            "vllm:lora_requests_info",
            "Adapters running and waiting; the value is when they last changed.",
            &lora,
            format!("{:.3}", self.changed),
        );
        out
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_router_gauges_carry_vllm_names_and_adapter_lists() {
        let metrics = Metrics::default();
        metrics.set_served_model("base", 8);
        metrics.queued("support-bot", true);
        metrics.queued("", true);
        metrics.set_load(&Load {
            running: 3,
            kv_cache_usage: 0.25,
            running_adapters: vec!["a".to_owned(), "b".to_owned()],
        });
        let text = metrics.render();
        assert!(text.ends_with("# EOF\n"), "{text}");
        for line in [
            "vllm:num_requests_waiting{model_name=\"base\"} 2",
            "vllm:num_requests_running{model_name=\"base\"} 3",
            "vllm:kv_cache_usage_perc{model_name=\"base\"} 0.25",
            "vllm:gpu_cache_usage_perc{model_name=\"base\"} 0.25",
            "vllm:lora_requests_info{max_lora=\"8\",running_lora_adapters=\"a,b\",waiting_lora_adapters=\"support-bot\"} ",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        metrics.queued("support-bot", false);
        assert!(metrics.render().contains("waiting_lora_adapters=\"\"}"));
    }
}
