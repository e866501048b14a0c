//! GPU benchmark: Llama-3.1-8B shape with random bf16 weights, decode step latency and tok/s at
//! several batch sizes and numbers of distinct rank-16/64 adapters on all seven targets, both
//! LoRA kernel schemes, with and without CUDA graphs; prefill of 2k-token prompts; a cuBLAS bf16
//! GEMM for the rate prefill is compared with. Each figure is printed next to its roofline:
//! max(bytes that must be read / 3.0 TB/s, FLOPs / 790 TFLOP/s), where the bytes are the base
//! weights, every distinct adapter's weights and the KV cache read by the step.
//!
//! `--compare` times csgmv + graphs decode with the LoRA kernels on CUDA cores and on tensor
//! cores (see `main`) in one table; `--decode-only` the default configuration's decode rows
//! alone (`scripts/gpu/run.sh ab` runs it for two builds in turn); `--compare-pdl` those rows
//! with decode graphs of ordinary edges and with programmatic ones, twice in turn
//! (`scripts/gpu/run.sh pdl`).
//!
//! `--step-parts` times the whole decode step of each configuration in LORAPLANE_PARTS
//! (`BATCH:ADAPTERS:RANK ...`) and the same step's graph replayed alone: the difference is the
//! host's part of a step, and the step overlapped as the server runs it (launched before the
//! host reads the one before; `scripts/gpu/run.sh parts`; `scripts/gpu/run.sh variants` runs it
//! once per set of kernel compiler options). `--registers` prints every kernel's registers and
//! spill bytes per thread.
//!
//! `--slot-loads` times adapter slot loads instead: a synchronous copy of a rank-16 adapter from
//! host memory, staging it in pinned memory, an overlapped copy, and decode steps at batch 64
//! with one slot load per step, synchronous or overlapped (`--enable-lora-overlap-loading`);
//! then first overlapped loads in a 4-slot pool, before and after its staged images start
//! handing their pinned buffers to new ones.
//!
//! Run by `scripts/gpu/run.sh bench` (or `quick-bench`, `slot-loads`) on the GPU machine; prints
//! a Markdown table.

use std::sync::Arc;
use std::time::Instant;

use loraplane_server::adapter::{LoraAdapter, LoraTarget};
use loraplane_server::backend::cuda::{
    CudaModel, CudaOptions, DeviceDtype, Gpu, GpuFloat, LoraKernelMode,
    DECODE_ATTENTION_TENSOR_CORES_MIN_PAIRS, PREFILL_ATTENTION_MIN_ROWS,
};
use loraplane_server::engine::{KvCache, SeqCache};
use loraplane_server::model::llama::{LogitsWanted, SeqInput};
use loraplane_server::model::{pending_token, presets, DeviceSample, ModelConfig, SeqOutput};

const HBM_BYTES_PER_S: f64 = 3.0e12;
const BF16_FLOPS: f64 = 790e12;
const PROMPT: usize = 128;

fn llama31_8b() -> ModelConfig {
    presets::find("Llama-3.1-8B").expect("a preset").config()
}

/// Parameters of the layers plus the lm_head (what a decode step reads in full): all of them
/// but an untied embedding, of which a step reads only its rows.
fn base_bytes(c: &ModelConfig) -> f64 {
    let embedding = if c.tie_word_embeddings {
        0
    } else {
        c.vocab_size * c.hidden_size
    };
    ((c.num_parameters() - embedding) * 2) as f64
}

fn adapter_bytes(c: &ModelConfig, rank: usize) -> f64 {
    let per_layer: usize = LoraTarget::ALL
        .iter()
        .map(|t| {
            let (i, o) = t.shape(c);
            rank * (i + o)
        })
        .sum();
    (per_layer * c.num_layers * 2) as f64
}

fn kv_bytes_per_token(c: &ModelConfig) -> f64 {
    (2 * c.num_layers * c.kv_dim() * 2) as f64
}

struct Row {
    what: String,
    ms: f64,
    tok_s: f64,
    roofline_ms: f64,
}

fn opts(mode: LoraKernelMode, graphs: usize) -> CudaOptions {
    CudaOptions {
        dtype: DeviceDtype::Bfloat16,
        lora_slots: 64,
        lora_rank: 64,
        lora_mode: mode,
        cuda_graph_max_bs: graphs,
        max_tokens: 256 * (PROMPT + 64) + 4 * 2048 + 256,
        kv_memory_fraction: None,
        block_size: 16,
        max_rows: 8192,
        max_seq_len: 4096,
        prefill_attention_min_rows: PREFILL_ATTENTION_MIN_ROWS,
        flash_prefill: true,
        lora_side_stream: true,
        attention_split_keys: true,
        lora_tensor_cores: true,
        decode_attention_tensor_cores: Some(DECODE_ATTENTION_TENSOR_CORES_MIN_PAIRS),
        decode_gemms: true,
        programmatic_launch: true,
    }
}

/// Prefills `bs` random prompts of PROMPT tokens, then times `steps` greedy decode steps, each
/// after `before_step` (slot loads). Returns ms per step.
fn decode(
    m: &mut CudaModel,
    kv: &mut KvCache,
    bs: usize,
    slots: &[i32],
    steps: usize,
    profile: bool,
    before_step: impl FnMut(&mut CudaModel),
) -> f64 {
    decode_with_prompt(m, kv, bs, PROMPT, slots, steps, profile, before_step)
}

/// [`decode`] with prompts of `prompt` tokens.
#[allow(clippy::too_many_arguments)]
fn decode_with_prompt(
    m: &mut CudaModel,
    kv: &mut KvCache,
    bs: usize,
    prompt: usize,
    slots: &[i32],
    steps: usize,
    profile: bool,
    mut before_step: impl FnMut(&mut CudaModel),
) -> f64 {
    let (mut caches, mut toks) = prefill_prompts(m, kv, bs, prompt, slots);
    let step = |m: &mut CudaModel, caches: &mut Vec<SeqCache>, toks: &mut Vec<Vec<u32>>, kv: &mut KvCache| {
        for (c, t) in caches.iter_mut().zip(toks.iter()) {
            kv.reserve(c, t.len()).expect("kv");
        }
        let inputs: Vec<SeqInput<'_>> = caches
            .iter()
            .zip(toks.iter())
            .map(|(c, t)| SeqInput {
                tokens: &t[t.len() - 1..],
                cache: c,
                adapter: None,
                logits: LogitsWanted::Last,
            })
            .collect();
        let next = m.forward_greedy_in_slots(kv, &inputs, slots).expect("decode");
        drop(inputs);
        for ((c, t), n) in caches.iter_mut().zip(toks.iter_mut()).zip(next) {
            c.len = t.len();
            t.push(n);
        }
    };
    for _ in 0..3 {
        step(m, &mut caches, &mut toks, kv); // warm-up (and graph capture)
    }
    if profile {
        cudarc::driver::profiler_start().expect("profiler");
    }
    let t0 = Instant::now();
    for _ in 0..steps {
        before_step(m);
        step(m, &mut caches, &mut toks, kv);
    }
    let ms = t0.elapsed().as_secs_f64() * 1e3 / steps as f64;
    if profile {
        cudarc::driver::profiler_stop().expect("profiler");
    }
    for c in &mut caches {
        kv.release(c);
    }
    ms
}

/// Prefills `bs` random prompts of `prompt` tokens (sequence i in LoRA slot `slots[i]`) and
/// returns their caches and tokens, each ending with its first generated token.
fn prefill_prompts(
    m: &mut CudaModel,
    kv: &mut KvCache,
    bs: usize,
    prompt: usize,
    slots: &[i32],
) -> (Vec<SeqCache>, Vec<Vec<u32>>) {
    let vocab = m.config().vocab_size as u32;
    let mut caches = vec![SeqCache::default(); bs];
    let mut toks: Vec<Vec<u32>> = (0..bs)
        .map(|i| {
            (0..prompt)
                .map(|j| ((i * 7919 + j * 104729) as u32) % vocab)
                .collect()
        })
        .collect();
    // Prefill in groups that fit the row budget.
    for group in (0..bs).collect::<Vec<_>>().chunks((8192 / prompt).max(1)) {
        for &i in group {
            kv.reserve(&mut caches[i], prompt).expect("kv");
        }
        let inputs: Vec<SeqInput<'_>> = group
            .iter()
            .map(|&i| SeqInput {
                tokens: &toks[i],
                cache: &caches[i],
                adapter: None,
                logits: LogitsWanted::Last,
            })
            .collect();
        let gslots: Vec<i32> = group.iter().map(|&i| slots[i]).collect();
        let next = m.forward_greedy_in_slots(kv, &inputs, &gslots).expect("prefill");
        drop(inputs);
        for (&i, t) in group.iter().zip(next) {
            caches[i].len = prompt;
            toks[i].push(t);
        }
    }
    (caches, toks)
}

/// [`decode_with_prompt`] with overlapped steps, as the server runs them: each step is launched
/// (greedy, on the device) before the host reads the one before it, and takes that step's
/// tokens as pending ones. Returns ms per step and every sequence's generated tokens.
fn decode_overlapped(
    m: &mut CudaModel,
    kv: &mut KvCache,
    bs: usize,
    prompt: usize,
    slots: &[i32],
    steps: usize,
) -> (f64, Vec<Vec<u32>>) {
    let (mut caches, mut toks) = prefill_prompts(m, kv, bs, prompt, slots);
    let greedy = DeviceSample {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        seed: 0,
        penalties: None,
        top_logprobs: 0,
    };
    let sampling = vec![Some(greedy); bs];
    // Whether the last launch's token for each sequence is still on the device only.
    let mut in_flight = false;
    let mut launch = |m: &mut CudaModel, caches: &mut Vec<SeqCache>, toks: &Vec<Vec<u32>>, pending: bool| {
        let ids: Vec<[u32; 1]> = (0..bs)
            .map(|i| {
                [if pending {
                    pending_token(i)
                } else {
                    *toks[i].last().expect("a token")
                }]
            })
            .collect();
        for c in caches.iter_mut() {
            let len = c.len + 1;
            kv.reserve(c, len).expect("kv");
        }
        let inputs: Vec<SeqInput<'_>> = caches
            .iter()
            .zip(&ids)
            .map(|(c, t)| SeqInput {
                tokens: t,
                cache: c,
                adapter: None,
                logits: LogitsWanted::Last,
            })
            .collect();
        m.launch_sampled_in_slots(kv, &inputs, slots, &sampling)
            .expect("launch");
        drop(inputs);
        for c in caches.iter_mut() {
            c.len += 1;
        }
    };
    let read = |m: &mut CudaModel, toks: &mut Vec<Vec<u32>>| {
        for (t, o) in toks.iter_mut().zip(m.collect_sampled().expect("collect")) {
            match o {
                SeqOutput::Sampled(s) => t.push(s.token_id),
                SeqOutput::Logits(_) => panic!("every row is sampled"),
            }
        }
    };
    // Timed from one read to the read `steps` steps later, after warm-up (and graph capture):
    // with a step always queued behind the one running, that interval is `steps` steps.
    let mut t0 = Instant::now();
    for i in 0..4 + steps {
        launch(m, &mut caches, &toks, in_flight);
        if in_flight {
            read(m, &mut toks);
        }
        if i == 3 {
            t0 = Instant::now();
        }
        in_flight = true;
    }
    let ms = t0.elapsed().as_secs_f64() * 1e3 / steps as f64;
    read(m, &mut toks);
    for c in &mut caches {
        kv.release(c);
    }
    let generated = toks.into_iter().map(|t| t[prompt..].to_vec()).collect();
    (ms, generated)
}

fn main() {
    let gpu = Gpu::open(0).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1)
    });
    let c = llama31_8b();
    let only_fast = std::env::args().any(|a| a == "--quick");
    let mut rows: Vec<Row> = Vec::new();
    // --prefill-only: the prefill rows with flash attention, then with GEMM attention, and the
    // GEMM rate, nothing else.
    if std::env::args().any(|a| a == "--prefill-only") {
        println!("device: {}", gpu.name);
        for flash in [true, false] {
            let o = CudaOptions {
                flash_prefill: flash,
                ..opts(LoraKernelMode::Chunked(16), 0)
            };
            let mut m = CudaModel::dummy(gpu.clone(), c.clone(), o, 42).unwrap();
            let mut kv = m.new_kv_cache();
            for s in 0..4 {
                m.dummy_adapter_in_slot(s, 16, &LoraTarget::ALL, 2000 + s as u64)
                    .unwrap();
            }
            let before = rows.len();
            prefill(&mut m, &mut kv, &c, &mut rows);
            let label = if flash {
                "flash attention"
            } else {
                "GEMM attention"
            };
            for r in &mut rows[before..] {
                r.what = format!("{}, {label}", r.what);
            }
        }
        gemm_rate(&gpu);
        print_rows(&rows);
        return;
    }
    // --profile: one eager decode step (bs=64 with 64 rank-16 adapters by default) between
    // cuProfilerStart/Stop, for `ncu --profile-from-start off`.
    if std::env::args().any(|a| a == "--profile") {
        let mut m =
            CudaModel::dummy(gpu.clone(), c.clone(), opts(LoraKernelMode::Chunked(16), 0), 42).unwrap();
        let mut kv = m.new_kv_cache();
        // LORAPLANE_PROFILE_BS picks the batch (64 by default), LORAPLANE_PROFILE_ADAPTERS the
        // number of distinct adapters spread round-robin over it (default: one per row, up to
        // 64), LORAPLANE_PROFILE_RANK their rank (16 by default, at most 64).
        let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
        let rank = env("LORAPLANE_PROFILE_RANK").unwrap_or(16).clamp(1, 64);
        for s in 0..64 {
            m.dummy_adapter_in_slot(s, rank, &LoraTarget::ALL, 1000 + s as u64)
                .unwrap();
        }
        let bs = env("LORAPLANE_PROFILE_BS").unwrap_or(64);
        let n = env("LORAPLANE_PROFILE_ADAPTERS").unwrap_or(bs.min(64)).min(64);
        let slots: Vec<i32> = (0..bs)
            .map(|i| if n == 0 { -1 } else { (i % n) as i32 })
            .collect();
        decode(&mut m, &mut kv, bs, &slots, 1, true, |_| {});
        return;
    }
    // --profile-prefill: one 2k-token prefill with a rank-16 adapter (after a warm-up pass)
    // between cuProfilerStart/Stop.
    if std::env::args().any(|a| a == "--profile-prefill") {
        let mut m =
            CudaModel::dummy(gpu.clone(), c.clone(), opts(LoraKernelMode::Chunked(16), 0), 42).unwrap();
        let mut kv = m.new_kv_cache();
        m.dummy_adapter_in_slot(0, 16, &LoraTarget::ALL, 2000).unwrap();
        let vocab = c.vocab_size as u32;
        let toks = vec![(0..2048).map(|j| (j * 7) as u32 % vocab).collect::<Vec<u32>>()];
        prefill_pass(&mut m, &mut kv, &toks, &[0]);
        cudarc::driver::profiler_start().expect("profiler");
        let ms = prefill_pass(&mut m, &mut kv, &toks, &[0]);
        cudarc::driver::profiler_stop().expect("profiler");
        eprintln!("profiled prefill: {ms:.1} ms");
        return;
    }
    // --compare-attention: decode (csgmv + graphs, split keys) at short and long contexts with
    // the decode attention on CUDA cores and on tensor cores
    // (CudaOptions::decode_attention_tensor_cores): the base model, and batch 64 with 64
    // distinct rank-16 adapters at the short context; one table.
    if std::env::args().any(|a| a == "--compare-attention") {
        for tc in [false, true] {
            let o = CudaOptions {
                // At every batch size (the default takes tensor cores from 32 pairs).
                decode_attention_tensor_cores: tc.then_some(0),
                ..opts(LoraKernelMode::Chunked(16), 256)
            };
            let mut m = CudaModel::dummy(gpu.clone(), c.clone(), o, 42).expect("model");
            for s in 0..64 {
                m.dummy_adapter_in_slot(s, 16, &LoraTarget::ALL, 1000 + s as u64)
                    .unwrap();
            }
            let mut kv = m.new_kv_cache();
            let cases = [
                (PROMPT, 1, 0),
                (PROMPT, 8, 0),
                (PROMPT, 32, 0),
                (PROMPT, 64, 0),
                (PROMPT, 64, 64),
                (1000, 1, 0),
                (1000, 8, 0),
                (4000, 1, 0),
                (4000, 4, 0),
                (4000, 8, 0),
            ];
            for (prompt, bs, n) in cases {
                let steps = 20;
                let slots: Vec<i32> = (0..bs)
                    .map(|i| if n == 0 { -1 } else { (i % n) as i32 })
                    .collect();
                let ms = decode_with_prompt(&mut m, &mut kv, bs, prompt, &slots, steps, false, |_| {});
                let ctx = prompt + 3 + steps / 2;
                let bytes = base_bytes(&c)
                    + n as f64 * adapter_bytes(&c, 16)
                    + bs as f64 * ctx as f64 * kv_bytes_per_token(&c);
                let roof = bytes / HBM_BYTES_PER_S * 1e3;
                let who = if n == 0 {
                    "base".to_string()
                } else {
                    format!("{n}x r16")
                };
                let cores = if tc { "tensor" } else { "CUDA" };
                let what = format!("decode {who} bs={bs} context {prompt}, attention on {cores} cores");
                println!("{what}: {ms:.2} ms/step, roofline {roof:.2} ms");
                rows.push(Row {
                    what,
                    ms,
                    tok_s: bs as f64 * 1e3 / ms,
                    roofline_ms: roof,
                });
            }
        }
        print_rows(&rows);
        return;
    }
    if std::env::args().any(|a| a == "--gemms") {
        decode_gemms(&gpu, std::env::args().any(|a| a == "--variants"));
        return;
    }
    if std::env::args().any(|a| a == "--slot-loads") {
        slot_loads(&gpu, &c);
        return;
    }
    println!("device: {}", gpu.name);
    // LORAPLANE_BENCH_BATCHES (e.g. "128,256") replaces the batch sizes.
    let batches: Vec<usize> = match std::env::var("LORAPLANE_BENCH_BATCHES") {
        Ok(v) => v
            .split(',')
            .map(|b| {
                b.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("LORAPLANE_BENCH_BATCHES: {b:?} is not a batch size"))
            })
            .collect(),
        Err(_) if only_fast => vec![1, 64],
        Err(_) => vec![1, 8, 32, 64, 128, 256],
    };
    let ranks = [16usize, 64];
    // --compare: csgmv + graphs decode with the bf16 LoRA kernels on CUDA cores, then on tensor
    // cores (CudaOptions::lora_tensor_cores); --compare-gemms: with the projections in cuBLAS,
    // with them and programmatic edges, then in decode_gemm.cu (CudaOptions::decode_gemms,
    // which only graph steps with programmatic edges take). One table, same call.
    let compare_gemms = std::env::args().any(|a| a == "--compare-gemms");
    if compare_gemms || std::env::args().any(|a| a == "--compare") {
        let base = opts(LoraKernelMode::Chunked(16), 256);
        let variants: Vec<(&str, CudaOptions)> = if compare_gemms {
            let v = |decode_gemms, programmatic_launch| CudaOptions {
                decode_gemms,
                programmatic_launch,
                ..base
            };
            vec![
                ("GEMMs in cuBLAS", v(false, false)),
                ("GEMMs in cuBLAS, PDL", v(false, true)),
                ("decode GEMMs, PDL", v(true, true)),
            ]
        } else {
            vec![
                (
                    "LoRA on CUDA cores",
                    CudaOptions {
                        lora_tensor_cores: false,
                        ..base
                    },
                ),
                (
                    "LoRA on tensor cores",
                    CudaOptions {
                        lora_tensor_cores: true,
                        ..base
                    },
                ),
            ]
        };
        for (label, o) in variants {
            let mut m = CudaModel::dummy(gpu.clone(), c.clone(), o, 42).expect("model");
            let mut kv = m.new_kv_cache();
            decode_grid(&mut m, &mut kv, &c, label, &batches, &ranks, &mut rows);
        }
        print_rows(&rows);
        return;
    }
    // --compare-pdl: the default configuration's decode rows with decode graphs of ordinary
    // edges and with programmatic edges into loraplane's kernels (CudaOptions::
    // programmatic_launch), in turn twice; same binary, same call.
    if std::env::args().any(|a| a == "--compare-pdl") {
        for round in 1..=2 {
            for pdl in [false, true] {
                let o = CudaOptions {
                    programmatic_launch: pdl,
                    ..opts(LoraKernelMode::Chunked(16), 256)
                };
                let mut m = CudaModel::dummy(gpu.clone(), c.clone(), o, 42).expect("model");
                let mut kv = m.new_kv_cache();
                let label = format!("csgmv+graphs pdl={pdl} r{round}");
                decode_grid(&mut m, &mut kv, &c, &label, &batches, &ranks, &mut rows);
                eprintln!(
                    "{label}: {} programmatic edges over the captured graphs",
                    m.programmatic_edges()
                );
            }
        }
        print_rows(&rows);
        return;
    }
    // --registers: every kernel's registers and spill bytes per thread, as the driver compiled
    // them (with LORAPLANE_NVRTC_OPTIONS, for those options).
    if std::env::args().any(|a| a == "--registers") {
        for name in loraplane_kernels::kernel_names() {
            let (regs, local) = gpu.kernels.registers(&name);
            println!("kernel {name}: {regs} registers, {local} B local");
        }
        return;
    }
    // --step-parts: for each BATCH:ADAPTERS:RANK[:PROMPT] in LORAPLANE_PARTS, the whole step as the grid
    // times it, and its graph replayed alone back to back (its device time); the difference is
    // the host's part of a step (metadata, launch, argmax, the ids' copy back).
    if std::env::args().any(|a| a == "--step-parts") {
        let parts = std::env::var("LORAPLANE_PARTS")
            .unwrap_or_else(|_| "1:0:16 8:1:64 32:1:16 64:0:16 64:64:16".into());
        let mut m = CudaModel::dummy(gpu.clone(), c.clone(), opts(LoraKernelMode::Chunked(16), 256), 42)
            .expect("model");
        let mut kv = m.new_kv_cache();
        println!("| configuration | whole step ms | overlapped step ms | graph replay ms | host part ms |");
        println!("|---|---|---|---|---|");
        for p in parts.split_whitespace() {
            let f: Vec<usize> = p
                .split(':')
                .map(|x| {
                    x.parse()
                        .unwrap_or_else(|_| panic!("LORAPLANE_PARTS: {p:?} is not BATCH:ADAPTERS:RANK"))
                })
                .collect();
            // An optional fourth field sets the prompt length (the context the steps read).
            let (bs, n, rank, prompt) = match f[..] {
                [bs, n, rank] => (bs, n, rank, PROMPT),
                [bs, n, rank, prompt] => (bs, n, rank, prompt),
                _ => panic!("LORAPLANE_PARTS: {p:?} is not BATCH:ADAPTERS:RANK[:PROMPT]"),
            };
            for s in 0..64 {
                m.dummy_adapter_in_slot(s, rank, &LoraTarget::ALL, 1000 + s as u64)
                    .unwrap();
            }
            let slots: Vec<i32> = (0..bs)
                .map(|i| if n == 0 { -1 } else { (i % n) as i32 })
                .collect();
            let ms = decode_with_prompt(&mut m, &mut kv, bs, prompt, &slots, 20, false, |_| {});
            let replay = m.time_graph_replays(bs, 50).expect("replay");
            let (overlapped, _) = decode_overlapped(&mut m, &mut kv, bs, prompt, &slots, 20);
            let mut what = if n == 0 {
                format!("bs={bs} base")
            } else {
                format!("bs={bs} {n}x r{rank}")
            };
            if prompt != PROMPT {
                what += &format!(", {prompt}-token prompts");
            }
            println!(
                "| {what} | {ms:.3} | {overlapped:.3} | {replay:.3} | {:.3} |",
                ms - replay
            );
        }
        return;
    }
    // --decode-only: the default configuration's (csgmv + graphs) decode rows alone, for A/B
    // timings of two builds in one call (scripts/gpu/run.sh ab).
    if std::env::args().any(|a| a == "--decode-only") {
        let mut m = CudaModel::dummy(gpu.clone(), c.clone(), opts(LoraKernelMode::Chunked(16), 256), 42)
            .expect("model");
        let mut kv = m.new_kv_cache();
        decode_grid(&mut m, &mut kv, &c, "csgmv+graphs", &batches, &ranks, &mut rows);
        print_rows(&rows);
        return;
    }
    let configs: &[(LoraKernelMode, usize, &str)] = &[
        (LoraKernelMode::Chunked(16), 256, "csgmv+graphs"),
        (LoraKernelMode::Chunked(16), 0, "csgmv eager"),
        (LoraKernelMode::PerSequence, 256, "triton+graphs"),
        (LoraKernelMode::PerSequence, 0, "triton eager"),
    ];
    for &(mode, graphs, label) in configs {
        let t0 = Instant::now();
        let mut m = CudaModel::dummy(gpu.clone(), c.clone(), opts(mode, graphs), 42).expect("model");
        let mut kv = m.new_kv_cache();
        m.sync().unwrap();
        eprintln!(
            "{label}: model ready in {:.1}s, LoRA pool {:.1} GB",
            t0.elapsed().as_secs_f64(),
            m.lora_pool_bytes() as f64 / 1e9
        );
        decode_grid(
            &mut m,
            &mut kv,
            &c,
            label,
            &batches,
            &ranks[..if only_fast { 1 } else { 2 }],
            &mut rows,
        );
        if graphs == 0 && mode == LoraKernelMode::Chunked(16) {
            for s in 0..4 {
                m.dummy_adapter_in_slot(s, 16, &LoraTarget::ALL, 2000 + s as u64)
                    .unwrap();
            }
            prefill(&mut m, &mut kv, &c, &mut rows);
        }
        drop(kv);
        drop(m);
    }
    gemm_rate(&gpu);
    print_rows(&rows);
}

/// The rows as a Markdown table.
fn print_rows(rows: &[Row]) {
    println!("\n| configuration | ms/step | tok/s | roofline ms | x roofline |\n|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {:.2} | {:.0} | {:.2} | {:.2} |",
            r.what,
            r.ms,
            r.tok_s,
            r.roofline_ms,
            r.ms / r.roofline_ms
        );
    }
}

/// Decode rows for each rank, batch and number of distinct adapters (0, 1, 8, 64; never more
/// than the batch), labelled `decode {label} ...`, with their rooflines.
fn decode_grid(
    m: &mut CudaModel,
    kv: &mut KvCache,
    c: &ModelConfig,
    label: &str,
    batches: &[usize],
    ranks: &[usize],
    rows: &mut Vec<Row>,
) {
    for &rank in ranks {
        for s in 0..64 {
            m.dummy_adapter_in_slot(s, rank, &LoraTarget::ALL, 1000 + s as u64)
                .unwrap();
        }
        for &bs in batches {
            for n in [0usize, 1, 8, 64] {
                if n > bs || (n == 0 && rank != ranks[0]) {
                    continue;
                }
                let slots: Vec<i32> = (0..bs)
                    .map(|i| if n == 0 { -1 } else { (i % n) as i32 })
                    .collect();
                let steps = if bs >= 128 { 10 } else { 20 };
                let ms = decode(m, kv, bs, &slots, steps, false, |_| {});
                let ctx = PROMPT + 3 + steps / 2;
                let bytes = base_bytes(c)
                    + n as f64 * adapter_bytes(c, rank)
                    + bs as f64 * ctx as f64 * kv_bytes_per_token(c);
                let flops = bs as f64 * base_bytes(c); // 2 FLOPs per bf16 parameter
                let roof = (bytes / HBM_BYTES_PER_S).max(flops / BF16_FLOPS) * 1e3;
                let what = if n == 0 {
                    format!("decode {label} bs={bs} base")
                } else {
                    format!("decode {label} bs={bs} {n}x r{rank}")
                };
                println!(
                    "{what}: {ms:.2} ms/step, roofline {roof:.2} ms ({:.2}x)",
                    ms / roof
                );
                rows.push(Row {
                    what,
                    ms,
                    tok_s: bs as f64 * 1e3 / ms,
                    roofline_ms: roof,
                });
            }
        }
    }
}

/// One prefill pass of `toks` (sequence i in LoRA slot `slots[i]`, -1 for none) from an empty
/// cache; returns its milliseconds.
fn prefill_pass(m: &mut CudaModel, kv: &mut KvCache, toks: &[Vec<u32>], slots: &[i32]) -> f64 {
    let mut caches = vec![SeqCache::default(); toks.len()];
    for (cch, t) in caches.iter_mut().zip(toks) {
        kv.reserve(cch, t.len()).unwrap();
    }
    let inputs: Vec<SeqInput<'_>> = caches
        .iter()
        .zip(toks)
        .map(|(cc, t)| SeqInput {
            tokens: t,
            cache: cc,
            adapter: None,
            logits: LogitsWanted::Last,
        })
        .collect();
    m.sync().unwrap();
    let t0 = Instant::now();
    m.forward_greedy_in_slots(kv, &inputs, slots).unwrap();
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    drop(inputs);
    for cch in caches.iter_mut() {
        kv.release(cch);
    }
    ms
}

/// 2k-token prompts: 1 and 4 per pass, base and with distinct rank-16 adapters.
fn prefill(m: &mut CudaModel, kv: &mut KvCache, c: &ModelConfig, rows: &mut Vec<Row>) {
    let vocab = c.vocab_size as u32;
    for n in [1usize, 4] {
        for with_lora in [false, true] {
            let toks: Vec<Vec<u32>> = (0..n)
                .map(|i| (0..2048).map(|j| ((i * 31 + j * 7) as u32) % vocab).collect())
                .collect();
            let slots: Vec<i32> = (0..n).map(|i| if with_lora { i as i32 } else { -1 }).collect();
            let times: Vec<f64> = (0..4).map(|_| prefill_pass(m, kv, &toks, &slots)).collect();
            let ms = times[1..].iter().cloned().fold(f64::INFINITY, f64::min);
            let tokens = (n * 2048) as f64;
            // Linear layers + causal attention FLOPs.
            let attn = 2.0 * 2.0 * c.num_layers as f64 * c.q_dim() as f64 * 2048.0 * 2048.0 / 2.0 * n as f64;
            let flops = tokens * base_bytes(c) + attn;
            let roof = flops / BF16_FLOPS * 1e3;
            let what = format!(
                "prefill {n}x2048 tokens {}",
                if with_lora { "rank-16 adapters" } else { "base" }
            );
            println!(
                "{what}: {ms:.1} ms, {:.0} tok/s, {:.0} TFLOP/s",
                tokens * 1e3 / ms,
                flops / ms / 1e9
            );
            rows.push(Row {
                what,
                ms,
                tok_s: tokens * 1e3 / ms,
                roofline_ms: roof,
            });
        }
    }
}

/// Fills a bf16 device buffer with uniform values in [-0.05, 0.05).
fn fill_bf16(gpu: &Gpu, s: &cudarc::driver::CudaSlice<half::bf16>, seed: u64) {
    use cudarc::driver::PushKernelArg;
    let f = gpu.kernels.get("fill_uniform_bf16");
    let mut l = gpu.stream.launch_builder(f);
    let (p, len, sc) = (gpu.ptr(s), s.len() as u64, 0.05f32);
    l.arg(&p).arg(&len).arg(&seed).arg(&sc);
    unsafe { l.launch(cudarc::driver::LaunchConfig::for_num_elems(1 << 20)) }.unwrap();
}

/// bf16 GEMMs at decode shapes (rows 1 to 256 against each Llama-3.1-8B weight) in cuBLAS and,
/// up to 64 rows on Hopper, in `decode_gemm.cu`: time per call and the weight bytes read per
/// second. Back-to-back calls without programmatic launch, so `decode_gemm.cu` pays the ramp that
/// a decode graph hides. Weights rotate over copies that together exceed the 50 MB L2, so each
/// call reads its weight from HBM as in a decode step. With
/// `variants` (`--gemms --variants`), also each GEMM accumulating into its output (beta 1) and,
/// at 1 and 64 rows, as 2, 4 or 8 strided-batched GEMMs over slices of k with f32 partials.
fn decode_gemms(gpu: &std::sync::Arc<Gpu>, variants: bool) {
    println!("device: {}", gpu.name);
    println!("\n| weight (n x k) | rows | us per GEMM | weight GB/s |\n|---|---|---|---|");
    let shapes = [
        ("qkv", 6144usize, 4096usize),
        ("o", 4096, 4096),
        ("gate/up", 28672, 4096),
        ("down", 4096, 14336),
        ("lm_head", 128256, 4096),
    ];
    for (name, n, k) in shapes {
        let copies = (256usize << 20).div_ceil(n * k * 2).max(1);
        let ws: Vec<_> = (0..copies)
            .map(|i| {
                let w = gpu.zeros::<half::bf16>(n * k).unwrap();
                fill_bf16(gpu, &w, 10 + i as u64);
                w
            })
            .collect();
        // Microseconds per call of `run` over the weight copies in turn, after one warm-up pass,
        // printed as a table row with the weight's read rate.
        let time_row = |label: &str, m: usize, run: &dyn Fn(&cudarc::driver::CudaSlice<half::bf16>)| {
            for w in &ws {
                run(w);
            }
            gpu.sync().unwrap();
            let reps = 50 * copies;
            let t0 = Instant::now();
            for i in 0..reps {
                run(&ws[i % copies]);
            }
            gpu.sync().unwrap();
            let us = t0.elapsed().as_secs_f64() * 1e6 / reps as f64;
            println!(
                "| {name} ({n} x {k}){label} | {m} | {us:.1} | {:.0} |",
                (n * k * 2) as f64 / us / 1e3
            );
        };
        for m in [1usize, 8, 32, 64, 128, 256] {
            let x = gpu.zeros::<half::bf16>(m * k).unwrap();
            fill_bf16(gpu, &x, 3);
            let out = gpu.zeros::<half::bf16>(m * n).unwrap();
            let gemm = |w: &cudarc::driver::CudaSlice<half::bf16>, beta: f32| {
                gpu.gemm_nt::<half::bf16>(gpu.ptr(&out), n, false, gpu.ptr(&x), k, gpu.ptr(w), m, n, k, beta)
                    .unwrap()
            };
            time_row("", m, &|w| gemm(w, 0.0));
            // decode_gemm.cu (Hopper only) in the three launches a model step may use (whole
            // tiles of 128 and of 64 rows, 64-row tiles split over clusters of 2,
            // `decode_gemm_for_model`); with LORAPLANE_DG_SWEEP, also equal shares of the units
            // and other stage sizes.
            let sweep = std::env::var("LORAPLANE_DG_SWEEP").is_ok();
            let base = loraplane_kernels::DecodeGemmTuning::default();
            let whole = |tile_n| loraplane_kernels::DecodeGemmTuning {
                whole_tiles: true,
                tile_n,
                ..base
            };
            let split = loraplane_kernels::DecodeGemmTuning {
                split: 2,
                ..whole(64)
            };
            let mut tunings = vec![whole(128), whole(64), split];
            if sweep {
                use loraplane_kernels::DecodeGemmTuning as Dt;
                tunings.extend([
                    base,
                    Dt { tile_n: 64, ..base },
                    Dt {
                        whole_tiles: true,
                        tile_n: 64,
                        k_blocks: 2,
                        ..base
                    },
                    Dt { k_blocks: 2, ..base },
                    Dt {
                        blocks_per_sm: 2,
                        k_blocks: 2,
                        ..base
                    },
                ]);
            }
            // One decode_gemm.cu plan over the weight copies, writing `out` (bf16, or f32 for
            // the `_of32` kernels).
            let time_plan = |label: &str, p: &loraplane_kernels::DecodeGemmPlan, out: u64| {
                // The weight copies' maps, then x's.
                let mut maps: Vec<u64> = Vec::new();
                for w in ws.iter() {
                    let map = gpu.decode_gemm_map::<half::bf16>(gpu.ptr(w), (n, k), k, p.tile_n);
                    maps.extend(map.unwrap());
                }
                maps.extend(
                    gpu.decode_gemm_map::<half::bf16>(gpu.ptr(&x), (m, k), k, p.tokens)
                        .unwrap(),
                );
                let maps = gpu.upload(&maps).unwrap();
                let workspace = gpu.zeros::<f32>(p.workspace.max(1)).unwrap();
                let counters = gpu.zeros::<u32>(p.tiles).unwrap();
                let map_at = |i: usize| gpu.ptr(&maps) + 128 * i as u64;
                let index = |w: &cudarc::driver::CudaSlice<half::bf16>| {
                    ws.iter()
                        .position(|c| c.len() == w.len() && gpu.ptr(c) == gpu.ptr(w))
                        .unwrap()
                };
                time_row(label, m, &|w| {
                    gpu.decode_gemm(
                        p,
                        (map_at(index(w)), map_at(copies)),
                        out,
                        n,
                        (m, n, k),
                        0.0,
                        (gpu.ptr(&workspace), gpu.ptr(&counters)),
                    )
                    .unwrap()
                });
            };
            for t in tunings {
                if !gpu.kernels.has_decode_gemm() || (sweep && !(m == 1 || m == 64)) {
                    break;
                }
                let Some(p) = loraplane_kernels::decode_gemm_plan("bf16", (m, n, k), gpu.sms, t) else {
                    continue;
                };
                let label = format!(
                    ", decode_gemm {} ({} blocks{}, {}-row tiles, {} stages of {} k-blocks)",
                    if t.split > 1 {
                        "tiles split over clusters of 2"
                    } else if t.whole_tiles {
                        "whole tiles"
                    } else {
                        "equal shares"
                    },
                    p.blocks,
                    if t.whole_tiles {
                        String::new()
                    } else {
                        format!(" {}/SM", t.blocks_per_sm)
                    },
                    p.tile_n,
                    p.stages,
                    p.k_blocks,
                );
                time_plan(&label, &p, gpu.ptr(&out));
            }
            // The LM head as a model step runs it: f32 logits, in cuBLAS and in the f32-output
            // decode GEMM (`decode_gemm_logits_for_model`).
            if name == "lm_head" {
                let logits = gpu.zeros::<f32>(m * n).unwrap();
                time_row(", f32 out", m, &|w| {
                    gpu.gemm_nt::<half::bf16>(
                        gpu.ptr(&logits),
                        n,
                        true,
                        gpu.ptr(&x),
                        k,
                        gpu.ptr(w),
                        m,
                        n,
                        k,
                        0.0,
                    )
                    .unwrap()
                });
                if let Some(p) = loraplane_kernels::decode_gemm_logits_for_model("bf16", (m, n, k), gpu.sms)
                    .filter(|_| gpu.kernels.has_decode_gemm())
                {
                    let label = format!(", f32 out, {} ({} blocks)", p.kernel, p.blocks);
                    time_plan(&label, &p, gpu.ptr(&logits));
                }
            }
            if !variants {
                continue;
            }
            // Accumulating into the output (beta 1, as the o and down projections add into the
            // residual stream).
            time_row(", beta 1", m, &|w| gemm(w, 1.0));
            if !(m == 1 || m == 64) {
                continue;
            }
            // The same product as `splits` strided-batched GEMMs over slices of k, each
            // writing an f32 partial [m, n] (a consumer kernel would add them up).
            for splits in [2usize, 4, 8] {
                if k % (splits * 8) != 0 {
                    continue;
                }
                let part = gpu.zeros::<f32>(splits * m * n).unwrap();
                let kc = k / splits;
                let bf = <half::bf16 as GpuFloat>::BLAS_TYPE;
                let f32t = <f32 as GpuFloat>::BLAS_TYPE;
                let split_gemm = |w: &cudarc::driver::CudaSlice<half::bf16>| {
                    gpu.gemm_batched(
                        true,
                        false,
                        (n, m, kc),
                        (1.0, 0.0),
                        (gpu.ptr(w), bf, k, kc),
                        (gpu.ptr(&x), bf, k, kc),
                        (gpu.ptr(&part), f32t, n, m * n),
                        splits,
                    )
                    .unwrap()
                };
                time_row(&format!(", {splits} k-slices, f32 partials"), m, &split_gemm);
            }
        }
    }
}

/// cuBLAS bf16 GEMM rate at the prefill's largest shape (8192 x 28672 x 4096).
fn gemm_rate(gpu: &std::sync::Arc<Gpu>) {
    let (m, n, k) = (8192usize, 28672usize, 4096usize);
    let a = gpu.zeros::<half::bf16>(m * k).unwrap();
    let b = gpu.zeros::<half::bf16>(n * k).unwrap();
    let out = gpu.zeros::<half::bf16>(m * n).unwrap();
    fill_bf16(gpu, &a, 1);
    fill_bf16(gpu, &b, 2);
    let run = || {
        gpu.gemm_nt::<half::bf16>(gpu.ptr(&out), n, false, gpu.ptr(&a), k, gpu.ptr(&b), m, n, k, 0.0)
            .unwrap()
    };
    for _ in 0..3 {
        run();
    }
    gpu.sync().unwrap();
    let t0 = Instant::now();
    for _ in 0..10 {
        run();
    }
    gpu.sync().unwrap();
    let ms = t0.elapsed().as_secs_f64() * 1e3 / 10.0;
    println!(
        "cuBLAS bf16 GEMM {m}x{n}x{k}: {ms:.2} ms, {:.0} TFLOP/s",
        2.0 * (m * n * k) as f64 / ms / 1e9
    );
}

/// Slot loads of rank-16 adapters on all seven targets (84 MB in bf16): alone, and one per
/// decode step at batch 64 (63 distinct adapters in the batch, the load goes to the 64th slot).
fn slot_loads(gpu: &std::sync::Arc<Gpu>, c: &ModelConfig) {
    println!("device: {}", gpu.name);
    let mut m = CudaModel::dummy(gpu.clone(), c.clone(), opts(LoraKernelMode::Chunked(16), 256), 42).unwrap();
    let mut kv = m.new_kv_cache();
    for s in 0..63 {
        m.dummy_adapter_in_slot(s, 16, &LoraTarget::ALL, 1000 + s as u64)
            .unwrap();
    }
    let dummy = |name: String, rank: usize, seed: u64| {
        Arc::new(LoraAdapter::dummy(&name, c, rank, &LoraTarget::ALL, seed))
    };
    let adapters: Vec<Arc<LoraAdapter>> = (0..4)
        .map(|i| dummy(format!("host{i}"), 16, 7 + i as u64))
        .collect();
    let mb = adapter_bytes(c, 16) / 1e6;
    let ms = |t0: Instant| t0.elapsed().as_secs_f64() * 1e3;
    let (mut sync_ms, mut call_ms, mut first_ms, mut copy_ms) = (vec![], vec![], vec![], vec![]);
    for a in &adapters {
        let t0 = Instant::now();
        m.load_slot(63, a, false).unwrap();
        m.sync().unwrap();
        sync_ms.push(ms(t0));
        // Staging returns at once; the first overlapped load waits for the worker's conversion.
        let t0 = Instant::now();
        m.stage_adapter(a).unwrap();
        call_ms.push(ms(t0));
        m.load_slot(63, a, true).unwrap();
        m.slot_ready(63, true).unwrap();
        first_ms.push(ms(t0));
        let t0 = Instant::now();
        m.load_slot(63, a, true).unwrap();
        m.slot_ready(63, true).unwrap();
        copy_ms.push(ms(t0));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("\n| slot load of one rank-16 adapter ({mb:.0} MB bf16) | ms (median of 4) |\n|---|---|");
    println!(
        "| synchronous: convert on the host + copy from pageable memory | {:.2} |",
        median(&mut sync_ms)
    );
    println!(
        "| stage_adapter on the engine thread (starts the conversion) | {:.2} |",
        median(&mut call_ms)
    );
    println!(
        "| first overlapped load: convert into pinned memory on a worker thread, then copy | {:.2} |",
        median(&mut first_ms)
    );
    println!(
        "| overlapped load of a staged adapter: copy from pinned memory on the copy stream | {:.2} |",
        median(&mut copy_ms)
    );
    let slots: Vec<i32> = (0..64).map(|i| i % 63).collect();
    let steps = 20;
    let plain = decode(&mut m, &mut kv, 64, &slots, steps, false, |_| {});
    let mut k = 0;
    let sync = decode(&mut m, &mut kv, 64, &slots, steps, false, |m| {
        k += 1;
        m.load_slot(63, &adapters[k % 4], false).unwrap();
    });
    let overlapped = decode(&mut m, &mut kv, 64, &slots, steps, false, |m| {
        k += 1;
        m.load_slot(63, &adapters[k % 4], true).unwrap();
    });
    m.slot_ready(63, true).unwrap();
    // Adapters never staged before, one per timed step, loaded with overlap: the conversion
    // runs on a worker thread; then the same with the engine thread waiting for each
    // conversion and copy before its step (as when staging ran on the engine thread).
    let mut never_staged = [0.0; 2];
    for (w, wait) in [false, true].into_iter().enumerate() {
        let fresh: Vec<Arc<LoraAdapter>> = (0..steps)
            .map(|i| dummy(format!("fresh{w}-{i}"), 16, 100 * (w as u64 + 1) + i as u64))
            .collect();
        let mut next = fresh.iter();
        never_staged[w] = decode(&mut m, &mut kv, 64, &slots, steps, false, |m| {
            m.load_slot(63, next.next().expect("one per step"), true).unwrap();
            if wait {
                m.slot_ready(63, true).unwrap();
            }
        });
        m.slot_ready(63, true).unwrap();
    }
    let [unstaged, waited] = never_staged;
    println!("\n| decode bs=64, 63 x r16, csgmv+graphs | ms/step | vs no loads |\n|---|---|---|");
    println!("| no slot loads | {plain:.2} | 1.00x |");
    println!(
        "| one synchronous slot load per step | {sync:.2} | {:.2}x |",
        sync / plain
    );
    println!(
        "| one overlapped slot load per step | {overlapped:.2} | {:.2}x |",
        overlapped / plain
    );
    println!(
        "| one overlapped slot load per step of a never-staged adapter | {unstaged:.2} | {:.2}x |",
        unstaged / plain
    );
    println!(
        "| the same, waiting for each conversion and copy before the step | {waited:.2} | {:.2}x |",
        waited / plain
    );
    drop(kv);
    drop(m);
    // A pool of 4 slots keeps 8 staged images: from the 9th adapter on, staging one drops the
    // oldest image, whose pinned buffers the new one reuses instead of allocating.
    let o = CudaOptions {
        lora_slots: 4,
        ..opts(LoraKernelMode::Chunked(16), 256)
    };
    let mut m = CudaModel::dummy(gpu.clone(), c.clone(), o, 42).unwrap();
    println!("\n| first overlapped load, 4-slot pool (8 staged images) | rank 16, ms | rank 64, ms |\n|---|---|---|");
    let mut rows = [vec![], vec![]];
    for (r, seed) in [(16, 500), (64, 600)] {
        // Rank 64: 12 adapters (8 GB of f32 host copies), so 4 of them reuse buffers.
        let count = if r == 16 { 16 } else { 12 };
        let cycle: Vec<Arc<LoraAdapter>> = (0..count)
            .map(|i| dummy(format!("cycle{r}-{i}"), r, seed + i as u64))
            .collect();
        let (mut fresh_ms, mut reused_ms) = (vec![], vec![]);
        for (i, a) in cycle.iter().enumerate() {
            let t0 = Instant::now();
            m.stage_adapter(a).unwrap();
            m.load_slot(i % 4, a, true).unwrap();
            m.slot_ready(i % 4, true).unwrap();
            if i < 8 { &mut fresh_ms } else { &mut reused_ms }.push(ms(t0));
        }
        rows[0].push(median(&mut fresh_ms));
        rows[1].push(median(&mut reused_ms));
    }
    println!(
        "| adapters 1-8: pinned buffers allocated (median of 8) | {:.2} | {:.2} |",
        rows[0][0], rows[0][1]
    );
    println!(
        "| later adapters: each takes the buffers of the staged image it evicts (median of 8 / of 4) | {:.2} | {:.2} |",
        rows[1][0], rows[1][1]
    );
}
