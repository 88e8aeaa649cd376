//! The model's `config.json` (as Hugging Face `save_pretrained` writes it, transformers 4 or 5)
//! and the runtime [`Config`] it converts into.

use serde::Deserialize;

use super::rope::{Rope, RopeParameters, RopeParametersField};
use crate::adapters::Site;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config.json: {0}")]
    Parse(#[from] serde_json::Error),
    #[error(
        "unsupported architecture {0:?}: Graft runs model_type llama (Llama 2/3), mistral, qwen2, qwen3, gemma2, gemma3_text and phi3 (Phi-3, Phi-4-mini)"
    )]
    Architecture(String),
    #[error(
        "unsupported rope_type {0:?}: Graft supports default, linear, dynamic, llama3, yarn and longrope"
    )]
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
    /// Phi-3: the context the model was pretrained for, before `longrope` stretched it.
    pub original_max_position_embeddings: Option<usize>,
    /// Phi-3 / Phi-4-mini: the fraction of each head that rotates (transformers 4 spelling; 5
    /// also writes it inside `rope_parameters`).
    pub partial_rotary_factor: Option<f64>,
    /// transformers 4.
    pub rope_theta: Option<f64>,
    /// transformers 4.
    pub rope_scaling: Option<RopeParameters>,
    /// transformers 5: theta and scaling together, or one of each per layer type.
    pub rope_parameters: Option<RopeParametersField>,
    /// transformers 4's Gemma 3: the theta of sliding layers.
    pub rope_local_base_freq: Option<f64>,
    /// `full_attention` or `sliding_attention`, per layer (transformers 5).
    pub layer_types: Option<Vec<String>>,
    /// transformers 4's Gemma 3: every this-many-th layer is a full one, the rest slide.
    pub sliding_window_pattern: Option<usize>,
    /// Llama's spelling of the MLP activation.
    pub hidden_act: Option<String>,
    /// Gemma's.
    pub hidden_activation: Option<String>,
    /// Gemma: attention scores scale by `query_pre_attn_scalar^-1/2`, not `head_dim^-1/2`.
    pub query_pre_attn_scalar: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    /// Gemma 2: scaled attention scores become `cap · tanh(score / cap)`.
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma 3 as an encoder (EmbeddingGemma): refused.
    pub use_bidirectional_attention: Option<bool>,
    pub bos_token_id: Option<serde_json::Value>,
    pub eos_token_id: Option<serde_json::Value>,
    /// How the weights are quantized, if they are (`models::quantization` reads it).
    #[serde(default)]
    pub quantization_config: Option<serde_json::Value>,
}

/// The MLP's gate activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `silu(gate) · up` (Llama, Mistral, Qwen).
    Silu,
    /// `gelu_tanh(gate) · up` (Gemma).
    GeluTanh,
}

/// Which keys a layer's queries see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKind {
    /// Every earlier position.
    Full,
    /// The last `sliding_window` positions, and the local rotary schedule where there is one.
    Sliding,
}

/// What the model code needs, checked. Its flags are independent facts of `config.json`.
#[allow(clippy::struct_excessive_bools)]
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// `llama`, `mistral`, `qwen2`, `qwen3`, `gemma2`, `gemma3_text` or `phi3`.
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
    /// How many leading dimensions of each head rotate (Phi-4-mini: ¾ of them); the rest pass
    /// through.
    pub rotary_dim: usize,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2, and Qwen3 with `attention_bias`).
    pub qkv_bias: bool,
    /// Each head's queries and keys are RMS-normalised before rotation (Qwen3).
    pub qk_norm: bool,
    /// q/k/v are one `qkv_proj` and gate/up one `gate_up_proj` (Phi-3), and adapters target
    /// them so.
    pub fused_projections: bool,
    /// Norms scale by `1 + weight` (Gemma); the loader adds the 1 to the weights.
    pub norm_weight_offset: bool,
    /// Attention's and the MLP's outputs are normed too, before each residual add (Gemma 2/3).
    pub sandwich_norms: bool,
    /// Embeddings are multiplied by this (Gemma: `√hidden_size`).
    pub embed_scale: Option<f64>,
    /// Attention scores are multiplied by this.
    pub attention_scale: f64,
    pub activation: Activation,
    /// Logits become `cap · tanh(logits / cap)` (Gemma).
    pub final_logit_softcap: Option<f64>,
    /// Scaled attention scores become `cap · tanh(score / cap)` (Gemma 2).
    pub attention_softcap: Option<f64>,
    /// How many positions a sliding layer attends to, itself included (Mistral: every layer).
    pub sliding_window: Option<usize>,
    /// One per layer.
    pub layer_types: Vec<AttentionKind>,
    pub rope: Rope,
    /// The rotary schedule of sliding layers where it is their own (Gemma 3's local base).
    pub local_rope: Option<Rope>,
}

impl Config {
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        Self::try_from(serde_json::from_str::<HfConfig>(text)?)
    }

    /// The window layer `layer` attends within, if any.
    pub fn window(&self, layer: usize) -> Option<usize> {
        match self.layer_types.get(layer) {
            Some(AttentionKind::Sliding) => self.sliding_window,
            _ => None,
        }
    }

    /// The rotary schedule of layer `layer`: whether it is the local one.
    pub fn local_rope_at(&self, layer: usize) -> bool {
        self.local_rope.is_some() && self.layer_types.get(layer) == Some(&AttentionKind::Sliding)
    }

    /// The projections of a decoder layer, which adapters can target.
    pub fn sites(&self) -> &'static [Site] {
        if self.fused_projections {
            &Site::FUSED
        } else {
            &Site::SEPARATE
        }
    }

    /// transformers' causal-LM class of the model type (AdapterHub files name it).
    pub fn causal_lm_class(&self) -> Option<&'static str> {
        Some(match self.model_type.as_str() {
            "llama" => "LlamaForCausalLM",
            "mistral" => "MistralForCausalLM",
            "qwen2" => "Qwen2ForCausalLM",
            "qwen3" => "Qwen3ForCausalLM",
            "gemma2" => "Gemma2ForCausalLM",
            "gemma3_text" => "Gemma3ForCausalLM",
            "phi3" => "Phi3ForCausalLM",
            _ => return None,
        })
    }

    /// `(out, in)` of a projection, if the model has it.
    pub fn site_shape(&self, site: Site) -> Option<(usize, usize)> {
        let (q, kv) = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        );
        let (hidden, inter) = (self.hidden_size, self.intermediate_size);
        self.sites().contains(&site).then_some(match site {
            Site::QProj => (q, hidden),
            Site::KProj | Site::VProj => (kv, hidden),
            Site::QkvProj => (q + 2 * kv, hidden),
            Site::OProj => (hidden, q),
            Site::GateProj | Site::UpProj => (inter, hidden),
            Site::GateUpProj => (2 * inter, hidden),
            Site::DownProj => (hidden, inter),
        })
    }
}

impl TryFrom<HfConfig> for Config {
    type Error = ConfigError;

    fn try_from(hf: HfConfig) -> Result<Self, ConfigError> {
        let family = Family::of(&hf)?;
        if hf.mlp_bias == Some(true) {
            return Err(ConfigError::Invalid(
                "mlp_bias: true is not supported".to_owned(),
            ));
        }
        // Llama's attention_bias also biases o_proj; no released Llama, Mistral or Gemma
        // checkpoint Graft targets has it, so it is refused rather than ignored.
        if hf.attention_bias == Some(true) && !family.qwen {
            return Err(ConfigError::Invalid(
                "attention_bias: true is not supported".to_owned(),
            ));
        }
        if hf.use_bidirectional_attention == Some(true) {
            return Err(ConfigError::Invalid(
                "use_bidirectional_attention: true (an encoder) is not a causal LM".to_owned(),
            ));
        }
        if family.qwen && hf.use_sliding_window == Some(true) {
            return Err(ConfigError::Invalid(format!(
                "use_sliding_window: true is not supported for {} (per-layer windows)",
                hf.model_type
            )));
        }
        let head_dim = match hf.head_dim {
            Some(head_dim) if head_dim > 0 => head_dim,
            _ if hf.num_attention_heads > 0
                && hf.hidden_size.is_multiple_of(hf.num_attention_heads) =>
            {
                hf.hidden_size / hf.num_attention_heads
            }
            _ => {
                return Err(ConfigError::Invalid(format!(
                    "hidden_size {} is not a multiple of num_attention_heads {}",
                    hf.hidden_size, hf.num_attention_heads
                )));
            }
        };
        let num_kv_heads = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
        if num_kv_heads == 0 || !hf.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(ConfigError::Invalid(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {num_kv_heads}",
                hf.num_attention_heads
            )));
        }
        let (rope, local_rope) = ropes(&hf)?;
        let rotary_dim = rotary_dim(&hf, head_dim)?;
        for (name, rope) in std::iter::once(("rope_parameters", &rope))
            .chain(local_rope.as_ref().map(|r| ("sliding layers' rope", r)))
        {
            rope.check_rotary_dim(rotary_dim)
                .map_err(|e| ConfigError::Invalid(format!("{name}: {e}")))?;
        }
        let layer_types = layer_types(&hf, &family)?;
        // Qwen writes a window but only uses it with `use_sliding_window` (refused above).
        let sliding_window = if family.qwen { None } else { hf.sliding_window };
        #[allow(clippy::cast_precision_loss)]
        let attention_scale = 1.0 / hf.query_pre_attn_scalar.unwrap_or(head_dim as f64).sqrt();
        #[allow(clippy::cast_precision_loss)]
        let embed_scale = family.gemma.then(|| (hf.hidden_size as f64).sqrt());
        Ok(Self {
            model_type: hf.model_type.clone(),
            max_position_embeddings: hf.max_position_embeddings,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads,
            head_dim,
            rotary_dim,
            rms_norm_eps: hf.rms_norm_eps,
            tie_word_embeddings: hf.tie_word_embeddings,
            qkv_bias: family.qkv_bias || (family.qwen && hf.attention_bias == Some(true)),
            qk_norm: family.qk_norm,
            fused_projections: family.fused,
            norm_weight_offset: family.gemma,
            sandwich_norms: family.gemma,
            embed_scale,
            attention_scale,
            activation: activation(&hf)?,
            final_logit_softcap: hf.final_logit_softcapping,
            attention_softcap: hf
                .attn_logit_softcapping
                .filter(|_| family.reads_attention_softcap),
            sliding_window,
            layer_types,
            rope,
            local_rope,
        })
    }
}

/// What a `model_type` implies.
#[allow(clippy::struct_excessive_bools)]
struct Family {
    qwen: bool,
    gemma: bool,
    /// Always, whatever `attention_bias` says (Qwen2).
    qkv_bias: bool,
    qk_norm: bool,
    /// `qkv_proj` and `gate_up_proj` (Phi-3).
    fused: bool,
    /// Gemma 2 soft-caps attention scores; transformers' Gemma 3 reads no such field.
    reads_attention_softcap: bool,
}

impl Family {
    fn of(hf: &HfConfig) -> Result<Self, ConfigError> {
        let family = |qwen, gemma, qkv_bias, qk_norm| Self {
            qwen,
            gemma,
            qkv_bias,
            qk_norm,
            fused: false,
            reads_attention_softcap: false,
        };
        Ok(match hf.model_type.as_str() {
            "llama" | "mistral" => family(false, false, false, false),
            "qwen2" => family(true, false, true, false),
            "qwen3" => family(true, false, false, true),
            // transformers' Gemma 3 reads no attn_logit_softcapping (Gemma 2's); neither do we.
            "gemma2" => Self {
                reads_attention_softcap: true,
                ..family(false, true, false, false)
            },
            "gemma3_text" => family(false, true, false, true),
            // Phi-3 and Phi-4-mini (both `phi3`): fused projections, every layer slides when
            // there is a window.
            "phi3" => Self {
                fused: true,
                ..family(false, false, false, false)
            },
            other => return Err(ConfigError::Architecture(other.to_owned())),
        })
    }
}

/// The global rotary schedule, and the sliding layers' own where they have one.
fn ropes(hf: &HfConfig) -> Result<(Rope, Option<Rope>), ConfigError> {
    let theta = hf.rope_theta.unwrap_or(10_000.0);
    let context = super::rope::Context {
        max_position_embeddings: hf.max_position_embeddings,
        original_max_position_embeddings: hf.original_max_position_embeddings,
    };
    match (&hf.rope_parameters, &hf.rope_scaling) {
        (Some(RopeParametersField::PerLayerType(by_type)), _) => {
            let full = by_type.get("full_attention").ok_or_else(|| {
                ConfigError::Invalid("rope_parameters has no full_attention entry".to_owned())
            })?;
            let local = by_type
                .get("sliding_attention")
                .map(|p| Rope::from_parameters(p, theta, context))
                .transpose()?;
            Ok((Rope::from_parameters(full, theta, context)?, local))
        }
        (Some(RopeParametersField::One(params)), _) | (None, Some(params)) => Ok((
            Rope::from_parameters(params, theta, context)?,
            hf.rope_local_base_freq.map(|theta| Rope::Default { theta }),
        )),
        (None, None) => Ok((
            Rope::Default { theta },
            hf.rope_local_base_freq.map(|theta| Rope::Default { theta }),
        )),
    }
}

/// Each layer's attention: Gemma's `layer_types`; for the others every layer slides when
/// there is a window (Mistral; Qwen's is refused above), else none does.
fn layer_types(hf: &HfConfig, family: &Family) -> Result<Vec<AttentionKind>, ConfigError> {
    if !family.gemma {
        let kind = if hf.sliding_window.is_some() && !family.qwen {
            AttentionKind::Sliding
        } else {
            AttentionKind::Full
        };
        return Ok(vec![kind; hf.num_hidden_layers]);
    }
    let pattern = |every: usize| -> Vec<String> {
        (1..=hf.num_hidden_layers)
            .map(|i| {
                if i.is_multiple_of(every) {
                    "full_attention".to_owned()
                } else {
                    "sliding_attention".to_owned()
                }
            })
            .collect()
    };
    let types = match (&hf.layer_types, hf.sliding_window_pattern) {
        (Some(types), _) => types.clone(),
        (None, Some(every)) if every > 0 => pattern(every),
        // transformers 4's Gemma 2: every other layer slides, the first among them.
        (None, None) if hf.model_type == "gemma2" => pattern(2),
        _ => {
            return Err(ConfigError::Invalid(format!(
                "{} needs layer_types or sliding_window_pattern",
                hf.model_type
            )));
        }
    };
    if types.len() != hf.num_hidden_layers {
        return Err(ConfigError::Invalid(format!(
            "layer_types has {} entries for {} layers",
            types.len(),
            hf.num_hidden_layers
        )));
    }
    types
        .iter()
        .map(|kind| match kind.as_str() {
            "full_attention" => Ok(AttentionKind::Full),
            "sliding_attention" if hf.sliding_window.is_some() => Ok(AttentionKind::Sliding),
            other => Err(ConfigError::Invalid(format!(
                "layer type {other:?} (sliding_window {:?}) is not supported",
                hf.sliding_window
            ))),
        })
        .collect()
}

/// The leading dimensions of each head that rotate: `head_dim × partial_rotary_factor`, from
/// `rope_parameters` (transformers 5) or the top level (4).
fn rotary_dim(hf: &HfConfig, head_dim: usize) -> Result<usize, ConfigError> {
    let in_parameters = match (&hf.rope_parameters, &hf.rope_scaling) {
        (Some(RopeParametersField::One(p)), _) | (None, Some(p)) => p.partial_rotary_factor,
        _ => None,
    };
    let factor = in_parameters.or(hf.partial_rotary_factor).unwrap_or(1.0);
    // transformers truncates: `int(head_dim * partial_rotary_factor)`.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let dim = (head_dim as f64 * factor) as usize;
    if !(0.0..=1.0).contains(&factor) || dim < 2 || !dim.is_multiple_of(2) {
        return Err(ConfigError::Invalid(format!(
            "partial_rotary_factor {factor} of head_dim {head_dim} leaves {dim} rotary dimensions (an even number ≥ 2 is needed)"
        )));
    }
    Ok(dim)
}

fn activation(hf: &HfConfig) -> Result<Activation, ConfigError> {
    match hf
        .hidden_activation
        .as_deref()
        .or(hf.hidden_act.as_deref())
        .unwrap_or("silu")
    {
        "silu" | "swish" => Ok(Activation::Silu),
        "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
        other => Err(ConfigError::Invalid(format!(
            "MLP activation {other:?} is not supported"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA3: &str = include_str!("../../tests/data/tiny/llama3/config.json");
    const QWEN2: &str = include_str!("../../tests/data/tiny/qwen2/config.json");
    const QWEN3: &str = include_str!("../../tests/data/tiny/qwen3/config.json");
    const GEMMA3: &str = include_str!("../../tests/data/tiny/gemma3/config.json");
    const PHI3: &str = include_str!("../../tests/data/tiny/phi3/config.json");

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
    fn qwen3_has_qk_norms_its_own_head_dim_and_no_window() {
        let config = Config::from_json(QWEN3).expect("config");
        assert!(config.qk_norm && !config.qkv_bias);
        assert_eq!(config.head_dim, 24, "not hidden_size / heads (16)");
        let windowed = QWEN3.replace(
            "\"use_sliding_window\": false",
            "\"use_sliding_window\": true",
        );
        let error = Config::from_json(&windowed).expect_err("per-layer windows");
        assert!(error.to_string().contains("qwen3"), "{error}");
    }

    #[test]
    fn gemma3_reads_its_layer_types_and_a_rotary_schedule_per_type() {
        let config = Config::from_json(GEMMA3).expect("config");
        assert_eq!(
            config.layer_types,
            [AttentionKind::Sliding, AttentionKind::Full]
        );
        assert_eq!((config.window(0), config.window(1)), (Some(4), None));
        assert_eq!(
            config.rope,
            Rope::Linear {
                theta: 1_000_000.0,
                factor: 2.0
            }
        );
        assert_eq!(config.local_rope, Some(Rope::Default { theta: 10_000.0 }));
        assert!(config.local_rope_at(0) && !config.local_rope_at(1));
        assert_eq!(config.activation, Activation::GeluTanh);
        assert!(config.norm_weight_offset && config.sandwich_norms && config.qk_norm);
        assert_eq!(config.embed_scale, Some(8.0));
        assert!((config.attention_scale - 1.0 / 32f64.sqrt()).abs() < 1e-12);
        assert_eq!(config.final_logit_softcap, Some(5.0));
    }

    /// What transformers 4.50+ wrote for Gemma 3 before `layer_types` and per-type
    /// `rope_parameters` existed (the released checkpoints' config.json).
    #[test]
    fn gemma3_in_transformers_4_spelling_reads_the_same() {
        let json = r#"{"model_type":"gemma3_text","vocab_size":8,"hidden_size":8,
            "intermediate_size":16,"num_hidden_layers":7,"num_attention_heads":2,"head_dim":4,
            "rms_norm_eps":1e-6,"rope_theta":1000000.0,"rope_local_base_freq":10000.0,
            "rope_scaling":{"rope_type":"linear","factor":8.0},"sliding_window":512,
            "sliding_window_pattern":6,"query_pre_attn_scalar":4,
            "hidden_activation":"gelu_pytorch_tanh"}"#;
        let config = Config::from_json(json).expect("config");
        let full: Vec<usize> = (0..7).filter(|&i| config.window(i).is_none()).collect();
        assert_eq!(full, [5], "every sixth layer is a full one");
        assert_eq!(
            config.rope,
            Rope::Linear {
                theta: 1_000_000.0,
                factor: 8.0
            }
        );
        assert_eq!(config.local_rope, Some(Rope::Default { theta: 10_000.0 }));
        let encoder = json.replace(
            r#""model_type":"gemma3_text","#,
            r#""model_type":"gemma3_text","use_bidirectional_attention":true,"#,
        );
        assert!(
            Config::from_json(&encoder).is_err(),
            "an encoder is refused"
        );
    }

    #[test]
    fn gemma2_soft_caps_attention_and_alternates_windows_by_default() {
        let json = r#"{"model_type":"gemma2","vocab_size":8,"hidden_size":8,
            "intermediate_size":16,"num_hidden_layers":4,"num_attention_heads":2,"head_dim":4,
            "rms_norm_eps":1e-6,"rope_theta":10000.0,"sliding_window":4096,
            "query_pre_attn_scalar":4,"attn_logit_softcapping":50.0,
            "final_logit_softcapping":30.0,"hidden_activation":"gelu_pytorch_tanh"}"#;
        let config = Config::from_json(json).expect("config");
        let windows: Vec<_> = (0..4).map(|i| config.window(i)).collect();
        assert_eq!(windows, [Some(4096), None, Some(4096), None]);
        assert_eq!(config.attention_softcap, Some(50.0));
        assert!(!config.qk_norm && config.sandwich_norms && config.local_rope.is_none());
        // Gemma 3's attention is not soft-capped, whatever its config says (transformers').
        let gemma3 = Config::from_json(&GEMMA3.replace(
            "\"attn_logit_softcapping\": null",
            "\"attn_logit_softcapping\": 50.0",
        ))
        .expect("config");
        assert_eq!(gemma3.attention_softcap, None);
    }

    #[test]
    fn phi3_fuses_its_projections_and_rotates_part_of_each_head() {
        let config = Config::from_json(PHI3).expect("config");
        assert!(config.fused_projections);
        assert_eq!(config.sites(), Site::FUSED);
        assert_eq!(config.site_shape(Site::QkvProj), Some((64 + 2 * 32, 64)));
        assert_eq!(config.site_shape(Site::GateUpProj), Some((256, 64)));
        assert_eq!(config.site_shape(Site::QProj), None, "no separate q_proj");
        assert_eq!((config.head_dim, config.rotary_dim), (16, 12));
        assert_eq!(config.window(1), Some(6), "every layer slides");
        let Rope::LongRope(long) = &config.rope else {
            panic!("longrope, got {:?}", config.rope);
        };
        assert_eq!(long.original_max_position_embeddings, 9);
        assert!((long.attention_factor - (1.0 + 4f64.ln() / 9f64.ln()).sqrt()).abs() < 1e-12);
    }

    /// Phi-3.5-mini's config.json as transformers 4 wrote it: the fraction and the original
    /// context at the top level, `rope_scaling` of type `longrope`.
    #[test]
    fn phi3_in_transformers_4_spelling_reads_the_same() {
        let factors = |n: usize| format!("[{}]", vec!["1.5"; n].join(","));
        let json = format!(
            r#"{{"model_type":"phi3","vocab_size":8,"hidden_size":32,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2,"rms_norm_eps":1e-5,
            "max_position_embeddings":131072,"original_max_position_embeddings":4096,
            "partial_rotary_factor":0.75,"rope_theta":10000.0,"sliding_window":262144,
            "rope_scaling":{{"type":"longrope","short_factor":{s},"long_factor":{s}}}}}"#,
            s = factors(6)
        );
        let config = Config::from_json(&json).expect("config");
        assert_eq!(config.rotary_dim, 12);
        let expected = (1.0 + 32f64.ln() / 4096f64.ln()).sqrt();
        assert!((config.rope.attention_factor() - expected).abs() < 1e-12);
        let error = Config::from_json(&json.replace(&factors(6), &factors(8)))
            .expect_err("eight factors for six rotated pairs");
        assert!(error.to_string().contains("short_factor"), "{error}");
    }

    #[test]
    fn other_architectures_are_refused_by_name() {
        let json = r#"{"model_type":"gpt2","vocab_size":8,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2,"rms_norm_eps":1e-6}"#;
        let error = Config::from_json(json).expect_err("gpt2");
        assert!(error.to_string().contains("\"gpt2\""), "{error}");
    }
}
