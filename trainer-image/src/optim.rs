//! AdamW as `torch.optim.AdamW` computes it (decoupled weight decay, bias-corrected moments),
//! with its state in plain tensors so a checkpoint can store and restore it exactly, and
//! gradient clipping by global norm as `torch.nn.utils.clip_grad_norm_`.

use candle_core::{DType, Result, Tensor, Var};

#[derive(Clone, Copy, Debug)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    /// transformers' `TrainingArguments` defaults.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

#[derive(Debug)]
pub struct AdamW {
    params: AdamWParams,
    vars: Vec<Var>,
    /// First and second moments, one pair per var.
    moments: Vec<(Tensor, Tensor)>,
    steps: u64,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, params: AdamWParams) -> Result<Self> {
        let moments = vars
            .iter()
            .map(|v| Ok((v.zeros_like()?, v.zeros_like()?)))
            .collect::<Result<_>>()?;
        Ok(Self {
            params,
            vars,
            moments,
            steps: 0,
        })
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One update at learning rate `lr`, with `grads[i]` the gradient of the `i`-th var.
    /// Vars without a gradient are left alone.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.steps += 1;
        let p = self.params;
        #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
        let t = self.steps as i32;
        let correction1 = 1.0 - p.beta1.powi(t);
        let correction2 = 1.0 - p.beta2.powi(t);
        for ((var, (m, v)), grad) in self.vars.iter().zip(self.moments.iter_mut()).zip(grads) {
            let Some(grad) = grad else {
                continue;
            };
            *m = ((&*m * p.beta1)? + (grad * (1.0 - p.beta1))?)?;
            *v = ((&*v * p.beta2)? + (grad.sqr()? * (1.0 - p.beta2))?)?;
            let denominator = ((&*v / correction2)?.sqrt()? + p.eps)?;
            let update = ((&*m / correction1)? / denominator)?;
            let decayed = (var.as_tensor() * (1.0 - lr * p.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// The moments and step count, for a checkpoint.
    pub fn state(&self) -> (u64, &[(Tensor, Tensor)]) {
        (self.steps, &self.moments)
    }

    /// Restores what [`AdamW::state`] returned.
    pub fn restore(&mut self, steps: u64, moments: Vec<(Tensor, Tensor)>) -> Result<()> {
        if moments.len() != self.vars.len() {
            candle_core::bail!(
                "optimizer state has {} moment pairs for {} parameters",
                moments.len(),
                self.vars.len()
            );
        }
        self.steps = steps;
        // A checkpoint is read on the CPU; the moments live beside their vars.
        self.moments = moments
            .into_iter()
            .zip(&self.vars)
            .map(|((m, v), var)| Ok((m.to_device(var.device())?, v.to_device(var.device())?)))
            .collect::<Result<_>>()?;
        Ok(())
    }
}

/// Scales `grads` so their global L2 norm is at most `max_norm`; returns the norm before
/// clipping. torch's factor: `max_norm / (norm + 1e-6)`, applied when below 1.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    // Every square sum stays on the device; one read brings the norm to the host, instead of
    // one synchronisation per adapter tensor.
    let squares = grads
        .iter()
        .flatten()
        .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all())
        .collect::<Result<Vec<_>>>()?;
    if squares.is_empty() {
        return Ok(0.0);
    }
    let total = Tensor::stack(&squares, 0)?.sum_all()?.to_scalar::<f32>()?;
    let norm = f64::from(total).sqrt();
    let factor = max_norm / (norm + 1e-6);
    if factor < 1.0 {
        for g in grads.iter_mut().flatten() {
            *g = (&*g * factor)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn grads_for(var: &Var, grad: &[f32]) -> Result<Vec<Option<Tensor>>> {
        // A loss whose gradient with respect to `var` is exactly `grad`: sum(var · grad).
        let g = Tensor::new(grad, &Device::Cpu)?;
        let store = (var.as_tensor() * g)?.sum_all()?.backward()?;
        Ok(vec![store.get(var.as_tensor()).cloned()])
    }

    /// Reference: torch 2.15 `torch.optim.AdamW([p], lr=0.1, betas=(0.9, 0.999), eps=1e-8,
    /// weight_decay=0.01)` from p = [1, -2, 0.5] with these three gradients.
    #[test]
    fn three_steps_land_where_torch_adamw_does() -> Result<()> {
        let var = Var::new(&[1.0f32, -2.0, 0.5], &Device::Cpu)?;
        let params = AdamWParams {
            weight_decay: 0.01,
            ..AdamWParams::default()
        };
        let mut adam = AdamW::new(vec![var.clone()], params)?;
        for grad in [[0.5f32, -1.0, 0.0], [0.25, 0.5, -2.0], [-1.0, 0.1, 0.3]] {
            adam.step(&grads_for(&var, &grad)?, 0.1)?;
        }
        let expected = [0.824_713_9f32, -1.852_789, 0.620_244_9];
        for (got, want) in var.as_tensor().to_vec1::<f32>()?.iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        assert_eq!(adam.steps(), 3);
        Ok(())
    }

    /// Reference: `torch.nn.utils.clip_grad_norm_([q], 1.0)` with grad [3, 4] returns 5.0 and
    /// leaves [0.6, 0.8] (times 1 / (1 + 1e-6·…)).
    #[test]
    fn clipping_scales_to_the_max_norm_like_torch() -> Result<()> {
        let var = Var::new(&[0.0f32, 0.0], &Device::Cpu)?;
        let mut grads = grads_for(&var, &[3.0, 4.0])?;
        let norm = clip_grad_norm(&mut grads, 1.0)?;
        assert!((norm - 5.0).abs() < 1e-6);
        let clipped = grads[0].as_ref().expect("grad").to_vec1::<f32>()?;
        assert!(
            (clipped[0] - 0.6).abs() < 1e-6 && (clipped[1] - 0.8).abs() < 1e-6,
            "{clipped:?}"
        );
        Ok(())
    }

    #[test]
    fn restored_state_continues_exactly() -> Result<()> {
        let run = |split: bool| -> Result<Vec<f32>> {
            let var = Var::new(&[1.0f32, -1.0], &Device::Cpu)?;
            let mut adam = AdamW::new(vec![var.clone()], AdamWParams::default())?;
            for (i, grad) in [[0.3f32, -0.2], [0.1, 0.4], [-0.5, 0.2]].iter().enumerate() {
                if split && i == 2 {
                    let (steps, moments) = adam.state();
                    let moments = moments.to_vec();
                    adam = AdamW::new(vec![var.clone()], AdamWParams::default())?;
                    adam.restore(steps, moments)?;
                }
                adam.step(&grads_for(&var, grad)?, 0.01)?;
            }
            var.as_tensor().to_vec1::<f32>()
        };
        assert_eq!(run(false)?, run(true)?);
        Ok(())
    }
}
