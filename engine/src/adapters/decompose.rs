//! OLoRA and PiSSA: inits that take an adapter's start out of the base weight `W` `[out, in]`
//! (PEFT's `olora_init` and `pissa_init`). The trainer computes `B₀`, `A₀` here, trains on the
//! residual `W − scale·B₀·A₀`, and publishes `B·A − B₀·A₀` as a plain LoRA on `W`.
//!
//! - OLoRA: `W = Q·R` (reduced QR), `B₀ = Q[:, :r]`, `A₀ = R[:r]`. Only the first `r`
//!   Householder steps decide those, and only `W`'s first `r` columns decide the steps; they
//!   are taken with LAPACK's sign convention, so `A₀` and `B₀` equal `torch.linalg.qr`'s, not
//!   only their product.
//! - PiSSA: the top `r` singular triplets `(σ, u, v)`, `A₀ = diag(√(σ/scale))·Vᵀ`,
//!   `B₀ = U·diag(√(σ/scale))`. A dense SVD of an 8B model's projections is out of reach on a
//!   CPU, so the triplets come from a subspace iteration (two products with `W` per round, on
//!   `W`'s device, in f64) on `r` + oversampling vectors, each round closed by a Rayleigh–Ritz
//!   step (a one-sided Jacobi SVD of the small `W·Q`), until every kept triplet's residual
//!   `‖Wᵀu − σv‖` is below [`TOLERANCE`]`·σ₁` (or, for a flat top spectrum, where the top r
//!   are barely defined, for 200 rounds, keeping the best round's). Singular vectors are defined up to sign; each
//!   `u` is turned so its largest entry is positive (`B₀·A₀` does not depend on it).

// Linear algebra reads best in its own notation (W, Q, R, m × n).
#![allow(clippy::many_single_char_names)]

use std::collections::BTreeMap;

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

use super::{Adapter, Lora, Site};
use crate::rng::Rng;

/// A PiSSA triplet is kept when `‖Wᵀu − σv‖ ≤ TOLERANCE·σ₁`.
pub const TOLERANCE: f64 = 1e-9;
/// Rounds of the subspace iteration before settling for the best estimate.
const MAX_ROUNDS: usize = 200;

/// An adapter's start taken out of a base weight, and the residual the base becomes.
#[derive(Debug)]
pub struct Decomposed {
    /// `[rank, in]`, f32.
    pub a: Tensor,
    /// `[out, rank]`, f32.
    pub b: Tensor,
    /// `W − scale·B·A`, f32 `[out, in]`.
    pub residual: Tensor,
    /// PiSSA: the largest `‖Wᵀu − σv‖ / σ₁` of the kept triplets (0 for OLoRA).
    pub residual_norm: f64,
    /// PiSSA: the round of the subspace iteration whose estimate was kept (0 for OLoRA).
    pub rounds: usize,
}

/// OLoRA's start for `w` `[out, in]` (any dtype). The reflectors come from `W`'s first `r`
/// columns alone (on the host, `O(out·r²)`), and `R[:r] = Q[:, :r]ᵀ·W` (each `Hⱼ` with
/// `j ≥ i` leaves row i alone, so row i of `R` is `qᵢᵀ·W`): one product on `w`'s device.
pub fn olora(w: &Tensor, rank: usize, scale: f64) -> Result<Decomposed> {
    let (m, n) = w.dims2()?;
    check_rank(rank, m, n)?;
    let w64 = w.to_dtype(DType::F64)?;
    let first = to_host(&w64.narrow(1, 0, rank)?.t()?.contiguous()?)?;
    let qr = Householder::new(first, m, rank, rank);
    let q = qr.q(rank);
    let qt = Tensor::from_vec(q.clone(), (rank, m), w.device())?;
    let mut a = to_host(&qt.matmul(&w64)?)?;
    // R is upper triangular with β on its diagonal, exactly, as `geqrf` leaves it.
    for i in 0..rank {
        a[i * n..i * n + i].fill(0.0);
        a[i * n + i] = qr.cols[i * m + i];
    }
    finish(w, &a, &q, rank, scale, (0.0, 0))
}

/// LAPACK's `dlarfg` for a column `x = [α, x₂]`: the reflector's `v` below its leading 1, `τ`
/// and `β = −sign(α)·‖x‖`, the diagonal entry of `R` (no reflection, `τ = 0`, where `x₂` is
/// zero).
fn reflector(x: &[f64]) -> (Vec<f64>, f64, f64) {
    let alpha = x[0];
    let below = x[1..].iter().map(|v| v * v).sum::<f64>().sqrt();
    if below == 0.0 {
        return (vec![0.0; x.len() - 1], 0.0, alpha);
    }
    let beta = -alpha.hypot(below).copysign(alpha);
    let inverse = 1.0 / (alpha - beta);
    let tail = x[1..].iter().map(|v| v * inverse).collect();
    (tail, (beta - alpha) / beta, beta)
}

/// The first `k` columns of `Q = H₀·H₁·…`, column-major `m × k`, from each reflector's `v`
/// below its leading 1 (reflector i acting on rows i..) and `τ`.
fn explicit_q(m: usize, k: usize, reflectors: &[(&[f64], f64)]) -> Vec<f64> {
    let mut q = vec![0f64; m * k];
    q.par_chunks_mut(m).enumerate().for_each(|(j, col)| {
        col[j] = 1.0;
        for (i, &(tail, tau)) in reflectors.iter().enumerate().rev() {
            reflect(&mut col[i..], tail, tau);
        }
    });
    q
}

/// PiSSA's start for `w` `[out, in]` (any dtype; the products run on `w`'s device).
pub fn pissa(w: &Tensor, rank: usize, scale: f64) -> Result<Decomposed> {
    let (m, n) = w.dims2()?;
    check_rank(rank, m, n)?;
    let svd = top_singular(w, rank)?;
    let mut a = vec![0f64; rank * n];
    let mut b_cols = vec![0f64; m * rank];
    for i in 0..rank {
        let root = (svd.sigma[i] / scale).max(0.0).sqrt();
        for j in 0..n {
            a[i * n + j] = root * svd.v[i * n + j];
        }
        for j in 0..m {
            b_cols[i * m + j] = root * svd.u[i * m + j];
        }
    }
    finish(w, &a, &b_cols, rank, scale, (svd.residual, svd.rounds))
}

/// A trained OLoRA / PiSSA adapter as a plain LoRA on the original base, as PEFT's
/// `save_pretrained(path_initial_model_for_weight_conversion=…)` converts one: rank `2r`,
/// `A' = [A; A₀]`, `B' = [B, −B₀]`, so `B'·A' = B·A − B₀·A₀`, with alpha doubled (×√2 with
/// rsLoRA) to keep each pair's scale, in `rank_pattern` / `alpha_pattern` too, and
/// `init_lora_weights: true`. PEFT, vLLM and Graft's server load it on the unmodified base.
pub fn on_original_base(
    trained: &Adapter,
    initial: &BTreeMap<(usize, Site), Lora>,
) -> Result<Adapter> {
    let mut config = trained.config.clone();
    let alpha_factor = if config.use_rslora {
        std::f64::consts::SQRT_2
    } else {
        2.0
    };
    config.r *= 2;
    config.lora_alpha *= alpha_factor;
    config.rank_pattern = config.rank_pattern.map(|r| r * 2);
    config.alpha_pattern = config.alpha_pattern.map(|a| a * alpha_factor);
    config.init_lora_weights = serde_json::Value::Bool(true);
    let weights = trained
        .weights
        .iter()
        .map(|(&(layer, site), lora)| {
            let Some(start) = initial.get(&(layer, site)) else {
                candle_core::bail!("no initial adapter for {} of layer {layer}", site.name());
            };
            let device = lora.a.device();
            let a0 = start.a.to_device(device)?.to_dtype(lora.a.dtype())?;
            let b0 = start.b.to_device(device)?.to_dtype(lora.b.dtype())?;
            Ok((
                (layer, site),
                Lora {
                    a: Tensor::cat(&[&lora.a, &a0], 0)?,
                    b: Tensor::cat(&[&lora.b, &b0.neg()?], 1)?,
                    scale: lora.scale,
                    // DoRA is refused with a rewritten base.
                    magnitude: None,
                },
            ))
        })
        .collect::<Result<_>>()?;
    Ok(Adapter { config, weights })
}

fn check_rank(rank: usize, m: usize, n: usize) -> Result<()> {
    if rank == 0 || rank > m.min(n) {
        candle_core::bail!("rank {rank} does not fit a [{m}, {n}] weight");
    }
    Ok(())
}

/// `A₀` (row-major `[r, in]`), `B₀` (column-major `[out, r]`) and the residual, on `w`'s
/// device in f32, the residual computed as PEFT computes it (in f32).
fn finish(
    w: &Tensor,
    a: &[f64],
    b_cols: &[f64],
    rank: usize,
    scale: f64,
    (residual_norm, rounds): (f64, usize),
) -> Result<Decomposed> {
    let (m, n) = w.dims2()?;
    let device = w.device();
    #[allow(clippy::cast_possible_truncation)]
    let to_f32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    let a = Tensor::from_vec(to_f32(a), (rank, n), device)?;
    let b = Tensor::from_vec(to_f32(b_cols), (rank, m), device)?
        .t()?
        .contiguous()?;
    let residual = (w.to_dtype(DType::F32)? - b.matmul(&a)?.affine(scale, 0.0)?)?;
    Ok(Decomposed {
        a,
        b,
        residual,
        residual_norm,
        rounds,
    })
}

/// A Householder QR of an `m × n` column-major matrix on the host (`steps` columns), as
/// LAPACK's `geqrf` takes it: `cols` holds `R` on and above the diagonal and each reflector's
/// `v` (with an implicit leading 1) below it. OLoRA's reflectors, and PiSSA's orthonormal
/// blocks.
struct Householder {
    cols: Vec<f64>,
    m: usize,
    tau: Vec<f64>,
}

impl Householder {
    fn new(mut cols: Vec<f64>, m: usize, n: usize, steps: usize) -> Self {
        let mut tau = vec![0f64; steps];
        for i in 0..steps {
            let (head, rest) = cols.split_at_mut((i + 1) * m);
            let x = &mut head[i * m + i..];
            let (tail, t, beta) = reflector(x);
            if t == 0.0 {
                continue;
            }
            tau[i] = t;
            x[1..].copy_from_slice(&tail);
            x[0] = beta;
            let v = &x[1..];
            rest.par_chunks_mut(m)
                .take(n - i - 1)
                .for_each(|col| reflect(&mut col[i..], v, t));
        }
        Self { cols, m, tau }
    }

    /// The first `k` columns of `Q`, column-major `m × k`.
    fn q(&self, k: usize) -> Vec<f64> {
        let m = self.m;
        let reflectors: Vec<(&[f64], f64)> = self
            .tau
            .iter()
            .enumerate()
            .map(|(i, &t)| (&self.cols[i * m + i + 1..(i + 1) * m], t))
            .collect();
        explicit_q(m, k, &reflectors)
    }
}

/// `c ← (I − τ·v·vᵀ)·c` with `v = [1, tail]`.
fn reflect(c: &mut [f64], tail: &[f64], tau: f64) {
    if tau == 0.0 {
        return;
    }
    let dot = c[0] + c[1..].iter().zip(tail).map(|(x, v)| x * v).sum::<f64>();
    let f = tau * dot;
    c[0] -= f;
    c[1..].iter_mut().zip(tail).for_each(|(x, v)| *x -= f * v);
}

/// An orthonormal basis of the `k` columns of a column-major `m × k` block.
fn orthonormal(cols: Vec<f64>, m: usize, k: usize) -> Vec<f64> {
    Householder::new(cols, m, k, k).q(k)
}

/// The top singular triplets, each vector contiguous: `u` `rank × m`, `v` `rank × n`.
struct Singular {
    sigma: Vec<f64>,
    u: Vec<f64>,
    v: Vec<f64>,
    residual: f64,
    rounds: usize,
}

fn top_singular(w: &Tensor, rank: usize) -> Result<Singular> {
    let (m, n) = w.dims2()?;
    let device = w.device();
    let w = w.to_dtype(DType::F64)?;
    let k = (rank + rank.max(16)).min(m.min(n));
    let mut rng = Rng::seed(0x5049_5353_4100);
    let start: Vec<f64> = (0..n * k).map(|_| f64::from(rng.normal(1.0))).collect();
    let mut q = orthonormal(start, n, k);
    let mut best: Option<Singular> = None;
    for round in 1..=MAX_ROUNDS {
        // C = W·Q, as Cᵀ = Qᵀ·Wᵀ: its rows are C's columns.
        let qt = Tensor::from_vec(q, (k, n), device)?;
        let c = to_host(&qt.matmul(&w.t()?)?)?;
        let (sigma, mut u, rotation) = jacobi_svd(c, m, k);
        // The right vectors: V = Q·rotation; as rows, Vᵀ = rotationᵀ·Qᵀ.
        let rt = Tensor::from_vec(rotation, (k, k), device)?;
        let mut v = to_host(&rt.matmul(&qt)?)?;
        // Wᵀ·U, as rows Uᵀ·W: the residuals, and the next round's block.
        let ut = Tensor::from_vec(u.clone(), (k, m), device)?;
        let p = to_host(&ut.matmul(&w)?)?;
        let top = sigma[0].max(f64::MIN_POSITIVE);
        let residual = (0..rank)
            .map(|i| {
                let (p, v) = (&p[i * n..(i + 1) * n], &v[i * n..(i + 1) * n]);
                p.iter()
                    .zip(v)
                    .map(|(p, v)| (p - sigma[i] * v).powi(2))
                    .sum::<f64>()
                    .sqrt()
                    / top
            })
            .fold(0f64, f64::max);
        if best.as_ref().is_none_or(|b| residual < b.residual) {
            // Each u's largest entry positive, so the start does not depend on the iteration.
            for i in 0..rank {
                let row = &u[i * m..(i + 1) * m];
                let largest = row
                    .iter()
                    .copied()
                    .fold(0f64, |a, x| if x.abs() > a.abs() { x } else { a });
                if largest < 0.0 {
                    u[i * m..(i + 1) * m].iter_mut().for_each(|x| *x = -*x);
                    v[i * n..(i + 1) * n].iter_mut().for_each(|x| *x = -*x);
                }
            }
            best = Some(Singular {
                sigma: sigma[..rank].to_vec(),
                u: u[..rank * m].to_vec(),
                v: v[..rank * n].to_vec(),
                residual,
                rounds: round,
            });
        }
        if residual <= TOLERANCE {
            break;
        }
        q = orthonormal(p, n, k);
    }
    best.ok_or_else(|| candle_core::Error::Msg("no singular vectors".to_owned()))
}

fn to_host(t: &Tensor) -> Result<Vec<f64>> {
    t.flatten_all()?
        .to_device(&candle_core::Device::Cpu)?
        .to_vec1::<f64>()
}

/// A one-sided (Hestenes) Jacobi SVD of a column-major `m × k` matrix `C`: the singular
/// values in descending order, the left vectors (column-major `m × k`) and the rotation
/// `R` (`k × k`, row i the coefficients of vector i) with `C·Rᵀ = U·Σ`.
fn jacobi_svd(mut c: Vec<f64>, m: usize, k: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    // Rows of `rotation` follow the columns of `c`.
    let mut rotation = vec![0f64; k * k];
    for i in 0..k {
        rotation[i * k + i] = 1.0;
    }
    let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>();
    for _sweep in 0..60 {
        let mut rotated = false;
        for p in 0..k {
            for r in p + 1..k {
                let (left, right) = c.split_at_mut(r * m);
                let (cp, cr) = (&mut left[p * m..(p + 1) * m], &mut right[..m]);
                let (alpha, beta, gamma) = (dot(cp, cp), dot(cr, cr), dot(cp, cr));
                if gamma.abs() <= 1e-15 * (alpha * beta).sqrt() || gamma == 0.0 {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let cos = 1.0 / (1.0 + t * t).sqrt();
                let sin = cos * t;
                let turn = |x: &mut [f64], y: &mut [f64]| {
                    for (a, b) in x.iter_mut().zip(y.iter_mut()) {
                        let (xa, yb) = (*a, *b);
                        *a = cos * xa - sin * yb;
                        *b = sin * xa + cos * yb;
                    }
                };
                turn(cp, cr);
                let (top, bottom) = rotation.split_at_mut(r * k);
                turn(&mut top[p * k..(p + 1) * k], &mut bottom[..k]);
            }
        }
        if !rotated {
            break;
        }
    }
    let norms: Vec<f64> = c.chunks(m).map(|col| dot(col, col).sqrt()).collect();
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&x, &y| norms[y].total_cmp(&norms[x]));
    let mut sigma = Vec::with_capacity(k);
    let mut u = Vec::with_capacity(m * k);
    let mut sorted_rotation = Vec::with_capacity(k * k);
    for &j in &order {
        let s = norms[j];
        sigma.push(s);
        let inverse = if s > 0.0 { 1.0 / s } else { 0.0 };
        u.extend(c[j * m..(j + 1) * m].iter().map(|x| x * inverse));
        sorted_rotation.extend_from_slice(&rotation[j * k..(j + 1) * k]);
    }
    (sigma, u, sorted_rotation)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn matrix(m: usize, n: usize, seed: u64) -> Result<Tensor> {
        let mut rng = Rng::seed(seed);
        let values: Vec<f32> = (0..m * n).map(|_| rng.normal(1.0)).collect();
        Tensor::from_vec(values, (m, n), &Device::Cpu)
    }

    fn max_abs(t: &Tensor) -> Result<f32> {
        t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// `scale·B·A + residual = W`, `B`'s columns orthonormal and `A` upper triangular with
    /// LAPACK's signs (`R`'s diagonal opposite in sign to the column's leading entry).
    #[test]
    fn olora_splits_w_into_an_orthonormal_b_and_a_triangular_a() -> Result<()> {
        for (m, n) in [(12, 7), (7, 12), (9, 9)] {
            let w = matrix(m, n, 3)?;
            let d = olora(&w, 4, 2.0)?;
            let rebuilt = (d.b.matmul(&d.a)?.affine(2.0, 0.0)? + &d.residual)?;
            assert!(max_abs(&(rebuilt - &w)?)? < 1e-5);
            let gram = d.b.t()?.matmul(&d.b)?;
            let eye = Tensor::eye(4, DType::F32, &Device::Cpu)?;
            assert!(max_abs(&(gram - eye)?)? < 1e-5, "Q's columns orthonormal");
            let a = d.a.to_vec2::<f32>()?;
            assert!(
                (0..4).all(|i| (0..i).all(|j| a[i][j] == 0.0)),
                "R is upper triangular"
            );
            let w00 = w.get(0)?.get(0)?.to_scalar::<f32>()?;
            assert!(a[0][0] * w00 < 0.0, "dlarfg: β = −sign(α)·‖x‖");
        }
        Ok(())
    }

    /// PiSSA's `scale·B·A` is the best rank-r approximation: what is left has no component
    /// along the kept singular vectors, and `A`'s rows are orthogonal.
    #[test]
    fn pissa_takes_the_top_singular_triplets_out_of_w() -> Result<()> {
        for (m, n) in [(40, 24), (24, 40)] {
            let w = matrix(m, n, 5)?.to_dtype(DType::F64)?;
            let d = pissa(&w, 3, 0.5)?;
            assert!(
                d.residual_norm <= TOLERANCE,
                "converged: {}",
                d.residual_norm
            );
            let residual = d.residual.to_dtype(DType::F64)?;
            // The residual's largest singular value is σ₄ < σ₃; its products with the kept
            // right vectors are zero.
            let along = residual.matmul(&d.a.to_dtype(DType::F64)?.t()?)?;
            assert!(max_abs(&along.to_dtype(DType::F32)?)? < 1e-4);
            let aat = d.a.matmul(&d.a.t()?)?.to_vec2::<f32>()?;
            assert!(aat[0][1].abs() < 1e-4 && aat[1][2].abs() < 1e-4);
            // σᵢ/scale on the diagonal, descending.
            assert!(aat[0][0] >= aat[1][1] && aat[1][1] >= aat[2][2]);
        }
        Ok(())
    }
}
