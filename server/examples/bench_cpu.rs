//! CPU benchmark of the engine: prefill and decode throughput with and without LoRA adapters in
//! the batch. Run through `scripts/bench-cpu.sh`; results go to BENCHMARKS.md.
//!
//! Adapters are random (`LoraAdapter::dummy`) rank-16 adapters on all seven targets: the cost of
//! LoRA does not depend on the values.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use loraplane_server::adapter::{LoraAdapter, LoraTarget};
use loraplane_server::engine::generate::{generate_greedy, GenRequest};
use loraplane_server::engine::KvCache;
use loraplane_server::model::loader::load_model;

const REPEATS: usize = 3;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model_path = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into()),
    );
    let prompt_len: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(128);
    let decode_tokens: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(32);
    let mut loaded = load_model(&model_path)?;
    let config = loaded.model.config().clone();
    let adapters: Vec<Arc<LoraAdapter>> = (0..8)
        .map(|i| {
            Arc::new(LoraAdapter::dummy(
                &format!("a{i}"),
                &config,
                16,
                &LoraTarget::ALL,
                i,
            ))
        })
        .collect();
    println!(
        "model {} | threads {} | prompt {prompt_len} tokens | decode {decode_tokens} tokens",
        loaded.name,
        rayon::current_num_threads()
    );
    println!("| batch | adapters in batch | prefill tok/s | decode tok/s | decode step ms |");
    println!("|---|---|---|---|---|");
    for batch in [1usize, 4, 8] {
        let mut mixes = vec![0usize, 1, batch.min(8)];
        mixes.dedup();
        for distinct in mixes {
            let reqs: Vec<GenRequest> = (0..batch)
                .map(|i| GenRequest {
                    // Distinct prompts so nothing is shared between rows.
                    prompt: (0..prompt_len)
                        .map(|t| ((t * 31 + i * 7 + 100) % config.vocab_size) as u32)
                        .collect(),
                    adapter: (distinct > 0).then(|| adapters[i % distinct].clone()),
                    max_new_tokens: 1,
                    stop_token_ids: vec![],
                    prompt_logprobs: false,
                })
                .collect();
            let mut kv = KvCache::new(&config, batch * (prompt_len + decode_tokens + 1), 16);
            let decode_reqs: Vec<GenRequest> = reqs
                .iter()
                .map(|r| GenRequest {
                    max_new_tokens: decode_tokens + 1,
                    ..r.clone()
                })
                .collect();
            // Best of REPEATS: the figures are what the engine can do, not the machine's noise.
            let (mut prefill_s, mut decode_s) = (f64::MAX, f64::MAX);
            for _ in 0..REPEATS {
                let t = Instant::now();
                generate_greedy(&mut loaded.model, &mut kv, &reqs)?;
                let p = t.elapsed().as_secs_f64();
                prefill_s = prefill_s.min(p);
                let t = Instant::now();
                generate_greedy(&mut loaded.model, &mut kv, &decode_reqs)?;
                // The same prefill again, then `decode_tokens` batched decode steps.
                decode_s = decode_s.min(t.elapsed().as_secs_f64() - p);
            }
            let prefill = (batch * prompt_len) as f64 / prefill_s;
            let decode = (batch * decode_tokens) as f64 / decode_s;
            println!(
                "| {batch} | {distinct} | {prefill:.0} | {decode:.1} | {:.1} |",
                decode_s * 1000.0 / decode_tokens as f64
            );
        }
    }
    Ok(())
}
