//! The trainable adapters: one LoRA A/B pair per (layer, target site), and with DoRA its
//! magnitude, as candle `Var`s that the model's LoRA layers share storage with, so an optimizer
//! step is seen by the next forward.

use std::{
    collections::BTreeMap,
    sync::{Mutex, PoisonError},
};

use candle_core::{Result, Tensor, Var};
use graft_engine::{
    adapters::{Adapter, AdapterConfig, Init, Lora, Site, decompose},
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

#[derive(Debug)]
pub struct Adapters {
    pub pairs: Vec<Pair>,
    pub config: AdapterConfig,
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
        if let Some(missing) = sites.iter().find(|s| !model.sites().contains(s)) {
            candle_core::bail!(
                "target module {} is not a projection of this model (it has {})",
                missing.name(),
                Site::names(model.sites())
            );
        }
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
            config,
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
            config,
            initial: Some(starts),
        };
        adapters.install(model);
        Ok(adapters)
    }

    /// `adapter` (a snapshot of these) as it is published: for OLoRA / PiSSA, converted to a
    /// plain LoRA on the original base ([`decompose::on_original_base`]).
    pub fn publishable(&self, adapter: &Adapter) -> Result<Adapter> {
        match &self.initial {
            Some(initial) => decompose::on_original_base(adapter, initial),
            None => Ok(adapter.clone()),
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
    }

    /// Every trainable tensor, A then B (then DoRA's magnitude) for each pair, in a fixed
    /// order (the optimizer's).
    pub fn vars(&self) -> Vec<Var> {
        self.pairs
            .iter()
            .flat_map(|p| {
                [p.a.clone(), p.b.clone()]
                    .into_iter()
                    .chain(p.magnitude.clone())
            })
            .collect()
    }

    pub fn trainable_parameters(&self) -> u64 {
        self.vars().iter().map(|v| v.elem_count() as u64).sum()
    }

    /// Overwrites the weights with `adapter`'s (a checkpoint of this same run).
    pub fn load(&self, adapter: &Adapter) -> Result<()> {
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
    pub fn snapshot(&self) -> Result<Adapter> {
        let copy = |v: &Var| -> Result<Tensor> { v.as_tensor().detach().copy() };
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
        Ok(Adapter {
            config: self.config.clone(),
            weights,
        })
    }
}
