//! One sequence's keys and values, layer by layer, for serving, in blocks of
//! [`BLOCK_TOKENS`] tokens (paged, as vLLM's): a full block never changes again, so sequences
//! whose tokens (and adapter) begin alike share theirs, and a scheduler counts memory in
//! blocks. Each backend keeps its own form of a layer's rows: the CPU backend rows of f32, the
//! other one tensors on the device.

use std::sync::Arc;

use candle_core::{Result, Tensor};

/// Tokens per block.
pub const BLOCK_TOKENS: usize = 16;

/// Some tokens' keys and values in one layer.
#[derive(Clone, Debug, Default)]
pub(crate) struct LayerCache {
    /// CPU backend: `[tokens, kv_heads, head_dim]` f32, rotated keys and values.
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// Device backend: `[kv_heads, tokens, head_dim]` tensors in the compute dtype.
    pub tensors: Option<(Tensor, Tensor)>,
}

/// [`BLOCK_TOKENS`] tokens' keys and values in every layer.
#[derive(Debug)]
pub struct Block {
    layers: Vec<LayerCache>,
}

/// One sequence's keys and values: full blocks, then the tokens after them.
#[derive(Clone, Debug)]
pub struct KvCache {
    blocks: Vec<Arc<Block>>,
    /// Per layer, the tokens after the last full block: fewer than [`BLOCK_TOKENS`] between
    /// steps; a step appends its new rows here, layer by layer, and [`Self::advance`] seals
    /// the full blocks.
    pub(crate) tail: Vec<LayerCache>,
    len: usize,
}

impl KvCache {
    /// An empty cache for a model of `layers` decoder layers.
    pub fn new(layers: usize) -> Self {
        Self::with_prefix(layers, Vec::new())
    }

    /// A cache that starts with `blocks`, computed for another sequence with the same first
    /// tokens.
    pub fn with_prefix(layers: usize, blocks: Vec<Arc<Block>>) -> Self {
        Self {
            len: blocks.len() * BLOCK_TOKENS,
            blocks,
            tail: vec![LayerCache::default(); layers],
        }
    }

    /// Tokens cached so far: the position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The full blocks, in order.
    pub fn blocks(&self) -> &[Arc<Block>] {
        &self.blocks
    }

    /// Blocks this cache occupies with `more` tokens added: its full ones and the partial one.
    pub fn blocks_for(&self, more: usize) -> usize {
        (self.len + more).div_ceil(BLOCK_TOKENS)
    }

    /// Counts `tokens` more once every layer holds them, and seals the blocks they filled.
    pub(crate) fn advance(&mut self, tokens: usize) -> Result<()> {
        self.len += tokens;
        let full = self.len / BLOCK_TOKENS;
        while self.blocks.len() < full {
            let tail = self.len - self.blocks.len() * BLOCK_TOKENS;
            let layers = self
                .tail
                .iter_mut()
                .map(|layer| layer.split_block(tail))
                .collect::<Result<_>>()?;
            self.blocks.push(Arc::new(Block { layers }));
        }
        Ok(())
    }

    /// Layer `layer`'s rows in the CPU backend's form.
    pub(crate) fn rows(&self, layer: usize) -> PagedRows<'_> {
        fn row(cache: &LayerCache) -> (&[f32], &[f32]) {
            (&cache.k, &cache.v)
        }
        PagedRows {
            blocks: self.blocks.iter().map(|b| row(&b.layers[layer])).collect(),
            tail: row(&self.tail[layer]),
        }
    }

    /// Layer `layer`'s keys and values in the device backend's form, `[kv_heads, tokens,
    /// head_dim]` each: the blocks and the tail joined.
    pub(crate) fn tensors(&self, layer: usize) -> Result<Option<(Tensor, Tensor)>> {
        let parts: Vec<&(Tensor, Tensor)> = self
            .blocks
            .iter()
            .filter_map(|b| b.layers[layer].tensors.as_ref())
            .chain(self.tail[layer].tensors.as_ref())
            .collect();
        match parts.as_slice() {
            [] => Ok(None),
            [(k, v)] => Ok(Some((k.clone(), v.clone()))),
            _ => {
                let ks: Vec<&Tensor> = parts.iter().map(|(k, _)| k).collect();
                let vs: Vec<&Tensor> = parts.iter().map(|(_, v)| v).collect();
                Ok(Some((Tensor::cat(&ks, 1)?, Tensor::cat(&vs, 1)?)))
            }
        }
    }
}

impl LayerCache {
    /// The first [`BLOCK_TOKENS`] of its `tokens` tokens, taken out.
    fn split_block(&mut self, tokens: usize) -> Result<Self> {
        if let Some((k, v)) = self.tensors.take() {
            let part = |t: &Tensor, from: usize, len: usize| t.narrow(1, from, len)?.contiguous();
            let block = (part(&k, 0, BLOCK_TOKENS)?, part(&v, 0, BLOCK_TOKENS)?);
            if tokens > BLOCK_TOKENS {
                let rest = tokens - BLOCK_TOKENS;
                self.tensors = Some((part(&k, BLOCK_TOKENS, rest)?, part(&v, BLOCK_TOKENS, rest)?));
            }
            return Ok(Self {
                tensors: Some(block),
                ..Self::default()
            });
        }
        if tokens < BLOCK_TOKENS || !self.k.len().is_multiple_of(tokens) {
            candle_core::bail!(
                "kv-cache: sealing a block from {tokens} tokens of {} values",
                self.k.len()
            );
        }
        let row = self.k.len() / tokens;
        let k = self.k.split_off(BLOCK_TOKENS * row);
        let v = self.v.split_off(BLOCK_TOKENS * row);
        Ok(Self {
            k: std::mem::replace(&mut self.k, k),
            v: std::mem::replace(&mut self.v, v),
            tensors: None,
        })
    }
}

/// A layer's rows on the CPU: `[tokens, kv_heads · head_dim]` f32 in blocks, then the tail.
pub(crate) struct PagedRows<'a> {
    blocks: Vec<(&'a [f32], &'a [f32])>,
    tail: (&'a [f32], &'a [f32]),
}

impl PagedRows<'_> {
    /// The key and value rows of token `j`, each `width` wide.
    #[inline]
    pub fn get(&self, j: usize, width: usize) -> (&[f32], &[f32]) {
        let (block, at) = (j / BLOCK_TOKENS, j % BLOCK_TOKENS);
        let ((k, v), at) = match self.blocks.get(block) {
            Some(&pair) => (pair, at),
            None => (self.tail, j - self.blocks.len() * BLOCK_TOKENS),
        };
        (&k[at * width..][..width], &v[at * width..][..width])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends rows `from..to` (each `width` values equal to its token index, keys positive,
    /// values negative) to every layer, as a step does, and advances.
    fn step(cache: &mut KvCache, from: usize, to: usize, width: usize) -> Result<()> {
        #[allow(clippy::cast_precision_loss)]
        for layer in &mut cache.tail {
            for token in from..to {
                layer.k.extend(std::iter::repeat_n(token as f32, width));
                layer.v.extend(std::iter::repeat_n(-(token as f32), width));
            }
        }
        cache.advance(to - from)
    }

    /// Token `j`'s rows are found wherever they were sealed: in a prefill that fills several
    /// blocks at once, one token at a time, and in a copy that shares the first blocks.
    #[test]
    #[allow(clippy::float_cmp)] // small integers, exactly representable
    fn every_token_is_found_through_the_block_table() -> Result<()> {
        let width = 3;
        let mut cache = KvCache::new(2);
        step(&mut cache, 0, 2 * BLOCK_TOKENS + 5, width)?;
        assert_eq!(cache.blocks().len(), 2);
        for token in 2 * BLOCK_TOKENS + 5..3 * BLOCK_TOKENS + 2 {
            step(&mut cache, token, token + 1, width)?;
        }
        assert_eq!(
            (cache.blocks().len(), cache.len()),
            (3, 3 * BLOCK_TOKENS + 2)
        );
        assert_eq!(cache.blocks_for(BLOCK_TOKENS - 2), 4);
        assert_eq!(cache.blocks_for(BLOCK_TOKENS - 1), 5);
        let mut shared = KvCache::with_prefix(2, cache.blocks()[..2].to_vec());
        step(&mut shared, 2 * BLOCK_TOKENS, 2 * BLOCK_TOKENS + 1, width)?;
        for (cache, len) in [
            (&cache, 3 * BLOCK_TOKENS + 2),
            (&shared, 2 * BLOCK_TOKENS + 1),
        ] {
            for layer in 0..2 {
                let rows = cache.rows(layer);
                for j in 0..len {
                    #[allow(clippy::cast_precision_loss)]
                    let expected = j as f32;
                    let (k, v) = rows.get(j, width);
                    assert!(k.iter().all(|&x| x == expected), "token {j}'s key {k:?}");
                    assert!(v.iter().all(|&x| x == -expected), "token {j}'s value {v:?}");
                }
            }
        }
        Ok(())
    }
}
