//! The command line, each flag also settable from the environment.

use std::path::PathBuf;

use candle_core::DType;
use clap::{Parser, ValueEnum};
use graft_engine::{device::DeviceChoice, models::Precision, storage::S3Options};

use crate::model::ModelOptions;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Quantization {
    /// Base weights as stored (f32 on CPU, bf16 on a GPU).
    None,
    /// NF4 base weights: about a quarter of the memory, slower on CPU.
    Nf4,
}

/// What a LoRA adapter's A and B are kept in (vLLM's `--lora-dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LoraDtype {
    /// The model's compute dtype (f32 on CPU, bf16 on a GPU).
    Auto,
    /// bf16 beside an f32 model on the CPU: half the bytes each step reads of them, at
    /// bf16's rounding of the adapter's weights.
    Bfloat16,
    Float32,
}

#[derive(Parser, Debug, Clone)]
#[command(name = "graft-server", version, about)]
pub struct Args {
    /// The base model directory: `s3://`, `file://` (or `hf://` where a hub is reachable).
    #[arg(long, env = "GRAFT_MODEL")]
    pub model: String,
    /// The `model` name that selects the base model; the URI's last segment by default.
    #[arg(long, env = "GRAFT_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    #[arg(long, env = "GRAFT_LISTEN", default_value = "0.0.0.0:8000")]
    pub listen: String,
    /// A file holding a static bearer token for the admin API (a mounted Secret), read again
    /// whenever it changes. Without it (and without --admin-audience) the admin API refuses
    /// every call.
    #[arg(long, env = "GRAFT_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Serve the admin API on this address instead of --listen, e.g. `0.0.0.0:8001`, so that
    /// a NetworkPolicy can admit only the operator to it.
    #[arg(long, env = "GRAFT_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Accept Kubernetes ServiceAccount tokens bound to this audience on the admin API,
    /// checked with a TokenReview (the server's own credentials need `tokenreviews/create`).
    #[arg(long, env = "GRAFT_ADMIN_AUDIENCE")]
    pub admin_audience: Option<String>,
    /// With --admin-audience: the usernames allowed in, e.g.
    /// `system:serviceaccount:graft-system:graft-operator`.
    #[arg(long, env = "GRAFT_ADMIN_ALLOWED_USERS", value_delimiter = ',')]
    pub admin_allowed_users: Vec<String>,
    /// PEM certificate chain and key for TLS on --admin-listen (read again when they change).
    #[arg(long, env = "GRAFT_ADMIN_TLS_CERT", requires_all = ["admin_tls_key", "admin_listen"])]
    pub admin_tls_cert: Option<PathBuf>,
    #[arg(long, env = "GRAFT_ADMIN_TLS_KEY", requires = "admin_tls_cert")]
    pub admin_tls_key: Option<PathBuf>,
    /// The adapters to load before turning ready: a JSON file, or the directory where the
    /// operator's `<deployment>-graft-adapters` ConfigMap is mounted (one `<name>.json` each).
    #[arg(long, env = "GRAFT_ADAPTERS_FILE")]
    pub adapters_file: Option<PathBuf>,
    /// Downloaded models and adapters.
    #[arg(long, env = "GRAFT_CACHE_DIR", default_value = "/var/cache/graft")]
    pub cache_dir: PathBuf,
    #[arg(long, env = "GRAFT_QUANTIZATION", value_enum, default_value = "none")]
    pub quantization: Quantization,
    /// Adapters of a higher rank are refused.
    #[arg(long, env = "GRAFT_MAX_LORA_RANK", default_value_t = 64)]
    pub max_lora_rank: usize,
    /// What LoRA adapters' A and B are kept in: auto (the model's dtype), bfloat16 or
    /// float32. On the CPU, bfloat16 halves what a step with many adapters reads (most of its
    /// cost past a few adapters) for bf16's rounding of their weights; a GPU keeps them in the
    /// model's dtype.
    #[arg(long, env = "GRAFT_LORA_DTYPE", value_enum, default_value = "auto")]
    pub lora_dtype: LoraDtype,
    /// Adapter versions kept in memory; the least recently used are dropped and reloaded from
    /// the local disk cache on demand.
    #[arg(long, env = "GRAFT_MAX_LOADED_ADAPTERS", default_value_t = 64)]
    pub max_loaded_adapters: usize,
    /// Sequences decoded together in one step.
    #[arg(long, env = "GRAFT_MAX_BATCH_SIZE", default_value_t = 32)]
    pub max_batch_size: usize,
    /// Tokens the KV cache holds for all sequences together (keys and values of every
    /// layer). Sequences are admitted while their blocks fit and the newest are preempted (and
    /// computed again later) when decoding needs more. By default
    /// `--kv-cache-memory-fraction` of the memory free after loading the model, less room for
    /// `--max-loaded-adapters` adapters of `--max-lora-rank`.
    #[arg(long, env = "GRAFT_KV_CACHE_TOKENS")]
    pub kv_cache_tokens: Option<usize>,
    /// The share of the device's free memory (the GPU's, or the system's on the CPU) the KV
    /// cache may take when `--kv-cache-tokens` is not given.
    #[arg(long, env = "GRAFT_KV_CACHE_MEMORY_FRACTION", default_value_t = 0.9,
          value_parser = fraction)]
    pub kv_cache_memory_fraction: f64,
    /// Requests waiting for a place in the batch; more are refused with 429.
    #[arg(long, env = "GRAFT_MAX_WAITING", default_value_t = 256)]
    pub max_waiting: usize,
    /// Prompt plus completion, in tokens; by default the model's `max_position_embeddings`, at
    /// most 4096 (each sequence's KV cache may grow to this).
    #[arg(long, env = "GRAFT_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// How the model writes tool calls: auto (from its chat template), hermes (Qwen,
    /// Hermes: `<tool_call>`), llama3_json, mistral (`[TOOL_CALLS]`), or none.
    #[arg(long, env = "GRAFT_TOOL_CALL_PARSER", default_value = "auto",
          value_parser = ["auto", "hermes", "llama3_json", "mistral", "none"])]
    pub tool_call_parser: String,
    /// auto (the GPU when this build has CUDA and one is present), cpu, cuda or
    /// cuda:<ordinal>.
    #[arg(long, env = "GRAFT_DEVICE", default_value = "auto")]
    pub device: DeviceChoice,
    /// Where the kubelet reads the container's termination message (the pod's
    /// `terminationMessagePath`): why the server stopped, in one line, e.g. a model it cannot
    /// load. Absent or read-only outside a pod; the log has the same line.
    #[arg(
        long,
        env = "GRAFT_TERMINATION_LOG",
        default_value = "/dev/termination-log"
    )]
    pub termination_log: PathBuf,
    /// S3 endpoint (for MinIO and other S3-compatible stores); also `AWS_ENDPOINT_URL`.
    #[arg(long)]
    pub s3_endpoint: Option<String>,
    #[arg(long)]
    pub s3_region: Option<String>,
}

impl Args {
    pub fn model_options(&self) -> ModelOptions {
        ModelOptions {
            uri: self.model.clone(),
            served_name: self.served_model_name.clone(),
            precision: match self.quantization {
                Quantization::None => Precision::Dense,
                Quantization::Nf4 => Precision::Nf4,
            },
            max_lora_rank: self.max_lora_rank,
            lora_dtype: match self.lora_dtype {
                LoraDtype::Auto => None,
                LoraDtype::Bfloat16 => Some(DType::BF16),
                LoraDtype::Float32 => Some(DType::F32),
            },
            max_loaded_adapters: self.max_loaded_adapters,
            max_model_len: self.max_model_len,
            tool_call_parser: self.tool_call_parser.clone(),
            device: self.device,
        }
    }

    /// Credentials come from the environment only, never from flags (which `ps` shows).
    pub fn s3_options(&self) -> S3Options {
        S3Options::from_env(self.s3_endpoint.clone(), self.s3_region.clone())
    }
}

/// A number in (0, 1].
fn fraction(s: &str) -> Result<f64, String> {
    let value: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if value > 0.0 && value <= 1.0 {
        Ok(value)
    } else {
        Err(format!("{value} is not in (0, 1]"))
    }
}
