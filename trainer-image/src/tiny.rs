//! Tiny random models in the Hugging Face layout, for tests that need a whole model directory
//! (weights, config, a real trained tokenizer with a chat template) without a download.
//! transformers loads what this writes as it loads any checkpoint.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use graft_engine::{
    adapters::{Adapter, AdapterConfig, Lora, Site},
    models::Config,
    rng::Rng,
};
use serde::Serialize;
use tokenizers::{
    AddedToken, TokenizerBuilder,
    models::bpe::{BPE, BpeTrainer},
    normalizers::NormalizerWrapper,
    pre_tokenizers::byte_level::ByteLevel,
    processors::template::TemplateProcessing,
};

pub const BOS_TOKEN: &str = "<|begin_of_text|>";
pub const EOS_TOKEN: &str = "<|end_of_text|>";
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";

/// ChatML. The `{% generation %}` tags mark the assistant's tokens for transformers'
/// `return_assistant_tokens_mask` (and TRL's assistant-only loss), so the made model's masks
/// can be checked against transformers'.
pub const CHAT_TEMPLATE: &str = "{{ bos_token }}
{%- for message in messages %}
{% if message['role'] not in ['system', 'user', 'assistant'] %}
{{ raise_exception('Unknown role: ' + message['role']) }}
{% endif %}
{{ '<|im_start|>' + message['role'] + '\\n' }}
{%- if message['role'] == 'assistant' %}
{% generation %}
{{ message['content'].strip() + '<|im_end|>' }}
{%- endgeneration %}
{% else %}
{{ message['content'].strip() + '<|im_end|>' }}
{%- endif %}
{{ '\\n' }}
{%- endfor %}
{% if add_generation_prompt %}
{{ '<|im_start|>assistant\\n' }}
{%- endif %}
";

#[derive(Debug, thiserror::Error)]
pub enum TinyError {
    #[error("tiny model spec: {0}")]
    Spec(String),
    #[error("training the tokenizer: {0}")]
    Tokenizer(tokenizers::Error),
    #[error("{path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("serializing the weights: {0}")]
    Weights(#[from] safetensors::SafeTensorError),
    #[error("serializing JSON: {0}")]
    Json(#[from] serde_json::Error),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    /// Llama with biases on the q/k/v projections.
    Qwen2,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TinySpec {
    pub architecture: Architecture,
    /// The most tokens the trained tokenizer may have (special tokens and the 256 byte
    /// symbols included); a small corpus may support fewer, and the model gets what it has.
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    /// Standard deviation of the random weights (norm weights are ones).
    pub init_std: f32,
    pub seed: u64,
}

impl Default for TinySpec {
    /// About 140k parameters: a forward pass takes milliseconds on a CPU.
    fn default() -> Self {
        Self {
            architecture: Architecture::Llama,
            vocab_size: 512,
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            max_position_embeddings: 512,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            init_std: 0.02,
            seed: 0,
        }
    }
}

/// What [`write_tiny_model`] made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TinyModel {
    pub vocab_size: usize,
    pub num_parameters: usize,
}

/// Writes a model directory into `dir` (which must exist; the caller picks a fresh one):
/// `config.json`, `generation_config.json`, `model.safetensors` (f32), and a byte-level BPE
/// tokenizer trained on `corpus` (`tokenizer.json`, `tokenizer_config.json` with a ChatML
/// template). The same spec and corpus write the same bytes.
pub fn write_tiny_model(
    dir: &Path,
    spec: &TinySpec,
    corpus: &[String],
) -> Result<TinyModel, TinyError> {
    check(spec)?;
    let vocab_size = write_tokenizer(dir, corpus, spec.vocab_size, spec.max_position_embeddings)?;
    let tensors = weights(spec, vocab_size);
    let num_parameters = tensors.iter().map(|(_, _, values)| values.len()).sum();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(name, shape, values)| {
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name, shape, bytes)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|view| (name.as_str(), view))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    let safetensors = safetensors::tensor::serialize(views, Some(metadata))?;
    write(dir, "model.safetensors", &safetensors)?;

    let bos = 0;
    let eos = 1;
    let im_end = 3;
    write_json(
        dir,
        "config.json",
        &model_config(spec, vocab_size, bos, eos),
    )?;
    write_json(
        dir,
        "generation_config.json",
        &GenerationConfig {
            bos_token_id: bos,
            eos_token_id: [eos, im_end],
        },
    )?;
    Ok(TinyModel {
        vocab_size,
        num_parameters,
    })
}

/// Trains a byte-level BPE tokenizer (GPT-2 / Llama 3 style: every byte is a symbol, so any
/// text encodes) of at most `vocab_size` tokens on `corpus`, and writes `tokenizer.json` and
/// `tokenizer_config.json` into `dir`. The special tokens come first: `<|begin_of_text|>` 0
/// (added in front of every encoding), `<|end_of_text|>` 1 (eos), `<|im_start|>` 2,
/// `<|im_end|>` 3. Returns the number of tokens.
pub fn write_tokenizer(
    dir: &Path,
    corpus: &[String],
    vocab_size: usize,
    model_max_length: usize,
) -> Result<usize, TinyError> {
    let specials = [BOS_TOKEN, EOS_TOKEN, IM_START, IM_END];
    let alphabet = ByteLevel::alphabet();
    if vocab_size < alphabet.len() + specials.len() {
        return Err(TinyError::Spec(format!(
            "vocab_size {vocab_size} is below the {} byte symbols and special tokens",
            alphabet.len() + specials.len()
        )));
    }
    let mut trainer = BpeTrainer::builder()
        .vocab_size(vocab_size)
        .show_progress(false)
        .special_tokens(
            specials
                .iter()
                .map(|t| AddedToken::from(*t, true))
                .collect(),
        )
        .initial_alphabet(alphabet.into_iter().collect())
        .build();
    let post_processor = TemplateProcessing::builder()
        .try_single(format!("{BOS_TOKEN} $A"))
        .and_then(|b| b.try_pair(format!("{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1")))
        .map_err(|e| TinyError::Spec(format!("post-processor template: {e}")))?
        .special_tokens(vec![(BOS_TOKEN, 0)])
        .build()
        .map_err(|e| TinyError::Tokenizer(e.into()))?;
    let mut tokenizer =
        TokenizerBuilder::<BPE, NormalizerWrapper, ByteLevel, TemplateProcessing, ByteLevel>::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
            .with_post_processor(Some(post_processor))
            .with_decoder(Some(ByteLevel::default()))
            .build()
            .map_err(TinyError::Tokenizer)?;
    tokenizer
        .train(&mut trainer, corpus.iter())
        .map_err(TinyError::Tokenizer)?;
    let json = tokenizer.to_string(true).map_err(TinyError::Tokenizer)?;
    write(dir, "tokenizer.json", json.as_bytes())?;
    write_json(
        dir,
        "tokenizer_config.json",
        &TokenizerConfig {
            bos_token: BOS_TOKEN,
            eos_token: EOS_TOKEN,
            chat_template: CHAT_TEMPLATE,
            clean_up_tokenization_spaces: false,
            model_max_length,
            tokenizer_class: "PreTrainedTokenizerFast",
        },
    )?;
    Ok(tokenizer.get_vocab_size(true))
}

fn check(spec: &TinySpec) -> Result<(), TinyError> {
    let invalid = |reason: String| Err(TinyError::Spec(reason));
    if spec.num_heads == 0 || !spec.hidden_size.is_multiple_of(spec.num_heads) {
        return invalid(format!(
            "hidden_size {} is not a multiple of num_heads {}",
            spec.hidden_size, spec.num_heads
        ));
    }
    if spec.num_kv_heads == 0 || !spec.num_heads.is_multiple_of(spec.num_kv_heads) {
        return invalid(format!(
            "num_heads {} is not a multiple of num_kv_heads {}",
            spec.num_heads, spec.num_kv_heads
        ));
    }
    if !(spec.hidden_size / spec.num_heads).is_multiple_of(2) {
        return invalid("the head dimension must be even for rotary embeddings".to_owned());
    }
    Ok(())
}

type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// Every weight `LlamaForCausalLM` (or `Qwen2ForCausalLM`) loads, drawn in a fixed order.
fn weights(spec: &TinySpec, vocab_size: usize) -> Tensors {
    let mut rng = Rng::seed(spec.seed);
    let mut tensors = Tensors::new();
    let (h, i) = (spec.hidden_size, spec.intermediate_size);
    let head_dim = h / spec.num_heads;
    let kv = spec.num_kv_heads * head_dim;
    let mut random = |name: String, shape: Vec<usize>| {
        let n = shape.iter().product();
        let values = (0..n).map(|_| spec.init_std * normal(&mut rng)).collect();
        tensors.push((name, shape, values));
    };
    random("model.embed_tokens.weight".to_owned(), vec![vocab_size, h]);
    for layer in 0..spec.num_layers {
        let p = format!("model.layers.{layer}");
        for (site, rows) in [("q_proj", h), ("k_proj", kv), ("v_proj", kv)] {
            random(format!("{p}.self_attn.{site}.weight"), vec![rows, h]);
            if spec.architecture == Architecture::Qwen2 {
                random(format!("{p}.self_attn.{site}.bias"), vec![rows]);
            }
        }
        random(format!("{p}.self_attn.o_proj.weight"), vec![h, h]);
        random(format!("{p}.mlp.gate_proj.weight"), vec![i, h]);
        random(format!("{p}.mlp.up_proj.weight"), vec![i, h]);
        random(format!("{p}.mlp.down_proj.weight"), vec![h, i]);
    }
    random("lm_head.weight".to_owned(), vec![vocab_size, h]);
    for layer in 0..spec.num_layers {
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            let name = format!("model.layers.{layer}.{norm}.weight");
            tensors.push((name, vec![h], vec![1.0; h]));
        }
    }
    tensors.push(("model.norm.weight".to_owned(), vec![h], vec![1.0; h]));
    tensors
}

/// A standard normal draw (Box–Muller, one of the pair), from 53 uniform bits.
fn normal(rng: &mut Rng) -> f32 {
    #[allow(clippy::cast_precision_loss)]
    let uniform = |rng: &mut Rng| (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    // 1 - u is in (0, 1], so the logarithm is finite.
    let radius = (-2.0 * (1.0 - uniform(rng)).ln()).sqrt();
    let angle = std::f64::consts::TAU * uniform(rng);
    #[allow(clippy::cast_possible_truncation)]
    let value = (radius * angle.cos()) as f32;
    value
}

/// `config.json`; a struct rather than a `json!` map so the key order is fixed whatever
/// serde_json features the build unifies.
#[derive(Serialize)]
struct ModelConfig {
    architectures: [&'static str; 1],
    model_type: &'static str,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    head_dim: usize,
    hidden_act: &'static str,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    rope_theta: f64,
    tie_word_embeddings: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    attention_bias: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mlp_bias: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    use_sliding_window: Option<bool>,
    initializer_range: f32,
    bos_token_id: u32,
    eos_token_id: u32,
    torch_dtype: &'static str,
}

fn model_config(spec: &TinySpec, vocab_size: usize, bos: u32, eos: u32) -> ModelConfig {
    let llama = spec.architecture == Architecture::Llama;
    ModelConfig {
        architectures: [if llama {
            "LlamaForCausalLM"
        } else {
            "Qwen2ForCausalLM"
        }],
        model_type: if llama { "llama" } else { "qwen2" },
        vocab_size,
        hidden_size: spec.hidden_size,
        intermediate_size: spec.intermediate_size,
        num_hidden_layers: spec.num_layers,
        num_attention_heads: spec.num_heads,
        num_key_value_heads: spec.num_kv_heads,
        head_dim: spec.hidden_size / spec.num_heads,
        hidden_act: "silu",
        max_position_embeddings: spec.max_position_embeddings,
        rms_norm_eps: spec.rms_norm_eps,
        rope_theta: spec.rope_theta,
        tie_word_embeddings: false,
        attention_bias: llama.then_some(false),
        mlp_bias: llama.then_some(false),
        use_sliding_window: (!llama).then_some(false),
        initializer_range: spec.init_std,
        bos_token_id: bos,
        eos_token_id: eos,
        torch_dtype: "float32",
    }
}

#[derive(Serialize)]
struct GenerationConfig {
    bos_token_id: u32,
    /// Generation stops at the end of a text or of an assistant turn.
    eos_token_id: [u32; 2],
}

#[derive(Serialize)]
struct TokenizerConfig {
    bos_token: &'static str,
    eos_token: &'static str,
    chat_template: &'static str,
    clean_up_tokenization_spaces: bool,
    model_max_length: usize,
    tokenizer_class: &'static str,
}

fn write_json(dir: &Path, name: &str, value: &impl Serialize) -> Result<(), TinyError> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    write(dir, name, text.as_bytes())
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), TinyError> {
    let path = dir.join(name);
    std::fs::write(&path, bytes).map_err(|source| TinyError::Write { path, source })
}

/// A random adapter of `rank` on `sites` of every layer of the model `config` describes, with
/// every B non-zero (unlike a fresh PEFT init) so it changes what the model says: for tests
/// and benchmarks of anything that loads adapters.
pub fn random_adapter(
    config: &Config,
    rank: usize,
    seed: u64,
    sites: &[Site],
) -> candle_core::Result<Adapter> {
    let device = candle_core::Device::Cpu;
    let mut rng = Rng::seed(seed);
    let mut weights = std::collections::BTreeMap::new();
    for layer in 0..config.num_layers {
        for &site in sites {
            let (out, input) = config.site_shape(site).ok_or_else(|| {
                candle_core::Error::Msg(format!("the model has no {}", site.name()))
            })?;
            let mut lora = Lora::init(rank, (out, input), 2.0, &mut rng, &device)?;
            let b: Vec<f32> = (0..out * rank).map(|_| rng.uniform(-0.8, 0.8)).collect();
            lora.b = candle_core::Tensor::from_vec(b, (out, rank), &device)?;
            weights.insert((layer, site), lora);
        }
    }
    let alpha = 2.0 * f64::from(u32::try_from(rank).unwrap_or(u32::MAX));
    Ok(Adapter {
        config: AdapterConfig::new(rank, alpha, 0.0, false, sites),
        weights,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_draws_have_unit_spread() {
        let mut rng = Rng::seed(3);
        let draws: Vec<f32> = (0..20_000).map(|_| normal(&mut rng)).collect();
        #[allow(clippy::cast_precision_loss)]
        let n = draws.len() as f32;
        let mean = draws.iter().sum::<f32>() / n;
        let variance = draws.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((variance - 1.0).abs() < 0.05, "variance {variance}");
    }

    #[test]
    fn a_spec_the_model_cannot_have_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = TinySpec {
            num_kv_heads: 3,
            ..TinySpec::default()
        };
        let error = write_tiny_model(dir.path(), &spec, &[]).expect_err("3 kv heads for 4");
        assert!(error.to_string().contains("num_kv_heads 3"), "{error}");
        let error = write_tokenizer(dir.path(), &[], 100, 64).expect_err("too few tokens");
        assert!(error.to_string().contains("vocab_size 100"), "{error}");
    }
}
