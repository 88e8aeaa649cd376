//! Choosing the next token: greedy at temperature 0, otherwise temperature, top-k and top-p
//! (nucleus) as vLLM applies them, from a per-request seeded generator.

use graft_engine::rng::Rng;

/// A request's sampling settings, validated by the HTTP layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    pub seed: u64,
    /// How many of the most likely tokens to report with each sampled one.
    pub logprobs: Option<usize>,
}

/// The sampled token and, when asked for, its log-probability and the top alternatives,
/// all from the model's unmodified distribution.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    pub token: u32,
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug)]
pub struct Sampler {
    settings: Sampling,
    rng: Rng,
}

impl Sampler {
    pub fn new(settings: Sampling) -> Self {
        let rng = Rng::seed(settings.seed);
        Self { settings, rng }
    }

    pub fn sample(&mut self, logits: &[f32]) -> Choice {
        let token = if self.settings.temperature <= 0.0 {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        let (logprob, top) = match self.settings.logprobs {
            Some(n) => {
                let logprobs = log_softmax(logits);
                let mut order: Vec<u32> =
                    (0..u32::try_from(logits.len()).unwrap_or(u32::MAX)).collect();
                order.sort_by(|&a, &b| logprobs[b as usize].total_cmp(&logprobs[a as usize]));
                order.truncate(n);
                (
                    Some(logprobs[token as usize]),
                    order
                        .into_iter()
                        .map(|t| (t, logprobs[t as usize]))
                        .collect(),
                )
            }
            None => (None, Vec::new()),
        };
        Choice {
            token,
            logprob,
            top,
        }
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let s = &self.settings;
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (u32::try_from(i).unwrap_or(u32::MAX), l / s.temperature))
            .collect();
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
        if s.top_k > 0 {
            candidates.truncate(s.top_k);
        }
        let max = candidates[0].1;
        let mut weights: Vec<f32> = candidates.iter().map(|(_, l)| (l - max).exp()).collect();
        let total: f32 = weights.iter().sum();
        // The smallest prefix whose probability reaches top_p (always at least one token).
        let mut kept = 0;
        let mut mass = 0.0;
        for w in &weights {
            kept += 1;
            mass += w / total;
            if mass >= s.top_p {
                break;
            }
        }
        weights.truncate(kept);
        let total: f32 = weights.iter().sum();
        let mut target = self.rng.next_f32() * total;
        for (i, w) in weights.iter().enumerate() {
            if target < *w {
                return candidates[i].0;
            }
            target -= w;
        }
        candidates[kept - 1].0
    }
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
        }
    }

    #[test]
    fn temperature_zero_is_greedy_and_reports_the_true_logprobs() {
        let mut sampler = Sampler::new(settings(0.0, 1.0, 0, 1));
        let choice = sampler.sample(&[0.0, 2.0, 1.0]);
        assert_eq!(choice.token, 1);
        let expected = 2.0 - (1f32 + 2f32.exp() + 1f32.exp()).ln();
        assert!((choice.logprob.expect("asked for") - expected).abs() < 1e-6);
        assert_eq!(choice.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn top_k_one_and_a_tiny_top_p_leave_only_the_best_token() {
        for s in [settings(1.0, 1.0, 1, 7), settings(1.0, 0.01, 0, 7)] {
            let mut sampler = Sampler::new(s);
            for _ in 0..50 {
                assert_eq!(sampler.sample(&[1.0, 1.5, 0.5, 1.4]).token, 1);
            }
        }
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens_and_sampling_follows_the_distribution() {
        let logits = [0.0, (3f32).ln()];
        let draw = |seed| {
            let mut sampler = Sampler::new(settings(1.0, 1.0, 0, seed));
            (0..4000)
                .map(|_| sampler.sample(&logits).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        let ones = draw(3).iter().filter(|&&t| t == 1).count();
        assert!(
            (2800..3200).contains(&ones),
            "p(1) = 0.75, drew {ones} of 4000"
        );
    }
}
