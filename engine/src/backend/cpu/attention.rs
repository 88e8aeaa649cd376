//! Causal self-attention of a training step on the CPU in f32, as one op from the projections'
//! outputs to the attention output: rotary, grouped-query heads, scaled and masked softmax,
//! and the weighted values.
//!
//! Composed from candle's ops the same is a dozen graph nodes — head transposes, rotations,
//! repeated key/value heads, two batched products, the softmax — each with activation-sized
//! copies and gradient buffers. Here the forward keeps nothing but its inputs, and the backward
//! recomputes each head's probabilities (as FlashAttention does) instead of holding
//! `[batch, heads, seq, seq]` of them per layer.
//!
//! Packed rows (several examples per row, [`Documents`]) are rotated with per-row tables and
//! each query's keys start at its example's first token, so neither pass computes anything
//! across examples.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::{
    gemm::{Mat, f32_values, matmul_into, with_f32s},
    math::{dot, vectorized},
    rotary::{rotate, rotate_back},
    softmax::{softmax_in_place, visible},
};
use crate::backend::{Documents, Heads};

/// Attention output `[batch, seq, heads·head_dim]` from the projections `q`
/// `[batch, seq, heads·head_dim]`, `k` and `v` `[batch, seq, kv_heads·head_dim]` (f32 on the
/// CPU), rotated with `cos` and `sin` `[seq, head_dim]` — or, for packed rows with their
/// `documents`, `[batch·seq, head_dim]`.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    documents: Option<&Documents>,
    heads: Heads,
) -> Result<Tensor> {
    let tables = |t: &Tensor| t.detach().contiguous();
    #[allow(clippy::cast_possible_truncation)]
    let op = Attention {
        cos: tables(cos)?,
        sin: tables(sin)?,
        documents: documents.cloned(),
        heads,
        scale: heads.scale as f32,
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

struct Attention {
    cos: Tensor,
    sin: Tensor,
    documents: Option<Documents>,
    heads: Heads,
    scale: f32,
}

/// `[batch, seq, n·dim]` as seen per head.
#[derive(Clone, Copy)]
struct Layout3 {
    batch: usize,
    seq: usize,
    dim: usize,
    /// The rotated dimensions at the start of each head (the tables' width).
    rotary: usize,
    /// The tables have a row per token of each batch row (packed rows), not per position.
    per_row: bool,
}

impl Layout3 {
    /// `[batch, seq, n·dim]` rows → head-major `[batch, n, seq, dim]`, each row rotated for
    /// its position when `rotation` gives the tables.
    fn split(self, x: &[f32], n: usize, rotation: Option<(&[f32], &[f32])>) -> Vec<f32> {
        self.reorder(x, n, true, rotation)
    }

    /// The inverse of [`Self::split`] for gradients: head-major → `[batch, seq, n·dim]`, each
    /// row rotated back when `rotation` gives the tables.
    fn merge(self, x: &[f32], n: usize, rotation: Option<(&[f32], &[f32])>) -> Vec<f32> {
        self.reorder(x, n, false, rotation)
    }

    /// Moves each `dim` row between token-major and head-major order (`to_heads` says which
    /// way), through [`rotate`] (to heads) or [`rotate_back`] with its position's tables
    /// when `rotation` gives them.
    fn reorder(
        self,
        x: &[f32],
        n: usize,
        to_heads: bool,
        rotation: Option<(&[f32], &[f32])>,
    ) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        vectorized(
            #[inline(always)]
            || self.reorder_into(x, n, to_heads, rotation, &mut out),
        );
        out
    }

    /// [`Self::reorder`] into `out`.
    #[inline(always)]
    fn reorder_into(
        self,
        x: &[f32],
        n: usize,
        to_heads: bool,
        rotation: Option<(&[f32], &[f32])>,
        out: &mut [f32],
    ) {
        let Self {
            batch,
            seq,
            dim,
            rotary,
            per_row,
        } = self;
        for b in 0..batch {
            for i in 0..seq {
                for h in 0..n {
                    let token_major = ((b * seq + i) * n + h) * dim;
                    let head_major = ((b * n + h) * seq + i) * dim;
                    let (from, to) = if to_heads {
                        (token_major, head_major)
                    } else {
                        (head_major, token_major)
                    };
                    let (from, to) = (&x[from..][..dim], &mut out[to..][..dim]);
                    match rotation {
                        Some((cos, sin)) => {
                            let row = if per_row { b * seq + i } else { i };
                            let at = row * rotary..(row + 1) * rotary;
                            let (cos, sin) = (&cos[at.clone()], &sin[at]);
                            if to_heads {
                                rotate(from, cos, sin, to);
                            } else {
                                rotate_back(from, cos, sin, to);
                            }
                        }
                        None => to.copy_from_slice(from),
                    }
                }
            }
        }
    }

    /// Rows `rows` of head `h` of batch row `b`, in a head-major buffer of `n` heads.
    fn rows(self, x: &[f32], n: usize, (b, h): (usize, usize), rows: Range<usize>) -> Mat<'_> {
        let start = ((b * n + h) * self.seq + rows.start) * self.dim;
        Mat::new(&x[start..][..rows.len() * self.dim], rows.len(), self.dim)
    }

    /// [`Self::rows`] to write.
    fn rows_mut<'a>(
        self,
        x: &'a mut [f32],
        n: usize,
        (b, h): (usize, usize),
        rows: &Range<usize>,
    ) -> &'a mut [f32] {
        let start = ((b * n + h) * self.seq + rows.start) * self.dim;
        &mut x[start..][..rows.len() * self.dim]
    }
}

/// Queries per block. A block's scores cover only the keys up to its last query, so the
/// products skip most of the masked upper triangle: at 128 tokens, 5/8 of the full
/// products' work, and nearer half of it as sequences grow.
const BLOCK: usize = 32;

/// A block of queries, `rows`, and the keys any of them may see, `keys`.
struct Block {
    rows: Range<usize>,
    keys: Range<usize>,
}

const NAME: &str = "causal-attention";

impl Attention {
    /// `[batch, seq, dim]` of `q`, after checking `k` and `v` fit it.
    fn geometry(&self, q: &Layout, k: &Layout, v: &Layout) -> Result<Layout3> {
        let Heads {
            heads,
            kv_heads,
            head_dim,
            ..
        } = self.heads;
        let (batch, seq, width) = q.shape().dims3()?;
        let kv = (batch, seq, kv_heads * head_dim);
        let tables = match &self.documents {
            Some(documents) if documents.starts.len() == batch => batch * seq,
            Some(_) => usize::MAX,
            None => seq,
        };
        if width != heads * head_dim
            || k.shape().dims3()? != kv
            || v.shape().dims3()? != kv
            || heads % kv_heads != 0
            || self.cos.dim(0)? != tables
            || self.cos.dim(1)? > head_dim
            || self.cos.dim(1)? % 2 != 0
        {
            candle_core::bail!(
                "{NAME}: q {:?}, k {:?}, v {:?} and tables {:?} do not fit {heads} heads of \
                 {head_dim} over {kv_heads} key/value heads",
                q.dims(),
                k.dims(),
                v.dims(),
                self.cos.dims()
            );
        }
        Ok(Layout3 {
            batch,
            seq,
            dim: head_dim,
            rotary: self.cos.dim(1)?,
            per_row: self.documents.is_some(),
        })
    }

    /// The first key query `q` of batch row `b` may see: within the window, and within its
    /// example when the row is packed.
    fn first_key(&self, b: usize, q: usize, seq: usize) -> usize {
        let first = visible(self.heads.window, q, seq, seq).0;
        self.documents
            .as_ref()
            .map_or(first, |d| first.max(d.start(b, q)))
    }

    /// The query blocks of batch row `b`, a sequence of `seq`. The first key of a block is its
    /// first query's: later queries' never come before it.
    fn blocks(&self, b: usize, seq: usize) -> impl Iterator<Item = Block> + '_ {
        (0..seq).step_by(BLOCK).map(move |start| {
            let end = (start + BLOCK).min(seq);
            Block {
                rows: start..end,
                keys: self.first_key(b, start, seq)..end,
            }
        })
    }

    /// A block's probabilities `[rows, keys]` into `probs` from its queries `q` and keys `k`
    /// of batch row `b`: the scaled scores, each row's softmax over the keys it may see, 0
    /// elsewhere.
    fn probabilities(
        &self,
        (q, k): (Mat<'_>, Mat<'_>),
        (b, block): (usize, &Block),
        seq: usize,
        probs: &mut [f32],
    ) {
        self.scores(q, k, probs);
        let offset = block.keys.start;
        vectorized(
            #[inline(always)]
            || {
                for (i, row) in probs.chunks_exact_mut(block.keys.len()).enumerate() {
                    let query = block.rows.start + i;
                    let first = self.first_key(b, query, seq);
                    let last = visible(self.heads.window, query, seq, seq).1;
                    let (first, last) = (first - offset, last - offset);
                    row[..first].fill(0.0);
                    row[last + 1..].fill(0.0);
                    softmax_in_place(&mut row[first..=last]);
                }
            },
        );
    }

    /// The scaled (and soft-capped) scores of queries `q` over keys `k` into `scores`.
    fn scores(&self, q: Mat<'_>, k: Mat<'_>, scores: &mut [f32]) {
        matmul_into(scores, q, k.t(), self.scale, false);
        if let Some(cap) = self.heads.softcap {
            #[allow(clippy::cast_possible_truncation)]
            let cap = cap as f32;
            for s in scores.iter_mut() {
                *s = cap * (*s / cap).tanh();
            }
        }
    }

    /// Runs `f` with the head-major rotated queries and keys and the head-major values.
    fn with_heads<R>(
        &self,
        shape: Layout3,
        [q, k, v]: [&[f32]; 3],
        f: impl FnOnce(&[f32], &[f32], &[f32], (&[f32], &[f32])) -> Result<R>,
    ) -> Result<R> {
        with_f32s([&self.cos, &self.sin], NAME, |[cos, sin]| {
            let Heads {
                heads, kv_heads, ..
            } = self.heads;
            let qh = shape.split(q, heads, Some((cos, sin)));
            let kh = shape.split(k, kv_heads, Some((cos, sin)));
            let vh = shape.split(v, kv_heads, None);
            f(&qh, &kh, &vh, (cos, sin))
        })
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = self.geometry(q_layout, k_layout, v_layout)?;
        let inputs = [
            f32_values(q, q_layout, NAME)?,
            f32_values(k, k_layout, NAME)?,
            f32_values(v, v_layout, NAME)?,
        ];
        let Heads {
            heads, kv_heads, ..
        } = self.heads;
        let seq = shape.seq;
        let out = self.with_heads(shape, inputs, |qh, kh, vh, _| {
            let mut out_heads = vec![0f32; qh.len()];
            let mut probs = vec![0f32; BLOCK * seq];
            for b in 0..shape.batch {
                for h in 0..heads {
                    let g = h / (heads / kv_heads);
                    for block in self.blocks(b, seq) {
                        let (rows, keys) = (&block.rows, &block.keys);
                        let probs = &mut probs[..rows.len() * keys.len()];
                        self.probabilities(
                            (
                                shape.rows(qh, heads, (b, h), rows.clone()),
                                shape.rows(kh, kv_heads, (b, g), keys.clone()),
                            ),
                            (b, &block),
                            seq,
                            probs,
                        );
                        matmul_into(
                            shape.rows_mut(&mut out_heads, heads, (b, h), rows),
                            Mat::new(probs, rows.len(), keys.len()),
                            shape.rows(vh, kv_heads, (b, g), keys.clone()),
                            1.0,
                            false,
                        );
                    }
                }
            }
            Ok(shape.merge(&out_heads, heads, None))
        })?;
        Ok((CpuStorage::F32(out), q_layout.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let shape = self.geometry(q.layout(), k.layout(), v.layout())?;
        let (dq, dk, dv) = with_f32s([q, k, v, grad], NAME, |[qv, kv, vv, g]| {
            self.backward(shape, [qv, kv, vv], g)
        })?;
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), q.device())?),
            Some(Tensor::from_vec(dk, k.shape(), k.device())?),
            Some(Tensor::from_vec(dv, v.shape(), v.device())?),
        ))
    }
}

impl Attention {
    /// The gradients of `q`, `k` and `v` for the output's gradient `grad`, head by head:
    /// `dV += Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P ⊙ (dP − Σ dP⊙P)` (times `1 − tanh²` of the
    /// capped scores under soft-capping), `dQ = scale·dS·K`, `dK += scale·dSᵀ·Q`, then the
    /// rotations undone.
    fn backward(
        &self,
        shape: Layout3,
        inputs: [&[f32]; 3],
        grad: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let Heads {
            heads, kv_heads, ..
        } = self.heads;
        let seq = shape.seq;
        self.with_heads(shape, inputs, |qh, kh, vh, tables| {
            let grad_heads = shape.split(grad, heads, None);
            let (mut dqh, mut dkh, mut dvh) = (
                vec![0f32; qh.len()],
                vec![0f32; kh.len()],
                vec![0f32; vh.len()],
            );
            let (mut probs, mut dp) = (vec![0f32; BLOCK * seq], vec![0f32; BLOCK * seq]);
            let mut capped = if self.heads.softcap.is_some() {
                vec![0f32; BLOCK * seq]
            } else {
                Vec::new()
            };
            for b in 0..shape.batch {
                for h in 0..heads {
                    let g = h / (heads / kv_heads);
                    for block in self.blocks(b, seq) {
                        let (rows, keys) = (&block.rows, &block.keys);
                        let (qm, km) = (
                            shape.rows(qh, heads, (b, h), rows.clone()),
                            shape.rows(kh, kv_heads, (b, g), keys.clone()),
                        );
                        let grad_out = shape.rows(&grad_heads, heads, (b, h), rows.clone());
                        let size = rows.len() * keys.len();
                        let probs = &mut probs[..size];
                        self.probabilities((qm, km), (b, &block), seq, probs);
                        let p = Mat::new(probs, rows.len(), keys.len());
                        let dv = shape.rows_mut(&mut dvh, kv_heads, (b, g), keys);
                        matmul_into(dv, p.t(), grad_out, 1.0, true);
                        let dp = &mut dp[..size];
                        let vm = shape.rows(vh, kv_heads, (b, g), keys.clone());
                        matmul_into(dp, grad_out, vm.t(), 1.0, false);
                        vectorized(
                            #[inline(always)]
                            || {
                                for (dp, p) in dp
                                    .chunks_exact_mut(keys.len())
                                    .zip(probs.chunks_exact(keys.len()))
                                {
                                    let dot = dot(dp, p);
                                    for (d, &p) in dp.iter_mut().zip(p) {
                                        *d = p * (*d - dot);
                                    }
                                }
                            },
                        );
                        if let Some(cap) = self.heads.softcap {
                            #[allow(clippy::cast_possible_truncation)]
                            let cap = cap as f32;
                            let capped = &mut capped[..size];
                            self.scores(qm, km, capped);
                            for (d, &c) in dp.iter_mut().zip(capped.iter()) {
                                let t = c / cap;
                                *d *= 1.0 - t * t;
                            }
                        }
                        let ds = Mat::new(dp, rows.len(), keys.len());
                        let dq = shape.rows_mut(&mut dqh, heads, (b, h), rows);
                        matmul_into(dq, ds, km, self.scale, false);
                        let dk = shape.rows_mut(&mut dkh, kv_heads, (b, g), keys);
                        matmul_into(dk, ds.t(), qm, self.scale, true);
                    }
                }
            }
            Ok((
                shape.merge(&dqh, heads, Some(tables)),
                shape.merge(&dkh, kv_heads, Some(tables)),
                shape.merge(&dvh, kv_heads, None),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::backend::check::{reference_attention, same_values_and_gradients};

    #[test]
    fn the_fused_attention_equals_the_composed_one_with_the_same_gradients() -> Result<()> {
        let device = Device::Cpu;
        // head_dim 8: the scale below is 1/√8. 70 tokens: three query blocks, the last
        // partial.
        let (batch, seq, head_dim) = (2, 70, 8);
        for (heads, kv_heads, window) in [(4, 2, None), (2, 2, Some(40)), (4, 1, Some(3))] {
            let geometry = Heads {
                heads,
                kv_heads,
                head_dim,
                scale: 1.0 / 8f64.sqrt(),
                window,
                softcap: None,
            };
            let angles = Tensor::randn(0f32, 2.0, (seq, head_dim), &device)?;
            let (cos, sin) = (angles.cos()?, angles.sin()?);
            let inputs = [
                Tensor::randn(0f32, 1.0, (batch, seq, heads * head_dim), &device)?,
                Tensor::randn(0f32, 1.0, (batch, seq, kv_heads * head_dim), &device)?,
                Tensor::randn(0f32, 1.0, (batch, seq, kv_heads * head_dim), &device)?,
            ];
            same_values_and_gradients(
                &inputs,
                |t| causal_attention(&t[0], &t[1], &t[2], (&cos, &sin), None, geometry),
                |t| reference_attention([&t[0], &t[1], &t[2]], &cos, &sin, geometry),
                1e-5,
            )?;
        }
        Ok(())
    }
}
