//! Models: configuration, weight loading, tokenization and the forward pass.

pub mod config;
pub mod gguf;
pub mod llama;
pub mod loader;
pub mod tokenizer;
pub mod weights;

pub use config::{Architecture, ModelConfig};
pub use llama::LlamaModel;
