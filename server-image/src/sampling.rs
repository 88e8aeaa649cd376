//! Choosing the next token as vLLM does: the logits are adjusted (grammar mask, `logit_bias`,
//! repetition, frequency and presence penalties, `min_tokens`), then greedy at temperature 0,
//! otherwise temperature, top-k, top-p (nucleus) and min-p, from a per-choice seeded generator.

use std::collections::HashMap;

use graft_engine::rng::Rng;

use crate::constrain::Mask;

/// A request's sampling settings, validated by the HTTP layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    /// Drops tokens less likely than `min_p` times the most likely one; 0 keeps every token.
    pub min_p: f32,
    pub seed: u64,
    /// How many of the most likely tokens to report with each sampled one.
    pub logprobs: Option<usize>,
    /// Subtracted once from the logit of every token already generated (OpenAI, vLLM).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated.
    pub frequency_penalty: f32,
    /// Divides positive and multiplies negative logits of every token in the prompt or the
    /// output (1 is off), as transformers and vLLM define it.
    pub repetition_penalty: f32,
    /// Added to the logits of these tokens.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: 0,
            logprobs: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
        }
    }
}

impl Sampling {
    /// Whether the logits must be changed before choosing.
    fn adjusts(&self) -> bool {
        self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || !is_one(self.repetition_penalty)
            || !self.logit_bias.is_empty()
    }
}

/// The sampled token and, when asked for, its log-probability and the top alternatives,
/// all from the model's unmodified distribution.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    pub token: u32,
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
}

#[derive(Clone, Debug)]
pub struct Sampler {
    settings: Sampling,
    rng: Rng,
    /// How often each token was generated, for the frequency and presence penalties.
    counts: HashMap<u32, u32>,
    /// The prompt's tokens, for the repetition penalty (empty when it is off).
    prompt: Vec<u32>,
}

impl Sampler {
    pub fn new(settings: Sampling, prompt: &[u32]) -> Self {
        let rng = Rng::seed(settings.seed);
        let mut prompt = if is_one(settings.repetition_penalty) {
            Vec::new()
        } else {
            prompt.to_vec()
        };
        prompt.sort_unstable();
        prompt.dedup();
        Self {
            settings,
            rng,
            counts: HashMap::new(),
            prompt,
        }
    }

    /// The sampler of another choice of the same request: its own random stream, so the
    /// choices differ, and the same history.
    #[must_use]
    pub fn fork(&self, choice: usize) -> Self {
        let seed = self
            .settings
            .seed
            .wrapping_add((choice as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        Self {
            settings: Sampling {
                seed,
                ..self.settings.clone()
            },
            rng: Rng::seed(seed),
            counts: self.counts.clone(),
            prompt: self.prompt.clone(),
        }
    }

    /// Chooses the next token from `logits`, only among those `mask` allows, and never one
    /// of `banned` while another is possible (`min_tokens` bans the stop tokens).
    pub fn sample(&mut self, logits: &[f32], mask: Option<&Mask>, banned: &[u32]) -> Choice {
        let adjusted;
        let scores = if mask.is_some() || !banned.is_empty() || self.settings.adjusts() {
            adjusted = self.adjust(logits, mask, banned);
            adjusted.as_slice()
        } else {
            logits
        };
        let token = if self.settings.temperature <= 0.0 {
            argmax(scores)
        } else {
            self.draw(scores)
        };
        *self.counts.entry(token).or_default() += 1;
        match self.settings.logprobs {
            Some(n) => score(logits, token, n),
            None => Choice {
                token,
                logprob: None,
                top: Vec::new(),
            },
        }
    }

    fn adjust(&self, logits: &[f32], mask: Option<&Mask>, banned: &[u32]) -> Vec<f32> {
        let s = &self.settings;
        let mut scores = logits.to_vec();
        if let Some(mask) = mask {
            mask.apply(&mut scores);
        }
        for &(token, bias) in &s.logit_bias {
            if let Some(score) = scores.get_mut(token as usize) {
                *score += bias;
            }
        }
        if !is_one(s.repetition_penalty) {
            let seen = self.prompt.iter().chain(self.counts.keys());
            for &token in seen {
                if let Some(score) = scores.get_mut(token as usize) {
                    *score = if *score > 0.0 {
                        *score / s.repetition_penalty
                    } else {
                        *score * s.repetition_penalty
                    };
                }
            }
        }
        if s.frequency_penalty != 0.0 || s.presence_penalty != 0.0 {
            for (&token, &count) in &self.counts {
                if let Some(score) = scores.get_mut(token as usize) {
                    #[allow(clippy::cast_precision_loss)]
                    let times = count as f32;
                    *score -= s.frequency_penalty * times + s.presence_penalty;
                }
            }
        }
        if !banned.is_empty() {
            let others = scores
                .iter()
                .enumerate()
                .any(|(t, v)| v.is_finite() && !banned.contains(&u32::try_from(t).unwrap_or(0)));
            if others {
                for &token in banned {
                    if let Some(score) = scores.get_mut(token as usize) {
                        *score = f32::NEG_INFINITY;
                    }
                }
            }
        }
        scores
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let s = &self.settings;
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (u32::try_from(i).unwrap_or(u32::MAX), l / s.temperature))
            .collect();
        if s.top_k > 0 && s.top_k < candidates.len() {
            candidates.select_nth_unstable_by(s.top_k - 1, descending);
            candidates.truncate(s.top_k);
        }
        let max = candidates
            .iter()
            .map(|c| c.1)
            .fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return argmax(logits);
        }
        if s.min_p > 0.0 {
            // Weights are relative to the most likely token's, which is 1 and always stays.
            candidates.retain(|&(_, l)| (l - max).exp() >= s.min_p);
        }
        if s.top_p < 1.0 {
            nucleus(&mut candidates, s.top_p, max);
        }
        let weights: Vec<f32> = candidates.iter().map(|(_, l)| (l - max).exp()).collect();
        let total: f32 = weights.iter().sum();
        let mut target = self.rng.next_f32() * total;
        for (i, w) in weights.iter().enumerate() {
            if target < *w {
                return candidates[i].0;
            }
            target -= w;
        }
        // Rounding: the last token with any weight.
        let last = weights.iter().rposition(|&w| w > 0.0).unwrap_or(0);
        candidates[last].0
    }
}

/// Most likely first, ties by id: one order, whichever way it is reached.
#[allow(clippy::trivially_copy_pass_by_ref)] // the signature sort_by asks for
fn descending(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Keeps the smallest most-likely-first prefix of `candidates` (scaled logits, the largest
/// `max`) whose probability reaches `top_p`, in that order. The prefix is usually a few
/// tokens of a vocabulary of tens of thousands, so it is found by selecting ever larger
/// windows of the most likely rather than by sorting them all.
fn nucleus(candidates: &mut Vec<(u32, f32)>, top_p: f32, max: f32) {
    let total: f32 = candidates.iter().map(|&(_, l)| (l - max).exp()).sum();
    let (mut ordered, mut window, mut mass) = (0, 64, 0.0);
    while ordered < candidates.len() {
        let end = (ordered + window).min(candidates.len());
        let rest = &mut candidates[ordered..];
        if end - ordered < rest.len() {
            rest.select_nth_unstable_by(end - ordered - 1, descending);
        }
        candidates[ordered..end].sort_by(descending);
        for i in ordered..end {
            mass += (candidates[i].1 - max).exp() / total;
            if mass >= top_p {
                candidates.truncate(i + 1);
                return;
            }
        }
        ordered = end;
        window *= 4;
    }
}

/// A repetition penalty of 1 is none.
fn is_one(penalty: f32) -> bool {
    (penalty - 1.0).abs() < f32::EPSILON
}

/// A seed from the clock, for requests that name none.
pub fn clock_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    u64::try_from(nanos % u128::from(u64::MAX)).unwrap_or_default()
}

fn argmax(values: &[f32]) -> u32 {
    let best = values
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
        .map_or(0, |(i, _)| i);
    u32::try_from(best).unwrap_or(u32::MAX)
}

/// `token` with its log-probability under `logits` and the `n` most likely tokens with theirs.
pub fn score(logits: &[f32], token: u32, n: usize) -> Choice {
    let logprobs = log_softmax(logits);
    let mut order: Vec<u32> = (0..u32::try_from(logits.len()).unwrap_or(u32::MAX)).collect();
    // Only the n best need ordering: a prompt's scoring asks for this at every position.
    if n > 0 && n < order.len() {
        order.select_nth_unstable_by(n - 1, |&a, &b| {
            logprobs[b as usize].total_cmp(&logprobs[a as usize])
        });
    }
    order.truncate(n);
    order.sort_by(|&a, &b| logprobs[b as usize].total_cmp(&logprobs[a as usize]));
    Choice {
        token,
        logprob: logprobs.get(token as usize).copied(),
        top: order
            .into_iter()
            .map(|t| (t, logprobs[t as usize]))
            .collect(),
    }
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    #[allow(clippy::cast_possible_truncation)]
    let log_sum = sum.ln() as f32;
    logits.iter().map(|&l| l - max - log_sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> Sampling {
        Sampling {
            temperature,
            top_p,
            top_k,
            seed,
            logprobs: Some(2),
            ..Sampling::default()
        }
    }

    #[test]
    fn temperature_zero_is_greedy_and_reports_the_true_logprobs() {
        let mut sampler = Sampler::new(settings(0.0, 1.0, 0, 1), &[]);
        let choice = sampler.sample(&[0.0, 2.0, 1.0], None, &[]);
        assert_eq!(choice.token, 1);
        let expected = 2.0 - (1f32 + 2f32.exp() + 1f32.exp()).ln();
        assert!((choice.logprob.expect("asked for") - expected).abs() < 1e-6);
        assert_eq!(choice.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn top_k_one_and_a_tiny_top_p_leave_only_the_best_token() {
        for s in [settings(1.0, 1.0, 1, 7), settings(1.0, 0.01, 0, 7)] {
            let mut sampler = Sampler::new(s, &[]);
            for _ in 0..50 {
                assert_eq!(sampler.sample(&[1.0, 1.5, 0.5, 1.4], None, &[]).token, 1);
            }
        }
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens_and_sampling_follows_the_distribution() {
        let logits = [0.0, (3f32).ln()];
        let draw = |seed| {
            let mut sampler = Sampler::new(settings(1.0, 1.0, 0, seed), &[]);
            (0..4000)
                .map(|_| sampler.sample(&logits, None, &[]).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        let ones = draw(3).iter().filter(|&&t| t == 1).count();
        assert!(
            (2800..3200).contains(&ones),
            "p(1) = 0.75, drew {ones} of 4000"
        );
    }

    fn greedy(settings: Sampling, prompt: &[u32], steps: usize, logits: &[f32]) -> Vec<u32> {
        let mut sampler = Sampler::new(
            Sampling {
                temperature: 0.0,
                ..settings
            },
            prompt,
        );
        (0..steps)
            .map(|_| sampler.sample(logits, None, &[]).token)
            .collect()
    }

    #[test]
    fn logit_bias_forbids_and_forces_tokens() {
        let logits = [1.0, 3.0, 2.0];
        let forbid = Sampling {
            logit_bias: vec![(1, -100.0)],
            ..Sampling::default()
        };
        assert_eq!(greedy(forbid, &[], 3, &logits), [2, 2, 2]);
        let force = Sampling {
            logit_bias: vec![(0, 100.0)],
            ..Sampling::default()
        };
        assert_eq!(greedy(force, &[], 2, &logits), [0, 0]);
    }

    #[test]
    fn penalties_follow_vllm() {
        let logits = [1.0, 1.5, 0.2];
        // Frequency: token 1 loses 1.0 per use; after one use 0.5 < 1.0, so token 0 follows,
        // then both have been used once: 0.5 vs 0.0, token 1 again.
        let frequency = Sampling {
            frequency_penalty: 1.0,
            ..Sampling::default()
        };
        assert_eq!(greedy(frequency, &[], 3, &logits), [1, 0, 1]);
        // Presence: a flat 2.0 once a token appeared, so every token is tried once.
        let presence = Sampling {
            presence_penalty: 2.0,
            ..Sampling::default()
        };
        assert_eq!(greedy(presence, &[], 3, &logits), [1, 0, 2]);
        // Repetition: token 1 is in the prompt, 1.5 / 2 = 0.75 < 1.0.
        let repetition = Sampling {
            repetition_penalty: 2.0,
            ..Sampling::default()
        };
        assert_eq!(greedy(repetition, &[1], 1, &logits), [0]);
        // A negative logit is multiplied: -0.5 * 2 = -1.0 < -0.8.
        let negative = Sampling {
            repetition_penalty: 2.0,
            ..Sampling::default()
        };
        assert_eq!(greedy(negative, &[0], 1, &[-0.5, -0.8]), [1]);
    }

    #[test]
    fn min_p_drops_unlikely_tokens_and_banned_tokens_wait() {
        let logits = [0.0, 0.1, -5.0];
        let mut sampler = Sampler::new(
            Sampling {
                min_p: 0.5,
                seed: 9,
                ..Sampling::default()
            },
            &[],
        );
        for _ in 0..200 {
            assert_ne!(sampler.sample(&logits, None, &[]).token, 2);
        }
        let mut sampler = Sampler::new(
            Sampling {
                temperature: 0.0,
                ..Sampling::default()
            },
            &[],
        );
        assert_eq!(sampler.sample(&[0.0, 5.0], None, &[1]).token, 0);
        // A ban that would leave nothing is lifted.
        assert_eq!(
            sampler.sample(&[f32::NEG_INFINITY, 5.0], None, &[1]).token,
            1
        );
    }

    /// The windowed selection keeps exactly what sorting the whole vocabulary would: the
    /// same tokens in the same order, ties included.
    #[test]
    fn the_nucleus_equals_the_prefix_of_a_full_sort() {
        let mut rng = Rng::seed(4);
        for (vocab, top_p) in [(5000, 0.9), (5000, 0.999), (300, 0.5), (70, 0.99), (3, 0.2)] {
            // Logits on a coarse grid, so many tie.
            let candidates: Vec<(u32, f32)> = (0..vocab)
                .map(|i| (i, (rng.normal(2.0) * 4.0).round() / 4.0))
                .collect();
            let max = candidates
                .iter()
                .map(|c| c.1)
                .fold(f32::NEG_INFINITY, f32::max);
            let total: f32 = candidates.iter().map(|&(_, l)| (l - max).exp()).sum();
            let mut sorted = candidates.clone();
            sorted.sort_by(descending);
            let mut mass = 0.0;
            let kept = sorted
                .iter()
                .position(|&(_, l)| {
                    mass += (l - max).exp() / total;
                    mass >= top_p
                })
                .map_or(sorted.len(), |i| i + 1);
            sorted.truncate(kept);
            let mut windowed = candidates;
            nucleus(&mut windowed, top_p, max);
            assert!(
                windowed == sorted,
                "vocab {vocab}, top_p {top_p}: {} tokens kept, {kept} expected",
                windowed.len()
            );
            if vocab == 5000 && top_p > 0.99 {
                assert!(kept > 64, "the nucleus spans several windows ({kept})");
            }
        }
    }

    #[test]
    fn forks_draw_differently_from_the_same_history() {
        let logits = [0.0; 16];
        let base = Sampler::new(
            Sampling {
                seed: 5,
                ..Sampling::default()
            },
            &[],
        );
        let draw = |mut s: Sampler| {
            (0..8)
                .map(|_| s.sample(&logits, None, &[]).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(base.fork(0)), draw(base.clone()));
        assert_ne!(draw(base.fork(1)), draw(base.fork(2)));
    }
}
