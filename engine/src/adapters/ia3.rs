//! (IA)³ (Liu et al. 2022, PEFT's `IA3`): one learned vector per targeted projection. A
//! projection that is not feed-forward has its output scaled, `y = (W·x + b) ⊙ l` with `l`
//! `[out]`; a feed-forward one its input, `y = W·(x ⊙ l) + b` with `l` `[in]`. The vectors start
//! at ones. PEFT's files: `adapter_config.json` with `peft_type: "IA3"`, `target_modules` and
//! `feedforward_modules`, and tensors `base_model.model.model.layers.N.<path>.ia3_l`, `[out, 1]`
//! or `[1, in]` (feed-forward), f32.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

use super::{PeftError, Site, TargetModules};

/// One projection's vector.
#[derive(Clone, Debug)]
pub struct Ia3 {
    /// `[out]`, or `[in]` when `feedforward`; f32 while training, the model's dtype to serve.
    pub vector: Tensor,
    /// Whether it scales the projection's input (PEFT's `is_feedforward`) rather than its output.
    pub feedforward: bool,
}

impl Ia3 {
    /// PEFT's start (`init_ia3_weights: true`): ones, which leave the model as it was.
    pub fn ones(len: usize, feedforward: bool, device: &Device) -> Result<Self> {
        Ok(Self {
            vector: Tensor::ones(len, DType::F32, device)?,
            feedforward,
        })
    }

    /// The same vector with no gradient recorded through it (evaluation).
    #[must_use]
    pub fn detach(&self) -> Self {
        Self {
            vector: self.vector.detach(),
            feedforward: self.feedforward,
        }
    }

    /// `t` (`[.., len]`) scaled along its last dimension. Computed in the vector's dtype and
    /// returned in `t`'s, as PEFT does; broadcasting and `to_dtype` have a backward, so this is
    /// differentiable in the vector (and in `t`).
    pub fn scale(&self, t: &Tensor) -> Result<Tensor> {
        let dtype = self.vector.dtype();
        t.to_dtype(dtype)?
            .broadcast_mul(&self.vector)?
            .to_dtype(t.dtype())
    }

    /// This vector on `device` in `dtype`.
    pub fn to(&self, device: &Device, dtype: DType) -> Result<Self> {
        Ok(Self {
            vector: self
                .vector
                .to_device(device)?
                .to_dtype(dtype)?
                .contiguous()?,
            feedforward: self.feedforward,
        })
    }
}

/// The fields of PEFT's `IA3Config` Graft reads and writes; those that would change the
/// math are checked in [`Ia3Config::check`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ia3Config {
    pub peft_type: String,
    pub task_type: Option<String>,
    pub target_modules: TargetModules,
    /// Which targeted modules have their input scaled: names (a module whose full name ends
    /// with one) or a regular expression (matching the full name), as PEFT decides.
    #[serde(default)]
    pub feedforward_modules: Option<TargetModules>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default = "init_true")]
    pub init_ia3_weights: bool,
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub inference_mode: bool,
}

fn init_true() -> bool {
    true
}

impl Ia3Config {
    /// A config for an adapter Graft trained: `sites` targeted, `feedforward` among them.
    pub fn new(sites: &[Site], feedforward: &[Site]) -> Self {
        let names = |sites: &[Site]| {
            TargetModules::Names(sites.iter().map(|s| s.name().to_owned()).collect())
        };
        Self {
            peft_type: "IA3".to_owned(),
            task_type: Some("CAUSAL_LM".to_owned()),
            target_modules: names(sites),
            feedforward_modules: Some(names(feedforward)),
            fan_in_fan_out: false,
            modules_to_save: None,
            init_ia3_weights: true,
            base_model_name_or_path: None,
            inference_mode: true,
        }
    }

    /// Refuses what would make Graft compute something other than PEFT does.
    pub fn check(&self) -> std::result::Result<(), PeftError> {
        let unsupported = |what: &str| Err(PeftError::Unsupported(what.to_owned()));
        if self.peft_type != "IA3" {
            return unsupported(&format!("peft_type {:?} (expected IA3)", self.peft_type));
        }
        if self.fan_in_fan_out {
            return unsupported("fan_in_fan_out (GPT-2 style Conv1D layers)");
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return unsupported("modules_to_save (fully trained extra modules)");
        }
        if let Some(TargetModules::Pattern(pattern)) = &self.feedforward_modules {
            full_match(pattern).map_err(|e| {
                PeftError::Unsupported(format!("feedforward_modules pattern {pattern:?}: {e}"))
            })?;
        }
        Ok(())
    }

    /// Whether the module on `site` of `layer` is feed-forward: PEFT's
    /// `_check_target_module_feedforward` over its full name (`model.layers.0.mlp.down_proj`),
    /// a plain suffix for names (no dot required), a full match for a pattern.
    pub fn is_feedforward(&self, layer: usize, site: Site) -> bool {
        let module = site.module(layer);
        match &self.feedforward_modules {
            None => false,
            Some(TargetModules::Names(names)) => names.iter().any(|n| module.ends_with(n.as_str())),
            Some(TargetModules::Pattern(pattern)) => {
                full_match(pattern).is_ok_and(|re| re.is_match(&module))
            }
        }
    }
}

/// Python's `re.fullmatch(pattern, …)`.
fn full_match(pattern: &str) -> std::result::Result<regex::Regex, regex::Error> {
    regex::Regex::new(&format!("^(?:{pattern})$"))
}

/// An (IA)³ adapter: its config and one vector per (layer, site).
#[derive(Clone, Debug)]
pub struct Ia3Adapter {
    pub config: Ia3Config,
    pub vectors: BTreeMap<(usize, Site), Ia3>,
}

fn key(layer: usize, site: Site) -> String {
    format!("base_model.model.{}.ia3_l", site.module(layer))
}

/// `(layer, site)` of a PEFT key, with or without PEFT's adapter name (`ia3_l.default`).
fn parse_key(key: &str) -> Option<(usize, Site)> {
    let rest = key.strip_prefix("base_model.model.model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, tail) = rest.split_once(".ia3_l")?;
    if !(tail.is_empty() || tail.starts_with('.') && !tail[1..].contains('.')) {
        return None;
    }
    let site = Site::from_name(module.rsplit('.').next()?)?;
    (site.path() == module).then_some(())?;
    Some((layer.parse().ok()?, site))
}

impl Ia3Adapter {
    /// Reads PEFT's two files.
    pub fn from_bytes(
        config_json: &[u8],
        safetensors: &[u8],
        device: &Device,
    ) -> std::result::Result<Self, PeftError> {
        let config: Ia3Config = serde_json::from_slice(config_json)?;
        config.check()?;
        let tensors = candle_core::safetensors::load_buffer(safetensors, device)?;
        let mut vectors = BTreeMap::new();
        for (name, tensor) in tensors {
            let (layer, site) =
                parse_key(&name).ok_or_else(|| PeftError::UnexpectedKey(name.clone()))?;
            let feedforward = config.is_feedforward(layer, site);
            // PEFT's layout says which side the vector scales; it must agree with the config.
            let len = match (tensor.dims(), feedforward) {
                (&[1, len], true) | (&[len, 1], false) => len,
                (dims, _) => {
                    return Err(PeftError::Mismatch(format!(
                        "{name} is {dims:?}; a {} module's ia3_l is {}",
                        if feedforward {
                            "feed-forward"
                        } else {
                            "non-feed-forward"
                        },
                        if feedforward { "[1, in]" } else { "[out, 1]" }
                    )));
                }
            };
            let vector = tensor.to_dtype(DType::F32)?.reshape(len)?;
            vectors.insert(
                (layer, site),
                Ia3 {
                    vector,
                    feedforward,
                },
            );
        }
        Ok(Self { config, vectors })
    }

    /// PEFT's two files: `adapter_config.json` and `adapter_model.safetensors`.
    pub fn to_bytes(&self) -> std::result::Result<(Vec<u8>, Vec<u8>), PeftError> {
        let config = serde_json::to_vec_pretty(&self.config)?;
        let mut tensors = Vec::with_capacity(self.vectors.len());
        for (&(layer, site), ia3) in &self.vectors {
            let len = ia3.vector.elem_count();
            let shape = if ia3.feedforward { (1, len) } else { (len, 1) };
            let vector = ia3.vector.to_dtype(DType::F32)?.reshape(shape)?;
            tensors.push((key(layer, site), vector.contiguous()?));
        }
        let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
        let weights = safetensors::serialize(tensors, Some(metadata))
            .map_err(|e| PeftError::Weights(candle_core::Error::wrap(e)))?;
        Ok((config, weights))
    }

    /// Whether every vector has a layer of a model of `layers` layers and the length its
    /// projection's input or output has there (`shape` gives a site's `(out, in)`).
    pub fn check_fits(
        &self,
        layers: usize,
        shape: impl Fn(Site) -> Option<(usize, usize)>,
    ) -> std::result::Result<(), PeftError> {
        if self.vectors.is_empty() {
            return Err(PeftError::Mismatch(
                "the adapter holds no (IA)³ vectors".to_owned(),
            ));
        }
        for (&(layer, site), ia3) in &self.vectors {
            let (out, input) = super::peft::shape_at(layer, site, layers, &shape)?;
            let (want, side) = if ia3.feedforward {
                (input, "input")
            } else {
                (out, "output")
            };
            let len = ia3.vector.elem_count();
            if len != want {
                return Err(PeftError::Mismatch(format!(
                    "the (IA)³ vector of {} of layer {layer} has {len} entries, the model's \
                     {side} there has {want}",
                    site.name()
                )));
            }
        }
        Ok(())
    }
}

/// A mixed serving batch's rows `t` `[rows, len]` with each segment's rows scaled by its
/// vector, where it has one; the other rows are returned as they are.
pub fn scale_segments(
    t: Tensor,
    segments: &[(std::ops::Range<usize>, Option<&Ia3>)],
) -> Result<Tensor> {
    super::batch::map_segment_rows(t, segments, "(IA)³", |own, ia3| ia3.scale(own))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_with_and_without_the_adapter_name() {
        assert_eq!(
            parse_key("base_model.model.model.layers.3.self_attn.k_proj.ia3_l"),
            Some((3, Site::KProj))
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.0.mlp.down_proj.ia3_l.default"),
            Some((0, Site::DownProj))
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.0.self_attn.down_proj.ia3_l"),
            None,
            "down_proj lives under mlp"
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"),
            None
        );
    }

    /// PEFT's test: a suffix of the full name for a list (so `proj` would match every
    /// projection), a full match for a string.
    #[test]
    fn feedforward_modules_are_matched_as_peft_matches_them() {
        let mut config = Ia3Config::new(&[Site::KProj, Site::DownProj], &[Site::DownProj]);
        assert!(config.is_feedforward(1, Site::DownProj));
        assert!(!config.is_feedforward(1, Site::KProj));
        config.feedforward_modules = Some(TargetModules::Pattern(
            r"model\.layers\.0\.mlp\..*".to_owned(),
        ));
        assert!(config.is_feedforward(0, Site::DownProj));
        assert!(!config.is_feedforward(1, Site::DownProj));
        config.feedforward_modules = Some(TargetModules::Pattern("down_proj".to_owned()));
        assert!(!config.is_feedforward(0, Site::DownProj), "a full match");
    }

    #[test]
    fn features_graft_cannot_honour_are_refused_by_name() {
        let base = Ia3Config::new(&[Site::KProj], &[]);
        assert!(base.check().is_ok());
        let conv = Ia3Config {
            fan_in_fan_out: true,
            ..base.clone()
        };
        assert!(
            conv.check()
                .expect_err("conv")
                .to_string()
                .contains("fan_in_fan_out")
        );
        let saved = Ia3Config {
            modules_to_save: Some(vec!["lm_head".to_owned()]),
            ..base
        };
        let error = saved.check().expect_err("modules_to_save");
        assert!(error.to_string().contains("modules_to_save"), "{error}");
    }

    #[test]
    fn a_vector_scales_its_rows_and_only_its_segments() -> Result<()> {
        let device = Device::Cpu;
        let ia3 = Ia3 {
            vector: Tensor::new(&[2f32, 3.0], &device)?,
            feedforward: false,
        };
        let t = Tensor::ones((3, 2), DType::F32, &device)?;
        let scaled = scale_segments(t, &[(0..1, None), (1..2, Some(&ia3))])?;
        assert_eq!(
            scaled.to_vec2::<f32>()?,
            [[1.0, 1.0], [2.0, 3.0], [1.0, 1.0]]
        );
        Ok(())
    }
}
