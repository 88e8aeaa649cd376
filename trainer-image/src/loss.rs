//! The training loss: next-token cross-entropy over the label tokens only, summed, so gradient
//! accumulation can divide by the label count of the whole optimizer step (as transformers'
//! Trainer does) instead of averaging averages of unequal micro-batches.

use candle_core::{D, DType, Result, Tensor};

/// Sum of `−log p(token)` over every position whose `labels` weight is 1.
///
/// `logits` `[batch, seq, vocab]`; `ids` `[batch, seq]` (u32); `labels` `[batch, seq]` (f32, 0
/// or 1) says which tokens are learned. Token `t` is predicted from position `t − 1`, so the
/// first token of a row is never a label.
pub fn nll_sum(logits: &Tensor, ids: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (batch, seq, vocab) = logits.dims3()?;
    if seq < 2 {
        return Tensor::zeros((), DType::F32, logits.device());
    }
    let predicted = logits
        .narrow(1, 0, seq - 1)?
        .to_dtype(DType::F32)?
        .reshape((batch * (seq - 1), vocab))?;
    let targets = ids.narrow(1, 1, seq - 1)?.flatten_all()?;
    let weights = labels.narrow(1, 1, seq - 1)?.flatten_all()?;
    let log_probs = candle_nn::ops::log_softmax(&predicted, D::Minus1)?;
    let picked = log_probs.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    (picked * weights)?.sum_all()?.neg()
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    #[test]
    fn only_label_tokens_count_and_each_is_its_own_negative_log_probability() -> Result<()> {
        let device = Device::Cpu;
        // Vocabulary of 3; uniform logits everywhere except a confident prediction of token 2
        // at position 0.
        let logits = Tensor::new(
            &[[[0f32, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]],
            &device,
        )?;
        let ids = Tensor::new(&[[0u32, 2, 1]], &device)?;
        let all = nll_sum(&logits, &ids, &Tensor::new(&[[0f32, 1.0, 1.0]], &device)?)?;
        let expected = 2.0 * 3f32.ln();
        assert!((all.to_scalar::<f32>()? - expected).abs() < 1e-6);
        let last = nll_sum(&logits, &ids, &Tensor::new(&[[1f32, 0.0, 1.0]], &device)?)?;
        assert!(
            (last.to_scalar::<f32>()? - 3f32.ln()).abs() < 1e-6,
            "the first token is never a label; the masked-out second is skipped"
        );
        Ok(())
    }

    #[test]
    fn the_gradient_is_softmax_minus_one_hot_at_label_positions() -> Result<()> {
        let device = Device::Cpu;
        let logits = Var::new(&[[[1f32, 2.0, 3.0], [0.5, 0.0, -1.0]]], &device)?;
        let ids = Tensor::new(&[[0u32, 1]], &device)?;
        let loss = nll_sum(
            logits.as_tensor(),
            &ids,
            &Tensor::new(&[[0f32, 1.0]], &device)?,
        )?;
        let grads = loss.backward()?;
        let grad = grads
            .get(logits.as_tensor())
            .expect("a gradient")
            .to_vec3::<f32>()?;
        let (e1, e2, e3) = (1f32.exp(), 2f32.exp(), 3f32.exp());
        let sum = e1 + e2 + e3;
        let want = [e1 / sum, e2 / sum - 1.0, e3 / sum];
        for (g, w) in grad[0][0].iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
        assert_eq!(
            grad[0][1],
            [0.0, 0.0, 0.0],
            "the last position predicts nothing"
        );
        Ok(())
    }
}
