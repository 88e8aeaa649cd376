//! Differentiable forms of the ops whose fused candle-nn versions have no backward
//! (`ops::rms_norm`, `ops::softmax_last_dim`, `rotary_emb::rope`): the training path must use
//! these, or gradients silently stop.

use candle_core::{CpuStorage, CustomOp1, D, DType, Layout, Result, Shape, Tensor};

/// RMSNorm as transformers computes it: in f32, then cast back, then times the weight.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let variance = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x
        .broadcast_div(&(variance + eps)?.sqrt()?)?
        .to_dtype(dtype)?;
    normed.broadcast_mul(&weight.to_dtype(dtype)?)
}

/// Softmax over the last dimension. The max is detached: softmax doesn't depend on the shift.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exp = x.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

/// Rotary embedding in transformers' (non-interleaved) layout: `x·cos + rotate_half(x)·sin`
/// with `x` `[batch, heads, seq, head_dim]` and `cos`, `sin` `[seq, head_dim]`.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    // transformers casts the tables to the activations' dtype (bf16 on GPU).
    let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// Attention probabilities from f32 scores `[.., queries, keys]`: softmax over the keys each
/// query may see — causal, and within `window` when the model has a sliding window — with the
/// rest exactly 0. The last `queries` of `keys` positions are the queries (all of them in
/// training; the new ones after a KV cache).
///
/// One fused op instead of a mask addition and five elementwise passes, each with its own
/// backward: attention scores are the largest activations of a training step, and the passes
/// over them dominated a CPU step. The backward uses the saved probabilities:
/// `dscores = p · (dp − Σ dp·p)`.
///
/// Elsewhere (a GPU, or f16/bf16 scores) the same result from tensor ops: a −∞ mask added, then
/// [`softmax_last_dim`].
pub fn causal_softmax(scores: &Tensor, window: Option<usize>) -> Result<Tensor> {
    if scores.device().is_cpu() && scores.dtype() == DType::F32 {
        scores.apply_op1(CausalSoftmax { window })
    } else {
        masked_softmax(scores, window)
    }
}

/// [`causal_softmax`] from candle's own ops.
fn masked_softmax(scores: &Tensor, window: Option<usize>) -> Result<Tensor> {
    let (queries, keys) = (scores.dim(D::Minus2)?, scores.dim(D::Minus1)?);
    let visible = CausalSoftmax { window };
    let mask: Vec<f32> = (0..queries)
        .flat_map(|q| {
            let (first, last) = visible.visible(q, queries, keys);
            (0..keys).map(move |k| {
                if (first..=last).contains(&k) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    let mask =
        Tensor::from_vec(mask, (queries, keys), scores.device())?.to_dtype(scores.dtype())?;
    softmax_last_dim(&scores.broadcast_add(&mask)?)
}

struct CausalSoftmax {
    window: Option<usize>,
}

impl CausalSoftmax {
    /// The keys query `q` (of `queries`) may see: `first..=last`.
    fn visible(&self, q: usize, queries: usize, keys: usize) -> (usize, usize) {
        let last = keys - queries + q;
        let first = self.window.map_or(0, |w| (last + 1).saturating_sub(w));
        (first, last)
    }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(values), Some((start, end))) = (storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("{}: needs contiguous f32 scores", self.name());
        };
        let dims = layout.dims();
        let (queries, keys) = match dims {
            [.., q, k] if k >= q => (*q, *k),
            _ => candle_core::bail!(
                "{}: scores {dims:?} are not [.., queries, keys]",
                self.name()
            ),
        };
        let mut out = vec![0f32; end - start];
        for (row, (input, output)) in values[start..end]
            .chunks_exact(keys)
            .zip(out.chunks_exact_mut(keys))
            .enumerate()
        {
            let (first, last) = self.visible(row % queries, queries, keys);
            let (input, output) = (&input[first..=last], &mut output[first..=last]);
            let max = input.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (o, &x) in output.iter_mut().zip(input) {
                *o = (x - max).exp();
                sum += *o;
            }
            let inverse = 1.0 / sum;
            for o in output.iter_mut() {
                *o *= inverse;
            }
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _: &Tensor, probs: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // Masked positions have p = 0, so they get no gradient without a mask here.
        let dot = (grad * probs)?.sum_keepdim(D::Minus1)?;
        Ok(Some((grad.broadcast_sub(&dot)? * probs)?))
    }
}

/// A dot product with eight running sums, so the compiler vectorises it without being asked
/// to reassociate floats.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut sums = [0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for i in 0..8 {
            sums[i] += x[i] * y[i];
        }
    }
    sums.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    #[test]
    fn gradients_flow_through_every_op() -> Result<()> {
        let device = Device::Cpu;
        let x = Var::new(&[[[[0.5f32, -1.0, 2.0, 0.25]]]], &device)?;
        let weight = Tensor::new(&[1f32, 2.0, 3.0, 4.0], &device)?;
        let cos = Tensor::new(&[[0.5f32, 0.5, 0.5, 0.5]], &device)?;
        let sin = Tensor::new(&[[0.25f32, 0.25, 0.25, 0.25]], &device)?;
        let y = softmax_last_dim(&apply_rotary(
            &rms_norm(x.as_tensor(), &weight, 1e-6)?,
            &cos,
            &sin,
        )?)?;
        let loss = y
            .broadcast_mul(&Tensor::new(&[1f32, 2.0, 3.0, 4.0], &device)?)?
            .sum_all()?;
        let grads = loss.backward()?;
        let grad = grads
            .get(x.as_tensor())
            .expect("a gradient reaches the input");
        let norm: f32 = grad.sqr()?.sum_all()?.to_scalar()?;
        assert!(norm > 1e-6, "gradient {grad}");
        Ok(())
    }

    /// The unfused reference, written out independently: scores plus a −∞ mask, then softmax.
    fn reference_softmax(x: &Tensor, window: Option<usize>) -> Result<Tensor> {
        let (q, k) = (x.dim(D::Minus2)?, x.dim(D::Minus1)?);
        let mask: Vec<f32> = (0..q)
            .flat_map(|i| {
                (0..k).map(move |j| {
                    let last = k - q + i;
                    let visible = j <= last && window.is_none_or(|w| last - j < w);
                    if visible { 0.0 } else { f32::NEG_INFINITY }
                })
            })
            .collect();
        softmax_last_dim(&x.broadcast_add(&Tensor::from_vec(mask, (q, k), x.device())?)?)
    }

    #[test]
    fn causal_softmax_equals_masking_then_softmax_with_the_same_gradient() -> Result<()> {
        let device = Device::Cpu;
        for (queries, window) in [(5, None), (5, Some(2)), (2, None), (3, Some(3))] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (2, 3, queries, 5), &device)?)?;
            let weights = Tensor::randn(0f32, 1.0, (2, 3, queries, 5), &device)?;
            let fused = causal_softmax(x.as_tensor(), window)?;
            let reference = reference_softmax(x.as_tensor(), window)?;
            // The tensor-op form other devices take, checked here on the CPU.
            let fallback = masked_softmax(x.as_tensor(), window)?;
            for ours in [&fused, &fallback] {
                let diff: f32 = (ours - &reference)?.abs()?.max_all()?.to_scalar()?;
                assert!(diff < 1e-6, "{queries} queries, window {window:?}: {diff}");
            }
            let grad = |y: &Tensor| -> Result<Tensor> {
                let grads = (y * &weights)?.sum_all()?.backward()?;
                Ok(grads.get(x.as_tensor()).expect("a gradient").clone())
            };
            let diff: f32 = (grad(&fused)? - grad(&reference)?)?
                .abs()?
                .max_all()?
                .to_scalar()?;
            assert!(
                diff < 1e-5,
                "gradient, {queries} queries, window {window:?}: {diff}"
            );
        }
        Ok(())
    }

    #[test]
    fn softmax_rows_sum_to_one_and_match_the_fused_op() -> Result<()> {
        let x = Tensor::new(&[[1f32, 2.0, 3.0], [-1.0, 0.0, 100.0]], &Device::Cpu)?;
        let ours = softmax_last_dim(&x)?;
        let fused = candle_nn::ops::softmax_last_dim(&x)?;
        let diff: f32 = (ours - fused)?.abs()?.max_all()?.to_scalar()?;
        assert!(diff < 1e-6);
        Ok(())
    }
}
