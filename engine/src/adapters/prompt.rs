//! Prompt learning as PEFT saves it: prompt tuning (`PROMPT_TUNING`) and P-tuning
//! (`P_TUNING`). Both reduce at inference to the same thing, the embeddings of
//! `num_virtual_tokens` virtual tokens put before the input's: PEFT saves prompt tuning's
//! trained embedding table and, for P-tuning, its encoder's output (not the encoder), under the
//! one key `prompt_embeddings` `[num_virtual_tokens, token_dim]`. The base model is unchanged.
//!
//! Where the virtual tokens sit (PEFT's `PeftModelForCausalLM.forward`): before the input's
//! embeddings, taking positions `0..num_virtual_tokens` (PEFT drops caller position ids, so the
//! input's tokens are rotated at `num_virtual_tokens..`), attended to by every token, their own
//! logits not part of the output.
//!
//! Prefix tuning (`PREFIX_TUNING`) saves, under the same key, every layer's keys and values of
//! its virtual tokens instead: `[num_virtual_tokens, num_layers · 2 · token_dim]`, per layer a
//! key then a value, each `token_dim` = kv_heads × head_dim wide (PEFT follows grouped-query
//! attention), put in the attention's cache as they are (not rotated) before the input, whose
//! tokens then take positions `num_virtual_tokens..`. With PEFT's reparameterisation MLP
//! (`prefix_projection`) the file holds the MLP's output.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::PeftError;

/// The one tensor of a prompt-learning adapter file.
pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";

/// Which prompt-learning method an adapter file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptMethod {
    /// PEFT's `PROMPT_TUNING`: the embeddings are the trained parameters.
    PromptTuning,
    /// PEFT's `P_TUNING`: the embeddings are a trained encoder's output.
    PTuning,
    /// PEFT's `PREFIX_TUNING`: every layer's keys and values of the virtual tokens.
    PrefixTuning,
}

impl PromptMethod {
    /// PEFT's `peft_type`.
    pub fn peft_type(self) -> &'static str {
        match self {
            Self::PromptTuning => "PROMPT_TUNING",
            Self::PTuning => "P_TUNING",
            Self::PrefixTuning => "PREFIX_TUNING",
        }
    }

    fn from_peft_type(peft_type: &str) -> Option<Self> {
        match peft_type {
            "PROMPT_TUNING" => Some(Self::PromptTuning),
            "P_TUNING" => Some(Self::PTuning),
            "PREFIX_TUNING" => Some(Self::PrefixTuning),
            _ => None,
        }
    }
}

/// The fields of PEFT's `PromptTuningConfig` and `PromptEncoderConfig` Graft reads and writes
/// (one struct: they share `PromptLearningConfig`'s and differ only in the init and encoder
/// fields, each `None` for the other method). Unknown fields are ignored on read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptConfig {
    pub peft_type: String,
    pub task_type: Option<String>,
    pub num_virtual_tokens: usize,
    /// The model's hidden size.
    pub token_dim: usize,
    /// 1 for a decoder-only model (2 is an encoder-decoder's).
    #[serde(default = "one")]
    pub num_transformer_submodules: usize,
    pub num_attention_heads: usize,
    pub num_layers: usize,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub inference_mode: bool,
    /// Prompt tuning: `RANDOM`, `TEXT` or `SAMPLE_VOCAB` (how training started; nothing at
    /// inference depends on it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tuning_init: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tuning_init_text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_name_or_path: Option<String>,
    /// P-tuning: `MLP` or `LSTM`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_reparameterization_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_hidden_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_num_layers: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_dropout: Option<f64>,
    /// Prefix tuning: whether an MLP made the keys and values (the file holds its output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_projection: Option<bool>,
}

fn one() -> usize {
    1
}

impl PromptConfig {
    /// The method `peft_type` names, or why it is refused.
    pub fn method(&self) -> Result<PromptMethod, PeftError> {
        PromptMethod::from_peft_type(&self.peft_type).ok_or_else(|| {
            PeftError::Unsupported(format!(
                "peft_type {:?} (prompt learning: only PROMPT_TUNING, P_TUNING and PREFIX_TUNING)",
                self.peft_type
            ))
        })
    }

    /// The config PEFT saves for a `method` adapter of `virtual_tokens` virtual tokens on a
    /// model of `config` (decoder-only, `CAUSAL_LM`, saved for inference); the method's init
    /// or encoder fields are left for the caller. Prefix tuning's width is the keys' (PEFT's
    /// for grouped-query attention).
    pub fn for_model(
        method: PromptMethod,
        virtual_tokens: usize,
        config: &crate::models::Config,
    ) -> Self {
        let (token_dim, heads) = match method {
            PromptMethod::PrefixTuning => {
                (config.num_kv_heads * config.head_dim, config.num_kv_heads)
            }
            PromptMethod::PromptTuning | PromptMethod::PTuning => {
                (config.hidden_size, config.num_heads)
            }
        };
        Self {
            peft_type: method.peft_type().to_owned(),
            task_type: Some("CAUSAL_LM".to_owned()),
            num_virtual_tokens: virtual_tokens,
            token_dim,
            num_transformer_submodules: 1,
            num_attention_heads: heads,
            num_layers: config.num_layers,
            modules_to_save: None,
            base_model_name_or_path: None,
            inference_mode: true,
            prompt_tuning_init: None,
            prompt_tuning_init_text: None,
            tokenizer_name_or_path: None,
            encoder_reparameterization_type: None,
            encoder_hidden_size: None,
            encoder_num_layers: None,
            encoder_dropout: None,
            prefix_projection: (method == PromptMethod::PrefixTuning).then_some(false),
        }
    }

    /// The width of a virtual token's row in the file: the embeddings', or prefix tuning's
    /// keys and values of every layer.
    pub fn row_width(&self) -> Result<usize, PeftError> {
        Ok(match self.method()? {
            PromptMethod::PrefixTuning => self.num_layers * 2 * self.token_dim,
            PromptMethod::PromptTuning | PromptMethod::PTuning => self.token_dim,
        })
    }

    /// Refuses what would make Graft compute something other than PEFT does.
    pub fn check(&self) -> Result<(), PeftError> {
        let unsupported = |what: String| Err(PeftError::Unsupported(what));
        self.method()?;
        if let Some(task) = &self.task_type
            && task != "CAUSAL_LM"
        {
            return unsupported(format!("task_type {task:?} (only CAUSAL_LM)"));
        }
        if self.num_transformer_submodules != 1 {
            return unsupported(format!(
                "num_transformer_submodules {} (an encoder-decoder model's; only 1)",
                self.num_transformer_submodules
            ));
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return unsupported("modules_to_save (fully trained extra modules)".to_owned());
        }
        if self.num_virtual_tokens == 0 {
            return unsupported("num_virtual_tokens = 0".to_owned());
        }
        Ok(())
    }
}

/// A prompt-learning adapter: its config and the virtual tokens' embeddings
/// `[num_virtual_tokens, token_dim]`, f32.
#[derive(Clone, Debug)]
pub struct PromptAdapter {
    pub config: PromptConfig,
    pub embeddings: Tensor,
}

impl PromptAdapter {
    /// Reads PEFT's two files.
    pub fn from_bytes(
        config_json: &[u8],
        safetensors: &[u8],
        device: &Device,
    ) -> Result<Self, PeftError> {
        let config: PromptConfig = serde_json::from_slice(config_json)?;
        config.check()?;
        let mut tensors = candle_core::safetensors::load_buffer(safetensors, device)?;
        if let Some(name) = tensors.keys().find(|k| *k != PROMPT_EMBEDDINGS) {
            return Err(PeftError::UnexpectedKey(name.clone()));
        }
        let embeddings = tensors
            .remove(PROMPT_EMBEDDINGS)
            .ok_or_else(|| {
                PeftError::Mismatch(format!("the adapter holds no {PROMPT_EMBEDDINGS}"))
            })?
            .to_dtype(DType::F32)?;
        let want = [config.num_virtual_tokens, config.row_width()?];
        if embeddings.dims() != want {
            return Err(PeftError::Mismatch(format!(
                "{PROMPT_EMBEDDINGS} is {:?}, adapter_config.json says {want:?}",
                embeddings.dims()
            )));
        }
        Ok(Self { config, embeddings })
    }

    /// PEFT's two files: `adapter_config.json` and `adapter_model.safetensors`.
    pub fn to_bytes(&self) -> Result<(Vec<u8>, Vec<u8>), PeftError> {
        let config = serde_json::to_vec_pretty(&self.config)?;
        let tensors = vec![(
            PROMPT_EMBEDDINGS.to_owned(),
            self.embeddings.to_dtype(DType::F32)?.contiguous()?,
        )];
        let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
        let weights = safetensors::serialize(tensors, Some(metadata))
            .map_err(|e| PeftError::Weights(candle_core::Error::wrap(e)))?;
        Ok((config, weights))
    }

    pub fn num_virtual_tokens(&self) -> usize {
        self.config.num_virtual_tokens
    }

    /// Whether it fits a model of `config` with a context of `context` tokens: embeddings the
    /// hidden size wide ([`Self::check_fits`]), or prefix tuning's keys and values for each of
    /// the model's layers, kv_heads × head_dim wide.
    pub fn check_model(
        &self,
        config: &crate::models::Config,
        context: usize,
    ) -> Result<(), PeftError> {
        if self.config.method()? != PromptMethod::PrefixTuning {
            return self.check_fits(config.hidden_size, context);
        }
        let width = config.num_kv_heads * config.head_dim;
        if self.config.token_dim != width || self.config.num_layers != config.num_layers {
            return Err(PeftError::Mismatch(format!(
                "prefix keys and values of {} layers {} wide, the model has {} layers of {width} \
                 (kv_heads × head_dim)",
                self.config.num_layers, self.config.token_dim, config.num_layers
            )));
        }
        self.check_fits(self.config.token_dim, context)
    }

    /// Prefix tuning's keys and values of `layer`, `[num_virtual_tokens, token_dim]` each.
    pub fn layer_kv(&self, layer: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let [k, v] = prefix_kv(&self.embeddings, self.config.num_layers, layer)?;
        Ok((k, v))
    }

    /// Whether the embeddings fit a model of `hidden` hidden size, and its virtual tokens
    /// leave room for input in a context of `context` tokens.
    pub fn check_fits(&self, hidden: usize, context: usize) -> Result<(), PeftError> {
        if self.config.token_dim != hidden {
            return Err(PeftError::Mismatch(format!(
                "token_dim {} is not the model's hidden size {hidden}",
                self.config.token_dim
            )));
        }
        if self.config.num_virtual_tokens >= context {
            return Err(PeftError::Mismatch(format!(
                "{} virtual tokens leave no room in a context of {context} tokens",
                self.config.num_virtual_tokens
            )));
        }
        Ok(())
    }
}

/// Layer `layer`'s keys and values `[n, width]` from prefix tuning's rows `[n, layers · 2 ·
/// width]` (PEFT's layout: per layer a key, then a value). Differentiable in `rows`, so a
/// trained prefix's gradient reaches whatever made the rows.
pub fn prefix_kv(rows: &Tensor, layers: usize, layer: usize) -> candle_core::Result<[Tensor; 2]> {
    let (n, width) = rows.dims2()?;
    let all = rows.reshape((n, layers * 2, width / (layers * 2)))?;
    let part = |at: usize| all.narrow(1, at, 1)?.squeeze(1)?.contiguous();
    Ok([part(2 * layer)?, part(2 * layer + 1)?])
}

/// Input embeddings `[batch, virtual + seq, hidden]`: the virtual tokens' `prompt`
/// `[virtual, hidden]` before each row of `embedded` `[batch, seq, hidden]`, in its dtype.
/// Differentiable in `prompt`: the gradient of each row flows back into the one table.
pub fn prepend(prompt: &Tensor, embedded: &Tensor) -> candle_core::Result<Tensor> {
    let (batch, _, hidden) = embedded.dims3()?;
    let virtual_tokens = prompt.dim(0)?;
    let prompt = prompt
        .to_dtype(embedded.dtype())?
        .unsqueeze(0)?
        .broadcast_as((batch, virtual_tokens, hidden))?
        .contiguous()?;
    Tensor::cat(&[&prompt, embedded], 1)
}

/// PEFT's `TEXT` init of prompt tuning: the init text's token ids (tokenized with the
/// tokenizer's special tokens, as PEFT calls it) cut to `virtual_tokens`, or repeated and cut;
/// the table starts as their embeddings. `None` for an empty text, which has nothing to repeat.
pub fn text_init_ids(ids: &[u32], virtual_tokens: usize) -> Option<Vec<u32>> {
    if ids.is_empty() {
        return None;
    }
    Some(ids.iter().copied().cycle().take(virtual_tokens).collect())
}

/// Whether `peft_type` is a prompt-learning method Graft reads.
pub fn is_prompt_learning(peft_type: &str) -> bool {
    PromptMethod::from_peft_type(peft_type).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(peft_type: &str) -> PromptConfig {
        PromptConfig {
            peft_type: peft_type.to_owned(),
            task_type: Some("CAUSAL_LM".to_owned()),
            num_virtual_tokens: 3,
            token_dim: 8,
            num_transformer_submodules: 1,
            num_attention_heads: 2,
            num_layers: 2,
            modules_to_save: None,
            base_model_name_or_path: None,
            inference_mode: true,
            prompt_tuning_init: Some("RANDOM".to_owned()),
            prompt_tuning_init_text: None,
            tokenizer_name_or_path: None,
            encoder_reparameterization_type: None,
            encoder_hidden_size: None,
            encoder_num_layers: None,
            encoder_dropout: None,
            prefix_projection: None,
        }
    }

    #[test]
    fn files_round_trip_and_a_wrong_shape_is_named() -> Result<(), PeftError> {
        let embeddings = Tensor::arange(0f32, 24.0, &Device::Cpu)?.reshape((3, 8))?;
        let adapter = PromptAdapter {
            config: config("PROMPT_TUNING"),
            embeddings,
        };
        let (json, weights) = adapter.to_bytes()?;
        assert_eq!(crate::adapters::peft_type(&json)?, "PROMPT_TUNING");
        let back = PromptAdapter::from_bytes(&json, &weights, &Device::Cpu)?;
        assert_eq!(back.config, adapter.config);
        let diff = (back.embeddings - &adapter.embeddings)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff == 0.0);

        let wrong = PromptAdapter {
            config: PromptConfig {
                num_virtual_tokens: 4,
                ..config("PROMPT_TUNING")
            },
            embeddings: adapter.embeddings.clone(),
        };
        let (json, weights) = wrong.to_bytes()?;
        let error = PromptAdapter::from_bytes(&json, &weights, &Device::Cpu).expect_err("shape");
        assert!(error.to_string().contains("prompt_embeddings"), "{error}");
        Ok(())
    }

    #[test]
    fn text_init_cuts_or_repeats_the_texts_ids() {
        assert_eq!(text_init_ids(&[5, 6, 7], 2), Some(vec![5, 6]));
        assert_eq!(
            text_init_ids(&[5, 6, 7], 7),
            Some(vec![5, 6, 7, 5, 6, 7, 5])
        );
        assert_eq!(text_init_ids(&[], 4), None);
    }

    #[test]
    fn what_graft_cannot_honour_is_refused_by_name() {
        assert!(config("P_TUNING").check().is_ok());
        let cases = [
            (config("MULTITASK_PROMPT_TUNING"), "MULTITASK_PROMPT_TUNING"),
            (
                PromptConfig {
                    num_transformer_submodules: 2,
                    ..config("PROMPT_TUNING")
                },
                "num_transformer_submodules",
            ),
            (
                PromptConfig {
                    task_type: Some("SEQ_2_SEQ_LM".to_owned()),
                    ..config("PROMPT_TUNING")
                },
                "task_type",
            ),
        ];
        for (config, name) in cases {
            let error = config.check().expect_err(name);
            assert!(error.to_string().contains(name), "{error}");
        }
        let adapter = PromptAdapter {
            config: config("PROMPT_TUNING"),
            embeddings: Tensor::zeros((3, 8), DType::F32, &Device::Cpu).expect("zeros"),
        };
        assert!(adapter.check_fits(8, 16).is_ok());
        assert!(adapter.check_fits(16, 16).is_err());
        assert!(adapter.check_fits(8, 3).is_err());
    }
}
