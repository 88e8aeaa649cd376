//! Rotary position embeddings: the frequency schedules `config.json` names, computed as
//! transformers computes them (`inv_freq`, in f32).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::config::ConfigError;

/// One schedule's parameters as `config.json` writes them (`rope_scaling` in transformers 4,
/// `rope_parameters` in 5).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct RopeParameters {
    pub rope_type: Option<String>,
    /// transformers 4 spelled it `type`.
    #[serde(rename = "type")]
    pub legacy_type: Option<String>,
    pub rope_theta: Option<f64>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
    /// YaRN: cos and sin are scaled by this (derived from `factor` when absent).
    pub attention_factor: Option<f64>,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    pub beta_fast: Option<f64>,
    pub beta_slow: Option<f64>,
    pub truncate: Option<bool>,
}

/// transformers 5's `rope_parameters`: one schedule, or one per layer type (Gemma 3:
/// `full_attention` and `sliding_attention`).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum RopeParametersField {
    PerLayerType(BTreeMap<String, RopeParameters>),
    One(RopeParameters),
}

/// Rotary embedding frequencies.
#[derive(Clone, Debug, PartialEq)]
pub enum Rope {
    Default {
        theta: f64,
    },
    /// Positions divided by `factor` (every frequency is).
    Linear {
        theta: f64,
        factor: f64,
    },
    Llama3 {
        theta: f64,
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// YaRN: high frequencies kept, low ones interpolated by `factor`, a linear ramp between
    /// the dimensions `beta_fast` and `beta_slow` rotations mark; cos and sin scaled by
    /// `attention_factor`.
    Yarn(Yarn),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Yarn {
    pub theta: f64,
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub attention_factor: f64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub truncate: bool,
}

impl Rope {
    /// The schedule `params` name; `theta` where they give none, and `max_position_embeddings`
    /// for an original context they do not state.
    pub fn from_parameters(
        params: &RopeParameters,
        theta: f64,
        max_position_embeddings: Option<usize>,
    ) -> Result<Self, ConfigError> {
        let theta = params.rope_theta.unwrap_or(theta);
        let rope_type = params
            .rope_type
            .as_deref()
            .or(params.legacy_type.as_deref())
            .unwrap_or("default");
        let missing = |what: &str| ConfigError::Invalid(format!("{rope_type} rope needs {what}"));
        Ok(match rope_type {
            "default" => Self::Default { theta },
            "linear" => Self::Linear {
                theta,
                factor: params.factor.ok_or_else(|| missing("factor"))?,
            },
            "llama3" => Self::Llama3 {
                theta,
                factor: params.factor.ok_or_else(|| missing("factor"))?,
                low_freq_factor: params
                    .low_freq_factor
                    .ok_or_else(|| missing("low_freq_factor"))?,
                high_freq_factor: params
                    .high_freq_factor
                    .ok_or_else(|| missing("high_freq_factor"))?,
                original_max_position_embeddings: params
                    .original_max_position_embeddings
                    .ok_or_else(|| missing("original_max_position_embeddings"))?,
            },
            "yarn" => {
                let original = params
                    .original_max_position_embeddings
                    .or(max_position_embeddings)
                    .ok_or_else(|| missing("original_max_position_embeddings"))?;
                let factor = match params.factor {
                    Some(factor) => factor,
                    #[allow(clippy::cast_precision_loss)]
                    None => {
                        max_position_embeddings.ok_or_else(|| missing("factor"))? as f64
                            / original as f64
                    }
                };
                let mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                let attention_factor = match (
                    params.attention_factor,
                    params.mscale,
                    params.mscale_all_dim,
                ) {
                    (Some(a), _, _) => a,
                    (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                        mscale(factor, m) / mscale(factor, all)
                    }
                    _ => mscale(factor, 1.0),
                };
                Self::Yarn(Yarn {
                    theta,
                    factor,
                    original_max_position_embeddings: original,
                    attention_factor,
                    beta_fast: params.beta_fast.filter(|b| *b != 0.0).unwrap_or(32.0),
                    beta_slow: params.beta_slow.filter(|b| *b != 0.0).unwrap_or(1.0),
                    truncate: params.truncate.unwrap_or(true),
                })
            }
            other => return Err(ConfigError::RopeType(other.to_owned())),
        })
    }

    /// What cos and sin are multiplied by (YaRN's attention factor; 1 for the others).
    pub fn attention_factor(&self) -> f64 {
        match self {
            Self::Yarn(yarn) => yarn.attention_factor,
            _ => 1.0,
        }
    }

    /// `inv_freq` for heads of `head_dim`: one frequency per rotated pair.
    pub fn inverse_frequencies(&self, head_dim: usize) -> Vec<f32> {
        let theta = match *self {
            Self::Default { theta }
            | Self::Linear { theta, .. }
            | Self::Llama3 { theta, .. }
            | Self::Yarn(Yarn { theta, .. }) => theta,
        };
        #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
        let base: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / (theta as f32).powf(i as f32 / head_dim as f32))
            .collect();
        match *self {
            Self::Default { .. } => base,
            #[allow(clippy::cast_possible_truncation)]
            Self::Linear { factor, .. } => base.into_iter().map(|f| f / factor as f32).collect(),
            Self::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
                ..
            } => llama3(
                base,
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            ),
            Self::Yarn(ref yarn) => yarn.blend(head_dim),
        }
    }
}

impl Yarn {
    /// The dimension (of `head_dim`) at which a wavelength fits `rotations` times into the
    /// original context.
    #[allow(clippy::cast_precision_loss)]
    fn correction_dim(&self, rotations: f64, head_dim: usize) -> f64 {
        let context = self.original_max_position_embeddings as f64;
        head_dim as f64 * (context / (rotations * 2.0 * std::f64::consts::PI)).ln()
            / (2.0 * self.theta.ln())
    }

    /// Extrapolated (`base`) frequencies below the ramp, interpolated (`base / factor`) above,
    /// blended along it; in f32 as transformers computes them.
    #[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
    fn blend(&self, head_dim: usize) -> Vec<f32> {
        let (mut low, mut high) = (
            self.correction_dim(self.beta_fast, head_dim),
            self.correction_dim(self.beta_slow, head_dim),
        );
        if self.truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, mut high) = (low.max(0.0), high.min(head_dim as f64 - 1.0));
        if (low - high).abs() < f64::EPSILON {
            high += 0.001;
        }
        let (low, high) = (low as f32, high as f32);
        let (factor, theta) = (self.factor as f32, self.theta as f32);
        (0..head_dim / 2)
            .map(|j| {
                let wavelength = theta.powf((2 * j) as f32 / head_dim as f32);
                let (extrapolated, interpolated) = (1.0 / wavelength, 1.0 / (factor * wavelength));
                let ramp = ((j as f32 - low) / (high - low)).clamp(0.0, 1.0);
                let extrapolation = 1.0 - ramp;
                interpolated * (1.0 - extrapolation) + extrapolated * extrapolation
            })
            .collect()
    }
}

/// Llama 3.1's schedule: long wavelengths slowed by `factor`, short ones kept, a smooth blend
/// between.
fn llama3(
    base: Vec<f32>,
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    original_max_position_embeddings: usize,
) -> Vec<f32> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn params(json: &str) -> RopeParameters {
        serde_json::from_str(json).expect("parameters")
    }

    #[test]
    fn yarn_derives_its_attention_factor_from_the_factor() {
        let rope = Rope::from_parameters(
            &params(r#"{"rope_type":"yarn","factor":4.0,"original_max_position_embeddings":64}"#),
            10_000.0,
            None,
        )
        .expect("yarn");
        let expected = 0.1 * 4f64.ln() + 1.0;
        assert!((rope.attention_factor() - expected).abs() < 1e-12);
        // The fastest frequency is kept, the slowest divided by the factor.
        let (plain, yarn) = (
            Rope::Default { theta: 10_000.0 }.inverse_frequencies(16),
            rope.inverse_frequencies(16),
        );
        assert!((yarn[0] - plain[0]).abs() < 1e-7);
        assert!((yarn[7] - plain[7] / 4.0).abs() < 1e-7);
    }

    #[test]
    fn schedules_that_depend_on_the_sequence_are_refused_by_name() {
        for kind in ["dynamic", "longrope"] {
            let json = format!(r#"{{"rope_type":"{kind}","factor":2.0}}"#);
            let error =
                Rope::from_parameters(&params(&json), 10_000.0, Some(128)).expect_err("refused");
            assert!(error.to_string().contains(kind), "{error}");
        }
    }
}
