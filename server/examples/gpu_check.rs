//! Correctness of the CUDA backend, run on a GPU machine by `scripts/gpu/run.sh check`.
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
//! 3. Sampling on the device against the host's reference (see `sampling_checks` below).
//! 4. Slot loads as the engine issues them (`load_slot`), into a 2-slot pool that four adapters
//!    take turns in: synchronous copies, and overlapped copies issued behind a base batch's
//!    pass, read after `slot_ready` and also straight away, even before any pass issued them
//!    (the pass that needs the slot must issue the copy and wait for it), a round with reloaded
//!    copies whose pinned images are still being converted on a worker thread, and a last round
//!    whose staging fails (as if pinned memory ran out) and falls back to synchronous copies;
//!    one round unstages each adapter (as an unload does) while its copy is queued. Every pass
//!    equals a pass in a pool where the adapters never move.
//!
//! 5. Flash prefill attention in bf16 and f16 against the f32 CPU backend, next to the GEMM
//!    path (see `flash_prefill_checks` below).
//! 6. LoRA on tensor cores in bf16 and f16 against the f32 CPU backend, next to the CUDA-core
//!    LoRA kernels (see `lora_tensor_core_checks` below).
//! 7. Decode attention on tensor cores in bf16 and f16 against the f32 CPU backend, next to the
//!    CUDA-core kernel (see `decode_attention_checks` below).
//! 8. Decode GEMMs (`decode_gemm.cu`) in bf16 and f16 against an f64 host product of the same
//!    rounded inputs, then inside a model of Llama-3.1-8B's widths (the models above are too
//!    narrow to take them) against the same model in cuBLAS (see `decode_gemm_checks` below).
//! 9. Overlapped steps (`launch_sampled`, pending tokens) against steps run one at a time (see
//!    `overlap_checks` below).
//!
//! Prints one line per case and exits non-zero on the first failure.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cudarc::driver::CudaSlice;
use loraplane_server::adapter::{LoraAdapter, LoraTarget};
use loraplane_server::backend::cpu::log_softmax;
use loraplane_server::backend::cuda::sampling::{
    sample_rows, sample_rows_penalized, top_logprobs_rows, SampleRow,
};
use loraplane_server::backend::cuda::{
    CudaModel, CudaOptions, DeviceDtype, Gpu, GpuFloat, LoraKernelMode,
    DECODE_ATTENTION_TENSOR_CORES_MIN_PAIRS,
};
use loraplane_server::engine::generate::argmax;
use loraplane_server::engine::request::SamplingParams;
use loraplane_server::engine::sampling::{apply_penalties, device_sample, kept_tokens, top_logprobs};
use loraplane_server::engine::{KvCache, SeqCache};
use loraplane_server::model::llama::{LogitsWanted, SeqInput};
use loraplane_server::model::weights::load_hf_weights;
use loraplane_server::model::{
    pending_token, DeviceSample, LlamaModel, ModelConfig, SeqOutput, MAX_DEVICE_TOP_LOGPROBS,
};
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

/// PerSequence runs also attend prefill chunks of 4+ tokens through the prefill path (GEMMs in
/// f32, the flash kernel in bf16/f16), Chunked ones through the paged kernel only, so every
/// attention path meets every reference.
fn opts(dtype: DeviceDtype, mode: LoraKernelMode, graphs: usize, max_tokens: usize) -> CudaOptions {
    let gemm_min = if mode == LoraKernelMode::PerSequence { 4 } else { 0 };
    CudaOptions {
        dtype,
        lora_slots: 8,
        lora_rank: 128,
        lora_mode: mode,
        cuda_graph_max_bs: graphs,
        max_tokens,
        kv_memory_fraction: None,
        block_size: 16,
        max_rows: 16384,
        max_seq_len: 4096,
        prefill_attention_min_rows: gemm_min,
        flash_prefill: true,
        lora_side_stream: true,
        attention_split_keys: true,
        lora_tensor_cores: true,
        decode_attention_tensor_cores: Some(DECODE_ATTENTION_TENSOR_CORES_MIN_PAIRS),
        decode_gemms: true,
        programmatic_launch: true,
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
        for bs in [1usize, 3, 17, 64, 256, 2, 5] {
            // Ragged prefill: 0..40 new tokens each (0 = an empty segment), random adapters; the
            // batch of 2 has two long prompts (several GEMM-attention tiles are not needed for
            // correctness, but long rows are), the batch of 5 three long prompts (GEMM LoRA
            // segments, written before the base GEMM) between short ones (kernel items).
            let batch: Vec<(Vec<u32>, Option<Arc<LoraAdapter>>)> = (0..bs)
                .map(|i| {
                    let n = if bs == 2 || (bs == 5 && i % 2 == 0) {
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
                // Per-sequence items apply LoRA after each base GEMM; chunked ones compute it
                // beside the GEMM on the side stream (steps of up to 256 rows without GEMM
                // segments). The pool's rank is 128: steps under 64 rows use the shrink with
                // 4 rank rows per warp, larger ones 1 (shrink_rank_rows).
                let per_seq = mode == LoraKernelMode::PerSequence;
                let o = CudaOptions {
                    lora_side_stream: !per_seq,
                    ..opts(DeviceDtype::Float32, mode, 0, 16 * 1024)
                };
                let mut m = CudaModel::from_host(gpu.clone(), &host, o).unwrap();
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
        base_then_adapter_graphs(gpu, &host, &adapters, &mut rng);
    }
}

/// A decode bucket's graph of base rows only has no LoRA kernels, so a later step of the same
/// bucket with adapters must replay another one: decode steps of 8 base sequences, then of the
/// same prompts with adapters, on one model with CUDA graphs, against a fresh eager model for
/// each.
fn base_then_adapter_graphs(gpu: &Arc<Gpu>, host: &LlamaModel, adapters: &[Arc<LoraAdapter>], rng: &mut Rng) {
    let c = host.config();
    let prompts: Vec<Vec<u32>> = (0..8)
        .map(|_| {
            (0..1 + rng.below(20))
                .map(|_| rng.below(c.vocab_size) as u32)
                .collect()
        })
        .collect();
    let base: Vec<(Vec<u32>, Option<Arc<LoraAdapter>>)> = prompts.iter().map(|p| (p.clone(), None)).collect();
    let with: Vec<(Vec<u32>, Option<Arc<LoraAdapter>>)> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| (p.clone(), Some(adapters[i % adapters.len()].clone())))
        .collect();
    let model = |graphs| {
        let o = opts(
            DeviceDtype::Float32,
            LoraKernelMode::Chunked(16),
            graphs,
            16 * 1024,
        );
        CudaModel::from_host(gpu.clone(), host, o).unwrap()
    };
    let mut graphed = model(256);
    let got_base = decode_logits(Some(&mut graphed), host, &base, 4);
    let got_with = decode_logits(Some(&mut graphed), host, &with, 4);
    let want_base = decode_logits(Some(&mut model(0)), host, &base, 4);
    let want_with = decode_logits(Some(&mut model(0)), host, &with, 4);
    let (e_base, e_with) = (rel_err(&got_base, &want_base), rel_err(&got_with, &want_with));
    // The adapters must change the logits, or the second comparison proves nothing.
    let moved = rel_err(&want_with, &want_base);
    if e_base > 1e-4 || e_with > 1e-4 || moved < 1e-3 {
        fail(format!(
            "graphs h={}: base rows then adapters in one bucket: rel err {e_base:e} then {e_with:e} against eager (adapters move the logits by {moved:e})",
            c.hidden_size
        ));
    }
    println!(
        "ok  graphs h={:3}: base-only steps then adapter steps in one bucket, rel err vs eager {e_base:.1e} / {e_with:.1e} (adapters move the logits {moved:.1e})",
        c.hidden_size
    );
}

/// Prefill (up to 600 tokens at batch sizes 1 and 5) then 6 decode steps of up to 256 sequences
/// with mixed adapters: CPU, GPU eager and
/// GPU graphs (LoRA beside the base GEMMs), and GPU eager with LoRA after them, must agree on
/// every step's logits; graphs with and without programmatic launch, bit for bit.
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
                // Small batches get long prompts too: their decode attention splits each
                // row's keys over blocks (split-key attention), ranges that then hold many keys.
                let n = if bs <= 5 {
                    1 + rng.below(600)
                } else {
                    1 + rng.below(20)
                };
                let a = if i % 3 == 0 {
                    None
                } else {
                    Some(adapters[i % adapters.len()].clone())
                };
                ((0..n).map(|_| rng.below(c.vocab_size) as u32).collect(), a)
            })
            .collect();
        let mut results: Vec<Vec<Vec<f32>>> = Vec::new();
        for which in 0..5 {
            // 0: CPU, 1: GPU eager, 2: GPU with graphs, 3: GPU eager with LoRA after the GEMMs,
            // 4: GPU with graphs whose edges are all ordinary (no programmatic launch).
            let mut gpu_model = (which > 0).then(|| {
                let g = if which == 2 || which == 4 { 256 } else { 0 };
                let o = CudaOptions {
                    lora_side_stream: which != 3,
                    programmatic_launch: which != 4,
                    ..opts(DeviceDtype::Float32, LoraKernelMode::Chunked(16), g, 16 * 1024)
                };
                CudaModel::from_host(gpu.clone(), host, o).unwrap()
            });
            results.push(decode_logits(gpu_model.as_mut(), host, &seqs, 7));
        }
        let e_eager = rel_err(&results[1], &results[0]);
        let e_graph = rel_err(&results[2], &results[0]);
        let e_after = rel_err(&results[3], &results[0]);
        if e_eager > 1e-4 || e_graph > 1e-4 || e_after > 1e-4 {
            fail(format!(
                "decode h={} bs={bs}: eager rel err {e_eager:e}, graphs {e_graph:e}, LoRA after GEMMs {e_after:e}",
                c.hidden_size
            ));
        }
        // The same kernels in the same order: a kernel that read before its predecessor's
        // writes landed would differ.
        if results[4] != results[2] {
            fail(format!(
                "decode h={} bs={bs}: graphs with programmatic launch differ from graphs without (rel err {:e})",
                c.hidden_size,
                rel_err(&results[2], &results[4])
            ));
        }
        println!(
            "ok  decode h={:3} bs={bs:3}: 7 steps, eager rel err {e_eager:.1e}, CUDA graphs rel err {e_graph:.1e} (bit-identical without programmatic launch), LoRA after GEMMs {e_after:.1e}",
            c.hidden_size
        );
    }
}

/// The last row's logits of `steps` forward passes over `seqs`: their prompts, then one token
/// per step (a fixed function of the step and sequence, so that every run feeds the same), on
/// `gpu_model` or, without one, on the host.
fn decode_logits(
    mut gpu_model: Option<&mut CudaModel>,
    host: &LlamaModel,
    seqs: &[(Vec<u32>, Option<Arc<LoraAdapter>>)],
    steps: usize,
) -> Vec<Vec<f32>> {
    let c = host.config();
    let mut kv = match &gpu_model {
        Some(m) => m.new_kv_cache(),
        None => KvCache::new(c, 16 * 1024, 16),
    };
    let mut caches = vec![SeqCache::default(); seqs.len()];
    let mut toks: Vec<Vec<u32>> = seqs.iter().map(|s| s.0.clone()).collect();
    let mut all_logits = Vec::new();
    for step in 0..steps {
        let mut new_len = Vec::new();
        for (i, cache) in caches.iter_mut().enumerate() {
            let from = if step == 0 { 0 } else { toks[i].len() - 1 };
            kv.reserve(cache, toks[i].len()).unwrap();
            new_len.push((from, toks[i].len()));
        }
        let inputs: Vec<SeqInput> = caches
            .iter()
            .enumerate()
            .map(|(i, cache)| SeqInput {
                tokens: &toks[i][new_len[i].0..new_len[i].1],
                cache,
                adapter: seqs[i].1.as_deref(),
                logits: LogitsWanted::Last,
            })
            .collect();
        let out = match gpu_model.as_mut() {
            Some(m) => m.forward(&kv, &inputs).unwrap(),
            None => host.forward(&mut kv, &inputs).unwrap(),
        };
        drop(inputs);
        for (i, cache) in caches.iter_mut().enumerate() {
            cache.len = toks[i].len();
            toks[i].push(((i * 31 + step * 7) % c.vocab_size) as u32);
        }
        all_logits.extend(out);
    }
    all_logits
}

// ---------------------------------------------------------------------------------------------
// 6. LoRA on tensor cores (`kernels/src/lora_mma.cu`, bf16 and f16): a random model whose widths
//    the tensor-core kernels take, in pools of rank 16, 64 and 128 (the shrink's three tile
//    counts) with adapters of ranks 1 to 128, both work-item schemes (per sequence: items of up
//    to 63 rows, several 16-row passes; chunked: up to 32), ragged prefill with empty segments,
//    then decode at batch 1 (a single item: the shrink splits the pool's rank over blocks; with
//    an adapter at and one below the pool's rank), 5, 64 and 200 with CUDA graphs (at 200 each
//    block of the gate/up expand walks several column groups, the last one partly past the end).
//    The reference is the f32 CPU backend; the same device model with the CUDA-core kernels sets
//    the bar: tensor cores may only add the rounding of `x·Aᵀ` to the element type, so their
//    error must stay within MMA_ERR_FACTOR times the CUDA-core error plus MMA_ERR_SLACK. The
//    adapters must move the reference's logits by several times that bound, so a wrong delta
//    cannot pass. First, the kernels' resources: the shrink and the expand must fit two
//    256-thread blocks per SM without spilling (the shrink's bound in lora_mma.cu; one block
//    per SM cost batch-64 adapter steps up to 0.39 ms).
// ---------------------------------------------------------------------------------------------

const MMA_ERR_FACTOR: f64 = 1.5;
/// A sequence's tokens and adapter.
type Seq = (Vec<u32>, Option<Arc<LoraAdapter>>);
const MMA_ERR_SLACK: f64 = 2e-3;

/// `quick` (under compute-sanitizer): the rank-64 pool in bf16, one prefill and three decode
/// cases.
fn lora_tensor_core_checks(gpu: &Arc<Gpu>, quick: bool) {
    for t in ["bf16", "f16"] {
        for kernel in ["lora_shrink", "lora_expand", "lora_expand_store"] {
            let name = format!("{kernel}_mma_{t}");
            // The expand's largest staged y: 3 targets at the largest rank.
            let shared = if kernel == "lora_shrink" {
                0
            } else {
                loraplane_kernels::lora_mma_expand_shared(3, loraplane_kernels::LORA_MMA_MAX_RANK, 2)
            };
            let blocks = gpu.kernels.blocks_per_sm(&name, 256, shared);
            let (regs, local) = gpu.kernels.registers(&name);
            if blocks < 2 || local != 0 {
                fail(format!(
                    "{name}: {blocks} blocks of 256 threads per SM ({regs} registers, {local} B spilled \
                     per thread); the LoRA kernels need 2 and no spills"
                ));
            }
            println!("ok   {name}: {regs} registers, {blocks} blocks of 256 threads per SM");
        }
    }
    let mut rng = Rng(0x7e45_0c02_e5ab_cd01);
    let c = ModelConfig::from_hf_json(
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":512,"hidden_size":256,"intermediate_size":2048,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":64,
        "max_position_embeddings":4096,"tie_word_embeddings":false}"#,
    )
    .unwrap();
    let host = random_model(&c, &mut rng);
    let all = LoraTarget::ALL;
    let pools: &[usize] = if quick { &[64] } else { &[16, 64, 128] };
    let dtypes: &[DeviceDtype] = if quick {
        &[DeviceDtype::Bfloat16]
    } else {
        &[DeviceDtype::Bfloat16, DeviceDtype::Float16]
    };
    for &pool_rank in pools {
        let adapters: Vec<Arc<LoraAdapter>> = [1usize, 4, 8, 16, 64, 128]
            .iter()
            .filter(|&&r| r <= pool_rank)
            .enumerate()
            .map(|(i, &r)| {
                let targets = if i % 2 == 0 {
                    all.to_vec()
                } else {
                    vec![all[1], all[3], all[4], all[6]]
                };
                let mut a = LoraAdapter::dummy(&format!("r{r}"), &c, r, &targets, 300 + i as u64);
                // Dummy factors are small; a larger scale makes every delta show in the logits.
                a.scaling = 8.0;
                Arc::new(a)
            })
            .collect();
        // The first sequence of every case has the pool's largest adapter, the rest any or none.
        let pick = |i: usize, rng: &mut Rng| match (i, rng.below(adapters.len() + 1)) {
            (0, _) => adapters.last().cloned(),
            (_, 0) => None,
            (_, k) => Some(adapters[k - 1].clone()),
        };
        // (what, prefill batch or decode sequences, decode steps; 0 = one prefill pass)
        let mut cases: Vec<(String, Vec<Seq>, usize)> = Vec::new();
        let (prefill_bs, decode_bs): (&[usize], &[usize]) = if quick {
            (&[17], &[64])
        } else {
            (&[1, 17, 64], &[5, 64, 200])
        };
        for &bs in prefill_bs {
            let mut batch: Vec<_> = (0..bs)
                .map(|i| {
                    let n = match rng.below(8) {
                        0 => 0,
                        _ if i % 5 == 1 => 40 + rng.below(24),
                        _ => 1 + rng.below(40),
                    };
                    let toks = (0..n).map(|_| rng.below(c.vocab_size) as u32).collect();
                    (toks, pick(i, &mut rng))
                })
                .collect();
            batch.sort_by_key(|(_, a)| a.as_ref().map_or(0, |a| a.id));
            cases.push((format!("prefill bs={bs:3}"), batch, 0));
        }
        for &bs in decode_bs {
            let seqs: Vec<_> = (0..bs)
                .map(|i| {
                    let n = 1 + rng.below(30);
                    (
                        (0..n).map(|_| rng.below(c.vocab_size) as u32).collect(),
                        pick(i, &mut rng),
                    )
                })
                .collect();
            cases.push((format!("decode  bs={bs:3}"), seqs, 6));
        }
        // Batch 1 is a single work item, whose shrink splits the pool's rank over blocks: with
        // the pool's largest adapter, and with a rank-4 one (the blocks past its rank exit).
        // Their own random stream, so that the other cases stay what they were.
        let mut rng1 = Rng(0x51_9e1e_17e3 ^ pool_rank as u64);
        for a in [&adapters[1], adapters.last().unwrap()] {
            let toks = (0..1 + rng1.below(30))
                .map(|_| rng1.below(c.vocab_size) as u32)
                .collect();
            cases.push((
                format!("decode  bs=  1 r{:<3}", a.rank),
                vec![(toks, Some(a.clone()))],
                6,
            ));
        }
        let run = |mut gpu_model: Option<CudaModel>, batch: &[Seq], steps| {
            if steps > 0 {
                return decode_logits(gpu_model.as_mut(), &host, batch, steps);
            }
            match gpu_model {
                Some(mut m) => {
                    let mut kv = m.new_kv_cache();
                    pass(
                        &mut |kv, s| m.forward(kv, s).unwrap(),
                        &mut kv,
                        batch,
                        c.vocab_size,
                    )
                }
                None => {
                    let mut kv = KvCache::new(&c, 16 * 1024, 16);
                    pass(
                        &mut |kv, s| host.forward(kv, s).unwrap(),
                        &mut kv,
                        batch,
                        c.vocab_size,
                    )
                }
            }
        };
        for (what, batch, steps) in &cases {
            let want = run(None, batch, *steps);
            let bare: Vec<_> = batch.iter().map(|(t, _)| (t.clone(), None)).collect();
            let lora_effect = rel_err(&run(None, &bare, *steps), &want);
            for &dtype in dtypes {
                for mode in [LoraKernelMode::PerSequence, LoraKernelMode::Chunked(32)] {
                    let err = |tc: bool| {
                        let o = CudaOptions {
                            lora_rank: pool_rank,
                            lora_tensor_cores: tc,
                            lora_side_stream: mode != LoraKernelMode::PerSequence,
                            ..opts(dtype, mode, if *steps > 0 { 256 } else { 0 }, 16 * 1024)
                        };
                        let m = CudaModel::from_host(gpu.clone(), &host, o).unwrap();
                        rel_err(&run(Some(m), batch, *steps), &want)
                    };
                    let (e_core, e_tc) = (err(false), err(true));
                    let bound = MMA_ERR_FACTOR * e_core + MMA_ERR_SLACK;
                    let line = format!(
                        "lora-mma pool r{pool_rank:3} {what} {:8} {mode:?}: rel err tensor cores {e_tc:.1e}, CUDA cores {e_core:.1e} (bound {bound:.1e}), adapters move logits {lora_effect:.1e}",
                        dtype.name()
                    );
                    if !e_tc.is_finite() || e_tc > bound {
                        fail(line);
                    }
                    if lora_effect < 4.0 * bound {
                        fail(format!(
                            "{line}: the adapters' effect is too small to test the delta"
                        ));
                    }
                    println!("ok  {line}");
                }
            }
        }
    }
}

fn main() {
    let gpu = Gpu::open(0).unwrap_or_else(|e| fail(e.to_string()));
    println!("device: {}", gpu.name);
    // --quick: the PEFT check of one model and a few sampling draws (for compute-sanitizer,
    // which is slow). `--only sampling` runs the sampling checks alone, `--only lora-mma` the
    // tensor-core LoRA checks, `--only decode-attention` the tensor-core decode attention checks,
    // `--only slots` the slot load checks, `--only decode-gemm` the decode GEMM checks, `--only
    // overlap` the overlapped-step checks.
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1));
    if only.is_some_and(|o| o == "lora-mma") {
        lora_tensor_core_checks(&gpu, quick);
        println!("all GPU checks passed");
        return;
    }
    if only.is_some_and(|o| o == "slots") {
        slot_load_checks(&gpu);
        println!("all GPU checks passed");
        return;
    }
    if only.is_some_and(|o| o == "decode-gemm") {
        decode_gemm_checks(&gpu, quick);
        println!("all GPU checks passed");
        return;
    }
    if only.is_some_and(|o| o == "overlap") {
        overlap_checks(&gpu);
        println!("all GPU checks passed");
        return;
    }
    if only.is_some_and(|o| o == "decode-attention") {
        decode_attention_checks(&gpu, quick);
        println!("all GPU checks passed");
        return;
    }
    if only.is_none_or(|o| o != "sampling") {
        peft_fixtures(&gpu, quick);
        if !quick {
            random_vs_cpu(&gpu);
        }
    }
    sampling_checks(&gpu, quick);
    penalty_checks(&gpu);
    if only.is_none_or(|o| o != "sampling") {
        slot_load_checks(&gpu);
        flash_prefill_checks(&gpu, quick);
        lora_tensor_core_checks(&gpu, quick);
        decode_attention_checks(&gpu, quick);
        decode_gemm_checks(&gpu, quick);
        overlap_checks(&gpu);
    }
    println!("all GPU checks passed");
}

// ---------------------------------------------------------------------------------------------
// 3. Sampling on the device (`backend::cuda::sampling`, kernels/src/sampling.cu) against the
//    host's reference (`engine::sampling::kept_tokens`, the kept set `draw()` uses):
//    - greedy (temperature 0) and top_k = 1 return the host argmax, the lowest id on exact ties;
//    - every returned log-prob is the host log-softmax of the token within 1e-4;
//    - for 54 combinations (temperature 0.7/1.0/1.5, top_k 0/5/50, top_p 1.0/0.9/0.5,
//      min_p 0/0.05) on peaked and flat rows of vocab 1000 and 128256, every one of N draws
//      (distinct seeds) lies in the host's kept set (widened by rounding slack and exact ties),
//      and the draws' distribution over rank bins is within a total-variation bound of the
//      host's exact kept distribution; the check also shows that it would catch a sampler that
//      ignored the temperature or top-p;
//    - the same seeds give the same tokens;
//    - `forward_sampled` on a random model with adapters (reordered rows, prompt log-probs,
//      CUDA graph padding) matches `forward` + host argmax / log-softmax, and the logits it
//      still returns are `forward`'s, bit for bit;
//    - the time to sample 64 rows of 128256.
// ---------------------------------------------------------------------------------------------

/// Draws per (row, combination) for the distribution check.
const SAMPLING_DRAWS: usize = 65536;
/// Chance that a correct sampler fails one distribution check (see `tv_bound`).
const SAMPLING_FAIL_PROB: f64 = 1e-9;

fn permutation(n: usize, rng: &mut Rng) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        p.swap(i, rng.below(i + 1));
    }
    p
}

/// Rows with distinct logits in random token order: `peaked` (the top token holds about 60% of
/// the mass at T = 1) and `flat` (logits evenly spread over 8 nats).
fn sampling_rows(vocab: usize, rng: &mut Rng) -> Vec<(&'static str, Vec<f32>)> {
    let peaked = permutation(vocab, rng)
        .iter()
        .map(|&r| 5.0 - 2.0 * (r as f32).sqrt())
        .collect();
    let flat = permutation(vocab, rng)
        .iter()
        .map(|&r| 1.0 - r as f32 * (8.0 / vocab as f32))
        .collect();
    vec![("peaked", peaked), ("flat", flat)]
}

fn params(temperature: f32, top_k: usize, top_p: f32, min_p: f32) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k,
        top_p,
        min_p,
        ..Default::default()
    }
}

/// Tokens a correct device sampler may return: the host's kept set under slightly looser top-p
/// and min-p (f32 versus f64 rounding at the boundary), widened to every token tied with its
/// lowest logit (the device keeps exact ties at a threshold).
fn allowed_tokens(l: &[f32], p: &SamplingParams) -> Vec<bool> {
    let mut loose = p.clone();
    if loose.top_p < 1.0 {
        loose.top_p = (loose.top_p + 1e-5).min(1.0);
    }
    loose.min_p = (loose.min_p - 1e-6).max(0.0);
    let floor = kept_tokens(l, &loose)
        .iter()
        .map(|&(i, _)| l[i as usize])
        .fold(f32::INFINITY, f32::min);
    let slack = 1e-6 * (1.0 + floor.abs());
    l.iter().map(|&v| v >= floor - slack).collect()
}

/// The host's exact distribution of `draw()` over tokens.
fn kept_distribution(l: &[f32], p: &SamplingParams) -> Vec<f64> {
    let kept = kept_tokens(l, p);
    let total: f64 = kept.iter().map(|c| c.1).sum();
    let mut d = vec![0.0; l.len()];
    for (i, w) in kept {
        d[i as usize] = w / total;
    }
    d
}

/// Rank bins (rank 0 = the largest logit): ranks 0..15 alone, then [16, 32), [32, 64), ...
/// Returns each token's bin and the number of bins.
fn rank_bins(l: &[f32]) -> (Vec<usize>, usize) {
    let mut order: Vec<usize> = (0..l.len()).collect();
    order.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
    let bin_of_rank = |r: usize| {
        if r < 16 {
            r
        } else {
            11 + (usize::BITS - r.leading_zeros()) as usize
        }
    };
    let mut bin = vec![0; l.len()];
    for (r, &t) in order.iter().enumerate() {
        bin[t] = bin_of_rank(r);
    }
    (bin, bin_of_rank(l.len() - 1) + 1)
}

fn binned(dist: impl Iterator<Item = (usize, f64)>, bins: &[usize], n: usize) -> Vec<f64> {
    let mut b = vec![0.0; n];
    for (t, p) in dist {
        b[bins[t]] += p;
    }
    b
}

fn tv(a: &[f64], b: &[f64]) -> f64 {
    0.5 * a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>()
}

/// Bretagnolle-Huber-Carol: for the empirical distribution of `n` draws over `bins` bins,
/// P(sum |p̂ - p| >= λ) <= 2^bins · exp(-n λ² / 2); the returned bound on TV = λ / 2 is exceeded
/// by a correct sampler with probability at most SAMPLING_FAIL_PROB.
fn tv_bound(bins: usize, n: usize) -> f64 {
    let lambda = (2.0 * (bins as f64 * 2f64.ln() - SAMPLING_FAIL_PROB.ln()) / n as f64).sqrt();
    lambda / 2.0
}

fn device_sample_rows(
    gpu: &Arc<Gpu>,
    logits: &CudaSlice<f32>,
    vocab: usize,
    rows: &[SampleRow],
) -> Vec<(u32, f32)> {
    sample_rows(gpu, gpu.ptr(logits), vocab, rows)
        .unwrap_or_else(|e| fail(format!("device sampling: {e}")))
        .into_iter()
        .map(|t| (t.token_id, t.logprob))
        .collect()
}

fn check_logprob(what: &str, l: &[f32], lp_host: &[f32], token: u32, lp: f32) {
    if token as usize >= l.len() {
        fail(format!(
            "{what}: token {token} outside the vocabulary of {}",
            l.len()
        ));
    }
    let d = (lp - lp_host[token as usize]).abs();
    if d.is_nan() || d > 1e-4 {
        fail(format!(
            "{what}: log-prob of token {token} is {lp}, host log-softmax {} (|Δ| {d:e} > 1e-4)",
            lp_host[token as usize]
        ));
    }
}

fn sampling_kernel_checks(gpu: &Arc<Gpu>, quick: bool) {
    let mut rng = Rng(0x5a3b_1ed0_0df0_0d11);
    let draws = if quick { 256 } else { SAMPLING_DRAWS };
    let temps = [0.7f32, 1.0, 1.5];
    let ks = [0usize, 5, 50];
    let ps = [1.0f32, 0.9, 0.5];
    let mps = [0.0f32, 0.05];
    let mut combos = Vec::new();
    for &t in &temps {
        for &k in &ks {
            for &p in &ps {
                for &mp in &mps {
                    combos.push(params(t, k, p, mp));
                }
            }
        }
    }
    if quick {
        // Under compute-sanitizer: every branch of the kernel, a few draws each.
        combos = vec![
            params(1.0, 0, 1.0, 0.0),
            params(0.7, 50, 1.0, 0.0),
            params(1.5, 0, 0.9, 0.0),
            params(1.0, 5, 0.5, 0.05),
        ];
    }
    // The largest separations between the exact distribution and what a sampler ignoring the
    // temperature or top-p would produce, over bound, over all cases: must exceed 2.
    let (mut sep_t, mut sep_p) = (0.0f64, 0.0f64);
    for vocab in [1000usize, 128256] {
        let mut rows = sampling_rows(vocab, &mut rng);
        // Exact ties at the maximum: greedy must return the lower id.
        let mut tied: Vec<f32> = (0..vocab).map(|_| 3.0 * rng.f()).collect();
        let (a, b) = (rng.below(vocab / 2), vocab / 2 + rng.below(vocab / 2));
        tied[a] = 4.0;
        tied[b] = 4.0;
        rows.push(("tied", tied));
        let host: Vec<f32> = rows.iter().flat_map(|r| r.1.iter().copied()).collect();
        let dev = gpu.upload(&host).unwrap_or_else(|e| fail(e.to_string()));
        let lps: Vec<Vec<f32>> = rows.iter().map(|r| log_softmax(&r.1)).collect();

        // Greedy: temperature 0, and top_k = 1 at temperature 1.
        let greedy: Vec<SampleRow> = (0..rows.len())
            .flat_map(|r| {
                [
                    SampleRow::new(
                        r,
                        &device_sample(&params(0.0, 0, 1.0, 0.0), 0, &[], &[], r as u64),
                    ),
                    SampleRow::new(
                        r,
                        &device_sample(&params(1.0, 1, 1.0, 0.0), 0, &[], &[], r as u64),
                    ),
                ]
            })
            .collect();
        for (i, &(tok, lp)) in device_sample_rows(gpu, &dev, vocab, &greedy).iter().enumerate() {
            let (name, l) = (&rows[i / 2].0, &rows[i / 2].1);
            let what = format!("greedy vocab {vocab} {name} {}", ["T=0", "top_k=1"][i % 2]);
            check_logprob(&what, l, &lps[i / 2], tok, lp);
            let want = argmax(l);
            if tok != want {
                fail(format!("{what}: token {tok}, host argmax {want}"));
            }
        }
        println!(
            "ok  sampling vocab {vocab:6}: greedy and top_k=1 = host argmax (lowest id of an exact tie), log-probs within 1e-4"
        );

        // Top log-probs: the host's top_logprobs() of the row's log-softmax, in its order
        // (ties: lower id first), also on a row of a few distinct values (large exact ties).
        let quantized: Vec<f32> = (0..vocab).map(|_| (rng.f() * 8.0).round() / 2.0).collect();
        let mut top_rows: Vec<(&str, &[f32], Vec<f32>)> = rows
            .iter()
            .zip(&lps)
            .map(|(r, lp)| (r.0, &r.1[..], lp.clone()))
            .collect();
        top_rows.push(("quantized", &quantized, log_softmax(&quantized)));
        let top_host: Vec<f32> = top_rows.iter().flat_map(|r| r.1.iter().copied()).collect();
        let top_dev = gpu.upload(&top_host).unwrap_or_else(|e| fail(e.to_string()));
        for n in [1usize, 5, MAX_DEVICE_TOP_LOGPROBS] {
            let asks: Vec<(usize, usize)> = (0..top_rows.len()).map(|r| (r, n)).collect();
            let got = top_logprobs_rows(gpu, gpu.ptr(&top_dev), vocab, &asks)
                .unwrap_or_else(|e| fail(format!("top log-probs: {e}")));
            for ((name, _, lp), got) in top_rows.iter().zip(got) {
                let want = top_logprobs(lp, n);
                let ids = |v: &[(u32, f32)]| v.iter().map(|t| t.0).collect::<Vec<_>>();
                if ids(&got) != ids(&want) {
                    fail(format!(
                        "top {n} log-probs vocab {vocab} {name}: ids {:?}, host {:?}",
                        ids(&got),
                        ids(&want)
                    ));
                }
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a.1 - b.1).abs())
                    .fold(0.0f32, f32::max);
                if worst.is_nan() || worst > 1e-4 {
                    fail(format!(
                        "top {n} log-probs vocab {vocab} {name}: |Δ| {worst:e} > 1e-4"
                    ));
                }
            }
        }
        println!(
            "ok  sampling vocab {vocab:6}: top 1/5/{MAX_DEVICE_TOP_LOGPROBS} log-probs = host top_logprobs (ids in order, ties by id; values within 1e-4)"
        );

        for (ri, (name, l)) in rows.iter().enumerate().take(2) {
            let (bins, nbins) = rank_bins(l);
            let bound = tv_bound(nbins, draws);
            let mut worst = (0.0f64, String::new());
            for (ci, p) in combos.iter().enumerate() {
                let what = format!(
                    "vocab {vocab} {name} T={} top_k={} top_p={} min_p={}",
                    p.temperature, p.top_k, p.top_p, p.min_p
                );
                let seed0 = ((vocab as u64) << 40) ^ ((ri as u64) << 32) ^ ((ci as u64) << 20);
                let batch: Vec<SampleRow> = (0..draws)
                    .map(|i| SampleRow::new(ri, &device_sample(p, 0, &[], &[], seed0 + i as u64)))
                    .collect();
                let got = device_sample_rows(gpu, &dev, vocab, &batch);
                // Same seeds, same tokens (and log-probs), bit for bit.
                let again = device_sample_rows(gpu, &dev, vocab, &batch[..draws.min(4096)]);
                if got[..again.len()] != again[..] {
                    fail(format!("{what}: the same seeds gave different tokens"));
                }
                let allowed = allowed_tokens(l, p);
                let mut counts = vec![0usize; vocab];
                for &(tok, lp) in &got {
                    check_logprob(&what, l, &lps[ri], tok, lp);
                    if !allowed[tok as usize] {
                        fail(format!(
                            "{what}: drew token {tok} (logit {}) outside the host's kept set of {} tokens",
                            l[tok as usize],
                            kept_tokens(l, p).len()
                        ));
                    }
                    counts[tok as usize] += 1;
                }
                if quick {
                    continue;
                }
                let bin = |d: &[f64]| binned(d.iter().copied().enumerate(), &bins, nbins);
                let exact = bin(&kept_distribution(l, p));
                let seen = binned(
                    counts
                        .iter()
                        .enumerate()
                        .map(|(t, &c)| (t, c as f64 / draws as f64)),
                    &bins,
                    nbins,
                );
                let d = tv(&seen, &exact);
                if d > bound {
                    fail(format!(
                        "{what}: total variation {d:.4} between {draws} draws and the host distribution (over {nbins} rank bins) exceeds {bound:.4}"
                    ));
                }
                if d / bound > worst.0 {
                    worst = (d / bound, what.clone());
                }
                let ignore_t = params(1.0, p.top_k, p.top_p, p.min_p);
                let ignore_p = params(p.temperature, p.top_k, 1.0, p.min_p);
                sep_t = sep_t.max(tv(&bin(&kept_distribution(l, &ignore_t)), &exact) / bound);
                sep_p = sep_p.max(tv(&bin(&kept_distribution(l, &ignore_p)), &exact) / bound);
            }
            if quick {
                println!(
                    "ok  sampling vocab {vocab:6} {name:6}: {} combinations × {draws} draws inside the host kept set, log-probs within 1e-4, seeds reproduce",
                    combos.len()
                );
            } else {
                println!(
                    "ok  sampling vocab {vocab:6} {name:6}: {} combinations × {draws} draws inside the host kept set, seeds reproduce, TV over {nbins} rank bins within {bound:.4} (worst {:.2} of it: {})",
                    combos.len(),
                    worst.0,
                    worst.1
                );
            }
        }
    }
    if !quick {
        if sep_t <= 2.0 || sep_p <= 2.0 {
            fail(format!(
                "the distribution check is too weak: ignoring the temperature moves TV by at most {sep_t:.2}, ignoring top-p by {sep_p:.2} times the bound (need > 2)"
            ));
        }
        println!(
            "ok  sampling: the check would catch a sampler ignoring the temperature (TV up to {sep_t:.1}× the bound) or top-p ({sep_p:.1}×)"
        );
    }
}

/// `n` random prompts of 1 to 30 tokens, every third on the base model and the others on the
/// two `adapters` in turn.
fn mixed_batch(
    c: &ModelConfig,
    rng: &mut Rng,
    n: usize,
    adapters: &[Arc<LoraAdapter>],
) -> (Vec<Vec<u32>>, Vec<Option<Arc<LoraAdapter>>>) {
    let prompts = (0..n)
        .map(|_| {
            (0..1 + rng.below(30))
                .map(|_| rng.below(c.vocab_size) as u32)
                .collect()
        })
        .collect();
    let held = (0..n)
        .map(|i| match i % 3 {
            0 => None,
            k => Some(adapters[k - 1].clone()),
        })
        .collect();
    (prompts, held)
}

/// `forward_sampled` against `forward` on the same inputs (re-running a step rewrites the same
/// KV entries, so both see identical logits).
fn sampling_forward_checks(gpu: &Arc<Gpu>) {
    let mut rng = Rng(0xfeed_5a3b_0123_4567);
    let c = config(256, 4, 2, 64);
    let host = random_model(&c, &mut rng);
    let adapters: Vec<Arc<LoraAdapter>> = (0..2)
        .map(|i| {
            Arc::new(LoraAdapter::dummy(
                &format!("s{i}"),
                &c,
                8,
                &LoraTarget::ALL,
                300 + i,
            ))
        })
        .collect();
    for graphs in [0usize, 16] {
        let mut m = CudaModel::from_host(
            gpu.clone(),
            &host,
            opts(
                DeviceDtype::Float32,
                LoraKernelMode::Chunked(16),
                graphs,
                16 * 1024,
            ),
        )
        .unwrap();
        let mut kv = m.new_kv_cache();
        let n = 9;
        let (mut toks, held) = mixed_batch(&c, &mut rng, n, &adapters);
        let mut caches = vec![SeqCache::default(); n];
        for step in 0..4 {
            let mut inputs = Vec::new();
            for (i, cache) in caches.iter_mut().enumerate() {
                kv.reserve(cache, toks[i].len()).unwrap();
            }
            // Step 0 is the prefill, with prompt log-probs for every fourth sequence; then decode
            // steps: mixed, all host logits, all sampled.
            let wants_all = |i: usize| step == 0 && i % 4 == 1;
            let sampled = |i: usize| !wants_all(i) && (step == 3 || (step != 2 && i.is_multiple_of(2)));
            for (i, cache) in caches.iter().enumerate() {
                inputs.push(SeqInput {
                    tokens: &toks[i][cache.len..],
                    cache,
                    adapter: held[i].as_deref(),
                    logits: if wants_all(i) {
                        LogitsWanted::All
                    } else {
                        LogitsWanted::Last
                    },
                });
            }
            let sampling: Vec<Option<DeviceSample>> = (0..n)
                .map(|i| {
                    sampled(i).then(|| {
                        let t = if i % 4 == 0 { 0.0 } else { 0.9 };
                        device_sample(&params(t, 0, 0.95, 0.0), 0, &[], &[], (step * 100 + i) as u64)
                    })
                })
                .collect();
            let want = m.forward(&kv, &inputs).unwrap();
            let got = m.forward_sampled(&kv, &inputs, &sampling).unwrap();
            drop(inputs);
            let what = |i: usize| format!("forward_sampled graphs={graphs} step {step} seq {i}");
            for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                match (g, &sampling[i]) {
                    (SeqOutput::Logits(l), None) => {
                        if l != w {
                            fail(format!("{}: host logits differ from forward's", what(i)));
                        }
                    }
                    (SeqOutput::Sampled(t), Some(s)) => {
                        let row = &w[w.len() - c.vocab_size..];
                        check_logprob(&what(i), row, &log_softmax(row), t.token_id, t.logprob);
                        if s.temperature == 0.0 && t.token_id != argmax(row) {
                            fail(format!(
                                "{}: greedy token {} != argmax {}",
                                what(i),
                                t.token_id,
                                argmax(row)
                            ));
                        }
                        let p = params(s.temperature, 0, s.top_p, 0.0);
                        if s.temperature > 0.0 && !allowed_tokens(row, &p)[t.token_id as usize] {
                            fail(format!(
                                "{}: token {} outside the host's kept set",
                                what(i),
                                t.token_id
                            ));
                        }
                    }
                    _ => fail(format!("{}: the wrong kind of output", what(i))),
                }
            }
            // Advance every sequence by one token (the sampled one where there is one).
            for (i, cache) in caches.iter_mut().enumerate() {
                cache.len = toks[i].len();
                let next = match &got[i] {
                    SeqOutput::Sampled(t) => t.token_id,
                    SeqOutput::Logits(_) => ((i * 31 + step * 7) % c.vocab_size) as u32,
                };
                toks[i].push(next);
            }
        }
        let bad = SeqInput {
            tokens: &toks[0],
            cache: &caches[0],
            adapter: None,
            logits: LogitsWanted::All,
        };
        if m.forward_sampled(
            &kv,
            &[bad],
            &[Some(device_sample(&params(1.0, 0, 1.0, 0.0), 0, &[], &[], 1))],
        )
        .is_ok()
        {
            fail("forward_sampled accepted a sampled sequence that wants every row's logits".into());
        }
        println!(
            "ok  sampling forward_sampled graphs={graphs:2}: 4 steps × {n} sequences (adapters, prompt log-probs, mixed/all-host/all-device), logits bit-identical, tokens = argmax / inside the kept set"
        );
    }
}

fn sampling_timing(gpu: &Arc<Gpu>) {
    let (rows, vocab) = (64usize, 128256usize);
    let mut rng = Rng(0x7157_0000_1234_5678);
    let host: Vec<f32> = (0..rows * vocab).map(|_| 4.0 * rng.f()).collect();
    let dev = gpu.upload(&host).unwrap_or_else(|e| fail(e.to_string()));
    let time = |f: &mut dyn FnMut()| {
        for _ in 0..3 {
            f();
        }
        let t0 = std::time::Instant::now();
        let iters = 50;
        for _ in 0..iters {
            f();
        }
        t0.elapsed().as_secs_f64() * 1e3 / iters as f64
    };
    let download = time(&mut || {
        gpu.download(&dev, rows * vocab).unwrap();
    });
    println!("    timing: copying {rows} rows × {vocab} logits to the host: {download:.3} ms");
    for (label, p) in [
        ("greedy", params(0.0, 0, 1.0, 0.0)),
        ("T=0.8", params(0.8, 0, 1.0, 0.0)),
        ("T=0.8 top_k=50", params(0.8, 50, 1.0, 0.0)),
        ("T=0.8 top_p=0.9", params(0.8, 0, 0.9, 0.0)),
        ("T=0.8 top_k=50 top_p=0.9 min_p=0.05", params(0.8, 50, 0.9, 0.05)),
    ] {
        let batch: Vec<SampleRow> = (0..rows)
            .map(|r| SampleRow::new(r, &device_sample(&p, 0, &[], &[], r as u64)))
            .collect();
        let ms = time(&mut || {
            device_sample_rows(gpu, &dev, vocab, &batch);
        });
        println!("    timing: sampling {rows} rows × {vocab} on the device, {label}: {ms:.3} ms (upload, kernel, download)");
    }
}

/// Penalties on the device (`penalize_f32`, then `sample_f32` on the copy) against the host's
/// `apply_penalties`: greedy picks the host's token, draws stay in the host's kept set of the
/// penalised row, and every log-prob is under the unmodified row.
fn penalty_checks(gpu: &Arc<Gpu>) {
    let mut rng = Rng(0x9e4a_17c5_0b3d_2f61);
    let vocab = 128256;
    let l: Vec<f32> = (0..vocab).map(|_| 6.0 * rng.f() - 3.0).collect();
    let lp = log_softmax(&l);
    let dev = gpu.upload(&l).unwrap_or_else(|e| fail(e.to_string()));
    // History among the likeliest tokens, so that the penalties change the answer.
    let mut top: Vec<usize> = (0..vocab).collect();
    top.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
    let pick = |rng: &mut Rng, n: usize| -> Vec<u32> { (0..n).map(|_| top[rng.below(40)] as u32).collect() };
    let (mut prompt, mut output) = (pick(&mut rng, 30), pick(&mut rng, 20));
    // The likeliest token is in both, so that penalising pushes greedy off it.
    prompt.push(top[0] as u32);
    output.push(top[0] as u32);
    for (rep, freq, pres) in [
        (1.3f32, 0.0f32, 0.0f32),
        (1.0, 0.7, 0.0),
        (1.0, 0.0, 1.5),
        (0.8, -0.3, 0.5),
    ] {
        let mut p = params(0.0, 0, 1.0, 0.0);
        (p.repetition_penalty, p.frequency_penalty, p.presence_penalty) = (rep, freq, pres);
        let mut pen = l.clone();
        apply_penalties(&mut pen, &p, &prompt, &output);
        let what = format!("penalties rep={rep} freq={freq} pres={pres}");
        // Greedy, then T=1 with top-k 20: 256 draws, each within the host's kept set.
        let mut sampled = p.clone();
        (sampled.temperature, sampled.top_k) = (1.0, 20);
        let kept = kept_tokens(&pen, &sampled);
        let mut rows = Vec::new();
        let mut ds = Vec::new();
        for i in 0..257u64 {
            let d = device_sample(if i == 0 { &p } else { &sampled }, 0, &prompt, &output, i);
            rows.push(SampleRow::new(0, &d));
            ds.push(d);
        }
        let pens: Vec<_> = ds.iter().map(|d| d.penalties.as_ref()).collect();
        let got = sample_rows_penalized(gpu, gpu.ptr(&dev), vocab, &rows, &pens)
            .unwrap_or_else(|e| fail(format!("{what}: {e}")));
        let want = argmax(&pen);
        let only_penalising = rep >= 1.0 && freq >= 0.0 && pres >= 0.0;
        if got[0].token_id != want || (only_penalising && want == argmax(&l)) {
            fail(format!(
                "{what}: greedy token {}, host {want} (unpenalised argmax {})",
                got[0].token_id,
                argmax(&l)
            ));
        }
        for t in &got {
            check_logprob(&what, &l, &lp, t.token_id, t.logprob);
        }
        if let Some(t) = got[1..].iter().find(|t| !kept.iter().any(|k| k.0 == t.token_id)) {
            fail(format!("{what}: drew {} outside the host's kept set", t.token_id));
        }
        println!(
            "ok  {what}: greedy = host, 256 draws in the host's top-20 of the penalised row, raw log-probs"
        );
    }
}

fn sampling_checks(gpu: &Arc<Gpu>, quick: bool) {
    argmax_checks(gpu);
    sampling_kernel_checks(gpu, quick);
    sampling_forward_checks(gpu);
    if !quick {
        sampling_timing(gpu);
    }
}

/// `argmax_f32` (the greedy steps of `forward_greedy`, which the benchmark times) against the
/// host's argmax, lowest id on ties: vocabularies that are and are not multiples of 4 (its
/// float4 and scalar paths), rows with the maximum planted twice, early and late, and a flat row.
fn argmax_checks(gpu: &Arc<Gpu>) {
    use cudarc::driver::PushKernelArg;
    for vocab in [1000usize, 1001, 128256] {
        let rows = 4;
        let mut logits: Vec<f32> = (0..rows * vocab)
            .map(|i| ((i * 7919) % 1013) as f32 * 0.01 - 5.0)
            .collect();
        logits[vocab + 17] = 50.0;
        logits[vocab + vocab - 3] = 50.0;
        logits[2 * vocab + vocab - 1] = 60.0;
        logits[3 * vocab..].fill(1.5);
        let want: Vec<i32> = logits.chunks(vocab).map(|r| argmax(r) as i32).collect();
        let d_logits = gpu.upload(&logits).unwrap();
        let d_out = gpu.zeros::<i32>(rows).unwrap();
        let (out_ptr, logits_ptr) = (gpu.ptr(&d_out), gpu.ptr(&d_logits));
        let mut b = gpu.stream.launch_builder(gpu.kernels.get("argmax_f32"));
        let vocab_i = vocab as i32;
        b.arg(&out_ptr).arg(&logits_ptr).arg(&vocab_i);
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.unwrap();
        let got = gpu.download(&d_out, rows).unwrap();
        if got != want {
            fail(format!("argmax_f32 vocab {vocab}: got {got:?}, host {want:?}"));
        }
        println!("ok  argmax_f32 vocab {vocab}: {rows} rows (ties, flat row) = host argmax {want:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Slot loads (`CudaModel::load_slot`, `slot_ready`): see the module comment.
// ---------------------------------------------------------------------------------------------

fn slot_load_checks(gpu: &Arc<Gpu>) {
    let dir = repo().join("tests/fixtures/tiny/llama");
    let config = ModelConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let host = LlamaModel::from_tensors(config.clone(), load_hf_weights(&dir).unwrap()).unwrap();
    let load_all = || -> Vec<Arc<LoraAdapter>> {
        ["qv_r2", "mlp_r8_rslora", "all_r16", "attn_r4"]
            .iter()
            .map(|n| {
                let d = repo().join(format!("tests/fixtures/tiny/adapters/{n}"));
                Arc::new(LoraAdapter::load(n, &d, &config).unwrap())
            })
            .collect()
    };
    let adapters = load_all();
    // The same weights under new ids: never staged, so round 2's copies start a conversion
    // on a worker thread that the pass reading the slot must wait for.
    let reloaded = load_all();
    // Round 3's: their staging fails (`fail_staging`, as if pinned memory had run out), so each
    // overlapped load falls back to a synchronous copy.
    let unstageable = load_all();
    let prompt: Vec<u32> = (1..24).collect();
    let vocab = config.vocab_size;
    for dtype in [DeviceDtype::Float32, DeviceDtype::Bfloat16] {
        let mode = LoraKernelMode::Chunked(16);
        // Reference: eight slots, every adapter copied once by `assign`.
        let mut fixed = CudaModel::from_host(gpu.clone(), &host, opts(dtype, mode, 0, 4096)).unwrap();
        let mut kv_fixed = fixed.new_kv_cache();
        let want: Vec<Vec<f32>> = adapters
            .iter()
            .map(|a| {
                let batch = [(prompt.clone(), Some(a.clone()))];
                pass(
                    &mut |kv, s| fixed.forward(kv, s).unwrap(),
                    &mut kv_fixed,
                    &batch,
                    vocab,
                )
                .remove(0)
            })
            .collect();
        let mut small_opts = opts(dtype, mode, 0, 4096);
        small_opts.lora_slots = 2;
        let mut m = CudaModel::from_host(gpu.clone(), &host, small_opts).unwrap();
        let mut kv = m.new_kv_cache();
        let base = [(prompt.clone(), None)];
        let mut worst = 0.0f64;
        let mut not_ready_at_once = 0;
        // Four rounds over the four adapters in two slots: every load evicts.
        for round in 0..4 {
            let set = match round {
                2 => &reloaded,
                3 => &unstageable,
                _ => &adapters,
            };
            m.fail_staging(round == 3).unwrap();
            for (i, a) in set.iter().enumerate() {
                let slot = i % 2;
                let overlap = round > 0;
                m.load_slot(slot, a, overlap).unwrap();
                if round == 1 {
                    // Unloaded while its copy is queued: the copy keeps the image alive.
                    m.unstage_adapter(a.id);
                }
                if round == 3 && !m.slot_ready(slot, false).unwrap() {
                    fail(format!(
                        "slot {slot}: a load whose staging failed did not fall back to a synchronous copy"
                    ));
                }
                // The queued copy is issued behind a base batch's pass and overlaps it; in round
                // 2, every other copy is still queued when the pass that needs it starts.
                if overlap && !(round == 2 && i % 2 == 1) {
                    pass(&mut |kv, s| m.forward(kv, s).unwrap(), &mut kv, &base, vocab);
                }
                if round == 1 {
                    // Read only once the copy is reported done. As in the engine, base passes
                    // go on meanwhile: the first load of an adapter waits for its conversion on
                    // a worker thread, and a converted copy is issued after the next pass.
                    let mut polls = 0;
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
                    while !m.slot_ready(slot, false).unwrap() {
                        polls += 1;
                        if std::time::Instant::now() > deadline {
                            fail(format!(
                                "slot {slot}: overlapped copy not done after 30 s of passes"
                            ));
                        }
                        pass(&mut |kv, s| m.forward(kv, s).unwrap(), &mut kv, &base, vocab);
                    }
                    if polls > 0 {
                        not_ready_at_once += 1;
                    }
                }
                // Round 2 reads straight away: the compute stream waits for the copy.
                let batch = [(prompt.clone(), Some(a.clone()))];
                let got = pass(&mut |kv, s| m.forward(kv, s).unwrap(), &mut kv, &batch, vocab);
                let e = rel_err(&got, std::slice::from_ref(&want[i]));
                if e > 1e-6 {
                    fail(format!(
                        "slot load {} round {round} adapter {} in slot {slot} (overlap {overlap}): rel err {e:e}",
                        dtype.name(),
                        a.name
                    ));
                }
                worst = worst.max(e);
                if !m.slot_ready(slot, true).unwrap() {
                    fail("slot_ready(wait) returned false".into());
                }
            }
        }
        m.fail_staging(false).unwrap();
        for a in &adapters {
            m.stage_adapter(a).unwrap();
        }
        println!(
            "ok  slots  {:8} 16 loads into 2 slots (4 sync, 8 overlapped of which 4 unstaged while queued, 4 \
             overlapped whose staging failed and fell back to sync; {not_ready_at_once}/4 polled copies still in \
             flight after a base pass): max rel err {worst:.1e} vs a pool without eviction",
            dtype.name()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Flash prefill attention (kernels/src/flash_attention.cu). Each sequence is prefilled in two
//    chunks: a cached prefix of 0 to 700 tokens, then 16 to 700 new tokens on top of it, so key
//    tiles start anywhere in a KV block and query tiles end anywhere. Head dims 16/32/64/128,
//    1 to 4 query heads per kv head (SmolLM2's 9/3 among them), with and without a sliding
//    window. Every chunk's log-probs in bf16 and f16 are compared with the f32 CPU backend, and
//    the same batch through the GEMM path gives the yardstick: both round activations and
//    probabilities to the same type, so the flash error must stay within 2x the GEMM path's
//    (+1e-3). A masking, prefix or tiling bug shows as errors of order one.
// ---------------------------------------------------------------------------------------------

/// Both chunks' log-probs of every sequence: `cached` prefix tokens, then the rest.
fn two_chunk_pass(
    run: &mut Runner<'_>,
    kv: &mut KvCache,
    seqs: &[(Vec<u32>, usize)],
    vocab: usize,
) -> Vec<Vec<f32>> {
    let mut caches = vec![SeqCache::default(); seqs.len()];
    let mut out = Vec::new();
    for part in 0..2 {
        let spans: Vec<(usize, usize)> = seqs
            .iter()
            .map(|(t, cached)| {
                if part == 0 {
                    (0, *cached)
                } else {
                    (*cached, t.len())
                }
            })
            .collect();
        for (c, &(_, end)) in caches.iter_mut().zip(&spans) {
            kv.reserve(c, end).unwrap();
        }
        let inputs: Vec<SeqInput<'_>> = seqs
            .iter()
            .zip(&caches)
            .zip(&spans)
            .map(|(((t, _), c), &(from, end))| SeqInput {
                tokens: &t[from..end],
                cache: c,
                adapter: None,
                logits: LogitsWanted::All,
            })
            .collect();
        let logits = run(kv, &inputs);
        drop(inputs);
        out.extend(
            logits
                .into_iter()
                .map(|l| l.chunks_exact(vocab).flat_map(log_softmax).collect::<Vec<f32>>()),
        );
        for (c, &(_, end)) in caches.iter_mut().zip(&spans) {
            c.len = end;
        }
    }
    for c in &mut caches {
        kv.release(c);
    }
    out
}

/// Hidden size, query heads, kv heads, head dim and sliding window of an attention check's model.
type AttentionShape = (usize, usize, usize, usize, Option<usize>);

/// Head dims 16 to 128, 1 to 4 query heads per kv head (SmolLM2's 9/3 among them), a window.
const ATTENTION_SHAPES: [AttentionShape; 5] = [
    (256, 16, 4, 16, None),
    (256, 8, 8, 32, None),
    (576, 9, 3, 64, None),
    (512, 4, 1, 128, None),
    (512, 8, 2, 128, Some(100)),
];

/// A 2-layer random-model config with hidden size `h`, `heads` / `kv_heads` heads of `hd`
/// dims and an optional sliding window (the attention checks' shapes).
fn attention_test_config(
    h: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    window: Option<usize>,
) -> ModelConfig {
    let mut json = format!(
        r#"{{"architectures":["LlamaForCausalLM"],"vocab_size":512,"hidden_size":{h},"intermediate_size":{},
        "num_hidden_layers":2,"num_attention_heads":{heads},"num_key_value_heads":{kv_heads},"head_dim":{hd},
        "max_position_embeddings":4096,"tie_word_embeddings":false"#,
        h * 2 + 32
    );
    if let Some(w) = window {
        json += &format!(r#","sliding_window":{w}"#);
    }
    ModelConfig::from_hf_json(&(json + "}")).unwrap()
}

fn flash_prefill_checks(gpu: &Arc<Gpu>, quick: bool) {
    let mut rng = Rng(0xf1a5_4a77_e000_0001);
    let shapes: &[AttentionShape] = if quick {
        &[(256, 8, 2, 64, None)]
    } else {
        &ATTENTION_SHAPES
    };
    // (cached prefix, new tokens): no prefix and many tiles, prefixes off the 64-key tile, a
    // chunk of exactly one tile, chunks below one tile.
    let spans = [
        (0usize, 700usize),
        (37, 64),
        (130, 16),
        (700, 333),
        (64, 129),
        (5, 40),
    ];
    for &(h, heads, kv_heads, hd, window) in shapes {
        let c = attention_test_config(h, heads, kv_heads, hd, window);
        let host = random_model(&c, &mut rng);
        let seqs: Vec<(Vec<u32>, usize)> = spans
            .iter()
            .map(|&(cached, n)| {
                let t = (0..cached + n).map(|_| rng.below(c.vocab_size) as u32).collect();
                (t, cached)
            })
            .collect();
        let mut cpu_kv = KvCache::new(&c, 16 * 1024, 16);
        let want = two_chunk_pass(
            &mut |kv, s| host.forward(kv, s).unwrap(),
            &mut cpu_kv,
            &seqs,
            c.vocab_size,
        );
        for dtype in [DeviceDtype::Bfloat16, DeviceDtype::Float16] {
            let mut errs = [0.0f64; 2];
            for (e, flash) in errs.iter_mut().zip([true, false]) {
                let o = CudaOptions {
                    prefill_attention_min_rows: 16,
                    flash_prefill: flash,
                    ..opts(dtype, LoraKernelMode::Chunked(16), 0, 16 * 1024)
                };
                let mut m = CudaModel::from_host(gpu.clone(), &host, o).unwrap();
                let mut kv = m.new_kv_cache();
                let got = two_chunk_pass(
                    &mut |kv, s| m.forward(kv, s).unwrap(),
                    &mut kv,
                    &seqs,
                    c.vocab_size,
                );
                *e = rel_err(&got, &want);
            }
            let [flash, gemm] = errs;
            let what = format!(
                "flash  heads={heads}/{kv_heads} d={hd:3} window={window:?} {}",
                dtype.name()
            );
            if !flash.is_finite() || flash > 2.0 * gemm + 1e-3 {
                fail(format!(
                    "{what}: rel err {flash:e} against the GEMM path's {gemm:e}"
                ));
            }
            println!("ok  {what}: rel err vs f32 CPU {flash:.1e} (GEMM path {gemm:.1e})");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Decode attention on tensor cores (`kernels/src/decode_attention.cu`, bf16 and f16): random
//    models with head dims 16/32/64/128 and 1, 3, 4 and 8 query heads per kv head (SmolLM2's 9/3
//    among them), with and without a sliding window. Prompts of 1 to 700 tokens go through the
//    paged kernel row by row (no prefill path here), so blocks see 1 to 3 split-key ranges of up
//    to 4 tiles; then decode steps at batch 1, 5, 64 and 200, eager and with CUDA graphs, the
//    tensor cores at every batch size. Every step's logits are compared with the f32 CPU
//    backend; the CUDA-core kernel on the same device model sets the bar. The tensor cores also
//    round the probabilities to the element type, so their error may be up to DA_ERR_FACTOR
//    times the CUDA-core error plus DA_ERR_SLACK; a masking, paging or merge bug shows as errors
//    of order one.
// ---------------------------------------------------------------------------------------------

const DA_ERR_FACTOR: f64 = 2.0;
const DA_ERR_SLACK: f64 = 2e-3;

/// `quick` (under compute-sanitizer): Llama-3.1-8B's head shape in bf16 at batch 5.
fn decode_attention_checks(gpu: &Arc<Gpu>, quick: bool) {
    let mut rng = Rng(0xdec0_de0a_77e0_0001);
    // The flash checks' shapes and 8 query heads per kv head (the most the kernel takes).
    let shapes: Vec<AttentionShape> = if quick {
        vec![(512, 4, 1, 128, None)]
    } else {
        ATTENTION_SHAPES
            .iter()
            .copied()
            .chain([(512, 8, 1, 64, None)])
            .collect()
    };
    let batches: &[usize] = if quick { &[5] } else { &[1, 5, 64, 200] };
    let dtypes: &[DeviceDtype] = if quick {
        &[DeviceDtype::Bfloat16]
    } else {
        &[DeviceDtype::Bfloat16, DeviceDtype::Float16]
    };
    for &(h, heads, kv_heads, hd, window) in &shapes {
        let c = attention_test_config(h, heads, kv_heads, hd, window);
        let host = random_model(&c, &mut rng);
        for &bs in batches {
            let seqs: Vec<Seq> = (0..bs)
                .map(|_| {
                    let n = if bs <= 5 {
                        1 + rng.below(700)
                    } else {
                        1 + rng.below(20)
                    };
                    ((0..n).map(|_| rng.below(c.vocab_size) as u32).collect(), None)
                })
                .collect();
            let want = decode_logits(None, &host, &seqs, 7);
            for &dtype in dtypes {
                // 0: tensor cores eager, 1: tensor cores with graphs, 2: CUDA cores eager.
                let logits: Vec<Vec<Vec<f32>>> = (0..3)
                    .map(|which| {
                        let o = CudaOptions {
                            // Tensor cores at every batch size, so that batch 1 and 5 take them too.
                            decode_attention_tensor_cores: (which < 2).then_some(0),
                            ..opts(
                                dtype,
                                LoraKernelMode::Chunked(16),
                                if which == 1 { 256 } else { 0 },
                                16 * 1024,
                            )
                        };
                        let mut m = CudaModel::from_host(gpu.clone(), &host, o).unwrap();
                        decode_logits(Some(&mut m), &host, &seqs, 7)
                    })
                    .collect();
                let errs: Vec<f64> = logits.iter().map(|l| rel_err(l, &want)).collect();
                let bound = DA_ERR_FACTOR * errs[2] + DA_ERR_SLACK;
                let what = format!(
                    "decode attention heads={heads}/{kv_heads} d={hd:3} window={window:?} bs={bs:3} {}",
                    dtype.name()
                );
                if errs[..2].iter().any(|e| !e.is_finite() || *e > bound) {
                    fail(format!(
                        "{what}: tensor cores rel err {:e} eager, {:e} graphs; CUDA cores {:e} (bound {bound:e})",
                        errs[0], errs[1], errs[2]
                    ));
                }
                // These widths keep every projection in cuBLAS, so graphs replay the eager
                // steps' kernels and must agree with them bit for bit.
                if logits[1] != logits[0] {
                    fail(format!(
                        "{what}: graphs differ from eager steps (rel err {:e})",
                        rel_err(&logits[1], &logits[0])
                    ));
                }
                println!(
                    "ok  {what}: rel err vs f32 CPU {:.1e} eager, {:.1e} graphs, bit-identical (CUDA cores {:.1e})",
                    errs[0], errs[1], errs[2]
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 8. Decode GEMMs (`decode_gemm.cu`, Hopper only): out = beta * out + x . Wᵀ for 1 to 64 rows,
//    against an f64 host product of the same rounded inputs, within the output type's rounding
//    (2^-8 of the value in bf16, 2^-11 in f16) plus 1e-5 of the sum of |x W| terms (f32
//    accumulation). Cases cover every token tile (8/16/32/64), n and k that do not fill a tile
//    (the tensor maps' zero fill), grids of 1 block (whole tiles), 7 blocks (blocks that span
//    tiles) and the plan's full grid (tiles shared by blocks: partials and counters; each case
//    runs twice, so the counters must come back to zero), beta 0 and 1, an output row stride
//    wider than n (columns past n must stay as they were), and rows of x past `rows` that hold
//    NaN (the x buffer is larger than the step, as the model's is).
//    Then the model (`decode_gemm_model_checks`): the wiring of its tensor maps (a map per layer
//    and weight, one per input buffer and token count) in graph-replayed decode steps.
// ---------------------------------------------------------------------------------------------

fn decode_gemm_checks(gpu: &Arc<Gpu>, quick: bool) {
    if !gpu.kernels.has_decode_gemm() {
        println!("skip decode GEMM checks: not a Hopper GPU");
        return;
    }
    let mut rng = Rng(0xd6e0_6e44_0000_0001);
    // (n, k)
    let mut shapes: Vec<(usize, usize)> = vec![(256, 4096), (960, 576), (1000, 520)];
    if !quick {
        shapes.push((6144, 4096));
        shapes.push((4096, 14336));
    }
    let rows_list: &[usize] = if quick {
        &[1, 9, 64]
    } else {
        &[1, 2, 7, 8, 9, 16, 17, 33, 64]
    };
    for (n, k) in shapes {
        for &rows in rows_list {
            let base = loraplane_kernels::DecodeGemmTuning::default();
            let one = loraplane_kernels::DecodeGemmTuning { k_blocks: 1, ..base };
            let half = loraplane_kernels::DecodeGemmTuning { tile_n: 64, ..base };
            let whole = loraplane_kernels::DecodeGemmTuning {
                whole_tiles: true,
                ..half
            };
            let split = loraplane_kernels::DecodeGemmTuning { split: 2, ..whole };
            for (sms, tuning) in [
                (1, one),
                (7, one),
                (7, half),
                (gpu.sms, base),
                (gpu.sms, whole),
                (gpu.sms, split),
            ] {
                if n * k > 4 << 20 && (rows != 64 || !(tuning == base || tuning == split)) {
                    continue; // the large shapes at the batch the benchmark targets
                }
                for dtype in [DeviceDtype::Bfloat16, DeviceDtype::Float16] {
                    let beta = if rng.below(2) == 0 { 0.0 } else { 1.0 };
                    let (worst, blocks) = match dtype {
                        DeviceDtype::Bfloat16 => decode_gemm_case::<half::bf16>(
                            gpu,
                            (rows, n, k),
                            (sms, tuning),
                            beta,
                            2f64.powi(-8),
                            &mut rng,
                        ),
                        _ => decode_gemm_case::<half::f16>(
                            gpu,
                            (rows, n, k),
                            (sms, tuning),
                            beta,
                            2f64.powi(-11),
                            &mut rng,
                        ),
                    };
                    let what = format!(
                        "decode GEMM {dtype:?} rows {rows} x ({n} x {k}), {blocks} blocks of {}-row tiles{}, {} k-blocks a stage, beta {beta}",
                        tuning.tile_n,
                        if tuning.split > 1 { ", k split over clusters of 2" } else { "" },
                        tuning.k_blocks
                    );
                    if worst > 1.0 {
                        fail(format!("{what}: error {worst:.2}x the bound"));
                    }
                    println!("ok   {what}: worst error {worst:.2}x the bound");
                }
            }
        }
    }
    // gate/up with silu_mul in the epilogue (whole 128-row tiles; the 8B width, and a width
    // whose last tile is half gate rows past `inter`).
    let silu_shapes: &[(usize, usize)] = if quick {
        &[(1056, 512)]
    } else {
        &[(1056, 512), (14336, 4096)]
    };
    for &(inter, k) in silu_shapes {
        for &rows in &[1usize, 9, 64] {
            let worst = [
                decode_gemm_silu_case::<half::bf16>(gpu, (rows, inter, k), 2f64.powi(-8), &mut rng),
                decode_gemm_silu_case::<half::f16>(gpu, (rows, inter, k), 2f64.powi(-11), &mut rng),
            ];
            let what =
                format!("decode GEMM gate/up + silu_mul rows {rows} x ({inter} x 2 x {k}), bf16 / f16");
            if worst.iter().any(|w| *w > 1.0) {
                fail(format!(
                    "{what}: error {:.2}x / {:.2}x the bound",
                    worst[0], worst[1]
                ));
            }
            println!(
                "ok   {what}: worst error {:.2}x / {:.2}x the bound",
                worst[0], worst[1]
            );
        }
    }
    decode_gemm_model_checks(gpu, quick);
}

/// The gate/up decode GEMM with silu_mul in its epilogue against the plain gate/up decode GEMM
/// (the same plan of whole 128-row tiles, so each sum is added in the same order: the same
/// bits) and silu(gate) · up from those on the host in f64: the kernel rounds silu to T, then
/// the product, so it may differ by two roundings of `rel`. Returns the worst error as a
/// multiple of that bound.
fn decode_gemm_silu_case<T: GpuFloat + Into<f32> + Default>(
    gpu: &Arc<Gpu>,
    (rows, inter, k): (usize, usize, usize),
    rel: f64,
    rng: &mut Rng,
) -> f64 {
    let n = 2 * inter;
    let whole = loraplane_kernels::DecodeGemmTuning {
        whole_tiles: true,
        ..Default::default()
    };
    let plain = loraplane_kernels::decode_gemm_plan(T::SUFFIX, (rows, n, k), gpu.sms, whole)
        .unwrap_or_else(|| fail(format!("no decode GEMM plan for {rows} x ({n} x {k})")));
    let fused = loraplane_kernels::decode_gemm_silu_plan(plain.clone())
        .unwrap_or_else(|| fail(format!("no gate/up + silu plan for {rows} x ({n} x {k})")));
    let round = |v: Vec<f32>| -> Vec<T> { v.into_iter().map(T::from_f32).collect() };
    let x = round((0..rows * k).map(|_| rng.f()).collect());
    let w = round((0..n * k).map(|_| 0.1 * rng.f()).collect());
    let (dx, dw) = (gpu.upload(&x).unwrap(), gpu.upload(&w).unwrap());
    let mut maps: Vec<u64> = Vec::new();
    for (ptr, (r, tile)) in [
        (gpu.ptr(&dw), (n, 128)),
        (gpu.ptr(&dw), (n, 64)),
        (gpu.ptr(&dx), (rows, plain.tokens)),
    ] {
        maps.extend(gpu.decode_gemm_map::<T>(ptr, (r, k), k, tile).unwrap());
    }
    let maps = gpu.upload(&maps).unwrap();
    let (gu, act) = (
        gpu.zeros::<T>(rows * n).unwrap(),
        gpu.zeros::<T>(rows * inter).unwrap(),
    );
    let scratch = (
        gpu.ptr(&gpu.zeros::<f32>(1).unwrap()),
        gpu.ptr(&gpu.zeros::<u32>(plain.tiles).unwrap()),
    );
    let m = gpu.ptr(&maps);
    for (p, w_map, out, ld) in [
        (&plain, m, gpu.ptr(&gu), n),
        (&fused, m + 128, gpu.ptr(&act), inter),
    ] {
        gpu.decode_gemm(p, (w_map, m + 256), out, ld, (rows, n, k), 0.0, scratch)
            .unwrap_or_else(|e| fail(e.to_string()));
    }
    let f = |v: &T| -> f64 { f64::from(Into::<f32>::into(*v)) };
    let (gu, act) = (
        gpu.download(&gu, rows * n).unwrap(),
        gpu.download(&act, rows * inter).unwrap(),
    );
    let mut worst = 0f64;
    for r in 0..rows {
        for j in 0..inter {
            let (g, u) = (f(&gu[r * n + j]), f(&gu[r * n + inter + j]));
            let want = g / (1.0 + (-g).exp()) * u;
            let err = (f(&act[r * inter + j]) - want).abs() / (2.0 * rel * want.abs() + 1e-6);
            worst = if err.is_nan() {
                f64::INFINITY
            } else {
                worst.max(err)
            };
        }
    }
    worst
}

/// The decode GEMMs inside a model: Llama-3.1-8B's widths (hidden 4096, 32/8 heads of 128,
/// intermediate 14336) in 2 layers (1 with `quick`) and a 28600-token vocabulary (an LM head of
/// 224 128-row tiles, the last one ragged: more than the H100 has SMs, so it takes the
/// f32-output kernel, 2 tiles a block as gate/up), bf16, decode
/// steps replayed from CUDA graphs, with rank-16 and rank-64 adapters on every target beside
/// base rows. Its decode GEMMs with programmatic edges and the same model in cuBLAS with
/// ordinary edges are both compared with the f32 model: the decode GEMMs only add the f32 sums
/// in another order, so their error must stay within MMA_ERR_FACTOR times cuBLAS's plus
/// MMA_ERR_SLACK. A wrong map (another layer's weight, another input buffer or token count,
/// rows past the step, an LM head input left at a buffer since reallocated) moves the logits by
/// far more than that.
fn decode_gemm_model_checks(gpu: &Arc<Gpu>, quick: bool) {
    let layers = if quick { 1 } else { 2 };
    let c = ModelConfig::from_hf_json(&format!(
        r#"{{"architectures":["LlamaForCausalLM"],"vocab_size":28600,"hidden_size":4096,"intermediate_size":14336,
        "num_hidden_layers":{layers},"num_attention_heads":32,"num_key_value_heads":8,"head_dim":128,
        "max_position_embeddings":4096,"tie_word_embeddings":false}}"#
    ))
    .unwrap();
    let mut rng = Rng(0xd6e0_6e44_0000_0002);
    let host = random_model(&c, &mut rng);
    let adapters = [16usize, 64].map(|r| {
        Arc::new(LoraAdapter::dummy(
            &format!("r{r}"),
            &c,
            r,
            &LoraTarget::ALL,
            91 + r as u64,
        ))
    });
    // Every row of a batch of distinct adapters has its own (ranks 16, 8 and 4: one k-step of
    // the tensor-core expand, which then walks several column groups per block).
    let distinct: Vec<Arc<LoraAdapter>> = (0..64)
        .map(|i| {
            let r = [16usize, 8, 16, 4][i % 4];
            Arc::new(LoraAdapter::dummy(
                &format!("d{i}"),
                &c,
                r,
                &LoraTarget::ALL,
                500 + i as u64,
            ))
        })
        .collect();
    let model = |dtype, fast: bool| {
        let o = CudaOptions {
            decode_gemms: fast,
            programmatic_launch: fast,
            lora_slots: distinct.len(),
            lora_rank: 64,
            ..opts(dtype, LoraKernelMode::Chunked(16), 64, 16 * 1024)
        };
        CudaModel::from_host(gpu.clone(), &host, o).unwrap()
    };
    let mut reference = model(DeviceDtype::Float32, false);
    let mut cublas = model(DeviceDtype::Bfloat16, false);
    let mut fast = model(DeviceDtype::Bfloat16, true);
    let groups = fast.decode_gemm_groups();
    if groups.is_empty() {
        fail("decode GEMM model check: no projection of the 8B widths takes decode_gemm.cu".into());
    }
    // Logits of more rows than the model's logits buffer holds (prompt log-probs) reallocate
    // the LM head's input: its tensor maps must follow, and every check below runs after that.
    {
        let mut kv = fast.new_kv_cache();
        let mut cache = SeqCache::default();
        let toks: Vec<u32> = (0..600).map(|i| (i * 13 % c.vocab_size) as u32).collect();
        kv.reserve(&mut cache, toks.len()).unwrap();
        let input = SeqInput {
            tokens: &toks,
            cache: &cache,
            adapter: None,
            logits: LogitsWanted::All,
        };
        let rows = fast.forward(&kv, &[input]).unwrap();
        if rows.len() != 1 || rows[0].len() != toks.len() * c.vocab_size {
            fail("decode GEMM model check: a 600-row logits pass returned the wrong shape".into());
        }
        kv.release(&mut cache);
    }
    // (batch, adapters): steps of base rows only replay graphs without LoRA kernels, whose
    // gate/up runs with silu_mul in its epilogue.
    use Rows::*;
    #[derive(Clone, Copy, PartialEq)]
    enum Rows {
        Base,
        TwoAdapters,
        Distinct,
    }
    let batches: &[(usize, Rows)] = if quick {
        &[(8, TwoAdapters), (64, TwoAdapters), (64, Distinct), (64, Base)]
    } else {
        &[
            (1, TwoAdapters),
            (8, TwoAdapters),
            (16, TwoAdapters),
            (32, TwoAdapters),
            (33, TwoAdapters),
            (64, TwoAdapters),
            (24, Distinct),
            (64, Distinct),
            (1, Base),
            (33, Base),
            (64, Base),
        ]
    };
    for &(bs, rows) in batches {
        let seqs: Vec<Seq> = (0..bs)
            .map(|i| {
                let toks = (0..1 + rng.below(16))
                    .map(|_| rng.below(c.vocab_size) as u32)
                    .collect();
                let a = match rows {
                    Base => None,
                    TwoAdapters => (i % 3 != 0).then(|| adapters[i % 2].clone()),
                    Distinct => Some(distinct[i].clone()),
                };
                (toks, a)
            })
            .collect();
        // The prompts' pass (eager, so cuBLAS in both; its logits are left out), then 5
        // graph-replayed decode steps.
        let steps = 6;
        let decode = |m: &mut CudaModel| decode_logits(Some(m), &host, &seqs, steps).split_off(bs);
        let want = decode(&mut reference);
        let got_cublas = decode(&mut cublas);
        let got_fast = decode(&mut fast);
        let (e_cublas, e_fast) = (rel_err(&got_cublas, &want), rel_err(&got_fast, &want));
        let bound = MMA_ERR_FACTOR * e_cublas + MMA_ERR_SLACK;
        let what = format!(
            "decode GEMMs in a {layers}-layer model of the 8B widths ({}), bf16, bs={bs:2}{}, {} steps",
            groups.join(", "),
            match rows {
                TwoAdapters => "",
                Distinct => " distinct adapters",
                Base => " base rows only (gate/up + silu_mul)",
            },
            steps - 1
        );
        if e_fast > bound {
            fail(format!(
                "{what}: rel err vs f32 {e_fast:.1e}, above the bound {bound:.1e} (cuBLAS {e_cublas:.1e})"
            ));
        }
        // The decode steps' graph must launch every group that takes them in every layer. (The
        // logits alone cannot tell: where cuBLAS also adds k in order, as at one row, they are
        // the same bits.)
        let graphs = fast.graph_decode_gemms();
        let (bucket, launches) = graphs.range(bs..).next().map_or((0, 0), |(&b, &n)| (b, n));
        let (h, qd, kvd, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let shapes = [(qd + 2 * kvd, h), (h, qd), (2 * inter, h), (h, inter)];
        // The LM head (28600 rows: whole 128-row tiles on an H100, the last one ragged) too.
        let head =
            loraplane_kernels::decode_gemm_logits_for_model("bf16", (bucket, c.vocab_size, h), gpu.sms);
        let want_launches = layers
            * shapes
                .iter()
                .filter(|&&(n, k)| {
                    loraplane_kernels::decode_gemm_for_model("bf16", (bucket, n, k), gpu.sms).is_some()
                })
                .count()
            + usize::from(head.is_some());
        if launches != want_launches || launches == 0 {
            fail(format!(
                "{what}: the decode graph of {bucket} rows launches {launches} decode GEMMs, not {want_launches}"
            ));
        }
        println!(
            "ok   {what}: {launches} decode GEMMs a step, rel err vs f32 {e_fast:.1e} (cuBLAS {e_cublas:.1e}, bound {bound:.1e}; {:.1e} between the two)",
            rel_err(&got_fast, &got_cublas)
        );
    }
}

/// One decode GEMM case planned with `tuning` for `sms` multiprocessors, run twice; returns the
/// worst error as a multiple of its bound, and the plan's blocks.
fn decode_gemm_case<T: GpuFloat + Into<f32> + Default>(
    gpu: &Arc<Gpu>,
    (rows, n, k): (usize, usize, usize),
    (sms, tuning): (usize, loraplane_kernels::DecodeGemmTuning),
    beta: f32,
    rel: f64,
    rng: &mut Rng,
) -> (f64, u32) {
    let p = loraplane_kernels::decode_gemm_plan(T::SUFFIX, (rows, n, k), sms, tuning)
        .unwrap_or_else(|| fail(format!("no decode GEMM plan for {rows} x ({n} x {k})")));
    let round = |v: Vec<f32>| -> Vec<T> { v.into_iter().map(T::from_f32).collect() };
    // x has 5 rows more than the step, holding NaN.
    let x_rows = rows + 5;
    let x = round(
        (0..x_rows * k)
            .map(|i| if i < rows * k { rng.f() } else { f32::NAN })
            .collect(),
    );
    let w = round((0..n * k).map(|_| 0.05 * rng.f()).collect());
    let ld_out = n + 64;
    let out0 = round((0..rows * ld_out).map(|_| rng.f()).collect());
    let (dx, dw) = (gpu.upload(&x).unwrap(), gpu.upload(&w).unwrap());
    let mut maps: Vec<u64> = Vec::new();
    maps.extend(
        gpu.decode_gemm_map::<T>(gpu.ptr(&dw), (n, k), k, p.tile_n)
            .unwrap(),
    );
    maps.extend(
        gpu.decode_gemm_map::<T>(gpu.ptr(&dx), (x_rows, k), k, p.tokens)
            .unwrap(),
    );
    let maps = gpu.upload(&maps).unwrap();
    let workspace = gpu.zeros::<f32>(p.workspace.max(1)).unwrap();
    let counters = gpu.zeros::<u32>(p.tiles).unwrap();
    let f = |v: &T| -> f64 { f64::from(Into::<f32>::into(*v)) };
    // x . Wᵀ and the sum of its terms' magnitudes in f64, once for both runs, on every core.
    let (xf, wf): (Vec<f64>, Vec<f64>) = (x.iter().map(f).collect(), w.iter().map(f).collect());
    let mut reference = vec![(0f64, 0f64); rows * n];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let per_thread = (rows * n).div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for (c, chunk) in reference.chunks_mut(per_thread).enumerate() {
            let (xf, wf) = (&xf, &wf);
            scope.spawn(move || {
                for (i, cell) in chunk.iter_mut().enumerate() {
                    let (r, col) = ((c * per_thread + i) / n, (c * per_thread + i) % n);
                    let (xr, wr) = (&xf[r * k..(r + 1) * k], &wf[col * k..(col + 1) * k]);
                    *cell = xr
                        .iter()
                        .zip(wr)
                        .fold((0.0, 0.0), |(s, m), (a, b)| (s + a * b, m + (a * b).abs()));
                }
            });
        }
    });
    let mut worst = 0f64;
    for _ in 0..2 {
        let out = gpu.upload(&out0).unwrap();
        gpu.decode_gemm(
            &p,
            (gpu.ptr(&maps), gpu.ptr(&maps) + 128),
            gpu.ptr(&out),
            ld_out,
            (rows, n, k),
            beta,
            (gpu.ptr(&workspace), gpu.ptr(&counters)),
        )
        .unwrap_or_else(|e| fail(e.to_string()));
        let got = gpu.download(&out, rows * ld_out).unwrap();
        for r in 0..rows {
            for col in 0..ld_out {
                let (g, o) = (f(&got[r * ld_out + col]), f(&out0[r * ld_out + col]));
                if col >= n {
                    if g.to_bits() != o.to_bits() {
                        fail(format!(
                            "decode GEMM {rows} x ({n} x {k}): row {r} column {col} past n changed"
                        ));
                    }
                    continue;
                }
                let (product, mag) = reference[r * n + col];
                let sum = f64::from(beta) * o + product;
                let bound = rel * sum.abs() + 1e-5 * mag + 1e-30;
                let err = (g - sum).abs() / bound;
                if err.is_nan() {
                    fail(format!(
                        "decode GEMM {rows} x ({n} x {k}): row {r} column {col} is {g}"
                    ));
                }
                worst = worst.max(err);
            }
        }
    }
    (worst, p.blocks)
}

// ---------------------------------------------------------------------------------------------
// 9. Overlapped steps (`launch_sampled` / `collect_sampled`, as the engine's overlap scheduler
//    issues them): each step is launched before the host reads the one before it and feeds
//    every continuing sequence that step's token as a pending token, resolved on the device.
//    Greedy and seeded draws over adapters, with sequences leaving the batch (so a pending
//    token's index moves), in f32 and bf16, eager and graph steps: every token equals the one
//    `forward_sampled` gives when steps run one at a time. A pending token with no uncollected
//    launch and a third uncollected launch are refused.
// ---------------------------------------------------------------------------------------------

/// Steps of [`overlap_checks`]: each sequence's generated tokens.
fn overlap_run(
    m: &mut CudaModel,
    prompts: &[Vec<u32>],
    held: &[Option<Arc<LoraAdapter>>],
    steps: usize,
    overlapped: bool,
) -> Vec<Vec<u32>> {
    let n = prompts.len();
    let mut kv = m.new_kv_cache();
    let mut toks = prompts.to_vec();
    let mut caches = vec![SeqCache::default(); n];
    // Each sequence's row among the uncollected launch's draws, and that launch's sequences.
    let mut pending: Vec<Option<usize>> = vec![None; n];
    let mut uncollected: Option<Vec<usize>> = None;
    let token = |o: SeqOutput| match o {
        SeqOutput::Sampled(t) => t.token_id,
        SeqOutput::Logits(_) => fail("overlap: a sampled sequence got logits".into()),
    };
    for step in 0..steps {
        // Every fourth sequence leaves after a few steps.
        let seqs: Vec<usize> = (0..n).filter(|&i| i % 4 != 3 || step < 3 + i % 3).collect();
        let ids: Vec<Vec<u32>> = seqs
            .iter()
            .map(|&i| {
                let mut t = toks[i][caches[i].len..].to_vec();
                t.extend(pending[i].map(pending_token));
                t
            })
            .collect();
        for (&i, t) in seqs.iter().zip(&ids) {
            let len = caches[i].len + t.len();
            kv.reserve(&mut caches[i], len).unwrap();
        }
        let inputs: Vec<SeqInput<'_>> = seqs
            .iter()
            .zip(&ids)
            .map(|(&i, t)| SeqInput {
                tokens: t,
                cache: &caches[i],
                adapter: held[i].as_deref(),
                logits: LogitsWanted::Last,
            })
            .collect();
        let sampling: Vec<Option<DeviceSample>> = seqs
            .iter()
            .map(|&i| {
                let t = if i % 2 == 0 { 0.0 } else { 0.9 };
                Some(device_sample(
                    &params(t, 0, 0.95, 0.0),
                    0,
                    &[],
                    &[],
                    (step * 100 + i) as u64,
                ))
            })
            .collect();
        if overlapped {
            m.launch_sampled(&kv, &inputs, &sampling)
                .unwrap_or_else(|e| fail(format!("overlap: launch {step}: {e}")));
            drop(inputs);
            pending = vec![None; n];
            for (k, (&i, t)) in seqs.iter().zip(&ids).enumerate() {
                caches[i].len += t.len();
                pending[i] = Some(k);
            }
            if let Some(prev) = uncollected.replace(seqs) {
                for (&i, o) in prev.iter().zip(m.collect_sampled().unwrap()) {
                    toks[i].push(token(o));
                }
            }
        } else {
            let out = m.forward_sampled(&kv, &inputs, &sampling).unwrap();
            drop(inputs);
            for ((&i, t), o) in seqs.iter().zip(&ids).zip(out) {
                caches[i].len += t.len();
                toks[i].push(token(o));
            }
        }
    }
    if let Some(prev) = uncollected {
        for (&i, o) in prev.iter().zip(m.collect_sampled().unwrap()) {
            toks[i].push(token(o));
        }
    }
    for c in &mut caches {
        kv.release(c);
    }
    toks.iter()
        .zip(prompts)
        .map(|(t, p)| t[p.len()..].to_vec())
        .collect()
}

fn overlap_checks(gpu: &Arc<Gpu>) {
    let mut rng = Rng(0x0e71_a95c_4ed0_1e77);
    let c = config(256, 4, 2, 64);
    let host = random_model(&c, &mut rng);
    let adapters: Vec<Arc<LoraAdapter>> = (0..2)
        .map(|i| {
            Arc::new(LoraAdapter::dummy(
                &format!("o{i}"),
                &c,
                8,
                &LoraTarget::ALL,
                400 + i,
            ))
        })
        .collect();
    let n = 12;
    let (prompts, held) = mixed_batch(&c, &mut rng, n, &adapters);
    let steps = 10;
    for dtype in [DeviceDtype::Float32, DeviceDtype::Bfloat16] {
        for graphs in [0usize, 16] {
            let o = opts(dtype, LoraKernelMode::Chunked(16), graphs, 16 * 1024);
            let mut m = CudaModel::from_host(gpu.clone(), &host, o).unwrap();
            let want = overlap_run(&mut m, &prompts, &held, steps, false);
            let got = overlap_run(&mut m, &prompts, &held, steps, true);
            for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                if w != g {
                    fail(format!(
                        "overlap {} graphs={graphs} seq {i}: {g:?}, one step at a time {w:?}",
                        dtype.name()
                    ));
                }
            }
            let tokens: usize = got.iter().map(Vec::len).sum();
            println!(
                "ok  overlap {} graphs={graphs:2}: {n} sequences × {steps} steps ({tokens} tokens, greedy and seeded draws, adapters, sequences leaving), identical to steps one at a time",
                dtype.name()
            );
        }
    }
    // The contract's refusals.
    let mut m = CudaModel::from_host(
        gpu.clone(),
        &host,
        opts(DeviceDtype::Float32, LoraKernelMode::Chunked(16), 0, 4096),
    )
    .unwrap();
    let mut kv = m.new_kv_cache();
    let mut cache = SeqCache::default();
    kv.reserve(&mut cache, 8).unwrap();
    let greedy = [Some(device_sample(&params(0.0, 0, 1.0, 0.0), 0, &[], &[], 0))];
    fn input<'a>(tokens: &'a [u32], cache: &'a SeqCache) -> [SeqInput<'a>; 1] {
        [SeqInput {
            tokens,
            cache,
            adapter: None,
            logits: LogitsWanted::Last,
        }]
    }
    let cache = &cache;
    if m.launch_sampled(&kv, &input(&[pending_token(0)], cache), &greedy)
        .is_ok()
    {
        fail("overlap: a pending token with no launch in flight was accepted".into());
    }
    for _ in 0..2 {
        m.launch_sampled(&kv, &input(&[1, 2, 3], cache), &greedy).unwrap();
    }
    if m.launch_sampled(&kv, &input(&[1, 2, 3], cache), &greedy).is_ok() {
        fail("overlap: a third uncollected launch was accepted".into());
    }
    m.collect_sampled().unwrap();
    m.collect_sampled().unwrap();
    if m.collect_sampled().is_ok() {
        fail("overlap: a collect with nothing launched returned".into());
    }
    println!(
        "ok  overlap refusals: a pending token with nothing in flight, a third launch, an empty collect"
    );
}
