//! Hugging Face PEFT adapter files: `adapter_config.json` and `adapter_model.safetensors`
//! (keys `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`, f32, metadata
//! `{"format": "pt"}`). What Graft writes PEFT and vLLM load; what PEFT writes Graft loads,
//! or refuses by name when it uses a feature Graft cannot honour.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{Init, Lora, Patterns, Site, scaling};

#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    #[error("adapter_config.json: {0}")]
    Config(#[from] serde_json::Error),
    #[error("adapter_config.json: {0} is not supported")]
    Unsupported(String),
    #[error("adapter_model.safetensors: {0}")]
    Weights(#[from] candle_core::Error),
    #[error("adapter_model.safetensors: unexpected tensor {0:?}")]
    UnexpectedKey(String),
    #[error(
        "adapter_model.safetensors: {site} of layer {layer} has lora_{missing} but not the other half"
    )]
    HalfPair {
        layer: usize,
        site: &'static str,
        missing: char,
    },
    /// AdapterHub's weights file (bottleneck adapters) could not be read.
    #[error("adapter.safetensors: {0}")]
    AdapterHubWeights(candle_core::Error),
    #[error("adapter.safetensors: unexpected tensor {0:?}")]
    AdapterHubKey(String),
    #[error("adapter does not fit the model: {0}")]
    Mismatch(String),
}

/// The fields of PEFT's `LoraConfig` Graft reads and writes. Unknown fields are ignored on
/// read; those that change the math are checked in [`AdapterConfig::check`].
// The bools mirror PEFT's JSON fields one to one.
#[allow(clippy::struct_excessive_bools)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    pub task_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default = "none")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Per-module ranks (see [`Patterns`]).
    #[serde(default)]
    pub rank_pattern: Patterns<usize>,
    /// Per-module alphas.
    #[serde(default)]
    pub alpha_pattern: Patterns<f64>,
    #[serde(default)]
    pub layers_to_transform: Option<serde_json::Value>,
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub inference_mode: bool,
    /// `true`, `false`, or the name of an init scheme (`"gaussian"`, `"pissa"`, …).
    #[serde(default = "init_true")]
    pub init_lora_weights: serde_json::Value,
    /// Activated LoRA: same tensors, different math.
    #[serde(default)]
    pub alora_invocation_tokens: Option<serde_json::Value>,
    #[serde(default)]
    pub layer_replication: Option<serde_json::Value>,
    #[serde(default)]
    pub use_qalora: bool,
    // Newer PEFT fields, written only when set: older readers of what Graft writes do not
    // know them.
    /// A bias on `lora_B` (PEFT's `lora_bias`): refused, not yet computed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lora_bias: bool,
    /// LoRA on parameters rather than modules (MoE experts): refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_parameters: Option<serde_json::Value>,
    /// Trained rows of the embedding matrix: refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainable_token_indices: Option<serde_json::Value>,
}

fn none() -> String {
    "none".to_owned()
}

fn init_true() -> serde_json::Value {
    serde_json::Value::Bool(true)
}

/// PEFT accepts a list of module names or one regular expression.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    Names(Vec<String>),
    Pattern(String),
}

impl AdapterConfig {
    /// A config for an adapter Graft trained.
    pub fn new(rank: usize, alpha: f64, dropout: f64, use_rslora: bool, sites: &[Site]) -> Self {
        Self {
            peft_type: "LORA".to_owned(),
            task_type: Some("CAUSAL_LM".to_owned()),
            r: rank,
            lora_alpha: alpha,
            lora_dropout: dropout,
            target_modules: TargetModules::Names(
                sites.iter().map(|s| s.name().to_owned()).collect(),
            ),
            use_rslora,
            use_dora: false,
            bias: none(),
            fan_in_fan_out: false,
            modules_to_save: None,
            rank_pattern: Patterns::default(),
            alpha_pattern: Patterns::default(),
            layers_to_transform: None,
            base_model_name_or_path: None,
            inference_mode: true,
            init_lora_weights: init_true(),
            alora_invocation_tokens: None,
            layer_replication: None,
            use_qalora: false,
            lora_bias: false,
            target_parameters: None,
            trainable_token_indices: None,
        }
    }

    /// Refuses what would make Graft compute something other than PEFT does.
    pub fn check(&self) -> Result<(), PeftError> {
        let unsupported = |what: &str| Err(PeftError::Unsupported(what.to_owned()));
        if self.peft_type != "LORA" {
            return unsupported(&format!("peft_type {:?} (only LORA)", self.peft_type));
        }
        if self.bias != "none" {
            return unsupported(&format!("bias {:?} (only \"none\")", self.bias));
        }
        if self.fan_in_fan_out {
            return unsupported("fan_in_fan_out (GPT-2 style Conv1D layers)");
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return unsupported("modules_to_save (fully trained extra modules)");
        }
        if let Err(reason) = self.rank_pattern.check().and(self.alpha_pattern.check()) {
            return unsupported(&format!("rank_pattern / alpha_pattern {reason}"));
        }
        if self
            .layers_to_transform
            .as_ref()
            .is_some_and(|v| !v.is_null())
        {
            return unsupported("layers_to_transform");
        }
        if self
            .alora_invocation_tokens
            .as_ref()
            .is_some_and(|v| !v.is_null())
        {
            return unsupported("alora_invocation_tokens (activated LoRA)");
        }
        if self
            .layer_replication
            .as_ref()
            .is_some_and(|v| !v.is_null())
        {
            return unsupported("layer_replication");
        }
        if self.use_qalora {
            return unsupported("use_qalora");
        }
        if self.lora_bias {
            return unsupported("lora_bias (a bias on lora_B)");
        }
        let set = |v: &Option<serde_json::Value>| {
            v.as_ref()
                .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
        };
        if set(&self.target_parameters) {
            return unsupported("target_parameters (LoRA on expert parameters)");
        }
        if set(&self.trainable_token_indices) {
            return unsupported("trainable_token_indices (trained embedding rows)");
        }
        // Init schemes that rewrite the base weights (PiSSA, OLoRA, LoftQ, CorDA, EVA) make
        // the adapter meaningless on the unmodified base model: PEFT converts such an adapter
        // to a plain one to publish it, and so does Graft. Graft's own checkpoints of an
        // OLoRA / PiSSA run are read with `check_checkpoint`.
        if let Some(scheme) = self.init_lora_weights.as_str()
            && scheme != "gaussian"
        {
            return unsupported(&format!(
                "init_lora_weights {scheme:?} (an adapter on a rewritten base; save it with \
                 path_initial_model_for_weight_conversion to get one for the original base)"
            ));
        }
        if self.r == 0 || self.rank_pattern.values().any(|&r| r == 0) {
            return unsupported("r = 0");
        }
        Ok(())
    }

    /// [`check`](Self::check), allowing the inits Graft trains on a residual base (OLoRA,
    /// PiSSA): a checkpoint of such a run resumes on the residual the trainer recomputes.
    pub fn check_checkpoint(&self) -> Result<(), PeftError> {
        if self.init().rewrites_base() {
            if self.use_dora {
                // DoRA's magnitudes are norms of the base weights these inits rewrite.
                return Err(PeftError::Unsupported(format!(
                    "use_dora with init_lora_weights {}",
                    self.init_lora_weights
                )));
            }
            let plain = Self {
                init_lora_weights: init_true(),
                ..self.clone()
            };
            return plain.check();
        }
        self.check()
    }

    /// The rank and scale of the pair on `site` of `layer`: `r` and `lora_alpha`, unless
    /// `rank_pattern` / `alpha_pattern` name that module.
    pub fn pair(&self, layer: usize, site: Site) -> (usize, f64) {
        let module = site.module(layer);
        let rank = self.rank_pattern.lookup(&module).copied().unwrap_or(self.r);
        let alpha = self
            .alpha_pattern
            .lookup(&module)
            .copied()
            .unwrap_or(self.lora_alpha);
        (rank, scaling(alpha, rank, self.use_rslora))
    }

    /// How a fresh pair's `A` is drawn for this config's `init_lora_weights`.
    pub fn init(&self) -> Init {
        match self.init_lora_weights.as_str() {
            Some("gaussian") => Init::Gaussian,
            Some("olora") => Init::Olora,
            Some("pissa") => Init::Pissa,
            _ => Init::Kaiming,
        }
    }

    /// The largest rank of any pair.
    pub fn max_rank(&self) -> usize {
        self.rank_pattern.values().copied().fold(self.r, usize::max)
    }
}

/// An adapter: its config and one A/B pair per (layer, site).
#[derive(Clone, Debug)]
pub struct Adapter {
    pub config: AdapterConfig,
    pub weights: BTreeMap<(usize, Site), Lora>,
}

fn key(layer: usize, site: Site, half: char) -> String {
    format!("base_model.model.{}.lora_{half}.weight", site.module(layer))
}

/// DoRA's magnitude of `site` of `layer`, as PEFT saves it.
fn magnitude_key(layer: usize, site: Site) -> String {
    format!(
        "base_model.model.{}.lora_magnitude_vector",
        site.module(layer)
    )
}

/// `(layer, site, 'A' | 'B' | 'M')` of a PEFT key (with or without PEFT's adapter name);
/// `'M'` is DoRA's magnitude (`lora_magnitude_vector`, which PEFT saves without `.weight`).
fn parse_key(key: &str) -> Option<(usize, Site, char)> {
    let rest = key.strip_prefix("base_model.model.model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, rest) = rest.split_once(".lora_")?;
    let (half, tail) = match rest.strip_prefix("magnitude_vector") {
        Some("") => ('M', ".weight"),
        Some(tail) => ('M', tail),
        None => {
            let half = rest.chars().next()?;
            (half, &rest[half.len_utf8()..])
        }
    };
    if !(tail == ".weight" || tail.ends_with(".weight") && tail.starts_with('.')) {
        return None;
    }
    let site = Site::from_name(module.rsplit('.').next()?)?;
    (site.path() == module).then_some(())?;
    Some((layer.parse().ok()?, site, half))
}

/// A pair's `A`, `B` and DoRA magnitude as they are read.
type Parts = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

impl Adapter {
    /// Reads PEFT's two files.
    pub fn from_bytes(
        config_json: &[u8],
        safetensors: &[u8],
        device: &Device,
    ) -> Result<Self, PeftError> {
        let config: AdapterConfig = serde_json::from_slice(config_json)?;
        config.check()?;
        Self::with_weights(config, safetensors, device)
    }

    /// Reads a trainer checkpoint's adapter: as [`from_bytes`](Self::from_bytes), but an
    /// OLoRA / PiSSA adapter (relative to the residual base) is allowed.
    pub fn from_checkpoint_bytes(
        config_json: &[u8],
        safetensors: &[u8],
        device: &Device,
    ) -> Result<Self, PeftError> {
        let config: AdapterConfig = serde_json::from_slice(config_json)?;
        config.check_checkpoint()?;
        Self::with_weights(config, safetensors, device)
    }

    fn with_weights(
        config: AdapterConfig,
        safetensors: &[u8],
        device: &Device,
    ) -> Result<Self, PeftError> {
        let tensors = candle_core::safetensors::load_buffer(safetensors, device)?;
        let mut halves: BTreeMap<(usize, Site), Parts> = BTreeMap::new();
        for (name, tensor) in tensors {
            let (layer, site, half) =
                parse_key(&name).ok_or_else(|| PeftError::UnexpectedKey(name.clone()))?;
            let entry = halves.entry((layer, site)).or_default();
            let tensor = tensor.to_dtype(DType::F32)?;
            match half {
                'A' => entry.0 = Some(tensor),
                'B' => entry.1 = Some(tensor),
                // A magnitude in an adapter that is not DoRA would be silently ignored.
                'M' if config.use_dora => entry.2 = Some(tensor),
                _ => return Err(PeftError::UnexpectedKey(name)),
            }
        }
        let weights = halves
            .into_iter()
            .map(|((layer, site), pair)| match pair {
                (Some(a), Some(b), magnitude) => {
                    if config.use_dora && magnitude.is_none() {
                        return Err(PeftError::Mismatch(format!(
                            "use_dora is set but {} of layer {layer} has no lora_magnitude_vector",
                            site.name()
                        )));
                    }
                    let (_, scale) = config.pair(layer, site);
                    Ok((
                        (layer, site),
                        Lora {
                            a,
                            b,
                            scale,
                            magnitude,
                        },
                    ))
                }
                (a, _, _) => Err(PeftError::HalfPair {
                    layer,
                    site: site.name(),
                    missing: if a.is_none() { 'A' } else { 'B' },
                }),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { config, weights })
    }

    /// PEFT's two files: `adapter_config.json` and `adapter_model.safetensors`.
    pub fn to_bytes(&self) -> Result<(Vec<u8>, Vec<u8>), PeftError> {
        let config = serde_json::to_vec_pretty(&self.config)?;
        let mut tensors = Vec::new();
        for (&(layer, site), lora) in &self.weights {
            tensors.push((
                key(layer, site, 'A'),
                lora.a.to_dtype(DType::F32)?.contiguous()?,
            ));
            tensors.push((
                key(layer, site, 'B'),
                lora.b.to_dtype(DType::F32)?.contiguous()?,
            ));
            if let Some(magnitude) = &lora.magnitude {
                tensors.push((
                    magnitude_key(layer, site),
                    magnitude.to_dtype(DType::F32)?.contiguous()?,
                ));
            }
        }
        let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
        let weights = safetensors::serialize(tensors, Some(metadata))
            .map_err(|e| PeftError::Weights(candle_core::Error::wrap(e)))?;
        Ok((config, weights))
    }

    /// Whether every pair has a layer of a model of `layers` layers and the shape its
    /// projection has there (`shape` gives a site's `(out, in)`).
    pub fn check_fits(
        &self,
        layers: usize,
        shape: impl Fn(Site) -> Option<(usize, usize)>,
    ) -> Result<(), PeftError> {
        if self.weights.is_empty() {
            return Err(PeftError::Mismatch(
                "the adapter holds no LoRA weights".to_owned(),
            ));
        }
        for (&(layer, site), lora) in &self.weights {
            let (out, input) = shape_at(layer, site, layers, &shape)?;
            let (rank, _) = self.config.pair(layer, site);
            let expected = [(lora.a.dims(), [rank, input]), (lora.b.dims(), [out, rank])];
            for (actual, want) in expected {
                if actual != want {
                    return Err(PeftError::Mismatch(format!(
                        "{} of layer {layer} is {actual:?}, the model needs {want:?}",
                        site.name()
                    )));
                }
            }
            if let Some(magnitude) = &lora.magnitude
                && magnitude.dims() != [out]
            {
                return Err(PeftError::Mismatch(format!(
                    "the DoRA magnitude of {} of layer {layer} is {:?}, the model needs [{out}]",
                    site.name(),
                    magnitude.dims()
                )));
            }
        }
        Ok(())
    }
}

/// The `(out, in)` of `site` in `layer` of a model of `layers` layers (`shape` gives a site's),
/// or what is missing, for any method's check that it fits a model.
pub(super) fn shape_at(
    layer: usize,
    site: Site,
    layers: usize,
    shape: impl Fn(Site) -> Option<(usize, usize)>,
) -> Result<(usize, usize), PeftError> {
    if layer >= layers {
        return Err(PeftError::Mismatch(format!(
            "layer {layer} does not exist (the model has {layers})"
        )));
    }
    shape(site).ok_or_else(|| {
        PeftError::Mismatch(format!(
            "the model has no {} (its projections are fused differently)",
            site.name()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_with_and_without_the_adapter_name() {
        assert_eq!(
            parse_key("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"),
            Some((3, Site::QProj, 'A'))
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.0.mlp.down_proj.lora_B.default.weight"),
            Some((0, Site::DownProj, 'B'))
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector"),
            Some((1, Site::VProj, 'M'))
        );
        assert_eq!(
            parse_key(
                "base_model.model.model.layers.1.mlp.up_proj.lora_magnitude_vector.default.weight"
            ),
            Some((1, Site::UpProj, 'M'))
        );
        assert_eq!(parse_key("base_model.model.lm_head.weight"), None);
        assert_eq!(
            parse_key("base_model.model.model.layers.0.self_attn.gate_proj.lora_A.weight"),
            None,
            "gate_proj lives under mlp"
        );
    }

    type Change = Box<dyn Fn(&mut AdapterConfig)>;

    #[test]
    fn features_graft_cannot_honour_are_refused_by_name() {
        let base = AdapterConfig::new(8, 16.0, 0.0, false, &[Site::QProj]);
        let cases: [(&str, Change); 6] = [
            ("bias", Box::new(|c| c.bias = "all".to_owned())),
            (
                "modules_to_save",
                Box::new(|c| c.modules_to_save = Some(vec!["lm_head".to_owned()])),
            ),
            ("lora_bias", Box::new(|c| c.lora_bias = true)),
            (
                "target_parameters",
                Box::new(|c| c.target_parameters = Some(serde_json::json!(["experts.w1"]))),
            ),
            (
                "trainable_token_indices",
                Box::new(|c| c.trainable_token_indices = Some(serde_json::json!([3, 4]))),
            ),
            (
                "rank_pattern",
                Box::new(|c| c.rank_pattern = Patterns::new(vec![("q_(?=p)".to_owned(), 4)])),
            ),
        ];
        for (name, change) in cases {
            let mut config = base.clone();
            change(&mut config);
            let error = config.check().expect_err(name);
            assert!(error.to_string().contains(name), "{error}");
        }
        assert!(base.check().is_ok());
    }

    /// A PEFT file saved without the weight conversion (`init_lora_weights: "pissa"`) applies
    /// to a rewritten base and is refused; the trainer's own checkpoints of such a run (read
    /// with `check_checkpoint`) are not, though anything else wrong with them still is.
    #[test]
    fn olora_and_pissa_adapters_load_only_as_the_trainers_checkpoints() {
        for init in ["olora", "pissa"] {
            let config = AdapterConfig {
                init_lora_weights: init.into(),
                ..AdapterConfig::new(8, 16.0, 0.0, false, &[Site::QProj])
            };
            let error = config.check().expect_err(init);
            assert!(error.to_string().contains(init), "{error}");
            assert!(config.check_checkpoint().is_ok());
            assert_eq!(config.init().peft_name(), serde_json::json!(init));
            let dora = AdapterConfig {
                use_dora: true,
                ..config
            };
            assert!(dora.check_checkpoint().is_err());
        }
    }

    #[test]
    fn rank_and_alpha_patterns_give_each_pair_its_own_rank_and_scale() {
        let config = AdapterConfig {
            rank_pattern: Patterns::new(vec![
                ("layers.1.self_attn.q_proj".to_owned(), 2),
                ("q_proj".to_owned(), 16),
            ]),
            alpha_pattern: Patterns::new(vec![("v_proj".to_owned(), 4.0)]),
            ..AdapterConfig::new(8, 16.0, 0.0, false, &[Site::QProj, Site::VProj])
        };
        assert!(config.check().is_ok());
        assert_eq!(config.pair(0, Site::QProj), (16, 1.0));
        assert_eq!(config.pair(1, Site::QProj), (2, 8.0));
        assert_eq!(config.pair(0, Site::VProj), (8, 0.5));
        assert_eq!(config.max_rank(), 16);
    }
}
