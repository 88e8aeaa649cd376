//! LoRA as Hugging Face PEFT defines it, shared by the trainer and the server:
//! `y = base(x) + B · A · dropout(x) · scale`, with `A` `[rank, in]`, `B` `[out, rank]` and
//! `scale = alpha / rank` (`alpha / √rank` with rsLoRA).

use candle_core::{DType, Device, Module, Result, Tensor};

use crate::{gemm::is_cpu_f32, linear::FrozenLinear, rng::Rng};

pub mod batched;
pub mod fused;

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

/// Inverted dropout's mask for an input of `shape`: `1 / (1 - p)` where kept, 0 where dropped,
/// drawn from `seed` alone so the same seed always gives the same mask.
pub fn dropout_mask(
    shape: &[usize],
    p: f64,
    seed: u64,
    device: &Device,
    dtype: DType,
) -> Result<Tensor> {
    let mut rng = Rng::seed(seed);
    #[allow(clippy::cast_possible_truncation)]
    let (p, keep) = (p as f32, (1.0 / (1.0 - p)) as f32);
    let len = shape.iter().product();
    let mask: Vec<f32> = (0..len)
        .map(|_| if rng.next_f32() < p { 0.0 } else { keep })
        .collect();
    Tensor::from_vec(mask, shape, device)?.to_dtype(dtype)
}

/// One adapter's A and B for one projection.
#[derive(Clone, Debug)]
pub struct Lora {
    /// `[rank, in]`.
    pub a: Tensor,
    /// `[out, rank]`.
    pub b: Tensor,
    pub scale: f64,
}

impl Lora {
    /// A fresh adapter as PEFT initialises one: `A` from `kaiming_uniform_(a=√5)`, i.e.
    /// uniform in `±1/√in`, and `B` zero, so the adapted layer starts equal to the base.
    pub fn init(
        rank: usize,
        (out, input): (usize, usize),
        scale: f64,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
        let bound = (1.0 / (input as f64).sqrt()) as f32;
        let a: Vec<f32> = (0..rank * input)
            .map(|_| rng.uniform(-bound, bound))
            .collect();
        Ok(Self {
            a: Tensor::from_vec(a, (rank, input), device)?,
            b: Tensor::zeros((out, rank), DType::F32, device)?,
            scale,
        })
    }

    pub fn rank(&self) -> Result<usize> {
        Ok(self.a.dims2()?.0)
    }

    /// `B · A · x · scale` for `x` of shape `[.., in]` (dropout, if any, already applied).
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.a.to_dtype(x.dtype())?;
        let b = self.b.to_dtype(x.dtype())?;
        x.broadcast_matmul(&a.t()?)?
            .broadcast_matmul(&b.t()?)?
            .affine(self.scale, 0.0)
    }
}

/// A frozen projection with an optional trainable adapter.
#[derive(Clone, Debug)]
pub struct LoraLinear {
    base: FrozenLinear,
    lora: Option<Lora>,
}

impl LoraLinear {
    pub fn new(base: FrozenLinear, lora: Option<Lora>) -> Self {
        Self { base, lora }
    }

    pub fn lora(&self) -> Option<&Lora> {
        self.lora.as_ref()
    }

    /// The frozen projection under the adapter.
    pub fn base(&self) -> &FrozenLinear {
        &self.base
    }

    /// The forward pass with `dropout_mask` (already scaled by `1 / (1 - p)`) applied to the
    /// adapter's input only, as PEFT does; `None` outside training.
    pub fn forward_with_dropout(
        &self,
        x: &Tensor,
        dropout_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let Some(lora) = &self.lora else {
            return self.base.forward(x);
        };
        if is_cpu_f32(x) && lora.a.dtype() == DType::F32 && lora.b.dtype() == DType::F32 {
            return fused::forward(&self.base, lora, x, dropout_mask);
        }
        let y = self.base.forward(x)?;
        let input = match dropout_mask {
            Some(mask) => x.broadcast_mul(mask)?,
            None => x.clone(),
        };
        y + lora.delta(&input)?
    }
}

impl Module for LoraLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with_dropout(x, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::FrozenWeight;

    #[test]
    fn scaling_is_alpha_over_rank_or_over_its_root() {
        assert!((scaling(32.0, 16, false) - 2.0).abs() < 1e-12);
        assert!((scaling(32.0, 16, true) - 8.0).abs() < 1e-12);
    }

    #[test]
    fn a_fresh_adapter_leaves_the_layer_unchanged_and_a_is_bounded() -> Result<()> {
        let device = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (8, 16), &device)?;
        let base = FrozenLinear::new(FrozenWeight::Dense(w), None);
        let lora = Lora::init(4, (8, 16), 2.0, &mut Rng::seed(1), &device)?;
        let bound = 0.25f32;
        let a = lora.a.flatten_all()?.to_vec1::<f32>()?;
        assert!(a.iter().all(|v| v.abs() <= bound), "A within ±1/√in");
        assert!(
            a.iter().any(|v| v.abs() > bound / 2.0),
            "A is not all small"
        );
        let x = Tensor::randn(0f32, 1.0, (3, 16), &device)?;
        let plain = base.forward(&x)?;
        let adapted = LoraLinear::new(base, Some(lora)).forward(&x)?;
        assert_eq!(plain.to_vec2::<f32>()?, adapted.to_vec2::<f32>()?);
        Ok(())
    }

    #[test]
    fn dropout_masks_are_seeded_and_keep_the_expected_share() -> Result<()> {
        let mask = |seed| dropout_mask(&[4, 1000], 0.25, seed, &Device::Cpu, DType::F32);
        let values = mask(9)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(values, mask(9)?.flatten_all()?.to_vec1::<f32>()?);
        assert_ne!(values, mask(10)?.flatten_all()?.to_vec1::<f32>()?);
        let kept = values.iter().filter(|&&v| v != 0.0).count();
        assert!(
            (2850..3150).contains(&kept),
            "{kept} of 4000 kept at p = 0.25"
        );
        assert!(
            values
                .iter()
                .all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6)
        );
        Ok(())
    }

    #[test]
    fn the_delta_is_b_a_x_times_the_scale() -> Result<()> {
        let device = Device::Cpu;
        let lora = Lora {
            a: Tensor::new(&[[1f32, 0.0], [0.0, 2.0]], &device)?,
            b: Tensor::new(&[[1f32, 1.0]], &device)?,
            scale: 0.5,
        };
        let delta = lora.delta(&Tensor::new(&[[3f32, 4.0]], &device)?)?;
        // A·x = [3, 8]; B·(A·x) = 11; × 0.5.
        assert_eq!(delta.to_vec2::<f32>()?, [[5.5]]);
        Ok(())
    }
}
