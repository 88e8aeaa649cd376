use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::Toleration,
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{Condition, Time},
    },
};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{NAME_PATTERN, OUTPUT_URI_PATTERN, SOURCE_URI_PATTERN, SecretRef};

/// A positive Kubernetes quantity (CEL's quantity library; the field is an int-or-string).
const QUANTITY_RULE: &str =
    "isQuantity(string(self)) && quantity(string(self)).isGreaterThan(quantity('0'))";

/// A domain-prefixed extended resource name (`vendor.example/resource`).
const EXTENDED_RESOURCE_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$";

/// Keeping the best adapter and stopping early both read evaluation losses.
const NEEDS_VALIDATION_SPLIT: &str = "!has(self.spec.training) || \
     ((!has(self.spec.training.keepBest) || !self.spec.training.keepBest) \
     && !has(self.spec.training.earlyStoppingPatience)) || \
     !has(self.spec.dataset.validationFraction) || self.spec.dataset.validationFraction > 0.0";

/// Packed rows are already full: grouping them by length would only undo the shuffle.
const PACKING_OR_LENGTH_GROUPS: &str = "!has(self.spec.training) || \
     !has(self.spec.training.packing) || !self.spec.training.packing || \
     !has(self.spec.training.groupByLength) || !self.spec.training.groupByLength";

/// Virtual tokens go before each sequence, and a packed row holds several.
const VIRTUAL_TOKENS_UNPACKED: &str = "!has(self.spec.method) || \
     !(has(self.spec.method.promptTuning) || has(self.spec.method.pTuning) || \
     has(self.spec.method.prefixTuning)) || \
     !has(self.spec.training) || !has(self.spec.training.packing) || !self.spec.training.packing";

/// Virtual tokens change the input, not the weights: no merged model holds them.
const VIRTUAL_TOKENS_UNMERGED: &str = "!has(self.spec.method) || \
     !(has(self.spec.method.promptTuning) || has(self.spec.method.pTuning) || \
     has(self.spec.method.prefixTuning)) || \
     !has(self.spec.output.merged) || !self.spec.output.merged";

/// A bottleneck adapter adds modules with a non-linearity between the layers: no weight of
/// the base can hold them.
const BOTTLENECK_UNMERGED: &str = "!has(self.spec.method) || !has(self.spec.method.bottleneck) || \
     !has(self.spec.output.merged) || !self.spec.output.merged";

/// DoRA's magnitudes are the norms of the exact base weights it was trained on, and the
/// runtimes that serve GGUF files (llama.cpp and its kin) have no DoRA.
const DORA_NEEDS_SAFETENSORS: &str = "!has(self.spec.method) || !has(self.spec.method.lora) || \
     !has(self.spec.method.lora.useDora) || !self.spec.method.lora.useDora || \
     !self.spec.baseModel.uri.endsWith('.gguf')";

/// OLoRA and PiSSA take the adapter's start out of the dense base weights: a GGUF base (a URI
/// ending in `.gguf`) has none to rewrite.
const RESIDUAL_INIT_NEEDS_DENSE_BASE: &str = "!has(self.spec.method) || \
     !has(self.spec.method.lora) || !has(self.spec.method.lora.init) || \
     !(self.spec.method.lora.init in ['olora', 'pissa']) || \
     !self.spec.baseModel.uri.matches('(?i)[.]gguf$')";

/// DoRA's magnitudes are norms of the base weights, which OLoRA and PiSSA rewrite; PEFT's
/// conversion of such a start to a plain LoRA on the original base has no DoRA form.
const DORA_OR_RESIDUAL_INIT: &str = "!has(self.spec.method) || !has(self.spec.method.lora) || \
     !has(self.spec.method.lora.useDora) || !self.spec.method.lora.useDora || \
     !has(self.spec.method.lora.init) || !(self.spec.method.lora.init in ['olora', 'pissa'])";

/// Once the operator has started a job (`status.startTime` is set) its spec is frozen: a changed
/// model, dataset, method, training or output would silently describe a run that never happened.
/// `suspend`, `resources` and `image` stay mutable so Kueue-style admission and re-scheduling work.
const IMMUTABLE_AFTER_START: &str = "!has(oldSelf.status) || !has(oldSelf.status.startTime) || \
     (self.spec.baseModel == oldSelf.spec.baseModel && self.spec.dataset == oldSelf.spec.dataset \
     && self.spec.method == oldSelf.spec.method && self.spec.training == oldSelf.spec.training \
     && self.spec.output == oldSelf.spec.output)";

/// Trains a LoRA or QLoRA adapter for a base model on a dataset and stores it in object storage.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "graft.dev",
    version = "v1alpha1",
    kind = "FineTuneJob",
    plural = "finetunejobs",
    shortname = "ftj",
    category = "graft",
    namespaced,
    status = "FineTuneJobStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Method","type":"string","jsonPath":".status.method"}"#,
    printcolumn = r#"{"name":"Step","type":"integer","jsonPath":".status.progress.step"}"#,
    printcolumn = r#"{"name":"Total","type":"integer","jsonPath":".status.progress.totalSteps"}"#,
    printcolumn = r#"{"name":"Loss","type":"number","jsonPath":".status.progress.loss"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new(IMMUTABLE_AFTER_START)
        .message("spec.baseModel, spec.dataset, spec.method, spec.training and spec.output are immutable once the job has started")
        .field_path(".spec")
        .reason(Reason::FieldValueForbidden),
    validation = Rule::new(DORA_NEEDS_SAFETENSORS)
        .message("spec.method.lora.useDora needs a Hugging Face safetensors base model, not a .gguf file: DoRA's magnitudes are norms of the exact base weights, and GGUF runtimes have no DoRA")
        .reason(Reason::FieldValueForbidden),
    validation = Rule::new(NEEDS_VALIDATION_SPLIT)
        .message("spec.training.keepBest and spec.training.earlyStoppingPatience need evaluations: set spec.dataset.validationFraction above 0")
        .reason(Reason::FieldValueInvalid),
    validation = Rule::new(PACKING_OR_LENGTH_GROUPS)
        .message("spec.training.packing and spec.training.groupByLength do not go together: packed rows are already of one length")
        .reason(Reason::FieldValueForbidden),
    validation = Rule::new(VIRTUAL_TOKENS_UNPACKED)
        .message("spec.training.packing does not go with promptTuning, pTuning or prefixTuning: their virtual tokens go before each sequence, and a packed row holds several")
        .reason(Reason::FieldValueForbidden),
    validation = Rule::new(VIRTUAL_TOKENS_UNMERGED)
        .message("spec.output.merged does not go with promptTuning, pTuning or prefixTuning: their virtual tokens change the input, not the weights, so no merged model holds them")
        .reason(Reason::FieldValueForbidden),
    validation = Rule::new(BOTTLENECK_UNMERGED)
        .message("spec.output.merged does not go with bottleneck: its modules, with their non-linearity, sit between the layers, and no merged weight holds them")
        .reason(Reason::FieldValueForbidden),
    validation = Rule::new(DORA_OR_RESIDUAL_INIT)
        .message("spec.method.lora.useDora does not go with init olora or pissa: they rewrite the base weights DoRA's magnitudes are norms of")
        .reason(Reason::FieldValueForbidden),
    validation = Rule::new(RESIDUAL_INIT_NEEDS_DENSE_BASE)
        .message("spec.method.lora.init: olora and pissa rewrite the base weights, which a GGUF base (spec.baseModel.uri ending in .gguf) does not hold densely: use a Hugging Face checkpoint, or init kaiming or gaussian")
        .reason(Reason::FieldValueForbidden),
    // The name becomes the Job's name and a label value, both at most 63 characters.
    validation = Rule::new("self.metadata.name.size() <= 63")
        .message("metadata.name is at most 63 characters: it names the training Job and labels its pods")
        .reason(Reason::FieldValueInvalid),
)]
#[serde(rename_all = "camelCase")]
pub struct FineTuneJobSpec {
    /// The base model to adapt: a Hugging Face model directory (`config.json`,
    /// `*.safetensors`, `tokenizer.json`) or a `.gguf` file, at an `s3://`, `file://` or
    /// `hf://` URI. The architectures Graft runs are [`SUPPORTED_MODEL_TYPES`].
    #[schemars(description = base_model_description())]
    pub base_model: ModelSource,
    /// The training data: one JSONL file.
    pub dataset: DatasetSource,
    /// How the adapter is trained: quantization of the frozen weights and the method (a LoRA
    /// with its defaults when none is named).
    #[serde(default)]
    pub method: Method,
    /// Optimiser and schedule.
    #[serde(default)]
    pub training: Training,
    /// Where the finished adapter is written.
    pub output: OutputTarget,
    /// Object-storage endpoint and credentials for `s3://` URIs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageConfig>,
    /// Compute for the training pod.
    #[serde(default)]
    pub resources: Resources,
    /// Trainer image for this job; the operator's default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// Suspends the job: no pod runs while true. Compatible with Kueue.
    #[serde(default)]
    pub suspend: bool,
    /// Seconds the training may run in all, retries included, before the job fails with
    /// reason DeadlineExceeded; no limit when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 31_536_000))]
    pub active_deadline_seconds: Option<i64>,
}

/// The `model_type` values (of `config.json`, or a GGUF file's `general.architecture`) of the
/// architectures Graft trains and serves; anything else is refused by name.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "phi3",
];

/// `spec.baseModel`'s description in the CRD, which `kubectl explain` shows: written from
/// [`SUPPORTED_MODEL_TYPES`] so the two cannot drift.
fn base_model_description() -> String {
    format!(
        "The base model to adapt: a Hugging Face model directory (config.json, *.safetensors, \
         tokenizer.json) or a .gguf file (llama.cpp's format, dequantized as it loads), at an \
         s3://, file:// or hf:// URI. Supported model_type values: {}. A checkpoint's \
         quantization_config is honoured: bitsandbytes 4-bit NF4 checkpoints (*-bnb-4bit) load \
         as stored; GPTQ, AWQ, FP8 and other methods are refused.",
        SUPPORTED_MODEL_TYPES.join(", ")
    )
}

/// The base model to adapt.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSource {
    /// `s3://bucket/prefix/`, `file:///mounted/path/` or `hf://org/name`.
    #[schemars(length(max = 2048), regex(pattern = SOURCE_URI_PATTERN))]
    pub uri: String,
}

/// The training data.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatasetSource {
    /// A JSONL file at an `s3://`, `file://` or `hf://` URI.
    #[schemars(length(max = 2048), regex(pattern = SOURCE_URI_PATTERN))]
    pub uri: String,
    /// The shape of each line; `auto` detects it from the first line.
    #[serde(default)]
    pub format: DatasetFormat,
    /// Fraction of the records held out to compute the evaluation loss.
    #[serde(default = "default_validation_fraction")]
    #[schemars(range(min = 0.0, max = 0.5))]
    pub validation_fraction: f64,
}

fn default_validation_fraction() -> f64 {
    0.05
}

/// The shape of a dataset line.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum DatasetFormat {
    /// Detect the shape from the first line.
    #[default]
    Auto,
    /// `{"messages":[{"role","content"}...]}`: chat template applied, loss on assistant turns.
    Messages,
    /// `{"prompt","completion"}`: loss on the completion only.
    PromptCompletion,
    /// `{"text"}`: loss on every token.
    Text,
}

/// At most one method is named; naming none means LoRA with its defaults.
const ONE_METHOD: &str = "(has(self.lora) ? 1 : 0) + (has(self.ia3) ? 1 : 0) + (has(self.promptTuning) ? 1 : 0) + (has(self.pTuning) ? 1 : 0) + (has(self.prefixTuning) ? 1 : 0) + (has(self.bottleneck) ? 1 : 0) <= 1";

/// How the adapter is trained: the storage of the frozen base weights, and one
/// parameter-efficient method. Naming none trains a LoRA with its defaults.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": ONE_METHOD,
    "message": "spec.method names at most one method",
    "reason": "FieldValueForbidden",
}]))]
pub struct Method {
    /// Storage of the frozen base weights: `nf4` (QLoRA) or `none` (plain LoRA).
    #[serde(default)]
    pub quantization: Quantization,
    /// A LoRA adapter (also what is trained when no method is named).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
    /// An (IA)³ adapter: a learned vector per targeted module that scales its output, or, for
    /// feed-forward modules, its input (PEFT's `IA3Config`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ia3: Option<Ia3Config>,
    /// Prompt tuning (PEFT's `PROMPT_TUNING`): trained embeddings of virtual tokens put
    /// before every input; the base model is unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tuning: Option<PromptTuningConfig>,
    /// P-tuning (PEFT's `P_TUNING`): virtual-token embeddings produced by a trained encoder
    /// (an MLP or an LSTM); the published adapter holds the encoder's output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p_tuning: Option<PTuningConfig>,
    /// Prefix tuning (PEFT's `PREFIX_TUNING`): trained keys and values of virtual tokens in
    /// every layer's attention, seen by every input token; the base model is unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_tuning: Option<PrefixTuningConfig>,
    /// Bottleneck adapters (Houlsby, Pfeiffer): a small trained MLP after attention and the
    /// feed-forward block, or after the feed-forward block only, published in the AdapterHub
    /// `adapters` library's format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bottleneck: Option<BottleneckConfig>,
}

/// The method a job trains.
#[derive(Clone, Debug, PartialEq)]
pub enum MethodKind<'a> {
    Lora(std::borrow::Cow<'a, LoraConfig>),
    Ia3(&'a Ia3Config),
    PromptTuning(&'a PromptTuningConfig),
    PTuning(&'a PTuningConfig),
    PrefixTuning(&'a PrefixTuningConfig),
    Bottleneck(&'a BottleneckConfig),
}

impl Method {
    /// The method named, or LoRA with its defaults when none is.
    pub fn kind(&self) -> MethodKind<'_> {
        if let Some(prompt) = &self.prompt_tuning {
            return MethodKind::PromptTuning(prompt);
        }
        if let Some(p_tuning) = &self.p_tuning {
            return MethodKind::PTuning(p_tuning);
        }
        if let Some(prefix) = &self.prefix_tuning {
            return MethodKind::PrefixTuning(prefix);
        }
        if let Some(bottleneck) = &self.bottleneck {
            return MethodKind::Bottleneck(bottleneck);
        }
        // The schema admits one method at most; were two named, LoRA would win.
        match (&self.lora, &self.ia3) {
            (Some(lora), _) => MethodKind::Lora(std::borrow::Cow::Borrowed(lora)),
            (None, Some(ia3)) => MethodKind::Ia3(ia3),
            (None, None) => MethodKind::Lora(std::borrow::Cow::Owned(LoraConfig::default())),
        }
    }

    /// The method's field name in `spec.method` (`lora` when none is named).
    pub fn name(&self) -> &'static str {
        match self.kind() {
            MethodKind::Lora(_) => "lora",
            MethodKind::Ia3(_) => "ia3",
            MethodKind::PromptTuning(_) => "promptTuning",
            MethodKind::PTuning(_) => "pTuning",
            MethodKind::PrefixTuning(_) => "prefixTuning",
            MethodKind::Bottleneck(_) => "bottleneck",
        }
    }

    /// The LoRA shape when the method is LoRA.
    pub fn lora(&self) -> Option<std::borrow::Cow<'_, LoraConfig>> {
        match self.kind() {
            MethodKind::Lora(lora) => Some(lora),
            MethodKind::Ia3(_)
            | MethodKind::PromptTuning(_)
            | MethodKind::PTuning(_)
            | MethodKind::PrefixTuning(_)
            | MethodKind::Bottleneck(_) => None,
        }
    }
}

/// Text init needs the text.
const INIT_TEXT: &str = "self.init != 'text' || has(self.initText)";

/// Shape of a prompt-tuning adapter (PEFT's `PromptTuningConfig`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": INIT_TEXT,
    "message": "init: text needs initText",
    "reason": "FieldValueRequired",
}]))]
pub struct PromptTuningConfig {
    /// Virtual tokens put before every input; they take positions in the context.
    #[schemars(range(min = 1, max = 512))]
    pub num_virtual_tokens: u32,
    /// How the embeddings start: `random` (PEFT's `RANDOM`: normal, standard deviation 1)
    /// or `text` (the embeddings of `initText`'s tokens, repeated or cut to
    /// `numVirtualTokens`, as PEFT's `TEXT`).
    #[serde(default)]
    pub init: PromptInit,
    /// The text whose token embeddings start the virtual tokens, with `init: text`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub init_text: Option<String>,
}

/// PEFT's `prompt_tuning_init` values Graft trains.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PromptInit {
    #[default]
    Random,
    Text,
}

/// Shape of a P-tuning adapter (PEFT's `PromptEncoderConfig`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PTuningConfig {
    /// Virtual tokens put before every input; they take positions in the context.
    #[schemars(range(min = 1, max = 512))]
    pub num_virtual_tokens: u32,
    /// The encoder that produces the virtual tokens' embeddings: `mlp` (three linear layers
    /// with ReLU between) or `lstm` (a two-layer bidirectional LSTM and a two-layer MLP),
    /// as PEFT defines them.
    #[serde(default)]
    pub encoder: PromptEncoder,
    /// Hidden size of the encoder.
    #[serde(default = "default_encoder_hidden_size")]
    #[schemars(range(min = 1, max = 16384))]
    pub encoder_hidden_size: u32,
}

/// PEFT's `encoder_reparameterization_type` values.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PromptEncoder {
    #[default]
    Mlp,
    Lstm,
}

fn default_encoder_hidden_size() -> u32 {
    128
}

/// Shape of a prefix-tuning adapter (PEFT's `PrefixTuningConfig`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrefixTuningConfig {
    /// Virtual tokens whose keys and values every layer's attention holds before the input;
    /// they take positions in the context.
    #[schemars(range(min = 1, max = 512))]
    pub num_virtual_tokens: u32,
    /// Train the keys and values through PEFT's reparameterisation MLP (`prefix_projection`:
    /// an embedding, a linear layer of `encoderHiddenSize`, tanh, a linear layer to every
    /// layer's keys and values) rather than as one table. The published adapter holds the
    /// MLP's output either way.
    #[serde(default)]
    pub prefix_projection: bool,
    /// Hidden size of the reparameterisation MLP.
    #[serde(default = "default_encoder_hidden_size")]
    #[schemars(range(min = 1, max = 16384))]
    pub encoder_hidden_size: u32,
}

/// A width is given one way.
const ONE_WIDTH: &str = "!has(self.reductionFactor) || !has(self.size)";

/// Shape of bottleneck adapters (the AdapterHub `adapters` library's `SeqBnConfig` and
/// `DoubleSeqBnConfig`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": ONE_WIDTH,
    "message": "give reductionFactor or size, not both",
    "reason": "FieldValueForbidden",
}]))]
pub struct BottleneckConfig {
    /// Where the modules sit: `pfeiffer` (after the feed-forward block, reading the residual
    /// stream; `SeqBnConfig`) or `houlsby` (after attention and after the feed-forward block,
    /// reading each block's output; `DoubleSeqBnConfig`).
    #[serde(default)]
    pub placement: BottleneckPlacement,
    /// The bottleneck's width as the model's hidden size divided by this (default 16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub reduction_factor: Option<u32>,
    /// The bottleneck's width in units, instead of a reduction factor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65536))]
    pub size: Option<u32>,
    /// The bottleneck's non-linearity; by default the placement's own (`relu` for
    /// Pfeiffer's, `swish` for Houlsby's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub non_linearity: Option<NonLinearity>,
}

/// The two placements of bottleneck adapters.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BottleneckPlacement {
    #[default]
    Pfeiffer,
    Houlsby,
}

/// A bottleneck's non-linearity (`geluNew`: GELU's tanh approximation).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum NonLinearity {
    Relu,
    Swish,
    Gelu,
    GeluNew,
    Tanh,
    Sigmoid,
}

impl NonLinearity {
    /// The AdapterHub library's (transformers') name of it.
    pub fn library_name(self) -> &'static str {
        match self {
            Self::Relu => "relu",
            Self::Swish => "swish",
            Self::Gelu => "gelu",
            Self::GeluNew => "gelu_new",
            Self::Tanh => "tanh",
            Self::Sigmoid => "sigmoid",
        }
    }
}

/// Storage of the frozen base weights during training.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    /// 4-bit NormalFloat with double quantization (QLoRA).
    #[default]
    Nf4,
    /// Keep the frozen weights in bf16 (GPU) or f32 (CPU).
    None,
}

/// Shape of a LoRA adapter.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoraConfig {
    /// Rank r of the low-rank update.
    #[serde(default = "default_rank")]
    #[schemars(range(min = 1, max = 512))]
    pub rank: u32,
    /// Scaling numerator: the update is multiplied by alpha/r (alpha/sqrt(r) with rsLoRA).
    #[serde(default = "default_alpha")]
    #[schemars(extend("minimum" = 0, "exclusiveMinimum" = true))]
    pub alpha: f64,
    /// Dropout on the adapter's input, during training only.
    #[serde(default = "default_dropout")]
    #[schemars(range(min = 0.0, max = 0.9))]
    pub dropout: f64,
    /// Use rank-stabilised scaling alpha/sqrt(r).
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA (PEFT's `use_dora`): besides A and B, train a magnitude per output row of each
    /// target module, and rescale the adapted weight's rows to it. Published in PEFT's format
    /// (`lora_magnitude_vector`), served by Graft in mixed batches without merging. Needs a
    /// safetensors base model (not a `.gguf` file).
    #[serde(default)]
    pub use_dora: bool,
    /// Linear layers that get an adapter.
    #[serde(default = "default_target_modules")]
    #[schemars(length(min = 1, max = 7), extend("x-kubernetes-list-type" = "set"))]
    pub target_modules: Vec<TargetModule>,
    /// How the adapter starts (PEFT's `init_lora_weights`): `kaiming` (PEFT's default, A
    /// uniform in ±1/√in, B zero), `gaussian` (A normal with standard deviation 1/r, B zero),
    /// `olora` (B, A from a QR of each targeted base weight) or `pissa` (B, A from its top r
    /// singular values and vectors). With `olora` and `pissa` the trainer takes scale·B·A out
    /// of the base weight (before NF4 quantizes it, with QLoRA), recomputing it from the base
    /// when a run resumes, and publishes a plain LoRA of rank 2r for the original base, as
    /// PEFT's `path_initial_model_for_weight_conversion` does; they need a dense Hugging Face
    /// checkpoint (not GGUF or pre-quantized). `loftq` is refused: it replaces the base
    /// weights with a re-quantized copy, and Graft trains on the base as given.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self != 'loftq'",
        "message": "init: loftq is not supported: it replaces the base weights with a re-quantized copy; use kaiming, gaussian, olora or pissa (with quantization: nf4 for QLoRA)",
        "reason": "FieldValueForbidden",
    }]))]
    pub init: LoraInit,
    /// Per-module ranks, as PEFT's `rank_pattern`: each key is a regular expression matched
    /// against the end of a module's full name at a dot (`q_proj`, `layers\.[0-3]\..*_proj`,
    /// against `model.layers.0.self_attn.q_proj`); a module no key matches gets `rank`. Keys
    /// are tried in sorted order and the first match wins; the adapter file lists them in that
    /// order, so PEFT and vLLM read the same ranks.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = 64,
        "additionalProperties" = {"type": "integer", "minimum": 1, "maximum": 512}
    ))]
    pub rank_pattern: BTreeMap<String, u32>,
    /// Per-module alphas, as PEFT's `alpha_pattern`, matched as `rankPattern` is.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = 64,
        "additionalProperties" = {"type": "number", "minimum": 0, "exclusiveMinimum": true}
    ))]
    pub alpha_pattern: BTreeMap<String, f64>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: default_rank(),
            alpha: default_alpha(),
            dropout: default_dropout(),
            use_rslora: false,
            use_dora: false,
            target_modules: default_target_modules(),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            init: LoraInit::default(),
        }
    }
}

/// Feed-forward modules must be targeted: PEFT refuses the config otherwise.
const FEEDFORWARD_IN_TARGETS: &str =
    "self.feedforwardModules.all(m, self.targetModules.exists(t, t == m))";

/// Shape of an (IA)³ adapter (PEFT's `IA3Config`): one vector per targeted module, starting
/// at ones, that multiplies the module's output (`[out]`), or its input (`[in]`) for the
/// feed-forward modules.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": FEEDFORWARD_IN_TARGETS,
    "message": "feedforwardModules must all be in targetModules (it defaults to [down_proj]; with targets that leave down_proj out, name the feed-forward ones, or [])",
    "reason": "FieldValueInvalid",
}]))]
pub struct Ia3Config {
    /// Linear layers that get a vector (PEFT's default for Llama: `k_proj`, `v_proj`,
    /// `down_proj`).
    #[serde(default = "default_ia3_targets")]
    #[schemars(length(min = 1, max = 7), extend("x-kubernetes-list-type" = "set"))]
    pub target_modules: Vec<TargetModule>,
    /// The targeted layers whose input, not output, is scaled, as in the (IA)³ paper's
    /// feed-forward rescaling (PEFT's default for Llama: `down_proj`).
    #[serde(default = "default_ia3_feedforward")]
    #[schemars(length(max = 7), extend("x-kubernetes-list-type" = "set"))]
    pub feedforward_modules: Vec<TargetModule>,
}

impl Default for Ia3Config {
    fn default() -> Self {
        Self {
            target_modules: default_ia3_targets(),
            feedforward_modules: default_ia3_feedforward(),
        }
    }
}

fn default_ia3_targets() -> Vec<TargetModule> {
    vec![
        TargetModule::KProj,
        TargetModule::VProj,
        TargetModule::DownProj,
    ]
}

fn default_ia3_feedforward() -> Vec<TargetModule> {
    vec![TargetModule::DownProj]
}

/// PEFT's `init_lora_weights` values Graft knows.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LoraInit {
    #[default]
    Kaiming,
    Gaussian,
    Olora,
    Pissa,
    /// Refused by the schema's rule, with its reason.
    Loftq,
}

fn default_rank() -> u32 {
    16
}
fn default_alpha() -> f64 {
    32.0
}
fn default_dropout() -> f64 {
    0.05
}
fn default_target_modules() -> Vec<TargetModule> {
    vec![TargetModule::QProj, TargetModule::VProj]
}

/// A linear layer of a decoder block, named as in Hugging Face `transformers`: `q_proj` …
/// `down_proj`, or Phi-3's fused `qkv_proj` and `gate_up_proj` (a Phi-3 model has no separate
/// q/k/v or gate/up to target).
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum TargetModule {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
    QkvProj,
    GateUpProj,
}

impl TargetModule {
    /// The module's name in Hugging Face weights and PEFT configs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QProj => "q_proj",
            Self::KProj => "k_proj",
            Self::VProj => "v_proj",
            Self::OProj => "o_proj",
            Self::GateProj => "gate_proj",
            Self::UpProj => "up_proj",
            Self::DownProj => "down_proj",
            Self::QkvProj => "qkv_proj",
            Self::GateUpProj => "gate_up_proj",
        }
    }
}

/// Optimiser (AdamW) and schedule.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
// Independent switches, spelled as users write them in YAML (and as TRL names them).
#[allow(clippy::struct_excessive_bools)]
pub struct Training {
    /// Passes over the training split.
    #[serde(default = "default_epochs")]
    #[schemars(range(min = 1, max = 1000))]
    pub epochs: u32,
    /// Peak learning rate.
    #[serde(default = "default_learning_rate")]
    #[schemars(extend("minimum" = 0, "exclusiveMinimum" = true, "maximum" = 1))]
    pub learning_rate: f64,
    /// Sequences per micro-batch.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 1024))]
    pub batch_size: u32,
    /// Micro-batches accumulated into one optimiser step.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1024))]
    pub gradient_accumulation_steps: u32,
    /// Longer sequences are truncated.
    #[serde(default = "default_max_sequence_length")]
    #[schemars(range(min = 8, max = 131_072))]
    pub max_sequence_length: u32,
    /// Steps of linear warm-up before the schedule starts.
    #[serde(default)]
    #[schemars(range(max = 1_000_000))]
    pub warmup_steps: u32,
    /// Learning-rate schedule after warm-up.
    #[serde(default)]
    pub scheduler: Scheduler,
    /// Seed for initialisation, shuffling and dropout.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Write a resumable checkpoint every this many optimiser steps.
    #[serde(default = "default_checkpoint_every_steps")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub checkpoint_every_steps: u32,
    /// Clip the global gradient norm to this value.
    #[serde(default = "default_max_grad_norm")]
    #[schemars(extend("minimum" = 0, "exclusiveMinimum" = true))]
    pub max_grad_norm: f64,
    /// AdamW's decoupled weight decay on the adapter weights (`weight_decay` of transformers'
    /// `TrainingArguments`, whose default 0 this keeps).
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub weight_decay: f64,
    /// Recompute each layer's activations in the backward pass instead of keeping them.
    #[serde(default = "default_true")]
    pub gradient_checkpointing: bool,
    /// Evaluate on the validation split every this many optimiser steps, as well as at the
    /// end of each epoch. Unset: at the end of each epoch only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub eval_every_steps: Option<u32>,
    /// Batch examples of similar length together (transformers' `group_by_length`): less
    /// padding, so fewer wasted tokens, on datasets of mixed lengths.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub group_by_length: bool,
    /// Pack several examples into each row of up to `maxSequenceLength` tokens (TRL's
    /// `padding_free` packing): examples are placed longest first, each into the row it fills
    /// most tightly; positions restart and attention stays inside each example, so the loss and
    /// gradients are those of the examples trained unpacked, with far fewer padding tokens on
    /// datasets of mixed lengths. A batch is then `batchSize` packed rows. Not with
    /// `groupByLength`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub packing: bool,
    /// Publish the adapter of the evaluation with the lowest loss rather than the last step's
    /// (transformers' `load_best_model_at_end`). Needs a validation split.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_best: bool,
    /// Stop once this many evaluations in a row have not lowered the evaluation loss
    /// (transformers' `EarlyStoppingCallback`). Unset: never. Needs a validation split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub early_stopping_patience: Option<u32>,
}

impl Default for Training {
    fn default() -> Self {
        Self {
            epochs: default_epochs(),
            learning_rate: default_learning_rate(),
            batch_size: default_batch_size(),
            gradient_accumulation_steps: one(),
            max_sequence_length: default_max_sequence_length(),
            warmup_steps: 0,
            scheduler: Scheduler::default(),
            seed: default_seed(),
            checkpoint_every_steps: default_checkpoint_every_steps(),
            max_grad_norm: default_max_grad_norm(),
            weight_decay: 0.0,
            gradient_checkpointing: default_true(),
            eval_every_steps: None,
            group_by_length: false,
            packing: false,
            keep_best: false,
            early_stopping_patience: None,
        }
    }
}

fn default_epochs() -> u32 {
    3
}
fn default_learning_rate() -> f64 {
    2.0e-4
}
fn default_batch_size() -> u32 {
    4
}
fn one() -> u32 {
    1
}
fn default_max_sequence_length() -> u32 {
    2048
}
fn default_seed() -> u64 {
    42
}
fn default_checkpoint_every_steps() -> u32 {
    200
}
fn default_max_grad_norm() -> f64 {
    1.0
}
fn default_true() -> bool {
    true
}

/// Learning-rate schedule after warm-up.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    /// Cosine decay to zero.
    #[default]
    Cosine,
    /// Linear decay to zero.
    Linear,
    /// Constant after warm-up.
    Constant,
}

/// Where the finished adapter is written.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutputTarget {
    /// `s3://bucket/prefix/` or `file:///path/`; the adapter's files go directly under it.
    #[schemars(length(max = 2048), regex(pattern = OUTPUT_URI_PATTERN))]
    pub uri: String,
    /// Also write the base model with the adapter merged into it, a standalone Hugging Face
    /// model (same files, names and dtype as the base), under `<uri>merged/`: for serving
    /// elsewhere. LoRA, DoRA and (IA)³ merge; virtual tokens do not. Needs a safetensors base
    /// (not GGUF, not pre-quantized).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub merged: bool,
}

/// Object-storage endpoint and credentials.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageConfig {
    /// A Secret with `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (and optionally
    /// `AWS_SESSION_TOKEN`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
    /// S3 endpoint for S3-compatible stores (MinIO, Ceph); AWS when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = r"^https?://[^\s/]+(/.*)?$"))]
    pub endpoint: Option<String>,
    /// S3 region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub region: Option<String>,
}

/// Compute for the training pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// GPUs requested as a limit on `gpuResourceName`; 0 trains on CPU.
    #[serde(default = "one")]
    #[schemars(range(max = 16))]
    pub gpus: u32,
    /// The extended resource that counts GPUs on the nodes: a domain-prefixed name such as
    /// `nvidia.com/gpu` or `amd.com/gpu`.
    #[serde(default = "default_gpu_resource_name")]
    #[schemars(
        length(min = 3, max = 253),
        regex(pattern = EXTENDED_RESOURCE_PATTERN),
        extend("x-kubernetes-validations" = [{
            "rule": "!self.startsWith('kubernetes.io/') && !self.startsWith('requests.')",
            "message": "gpuResourceName: an extended resource outside the kubernetes.io domain, such as nvidia.com/gpu",
            "reason": "FieldValueInvalid",
        }])
    )]
    pub gpu_resource_name: String,
    /// Memory request and limit of the trainer container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": QUANTITY_RULE,
        "message": "memory: a quantity such as 32Gi",
        "reason": "FieldValueInvalid",
    }]))]
    pub memory: Option<Quantity>,
    /// CPU request of the trainer container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": QUANTITY_RULE,
        "message": "cpu: a quantity such as 8 or 500m",
        "reason": "FieldValueInvalid",
    }]))]
    pub cpu: Option<Quantity>,
    /// Node labels the training pod must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the training pod tolerates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub tolerations: Vec<Toleration>,
    /// PriorityClass of the training pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253), regex(pattern = NAME_PATTERN))]
    pub priority_class_name: Option<String>,
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            gpus: one(),
            gpu_resource_name: default_gpu_resource_name(),
            memory: None,
            cpu: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            priority_class_name: None,
        }
    }
}

fn default_gpu_resource_name() -> String {
    "nvidia.com/gpu".to_owned()
}

/// Observed state of a FineTuneJob.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FineTuneJobStatus {
    /// Summary of the conditions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<FineTuneJobPhase>,
    /// The method trained, `spec.method`'s name for it (`lora` when it names none): `lora`,
    /// `ia3`, `promptTuning` or `pTuning`. For the printer column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Ready, Running, Succeeded, Failed, Suspended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Training progress, written by the trainer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// The finished adapter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<AdapterArtifact>,
    /// When the training Job was first created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the job succeeded or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Training pods that failed and were retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
}

/// Summary of a FineTuneJob's state.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum FineTuneJobPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Suspended,
}

/// Training progress reported by the trainer.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Optimiser steps done.
    pub step: u64,
    /// Optimiser steps in the whole run.
    pub total_steps: u64,
    /// Current epoch, from 0.
    #[serde(default)]
    pub epoch: u32,
    /// Training loss of the last step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Loss on the validation split at the last evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// Training throughput.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    /// Estimated seconds to completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<u64>,
    /// When the trainer wrote this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<Time>,
    /// The loss curve so far, for `kubectl graft loss`: at most about 250 points, evenly
    /// spaced over the run's steps, plus the steps where the validation loss was measured.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_HISTORY_POINTS))]
    pub history: Vec<LossPoint>,
}

/// How many points `status.progress.history` holds at most (the schema's `maxItems`).
pub const MAX_HISTORY_POINTS: u32 = 256;

/// One point of the loss curve.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LossPoint {
    /// Optimiser steps done.
    pub step: u64,
    /// Training loss of that step.
    pub loss: f64,
    /// Loss on the validation split, where it was measured at that step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
}

/// A finished adapter in object storage.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdapterArtifact {
    /// Prefix holding `adapter_config.json`, the weights file and `graft.json`.
    pub uri: String,
    /// SHA-256 of the weights file (`adapter_model.safetensors`; `adapter.safetensors` for
    /// bottleneck adapters, in AdapterHub's format).
    pub sha256: String,
    /// Size of the weights file in bytes.
    pub size_bytes: u64,
    /// Trainable (LoRA) parameters.
    pub trainable_parameters: u64,
}

/// What the trainer writes to its termination message (`/dev/termination-log`) when it exits 0:
/// one line of JSON. The operator copies `adapter` into `status.adapter`; on failure the
/// termination message is a plain one-line reason instead.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TrainerResult {
    pub adapter: AdapterArtifact,
}
