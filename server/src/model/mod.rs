//! Models: configuration, weight loading, tokenization and the forward pass.

pub mod config;
pub mod gguf;
pub mod tokenizer;

pub use config::{Architecture, ModelConfig};
