//! Continuous batching: one thread owns the forward pass. Each step packs every running
//! sequence — new prompts (in chunks) and one new token of each decoding sequence — into one
//! forward over the base model, each row through its own adapter; finished sequences leave
//! and waiting ones join between steps, so no request waits for another to finish.

use std::{
    sync::{Arc, mpsc},
    time::Instant,
};

use graft_engine::{backend::KvCache, models::Segment};
use tokio::sync::mpsc::UnboundedSender;

use crate::{
    adapters::LoadedAdapter,
    metrics::Metrics,
    model::BaseModel,
    sampling::{Choice, Sampler, Sampling},
};

/// Prompt tokens one sequence feeds per step: long prompts are split so that decoding
/// sequences in the same batch keep a steady pace.
const PREFILL_CHUNK: usize = 256;

/// A generation request as the scheduler takes it.
#[derive(Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub sampling: Sampling,
    /// `None` for the base model.
    pub adapter: Option<Arc<LoadedAdapter>>,
    pub events: UnboundedSender<Event>,
}

/// What a request hears back, in order: tokens, then exactly one `Done` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New text (possibly empty while a multi-byte character is incomplete) and the token.
    Token {
        text: String,
        choice: Choice,
    },
    Done {
        reason: FinishReason,
        usage: Usage,
    },
    Failed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End of sequence or a stop string.
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// The handle the HTTP side submits requests through.
#[derive(Debug, Clone)]
pub struct Scheduler {
    submit: mpsc::SyncSender<Request>,
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
    /// At most `max_waiting` requests wait for a place in the batch.
    pub fn spawn(
        model: Arc<BaseModel>,
        max_batch: usize,
        max_waiting: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (submit, requests) = mpsc::sync_channel(max_waiting.max(1));
        std::thread::Builder::new()
            .name("graft-scheduler".to_owned())
            .spawn(move || run(&model, max_batch.max(1), &metrics, &requests))
            .expect("spawning the scheduler thread");
        Self { submit }
    }

    /// Queues `request`, or says why not.
    pub fn submit(&self, request: Request) -> Result<(), Refused> {
        self.submit.try_send(request).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => Refused::Busy,
            mpsc::TrySendError::Disconnected(_) => Refused::Stopped,
        })
    }
}

struct Running {
    request: Request,
    cache: KvCache,
    /// Prompt tokens not yet fed.
    pending: usize,
    /// What this step feeds.
    feed: Vec<u32>,
    sampler: Sampler,
    /// The last prompt tokens and their text: decoding the completion after them keeps what
    /// a tokenizer drops at the start of a text (SentencePiece's leading space).
    prefix: Vec<u32>,
    prefix_text: String,
    generated: Vec<u32>,
    /// Bytes of the decoded completion already sent.
    sent: usize,
    started: Instant,
}

fn run(model: &BaseModel, max_batch: usize, metrics: &Metrics, requests: &mpsc::Receiver<Request>) {
    let mut running: Vec<Running> = Vec::new();
    loop {
        if running.is_empty() {
            match requests.recv() {
                Ok(request) => running.push(start(model, request)),
                Err(mpsc::RecvError) => return,
            }
        }
        while running.len() < max_batch {
            match requests.try_recv() {
                Ok(request) => running.push(start(model, request)),
                Err(_) => break,
            }
        }
        // A client that went away frees its row.
        running.retain(|r| !r.request.events.is_closed());
        if running.is_empty() {
            continue;
        }
        metrics.step(running.len());
        let logits = {
            let mut segments: Vec<Segment<'_>> = running
                .iter_mut()
                .map(|r| Segment {
                    tokens: &r.feed,
                    cache: &mut r.cache,
                    adapter: r.request.adapter.as_deref().map(|a| &a.serving),
                })
                .collect();
            model
                .llama
                .forward_packed(&mut segments)
                .and_then(|l| l.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>())
        };
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
        let mut index = 0;
        running.retain_mut(|r| {
            let row = &logits[index];
            index += 1;
            advance(model, metrics, r, row)
        });
    }
}

fn start(model: &BaseModel, request: Request) -> Running {
    let first = request.prompt.len().min(PREFILL_CHUNK);
    let prefix = request.prompt[request.prompt.len().saturating_sub(4)..].to_vec();
    let prefix_text = model.tokenizer.decode(&prefix, true).unwrap_or_default();
    Running {
        prefix,
        prefix_text,
        cache: KvCache::new(model.llama.num_layers()),
        pending: request.prompt.len() - first,
        feed: request.prompt[..first].to_vec(),
        sampler: Sampler::new(request.sampling.clone()),
        generated: Vec::new(),
        sent: 0,
        started: Instant::now(),
        request,
    }
}

/// Takes one step's logits; false when the sequence is finished.
fn advance(model: &BaseModel, metrics: &Metrics, r: &mut Running, logits: &[f32]) -> bool {
    if r.pending > 0 {
        let from = r.request.prompt.len() - r.pending;
        let len = r.pending.min(PREFILL_CHUNK);
        r.feed = r.request.prompt[from..from + len].to_vec();
        r.pending -= len;
        return true;
    }
    let choice = r.sampler.sample(logits);
    if r.generated.is_empty() {
        metrics.first_token(r.started.elapsed());
    }
    let token = choice.token;
    let eos = model.eos_ids.contains(&token);
    if !eos {
        r.generated.push(token);
    }
    let text = completion_text(model, r);
    let mut finish = None;
    let mut end = text.len();
    if let Some(at) = first_stop(&text, &r.request.stop, r.sent) {
        end = at;
        finish = Some(FinishReason::Stop);
    } else if eos {
        finish = Some(FinishReason::Stop);
    } else if r.generated.len() >= r.request.max_tokens || r.cache.len() + 1 >= model.max_model_len
    {
        finish = Some(FinishReason::Length);
    }
    // Hold back an incomplete character (decoded as U+FFFD) and a possible stop-string
    // prefix until the next token settles them.
    let settled = if finish.is_some() {
        end
    } else {
        held_back(&text, &r.request.stop).max(r.sent)
    };
    let delta = text.get(r.sent..settled).unwrap_or_default().to_owned();
    r.sent = settled.max(r.sent);
    if !eos {
        let _ = r.request.events.send(Event::Token {
            text: delta,
            choice,
        });
    } else if !delta.is_empty() {
        let _ = r.request.events.send(Event::Token {
            text: delta,
            choice: Choice {
                token,
                logprob: None,
                top: Vec::new(),
            },
        });
    }
    if let Some(reason) = finish {
        let usage = Usage {
            prompt_tokens: r.request.prompt.len(),
            completion_tokens: r.generated.len() + usize::from(eos),
        };
        metrics.finished(
            usage.prompt_tokens,
            usage.completion_tokens,
            r.started.elapsed(),
        );
        let _ = r.request.events.send(Event::Done { reason, usage });
        return false;
    }
    r.feed = vec![token];
    true
}

/// The completion so far as text, decoded after the prompt's last tokens (then cut off).
fn completion_text(model: &BaseModel, r: &Running) -> String {
    let decode = |ids: &[u32]| model.tokenizer.decode(ids, true).unwrap_or_default();
    let with_prefix = decode(&[r.prefix.as_slice(), &r.generated].concat());
    match with_prefix.strip_prefix(r.prefix_text.as_str()) {
        Some(text) => text.to_owned(),
        // The prefix decodes differently next to the completion (a character split across
        // them): decode the completion alone.
        None => decode(&r.generated),
    }
}

/// The earliest stop string in `text` that ends after byte `from` (earlier text was already
/// checked), as a byte offset.
fn first_stop(text: &str, stops: &[String], from: usize) -> Option<usize> {
    stops
        .iter()
        .filter_map(|stop| {
            let start = floor_char_boundary(text, from.saturating_sub(stop.len()));
            text[start..].find(stop.as_str()).map(|i| start + i)
        })
        .min()
}

/// How much of `text` can be sent: not a trailing U+FFFD, nor a tail that could begin a stop
/// string.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut end = text.trim_end_matches('\u{FFFD}').len();
    for stop in stops {
        for (i, _) in stop.char_indices().skip(1) {
            if text[..end].ends_with(&stop[..i]) {
                end = end.min(text[..end].len() - i);
            }
        }
    }
    end
}

fn floor_char_boundary(text: &str, mut at: usize) -> usize {
    while at > 0 && !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_found_across_token_boundaries() {
        let stops = vec!["END".to_owned()];
        assert_eq!(first_stop("abc EN", &stops, 4), None);
        assert_eq!(first_stop("abc END more", &stops, 6), Some(4));
    }

    #[test]
    fn a_possible_stop_prefix_and_a_broken_character_are_held_back() {
        let stops = vec!["END".to_owned()];
        assert_eq!(held_back("hello EN", &stops), 6);
        assert_eq!(held_back("hello E", &stops), 6);
        assert_eq!(held_back("hello", &stops), 5);
        assert_eq!(held_back("h\u{FFFD}", &[]), 1);
    }
}
