//! Scalar kernels of the fused CPU ops, written so the compiler vectorises them, and
//! [`vectorized`], which lets it use the widest vectors the CPU has.

/// Runs `f` compiled for the widest vector instructions the CPU has, chosen at run time
/// (AVX-512, else AVX2 with FMA, on x86): a portable build targets SSE2, so the loops of the
/// fused ops (softmax, SwiGLU, RMSNorm) otherwise vectorise four lanes wide, and on a small
/// model they are a fifth of a CPU training step.
///
/// `f` must be an `#[inline(always)]` closure, and the functions it calls in its loops
/// `#[inline(always)]` too: only code inlined into the dispatched function gets its
/// instructions. Results are the same bit for bit at every width, since Rust neither fuses
/// multiplies into adds nor reorders float sums on its own.
#[inline(always)]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
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
#[inline(always)]
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
#[inline(always)]
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

/// A stored value the inner loops widen to f32: f32 itself, or bf16 (serving adapters kept in
/// half the bytes), whose bits are an f32's top half.
pub trait Widen: Copy + Send + Sync {
    fn widen(self) -> f32;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for half::bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
}

/// `σ(x) = 1 / (1 + e⁻ˣ)`, through [`exp`].
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// A dot product with eight running sums, so the compiler vectorises it without being asked
/// to reassociate floats.
#[inline(always)]
pub fn dot<T: Widen>(a: &[T], b: &[f32]) -> f32 {
    let mut sums = [0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x.widen() * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for i in 0..8 {
            sums[i] += x[i].widen() * y[i];
        }
    }
    sums.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
