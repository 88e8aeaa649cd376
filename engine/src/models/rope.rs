//! Rotary position embeddings: the frequency schedules `config.json` names, computed as
//! transformers computes them (`inv_freq`, in f32). Two of them (`dynamic`, `longrope`) depend
//! on how long the sequence is when it is rotated: a sequence's tokens are rotated with the
//! frequencies of the length the sequence has at that forward pass, as transformers does (keys
//! already in a cache keep the rotation they were stored with).

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
    /// LongRoPE: per-frequency divisors within and beyond the original context.
    pub short_factor: Option<Vec<f64>>,
    pub long_factor: Option<Vec<f64>>,
    /// transformers 5 writes Phi-3's here.
    pub partial_rotary_factor: Option<f64>,
}

/// What `config.json` says of the context, outside the rotary parameters.
#[derive(Clone, Copy, Debug, Default)]
pub struct Context {
    pub max_position_embeddings: Option<usize>,
    /// Phi-3's top-level field.
    pub original_max_position_embeddings: Option<usize>,
}

/// transformers 5's `rope_parameters`: one schedule, or one per layer type (Gemma 3:
/// `full_attention` and `sliding_attention`).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
// Parsed once from config.json; boxing would only complicate its readers.
#[allow(clippy::large_enum_variant)]
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
    /// Dynamic NTK: beyond `max_position_embeddings` the base grows with the sequence's length.
    Dynamic {
        theta: f64,
        factor: f64,
        max_position_embeddings: usize,
    },
    /// LongRoPE (Phi-3): each frequency divided by its `short_factor` while the sequence fits
    /// the original context, by its `long_factor` beyond; cos and sin scaled by
    /// `attention_factor`.
    LongRope(LongRope),
}

#[derive(Clone, Debug, PartialEq)]
pub struct LongRope {
    pub theta: f64,
    pub short_factor: Vec<f64>,
    pub long_factor: Vec<f64>,
    pub original_max_position_embeddings: usize,
    pub attention_factor: f64,
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
    /// The schedule `params` name; `theta` where they give none, and `context`'s lengths where
    /// they state none.
    pub fn from_parameters(
        params: &RopeParameters,
        theta: f64,
        context: Context,
    ) -> Result<Self, ConfigError> {
        let max_position_embeddings = context.max_position_embeddings;
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
            "dynamic" => Self::Dynamic {
                theta,
                factor: params.factor.ok_or_else(|| missing("factor"))?,
                max_position_embeddings: max_position_embeddings
                    .ok_or_else(|| missing("max_position_embeddings"))?,
            },
            // `su` is what Phi-3's first checkpoints called it.
            "longrope" | "su" => Self::LongRope(LongRope::from_parameters(params, theta, context)?),
            other => return Err(ConfigError::RopeType(other.to_owned())),
        })
    }

    /// Whether the frequencies depend on the sequence's length.
    pub fn depends_on_length(&self) -> bool {
        matches!(self, Self::Dynamic { .. } | Self::LongRope(_))
    }

    /// Whether this schedule can rotate `rotary_dim` dimensions (LongRoPE's factors are one
    /// per rotated pair).
    pub fn check_rotary_dim(&self, rotary_dim: usize) -> Result<(), String> {
        if let Self::LongRope(long) = self {
            for (name, factors) in [("short", &long.short_factor), ("long", &long.long_factor)] {
                if factors.len() != rotary_dim / 2 {
                    return Err(format!(
                        "{name}_factor has {} entries; {rotary_dim} rotary dimensions need {}",
                        factors.len(),
                        rotary_dim / 2
                    ));
                }
            }
        }
        Ok(())
    }

    /// What cos and sin are multiplied by (YaRN's and LongRoPE's attention factor; 1 for the
    /// others).
    pub fn attention_factor(&self) -> f64 {
        match self {
            Self::Yarn(yarn) => yarn.attention_factor,
            Self::LongRope(long) => long.attention_factor,
            _ => 1.0,
        }
    }

    /// `inv_freq` for `dim` rotated dimensions (one frequency per rotated pair), for a
    /// sequence `seq_len` tokens long when it is rotated (only `dynamic` and `longrope` read
    /// it).
    pub fn inverse_frequencies(&self, dim: usize, seq_len: usize) -> Vec<f32> {
        let theta = match *self {
            Self::Default { theta }
            | Self::Linear { theta, .. }
            | Self::Llama3 { theta, .. }
            | Self::Dynamic { theta, .. }
            | Self::Yarn(Yarn { theta, .. })
            | Self::LongRope(LongRope { theta, .. }) => theta,
        };
        let base: Vec<f32> = wavelengths(theta, dim).map(|w| 1.0 / w).collect();
        match *self {
            Self::Dynamic {
                factor,
                max_position_embeddings,
                ..
            } if seq_len > max_position_embeddings => {
                // transformers: base · (factor·len/max − (factor − 1))^(dim/(dim−2)), in f64.
                #[allow(clippy::cast_precision_loss)]
                let (len, max, dim_f) =
                    (seq_len as f64, max_position_embeddings as f64, dim as f64);
                let grown =
                    theta * (factor * len / max - (factor - 1.0)).powf(dim_f / (dim_f - 2.0));
                wavelengths(grown, dim).map(|w| 1.0 / w).collect()
            }
            Self::Default { .. } | Self::Dynamic { .. } => base,
            Self::LongRope(ref long) => {
                let divisors = if seq_len > long.original_max_position_embeddings {
                    &long.long_factor
                } else {
                    &long.short_factor
                };
                // transformers: 1 / (ext_factors · base^(2j/dim)), in f32.
                #[allow(clippy::cast_possible_truncation)]
                wavelengths(theta, dim)
                    .zip(divisors)
                    .map(|(w, &d)| 1.0 / ((d as f32) * w))
                    .collect()
            }
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
            Self::Yarn(ref yarn) => yarn.blend(dim),
        }
    }
}

/// `theta^(2j/dim)` for each rotated pair `j`, in f32 as transformers computes it.
#[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
fn wavelengths(theta: f64, dim: usize) -> impl Iterator<Item = f32> {
    (0..dim)
        .step_by(2)
        .map(move |i| (theta as f32).powf(i as f32 / dim as f32))
}

impl LongRope {
    fn from_parameters(
        params: &RopeParameters,
        theta: f64,
        context: Context,
    ) -> Result<Self, ConfigError> {
        let missing = |what: &str| ConfigError::Invalid(format!("longrope needs {what}"));
        let max_position_embeddings = context.max_position_embeddings;
        let original = params
            .original_max_position_embeddings
            .or(context.original_max_position_embeddings)
            .ok_or_else(|| missing("original_max_position_embeddings"))?;
        #[allow(clippy::cast_precision_loss)]
        let factor = match (params.factor, max_position_embeddings) {
            (Some(factor), _) => factor,
            (None, Some(max)) => max as f64 / original as f64,
            (None, None) => return Err(missing("factor or max_position_embeddings")),
        };
        #[allow(clippy::cast_precision_loss)]
        let attention_factor = params.attention_factor.unwrap_or(if factor <= 1.0 {
            1.0
        } else {
            (1.0 + factor.ln() / (original as f64).ln()).sqrt()
        });
        Ok(Self {
            theta,
            short_factor: params
                .short_factor
                .clone()
                .ok_or_else(|| missing("short_factor"))?,
            long_factor: params
                .long_factor
                .clone()
                .ok_or_else(|| missing("long_factor"))?,
            original_max_position_embeddings: original,
            attention_factor,
        })
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
            Context::default(),
        )
        .expect("yarn");
        let expected = 0.1 * 4f64.ln() + 1.0;
        assert!((rope.attention_factor() - expected).abs() < 1e-12);
        // The fastest frequency is kept, the slowest divided by the factor.
        let (plain, yarn) = (
            Rope::Default { theta: 10_000.0 }.inverse_frequencies(16, 1),
            rope.inverse_frequencies(16, 1),
        );
        assert!((yarn[0] - plain[0]).abs() < 1e-7);
        assert!((yarn[7] - plain[7] / 4.0).abs() < 1e-7);
    }

    fn context(max: usize, original: Option<usize>) -> Context {
        Context {
            max_position_embeddings: Some(max),
            original_max_position_embeddings: original,
        }
    }

    #[test]
    fn dynamic_grows_its_base_only_beyond_the_context() {
        let rope = Rope::from_parameters(
            &params(r#"{"rope_type":"dynamic","factor":2.0}"#),
            10_000.0,
            context(16, None),
        )
        .expect("dynamic");
        let plain = Rope::Default { theta: 10_000.0 }.inverse_frequencies(8, 1);
        assert_eq!(rope.inverse_frequencies(8, 16), plain);
        let long = rope.inverse_frequencies(8, 32);
        assert!(
            (long[0] - plain[0]).abs() < 1e-9,
            "the fastest pair keeps its frequency"
        );
        assert!(long[3] < plain[3], "slow pairs slow down further");
        assert!(rope.depends_on_length());
    }

    #[test]
    fn longrope_picks_its_factors_by_length_and_scales_attention() {
        let rope = Rope::from_parameters(
            &params(r#"{"rope_type":"longrope","short_factor":[1.0,2.0],"long_factor":[3.0,4.0]}"#),
            10_000.0,
            context(64, Some(16)),
        )
        .expect("longrope");
        let plain = Rope::Default { theta: 10_000.0 }.inverse_frequencies(4, 1);
        let (short, long) = (
            rope.inverse_frequencies(4, 16),
            rope.inverse_frequencies(4, 17),
        );
        assert!((short[1] - plain[1] / 2.0).abs() < 1e-9);
        assert!((long[0] - plain[0] / 3.0).abs() < 1e-7);
        let expected = (1.0 + 4f64.ln() / 16f64.ln()).sqrt();
        assert!((rope.attention_factor() - expected).abs() < 1e-12);
        assert!(rope.check_rotary_dim(4).is_ok());
        assert!(
            rope.check_rotary_dim(8).is_err(),
            "two factors rotate four dimensions"
        );
    }

    #[test]
    fn unknown_schedules_are_refused_by_name() {
        let error = Rope::from_parameters(
            &params(r#"{"rope_type":"mrope","factor":2.0}"#),
            10_000.0,
            context(128, None),
        )
        .expect_err("refused");
        assert!(error.to_string().contains("mrope"), "{error}");
    }
}
