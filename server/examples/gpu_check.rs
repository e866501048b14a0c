//! Correctness of the CUDA backend, run on a GPU machine by `scripts/gpu/check.sh`.
//!
//! 1. PEFT fixtures (`tests/fixtures/tiny`): one mixed forward pass of every prompt under the
//!    base model and four adapters on the GPU, f32 within 1e-4 of PEFT's log-probs, bf16 and f16
//!    within stated bounds; the llama31 (llama3 RoPE), mistral (sliding window) and qwen2 (q/k/v bias)
//!    variants the same way.
//! 2. Random models against the CPU backend (itself checked against PEFT by the CI tests):
//!    ragged batches of 1 to 256 sequences with prefill chunks of 0 to 40 tokens, adapters of
//!    ranks 1/4/8/16/64/128 mixed in one batch, both LoRA kernel schemes, then decode steps with
//!    and without CUDA graphs (a graph that dropped the LoRA delta would fail here).
//!
//! Prints one line per case and exits non-zero on the first failure.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use loraplane_server::adapter::{LoraAdapter, LoraTarget};
use loraplane_server::backend::cpu::log_softmax;
use loraplane_server::backend::cuda::{CudaModel, CudaOptions, DeviceDtype, Gpu, LoraKernelMode};
use loraplane_server::engine::{KvCache, SeqCache};
use loraplane_server::model::llama::{LogitsWanted, SeqInput};
use loraplane_server::model::weights::load_hf_weights;
use loraplane_server::model::{LlamaModel, ModelConfig};
use loraplane_server::tensor::Tensor;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Float tensors of the reference file, as f64.
fn read_reference() -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(repo().join("tests/fixtures/tiny/reference.safetensors")).expect("reference");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let b = v.data();
            let data: Vec<f64> = match v.dtype() {
                safetensors::Dtype::F32 => b
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::I64 => b
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                _ => Vec::new(),
            };
            (name, (v.shape().to_vec(), data))
        })
        .collect()
}

/// PerSequence runs also attend prefill chunks of 4+ tokens through GEMMs, Chunked ones through
/// the paged kernel only, so both attention paths meet every reference.
fn opts(dtype: DeviceDtype, mode: LoraKernelMode, graphs: usize, max_tokens: usize) -> CudaOptions {
    let gemm_min = if mode == LoraKernelMode::PerSequence { 4 } else { 0 };
    CudaOptions {
        dtype,
        lora_slots: 8,
        lora_rank: 128,
        lora_mode: mode,
        cuda_graph_max_bs: graphs,
        max_tokens,
        block_size: 16,
        max_rows: 16384,
        max_seq_len: 4096,
        gemm_attention_min_rows: gemm_min,
    }
}

/// A forward pass on either backend.
type Runner<'a> = dyn FnMut(&mut KvCache, &[SeqInput<'_>]) -> Vec<Vec<f32>> + 'a;

/// One forward pass of `batch` with every row's logits, as log-probs per sequence.
fn pass(
    run: &mut Runner<'_>,
    kv: &mut KvCache,
    batch: &[(Vec<u32>, Option<Arc<LoraAdapter>>)],
    vocab: usize,
) -> Vec<Vec<f32>> {
    let mut caches = vec![SeqCache::default(); batch.len()];
    for (c, (p, _)) in caches.iter_mut().zip(batch) {
        kv.reserve(c, p.len()).unwrap();
    }
    let inputs: Vec<SeqInput<'_>> = batch
        .iter()
        .zip(&caches)
        .map(|((p, a), c)| SeqInput {
            tokens: p,
            cache: c,
            adapter: a.as_deref(),
            logits: LogitsWanted::All,
        })
        .collect();
    let out = run(kv, &inputs)
        .into_iter()
        .map(|l| l.chunks_exact(vocab).flat_map(log_softmax).collect())
        .collect();
    for c in &mut caches {
        kv.release(c);
    }
    out
}

fn fail(msg: String) -> ! {
    eprintln!("FAIL: {msg}");
    std::process::exit(1);
}

fn peft_fixtures(gpu: &Arc<Gpu>, quick: bool) {
    let r = read_reference();
    let prompts: Vec<Vec<u32>> = (0..)
        .map_while(|p| r.get(&format!("prompt.{p}")))
        .map(|(_, d)| d.iter().map(|&v| v as u32).collect())
        .collect();
    let names = ["qv_r2", "mlp_r8_rslora", "all_r16", "attn_r4"];
    let variants: &[&str] = if quick {
        &["llama"]
    } else {
        &["llama", "llama31", "mistral", "qwen2"]
    };
    for &variant in variants {
        let dir = repo().join(format!("tests/fixtures/tiny/{variant}"));
        let config = ModelConfig::from_hf_file(&dir.join("config.json")).unwrap();
        let host = LlamaModel::from_tensors(config.clone(), load_hf_weights(&dir).unwrap()).unwrap();
        let adapters: Vec<Arc<LoraAdapter>> = if variant == "llama" {
            names
                .iter()
                .map(|n| {
                    let d = repo().join(format!("tests/fixtures/tiny/adapters/{n}"));
                    Arc::new(LoraAdapter::load(n, &d, &config).unwrap())
                })
                .collect()
        } else {
            Vec::new()
        };
        let mut batch = Vec::new();
        for p in &prompts {
            batch.push((p.clone(), None));
            for a in &adapters {
                batch.push((p.clone(), Some(a.clone())));
            }
        }
        // Half-precision bounds: log-probs of this tiny random model (vocab 384) through bf16
        // weights and activations stay within 0.5 of PEFT's f32 values (measured worst 0.16 to
        // 0.40); f16 keeps 3 more mantissa bits: within 0.1 (measured worst 0.02 to 0.05).
        for (dtype, tol) in [
            (DeviceDtype::Float32, 1e-4),
            (DeviceDtype::Bfloat16, 0.5),
            (DeviceDtype::Float16, 0.1),
        ] {
            for mode in [LoraKernelMode::PerSequence, LoraKernelMode::Chunked(16)] {
                let mut m = CudaModel::from_host(gpu.clone(), &host, opts(dtype, mode, 0, 4096)).unwrap();
                let mut kv = m.new_kv_cache();
                let got = pass(
                    &mut |kv, s| m.forward(kv, s).unwrap(),
                    &mut kv,
                    &batch,
                    config.vocab_size,
                );
                let mut worst = 0.0f64;
                for ((prompt, a), lp) in batch.iter().zip(&got) {
                    let p = prompts.iter().position(|x| x == prompt).unwrap();
                    let case = match a {
                        Some(a) => format!("{variant}+{}", a.name),
                        None => variant.to_string(),
                    };
                    let want = &r[&format!("logprobs.{case}.{p}")].1;
                    let d = lp
                        .iter()
                        .zip(want)
                        .map(|(&x, &y)| (x as f64 - y).abs())
                        .fold(0.0, f64::max);
                    if !d.is_finite() || d > tol {
                        fail(format!(
                            "PEFT {case} prompt {p} {} {mode:?}: max |Δ logprob| {d:e} > {tol:e}",
                            dtype.name()
                        ));
                    }
                    worst = worst.max(d);
                }
                println!(
                    "ok  peft   {variant:8} {:8} {:?}: {} sequences in one pass, max |Δ logprob| {worst:.2e} (tol {tol:e})",
                    dtype.name(),
                    mode,
                    batch.len()
                );
            }
        }
    }
}

/// A deterministic xorshift stream.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

fn random_model(c: &ModelConfig, rng: &mut Rng) -> LlamaModel {
    let mut t = HashMap::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32, rng: &mut Rng| {
        let n = shape.iter().product();
        let data = (0..n).map(|_| offset + scale * rng.f()).collect();
        t.insert(name, Tensor::new(shape, data));
    };
    let (h, qd, kvd, i) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
    add(
        "model.embed_tokens.weight".into(),
        vec![c.vocab_size, h],
        1.0,
        0.0,
        rng,
    );
    add("model.norm.weight".into(), vec![h], 0.1, 1.0, rng);
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        let s = |n: usize| 1.0 / (n as f32).sqrt();
        add(format!("{p}.input_layernorm.weight"), vec![h], 0.1, 1.0, rng);
        add(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            0.1,
            1.0,
            rng,
        );
        add(
            format!("{p}.self_attn.q_proj.weight"),
            vec![qd, h],
            s(h),
            0.0,
            rng,
        );
        add(
            format!("{p}.self_attn.k_proj.weight"),
            vec![kvd, h],
            s(h),
            0.0,
            rng,
        );
        add(
            format!("{p}.self_attn.v_proj.weight"),
            vec![kvd, h],
            s(h),
            0.0,
            rng,
        );
        add(
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, qd],
            s(qd),
            0.0,
            rng,
        );
        add(format!("{p}.mlp.gate_proj.weight"), vec![i, h], s(h), 0.0, rng);
        add(format!("{p}.mlp.up_proj.weight"), vec![i, h], s(h), 0.0, rng);
        add(format!("{p}.mlp.down_proj.weight"), vec![h, i], s(i), 0.0, rng);
    }
    LlamaModel::from_tensors(c.clone(), t).unwrap()
}

fn config(h: usize, heads: usize, kv_heads: usize, head_dim: usize) -> ModelConfig {
    ModelConfig::from_hf_json(&format!(
        r#"{{"architectures":["LlamaForCausalLM"],"vocab_size":512,"hidden_size":{h},"intermediate_size":{},
        "num_hidden_layers":2,"num_attention_heads":{heads},"num_key_value_heads":{kv_heads},"head_dim":{head_dim},
        "max_position_embeddings":4096,"tie_word_embeddings":false}}"#,
        h * 2 + 32
    ))
    .unwrap()
}

/// Max |a - b| over max |b|, per sequence pair, worst case.
fn rel_err(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let mut worst = 0.0f64;
    for (x, y) in a.iter().zip(b) {
        if x.len() != y.len() {
            return f64::INFINITY;
        }
        let scale = y.iter().fold(1e-6f64, |m, v| m.max(v.abs() as f64));
        let d = x
            .iter()
            .zip(y)
            .map(|(p, q)| (*p as f64 - *q as f64).abs())
            .fold(0.0, f64::max);
        worst = worst.max(if d.is_finite() { d / scale } else { f64::INFINITY });
    }
    worst
}

fn random_vs_cpu(gpu: &Arc<Gpu>) {
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let ranks = [1usize, 4, 8, 16, 64, 128];
    let all = LoraTarget::ALL;
    for (h, heads, kv_heads, hd) in [(256, 4, 4, 64), (512, 4, 1, 128), (256, 8, 2, 32)] {
        let c = config(h, heads, kv_heads, hd);
        let host = random_model(&c, &mut rng);
        let adapters: Vec<Arc<LoraAdapter>> = ranks
            .iter()
            .enumerate()
            .map(|(i, &r)| {
                let targets: Vec<LoraTarget> = if i % 2 == 0 {
                    all.to_vec()
                } else {
                    vec![all[0], all[2], all[5]]
                };
                Arc::new(LoraAdapter::dummy(
                    &format!("r{r}"),
                    &c,
                    r,
                    &targets,
                    77 + i as u64,
                ))
            })
            .collect();
        for bs in [1usize, 3, 17, 64, 256, 2] {
            // Ragged prefill: 0..40 new tokens each (0 = an empty segment), random adapters; the
            // last batch has two long prompts (several GEMM-attention tiles are not needed for
            // correctness, but long rows are).
            let batch: Vec<(Vec<u32>, Option<Arc<LoraAdapter>>)> = (0..bs)
                .map(|_| {
                    let n = if bs == 2 {
                        300 + rng.below(500)
                    } else if rng.below(8) == 0 {
                        0
                    } else {
                        1 + rng.below(40)
                    };
                    let toks = (0..n).map(|_| rng.below(c.vocab_size) as u32).collect();
                    let a = match rng.below(ranks.len() + 1) {
                        0 => None,
                        k => Some(adapters[k - 1].clone()),
                    };
                    (toks, a)
                })
                .collect();
            let mut sorted = batch.clone();
            sorted.sort_by_key(|(_, a)| a.as_ref().map_or(0, |a| a.id));
            let distinct = sorted
                .iter()
                .filter_map(|(_, a)| a.as_ref().map(|a| a.id))
                .collect::<std::collections::BTreeSet<_>>()
                .len();
            let mut cpu_kv = KvCache::new(&c, 16 * 1024, 16);
            let want = pass(
                &mut |kv, s| host.forward(kv, s).unwrap(),
                &mut cpu_kv,
                &sorted,
                c.vocab_size,
            );
            for mode in [LoraKernelMode::PerSequence, LoraKernelMode::Chunked(32)] {
                let mut m =
                    CudaModel::from_host(gpu.clone(), &host, opts(DeviceDtype::Float32, mode, 0, 16 * 1024))
                        .unwrap();
                let mut kv = m.new_kv_cache();
                let got = pass(
                    &mut |kv, s| m.forward(kv, s).unwrap(),
                    &mut kv,
                    &sorted,
                    c.vocab_size,
                );
                let e = rel_err(&got, &want);
                if e > 1e-4 {
                    fail(format!(
                        "random h={h} heads={heads}/{kv_heads} d={hd} bs={bs} {mode:?}: rel err {e:e}"
                    ));
                }
                println!(
                    "ok  random h={h:3} heads={heads}/{kv_heads} d={hd:3} bs={bs:3} adapters={distinct} {mode:?}: prefill rel err {e:.1e}"
                );
            }
        }
        decode_vs_cpu(gpu, &c, &host, &adapters, &mut rng);
    }
}

/// Prefill then 6 decode steps of up to 256 sequences with mixed adapters: CPU, GPU eager and
/// GPU graphs must agree on every step's logits.
fn decode_vs_cpu(
    gpu: &Arc<Gpu>,
    c: &ModelConfig,
    host: &LlamaModel,
    adapters: &[Arc<LoraAdapter>],
    rng: &mut Rng,
) {
    for bs in [1usize, 5, 64, 200] {
        let seqs: Vec<(Vec<u32>, Option<Arc<LoraAdapter>>)> = (0..bs)
            .map(|i| {
                let n = 1 + rng.below(20);
                let a = if i % 3 == 0 {
                    None
                } else {
                    Some(adapters[i % adapters.len()].clone())
                };
                ((0..n).map(|_| rng.below(c.vocab_size) as u32).collect(), a)
            })
            .collect();
        let mut results: Vec<Vec<Vec<f32>>> = Vec::new();
        for which in 0..3 {
            // 0: CPU, 1: GPU eager, 2: GPU with graphs.
            let mut gpu_model = (which > 0).then(|| {
                let g = if which == 2 { 256 } else { 0 };
                CudaModel::from_host(
                    gpu.clone(),
                    host,
                    opts(DeviceDtype::Float32, LoraKernelMode::Chunked(16), g, 16 * 1024),
                )
                .unwrap()
            });
            let mut kv = match &gpu_model {
                Some(m) => m.new_kv_cache(),
                None => KvCache::new(c, 16 * 1024, 16),
            };
            let mut caches = vec![SeqCache::default(); bs];
            let mut toks: Vec<Vec<u32>> = seqs.iter().map(|s| s.0.clone()).collect();
            let mut all_logits = Vec::new();
            for step in 0..7 {
                let mut inputs = Vec::new();
                let mut new_len = Vec::new();
                for (i, cache) in caches.iter_mut().enumerate() {
                    let from = if step == 0 { 0 } else { toks[i].len() - 1 };
                    kv.reserve(cache, toks[i].len()).unwrap();
                    new_len.push((from, toks[i].len()));
                }
                for (i, cache) in caches.iter().enumerate() {
                    inputs.push(SeqInput {
                        tokens: &toks[i][new_len[i].0..new_len[i].1],
                        cache,
                        adapter: seqs[i].1.as_deref(),
                        logits: LogitsWanted::Last,
                    });
                }
                let out = match gpu_model.as_mut() {
                    Some(m) => m.forward(&kv, &inputs).unwrap(),
                    None => host.forward(&mut kv, &inputs).unwrap(),
                };
                drop(inputs);
                for (i, cache) in caches.iter_mut().enumerate() {
                    cache.len = toks[i].len();
                    // Next token: a fixed function of the step so all three runs feed the same.
                    toks[i].push(((i * 31 + step * 7) % c.vocab_size) as u32);
                }
                all_logits.extend(out);
            }
            results.push(all_logits);
        }
        let e_eager = rel_err(&results[1], &results[0]);
        let e_graph = rel_err(&results[2], &results[0]);
        if e_eager > 1e-4 || e_graph > 1e-4 {
            fail(format!(
                "decode h={} bs={bs}: eager rel err {e_eager:e}, graphs {e_graph:e}",
                c.hidden_size
            ));
        }
        println!(
            "ok  decode h={:3} bs={bs:3}: 7 steps, eager rel err {e_eager:.1e}, CUDA graphs rel err {e_graph:.1e}",
            c.hidden_size
        );
    }
}

fn main() {
    let gpu = Gpu::open(0).unwrap_or_else(|e| fail(e.to_string()));
    println!("device: {}", gpu.name);
    // --quick: the PEFT check of one model only (for compute-sanitizer, which is slow).
    let quick = std::env::args().any(|a| a == "--quick");
    peft_fixtures(&gpu, quick);
    if !quick {
        random_vs_cpu(&gpu);
    }
    println!("all GPU checks passed");
}
