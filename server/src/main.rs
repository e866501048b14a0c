//! `loraplane-server`: the command line.
//!
//! `loraplane-server generate` runs one batch of prompts, each with its own adapter or the base
//! model, through a single shared forward pass and prints the greedy answers.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use loraplane_server::adapter::LoraAdapter;
use loraplane_server::engine::generate::{generate_greedy, GenRequest};
use loraplane_server::engine::KvCache;
use loraplane_server::model::loader::load_model;
use loraplane_server::model::tokenizer::ChatMessage;

#[derive(Parser)]
#[command(
    name = "loraplane-server",
    version,
    about = "Serve many LoRA adapters on one base model"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate greedy answers for a batch of prompts, each with its own adapter, in one batch.
    Generate(GenerateArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Model: an HF directory (config.json, safetensors, tokenizer.json) or a .gguf file.
    #[arg(long)]
    model_path: PathBuf,
    /// Adapters to load, each `NAME=PATH` (a PEFT directory).
    #[arg(long, num_args = 1..)]
    lora_paths: Vec<String>,
    /// A prompt; repeat for a batch.
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// The adapter for each prompt, in order (`base` or omitted: the base model).
    #[arg(long)]
    lora: Vec<String>,
    /// Wrap each prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Most tokens to generate per prompt.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Generate(args) => generate(args),
    }
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let loaded = load_model(&args.model_path)?;
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
    let outs = generate_greedy(&loaded.model, &mut kv, &reqs)?;
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
