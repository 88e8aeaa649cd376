//! Attention of a serving step on the CPU in f32, straight over each sequence's cache with
//! every query row in parallel: a decoding batch is many sequences of one row each, and
//! per-sequence tensor ops (slice, transpose, two matmuls, softmax) would cost more than the
//! arithmetic.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::{gemm::with_f32s, math::dot, rotary::rotate};
use crate::backend::{CachedRows, Heads, Rotary, cache::PagedRows};

/// See [`crate::backend::Backend::cached_attention`].
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
        scale,
        window,
        softcap,
    } = heads;
    let group = n_heads / kv_heads;
    let kv_row = kv_heads * dim;
    let (rows, width) = q.dims2()?;
    if width != n_heads * dim {
        candle_core::bail!("cached-attention: q [{rows}, {width}] is not {n_heads} heads of {dim}");
    }
    let (q, k) = with_f32s(
        [q, k, &rotary.cos, &rotary.sin],
        "cached-attention",
        |[q, k, cos, sin]| {
            Ok((
                rotated(q, cos, sin, rows, dim),
                rotated(k, cos, sin, rows, dim),
            ))
        },
    )?;
    let v = v.flatten_all()?.to_vec1::<f32>()?;
    for sequence in sequences.iter_mut() {
        let cache = &mut sequence.cache.tail[layer];
        let span = sequence.rows.start * kv_row..sequence.rows.end * kv_row;
        cache.k.extend_from_slice(&k[span.clone()]);
        cache.v.extend_from_slice(&v[span]);
    }
    // Each sequence's keys and values (its blocks, then the rows after them), and each query
    // row's sequence and position.
    let caches: Vec<PagedRows<'_>> = sequences.iter().map(|s| s.cache.rows(layer)).collect();
    let mut work = Vec::with_capacity(rows);
    for (sequence, cache) in sequences.iter().zip(&caches) {
        let offset = sequence.cache.len();
        for i in 0..sequence.rows.len() {
            work.push((cache, offset + i));
        }
    }
    if work.len() != rows {
        candle_core::bail!(
            "cached-attention: {rows} rows, {} in the sequences",
            work.len()
        );
    }
    #[allow(clippy::cast_possible_truncation)]
    let scale = scale as f32;
    #[allow(clippy::cast_possible_truncation)]
    let softcap = softcap.map(|cap| cap as f32);
    let mut out = vec![0f32; q.len()];
    out.par_chunks_mut(n_heads * dim)
        .zip(q.par_chunks(n_heads * dim))
        .zip(work.par_iter())
        .for_each(|((out_row, q_row), (cache, position))| {
            let first = window.map_or(0, |w| (position + 1).saturating_sub(w));
            let mut scores = Vec::with_capacity(position + 1 - first);
            for h in 0..n_heads {
                let kv = (h / group) * dim;
                let q_head = &q_row[h * dim..(h + 1) * dim];
                scores.clear();
                scores.extend(
                    (first..=*position)
                        .map(|j| dot(q_head, &cache.get(j, kv_row).0[kv..][..dim]) * scale),
                );
                if let Some(cap) = softcap {
                    for s in &mut scores {
                        *s = cap * (*s / cap).tanh();
                    }
                }
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut total = 0.0;
                for s in &mut scores {
                    *s = (*s - max).exp();
                    total += *s;
                }
                let out_head = &mut out_row[h * dim..(h + 1) * dim];
                for (j, weight) in (first..=*position).zip(&scores) {
                    let value = &cache.get(j, kv_row).1[kv..][..dim];
                    let weight = weight / total;
                    for (o, x) in out_head.iter_mut().zip(value) {
                        *o += weight * x;
                    }
                }
            }
        });
    Tensor::from_vec(out, (rows, n_heads * dim), rotary.cos.device())
}

/// Every head of each of `rows` rows rotated with its row's tables (`[rows, rotary]`).
fn rotated(x: &[f32], cos: &[f32], sin: &[f32], rows: usize, dim: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    let (per_row, rotary) = ((x.len() / rows.max(1)).max(1), cos.len() / rows.max(1));
    for (row, (x_row, out_row)) in x
        .chunks_exact(per_row)
        .zip(out.chunks_exact_mut(per_row))
        .enumerate()
    {
        let table = row * rotary..(row + 1) * rotary;
        for (head, out_head) in x_row.chunks_exact(dim).zip(out_row.chunks_exact_mut(dim)) {
            rotate(head, &cos[table.clone()], &sin[table.clone()], out_head);
        }
    }
    out
}
