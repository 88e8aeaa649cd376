//! A GGUF file (llama.cpp's format) as a base model: the architecture from its `<arch>.*`
//! metadata, its weights dequantized to the compute dtype under Hugging Face's names, as
//! transformers' `from_pretrained(..., gguf_file=...)` reads them. The tokenizer is built from
//! the same metadata by [`crate::text::gguf_tokenizer`].

use std::{
    collections::HashMap,
    fs::File,
    io::BufReader,
    path::{Path, PathBuf},
    sync::Arc,
};

use candle_core::{
    DType, Device, Shape, Tensor,
    quantized::gguf_file::{Content, Value},
};
use candle_nn::{Init, VarBuilder, var_builder::SimpleBackend};

use super::config::{Config, ConfigError, HfConfig};
use crate::text::gguf_tokenizer::integer;

/// The `general.architecture` values Graft reads, and the `model_type` each becomes. Mistral
/// models are written as `llama` by llama.cpp's converter.
const ARCHITECTURES: [(&str, &str); 2] = [("llama", "llama"), ("qwen2", "qwen2")];

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{}: not a readable GGUF file: {source}", path.display())]
    Read {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error("{}: GGUF metadata {key}: {reason}", path.display())]
    Metadata {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error(
        "{}: GGUF architecture {architecture:?} is not supported: Graft reads llama (Llama, \
         Mistral, SmolLM) and qwen2 GGUF files",
        path.display()
    )]
    Architecture { path: PathBuf, architecture: String },
    #[error("{}: {what} is not supported in GGUF files", path.display())]
    Unsupported { path: PathBuf, what: String },
    #[error("{}: {source}", path.display())]
    Config { path: PathBuf, source: ConfigError },
}

/// A GGUF file's header: metadata and where each tensor lies. Tensors are read on demand.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    content: Content,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let read = |source| GgufError::Read {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(|e| read(e.into()))?;
        let content = Content::read(&mut BufReader::new(file)).map_err(read)?;
        Ok(Self {
            path: path.to_owned(),
            content,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.string("general.architecture")
    }

    /// The model's configuration, as transformers maps the GGUF keys onto `config.json`'s and
    /// checked as any `config.json` is.
    pub fn config(&self) -> Result<Config, GgufError> {
        let architecture = self.architecture()?;
        let model_type = ARCHITECTURES
            .iter()
            .find(|(arch, _)| *arch == architecture)
            .map(|(_, model_type)| *model_type)
            .ok_or_else(|| GgufError::Architecture {
                path: self.path.clone(),
                architecture: architecture.to_owned(),
            })?;
        let key = |name: &str| format!("{architecture}.{name}");
        let heads = self.usize(&key("attention.head_count"))?;
        let hidden = self.usize(&key("embedding_length"))?;
        let head_dim = self
            .optional_usize(&key("attention.key_length"))?
            .unwrap_or(hidden / heads.max(1));
        if let Some(rotary) = self.optional_usize(&key("rope.dimension_count"))?
            && rotary != head_dim
        {
            return Err(self.unsupported(format!(
                "a partial rotary embedding ({rotary} of {head_dim} dimensions)"
            )));
        }
        if let Some(Value::String(kind)) = self.metadata().get(&key("rope.scaling.type"))
            && kind != "none"
        {
            return Err(self.unsupported(format!("rope scaling {kind:?}")));
        }
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            return Err(self.unsupported(
                "rope_freqs.weight (Llama 3.1's scaled rotary frequencies)".to_owned(),
            ));
        }
        let embeddings = self.tensor_shape("token_embd.weight")?;
        let vocab_size = match self.optional_usize(&key("vocab_size"))? {
            Some(n) => n,
            None => embeddings.dims().first().copied().unwrap_or(0),
        };
        let json = serde_json::json!({
            "model_type": model_type,
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": self.usize(&key("feed_forward_length"))?,
            "num_hidden_layers": self.usize(&key("block_count"))?,
            "num_attention_heads": heads,
            "num_key_value_heads": self.optional_usize(&key("attention.head_count_kv"))?.unwrap_or(heads),
            "head_dim": head_dim,
            "rms_norm_eps": self.f64(&key("attention.layer_norm_rms_epsilon"))?,
            "rope_theta": self.optional_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            "max_position_embeddings": self.optional_usize(&key("context_length"))?,
            "tie_word_embeddings": !self.content.tensor_infos.contains_key("output.weight"),
        });
        let config = |source| GgufError::Config {
            path: self.path.clone(),
            source,
        };
        let hf: HfConfig =
            serde_json::from_value(json).map_err(|e| config(ConfigError::Parse(e)))?;
        Config::try_from(hf).map_err(config)
    }

    /// The weights under Hugging Face's names, each dequantized (and, for q/k, unpermuted)
    /// when the model reads it.
    pub fn weights(
        self: &Arc<Self>,
        config: &Config,
        dtype: DType,
        device: &Device,
    ) -> VarBuilder<'static> {
        let tensors = GgufTensors {
            file: self.clone(),
            // llama.cpp's converter permutes q/k rows for its rotary layout only for llama.
            unpermute: self.architecture().is_ok_and(|a| a == "llama"),
            heads: config.num_heads,
            kv_heads: config.num_kv_heads,
        };
        let backend: Box<dyn SimpleBackend> = Box::new(tensors);
        VarBuilder::from_backend(backend, dtype, device.clone())
    }

    fn tensor_shape(&self, name: &str) -> Result<&Shape, GgufError> {
        self.content
            .tensor_infos
            .get(name)
            .map(|info| &info.shape)
            .ok_or_else(|| GgufError::Metadata {
                path: self.path.clone(),
                key: name.to_owned(),
                reason: "no such tensor".to_owned(),
            })
    }

    fn unsupported(&self, what: String) -> GgufError {
        GgufError::Unsupported {
            path: self.path.clone(),
            what,
        }
    }

    fn metadata_error(&self, key: &str, reason: impl Into<String>) -> GgufError {
        GgufError::Metadata {
            path: self.path.clone(),
            key: key.to_owned(),
            reason: reason.into(),
        }
    }

    fn string(&self, key: &str) -> Result<&str, GgufError> {
        match self.metadata().get(key) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(self.metadata_error(key, "not a string")),
            None => Err(self.metadata_error(key, "missing")),
        }
    }

    fn optional_usize(&self, key: &str) -> Result<Option<usize>, GgufError> {
        self.metadata()
            .get(key)
            .map(|value| {
                integer(value)
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| self.metadata_error(key, "not a non-negative integer"))
            })
            .transpose()
    }

    fn usize(&self, key: &str) -> Result<usize, GgufError> {
        self.optional_usize(key)?
            .ok_or_else(|| self.metadata_error(key, "missing"))
    }

    fn optional_f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
        self.metadata()
            .get(key)
            .map(|value| match value {
                Value::F32(x) => Ok(f64::from(*x)),
                Value::F64(x) => Ok(*x),
                _ => Err(self.metadata_error(key, "not a float")),
            })
            .transpose()
    }

    fn f64(&self, key: &str) -> Result<f64, GgufError> {
        self.optional_f64(key)?
            .ok_or_else(|| self.metadata_error(key, "missing"))
    }
}

/// How a Hugging Face weight is stored in the GGUF file.
#[derive(Debug, PartialEq, Eq)]
enum Stored {
    AsIs(String),
    /// Rows permuted per head of `heads` heads.
    Permuted(String, Head),
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Head {
    Query,
    Key,
}

/// llama.cpp's name for a Hugging Face weight, for the Llama-family layout.
fn gguf_name(name: &str) -> Option<Stored> {
    let fixed = match name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(fixed) = fixed {
        return Some(Stored::AsIs(fixed.to_owned()));
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let (gguf, head) = match module {
        "input_layernorm" => ("attn_norm", None),
        "post_attention_layernorm" => ("ffn_norm", None),
        "self_attn.q_proj" => ("attn_q", Some(Head::Query)),
        "self_attn.k_proj" => ("attn_k", Some(Head::Key)),
        "self_attn.v_proj" => ("attn_v", None),
        "self_attn.o_proj" => ("attn_output", None),
        "mlp.gate_proj" => ("ffn_gate", None),
        "mlp.up_proj" => ("ffn_up", None),
        "mlp.down_proj" => ("ffn_down", None),
        _ => return None,
    };
    let stored = format!("blk.{layer}.{gguf}.{kind}");
    Some(match head {
        Some(head) => Stored::Permuted(stored, head),
        None => Stored::AsIs(stored),
    })
}

/// The tensors of a [`GgufFile`] as a `VarBuilder` backend.
struct GgufTensors {
    file: Arc<GgufFile>,
    unpermute: bool,
    heads: usize,
    kv_heads: usize,
}

impl GgufTensors {
    fn read(&self, name: &str) -> candle_core::Result<Tensor> {
        let stored = gguf_name(name).ok_or_else(|| candle_core::Error::CannotFindTensor {
            path: name.to_owned(),
        })?;
        let (gguf, head) = match &stored {
            Stored::AsIs(gguf) => (gguf, None),
            Stored::Permuted(gguf, head) => (gguf, Some(*head)),
        };
        let path = &self.file.path;
        let context = |e: candle_core::Error| {
            candle_core::Error::Msg(format!("{}: tensor {gguf} ({name}): {e}", path.display()))
        };
        if !self.file.content.tensor_infos.contains_key(gguf.as_str()) {
            return Err(candle_core::Error::CannotFindTensor {
                path: format!("{gguf} ({name})"),
            });
        }
        let mut reader = BufReader::new(File::open(path).map_err(|e| context(e.into()))?);
        let tensor = self
            .file
            .content
            .tensor(&mut reader, gguf, &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .map_err(context)?;
        match head {
            Some(head) if self.unpermute && tensor.rank() == 2 => {
                let heads = match head {
                    Head::Query => self.heads,
                    Head::Key => self.kv_heads,
                };
                unpermute_rows(&tensor, heads).map_err(context)
            }
            _ => Ok(tensor),
        }
    }
}

/// Undoes llama.cpp's converter, which writes each head's rows of q and k interleaved (the
/// two rotary halves' rows alternating, for its adjacent-pairs rotary layout): rows
/// `[h, j, half]` go back to `[h, half, j]`.
fn unpermute_rows(weight: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = weight.dims2()?;
    if heads == 0 || rows % (2 * heads) != 0 {
        candle_core::bail!("{rows} rows do not split into {heads} heads of two rotary halves");
    }
    weight
        .reshape((heads, rows / heads / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

impl SimpleBackend for GgufTensors {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, device)?;
        if tensor.shape() != &shape {
            candle_core::bail!(
                "{}: {name} is {:?} in the GGUF file, the model's metadata makes it {shape:?}",
                self.file.path.display(),
                tensor.shape()
            );
        }
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.read(name)?.to_dtype(dtype)?.to_device(device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|stored| {
            let (Stored::AsIs(gguf) | Stored::Permuted(gguf, _)) = stored;
            self.file.content.tensor_infos.contains_key(&gguf)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugging_face_names_map_to_llama_cpp_names() {
        let cases = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.norm.weight", "output_norm.weight"),
            ("lm_head.weight", "output.weight"),
            (
                "model.layers.3.input_layernorm.weight",
                "blk.3.attn_norm.weight",
            ),
            (
                "model.layers.3.post_attention_layernorm.weight",
                "blk.3.ffn_norm.weight",
            ),
            (
                "model.layers.12.self_attn.v_proj.bias",
                "blk.12.attn_v.bias",
            ),
            (
                "model.layers.0.self_attn.o_proj.weight",
                "blk.0.attn_output.weight",
            ),
            (
                "model.layers.0.mlp.gate_proj.weight",
                "blk.0.ffn_gate.weight",
            ),
            ("model.layers.0.mlp.up_proj.weight", "blk.0.ffn_up.weight"),
            (
                "model.layers.0.mlp.down_proj.weight",
                "blk.0.ffn_down.weight",
            ),
        ];
        for (hf, gguf) in cases {
            assert_eq!(gguf_name(hf), Some(Stored::AsIs(gguf.to_owned())), "{hf}");
        }
        assert_eq!(
            gguf_name("model.layers.1.self_attn.k_proj.weight"),
            Some(Stored::Permuted(
                "blk.1.attn_k.weight".to_owned(),
                Head::Key
            ))
        );
        assert_eq!(gguf_name("model.layers.x.mlp.up_proj.weight"), None);
        assert_eq!(gguf_name("model.layers.0.mlp.fc1.weight"), None);
    }

    /// llama.cpp's `LlamaModel.permute`: `w.reshape(heads, 2, rows // heads // 2, cols)
    /// .swapaxes(1, 2).reshape(w.shape)`, written out with indices.
    fn permute_like_llama_cpp(rows: &[Vec<f32>], heads: usize) -> Vec<Vec<f32>> {
        let half = rows.len() / heads / 2;
        let mut out = vec![Vec::new(); rows.len()];
        for h in 0..heads {
            for which in 0..2 {
                for j in 0..half {
                    out[h * 2 * half + j * 2 + which] =
                        rows[h * 2 * half + which * half + j].clone();
                }
            }
        }
        out
    }

    #[test]
    fn unpermuting_undoes_llama_cpp_s_permutation() -> candle_core::Result<()> {
        let (heads, head_dim, cols) = (3, 8, 5);
        #[allow(clippy::cast_precision_loss)]
        let rows: Vec<Vec<f32>> = (0..heads * head_dim)
            .map(|r| (0..cols).map(|c| (r * 10 + c) as f32).collect())
            .collect();
        let permuted = permute_like_llama_cpp(&rows, heads);
        let tensor = Tensor::new(permuted, &Device::Cpu)?;
        let restored = unpermute_rows(&tensor, heads)?.to_vec2::<f32>()?;
        assert_eq!(restored, rows);
        assert!(
            unpermute_rows(&tensor, 5).is_err(),
            "24 rows are not 5 heads"
        );
        Ok(())
    }
}
