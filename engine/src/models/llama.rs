//! The Llama-family causal LM (Llama 2/3, Mistral, Qwen2) on candle, differentiable in the
//! adapters only: every base weight is a [`FrozenLinear`] (dense or NF4) or a detached tensor.
//! Weight names mirror Hugging Face (`model.layers.N.self_attn.q_proj.weight`).

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::{Config, Rope};
use crate::{
    linear::{FrozenLinear, FrozenWeight},
    lora::{Lora, LoraLinear},
    ops::{apply_rotary, rms_norm, softmax_last_dim},
};

/// How the frozen projections are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// NF4 with double quantization (QLoRA).
    Nf4,
    /// As loaded (plain LoRA).
    Dense,
}

/// The projections an adapter can target, by their Hugging Face names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Site {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl Site {
    pub const ALL: [Self; 7] = [
        Self::QProj,
        Self::KProj,
        Self::VProj,
        Self::OProj,
        Self::GateProj,
        Self::UpProj,
        Self::DownProj,
    ];

    /// `q_proj` … `down_proj`.
    pub fn name(self) -> &'static str {
        match self {
            Self::QProj => "q_proj",
            Self::KProj => "k_proj",
            Self::VProj => "v_proj",
            Self::OProj => "o_proj",
            Self::GateProj => "gate_proj",
            Self::UpProj => "up_proj",
            Self::DownProj => "down_proj",
        }
    }

    /// The module path inside a decoder layer: `self_attn.q_proj`, `mlp.gate_proj`.
    pub fn path(self) -> String {
        let parent = match self {
            Self::QProj | Self::KProj | Self::VProj | Self::OProj => "self_attn",
            Self::GateProj | Self::UpProj | Self::DownProj => "mlp",
        };
        format!("{parent}.{}", self.name())
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }
}

#[derive(Clone, Debug)]
struct Block {
    input_norm: Tensor,
    post_attention_norm: Tensor,
    /// Indexed by `Site as usize`.
    projections: Vec<LoraLinear>,
}

/// A loaded model.
#[derive(Clone, Debug)]
pub struct Llama {
    config: Config,
    embed_tokens: Tensor,
    layers: Vec<Block>,
    norm: Tensor,
    lm_head: FrozenLinear,
    inv_freq: Vec<f32>,
}

impl Llama {
    /// Loads the weights `vb` holds (rooted at the checkpoint's top level).
    pub fn load(vb: &VarBuilder<'_>, config: &Config, precision: Precision) -> Result<Self> {
        let model = vb.pp("model");
        let (hidden, vocab) = (config.hidden_size, config.vocab_size);
        let embed_tokens = model.pp("embed_tokens").get((vocab, hidden), "weight")?;
        let layers = (0..config.num_layers)
            .map(|i| load_block(&model.pp("layers").pp(i), config, precision))
            .collect::<Result<Vec<_>>>()?;
        let norm = model.pp("norm").get(hidden, "weight")?;
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            vb.pp("lm_head").get((vocab, hidden), "weight")?
        };
        Ok(Self {
            config: config.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head: FrozenLinear::new(FrozenWeight::Dense(lm_head), None),
            inv_freq: inverse_frequencies(config),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// `(out, in)` of a projection.
    pub fn site_shape(&self, site: Site) -> (usize, usize) {
        let c = &self.config;
        let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        match site {
            Site::QProj => (q, c.hidden_size),
            Site::KProj | Site::VProj => (kv, c.hidden_size),
            Site::OProj => (c.hidden_size, q),
            Site::GateProj | Site::UpProj => (c.intermediate_size, c.hidden_size),
            Site::DownProj => (c.hidden_size, c.intermediate_size),
        }
    }

    /// Puts `lora` on `site` of `layer` (or removes it with `None`).
    pub fn set_lora(&mut self, layer: usize, site: Site, lora: Option<Lora>) {
        let projection = &mut self.layers[layer].projections[site as usize];
        *projection = LoraLinear::new(projection.base().clone(), lora);
    }

    pub fn lora(&self, layer: usize, site: Site) -> Option<&Lora> {
        self.layers[layer].projections[site as usize].lora()
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]` (u32).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (batch, seq) = input_ids.dims2()?;
        let mut h = self
            .embed_tokens
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((batch, seq, self.config.hidden_size))?;
        let (cos, sin) = self.rotary_tables(seq, h.device())?;
        let mask = causal_mask(seq, self.config.sliding_window, h.device())?;
        for block in &self.layers {
            h = self.block_forward(block, &h, &cos, &sin, &mask)?;
        }
        let h = rms_norm(&h, &self.norm, self.config.rms_norm_eps)?;
        self.lm_head.forward(&h)
    }

    fn block_forward(
        &self,
        block: &Block,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let eps = self.config.rms_norm_eps;
        let attended =
            self.attention(block, &rms_norm(x, &block.input_norm, eps)?, cos, sin, mask)?;
        let x = (x + attended)?;
        let normed = rms_norm(&x, &block.post_attention_norm, eps)?;
        let p = |site: Site| &block.projections[site as usize];
        let gate = p(Site::GateProj).forward(&normed)?;
        let up = p(Site::UpProj).forward(&normed)?;
        let mlp = p(Site::DownProj).forward(&(silu(&gate)? * up)?)?;
        x + mlp
    }

    fn attention(
        &self,
        block: &Block,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (batch, seq, _) = x.dims3()?;
        let proj = |site: Site| &block.projections[site as usize];
        let heads = |t: Tensor, n: usize| {
            t.reshape((batch, seq, n, cfg.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(proj(Site::QProj).forward(x)?, cfg.num_heads)?;
        let k = heads(proj(Site::KProj).forward(x)?, cfg.num_kv_heads)?;
        let v = heads(proj(Site::VProj).forward(x)?, cfg.num_kv_heads)?;
        let q = apply_rotary(&q, cos, sin)?;
        let k = repeat_kv(
            &apply_rotary(&k, cos, sin)?,
            cfg.num_heads / cfg.num_kv_heads,
        )?;
        let v = repeat_kv(&v, cfg.num_heads / cfg.num_kv_heads)?;
        #[allow(clippy::cast_precision_loss)]
        let scale = 1.0 / (cfg.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?
            .to_dtype(DType::F32)?
            .broadcast_add(mask)?;
        let probs = softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((
            batch,
            seq,
            cfg.num_heads * cfg.head_dim,
        ))?;
        proj(Site::OProj).forward(&out)
    }

    /// `cos`, `sin` `[seq, head_dim]` in f32, as transformers builds them.
    fn rotary_tables(&self, seq: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let inv_freq = Tensor::new(self.inv_freq.as_slice(), device)?;
        #[allow(clippy::cast_precision_loss)]
        let positions: Vec<f32> = (0..seq).map(|p| p as f32).collect();
        let positions = Tensor::new(positions.as_slice(), device)?;
        let freqs = positions
            .unsqueeze(1)?
            .broadcast_mul(&inv_freq.unsqueeze(0)?)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?;
        Ok((emb.cos()?, emb.sin()?))
    }
}

fn load_block(vb: &VarBuilder<'_>, config: &Config, precision: Precision) -> Result<Block> {
    let hidden = config.hidden_size;
    let (q, kv) = (
        config.num_heads * config.head_dim,
        config.num_kv_heads * config.head_dim,
    );
    let projection = |site: Site, (out, input): (usize, usize), bias: bool| -> Result<LoraLinear> {
        let vb = vb.pp(site.path());
        let weight = vb.get((out, input), "weight")?;
        let bias = if bias {
            Some(vb.get(out, "bias")?)
        } else {
            None
        };
        let base = match precision {
            Precision::Nf4 => FrozenLinear::quantize_nf4(&weight, bias)?,
            Precision::Dense => FrozenLinear::new(FrozenWeight::Dense(weight), bias),
        };
        Ok(LoraLinear::new(base, None))
    };
    let inter = config.intermediate_size;
    let bias = config.qkv_bias;
    Ok(Block {
        input_norm: vb.pp("input_layernorm").get(hidden, "weight")?,
        post_attention_norm: vb.pp("post_attention_layernorm").get(hidden, "weight")?,
        projections: vec![
            projection(Site::QProj, (q, hidden), bias)?,
            projection(Site::KProj, (kv, hidden), bias)?,
            projection(Site::VProj, (kv, hidden), bias)?,
            projection(Site::OProj, (hidden, q), false)?,
            projection(Site::GateProj, (inter, hidden), false)?,
            projection(Site::UpProj, (inter, hidden), false)?,
            projection(Site::DownProj, (hidden, inter), false)?,
        ],
    })
}

/// `x · sigmoid(x)` from differentiable parts.
fn silu(x: &Tensor) -> Result<Tensor> {
    x * candle_nn::ops::sigmoid(x)?
}

/// `[b, kv, s, d]` → `[b, kv·n, s, d]`, each kv head repeated `n` times in place.
fn repeat_kv(heads: &Tensor, times: usize) -> Result<Tensor> {
    if times == 1 {
        return Ok(heads.clone());
    }
    let (batch, kv, seq, dim) = heads.dims4()?;
    heads
        .unsqueeze(2)?
        .broadcast_as((batch, kv, times, seq, dim))?
        .contiguous()?
        .reshape((batch, kv * times, seq, dim))
}

/// `[seq, seq]`: 0 where position `i` may attend to `j`, −∞ elsewhere.
fn causal_mask(seq: usize, window: Option<usize>, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| {
            (0..seq).map(move |j| {
                let visible = j <= i && window.is_none_or(|w| i - j < w);
                if visible { 0.0 } else { f32::NEG_INFINITY }
            })
        })
        .collect();
    Tensor::from_vec(mask, (seq, seq), device)
}

/// transformers' `inv_freq` (with llama3 scaling), in f32.
fn inverse_frequencies(config: &Config) -> Vec<f32> {
    let dim = config.head_dim;
    let theta = match config.rope {
        Rope::Default { theta } | Rope::Llama3 { theta, .. } => theta,
    };
    #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
    let base: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1.0 / (theta as f32).powf(i as f32 / dim as f32))
        .collect();
    let Rope::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
        ..
    } = config.rope
    else {
        return base;
    };
    #[allow(clippy::cast_precision_loss)]
    let old_context = original_max_position_embeddings as f64;
    let low_freq_wavelen = old_context / low_freq_factor;
    let high_freq_wavelen = old_context / high_freq_factor;
    #[allow(clippy::cast_possible_truncation)]
    base.into_iter()
        .map(|f| {
            let f = f64::from(f);
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let scaled = if wavelen > low_freq_wavelen {
                f / factor
            } else {
                f
            };
            if wavelen < high_freq_wavelen || wavelen > low_freq_wavelen {
                scaled as f32
            } else {
                let smooth = (old_context / wavelen - low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                ((1.0 - smooth) * scaled / factor + smooth * scaled) as f32
            }
        })
        .collect()
}
