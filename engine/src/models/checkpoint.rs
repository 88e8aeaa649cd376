//! A base model as the trainer and the server load it, whatever its layout (a Hugging Face
//! directory or a GGUF file): its checked configuration, tokenizer, weights, and the ids that
//! end a completion.

use std::{path::PathBuf, sync::Arc};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::{
    BaseRewrite, Llama, Precision,
    config::{Config, ConfigError, HfConfig},
    gguf::{GgufError, GgufFile},
    quantization::{self, Prequantized, QuantizationError},
    source::{self, ModelFiles, SourceError},
    weights::{WeightsError, load_weights},
};
use crate::text::{
    gguf_tokenizer,
    tokenizer::{Tokenizer, TokenizerError},
};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{}: {source}", path.display())]
    ReadConfig {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", dir.display())]
    Config { dir: PathBuf, source: ConfigError },
    #[error("{}: {source}", dir.display())]
    Quantization {
        dir: PathBuf,
        source: QuantizationError,
    },
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{}: loading the weights: {source}", path.display())]
    Load {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error(transparent)]
    Source(#[from] SourceError),
}

/// A base model's files, opened and checked.
#[derive(Debug)]
pub struct Checkpoint {
    files: ModelFiles,
    config: Config,
    prequantized: Option<Prequantized>,
    /// A GGUF file's header, read once: the tokenizer and the weights both come from it.
    gguf: Option<Arc<GgufFile>>,
}

impl Checkpoint {
    /// Reads and checks the configuration (`config.json` with its `quantization_config`, or
    /// the GGUF metadata); weights and tokenizer are read when asked for.
    pub fn open(files: ModelFiles) -> Result<Self, CheckpointError> {
        match &files {
            ModelFiles::Directory(dir) => {
                let path = dir.join("config.json");
                let text = std::fs::read_to_string(&path)
                    .map_err(|source| CheckpointError::ReadConfig { path, source })?;
                let config_error = |source| CheckpointError::Config {
                    dir: dir.clone(),
                    source,
                };
                let mut hf: HfConfig =
                    serde_json::from_str(&text).map_err(|e| config_error(ConfigError::Parse(e)))?;
                let prequantized = quantization::check(hf.quantization_config.take().as_ref())
                    .map_err(|source| CheckpointError::Quantization {
                        dir: dir.clone(),
                        source,
                    })?;
                let config = Config::try_from(hf).map_err(config_error)?;
                Ok(Self {
                    files,
                    config,
                    prequantized,
                    gguf: None,
                })
            }
            ModelFiles::Gguf(path) => {
                let gguf = Arc::new(GgufFile::open(path)?);
                let config = gguf.config()?;
                Ok(Self {
                    files,
                    config,
                    prequantized: None,
                    gguf: Some(gguf),
                })
            }
        }
    }

    pub fn files(&self) -> &ModelFiles {
        &self.files
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// How the checkpoint's weights were quantized before Graft read them, if they were.
    pub fn prequantized(&self) -> Option<Prequantized> {
        self.prequantized
    }

    pub fn tokenizer(&self) -> Result<Tokenizer, TokenizerError> {
        match &self.gguf {
            Some(gguf) => gguf_tokenizer::from_gguf(gguf.path(), gguf.metadata()),
            None => Tokenizer::from_dir(self.files.path()),
        }
    }

    /// The weights, under Hugging Face's names, read as `dtype` onto `device` when asked for.
    pub fn weights(
        &self,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>, WeightsError> {
        match &self.gguf {
            Some(gguf) => Ok(gguf.weights(&self.config, dtype, device)),
            None => load_weights(self.files.path(), dtype, device),
        }
    }

    /// The model on `device`, computing in `dtype`, its projections stored as `precision`
    /// asks (pre-quantized NF4 weights stay as stored).
    pub fn load(
        &self,
        precision: Precision,
        dtype: DType,
        device: &Device,
    ) -> Result<Llama, CheckpointError> {
        self.load_rewritten(precision, dtype, device, None)
    }

    /// [`load`](Self::load) with some projections rewritten before they are frozen
    /// ([`Llama::load_rewritten`]).
    pub fn load_rewritten(
        &self,
        precision: Precision,
        dtype: DType,
        device: &Device,
        rewrite: Option<&dyn BaseRewrite>,
    ) -> Result<Llama, CheckpointError> {
        let vb = self.weights(dtype, device)?;
        Llama::load_rewritten(&vb, &self.config, precision, rewrite).map_err(|source| {
            CheckpointError::Load {
                path: self.files.path().to_owned(),
                source,
            }
        })
    }

    /// The model's identity ([`source::digest`]).
    pub fn digest(&self) -> Result<String, SourceError> {
        source::digest(&self.files)
    }

    /// Ids that end a completion besides the tokenizer's eos: `eos_token_id` of
    /// `generation_config.json` (a number or a list), as transformers' generate stops on it.
    /// A GGUF file has one eos, the tokenizer's.
    pub fn generation_eos(&self) -> Vec<u32> {
        let ModelFiles::Directory(dir) = &self.files else {
            return Vec::new();
        };
        let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) else {
            return Vec::new();
        };
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else {
            return Vec::new();
        };
        let id = |v: &serde_json::Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
        match &value["eos_token_id"] {
            serde_json::Value::Array(ids) => ids.iter().filter_map(id).collect(),
            other => id(other).into_iter().collect(),
        }
    }
}
