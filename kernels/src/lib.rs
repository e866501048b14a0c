//! CUDA kernels for loraplane's GPU backend: `.cu` sources compiled at run time with NVRTC.
//!
//! [`Kernels::load`] compiles the sources once per process (the PTX is also cached on disk,
//! keyed by a hash of the source and the target architecture), loads the module and hands out
//! functions by name. Kernels are templates over the activation type, exported with the suffixes
//! in [`TYPE_SUFFIXES`]; see `llama.cu`, `flash_attention.cu`, `decode_attention.cu`, `lora_mma.cu`,
//! `decode_gemm.cu` and `sampling.cu` for each kernel's contract. The files are compiled as one
//! program ([`source`]); `LORAPLANE_NVRTC_OPTIONS` adds compiler options (a developer's knob for
//! trying a kernel's tunables, which the sources guard with `#ifndef`).

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};

/// The Llama-family kernels (embedding, RMSNorm, RoPE + paged KV write, SiLU-and-multiply, paged
/// GQA attention, KV gather and causal softmax for GEMM prefill attention, LoRA shrink/expand over
/// work items, argmax, dummy-weight fill).
pub const LLAMA_CU: &str = include_str!("llama.cu");

/// The activation types every typed kernel is instantiated for: float32, bfloat16, float16.
pub const TYPE_SUFFIXES: &[&str] = &["f32", "bf16", "f16"];

/// Token sampling on the device (greedy, temperature, top-k, top-p, min-p) and the gather of the
/// logits rows the host still needs.
pub const SAMPLING_CU: &str = include_str!("sampling.cu");

/// Flash-style causal prefill attention over the paged KV cache on tensor cores (bf16 and f16
/// only; uses `llama.cu`'s helpers).
pub const FLASH_ATTENTION_CU: &str = include_str!("flash_attention.cu");

/// Paged decode attention on tensor cores (bf16 and f16 only; uses `llama.cu`'s and
/// `flash_attention.cu`'s helpers).
pub const DECODE_ATTENTION_CU: &str = include_str!("decode_attention.cu");

/// LoRA shrink and expand on tensor cores (bf16 and f16 only; uses `llama.cu`'s and
/// `flash_attention.cu`'s helpers).
pub const LORA_MMA_CU: &str = include_str!("lora_mma.cu");

/// Decode-shaped GEMMs (at most [`DECODE_GEMM_MAX_ROWS`] rows) on tensor cores, bf16 and f16
/// only (uses `flash_attention.cu`'s and `lora_mma.cu`'s helpers).
pub const DECODE_GEMM_CU: &str = include_str!("decode_gemm.cu");

/// The whole program NVRTC compiles: `llama.cu`, `flash_attention.cu`, `decode_attention.cu`,
/// `lora_mma.cu`, `decode_gemm.cu`, then `sampling.cu`, each under its own file name for
/// compiler messages.
pub fn source() -> String {
    format!(
        "#line 1 \"llama.cu\"\n{LLAMA_CU}\n#line 1 \"flash_attention.cu\"\n{FLASH_ATTENTION_CU}\n\
         #line 1 \"decode_attention.cu\"\n{DECODE_ATTENTION_CU}\n\
         #line 1 \"lora_mma.cu\"\n{LORA_MMA_CU}\n#line 1 \"decode_gemm.cu\"\n{DECODE_GEMM_CU}\n\
         #line 1 \"sampling.cu\"\n{SAMPLING_CU}"
    )
}

/// Largest pool rank the tensor-core LoRA kernels take: their expand stages 16 rows of `y` for up
/// to three targets in shared memory.
pub const LORA_MMA_MAX_RANK: usize = 256;

/// Dynamic shared memory of the tensor-core expand (`lora_expand_mma`) for `targets` targets of
/// a pool of rank `rank` in `elem`-byte elements: 16 rows (LMMA_ROWS) of `y`, each target's
/// ranks rounded up to whole k-steps of 16, rows padded by 8 elements.
pub fn lora_mma_expand_shared(targets: usize, rank: usize, elem: usize) -> usize {
    16 * (targets * rank.next_multiple_of(16) + 8) * elem
}

/// The tensor-core LoRA kernels (`lora_mma.cu`) are built for these element types only.
pub fn lora_mma_built_for(suffix: &str) -> bool {
    matches!(suffix, "bf16" | "f16")
}

/// Head sizes `flash_attention.cu` is built for (a multiple of the 16-wide tensor-core step).
pub const FLASH_HEAD_DIMS: &[usize] = &[16, 32, 64, 128];

/// The flash prefill kernel for element type `suffix` and head size `head_dim`, where one is
/// built: `flash_attention_{bf16,f16}_d{16,32,64,128}`.
pub fn flash_attention_kernel(suffix: &str, head_dim: usize) -> Option<String> {
    (matches!(suffix, "bf16" | "f16") && FLASH_HEAD_DIMS.contains(&head_dim))
        .then(|| format!("flash_attention_{suffix}_d{head_dim}"))
}

/// Most query heads per kv head `decode_attention.cu` takes (DA_MAX_GROUP: rows of the mma's 16).
pub const DECODE_ATTENTION_MAX_GROUP: usize = 8;

/// The tensor-core decode attention kernel for element type `suffix`, head size `head_dim` and
/// `group` query heads per kv head, where one is built: `decode_attention_{bf16,f16}_d{16,32,64,128}`.
pub fn decode_attention_kernel(suffix: &str, head_dim: usize, group: usize) -> Option<String> {
    (matches!(suffix, "bf16" | "f16")
        && FLASH_HEAD_DIMS.contains(&head_dim)
        && (1..=DECODE_ATTENTION_MAX_GROUP).contains(&group))
    .then(|| format!("decode_attention_{suffix}_d{head_dim}"))
}

/// Most rows (tokens) `decode_gemm.cu` takes: wgmma's widest N used there.
pub const DECODE_GEMM_MAX_ROWS: usize = 64;
/// k per unit of `decode_gemm.cu` (DG_BK): the box width of both tensor maps, one 128-byte
/// swizzled row of 2-byte elements.
pub const DECODE_GEMM_TILE_K: usize = 64;
/// Token counts (x tensor map box rows, wgmma N) `decode_gemm.cu` is instantiated for.
pub const DECODE_GEMM_TOKENS: [usize; 4] = [8, 16, 32, 64];
/// Shared memory a block may have on sm_90 (227 KB), and what `decode_gemm.cu` keeps aside of
/// it: 1 KB to align its stages to 1024 bytes.
const SM90_BLOCK_SHARED: usize = 227 * 1024;
const DG_ALIGN_SLACK: usize = 1024;
/// Dynamic shared memory `decode_gemm.cu` may ask for: a block's all, less 1 KB for its static
/// barriers.
const DG_MAX_DYNAMIC_SHARED: usize = SM90_BLOCK_SHARED - 1024;
/// Most stages `decode_gemm.cu` has barriers for.
const DG_MAX_STAGES: usize = 16;

/// How one decode GEMM launches (see [`decode_gemm_plan`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeGemmPlan {
    /// `decode_gemm_{bf16,f16}_t{tokens}_m{tile_n / 64}`, `_s2` with split tiles (clusters of 2).
    pub kernel: String,
    /// Blocks (a 1D grid): each streams an equal share of the weight.
    pub blocks: u32,
    /// Threads per block (one warpgroup).
    pub threads: u32,
    /// Dynamic shared memory per block.
    pub shared_bytes: u32,
    /// Pipeline stages per block.
    pub stages: usize,
    /// 64-k blocks per stage (a unit of work).
    pub k_blocks: usize,
    /// Weight tiles are marked evict-first in L2.
    pub evict_first: bool,
    /// Weight rows per tile (64 or 128): the weight tensor map's box rows.
    pub tile_n: usize,
    /// Token columns per tile: the x tensor map's box rows.
    pub tokens: usize,
    /// Output tiles: the counters the kernel needs (zero before the first call; each call leaves
    /// them zero).
    pub tiles: usize,
    /// f32 partials the kernel needs in its workspace.
    pub workspace: usize,
}

/// Launch choices of a decode GEMM (see [`decode_gemm_plan`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeGemmTuning {
    /// Blocks on each SM (their stages share its shared memory).
    pub blocks_per_sm: usize,
    /// 64-k blocks per stage.
    pub k_blocks: usize,
    /// Weight tiles marked evict-first in L2.
    pub evict_first: bool,
    /// Weight rows per tile: 64 or 128.
    pub tile_n: usize,
    /// One block per tile over the whole k range (no partials) instead of equal shares.
    pub whole_tiles: bool,
    /// With whole tiles: blocks a tile's k range is cut over, the blocks of one thread-block
    /// cluster that add their sums in shared memory. 1, or 2 with 64-row tiles.
    pub split: usize,
    /// With whole tiles: tiles each block streams, one after the other (a divisor of the
    /// tiles), so that fewer blocks than tiles fill the GPU in one wave.
    pub tiles_per_block: usize,
}

impl Default for DecodeGemmTuning {
    fn default() -> Self {
        Self {
            blocks_per_sm: 1,
            k_blocks: 4,
            evict_first: true,
            tile_n: 128,
            whole_tiles: false,
            split: 1,
            tiles_per_block: 1,
        }
    }
}

/// The decode GEMM for `rows` x `k` times an `n` x `k` weight in element type `suffix` on a
/// Hopper GPU of `sms` multiprocessors, where the kernel takes the shape: bf16/f16, 1 to
/// [`DECODE_GEMM_MAX_ROWS`] rows, k a multiple of 8 (16-byte rows for the tensor maps).
pub fn decode_gemm_plan(
    suffix: &str,
    (rows, n, k): (usize, usize, usize),
    sms: usize,
    t: DecodeGemmTuning,
) -> Option<DecodeGemmPlan> {
    let tokens = *DECODE_GEMM_TOKENS.iter().find(|&&v| v >= rows)?;
    if !matches!(suffix, "bf16" | "f16")
        || rows == 0
        || n == 0
        || k == 0
        || !k.is_multiple_of(8)
        || t.blocks_per_sm == 0
        || t.k_blocks == 0
        || !matches!(t.tile_n, 64 | 128)
        || !matches!((t.split, t.whole_tiles, t.tile_n), (1, _, _) | (2, true, 64))
        || t.tiles_per_block == 0
        || (t.tiles_per_block > 1 && (t.split > 1 || !t.whole_tiles))
    {
        return None;
    }
    let stage = t.k_blocks * (t.tile_n + tokens) * DECODE_GEMM_TILE_K * 2;
    let stages = ((SM90_BLOCK_SHARED / t.blocks_per_sm).saturating_sub(DG_ALIGN_SLACK + 1024) / stage)
        .min(DG_MAX_STAGES);
    if stages < 2 {
        return None;
    }
    debug_assert!(stages * stage + DG_ALIGN_SLACK <= DG_MAX_DYNAMIC_SHARED);
    let tiles = n.div_ceil(t.tile_n);
    let units_per_tile = k.div_ceil(DECODE_GEMM_TILE_K).div_ceil(t.k_blocks);
    if units_per_tile < t.split {
        return None;
    }
    if !tiles.is_multiple_of(t.tiles_per_block) {
        return None;
    }
    let blocks = if t.whole_tiles {
        tiles / t.tiles_per_block * t.split
    } else {
        (sms * t.blocks_per_sm).min(tiles * units_per_tile)
    };
    let split = if t.split > 1 {
        format!("_s{}", t.split)
    } else {
        String::new()
    };
    Some(DecodeGemmPlan {
        kernel: format!("decode_gemm_{suffix}_t{tokens}_m{}{split}", t.tile_n / 64),
        blocks: blocks as u32,
        threads: 128,
        shared_bytes: (stages * stage + DG_ALIGN_SLACK) as u32,
        stages,
        k_blocks: t.k_blocks,
        evict_first: t.evict_first,
        tile_n: t.tile_n,
        tokens,
        tiles,
        // Whole tiles never leave a partial.
        workspace: if t.whole_tiles {
            0
        } else {
            blocks * 2 * t.tile_n * tokens
        },
    })
}

/// The decode GEMM a model step runs for this projection shape, or None where cuBLAS is faster:
/// whole tiles over the whole k range: 128-row tiles where they fill the GPU (several a block
/// where that runs them in one wave, [`one_wave_tiles_per_block`]), 64-row tiles where those
/// fill 70% of it, and up to [`DECODE_GEMM_SPLIT_MAX_ROWS`] rows 64-row tiles split
/// over clusters of 2 where those fill 70% of it in one wave. On the H100 (`bench_gpu --gemms`
/// with LORAPLANE_DG_SWEEP) equal shares of the units with partial tiles added by the last
/// block cost 4-12 us more per GEMM than whole tiles, and fewer tiles than that leave too few
/// SMs streaming (o and down of Llama-3.1-8B: 64 whole tiles of 64 rows took 20.6 and 61.6 us
/// at 64 rows against cuBLAS's 15.8 and 47.8; split over clusters, 17.5 and 43.9 us at one row
/// against 16.6 and 45.3).
pub fn decode_gemm_for_model(
    suffix: &str,
    (rows, n, k): (usize, usize, usize),
    sms: usize,
) -> Option<DecodeGemmPlan> {
    let whole = |tile_n| DecodeGemmTuning {
        tile_n,
        whole_tiles: true,
        ..Default::default()
    };
    let tiles64 = n.div_ceil(64);
    if n.div_ceil(128) >= sms {
        let t = DecodeGemmTuning {
            tiles_per_block: one_wave_tiles_per_block(n.div_ceil(128), sms),
            ..whole(128)
        };
        decode_gemm_plan(suffix, (rows, n, k), sms, t)
    } else if 10 * tiles64 >= 7 * sms {
        decode_gemm_plan(suffix, (rows, n, k), sms, whole(64))
    } else if rows <= DECODE_GEMM_SPLIT_MAX_ROWS && 10 * 2 * tiles64 >= 7 * sms && 2 * tiles64 <= sms {
        let split = DecodeGemmTuning {
            split: 2,
            ..whole(64)
        };
        decode_gemm_plan(suffix, (rows, n, k), sms, split)
    } else {
        None
    }
}

/// Whole tiles each block of a decode GEMM streams so that `tiles` of them run in one wave on
/// `sms` multiprocessors: the fewest that divides `tiles` and leaves a block per SM at most,
/// where those blocks still fill 70% of the SMs; else 1 (a block per tile).
///
/// Why: blocks are dispatched in launch order, so the side stream's LoRA kernels, launched with
/// a GEMM, start only once the GEMM's last block has, and a block per tile (Llama-3.1-8B's
/// gate/up: 224 tiles on 132 SMs) holds them back until its second wave, half the GEMM later.
/// In one wave a block's pipeline also runs on from its first tile to its second without a
/// ramp. On the H100 (twenty-eighth session, graph replays) 112 blocks of 2 tiles took batch 64
/// with one rank-16 adapter from 7.34 to 7.24 ms and batch 1 base from 5.85 to 5.77.
pub fn one_wave_tiles_per_block(tiles: usize, sms: usize) -> usize {
    (1..=tiles)
        .find(|&m| tiles.is_multiple_of(m) && tiles / m <= sms)
        .filter(|&m| 10 * (tiles / m) >= 7 * sms)
        .unwrap_or(1)
}

/// The gate/up decode GEMM with silu_mul in its epilogue (`decode_gemm_*_m2_silu`), for the
/// gate/up weight `[gate; up]` of `2 · inter` x `k`: writes `silu(gate) · up`, `[rows, inter]`.
/// Where [`decode_gemm_for_model`] takes gate/up in whole 128-row tiles, the same plan with the
/// fused kernel ([`decode_gemm_silu_plan`]).
pub fn decode_gemm_silu_for_model(
    suffix: &str,
    (rows, inter, k): (usize, usize, usize),
    sms: usize,
) -> Option<DecodeGemmPlan> {
    decode_gemm_silu_plan(decode_gemm_for_model(suffix, (rows, 2 * inter, k), sms)?)
}

/// A gate/up plan of whole 128-row tiles (`p.tiles` of them over `2 · inter` rows) as the
/// fused kernel: tile t takes gate rows 64t.. and up rows inter + 64t.., so its weight map needs
/// boxes of 64 rows (gate rows past `inter` in the last tile are read but never stored). None
/// for other plans.
pub fn decode_gemm_silu_plan(p: DecodeGemmPlan) -> Option<DecodeGemmPlan> {
    (p.tile_n == 128 && p.workspace == 0).then(|| DecodeGemmPlan {
        kernel: format!("{}_silu", p.kernel),
        ..p
    })
}

/// Most rows the LM head's decode GEMM takes ([`decode_gemm_logits_for_model`]).
pub const DECODE_GEMM_LOGITS_MAX_ROWS: usize = 32;

/// The LM head's decode GEMM (`decode_gemm_*_of32`: f32 logits from a bf16/f16 weight and x) for
/// `rows` x `k` times the `vocab` x `k` head, where [`decode_gemm_for_model`] takes that shape in
/// whole tiles, up to [`DECODE_GEMM_LOGITS_MAX_ROWS`] rows. On the H100 (`bench_gpu --gemms`,
/// twenty-seventh session) Llama-3.1-8B's head took 349, 357 and 367 us at 1, 8 and 32 rows in
/// 128-row tiles against cuBLAS's 373, 377 and 390; at 64 rows 388 against 396, but whole
/// batch-64 base steps replayed 0.03 ms slower with it, so cuBLAS keeps those.
pub fn decode_gemm_logits_for_model(
    suffix: &str,
    (rows, vocab, k): (usize, usize, usize),
    sms: usize,
) -> Option<DecodeGemmPlan> {
    if rows > DECODE_GEMM_LOGITS_MAX_ROWS {
        return None;
    }
    let p = decode_gemm_for_model(suffix, (rows, vocab, k), sms)?;
    (p.workspace == 0 && !p.kernel.ends_with("_s2")).then(|| DecodeGemmPlan {
        kernel: format!("{}_of32", p.kernel),
        ..p
    })
}

/// Most rows that [`decode_gemm_for_model`] runs in split tiles (the 8- and 16-token tiles).
/// Against cuBLAS in whole decode steps on the H100 (`run.sh ab`, fifteenth session), o and
/// down in split tiles saved 0.13-0.29 ms a step at batches 1, 8 and 16, except beside 8
/// rank-64 adapters (0.03-0.08 ms slower); at batch 32 they cost up to 0.3 ms beside rank-64
/// adapters (the 128 blocks leave the side stream's LoRA kernels 4 SMs), and at batch 64
/// 0.1-0.3 ms.
pub const DECODE_GEMM_SPLIT_MAX_ROWS: usize = 16;

/// Every decode GEMM kernel (sm_90a only: elsewhere their bodies are empty).
fn decode_gemm_kernels() -> impl Iterator<Item = String> {
    ["bf16", "f16"]
        .into_iter()
        .flat_map(|t| DECODE_GEMM_TOKENS.iter().map(move |n| (t, n)))
        .flat_map(|(t, &n)| {
            let logits: &[&str] = if n <= DECODE_GEMM_LOGITS_MAX_ROWS {
                &["m1_of32", "m2_of32"]
            } else {
                &[]
            };
            ["m1", "m2", "m1_s2", "m2_silu"]
                .iter()
                .chain(logits)
                .map(move |m| format!("decode_gemm_{t}_t{n}_{m}"))
                .collect::<Vec<_>>()
        })
}

/// Every kernel name `llama.cu` exports, without the type suffix.
pub const TYPED_KERNELS: &[&str] = &[
    "embed",
    "rms_norm",
    "rope_cache",
    "silu_mul",
    "add_bias",
    "fill_uniform",
    "gather_kv",
    "causal_softmax",
];

/// Kernels that exist in one version only.
pub const UNTYPED_KERNELS: &[&str] = &["argmax_f32", "rope_table_f32", "lora_prefetch_l2"];

/// The kernels `sampling.cu` exports (f32 logits only).
pub const SAMPLING_KERNELS: &[&str] = &[
    "sample_f32",
    "penalize_f32",
    "gather_rows_f32",
    "top_logprobs_f32",
];

/// Kernel families with compile-time shape variants: `{name}_{type}_{variant}`.
pub const VARIANT_KERNELS: &[(&str, &[&str])] = &[
    (
        "attention",
        &[
            "g1_d1", "g1_d2", "g1_d4", "g1_d8", "g2_d1", "g2_d2", "g2_d4", "g2_d8", "g4_d1", "g4_d2",
            "g4_d4", "g4_d8", "g8_d1", "g8_d2", "g8_d4", "g8_d8",
        ],
    ),
    ("lora_expand", &["c1", "vec"]),
    ("lora_expand_store", &["c1", "vec"]),
    ("lora_shrink", &["kw1", "kw4"]),
];

/// Every exported kernel name, with its suffixes: what [`Kernels::load`] loads.
pub fn kernel_names() -> Vec<String> {
    let variants = VARIANT_KERNELS.iter().flat_map(|(k, vs)| {
        vs.iter()
            .flat_map(move |v| TYPE_SUFFIXES.iter().map(move |t| format!("{k}_{t}_{v}")))
    });
    TYPED_KERNELS
        .iter()
        .flat_map(|k| TYPE_SUFFIXES.iter().map(move |t| format!("{k}_{t}")))
        .chain(UNTYPED_KERNELS.iter().map(|s| s.to_string()))
        .chain(SAMPLING_KERNELS.iter().map(|s| s.to_string()))
        .chain(variants)
        .chain(["bf16", "f16"].iter().flat_map(|t| {
            FLASH_HEAD_DIMS
                .iter()
                .filter_map(move |&d| flash_attention_kernel(t, d))
        }))
        .chain(["bf16", "f16"].iter().flat_map(|t| {
            FLASH_HEAD_DIMS
                .iter()
                .filter_map(move |&d| decode_attention_kernel(t, d, 1))
        }))
        .chain(["bf16", "f16"].iter().flat_map(|t| {
            ["lora_shrink", "lora_expand", "lora_expand_store"].map(|k| format!("{k}_mma_{t}"))
        }))
        .chain(decode_gemm_kernels())
        .collect()
}

/// The loaded module and its functions.
pub struct Kernels {
    _module: Arc<CudaModule>,
    funcs: HashMap<String, CudaFunction>,
    arch: &'static str,
    /// The functions' driver handles, to recognise them in a captured graph.
    handles: HashSet<usize>,
    /// The decode GEMM kernels' handles among them.
    decode_gemm_handles: HashSet<usize>,
}

impl Kernels {
    /// Compiles (or reads cached PTX) for the device of `ctx` and loads every kernel.
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Self, String> {
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| format!("reading the compute capability: {e}"))?;
        // sm_90a unlocks Hopper-only instructions; other chips get their plain target.
        let arch: &'static str = match (major, minor) {
            (9, 0) => "sm_90a",
            (8, 0) => "sm_80",
            (8, 6) => "sm_86",
            (8, 9) => "sm_89",
            (10, 0) => "sm_100",
            (12, 0) => "sm_120",
            _ => {
                return Err(format!(
                    "compute capability {major}.{minor} is not supported (needs 8.0 or newer)"
                ))
            }
        };
        let ptx = cached_ptx(arch)?;
        let module = ctx
            .load_module(ptx)
            .map_err(|e| format!("loading the kernel module: {e}"))?;
        let mut funcs = HashMap::new();
        for name in kernel_names() {
            let f = module
                .load_function(&name)
                .map_err(|e| format!("kernel {name}: {e}"))?;
            funcs.insert(name, f);
        }
        // The decode GEMMs' stages take more than the default 48 KB of shared memory.
        if arch == "sm_90a" {
            for name in decode_gemm_kernels() {
                funcs[&name]
                    .set_attribute(
                        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        DG_MAX_DYNAMIC_SHARED as i32,
                    )
                    .map_err(|e| format!("kernel {name}: allowing {DG_MAX_DYNAMIC_SHARED} bytes of shared memory: {e}"))?;
            }
        }
        let handles = funcs.values().map(|f| f.cu_function() as usize).collect();
        let decode_gemm_handles = decode_gemm_kernels()
            .map(|name| funcs[&name].cu_function() as usize)
            .collect();
        Ok(Self {
            _module: module,
            funcs,
            arch,
            handles,
            decode_gemm_handles,
        })
    }

    /// Whether kernels may launch programmatically here (`griddepcontrol`, sm_90 and newer):
    /// below that the kernels are compiled without their waits, so a programmatic edge into one
    /// would not order it after its predecessor.
    pub fn has_programmatic_launch(&self) -> bool {
        matches!(self.arch, "sm_90a" | "sm_100" | "sm_120")
    }

    /// Whether the decode GEMMs (`decode_gemm.cu`, TMA and wgmma) run here: Hopper (sm_90a) only.
    pub fn has_decode_gemm(&self) -> bool {
        self.arch == "sm_90a"
    }

    /// `name`'s resident blocks per SM at `threads` threads and `shared` bytes of dynamic shared
    /// memory (0 where the driver cannot say).
    pub fn blocks_per_sm(&self, name: &str, threads: u32, shared: usize) -> u32 {
        self.get(name)
            .occupancy_max_active_blocks_per_multiprocessor(threads, shared, None)
            .unwrap_or(0)
    }

    /// `name`'s registers and local (spill) bytes per thread (-1 where the driver cannot say).
    pub fn registers(&self, name: &str) -> (i32, i32) {
        use cudarc::driver::sys::CUfunction_attribute as A;
        let f = self.get(name);
        let get = |a| f.get_attribute(a).unwrap_or(-1);
        (
            get(A::CU_FUNC_ATTRIBUTE_NUM_REGS),
            get(A::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES),
        )
    }

    /// Whether `f` is one of these kernels (all open with `pdl_entry()`), as opposed to a
    /// library's (cuBLAS) kernel.
    pub fn owns(&self, f: cudarc::driver::sys::CUfunction) -> bool {
        self.handles.contains(&(f as usize))
    }

    /// Whether `f` is one of the decode GEMM kernels (`decode_gemm.cu`).
    pub fn is_decode_gemm(&self, f: cudarc::driver::sys::CUfunction) -> bool {
        self.decode_gemm_handles.contains(&(f as usize))
    }

    /// The function `name` (with its type suffix); panics on a name the sources do not export,
    /// which is a programming error caught by the first GPU test.
    pub fn get(&self, name: &str) -> &CudaFunction {
        self.funcs
            .get(name)
            .unwrap_or_else(|| panic!("no kernel named {name}"))
    }
}

fn cuda_include_dir() -> String {
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(p) = std::env::var(var) {
            return format!("{p}/include");
        }
    }
    "/usr/local/cuda/include".to_string()
}

/// PTX for `arch`, from `$XDG_CACHE_HOME/loraplane` (or `~/.cache`) when a previous process
/// compiled the same source, else compiled now (about a second) and written there.
fn cached_ptx(arch: &'static str) -> Result<Ptx, String> {
    let src = source();
    // For experiments without a rebuild (`scripts/gpu/run.sh variants`): extra NVRTC options,
    // such as -DLMMA_SHRINK_MIN=3 for a tunable a source guards with #ifndef.
    let extra: Vec<String> = std::env::var("LORAPLANE_NVRTC_OPTIONS")
        .map(|v| v.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (&src, arch, &extra).hash(&mut h);
    let key = format!("llama-{arch}-{:016x}.ptx", h.finish());
    let dir = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("loraplane"));
    if let Some(path) = dir.as_ref().map(|d| d.join(&key)) {
        if let Ok(src) = std::fs::read_to_string(&path) {
            return Ok(Ptx::from_src(src));
        }
    }
    let opts = CompileOptions {
        arch: Some(arch),
        include_paths: vec![cuda_include_dir()],
        options: std::iter::once("--std=c++17".to_string()).chain(extra).collect(),
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(&src, opts).map_err(|e| format!("NVRTC compile failed: {e}"))?;
    if let Some(d) = dir {
        // Best effort: a read-only home only costs a recompile next time.
        if std::fs::create_dir_all(&d).is_ok() {
            let _ = std::fs::write(d.join(&key), ptx.to_src());
        }
    }
    Ok(ptx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain (non-macro) kernels each source defines, so one missing from the lists above
    /// fails here rather than as a panic on the first GPU launch.
    #[test]
    fn every_plain_kernel_in_the_sources_is_loaded() {
        let names = kernel_names();
        let src = source();
        let mut seen = 0;
        for def in src.split("extern \"C\" __global__").skip(1) {
            let mut rest = def.trim_start().strip_prefix("void").unwrap_or(def).trim_start();
            // Attribute macros; the name may follow on the macro's next line.
            for attribute in ["DG_CLUSTER2", "LMMA_EXPAND_BOUNDS"] {
                rest = rest
                    .strip_prefix(attribute)
                    .unwrap_or(rest)
                    .trim_start_matches(|c: char| c.is_whitespace() || c == '\\');
            }
            if let Some(after) = rest.strip_prefix("__launch_bounds__(") {
                // The name may follow on the macro's next line.
                rest = after
                    .split_once(')')
                    .map_or(after, |(_, r)| r)
                    .trim_start_matches(|c: char| c.is_whitespace() || c == '\\');
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '#')
                .collect();
            if name.contains('#') {
                continue; // a macro's template, checked through its instantiations
            }
            assert!(names.contains(&name), "{name} is defined but not loaded");
            seen += 1;
        }
        assert!(seen >= 6, "found only {seen} plain kernels");
    }

    /// Decode graphs make the edges into these kernels programmatic (`griddepcontrol`): a kernel
    /// that touched memory before waiting could read its predecessor's output before it is
    /// written, or overwrite what the predecessor still reads. Each opens with `pdl_entry()`, or
    /// with `pdl_trigger()` and calls a function that has a `pdl_wait()`.
    #[test]
    fn every_kernel_waits_for_its_predecessors() {
        let src = source();
        let defs: Vec<&str> = src.split("extern \"C\" __global__").skip(1).collect();
        assert!(defs.len() >= 20, "found only {} kernels", defs.len());
        for def in defs {
            let (head, body) = def.split_once('{').expect("a kernel has a body");
            let name = head.split('(').next().unwrap_or(head).trim();
            let first = body.trim_start_matches(|c: char| c.is_whitespace() || c == '\\');
            if first.starts_with("pdl_entry();") {
                continue;
            }
            // Else a call (after an early trigger, or not) to a function that waits before it
            // touches what the step's kernels write.
            let rest = first.strip_prefix("pdl_trigger();").unwrap_or(first);
            let callee: String = rest
                .trim_start_matches(|c: char| c.is_whitespace() || c == '\\')
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let callee_body = src
                .split_once(&format!("void {callee}("))
                .and_then(|(_, f)| f.split_once("\n}\n"))
                .unwrap_or_else(|| {
                    panic!(
                        "kernel `{name}` opens with neither pdl_entry() nor a call to a function that waits"
                    )
                })
                .0;
            assert!(
                callee_body.contains("pdl_wait();") || callee_body.contains("pdl_entry();"),
                "kernel `{name}`: `{callee}` never waits"
            );
        }
    }

    #[test]
    fn flash_kernels_exist_only_for_half_types_and_tensor_core_head_sizes() {
        assert_eq!(
            flash_attention_kernel("bf16", 128).as_deref(),
            Some("flash_attention_bf16_d128")
        );
        assert_eq!(
            flash_attention_kernel("f16", 64).as_deref(),
            Some("flash_attention_f16_d64")
        );
        // f32 and head sizes the kernel is not built for fall back to GEMM attention.
        assert_eq!(flash_attention_kernel("f32", 128), None);
        assert_eq!(flash_attention_kernel("bf16", 96), None);
        assert_eq!(flash_attention_kernel("bf16", 256), None);
        // Kernels::load asks for every instantiated variant, and the source defines each one.
        let names = kernel_names();
        let src = source();
        for t in ["bf16", "f16"] {
            for &d in FLASH_HEAD_DIMS {
                let name = format!("flash_attention_{t}_d{d}");
                assert!(names.contains(&name), "{name} not loaded");
                assert!(
                    src.contains(&format!(
                        "INSTANTIATE_FLASH(__{}, {t}, {d})",
                        if t == "bf16" { "nv_bfloat16" } else { "half" }
                    )),
                    "{name} not instantiated"
                );
            }
        }
    }

    #[test]
    fn decode_attention_kernels_cover_groups_up_to_eight() {
        // Llama-3.1-8B (4 heads per kv head, d 128) and SmolLM2 (3, d 64).
        assert_eq!(
            decode_attention_kernel("bf16", 128, 4).as_deref(),
            Some("decode_attention_bf16_d128")
        );
        assert_eq!(
            decode_attention_kernel("f16", 64, 3).as_deref(),
            Some("decode_attention_f16_d64")
        );
        // Past 8 heads per kv head, f32, and other head sizes keep the CUDA-core kernel.
        assert_eq!(decode_attention_kernel("bf16", 128, 9), None);
        assert_eq!(decode_attention_kernel("bf16", 128, 0), None);
        assert_eq!(decode_attention_kernel("f32", 128, 4), None);
        assert_eq!(decode_attention_kernel("f16", 96, 4), None);
        let names = kernel_names();
        let src = source();
        for t in ["bf16", "f16"] {
            for &d in FLASH_HEAD_DIMS {
                let name = format!("decode_attention_{t}_d{d}");
                assert!(names.contains(&name), "{name} not loaded");
                assert!(
                    src.contains(&format!(
                        "INSTANTIATE_DECODE_ATTN(__{}, {t}, {d})",
                        if t == "bf16" { "nv_bfloat16" } else { "half" }
                    )),
                    "{name} not instantiated"
                );
            }
        }
    }

    #[test]
    fn decode_gemm_plans_fill_the_gpu_with_equal_shares() {
        let one = DecodeGemmTuning {
            k_blocks: 1,
            ..Default::default()
        };
        // o projection at batch 64 on 132 SMs, one block an SM: 24 KB stages, 9 of them.
        let p = decode_gemm_plan("bf16", (64, 4096, 4096), 132, one).unwrap();
        assert_eq!(p.kernel, "decode_gemm_bf16_t64_m2");
        assert_eq!((p.blocks, p.stages, p.tiles, p.tokens), (132, 9, 32, 64));
        assert_eq!(p.shared_bytes as usize, 9 * 192 * 128 + 1024);
        assert_eq!(p.workspace, 132 * 2 * 128 * 64);
        // Four k-blocks a stage: 96 KB stages, 2 of them.
        let p = decode_gemm_plan("bf16", (64, 4096, 4096), 132, Default::default()).unwrap();
        assert_eq!((p.stages, p.k_blocks), (2, 4));
        // One row, two blocks an SM: 17 KB stages.
        let two = DecodeGemmTuning {
            blocks_per_sm: 2,
            ..one
        };
        let p = decode_gemm_plan("f16", (1, 28672, 4096), 132, two).unwrap();
        assert_eq!(
            (p.kernel.as_str(), p.blocks, p.stages),
            ("decode_gemm_f16_t8_m2", 264, 6)
        );
        // Fewer units than blocks: one unit each.
        let p = decode_gemm_plan("bf16", (9, 64, 512), 132, one).unwrap();
        assert_eq!(
            (p.kernel.as_str(), p.blocks, p.tiles),
            ("decode_gemm_bf16_t16_m2", 8, 1)
        );
        // Whole tiles of 64 rows: one block a tile.
        let whole = DecodeGemmTuning {
            tile_n: 64,
            whole_tiles: true,
            ..one
        };
        let p = decode_gemm_plan("bf16", (9, 6144, 4096), 132, whole).unwrap();
        assert_eq!(
            (p.kernel.as_str(), p.blocks, p.tiles, p.tile_n),
            ("decode_gemm_bf16_t16_m1", 96, 96, 64)
        );
        assert_eq!(p.workspace, 0);
        // Split tiles: two blocks (a cluster) a tile, no workspace.
        let split = DecodeGemmTuning { split: 2, ..whole };
        let p = decode_gemm_plan("bf16", (64, 4096, 14336), 132, split).unwrap();
        assert_eq!(
            (p.kernel.as_str(), p.blocks, p.tiles, p.workspace),
            ("decode_gemm_bf16_t64_m1_s2", 128, 64, 0)
        );
        // Every plan's kernel is loaded.
        let names = kernel_names();
        for rows in 1..=DECODE_GEMM_MAX_ROWS {
            for t in [one, two, whole, split, Default::default()] {
                let p = decode_gemm_plan("bf16", (rows, 4096, 4096), 132, t).unwrap();
                assert!(names.contains(&p.kernel), "{} not loaded", p.kernel);
                assert!(p.tokens >= rows && p.stages >= 2 && p.stages <= DG_MAX_STAGES);
            }
        }
    }

    #[test]
    fn decode_gemm_refuses_shapes_it_does_not_take() {
        let plan = |suffix, shape| decode_gemm_plan(suffix, shape, 132, Default::default());
        assert_eq!(plan("f32", (8, 4096, 4096)), None);
        assert_eq!(plan("bf16", (65, 4096, 4096)), None);
        assert_eq!(plan("bf16", (0, 4096, 4096)), None);
        assert_eq!(plan("bf16", (8, 4096, 4100)), None); // rows of 8200 bytes: not 16-byte multiples
        assert!(plan("bf16", (8, 960, 576)).is_some()); // n and k need not fill a tile
        let t = |blocks_per_sm, tile_n| DecodeGemmTuning {
            blocks_per_sm,
            tile_n,
            ..Default::default()
        };
        assert_eq!(decode_gemm_plan("bf16", (8, 4096, 4096), 132, t(0, 128)), None);
        assert_eq!(decode_gemm_plan("bf16", (8, 4096, 4096), 132, t(1, 96)), None);
        // Split tiles: 64-row whole tiles only, and at least a unit of k for each block.
        let split = |tile_n, whole_tiles, split| DecodeGemmTuning {
            tile_n,
            whole_tiles,
            split,
            ..Default::default()
        };
        assert!(decode_gemm_plan("bf16", (8, 4096, 4096), 132, split(64, true, 2)).is_some());
        assert_eq!(
            decode_gemm_plan("bf16", (8, 4096, 4096), 132, split(128, true, 2)),
            None
        );
        assert_eq!(
            decode_gemm_plan("bf16", (8, 4096, 4096), 132, split(64, false, 2)),
            None
        );
        assert_eq!(
            decode_gemm_plan("bf16", (8, 4096, 4096), 132, split(64, true, 3)),
            None
        );
        assert_eq!(
            decode_gemm_plan("bf16", (8, 4096, 256), 132, split(64, true, 2)),
            None
        );
    }

    /// Llama-3.1-8B on an H100 (132 SMs): gate/up in 128-row tiles, q/k/v in 64-row tiles, o
    /// and down up to 16 rows in 64-row tiles split over clusters of 2.
    #[test]
    fn gate_up_with_silu_takes_the_whole_tile_plans_only() {
        let p = decode_gemm_silu_for_model("bf16", (64, 14336, 4096), 132).expect("8B gate/up");
        assert_eq!(
            (p.kernel.as_str(), p.blocks, p.tiles),
            ("decode_gemm_bf16_t64_m2_silu", 112, 224)
        );
        assert_eq!(
            decode_gemm_silu_for_model("bf16", (1, 14336, 4096), 132)
                .unwrap()
                .kernel,
            "decode_gemm_bf16_t8_m2_silu"
        );
        // SmolLM2's 1536 takes no decode GEMM; equal shares (partials) never take the fused kernel.
        assert_eq!(decode_gemm_silu_for_model("bf16", (8, 1536, 576), 132), None);
        let shares = decode_gemm_plan("bf16", (8, 28672, 4096), 132, DecodeGemmTuning::default()).unwrap();
        assert_eq!(decode_gemm_silu_plan(shares), None);
    }

    #[test]
    fn whole_tiles_run_in_one_wave_where_a_divisor_fills_the_gpu() {
        assert_eq!(one_wave_tiles_per_block(224, 132), 2);
        assert_eq!(one_wave_tiles_per_block(96, 132), 1);
        assert_eq!(one_wave_tiles_per_block(132, 132), 1);
        // 133 = 7 x 19 and 1002 = 2 x 3 x 167 have no divisor that leaves 93-132 blocks.
        assert_eq!(one_wave_tiles_per_block(133, 132), 1);
        assert_eq!(one_wave_tiles_per_block(1002, 132), 1);
        assert_eq!(one_wave_tiles_per_block(396, 132), 3);
        // A plan of several tiles a block has no partials, and its blocks cover every tile.
        let p = decode_gemm_for_model("bf16", (8, 28672, 4096), 132).unwrap();
        assert_eq!((p.blocks, p.tiles, p.workspace), (112, 224, 0));
        let t = DecodeGemmTuning {
            whole_tiles: true,
            tiles_per_block: 3,
            ..Default::default()
        };
        assert_eq!(decode_gemm_plan("bf16", (8, 28672, 4096), 132, t), None);
        let shares = DecodeGemmTuning {
            tiles_per_block: 2,
            ..Default::default()
        };
        assert_eq!(decode_gemm_plan("bf16", (8, 28672, 4096), 132, shares), None);
    }

    #[test]
    fn decode_gemm_for_model_on_the_8b_shapes() {
        let kernel =
            |rows, n, k| decode_gemm_for_model("bf16", (rows, n, k), 132).map(|p| (p.kernel, p.blocks));
        // gate/up's 224 tiles: 2 a block, so that all run in one wave on 132 SMs.
        assert_eq!(
            kernel(64, 28672, 4096),
            Some(("decode_gemm_bf16_t64_m2".into(), 112))
        );
        assert_eq!(
            kernel(64, 6144, 4096),
            Some(("decode_gemm_bf16_t64_m1".into(), 96))
        );
        assert_eq!(
            kernel(8, 4096, 4096),
            Some(("decode_gemm_bf16_t8_m1_s2".into(), 128))
        );
        assert_eq!(
            kernel(1, 4096, 14336),
            Some(("decode_gemm_bf16_t8_m1_s2".into(), 128))
        );
        // Split tiles up to 16 rows only; too narrow for a cluster pair per tile to fill 70% of
        // the SMs.
        assert_eq!(
            kernel(16, 4096, 4096).map(|k| k.0),
            Some("decode_gemm_bf16_t16_m1_s2".into())
        );
        assert_eq!(kernel(17, 4096, 4096), None);
        assert_eq!(kernel(8, 2048, 4096), None);
    }

    #[test]
    fn the_lm_head_takes_whole_tile_plans_with_f32_output() {
        let head = |rows, vocab, k| {
            decode_gemm_logits_for_model("bf16", (rows, vocab, k), 132).map(|p| (p.kernel, p.blocks))
        };
        // Llama-3.1-8B's 128256 x 4096 head in 1002 tiles of 128 rows; SmolLM2's 49152 x 576 too.
        assert_eq!(
            head(32, 128256, 4096),
            Some(("decode_gemm_bf16_t32_m2_of32".into(), 1002))
        );
        // SmolLM2's 384 tiles run 3 a block, in one wave.
        assert_eq!(
            head(3, 49152, 576),
            Some(("decode_gemm_bf16_t8_m2_of32".into(), 128))
        );
        assert_eq!(
            head(1, 16384, 4096),
            Some(("decode_gemm_bf16_t8_m1_of32".into(), 256))
        );
        // Split tiles stay with the projections; past 32 rows, cuBLAS.
        assert_eq!(head(8, 4096, 4096), None);
        assert_eq!(head(33, 128256, 4096), None);
        let kernels: Vec<String> = decode_gemm_kernels().collect();
        assert!(kernels.iter().any(|k| k == "decode_gemm_f16_t32_m1_of32"));
        assert!(!kernels
            .iter()
            .any(|k| k.starts_with("decode_gemm_bf16_t64") && k.ends_with("of32")));
    }
}
