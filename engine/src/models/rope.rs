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
}

impl Rope {
    /// The schedule `params` name; `theta` where they give none.
    pub fn from_parameters(params: &RopeParameters, theta: f64) -> Result<Self, ConfigError> {
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
            other => return Err(ConfigError::RopeType(other.to_owned())),
        })
    }

    /// `inv_freq` for heads of `head_dim`: one frequency per rotated pair.
    pub fn inverse_frequencies(&self, head_dim: usize) -> Vec<f32> {
        let theta = match *self {
            Self::Default { theta } | Self::Linear { theta, .. } | Self::Llama3 { theta, .. } => {
                theta
            }
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
        }
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
