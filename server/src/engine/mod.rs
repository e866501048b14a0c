//! The engine: continuous batching over a paged KV cache with a prefix cache, an adapter pool
//! (registry, host cache, bounded slot pool), sampling, and the handle the HTTP layer talks to.
//!
//! - [`handle::EngineHandle`]: submit requests, load and unload adapters (any thread).
//! - `scheduler`: the engine thread; admits requests FCFS with adapter-aware packing, runs
//!   one mixed prefill/decode forward pass per step, streams [`request::EngineEvent`]s back.
//! - `adapter_pool`: which adapters are registered, held in host memory, and in slots.
//! - [`kv_cache`]: paged token storage and reuse of prompt prefixes per adapter.

pub mod adapter_pool;
pub mod generate;
pub mod handle;
pub mod kv_cache;
pub mod request;
pub mod sampling;
mod scheduler;

use std::path::PathBuf;
use std::sync::Arc;

pub use handle::EngineHandle;
pub use kv_cache::{KvCache, SeqCache};

use crate::adapter::LoraTarget;
use crate::error::Result;
use crate::metrics::Metrics;
use crate::model::Forward;

/// Which unpinned adapter leaves a full pool first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EvictionPolicy {
    /// Least recently used.
    #[default]
    Lru,
    /// First loaded, first out.
    Fifo,
}

impl EvictionPolicy {
    /// The flag value (`lru` or `fifo`).
    pub fn as_str(self) -> &'static str {
        match self {
            EvictionPolicy::Lru => "lru",
            EvictionPolicy::Fifo => "fifo",
        }
    }
}

/// Engine limits, from the server's flags.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Slot pool size: distinct adapters one forward pass may use (`--max-loras-per-batch`).
    pub max_loras_per_batch: usize,
    /// Adapters kept in host memory (`--max-loaded-loras`); `None` is unbounded.
    pub max_loaded_loras: Option<usize>,
    /// Largest adapter rank accepted (`--max-lora-rank`); `None` accepts any.
    pub max_lora_rank: Option<usize>,
    /// Targets adapters may use (`--lora-target-modules`); `None` accepts all seven.
    pub lora_target_modules: Option<Vec<LoraTarget>>,
    /// Slot and host eviction policy (`--lora-eviction-policy`).
    pub eviction_policy: EvictionPolicy,
    /// Copy adapters into device slots while the batch runs (`--enable-lora-overlap-loading`).
    pub lora_overlap_loading: bool,
    /// Requests in the running batch at most (`--max-running-requests`).
    pub max_running_requests: usize,
    /// Requests waiting at most before new ones get 503.
    pub max_queued_requests: usize,
    /// KV cache capacity in tokens (`--max-total-tokens`).
    pub max_total_tokens: usize,
    /// Prompt tokens per forward pass at most (`--chunked-prefill-size`).
    pub chunked_prefill_size: usize,
    /// Longest prompt + output (`--context-length`).
    pub context_length: usize,
    /// Reuse cached prompt prefixes (off with `--disable-radix-cache`).
    pub prefix_cache: bool,
    /// Tokens per KV block.
    pub kv_block_size: usize,
    /// Launch each step before reading the one before it, where the model samples on its
    /// device (off with `--disable-overlap-schedule`).
    pub overlap_schedule: bool,
}

/// An adapter to load at start-up.
#[derive(Clone, Debug)]
pub struct AdapterSpec {
    /// Name requests use.
    pub name: String,
    /// PEFT directory.
    pub path: PathBuf,
    /// Keep it in the slot pool.
    pub pinned: bool,
}

/// Loads `adapters`, starts the engine thread and returns its handle. Any adapter that fails
/// to load, or more pinned adapters than `max_loras_per_batch - 1`, stops start-up. The server
/// passes a [`Model`](crate::model::Model); tests may pass any [`Forward`] (for instance one
/// whose slot copies stay in flight for a while).
pub fn start<M: Forward + Send + 'static>(
    model: M,
    config: EngineConfig,
    adapters: Vec<AdapterSpec>,
    metrics: Arc<Metrics>,
) -> Result<EngineHandle> {
    scheduler::spawn(model, config, adapters, metrics)
}
