//! Paged KV cache: fixed-size blocks of token slots shared by all sequences, so memory is
//! bounded by a token budget rather than by the longest possible sequence of every request.

use crate::error::{Error, Result};
use crate::model::ModelConfig;

/// Key and value storage for every layer, `[num_blocks * block_size, kv_dim]` per layer.
pub struct KvCache {
    block_size: usize,
    kv_dim: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    free: Vec<u32>,
    num_blocks: usize,
}

/// The blocks one sequence owns and how many of its tokens are cached.
#[derive(Debug, Default, Clone)]
pub struct SeqCache {
    /// Block ids in sequence order.
    pub blocks: Vec<u32>,
    /// Tokens whose keys and values are written.
    pub len: usize,
}

impl KvCache {
    /// A cache holding `max_tokens` tokens (rounded up to whole blocks) for `config`.
    pub fn new(config: &ModelConfig, max_tokens: usize, block_size: usize) -> Self {
        let block_size = block_size.max(1);
        let num_blocks = max_tokens.div_ceil(block_size).max(1);
        let slots = num_blocks * block_size * config.kv_dim();
        Self {
            block_size,
            kv_dim: config.kv_dim(),
            keys: (0..config.num_layers).map(|_| vec![0.0; slots]).collect(),
            values: (0..config.num_layers).map(|_| vec![0.0; slots]).collect(),
            free: (0..num_blocks as u32).rev().collect(),
            num_blocks,
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

    /// Blocks not owned by any sequence.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed to grow `seq` to `len` tokens.
    pub fn blocks_needed(&self, seq: &SeqCache, len: usize) -> usize {
        len.div_ceil(self.block_size).saturating_sub(seq.blocks.len())
    }

    /// Makes room in `seq` for `len` tokens, or fails without taking any block.
    pub fn reserve(&mut self, seq: &mut SeqCache, len: usize) -> Result<()> {
        let need = self.blocks_needed(seq, len);
        if need > self.free.len() {
            return Err(Error::InvalidRequest(format!(
                "KV cache full: {len} tokens need {need} more blocks, {} free",
                self.free.len()
            )));
        }
        for _ in 0..need {
            seq.blocks.push(self.free.pop().expect("checked above"));
        }
        Ok(())
    }

    /// Returns `seq`'s blocks to the pool.
    pub fn release(&mut self, seq: &mut SeqCache) {
        self.free.append(&mut seq.blocks);
        seq.len = 0;
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
}
