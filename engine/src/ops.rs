//! Differentiable forms of the ops whose fused candle-nn versions have no backward
//! (`ops::rms_norm`, `ops::softmax_last_dim`, `rotary_emb::rope`): the training path must use
//! these, or gradients silently stop.

use candle_core::{D, DType, Result, Tensor};

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
