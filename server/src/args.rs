//! The command line: SGLang's `launch_server` flag names (so SGLang users keep their scripts),
//! parsed with clap and validated once into a [`ServerConfig`]. Contradictions are refused here,
//! before the model loads, with a message naming the flag; [`ServerConfig::engine_config`] fills in
//! what depends on the model (its context length) and builds the engine's [`EngineConfig`].

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

use crate::adapter::LoraTarget;
use crate::backend::cuda::DeviceDtype;
use crate::engine::{AdapterSpec, EngineConfig, EvictionPolicy};
use crate::model::ModelConfig;

/// KV cache capacity on the CPU when `--max-total-tokens` is not given (tokens of host memory).
pub const DEFAULT_MAX_TOTAL_TOKENS: usize = 32768;
/// Share of the GPU's memory for the weights, the adapter pool and the KV cache when
/// `--mem-fraction-static` is not given: SGLang's choice on an 80 GB GPU. The rest is left to
/// CUDA graphs, cuBLAS and activations that grow while serving.
pub const DEFAULT_MEM_FRACTION_STATIC: f64 = 0.87;
/// Tokens per KV cache block.
pub const KV_BLOCK_SIZE: usize = 16;

/// `loraplane-server`: serve HTTP (no subcommand) or run one batch (`generate`).
#[derive(Parser, Debug)]
#[command(
    name = "loraplane-server",
    version,
    about = "Serve many LoRA adapters on one base model, with SGLang's HTTP API",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    /// A one-shot command instead of the server.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The server's flags (used when no subcommand is given).
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate greedy answers for a batch of prompts, each with its own adapter, in one batch.
    Generate(GenerateArgs),
}

/// Flags of `loraplane-server generate`.
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// Model: an HF directory (config.json, safetensors, tokenizer.json) or a .gguf file.
    #[arg(long)]
    pub model_path: PathBuf,
    /// Adapters to load, each `NAME=PATH` (a PEFT directory).
    #[arg(long, num_args = 1..)]
    pub lora_paths: Vec<String>,
    /// A prompt; repeat for a batch.
    #[arg(long, required = true)]
    pub prompt: Vec<String>,
    /// The adapter for each prompt, in order (`base` or omitted: the base model).
    #[arg(long)]
    pub lora: Vec<String>,
    /// Wrap each prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Most tokens to generate per prompt.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
}

/// Which kernels run the LoRA GEMMs. On the CPU both run the same per-segment path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LoraBackend {
    /// Chunked SGMV (SGLang's default).
    Csgmv,
    /// SGLang's Triton kernels.
    Triton,
}

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// The CPU backend.
    Cpu,
    /// An NVIDIA GPU (device 0), through the CUDA backend.
    Cuda,
}

/// Compute precision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Dtype {
    /// The device's native precision (float32 on the CPU, bfloat16 on the GPU).
    Auto,
    /// 32-bit floats.
    #[value(alias = "float", alias = "fp32")]
    Float32,
    /// bfloat16 (GPU only).
    #[value(alias = "bf16")]
    Bfloat16,
    /// float16 (GPU only).
    #[value(alias = "half", alias = "fp16")]
    Float16,
}

/// How weights are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LoadFormat {
    /// From the model path (HF safetensors directory or GGUF file).
    Auto,
    /// Random weights of a config's shapes (benchmarks): --model-path is an HF directory, a
    /// config.json, or a preset name such as Llama-3.1-8B. The tokenizer is read when the
    /// directory has one; without it the server takes token ids only.
    Dummy,
}

/// Flags of the HTTP server (SGLang's names and defaults where they apply on the CPU).
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// The model: a Hugging Face directory (config.json, *.safetensors, tokenizer.json) or a
    /// single .gguf file.
    #[arg(long, alias = "model", required = true, value_name = "PATH")]
    pub model_path: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one and logs it).
    #[arg(long, default_value_t = 30000)]
    pub port: u16,
    /// The model name the OpenAI API reports and accepts [default: the model directory's name or
    /// the GGUF file's stem].
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,

    /// Enable LoRA serving (turned on by --lora-paths). Needed to load adapters at runtime with
    /// /load_lora_adapter when none are given at start-up.
    #[arg(long, help_heading = "LoRA")]
    pub enable_lora: bool,
    /// Adapters to load at start-up, each `PATH` (named after its last path component),
    /// `NAME=PATH`, or JSON `{"lora_name":..,"lora_path":..,"pinned":..}`.
    #[arg(long, num_args = 1.., value_name = "ADAPTER", help_heading = "LoRA")]
    pub lora_paths: Vec<String>,
    /// Distinct adapters one batch may use (the adapter slot pool) [default: 8].
    #[arg(long, value_name = "N", help_heading = "LoRA")]
    pub max_loras_per_batch: Option<usize>,
    /// Adapters held in host memory at most (least recently used leave first and reload on
    /// demand); at least --max-loras-per-batch [default: unlimited].
    #[arg(long, value_name = "N", help_heading = "LoRA")]
    pub max_loaded_loras: Option<usize>,
    /// Largest adapter rank accepted; adapters of higher rank are refused at load
    /// [default: any].
    #[arg(long, value_name = "R", help_heading = "LoRA")]
    pub max_lora_rank: Option<usize>,
    /// Projections adapters may target (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj,
    /// qkv_proj, gate_up_proj) or `all`; adapters targeting others are refused at load
    /// [default: all].
    #[arg(long, num_args = 1.., value_name = "MODULE", help_heading = "LoRA")]
    pub lora_target_modules: Vec<String>,
    /// LoRA GEMM backend. On the CPU both names run the same per-segment kernels.
    #[arg(
        long,
        value_enum,
        default_value = "csgmv",
        value_name = "BACKEND",
        help_heading = "LoRA"
    )]
    pub lora_backend: LoraBackend,
    /// Which unpinned adapter leaves a full slot pool or host cache first: `lru` or `fifo`.
    #[arg(
        long,
        value_parser = parse_eviction_policy,
        default_value = "lru",
        value_name = "POLICY",
        help_heading = "LoRA"
    )]
    pub lora_eviction_policy: EvictionPolicy,
    /// Copy adapters into their device slots on a side stream from pinned host memory while the
    /// running batch computes; a request joins the batch once its adapter's copy is done. Keeps
    /// pinned copies of up to 2 × --max-loras-per-batch adapters, only of adapters held in host
    /// memory, so --max-loaded-loras defaults to (and may not exceed) that (needs --device cuda).
    #[arg(long, help_heading = "LoRA")]
    pub enable_lora_overlap_loading: bool,
    /// Largest token chunk of the chunked-SGMV kernels: a power of two from 16 to 128.
    #[arg(long, default_value_t = 16, value_name = "N", help_heading = "LoRA")]
    pub max_lora_chunk_size: usize,

    /// Requests in the running batch at most.
    #[arg(long, default_value_t = 64, value_name = "N", help_heading = "Scheduling")]
    pub max_running_requests: usize,
    /// Requests waiting for admission at most; more are answered 503.
    #[arg(long, default_value_t = 1024, value_name = "N", help_heading = "Scheduling")]
    pub max_queued_requests: usize,
    /// Longest prompt + output in tokens [default: the model's max_position_embeddings, capped by
    /// the KV cache's capacity].
    #[arg(long, value_name = "TOKENS", help_heading = "Scheduling")]
    pub context_length: Option<usize>,
    /// KV cache capacity in tokens, shared by all running requests [default: 32768 on the CPU;
    /// on the GPU as many as --mem-fraction-static leaves room for, and at most this when given].
    #[arg(long, value_name = "TOKENS", help_heading = "Scheduling")]
    pub max_total_tokens: Option<usize>,
    /// Prompt tokens per forward pass at most (longer prompts are prefilled in chunks); -1 turns
    /// chunking off.
    #[arg(
        long,
        default_value_t = 512,
        value_name = "TOKENS",
        allow_negative_numbers = true,
        help_heading = "Scheduling"
    )]
    pub chunked_prefill_size: i64,
    /// Do not reuse cached prompt prefixes.
    #[arg(long, help_heading = "Scheduling")]
    pub disable_radix_cache: bool,
    /// Run each GPU step only after the host has read the one before it (by default the next
    /// step is launched first, hiding the host's share of each step).
    #[arg(long, help_heading = "Scheduling")]
    pub disable_overlap_schedule: bool,

    /// Tensor parallel degree (only 1 is implemented).
    #[arg(
        long,
        alias = "tp",
        default_value_t = 1,
        value_name = "N",
        help_heading = "Hardware"
    )]
    pub tp_size: usize,
    /// Where the model runs.
    #[arg(long, value_enum, default_value = "cpu", help_heading = "Hardware")]
    pub device: Device,
    /// Compute precision; the CPU computes in float32.
    #[arg(long, value_enum, default_value = "auto", help_heading = "Hardware")]
    pub dtype: Dtype,
    /// How to read the weights.
    #[arg(long, value_enum, default_value = "auto", help_heading = "Hardware")]
    pub load_format: LoadFormat,
    /// Load no tokenizer: requests give `input_ids` and responses carry `output_ids` only
    /// (SGLang's flag; implied by --load-format dummy without a tokenizer).
    #[arg(long, help_heading = "Hardware")]
    pub skip_tokenizer_init: bool,

    /// Require `Authorization: Bearer <KEY>` on every endpoint but /health and /metrics.
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Log level (RUST_LOG, when set, takes precedence).
    #[arg(long, default_value = "info", value_name = "LEVEL")]
    pub log_level: String,

    /// Accepted for SGLang compatibility; ignored (there is no remote code to trust).
    #[arg(long, hide = true)]
    pub trust_remote_code: bool,
    /// Run every decode step eagerly instead of replaying CUDA graphs (--device cuda).
    #[arg(long)]
    pub disable_cuda_graph: bool,
    /// Largest decode batch replayed from a CUDA graph (--device cuda) [default: 256].
    #[arg(long, value_name = "N")]
    pub cuda_graph_max_bs: Option<usize>,
    /// Share of the GPU's memory for the weights, the adapter pool and the KV cache, which gets
    /// what the other two leave (--device cuda) [default: 0.87]. Lower it if serving runs out
    /// of memory.
    #[arg(long, value_name = "FRACTION", help_heading = "Hardware")]
    pub mem_fraction_static: Option<f64>,
}

fn parse_eviction_policy(s: &str) -> Result<EvictionPolicy, String> {
    match s {
        "lru" => Ok(EvictionPolicy::Lru),
        "fifo" => Ok(EvictionPolicy::Fifo),
        other => Err(format!("{other:?} is not an eviction policy: use lru or fifo")),
    }
}

/// A start-up flag that cannot be honoured; the message names the flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ArgError(pub String);

fn bad(msg: impl Into<String>) -> ArgError {
    ArgError(msg.into())
}

/// Default for `--cuda-graph-max-bs`.
pub const DEFAULT_CUDA_GRAPH_MAX_BS: usize = 256;

/// Where and in what precision the model runs, after validation.
#[derive(Debug, Clone, Copy)]
pub struct DeviceSettings {
    /// `--device cuda`.
    pub cuda: bool,
    /// Element type of weights and activations: float32 on the CPU; bfloat16 (the default),
    /// float16 or float32 on the GPU.
    pub dtype: DeviceDtype,
    /// Largest CUDA-graph decode batch; 0 with `--disable-cuda-graph`.
    pub cuda_graph_max_bs: usize,
}

/// LoRA settings after validation.
#[derive(Debug, Clone)]
pub struct LoraSettings {
    /// LoRA serving is on (`--enable-lora` or `--lora-paths`).
    pub enabled: bool,
    /// Adapters to load at start-up, in flag order.
    pub adapters: Vec<AdapterSpec>,
    /// `--max-loras-per-batch`.
    pub max_loras_per_batch: usize,
    /// `--max-loaded-loras`.
    pub max_loaded_loras: Option<usize>,
    /// `--max-lora-rank`.
    pub max_lora_rank: Option<usize>,
    /// `--lora-target-modules`; `None` is all seven.
    pub target_modules: Option<Vec<LoraTarget>>,
    /// `--lora-backend`.
    pub backend: LoraBackend,
    /// `--lora-eviction-policy`.
    pub eviction_policy: EvictionPolicy,
    /// `--max-lora-chunk-size`.
    pub max_chunk_size: usize,
    /// `--enable-lora-overlap-loading`.
    pub overlap_loading: bool,
}

/// The validated server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `--model-path`.
    pub model_path: PathBuf,
    /// `--host`.
    pub host: String,
    /// `--port`.
    pub port: u16,
    /// `--served-model-name` (`None`: the model's own name).
    pub served_model_name: Option<String>,
    /// The LoRA flags.
    pub lora: LoraSettings,
    /// `--max-running-requests`.
    pub max_running_requests: usize,
    /// `--max-queued-requests`.
    pub max_queued_requests: usize,
    /// `--context-length` (`None`: from the model).
    pub context_length: Option<usize>,
    /// `--max-total-tokens` (`None`: 32768 on the CPU, sized from memory on the GPU).
    pub max_total_tokens: Option<usize>,
    /// `--mem-fraction-static` (the GPU's KV budget).
    pub mem_fraction_static: f64,
    /// `--chunked-prefill-size` (`None`: no chunking).
    pub chunked_prefill_size: Option<usize>,
    /// Off with `--disable-radix-cache`.
    pub prefix_cache: bool,
    /// Off with `--disable-overlap-schedule`.
    pub overlap_schedule: bool,
    /// `--api-key`.
    pub api_key: Option<String>,
    /// `--log-level`.
    pub log_level: String,
    /// `--device`, `--dtype` and the CUDA graph flags.
    pub device: DeviceSettings,
    /// `--load-format dummy`.
    pub dummy_weights: bool,
    /// `--skip-tokenizer-init`.
    pub skip_tokenizer_init: bool,
}

impl ServeArgs {
    /// Checks every flag and their combinations; the first problem found is returned.
    pub fn validate(&self) -> Result<ServerConfig, ArgError> {
        let model_path = self
            .model_path
            .clone()
            .ok_or_else(|| bad("--model-path is required to serve"))?;
        if self.tp_size != 1 {
            return Err(bad(format!(
                "--tp-size {}: tensor parallelism is not implemented; use --tp-size 1",
                self.tp_size
            )));
        }
        let cuda = self.device == Device::Cuda;
        let dtype_name = self
            .dtype
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default();
        let dtype = match (cuda, self.dtype) {
            (false, Dtype::Auto | Dtype::Float32) => DeviceDtype::Float32,
            (false, _) => {
                return Err(bad(format!(
                    "--dtype {dtype_name}: the CPU backend computes in float32; use --dtype auto or float32"
                )))
            }
            (true, Dtype::Auto | Dtype::Bfloat16) => DeviceDtype::Bfloat16,
            (true, Dtype::Float16) => DeviceDtype::Float16,
            (true, Dtype::Float32) => DeviceDtype::Float32,
        };
        let device = DeviceSettings {
            cuda,
            dtype,
            cuda_graph_max_bs: if self.disable_cuda_graph {
                0
            } else {
                self.cuda_graph_max_bs.unwrap_or(DEFAULT_CUDA_GRAPH_MAX_BS)
            },
        };
        if let Some(name) = &self.served_model_name {
            if name.trim().is_empty() {
                return Err(bad("--served-model-name must not be empty"));
            }
            if name.contains(':') {
                return Err(bad(format!(
                    "--served-model-name {name:?} must not contain ':' (the OpenAI API reads \
                     `model` as `<base>:<adapter>`)"
                )));
            }
        }
        if let Some(key) = &self.api_key {
            if key.is_empty() {
                return Err(bad("--api-key must not be empty"));
            }
        }
        let lora = self.lora_settings(cuda)?;
        if self.max_running_requests == 0 {
            return Err(bad("--max-running-requests must be at least 1"));
        }
        if self.max_queued_requests == 0 {
            return Err(bad("--max-queued-requests must be at least 1"));
        }
        if self.max_total_tokens.is_some_and(|t| t < 2) {
            return Err(bad("--max-total-tokens must be at least 2"));
        }
        let mem_fraction_static = self.mem_fraction_static.unwrap_or(DEFAULT_MEM_FRACTION_STATIC);
        if !(mem_fraction_static > 0.0 && mem_fraction_static < 1.0) {
            return Err(bad(format!(
                "--mem-fraction-static {mem_fraction_static}: use a share of the GPU's memory \
                 between 0 and 1, such as 0.8"
            )));
        }
        if let Some(c) = self.context_length {
            if c < 2 {
                return Err(bad(
                    "--context-length must be at least 2 (one prompt token and one generated token)",
                ));
            }
            let kv_bound = self
                .max_total_tokens
                .or((!cuda).then_some(DEFAULT_MAX_TOTAL_TOKENS));
            if let Some(t) = kv_bound.filter(|&t| c > t) {
                return Err(bad(format!(
                    "--context-length {c} exceeds --max-total-tokens {t}: a request of full length \
                     could never fit in the KV cache; raise --max-total-tokens or lower --context-length"
                )));
            }
        }
        let chunked_prefill_size = match self.chunked_prefill_size {
            -1 => None,
            n if n >= 1 => Some(n as usize),
            n => {
                return Err(bad(format!(
                    "--chunked-prefill-size {n}: use a positive number of tokens, or -1 to turn chunking off"
                )))
            }
        };
        Ok(ServerConfig {
            model_path,
            host: self.host.clone(),
            port: self.port,
            served_model_name: self.served_model_name.clone(),
            lora,
            max_running_requests: self.max_running_requests,
            max_queued_requests: self.max_queued_requests,
            context_length: self.context_length,
            max_total_tokens: self.max_total_tokens,
            mem_fraction_static,
            chunked_prefill_size,
            prefix_cache: !self.disable_radix_cache,
            overlap_schedule: !self.disable_overlap_schedule,
            api_key: self.api_key.clone(),
            log_level: self.log_level.clone(),
            device,
            dummy_weights: self.load_format == LoadFormat::Dummy,
            skip_tokenizer_init: self.skip_tokenizer_init,
        })
    }

    fn lora_settings(&self, cuda: bool) -> Result<LoraSettings, ArgError> {
        let enabled = self.enable_lora || !self.lora_paths.is_empty();
        if !enabled {
            // Flags that only mean something with adapters: SGLang ignores them silently, which
            // hides a forgotten --enable-lora until the first /load_lora_adapter.
            let lora_only = [
                ("--max-loaded-loras", self.max_loaded_loras.is_some()),
                ("--max-lora-rank", self.max_lora_rank.is_some()),
                ("--lora-target-modules", !self.lora_target_modules.is_empty()),
                ("--enable-lora-overlap-loading", self.enable_lora_overlap_loading),
            ];
            if let Some((flag, _)) = lora_only.iter().find(|(_, given)| *given) {
                return Err(bad(format!(
                    "{flag} needs LoRA serving: add --enable-lora (or give adapters with --lora-paths)"
                )));
            }
        }
        let max_loras_per_batch = self.max_loras_per_batch.unwrap_or(8);
        if max_loras_per_batch == 0 {
            return Err(bad("--max-loras-per-batch must be at least 1"));
        }
        let chunk = self.max_lora_chunk_size;
        if !(16..=128).contains(&chunk) || !chunk.is_power_of_two() {
            return Err(bad(format!(
                "--max-lora-chunk-size {chunk}: use a power of two from 16 to 128 (16, 32, 64 or 128)"
            )));
        }
        if self.max_lora_rank == Some(0) {
            return Err(bad("--max-lora-rank must be at least 1"));
        }
        let mut adapters = Vec::new();
        let mut names = HashSet::new();
        for item in &self.lora_paths {
            let spec = parse_lora_path(item)?;
            if !names.insert(spec.name.clone()) {
                return Err(bad(format!(
                    "--lora-paths names adapter {:?} twice; give each adapter a distinct name with NAME=PATH",
                    spec.name
                )));
            }
            adapters.push(spec);
        }
        let mut max_loaded_loras = self.max_loaded_loras;
        if self.enable_lora_overlap_loading {
            if !cuda {
                return Err(bad(
                    "--enable-lora-overlap-loading needs --device cuda: the CPU backend uses adapters \
                     from host memory, so there is no copy to overlap",
                ));
            }
            // Pinned host copies are kept for this many adapters (SGLang's limit).
            let cap = 2 * max_loras_per_batch;
            match max_loaded_loras {
                Some(n) if n > cap => {
                    return Err(bad(format!(
                        "--max-loaded-loras {n} exceeds 2 × --max-loras-per-batch = {cap}, the most \
                         adapters --enable-lora-overlap-loading keeps in pinned host memory"
                    )))
                }
                Some(_) => {}
                None => max_loaded_loras = Some(cap),
            }
        }
        if let Some(max_loaded) = max_loaded_loras {
            if max_loaded < max_loras_per_batch {
                return Err(bad(format!(
                    "--max-loaded-loras {max_loaded} is below --max-loras-per-batch {max_loras_per_batch}: \
                     every adapter in a batch must also be held in host memory"
                )));
            }
            if adapters.len() > max_loaded {
                return Err(bad(format!(
                    "--lora-paths gives {} adapters but --max-loaded-loras is {max_loaded}",
                    adapters.len()
                )));
            }
        }
        let pinned = adapters.iter().filter(|a| a.pinned).count();
        if pinned > max_loras_per_batch - 1 {
            return Err(bad(format!(
                "--lora-paths pins {pinned} adapters but at most --max-loras-per-batch - 1 = {} may be \
                 pinned (one slot must stay free for the others)",
                max_loras_per_batch - 1
            )));
        }
        Ok(LoraSettings {
            enabled,
            adapters,
            max_loras_per_batch,
            max_loaded_loras,
            max_lora_rank: self.max_lora_rank,
            target_modules: parse_target_modules(&self.lora_target_modules)?,
            backend: self.lora_backend,
            eviction_policy: self.lora_eviction_policy,
            max_chunk_size: chunk,
            overlap_loading: self.enable_lora_overlap_loading,
        })
    }
}

/// One `--lora-paths` item: `PATH`, `NAME=PATH` or `{"lora_name":..,"lora_path":..,"pinned":..}`.
pub fn parse_lora_path(item: &str) -> Result<AdapterSpec, ArgError> {
    let item = item.trim();
    if item.starts_with('{') {
        return parse_lora_json(item);
    }
    if item.starts_with(crate::adapter::DUMMY_SCHEME) {
        return Err(bad(format!(
            "--lora-paths item {item:?}: a dummy adapter needs a name: NAME={item}"
        )));
    }
    let (name, path) = match item.split_once('=') {
        Some((name, path)) => (name.trim().to_string(), path.trim()),
        None => {
            let name = Path::new(item.trim_end_matches('/'))
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (name, item)
        }
    };
    if name.is_empty() {
        return Err(bad(format!(
            "--lora-paths item {item:?} has no adapter name; use NAME=PATH"
        )));
    }
    if path.is_empty() {
        return Err(bad(format!(
            "--lora-paths item {item:?} has no path; use NAME=PATH"
        )));
    }
    Ok(AdapterSpec {
        name,
        path: PathBuf::from(path),
        pinned: false,
    })
}

fn parse_lora_json(item: &str) -> Result<AdapterSpec, ArgError> {
    let value: Value = serde_json::from_str(item)
        .map_err(|e| bad(format!("--lora-paths item {item}: invalid JSON: {e}")))?;
    let obj = value.as_object().expect("starts with '{'");
    if let Some(key) = obj
        .keys()
        .find(|k| !["lora_name", "lora_path", "pinned"].contains(&k.as_str()))
    {
        return Err(bad(format!(
            "--lora-paths item {item}: unknown key {key:?} (expected lora_name, lora_path, pinned)"
        )));
    }
    let text = |key: &str| -> Result<String, ArgError> {
        match obj.get(key) {
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.trim().to_string()),
            Some(Value::String(_)) | None | Some(Value::Null) => {
                Err(bad(format!("--lora-paths item {item}: {key} is required")))
            }
            Some(_) => Err(bad(format!("--lora-paths item {item}: {key} must be a string"))),
        }
    };
    let pinned = match obj.get("pinned") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(bad(format!(
                "--lora-paths item {item}: pinned must be true or false"
            )))
        }
    };
    Ok(AdapterSpec {
        name: text("lora_name")?,
        path: PathBuf::from(text("lora_path")?),
        pinned,
    })
}

/// `--lora-target-modules`: short names, SGLang's fused names, or `all`.
pub fn parse_target_modules(items: &[String]) -> Result<Option<Vec<LoraTarget>>, ArgError> {
    if items.is_empty() || items.iter().any(|m| m == "all") {
        if items.len() > 1 && items.iter().any(|m| m == "all") {
            return Err(bad(
                "--lora-target-modules: `all` cannot be combined with other modules",
            ));
        }
        return Ok(None);
    }
    let mut out: Vec<LoraTarget> = Vec::new();
    for m in items {
        let targets: Vec<LoraTarget> = match m.as_str() {
            "qkv_proj" => vec![LoraTarget::QProj, LoraTarget::KProj, LoraTarget::VProj],
            "gate_up_proj" => vec![LoraTarget::GateProj, LoraTarget::UpProj],
            name => match LoraTarget::from_name(name) {
                Some(t) => vec![t],
                None => {
                    let valid: Vec<&str> = LoraTarget::ALL.iter().map(|t| t.name()).collect();
                    return Err(bad(format!(
                        "--lora-target-modules: {name:?} is not supported; use {}, qkv_proj, gate_up_proj or all",
                        valid.join(", ")
                    )));
                }
            },
        };
        for t in targets {
            if !out.contains(&t) {
                out.push(t);
            }
        }
    }
    out.sort();
    Ok(Some(out))
}

impl ServerConfig {
    /// The KV cache's capacity as far as the flags say: `--max-total-tokens`, else 32768 on the
    /// CPU; on the GPU without the flag, unbounded until the device sizes the cache from its
    /// memory ([`Self::engine_config`] is then called again with the tokens that fit).
    pub fn kv_tokens_bound(&self) -> usize {
        match (self.max_total_tokens, self.device.cuda) {
            (Some(t), _) => t,
            (None, false) => DEFAULT_MAX_TOTAL_TOKENS,
            (None, true) => usize::MAX,
        }
    }

    /// The engine's limits for `model` with a KV cache of `kv_tokens`: the context length
    /// defaults to the model's `max_position_embeddings`, capped by the cache.
    pub fn engine_config(&self, model: &ModelConfig, kv_tokens: usize) -> Result<EngineConfig, ArgError> {
        let model_max = model.max_position_embeddings;
        let context_length = match self.context_length {
            Some(c) if c > model_max => {
                return Err(bad(format!(
                    "--context-length {c} exceeds the model's max_position_embeddings {model_max}"
                )))
            }
            Some(c) if c > kv_tokens => {
                let why = if self.max_total_tokens.is_none() && self.device.cuda {
                    format!(
                        "what --mem-fraction-static {} leaves on the GPU after the weights and the \
                         adapter pool; lower --max-loras-per-batch or --max-lora-rank, or raise \
                         --mem-fraction-static",
                        self.mem_fraction_static
                    )
                } else {
                    "--max-total-tokens".to_string()
                };
                return Err(bad(format!(
                    "--context-length {c} exceeds the KV cache's {kv_tokens} tokens ({why}): a \
                     request of full length could never fit"
                )));
            }
            Some(c) => c,
            None => model_max.min(kv_tokens),
        };
        Ok(EngineConfig {
            max_loras_per_batch: self.lora.max_loras_per_batch,
            max_loaded_loras: self.lora.max_loaded_loras,
            max_lora_rank: self.lora.max_lora_rank,
            lora_target_modules: self.lora.target_modules.clone(),
            eviction_policy: self.lora.eviction_policy,
            lora_overlap_loading: self.lora.overlap_loading,
            max_running_requests: self.max_running_requests,
            max_queued_requests: self.max_queued_requests,
            max_total_tokens: kv_tokens,
            chunked_prefill_size: self.chunked_prefill_size.unwrap_or(context_length),
            context_length,
            prefix_cache: self.prefix_cache,
            kv_block_size: KV_BLOCK_SIZE,
            overlap_schedule: self.overlap_schedule,
        })
    }

    /// The effective flags as `/get_server_info` reports them (SGLang's key names; the API key
    /// is never echoed).
    pub fn to_json(&self, engine: &EngineConfig, served_model_name: &str) -> Value {
        let lora = &self.lora;
        json!({
            "model_path": self.model_path,
            "tokenizer_path": self.model_path,
            "served_model_name": served_model_name,
            "host": self.host,
            "port": self.port,
            "enable_lora": lora.enabled,
            "lora_paths": lora.adapters.iter().map(|a| json!({
                "lora_name": a.name, "lora_path": a.path, "pinned": a.pinned,
            })).collect::<Vec<_>>(),
            "max_loras_per_batch": lora.max_loras_per_batch,
            "max_loaded_loras": lora.max_loaded_loras,
            "max_lora_rank": lora.max_lora_rank,
            "lora_target_modules": lora.target_modules.as_ref().map(|ts| {
                ts.iter().map(|t| t.name()).collect::<Vec<_>>()
            }),
            "lora_backend": lora.backend.to_possible_value().map(|v| v.get_name().to_string()),
            "lora_eviction_policy": lora.eviction_policy.as_str(),
            "enable_lora_overlap_loading": lora.overlap_loading,
            "max_lora_chunk_size": lora.max_chunk_size,
            "max_running_requests": engine.max_running_requests,
            "max_queued_requests": engine.max_queued_requests,
            "context_length": engine.context_length,
            "max_total_tokens": engine.max_total_tokens,
            "mem_fraction_static": if self.device.cuda { Some(self.mem_fraction_static) } else { None },
            "chunked_prefill_size": engine.chunked_prefill_size,
            "disable_radix_cache": !engine.prefix_cache,
            "disable_overlap_schedule": !engine.overlap_schedule,
            "page_size": engine.kv_block_size,
            "tp_size": 1,
            "device": if self.device.cuda { "cuda" } else { "cpu" },
            "dtype": self.device.dtype.name(),
            "cuda_graph_max_bs": if self.device.cuda { self.device.cuda_graph_max_bs } else { 0 },
            "disable_cuda_graph": !self.device.cuda || self.device.cuda_graph_max_bs == 0,
            "load_format": if self.dummy_weights { "dummy" } else { "auto" },
            "skip_tokenizer_init": self.skip_tokenizer_init,
            "api_key_set": self.api_key.is_some(),
            "log_level": self.log_level,
            "version": env!("CARGO_PKG_VERSION"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("loraplane-server").chain(args.iter().copied()))
    }

    fn serve(args: &[&str]) -> Result<ServerConfig, ArgError> {
        let mut full = vec!["--model-path", "/m"];
        full.extend_from_slice(args);
        parse(&full).expect("clap accepts").serve.validate()
    }

    fn err(args: &[&str]) -> String {
        serve(args).expect_err("must be refused").0
    }

    #[test]
    fn defaults_match_sglang() {
        let c = serve(&[]).unwrap();
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 30000));
        assert!(!c.lora.enabled);
        assert_eq!(c.lora.max_loras_per_batch, 8);
        assert_eq!(c.lora.backend, LoraBackend::Csgmv);
        assert_eq!(c.lora.eviction_policy, EvictionPolicy::Lru);
        assert_eq!(c.lora.max_chunk_size, 16);
        assert_eq!(c.max_running_requests, 64);
        assert_eq!(c.chunked_prefill_size, Some(512));
        assert!(c.prefix_cache);
    }

    #[test]
    fn lora_paths_in_every_format_and_auto_enable() {
        let c = serve(&[
            "--lora-paths",
            "/a/b/qv_r2/",
            "x=/p/x",
            r#"{"lora_name":"y","lora_path":"/p/y","pinned":true}"#,
            "z=dummy://?rank=8&seed=2",
        ])
        .unwrap();
        assert!(c.lora.enabled);
        let got: Vec<(&str, &str, bool)> = c
            .lora
            .adapters
            .iter()
            .map(|a| (a.name.as_str(), a.path.to_str().unwrap(), a.pinned))
            .collect();
        assert_eq!(
            got,
            [
                ("qv_r2", "/a/b/qv_r2/", false),
                ("x", "/p/x", false),
                ("y", "/p/y", true),
                ("z", "dummy://?rank=8&seed=2", false)
            ]
        );
    }

    #[test]
    fn bad_lora_items_are_refused_by_name() {
        assert!(err(&["--lora-paths", "a=/x", "a=/y"]).contains("twice"));
        assert!(err(&["--lora-paths", "=/x"]).contains("no adapter name"));
        assert!(err(&["--lora-paths", "dummy://?rank=4"]).contains("NAME=dummy://?rank=4"));
        assert!(err(&["--lora-paths", r#"{"lora_name":"a"}"#]).contains("lora_path is required"));
        assert!(
            err(&["--lora-paths", r#"{"lora_name":"a","lora_path":"/x","pin":true}"#])
                .contains("unknown key")
        );
        assert!(err(&["--lora-paths", "{nope"]).contains("invalid JSON"));
    }

    #[test]
    fn contradictions_name_the_flag() {
        let e = err(&[
            "--enable-lora",
            "--max-loras-per-batch",
            "4",
            "--max-loaded-loras",
            "2",
        ]);
        assert!(
            e.contains("--max-loaded-loras 2") && e.contains("--max-loras-per-batch 4"),
            "{e}"
        );
        let pinned = r#"{"lora_name":"a","lora_path":"/a","pinned":true}"#;
        let e = err(&["--max-loras-per-batch", "1", "--lora-paths", pinned]);
        assert!(e.contains("pins 1"), "{e}");
        assert!(err(&["--max-lora-rank", "8"]).contains("--max-lora-rank needs LoRA"));
        assert!(err(&["--lora-target-modules", "q_proj"]).contains("--enable-lora"));
        assert!(err(&["--enable-lora", "--max-lora-chunk-size", "48"]).contains("power of two"));
        assert!(err(&["--enable-lora", "--max-lora-chunk-size", "256"]).contains("--max-lora-chunk-size"));
        assert!(err(&["--enable-lora", "--lora-target-modules", "lm_head"]).contains("lm_head"));
        assert!(err(&["--tp-size", "2"]).contains("not implemented"));
        assert!(err(&["--dtype", "bfloat16"]).contains("float32"));
        assert!(err(&["--dtype", "float16"]).contains("the CPU backend computes in float32"));
        assert!(err(&["--enable-lora", "--enable-lora-overlap-loading"]).contains("needs --device cuda"));
        assert!(err(&["--enable-lora-overlap-loading"]).contains("needs LoRA serving"));
        assert!(err(&["--served-model-name", "a:b"]).contains("':'"));
        assert!(err(&["--chunked-prefill-size", "0"]).contains("--chunked-prefill-size"));
        assert!(err(&["--context-length", "65536"]).contains("--max-total-tokens"));
        assert!(err(&["--max-running-requests", "0"]).contains("--max-running-requests"));
    }

    #[test]
    fn overlap_loading_caps_the_host_cache_at_twice_the_slots() {
        let base = [
            "--device",
            "cuda",
            "--enable-lora",
            "--enable-lora-overlap-loading",
        ];
        let c = serve(&base).unwrap();
        assert!(c.lora.overlap_loading);
        assert_eq!(
            c.lora.max_loaded_loras,
            Some(16),
            "default: 2 × the 8 default slots"
        );
        let mut args = base.to_vec();
        args.extend(["--max-loras-per-batch", "4", "--max-loaded-loras", "6"]);
        assert_eq!(serve(&args).unwrap().lora.max_loaded_loras, Some(6));
        let mut args = base.to_vec();
        args.extend(["--max-loras-per-batch", "4", "--max-loaded-loras", "9"]);
        let e = serve(&args).expect_err("above 2 × slots").0;
        assert!(e.contains("--max-loaded-loras 9") && e.contains("= 8"), "{e}");
        assert!(
            !serve(&["--device", "cuda", "--enable-lora"])
                .unwrap()
                .lora
                .overlap_loading
        );
    }

    #[test]
    fn target_modules_expand_fused_names() {
        let c = serve(&["--enable-lora", "--lora-target-modules", "qkv_proj", "down_proj"]).unwrap();
        assert_eq!(
            c.lora.target_modules,
            Some(vec![
                LoraTarget::QProj,
                LoraTarget::KProj,
                LoraTarget::VProj,
                LoraTarget::DownProj
            ])
        );
        let c = serve(&["--enable-lora", "--lora-target-modules", "all"]).unwrap();
        assert_eq!(c.lora.target_modules, None);
    }

    #[test]
    fn clap_refuses_bad_values_and_mixing_with_generate() {
        assert!(parse(&["--model-path", "/m", "--lora-backend", "flashinfer"]).is_err());
        assert!(parse(&["--model-path", "/m", "--lora-eviction-policy", "random"]).is_err());
        assert!(parse(&["--port", "x", "--model-path", "/m"]).is_err());
        assert!(parse(&[]).is_err(), "serving needs --model-path");
        let g = parse(&["generate", "--model-path", "/m", "--prompt", "hi"]).unwrap();
        assert!(matches!(g.command, Some(Command::Generate(_))));
        assert!(parse(&["--port", "1", "generate", "--model-path", "/m", "--prompt", "hi"]).is_err());
        let c = parse(&[
            "--model-path",
            "/m",
            "--lora-backend",
            "triton",
            "--chunked-prefill-size",
            "-1",
        ])
        .unwrap()
        .serve
        .validate()
        .unwrap();
        assert_eq!(c.lora.backend, LoraBackend::Triton);
        assert_eq!(c.chunked_prefill_size, None);
    }

    /// A small model config whose context is `max_positions` tokens.
    fn small_model(max_positions: usize) -> crate::model::ModelConfig {
        let mut m = crate::model::ModelConfig::tiny_for_tests();
        m.max_position_embeddings = max_positions;
        m
    }

    #[test]
    fn overlap_scheduling_is_on_unless_disabled_and_reported() {
        let m = small_model(256);
        let on = serve(&[]).unwrap();
        let e = on.engine_config(&m, 4096).unwrap();
        assert!(e.overlap_schedule);
        assert_eq!(on.to_json(&e, "m")["disable_overlap_schedule"], false);
        let off = serve(&["--disable-overlap-schedule"]).unwrap();
        let e = off.engine_config(&m, 4096).unwrap();
        assert!(!e.overlap_schedule);
        assert_eq!(off.to_json(&e, "m")["disable_overlap_schedule"], true);
    }

    #[test]
    fn engine_config_takes_the_context_from_the_model() {
        let mut m = small_model(256);
        let cpu = serve(&[]).unwrap();
        assert_eq!(cpu.kv_tokens_bound(), DEFAULT_MAX_TOTAL_TOKENS);
        let e = cpu.engine_config(&m, cpu.kv_tokens_bound()).unwrap();
        assert_eq!((e.context_length, e.chunked_prefill_size), (256, 512));
        m.max_position_embeddings = 131072;
        let e = cpu.engine_config(&m, cpu.kv_tokens_bound()).unwrap();
        assert_eq!(e.context_length, DEFAULT_MAX_TOTAL_TOKENS);
        assert_eq!(e.max_total_tokens, DEFAULT_MAX_TOTAL_TOKENS);
        m.max_position_embeddings = 256;
        let e = serve(&["--context-length", "512"])
            .unwrap()
            .engine_config(&m, 4096)
            .unwrap_err();
        assert!(e.0.contains("max_position_embeddings 256"), "{e}");
    }

    #[test]
    fn the_gpu_sizes_the_kv_cache_from_memory_unless_told() {
        let mut m = small_model(131072);
        let gpu = serve(&["--device", "cuda"]).unwrap();
        assert_eq!(gpu.kv_tokens_bound(), usize::MAX);
        assert_eq!(gpu.mem_fraction_static, DEFAULT_MEM_FRACTION_STATIC);
        // Placed with no bound, then again with what fit: the context follows the cache.
        assert_eq!(gpu.engine_config(&m, usize::MAX).unwrap().context_length, 131072);
        let e = gpu.engine_config(&m, 50_000).unwrap();
        assert_eq!((e.context_length, e.max_total_tokens), (50_000, 50_000));
        let told = serve(&["--device", "cuda", "--max-total-tokens", "9000"]).unwrap();
        assert_eq!(told.kv_tokens_bound(), 9000);
        let long = serve(&[
            "--device",
            "cuda",
            "--context-length",
            "100000",
            "--mem-fraction-static",
            "0.5",
        ])
        .unwrap();
        assert_eq!(long.mem_fraction_static, 0.5);
        let e = long.engine_config(&m, 60_000).unwrap_err();
        assert!(
            e.0.contains("KV cache's 60000 tokens") && e.0.contains("--mem-fraction-static 0.5"),
            "{e}"
        );
        m.max_position_embeddings = 4096;
        let e = serve(&["--max-total-tokens", "100", "--context-length", "200"]).unwrap_err();
        assert!(e.0.contains("exceeds --max-total-tokens 100"), "{e}");
        for bad_fraction in ["0", "1", "1.5", "NaN"] {
            let e = serve(&["--device", "cuda", "--mem-fraction-static", bad_fraction]).unwrap_err();
            assert!(e.0.contains("--mem-fraction-static"), "{bad_fraction}: {e}");
        }
    }
}
