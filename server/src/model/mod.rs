//! Models: configuration, weight loading, tokenization and the forward pass.

pub mod config;
pub mod gguf;
pub mod llama;
pub mod loader;
pub mod tokenizer;
pub mod weights;

pub use config::{Architecture, ModelConfig};
pub use llama::LlamaModel;

use crate::backend::cuda::CudaModel;
use crate::engine::KvCache;
use crate::error::Result;
use llama::SeqInput;

/// A model that runs mixed prefill/decode forward passes over a paged KV cache.
pub trait Forward {
    /// The model's configuration.
    fn config(&self) -> &ModelConfig;
    /// One forward pass; see [`LlamaModel::forward`].
    fn forward(&mut self, kv: &mut KvCache, seqs: &[SeqInput<'_>]) -> Result<Vec<Vec<f32>>>;
    /// A KV cache for `max_tokens` tokens in blocks of `block_size` that this model can use.
    fn new_kv_cache(&self, max_tokens: usize, block_size: usize) -> KvCache;
}

impl Forward for LlamaModel {
    fn config(&self) -> &ModelConfig {
        LlamaModel::config(self)
    }
    fn forward(&mut self, kv: &mut KvCache, seqs: &[SeqInput<'_>]) -> Result<Vec<Vec<f32>>> {
        LlamaModel::forward(self, kv, seqs)
    }
    fn new_kv_cache(&self, max_tokens: usize, block_size: usize) -> KvCache {
        KvCache::new(LlamaModel::config(self), max_tokens, block_size)
    }
}

/// The serving model on its backend.
pub enum Model {
    /// f32 on the host.
    Cpu(Box<LlamaModel>),
    /// On an NVIDIA GPU.
    Cuda(CudaModel),
}

impl From<LlamaModel> for Model {
    fn from(m: LlamaModel) -> Self {
        Model::Cpu(Box::new(m))
    }
}

impl Forward for Model {
    fn config(&self) -> &ModelConfig {
        match self {
            Model::Cpu(m) => m.config(),
            Model::Cuda(m) => m.config(),
        }
    }
    fn forward(&mut self, kv: &mut KvCache, seqs: &[SeqInput<'_>]) -> Result<Vec<Vec<f32>>> {
        match self {
            Model::Cpu(m) => LlamaModel::forward(m, kv, seqs),
            Model::Cuda(m) => m.forward(kv, seqs),
        }
    }
    /// On the GPU the cache was sized when the model was placed; the arguments are ignored.
    fn new_kv_cache(&self, max_tokens: usize, block_size: usize) -> KvCache {
        match self {
            Model::Cpu(m) => KvCache::new(m.config(), max_tokens, block_size),
            Model::Cuda(m) => m.new_kv_cache(),
        }
    }
}
