//! The engine: KV cache and batched generation.
