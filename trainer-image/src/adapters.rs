//! The trainable adapters: one LoRA A/B pair per (layer, target site), and with DoRA its
//! magnitude; or one (IA)³ vector per (layer, target site); or prompt learning's virtual
//! tokens; or one bottleneck module per (layer, placement). They are candle `Var`s that the
//! model's projections and modules share storage with (the virtual tokens go before each
//! input instead), so an optimizer step is seen by the next forward.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Mutex, PoisonError},
};

use candle_core::{Result, Tensor, Var};
use graft_engine::{
    adapters::{
        Adapter, AdapterConfig, Bottleneck, BottleneckAdapter, EncoderKind, Ia3, Ia3Adapter,
        Ia3Config, Init, Lora, PeftAdapter, Placement, PromptAdapter, PromptConfig, PromptEncoder,
        PromptMethod, Site,
        bottleneck::{AdapterHubFile, NonLinearity},
        decompose,
    },
    models::{BaseRewrite, Llama},
    rng::Rng,
};

use crate::backward::Virtual;

/// One adapted projection.
#[derive(Debug)]
pub struct Pair {
    pub layer: usize,
    pub site: Site,
    pub a: Var,
    pub b: Var,
    /// `alpha / rank` of this pair (`rank_pattern` / `alpha_pattern` may set its own).
    pub scale: f64,
    /// DoRA's magnitude `[out]`, starting at the base rows' norms as PEFT's does.
    pub magnitude: Option<Var>,
}

/// One (IA)³ vector: `[out]`, or `[in]` on a feed-forward projection.
#[derive(Debug)]
pub struct Vector {
    pub layer: usize,
    pub site: Site,
    pub var: Var,
    pub feedforward: bool,
}

/// One bottleneck module: its four tensors (AdapterHub's order: down, its bias, up, its bias)
/// and the rest of its math, as the config sets it.
#[derive(Debug)]
pub struct Module {
    pub layer: usize,
    pub placement: Placement,
    pub vars: [Var; 4],
    pub scaling: f64,
    pub activation: NonLinearity,
    pub reads_stream: bool,
}

impl Module {
    /// The module over its vars (or detached copies of them, `copy`).
    fn bottleneck(&self, copy: bool) -> Result<Bottleneck> {
        let take = |i: usize| -> Result<Tensor> {
            let t = self.vars[i].as_tensor();
            if copy {
                t.detach().copy()
            } else {
                Ok(t.clone())
            }
        };
        Ok(Bottleneck {
            down: take(0)?,
            down_bias: take(1)?,
            up: take(2)?,
            up_bias: take(3)?,
            scaling: self.scaling,
            activation: self.activation,
            reads_stream: self.reads_stream,
        })
    }
}

/// Prompt learning's trainable parameters: prompt tuning's table of the virtual tokens'
/// embeddings or prefix tuning's keys and values, or an encoder (P-tuning's, prefix tuning's
/// MLP) whose output the published adapter holds (as PEFT's).
#[derive(Debug)]
pub struct Prompt {
    /// By PEFT's names: `embedding.weight` (the table, or an encoder's input),
    /// then the encoder's in [`PromptEncoder::param_names`] order.
    pub params: Vec<(String, Var)>,
    /// The encoder; `None` for a table.
    pub encoder: Option<EncoderKind>,
}

impl Prompt {
    /// What the adapter holds, in f32, differentiable in [`Self::params`]: the virtual tokens'
    /// embeddings `[virtual, hidden]`, or prefix tuning's keys and values `[virtual, layers · 2
    /// · kv_width]`.
    pub fn embeddings(&self) -> Result<Tensor> {
        let Some(kind) = self.encoder else {
            return Ok(self.params[0].1.as_tensor().clone());
        };
        let params = self
            .params
            .iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
            .collect();
        PromptEncoder::new(kind, params)?.forward()
    }

    /// The parameters by name, detached copies (a checkpointed encoder).
    pub fn snapshot(&self) -> Result<HashMap<String, Tensor>> {
        self.params
            .iter()
            .map(|(name, var)| Ok((name.clone(), var.as_tensor().detach().copy()?)))
            .collect()
    }

    /// Overwrites the parameters with `saved`'s, every one of them.
    pub fn load(&self, saved: &HashMap<String, Tensor>) -> Result<()> {
        for (name, var) in &self.params {
            let Some(tensor) = saved.get(name) else {
                candle_core::bail!("the checkpoint's prompt encoder has no {name}");
            };
            var.set(&tensor.to_device(var.device())?)?;
        }
        Ok(())
    }
}

/// How a prompt-tuning table starts (PEFT's `prompt_tuning_init`).
#[derive(Debug)]
pub enum PromptStart {
    /// `RANDOM`: normal, standard deviation 1 (a fresh `torch.nn.Embedding`).
    Random,
    /// `TEXT`: the embeddings of these token ids (the init text's, repeated or cut to the
    /// virtual tokens).
    Text(Vec<u32>),
}

/// The method's config, written into the published `adapter_config.json`.
// One per run.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Config {
    Lora(AdapterConfig),
    Ia3(Ia3Config),
    Prompt(PromptConfig),
    /// AdapterHub's file, but for the tensors.
    Bottleneck(AdapterHubFile),
}

/// A run's trainable adapters: LoRA pairs, (IA)³ vectors, or virtual tokens.
#[derive(Debug)]
pub struct Adapters {
    /// LoRA's pairs (none in an (IA)³ run).
    pub pairs: Vec<Pair>,
    /// (IA)³'s vectors (none in a LoRA run).
    pub vectors: Vec<Vector>,
    /// Prompt learning's parameters (in a prompt-tuning, P-tuning or prefix-tuning run only).
    pub prompt: Option<Prompt>,
    /// Bottleneck modules (in a bottleneck run only).
    pub modules: Vec<Module>,
    config: Config,
    /// OLoRA / PiSSA: each pair's start, taken out of the base (see [`Decomposer`]); the
    /// published adapter subtracts it so it applies to the original base.
    pub initial: Option<BTreeMap<(usize, Site), Lora>>,
}

/// OLoRA's and PiSSA's starts, computed from each targeted projection as the base is loaded
/// (before NF4 quantizes it), the base keeping the residual `W − scale·B₀·A₀`. Nothing of it is
/// stored: a resumed run recomputes the same residual from the same base.
#[derive(Debug)]
pub struct Decomposer<'a> {
    config: &'a AdapterConfig,
    sites: &'a [Site],
    starts: Mutex<BTreeMap<(usize, Site), Lora>>,
    /// PiSSA's largest relative residual `‖Wᵀu − σv‖ / σ₁` over the kept triplets.
    worst: Mutex<f64>,
}

impl<'a> Decomposer<'a> {
    pub fn new(config: &'a AdapterConfig, sites: &'a [Site]) -> Self {
        Self {
            config,
            sites,
            starts: Mutex::default(),
            worst: Mutex::new(0.0),
        }
    }

    /// The starts, by (layer, site), and PiSSA's largest relative residual.
    pub fn into_starts(self) -> (BTreeMap<(usize, Site), Lora>, f64) {
        let worst = self
            .worst
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        let starts = self
            .starts
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        (starts, worst)
    }
}

impl BaseRewrite for Decomposer<'_> {
    fn applies(&self, _layer: usize, site: Site) -> bool {
        self.sites.contains(&site)
    }

    fn rewrite(&self, layer: usize, site: Site, weight: &Tensor) -> Result<Tensor> {
        let (rank, scale) = self.config.pair(layer, site);
        let parts = match self.config.init() {
            Init::Olora => decompose::olora(weight, rank, scale)?,
            Init::Pissa => decompose::pissa(weight, rank, scale)?,
            other => candle_core::bail!("{other:?} does not rewrite the base"),
        };
        let mut worst = self.worst.lock().unwrap_or_else(PoisonError::into_inner);
        *worst = worst.max(parts.residual_norm);
        let start = Lora {
            a: parts.a,
            b: parts.b,
            scale,
            magnitude: None,
        };
        self.starts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((layer, site), start);
        Ok(parts.residual)
    }
}

impl Adapters {
    /// Fresh adapters on every layer's `sites`, initialised as PEFT does (A uniform, B zero),
    /// drawn in the model's module order from `seed`.
    pub fn attach(
        model: &mut Llama,
        config: AdapterConfig,
        sites: &[Site],
        seed: u64,
    ) -> Result<Self> {
        let mut rng = Rng::seed(seed);
        // On the model's device, in f32 whatever the model computes in: these are the master
        // weights the optimizer updates.
        let device = model.device().clone();
        check_sites(model, sites)?;
        let mut pairs = Vec::new();
        for layer in 0..model.num_layers() {
            for &site in model.sites().iter().filter(|s| sites.contains(s)) {
                let shape = model.site_shape(site).unwrap_or_default();
                let (rank, scale) = config.pair(layer, site);
                let lora = Lora::init_with(config.init(), rank, shape, scale, &mut rng, &device)?;
                let magnitude = if config.use_dora {
                    Some(Var::from_tensor(&model.row_norms(layer, site)?)?)
                } else {
                    None
                };
                pairs.push(Pair {
                    layer,
                    site,
                    a: Var::from_tensor(&lora.a)?,
                    b: Var::from_tensor(&lora.b)?,
                    scale,
                    magnitude,
                });
            }
        }
        let adapters = Self {
            pairs,
            vectors: Vec::new(),
            prompt: None,
            modules: Vec::new(),
            config: Config::Lora(config),
            initial: None,
        };
        adapters.install(model);
        Ok(adapters)
    }

    /// Fresh (IA)³ vectors (ones, as PEFT's `init_ia3_weights`) on every layer's `sites`, those
    /// on `config`'s feed-forward modules scaling the input.
    pub fn attach_ia3(model: &mut Llama, config: Ia3Config, sites: &[Site]) -> Result<Self> {
        let device = model.device().clone();
        check_sites(model, sites)?;
        let mut vectors = Vec::new();
        for layer in 0..model.num_layers() {
            for &site in model.sites().iter().filter(|s| sites.contains(s)) {
                let (out, input) = model.site_shape(site).unwrap_or_default();
                let feedforward = config.is_feedforward(layer, site);
                let len = if feedforward { input } else { out };
                let ones = Ia3::ones(len, feedforward, &device)?;
                vectors.push(Vector {
                    layer,
                    site,
                    var: Var::from_tensor(&ones.vector)?,
                    feedforward,
                });
            }
        }
        let adapters = Self {
            pairs: Vec::new(),
            vectors,
            prompt: None,
            modules: Vec::new(),
            config: Config::Ia3(config),
            initial: None,
        };
        adapters.install(model);
        Ok(adapters)
    }

    /// Fresh bottleneck modules at every layer's placements `file`'s config names, drawn as
    /// the library starts them (`init_weights: "bert"`) in layer order from `seed`.
    pub fn attach_bottleneck(model: &mut Llama, file: AdapterHubFile, seed: u64) -> Result<Self> {
        let mut rng = Rng::seed(seed);
        let device = model.device().clone();
        let hidden = model.config().hidden_size;
        let config = &file.config;
        let placements = config.placements();
        let mut modules = Vec::new();
        for layer in 0..model.num_layers() {
            let Some(size) = config
                .size(layer, hidden)
                .map_err(candle_core::Error::wrap)?
            else {
                continue;
            };
            for &placement in &placements {
                let start = Bottleneck::init(hidden, size, config, &mut rng, &device)
                    .map_err(candle_core::Error::wrap)?;
                let var = Var::from_tensor;
                modules.push(Module {
                    layer,
                    placement,
                    vars: [
                        var(&start.down)?,
                        var(&start.down_bias)?,
                        var(&start.up)?,
                        var(&start.up_bias)?,
                    ],
                    scaling: start.scaling,
                    activation: start.activation,
                    reads_stream: start.reads_stream,
                });
            }
        }
        let adapters = Self {
            pairs: Vec::new(),
            vectors: Vec::new(),
            prompt: None,
            modules,
            config: Config::Bottleneck(file),
            initial: None,
        };
        adapters.install(model);
        Ok(adapters)
    }

    /// Fresh virtual tokens for `config`'s method on `model` (which they leave unchanged):
    /// prompt tuning's table from `start`, or prefix tuning's (every layer's keys and values);
    /// P-tuning's encoder, or prefix tuning's reparameterisation MLP, of `encoder` kind and
    /// hidden size drawn as PyTorch initialises its modules (embedding normal, linear and LSTM
    /// weights and biases uniform in ±1/√fan-in, ±1/√hidden for the LSTM), from `seed`.
    pub fn attach_prompt(
        model: &Llama,
        config: PromptConfig,
        start: &PromptStart,
        encoder: Option<(EncoderKind, usize)>,
        seed: u64,
    ) -> Result<Self> {
        let mut rng = Rng::seed(seed);
        let device = model.device().clone();
        let (virtual_tokens, hidden) = (config.num_virtual_tokens, config.token_dim);
        // What the run makes: embeddings, or a prefix's keys and values of every layer.
        let made = config.row_width().map_err(candle_core::Error::wrap)?;
        let mut draw = |shape: &[usize], sample: &mut dyn FnMut(&mut Rng) -> f32| {
            let values: Vec<f32> = (0..shape.iter().product::<usize>())
                .map(|_| sample(&mut rng))
                .collect();
            Var::from_tensor(&Tensor::from_vec(values, shape, &device)?)
        };
        let table = match (start, encoder) {
            (PromptStart::Text(ids), None) => {
                let ids = Tensor::new(ids.as_slice(), &device)?.unsqueeze(0)?;
                let embedded = model.embed(&ids)?.squeeze(0)?;
                Var::from_tensor(&embedded.to_dtype(candle_core::DType::F32)?.copy()?)?
            }
            (_, Some(_)) => draw(&[virtual_tokens, hidden], &mut |rng| rng.normal(1.0))?,
            (PromptStart::Random, None) => {
                draw(&[virtual_tokens, made], &mut |rng| rng.normal(1.0))?
            }
        };
        let mut params = vec![("embedding.weight".to_owned(), table)];
        if let Some((kind, size)) = encoder {
            let shapes = PromptEncoder::param_shapes(kind, virtual_tokens, (hidden, size, made));
            for (name, shape) in shapes.iter().skip(1) {
                // PyTorch's bound: 1/√ of an LSTM's hidden size, or of a linear layer's input
                // width (for its bias too).
                let fan_in = if name.starts_with("lstm_head.") {
                    size
                } else {
                    let weight = name.replace(".bias", ".weight");
                    shapes
                        .iter()
                        .find(|(n, _)| *n == weight)
                        .map_or(1, |(_, s)| s[1])
                };
                #[allow(clippy::cast_precision_loss)]
                let bound = 1.0 / (fan_in as f32).sqrt();
                let var = draw(shape, &mut |rng| rng.uniform(-bound, bound))?;
                params.push((name.clone(), var));
            }
        }
        Ok(Self {
            pairs: Vec::new(),
            vectors: Vec::new(),
            modules: Vec::new(),
            prompt: Some(Prompt {
                params,
                encoder: encoder.map(|(kind, _)| kind),
            }),
            config: Config::Prompt(config),
            initial: None,
        })
    }

    /// Adapters starting from `starts` (a [`Decomposer`]'s), on a model loaded with it.
    pub fn attach_decomposed(
        model: &mut Llama,
        config: AdapterConfig,
        starts: BTreeMap<(usize, Site), Lora>,
    ) -> Result<Self> {
        let device = model.device().clone();
        let pairs = starts
            .iter()
            .map(|(&(layer, site), start)| {
                let var = |t: &Tensor| Var::from_tensor(&t.to_device(&device)?.copy()?);
                Ok(Pair {
                    layer,
                    site,
                    a: var(&start.a)?,
                    b: var(&start.b)?,
                    scale: start.scale,
                    // The job refuses DoRA with a rewritten base.
                    magnitude: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let adapters = Self {
            pairs,
            vectors: Vec::new(),
            prompt: None,
            modules: Vec::new(),
            config: Config::Lora(config),
            initial: Some(starts),
        };
        adapters.install(model);
        Ok(adapters)
    }

    /// `adapter` (a snapshot of these) as it is published: for OLoRA / PiSSA, converted to a
    /// plain LoRA on the original base ([`decompose::on_original_base`]).
    pub fn publishable(&self, adapter: &PeftAdapter) -> Result<PeftAdapter> {
        match (&self.initial, adapter) {
            (Some(initial), PeftAdapter::Lora(adapter)) => Ok(PeftAdapter::Lora(
                decompose::on_original_base(adapter, initial)?,
            )),
            _ => Ok(adapter.clone()),
        }
    }

    fn install(&self, model: &mut Llama) {
        for pair in &self.pairs {
            let lora = Lora {
                a: pair.a.as_tensor().clone(),
                b: pair.b.as_tensor().clone(),
                scale: pair.scale,
                magnitude: pair.magnitude.as_ref().map(|m| m.as_tensor().clone()),
            };
            model.set_lora(pair.layer, pair.site, Some(lora));
        }
        for vector in &self.vectors {
            let ia3 = Ia3 {
                vector: vector.var.as_tensor().clone(),
                feedforward: vector.feedforward,
            };
            model.set_ia3(vector.layer, vector.site, Some(ia3));
        }
        for module in &self.modules {
            let bottleneck = module.bottleneck(false).expect("tensors of a var");
            model.set_bottleneck(module.layer, module.placement, Some(bottleneck));
        }
    }

    /// Every trainable tensor, A then B (then DoRA's magnitude) for each pair, then each
    /// (IA)³ vector, then the prompt's parameters, in a fixed order (the optimizer's).
    pub fn vars(&self) -> Vec<Var> {
        self.pairs
            .iter()
            .flat_map(|p| {
                [p.a.clone(), p.b.clone()]
                    .into_iter()
                    .chain(p.magnitude.clone())
            })
            .chain(self.vectors.iter().map(|v| v.var.clone()))
            .chain(
                self.prompt
                    .iter()
                    .flat_map(|p| p.params.iter().map(|(_, v)| v.clone())),
            )
            .chain(self.modules.iter().flat_map(|m| m.vars.iter().cloned()))
            .collect()
    }

    pub fn trainable_parameters(&self) -> u64 {
        self.vars().iter().map(|v| v.elem_count() as u64).sum()
    }

    /// Overwrites the weights with `adapter`'s (a checkpoint of this same run).
    pub fn load(&self, adapter: &PeftAdapter) -> Result<()> {
        match (&self.config, adapter) {
            (Config::Lora(_), PeftAdapter::Lora(adapter)) => self.load_lora(adapter),
            (Config::Ia3(_), PeftAdapter::Ia3(adapter)) => self.load_ia3(adapter),
            (Config::Prompt(_), PeftAdapter::Prompt(adapter)) => self.load_prompt(adapter),
            (Config::Bottleneck(_), PeftAdapter::Bottleneck(adapter)) => {
                self.load_bottleneck(adapter)
            }
            _ => candle_core::bail!(
                "the checkpoint's adapter is {}, this run trains another method",
                adapter.peft_type()
            ),
        }
    }

    /// The table; an encoder is not in the adapter (PEFT saves its output) and comes from the
    /// checkpoint's own file ([`Prompt::load`]).
    fn load_prompt(&self, adapter: &PromptAdapter) -> Result<()> {
        let Some(prompt) = &self.prompt else {
            candle_core::bail!("this run has no virtual tokens");
        };
        if adapter.config.peft_type != self.peft_type() {
            candle_core::bail!(
                "the checkpoint's adapter is {}, this run trains {}",
                adapter.config.peft_type,
                self.peft_type()
            );
        }
        if prompt.encoder.is_none() {
            let table = &prompt.params[0].1;
            if adapter.embeddings.dims() != table.dims() {
                candle_core::bail!(
                    "the checkpoint's virtual tokens are {:?}, this run's {:?}",
                    adapter.embeddings.dims(),
                    table.dims()
                );
            }
            table.set(&adapter.embeddings.to_device(table.device())?)?;
        }
        Ok(())
    }

    /// What a prompt-learning run's vars made (`made`, [`Prompt::embeddings`]) are: the
    /// virtual tokens' embeddings, or prefix tuning's keys and values.
    pub fn virtual_tokens_of<'a>(&self, made: &'a Tensor) -> Virtual<'a> {
        match &self.config {
            Config::Prompt(config) if config.method().ok() == Some(PromptMethod::PrefixTuning) => {
                Virtual::Prefix(made)
            }
            _ => Virtual::Embeddings(made),
        }
    }

    /// The virtual tokens put before each input (0 but for prompt learning).
    pub fn virtual_tokens(&self) -> usize {
        match &self.config {
            Config::Prompt(config) => config.num_virtual_tokens,
            Config::Lora(_) | Config::Ia3(_) | Config::Bottleneck(_) => 0,
        }
    }

    /// PEFT's name of the method trained.
    pub fn peft_type(&self) -> &str {
        match &self.config {
            Config::Lora(config) => &config.peft_type,
            Config::Ia3(config) => &config.peft_type,
            Config::Prompt(config) => &config.peft_type,
            Config::Bottleneck(_) => "BOTTLENECK",
        }
    }

    fn load_bottleneck(&self, adapter: &BottleneckAdapter) -> Result<()> {
        for module in &self.modules {
            let Some(saved) = adapter.modules.get(&(module.layer, module.placement)) else {
                candle_core::bail!(
                    "the checkpoint has no bottleneck module at {:?} of layer {}",
                    module.placement,
                    module.layer
                );
            };
            let tensors = [&saved.down, &saved.down_bias, &saved.up, &saved.up_bias];
            for (var, saved) in module.vars.iter().zip(tensors) {
                if var.dims() != saved.dims() {
                    candle_core::bail!(
                        "the checkpoint's bottleneck at {:?} of layer {} has another size",
                        module.placement,
                        module.layer
                    );
                }
                var.set(&saved.to_device(var.device())?)?;
            }
        }
        Ok(())
    }

    fn load_ia3(&self, adapter: &Ia3Adapter) -> Result<()> {
        for vector in &self.vectors {
            let Some(saved) = adapter.vectors.get(&(vector.layer, vector.site)) else {
                candle_core::bail!(
                    "the checkpoint has no (IA)³ vector for {} of layer {}",
                    vector.site.name(),
                    vector.layer
                );
            };
            if saved.feedforward != vector.feedforward {
                candle_core::bail!(
                    "the checkpoint's {} of layer {} and this run's differ in feedforward_modules",
                    vector.site.name(),
                    vector.layer
                );
            }
            vector
                .var
                .set(&saved.vector.to_device(vector.var.device())?)?;
        }
        Ok(())
    }

    fn load_lora(&self, adapter: &Adapter) -> Result<()> {
        for pair in &self.pairs {
            let Some(saved) = adapter.weights.get(&(pair.layer, pair.site)) else {
                candle_core::bail!(
                    "the checkpoint has no adapter for {} of layer {}",
                    pair.site.name(),
                    pair.layer
                );
            };
            pair.a.set(&saved.a.to_device(pair.a.device())?)?;
            pair.b.set(&saved.b.to_device(pair.b.device())?)?;
            match (&pair.magnitude, &saved.magnitude) {
                (Some(var), Some(saved)) => var.set(&saved.to_device(var.device())?)?,
                (None, None) => {}
                _ => candle_core::bail!(
                    "the checkpoint's {} of layer {} and this run's differ in DoRA (use_dora)",
                    pair.site.name(),
                    pair.layer,
                ),
            }
        }
        Ok(())
    }

    /// A snapshot in PEFT's form (detached copies, so later steps do not change it).
    pub fn snapshot(&self) -> Result<PeftAdapter> {
        let copy = |v: &Var| -> Result<Tensor> { v.as_tensor().detach().copy() };
        let config = match &self.config {
            Config::Lora(config) => config,
            Config::Prompt(config) => {
                let prompt = self
                    .prompt
                    .as_ref()
                    .expect("a prompt run has its parameters");
                return Ok(PeftAdapter::Prompt(PromptAdapter {
                    config: config.clone(),
                    embeddings: prompt.embeddings()?.detach().copy()?,
                }));
            }
            Config::Bottleneck(file) => {
                let modules = self
                    .modules
                    .iter()
                    .map(|m| Ok(((m.layer, m.placement), m.bottleneck(true)?)))
                    .collect::<Result<_>>()?;
                return Ok(PeftAdapter::Bottleneck(BottleneckAdapter {
                    file: file.clone(),
                    modules,
                }));
            }
            Config::Ia3(config) => {
                let vectors = self
                    .vectors
                    .iter()
                    .map(|v| {
                        let ia3 = Ia3 {
                            vector: copy(&v.var)?,
                            feedforward: v.feedforward,
                        };
                        Ok(((v.layer, v.site), ia3))
                    })
                    .collect::<Result<_>>()?;
                return Ok(PeftAdapter::Ia3(Ia3Adapter {
                    config: config.clone(),
                    vectors,
                }));
            }
        };
        let weights = self
            .pairs
            .iter()
            .map(|p| {
                Ok((
                    (p.layer, p.site),
                    Lora {
                        a: copy(&p.a)?,
                        b: copy(&p.b)?,
                        scale: p.scale,
                        magnitude: p.magnitude.as_ref().map(copy).transpose()?,
                    },
                ))
            })
            .collect::<Result<_>>()?;
        Ok(PeftAdapter::Lora(Adapter {
            config: config.clone(),
            weights,
        }))
    }
}

/// Every one of `sites` is a projection of `model`.
fn check_sites(model: &Llama, sites: &[Site]) -> Result<()> {
    if let Some(missing) = sites.iter().find(|s| !model.sites().contains(s)) {
        candle_core::bail!(
            "target module {} is not a projection of this model (it has {})",
            missing.name(),
            Site::names(model.sites())
        );
    }
    Ok(())
}
