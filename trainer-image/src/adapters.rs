//! The trainable adapters: one LoRA A/B pair per (layer, target site), and with DoRA its
//! magnitude; or one (IA)³ vector per (layer, target site). They are candle `Var`s that the
//! model's projections share storage with, so an optimizer step is seen by the next forward.

use std::{
    collections::BTreeMap,
    sync::{Mutex, PoisonError},
};

use candle_core::{Result, Tensor, Var};
use graft_engine::{
    adapters::{
        Adapter, AdapterConfig, Ia3, Ia3Adapter, Ia3Config, Init, Lora, PeftAdapter, Site,
        decompose,
    },
    models::{BaseRewrite, Llama},
    rng::Rng,
};

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

/// The method's config, written into the published `adapter_config.json`.
// One per run.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Config {
    Lora(AdapterConfig),
    Ia3(Ia3Config),
}

/// A run's trainable adapters: LoRA pairs, or (IA)³ vectors.
#[derive(Debug)]
pub struct Adapters {
    /// LoRA's pairs (none in an (IA)³ run).
    pub pairs: Vec<Pair>,
    /// (IA)³'s vectors (none in a LoRA run).
    pub vectors: Vec<Vector>,
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
            config: Config::Ia3(config),
            initial: None,
        };
        adapters.install(model);
        Ok(adapters)
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
    }

    /// Every trainable tensor, A then B (then DoRA's magnitude) for each pair, then each
    /// (IA)³ vector, in a fixed order (the optimizer's).
    pub fn vars(&self) -> Vec<Var> {
        self.pairs
            .iter()
            .flat_map(|p| {
                [p.a.clone(), p.b.clone()]
                    .into_iter()
                    .chain(p.magnitude.clone())
            })
            .chain(self.vectors.iter().map(|v| v.var.clone()))
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
            _ => candle_core::bail!(
                "the checkpoint's adapter is {}, this run trains another method",
                adapter.peft_type()
            ),
        }
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
