//! The engine: the paged KV cache and the batch runner that turns requests into forward passes.

pub mod generate;
pub mod kv_cache;

pub use kv_cache::{KvCache, SeqCache};
