//! LoRA as Hugging Face PEFT defines it, shared by the trainer and the server:
//! `y = base(x) + B · A · dropout(x) · scale`, with `A` `[rank, in]`, `B` `[out, rank]` and
//! `scale = alpha / rank` (`alpha / √rank` with rsLoRA). The backends compute it; this file
//! holds the pair, its initialisation and the reference form the backends are tested against.

use candle_core::{DType, Device, Result, Tensor};

use crate::rng::Rng;

/// PEFT's `scaling`.
pub fn scaling(alpha: f64, rank: usize, use_rslora: bool) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let rank = rank as f64;
    if use_rslora {
        alpha / rank.sqrt()
    } else {
        alpha / rank
    }
}

/// One adapter's A and B for one projection, and DoRA's magnitude where it has one.
#[derive(Clone, Debug)]
pub struct Lora {
    /// `[rank, in]`.
    pub a: Tensor,
    /// `[out, rank]`.
    pub b: Tensor,
    pub scale: f64,
    /// DoRA's magnitude `[out]` (PEFT's `lora_magnitude_vector`): the adapted weight's rows
    /// are rescaled to these norms (see [`super::dora`]). `None`: plain LoRA.
    pub magnitude: Option<Tensor>,
}

/// How a fresh pair's `A` is drawn (PEFT's `init_lora_weights`); `B` starts at zero either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Init {
    /// `true`: `kaiming_uniform_(a=√5)`, uniform in `±1/√in`.
    #[default]
    Kaiming,
    /// `"gaussian"`: normal with standard deviation `1/rank`.
    Gaussian,
    /// `"olora"`: `B`, `A` from a QR of the base weight, taken out of it (see
    /// [`decompose`](super::decompose)).
    Olora,
    /// `"pissa"`: `B`, `A` from the base weight's top singular triplets, taken out of it.
    Pissa,
}

impl Init {
    /// Whether the start comes from (and is taken out of) the base weight.
    pub fn rewrites_base(self) -> bool {
        matches!(self, Self::Olora | Self::Pissa)
    }

    /// PEFT's `init_lora_weights` value.
    pub fn peft_name(self) -> serde_json::Value {
        match self {
            Self::Kaiming => serde_json::Value::Bool(true),
            Self::Gaussian => "gaussian".into(),
            Self::Olora => "olora".into(),
            Self::Pissa => "pissa".into(),
        }
    }
}

impl Lora {
    /// A fresh pair initialised as `init` says.
    pub fn init_with(
        init: Init,
        rank: usize,
        (out, input): (usize, usize),
        scale: f64,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
        let a: Vec<f32> = match init {
            Init::Kaiming => {
                let bound = (1.0 / (input as f64).sqrt()) as f32;
                (0..rank * input)
                    .map(|_| rng.uniform(-bound, bound))
                    .collect()
            }
            Init::Gaussian => {
                let std = 1.0 / rank as f32;
                (0..rank * input).map(|_| rng.normal(std)).collect()
            }
            Init::Olora | Init::Pissa => {
                candle_core::bail!("{init:?} starts from the base weight (see `decompose`)")
            }
        };
        Ok(Self {
            a: Tensor::from_vec(a, (rank, input), device)?,
            b: Tensor::zeros((out, rank), DType::F32, device)?,
            scale,
            magnitude: None,
        })
    }

    /// A fresh adapter as PEFT initialises one: `A` from `kaiming_uniform_(a=√5)`, i.e.
    /// uniform in `±1/√in`, and `B` zero, so the adapted layer starts equal to the base.
    pub fn init(
        rank: usize,
        shape: (usize, usize),
        scale: f64,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        Self::init_with(Init::Kaiming, rank, shape, scale, rng, device)
    }

    pub fn rank(&self) -> Result<usize> {
        Ok(self.a.dims2()?.0)
    }

    /// The same pair cut from the graph: evaluation and serving read the trained values
    /// without recording anything for a backward pass.
    #[must_use]
    pub fn detach(&self) -> Self {
        Self {
            a: self.a.detach(),
            b: self.b.detach(),
            scale: self.scale,
            magnitude: self.magnitude.as_ref().map(Tensor::detach),
        }
    }

    /// `B · A · x · scale` for `x` of shape `[.., in]` (dropout, if any, already applied),
    /// through candle's ops in `x`'s dtype: the reference form.
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.a.to_dtype(x.dtype())?;
        let b = self.b.to_dtype(x.dtype())?;
        x.broadcast_matmul(&a.t()?)?
            .broadcast_matmul(&b.t()?)?
            .affine(self.scale, 0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PEFT's two plain inits: kaiming draws A uniform in ±1/√in (std 1/√(3·in)), gaussian
    /// normal with std 1/r; B starts at zero in both.
    #[test]
    fn kaiming_and_gaussian_draw_a_with_pefts_spread() -> Result<()> {
        let std = |lora: &Lora| -> Result<f32> {
            let a = lora.a.flatten_all()?.to_vec1::<f32>()?;
            #[allow(clippy::cast_precision_loss)]
            let n = a.len() as f32;
            Ok((a.iter().map(|v| v * v).sum::<f32>() / n).sqrt())
        };
        let mut rng = Rng::seed(1);
        let (rank, input) = (8, 256);
        for (init, expected) in [
            (Init::Kaiming, 1.0 / (3.0 * 256f32).sqrt()),
            (Init::Gaussian, 1.0 / 8.0),
        ] {
            let lora = Lora::init_with(init, rank, (32, input), 2.0, &mut rng, &Device::Cpu)?;
            let spread = std(&lora)?;
            assert!(
                (spread / expected - 1.0).abs() < 0.05,
                "{init:?}: std {spread}, PEFT's {expected}"
            );
            assert!(lora.b.abs()?.max_all()?.to_scalar::<f32>()? < f32::MIN_POSITIVE);
        }
        Ok(())
    }

    #[test]
    fn scaling_is_alpha_over_rank_or_over_its_root() {
        assert!((scaling(32.0, 16, false) - 2.0).abs() < 1e-12);
        assert!((scaling(32.0, 16, true) - 8.0).abs() < 1e-12);
    }

    #[test]
    fn a_fresh_adapter_has_b_zero_and_a_bounded() -> Result<()> {
        let lora = Lora::init(4, (8, 16), 2.0, &mut Rng::seed(1), &Device::Cpu)?;
        let bound = 0.25f32;
        let a = lora.a.flatten_all()?.to_vec1::<f32>()?;
        assert!(a.iter().all(|v| v.abs() <= bound), "A within ±1/√in");
        assert!(
            a.iter().any(|v| v.abs() > bound / 2.0),
            "A is not all small"
        );
        let b = lora.b.flatten_all()?.to_vec1::<f32>()?;
        assert!(b.iter().all(|&v| v == 0.0));
        Ok(())
    }

    #[test]
    fn the_delta_is_b_a_x_times_the_scale() -> Result<()> {
        let device = Device::Cpu;
        let lora = Lora {
            a: Tensor::new(&[[1f32, 0.0], [0.0, 2.0]], &device)?,
            b: Tensor::new(&[[1f32, 1.0]], &device)?,
            scale: 0.5,
            magnitude: None,
        };
        let delta = lora.delta(&Tensor::new(&[[3f32, 4.0]], &device)?)?;
        // A·x = [3, 8]; B·(A·x) = 11; × 0.5.
        assert_eq!(delta.to_vec2::<f32>()?, [[5.5]]);
        Ok(())
    }
}
