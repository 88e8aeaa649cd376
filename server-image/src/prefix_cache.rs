//! Full KV blocks kept for reuse: a sequence whose first tokens match an earlier one's (a
//! shared system prompt, a conversation's previous turns) starts from that sequence's blocks
//! instead of computing them again. An adapter changes every key and value, so a block is
//! found by its tokens, every token before it and the adapter version (or the base) together.

use std::{collections::HashMap, sync::Arc};

use graft_engine::backend::{BLOCK_TOKENS, Block};
use sha2::{Digest, Sha256};

/// A block's identity: SHA-256 of the previous block's, the adapter's and the block's tokens.
/// A cryptographic hash, since a collision would serve one tenant's keys to another's prompt.
pub type BlockHash = [u8; 32];

/// The hashes of the full blocks of `tokens` computed through the adapter `adapter` (its
/// version's digest; empty for the base model).
pub fn block_hashes(adapter: &str, tokens: &[u32], from: &[BlockHash]) -> Vec<BlockHash> {
    let mut hashes = from.to_vec();
    for block in tokens.chunks_exact(BLOCK_TOKENS).skip(from.len()) {
        let mut block_hash = Sha256::new();
        if let Some(previous) = hashes.last() {
            block_hash.update(previous);
        }
        block_hash.update((adapter.len() as u64).to_le_bytes());
        block_hash.update(adapter.as_bytes());
        for token in block {
            block_hash.update(token.to_le_bytes());
        }
        hashes.push(block_hash.finalize().into());
    }
    hashes
}

#[derive(Debug, Default)]
pub struct PrefixCache {
    entries: HashMap<BlockHash, Entry>,
    clock: u64,
}

#[derive(Debug)]
struct Entry {
    block: Arc<Block>,
    used: u64,
}

impl PrefixCache {
    /// The longest run of cached blocks that starts `hashes`, at most `limit` of them.
    pub fn lookup(&mut self, hashes: &[BlockHash], limit: usize) -> Vec<Arc<Block>> {
        self.clock += 1;
        let mut found = Vec::new();
        for hash in hashes.iter().take(limit) {
            let Some(entry) = self.entries.get_mut(hash) else {
                break;
            };
            entry.used = self.clock;
            found.push(entry.block.clone());
        }
        found
    }

    /// Keeps `block` under `hash` (a block already kept under it stays).
    pub fn insert(&mut self, hash: BlockHash, block: &Arc<Block>) {
        self.clock += 1;
        let used = self.clock;
        self.entries
            .entry(hash)
            .and_modify(|e| e.used = used)
            .or_insert_with(|| Entry {
                block: block.clone(),
                used,
            });
    }

    /// The blocks kept, each once.
    pub fn blocks(&self) -> impl Iterator<Item = &Arc<Block>> {
        self.entries.values().map(|e| &e.block)
    }

    /// Drops the least recently used block no sequence holds; false when every kept block is
    /// in use.
    pub fn evict_one(&mut self) -> bool {
        let oldest = self
            .entries
            .iter()
            .filter(|(_, e)| Arc::strong_count(&e.block) == 1)
            .min_by_key(|(_, e)| e.used)
            .map(|(hash, _)| *hash);
        oldest.is_some_and(|hash| self.entries.remove(&hash).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::cast_possible_truncation)]
    fn a_block_is_named_by_everything_before_it_and_the_adapter() {
        let tokens: Vec<u32> = (0..3 * BLOCK_TOKENS + 5).map(|t| t as u32).collect();
        let base = block_hashes("", &tokens, &[]);
        assert_eq!(base.len(), 3, "only full blocks");
        assert_eq!(
            block_hashes("", &tokens, &base[..1]),
            base,
            "extends a chain"
        );
        let adapted = block_hashes("abc", &tokens, &[]);
        assert!(base.iter().zip(&adapted).all(|(a, b)| a != b));
        let mut changed = tokens.clone();
        changed[1] = 999;
        let other = block_hashes("", &changed, &[]);
        assert!(
            base.iter().zip(&other).all(|(a, b)| a != b),
            "a change in the first block renames every later one"
        );
    }
}
