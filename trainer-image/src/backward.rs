//! Loss and adapter gradients of one micro-batch, either from one graph over the whole model
//! or with layer-wise recomputation (gradient checkpointing): the forward pass keeps only each
//! layer's input, and the backward pass rebuilds one layer's graph at a time, so activation
//! memory is one layer's instead of all of them.
//!
//! Candle has no checkpointing, so recomputation chains per-layer backward passes by hand: with
//! `g` the gradient of the loss with respect to a layer's output `y`, backpropagating the scalar
//! `sum(y · g)` (with `g` constant) gives the layer's parameter gradients and its input gradient.
//!
//! Evaluation runs the same layers with no graph at all ([`eval_loss_sum`]).
//!
//! A prompt-learning run puts its virtual tokens' embeddings before every row, as PEFT does:
//! they take positions `0..n`, and the last of them scores the row's first token. Their
//! gradient is the first layer's input gradient at those positions, summed over the rows,
//! then taken back through whatever made the embeddings (P-tuning's encoder).
//!
//! A prefix-tuning run puts `n` placeholders there instead, whose keys and values every layer
//! replaces with the prefix's ([`Llama::layer_with_prefix`]): the input's tokens take
//! positions `n..` and see the prefix as PEFT's cache holds it, and the first token scores
//! nothing, as in PEFT. The prefix's gradient is each layer's key and value gradients at
//! those positions, taken back through whatever made the rows (the reparameterisation MLP).

use std::{borrow::Cow, ops::Range};

use candle_core::{Result, Tensor, Var, backprop::GradStore};
use graft_engine::{
    adapters::{prefix_kv, prepend},
    backend::Dropout,
    models::{Llama, Mode, Positions},
};

use crate::loss::nll_sum;

/// Token ids and label weights of a micro-batch, right-padded to one length.
#[derive(Clone, Debug)]
pub struct Batch {
    /// `[batch, seq]`, u32.
    pub ids: Tensor,
    /// `[batch, seq]`, f32: 1 where the token is learned, 0 for prompt tokens and padding.
    pub labels: Tensor,
    /// Number of learned tokens (the ones in `labels` after the first column).
    pub label_tokens: usize,
    /// Non-padding tokens, for throughput figures.
    pub tokens: usize,
    /// Packed rows: the lengths of each row's examples, in order (the rest is padding).
    pub lengths: Option<Vec<Vec<usize>>>,
}

/// A prompt-learning run's virtual tokens, made from its vars (so that their gradient reaches
/// them).
#[derive(Clone, Copy, Debug)]
pub enum Virtual<'a> {
    /// Prompt tuning's or P-tuning's embeddings `[n, hidden]`, put before every row's input.
    Embeddings(&'a Tensor),
    /// Prefix tuning's keys and values of every layer `[n, layers · 2 · kv_width]`.
    Prefix(&'a Tensor),
}

impl<'a> Virtual<'a> {
    pub fn tensor(self) -> &'a Tensor {
        match self {
            Self::Embeddings(t) | Self::Prefix(t) => t,
        }
    }

    /// The same kind of virtual tokens made of `tensor`.
    #[must_use]
    pub fn with(self, tensor: &Tensor) -> Virtual<'_> {
        match self {
            Self::Embeddings(_) => Virtual::Embeddings(tensor),
            Self::Prefix(_) => Virtual::Prefix(tensor),
        }
    }

    /// Virtual tokens before the input whose last one scores the input's first token: the
    /// embeddings' (a prefix's placeholders score nothing).
    fn scoring(prompt: Option<Self>) -> Result<usize> {
        match prompt {
            Some(Self::Embeddings(t)) => t.dim(0),
            Some(Self::Prefix(_)) | None => Ok(0),
        }
    }

    /// Layer `layer`'s prefix keys and values, for a prefix.
    fn layer_kv(self, model: &Llama, layer: usize) -> Result<Option<[Tensor; 2]>> {
        match self {
            Self::Prefix(rows) => Ok(Some(prefix_kv(rows, model.num_layers(), layer)?)),
            Self::Embeddings(_) => Ok(None),
        }
    }
}

/// Decoder layer `layer` of `model` over `h`, with the prefix's keys and values if `prompt`
/// is one.
fn layer(
    model: &Llama,
    layer: usize,
    h: &Tensor,
    positions: &Positions,
    mode: Mode,
    prompt: Option<Virtual<'_>>,
) -> Result<Tensor> {
    let kv = prompt
        .map(|p| p.layer_kv(model, layer))
        .transpose()?
        .flatten();
    let prefix = kv.as_ref().map(|[k, v]| [k, v]);
    model.layer_with_prefix(layer, h, positions, mode, prefix)
}

impl Batch {
    /// The first layer's input and the rotary tables and masks of the batch's rows: whole
    /// sequences, or packed examples; with `prompt`'s virtual tokens `[n, hidden]` before each
    /// row (differentiable in it), or a prefix's `n` placeholders (zeros).
    fn inputs(&self, model: &Llama, prompt: Option<Virtual<'_>>) -> Result<(Tensor, Positions)> {
        let embedded = model.embed(&self.ids)?;
        let device = embedded.device().clone();
        let seq = self.ids.dim(1)?;
        let before = match prompt {
            None => None,
            Some(Virtual::Embeddings(prompt)) => Some(prompt.clone()),
            Some(Virtual::Prefix(rows)) => {
                let hidden = embedded.dim(2)?;
                Some(Tensor::zeros(
                    (rows.dim(0)?, hidden),
                    embedded.dtype(),
                    &device,
                )?)
            }
        };
        match (before, &self.lengths) {
            (None, Some(lengths)) => Ok((embedded, model.packed_positions(lengths, seq, &device)?)),
            (None, None) => Ok((embedded, model.positions(seq, &device)?)),
            (Some(_), Some(_)) => candle_core::bail!("packed rows take no virtual tokens"),
            (Some(before), None) => {
                let h = prepend(&before, &embedded)?;
                let positions = model.positions(h.dim(1)?, &device)?;
                Ok((h, positions))
            }
        }
    }

    /// Tokens the loss scores: [`Self::label_tokens`], and behind virtual tokens' embeddings
    /// the first column's learned ones too ([`Self::scored`]).
    pub fn scored_tokens(&self, prompt: Option<Virtual<'_>>) -> Result<usize> {
        if Virtual::scoring(prompt)? == 0 {
            return Ok(self.label_tokens);
        }
        let first = self.labels.narrow(1, 0, 1)?.sum_all()?.to_scalar::<f32>()?;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        Ok(self.label_tokens + first.round() as usize)
    }

    /// The hidden states the loss scores and the batch they are scored against. Behind `n`
    /// virtual tokens, PEFT scores the first token from the last virtual token's logits: the
    /// states from position `n − 1` on, against the batch with one unlearned column before it.
    /// Behind a prefix's placeholders, the input's own states.
    fn scored<'a>(
        &'a self,
        last: &Tensor,
        prompt: Option<Virtual<'_>>,
    ) -> Result<(Tensor, Cow<'a, Self>)> {
        let seq = self.ids.dim(1)?;
        let virtual_tokens = match prompt {
            None => return Ok((last.clone(), Cow::Borrowed(self))),
            Some(Virtual::Prefix(rows)) => {
                let n = rows.dim(0)?;
                return Ok((last.narrow(1, n, seq)?, Cow::Borrowed(self)));
            }
            Some(Virtual::Embeddings(prompt)) => prompt.dim(0)?,
        };
        let states = last.narrow(1, virtual_tokens - 1, seq + 1)?;
        let column = |t: &Tensor| -> Result<Tensor> {
            Tensor::cat(&[&t.narrow(1, 0, 1)?.zeros_like()?, t], 1)
        };
        let batch = Self {
            ids: column(&self.ids)?,
            labels: column(&self.labels)?,
            ..self.clone()
        };
        Ok((states, Cow::Owned(batch)))
    }
}

/// Loss of a micro-batch divided by `denominator`, and its gradient for each of `vars`
/// (`None` where a var got none).
#[derive(Debug)]
pub struct MicroStep {
    pub loss_sum: f32,
    pub grads: Vec<Option<Tensor>>,
}

/// Shards a CPU micro-batch is split into; see [`set_shards`].
static SHARDS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// Splits every CPU micro-batch into `shards` (the cores to use). On CPU candle runs
/// elementwise ops on one core and parallelises only matmuls, so a step left the other cores
/// mostly spinning; one graph per core with single-threaded matmuls (`RAYON_NUM_THREADS=1`,
/// which `graft-trainer` sets for itself) keeps every core working: about 1.9× the tokens/s
/// on 2 cores. Unset, micro-batches are not split.
pub fn set_shards(shards: usize) {
    let _ = SHARDS.set(shards.max(1));
}

/// How a micro-batch is computed: its dropout, whether layers are recomputed in the backward
/// pass, and a prompt-learning run's virtual tokens.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepOptions<'a> {
    pub dropout: Option<Dropout>,
    pub recompute: bool,
    pub prompt: Option<Virtual<'a>>,
}

impl StepOptions<'_> {
    /// A step with no virtual tokens.
    pub fn new(dropout: Option<Dropout>, recompute: bool) -> Self {
        Self {
            dropout,
            recompute,
            prompt: None,
        }
    }
}

pub fn micro_step(
    model: &Llama,
    vars: &[Var],
    batch: &Batch,
    denominator: f64,
    options: StepOptions<'_>,
) -> Result<MicroStep> {
    let shards = SHARDS.get().copied().unwrap_or(1);
    sharded_step(shards, model, vars, batch, denominator, options)
}

/// [`micro_step`] with the rows split into `shards` run on threads of their own, gradients
/// summed in shard order.
pub fn sharded_step(
    shards: usize,
    model: &Llama,
    vars: &[Var],
    batch: &Batch,
    denominator: f64,
    options: StepOptions<'_>,
) -> Result<MicroStep> {
    let rows = batch.ids.dim(0)?;
    let shards = shards.min(rows);
    if shards <= 1 || !batch.ids.device().is_cpu() {
        return shard_step(model, vars, batch, denominator, options);
    }
    let per_shard = rows.div_ceil(shards);
    let seq = batch.ids.dim(1)?;
    let parts = (0..rows)
        .step_by(per_shard)
        .map(|start| {
            let len = per_shard.min(rows - start);
            let part = Batch {
                ids: batch.ids.narrow(0, start, len)?,
                labels: batch.labels.narrow(0, start, len)?,
                label_tokens: 0,
                tokens: 0,
                lengths: batch
                    .lengths
                    .as_ref()
                    .map(|l| l[start..start + len].to_vec()),
            };
            // A shard's rows draw the masks they have in the whole micro-batch, so the
            // result does not depend on the number of shards.
            let dropout = options.dropout.map(|d| Dropout {
                first_row: d.first_row + (start * seq) as u64,
                ..d
            });
            Ok((part, StepOptions { dropout, ..options }))
        })
        .collect::<Result<Vec<_>>>()?;
    let results: Vec<Result<MicroStep>> = std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .iter()
            .map(|(part, options)| {
                let options = *options;
                scope.spawn(move || shard_step(model, vars, part, denominator, options))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    let mut total = MicroStep {
        loss_sum: 0.0,
        grads: vec![None; vars.len()],
    };
    for result in results {
        let part = result?;
        total.loss_sum += part.loss_sum;
        accumulate(&mut total.grads, part.grads)?;
    }
    Ok(total)
}

fn shard_step(
    model: &Llama,
    vars: &[Var],
    batch: &Batch,
    denominator: f64,
    options: StepOptions<'_>,
) -> Result<MicroStep> {
    if options.recompute {
        recomputed(model, vars, batch, denominator, options)
    } else {
        whole_graph(model, vars, batch, denominator, options)
    }
}

fn whole_graph(
    model: &Llama,
    vars: &[Var],
    batch: &Batch,
    denominator: f64,
    options: StepOptions<'_>,
) -> Result<MicroStep> {
    let (mut h, positions) = batch.inputs(model, options.prompt)?;
    for index in 0..model.num_layers() {
        let mode = Mode::Train(options.dropout);
        h = layer(model, index, &h, &positions, mode, options.prompt)?;
    }
    let (h, scored) = batch.scored(&h, options.prompt)?;
    let loss_sum = nll_sum(&model.head(&h)?, &scored.ids, &scored.labels)?;
    let grads = (&loss_sum / denominator)?.backward()?;
    Ok(MicroStep {
        loss_sum: loss_sum.to_scalar()?,
        grads: take(&grads, vars),
    })
}

fn recomputed(
    model: &Llama,
    vars: &[Var],
    batch: &Batch,
    denominator: f64,
    options: StepOptions<'_>,
) -> Result<MicroStep> {
    let mode = Mode::Train(options.dropout);
    let detached = options.prompt.map(|p| p.tensor().detach());
    let constant = options
        .prompt
        .zip(detached.as_ref())
        .map(|(p, t)| p.with(t));
    let (h0, positions) = batch.inputs(model, constant)?;
    // Each layer's input; the graph built while computing the next one is dropped at once.
    let mut inputs = vec![h0.detach()];
    for index in 0..model.num_layers() {
        let next = layer(model, index, &inputs[index], &positions, mode, constant)?.detach();
        inputs.push(next);
    }
    let last = inputs.pop().expect("the embeddings at least");
    let (scored_states, scored) = batch.scored(&last, constant)?;
    let chunk = loss_chunk(model, batch)?;
    let (loss_sum, scored_grad) = head_loss(model, &scored_states, &scored, denominator, chunk)?;
    // Positions before the scored ones (the virtual tokens before the last one, or a prefix's
    // placeholders) get no gradient from the head.
    let unscored = last.dim(1)? - scored_grad.dim(1)?;
    let mut upstream = if unscored > 0 {
        let (rows, _, hidden) = last.dims3()?;
        let zeros = Tensor::zeros((rows, unscored, hidden), last.dtype(), last.device())?;
        Tensor::cat(&[&zeros, &scored_grad], 1)?
    } else {
        scored_grad
    };
    let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
    // A prefix's key and value gradients, layer by layer from the last.
    let mut prefix_grads = Vec::new();
    for index in (0..model.num_layers()).rev() {
        let input = inputs.pop().expect("one input per layer");
        // The first layer's input gradient is used only by virtual tokens' embeddings;
        // without them it stays a constant.
        let embeddings = matches!(options.prompt, Some(Virtual::Embeddings(_)));
        let tracked = if index == 0 && !embeddings {
            None
        } else {
            Some(Var::from_tensor(&input)?)
        };
        let x = tracked.as_ref().map_or(&input, Var::as_tensor);
        let kv = match constant {
            Some(prefix @ Virtual::Prefix(_)) => {
                let [k, v] = prefix.layer_kv(model, index)?.expect("a prefix");
                Some([Var::from_tensor(&k)?, Var::from_tensor(&v)?])
            }
            _ => None,
        };
        let prefix = kv.as_ref().map(|[k, v]| [k.as_tensor(), v.as_tensor()]);
        let y = model.layer_with_prefix(index, x, &positions, mode, prefix)?;
        let layer_grads = (y * &upstream)?.sum_all()?.backward()?;
        accumulate(&mut grads, take(&layer_grads, vars))?;
        if let Some([k, v]) = &kv {
            let grad = |var: &Var| -> Result<Tensor> {
                match layer_grads.get(var.as_tensor()) {
                    Some(grad) => Ok(grad.detach()),
                    None => var.as_tensor().zeros_like(),
                }
            };
            prefix_grads.push([grad(k)?, grad(v)?]);
        }
        if let Some(tracked) = &tracked {
            upstream = layer_grads
                .get(tracked.as_tensor())
                .expect("a layer's output depends on its input")
                .detach();
        }
    }
    let (source, at_virtual) = match options.prompt {
        None => return Ok(MicroStep { loss_sum, grads }),
        // Every row's gradient at the virtual positions flows into the one set of embeddings.
        Some(Virtual::Embeddings(prompt)) => {
            (prompt, upstream.narrow(1, 0, prompt.dim(0)?)?.sum(0)?)
        }
        // PEFT's layout, per layer a key then a value (gathered from the last layer back).
        Some(Virtual::Prefix(rows)) => {
            let parts: Vec<Tensor> = prefix_grads.into_iter().rev().flatten().collect();
            (rows, Tensor::stack(&parts, 1)?.reshape(rows.shape())?)
        }
    };
    let source_grads = (source * at_virtual.to_dtype(source.dtype())?)?
        .sum_all()?
        .backward()?;
    accumulate(&mut grads, take(&source_grads, vars))?;
    Ok(MicroStep { loss_sum, grads })
}

/// Logits a chunk of the loss may hold at once (256 MiB in f32): a Llama-3 vocabulary over
/// 2048 positions would be 1 GiB per sequence, and its log-softmax as much again.
pub const LOSS_CHUNK_LOGITS: usize = 1 << 26;

/// Positions per chunk of the loss for `batch`.
fn loss_chunk(model: &Llama, batch: &Batch) -> Result<usize> {
    let (rows, vocab) = (batch.ids.dim(0)?, model.config().vocab_size);
    Ok((LOSS_CHUNK_LOGITS / (rows * vocab).max(1)).max(1))
}

/// The chunks of positions `0..seq` the loss is taken over, `positions` scored at a time.
/// Chunks overlap by one position, since position `t`'s logits are scored against token
/// `t + 1`: a chunk of `len` scores `len − 1` tokens.
fn chunks(seq: usize, positions: usize) -> Vec<Range<usize>> {
    let positions = positions.max(1);
    let mut ranges = Vec::new();
    let mut start = 0;
    while start < seq {
        let len = (positions + 1).min(seq - start);
        ranges.push(start..start + len);
        if start + len == seq {
            break;
        }
        start += len - 1;
    }
    ranges
}

/// The loss sum of the head over hidden states `last` `[batch, seq, hidden]` and its gradient
/// with respect to `last` (divided by `denominator`), `positions` at a time: each chunk's
/// logits are built, used and dropped before the next.
pub fn head_loss(
    model: &Llama,
    last: &Tensor,
    batch: &Batch,
    denominator: f64,
    positions: usize,
) -> Result<(f32, Tensor)> {
    let seq = last.dim(1)?;
    let (mut loss_sum, mut grads) = (0f32, Vec::new());
    for range in chunks(seq, positions) {
        let len = range.len();
        let part = Var::from_tensor(&last.narrow(1, range.start, len)?)?;
        let logits = model.head(part.as_tensor())?;
        let loss = nll_sum(
            &logits,
            &batch.ids.narrow(1, range.start, len)?,
            &batch.labels.narrow(1, range.start, len)?,
        )?;
        let chunk_grads = (&loss / denominator)?.backward()?;
        // A one-token chunk scores nothing, so nothing reaches it.
        let grad = match chunk_grads.get(part.as_tensor()) {
            Some(grad) => grad.detach(),
            None => part.as_tensor().zeros_like()?,
        };
        loss_sum += loss.to_scalar::<f32>()?;
        // The overlapping last position scored nothing here: its gradient is the next chunk's.
        grads.push(if range.end == seq {
            grad
        } else {
            grad.narrow(1, 0, len - 1)?
        });
    }
    Ok((loss_sum, Tensor::cat(&grads, 1)?))
}

/// The loss sum of a batch with no graph recorded: layer by layer on detached tensors (each
/// layer's activations dropped as the next is computed), the loss in chunks as in training.
/// So evaluation never holds more than a training step does. `prompt`: a prompt-learning
/// run's virtual tokens.
pub fn eval_loss_sum(model: &Llama, batch: &Batch, prompt: Option<Virtual<'_>>) -> Result<f32> {
    let detached = prompt.map(|p| p.tensor().detach());
    let prompt = prompt.zip(detached.as_ref()).map(|(p, t)| p.with(t));
    let (h, positions) = batch.inputs(model, prompt)?;
    let mut h = h.detach();
    for index in 0..model.num_layers() {
        h = layer(model, index, &h, &positions, Mode::Eval, prompt)?;
    }
    let (h, scored) = batch.scored(&h, prompt)?;
    let mut loss_sum = 0f32;
    for range in chunks(h.dim(1)?, loss_chunk(model, batch)?) {
        let logits = model.head(&h.narrow(1, range.start, range.len())?)?;
        let loss = nll_sum(
            &logits,
            &scored.ids.narrow(1, range.start, range.len())?,
            &scored.labels.narrow(1, range.start, range.len())?,
        )?;
        loss_sum += loss.to_scalar::<f32>()?;
    }
    Ok(loss_sum)
}

/// Adds `more` into `totals`, slot by slot; a slot without a gradient stays as it is.
pub fn accumulate(totals: &mut [Option<Tensor>], more: Vec<Option<Tensor>>) -> Result<()> {
    for (total, grad) in totals.iter_mut().zip(more) {
        if let Some(grad) = grad {
            *total = Some(match total.take() {
                Some(sum) => (sum + grad)?,
                None => grad,
            });
        }
    }
    Ok(())
}

fn take(grads: &GradStore, vars: &[Var]) -> Vec<Option<Tensor>> {
    vars.iter()
        .map(|v| grads.get(v.as_tensor()).map(Tensor::detach))
        .collect()
}
