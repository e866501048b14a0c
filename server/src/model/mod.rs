//! Models: configuration, weight loading, tokenization and the forward pass.

pub mod config;
pub mod gguf;
pub mod llama;
pub mod loader;
pub mod presets;
pub mod tokenizer;
pub mod weights;

pub use config::{Architecture, ModelConfig};
pub use llama::LlamaModel;

use std::sync::Arc;

use crate::adapter::LoraAdapter;
use crate::backend::cuda::CudaModel;
use crate::engine::request::TokenLogprob;
use crate::engine::KvCache;
use crate::error::{Error, Result};
use llama::SeqInput;

/// How a model that samples on its device picks a sequence's next token in
/// [`Forward::forward_sampled`]: the request's settings, with the penalties' token history
/// when it has any, and this step's seed.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceSample {
    /// 0 (or below) is greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 disables, 1 is greedy.
    pub top_k: usize,
    /// Nucleus mass in (0, 1]; 1 disables.
    pub top_p: f32,
    /// Drop tokens below `min_p * p_max`; 0 disables.
    pub min_p: f32,
    /// This step's randomness, drawn from the request's generator.
    pub seed: u64,
    /// Repetition/frequency/presence penalties, when any is set.
    pub penalties: Option<DevicePenalties>,
    /// How many of the most likely tokens to return with their log-probabilities under the
    /// unmodified distribution, besides the drawn one (`TokenLogprob::top`); at most
    /// [`MAX_DEVICE_TOP_LOGPROBS`].
    pub top_logprobs: usize,
}

/// Most alternatives a device returns per sampled token ([`DeviceSample::top_logprobs`]); a
/// request asking for more is sampled from host logits.
pub const MAX_DEVICE_TOP_LOGPROBS: usize = 20;

/// A sequence's penalties and the token history they apply to, as the host applies them
/// (`engine::sampling`): repetition (HF/vLLM: positive logits divided, negative multiplied)
/// over every token of the prompt and the output, then frequency and presence (OpenAI: minus
/// `frequency · count + presence`) over the output's tokens.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DevicePenalties {
    /// 1 disables.
    pub repetition: f32,
    /// 0 disables.
    pub frequency: f32,
    /// 0 disables.
    pub presence: f32,
    /// Distinct tokens of the prompt and the output (only the output's when repetition is
    /// off), in ascending order.
    pub tokens: Vec<u32>,
    /// How often each of `tokens` occurs in the output.
    pub output_counts: Vec<u32>,
}

impl DevicePenalties {
    /// Applies these penalties to one row of logits, as the device's `penalize_f32`
    /// (`kernels/src/sampling.cu`) does: the host-side statement of what that kernel must do,
    /// which tests hold to the host sampler.
    pub fn apply(&self, logits: &mut [f32]) {
        for (&t, &c) in self.tokens.iter().zip(&self.output_counts) {
            let Some(v) = logits.get_mut(t as usize) else {
                continue;
            };
            if self.repetition != 1.0 {
                *v = if *v > 0.0 {
                    *v / self.repetition
                } else {
                    *v * self.repetition
                };
            }
            if c > 0 {
                *v -= self.frequency * c as f32 + self.presence;
            }
        }
    }
}

/// One sequence's share of [`Forward::forward_sampled`].
#[derive(Clone, Debug, PartialEq)]
pub enum SeqOutput {
    /// Its wanted logits, as [`Forward::forward`] returns them.
    Logits(Vec<f32>),
    /// Its next token, sampled by the model, with the log-probability under the unmodified
    /// distribution and the `top_logprobs` most likely alternatives it was asked for.
    Sampled(TokenLogprob),
}

/// A token the host does not know yet: the `k`-th token sampled by the model's last step
/// started with [`Forward::launch_sampled`], still in flight. The model reads it on its device,
/// so the next step can start before the host has seen the previous one's results.
pub fn pending_token(k: usize) -> u32 {
    u32::MAX - k as u32
}

/// Which sampled token of the last launched step `t` stands for, when it is a
/// [`pending_token`]. Vocabularies stay far below 2^31, so no real token id is in this range.
pub fn pending_index(t: u32) -> Option<usize> {
    (t >= 1 << 31).then(|| (u32::MAX - t) as usize)
}

/// Refuses a step that [`Forward::launch_sampled`] cannot run before the host has read the one
/// before it: a sequence neither sampled on the device without penalties or top log-probs
/// (whose tokens or alternatives the host must see between steps) nor wanting no logits.
pub fn check_launchable(seqs: &[SeqInput<'_>], sampling: &[Option<DeviceSample>]) -> Result<()> {
    let launchable = |(s, p): (&SeqInput<'_>, &Option<DeviceSample>)| match p {
        Some(p) => p.penalties.is_none() && p.top_logprobs == 0,
        None => s.logits == llama::LogitsWanted::None,
    };
    if sampling.len() != seqs.len() || !seqs.iter().zip(sampling).all(launchable) {
        return Err(Error::Model(
            "an overlapped step samples every sequence on the device, without penalties or top \
             log-probs, or wants no logits"
                .into(),
        ));
    }
    Ok(())
}

/// A model that runs mixed prefill/decode forward passes over a paged KV cache.
pub trait Forward {
    /// The model's configuration.
    fn config(&self) -> &ModelConfig;
    /// One forward pass; see [`LlamaModel::forward`].
    fn forward(&mut self, kv: &mut KvCache, seqs: &[SeqInput<'_>]) -> Result<Vec<Vec<f32>>>;
    /// A KV cache for `max_tokens` tokens in blocks of `block_size` that this model can use.
    fn new_kv_cache(&self, max_tokens: usize, block_size: usize) -> KvCache;
    /// Whether [`Forward::forward_sampled`] samples. Callers draw seeds only when it does, so
    /// that host sampling consumes each request's generator exactly as without it.
    fn samples_on_device(&self) -> bool {
        false
    }
    /// One forward pass in which each sequence with `Some` in `sampling` (one per sequence; such a
    /// sequence must want only its last logits) gets its next token sampled by the model, and
    /// every other sequence its logits. A model that does not sample returns logits for all.
    fn forward_sampled(
        &mut self,
        kv: &mut KvCache,
        seqs: &[SeqInput<'_>],
        sampling: &[Option<DeviceSample>],
    ) -> Result<Vec<SeqOutput>> {
        let _ = sampling;
        Ok(self
            .forward(kv, seqs)?
            .into_iter()
            .map(SeqOutput::Logits)
            .collect())
    }
    /// Whether the model runs [`Forward::launch_sampled`] steps: a step may start while the one
    /// before it is still computing, with that step's sampled tokens as [`pending_token`]s.
    /// Such a model also [samples on its device](Forward::samples_on_device).
    fn overlaps_steps(&self) -> bool {
        false
    }
    /// Starts a forward pass as [`Forward::forward_sampled`] would and returns before its
    /// results exist; [`Forward::collect_sampled`] returns them, oldest launch first. At most
    /// two launches are uncollected at once. The step passes [`check_launchable`]; its tokens
    /// may include [`pending_token`]s of the last launch, when that one is uncollected.
    fn launch_sampled(
        &mut self,
        kv: &mut KvCache,
        seqs: &[SeqInput<'_>],
        sampling: &[Option<DeviceSample>],
    ) -> Result<()> {
        let _ = (kv, seqs, sampling);
        Err(Error::Model("this model does not overlap steps".into()))
    }
    /// The results of the oldest uncollected [`Forward::launch_sampled`] step, one per
    /// sequence: its sampled token, or empty logits for a sequence that wanted none. Waits for
    /// them.
    fn collect_sampled(&mut self) -> Result<Vec<SeqOutput>> {
        Err(Error::Model("this model does not overlap steps".into()))
    }
    /// Copies `adapter` into LoRA slot `slot` of the model's device pool; the engine's adapter
    /// pool chose the slot, and no running sequence uses it. With `overlap` the copy may still
    /// be in flight on return (see [`Forward::slot_ready`]); without, it is done. A model whose
    /// adapters stay in host memory has nothing to copy.
    fn load_slot(&mut self, slot: usize, adapter: &Arc<LoraAdapter>, overlap: bool) -> Result<()> {
        let _ = (slot, adapter, overlap);
        Ok(())
    }
    /// Whether the last copy into `slot` has finished; with `wait`, waits for it first.
    fn slot_ready(&mut self, slot: usize, wait: bool) -> Result<bool> {
        let _ = (slot, wait);
        Ok(true)
    }
    /// Starts preparing `adapter` for fast slot loads (pinned host memory in the device's
    /// dtype) and returns at once, so that converting it is paid when it is registered, off the
    /// caller's thread, rather than when a request needs it.
    fn stage_adapter(&mut self, adapter: &Arc<LoraAdapter>) -> Result<()> {
        let _ = adapter;
        Ok(())
    }
    /// Frees what [`Forward::stage_adapter`] prepared for the adapter with id `adapter_id`
    /// ([`LoraAdapter::id`]): the engine no longer holds it in host memory (unloaded, or
    /// evicted over `--max-loaded-loras`). A copy still reading it keeps it until done.
    fn unstage_adapter(&mut self, adapter_id: u64) {
        let _ = adapter_id;
    }
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
    fn samples_on_device(&self) -> bool {
        matches!(self, Model::Cuda(_))
    }
    fn forward_sampled(
        &mut self,
        kv: &mut KvCache,
        seqs: &[SeqInput<'_>],
        sampling: &[Option<DeviceSample>],
    ) -> Result<Vec<SeqOutput>> {
        match self {
            Model::Cpu(m) => m.forward_sampled(kv, seqs, sampling),
            Model::Cuda(m) => m.forward_sampled(kv, seqs, sampling),
        }
    }
    fn overlaps_steps(&self) -> bool {
        matches!(self, Model::Cuda(_))
    }
    fn launch_sampled(
        &mut self,
        kv: &mut KvCache,
        seqs: &[SeqInput<'_>],
        sampling: &[Option<DeviceSample>],
    ) -> Result<()> {
        match self {
            Model::Cpu(m) => m.launch_sampled(kv, seqs, sampling),
            Model::Cuda(m) => m.launch_sampled(kv, seqs, sampling),
        }
    }
    fn collect_sampled(&mut self) -> Result<Vec<SeqOutput>> {
        match self {
            Model::Cpu(m) => m.collect_sampled(),
            Model::Cuda(m) => m.collect_sampled(),
        }
    }
    fn load_slot(&mut self, slot: usize, adapter: &Arc<LoraAdapter>, overlap: bool) -> Result<()> {
        match self {
            Model::Cpu(_) => Ok(()),
            Model::Cuda(m) => m.load_slot(slot, adapter, overlap),
        }
    }
    fn slot_ready(&mut self, slot: usize, wait: bool) -> Result<bool> {
        match self {
            Model::Cpu(_) => Ok(true),
            Model::Cuda(m) => m.slot_ready(slot, wait),
        }
    }
    fn stage_adapter(&mut self, adapter: &Arc<LoraAdapter>) -> Result<()> {
        match self {
            Model::Cpu(_) => Ok(()),
            Model::Cuda(m) => m.stage_adapter(adapter),
        }
    }
    fn unstage_adapter(&mut self, adapter_id: u64) {
        if let Model::Cuda(m) = self {
            m.unstage_adapter(adapter_id);
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
