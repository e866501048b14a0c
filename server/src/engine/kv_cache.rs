//! Paged KV cache with prefix reuse.
//!
//! Keys and values live in fixed-size blocks of token slots shared by all sequences, so memory is
//! bounded by a token budget rather than by the longest possible sequence of every request.
//! Full blocks can be published under a hash of (adapter, every token up to and including the
//! block); a later request with the same adapter and prefix takes them by reference instead of
//! recomputing them (SGLang's radix cache, vLLM's prefix caching). Unreferenced published blocks
//! stay cached until space is needed, then leave least recently used first.

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

use crate::error::{Error, Result};
use crate::model::ModelConfig;

/// Key and value storage for every layer, `[num_blocks * block_size, kv_dim]` per layer.
pub struct KvCache {
    block_size: usize,
    kv_dim: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    num_blocks: usize,
    /// Sequences holding each block.
    refs: Vec<u32>,
    /// Unreferenced, unpublished blocks.
    free: Vec<u32>,
    /// Prefix hash -> block, for published full blocks.
    published: HashMap<u64, u32>,
    /// Each block's prefix hash when published.
    block_hash: Vec<Option<u64>>,
    /// Unreferenced published blocks by last use (evicted oldest first).
    evictable: BTreeSet<(u64, u32)>,
    last_use: Vec<u64>,
    tick: u64,
}

/// The blocks one sequence holds and how many of its tokens are cached.
#[derive(Debug, Default, Clone)]
pub struct SeqCache {
    /// Block ids in sequence order.
    pub blocks: Vec<u32>,
    /// Tokens whose keys and values are written.
    pub len: usize,
}

/// Identifies the weights a cached prefix was computed with: 0 for the base model, else the
/// adapter's unique load id (a reload under the same name gets a new id, so no stale reuse).
pub type PrefixKey = u64;

impl KvCache {
    /// A cache holding `max_tokens` tokens (rounded up to whole blocks) for `config`.
    pub fn new(config: &ModelConfig, max_tokens: usize, block_size: usize) -> Self {
        Self::build(config, max_tokens, block_size, true)
    }

    /// Block management only: the keys and values live elsewhere (in device memory, indexed by
    /// the same slots), so [`KvCache::write`] and [`KvCache::layer`] must not be used.
    pub fn paging_only(config: &ModelConfig, max_tokens: usize, block_size: usize) -> Self {
        Self::build(config, max_tokens, block_size, false)
    }

    fn build(config: &ModelConfig, max_tokens: usize, block_size: usize, host_storage: bool) -> Self {
        let block_size = block_size.max(1);
        let num_blocks = max_tokens.div_ceil(block_size).max(1);
        let slots = if host_storage {
            num_blocks * block_size * config.kv_dim()
        } else {
            0
        };
        Self {
            block_size,
            kv_dim: config.kv_dim(),
            keys: (0..config.num_layers).map(|_| vec![0.0; slots]).collect(),
            values: (0..config.num_layers).map(|_| vec![0.0; slots]).collect(),
            num_blocks,
            refs: vec![0; num_blocks],
            free: (0..num_blocks as u32).rev().collect(),
            published: HashMap::new(),
            block_hash: vec![None; num_blocks],
            evictable: BTreeSet::new(),
            last_use: vec![0; num_blocks],
            tick: 0,
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Total token capacity.
    pub fn capacity_tokens(&self) -> usize {
        self.num_blocks * self.block_size
    }

    /// Total blocks.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Blocks that can be handed out now (free plus evictable cached ones).
    pub fn free_blocks(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks needed to grow `seq` to `len` tokens.
    pub fn blocks_needed(&self, seq: &SeqCache, len: usize) -> usize {
        len.div_ceil(self.block_size).saturating_sub(seq.blocks.len())
    }

    /// Makes room in `seq` for `len` tokens, or fails without taking any block.
    pub fn reserve(&mut self, seq: &mut SeqCache, len: usize) -> Result<()> {
        let need = self.blocks_needed(seq, len);
        if need > self.free_blocks() {
            return Err(Error::InvalidRequest(format!(
                "KV cache full: {len} tokens need {need} more blocks, {} free",
                self.free_blocks()
            )));
        }
        for _ in 0..need {
            let b = self.take_block();
            seq.blocks.push(b);
        }
        Ok(())
    }

    fn take_block(&mut self) -> u32 {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.evictable.pop_first().expect("caller checked free_blocks");
                if let Some(h) = self.block_hash[b as usize].take() {
                    self.published.remove(&h);
                }
                b
            }
        };
        self.refs[b as usize] = 1;
        b
    }

    /// Drops `seq`'s hold on its blocks; published ones stay cached until space is needed.
    pub fn release(&mut self, seq: &mut SeqCache) {
        self.tick += 1;
        for b in seq.blocks.drain(..) {
            let i = b as usize;
            self.refs[i] -= 1;
            if self.refs[i] == 0 {
                if self.block_hash[i].is_some() {
                    self.last_use[i] = self.tick;
                    self.evictable.insert((self.tick, b));
                } else {
                    self.free.push(b);
                }
            }
        }
        seq.len = 0;
    }

    /// Hash of the prefix ending with `block` given the previous block's hash.
    fn chain(prev: u64, key: PrefixKey, block: &[u32]) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (prev, key, block).hash(&mut h);
        h.finish()
    }

    /// Points an empty `seq` at the longest published prefix of `tokens` under `key`, leaving at
    /// least one token to compute. Returns the number of tokens reused.
    pub fn match_prefix(&mut self, seq: &mut SeqCache, key: PrefixKey, tokens: &[u32]) -> usize {
        debug_assert!(seq.blocks.is_empty());
        let full = tokens.len().saturating_sub(1) / self.block_size;
        let mut prev = 0u64;
        for chunk in tokens.chunks(self.block_size).take(full) {
            prev = Self::chain(prev, key, chunk);
            let Some(&b) = self.published.get(&prev) else {
                break;
            };
            let i = b as usize;
            if self.refs[i] == 0 {
                self.evictable.remove(&(self.last_use[i], b));
            }
            self.refs[i] += 1;
            seq.blocks.push(b);
        }
        seq.len = seq.blocks.len() * self.block_size;
        seq.len
    }

    /// Publishes `seq`'s full blocks (the first `seq.len` of `tokens`) for reuse under `key`.
    pub fn publish_prefix(&mut self, seq: &SeqCache, key: PrefixKey, tokens: &[u32]) {
        let full = seq.len.min(tokens.len()) / self.block_size;
        let mut prev = 0u64;
        for (chunk, &b) in tokens.chunks(self.block_size).take(full).zip(&seq.blocks) {
            prev = Self::chain(prev, key, chunk);
            let i = b as usize;
            if self.block_hash[i].is_none() && !self.published.contains_key(&prev) {
                self.block_hash[i] = Some(prev);
                self.published.insert(prev, b);
            }
        }
    }

    /// Row index of token `pos` of `seq` in the per-layer storage.
    #[inline]
    pub fn slot(&self, seq: &SeqCache, pos: usize) -> usize {
        seq.blocks[pos / self.block_size] as usize * self.block_size + pos % self.block_size
    }

    /// Width of one cached key or value row.
    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    /// Writes one token's key and value rows for `layer`.
    pub fn write(&mut self, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        let d = self.kv_dim;
        self.keys[layer][slot * d..(slot + 1) * d].copy_from_slice(k);
        self.values[layer][slot * d..(slot + 1) * d].copy_from_slice(v);
    }

    /// Key and value storage of `layer`.
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.keys[layer], &self.values[layer])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ModelConfig {
        ModelConfig::from_hf_json(
            r#"{"architectures":["LlamaForCausalLM"],"vocab_size":8,"hidden_size":8,"intermediate_size":8,
            "num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1}"#,
        )
        .unwrap()
    }

    #[test]
    fn reserve_and_release_blocks() {
        let mut kv = KvCache::new(&config(), 64, 16);
        assert_eq!(kv.free_blocks(), 4);
        let mut a = SeqCache::default();
        kv.reserve(&mut a, 17).unwrap();
        assert_eq!(a.blocks.len(), 2);
        let mut b = SeqCache::default();
        assert!(kv.reserve(&mut b, 48).is_err(), "needs 3 blocks, 2 free");
        assert!(b.blocks.is_empty(), "a failed reserve takes nothing");
        kv.release(&mut a);
        assert_eq!(kv.free_blocks(), 4);
        kv.reserve(&mut b, 48).unwrap();
        assert_eq!(kv.slot(&b, 17) / 16, b.blocks[1] as usize);
    }

    #[test]
    fn prefixes_are_shared_per_key_and_evicted_when_space_is_needed() {
        let mut kv = KvCache::new(&config(), 64, 4);
        let tokens: Vec<u32> = (0..10).collect();
        let mut a = SeqCache::default();
        kv.reserve(&mut a, 10).unwrap();
        a.len = 10;
        kv.publish_prefix(&a, 7, &tokens);
        kv.release(&mut a);
        assert_eq!(kv.free_blocks(), 16, "cached blocks still count as available");

        let mut b = SeqCache::default();
        assert_eq!(kv.match_prefix(&mut b, 7, &tokens), 8, "two full blocks reused");
        let mut c = SeqCache::default();
        assert_eq!(
            kv.match_prefix(&mut c, 8, &tokens),
            0,
            "another adapter shares nothing"
        );
        let mut d = SeqCache::default();
        assert_eq!(
            kv.match_prefix(&mut d, 7, &tokens[..8]),
            4,
            "at least one token is left to compute"
        );
        kv.release(&mut d);
        kv.release(&mut b);

        // Fill the whole cache: the cached blocks are evicted and the prefix is gone.
        let mut e = SeqCache::default();
        kv.reserve(&mut e, 64).unwrap();
        kv.release(&mut e);
        let mut f = SeqCache::default();
        assert_eq!(kv.match_prefix(&mut f, 7, &tokens), 0);
    }
}
