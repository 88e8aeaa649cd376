//! One training run from a rendered FineTuneJob spec: fetch the base model, read and encode
//! the dataset, train (resuming from the newest checkpoint), and publish the adapter so it is
//! visible as finished only when complete.
//!
//! Errors are sorted by what a retry could change: bad input (exit code 2, the Job fails at
//! once) or anything else (exit code 1, the Job's backoff retries and the run resumes).

use std::{io::IsTerminal, path::Path};

use candle_core::Device;
use graft_api::{
    AdapterArtifact, BottleneckPlacement, Digested, FineTuneJobSpec, GraftJson, LoraInit,
    MethodKind, Metrics, PromptEncoder, PromptInit, Quantization, StatusTarget, TargetModule,
    TrainerResult,
};
use graft_engine::{
    adapters::{
        AdapterConfig, BottleneckConfig, EncoderKind, Ia3Config, Init, Patterns, PromptConfig,
        PromptMethod, Site,
        bottleneck::{ADAPTERHUB_VERSION, AdapterHubFile, Architecture, reduction_for_size},
        text_init_ids,
    },
    device::compute_dtype,
    models::{
        self, BaseRewrite, Config, Llama, Precision,
        source::{self, SourceError},
    },
    storage::{self, DownloadError, Location, ObjectUri, S3Options},
    text::tokenizer::Tokenizer,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::runtime::Runtime;

use crate::{
    adapters::{Adapters, Decomposer, PromptStart},
    checkpoint::{self, Checkpoint},
    dataset::{self, Record},
    progress::Progress,
    train::{Example, Settings, Trainer},
};

/// The file the operator renders: the spec, plus where to report progress in a cluster.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrainerConfig {
    #[serde(flatten)]
    pub spec: FineTuneJobSpec,
    #[serde(default)]
    pub status_target: Option<StatusTarget>,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Bad input: retrying cannot help.
    #[error("{0}")]
    BadInput(String),
    /// The network, the store, the machine: a retry may succeed.
    #[error("{0}")]
    Transient(String),
}

impl JobError {
    fn bad(what: impl std::fmt::Display) -> Self {
        Self::BadInput(what.to_string())
    }

    fn transient(what: impl std::fmt::Display) -> Self {
        Self::Transient(what.to_string())
    }

    fn store(context: &str, error: &object_store::Error) -> Self {
        let message = format!("{context}: {error}");
        if storage::is_permanent(error) {
            Self::BadInput(message)
        } else {
            Self::Transient(message)
        }
    }

    /// The process exit code: 2 for bad input (the Job's podFailurePolicy fails fast on it).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::BadInput(_) => 2,
            Self::Transient(_) => 1,
        }
    }
}

impl From<candle_core::Error> for JobError {
    fn from(error: candle_core::Error) -> Self {
        Self::Transient(error.to_string())
    }
}

const ADAPTER_CONFIG: &str = "adapter_config.json";
const GRAFT_JSON: &str = "graft.json";
const STAGING: &str = ".staging";
/// Where `output.merged` writes the merged model, under the output.
const MERGED: &str = "merged";

impl TrainerConfig {
    /// The adapter's own name, which a bottleneck adapter's tensors carry: the FineTuneJob's.
    fn adapter_name(&self) -> &str {
        self.status_target
            .as_ref()
            .map_or("adapter", |t| t.name.as_str())
    }
}

pub fn read_config(path: &Path) -> Result<TrainerConfig, JobError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| JobError::bad(format!("reading config {}: {e}", path.display())))?;
    let config: TrainerConfig = serde_yaml::from_str(&text)
        .map_err(|e| JobError::bad(format!("config {}: {e}", path.display())))?;
    for (field, uri) in [
        ("baseModel.uri", &config.spec.base_model.uri),
        ("dataset.uri", &config.spec.dataset.uri),
        ("output.uri", &config.spec.output.uri),
    ] {
        uri.parse::<ObjectUri>()
            .map_err(|e| JobError::bad(format!("spec.{field}: {e}")))?;
    }
    Ok(config)
}

/// Runs the job to a published adapter.
pub fn run(
    config: &TrainerConfig,
    cache_dir: &Path,
    device: &Device,
) -> Result<TrainerResult, JobError> {
    let rt = Runtime::new().map_err(JobError::transient)?;
    let spec = &config.spec;
    let s3 = S3Options::from_env(
        spec.storage.as_ref().and_then(|s| s.endpoint.clone()),
        spec.storage.as_ref().and_then(|s| s.region.clone()),
    );
    let open = |uri: &str| -> Result<(ObjectUri, Location), JobError> {
        let parsed: ObjectUri = uri.parse().map_err(JobError::bad)?;
        let location = storage::open(&parsed, &s3).map_err(JobError::bad)?;
        Ok((parsed, location))
    };
    check_method_trained(spec)?;
    let (output_uri, output) = open(&spec.output.uri)?;
    rt.block_on(check_writable(&output, &output_uri))?;

    let (model_uri, model_location) = open(&spec.base_model.uri)?;
    let model_files = rt
        .block_on(source::fetch(&model_uri, &model_location, cache_dir))
        .map_err(model_source_error)?;
    check_base_for_method(spec, &model_files)?;
    let base = models::Checkpoint::open(model_files)
        .map_err(|e| JobError::bad(format!("base model: {e}")))?;
    let model_digest = base.digest().map_err(model_source_error)?;
    if spec.output.merged {
        models::check_mergeable(&base).map_err(|e| JobError::bad(format!("output.merged: {e}")))?;
    }
    let tokenizer = base.tokenizer().map_err(JobError::bad)?;

    let (_, dataset_location) = open(&spec.dataset.uri)?;
    let files = rt.block_on(read_dataset(&dataset_location, &spec.dataset.uri))?;
    let records = dataset::parse_files(&files, spec.dataset.format).map_err(JobError::bad)?;
    let dataset_digest = dataset::digest(&files);
    let (train, eval) = dataset::split(
        records,
        spec.dataset.validation_fraction,
        spec.training.seed,
    );
    let max_len = usize::try_from(spec.training.max_sequence_length).unwrap_or(usize::MAX);
    let train = encode(&tokenizer, train, max_len)?;
    let eval = encode(&tokenizer, eval, max_len)?;
    if train.is_empty() {
        return Err(JobError::bad(
            "the dataset has no training records left after the validation split",
        ));
    }

    let (model, adapters) = load_model(&base, spec, config.adapter_name(), &tokenizer, device)?;
    let trainable_parameters = adapters.trainable_parameters();
    let settings = settings(spec, tokenizer.eos_token_id().unwrap_or(0));
    let (train_examples, eval_examples) = (train.len(), eval.len());
    let mut trainer = Trainer::new(model, adapters, settings, train, eval)?;
    if spec.training.packing {
        eprintln!(
            "graft-trainer: packed {train_examples} examples into {} rows of at most {max_len} tokens",
            trainer.rows()
        );
    }
    if let Some(checkpoint) = rt.block_on(newest_checkpoint(&output))? {
        let step = checkpoint.state.step;
        trainer.resume(checkpoint).map_err(JobError::bad)?;
        eprintln!("graft-trainer: resuming after step {step}");
    }
    let mut progress = Progress::new(
        &rt,
        output.clone(),
        config.status_target.clone(),
        std::io::stdout().is_terminal(),
    );
    trainer
        .run(&mut progress)
        .map_err(|e| JobError::transient(format!("training: {e}")))?;
    progress.write_events();

    // OLoRA / PiSSA: converted to a plain LoRA on the original base.
    let result = trainer.adapters().publishable(&trainer.result()?)?;
    let (adapter_config, weights) = result.to_bytes().map_err(JobError::transient)?;
    let artifact = AdapterArtifact {
        uri: spec.output.uri.clone(),
        sha256: format!("{:x}", Sha256::digest(&weights)),
        size_bytes: weights.len() as u64,
        trainable_parameters,
    };
    let graft_json = GraftJson {
        base_model: Digested {
            uri: spec.base_model.uri.clone(),
            sha256: model_digest,
        },
        dataset: Digested {
            uri: spec.dataset.uri.clone(),
            sha256: dataset_digest,
        },
        adapter: artifact.clone(),
        metrics: metrics(&trainer, &progress, train_examples, eval_examples),
        fine_tune_job: config.status_target.clone(),
    };
    if spec.output.merged {
        // Before graft.json: a reader that finds it finds the merged model whole too.
        write_merged(&rt, &output, &base, &result)?;
    }
    let weights = (result.weights_file(), weights);
    rt.block_on(publish(&output, adapter_config, weights, &graft_json))?;
    progress.record_adapter(&artifact);
    progress.finish();
    Ok(TrainerResult { adapter: artifact })
}

/// Refuses, before anything is fetched, what the API admits but the method cannot do: a
/// merged model of virtual tokens (they change the input, not the weights), and packed rows
/// behind virtual tokens (PEFT puts them before each sequence, and a packed row holds several).
fn check_method_trained(spec: &FineTuneJobSpec) -> Result<(), JobError> {
    let prompt = match spec.method.kind() {
        MethodKind::Bottleneck(_) if spec.output.merged => {
            return Err(JobError::bad(
                "output.merged: method.bottleneck adds modules with a non-linearity between the \
                 layers, which no merged weight can hold; publish the adapter alone",
            ));
        }
        MethodKind::Lora(_) | MethodKind::Ia3(_) | MethodKind::Bottleneck(_) => return Ok(()),
        MethodKind::PromptTuning(_) => "method.promptTuning",
        MethodKind::PTuning(_) => "method.pTuning",
        MethodKind::PrefixTuning(_) => "method.prefixTuning",
    };
    if spec.output.merged {
        return Err(JobError::bad(format!(
            "output.merged: {prompt} trains virtual tokens put before the input, which no \
             merged model can hold; publish the adapter alone"
        )));
    }
    if spec.training.packing {
        return Err(JobError::bad(format!(
            "training.packing: {prompt} puts its virtual tokens before each sequence, and a \
             packed row holds several; train without packing"
        )));
    }
    Ok(())
}

/// What the method needs of the base model's files. The schema refuses a `.gguf` URI for
/// DoRA; this catches any other way to a GGUF file.
fn check_base_for_method(
    spec: &FineTuneJobSpec,
    files: &models::ModelFiles,
) -> Result<(), JobError> {
    if spec.method.lora().is_some_and(|lora| lora.use_dora)
        && matches!(files, models::ModelFiles::Gguf(_))
    {
        return Err(JobError::bad(
            "method.lora.useDora needs a Hugging Face safetensors base model, not a GGUF file",
        ));
    }
    Ok(())
}

fn settings(spec: &FineTuneJobSpec, pad_id: u32) -> Settings {
    let t = &spec.training;
    Settings {
        epochs: t.epochs,
        batch_size: usize::try_from(t.batch_size).unwrap_or(1).max(1),
        accumulation: usize::try_from(t.gradient_accumulation_steps)
            .unwrap_or(1)
            .max(1),
        learning_rate: t.learning_rate,
        warmup_steps: u64::from(t.warmup_steps),
        scheduler: t.scheduler,
        max_grad_norm: t.max_grad_norm,
        weight_decay: t.weight_decay,
        seed: t.seed,
        dropout: spec.method.lora().map_or(0.0, |lora| lora.dropout),
        recompute: t.gradient_checkpointing,
        checkpoint_every: u64::from(t.checkpoint_every_steps),
        eval_every: t.eval_every_steps.map_or(0, u64::from),
        pad_id,
        group_by_length: t.group_by_length,
        packing: t
            .packing
            .then(|| usize::try_from(t.max_sequence_length).unwrap_or(usize::MAX)),
        keep_best: t.keep_best,
        early_stopping_patience: t.early_stopping_patience.unwrap_or(0),
    }
}

/// What graft.json records of the run: the published adapter's evaluation loss is the best
/// one's when the run keeps it.
fn metrics(trainer: &Trainer, progress: &Progress<'_>, train: usize, eval: usize) -> Metrics {
    let best = trainer.best().filter(|_| trainer.settings().keep_best);
    let run = progress.metrics();
    Metrics {
        steps: trainer
            .stopped_early()
            .unwrap_or(trainer.plan().total_steps),
        train_examples: train,
        eval_examples: eval,
        eval_loss: best.map(|b| b.eval_loss).or(run.eval_loss),
        best_step: best.map(|b| b.step),
        stopped_early_at: trainer.stopped_early(),
        ..run
    }
}

/// Writes base + `adapter` merged under `<output>/merged/`, one file at a time.
fn write_merged(
    rt: &Runtime,
    output: &Location,
    base: &models::Checkpoint,
    adapter: &graft_engine::adapters::PeftAdapter,
) -> Result<(), JobError> {
    models::merged_files(base, adapter, |name, bytes| {
        rt.block_on(output.put(&format!("{MERGED}/{name}"), bytes))
            .map_err(|e| models::MergeError::Write {
                name,
                reason: e.to_string(),
            })
    })
    .map_err(|e| JobError::transient(format!("writing the merged model: {e}")))
}

/// The dataset's files: the one object `uri` names, or, for a URI ending in `/`, every
/// `.jsonl` / `.json` / `.parquet` object under it, in name order.
async fn read_dataset(
    location: &Location,
    uri: &str,
) -> Result<Vec<(String, bytes::Bytes)>, JobError> {
    let failed = |what: &str, e: &object_store::Error| JobError::store(&format!("{what} {uri}"), e);
    if !uri.ends_with('/') {
        let bytes = location
            .get("")
            .await
            .map_err(|e| failed("reading the dataset", &e))?;
        let name = uri.rsplit('/').next().unwrap_or(uri).to_owned();
        return Ok(vec![(name, bytes)]);
    }
    let mut names: Vec<String> = location
        .list_all()
        .await
        .map_err(|e| failed("listing the dataset", &e))?
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| dataset::FileKind::of(name).is_some())
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(JobError::bad(format!(
            "the dataset prefix {uri} holds no .jsonl, .json or .parquet files"
        )));
    }
    let mut files = Vec::with_capacity(names.len());
    for name in names {
        let bytes = location
            .get(&name)
            .await
            .map_err(|e| failed(&format!("reading {name} of"), &e))?;
        files.push((name, bytes));
    }
    Ok(files)
}

/// Each record encoded as the model sees it, cut to `max_len` tokens. A record left with no
/// learned token after the cut teaches nothing and is dropped.
fn encode(
    tokenizer: &Tokenizer,
    records: Vec<Record>,
    max_len: usize,
) -> Result<Vec<Example>, JobError> {
    let mut examples = Vec::with_capacity(records.len());
    for (i, record) in records.into_iter().enumerate() {
        let encoded = match &record {
            Record::Text(text) => tokenizer.encode_text(text),
            Record::PromptCompletion { prompt, completion } => {
                tokenizer.encode_prompt_completion(prompt, completion)
            }
            Record::Messages(c) => {
                tokenizer.encode_conversation(&c.messages, c.tools.as_deref(), &c.learned)
            }
        }
        .map_err(|e| JobError::bad(format!("dataset record {}: {e}", i + 1)))?;
        let mut ids = encoded.ids;
        let mut labels = encoded.loss_mask;
        ids.truncate(max_len);
        labels.truncate(max_len);
        if labels.iter().skip(1).any(|&l| l) {
            examples.push(Example { ids, labels });
        }
    }
    Ok(examples)
}

/// The base model on `device` in its compute dtype (NF4 weights quantized on the CPU as each
/// is read, then kept packed on the device), with fresh adapters.
/// How the job's adapters start: PEFT's `init_lora_weights`, and what does not combine.
fn lora_init(lora: &graft_api::LoraConfig) -> Result<Init, JobError> {
    let init = match lora.init {
        LoraInit::Kaiming => Init::Kaiming,
        LoraInit::Gaussian => Init::Gaussian,
        LoraInit::Olora => Init::Olora,
        LoraInit::Pissa => Init::Pissa,
        LoraInit::Loftq => {
            return Err(JobError::bad(
                "method.lora.init: loftq is not supported (it replaces the base weights)",
            ));
        }
    };
    if lora.use_dora && init.rewrites_base() {
        return Err(JobError::bad(format!(
            "method.lora: useDora does not go with init {} (it rewrites the base weights DoRA's \
             magnitudes are norms of)",
            init.peft_name()
        )));
    }
    Ok(init)
}

/// The sites `modules` name, each a projection of this model.
fn sites_of(modules: &[TargetModule], config: &Config) -> Result<Vec<Site>, JobError> {
    let sites = modules
        .iter()
        .map(|m| {
            Site::from_name(m.as_str()).ok_or_else(|| {
                JobError::bad(format!(
                    "target module {} is not a projection of a Llama-family model",
                    m.as_str()
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(missing) = sites.iter().find(|s| !config.sites().contains(s)) {
        return Err(JobError::bad(format!(
            "target module {} is not a projection of this {} model; its projections are {}",
            missing.name(),
            config.model_type,
            Site::names(config.sites())
        )));
    }
    Ok(sites)
}

fn load_model(
    base: &models::Checkpoint,
    spec: &FineTuneJobSpec,
    name: &str,
    tokenizer: &Tokenizer,
    device: &Device,
) -> Result<(Llama, Adapters), JobError> {
    let precision = match spec.method.quantization {
        Quantization::Nf4 => Precision::Nf4,
        Quantization::None => Precision::Dense,
    };
    let load = |rewrite: Option<&dyn BaseRewrite>| {
        base.load_rewritten(precision, compute_dtype(device), device, rewrite)
            .map_err(|e| JobError::bad(format!("base model weights: {e}")))
    };
    let config = base.config();
    let lora = match spec.method.kind() {
        MethodKind::Lora(lora) => lora,
        MethodKind::Ia3(ia3) => {
            let sites = sites_of(&ia3.target_modules, config)?;
            let feedforward = sites_of(&ia3.feedforward_modules, config)?;
            if let Some(outside) = feedforward.iter().find(|s| !sites.contains(s)) {
                return Err(JobError::bad(format!(
                    "method.ia3.feedforwardModules: {} is not in targetModules",
                    outside.name()
                )));
            }
            let ia3_config = Ia3Config {
                base_model_name_or_path: Some(spec.base_model.uri.clone()),
                ..Ia3Config::new(&sites, &feedforward)
            };
            let mut model = load(None)?;
            let adapters = Adapters::attach_ia3(&mut model, ia3_config, &sites)?;
            return Ok((model, adapters));
        }
        MethodKind::PromptTuning(_) | MethodKind::PTuning(_) | MethodKind::PrefixTuning(_) => {
            let model = load(None)?;
            let adapters = attach_prompt(&model, spec, tokenizer)?;
            return Ok((model, adapters));
        }
        MethodKind::Bottleneck(bottleneck) => {
            let file = adapterhub_file(bottleneck, config, spec, name)?;
            let mut model = load(None)?;
            let adapters = Adapters::attach_bottleneck(&mut model, file, spec.training.seed)?;
            return Ok((model, adapters));
        }
    };
    let init = lora_init(&lora)?;
    let sites = sites_of(&lora.target_modules, config)?;
    let rank = usize::try_from(lora.rank).map_err(JobError::bad)?;
    let adapter_config = AdapterConfig {
        base_model_name_or_path: Some(spec.base_model.uri.clone()),
        rank_pattern: Patterns::new(
            lora.rank_pattern
                .iter()
                .map(|(key, &rank)| (key.clone(), rank as usize))
                .collect(),
        ),
        alpha_pattern: Patterns::new(
            lora.alpha_pattern
                .iter()
                .map(|(key, &alpha)| (key.clone(), alpha))
                .collect(),
        ),
        init_lora_weights: init.peft_name(),
        use_dora: lora.use_dora,
        ..AdapterConfig::new(rank, lora.alpha, lora.dropout, lora.use_rslora, &sites)
    };
    adapter_config
        .check_checkpoint()
        .map_err(|e| JobError::bad(format!("method.lora: {e}")))?;
    if !init.rewrites_base() {
        let mut model = load(None)?;
        let adapters = Adapters::attach(&mut model, adapter_config, &sites, spec.training.seed)?;
        return Ok((model, adapters));
    }
    let refuse = |why: &str| {
        JobError::bad(format!(
            "method.lora.init: {init} takes the adapter's start out of the base weights, \
             so it needs a dense Hugging Face checkpoint; this base is {why}",
            init = init.peft_name().as_str().unwrap_or_default()
        ))
    };
    if matches!(base.files(), models::ModelFiles::Gguf(_)) {
        return Err(refuse("a GGUF file"));
    }
    if base.prequantized().is_some() {
        return Err(refuse("pre-quantized"));
    }
    let started = std::time::Instant::now();
    let decomposer = Decomposer::new(&adapter_config, &sites);
    let mut model = load(Some(&decomposer))?;
    let (starts, worst) = decomposer.into_starts();
    eprintln!(
        "graft-trainer: {} init of {} projections in {:.1}s (largest relative residual of \
         a kept singular triplet {worst:.1e})",
        init.peft_name().as_str().unwrap_or_default(),
        starts.len(),
        started.elapsed().as_secs_f64()
    );
    let adapters = Adapters::attach_decomposed(&mut model, adapter_config, starts)?;
    Ok((model, adapters))
}

/// Fresh virtual tokens for a prompt-tuning, P-tuning or prefix-tuning job, their config as
/// PEFT writes it.
fn attach_prompt(
    model: &Llama,
    spec: &FineTuneJobSpec,
    tokenizer: &Tokenizer,
) -> Result<Adapters, JobError> {
    let config = model.config();
    let base_model = Some(spec.base_model.uri.clone());
    let (prompt_config, start, encoder) = match spec.method.kind() {
        MethodKind::PromptTuning(prompt) => {
            let virtual_tokens = prompt.num_virtual_tokens as usize;
            let (start, init, text) = match (prompt.init, &prompt.init_text) {
                (PromptInit::Text, Some(text)) => {
                    let ids = tokenizer.encode(text, true).map_err(JobError::bad)?;
                    let ids = text_init_ids(&ids, virtual_tokens).ok_or_else(|| {
                        JobError::bad("method.promptTuning.initText has no tokens")
                    })?;
                    (PromptStart::Text(ids), "TEXT", Some(text.clone()))
                }
                (PromptInit::Text, None) => {
                    return Err(JobError::bad(
                        "method.promptTuning: init text needs initText",
                    ));
                }
                (PromptInit::Random, _) => (PromptStart::Random, "RANDOM", None),
            };
            let prompt_config = PromptConfig {
                prompt_tuning_init: Some(init.to_owned()),
                // PEFT requires the tokenizer's name with a text init (it is not read at
                // inference): the base model's, whose tokenizer this is.
                tokenizer_name_or_path: text.is_some().then(|| spec.base_model.uri.clone()),
                prompt_tuning_init_text: text,
                base_model_name_or_path: base_model,
                ..PromptConfig::for_model(PromptMethod::PromptTuning, virtual_tokens, config)
            };
            (prompt_config, start, None)
        }
        MethodKind::PTuning(p_tuning) => {
            let kind = match p_tuning.encoder {
                PromptEncoder::Mlp => EncoderKind::Mlp,
                PromptEncoder::Lstm => EncoderKind::Lstm,
            };
            let hidden = p_tuning.encoder_hidden_size as usize;
            let virtual_tokens = p_tuning.num_virtual_tokens as usize;
            let prompt_config = PromptConfig {
                encoder_reparameterization_type: Some(kind.peft_name().to_owned()),
                encoder_hidden_size: Some(hidden),
                encoder_num_layers: Some(2),
                encoder_dropout: Some(0.0),
                base_model_name_or_path: base_model,
                ..PromptConfig::for_model(PromptMethod::PTuning, virtual_tokens, config)
            };
            (prompt_config, PromptStart::Random, Some((kind, hidden)))
        }
        MethodKind::PrefixTuning(prefix) => {
            let hidden = prefix.encoder_hidden_size as usize;
            let virtual_tokens = prefix.num_virtual_tokens as usize;
            let projection = prefix.prefix_projection;
            let prompt_config = PromptConfig {
                prefix_projection: Some(projection),
                encoder_hidden_size: projection.then_some(hidden),
                base_model_name_or_path: base_model,
                ..PromptConfig::for_model(PromptMethod::PrefixTuning, virtual_tokens, config)
            };
            let encoder = projection.then_some((EncoderKind::PrefixMlp, hidden));
            (prompt_config, PromptStart::Random, encoder)
        }
        MethodKind::Lora(_) | MethodKind::Ia3(_) | MethodKind::Bottleneck(_) => {
            return Err(JobError::bad(
                "LoRA, (IA)³ and bottleneck adapters train no virtual tokens",
            ));
        }
    };
    if let Some(context) = config.max_position_embeddings
        && prompt_config.num_virtual_tokens >= context
    {
        return Err(JobError::bad(format!(
            "{} virtual tokens leave no room in the model's context of {context} tokens",
            prompt_config.num_virtual_tokens
        )));
    }
    Adapters::attach_prompt(model, prompt_config, &start, encoder, spec.training.seed)
        .map_err(JobError::bad)
}

/// The AdapterHub file a bottleneck run publishes (but for its tensors): the library's config
/// for the placement, the width as a reduction factor the library turns back into it, and the
/// base model's names. `name` is the adapter's, which its tensors carry.
fn adapterhub_file(
    bottleneck: &graft_api::BottleneckConfig,
    config: &Config,
    spec: &FineTuneJobSpec,
    name: &str,
) -> Result<AdapterHubFile, JobError> {
    let hidden = config.hidden_size;
    let architecture = match bottleneck.placement {
        BottleneckPlacement::Pfeiffer => Architecture::Pfeiffer,
        BottleneckPlacement::Houlsby => Architecture::Houlsby,
    };
    let factor = match (bottleneck.size, bottleneck.reduction_factor) {
        (Some(size), _) => {
            let size = size as usize;
            if size > hidden {
                return Err(JobError::bad(format!(
                    "method.bottleneck.size {size} is wider than the model's hidden size {hidden}"
                )));
            }
            reduction_for_size(hidden, size)
        }
        (None, factor) => f64::from(factor.unwrap_or(16)),
    };
    let non_linearity = bottleneck.non_linearity.map_or(
        match architecture {
            Architecture::Pfeiffer => "relu",
            Architecture::Houlsby => "swish",
        },
        graft_api::NonLinearity::library_name,
    );
    Ok(AdapterHubFile {
        config: BottleneckConfig::new(architecture, factor, non_linearity),
        hidden_size: hidden,
        model_class: config.causal_lm_class().map(str::to_owned),
        model_name: Some(spec.base_model.uri.clone()),
        model_type: Some(config.model_type.clone()),
        name: name.to_owned(),
        version: Some(ADAPTERHUB_VERSION.to_owned()),
    })
}

fn model_source_error(error: SourceError) -> JobError {
    match error {
        SourceError::Download(DownloadError::Store(e)) => {
            JobError::store("downloading the base model", &e)
        }
        e @ (SourceError::NotAModel { .. } | SourceError::NoGgufFile { .. }) => JobError::bad(e),
        e @ (SourceError::Download(DownloadError::Write { .. }) | SourceError::Read { .. }) => {
            JobError::transient(e)
        }
    }
}

/// A probe object written and removed before any expensive work, so an output the trainer
/// cannot write fails in seconds, not after hours of training.
async fn check_writable(output: &Location, uri: &ObjectUri) -> Result<(), JobError> {
    let probe = format!("{STAGING}/write-probe");
    output.put(&probe, Vec::new()).await.map_err(|e| {
        // A local filesystem's refusal is not going to change; a remote store's might.
        if storage::is_permanent(&e) || matches!(uri, ObjectUri::File { .. }) {
            JobError::bad(format!("the output {uri} is not writable: {e}"))
        } else {
            JobError::transient(format!("the output {uri}: {e}"))
        }
    })?;
    output
        .delete(&probe)
        .await
        .map_err(|e| JobError::store("the output", &e))
}

async fn newest_checkpoint(output: &Location) -> Result<Option<Checkpoint>, JobError> {
    let dirs = output
        .list_dirs("checkpoints")
        .await
        .map_err(|e| JobError::store("listing checkpoints", &e))?;
    let mut steps: Vec<u64> = dirs
        .iter()
        .filter_map(|d| checkpoint::parse_directory(d))
        .collect();
    steps.sort_unstable();
    for step in steps.into_iter().rev() {
        let dir = checkpoint::directory(step);
        let mut files = Vec::new();
        for name in checkpoint::FILES {
            let bytes = output
                .get_opt(&format!("{dir}/{name}"))
                .await
                .map_err(|e| JobError::store("reading a checkpoint", &e))?;
            // Without its state file (written last), a checkpoint was interrupted mid-write.
            if bytes.is_none() && name == checkpoint::STATE_FILE {
                break;
            }
            files.push((name, bytes.map(|b| b.to_vec())));
        }
        if files.is_empty() {
            continue;
        }
        let checkpoint = Checkpoint::from_files(|name| {
            files
                .iter()
                .find(|(n, _)| *n == name)
                .and_then(|(_, b)| b.clone())
        })
        .map_err(|e| JobError::bad(format!("{dir}: {e}")))?;
        return Ok(Some(checkpoint));
    }
    Ok(None)
}

/// Uploads a checkpoint, its state file last.
pub async fn save_checkpoint(output: &Location, checkpoint: &Checkpoint) -> Result<(), JobError> {
    let dir = checkpoint::directory(checkpoint.state.step);
    for (name, bytes) in checkpoint.to_files().map_err(JobError::transient)? {
        output
            .put(&format!("{dir}/{name}"), bytes)
            .await
            .map_err(|e| JobError::store("writing a checkpoint", &e))?;
    }
    Ok(())
}

/// The adapter files go to a staging prefix, are copied into place, and `graft.json` is
/// written last: a reader that finds `graft.json` finds the whole adapter.
/// Publishes the adapter's two files (its config, then its weights file under PEFT's or
/// AdapterHub's name) and, last, `graft.json`, which marks it finished.
async fn publish(
    output: &Location,
    config: Vec<u8>,
    (weights_name, weights): (&str, Vec<u8>),
    graft_json: &GraftJson,
) -> Result<(), JobError> {
    let store = |e: object_store::Error| JobError::store("publishing the adapter", &e);
    // A retried run may replace an adapter: withdraw the old marker first.
    output.delete(GRAFT_JSON).await.map_err(store)?;
    for (name, bytes) in [(ADAPTER_CONFIG, config), (weights_name, weights)] {
        let staged = format!("{STAGING}/{name}");
        output.put(&staged, bytes).await.map_err(store)?;
        output.copy(&staged, name).await.map_err(store)?;
        output.delete(&staged).await.map_err(store)?;
    }
    let json = serde_json::to_vec_pretty(graft_json).map_err(JobError::transient)?;
    output.put(GRAFT_JSON, json).await.map_err(store)
}

#[cfg(test)]
mod tests {
    use graft_api::DatasetFormat;

    use super::*;

    /// What a method cannot do is refused before anything is fetched, as a bad spec naming
    /// the field: a merged model of virtual tokens, packing behind virtual tokens.
    #[test]
    fn what_a_method_cannot_do_is_refused_by_name() {
        let spec = |method: &str, merged: bool, packing: bool| -> FineTuneJobSpec {
            let yaml = format!(
                "baseModel: {{uri: 's3://models/tiny/'}}\n\
                 dataset: {{uri: 's3://data/train.jsonl'}}\n\
                 output: {{uri: 's3://adapters/a/v1/', merged: {merged}}}\n\
                 training: {{packing: {packing}}}\n\
                 method: {method}\n"
            );
            serde_yaml::from_str(&yaml).expect("parses")
        };
        let prompt = "{promptTuning: {numVirtualTokens: 8}}";
        let p_tuning = "{pTuning: {numVirtualTokens: 8, encoder: lstm}}";
        let prefix = "{prefixTuning: {numVirtualTokens: 8, prefixProjection: true}}";
        for method in [
            "{lora: {rank: 4}}",
            "{quantization: nf4}",
            "{ia3: {}}",
            prompt,
            p_tuning,
            prefix,
        ] {
            assert!(
                check_method_trained(&spec(method, false, false)).is_ok(),
                "{method}"
            );
        }
        assert!(
            check_method_trained(&spec("{}", true, true)).is_ok(),
            "merged, packed LoRA"
        );
        assert!(
            check_method_trained(&spec("{ia3: {}}", true, false)).is_ok(),
            "merged (IA)³"
        );
        let bottleneck = "{bottleneck: {placement: houlsby}}";
        assert!(
            check_method_trained(&spec(bottleneck, false, true)).is_ok(),
            "packed bottleneck adapters"
        );
        for (method, merged, packing, names) in [
            (
                prompt,
                true,
                false,
                ["output.merged", "method.promptTuning"],
            ),
            (
                p_tuning,
                false,
                true,
                ["training.packing", "method.pTuning"],
            ),
            (
                prefix,
                true,
                false,
                ["output.merged", "method.prefixTuning"],
            ),
            (
                bottleneck,
                true,
                false,
                ["output.merged", "method.bottleneck"],
            ),
        ] {
            let error = check_method_trained(&spec(method, merged, packing)).expect_err(method);
            assert_eq!(error.exit_code(), 2, "a bad spec");
            for name in names {
                assert!(error.to_string().contains(name), "{error}");
            }
        }
    }

    #[test]
    fn the_operators_rendering_reads_back_with_its_status_target() {
        let yaml = r"
baseModel: {uri: 's3://models/tiny/'}
dataset: {uri: 's3://data/train.jsonl'}
output: {uri: 's3://adapters/a/v1/'}
statusTarget: {namespace: team-a, name: support-bot}
";
        let config: TrainerConfig = serde_yaml::from_str(yaml).expect("parses");
        let target = config.status_target.expect("a status target");
        assert_eq!(
            (target.namespace.as_str(), target.name.as_str()),
            ("team-a", "support-bot")
        );
        assert_eq!(config.spec.dataset.format, DatasetFormat::Auto);
    }

    #[test]
    fn store_errors_split_into_permanent_and_transient() {
        let missing = object_store::Error::NotFound {
            path: "x".into(),
            source: "gone".into(),
        };
        assert_eq!(JobError::store("reading", &missing).exit_code(), 2);
        let flaky = object_store::Error::Generic {
            store: "S3",
            source: "connection reset".into(),
        };
        assert_eq!(JobError::store("reading", &flaky).exit_code(), 1);
    }
}
