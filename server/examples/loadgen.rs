//! A bounded load generator for `loraplane-server` (loopback only): streams `/generate` requests
//! spread over several adapters at several concurrency levels and reports throughput, TTFT and
//! latency percentiles, and failed or lost requests. Run through `scripts/bench-serve.sh`.
//!
//! `loadgen dummy-adapters MODEL OUT_DIR COUNT RANK` writes random PEFT adapters for MODEL.
//! `loadgen run URL ADAPTERS CONCURRENCY REQUESTS_PER_CLIENT MAX_NEW_TOKENS` runs the load, e.g.
//! `loadgen run http://127.0.0.1:30000 a,b,c 1,4,16,64 4 32`.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use loraplane_server::adapter::{LoraAdapter, LoraTarget};
use loraplane_server::model::loader::load_model;

const PROMPTS: [&str; 4] = [
    "Write one sentence about the ocean.",
    "List three fruits and their colors.",
    "Explain what a database index is in two sentences.",
    "Give a short tip for learning a new language.",
];
/// Hard cap on one concurrency level, so the run always ends.
const LEVEL_DEADLINE: Duration = Duration::from_secs(600);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("dummy-adapters") if args.len() == 5 => dummy_adapters(&args[1], &args[2], args[3].parse()?, args[4].parse()?),
        Some("run") if args.len() == 6 => {
            let levels: Vec<usize> = args[3].split(',').map(str::parse).collect::<Result<_, _>>()?;
            run(&args[1], &args[2], &levels, args[4].parse()?, args[5].parse()?).await
        }
        _ => bail!("usage: loadgen dummy-adapters MODEL OUT_DIR COUNT RANK | loadgen run URL ADAPTERS LEVELS PER_CLIENT MAX_NEW"),
    }
}

fn dummy_adapters(model: &str, out: &str, count: usize, rank: usize) -> anyhow::Result<()> {
    let m = load_model(Path::new(model))?;
    for i in 0..count {
        let a = LoraAdapter::dummy(
            &format!("dummy{i}"),
            m.model.config(),
            rank,
            &LoraTarget::ALL,
            i as u64,
        );
        let dir = Path::new(out).join(format!("dummy{i}"));
        a.save_peft(&dir)?;
        println!("{}", dir.display());
    }
    Ok(())
}

struct Sample {
    ok: bool,
    ttft: f64,
    latency: f64,
    tokens: usize,
}

async fn run(
    url: &str,
    adapters: &str,
    levels: &[usize],
    per_client: usize,
    max_new: usize,
) -> anyhow::Result<()> {
    let parsed = reqwest::Url::parse(url).context("URL")?;
    let host = parsed.host_str().unwrap_or_default();
    if !(host == "127.0.0.1" || host == "localhost" || host == "[::1]") {
        bail!("loadgen only targets the loopback interface, not {host}");
    }
    let adapters: Vec<String> = adapters
        .split(',')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()?;
    println!("| clients | requests | ok | failed | lost | gen tok/s | req/s | TTFT p50 / p90 / p99 (s) | latency p50 / p90 / p99 (s) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for &c in levels {
        let total = c * per_client;
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut workers = Vec::new();
        for _ in 0..c {
            let (client, next, adapters, url) =
                (client.clone(), next.clone(), adapters.clone(), url.to_string());
            workers.push(tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total || started.elapsed() > LEVEL_DEADLINE {
                        return out;
                    }
                    let lora = (!adapters.is_empty()).then(|| adapters[i % adapters.len()].clone());
                    out.push(one(&client, &url, PROMPTS[i % PROMPTS.len()], lora, max_new).await);
                }
            }));
        }
        let mut samples = Vec::new();
        for w in workers {
            samples.extend(w.await?);
        }
        let wall = started.elapsed().as_secs_f64();
        let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok).collect();
        let failed = samples.len() - ok.len();
        let lost = total - samples.len();
        let tokens: usize = ok.iter().map(|s| s.tokens).sum();
        let pct = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            let p = |q: f64| {
                v.get(((v.len() as f64 - 1.0) * q).round() as usize)
                    .copied()
                    .unwrap_or(f64::NAN)
            };
            format!("{:.3} / {:.3} / {:.3}", p(0.5), p(0.9), p(0.99))
        };
        println!(
            "| {c} | {total} | {} | {failed} | {lost} | {:.1} | {:.2} | {} | {} |",
            ok.len(),
            tokens as f64 / wall,
            ok.len() as f64 / wall,
            pct(ok.iter().map(|s| s.ttft).collect()),
            pct(ok.iter().map(|s| s.latency).collect()),
        );
    }
    Ok(())
}

async fn one(
    client: &reqwest::Client,
    url: &str,
    prompt: &str,
    lora: Option<String>,
    max_new: usize,
) -> Sample {
    let t0 = Instant::now();
    let mut s = Sample {
        ok: false,
        ttft: 0.0,
        latency: 0.0,
        tokens: 0,
    };
    let body = serde_json::json!({
        "text": prompt,
        "lora_path": lora,
        "stream": true,
        "sampling_params": {"max_new_tokens": max_new, "temperature": 0.0, "ignore_eos": true},
    });
    let Ok(resp) = client.post(format!("{url}/generate")).json(&body).send().await else {
        return s;
    };
    if !resp.status().is_success() {
        return s;
    }
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let mut done = false;
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else { return s };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else {
                return s;
            };
            if v.get("error").is_some() {
                return s;
            }
            if s.ttft == 0.0 {
                s.ttft = t0.elapsed().as_secs_f64();
            }
            if let Some(n) = v["meta_info"]["completion_tokens"].as_u64() {
                s.tokens = n as usize;
            }
        }
    }
    s.latency = t0.elapsed().as_secs_f64();
    s.ok = done && s.tokens > 0;
    s
}
