//! The engine's request and event types: what the API edge hands to the scheduler once a wire
//! request is validated and tokenized, and what flows back per generated token.

use std::path::PathBuf;

use tokio::sync::mpsc;

/// Sampling settings, validated at the edge (ranges checked, defaults filled).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Most tokens to generate; 0 runs the prompt only (to score it with prompt log-probs).
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables.
    pub top_p: f32,
    /// Keep the k most likely tokens; 0 disables.
    pub top_k: usize,
    /// Drop tokens below `min_p * p_max`; 0 disables.
    pub min_p: f32,
    /// Multiplicative penalty (> 0) on tokens seen in the prompt or output; 1 disables.
    pub repetition_penalty: f32,
    /// Subtracted once per previous occurrence in the output.
    pub frequency_penalty: f32,
    /// Subtracted once if the token occurred in the output.
    pub presence_penalty: f32,
    /// Extra token ids that end generation (the matched id is returned).
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past the model's eos tokens.
    pub ignore_eos: bool,
    /// Seed for reproducible sampling; `None` draws one.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            seed: None,
        }
    }
}

/// Which log-probabilities to return.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogprobOptions {
    /// Return log-probs of prompt (from `logprob_start_len`) and output tokens.
    pub return_logprob: bool,
    /// First prompt position to report; `None` reports none of the prompt (SGLang's -1).
    pub logprob_start_len: Option<usize>,
    /// How many top alternatives to return per position.
    pub top_logprobs_num: usize,
}

/// A validated, tokenized generation request.
#[derive(Clone, Debug)]
pub struct EngineRequest {
    /// Prompt token ids (non-empty, inside the vocabulary).
    pub input_ids: Vec<u32>,
    /// Adapter name; `None` runs the base model.
    pub lora: Option<String>,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Log-prob settings.
    pub logprobs: LogprobOptions,
}

/// One token with its log-probability and, if asked, the top alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    /// The token.
    pub token_id: u32,
    /// Its log-probability under the model (before temperature and penalties).
    pub logprob: f32,
    /// `(token_id, logprob)` of the most likely tokens, best first.
    pub top: Vec<(u32, f32)>,
}

/// Why a request stopped.
#[derive(Clone, Debug, PartialEq)]
pub enum FinishReason {
    /// `max_new_tokens` reached, or the context is full.
    Length,
    /// An eos or stop token was generated (it is the last token of the output).
    Stop {
        /// The token that stopped it.
        token_id: u32,
    },
    /// The engine gave up on the request (the message says why).
    Abort(String),
}

/// What the engine sends back for one request, in order: `Started`, `Token`*, `Finished`.
#[derive(Clone, Debug, PartialEq)]
pub enum EngineEvent {
    /// The prompt is in the KV cache.
    Started {
        /// Prompt tokens served from the prefix cache.
        cached_tokens: usize,
        /// With `return_logprob`: one entry per prompt position from `logprob_start_len`
        /// (`None` for position 0, which has no context).
        input_logprobs: Vec<Option<TokenLogprob>>,
    },
    /// One generated token.
    Token(TokenLogprob),
    /// The request is done; nothing follows.
    Finished(FinishReason),
}

/// The receiving end of a request's events. Dropping it cancels the request.
pub type EventStream = mpsc::UnboundedReceiver<EngineEvent>;

/// An adapter the server knows, as `/load_lora_adapter` and `/v1/models` report it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterInfo {
    /// The name requests use.
    pub name: String,
    /// Where it was loaded from.
    pub path: PathBuf,
    /// Never evicted from the slot pool.
    pub pinned: bool,
}

/// Engine-side failures, each mapped to an HTTP status at the edge.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// The request cannot run (too long, bad ids, ...): 400.
    #[error("{0}")]
    InvalidRequest(String),
    /// The named adapter is not loaded: 400 (SGLang answers 400 too).
    #[error("LoRA adapter {0:?} is not loaded")]
    AdapterNotFound(String),
    /// Loading or unloading an adapter failed: reported as `success: false`.
    #[error("{0}")]
    Adapter(String),
    /// Too many requests queued: 503.
    #[error("server overloaded: {0}")]
    Overloaded(String),
    /// The engine thread is gone: 503.
    #[error("engine is shutting down")]
    ShuttingDown,
}
