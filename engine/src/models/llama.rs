//! The Llama-family causal LM (Llama 2/3, Mistral, Qwen2, Qwen3, Gemma 2/3, Phi-3), written once over a
//! [`Backend`]: a decoder layer is the same code in training (whole sequences, one adapter,
//! a backward pass through layer-wise recomputation), in evaluation (the same, with no graph
//! recorded) and in serving (packed rows of many sequences, each with its own KV cache and
//! adapter). Only the [`Pass`] it is handed differs. Every base weight is frozen
//! ([`FrozenLinear`], dense or NF4); weight names mirror Hugging Face
//! (`model.layers.N.self_attn.q_proj.weight`).

use std::{borrow::Cow, ops::Range};

use candle_core::{D, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::{
    config::{Activation, Config},
    dora::{self, RowNorms},
    rope::Rope,
};
use crate::{
    adapters::{
        Adapter, Bottleneck, Ia3, Ia3Adapter, Lora, PeftAdapter, PeftError, Placement,
        PromptAdapter, PromptMethod, SegmentLora, ServingAdapter, Site, scale_segments,
    },
    backend::{
        self, Backend, CachedRows, Documents, Dropout, FrozenLinear, FrozenWeight, Heads, KvCache,
        Rotary,
    },
};

/// How the frozen projections are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// NF4 with double quantization (QLoRA).
    Nf4,
    /// As loaded (plain LoRA).
    Dense,
}

/// How a training or evaluation pass treats the adapters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// Differentiable in the adapters, with dropout on their inputs when given.
    Train(Option<Dropout>),
    /// Nothing recorded for a backward pass: evaluation reads the trained values only.
    Eval,
}

/// A frozen projection and the adapter trained on it, if any.
#[derive(Clone, Debug)]
struct Projection {
    base: FrozenLinear,
    lora: Option<Lora>,
    /// An (IA)³ vector scaling the input or the output.
    ia3: Option<Ia3>,
    /// The base rows' norms, for DoRA.
    norms: RowNorms,
}

impl Projection {
    /// `x` through the base and `lora`, DoRA's way where the pair has a magnitude.
    fn adapted(
        &self,
        backend: &dyn Backend,
        x: &Tensor,
        lora: &Lora,
        mask: Option<backend::DropoutMask>,
    ) -> Result<Tensor> {
        if lora.magnitude.is_some() {
            dora::adapted(backend, &self.base, &self.norms, x, lora, mask)
        } else {
            backend.adapted(x, &self.base, lora, mask)
        }
    }
}

#[derive(Clone, Debug)]
struct Block {
    /// Before attention (`input_layernorm`).
    input_norm: Tensor,
    /// Before the MLP (`post_attention_layernorm`; Gemma's `pre_feedforward_layernorm`).
    mlp_norm: Tensor,
    /// After attention and after the MLP, before each residual add (Gemma's
    /// `post_attention_layernorm` and `post_feedforward_layernorm`).
    sandwich: Option<[Tensor; 2]>,
    /// Per-head query and key norms, `[head_dim]` each (Qwen3).
    qk_norm: Option<[Tensor; 2]>,
    /// Indexed by `Site as usize`; the sites the architecture has (`Config::sites`).
    projections: Vec<Option<Projection>>,
    /// Bottleneck adapters after attention and after the feed-forward block.
    bottlenecks: [Option<Bottleneck>; 2],
}

impl Block {
    fn projection(&self, site: Site) -> &Projection {
        self.projections[site as usize]
            .as_ref()
            .expect("the model's own sites only (adapters are checked against them)")
    }
}

/// A loaded model.
#[derive(Clone, Debug)]
pub struct Llama {
    config: Config,
    backend: &'static dyn Backend,
    embed_tokens: Tensor,
    layers: Vec<Block>,
    norm: Tensor,
    lm_head: FrozenLinear,
    inv_freq: Frequencies,
    /// Sliding layers' own (Gemma 3).
    local_inv_freq: Option<Frequencies>,
}

/// A rotary schedule over the rotated dimensions, with its `inv_freq` computed once where it
/// does not depend on the sequence's length.
#[derive(Clone, Debug)]
struct Frequencies {
    rope: Rope,
    dim: usize,
    fixed: Option<Vec<f32>>,
    /// What cos and sin are scaled by (YaRN's, LongRoPE's).
    scale: f64,
}

impl Frequencies {
    fn of(rope: &Rope, dim: usize) -> Self {
        Self {
            rope: rope.clone(),
            dim,
            fixed: (!rope.depends_on_length()).then(|| rope.inverse_frequencies(dim, 0)),
            scale: rope.attention_factor(),
        }
    }

    /// `inv_freq` for a sequence `seq_len` tokens long.
    fn at(&self, seq_len: usize) -> Cow<'_, [f32]> {
        match &self.fixed {
            Some(fixed) => Cow::Borrowed(fixed),
            None => Cow::Owned(self.rope.inverse_frequencies(self.dim, seq_len)),
        }
    }
}

/// Positions to rotate, all of one sequence that is `seq_len` tokens long once they are in.
#[derive(Clone, Debug)]
struct Span {
    positions: Range<usize>,
    seq_len: usize,
}

/// The rotary tables of a pass, shared by every layer: the global schedule's, and the
/// sliding layers' where they have their own.
#[derive(Clone, Debug)]
pub struct Positions {
    global: Rotary,
    local: Option<Rotary>,
}

impl Positions {
    fn for_layer(&self, local: bool) -> &Rotary {
        match (&self.local, local) {
            (Some(local), true) => local,
            _ => &self.global,
        }
    }
}

impl Llama {
    /// Loads the weights `vb` holds (rooted at the checkpoint's top level) on its device, in
    /// its dtype, computing with the backend for that device and dtype. NF4 weights are read
    /// from the checkpoint on the CPU, quantized there on every core, and only their packed
    /// form goes to the device.
    pub fn load(vb: &VarBuilder<'_>, config: &Config, precision: Precision) -> Result<Self> {
        Self::load_rewritten(vb, config, precision, None)
    }

    /// [`load`](Self::load), with the projections `rewrite` names replaced by what it makes
    /// of them before they are frozen (OLoRA's and PiSSA's residual).
    pub fn load_rewritten(
        vb: &VarBuilder<'_>,
        config: &Config,
        precision: Precision,
        rewrite: Option<&dyn BaseRewrite>,
    ) -> Result<Self> {
        let model = vb.pp("model");
        let (hidden, vocab) = (config.hidden_size, config.vocab_size);
        let embed_tokens = model.pp("embed_tokens").get((vocab, hidden), "weight")?;
        let layers = (0..config.num_layers)
            .map(|i| load_block(&model.pp("layers").pp(i), i, config, precision, rewrite))
            .collect::<Result<Vec<_>>>()?;
        let norm = load_norm(&model.pp("norm"), hidden, config)?;
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            vb.pp("lm_head").get((vocab, hidden), "weight")?
        };
        Ok(Self {
            config: config.clone(),
            backend: backend::for_device(vb.device(), vb.dtype()),
            embed_tokens,
            layers,
            norm,
            lm_head: FrozenLinear::new(FrozenWeight::Dense(lm_head), None),
            inv_freq: Frequencies::of(&config.rope, config.rotary_dim),
            local_inv_freq: config
                .local_rope
                .as_ref()
                .map(|rope| Frequencies::of(rope, config.rotary_dim)),
        })
    }

    /// This model computing with `backend` instead of its device's default (the tests run
    /// the device backend on the CPU this way).
    #[must_use]
    pub fn with_backend(mut self, backend: &'static dyn Backend) -> Self {
        self.backend = backend;
        self
    }

    pub fn backend(&self) -> &'static dyn Backend {
        self.backend
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

    /// `(out, in)` of a projection, if the model has it.
    pub fn site_shape(&self, site: Site) -> Option<(usize, usize)> {
        self.config.site_shape(site)
    }

    /// The projections adapters can target.
    pub fn sites(&self) -> &'static [Site] {
        self.config.sites()
    }

    /// Puts `lora` on `site` of `layer` (or removes it with `None`).
    ///
    /// # Panics
    /// If the model has no `site` (see [`Self::sites`]).
    pub fn set_lora(&mut self, layer: usize, site: Site, lora: Option<Lora>) {
        self.layers[layer].projections[site as usize]
            .as_mut()
            .expect("a site of this model")
            .lora = lora;
    }

    /// The frozen weight of the projection on `site` of `layer`.
    pub fn frozen_weight(&self, layer: usize, site: Site) -> Option<&FrozenWeight> {
        self.layers
            .get(layer)?
            .projections
            .get(site as usize)?
            .as_ref()
            .map(|p| p.base.weight())
    }

    pub fn lora(&self, layer: usize, site: Site) -> Option<&Lora> {
        self.layers[layer].projections[site as usize]
            .as_ref()?
            .lora
            .as_ref()
    }

    /// Puts `ia3` on `site` of `layer` (or removes it with `None`).
    ///
    /// # Panics
    /// If the model has no `site` (see [`Self::sites`]).
    pub fn set_ia3(&mut self, layer: usize, site: Site, ia3: Option<Ia3>) {
        self.layers[layer].projections[site as usize]
            .as_mut()
            .expect("a site of this model")
            .ia3 = ia3;
    }

    pub fn ia3(&self, layer: usize, site: Site) -> Option<&Ia3> {
        self.layers[layer].projections[site as usize]
            .as_ref()?
            .ia3
            .as_ref()
    }

    /// Puts a bottleneck adapter's module at `placement` of `layer` (or removes it with
    /// `None`).
    pub fn set_bottleneck(
        &mut self,
        layer: usize,
        placement: Placement,
        module: Option<Bottleneck>,
    ) {
        self.layers[layer].bottlenecks[placement as usize] = module;
    }

    /// Puts every part of an adapter of any method on this model, after checking each fits.
    pub fn apply(&mut self, adapter: &PeftAdapter) -> std::result::Result<(), PeftError> {
        match adapter {
            PeftAdapter::Lora(adapter) => self.apply_adapter(adapter),
            PeftAdapter::Ia3(adapter) => self.apply_ia3(adapter),
            PeftAdapter::Bottleneck(bottleneck) => {
                self.check(adapter)?;
                for (&(layer, placement), module) in &bottleneck.modules {
                    self.set_bottleneck(layer, placement, Some(module.clone()));
                }
                Ok(())
            }
            PeftAdapter::Prompt(adapter) => Err(PeftError::Unsupported(format!(
                "{}: a prompt-learning adapter changes the input (or, prefix tuning, the \
                 attention's cache), not the model's weights: serve it (Llama::serving) or put its \
                 embeddings before the input's (adapters::prepend)",
                adapter.config.peft_type
            ))),
        }
    }

    /// Puts every vector of `adapter` on this model, after checking each fits.
    pub fn apply_ia3(&mut self, adapter: &Ia3Adapter) -> std::result::Result<(), PeftError> {
        adapter.check_fits(self.num_layers(), |site| self.site_shape(site))?;
        for (&(layer, site), ia3) in &adapter.vectors {
            self.set_ia3(layer, site, Some(ia3.clone()));
        }
        Ok(())
    }

    /// An adapter of any method laid out for serving on this model (see
    /// [`Self::serving_adapter`]). Check it fits first ([`Self::check`]).
    pub fn serving(&self, adapter: &PeftAdapter) -> Result<ServingAdapter> {
        self.serving_with(adapter, self.dtype())
    }

    /// [`Self::serving`] with LoRA's `A` and `B` kept in `lora_dtype`.
    pub fn serving_with(&self, adapter: &PeftAdapter, lora_dtype: DType) -> Result<ServingAdapter> {
        match adapter {
            PeftAdapter::Lora(adapter) => self.lora_serving(adapter, lora_dtype),
            PeftAdapter::Ia3(adapter) => {
                ServingAdapter::ia3(adapter).to(self.device(), self.dtype())
            }
            PeftAdapter::Bottleneck(adapter) => {
                ServingAdapter::bottleneck(adapter).to(self.device(), self.dtype())
            }
            PeftAdapter::Prompt(adapter) => {
                let mut prefix = KvCache::new(self.num_layers());
                if matches!(adapter.config.method(), Ok(PromptMethod::PrefixTuning)) {
                    self.prefill_kv(adapter, &mut prefix)?;
                } else {
                    self.prefill_embeddings(&adapter.embeddings, &mut prefix)?;
                }
                Ok(ServingAdapter::virtual_tokens(prefix))
            }
        }
    }

    /// Whether every part of an adapter of any method has a layer here and fits its
    /// projection; a prompt-learning adapter, whether its embeddings are this model's width
    /// and its virtual tokens leave room in the context.
    pub fn check(&self, adapter: &PeftAdapter) -> std::result::Result<(), PeftError> {
        if let PeftAdapter::Prompt(prompt) = adapter {
            let context = self.config.max_position_embeddings.unwrap_or(usize::MAX);
            return prompt.check_model(&self.config, context);
        }
        adapter.check_fits(self.num_layers(), |site| self.site_shape(site))
    }

    /// Puts every pair of `adapter` on this model, after checking each fits.
    pub fn apply_adapter(&mut self, adapter: &Adapter) -> std::result::Result<(), PeftError> {
        self.check_adapter(adapter)?;
        for (&(layer, site), lora) in &adapter.weights {
            self.set_lora(layer, site, Some(lora.clone()));
        }
        Ok(())
    }

    /// `adapter` laid out for serving on this model's device in its dtype, each DoRA pair
    /// with its `r` computed once against the base weights. Check it fits first
    /// ([`Self::check_adapter`]).
    pub fn serving_adapter(&self, adapter: &Adapter) -> Result<ServingAdapter> {
        self.lora_serving(adapter, self.dtype())
    }

    fn lora_serving(&self, adapter: &Adapter, lora_dtype: DType) -> Result<ServingAdapter> {
        let device = self.device();
        ServingAdapter::with_dora(adapter, |layer, site, lora| {
            let projection = self.projection_at(layer, site)?;
            let on = |t: &Tensor| t.to_device(device);
            let lora = Lora {
                a: on(&lora.a)?,
                b: on(&lora.b)?,
                scale: lora.scale,
                magnitude: lora.magnitude.as_ref().map(on).transpose()?,
            };
            dora::scale(
                self.backend,
                &projection.base,
                &projection.norms,
                &lora,
                self.dtype(),
            )
        })?
        .to_with(device, self.dtype(), lora_dtype)
    }

    /// The norms of the rows of the base weight of `site` in `layer`, `[out]` in f32: where
    /// DoRA's magnitude starts (PEFT's, with `B` zero).
    pub fn row_norms(&self, layer: usize, site: Site) -> Result<Tensor> {
        let projection = self.projection_at(layer, site)?;
        projection
            .norms
            .squared(&projection.base, self.device())?
            .sqrt()
    }

    fn projection_at(&self, layer: usize, site: Site) -> Result<&Projection> {
        self.layers
            .get(layer)
            .and_then(|b| b.projections[site as usize].as_ref())
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "the model has no {} in layer {layer}",
                    site.name()
                ))
            })
    }

    /// Whether every pair of `adapter` has a layer here and its projection's shape.
    pub fn check_adapter(&self, adapter: &Adapter) -> std::result::Result<(), PeftError> {
        adapter.check_fits(self.num_layers(), |site| self.site_shape(site))
    }

    /// Bytes of the frozen weights, for memory accounting.
    pub fn frozen_bytes(&self) -> usize {
        let tensor = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let layers: usize = self
            .layers
            .iter()
            .map(|b| {
                tensor(&b.input_norm)
                    + tensor(&b.mlp_norm)
                    + b.sandwich.iter().flatten().map(tensor).sum::<usize>()
                    + b.qk_norm.iter().flatten().map(tensor).sum::<usize>()
                    + b.projections
                        .iter()
                        .flatten()
                        .map(|p| p.base.weight().size_bytes())
                        .sum::<usize>()
            })
            .sum();
        let head = if self.config.tie_word_embeddings {
            0
        } else {
            self.lm_head.weight().size_bytes()
        };
        tensor(&self.embed_tokens) + layers + tensor(&self.norm) + head
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]` (u32), differentiable in
    /// the adapters: one graph through every layer.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.forward_embeddings(self.embed(input_ids)?)
    }

    /// Logits `[batch, seq, vocab]` for input embeddings `[batch, seq, hidden]` at positions
    /// `0..seq` (a prompt-learning adapter's virtual tokens put before a text's), differentiable
    /// in them and in the adapters.
    pub fn forward_embeddings(&self, mut h: Tensor) -> Result<Tensor> {
        let rotary = self.positions(h.dim(1)?, h.device())?;
        for layer in 0..self.layers.len() {
            h = self.layer(layer, &h, &rotary, Mode::Train(None))?;
        }
        self.head(&h)
    }

    /// Hidden states `[batch, seq, hidden]` for token ids `[batch, seq]`.
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (batch, seq) = input_ids.dims2()?;
        self.embed_rows(&input_ids.flatten_all()?)?
            .reshape((batch, seq, self.config.hidden_size))
    }

    /// `[ids, hidden]` for a vector of token ids.
    fn embed_rows(&self, ids: &Tensor) -> Result<Tensor> {
        let rows = self.embed_tokens.index_select(ids, 0)?;
        match self.config.embed_scale {
            Some(scale) => rows.affine(scale, 0.0),
            None => Ok(rows),
        }
    }

    /// The rotary tables and position ids for sequences of `seq` tokens, shared by every
    /// layer of a pass.
    pub fn positions(&self, seq: usize, device: &Device) -> Result<Positions> {
        let whole = Span {
            positions: 0..seq,
            seq_len: seq,
        };
        self.rotary(&[whole], seq, device)
    }

    /// The rotary tables and position ids of packed rows `seq` tokens long: row `b` holds
    /// examples of the lengths `lengths[b]`, one after another, then padding. Each example's
    /// positions restart at 0, rotated with the frequencies of its own length (as it would be
    /// alone), and attention keeps to each example.
    pub fn packed_positions(
        &self,
        lengths: &[Vec<usize>],
        seq: usize,
        device: &Device,
    ) -> Result<Positions> {
        let (mut spans, mut starts, mut ids) = (Vec::new(), Vec::new(), Vec::new());
        for row in lengths {
            let used: usize = row.iter().sum();
            if used > seq || row.contains(&0) {
                candle_core::bail!("packed row of examples {row:?} does not fit {seq} tokens");
            }
            let mut examples = row.clone();
            if used < seq {
                examples.push(seq - used);
            }
            let mut start = 0;
            let mut row_starts = Vec::with_capacity(examples.len());
            for (index, &len) in examples.iter().enumerate() {
                spans.push(Span {
                    positions: 0..len,
                    seq_len: len,
                });
                row_starts.push(start);
                #[allow(clippy::cast_precision_loss)]
                ids.extend(std::iter::repeat_n(index as f32, len));
                start += len;
            }
            starts.push(row_starts);
        }
        let mut positions = self.rotary(&spans, seq, device)?;
        let documents = Documents {
            starts,
            ids: Tensor::from_vec(ids, (lengths.len(), seq), device)?,
        };
        positions.global.documents = Some(documents.clone());
        if let Some(local) = &mut positions.local {
            local.documents = Some(documents);
        }
        Ok(positions)
    }

    /// Decoder layer `index` of a training or evaluation pass over whole sequences. The
    /// trainer calls it one layer at a time, to recompute layers in the backward pass instead
    /// of keeping every layer's activations, and to evaluate with no graph at all.
    pub fn layer(
        &self,
        index: usize,
        h: &Tensor,
        positions: &Positions,
        mode: Mode,
    ) -> Result<Tensor> {
        self.layer_with_prefix(index, h, positions, mode, None)
    }

    /// [`Self::layer`] with prefix tuning's keys and values of this layer `[n, kv_heads ·
    /// head_dim]` each: every row's first `n` positions (placeholders the caller put before
    /// the input, so the input's tokens sit at positions `n..` as PEFT puts them) attend and
    /// are attended to with these keys and values in place of their own, the keys not rotated.
    /// Differentiable in them.
    pub fn layer_with_prefix(
        &self,
        index: usize,
        h: &Tensor,
        positions: &Positions,
        mode: Mode,
        prefix: Option<[&Tensor; 2]>,
    ) -> Result<Tensor> {
        self.block(
            index,
            h,
            &mut Sequences {
                positions,
                mode,
                prefix,
            },
        )
    }

    /// The final norm and the LM head: logits for hidden states.
    pub fn head(&self, h: &Tensor) -> Result<Tensor> {
        let h = self
            .backend
            .rms_norm(h, &self.norm, self.config.rms_norm_eps)?;
        let logits = self.backend.frozen(&h, &self.lm_head)?;
        match self.config.final_logit_softcap {
            Some(cap) => (logits / cap)?.tanh()? * cap,
            None => Ok(logits),
        }
    }

    /// Logits `[segments, vocab]` for the last new token of each segment of a serving step;
    /// each cache grows by its segment's tokens. On error the caches are left inconsistent
    /// and must be dropped.
    pub fn forward_packed(&self, segments: &mut [Segment<'_>]) -> Result<Tensor> {
        self.forward_packed_rows(segments, &[])
    }

    /// [`Self::forward_packed`], except that each segment `i` with `every_row[i]` gets logits
    /// for every one of its new tokens, in order, where the others get their last: a prompt's
    /// log-probabilities (`echo` with `logprobs`). The LM head, over the whole vocabulary,
    /// runs only on the rows returned, so segments that do not ask pay nothing. Missing
    /// entries of `every_row` are false.
    pub fn forward_packed_rows(
        &self,
        segments: &mut [Segment<'_>],
        every_row: &[bool],
    ) -> Result<Tensor> {
        let ids: Vec<u32> = segments
            .iter()
            .flat_map(|s| s.tokens.iter().copied())
            .collect();
        let h = self.embed_rows(&Tensor::new(ids.as_slice(), self.device())?)?;
        self.forward_hidden(h, segments, every_row)
    }

    /// Keys and values of virtual tokens `embeddings` `[n, hidden]` (a prompt-learning
    /// adapter's) at positions `0..n`, into the empty `cache`: what every sequence of that
    /// adapter starts from, computed once.
    pub fn prefill_embeddings(&self, embeddings: &Tensor, cache: &mut KvCache) -> Result<()> {
        if !cache.is_empty() {
            candle_core::bail!("virtual tokens take the first positions: the cache must be empty");
        }
        // Past the embedding, a segment's tokens are only counted.
        let rows = vec![0u32; embeddings.dim(0)?];
        let mut segments = [Segment {
            tokens: &rows,
            cache,
            adapter: None,
        }];
        let h = embeddings
            .to_device(self.device())?
            .to_dtype(self.dtype())?;
        self.forward_hidden(h, &mut segments, &[])?;
        Ok(())
    }

    /// A prefix-tuning adapter's keys and values, every layer's, into the empty `cache`, as
    /// they are: the input's tokens then take the positions after them.
    fn prefill_kv(&self, adapter: &PromptAdapter, cache: &mut KvCache) -> Result<()> {
        if !cache.is_empty() {
            candle_core::bail!("a prefix takes the first positions: the cache must be empty");
        }
        let place = |t: Tensor| t.to_device(self.device())?.to_dtype(self.dtype());
        for layer in 0..self.num_layers() {
            let (k, v) = adapter.layer_kv(layer)?;
            let kv = [&place(k)?, &place(v)?];
            self.backend
                .append_kv(cache, layer, kv, self.config.num_kv_heads)?;
        }
        cache.advance(adapter.num_virtual_tokens())
    }

    /// [`Self::forward_packed_rows`] from the segments' input rows `h` `[rows, hidden]`.
    fn forward_hidden(
        &self,
        mut h: Tensor,
        segments: &mut [Segment<'_>],
        every_row: &[bool],
    ) -> Result<Tensor> {
        if segments.iter().any(|s| s.tokens.is_empty()) {
            candle_core::bail!("forward_packed: every segment needs at least one token");
        }
        let device = self.device().clone();
        let mut rows = Vec::with_capacity(segments.len());
        let mut spans = Vec::with_capacity(segments.len());
        let mut start = 0;
        for segment in segments.iter() {
            let (offset, new) = (segment.cache.len(), segment.tokens.len());
            spans.push(Span {
                positions: offset..offset + new,
                seq_len: offset + new,
            });
            rows.push(start..start + new);
            start += new;
        }
        let keys = segments
            .iter()
            .map(|s| s.cache.len() + s.tokens.len())
            .max()
            .unwrap_or(0);
        let rotary = self.rotary(&spans, keys, &device)?;
        for layer in 0..self.layers.len() {
            let mut pass = Batch {
                positions: &rotary,
                segments,
                rows: &rows,
            };
            h = self.block(layer, &h, &mut pass)?;
        }
        for segment in segments.iter_mut() {
            segment.cache.advance(segment.tokens.len())?;
        }
        let mut picked: Vec<u32> = Vec::with_capacity(rows.len());
        for (i, r) in rows.iter().enumerate() {
            let from = if every_row.get(i) == Some(&true) {
                r.start
            } else {
                r.end - 1
            };
            #[allow(clippy::cast_possible_truncation)]
            let new_rows = (from..r.end).map(|row| row as u32);
            picked.extend(new_rows);
        }
        self.head(&h.index_select(&Tensor::new(picked.as_slice(), &device)?, 0)?)
    }

    fn heads(&self, layer: usize) -> Heads {
        let cfg = &self.config;
        Heads {
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            scale: cfg.attention_scale,
            window: cfg.window(layer),
            softcap: cfg.attention_softcap,
        }
    }

    /// One decoder layer, whatever the pass.
    fn block(&self, index: usize, h: &Tensor, pass: &mut dyn Pass) -> Result<Tensor> {
        let backend = self.backend;
        let block = &self.layers[index];
        let eps = self.config.rms_norm_eps;
        let mut project =
            |site: Site, x: &Tensor| pass.project(backend, index, site, block.projection(site), x);
        let normed = backend.rms_norm(h, &block.input_norm, eps)?;
        let (mut q, mut k, v) = if self.config.fused_projections {
            let qkv = project(Site::QkvProj, &normed)?;
            let cfg = &self.config;
            let (q, kv) = (
                cfg.num_heads * cfg.head_dim,
                cfg.num_kv_heads * cfg.head_dim,
            );
            let part = |from: usize, len: usize| qkv.narrow(D::Minus1, from, len)?.contiguous();
            (part(0, q)?, part(q, kv)?, part(q + kv, kv)?)
        } else {
            (
                project(Site::QProj, &normed)?,
                project(Site::KProj, &normed)?,
                project(Site::VProj, &normed)?,
            )
        };
        if let Some([q_norm, k_norm]) = &block.qk_norm {
            q = self.per_head_norm(&q, q_norm)?;
            k = self.per_head_norm(&k, k_norm)?;
        }
        let local = self.config.local_rope_at(index);
        let attended = pass.attend(backend, index, [&q, &k, &v], self.heads(index), local)?;
        let mut project =
            |site: Site, x: &Tensor| pass.project(backend, index, site, block.projection(site), x);
        let sandwiched = |x: Tensor, at: usize| match &block.sandwich {
            Some(norms) => backend.rms_norm(&x, &norms[at], eps),
            None => Ok(x),
        };
        let out = sandwiched(project(Site::OProj, &attended)?, 0)?;
        let h = (h + &out)?;
        let h = pass.bottleneck(backend, index, Placement::Attention, block, &out, h)?;
        let mut project =
            |site: Site, x: &Tensor| pass.project(backend, index, site, block.projection(site), x);
        let normed = backend.rms_norm(&h, &block.mlp_norm, eps)?;
        let (gate, up) = if self.config.fused_projections {
            let gate_up = project(Site::GateUpProj, &normed)?;
            let inter = self.config.intermediate_size;
            (
                gate_up.narrow(D::Minus1, 0, inter)?.contiguous()?,
                gate_up.narrow(D::Minus1, inter, inter)?.contiguous()?,
            )
        } else {
            (
                project(Site::GateProj, &normed)?,
                project(Site::UpProj, &normed)?,
            )
        };
        let gated = match self.config.activation {
            Activation::Silu => backend.swiglu(&gate, &up)?,
            Activation::GeluTanh => backend.gelu_tanh_gated(&gate, &up)?,
        };
        let out = sandwiched(project(Site::DownProj, &gated)?, 1)?;
        let h = (h + &out)?;
        pass.bottleneck(backend, index, Placement::Output, block, &out, h)
    }

    /// `x` (`[.., heads·head_dim]`) with each head's slice RMS-normalised by `weight`.
    fn per_head_norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let head_dim = self.config.head_dim;
        let heads = x.reshape((x.elem_count() / head_dim, head_dim))?;
        self.backend
            .rms_norm(&heads, weight, self.config.rms_norm_eps)?
            .reshape(x.shape())
    }

    /// Rotary tables `[positions, rotary_dim]` for the positions of each of `spans`, in order,
    /// and position ids `0..keys`, on `device`, for each schedule the layers use.
    fn rotary(&self, spans: &[Span], keys: usize, device: &Device) -> Result<Positions> {
        Ok(Positions {
            global: rotary_tables(&self.inv_freq, spans, keys, device)?,
            local: self
                .local_inv_freq
                .as_ref()
                .map(|inv_freq| rotary_tables(inv_freq, spans, keys, device))
                .transpose()?,
        })
    }
}

/// Rotary tables `[positions, rotary_dim]` of `frequencies` for the positions of `spans`, and
/// position ids `0..keys`, on `device`. The angles (position × frequency, in f32 as
/// transformers multiplies them) are made on the host: one small upload per pass, and each
/// span gets the frequencies of its sequence's length.
fn rotary_tables(
    frequencies: &Frequencies,
    spans: &[Span],
    keys: usize,
    device: &Device,
) -> Result<Rotary> {
    let (rows, pairs) = (
        spans.iter().map(|s| s.positions.len()).sum::<usize>(),
        frequencies.dim / 2,
    );
    let mut angles = Vec::with_capacity(rows * pairs);
    for span in spans {
        let inv_freq = frequencies.at(span.seq_len);
        for position in span.positions.clone() {
            #[allow(clippy::cast_precision_loss)]
            let position = position as f32;
            angles.extend(inv_freq.iter().map(|f| position * f));
        }
    }
    let freqs = Tensor::from_vec(angles, (rows, pairs), device)?;
    let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?;
    #[allow(clippy::cast_precision_loss)]
    let ids: Vec<f32> = (0..keys).map(|p| p as f32).collect();
    let scaled = |t: Tensor| {
        if (frequencies.scale - 1.0).abs() < f64::EPSILON {
            Ok(t)
        } else {
            t.affine(frequencies.scale, 0.0)
        }
    };
    Ok(Rotary {
        cos: scaled(emb.cos()?)?,
        sin: scaled(emb.sin()?)?,
        positions: Tensor::new(ids.as_slice(), device)?,
        documents: None,
    })
}

/// What differs between passes: how a projection applies adapters, and what attention sees.
trait Pass {
    fn project(
        &mut self,
        backend: &dyn Backend,
        layer: usize,
        site: Site,
        projection: &Projection,
        x: &Tensor,
    ) -> Result<Tensor>;

    /// `local`: the layer rotates with the sliding layers' own schedule.
    fn attend(
        &mut self,
        backend: &dyn Backend,
        layer: usize,
        qkv: [&Tensor; 3],
        heads: Heads,
        local: bool,
    ) -> Result<Tensor>;

    /// The stream after a sub-block whose output `out` was just added to it, through the
    /// bottleneck adapters at `placement` (`block`'s own, or each sequence's).
    fn bottleneck(
        &mut self,
        backend: &dyn Backend,
        layer: usize,
        placement: Placement,
        block: &Block,
        out: &Tensor,
        stream: Tensor,
    ) -> Result<Tensor>;
}

/// Training and evaluation: whole sequences `[batch, seq, ..]`, the model's own adapters, and
/// a prefix's keys and values of the layer, if any.
struct Sequences<'a> {
    positions: &'a Positions,
    mode: Mode,
    prefix: Option<[&'a Tensor; 2]>,
}

impl Sequences<'_> {
    /// `k` and `v` `[batch, seq, width]` with the prefix's keys and values in their first
    /// positions. The attention rotates every key for its position, so the prefix's keys go in
    /// rotated back by as much: they come out of it as they are, as in PEFT's cache.
    fn with_prefix(
        &self,
        k: &Tensor,
        v: &Tensor,
        rotary: &Rotary,
        heads: Heads,
    ) -> Result<[Tensor; 2]> {
        let Some([prefix_k, prefix_v]) = self.prefix else {
            return Ok([k.clone(), v.clone()]);
        };
        if rotary.documents.is_some() {
            candle_core::bail!("packed rows take no prefix");
        }
        let (batch, seq, width) = k.dims3()?;
        let n = prefix_k.dim(0)?;
        let per_position = |t: &Tensor| t.narrow(0, 0, n)?.unsqueeze(1);
        let unrotated = crate::backend::rotation::rotate_back(
            &prefix_k.reshape((n, heads.kv_heads, heads.head_dim))?,
            &per_position(&rotary.cos)?,
            &per_position(&rotary.sin)?,
        )?
        .reshape((n, width))?;
        let splice = |prefix: &Tensor, own: &Tensor| -> Result<Tensor> {
            let prefix = prefix
                .to_dtype(own.dtype())?
                .unsqueeze(0)?
                .broadcast_as((batch, n, width))?;
            Tensor::cat(&[&prefix, &own.narrow(1, n, seq - n)?], 1)
        };
        Ok([splice(&unrotated, k)?, splice(prefix_v, v)?])
    }
}

impl Pass for Sequences<'_> {
    fn project(
        &mut self,
        backend: &dyn Backend,
        layer: usize,
        site: Site,
        projection: &Projection,
        x: &Tensor,
    ) -> Result<Tensor> {
        let ia3 = match (&projection.ia3, self.mode) {
            (Some(ia3), Mode::Eval) => Some(Cow::Owned(ia3.detach())),
            (ia3, _) => ia3.as_ref().map(Cow::Borrowed),
        };
        let scaled;
        let x = match &ia3 {
            Some(ia3) if ia3.feedforward => {
                scaled = ia3.scale(x)?;
                &scaled
            }
            _ => x,
        };
        let y = match (&projection.lora, self.mode) {
            (None, _) => backend.frozen(x, &projection.base),
            (Some(lora), Mode::Train(dropout)) => {
                let mask = dropout.filter(|d| d.p > 0.0).map(|d| d.at(layer, site));
                projection.adapted(backend, x, lora, mask)
            }
            (Some(lora), Mode::Eval) => projection.adapted(backend, x, &lora.detach(), None),
        }?;
        match &ia3 {
            Some(ia3) if !ia3.feedforward => ia3.scale(&y),
            _ => Ok(y),
        }
    }

    fn attend(
        &mut self,
        backend: &dyn Backend,
        _: usize,
        [q, k, v]: [&Tensor; 3],
        heads: Heads,
        local: bool,
    ) -> Result<Tensor> {
        let rotary = self.positions.for_layer(local);
        let [k, v] = self.with_prefix(k, v, rotary, heads)?;
        backend.attention(q, &k, &v, rotary, heads)
    }

    fn bottleneck(
        &mut self,
        _: &dyn Backend,
        _: usize,
        placement: Placement,
        block: &Block,
        out: &Tensor,
        stream: Tensor,
    ) -> Result<Tensor> {
        match (&block.bottlenecks[placement as usize], self.mode) {
            (None, _) => Ok(stream),
            (Some(module), Mode::Eval) => module.detach().apply(out, &stream),
            (Some(module), Mode::Train(_)) => module.apply(out, &stream),
        }
    }
}

/// One sequence's share of a serving step: its new tokens, its cache (extended by them) and
/// the adapter its rows go through.
#[derive(Debug)]
pub struct Segment<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub adapter: Option<&'a ServingAdapter>,
}

/// Serving: the packed rows `[rows, ..]` of many sequences, each with its adapter and cache.
struct Batch<'a, 's, 't> {
    positions: &'a Positions,
    segments: &'a mut [Segment<'s>],
    rows: &'t [Range<usize>],
}

impl Pass for Batch<'_, '_, '_> {
    fn project(
        &mut self,
        backend: &dyn Backend,
        layer: usize,
        site: Site,
        projection: &Projection,
        x: &Tensor,
    ) -> Result<Tensor> {
        let loras: Vec<SegmentLora<'_>> = self
            .segments
            .iter()
            .zip(self.rows)
            .map(|(s, rows)| SegmentLora {
                rows: rows.clone(),
                lora: s.adapter.and_then(|a| a.get(layer, site)),
            })
            .collect();
        // (IA)³ rows: the feed-forward vectors scale the input, the others the output. Most
        // batches have none here, and this runs for every projection of every step.
        let has_ia3 = self
            .segments
            .iter()
            .any(|s| s.adapter.is_some_and(|a| a.vector(layer, site).is_some()));
        let scale = |t: Tensor, feedforward: bool| -> Result<Tensor> {
            if !has_ia3 {
                return Ok(t);
            }
            let vectors: Vec<_> = self
                .segments
                .iter()
                .zip(self.rows)
                .map(|(s, rows)| {
                    let ia3 = s.adapter.and_then(|a| a.vector(layer, site));
                    (rows.clone(), ia3.filter(|v| v.feedforward == feedforward))
                })
                .collect();
            scale_segments(t, &vectors)
        };
        let x = scale(x.clone(), true)?;
        let y = backend.mixed(&x, &projection.base, &loras)?;
        let y = crate::adapters::dora::rescale_segments(y, &loras, projection.base.bias())?;
        scale(y, false)
    }

    fn attend(
        &mut self,
        backend: &dyn Backend,
        layer: usize,
        qkv: [&Tensor; 3],
        heads: Heads,
        local: bool,
    ) -> Result<Tensor> {
        let mut sequences: Vec<CachedRows<'_>> = self
            .segments
            .iter_mut()
            .zip(self.rows)
            .map(|(s, rows)| CachedRows {
                rows: rows.clone(),
                cache: &mut *s.cache,
            })
            .collect();
        let rotary = self.positions.for_layer(local);
        backend.cached_attention(layer, qkv, rotary, heads, &mut sequences)
    }

    fn bottleneck(
        &mut self,
        backend: &dyn Backend,
        layer: usize,
        placement: Placement,
        _: &Block,
        out: &Tensor,
        stream: Tensor,
    ) -> Result<Tensor> {
        let modules: Vec<_> = self
            .segments
            .iter()
            .zip(self.rows)
            .map(|(s, rows)| {
                let module = s.adapter.and_then(|a| a.bottleneck_at(layer, placement));
                (rows.clone(), module)
            })
            .collect();
        backend.bottlenecks(out, stream, &modules)
    }
}

/// Replaces base projections before they are frozen.
pub trait BaseRewrite {
    /// Whether the projection on `site` of `layer` is rewritten.
    fn applies(&self, layer: usize, site: Site) -> bool;
    /// The weight to freeze in place of `weight` (`[out, in]`, f32, on the model's device).
    fn rewrite(&self, layer: usize, site: Site, weight: &Tensor) -> Result<Tensor>;
}

fn load_block(
    vb: &VarBuilder<'_>,
    layer: usize,
    config: &Config,
    precision: Precision,
    rewrite: Option<&dyn BaseRewrite>,
) -> Result<Block> {
    let hidden = config.hidden_size;
    let on_cpu = vb.clone().set_device(Device::Cpu);
    let projection = |site: Site, bias: bool| -> Result<Projection> {
        let path = site.path();
        let (out, input) = config
            .site_shape(site)
            .ok_or_else(|| candle_core::Error::Msg(format!("no {} here", site.name())))?;
        let bias = if bias {
            Some(vb.pp(&path).get(out, "bias")?)
        } else {
            None
        };
        let rewrite = rewrite
            .filter(|r| r.applies(layer, site))
            .map(|r| move |w: &Tensor| r.rewrite(layer, site, w));
        let base = super::weights::frozen_linear(
            &vb.pp(&path),
            &on_cpu.pp(&path),
            (out, input),
            bias,
            precision,
            rewrite
                .as_ref()
                .map(|f| f as &dyn Fn(&Tensor) -> Result<Tensor>),
        )
        .map_err(|e| candle_core::Error::Msg(format!("layer {layer} {}: {e}", site.name())))?;
        Ok(Projection {
            base,
            lora: None,
            ia3: None,
            norms: RowNorms::default(),
        })
    };
    let bias = config.qkv_bias;
    let norm = |name: &str, size: usize| load_norm(&vb.pp(name), size, config);
    let (mlp_norm, sandwich) = if config.sandwich_norms {
        (
            norm("pre_feedforward_layernorm", hidden)?,
            Some([
                norm("post_attention_layernorm", hidden)?,
                norm("post_feedforward_layernorm", hidden)?,
            ]),
        )
    } else {
        (norm("post_attention_layernorm", hidden)?, None)
    };
    Ok(Block {
        input_norm: norm("input_layernorm", hidden)?,
        mlp_norm,
        sandwich,
        qk_norm: if config.qk_norm {
            Some([
                norm("self_attn.q_norm", config.head_dim)?,
                norm("self_attn.k_norm", config.head_dim)?,
            ])
        } else {
            None
        },
        projections: {
            let mut projections = vec![None; Site::COUNT];
            for &site in config.sites() {
                let biased = bias && matches!(site, Site::QProj | Site::KProj | Site::VProj);
                projections[site as usize] = Some(projection(site, biased)?);
            }
            projections
        },
        bottlenecks: [None, None],
    })
}

/// An RMS norm's weight, `[size]`, with Gemma's `1 +` folded in so every norm computes
/// `x / rms(x) · weight`.
fn load_norm(vb: &VarBuilder<'_>, size: usize, config: &Config) -> Result<Tensor> {
    let weight = vb.get(size, "weight")?;
    if config.norm_weight_offset {
        weight.affine(1.0, 1.0)
    } else {
        Ok(weight)
    }
}
