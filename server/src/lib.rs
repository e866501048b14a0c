//! loraplane-server: one base model, many LoRA adapters, one batched forward pass.
//!
//! The crate is layered like the request path:
//! - [`args`]: the command line (SGLang's flag names), validated once into the server's config.
//! - [`api`]: the HTTP edge (axum): SGLang's native endpoints and the OpenAI-compatible `/v1`;
//!   requests are validated and tokenized here, once.
//! - [`engine`]: continuous batching over a paged KV cache with a prefix cache, the adapter pool
//!   (registry, host cache, slot pool) and sampling, behind a cloneable handle.
//! - [`model`]: configs, weight loaders (HF safetensors, GGUF), tokenizer and chat template, and the
//!   Llama-family forward pass over a mixed batch of sequences.
//! - [`adapter`]: PEFT LoRA adapters, validated against the base model at load.
//! - [`backend`]: the compute primitives (CPU GEMM, norms, attention) the model calls.
//! - [`metrics`]: the Prometheus metrics the engine updates and `/metrics` renders.
#![deny(missing_docs)]

pub mod adapter;
pub mod api;
pub mod args;
pub mod backend;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod model;
pub mod tensor;

pub use error::{Error, Result};
pub use tensor::Tensor;
