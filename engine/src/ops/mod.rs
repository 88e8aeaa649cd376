//! Differentiable forms of the ops whose fused candle-nn versions have no backward
//! (`ops::rms_norm`, `ops::softmax_last_dim`, `rotary_emb::rope`): the training path must use
//! these, or gradients silently stop.
//!
//! On the CPU in f32 the training path's attention, RMSNorm and SwiGLU are custom ops with
//! their own backward. Composed from candle's elementwise ops, each would be several graph
//! nodes, and candle's backward gives every node a zeroed gradient buffer it adds into: on a
//! small model those passes over activations cost more than the matmuls. Elsewhere (a GPU,
//! bf16) they are composed from candle's ops, and the tests check the two forms agree, values
//! and gradients.

use candle_core::{D, Result, Tensor};

mod attention;
mod norm;
mod rotary;
mod softmax;
mod swiglu;

pub use attention::{Heads, causal_attention};
pub use norm::rms_norm;
pub use rotary::apply_rotary;
pub use softmax::causal_softmax;
pub use swiglu::swiglu;

/// Softmax over the last dimension. The max is detached: softmax doesn't depend on the shift.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exp = x.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

/// `eˣ` within two units in the last place, in a form the compiler vectorises: libm's scalar
/// `expf` was a twentieth of a CPU training step (softmax and SwiGLU, forward and backward).
/// `eˣ = 2ⁿ · eʳ` with `n = round(x / ln 2)` and `|r| ≤ ln 2 / 2`; `eʳ` from its Taylor
/// series to `r⁷`. Inputs are clamped to where `2ⁿ` is a normal f32, so results below
/// `2⁻¹²⁶` come out as about `1e-38`, not subnormal.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::excessive_precision
)]
pub fn exp(x: f32) -> f32 {
    // Adding then subtracting 1.5·2²³ rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_145_751_953_125;
    const LN2_LO: f32 = 1.428_606_765_330_187e-6;
    let x = x.clamp(-87.0, 88.3);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// A sum with eight running sums, vectorised like [`dot`].
pub fn sum(values: &[f32]) -> f32 {
    let mut sums = [0f32; 8];
    let chunks = values.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for i in 0..8 {
            sums[i] += chunk[i];
        }
    }
    sums.iter().sum::<f32>() + tail
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

/// Checks a fused op against its composed form.
#[cfg(test)]
pub(crate) mod check {
    use candle_core::{D, Result, Tensor, Var};

    /// Asserts `fused` and `composed` of `inputs` agree within `tolerance`, and so do the
    /// gradients, for every input, of a random weighting of their outputs.
    pub fn same_values_and_gradients(
        inputs: &[Tensor],
        fused: impl Fn(&[Tensor]) -> Result<Tensor>,
        composed: impl Fn(&[Tensor]) -> Result<Tensor>,
        tolerance: f32,
    ) -> Result<()> {
        let vars = inputs
            .iter()
            .map(Var::from_tensor)
            .collect::<Result<Vec<_>>>()?;
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (ours, expected) = (fused(&tensors)?, composed(&tensors)?);
        assert_eq!(ours.dims(), expected.dims());
        let diff = max_diff(&ours, &expected)?;
        assert!(diff < tolerance, "values differ by {diff}");
        let weights = Tensor::randn(0f32, 1.0, ours.shape(), ours.device())?;
        let grads = |y: &Tensor| (y * &weights)?.sum_all()?.backward();
        let (ours, expected) = (grads(&ours)?, grads(&expected)?);
        for (index, t) in tensors.iter().enumerate() {
            let (o, e) = (ours.get(t), expected.get(t));
            let (Some(o), Some(e)) = (o, e) else {
                panic!("input {index}: a gradient on one side only");
            };
            assert_eq!(o.dims(), e.dims());
            let diff = max_diff(o, e)?;
            assert!(
                diff < tolerance * 10.0,
                "input {index}: gradients differ by {diff}"
            );
        }
        Ok(())
    }

    /// Causal attention probabilities written out independently of the ops: scaled scores
    /// plus a −∞ mask, then softmax.
    pub fn reference_causal_softmax(
        x: &Tensor,
        scale: f64,
        window: Option<usize>,
    ) -> Result<Tensor> {
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
        let mask = Tensor::from_vec(mask, (q, k), x.device())?;
        super::softmax_last_dim(&(x * scale)?.broadcast_add(&mask)?)
    }

    pub fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }
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
        let normed = rms_norm(x.as_tensor(), &weight, 1e-6)?;
        let y = softmax_last_dim(&swiglu(&apply_rotary(&normed, &cos, &sin)?, &normed)?)?;
        let loss = y
            .broadcast_mul(&Tensor::new(&[1f32, 2.0, 3.0, 4.0], &device)?)?
            .sum_all()?;
        let grads = loss.backward()?;
        let grad = grads
            .get(x.as_tensor())
            .expect("a gradient reaches the input");
        // Their values are checked against the composed forms in each op's tests.
        let largest: f32 = grad.abs()?.flatten_all()?.max(0)?.to_scalar()?;
        assert!(largest > 0.0, "gradient {grad}");
        Ok(())
    }

    #[test]
    #[allow(clippy::cast_precision_loss)]
    fn exp_is_within_two_ulps_of_libm_and_sum_adds_everything() {
        for i in -87_000..88_000 {
            let x = i as f32 / 1000.0 + 0.000_37;
            let (ours, libm) = (exp(x), x.exp());
            let ulp = f32::from_bits(libm.to_bits() + 1) - libm;
            assert!(
                (ours - libm).abs() <= 2.0 * ulp,
                "exp({x}) = {ours}, libm {libm}"
            );
        }
        assert!(exp(-1000.0) < 1e-37 && exp(-1000.0) >= 0.0);
        assert!(exp(f32::NAN).is_nan());
        let values: Vec<f32> = (1..=21).map(|v| v as f32).collect();
        assert!((sum(&values) - 231.0).abs() < 1e-6);
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
