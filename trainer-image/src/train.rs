//! The training loop: epochs of seeded shuffles of rows (an example each, or several packed:
//! [`crate::packing`]) cut into micro-batches, gradient accumulation
//! over `gradientAccumulationSteps` of them, clipping, AdamW on the schedule, evaluation at
//! each epoch's end, and checkpoints that make a resumed run equal an uninterrupted one.
//!
//! Everything random is a function of the seed and a position (the epoch for the shuffle, the
//! micro-batch for dropout), so resuming needs only the step count, not a generator's state.

use std::time::Instant;

use candle_core::{Device, Result as TensorResult, Tensor};
use graft_api::Scheduler;
use graft_engine::{adapters::PeftAdapter, backend::Dropout, models::Llama, rng::Rng};

use crate::{
    adapters::{Adapters, Prompt},
    backward::{Batch, StepOptions, accumulate, eval_loss_sum, micro_step},
    checkpoint::{BestEval, Checkpoint},
    optim::{AdamW, AdamWParams, clip_grad_norm},
    packing::{collate_rows, pack},
    schedule::learning_rate,
};

/// One training example: token ids and which of them are learned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub labels: Vec<bool>,
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub epochs: u32,
    pub batch_size: usize,
    pub accumulation: usize,
    pub learning_rate: f64,
    pub warmup_steps: u64,
    pub scheduler: Scheduler,
    pub max_grad_norm: f64,
    /// AdamW's decoupled weight decay on the adapter weights.
    pub weight_decay: f64,
    pub seed: u64,
    pub dropout: f64,
    /// Layer-wise recomputation in the backward pass.
    pub recompute: bool,
    /// 0: no checkpoints.
    pub checkpoint_every: u64,
    /// Evaluate every this many steps as well as at each epoch's end; 0: at epochs' ends only.
    pub eval_every: u64,
    /// Id used to pad micro-batches (never learned).
    pub pad_id: u32,
    /// Batches of examples of similar length (transformers' `group_by_length`).
    pub group_by_length: bool,
    /// Several examples per row of at most this many tokens ([`crate::packing`]); `None`:
    /// one example per row.
    pub packing: Option<usize>,
    /// The adapter of the evaluation with the lowest loss is the one the run ends with.
    pub keep_best: bool,
    /// Stop after this many evaluations without a lower loss; 0: never.
    pub early_stopping_patience: u32,
}

/// What one optimizer step did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// Steps done, counting this one.
    pub step: u64,
    pub total_steps: u64,
    pub epoch: u32,
    /// Mean loss per learned token over the step's micro-batches.
    pub loss: f64,
    /// Set on the steps that evaluate (each epoch's end, and every `eval_every` steps), when
    /// there is a validation split.
    pub eval_loss: Option<f64>,
    pub grad_norm: f64,
    pub learning_rate: f64,
    pub tokens: usize,
    pub tokens_per_second: f64,
    pub eta_seconds: u64,
}

pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// What the loop tells the outside world; the trainer binary prints, patches status and
/// uploads checkpoints from here.
pub trait Hooks {
    fn step(&mut self, report: &StepReport) -> Result<(), HookError>;
    fn checkpoint(&mut self, checkpoint: &Checkpoint) -> Result<(), HookError>;
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error("{0}")]
    Hook(HookError),
    #[error("the checkpoint does not belong to this run: {0}")]
    ForeignCheckpoint(String),
}

/// The run's shape, fixed by the data and settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub micro_batches_per_epoch: usize,
    pub steps_per_epoch: u64,
    pub total_steps: u64,
}

impl Plan {
    pub fn new(examples: usize, settings: &Settings) -> Self {
        let micro_batches_per_epoch = examples.div_ceil(settings.batch_size);
        let steps_per_epoch = micro_batches_per_epoch.div_ceil(settings.accumulation) as u64;
        Self {
            micro_batches_per_epoch,
            steps_per_epoch,
            total_steps: steps_per_epoch * u64::from(settings.epochs),
        }
    }
}

#[derive(Debug)]
pub struct Trainer {
    model: Llama,
    adapters: Adapters,
    optimizer: AdamW,
    settings: Settings,
    train: Vec<Example>,
    /// The training examples' indices in each row a micro-batch takes.
    rows: Vec<Vec<usize>>,
    eval: Vec<Example>,
    plan: Plan,
    /// Optimizer steps done.
    step: u64,
    best: Option<BestEval>,
    best_adapter: Option<PeftAdapter>,
    evals_since_best: u32,
    /// The step after which early stopping ended the run.
    stopped_early: Option<u64>,
}

impl Trainer {
    pub fn new(
        model: Llama,
        adapters: Adapters,
        settings: Settings,
        train: Vec<Example>,
        eval: Vec<Example>,
    ) -> TensorResult<Self> {
        let params = AdamWParams {
            weight_decay: settings.weight_decay,
            ..AdamWParams::default()
        };
        let optimizer = AdamW::new(adapters.vars(), params)?;
        let rows = match settings.packing {
            Some(capacity) => {
                let lengths: Vec<usize> = train.iter().map(|e| e.ids.len()).collect();
                pack(&lengths, capacity)
            }
            None => (0..train.len()).map(|i| vec![i]).collect(),
        };
        let plan = Plan::new(rows.len(), &settings);
        Ok(Self {
            model,
            adapters,
            optimizer,
            settings,
            train,
            rows,
            eval,
            plan,
            step: 0,
            best: None,
            best_adapter: None,
            evals_since_best: 0,
            stopped_early: None,
        })
    }

    /// The evaluation with the lowest loss so far.
    pub fn best(&self) -> Option<BestEval> {
        self.best
    }

    /// The step after which early stopping ended the run, if it did.
    pub fn stopped_early(&self) -> Option<u64> {
        self.stopped_early
    }

    /// What the run publishes: the best evaluation's adapter with `keep_best`, else the last.
    pub fn result(&self) -> TensorResult<PeftAdapter> {
        match (&self.best_adapter, self.settings.keep_best) {
            (Some(best), true) => Ok(best.clone()),
            _ => self.adapters.snapshot(),
        }
    }

    /// Notes an evaluation's loss: a new best (kept when asked), or one more without; whether
    /// early stopping ends the run here.
    fn record_eval(&mut self, eval_loss: f64) -> TensorResult<bool> {
        if self.best.is_none_or(|b| eval_loss < b.eval_loss) {
            self.best = Some(BestEval {
                step: self.step,
                eval_loss,
            });
            self.evals_since_best = 0;
            if self.settings.keep_best {
                self.best_adapter = Some(self.adapters.snapshot()?);
            }
        } else {
            self.evals_since_best += 1;
        }
        let patience = self.settings.early_stopping_patience;
        Ok(patience > 0 && self.evals_since_best >= patience)
    }

    pub fn plan(&self) -> Plan {
        self.plan
    }

    /// Rows a training epoch has: the examples, or fewer when packed.
    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn adapters(&self) -> &Adapters {
        &self.adapters
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// Continues from `checkpoint` (this run's, from an earlier attempt).
    pub fn resume(&mut self, checkpoint: Checkpoint) -> Result<(), TrainError> {
        let state = &checkpoint.state;
        if state.seed != self.settings.seed || state.total_steps != self.plan.total_steps {
            return Err(TrainError::ForeignCheckpoint(format!(
                "it was made with seed {} for {} steps, this run has seed {} and {} steps",
                state.seed, state.total_steps, self.settings.seed, self.plan.total_steps
            )));
        }
        self.adapters.load(&checkpoint.adapter)?;
        if let Some(prompt) = self
            .adapters
            .prompt
            .as_ref()
            .filter(|p| p.encoder.is_some())
        {
            let Some(encoder) = &checkpoint.encoder else {
                return Err(TrainError::ForeignCheckpoint(
                    "it holds no prompt encoder, and this run trains one (P-tuning's, or \
                     prefix tuning's reparameterisation MLP)"
                        .to_owned(),
                ));
            };
            prompt.load(encoder)?;
        }
        self.optimizer
            .restore(checkpoint.optimizer_steps, checkpoint.moments)?;
        self.step = state.step;
        self.best = state.best;
        self.evals_since_best = state.evals_since_best;
        self.best_adapter = checkpoint.best_adapter;
        Ok(())
    }

    /// Trains to the last step.
    pub fn run(&mut self, hooks: &mut dyn Hooks) -> Result<(), TrainError> {
        let started = Instant::now();
        let first = self.step;
        let mut tokens_done = 0usize;
        while self.step < self.plan.total_steps {
            let (loss, grad_norm, lr, tokens) = self.optimizer_step()?;
            self.step += 1;
            tokens_done += tokens;
            let epoch_end = self.step.is_multiple_of(self.plan.steps_per_epoch);
            let every = self.settings.eval_every;
            let due = epoch_end || (every > 0 && self.step.is_multiple_of(every));
            let eval_loss = if due && !self.eval.is_empty() {
                Some(self.eval_loss()?)
            } else {
                None
            };
            let stop = match eval_loss {
                Some(loss) => self.record_eval(loss)?,
                None => false,
            };
            let elapsed = started.elapsed().as_secs_f64().max(1e-9);
            #[allow(
                clippy::cast_precision_loss,
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss
            )]
            let report = StepReport {
                step: self.step,
                total_steps: self.plan.total_steps,
                epoch: ((self.step - 1) / self.plan.steps_per_epoch) as u32,
                loss,
                eval_loss,
                grad_norm,
                learning_rate: lr,
                tokens,
                tokens_per_second: tokens_done as f64 / elapsed,
                eta_seconds: (elapsed / (self.step - first) as f64
                    * (self.plan.total_steps - self.step) as f64)
                    .round() as u64,
            };
            hooks.step(&report).map_err(TrainError::Hook)?;
            if stop {
                self.stopped_early = Some(self.step);
                break;
            }
            let every = self.settings.checkpoint_every;
            if every > 0 && self.step.is_multiple_of(every) && self.step < self.plan.total_steps {
                hooks
                    .checkpoint(&self.checkpoint()?)
                    .map_err(TrainError::Hook)?;
            }
        }
        Ok(())
    }

    /// A prompt-learning run's virtual tokens' embeddings or prefix, made from its vars.
    fn prompt_embeddings(&self) -> TensorResult<Option<Tensor>> {
        self.adapters
            .prompt
            .as_ref()
            .map(Prompt::embeddings)
            .transpose()
    }

    /// The state a resumed run needs.
    pub fn checkpoint(&self) -> TensorResult<Checkpoint> {
        let (optimizer_steps, moments) = self.optimizer.state();
        Ok(Checkpoint {
            adapter: self.adapters.snapshot()?,
            encoder: self
                .adapters
                .prompt
                .as_ref()
                .filter(|p| p.encoder.is_some())
                .map(Prompt::snapshot)
                .transpose()?,
            best_adapter: self.best_adapter.clone(),
            optimizer_steps,
            moments: moments
                .iter()
                .map(|(m, v)| Ok((m.copy()?, v.copy()?)))
                .collect::<TensorResult<_>>()?,
            state: crate::checkpoint::State {
                step: self.step,
                total_steps: self.plan.total_steps,
                seed: self.settings.seed,
                epoch: u32::try_from(self.step / self.plan.steps_per_epoch.max(1))
                    .unwrap_or(u32::MAX),
                next_micro_batch: self.micro_batches_of(self.step).start,
                best: self.best,
                evals_since_best: self.evals_since_best,
            },
        })
    }

    /// Micro-batch indices (within the epoch's order) that optimizer step `step` consumes.
    fn micro_batches_of(&self, step: u64) -> std::ops::Range<usize> {
        let within = usize::try_from(step % self.plan.steps_per_epoch).expect("fits");
        let start = within * self.settings.accumulation;
        start..(start + self.settings.accumulation).min(self.plan.micro_batches_per_epoch)
    }

    /// `(loss per learned token, gradient norm before clipping, learning rate, tokens)`.
    fn optimizer_step(&mut self) -> TensorResult<(f64, f64, f64, usize)> {
        let s = &self.settings;
        let epoch = self.step / self.plan.steps_per_epoch;
        let mut order = shuffled(self.rows.len(), s.seed, epoch);
        let row_len = |i: usize| self.rows[i].iter().map(|&e| self.train[e].ids.len()).sum();
        if s.group_by_length {
            group_by_length(&mut order, s.batch_size, row_len);
        }
        let device = self.model.device().clone();
        let batches: Vec<(usize, Batch)> = self
            .micro_batches_of(self.step)
            .map(|m| {
                let rows: Vec<Vec<&Example>> = order
                    .iter()
                    .skip(m * s.batch_size)
                    .take(s.batch_size)
                    .map(|&r| self.rows[r].iter().map(|&i| &self.train[i]).collect())
                    .collect();
                Ok((m, collate_rows(&rows, s.pad_id, &device)?))
            })
            .collect::<TensorResult<_>>()?;
        // Made once per step from the vars (P-tuning's encoder runs here), shared by every
        // micro-batch.
        let made = self.prompt_embeddings()?;
        let prompt = made.as_ref().map(|t| self.adapters.virtual_tokens_of(t));
        let label_tokens = batches
            .iter()
            .map(|(_, b)| b.scored_tokens(prompt))
            .sum::<TensorResult<usize>>()?;
        #[allow(clippy::cast_precision_loss)]
        let denominator = label_tokens.max(1) as f64;
        let vars = self.adapters.vars();
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut loss_sum = 0f64;
        let mut tokens = 0;
        for (m, batch) in &batches {
            let micro_index = epoch * self.plan.micro_batches_per_epoch as u64 + *m as u64;
            let dropout = (s.dropout > 0.0).then(|| Dropout {
                p: s.dropout,
                seed: Rng::seed(s.seed ^ micro_index.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                    .next_u64(),
                first_row: 0,
            });
            let options = StepOptions {
                dropout,
                recompute: s.recompute,
                prompt,
            };
            let micro = micro_step(&self.model, &vars, batch, denominator, options)?;
            loss_sum += f64::from(micro.loss_sum);
            tokens += batch.tokens;
            accumulate(&mut grads, micro.grads)?;
        }
        let grad_norm = clip_grad_norm(&mut grads, s.max_grad_norm)?;
        let lr = learning_rate(
            s.learning_rate,
            s.scheduler,
            self.step,
            s.warmup_steps,
            self.plan.total_steps,
        );
        self.optimizer.step(&grads, lr)?;
        Ok((loss_sum / denominator, grad_norm, lr, tokens))
    }

    /// Mean loss per learned token on the validation split, without dropout and without a
    /// graph ([`eval_loss_sum`]).
    pub fn eval_loss(&self) -> TensorResult<f64> {
        let (mut sum, mut count) = (0f64, 0usize);
        let made = self.prompt_embeddings()?;
        let prompt = made.as_ref().map(|t| self.adapters.virtual_tokens_of(t));
        for chunk in self.eval.chunks(self.settings.batch_size) {
            let examples: Vec<&Example> = chunk.iter().collect();
            let batch = collate(&examples, self.settings.pad_id, self.model.device())?;
            sum += f64::from(eval_loss_sum(&self.model, &batch, prompt)?);
            count += batch.scored_tokens(prompt)?;
        }
        #[allow(clippy::cast_precision_loss)]
        Ok(sum / count.max(1) as f64)
    }
}

/// Reorders a shuffled `order` so that batches hold examples of similar length, as
/// transformers' `LengthGroupedSampler` does: chunks of 50 batches, each sorted longest first,
/// and the longest example of all swapped to the very front (a run that will run out of
/// memory does so at its first step).
fn group_by_length(order: &mut [usize], batch_size: usize, len: impl Fn(usize) -> usize) {
    let chunk = (batch_size * 50).max(1);
    for part in order.chunks_mut(chunk) {
        part.sort_by_key(|&i| std::cmp::Reverse(len(i)));
    }
    let longest = (0..order.len())
        .step_by(chunk)
        .max_by_key(|&head| (len(order[head]), std::cmp::Reverse(head)));
    if let Some(head) = longest {
        order.swap(0, head);
    }
}

/// The epoch's order of example indices, from the seed and the epoch alone.
fn shuffled(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    Rng::seed(seed ^ epoch.wrapping_mul(0xA076_1D64_78BD_642F)).permutation(n)
}

/// Right-pads `examples` into one micro-batch, a row each. Under a causal mask, padding after a
/// row's last token changes nothing before it, so no attention mask is needed; padding is never
/// learned.
pub fn collate(examples: &[&Example], pad_id: u32, device: &Device) -> TensorResult<Batch> {
    let rows: Vec<Vec<&Example>> = examples.iter().map(|&e| vec![e]).collect();
    collate_rows(&rows, pad_id, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_rounds_partial_batches_and_steps_up() {
        let settings = Settings {
            epochs: 3,
            batch_size: 4,
            accumulation: 2,
            learning_rate: 1e-3,
            warmup_steps: 0,
            scheduler: Scheduler::Constant,
            max_grad_norm: 1.0,
            seed: 1,
            dropout: 0.0,
            recompute: false,
            weight_decay: 0.0,
            checkpoint_every: 0,
            eval_every: 0,
            pad_id: 0,
            group_by_length: false,
            packing: None,
            keep_best: false,
            early_stopping_patience: 0,
        };
        // 10 examples → 3 micro-batches (4, 4, 2) → 2 steps (2 + 1 micro-batches) per epoch.
        assert_eq!(
            Plan::new(10, &settings),
            Plan {
                micro_batches_per_epoch: 3,
                steps_per_epoch: 2,
                total_steps: 6
            }
        );
    }

    #[test]
    fn length_grouping_sorts_chunks_of_fifty_batches_longest_first() {
        // 230 examples, batch 2: chunks of 100; lengths from a fixed shuffle.
        let lengths: Vec<usize> = shuffled(230, 3, 0)
            .iter()
            .map(|&i| (i * 37) % 101)
            .collect();
        let mut order = shuffled(230, 9, 0);
        let before = order.clone();
        group_by_length(&mut order, 2, |i| lengths[i]);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..230).collect::<Vec<_>>(), "a permutation still");
        let longest = (0..230).map(|i| lengths[i]).max().unwrap_or(0);
        assert_eq!(lengths[order[0]], longest, "the longest example first");
        // Past the head of each chunk (one of which may have been swapped to the front).
        for part in [&order[1..100], &order[101..200], &order[201..]] {
            for pair in part.windows(2) {
                assert!(
                    lengths[pair[0]] >= lengths[pair[1]],
                    "each chunk longest first"
                );
            }
        }
        assert_ne!(order, before);
    }

    #[test]
    fn shuffles_are_permutations_that_differ_by_epoch_and_repeat_by_seed() {
        let a = shuffled(50, 7, 0);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(a, shuffled(50, 7, 0));
        assert_ne!(a, shuffled(50, 7, 1));
        assert_ne!(a, shuffled(50, 8, 0));
    }

    #[test]
    fn collate_pads_right_and_never_learns_padding() -> TensorResult<()> {
        let a = Example {
            ids: vec![1, 2, 3],
            labels: vec![false, true, true],
        };
        let b = Example {
            ids: vec![4],
            labels: vec![true],
        };
        let batch = collate(&[&a, &b], 9, &Device::Cpu)?;
        assert_eq!(batch.ids.to_vec2::<u32>()?, [[1, 2, 3], [4, 9, 9]]);
        assert_eq!(
            batch.labels.to_vec2::<f32>()?,
            [[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
        );
        assert_eq!(
            batch.label_tokens, 2,
            "a row's first token is never predicted"
        );
        assert_eq!(batch.tokens, 4);
        Ok(())
    }
}
