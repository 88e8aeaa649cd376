//! The base model the server loads once: weights, tokenizer, and what adapters must match.

use std::path::Path;

use candle_core::DType;
use graft_api::ServerInfo;
use graft_engine::{
    device::{DeviceChoice, compute_dtype},
    models::{Checkpoint, Llama, Precision, source},
    storage::{self, ObjectUri, S3Options},
    text::tokenizer::Tokenizer,
};

use crate::{constrain::Grammars, tool_calls::ToolFormat};

/// The context when `--max-model-len` is not given (or the model's, if shorter).
pub const DEFAULT_MAX_MODEL_LEN: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("--model {uri}: {reason}")]
    Model { uri: String, reason: String },
}

/// What [`BaseModel::load`] needs.
#[derive(Clone, Debug)]
pub struct ModelOptions {
    pub uri: String,
    /// The `model` name clients use for the base model; the URI's last segment by default.
    pub served_name: Option<String>,
    pub precision: Precision,
    pub max_lora_rank: usize,
    /// LoRA's A and B kept in this dtype; `None`: the model's.
    pub lora_dtype: Option<DType>,
    pub max_loaded_adapters: usize,
    pub max_model_len: Option<usize>,
    /// `auto`, `none`, or a [`ToolFormat`] name.
    pub tool_call_parser: String,
    pub device: DeviceChoice,
}

#[derive(Debug)]
pub struct BaseModel {
    pub llama: Llama,
    pub tokenizer: Tokenizer,
    pub info: ServerInfo,
    /// Prompt plus completion, in tokens.
    pub max_model_len: usize,
    /// What LoRA adapters' A and B are kept in.
    pub lora_dtype: DType,
    /// The ids that end a completion: the tokenizer's eos and the model's.
    pub eos_ids: Vec<u32>,
    /// The compiler of structured-output grammars, or why this tokenizer has none.
    pub grammars: Result<Grammars, String>,
    /// How the model writes tool calls, if known.
    pub tool_format: Option<ToolFormat>,
}

impl BaseModel {
    pub async fn load(
        options: &ModelOptions,
        s3: &S3Options,
        cache: &Path,
    ) -> Result<Self, LoadError> {
        let fail = |reason: String| LoadError::Model {
            uri: options.uri.clone(),
            reason,
        };
        let uri: ObjectUri = options.uri.parse().map_err(|e| fail(format!("{e}")))?;
        let location = storage::open(&uri, s3).map_err(|e| fail(e.to_string()))?;
        let files = source::fetch(&uri, &location, cache)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let checkpoint = Checkpoint::open(files).map_err(|e| fail(e.to_string()))?;
        let digest = checkpoint.digest().map_err(|e| fail(e.to_string()))?;
        let config = checkpoint.config().clone();
        let tokenizer = checkpoint.tokenizer().map_err(|e| fail(e.to_string()))?;
        let device = options.device.open().map_err(|e| fail(e.to_string()))?;
        let llama = checkpoint
            .load(options.precision, compute_dtype(&device), &device)
            .map_err(|e| fail(e.to_string()))?;
        let lora_dtype = options.lora_dtype.unwrap_or(llama.dtype());
        // The CPU's op widens bf16 pairs for an f32 model; the GPU's keeps one dtype.
        if lora_dtype != llama.dtype() && !device.is_cpu() {
            return Err(fail(format!(
                "--lora-dtype {lora_dtype:?} on {device:?}: a GPU keeps adapters in the model's \
                 dtype ({:?}); use --lora-dtype auto",
                llama.dtype()
            )));
        }
        let served = options.served_name.clone().unwrap_or_else(|| {
            options
                .uri
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or("base")
                .to_owned()
        });
        // Every sequence's KV cache may grow to this; a model's full context (128k for Llama
        // 3.1) as the default would let a few requests exhaust memory.
        let max_model_len = options.max_model_len.unwrap_or_else(|| {
            config
                .max_position_embeddings
                .unwrap_or(DEFAULT_MAX_MODEL_LEN)
                .min(DEFAULT_MAX_MODEL_LEN)
        });
        let mut eos_ids: Vec<u32> = tokenizer.eos_token_id().into_iter().collect();
        eos_ids.extend(checkpoint.generation_eos());
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let grammars = tokenizer
            .to_json()
            .and_then(|json| Grammars::from_json(&json, config.vocab_size, &eos_ids));
        if let Err(reason) = &grammars {
            tracing::warn!(%reason, "structured output is unavailable for this tokenizer");
        }
        let tool_format = match options.tool_call_parser.as_str() {
            "auto" => tokenizer
                .chat_template_source()
                .and_then(ToolFormat::detect),
            name => ToolFormat::from_name(name),
        }
        .map(|format| format.for_tokenizer(|t| tokenizer.token_to_id(t).is_some()));
        let info = ServerInfo {
            model: served,
            model_uri: options.uri.clone(),
            model_sha256: digest,
            architecture: config.model_type.clone(),
            hidden_size: config.hidden_size,
            intermediate_size: config.intermediate_size,
            num_layers: config.num_layers,
            num_heads: config.num_heads,
            num_kv_heads: config.num_kv_heads,
            vocab_size: config.vocab_size,
            target_modules: config.sites().iter().map(|s| s.name().to_owned()).collect(),
            max_lora_rank: options.max_lora_rank,
            max_loaded_adapters: options.max_loaded_adapters,
        };
        Ok(Self {
            llama,
            tokenizer,
            info,
            max_model_len,
            lora_dtype,
            eos_ids,
            grammars,
            tool_format,
        })
    }
}
