//! The Llama-family causal LM (Llama 2/3, Mistral, Qwen2) on candle, differentiable in the
//! adapters only: every base weight is a [`FrozenLinear`] (dense or NF4) or a detached tensor.
//! Weight names mirror Hugging Face (`model.layers.N.self_attn.q_proj.weight`).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::{Config, Rope};
use crate::{
    gemm::is_cpu_f32,
    linear::{FrozenLinear, FrozenWeight},
    lora::{Lora, LoraLinear, dropout_mask},
    ops::{Heads, apply_rotary, causal_attention, causal_softmax, rms_norm, swiglu},
    rng::Rng,
};

mod serve;

pub use serve::{KvCache, Segment};

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

/// Dropout on the adapters' inputs while training, as PEFT applies it (each adapter its own
/// mask). The masks are a function of the seed, the layer and the site, so a layer recomputed
/// in the backward pass, or replayed after a resume, sees the same masks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f64,
    pub seed: u64,
}

impl Dropout {
    fn mask(self, layer: usize, site: Site, x: &Tensor) -> Result<Tensor> {
        let stream = Rng::seed(self.seed ^ ((layer as u64) << 8 | site as u64)).next_u64();
        dropout_mask(x.dims(), self.p, stream, x.device(), x.dtype())
    }
}

/// Per-sequence-length tables shared by every layer: rotary `cos` and `sin`.
#[derive(Clone, Debug)]
pub struct Positions {
    cos: Tensor,
    sin: Tensor,
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

    /// Where the weights are, and so where inputs must be.
    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// The dtype of activations (the embeddings').
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// `(out, in)` of a projection.
    pub fn site_shape(&self, site: Site) -> (usize, usize) {
        self.config.site_shape(site)
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
        let mut h = self.embed(input_ids)?;
        let positions = self.positions(input_ids.dim(1)?, h.device())?;
        for layer in 0..self.layers.len() {
            h = self.layer(layer, &h, &positions, None)?;
        }
        self.head(&h)
    }

    /// Hidden states `[batch, seq, hidden]` for token ids `[batch, seq]`.
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (batch, seq) = input_ids.dims2()?;
        self.embed_tokens
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((batch, seq, self.config.hidden_size))
    }

    /// The rotary tables for sequences of `seq` tokens, shared by every layer.
    pub fn positions(&self, seq: usize, device: &Device) -> Result<Positions> {
        let (cos, sin) = self.rotary_tables(seq, device)?;
        Ok(Positions { cos, sin })
    }

    /// Decoder layer `index`. The trainer calls it one layer at a time to recompute layers
    /// in the backward pass instead of keeping every layer's activations.
    pub fn layer(
        &self,
        index: usize,
        h: &Tensor,
        positions: &Positions,
        dropout: Option<Dropout>,
    ) -> Result<Tensor> {
        let block = &self.layers[index];
        let eps = self.config.rms_norm_eps;
        let project = |site: Site, x: &Tensor| {
            let projection = &block.projections[site as usize];
            match dropout {
                Some(d) if projection.lora().is_some() && d.p > 0.0 => {
                    let mask = d.mask(index, site, x)?;
                    projection.forward_with_dropout(x, Some(&mask))
                }
                _ => projection.forward(x),
            }
        };
        let attended =
            self.attention(&rms_norm(h, &block.input_norm, eps)?, positions, &project)?;
        let x = (h + attended)?;
        let normed = rms_norm(&x, &block.post_attention_norm, eps)?;
        let gate = project(Site::GateProj, &normed)?;
        let up = project(Site::UpProj, &normed)?;
        let mlp = project(Site::DownProj, &swiglu(&gate, &up)?)?;
        x + mlp
    }

    /// The final norm and the LM head: logits for hidden states.
    pub fn head(&self, h: &Tensor) -> Result<Tensor> {
        let h = rms_norm(h, &self.norm, self.config.rms_norm_eps)?;
        self.lm_head.forward(&h)
    }

    fn attention(
        &self,
        x: &Tensor,
        positions: &Positions,
        project: &dyn Fn(Site, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (batch, seq, _) = x.dims3()?;
        #[allow(clippy::cast_precision_loss)]
        let scale = 1.0 / (cfg.head_dim as f64).sqrt();
        let (q, k, v) = (
            project(Site::QProj, x)?,
            project(Site::KProj, x)?,
            project(Site::VProj, x)?,
        );
        let (cos, sin) = (&positions.cos, &positions.sin);
        if is_cpu_f32(&q) {
            let geometry = Heads {
                heads: cfg.num_heads,
                kv_heads: cfg.num_kv_heads,
                head_dim: cfg.head_dim,
                scale,
                window: cfg.sliding_window,
            };
            return project(
                Site::OProj,
                &causal_attention(&q, &k, &v, cos, sin, geometry)?,
            );
        }
        let heads = |t: Tensor, n: usize| {
            t.reshape((batch, seq, n, cfg.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (
            heads(q, cfg.num_heads)?,
            heads(k, cfg.num_kv_heads)?,
            heads(v, cfg.num_kv_heads)?,
        );
        let q = apply_rotary(&q, cos, sin)?;
        let k = repeat_kv(
            &apply_rotary(&k, cos, sin)?,
            cfg.num_heads / cfg.num_kv_heads,
        )?;
        let v = repeat_kv(&v, cfg.num_heads / cfg.num_kv_heads)?;
        let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?.contiguous()?;
        let probs = causal_softmax(&scores, scale, cfg.sliding_window)?.to_dtype(v.dtype())?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((
            batch,
            seq,
            cfg.num_heads * cfg.head_dim,
        ))?;
        project(Site::OProj, &out)
    }

    /// `cos`, `sin` `[seq, head_dim]` in f32, as transformers builds them.
    fn rotary_tables(&self, seq: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        self.rotary_at(&(0..seq).collect::<Vec<_>>(), device)
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
