//! Continuous batching: one thread owns the forward pass. Each step packs every running
//! sequence — new prompts (in chunks) and one new token of each decoding sequence — into one
//! forward over the base model, each row through its own adapter; finished sequences leave
//! and waiting ones join between steps, so no request waits for another to finish.
//!
//! A request for several choices computes its prompt once and forks the sequence when the
//! first token is sampled. Constrained sequences get their grammar's mask computed on another
//! thread while the forward pass runs, so neither they nor the other rows wait for it.

use std::{
    collections::{HashSet, VecDeque},
    sync::{Arc, mpsc},
    time::Instant,
};

use graft_engine::{
    backend::{BLOCK_TOKENS, Block, KvCache},
    models::Segment,
};
use tokio::sync::mpsc::UnboundedSender;

use crate::{
    adapters::LoadedAdapter,
    constrain::{Constraint, Mask},
    detokenize::{Detokenizer, first_stop, held_back},
    metrics::{Load, Metrics},
    model::BaseModel,
    prefix_cache::{BlockHash, PrefixCache, block_hashes},
    sampling::{Choice, Sampler, Sampling, score},
};

/// Prompt tokens one sequence feeds per step: long prompts are split so that decoding
/// sequences in the same batch keep a steady pace.
const PREFILL_CHUNK: usize = 256;

/// Stands for a virtual token in the prefix cache's names of a sequence's blocks: what the
/// virtual tokens hold is the adapter version's, which the names include; no tokenizer has this
/// id.
const VIRTUAL_TOKEN: u32 = u32::MAX;

/// A generation request as the scheduler takes it: one prompt, one or more choices.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub stopping: Stopping,
    pub sampling: Sampling,
    /// Sequences generated from this prompt (`n`, or `best_of`); the prompt is computed once.
    pub choices: usize,
    /// The response index of the first choice; the others follow it.
    pub first_index: usize,
    /// The grammar every choice follows, if any.
    pub constraint: Option<Constraint>,
    /// `echo` with `logprobs`: the prompt's own log-probabilities, with this many of the most
    /// likely alternatives at each position.
    pub prompt_logprobs: Option<usize>,
    /// Special tokens' text is left out of the completion (vLLM's `skip_special_tokens`).
    pub skip_special_tokens: bool,
    /// `None` for the base model.
    pub adapter: Option<Arc<LoadedAdapter>>,
    /// The name the client asked for (empty for the base model), for the router's metrics.
    pub adapter_name: String,
    pub events: UnboundedSender<Event>,
}

/// When a sequence ends.
#[derive(Clone, Debug, Default)]
pub struct Stopping {
    pub max_tokens: usize,
    /// No stop of any kind (end of sequence, stop tokens, stop strings) before this many tokens.
    pub min_tokens: usize,
    pub stop: Vec<String>,
    /// Tokens that end the sequence, their text kept (unless special), as vLLM's.
    pub stop_token_ids: Vec<u32>,
    /// The model's end of sequence is an ordinary token.
    pub ignore_eos: bool,
}

/// What a request hears back: for each choice, tokens then one `Done`; or one `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The prompt's tokens scored by the model (the first has no log-probability), before
    /// the choice's first token; only when the request asked for them.
    Prompt {
        index: usize,
        tokens: Vec<Choice>,
    },
    /// New text (possibly empty while a multi-byte character is incomplete) and the token.
    Token {
        index: usize,
        text: String,
        choice: Choice,
    },
    Done {
        index: usize,
        reason: FinishReason,
        completion_tokens: usize,
    },
    Failed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End of sequence, a stop string or token, or a grammar complete.
    Stop,
    /// `max_tokens` or the context length.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// The handle the HTTP side submits requests through.
#[derive(Debug, Clone)]
pub struct Scheduler {
    submit: mpsc::SyncSender<Request>,
    metrics: Arc<Metrics>,
}

/// How much the scheduler takes on.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Sequences decoded together in one step.
    pub max_batch: usize,
    /// Requests waiting for a place in the batch; more are refused.
    pub max_waiting: usize,
    /// Tokens the KV cache holds for all sequences together: at least one whole context.
    pub kv_cache_tokens: usize,
}

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `--max-waiting` requests are already queued: the client should retry later (429).
    Busy,
    /// The scheduler has stopped (shutdown).
    Stopped,
}

impl Scheduler {
    /// Starts the batching thread; it ends when every handle is dropped and the batch drained.
    /// At most `max_waiting` requests wait for a place in the batch; the sequences' keys and
    /// values together hold at most `kv_cache_tokens` tokens.
    pub fn spawn(model: Arc<BaseModel>, limits: Limits, metrics: Arc<Metrics>) -> Self {
        let (submit, requests) = mpsc::sync_channel(limits.max_waiting.max(1));
        metrics.set_served_model(&model.info.model, model.info.max_loaded_adapters);
        let worker = Worker {
            model,
            max_batch: limits.max_batch.max(1),
            kv_blocks: limits.kv_cache_tokens / BLOCK_TOKENS,
            metrics: metrics.clone(),
        };
        std::thread::Builder::new()
            .name("graft-scheduler".to_owned())
            .spawn(move || worker.run(&requests))
            .expect("spawning the scheduler thread");
        Self { submit, metrics }
    }

    /// Queues `request`, or says why not.
    pub fn submit(&self, request: Request) -> Result<(), Refused> {
        let adapter = request.adapter_name.clone();
        self.metrics.queued(&adapter, true);
        self.submit.try_send(request).map_err(|e| {
            self.metrics.queued(&adapter, false);
            match e {
                mpsc::TrySendError::Full(_) => Refused::Busy,
                mpsc::TrySendError::Disconnected(_) => Refused::Stopped,
            }
        })
    }
}

struct Worker {
    model: Arc<BaseModel>,
    max_batch: usize,
    /// The KV cache's budget, in blocks.
    kv_blocks: usize,
    metrics: Arc<Metrics>,
}

/// One sequence: a choice of a request.
struct Running {
    request: Arc<Request>,
    index: usize,
    /// Choices still to fork from this sequence once its prompt is computed.
    forks: usize,
    constraint: Option<Constraint>,
    cache: KvCache,
    /// The prefix-cache names of the cache's full blocks registered so far.
    hashes: Vec<BlockHash>,
    /// When the request arrived: the newest sequences are preempted first.
    order: u64,
    /// What this step feeds.
    feed: Vec<u32>,
    sampler: Sampler,
    text: Detokenizer,
    generated: Vec<u32>,
    started: Instant,
    /// The prompt's log-probabilities so far, while they are asked for and being computed.
    prompt_scores: Option<Vec<Choice>>,
}

impl Running {
    /// The adapter version its keys and values are computed through (empty: the base).
    fn adapter_key(&self) -> &str {
        self.request
            .adapter
            .as_ref()
            .map_or("", |a| a.sha256.as_str())
    }

    /// A prompt-learning adapter's virtual tokens: the cache holds them before the context.
    fn virtual_len(&self) -> usize {
        self.request
            .adapter
            .as_ref()
            .map_or(0, |a| a.serving.virtual_len())
    }

    /// Tokens of the context the cache holds.
    fn cached(&self) -> usize {
        self.cache.len() - self.virtual_len()
    }

    /// Whether the cache holds the whole context.
    fn caught_up(&self) -> bool {
        self.cached() >= self.context_len()
    }

    /// The prompt and the tokens generated so far: what the cache holds once every token is
    /// fed (after any virtual tokens).
    fn context(&self) -> impl Iterator<Item = u32> + '_ {
        self.request.prompt.iter().chain(&self.generated).copied()
    }

    /// The cache's positions, by what they hold: the virtual tokens, then the context. The
    /// prefix cache names blocks by these, so a block holding virtual tokens is found only
    /// through the same adapter version.
    fn cached_tokens(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::repeat_n(VIRTUAL_TOKEN, self.virtual_len()).chain(self.context())
    }

    fn context_len(&self) -> usize {
        self.request.prompt.len() + self.generated.len()
    }

    /// The next tokens to feed: a chunk of what the cache lacks.
    fn next_feed(&self) -> Vec<u32> {
        let from = self.cached();
        let len = (self.context_len() - from).min(PREFILL_CHUNK);
        self.context().skip(from).take(len).collect()
    }

    /// Gives its keys and values back (an empty cache for a model of `layers` layers): it
    /// is computed again from its context when it is placed.
    fn release(&mut self, layers: usize) {
        self.cache = KvCache::new(layers);
        self.hashes.clear();
        self.feed.clear();
    }

    /// Blocks it needs for this step's feed beyond the full ones it holds.
    fn new_blocks(&self) -> usize {
        self.cache.blocks_for(self.feed.len()) - self.cache.blocks().len()
    }

    /// The rows of logits a step gives this sequence: one per token fed while the prompt's
    /// log-probabilities are computed, else the last.
    fn logit_rows(&self) -> usize {
        if self.prompt_scores.is_some() {
            self.feed.len()
        } else {
            1
        }
    }
}

/// Blocks in use: every block the running sequences and the prefix cache hold, each once,
/// and the blocks this step's new tokens will fill.
fn blocks_in_use(running: &[Running], prefix: &PrefixCache) -> usize {
    let mut held: HashSet<*const Block> = prefix.blocks().map(Arc::as_ptr).collect();
    let mut new = 0;
    for r in running {
        held.extend(r.cache.blocks().iter().map(Arc::as_ptr));
        new += r.new_blocks();
    }
    held.len() + new
}

impl Worker {
    fn run(&self, requests: &mpsc::Receiver<Request>) {
        let mut running: Vec<Running> = Vec::new();
        // Sequences waiting for room: preempted ones first, in the order they arrived, then
        // at most one new request that did not fit.
        let mut waiting: VecDeque<Running> = VecDeque::new();
        let mut prefix = PrefixCache::default();
        let mut arrivals = 0;
        loop {
            if running.is_empty() && waiting.is_empty() {
                self.publish(&running, &prefix);
                match requests.recv() {
                    Ok(request) => {
                        arrivals += 1;
                        waiting.push_back(self.start(request, arrivals));
                    }
                    Err(mpsc::RecvError) => return,
                }
            }
            // A client that went away frees its rows and blocks.
            running.retain(|r| !r.request.events.is_closed());
            waiting.retain(|r| !r.request.events.is_closed());
            self.admit(&mut running, &mut waiting, &mut prefix, || {
                let request = requests.try_recv().ok()?;
                arrivals += 1;
                Some(self.start(request, arrivals))
            });
            if running.is_empty() {
                continue;
            }
            self.make_room(&mut running, &mut waiting, &mut prefix);
            self.metrics.step(running.len());
            self.publish(&running, &prefix);
            let (logits, mut masks) = forward(&self.model, &mut running);
            register_blocks(&mut running, &mut prefix);
            let logits = match logits {
                Ok(logits) => logits,
                Err(e) => {
                    tracing::error!(error = %e, sequences = running.len(), "forward pass failed");
                    for r in running.drain(..) {
                        let _ = r
                            .request
                            .events
                            .send(Event::Failed(format!("forward pass failed: {e}")));
                    }
                    continue;
                }
            };
            // Sampling, grammar commits and detokenising are per sequence: done in parallel,
            // off the one thread that runs the forward passes' bookkeeping.
            let mut starts = Vec::with_capacity(running.len());
            let mut row = 0;
            for r in &running {
                starts.push(row);
                row += r.logit_rows();
            }
            let outcomes: Vec<(bool, Vec<Running>)> = {
                use rayon::prelude::*;
                running
                    .par_iter_mut()
                    .zip(masks.par_iter_mut())
                    .zip(starts)
                    .map(|((r, mask), start)| {
                        let rows = r.logit_rows();
                        let mut forks = Vec::new();
                        let keep =
                            self.advance(r, &logits[start..start + rows], mask.take(), &mut forks);
                        (keep, forks)
                    })
                    .collect()
            };
            let (mut kept, mut forks) = (Vec::with_capacity(outcomes.len()), Vec::new());
            for (keep, mut more) in outcomes {
                kept.push(keep);
                forks.append(&mut more);
            }
            let mut kept = kept.into_iter();
            running.retain(|_| kept.next().unwrap_or(false));
            running.extend(forks);
        }
    }

    /// What a router reads: queue, batch, KV usage and the adapters running.
    fn publish(&self, running: &[Running], prefix: &PrefixCache) {
        let mut adapters: Vec<&str> = running
            .iter()
            .map(|r| r.request.adapter_name.as_str())
            .filter(|a| !a.is_empty())
            .collect();
        adapters.sort_unstable();
        adapters.dedup();
        self.metrics.set_load(&Load {
            running: running.iter().map(|r| 1 + r.forks).sum(),
            kv_cache_usage: usage(blocks_in_use(running, prefix), self.kv_blocks),
            running_adapters: adapters.iter().map(|a| (*a).to_owned()).collect(),
        });
    }

    fn start(&self, mut request: Request, order: u64) -> Running {
        self.metrics.queued(&request.adapter_name, false);
        let model = &self.model;
        let constraint = request.constraint.take();
        let request = Arc::new(request);
        Running {
            text: Detokenizer::new(&request.prompt, request.skip_special_tokens),
            cache: KvCache::new(model.llama.num_layers()),
            hashes: Vec::new(),
            order,
            feed: Vec::new(),
            sampler: Sampler::new(request.sampling.clone(), &request.prompt),
            index: request.first_index,
            forks: request.choices.saturating_sub(1),
            constraint,
            generated: Vec::new(),
            started: Instant::now(),
            prompt_scores: initial_prompt_scores(&request),
            request,
        }
    }

    /// Gives `r` a cache that starts with the longest run of its blocks the prefix cache
    /// holds (leaving at least one token to feed, whose logits come next), and its first feed.
    /// Behind virtual tokens the run starts after the blocks that hold virtual tokens only:
    /// those are the adapter version's own, computed when it was loaded.
    fn place(&self, r: &mut Running, prefix: &mut PrefixCache) {
        let tokens: Vec<u32> = r.cached_tokens().collect();
        let hashes = block_hashes(r.adapter_key(), &tokens, &[]);
        let start = r
            .request
            .adapter
            .as_ref()
            .and_then(|a| a.serving.virtual_prefix());
        let own = start.map_or(0, |s| s.blocks().len());
        // Prompt log-probabilities need every prompt row computed.
        let limit = if r.prompt_scores.is_some() {
            0
        } else {
            ((tokens.len() - 1) / BLOCK_TOKENS).saturating_sub(own)
        };
        let found = prefix.lookup(&hashes[own..], limit);
        let hit = if found.is_empty() {
            0
        } else {
            (own + found.len()) * BLOCK_TOKENS - r.virtual_len()
        };
        self.metrics.prefix_lookup(r.context_len(), hit);
        r.hashes = hashes[..own + found.len()].to_vec();
        r.cache = match start {
            Some(start) if found.is_empty() => start.clone(),
            _ => {
                let own_blocks = start.map(|s| s.blocks().iter().cloned());
                let blocks = own_blocks.into_iter().flatten().chain(found).collect();
                KvCache::with_prefix(self.model.llama.num_layers(), blocks)
            }
        };
        r.feed = r.next_feed();
    }

    /// Moves waiting sequences, then new requests (from `next`), into the batch while rows
    /// are free and the blocks for their whole context fit: a sequence admitted can finish its
    /// prompt without preempting others.
    fn admit(
        &self,
        running: &mut Vec<Running>,
        waiting: &mut VecDeque<Running>,
        prefix: &mut PrefixCache,
        mut next: impl FnMut() -> Option<Running>,
    ) {
        loop {
            // Each sequence, and each choice still to fork, takes a row.
            if running.iter().map(|r| 1 + r.forks).sum::<usize>() >= self.max_batch {
                return;
            }
            let Some(mut candidate) = waiting.pop_front().or_else(&mut next) else {
                return;
            };
            self.place(&mut candidate, prefix);
            // Its whole context and the token after it, beyond the cached blocks it starts with.
            let whole = (candidate.virtual_len() + candidate.context_len() + 1)
                .div_ceil(BLOCK_TOKENS)
                - candidate.cache.blocks().len();
            let fits = loop {
                if blocks_in_use(running, prefix) + whole <= self.kv_blocks {
                    break true;
                }
                if !prefix.evict_one() {
                    break false;
                }
            };
            if !fits && !running.is_empty() {
                // Waiting, it pins no cached block.
                candidate.release(self.model.llama.num_layers());
                waiting.push_front(candidate);
                return;
            }
            running.push(candidate);
        }
    }

    /// Frees blocks until this step's fit: cached blocks no sequence uses first, then the
    /// newest sequences, which give theirs back and are computed again when there is room.
    fn make_room(
        &self,
        running: &mut Vec<Running>,
        waiting: &mut VecDeque<Running>,
        prefix: &mut PrefixCache,
    ) {
        while blocks_in_use(running, prefix) > self.kv_blocks {
            if prefix.evict_one() {
                continue;
            }
            if running.len() <= 1 {
                // One sequence always fits: the budget holds a whole context (checked at
                // start-up).
                return;
            }
            let Some(newest) = running
                .iter()
                .enumerate()
                .max_by_key(|(_, r)| r.order)
                .map(|(i, _)| i)
            else {
                return;
            };
            let mut r = running.remove(newest);
            r.release(self.model.llama.num_layers());
            if r.prompt_scores.is_some() {
                r.prompt_scores = initial_prompt_scores(&r.request);
            }
            self.metrics.preempted();
            // Ahead of the others waiting: it arrived before them.
            let at = waiting
                .iter()
                .position(|w| w.order > r.order)
                .unwrap_or(waiting.len());
            waiting.insert(at, r);
        }
    }

    /// Takes one step's logits (a row per token fed while the prompt is scored, else the
    /// last); false when the sequence is finished. A sequence whose prompt is done forks its
    /// other choices first, each sampling from the same logits.
    fn advance(
        &self,
        r: &mut Running,
        rows: &[Vec<f32>],
        mask: Option<Result<Mask, String>>,
        forks: &mut Vec<Running>,
    ) -> bool {
        if let (Some(scores), Some(top)) = (r.prompt_scores.as_mut(), r.request.prompt_logprobs) {
            // Row i predicts the token after it; the last prompt row predicts the first
            // generated one, which is sampled as usual.
            let prompt = &r.request.prompt;
            for logits in rows {
                if let Some(&next) = prompt.get(scores.len()) {
                    scores.push(score(logits, next, top));
                }
            }
        }
        let Some(logits) = rows.last() else {
            return false;
        };
        if !r.caught_up() {
            r.feed = r.next_feed();
            return true;
        }
        let mask = match mask.transpose() {
            Ok(mask) => mask,
            Err(e) => {
                let _ = r
                    .request
                    .events
                    .send(Event::Failed(format!("structured output: {e}")));
                return false;
            }
        };
        if let Some(tokens) = r.prompt_scores.take() {
            for index in r.index..=r.index + r.forks {
                let _ = r.request.events.send(Event::Prompt {
                    index,
                    tokens: tokens.clone(),
                });
            }
        }
        if r.forks > 0 {
            self.metrics.first_token(r.started.elapsed());
            for choice in 1..=r.forks {
                let mut fork = Running {
                    request: r.request.clone(),
                    index: r.index + choice,
                    forks: 0,
                    constraint: r.constraint.clone(),
                    cache: r.cache.clone(),
                    hashes: r.hashes.clone(),
                    order: r.order,
                    feed: Vec::new(),
                    sampler: r.sampler.fork(choice),
                    text: r.text.clone(),
                    generated: Vec::new(),
                    started: r.started,
                    prompt_scores: None,
                };
                if self.decode(&mut fork, logits, mask.as_ref()) {
                    forks.push(fork);
                }
            }
            r.forks = 0;
        } else if r.generated.is_empty() {
            self.metrics.first_token(r.started.elapsed());
        }
        self.decode(r, logits, mask.as_ref())
    }

    /// Samples one token and sends its text; false when the sequence is finished.
    fn decode(&self, r: &mut Running, logits: &[f32], mask: Option<&Mask>) -> bool {
        let model = &self.model;
        let stopping = &r.request.stopping;
        let early = r.generated.len() < stopping.min_tokens;
        let banned: Vec<u32> = if early {
            let eos = (!stopping.ignore_eos).then_some(model.eos_ids.as_slice());
            stopping
                .stop_token_ids
                .iter()
                .chain(eos.into_iter().flatten())
                .copied()
                .collect()
        } else {
            Vec::new()
        };
        let choice = r.sampler.sample(logits, mask, &banned);
        let token = choice.token;
        let eos = !stopping.ignore_eos && model.eos_ids.contains(&token);
        let mut grammar_done = false;
        if let Some(constraint) = r.constraint.as_mut().filter(|_| !eos) {
            if let Err(e) = constraint.commit(token) {
                let _ = r
                    .request
                    .events
                    .send(Event::Failed(format!("structured output: {e}")));
                return false;
            }
            grammar_done = constraint.is_finished();
        }
        if !eos {
            r.generated.push(token);
            r.text.push(&model.tokenizer, token);
        }
        let stops: &[String] = if early { &[] } else { &stopping.stop };
        let ending = if eos || grammar_done || stopping.stop_token_ids.contains(&token) {
            Some(FinishReason::Stop)
        } else if r.generated.len() >= stopping.max_tokens
            || r.cache.len() + 1 >= model.max_model_len
        {
            Some(FinishReason::Length)
        } else {
            None
        };
        if ending.is_some() {
            r.text.finish(&model.tokenizer);
        }
        let mut end = r.text.text().len();
        let mut finish = ending;
        if let Some(at) = first_stop(r.text.text(), stops, r.text.sent) {
            end = at;
            finish = Some(FinishReason::Stop);
        }
        let text = r.text.text();
        // Hold back an incomplete character (decoded as U+FFFD) and a possible stop-string
        // prefix until the next token settles them.
        let sent = r.text.sent;
        let settled = if finish.is_some() {
            end
        } else {
            held_back(text, stops).max(sent)
        };
        let delta = text.get(sent..settled).unwrap_or_default().to_owned();
        r.text.sent = settled.max(sent);
        let index = r.index;
        if !eos {
            let _ = r.request.events.send(Event::Token {
                index,
                text: delta,
                choice,
            });
        } else if !delta.is_empty() {
            let _ = r.request.events.send(Event::Token {
                index,
                text: delta,
                choice: Choice {
                    token,
                    logprob: None,
                    top: Vec::new(),
                },
            });
        }
        if let Some(reason) = finish {
            let completion_tokens = r.generated.len() + usize::from(eos);
            self.metrics.finished(
                if r.index == r.request.first_index {
                    r.request.prompt.len()
                } else {
                    0
                },
                completion_tokens,
                r.started.elapsed(),
            );
            let _ = r.request.events.send(Event::Done {
                index,
                reason,
                completion_tokens,
            });
            return false;
        }
        r.feed = r.next_feed();
        true
    }
}

type Logits = candle_core::Result<Vec<Vec<f32>>>;

/// One forward pass over every running sequence and, meanwhile on another thread, the
/// grammar masks of the constrained sequences that sample this step.
fn forward(
    model: &BaseModel,
    running: &mut [Running],
) -> (Logits, Vec<Option<Result<Mask, String>>>) {
    let rows = running.len();
    let mut segments = Vec::with_capacity(rows);
    let every_row: Vec<bool> = running.iter().map(|r| r.prompt_scores.is_some()).collect();
    let mut constrained = Vec::new();
    for (row, r) in running.iter_mut().enumerate() {
        let sampling = r.cached() + r.feed.len() == r.context_len();
        let Running {
            request,
            feed,
            cache,
            constraint,
            ..
        } = r;
        segments.push(Segment {
            tokens: feed,
            cache,
            adapter: request.adapter.as_deref().map(|a| &a.serving),
        });
        if sampling && let Some(constraint) = constraint.as_mut() {
            constrained.push((row, constraint));
        }
    }
    std::thread::scope(|scope| {
        let masker = (!constrained.is_empty()).then(|| {
            scope.spawn(move || {
                use rayon::prelude::*;
                constrained
                    .into_par_iter()
                    .map(|(row, constraint)| (row, constraint.mask()))
                    .collect::<Vec<_>>()
            })
        });
        // On one of the pool's threads: each of the step's many parallel ops then starts on
        // the thread that asks for it, where from this thread every op would wait for the
        // pool to wake and for this thread to be woken again.
        let logits = rayon::scope(|_| {
            model
                .llama
                .forward_packed_rows(&mut segments, &every_row)
                .and_then(|l| l.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>())
        });
        let mut masks: Vec<Option<Result<Mask, String>>> = vec![None; rows];
        if let Some(masker) = masker {
            let computed = masker
                .join()
                .unwrap_or_else(|_| vec![(0, Err("the mask thread panicked".to_owned()))]);
            for (row, mask) in computed {
                masks[row] = Some(mask);
            }
        }
        (logits, masks)
    })
}

/// A request's prompt log-probabilities before any is computed: the first token has none.
fn initial_prompt_scores(request: &Request) -> Option<Vec<Choice>> {
    request.prompt_logprobs.map(|_| {
        vec![Choice {
            token: request.prompt[0],
            logprob: None,
            top: Vec::new(),
        }]
    })
}

/// Names the blocks each sequence filled in the last step and keeps them for reuse.
fn register_blocks(running: &mut [Running], prefix: &mut PrefixCache) {
    for r in running.iter_mut() {
        let full = r.cache.blocks().len();
        if r.hashes.len() >= full {
            continue;
        }
        let tokens: Vec<u32> = r.cached_tokens().take(full * BLOCK_TOKENS).collect();
        // Blocks of virtual tokens only are the adapter version's, found through it.
        let known = r.hashes.len().max(r.virtual_len() / BLOCK_TOKENS);
        r.hashes = block_hashes(r.adapter_key(), &tokens, &r.hashes);
        for (hash, block) in r.hashes[known..].iter().zip(&r.cache.blocks()[known..]) {
            prefix.insert(*hash, block);
        }
    }
}

/// `used` of `capacity` blocks, 0 to 1.
fn usage(used: usize, capacity: usize) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let usage = used as f64 / capacity.max(1) as f64;
    usage.min(1.0)
}
