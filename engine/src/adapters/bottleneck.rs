//! Bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2020) as the AdapterHub
//! `adapters` library computes and stores them on decoder models. After a sub-block, a small
//! MLP's output `scaling · up(act(down(x)))` joins the residual stream:
//! - Houlsby (`DoubleSeqBnConfig`): after attention and after the feed-forward block, reading
//!   the sub-block's output;
//! - Pfeiffer (`SeqBnConfig`): after the feed-forward block only, reading the stream after the
//!   residual add (`original_ln_before`).
//!
//! On Llama-family models the library hands the adapter no layer norm, so both come to
//! `stream + out + scaling · up(act(down(x)))`, `x` the sub-block's output `out` or the
//! stream with it added.
//!
//! Files, as `save_adapter(.., use_safetensors=True)` writes them: `adapter_config.json`
//! (`{"config": {..}, "name", "hidden_size", "model_type", ..}`) and `adapter.safetensors`,
//! `model.layers.N.{attention,output}_adapters.adapters.<name>.adapter_{down.0,up}.{weight,bias}`.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::PeftError;
use crate::rng::Rng;

/// AdapterHub's weights file (Graft writes and reads the safetensors form only).
pub const ADAPTERHUB_WEIGHTS: &str = "adapter.safetensors";

/// The library version whose format Graft writes (`version` in `adapter_config.json`).
pub const ADAPTERHUB_VERSION: &str = "adapters.1.3.0";

/// Where in a decoder layer an adapter sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Placement {
    /// After self-attention (AdapterHub's `mh_adapter`).
    Attention,
    /// After the feed-forward block (`output_adapter`).
    Output,
}

impl Placement {
    pub const ALL: [Self; 2] = [Self::Attention, Self::Output];

    /// The module holding the adapters there, in AdapterHub's tensor names.
    fn module(self) -> &'static str {
        match self {
            Self::Attention => "attention_adapters",
            Self::Output => "output_adapters",
        }
    }
}

/// The bottleneck's non-linearity, by transformers' `get_activation` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NonLinearity {
    Relu,
    /// `swish` or `silu`.
    Silu,
    /// The exact (erf) GELU.
    Gelu,
    /// The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Tanh,
    Sigmoid,
}

impl NonLinearity {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "relu" => Self::Relu,
            "swish" | "silu" => Self::Silu,
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Self::GeluTanh,
            "tanh" => Self::Tanh,
            "sigmoid" => Self::Sigmoid,
            _ => return None,
        })
    }

    /// Candle's unary ops all have a backward; the sigmoid is composed of ops that do.
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Relu => x.relu(),
            Self::Silu => x.silu(),
            Self::Gelu => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::Tanh => x.tanh(),
            Self::Sigmoid => (x.neg()?.exp()? + 1.0)?.recip(),
        }
    }
}

/// One adapter module: `down` `[size, hidden]`, `up` `[hidden, size]` and their biases.
#[derive(Clone, Debug)]
pub struct Bottleneck {
    pub down: Tensor,
    pub down_bias: Tensor,
    pub up: Tensor,
    pub up_bias: Tensor,
    pub scaling: f64,
    pub activation: NonLinearity,
    /// Whether it reads the stream after the residual add (Pfeiffer) rather than the
    /// sub-block's output (Houlsby).
    pub reads_stream: bool,
}

impl Bottleneck {
    /// AdapterHub's default start (`init_weights: "bert"`): weights normal with standard
    /// deviation 0.02, biases zero, drawn from `rng`, f32.
    pub fn init(
        hidden: usize,
        size: usize,
        config: &BottleneckConfig,
        rng: &mut Rng,
        device: &Device,
    ) -> std::result::Result<Self, PeftError> {
        let mut normal = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.normal(0.02)).collect() };
        let down = Tensor::from_vec(normal(size * hidden), (size, hidden), device)?;
        let up = Tensor::from_vec(normal(hidden * size), (hidden, size), device)?;
        Ok(Self {
            down,
            down_bias: Tensor::zeros(size, DType::F32, device)?,
            up,
            up_bias: Tensor::zeros(hidden, DType::F32, device)?,
            scaling: config.scaling()?,
            activation: config.activation()?,
            reads_stream: config.original_ln_before,
        })
    }

    /// The bottleneck's width.
    pub fn size(&self) -> usize {
        self.down.dims().first().copied().unwrap_or(0)
    }

    /// `scaling · up(act(down(x)))` for `x` `[.., hidden]`, computed in the weights' dtype and
    /// returned in `x`'s; differentiable in the weights and in `x`.
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let linear =
            |x: &Tensor, w: &Tensor, b: &Tensor| x.broadcast_matmul(&w.t()?)?.broadcast_add(b);
        let h = x.to_dtype(self.down.dtype())?;
        let down = self
            .activation
            .apply(&linear(&h, &self.down, &self.down_bias)?)?;
        linear(&down, &self.up, &self.up_bias)?
            .affine(self.scaling, 0.0)?
            .to_dtype(x.dtype())
    }

    /// The stream after a sub-block with this adapter: `stream` (the residual add of `out`,
    /// the sub-block's output, already in it) plus the adapter's output.
    pub fn apply(&self, out: &Tensor, stream: &Tensor) -> Result<Tensor> {
        let x = if self.reads_stream { stream } else { out };
        stream + self.delta(x)?
    }

    /// The same module with no gradient recorded through it (evaluation, serving).
    #[must_use]
    pub fn detach(&self) -> Self {
        Self {
            down: self.down.detach(),
            down_bias: self.down_bias.detach(),
            up: self.up.detach(),
            up_bias: self.up_bias.detach(),
            ..*self
        }
    }

    /// This module on `device` in `dtype`, contiguous.
    pub fn to(&self, device: &Device, dtype: DType) -> Result<Self> {
        let place = |t: &Tensor| t.to_device(device)?.to_dtype(dtype)?.contiguous();
        Ok(Self {
            down: place(&self.down)?,
            down_bias: place(&self.down_bias)?,
            up: place(&self.up)?,
            up_bias: place(&self.up_bias)?,
            ..*self
        })
    }

    /// The four tensors in AdapterHub's order and names (after the module's prefix).
    fn named(&self) -> [(&'static str, &Tensor); 4] {
        [
            ("adapter_down.0.weight", &self.down),
            ("adapter_down.0.bias", &self.down_bias),
            ("adapter_up.weight", &self.up),
            ("adapter_up.bias", &self.up_bias),
        ]
    }
}

/// The `config` of AdapterHub's `BnConfig` (sequential bottleneck). The fields that change the
/// math are typed and checked ([`Self::check`]); the rest (Compacter's, dropout, seeds) ride
/// along unread, so a file read and written again keeps them.
// The bools mirror AdapterHub's JSON fields one to one.
#[allow(clippy::struct_excessive_bools)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BottleneckConfig {
    pub mh_adapter: bool,
    pub output_adapter: bool,
    /// A number, or a map from layer index (and `default`) to a number.
    pub reduction_factor: Value,
    pub non_linearity: String,
    #[serde(default)]
    pub original_ln_before: bool,
    #[serde(default = "yes")]
    pub original_ln_after: bool,
    /// `true`, `false` or `"post_add"`.
    #[serde(default = "yes_value")]
    pub residual_before_ln: Value,
    #[serde(default)]
    pub adapter_residual_before_ln: bool,
    #[serde(default)]
    pub ln_before: bool,
    #[serde(default)]
    pub ln_after: bool,
    #[serde(default = "bert")]
    pub init_weights: String,
    #[serde(default)]
    pub is_parallel: bool,
    /// A number, `"learned"` or `"channel"`.
    #[serde(default = "one")]
    pub scaling: Value,
    #[serde(default)]
    pub use_gating: bool,
    #[serde(default)]
    pub phm_layer: bool,
    #[serde(default)]
    pub inv_adapter: Option<String>,
    #[serde(default)]
    pub leave_out: Vec<usize>,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

fn yes() -> bool {
    true
}
fn yes_value() -> Value {
    Value::Bool(true)
}
fn bert() -> String {
    "bert".to_owned()
}
fn one() -> Value {
    Value::from(1.0)
}

/// The two published forms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// `DoubleSeqBnConfig`: after attention and after the feed-forward block.
    Houlsby,
    /// `SeqBnConfig`: after the feed-forward block, reading the stream.
    Pfeiffer,
}

impl BottleneckConfig {
    /// AdapterHub's config of `architecture` with `reduction_factor` and `non_linearity`, every
    /// other field at the library's value for it.
    pub fn new(architecture: Architecture, reduction_factor: f64, non_linearity: &str) -> Self {
        let houlsby = architecture == Architecture::Houlsby;
        let rest = serde_json::json!({
            "cross_adapter": false,
            "dropout": 0.0,
            "factorized_phm_W": true,
            "factorized_phm_rule": false,
            "hypercomplex_nonlinearity": "glorot-uniform",
            "init_weights_seed": null,
            "inv_adapter_reduction_factor": null,
            "learn_phm": true,
            "phm_bias": true,
            "phm_c_init": "normal",
            "phm_dim": 4,
            "phm_init_range": 0.0001,
            "phm_rank": 1,
            "shared_W_phm": false,
            "shared_phm_rule": true,
            "stochastic_depth": 0.0,
        });
        let Value::Object(rest) = rest else {
            unreachable!("a JSON object literal")
        };
        Self {
            mh_adapter: houlsby,
            output_adapter: true,
            reduction_factor: whole_or_fraction(reduction_factor),
            non_linearity: non_linearity.to_owned(),
            original_ln_before: !houlsby,
            original_ln_after: true,
            residual_before_ln: Value::Bool(true),
            adapter_residual_before_ln: false,
            ln_before: false,
            ln_after: false,
            init_weights: "bert".to_owned(),
            is_parallel: false,
            scaling: Value::from(1.0),
            use_gating: false,
            phm_layer: false,
            inv_adapter: None,
            leave_out: Vec::new(),
            rest,
        }
    }

    /// Refuses what would make Graft compute something other than the library does.
    pub fn check(&self) -> std::result::Result<(), PeftError> {
        let unsupported = |what: &str| Err(PeftError::Unsupported(what.to_owned()));
        if self.is_parallel {
            return unsupported("is_parallel (parallel bottleneck adapters)");
        }
        if self.phm_layer {
            return unsupported("phm_layer (Compacter)");
        }
        if self.inv_adapter.is_some() {
            return unsupported("inv_adapter (invertible adapters)");
        }
        if self.use_gating {
            return unsupported("use_gating");
        }
        if self.ln_before || self.ln_after {
            return unsupported("ln_before / ln_after (the adapter's own layer norms)");
        }
        if !self.original_ln_after {
            return unsupported("original_ln_after: false");
        }
        if self.residual_before_ln != Value::Bool(true) {
            return unsupported(&format!("residual_before_ln {}", self.residual_before_ln));
        }
        if !self.mh_adapter && !self.output_adapter {
            return unsupported("neither mh_adapter nor output_adapter");
        }
        self.activation()?;
        self.scaling()?;
        Ok(())
    }

    pub fn activation(&self) -> std::result::Result<NonLinearity, PeftError> {
        NonLinearity::parse(&self.non_linearity).ok_or_else(|| {
            PeftError::Unsupported(format!(
                "non_linearity {:?} (Graft computes relu, swish/silu, gelu, gelu_new, tanh and sigmoid)",
                self.non_linearity
            ))
        })
    }

    /// The constant scaling; a learned one (`"learned"`, `"channel"`) is refused.
    pub fn scaling(&self) -> std::result::Result<f64, PeftError> {
        self.scaling.as_f64().ok_or_else(|| {
            PeftError::Unsupported(format!("scaling {} (a learned scaling)", self.scaling))
        })
    }

    /// The placements this config puts an adapter at.
    pub fn placements(&self) -> Vec<Placement> {
        Placement::ALL
            .into_iter()
            .filter(|p| match p {
                Placement::Attention => self.mh_adapter,
                Placement::Output => self.output_adapter,
            })
            .collect()
    }

    /// The bottleneck width on `layer` of a model of width `hidden`, as the library computes
    /// it (`int(hidden // reduction_factor)`, at least 1); `None` where the layer is left out.
    pub fn size(
        &self,
        layer: usize,
        hidden: usize,
    ) -> std::result::Result<Option<usize>, PeftError> {
        if self.leave_out.contains(&layer) {
            return Ok(None);
        }
        let factor = match &self.reduction_factor {
            Value::Object(map) => map.get(&layer.to_string()).or_else(|| map.get("default")),
            other => Some(other),
        }
        .and_then(Value::as_f64)
        .ok_or_else(|| {
            PeftError::Unsupported(format!(
                "reduction_factor {} (a number, or a map with a default)",
                self.reduction_factor
            ))
        })?;
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        let size = python_floor_div(hidden as f64, factor).max(1.0) as usize;
        Ok(Some(size))
    }
}

/// A whole factor as the integer the library's users give (`16`, not `16.0`).
fn whole_or_fraction(factor: f64) -> Value {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    if factor.fract() == 0.0 && (1.0..=f64::from(u32::MAX)).contains(&factor) {
        Value::from(factor as u64)
    } else {
        Value::from(factor)
    }
}

/// The reduction factor nearest `hidden / size` that the library turns back into `size`
/// bottleneck units (`hidden / size` itself can come back one short: `576 // (576 / 40)` is 39).
#[allow(clippy::cast_precision_loss)]
pub fn reduction_for_size(hidden: usize, size: usize) -> f64 {
    let (h, want) = (hidden as f64, size as f64);
    let mut factor = h / want;
    // A few ulps down at most.
    for _ in 0..64 {
        if python_floor_div(h, factor) >= want {
            break;
        }
        factor = factor.next_down();
    }
    factor
}

/// Python's `a // b` for floats (CPython's `float_floor_div`), whose rounding can differ from
/// `(a / b).floor()`.
fn python_floor_div(a: f64, b: f64) -> f64 {
    let rem = a % b;
    let mut div = (a - rem) / b;
    if rem != 0.0 && ((b < 0.0) != (rem < 0.0)) {
        div -= 1.0;
    }
    let mut floor = div.floor();
    if div - floor > 0.5 {
        floor += 1.0;
    }
    floor
}

/// What AdapterHub's `adapter_config.json` holds beside the config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterHubFile {
    pub config: BottleneckConfig,
    pub hidden_size: usize,
    pub model_class: Option<String>,
    pub model_name: Option<String>,
    pub model_type: Option<String>,
    /// The adapter's name, which its tensor names carry.
    pub name: String,
    pub version: Option<String>,
}

/// Whether `config_json` is AdapterHub's (`{"config": {..}, "name": ..}`) rather than PEFT's.
pub fn is_adapterhub(config_json: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Shape {
        config: Option<Map<String, Value>>,
        name: Option<String>,
    }
    serde_json::from_slice::<Shape>(config_json).is_ok_and(|s| {
        s.config.is_some_and(|c| c.contains_key("reduction_factor")) && s.name.is_some()
    })
}

/// A bottleneck adapter: its file's fields and its modules by layer and placement.
#[derive(Clone, Debug)]
pub struct BottleneckAdapter {
    pub file: AdapterHubFile,
    pub modules: BTreeMap<(usize, Placement), Bottleneck>,
}

/// `(layer, placement, tensor)` of a tensor name, for an adapter named `name`.
fn parse_key(key: &str, name: &str) -> Option<(usize, Placement, &'static str)> {
    let rest = key.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let placement = Placement::ALL
        .into_iter()
        .find(|p| rest.starts_with(&format!("{}.adapters.{name}.", p.module())))?;
    let tensor = &rest[placement.module().len() + ".adapters.".len() + name.len() + 1..];
    let tensor = [
        "adapter_down.0.weight",
        "adapter_down.0.bias",
        "adapter_up.weight",
        "adapter_up.bias",
    ]
    .into_iter()
    .find(|t| *t == tensor)?;
    Some((layer.parse().ok()?, placement, tensor))
}

impl BottleneckAdapter {
    /// Reads AdapterHub's two files.
    pub fn from_bytes(
        config_json: &[u8],
        safetensors: &[u8],
        device: &Device,
    ) -> std::result::Result<Self, PeftError> {
        let file: AdapterHubFile = serde_json::from_slice(config_json)?;
        file.config.check()?;
        let (scaling, activation) = (file.config.scaling()?, file.config.activation()?);
        let mut tensors = candle_core::safetensors::load_buffer(safetensors, device)
            .map_err(PeftError::AdapterHubWeights)?;
        let mut parts: BTreeMap<(usize, Placement), HashMap<&str, Tensor>> = BTreeMap::new();
        for (key, tensor) in tensors.drain() {
            let (layer, placement, which) =
                parse_key(&key, &file.name).ok_or_else(|| PeftError::AdapterHubKey(key.clone()))?;
            parts.entry((layer, placement)).or_default().insert(
                which,
                tensor
                    .to_dtype(DType::F32)
                    .map_err(PeftError::AdapterHubWeights)?,
            );
        }
        let mut modules = BTreeMap::new();
        for ((layer, placement), mut part) in parts {
            let mut take = |which: &str| {
                part.remove(which).ok_or_else(|| {
                    PeftError::Mismatch(format!(
                        "the {} adapter of layer {layer} has no {which}",
                        placement.module()
                    ))
                })
            };
            let module = Bottleneck {
                down: take("adapter_down.0.weight")?,
                down_bias: take("adapter_down.0.bias")?,
                up: take("adapter_up.weight")?,
                up_bias: take("adapter_up.bias")?,
                scaling,
                activation,
                reads_stream: file.config.original_ln_before,
            };
            modules.insert((layer, placement), module);
        }
        let adapter = Self { file, modules };
        adapter.check_shapes()?;
        Ok(adapter)
    }

    /// AdapterHub's two files: `adapter_config.json` and `adapter.safetensors`.
    pub fn to_bytes(&self) -> std::result::Result<(Vec<u8>, Vec<u8>), PeftError> {
        let config = serde_json::to_vec_pretty(&self.file)?;
        let mut tensors = Vec::with_capacity(4 * self.modules.len());
        for (&(layer, placement), module) in &self.modules {
            for (which, tensor) in module.named() {
                let key = format!(
                    "model.layers.{layer}.{}.adapters.{}.{which}",
                    placement.module(),
                    self.file.name
                );
                tensors.push((key, tensor.to_dtype(DType::F32)?.contiguous()?));
            }
        }
        let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
        let weights = safetensors::serialize(tensors, Some(metadata))
            .map_err(|e| PeftError::AdapterHubWeights(candle_core::Error::wrap(e)))?;
        Ok((config, weights))
    }

    /// Each module's four tensors agree with one another and with the config's placements.
    fn check_shapes(&self) -> std::result::Result<(), PeftError> {
        if self.modules.is_empty() {
            return Err(PeftError::Mismatch(
                "the adapter holds no bottleneck modules".to_owned(),
            ));
        }
        let placements = self.file.config.placements();
        for (&(layer, placement), module) in &self.modules {
            if !placements.contains(&placement) {
                return Err(PeftError::Mismatch(format!(
                    "layer {layer} has an adapter in {}, which its config does not place",
                    placement.module()
                )));
            }
            let hidden = self.file.hidden_size;
            let size = module.size();
            let want = [
                (&module.down, vec![size, hidden]),
                (&module.down_bias, vec![size]),
                (&module.up, vec![hidden, size]),
                (&module.up_bias, vec![hidden]),
            ];
            for (tensor, dims) in want {
                if tensor.dims() != dims.as_slice() {
                    return Err(PeftError::Mismatch(format!(
                        "the {} adapter of layer {layer} has a tensor of shape {:?} where \
                         hidden_size {hidden} and bottleneck {size} make {dims:?}",
                        placement.module(),
                        tensor.dims()
                    )));
                }
            }
        }
        Ok(())
    }

    /// The number of values its modules hold.
    pub fn parameters(&self) -> usize {
        self.modules
            .values()
            .flat_map(Bottleneck::named)
            .map(|(_, t)| t.elem_count())
            .sum()
    }

    /// Whether every module has a layer of a model of `layers` layers of width `hidden`.
    pub fn check_fits(&self, layers: usize, hidden: usize) -> std::result::Result<(), PeftError> {
        if self.file.hidden_size != hidden {
            return Err(PeftError::Mismatch(format!(
                "the adapter is for hidden_size {}, the model's is {hidden}",
                self.file.hidden_size
            )));
        }
        if let Some(&(layer, _)) = self.modules.keys().find(|(layer, _)| *layer >= layers) {
            return Err(PeftError::Mismatch(format!(
                "the adapter has layer {layer}; the model has {layers}"
            )));
        }
        Ok(())
    }
}

/// A mixed serving batch's stream `[rows, hidden]` after a sub-block whose output was `out`,
/// with each segment's rows through its adapter's module there, where it has one.
pub fn apply_segments(
    out: &Tensor,
    stream: Tensor,
    segments: &[(std::ops::Range<usize>, Option<&Bottleneck>)],
) -> Result<Tensor> {
    let parts: Vec<_> = segments
        .iter()
        .map(|(rows, module)| (rows.clone(), module.map(|m| (rows.clone(), m))))
        .collect();
    super::batch::map_segment_rows(stream, &parts, "bottleneck", |own, (rows, module)| {
        module.apply(&out.narrow(0, rows.start, rows.len())?, own)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_floor_division_is_matched() {
        assert!((python_floor_div(64.0, 4.0) - 16.0).abs() < f64::EPSILON);
        assert!((python_floor_div(576.0, 16.0) - 36.0).abs() < f64::EPSILON);
        assert!(
            (python_floor_div(1.0, 0.1) - 9.0).abs() < f64::EPSILON,
            "Python: 1 // 0.1 == 9.0"
        );
        assert!((python_floor_div(64.0, 64.0 / 24.0) - 24.0).abs() < f64::EPSILON);
        assert!(
            (python_floor_div(576.0, 576.0 / 40.0) - 39.0).abs() < f64::EPSILON,
            "Python: 39.0"
        );
        let factor = reduction_for_size(576, 40);
        assert!((python_floor_div(576.0, factor) - 40.0).abs() < f64::EPSILON);
        assert!((factor - 14.4).abs() < 1e-12);
    }

    #[test]
    fn keys_parse_for_the_adapter_s_own_name_only() {
        assert_eq!(
            parse_key(
                "model.layers.3.output_adapters.adapters.pf.adapter_up.bias",
                "pf"
            ),
            Some((3, Placement::Output, "adapter_up.bias"))
        );
        assert_eq!(
            parse_key(
                "model.layers.0.attention_adapters.adapters.a.b.adapter_down.0.weight",
                "a.b"
            ),
            Some((0, Placement::Attention, "adapter_down.0.weight"))
        );
        assert_eq!(
            parse_key(
                "model.layers.3.output_adapters.adapters.other.adapter_up.bias",
                "pf"
            ),
            None
        );
        assert_eq!(
            parse_key(
                "model.layers.3.output_adapters.adapters.pf.gate.weight",
                "pf"
            ),
            None
        );
    }
}
