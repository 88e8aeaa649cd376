//! The model's `config.json` (as Hugging Face `save_pretrained` writes it, transformers 4 or 5)
//! and the runtime [`Config`] it converts into.

use serde::Deserialize;

use crate::adapters::Site;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config.json: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("unsupported architecture {0:?}: Graft runs Llama 2/3, Mistral and Qwen2 models")]
    Architecture(String),
    #[error("unsupported rope_type {0:?}: Graft supports default and llama3")]
    RopeType(String),
    #[error("config.json: {0}")]
    Invalid(String),
}

/// `config.json` as written; only what the engine reads.
#[derive(Debug, Deserialize)]
pub struct HfConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    pub max_position_embeddings: Option<usize>,
    /// transformers 4.
    pub rope_theta: Option<f64>,
    /// transformers 4.
    pub rope_scaling: Option<RopeParameters>,
    /// transformers 5: theta and scaling together.
    pub rope_parameters: Option<RopeParameters>,
    pub bos_token_id: Option<serde_json::Value>,
    pub eos_token_id: Option<serde_json::Value>,
    /// How the weights are quantized, if they are (`models::quantization` reads it).
    #[serde(default)]
    pub quantization_config: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct RopeParameters {
    pub rope_type: Option<String>,
    /// transformers 4 spelled it `type`.
    #[serde(rename = "type")]
    pub legacy_type: Option<String>,
    pub rope_theta: Option<f64>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
}

/// Rotary embedding frequencies.
#[derive(Clone, Debug, PartialEq)]
pub enum Rope {
    Default {
        theta: f64,
    },
    Llama3 {
        theta: f64,
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// What the model code needs, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// `llama`, `mistral` or `qwen2`.
    pub model_type: String,
    /// The longest sequence the model was trained for, when `config.json` says.
    pub max_position_embeddings: Option<usize>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2).
    pub qkv_bias: bool,
    /// Attend to at most this many previous positions (Mistral).
    pub sliding_window: Option<usize>,
    pub rope: Rope,
}

impl Config {
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        Self::try_from(serde_json::from_str::<HfConfig>(text)?)
    }

    /// `(out, in)` of a projection.
    pub fn site_shape(&self, site: Site) -> (usize, usize) {
        let (q, kv) = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        );
        match site {
            Site::QProj => (q, self.hidden_size),
            Site::KProj | Site::VProj => (kv, self.hidden_size),
            Site::OProj => (self.hidden_size, q),
            Site::GateProj | Site::UpProj => (self.intermediate_size, self.hidden_size),
            Site::DownProj => (self.hidden_size, self.intermediate_size),
        }
    }
}

impl TryFrom<HfConfig> for Config {
    type Error = ConfigError;

    fn try_from(hf: HfConfig) -> Result<Self, ConfigError> {
        let qkv_bias = match hf.model_type.as_str() {
            "llama" | "mistral" => false,
            "qwen2" => true,
            other => return Err(ConfigError::Architecture(other.to_owned())),
        };
        // Llama's attention_bias also biases o_proj; neither it nor mlp_bias is in any
        // released Llama-family checkpoint Graft targets, so refuse rather than ignore them.
        for (field, on) in [
            ("attention_bias", hf.attention_bias),
            ("mlp_bias", hf.mlp_bias),
        ] {
            if on == Some(true) && hf.model_type != "qwen2" {
                return Err(ConfigError::Invalid(format!(
                    "{field}: true is not supported"
                )));
            }
        }
        if hf.model_type == "qwen2" && hf.use_sliding_window == Some(true) {
            return Err(ConfigError::Invalid(
                "use_sliding_window: true is not supported for qwen2 (per-layer windows)"
                    .to_owned(),
            ));
        }
        if hf.num_attention_heads == 0 || !hf.hidden_size.is_multiple_of(hf.num_attention_heads) {
            return Err(ConfigError::Invalid(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                hf.hidden_size, hf.num_attention_heads
            )));
        }
        let num_kv_heads = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
        if num_kv_heads == 0 || !hf.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(ConfigError::Invalid(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {num_kv_heads}",
                hf.num_attention_heads
            )));
        }
        let params = hf.rope_parameters.or(hf.rope_scaling).unwrap_or_default();
        let theta = params.rope_theta.or(hf.rope_theta).unwrap_or(10_000.0);
        let rope_type = params
            .rope_type
            .clone()
            .or(params.legacy_type.clone())
            .unwrap_or_else(|| "default".to_owned());
        let rope = match rope_type.as_str() {
            "default" => Rope::Default { theta },
            "llama3" => {
                let missing =
                    |what: &str| ConfigError::Invalid(format!("llama3 rope needs {what}"));
                Rope::Llama3 {
                    theta,
                    factor: params.factor.ok_or_else(|| missing("factor"))?,
                    low_freq_factor: params
                        .low_freq_factor
                        .ok_or_else(|| missing("low_freq_factor"))?,
                    high_freq_factor: params
                        .high_freq_factor
                        .ok_or_else(|| missing("high_freq_factor"))?,
                    original_max_position_embeddings: params
                        .original_max_position_embeddings
                        .ok_or_else(|| missing("original_max_position_embeddings"))?,
                }
            }
            other => return Err(ConfigError::RopeType(other.to_owned())),
        };
        // Qwen2 writes a window but only uses it with `use_sliding_window` (refused above).
        let sliding_window = match hf.model_type.as_str() {
            "qwen2" => None,
            _ => hf.sliding_window,
        };
        Ok(Self {
            model_type: hf.model_type.clone(),
            max_position_embeddings: hf.max_position_embeddings,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads,
            head_dim: hf
                .head_dim
                .unwrap_or(hf.hidden_size / hf.num_attention_heads),
            rms_norm_eps: hf.rms_norm_eps,
            tie_word_embeddings: hf.tie_word_embeddings,
            qkv_bias,
            sliding_window,
            rope,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA3: &str = include_str!("../../tests/data/tiny/llama3/config.json");
    const QWEN2: &str = include_str!("../../tests/data/tiny/qwen2/config.json");

    #[test]
    fn transformers_5_rope_parameters_are_read() {
        let config = Config::from_json(LLAMA3).expect("config");
        assert_eq!(
            config.rope,
            Rope::Llama3 {
                theta: 500_000.0,
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 32,
            }
        );
        assert_eq!(
            (config.num_heads, config.num_kv_heads, config.head_dim),
            (4, 2, 16)
        );
        assert!(config.tie_word_embeddings);
    }

    #[test]
    fn transformers_4_rope_theta_and_scaling_are_read() {
        let json = r#"{"model_type":"llama","vocab_size":8,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2,"rms_norm_eps":1e-6,"rope_theta":500000.0,
            "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#;
        let config = Config::from_json(json).expect("config");
        assert!(
            matches!(config.rope, Rope::Llama3 { theta, .. } if (theta - 500_000.0).abs() < 1e-6)
        );
        assert_eq!(config.num_kv_heads, 2, "defaults to the attention heads");
    }

    #[test]
    fn qwen2_has_qkv_bias() {
        assert!(Config::from_json(QWEN2).expect("config").qkv_bias);
    }

    #[test]
    fn other_architectures_are_refused_by_name() {
        let json = r#"{"model_type":"gpt2","vocab_size":8,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2,"rms_norm_eps":1e-6}"#;
        let error = Config::from_json(json).expect_err("gpt2");
        assert!(error.to_string().contains("\"gpt2\""), "{error}");
    }
}
