//! Causal self-attention from candle's ops, in blocks of queries, for a GPU (and, with the
//! same code, the CPU in tests): training, evaluation and serving all go through
//! [`forward_blocks`].
//!
//! A block of queries is multiplied with the keys it may see at once, so each block's
//! softmax is exact and no running rescale is needed; the block's length is chosen so its f32
//! scores stay within [`SCORES_BUDGET`]. The scores of a block live only while it is computed:
//! no `[batch, heads, seq, seq]` tensor exists, not even for one layer. Grouped-query heads
//! are never repeated: the queries of a key/value head's group are stacked as rows of one
//! product with that head's keys. Masks are a comparison of position ids on the device; for
//! packed rows (several examples per row) also of each token's example, so a query sees only
//! its own example's keys, and the rotary tables are per row.
//!
//! Training attaches [`Attention`], whose backward recomputes each block's probabilities from
//! the log-sum-exp the forward kept (as FlashAttention-2 does), in two passes: one over
//! query blocks for `dQ`, one over key blocks for `dK` and `dV`, so no gradient is
//! accumulated block by block into a full-size buffer.

use std::{ops::Range, sync::Mutex};

use candle_core::{
    CpuStorage, CustomOp3, D, DType, Layout, Result, Shape, Storage, Tensor,
    backend::{BackendDevice, BackendStorage},
};

use crate::backend::{
    CachedRows, Heads, Rotary,
    rotation::{rotate, rotate_back},
};

/// Bytes of f32 scores one block may hold.
pub const SCORES_BUDGET: usize = 128 << 20;
/// Added to the scores of keys a query may not see: far below any real score, yet finite, so
/// no NaN can come from `−∞ − (−∞)`.
const HIDDEN: f64 = 1e30;

/// Training's attention; see [`crate::backend::Backend::attention`].
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rotary: &Rotary,
    heads: Heads,
) -> Result<Tensor> {
    let (batch, seq, _) = q.dims3()?;
    let block = query_block(batch, heads.heads, seq, seq);
    attention_in_blocks(q, k, v, rotary, heads, block)
}

/// [`attention`] with blocks of `block` queries (and keys, in the backward).
pub(crate) fn attention_in_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rotary: &Rotary,
    heads: Heads,
    block: usize,
) -> Result<Tensor> {
    let (batch, seq, _) = q.dims3()?;
    let split = |t: &Tensor, n: usize| t.detach().reshape((batch, seq, n, heads.head_dim));
    // `[.., seq, 1, rotary]`: one table row per position, shared by the heads.
    let per_position = |t: &Tensor| match rotary.documents {
        Some(_) => t.reshape((batch, seq, 1, t.dim(1)?)),
        None => t.unsqueeze(1),
    };
    let (cos, sin) = (per_position(&rotary.cos)?, per_position(&rotary.sin)?);
    let op = Attention {
        qh: query_heads(&rotate(&split(q, heads.heads)?, &cos, &sin)?, heads)?,
        kh: rotate(&split(k, heads.kv_heads)?, &cos, &sin)?
            .transpose(1, 2)?
            .contiguous()?,
        vh: split(v, heads.kv_heads)?.transpose(1, 2)?.contiguous()?,
        rotary: rotary.clone(),
        heads,
        block: block.max(1),
        lse: Mutex::new(None),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// Serving's attention; see [`crate::backend::Backend::cached_attention`].
pub fn cached_attention(
    layer: usize,
    [q, k, v]: [&Tensor; 3],
    rotary: &Rotary,
    heads: Heads,
    sequences: &mut [CachedRows<'_>],
) -> Result<Tensor> {
    let Heads {
        heads: n_heads,
        kv_heads,
        head_dim: dim,
        ..
    } = heads;
    // Every packed row rotated for its own position at once, then split by sequence.
    let rows = q.dim(0)?;
    let (cos, sin) = (rotary.cos.unsqueeze(1)?, rotary.sin.unsqueeze(1)?);
    let q = rotate(&q.reshape((rows, n_heads, dim))?, &cos, &sin)?;
    let k = rotate(&k.reshape((rows, kv_heads, dim))?, &cos, &sin)?;
    let v = v.reshape((rows, kv_heads, dim))?;
    let mut outputs = Vec::with_capacity(sequences.len());
    for sequence in sequences.iter_mut() {
        let rows = &sequence.rows;
        let new = |t: &Tensor| t.narrow(0, rows.start, rows.len());
        let qh = query_heads(&new(&q)?.unsqueeze(0)?, heads)?;
        let kh = new(&k)?.transpose(0, 1)?.contiguous()?;
        let vh = new(&v)?.transpose(0, 1)?.contiguous()?;
        let offset = sequence.cache.len();
        append_tail(&mut sequence.cache.tail[layer].tensors, kh, vh)?;
        let (kh, vh) = sequence
            .cache
            .tensors(layer)?
            .ok_or_else(|| candle_core::Error::Msg("cached-attention: no keys".into()))?;
        let (kh, vh) = (kh.unsqueeze(0)?, vh.unsqueeze(0)?);
        let keys = kh.dim(2)?;
        let block = query_block(1, n_heads, rows.len(), keys);
        let blocks = forward_blocks(&qh, &kh, &vh, offset, &rotary.positions, None, heads, block)?;
        let out = Tensor::cat(&blocks.iter().map(|b| &b.out).collect::<Vec<_>>(), 3)?;
        // [1, kv, group, rows, dim] → [rows, heads·dim]
        outputs.push(
            out.squeeze(0)?
                .permute((2, 0, 1, 3))?
                .reshape((rows.len(), n_heads * dim))?,
        );
    }
    Tensor::cat(&outputs, 0)
}

/// Appends keys and values `[kv_heads, tokens, head_dim]` to a layer's tail of the cache,
/// in the form the cached attention reads.
pub(super) fn append_tail(
    slot: &mut Option<(Tensor, Tensor)>,
    kh: Tensor,
    vh: Tensor,
) -> Result<()> {
    *slot = Some(match slot.take() {
        Some((old_k, old_v)) => (Tensor::cat(&[old_k, kh], 1)?, Tensor::cat(&[old_v, vh], 1)?),
        None => (kh, vh),
    });
    Ok(())
}

/// Gemma 2's soft-capping of scaled scores, `cap · tanh(s / cap)`, with the tanh the
/// backward needs; the scores unchanged without a cap.
fn soft_cap(scores: Tensor, cap: Option<f64>) -> Result<(Tensor, Option<Tensor>)> {
    match cap {
        Some(cap) => {
            let tanh = (scores / cap)?.tanh()?;
            Ok(((&tanh * cap)?, Some(tanh)))
        }
        None => Ok((scores, None)),
    }
}

/// The query block for `queries` queries over `keys` keys within [`SCORES_BUDGET`].
fn query_block(batch: usize, heads: usize, queries: usize, keys: usize) -> usize {
    let per_query = batch * heads * keys.max(1) * DType::F32.size_in_bytes();
    (SCORES_BUDGET / per_query).clamp(16, queries.max(16))
}

/// `[batch, positions, heads, dim]` → `[batch, kv_heads, group, positions, dim]`, contiguous:
/// head `h` is query `h % group` of key/value head `h / group`, as transformers groups them.
fn query_heads(q: &Tensor, heads: Heads) -> Result<Tensor> {
    let (batch, positions, _, dim) = q.dims4()?;
    let group = heads.heads / heads.kv_heads;
    q.reshape((batch, positions, heads.kv_heads, group, dim))?
        .permute((0, 2, 3, 1, 4))?
        .contiguous()
}

/// 0 where the query at a position of `queries` may see the key at a position of `keys`
/// (at or before it, within the window, and in the same example of a packed row), −[`HIDDEN`]
/// elsewhere: `[queries, keys]` f32 — `[batch, 1, 1, queries, keys]` with `documents` — from
/// the position ids `positions` (f32 `0, 1, 2, …`) and the examples' ids `documents`
/// (`[batch, seq]` f32) on the device.
fn bias(
    positions: &Tensor,
    documents: Option<&Tensor>,
    queries: &Range<usize>,
    keys: &Range<usize>,
    window: Option<usize>,
) -> Result<Tensor> {
    let q = positions
        .narrow(0, queries.start, queries.len())?
        .unsqueeze(1)?;
    let k = positions.narrow(0, keys.start, keys.len())?.unsqueeze(0)?;
    let mut visible = k.broadcast_le(&q)?;
    if let Some(window) = window {
        #[allow(clippy::cast_precision_loss)]
        let within = (k + window as f64)?.broadcast_gt(&q)?;
        visible = (visible * within)?;
    }
    if let Some(documents) = documents {
        let of = |r: &Range<usize>| documents.narrow(1, r.start, r.len());
        let same = of(queries)?
            .unsqueeze(2)?
            .broadcast_eq(&of(keys)?.unsqueeze(1)?)?;
        visible = same.broadcast_mul(&visible.unsqueeze(0)?)?;
        visible = visible.unsqueeze(1)?.unsqueeze(1)?;
    }
    visible.to_dtype(DType::F32)?.affine(HIDDEN, -HIDDEN)
}

/// Whether every query at `queries` may see every key at `keys` (a decoding step's one new
/// token sees its whole cache) with no example boundary between them: then no mask is needed.
fn all_visible(
    queries: &Range<usize>,
    keys: &Range<usize>,
    window: Option<usize>,
    packed: bool,
) -> bool {
    let causal = keys.end <= queries.start + 1;
    !packed && causal && window.is_none_or(|w| queries.end - keys.start <= w)
}

/// The keys the queries at `queries` (positions) may see.
fn visible_keys(queries: &Range<usize>, window: Option<usize>) -> Range<usize> {
    let first = window.map_or(0, |w| (queries.start + 1).saturating_sub(w));
    first..queries.end
}

/// One block of queries' attention output `[batch, kv_heads, group, len, dim]` and each
/// query row's log-sum-exp of its scaled scores `[batch, kv_heads, group, len]` (f32).
struct BlockOut {
    /// The block's queries, indexed from the first query of the call.
    queries: Range<usize>,
    out: Tensor,
    lse: Tensor,
}

/// Attention of the queries `qh` `[batch, kv_heads, group, n, dim]`, at positions
/// `offset..offset + n`, over the keys and values `kh`, `vh` `[batch, kv_heads, keys, dim]`
/// at positions `0..keys` (of packed rows' `documents`, if given), in blocks of `block`
/// queries.
#[allow(clippy::too_many_arguments)]
fn forward_blocks(
    qh: &Tensor,
    kh: &Tensor,
    vh: &Tensor,
    offset: usize,
    positions: &Tensor,
    documents: Option<&Tensor>,
    heads: Heads,
    block: usize,
) -> Result<Vec<BlockOut>> {
    let (batch, kv_heads, group, n, dim) = qh.dims5()?;
    (0..n)
        .step_by(block)
        .map(|start| {
            let len = block.min(n - start);
            let at = offset + start..offset + start + len;
            let keys = visible_keys(&at, heads.window);
            let q = qh.narrow(3, start, len)?.contiguous()?.reshape((
                batch,
                kv_heads,
                group * len,
                dim,
            ))?;
            let k = kh.narrow(2, keys.start, keys.len())?;
            let v = vh.narrow(2, keys.start, keys.len())?;
            // One block-sized tensor replaces the last at each step (a chained expression
            // would keep every intermediate alive to its end).
            let mut scores = q.matmul(&k.t()?)?;
            scores = scores.to_dtype(DType::F32)?;
            scores = scores
                .reshape((batch, kv_heads, group, len, keys.len()))?
                .affine(heads.scale, 0.0)?;
            scores = soft_cap(scores, heads.softcap)?.0;
            if !all_visible(&at, &keys, heads.window, documents.is_some()) {
                let bias = bias(positions, documents, &at, &keys, heads.window)?;
                scores = scores.broadcast_add(&bias)?;
            }
            let max = scores.max_keepdim(D::Minus1)?;
            scores = scores.broadcast_sub(&max)?;
            scores = scores.exp()?;
            let total = scores.sum_keepdim(D::Minus1)?;
            let lse = (max + total.log()?)?.squeeze(D::Minus1)?;
            let mut probs = scores.broadcast_div(&total)?;
            drop(scores);
            probs = probs
                .reshape((batch, kv_heads, group * len, keys.len()))?
                .to_dtype(v.dtype())?;
            let out = probs
                .matmul(&v)?
                .reshape((batch, kv_heads, group, len, dim))?;
            Ok(BlockOut {
                queries: start..start + len,
                out,
                lse,
            })
        })
        .collect()
}

/// The training op: its forward writes the blocks' outputs straight into its output, its
/// backward recomputes each block's probabilities.
struct Attention {
    /// Rotated, detached: `[batch, kv_heads, group, seq, dim]`.
    qh: Tensor,
    /// Rotated, detached: `[batch, kv_heads, seq, dim]`.
    kh: Tensor,
    vh: Tensor,
    rotary: Rotary,
    heads: Heads,
    block: usize,
    /// `[batch, kv_heads, group, seq]`, kept by the forward for the backward.
    lse: Mutex<Option<Tensor>>,
}

const NAME: &str = "blocked-attention";

impl Attention {
    /// Runs the blocks, keeps their log-sum-exp, and copies each block's rows of each batch
    /// row into `out` `[batch, seq, heads·dim]`, through `storage` (the device's form).
    fn forward_into<S: BackendStorage>(
        &self,
        out: &mut S,
        storage: impl Fn(&Storage) -> Option<&S>,
    ) -> Result<()> {
        let (batch, _, _, seq, dim) = self.qh.dims5()?;
        let blocks = forward_blocks(
            &self.qh,
            &self.kh,
            &self.vh,
            0,
            &self.rotary.positions,
            self.documents(),
            self.heads,
            self.block,
        )?;
        let width = self.heads.heads * dim;
        for block in &blocks {
            // [batch, kv, group, len, dim] → [batch, len, kv, group, dim]: each batch row's
            // block is one run of rows of the output.
            let rows = block.out.permute((0, 3, 1, 2, 4))?;
            for b in 0..batch {
                let piece = rows.get(b)?;
                let (piece_storage, layout) = piece.storage_and_layout();
                let Some(source) = storage(&piece_storage) else {
                    candle_core::bail!("{NAME}: a block's output is on another device");
                };
                source.copy_strided_src(out, (b * seq + block.queries.start) * width, layout)?;
            }
        }
        let lse = Tensor::cat(&blocks.iter().map(|b| &b.lse).collect::<Vec<_>>(), 3)?;
        *self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{NAME}: poisoned")))? = Some(lse);
        Ok(())
    }

    /// The rotary tables to broadcast over `[batch, .., seq, rotary]` with `middle` axes
    /// between: per row for packed rows, else shared.
    fn tables(&self, middle: usize) -> Result<(Tensor, Tensor)> {
        let (cos, sin) = (&self.rotary.cos, &self.rotary.sin);
        if self.rotary.documents.is_none() {
            return Ok((cos.clone(), sin.clone()));
        }
        let (batch, _, _, seq, _) = self.qh.dims5()?;
        let mut shape = vec![batch];
        shape.extend(std::iter::repeat_n(1, middle));
        shape.extend([seq, cos.dim(1)?]);
        Ok((cos.reshape(shape.as_slice())?, sin.reshape(shape)?))
    }

    /// Packed rows' example ids, `[batch, seq]`.
    fn documents(&self) -> Option<&Tensor> {
        self.rotary.documents.as_ref().map(|d| &d.ids)
    }

    fn output_shape(&self) -> Result<Shape> {
        let (batch, _, _, seq, dim) = self.qh.dims5()?;
        Ok(Shape::from((batch, seq, self.heads.heads * dim)))
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = self.output_shape()?;
        let mut out = candle_core::cpu_backend::CpuDevice.zeros_impl(&shape, self.qh.dtype())?;
        self.forward_into(&mut out, |s| match s {
            Storage::Cpu(s) => Some(s),
            _ => None,
        })?;
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let shape = self.output_shape()?;
        let mut out = q.device().zeros_impl(&shape, self.qh.dtype())?;
        self.forward_into(&mut out, |s| match s {
            Storage::Cuda(s) => Some(s),
            _ => None,
        })?;
        Ok((out, shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{NAME}: poisoned")))?
            .clone();
        let Some(lse) = lse else {
            candle_core::bail!("{NAME}: the backward ran before the forward");
        };
        let (dq, dk, dv) = self.backward(&lse, out, grad)?;
        Ok((
            Some(dq.to_dtype(q.dtype())?),
            Some(dk.to_dtype(k.dtype())?),
            Some(dv.to_dtype(v.dtype())?),
        ))
    }
}

impl Attention {
    /// `dQ`, `dK`, `dV` (before the rotation, in token-major layout) for the output's
    /// gradient `grad`: with `P` recomputed from the scores and `lse`, `D = rowsum(dO ⊙ O)`,
    /// `dS = P ⊙ (dO·Vᵀ − D)`, then `dQ = scale·dS·K`, `dK = scale·dSᵀ·Q`, `dV = Pᵀ·dO`.
    fn backward(
        &self,
        lse: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let heads = self.heads;
        let (batch, kv_heads, group, seq, dim) = self.qh.dims5()?;
        let dtype = self.qh.dtype();
        let split = |t: &Tensor| -> Result<Tensor> {
            query_heads(
                &t.detach()
                    .reshape((batch, seq, heads.heads, dim))?
                    .to_dtype(dtype)?,
                heads,
            )
        };
        let grad_h = split(grad)?;
        let delta =
            (grad_h.to_dtype(DType::F32)? * split(out)?.to_dtype(DType::F32)?)?.sum(D::Minus1)?;
        let rows = |t: &Tensor, r: &Range<usize>| -> Result<Tensor> {
            t.narrow(3, r.start, r.len())?.contiguous()?.reshape((
                batch,
                kv_heads,
                group * r.len(),
                dim,
            ))
        };
        // The probabilities and `dS` of queries `qs` over keys `ks`, `[b, kv, group·|qs|, |ks|]`.
        let recompute = |qs: &Range<usize>, ks: &Range<usize>| -> Result<(Tensor, Tensor)> {
            let (q, k, v) = (
                rows(&self.qh, qs)?,
                self.kh.narrow(2, ks.start, ks.len())?,
                self.vh.narrow(2, ks.start, ks.len())?,
            );
            let shape = (batch, kv_heads, group, qs.len(), ks.len());
            let flat = (batch, kv_heads, group * qs.len(), ks.len());
            // As in the forward, each block-sized tensor replaces the last.
            let mut probs = q.matmul(&k.t()?)?;
            probs = probs.to_dtype(DType::F32)?;
            probs = probs.reshape(shape)?.affine(heads.scale, 0.0)?;
            let tanh;
            (probs, tanh) = soft_cap(probs, heads.softcap)?;
            if !all_visible(qs, ks, heads.window, self.documents().is_some()) {
                let bias = bias(
                    &self.rotary.positions,
                    self.documents(),
                    qs,
                    ks,
                    heads.window,
                )?;
                probs = probs.broadcast_add(&bias)?;
            }
            probs =
                probs.broadcast_sub(&lse.narrow(3, qs.start, qs.len())?.unsqueeze(D::Minus1)?)?;
            probs = probs.exp()?;
            let mut dp = rows(&grad_h, qs)?.matmul(&v.t()?)?;
            dp = dp.to_dtype(DType::F32)?;
            dp = dp
                .reshape(shape)?
                .broadcast_sub(&delta.narrow(3, qs.start, qs.len())?.unsqueeze(D::Minus1)?)?;
            let mut ds = (&probs * &dp)?;
            drop(dp);
            if let Some(tanh) = tanh {
                ds = (ds * tanh.sqr()?.affine(-1.0, 1.0)?)?;
            }
            Ok((probs.reshape(flat)?, ds.reshape(flat)?))
        };
        let mut dq = Vec::new();
        for start in (0..seq).step_by(self.block) {
            let qs = start..(start + self.block).min(seq);
            let ks = visible_keys(&qs, heads.window);
            let (_, ds) = recompute(&qs, &ks)?;
            let k = self.kh.narrow(2, ks.start, ks.len())?;
            dq.push(
                ds.to_dtype(dtype)?
                    .matmul(&k)?
                    .affine(heads.scale, 0.0)?
                    .reshape((batch, kv_heads, group, qs.len(), dim))?,
            );
        }
        let (mut dk, mut dv) = (Vec::new(), Vec::new());
        for start in (0..seq).step_by(self.block) {
            let ks = start..(start + self.block).min(seq);
            // The queries that may see any of these keys.
            let last = heads.window.map_or(seq, |w| (ks.end - 1 + w).min(seq));
            let qs = ks.start..last;
            let (probs, ds) = recompute(&qs, &ks)?;
            dv.push(probs.to_dtype(dtype)?.t()?.matmul(&rows(&grad_h, &qs)?)?);
            drop(probs);
            dk.push(
                ds.to_dtype(dtype)?
                    .t()?
                    .matmul(&rows(&self.qh, &qs)?)?
                    .affine(heads.scale, 0.0)?,
            );
        }
        let (cos, sin) = self.tables(2)?;
        let dq = rotate_back(&Tensor::cat(&dq, 3)?, &cos, &sin)?
            .permute((0, 3, 1, 2, 4))?
            .reshape((batch, seq, heads.heads * dim))?;
        let (cos, sin) = self.tables(1)?;
        let dk = rotate_back(&Tensor::cat(&dk, 2)?, &cos, &sin)?
            .transpose(1, 2)?
            .reshape((batch, seq, kv_heads * dim))?;
        let dv = Tensor::cat(&dv, 2)?
            .transpose(1, 2)?
            .reshape((batch, seq, kv_heads * dim))?;
        Ok((dq, dk, dv))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::backend::check::{reference_attention, same_values_and_gradients};

    fn rotary(seq: usize, dim: usize) -> Result<Rotary> {
        let device = Device::Cpu;
        let angles = Tensor::randn(0f32, 2.0, (seq, dim), &device)?;
        #[allow(clippy::cast_precision_loss)]
        let ids: Vec<f32> = (0..seq).map(|p| p as f32).collect();
        Ok(Rotary {
            cos: angles.cos()?,
            sin: angles.sin()?,
            positions: Tensor::new(ids.as_slice(), &device)?,
            documents: None,
        })
    }

    #[test]
    fn blocked_attention_equals_the_composed_one_with_the_same_gradients() -> Result<()> {
        let device = Device::Cpu;
        // 70 tokens in blocks of 16: five query and key blocks, the last partial.
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
            let tables = rotary(seq, head_dim)?;
            let inputs = [
                Tensor::randn(0f32, 1.0, (batch, seq, heads * head_dim), &device)?,
                Tensor::randn(0f32, 1.0, (batch, seq, kv_heads * head_dim), &device)?,
                Tensor::randn(0f32, 1.0, (batch, seq, kv_heads * head_dim), &device)?,
            ];
            same_values_and_gradients(
                &inputs,
                |t| attention_in_blocks(&t[0], &t[1], &t[2], &tables, geometry, 16),
                |t| reference_attention([&t[0], &t[1], &t[2]], &tables.cos, &tables.sin, geometry),
                1e-5,
            )?;
        }
        Ok(())
    }
}
