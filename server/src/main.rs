//! `loraplane-server`: the command line.
//!
//! With no subcommand it serves SGLang's HTTP API (native and OpenAI-compatible) on one base
//! model and its LoRA adapters. `loraplane-server generate` runs one batch of prompts, each with
//! its own adapter or the base model, through a single shared forward pass and prints the greedy
//! answers.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use loraplane_server::adapter::LoraAdapter;
use loraplane_server::api::{self, params::Limits, AppState};
use loraplane_server::args::{Cli, Command, GenerateArgs, LoraBackend, ServeArgs, ServerConfig};
use loraplane_server::backend::cuda::{
    CudaModel, CudaOptions, Gpu, LoraKernelMode, DECODE_ATTENTION_TENSOR_CORES_MIN_PAIRS,
    PREFILL_ATTENTION_MIN_ROWS,
};
use loraplane_server::engine;
use loraplane_server::engine::generate::{generate_greedy, GenRequest};
use loraplane_server::engine::KvCache;
use loraplane_server::metrics::Metrics;
use loraplane_server::model::loader::{load_dummy_config, load_model, load_model_with};
use loraplane_server::model::tokenizer::ChatMessage;
use loraplane_server::model::{Architecture, Model};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match &cli.command {
        None => cli.serve.log_level.clone(),
        Some(_) => "info".to_string(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .or_else(|_| tracing_subscriber::EnvFilter::try_new(&level))
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Escape codes only for a terminal: logs piped to files or tests stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Some(Command::Generate(args)) => generate(args),
        None => return serve_command(cli.serve),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Validates the flags (exit 2 on a contradiction, like clap), then serves (exit 1 on failure).
fn serve_command(args: ServeArgs) -> ExitCode {
    let config = match args.validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let cpu = !config.device.cuda;
    for (flag, ignored, why) in [
        (
            "--trust-remote-code",
            args.trust_remote_code,
            "there is no remote code",
        ),
        (
            "--disable-cuda-graph",
            cpu && args.disable_cuda_graph,
            "on the CPU",
        ),
        (
            "--cuda-graph-max-bs",
            cpu && args.cuda_graph_max_bs.is_some(),
            "on the CPU",
        ),
        (
            "--mem-fraction-static",
            cpu && args.mem_fraction_static.is_some(),
            "on the CPU the KV cache holds --max-total-tokens tokens",
        ),
    ] {
        if ignored {
            tracing::warn!("{flag} is accepted for SGLang compatibility and ignored: {why}");
        }
    }
    match serve(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(ServeError::Config(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(ServeError::Other(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

enum ServeError {
    /// A flag that does not fit the model (exit 2).
    Config(loraplane_server::args::ArgError),
    /// Anything else (exit 1).
    Other(anyhow::Error),
}

impl From<anyhow::Error> for ServeError {
    fn from(e: anyhow::Error) -> Self {
        ServeError::Other(e)
    }
}

impl From<loraplane_server::Error> for ServeError {
    fn from(e: loraplane_server::Error) -> Self {
        match e {
            loraplane_server::Error::Flag(m) => ServeError::Config(loraplane_server::args::ArgError(m)),
            other => ServeError::Other(other.into()),
        }
    }
}

fn serve(mut config: ServerConfig) -> Result<(), ServeError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Bind first: a taken port should fail before a long model load.
    let addr = format!("{}:{}", config.host, config.port);
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(&addr))
        .with_context(|| format!("cannot listen on {addr} (--host/--port)"))?;

    let t0 = Instant::now();
    // With --load-format dummy only a config (and a tokenizer, where there is one) is read; the
    // weights are made where the model runs.
    let (name, model_config, tokenizer, host) = if config.dummy_weights {
        let (name, c, tok) = load_dummy_config(&config.model_path, config.skip_tokenizer_init)
            .context("loading --model-path")?;
        (name, c, tok, None)
    } else {
        let (name, model, tok) = load_model_with(&config.model_path, config.skip_tokenizer_init)
            .context("loading --model-path")?;
        (name, model.config().clone(), tok, Some(model))
    };
    if tokenizer.is_none() && !config.skip_tokenizer_init {
        tracing::warn!("no tokenizer (a preset, or a config without tokenizer.json): serving token ids only, as with --skip-tokenizer-init");
        config.skip_tokenizer_init = true;
    }
    tracing::info!(model = %name, secs = t0.elapsed().as_secs_f32(), dummy = config.dummy_weights, "model loaded");
    let engine_config = config
        .engine_config(&model_config, config.kv_tokens_bound())
        .map_err(ServeError::Config)?;
    let served_model_name = config.served_model_name.clone().unwrap_or(name.clone());
    if served_model_name.contains(':') {
        return Err(ServeError::Config(loraplane_server::args::ArgError(format!(
            "the model's name {served_model_name:?} contains ':', which the OpenAI API reads as \
             `<base>:<adapter>`; choose another with --served-model-name"
        ))));
    }
    if config.lora.enabled {
        let backend = match config.lora.backend {
            LoraBackend::Csgmv => "csgmv",
            LoraBackend::Triton => "triton",
        };
        tracing::info!(
            backend,
            max_loras_per_batch = config.lora.max_loras_per_batch,
            eviction = config.lora.eviction_policy.as_str(),
            "LoRA serving on"
        );
    }
    let (model, engine_config) = place_model(host, &model_config, &config, engine_config)?;
    let metrics = Arc::new(Metrics::new());
    let tokenizer = tokenizer.map(Arc::new);
    let engine = engine::start(
        model,
        engine_config.clone(),
        config.lora.adapters.clone(),
        metrics.clone(),
    )
    .map_err(|e| match e {
        // The engine's start-up refusals already name the flag and the adapter.
        loraplane_server::Error::Model(m) => anyhow::anyhow!(m),
        other => anyhow::anyhow!("starting the engine: {other}"),
    })?;
    let architecture = match model_config.arch {
        Architecture::Llama => "LlamaForCausalLM",
        Architecture::Mistral => "MistralForCausalLM",
        Architecture::Qwen2 => "Qwen2ForCausalLM",
    };
    let state = Arc::new(AppState {
        limits: Limits {
            context_length: engine.context_length(),
            vocab_size: model_config.vocab_size,
            eos_token_ids: model_config.eos_token_ids.clone(),
        },
        server_info: config.to_json(&engine_config, &served_model_name),
        engine,
        tokenizer,
        metrics,
        served_model_name,
        model_path: config.model_path.clone(),
        architecture: architecture.to_string(),
        api_key: config.api_key.clone(),
        lora_enabled: config.lora.enabled,
    });
    let local = listener.local_addr().context("reading the bound address")?;
    tracing::info!(
        address = %local,
        model = %state.served_model_name,
        context_length = state.limits.context_length,
        adapters = state.engine.adapters().len(),
        "serving on http://{local}"
    );
    runtime
        .block_on(api::serve(listener, state))
        .context("serving HTTP")?;
    Ok(())
}

/// Keeps the model on the CPU, or uploads it to GPU 0 (`--device cuda`; random weights of
/// `model_config`'s shapes when `host` is `None`) with a LoRA slot pool of `--max-loras-per-batch`
/// slots of rank `--max-lora-rank` (64 when unset; the engine then refuses adapters of a larger
/// rank by name).
fn place_model(
    host: Option<loraplane_server::model::LlamaModel>,
    model_config: &loraplane_server::model::ModelConfig,
    config: &ServerConfig,
    mut engine_config: engine::EngineConfig,
) -> Result<(Model, engine::EngineConfig), ServeError> {
    if !config.device.cuda {
        let host = match host {
            Some(host) => host,
            None => dummy_on_host(model_config)?,
        };
        // The host cache is allocated whole at start: refuse one that cannot fit, by name,
        // rather than abort on the allocation.
        let kv_bytes =
            (engine_config.max_total_tokens as u64).saturating_mul(model_config.kv_bytes_per_token(4) as u64);
        if let Some(available) = available_memory_bytes().filter(|&a| kv_bytes >= a) {
            return Err(ServeError::Config(loraplane_server::args::ArgError(format!(
                "--max-total-tokens {}: the KV cache would take {:.1} GB of host memory and {:.1} GB \
                 is available; lower --max-total-tokens",
                engine_config.max_total_tokens,
                kv_bytes as f64 / 1e9,
                available as f64 / 1e9
            ))));
        }
        return Ok((Model::Cpu(Box::new(host)), engine_config));
    }
    let gpu = Gpu::open(0)?;
    let rank = engine_config.max_lora_rank.unwrap_or(64);
    engine_config.max_lora_rank = Some(rank);
    let opts = CudaOptions {
        dtype: config.device.dtype,
        lora_slots: if config.lora.enabled {
            engine_config.max_loras_per_batch
        } else {
            0
        },
        lora_rank: rank,
        lora_mode: match config.lora.backend {
            LoraBackend::Csgmv => LoraKernelMode::Chunked(config.lora.max_chunk_size),
            LoraBackend::Triton => LoraKernelMode::PerSequence,
        },
        cuda_graph_max_bs: config
            .device
            .cuda_graph_max_bs
            .min(engine_config.max_running_requests),
        // Without --max-total-tokens, no more than the running batch can use at full length: a
        // small model would otherwise take tens of GB of cache (and the host its block tables).
        max_tokens: config.max_total_tokens.unwrap_or(
            engine_config
                .max_running_requests
                .saturating_mul(engine_config.context_length),
        ),
        kv_memory_fraction: Some(config.mem_fraction_static),
        block_size: engine_config.kv_block_size,
        max_rows: engine_config.chunked_prefill_size + engine_config.max_running_requests,
        max_seq_len: engine_config.context_length,
        prefill_attention_min_rows: PREFILL_ATTENTION_MIN_ROWS,
        flash_prefill: true,
        lora_side_stream: true,
        attention_split_keys: true,
        lora_tensor_cores: true,
        decode_attention_tensor_cores: Some(DECODE_ATTENTION_TENSOR_CORES_MIN_PAIRS),
        // Graph-replayed decode steps launch programmatically and run the wide projections in
        // decode_gemm.cu on Hopper; `gpu_check --only decode-gemm` checks them inside a model
        // of Llama-3.1-8B's widths (BENCHMARKS.md, fifteenth session).
        decode_gemms: true,
        programmatic_launch: true,
    };
    let t0 = Instant::now();
    let model = match &host {
        Some(host) => CudaModel::from_host(gpu.clone(), host, opts)?,
        None => CudaModel::dummy(gpu.clone(), model_config.clone(), opts, 0)?,
    };
    if let Some(told) = config.max_total_tokens.filter(|&t| t > model.kv_tokens()) {
        tracing::warn!(
            max_total_tokens = told,
            fit = model.kv_tokens(),
            "--max-total-tokens is more than --mem-fraction-static leaves room for; the KV cache holds what fits"
        );
    }
    // The cache was sized from free memory: the context length follows it.
    let engine_config = engine::EngineConfig {
        max_lora_rank: Some(rank),
        ..config
            .engine_config(model_config, model.kv_tokens())
            .map_err(ServeError::Config)?
    };
    tracing::info!(
        gpu = %gpu.name,
        dtype = config.device.dtype.name(),
        lora_pool_gb = model.lora_pool_bytes() as f64 / 1e9,
        kv_tokens = model.kv_tokens(),
        kv_cache_gb = model.kv_cache_bytes() as f64 / 1e9,
        decode_gemms = %model.decode_gemm_groups().join(", "),
        secs = t0.elapsed().as_secs_f32(),
        "model on the GPU"
    );
    Ok((Model::Cuda(model), engine_config))
}

/// Random weights of `c`'s shape in host memory (`--load-format dummy` on the CPU), refused
/// with the sizes when they would not fit in the memory available now.
fn dummy_on_host(
    c: &loraplane_server::model::ModelConfig,
) -> anyhow::Result<loraplane_server::model::LlamaModel> {
    let bytes = c.num_parameters() as u64 * 4;
    if let Some(available) = available_memory_bytes() {
        anyhow::ensure!(
            bytes < available,
            "--load-format dummy on the CPU: the model's float32 weights take {:.1} GB and {:.1} GB \
             of memory is available; use --device cuda or a smaller config",
            bytes as f64 / 1e9,
            available as f64 / 1e9
        );
    }
    Ok(loraplane_server::model::LlamaModel::dummy(c.clone(), 0)?)
}

/// `MemAvailable` from /proc/meminfo (Linux), in bytes.
fn available_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let mut loaded = load_model(&args.model_path)?;
    tracing::info!(model = %loaded.name, secs = t0.elapsed().as_secs_f32(), "model loaded");
    let config = loaded.model.config().clone();
    let mut adapters = std::collections::HashMap::new();
    for item in &args.lora_paths {
        let (name, path) = item
            .split_once('=')
            .with_context(|| format!("--lora-paths item {item:?} must be NAME=PATH"))?;
        let a = LoraAdapter::load(name, path.as_ref(), &config)?;
        tracing::info!(adapter = name, rank = a.rank, targets = ?a.targets.iter().map(|t| t.name()).collect::<Vec<_>>(), "adapter loaded");
        adapters.insert(name.to_string(), Arc::new(a));
    }
    if args.lora.len() > args.prompt.len() {
        bail!(
            "--lora is given {} times but there are only {} prompts",
            args.lora.len(),
            args.prompt.len()
        );
    }
    let mut reqs = Vec::new();
    for (i, prompt) in args.prompt.iter().enumerate() {
        let adapter = match args.lora.get(i).map(String::as_str) {
            None | Some("base") | Some("") => None,
            Some(name) => Some(
                adapters
                    .get(name)
                    .cloned()
                    .with_context(|| format!("--lora {name:?} is not among --lora-paths"))?,
            ),
        };
        let text = if args.chat {
            let msg = ChatMessage {
                role: "user".into(),
                content: prompt.clone(),
            };
            loaded.tokenizer.apply_chat_template(&[msg], true)?
        } else {
            prompt.clone()
        };
        let ids = loaded.tokenizer.encode(&text, !args.chat)?;
        if ids.is_empty() {
            bail!("prompt {i} is empty after tokenization");
        }
        reqs.push(GenRequest {
            prompt: ids,
            adapter,
            max_new_tokens: args.max_new_tokens,
            stop_token_ids: config.eos_token_ids.clone(),
            prompt_logprobs: false,
        });
    }
    let budget: usize = reqs.iter().map(|r| r.prompt.len() + r.max_new_tokens).sum();
    let mut kv = KvCache::new(&config, budget, 16);
    let t1 = Instant::now();
    let outs = generate_greedy(&mut loaded.model, &mut kv, &reqs)?;
    let secs = t1.elapsed().as_secs_f32();
    let generated: usize = outs.iter().map(|o| o.tokens.len()).sum();
    for (i, out) in outs.iter().enumerate() {
        let text = loaded.tokenizer.decode(&out.tokens, true)?;
        let who = args.lora.get(i).map(String::as_str).unwrap_or("base");
        println!("[{i}] ({who}) {}\n    => {}", args.prompt[i], text.trim());
    }
    tracing::info!(generated, secs, tok_per_s = generated as f32 / secs, "batch done");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::ServeError;

    #[test]
    fn a_flag_the_machine_cannot_honour_exits_like_any_bad_flag() {
        let flag: ServeError =
            loraplane_server::Error::Flag("--mem-fraction-static 0.1: no room".into()).into();
        assert!(matches!(flag, ServeError::Config(ref e) if e.0.contains("--mem-fraction-static")));
        let model: ServeError = loraplane_server::Error::Model("bad weights".into()).into();
        assert!(matches!(model, ServeError::Other(_)));
    }
}
