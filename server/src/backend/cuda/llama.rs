//! The Llama-family decoder on the GPU: the same mixed prefill/decode batch as the CPU model
//! (`model::llama`), with bf16 or f32 weights in device memory, cuBLAS GEMMs, a paged KV cache
//! in device memory indexed by the engine's block tables, and LoRA applied per fused group of
//! targets by shrink/expand kernels over work items drawn from the device slot pool.
//!
//! Decode-only steps up to `cuda_graph_max_bs` sequences are padded to a bucket size and
//! replayed from a CUDA graph captured on first use; LoRA metadata lives in device buffers read
//! by the kernels, so a replay applies whatever adapters the step's rows use.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use cudarc::driver::{sys as drv, CudaEvent, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice};
use loraplane_kernels::{
    decode_gemm_for_model, decode_gemm_logits_for_model, decode_gemm_silu_for_model, DECODE_GEMM_MAX_ROWS,
    DECODE_GEMM_SPLIT_MAX_ROWS, DECODE_GEMM_TOKENS,
};

use super::graph::DecodeGraph;
use super::lora::{group_dims, LoraSlots, GROUPS};
use super::sampling::{check_sampling, split_outputs, SamplePipe};
use super::{cuda_err, launch, Gpu, GpuFloat};
use crate::adapter::{LoraAdapter, LoraTarget};
use crate::engine::KvCache;
use crate::error::{Error, Result};
use crate::model::llama::{check_seq_input, rope_inv_freq, LogitsWanted, SeqInput};
use crate::model::{check_launchable, DeviceSample, LlamaModel, ModelConfig, SeqOutput};

/// How LoRA rows are cut into kernel work items.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraKernelMode {
    /// One item per sequence (`--lora-backend triton`).
    PerSequence,
    /// Rows sorted by adapter; each adapter's prefill rows cut into chunks of this many rows,
    /// its decode rows one per item below batch 128 and four per item from there
    /// (`--lora-backend csgmv`, `--max-lora-chunk-size`).
    Chunked(usize),
}

/// The element type of a device model's weights and activations (accumulation is in f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceDtype {
    /// f32: checks against references.
    Float32,
    /// bf16: the serving default.
    Bfloat16,
    /// f16: for models trained in half precision.
    Float16,
}

impl DeviceDtype {
    /// The name `--dtype` and `/get_server_info` use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Float32 => "float32",
            Self::Bfloat16 => "bfloat16",
            Self::Float16 => "float16",
        }
    }
}

/// Sizes and switches for a device model.
#[derive(Clone, Debug)]
pub struct CudaOptions {
    /// Element type of weights and activations.
    pub dtype: DeviceDtype,
    /// LoRA slots (`--max-loras-per-batch`); 0 disables LoRA.
    pub lora_slots: usize,
    /// Rank every slot holds (`--max-lora-rank`).
    pub lora_rank: usize,
    /// Work-item scheme of the LoRA kernels.
    pub lora_mode: LoraKernelMode,
    /// Largest decode batch replayed from a CUDA graph; 0 disables graphs.
    pub cuda_graph_max_bs: usize,
    /// KV cache capacity in tokens; with [`Self::kv_memory_fraction`], the most it may hold.
    pub max_tokens: usize,
    /// Size the KV cache, allocated after everything else the model holds, so that the
    /// GPU's memory in use reaches this share of its total (SGLang's `--mem-fraction-static`),
    /// up to `max_tokens`. None: exactly `max_tokens`.
    pub kv_memory_fraction: Option<f64>,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Rows (new tokens) one forward pass may carry.
    pub max_rows: usize,
    /// Longest sequence (prompt + output, `--context-length`): sizes each block table.
    pub max_seq_len: usize,
    /// Prefill chunks of at least this many tokens attend through the prefill path (the flash
    /// kernel, or batched GEMMs) instead of the per-row paged kernel; 0 never.
    pub prefill_attention_min_rows: usize,
    /// The prefill path is the flash kernel (`flash_attention.cu`) where one is built for the
    /// element type and head size (bf16/f16, head dim 16/32/64/128); otherwise, or when false,
    /// batched cuBLAS GEMMs (scores, causal softmax, values).
    pub flash_prefill: bool,
    /// Steps of up to [`LORA_DELTA_ROWS`] rows whose LoRA runs in the shrink/expand kernels
    /// (decode batches, short segments) compute each group's delta on the side stream, beside
    /// the base GEMM that reads the same input, into a delta buffer that the group's next kernel
    /// (RoPE, SiLU-and-multiply, RMSNorm) adds. The LoRA kernels are latency-bound and the GEMM
    /// leaves room on the SMs; otherwise they run after the GEMM and add into its output.
    pub lora_side_stream: bool,
    /// Decode attention splits each row's keys over several blocks when there are few (row,
    /// kv head) pairs ([`attention_splits`]), so that long contexts at small batches use the
    /// whole GPU.
    pub attention_split_keys: bool,
    /// bf16/f16 LoRA shrink and expand run on tensor cores (`lora_mma.cu`) for the groups whose
    /// shapes they take (`lora_mma_takes`); false keeps the CUDA-core kernels everywhere.
    pub lora_tensor_cores: bool,
    /// bf16/f16 decode attention runs on tensor cores (`decode_attention.cu`) in steps of at
    /// least this many (row, kv head) pairs, where a kernel is built for the head size and group
    /// (head dim 16/32/64/128, at most 8 query heads per kv head); otherwise, or with None, the
    /// CUDA-core kernel (`attention` in `llama.cu`). Default:
    /// [`DECODE_ATTENTION_TENSOR_CORES_MIN_PAIRS`].
    pub decode_attention_tensor_cores: Option<usize>,
    /// bf16/f16 graph-replayed steps of at most [`DECODE_GEMM_MAX_ROWS`] rows, with
    /// [`Self::programmatic_launch`], run the projection GEMMs whose shapes
    /// `decode_gemm_for_model` takes in `decode_gemm.cu` (TMA and wgmma, Hopper only) instead
    /// of cuBLAS.
    pub decode_gemms: bool,
    /// Decode graphs launch each of loraplane's kernels while the kernel before it drains
    /// (programmatic dependent launch, see [`super::graph`]); ignored before sm_90, where the
    /// kernels have no waits.
    pub programmatic_launch: bool,
}

/// Default for [`CudaOptions::decode_attention_tensor_cores`]. The tensor-core kernel has 4
/// warps a block and walks its keys a 64-key tile (one round trip) at a time; the CUDA-core
/// kernel runs up to 16 warps a block. With few (row, kv head) pairs the GPU is mostly idle and
/// more warps in flight win: on the H100 (Llama-3.1-8B shape, csgmv + graphs) batch 1 took 7.11
/// ms on CUDA cores against 7.32-7.44 on tensor cores at 4,000-token contexts, while from batch 4
/// (32 pairs) tensor cores were as fast or faster (batch 4 at 4,000 tokens 8.08 -> 7.69-7.86 ms,
/// batch 8 9.43 -> 8.35-8.55, batch 64 at 128 tokens 7.88 -> 7.73-7.82).
pub const DECODE_ATTENTION_TENSOR_CORES_MIN_PAIRS: usize = 32;

/// The most bytes of o-group factors a decode step with adapters asks L2 for while decode
/// attention runs, so that o's LoRA chain reads them from L2 (`lora_prefetch_l2`). On the H100
/// (Llama-3.1-8B shape, graph replays, twenty-second session) adapter rows at batches 1 to 64
/// moved by -0.08 to +0.01 ms a step, most of them gaining 0.02-0.07; 8 rank-64 adapters (8.4
/// MB a layer) lost 0.17 ms and 64 rank-64 adapters (67 MB, more than L2 holds) 1.1 ms, so
/// larger sets are not fetched. The kernel counts every work item's rank, so an adapter whose
/// rows span several items counts several times.
pub const LORA_L2_PREFETCH_MAX_BYTES: usize = 4 << 20;

/// Steps of more rows do not fetch ahead ([`LORA_L2_PREFETCH_MAX_BYTES`]): at batch 256 the
/// extra side-stream branch made the adapter rows 0.4-0.6 ms slower (fetching or not), and at
/// batch 128 it gained nothing.
const LORA_L2_PREFETCH_MAX_ROWS: usize = 64;

/// Default for [`CudaOptions::prefill_attention_min_rows`].
pub const PREFILL_ATTENTION_MIN_ROWS: usize = 64;

/// A sequence's LoRA segment of at least this many rows (a prefill chunk) runs as cuBLAS GEMMs
/// (one shrink `x·Aᵀ` per group, then `s·(x·Aᵀ)·Bᵀ` per target) instead of the shrink/expand
/// kernels, which are built for many short segments.
pub const LORA_GEMM_MIN_ROWS: usize = 64;

/// Elements of the shrink input per block (SHRINK_SLICE in llama.cu): the shrink writes one
/// partial plane per slice and the expand sums them. 512 beat 1024 and 2048 on the H100 (batch 1
/// with one rank-16 adapter 8.14 -> 7.75 ms, batch 64 with 64 adapters 11.20 -> 11.01 ms): more
/// blocks keep more loads in flight. The price is more planes: 28 for a 14336-wide input.
const LORA_SHRINK_SLICE: usize = 512;

/// Batches of at least this many rows merge decode rows of one adapter into shared work items
/// of DECODE_MERGE_ROWS rows in the csgmv scheme, for the CUDA-core kernels; smaller batches
/// give each row its own item. On the H100 with LoRA beside the GEMMs, merging from batch 32
/// instead of 64 took batch 32 with one rank-16 adapter from 8.22 to 7.80 ms; merging from
/// batch 8 made batch 8 slower.
const DECODE_MERGE_MIN_BATCH: usize = 32;

/// The same threshold for the tensor-core kernels. From batch 8 instead of 32 (H100, sixteenth
/// session, `bench_gpu --step-parts`, same call, two rounds): batch 8 with one rank-64 adapter
/// 6.70 -> 6.49 ms a step, batch 16 with one 7.48 -> 6.75 and with 8 of them 8.14 -> 7.80; the
/// rank-16 rows within 0.07 ms.
const DECODE_MERGE_MIN_BATCH_MMA: usize = 8;

/// Rank rows each warp of the LoRA shrink loads at once (`lora_shrink_*_kw{1,4}`): 4 for a pool
/// of rank above 16 in steps under 64 rows, where the grid is small and each warp would
/// otherwise walk its rank rows one round trip at a time; 1 elsewhere, where more blocks fit on
/// an SM. On the H100 (decode, csgmv + graphs, LoRA beside the GEMMs) kw4 against kw1: batch 1
/// with one rank-64 adapter 7.92 vs 8.44 ms, batch 32 10.18 vs 10.78; but batch 64 with 64
/// rank-64 adapters 17.61 vs 17.13 and with 64 rank-16 ones 11.68 vs 10.72. Two rows per warp
/// was never the best by more than noise.
fn shrink_rank_rows(pool_rank: usize, step_rows: usize) -> usize {
    if pool_rank > 16 && step_rows < 64 {
        4
    } else {
        1
    }
}

/// Rows of the LoRA delta buffers ([`CudaOptions::lora_side_stream`]): the largest step that
/// computes its LoRA delta beside the base GEMMs.
pub const LORA_DELTA_ROWS: usize = 256;

/// Rows of a merged decode work item for the CUDA-core kernels: one pass of their shrink and
/// expand (SHRINK_ROWS and EXPAND_ROWS in llama.cu).
const DECODE_MERGE_ROWS: usize = 4;

/// Most rows of a merged decode work item for the tensor-core kernels: one 16-row pass.
const DECODE_MERGE_ROWS_MMA: usize = 16;

/// Rows per work item for the decode rows of one adapter in a step of `step_rows` rows (its
/// graph bucket when padded): for the CUDA-core kernels 1 below [`DECODE_MERGE_MIN_BATCH`], else
/// [`DECODE_MERGE_ROWS`]; for the tensor-core kernels (`tensor_cores`) 1 below
/// [`DECODE_MERGE_MIN_BATCH_MMA`], else a quarter of the batch, from 4 at batches 8 to 16 up to
/// 16, so that an adapter's factors are read by at most four items. On the H100 with one
/// adapter, items of 8 against 4 rows: batch 32 rank 64 8.56 ->
/// 7.96 ms; of 16: batch 64 rank 64 9.63 -> 9.19, rank 16 8.45 -> 8.18 (16 at batch 32: 8.19).
fn decode_merge_rows(step_rows: usize, tensor_cores: bool) -> usize {
    if tensor_cores {
        if step_rows < DECODE_MERGE_MIN_BATCH_MMA {
            1
        } else {
            (step_rows / 4).clamp(DECODE_MERGE_ROWS, DECODE_MERGE_ROWS_MMA)
        }
    } else if step_rows < DECODE_MERGE_MIN_BATCH {
        1
    } else {
        DECODE_MERGE_ROWS
    }
}

/// SMs cuBLAS plans its GEMMs for in a decode step of `rows` rows (its graph bucket when
/// padded) whose LoRA kernels run beside them on the side stream, on a GPU of `sms`; None: all.
/// Left the whole GPU, cuBLAS's kernels at these batches fill every SM and the LoRA chains wait
/// for their tails (at batch 256 with one rank-16 adapter, q/k/v's and o's chains ended 9.4 and
/// 8.8 us a layer after their GEMMs). On the H100 (132 SMs, graph replays, twenty-third
/// session): planned for 96 at 65-128 rows, batch 128 with one rank-16, one rank-64 and 64
/// rank-16 adapters took 9.22 -> 8.66, 10.02 -> 9.02 and 11.14 -> 10.90 ms; for 120 above 128
/// rows, batch 256 with 1, 8 and 64 rank-16 adapters and one rank-64 took 12.10 -> 11.44,
/// 12.25 -> 11.66, 14.10 -> 13.88 and 13.81 -> 13.16 ms. Between them, 192 and 224 rows gained
/// 0.14-0.40 ms; 96 and 160 gained with rank 64 and lost up to 0.1 ms with one rank-16 adapter,
/// and no other target did better there. Up to 64 rows the decode GEMMs take q/k/v and gate/up,
/// and 96 SMs for every cuBLAS GEMM helped 64 adapters (9.71 -> 9.55) but cost 8 (7.50 -> 7.66);
/// there o's GEMM alone is planned for fewer SMs ([`lora_decode_o_blas_sms`]).
fn lora_decode_blas_sms(rows: usize, sms: usize) -> Option<usize> {
    match rows {
        0..=64 => None,
        65..=128 => Some(sms * 96 / 132),
        _ => Some(sms * 120 / 132),
    }
}

/// SMs cuBLAS plans o's GEMM for in a decode step of `rows` rows whose LoRA kernels run beside
/// the GEMMs, where that is fewer than [`lora_decode_blas_sms`] gives every GEMM; None: as the
/// step's others. From 17 to 64 rows cuBLAS runs o (the decode GEMMs take it only in split
/// tiles, up to 16 rows): left the whole GPU, it holds every SM while o's LoRA chain waits.
/// On the H100 (graph replays, twenty-fourth session, against all SMs), planned for 96: batch
/// 64 with 64 rank-16 adapters 9.71 -> 9.52 ms, one rank-16 7.42 -> 7.36, 8 and 64 rank-64
/// 8.52 -> 8.45 and 15.10 -> 15.04; batch 32 with one rank-64 adapter 6.87 -> 6.81, batch 48
/// with one rank-16 7.20 -> 7.15; no measured row slower (batch 24, 64 with 8 rank-16 or one
/// rank-64 adapter: within 0.01 ms). 64-96 SMs planned alike; 104 and 112 lost the gain at
/// batch 64. The same for down's GEMM cost up to 0.16 ms (batch 64, 8 rank-16 adapters).
fn lora_decode_o_blas_sms(rows: usize, sms: usize) -> Option<usize> {
    (DECODE_GEMM_SPLIT_MAX_ROWS < rows && rows <= DECODE_GEMM_MAX_ROWS).then_some(sms * 96 / 132)
}

/// Rows per pass of the expand kernel (EXPAND_ROWS in llama.cu), which stages those rows' `y`
/// in shared memory.
const EXPAND_ROWS: usize = 4;

/// Largest device-pool rank: the expand's staged `y` (EXPAND_ROWS · 3 targets · rank floats)
/// must fit the 48 KB of default shared memory.
pub const MAX_DEVICE_LORA_RANK: usize = 1024;

/// Elements of the shrink input per block of the tensor-core shrink (LMMA_SLICE in lora_mma.cu):
/// at least [`LORA_SHRINK_SLICE`], so its planes fit the buffer sized for the CUDA-core shrink.
const LORA_MMA_SHRINK_SLICE: usize = 1024;
const _: () = assert!(LORA_MMA_SHRINK_SLICE >= LORA_SHRINK_SLICE);

/// Partial planes the shrink writes for an input of `in_dim`, on tensor cores (`mma`) or not.
fn lora_splits(in_dim: usize, mma: bool) -> usize {
    in_dim.div_ceil(if mma {
        LORA_MMA_SHRINK_SLICE
    } else {
        LORA_SHRINK_SLICE
    })
}

/// Floats per shrink plane: `cap` rows of up to three targets of rank `r`.
fn lora_y_plane(cap: usize, r: usize) -> usize {
    cap * 3 * r
}

/// Whether the tensor-core LoRA kernels (`lora_mma.cu`) take a group of input width `in_dim` and
/// output widths `outs` in a pool of rank `pool_rank`: each warp of the expand writes 64 columns
/// of one target, the shrink reads whole 32-wide chunks of the input, and the expand stages `y`
/// for ranks up to [`loraplane_kernels::LORA_MMA_MAX_RANK`].
fn lora_mma_takes(in_dim: usize, outs: &[usize], pool_rank: usize) -> bool {
    in_dim.is_multiple_of(32)
        && outs.iter().all(|o| o.is_multiple_of(64))
        && pool_rank <= loraplane_kernels::LORA_MMA_MAX_RANK
}

/// Warps of the tensor-core shrink and expand (LMMA_SHRINK_WARPS, LMMA_EXPAND_WARPS in
/// lora_mma.cu); each expand warp writes 64 columns.
const LORA_MMA_SHRINK_THREADS: u32 = 256;
const LORA_MMA_EXPAND_THREADS: u32 = 256;

/// Tiles of 8 rank rows each block of the tensor-core shrink takes at a time (LMMA_TILES).
const LORA_MMA_SHRINK_TILES: usize = 2;

/// Blocks of the tensor-core shrink per (target, slice, item), each taking every n-th group of
/// LORA_MMA_SHRINK_TILES rank tiles: with a single work item (batch 1), whose grid is one block
/// per target and 1024-input slice (4 to 14), one block per group, so that a high rank costs more
/// blocks instead of a longer chain of round trips in each; else 1. On the H100 (csgmv +
/// graphs, same calls) one rank-64 adapter at batch 1 went from 6.87-7.01 to 6.69-6.70 ms, but
/// splitting at batch 8 (one-row items) took it from 7.12 to 7.60 ms and at batch 64 (16-row
/// items) from 8.95 to 9.43.
fn lora_mma_shrink_rank_groups(pool_rank: usize, items: usize) -> usize {
    if items == 1 {
        pool_rank.div_ceil(8 * LORA_MMA_SHRINK_TILES)
    } else {
        1
    }
}

/// Blocks the tensor-core expand keeps at least, where it has that many: beyond them each block
/// walks several column groups, which shares its item's setup and staged `y` (about 4 blocks per
/// SM of an H100). Items of one or two rows (a decode row whose adapter has no other) walk
/// groups for half as many blocks. On the H100 at batch 64, 256 against 512 for every item took
/// 64 distinct rank-16 adapters from 10.64 to 10.19 ms, but one rank-64 adapter (items of 16
/// rows) from 9.08 to 9.52.
const LORA_MMA_EXPAND_MIN_BLOCKS: [usize; 2] = [512, 256];

/// Column groups each block of the tensor-core expand walks, for `cols` groups of columns per
/// item and `items` work items: 1 to 4, keeping [`LORA_MMA_EXPAND_MIN_BLOCKS`] blocks; for items
/// of at least 3 rows and (a multiple of that) for shorter ones.
fn lora_mma_expand_groups(cols: usize, items: usize) -> (usize, usize) {
    let [long, short] = LORA_MMA_EXPAND_MIN_BLOCKS.map(|b| (cols * items / b).clamp(1, 4));
    (long, short / long * long)
}

/// Query rows per block and threads per block of the flash prefill kernel (FA_BR and
/// FA_THREADS in flash_attention.cu).
const FLASH_QUERY_ROWS: usize = 64;
const FLASH_THREADS: u32 = 128;

/// Scores of one GEMM-attention tile take at most this many bytes (f32).
const GEMM_ATTENTION_SCORE_BYTES: usize = 256 << 20;

/// A prefill chunk attended by the prefill path (flash kernel or GEMMs).
#[derive(Clone, Copy)]
struct PrefillChunk {
    /// Its index in the step's block tables.
    table_row: usize,
    first_row: usize,
    rows: usize,
    cached: usize,
}

/// Dense scratch for GEMM attention, grown on demand.
struct AttentionScratch<T> {
    keys: CudaSlice<T>,
    values: CudaSlice<T>,
    scores: CudaSlice<f32>,
    probs: CudaSlice<T>,
}

struct DevLinear<T> {
    w: CudaSlice<T>,
    bias: Option<CudaSlice<T>>,
}

struct DevBlock<T> {
    input_norm: CudaSlice<T>,
    qkv: DevLinear<T>,
    o: DevLinear<T>,
    post_norm: CudaSlice<T>,
    gate_up: DevLinear<T>,
    down: DevLinear<T>,
}

/// Per-step scratch, sized for `cap` rows.
struct Buffers<T> {
    cap: usize,
    max_blocks: usize,
    /// ids | positions | slots | row_seq | items (3 per row) | wanted | tables, each section
    /// `meta_stride` rows long (the step's rows: a graph's pointers hold its bucket's stride).
    meta: CudaSlice<i32>,
    meta_stride: usize,
    /// The step's metadata on the host, page-locked so that its upload is an asynchronous copy
    /// of only what the step uses; grown on demand. The event, recorded after each upload, must
    /// have fired before the buffer is rewritten.
    meta_host: Option<PinnedHostSlice<i32>>,
    meta_uploaded: CudaEvent,
    x: CudaSlice<T>,
    normed: CudaSlice<T>,
    qkv: CudaSlice<T>,
    attn: CudaSlice<T>,
    gate_up: CudaSlice<T>,
    act: CudaSlice<T>,
    lora_y: CudaSlice<f32>,
    /// One group's shrunk rows for the GEMM LoRA path, `[rows, 3·R]` (target t at column t·R).
    lora_y_t: CudaSlice<T>,
    /// LoRA deltas computed on the side stream (`[LORA_DELTA_ROWS, width]` for q/k/v, for o and
    /// down, for gate/up), when [`CudaOptions::lora_side_stream`].
    lora_delta: Option<[CudaSlice<T>; 3]>,
    /// Each row's RoPE `[cos; d/2, sin; d/2]`, computed once per step.
    rope: CudaSlice<f32>,
    /// Split-key decode attention: partial softmaxes, `[ATTENTION_SPLIT_BLOCKS][group][d + 2]`
    /// (group: query heads per kv head), and one counter per (row, kv head).
    attention_part: CudaSlice<f32>,
    attention_counters: CudaSlice<i32>,
    final_in: CudaSlice<T>,
    logits: CudaSlice<f32>,
    logit_rows: usize,
    argmax: CudaSlice<i32>,
}

/// Launch shape of one step (constant for a captured graph).
#[derive(Clone, Copy)]
struct StepShape {
    rows: usize,
    items: usize,
    wanted: usize,
    lora: bool,
    /// Some row attends through the paged kernel (not every row is in a prefill chunk).
    paged: bool,
    /// LoRA deltas are computed beside the base GEMMs ([`CudaOptions::lora_side_stream`]).
    lora_delta: bool,
    /// A graph replays the step with programmatic edges, so the decode GEMMs' first weight
    /// loads overlap the kernel before them; without that they are slower than cuBLAS.
    programmatic: bool,
    /// A decode step (every row one token) on the delta path: cuBLAS plans its GEMMs for fewer
    /// SMs and leaves the rest to the LoRA kernels ([`StepShape::blas_sms`]).
    lora_decode: bool,
}

impl StepShape {
    /// SMs cuBLAS plans the step's GEMMs for on a GPU of `sms` ([`lora_decode_blas_sms`]);
    /// None: all.
    fn blas_sms(&self, sms: usize) -> Option<usize> {
        self.lora_decode
            .then(|| lora_decode_blas_sms(self.rows, sms))
            .flatten()
    }

    /// SMs cuBLAS plans o's GEMM for where that differs from the step's
    /// ([`lora_decode_o_blas_sms`]).
    fn o_blas_sms(&self, sms: usize) -> Option<usize> {
        self.lora_decode
            .then(|| lora_decode_o_blas_sms(self.rows, sms))
            .flatten()
    }
}

/// What a prepared step returns to its caller, per sequence in the caller's order.
struct StepOut {
    /// (first wanted row, count) per sequence.
    per_seq: Vec<(usize, usize)>,
}

/// A Llama-family model resident on one GPU.
pub struct CudaLlama<T: GpuFloat> {
    gpu: Arc<Gpu>,
    config: ModelConfig,
    opts: CudaOptions,
    embed: CudaSlice<T>,
    lm_head: Option<CudaSlice<T>>,
    norm: CudaSlice<T>,
    blocks: Vec<DevBlock<T>>,
    inv_freq: CudaSlice<f32>,
    k_cache: Vec<CudaSlice<T>>,
    v_cache: Vec<CudaSlice<T>>,
    /// Blocks the engine pages; one more (the last) absorbs padding rows of graph replays.
    kv_blocks: usize,
    lora: Option<LoraSlots<T>>,
    /// Per LoRA group, whether its shrink and expand run on tensor cores: fixed by the option,
    /// the element type, the group's widths and the pool's rank.
    lora_mma: [bool; GROUPS.len()],
    bufs: Buffers<T>,
    /// Sampling of overlapped steps; its last draws are what pending tokens stand for.
    pipe: SamplePipe,
    /// Decode graphs by (bucket, whether some row has an adapter): a step of base rows only
    /// replays one without the LoRA kernels, which cost it 0.07-0.17 ms as no-ops (H100).
    graphs: HashMap<(usize, bool), DecodeGraph>,
    /// The graph the last step replayed.
    last_graph: Option<(usize, bool)>,
    /// This step's prefill chunks attended by the prefill path.
    prefill_chunks: Vec<PrefillChunk>,
    /// The flash prefill kernel, where it is used; else prefill chunks attend through GEMMs.
    flash_kernel: Option<String>,
    /// The tensor-core decode attention kernel, where one is built and enabled, and the (row,
    /// kv head) pairs from which a step uses it.
    decode_attention_kernel: Option<(String, usize)>,
    /// This step's long LoRA segments run as GEMMs: (first row, rows, slot).
    gemm_lora: Vec<(usize, usize, usize)>,
    attention_scratch: Option<AttentionScratch<T>>,
    /// The projections' `decode_gemm.cu` launches, where [`CudaOptions::decode_gemms`] is on and
    /// the GPU runs them.
    decode_gemms: Option<DecodeGemms>,
}

/// The tensor maps, workspace and counters of the decode GEMMs ([`CudaOptions::decode_gemms`]).
/// Maps, 128 bytes each in one device buffer: per layer q/k/v, o, gate/up, down weights
/// ([`DecodeGemms::weight`]), then each GEMM input buffer (`normed`, `attn`, `act`, `final_in`)
/// once per token count of [`DECODE_GEMM_TOKENS`] ([`DecodeGemms::input`]), then the LM head's
/// weight where it runs here ([`DecodeGemms::head`]).
struct DecodeGemms {
    maps: CudaSlice<u64>,
    layers: usize,
    /// Per group (q/k/v, o, gate/up, down): whether its GEMMs run here (else in cuBLAS).
    groups: [bool; 4],
    /// Whether the LM head runs here (f32 logits, `decode_gemm_logits_for_model`).
    head: bool,
    workspace: CudaSlice<f32>,
    counters: CudaSlice<u32>,
}

/// Tensor maps per layer: q/k/v, o, gate/up, down, and gate/up again in 64-row boxes.
const DECODE_GEMM_LAYER_MAPS: usize = 5;

/// A projection's input buffer, for its decode GEMM tensor map.
#[derive(Clone, Copy)]
enum GemmInput {
    Normed = 0,
    Attn = 1,
    Act = 2,
    /// `final_in`, the LM head's input.
    Final = 3,
}

/// Input buffers with decode GEMM tensor maps.
const GEMM_INPUTS: usize = 4;

/// Tensor maps of a decode GEMM input buffer (`rows` x `width`), one per token count of
/// [`DECODE_GEMM_TOKENS`].
fn input_maps<T: GpuFloat>(gpu: &Gpu, ptr: u64, rows: usize, width: usize) -> Result<Vec<u64>> {
    let mut maps = Vec::new();
    for tokens in DECODE_GEMM_TOKENS {
        maps.extend(gpu.decode_gemm_map::<T>(ptr, (rows, width), width, tokens)?);
    }
    Ok(maps)
}

impl DecodeGemms {
    /// Device address of layer `li`'s weight map of group `g` (0 q/k/v, 1 o, 2 gate/up, 3 down).
    fn weight(&self, li: usize, g: usize) -> u64 {
        self.map(DECODE_GEMM_LAYER_MAPS * li + g)
    }

    /// Layer `li`'s gate/up weight map in 64-row boxes, for the gate/up GEMM with silu_mul.
    fn gate_up_halves(&self, li: usize) -> u64 {
        self.map(DECODE_GEMM_LAYER_MAPS * li + 4)
    }

    /// Device address of the map of `input` for boxes of `tokens` rows.
    fn input(&self, input: GemmInput, tokens: usize) -> u64 {
        let t = DECODE_GEMM_TOKENS
            .iter()
            .position(|&v| v == tokens)
            .expect("a token count of the kernels");
        self.map(self.input_index(input) + t)
    }

    /// Index of `input`'s first map (boxes of the fewest tokens).
    fn input_index(&self, input: GemmInput) -> usize {
        DECODE_GEMM_LAYER_MAPS * self.layers + DECODE_GEMM_TOKENS.len() * input as usize
    }

    /// Device address of the LM head's weight map (encoded only where `head`).
    fn head(&self) -> u64 {
        self.map(DECODE_GEMM_LAYER_MAPS * self.layers + DECODE_GEMM_TOKENS.len() * GEMM_INPUTS)
    }

    fn map(&self, i: usize) -> u64 {
        let (ptr, _) = self.maps.device_ptr(self.maps.stream());
        ptr + 128 * i as u64
    }
}

/// The device model in its element type.
pub enum CudaModel {
    /// f32 weights and activations (checks against references).
    F32(Box<CudaLlama<f32>>),
    /// bf16 weights and activations, f32 accumulation (serving).
    Bf16(Box<CudaLlama<half::bf16>>),
    /// f16 weights and activations, f32 accumulation.
    F16(Box<CudaLlama<half::f16>>),
}

/// Runs `$body` with `$m` bound to the model in whichever element type it has.
macro_rules! each_dtype {
    ($model:expr, $m:ident => $body:expr) => {
        match $model {
            CudaModel::F32($m) => $body,
            CudaModel::Bf16($m) => $body,
            CudaModel::F16($m) => $body,
        }
    };
}

/// Appends one sequence's LoRA rows, `(first row, rows, slot)`, to a step's kernel work items
/// (first row, rows, slot). A decode row (a sequence of one row) joins items of up to
/// `merge_rows` rows ([`decode_merge_rows`]).
fn push_work_items(
    items: &mut Vec<[i32; 3]>,
    (first_row, n, slot): (usize, usize, i32),
    mode: LoraKernelMode,
    merge_rows: usize,
) {
    let chunk = match mode {
        LoraKernelMode::PerSequence => {
            items.push([first_row as i32, n as i32, slot]);
            return;
        }
        // Decode rows of one adapter share items so that its factors are not re-read for every
        // row, except in small batches (merged rows leave too few blocks to keep the memory
        // busy: batch 8 measured slower).
        LoraKernelMode::Chunked(chunk) => match n {
            1 => merge_rows,
            _ => chunk,
        },
    };
    // Extend the previous item when it is the same adapter and has room.
    let mut start = first_row;
    let end_row = first_row + n;
    if let Some(last) = items.last_mut() {
        let last_end = (last[0] + last[1]) as usize;
        if last[2] == slot && last_end == start && (last[1] as usize) < chunk {
            let take = (chunk - last[1] as usize).min(n);
            last[1] += take as i32;
            start += take;
        }
    }
    while start < end_row {
        let take = chunk.min(end_row - start);
        items.push([start as i32, take as i32, slot]);
        start += take;
    }
}

/// Warps per block of the tensor-core decode attention kernel (DA_WARPS in
/// `decode_attention.cu`).
const DECODE_ATTENTION_WARPS: u32 = 4;

/// Blocks split-key decode attention aims for.
const ATTENTION_SPLIT_BLOCKS: usize = 256;

/// Most key ranges one row is split into.
const ATTENTION_MAX_SPLITS: usize = 16;

/// Key ranges per (row, kv head) for decode attention over `rows` rows: 1 when the pairs
/// alone fill half of ATTENTION_SPLIT_BLOCKS, else as many as keep rows · kv heads · splits
/// within it (so the partials fit their buffer). A function of the shape only, so that a CUDA
/// graph keeps it across replays; the kernel itself uses fewer splits for a row whose context
/// is short (one per 256 keys: SPLIT_MIN_KEYS in `llama.cu`, DA_SPLIT_MIN_KEYS in
/// `decode_attention.cu`).
fn attention_splits(rows: usize, kv_heads: usize) -> usize {
    let pairs = (rows * kv_heads).max(1);
    if 2 * pairs > ATTENTION_SPLIT_BLOCKS {
        1
    } else {
        (ATTENTION_SPLIT_BLOCKS / pairs).min(ATTENTION_MAX_SPLITS)
    }
}

/// A 2D host-to-device copy of the first `width` bytes of `rows` rows, `pitch` bytes apart on
/// both sides.
fn rows_copy(src: *const i32, dst: u64, pitch: usize, width: usize, rows: usize) -> drv::CUDA_MEMCPY2D {
    drv::CUDA_MEMCPY2D {
        srcXInBytes: 0,
        srcY: 0,
        srcMemoryType: drv::CUmemorytype::CU_MEMORYTYPE_HOST,
        srcHost: src.cast(),
        srcDevice: 0,
        srcArray: std::ptr::null_mut(),
        srcPitch: pitch,
        dstXInBytes: 0,
        dstY: 0,
        dstMemoryType: drv::CUmemorytype::CU_MEMORYTYPE_DEVICE,
        dstHost: std::ptr::null_mut(),
        dstDevice: dst,
        dstArray: std::ptr::null_mut(),
        dstPitch: pitch,
        WidthInBytes: width,
        Height: rows,
    }
}

/// Most tokens the device KV cache holds: slot indices (token x block) stay well inside i32.
const MAX_KV_TOKENS: usize = 1 << 30;

/// KV blocks of `block_bytes` (all layers, keys and values) that bring the GPU's memory in
/// use, `total - free` bytes now, up to `fraction` of `total`, less the spare block the graphs'
/// padding rows write to; 0 when none fit.
fn kv_blocks_that_fit(free: usize, total: usize, fraction: f64, block_bytes: usize) -> usize {
    let budget = total as f64 * fraction - (total - free.min(total)) as f64;
    if budget <= 0.0 {
        return 0;
    }
    ((budget / block_bytes.max(1) as f64) as usize).saturating_sub(1)
}

/// Graph bucket sizes: a decode batch is padded up to the next one.
fn graph_buckets(max_bs: usize) -> Vec<usize> {
    let mut v = vec![1, 2, 4, 8];
    let mut b = 16;
    while b <= max_bs.max(8) {
        v.push(b);
        b += if b < 64 { 8 } else { 32 };
    }
    v.retain(|&x| x <= max_bs);
    v
}

fn to_dev<T: GpuFloat>(gpu: &Gpu, data: &[f32]) -> Result<CudaSlice<T>> {
    let host: Vec<T> = data.iter().map(|&v| T::from_f32(v)).collect();
    gpu.upload(&host)
}

impl<T: GpuFloat> CudaLlama<T> {
    /// Uploads a host model's weights.
    pub fn from_host(gpu: Arc<Gpu>, host: &LlamaModel, opts: CudaOptions) -> Result<Self> {
        let c = host.config().clone();
        let lin = |l: &crate::model::llama::Linear| -> Result<DevLinear<T>> {
            Ok(DevLinear {
                w: to_dev(&gpu, &l.weight.data)?,
                bias: l.bias.as_ref().map(|b| to_dev(&gpu, b)).transpose()?,
            })
        };
        let mut blocks = Vec::with_capacity(c.num_layers);
        for b in &host.blocks {
            blocks.push(DevBlock {
                input_norm: to_dev(&gpu, &b.input_norm)?,
                qkv: lin(&b.qkv)?,
                o: lin(&b.o)?,
                post_norm: to_dev(&gpu, &b.post_norm)?,
                gate_up: lin(&b.gate_up)?,
                down: lin(&b.down)?,
            });
        }
        let embed = to_dev(&gpu, &host.embed.data)?;
        let lm_head = host.lm_head.as_ref().map(|t| to_dev(&gpu, &t.data)).transpose()?;
        let norm = to_dev(&gpu, &host.norm)?;
        Self::assemble(gpu, c, opts, embed, lm_head, norm, blocks)
    }

    /// Random weights of `config`'s shapes, generated on the device (`--load-format dummy`).
    pub fn dummy(gpu: Arc<Gpu>, config: ModelConfig, opts: CudaOptions, seed: u64) -> Result<Self> {
        let c = config.clone();
        let (h, qd, kvd, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let mut seed_n = seed;
        let mut rand = |n: usize, fan_in: usize| -> Result<CudaSlice<T>> {
            let buf = gpu.zeros::<T>(n)?;
            seed_n = seed_n.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let scale = 1.0 / (fan_in as f32).sqrt();
            launch!(
                gpu,
                &format!("fill_uniform_{}", T::SUFFIX),
                (1024, 1, 1),
                (256, 1, 1),
                gpu.ptr(&buf),
                n as u64,
                seed_n,
                scale
            )?;
            Ok(buf)
        };
        let mut blocks = Vec::with_capacity(c.num_layers);
        let ones = |n: usize| to_dev::<T>(&gpu, &vec![1.0; n]);
        for _ in 0..c.num_layers {
            let qkv_w = rand((qd + 2 * kvd) * h, h)?;
            let o_w = rand(h * qd, qd)?;
            let gu_w = rand(2 * inter * h, h)?;
            let down_w = rand(h * inter, inter)?;
            blocks.push(DevBlock {
                input_norm: ones(h)?,
                qkv: DevLinear { w: qkv_w, bias: None },
                o: DevLinear { w: o_w, bias: None },
                post_norm: ones(h)?,
                gate_up: DevLinear { w: gu_w, bias: None },
                down: DevLinear {
                    w: down_w,
                    bias: None,
                },
            });
        }
        let embed = rand(c.vocab_size * h, 1)?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(rand(c.vocab_size * h, h)?)
        };
        let norm = ones(h)?;
        Self::assemble(gpu, config, opts, embed, lm_head, norm, blocks)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        gpu: Arc<Gpu>,
        config: ModelConfig,
        mut opts: CudaOptions,
        embed: CudaSlice<T>,
        lm_head: Option<CudaSlice<T>>,
        norm: CudaSlice<T>,
        blocks: Vec<DevBlock<T>>,
    ) -> Result<Self> {
        opts.programmatic_launch &= gpu.kernels.has_programmatic_launch();
        let c = &config;
        if !c.head_dim.is_multiple_of(2) || c.head_dim > 256 {
            return Err(Error::Model(format!(
                "--device cuda: head_dim {} is not supported (even, up to 256)",
                c.head_dim
            )));
        }
        if c.num_heads / c.num_kv_heads > 8 {
            return Err(Error::Model(format!(
                "--device cuda: {} query heads per kv head is not supported (at most 8)",
                c.num_heads / c.num_kv_heads
            )));
        }
        if opts.lora_slots > 0 && opts.lora_rank > MAX_DEVICE_LORA_RANK {
            return Err(Error::Model(format!(
                "--max-lora-rank {}: the GPU's adapter pool supports ranks up to {MAX_DEVICE_LORA_RANK}",
                opts.lora_rank
            )));
        }
        let bs = opts.block_size.max(1);
        let lora = if opts.lora_slots > 0 {
            Some(LoraSlots::new(&gpu, c, opts.lora_slots, opts.lora_rank.max(1))?)
        } else {
            None
        };
        let lora_mma = std::array::from_fn(|g| {
            let (in_dim, outs) = group_dims(c, g);
            opts.lora_tensor_cores
                && loraplane_kernels::lora_mma_built_for(T::SUFFIX)
                && lora
                    .as_ref()
                    .is_some_and(|l| lora_mma_takes(in_dim, &outs, l.rank))
        });
        let inv_freq = gpu.upload(&rope_inv_freq(c))?;
        let max_blocks = c
            .max_position_embeddings
            .min(opts.max_tokens)
            .min(opts.max_seq_len.max(1))
            .div_ceil(bs)
            .max(1);
        let cap = opts.max_rows.max(opts.cuda_graph_max_bs).max(1);
        let bufs = Self::buffers(&gpu, c, &opts, cap, max_blocks, cap.min(512))?;
        let pipe = SamplePipe::new(&gpu, cap)?;
        let flash_kernel = opts
            .flash_prefill
            .then(|| loraplane_kernels::flash_attention_kernel(T::SUFFIX, c.head_dim))
            .flatten();
        let decode_attention_kernel = opts.decode_attention_tensor_cores.and_then(|min_pairs| {
            loraplane_kernels::decode_attention_kernel(T::SUFFIX, c.head_dim, c.num_heads / c.num_kv_heads)
                .map(|k| (k, min_pairs))
        });
        let mut model = Self {
            gpu,
            config,
            opts,
            embed,
            lm_head,
            norm,
            blocks,
            inv_freq,
            k_cache: Vec::new(),
            v_cache: Vec::new(),
            kv_blocks: 0,
            lora,
            lora_mma,
            bufs,
            pipe,
            graphs: HashMap::new(),
            last_graph: None,
            prefill_chunks: Vec::new(),
            flash_kernel,
            decode_attention_kernel,
            gemm_lora: Vec::new(),
            attention_scratch: None,
            decode_gemms: None,
        };
        model.decode_gemms = model.build_decode_gemms()?;
        model.allocate_kv_cache()?;
        Ok(model)
    }

    /// Allocates the paged KV cache (one spare block beyond the capacity, for graph padding
    /// rows): [`CudaOptions::max_tokens`], or with [`CudaOptions::kv_memory_fraction`] what that
    /// share of the GPU leaves after everything allocated so far, capped there.
    fn allocate_kv_cache(&mut self) -> Result<()> {
        let c = &self.config;
        let bs = self.opts.block_size.max(1);
        let block_bytes = bs * c.kv_bytes_per_token(std::mem::size_of::<T>());
        // Slots are i32 in the step metadata and int in some kernels' index arithmetic.
        let wanted = self.opts.max_tokens.min(MAX_KV_TOKENS).div_ceil(bs).max(1);
        let kv_blocks = match self.opts.kv_memory_fraction {
            None => wanted,
            Some(fraction) => {
                let (free, total) = self
                    .gpu
                    .ctx
                    .mem_get_info()
                    .map_err(|e| cuda_err("reading the GPU's free memory", e))?;
                let fit = kv_blocks_that_fit(free, total, fraction, block_bytes);
                if fit == 0 {
                    let gb = |b: usize| b as f64 / 1e9;
                    return Err(Error::Flag(format!(
                        "--mem-fraction-static {fraction}: no room for the KV cache. The GPU has \
                         {:.1} GB, {:.1} GB of it in use after the weights and the adapter pool \
                         ({:.2} GB), and {fraction} of it is {:.1} GB; raise --mem-fraction-static, \
                         or lower --max-loras-per-batch or --max-lora-rank",
                        gb(total),
                        gb(total - free),
                        self.lora_pool_bytes() as f64 / 1e9,
                        gb(total) * fraction
                    )));
                }
                wanted.min(fit)
            }
        };
        let slots_total = (kv_blocks + 1) * bs * c.kv_dim();
        let mut k_cache = Vec::with_capacity(c.num_layers);
        let mut v_cache = Vec::with_capacity(c.num_layers);
        for _ in 0..c.num_layers {
            k_cache.push(self.gpu.zeros::<T>(slots_total)?);
            v_cache.push(self.gpu.zeros::<T>(slots_total)?);
        }
        (self.k_cache, self.v_cache, self.kv_blocks) = (k_cache, v_cache, kv_blocks);
        Ok(())
    }

    /// KV cache capacity in tokens.
    pub fn kv_tokens(&self) -> usize {
        self.kv_blocks * self.opts.block_size.max(1)
    }

    /// Device bytes held by the KV cache (its spare block included).
    pub fn kv_cache_bytes(&self) -> usize {
        self.k_cache
            .iter()
            .chain(&self.v_cache)
            .map(|b| b.len() * std::mem::size_of::<T>())
            .sum()
    }

    /// The decode GEMMs' maps and scratch, when [`CudaOptions::decode_gemms`] is on, the GPU
    /// runs `decode_gemm.cu` and the element type is bf16 or f16.
    fn build_decode_gemms(&self) -> Result<Option<DecodeGemms>> {
        let gpu = &self.gpu;
        if !self.opts.decode_gemms || !gpu.kernels.has_decode_gemm() || !matches!(T::SUFFIX, "bf16" | "f16") {
            return Ok(None);
        }
        let c = &self.config;
        let (h, qd, kvd, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let shapes = [(qd + 2 * kvd, h), (h, qd), (2 * inter, h), (h, inter)];
        // Device buffers of at least one element, also where no plan needs them.
        let (mut workspace, mut tiles) = (1, 1);
        let mut tile_n = [0; 4];
        for (g, &(n, k)) in shapes.iter().enumerate() {
            for rows in 1..=DECODE_GEMM_MAX_ROWS {
                if let Some(p) = decode_gemm_for_model(T::SUFFIX, (rows, n, k), gpu.sms) {
                    workspace = workspace.max(p.workspace);
                    tiles = tiles.max(p.tiles);
                    tile_n[g] = p.tile_n;
                }
            }
        }
        let mut maps: Vec<u64> = Vec::new();
        let weights = |blk: &DevBlock<T>| {
            [
                gpu.ptr(&blk.qkv.w),
                gpu.ptr(&blk.o.w),
                gpu.ptr(&blk.gate_up.w),
                gpu.ptr(&blk.down.w),
            ]
        };
        for blk in &self.blocks {
            for (g, (w, (n, k))) in weights(blk).into_iter().zip(shapes).enumerate() {
                // A group cuBLAS runs keeps a map that is never read, so that indices stay fixed.
                maps.extend(gpu.decode_gemm_map::<T>(w, (n, k), k, tile_n[g].max(64))?);
            }
            maps.extend(gpu.decode_gemm_map::<T>(gpu.ptr(&blk.gate_up.w), (2 * inter, h), h, 64)?);
        }
        let b = &self.bufs;
        for (buf, width) in [(&b.normed, h), (&b.attn, qd), (&b.act, inter)] {
            maps.extend(input_maps::<T>(gpu, gpu.ptr(buf), b.cap, width)?);
        }
        maps.extend(input_maps::<T>(gpu, gpu.ptr(&b.final_in), b.logit_rows, h)?);
        // The LM head's plan depends on its rows through the token tile only.
        let head_plan = decode_gemm_logits_for_model(T::SUFFIX, (1, c.vocab_size, h), gpu.sms);
        if let Some(p) = &head_plan {
            let head_weight = gpu.ptr(self.lm_head.as_ref().unwrap_or(&self.embed));
            maps.extend(gpu.decode_gemm_map::<T>(head_weight, (c.vocab_size, h), h, p.tile_n)?);
            tiles = tiles.max(p.tiles);
        }
        Ok(Some(DecodeGemms {
            maps: gpu.upload(&maps)?,
            layers: self.blocks.len(),
            groups: tile_n.map(|t| t > 0),
            head: head_plan.is_some(),
            workspace: gpu.zeros::<f32>(workspace)?,
            counters: gpu.zeros::<u32>(tiles)?,
        }))
    }

    /// Points the LM head's input maps at `final_in` again after it was reallocated.
    fn remap_final_in(&mut self) -> Result<()> {
        let (gpu, b, h) = (&self.gpu, &self.bufs, self.config.hidden_size);
        let Some(d) = &mut self.decode_gemms else {
            return Ok(());
        };
        let maps = input_maps::<T>(gpu, gpu.ptr(&b.final_in), b.logit_rows, h)?;
        let at = d.input_index(GemmInput::Final);
        let mut dst = d.maps.slice_mut(at * 16..(at + DECODE_GEMM_TOKENS.len()) * 16);
        gpu.stream
            .memcpy_htod(&maps, &mut dst)
            .map_err(|e| Error::Model(format!("CUDA: uploading the LM head's input maps: {e}")))
    }

    /// In graph steps without adapters whose gate/up runs in `decode_gemm.cu`: gate/up with
    /// silu_mul in its epilogue, `act = silu(normed · Wgᵀ) · (normed · Wuᵀ)`, one kernel where
    /// the step otherwise runs two (a LoRA delta is added before silu_mul, so steps with
    /// adapters keep both). Returns whether it ran.
    fn gate_up_silu(&self, li: usize, act: u64, s: &StepShape) -> Result<bool> {
        let gpu = &self.gpu;
        let c = &self.config;
        let Some(d) = self
            .decode_gemms
            .as_ref()
            .filter(|d| d.groups[2] && s.programmatic && !s.lora)
        else {
            return Ok(false);
        };
        let (inter, h) = (c.intermediate_size, c.hidden_size);
        let Some(p) = decode_gemm_silu_for_model(T::SUFFIX, (s.rows, inter, h), gpu.sms) else {
            return Ok(false);
        };
        gpu.decode_gemm(
            &p,
            (d.gate_up_halves(li), d.input(GemmInput::Normed, p.tokens)),
            act,
            inter,
            (s.rows, 2 * inter, h),
            0.0,
            (gpu.ptr(&d.workspace), gpu.ptr(&d.counters)),
        )?;
        Ok(true)
    }

    /// `out[rows, n] = beta · out + x · Wᵀ` for layer `li`'s projection of group `g` (weight
    /// `w` [n, k]) on `input` (x, dense): in `decode_gemm.cu` where it takes the step and a graph
    /// replays it with programmatic edges, else cuBLAS.
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        out: u64,
        (input, x): (GemmInput, u64),
        (li, g, w): (usize, usize, u64),
        s: &StepShape,
        n: usize,
        k: usize,
        beta: f32,
    ) -> Result<()> {
        let (gpu, rows) = (&self.gpu, s.rows);
        if let Some(d) = self
            .decode_gemms
            .as_ref()
            .filter(|d| d.groups[g] && s.programmatic)
        {
            if let Some(p) = decode_gemm_for_model(T::SUFFIX, (rows, n, k), gpu.sms) {
                return gpu.decode_gemm(
                    &p,
                    (d.weight(li, g), d.input(input, p.tokens)),
                    out,
                    n,
                    (rows, n, k),
                    beta,
                    (gpu.ptr(&d.workspace), gpu.ptr(&d.counters)),
                );
            }
        }
        // o's GEMM may be planned for fewer SMs than the step's others; the step's target is
        // set again after it.
        let o_sms = if g == 1 { s.o_blas_sms(gpu.sms) } else { None };
        if o_sms.is_none() {
            return gpu.gemm_nt::<T>(out, n, false, x, k, w, rows, n, k, beta);
        }
        gpu.set_blas_sm_target(o_sms)?;
        let done = gpu.gemm_nt::<T>(out, n, false, x, k, w, rows, n, k, beta);
        done.and(gpu.set_blas_sm_target(s.blas_sms(gpu.sms)))
    }

    fn buffers(
        gpu: &Gpu,
        c: &ModelConfig,
        opts: &CudaOptions,
        cap: usize,
        max_blocks: usize,
        logit_rows: usize,
    ) -> Result<Buffers<T>> {
        let (h, qd, kvd, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let r = opts.lora_rank.max(1);
        Ok(Buffers {
            cap,
            max_blocks,
            meta: gpu.zeros::<i32>(8 * cap + cap * max_blocks)?,
            meta_stride: cap,
            meta_host: None,
            meta_uploaded: gpu
                .ctx
                .new_event(None)
                .map_err(|e| Error::Model(format!("CUDA: creating an event: {e}")))?,
            x: gpu.zeros::<T>(cap * h)?,
            normed: gpu.zeros::<T>(cap * h)?,
            qkv: gpu.zeros::<T>(cap * (qd + 2 * kvd))?,
            attn: gpu.zeros::<T>(cap * qd)?,
            gate_up: gpu.zeros::<T>(cap * 2 * inter)?,
            act: gpu.zeros::<T>(cap * inter)?,
            // One plane of [cap, 3R] per split of the widest shrink input (the CUDA-core
            // shrink's slices are the narrower).
            lora_y: gpu.zeros::<f32>(if opts.lora_slots > 0 {
                lora_splits(h.max(qd).max(inter), false) * lora_y_plane(cap, r)
            } else {
                1
            })?,
            lora_y_t: gpu.zeros::<T>(if opts.lora_slots > 0 { cap * 3 * r } else { 1 })?,
            lora_delta: if opts.lora_slots > 0 && opts.lora_side_stream {
                let rows = cap.min(LORA_DELTA_ROWS);
                Some([
                    gpu.zeros::<T>(rows * (qd + 2 * kvd))?,
                    gpu.zeros::<T>(rows * h)?,
                    gpu.zeros::<T>(rows * 2 * inter)?,
                ])
            } else {
                None
            },
            rope: gpu.zeros::<f32>(cap * c.head_dim)?,
            attention_part: gpu
                .zeros::<f32>(ATTENTION_SPLIT_BLOCKS * (c.num_heads / c.num_kv_heads) * (c.head_dim + 2))?,
            attention_counters: gpu.zeros::<i32>(ATTENTION_SPLIT_BLOCKS)?,
            final_in: gpu.zeros::<T>(logit_rows * h)?,
            logits: gpu.zeros::<f32>(logit_rows * c.vocab_size)?,
            logit_rows,
            argmax: gpu.zeros::<i32>(logit_rows)?,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The GPU it runs on.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// A block manager matching the device cache's capacity.
    pub fn new_kv_cache(&self) -> KvCache {
        KvCache::paging_only(
            &self.config,
            self.kv_blocks * self.opts.block_size,
            self.opts.block_size,
        )
    }

    /// Device bytes held by the LoRA slot pool.
    pub fn lora_pool_bytes(&self) -> usize {
        self.lora.as_ref().map_or(0, |l| l.bytes())
    }

    /// Programmatic edges over the decode graphs captured so far (0 without programmatic launch).
    pub fn programmatic_edges(&self) -> usize {
        self.graphs.values().map(|g| g.programmatic_edges).sum()
    }

    /// Decode GEMM launches (`decode_gemm.cu`) in the graph of each decode bucket captured so
    /// far, by bucket (batch size).
    pub fn graph_decode_gemms(&self) -> BTreeMap<usize, usize> {
        // The graphs with and without LoRA launch the same projections.
        self.graphs
            .iter()
            .map(|(&(b, _), g)| (b, g.decode_gemms))
            .collect()
    }

    /// The projection groups (and the LM head) whose decode steps run in `decode_gemm.cu` (see
    /// [`CudaOptions::decode_gemms`]), by name; empty where every GEMM runs in cuBLAS.
    pub fn decode_gemm_groups(&self) -> Vec<&'static str> {
        const NAMES: [&str; 4] = ["q/k/v", "o", "gate/up", "down"];
        self.decode_gemms.as_ref().map_or(Vec::new(), |d| {
            NAMES
                .iter()
                .zip(d.groups)
                .chain([(&"LM head", d.head)])
                .filter(|(_, on)| *on)
                .map(|(n, _)| *n)
                .collect()
        })
    }

    /// Fills LoRA slot `slot` with a random rank-`rank` adapter on `targets` and returns a
    /// host-side stand-in to put in [`SeqInput::adapter`] (benchmarks).
    pub fn dummy_adapter_in_slot(
        &mut self,
        slot: usize,
        rank: usize,
        targets: &[LoraTarget],
        seed: u64,
    ) -> Result<()> {
        Self::device_pool(&mut self.lora)?.fill_dummy(&self.gpu, &self.config, slot, rank, targets, seed)
    }

    fn device_pool(lora: &mut Option<LoraSlots<T>>) -> Result<&mut LoraSlots<T>> {
        lora.as_mut()
            .ok_or_else(|| Error::InvalidRequest("LoRA is disabled on this device model (no slots)".into()))
    }

    /// See [`LoraSlots::load`].
    pub fn load_slot(&mut self, slot: usize, adapter: &Arc<LoraAdapter>, overlap: bool) -> Result<()> {
        Self::device_pool(&mut self.lora)?.load(&self.gpu, &self.config, slot, adapter, overlap)
    }

    /// See [`LoraSlots::ready`].
    pub fn slot_ready(&mut self, slot: usize, wait: bool) -> Result<bool> {
        Self::device_pool(&mut self.lora)?.ready(&self.gpu, &self.config, slot, wait)
    }

    /// See [`LoraSlots::unstage`]; nothing without a LoRA pool.
    pub fn unstage_adapter(&mut self, adapter_id: u64) {
        if let Some(lora) = self.lora.as_mut() {
            lora.unstage(adapter_id);
        }
    }

    /// See [`LoraSlots::fail_staging`] (fault injection for checks).
    #[doc(hidden)]
    pub fn fail_staging(&mut self, fail: bool) -> Result<()> {
        Self::device_pool(&mut self.lora)?.fail_staging(fail);
        Ok(())
    }

    /// See [`LoraSlots::stage`].
    pub fn stage_adapter(&mut self, adapter: &Arc<LoraAdapter>) -> Result<()> {
        Self::device_pool(&mut self.lora)?.stage(&self.gpu, &self.config, adapter)
    }

    fn meta_ptr(&self, section: usize) -> u64 {
        self.gpu.ptr(&self.bufs.meta) + (section * self.bufs.meta_stride * 4) as u64
    }

    /// Builds the step's metadata on the host and uploads it. `slots_of` gives each sequence's
    /// LoRA slot (-1 for the base model). With `bucket`, the batch is padded to that many rows
    /// (decode-only steps replayed from a graph).
    fn prepare(
        &mut self,
        kv: &KvCache,
        seqs: &[SeqInput<'_>],
        seq_slots: &[i32],
        bucket: Option<usize>,
    ) -> Result<(StepShape, StepOut)> {
        let c = &self.config;
        let total: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let rows = bucket.unwrap_or(total);
        if rows > self.bufs.cap {
            return Err(Error::InvalidRequest(format!(
                "{rows} tokens in one forward pass, above the device buffers' {} (--chunked-prefill-size)",
                self.bufs.cap
            )));
        }
        if seqs.len() > self.bufs.cap {
            return Err(Error::InvalidRequest(
                "too many sequences in one forward pass".into(),
            ));
        }
        // Order: by LoRA slot in chunked mode (stable), else as given.
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        if matches!(self.opts.lora_mode, LoraKernelMode::Chunked(_)) {
            order.sort_by_key(|&i| seq_slots[i]);
        }
        let mb = self.bufs.max_blocks;
        let pending = self.pipe.pending_rows();
        // Sections of `rows` entries, then only the used block-table rows: at batch 64 about
        // 67 KB where sections of the buffers' capacity made 330 KB (H100: the host part of a
        // step, `bench_gpu --step-parts`, was 0.11-0.16 ms with those copied from pageable
        // memory).
        let table_rows = bucket.unwrap_or(seqs.len()).max(1);
        let stride = rows;
        let len = 8 * stride + table_rows * mb;
        let pad_slot = (self.kv_blocks * kv.block_size()) as i32;
        // Never recorded yet: returns at once.
        self.bufs
            .meta_uploaded
            .synchronize()
            .map_err(|e| Error::Model(format!("CUDA: waiting for the metadata upload: {e}")))?;
        if self.bufs.meta_host.as_ref().is_none_or(|h| h.len() < len) {
            self.bufs.meta_host = None;
            // SAFETY: every element the step uses is written below (the range is zeroed
            // first), and nothing reads the buffer before.
            let host = unsafe {
                self.gpu
                    .ctx
                    .alloc_pinned_with_flags::<i32>(len.next_power_of_two(), 0)
            }
            .map_err(|e| Error::Model(format!("CUDA: allocating pinned memory for step metadata: {e}")))?;
            self.bufs.meta_host = Some(host);
        }
        // Only the table's used columns are cleared and uploaded (a 2D copy): kernels read a
        // row's entries below its sequence's length only, and a full row of a long context
        // (--context-length 131072: 8,192 entries) made a batch-64 step's upload 2 MB.
        let table_cols = seqs
            .iter()
            .map(|s| s.cache.blocks.len())
            .max()
            .unwrap_or(0)
            .clamp(1, mb);
        let host = self.bufs.meta_host.as_mut().expect("allocated above");
        let meta = &mut host
            .as_mut_slice()
            .map_err(|e| Error::Model(format!("CUDA: step metadata: {e}")))?[..len];
        meta[..8 * stride].fill(0);
        for r in 0..table_rows {
            meta[8 * stride + r * mb..][..table_cols].fill(0);
        }
        let mut row = 0usize;
        let mut items: Vec<[i32; 3]> = Vec::new();
        let merge_rows = decode_merge_rows(rows, self.lora_mma.iter().all(|&m| m));
        let mut wanted: Vec<i32> = Vec::new();
        let mut per_seq = vec![(0usize, 0usize); seqs.len()];
        let mut prefill_chunks = Vec::new();
        let mut gemm_lora = Vec::new();
        for (oi, &si) in order.iter().enumerate() {
            let s = &seqs[si];
            check_seq_input(c, kv, s, pending)?;
            if s.cache.blocks.len() > mb {
                return Err(Error::InvalidRequest(format!(
                    "sequence needs {} KV blocks, above the device table's {mb}",
                    s.cache.blocks.len()
                )));
            }
            for (b, &blk) in s.cache.blocks.iter().enumerate() {
                meta[8 * stride + oi * mb + b] = blk as i32;
            }
            let first_row = row;
            for (i, &t) in s.tokens.iter().enumerate() {
                meta[row] = t as i32;
                meta[stride + row] = (s.cache.len + i) as i32;
                meta[2 * stride + row] = kv.slot(s.cache, s.cache.len + i) as i32;
                meta[3 * stride + row] = oi as i32;
                row += 1;
            }
            let n = s.tokens.len();
            let min_rows = self.opts.prefill_attention_min_rows;
            if bucket.is_none() && min_rows > 0 && n >= min_rows {
                for r in first_row..first_row + n {
                    meta[3 * stride + r] = -1; // the paged kernel skips these rows
                }
                prefill_chunks.push(PrefillChunk {
                    table_row: oi,
                    first_row,
                    rows: n,
                    cached: s.cache.len,
                });
            }
            let slot = seq_slots[si];
            if slot >= 0 && bucket.is_none() && n >= LORA_GEMM_MIN_ROWS {
                gemm_lora.push((first_row, n, slot as usize));
            } else if slot >= 0 && n > 0 {
                push_work_items(&mut items, (first_row, n, slot), self.opts.lora_mode, merge_rows);
            }
            let count = match s.logits {
                LogitsWanted::None => 0,
                LogitsWanted::Last => usize::from(n > 0),
                LogitsWanted::All => n,
            };
            per_seq[si] = (wanted.len(), count);
            for r in (first_row + n - count)..(first_row + n) {
                wanted.push(r as i32);
            }
        }
        // A graph step without adapters replays the graph that has no LoRA kernels.
        let lora = self.lora.is_some() && (!items.is_empty() || !gemm_lora.is_empty());
        if let Some(b) = bucket {
            // Padding rows: token 0 at position 0 in the spare block, no adapter, logits unused.
            for (oi, r) in (seqs.len()..b).zip(total..b) {
                meta[8 * stride + oi * mb] = self.kv_blocks as i32;
                meta[r] = 0;
                meta[stride + r] = 0;
                meta[2 * stride + r] = pad_slot;
                meta[3 * stride + r] = oi as i32;
                wanted.push(r as i32);
            }
            // The graph launches one block column per possible item: pad with empty ones.
            if lora {
                items.resize(b, [0, 0, -1]);
            }
        }
        for (i, it) in items.iter().enumerate() {
            meta[4 * stride + 3 * i..4 * stride + 3 * i + 3].copy_from_slice(it);
        }
        meta[7 * stride..7 * stride + wanted.len()].copy_from_slice(&wanted);
        let stream = &self.gpu.stream;
        let dev = self.gpu.ptr(&self.bufs.meta);
        let table = rows_copy(
            meta[8 * stride..].as_ptr(),
            dev + (8 * stride * std::mem::size_of::<i32>()) as u64,
            mb * std::mem::size_of::<i32>(),
            table_cols * std::mem::size_of::<i32>(),
            table_rows,
        );
        // SAFETY: the device buffer holds the capacity's sections and table, at least `len`
        // elements, as the host range does; the pinned source is not rewritten before
        // `meta_uploaded` fires (waited for above).
        unsafe {
            cudarc::driver::result::memcpy_htod_async(dev, &meta[..8 * stride], stream.cu_stream())
                .map_err(|e| Error::Model(format!("CUDA: uploading step metadata: {e}")))?;
            drv::cuMemcpy2DAsync_v2(&table, stream.cu_stream())
                .result()
                .map_err(|e| Error::Model(format!("CUDA: uploading the block tables: {e}")))?;
        }
        self.bufs
            .meta_uploaded
            .record(stream)
            .map_err(|e| Error::Model(format!("CUDA: recording the metadata upload: {e}")))?;
        self.bufs.meta_stride = stride;
        if wanted.len() > self.bufs.logit_rows {
            self.grow_logits(wanted.len())?;
        }
        if self.flash_kernel.is_none() {
            self.reserve_attention_scratch(&prefill_chunks)?;
        }
        self.prefill_chunks = prefill_chunks;
        let chunk_rows: usize = self.prefill_chunks.iter().map(|g| g.rows).sum();
        let shape = StepShape {
            rows,
            items: items.len(),
            wanted: wanted.len(),
            paged: chunk_rows < rows,
            lora,
            // Long segments run as GEMMs on the main stream; such steps keep one path.
            lora_delta: self.lora.is_some()
                && !items.is_empty()
                && gemm_lora.is_empty()
                && self.bufs.lora_delta.is_some()
                && rows <= LORA_DELTA_ROWS,
            programmatic: bucket.is_some() && self.opts.programmatic_launch,
            lora_decode: false,
        };
        self.gemm_lora = gemm_lora;
        Ok((shape, StepOut { per_seq }))
    }

    /// Keeps the GEMM-attention scratch large enough for `chunks`.
    fn reserve_attention_scratch(&mut self, chunks: &[PrefillChunk]) -> Result<()> {
        let c = &self.config;
        let longest = chunks.iter().map(|g| g.cached + g.rows).max().unwrap_or(0);
        if longest == 0 {
            return Ok(());
        }
        let kv = c.num_kv_heads * longest * c.head_dim;
        let scores = GEMM_ATTENTION_SCORE_BYTES / 4;
        let big_enough = self
            .attention_scratch
            .as_ref()
            .is_some_and(|s| s.keys.len() >= kv && s.scores.len() >= scores);
        if !big_enough {
            self.attention_scratch = None; // free before allocating the larger one
            self.attention_scratch = Some(AttentionScratch {
                keys: self.gpu.zeros::<T>(kv)?,
                values: self.gpu.zeros::<T>(kv)?,
                scores: self.gpu.zeros::<f32>(scores)?,
                probs: self.gpu.zeros::<T>(scores)?,
            });
        }
        Ok(())
    }

    /// Causal attention of one prefill chunk (and its cached prefix) in one flash kernel: scores
    /// stay on chip, keys and values are read through the block table.
    fn flash_attention(
        &self,
        kernel: &str,
        layer: usize,
        g: &PrefillChunk,
        qkv: u64,
        attn: u64,
    ) -> Result<()> {
        let c = &self.config;
        let gpu = &self.gpu;
        let table = self.meta_ptr(8) + (g.table_row * self.bufs.max_blocks * 4) as u64;
        let scale_log2 = std::f32::consts::LOG2_E / (c.head_dim as f32).sqrt();
        launch!(
            gpu,
            kernel,
            (c.num_heads as u32, g.rows.div_ceil(FLASH_QUERY_ROWS) as u32, 1),
            (FLASH_THREADS, 1, 1),
            attn,
            qkv,
            gpu.ptr(&self.k_cache[layer]),
            gpu.ptr(&self.v_cache[layer]),
            table,
            g.first_row as i32,
            g.rows as i32,
            g.cached as i32,
            self.opts.block_size as i32,
            c.num_heads as i32,
            c.num_kv_heads as i32,
            scale_log2,
            c.sliding_window.map_or(0, |w| w as i32)
        )
    }

    /// Causal attention of one prefill chunk (and its cached prefix) as batched GEMMs: gather the
    /// sequence's keys and values densely, then per query-row tile and per query head within a
    /// kv group, scores = q·kᵀ (one batched GEMM over kv heads), causal softmax, out = p·v.
    fn gemm_attention(&self, layer: usize, g: &PrefillChunk, qkv: u64, attn: u64) -> Result<()> {
        let c = &self.config;
        let gpu = &self.gpu;
        let scratch = self.attention_scratch.as_ref().expect("reserved in prepare");
        let (d, kvh, group) = (c.head_dim, c.num_kv_heads, c.num_heads / c.num_kv_heads);
        let (qd, qkv_w) = (c.q_dim(), c.q_dim() + 2 * c.kv_dim());
        let len = g.cached + g.rows;
        let ts = std::mem::size_of::<T>() as u64;
        let (kd, vd) = (gpu.ptr(&scratch.keys), gpu.ptr(&scratch.values));
        let table = self.meta_ptr(8) + (g.table_row * self.bufs.max_blocks * 4) as u64;
        launch!(
            gpu,
            &self.k("gather_kv"),
            (len as u32, 1, 1),
            (256, 1, 1),
            kd,
            vd,
            gpu.ptr(&self.k_cache[layer]),
            gpu.ptr(&self.v_cache[layer]),
            table,
            len as i32,
            self.opts.block_size as i32,
            kvh as i32,
            d as i32
        )?;
        let tile = (GEMM_ATTENTION_SCORE_BYTES / 4 / (kvh * len)).clamp(1, g.rows);
        let (scores, probs) = (gpu.ptr(&scratch.scores), gpu.ptr(&scratch.probs));
        let f32_t = cudarc::cublas::sys::cudaDataType::CUDA_R_32F;
        let scale = 1.0 / (d as f32).sqrt();
        let window = c.sliding_window.map_or(0, |w| w as i32);
        let mut t0 = 0;
        while t0 < g.rows {
            let q = tile.min(g.rows - t0);
            let row0 = (g.first_row + t0) as u64;
            for gi in 0..group {
                // scores[j] (col-major [len, q]) = K_j · Q_(j*group+gi)ᵀ, scaled.
                let q_ptr = qkv + (row0 * qkv_w as u64 + (gi * d) as u64) * ts;
                gpu.gemm_batched(
                    true,
                    false,
                    (len, q, d),
                    (scale, 0.0),
                    (kd, T::BLAS_TYPE, d, len * d),
                    (q_ptr, T::BLAS_TYPE, qkv_w, group * d),
                    (scores, f32_t, len, q * len),
                    kvh,
                )?;
                launch!(
                    gpu,
                    &self.k("causal_softmax"),
                    ((kvh * q) as u32, 1, 1),
                    (256, 1, 1),
                    probs,
                    scores,
                    len as i32,
                    q as i32,
                    (g.cached + t0) as i32,
                    window
                )?;
                // out rows (col-major [d, q], ld q_dim) = V_j (col-major [d, len]) · P_j (col-major [len, q]).
                let o_ptr = attn + (row0 * qd as u64 + (gi * d) as u64) * ts;
                gpu.gemm_batched(
                    false,
                    false,
                    (d, q, len),
                    (1.0, 0.0),
                    (vd, T::BLAS_TYPE, d, len * d),
                    (probs, T::BLAS_TYPE, len, q * len),
                    (o_ptr, T::BLAS_TYPE, qd, group * d),
                    kvh,
                )?;
            }
            t0 += q;
        }
        Ok(())
    }

    fn grow_logits(&mut self, rows: usize) -> Result<()> {
        let c = &self.config;
        self.bufs.final_in = self.gpu.zeros::<T>(rows * c.hidden_size)?;
        self.bufs.logits = self.gpu.zeros::<f32>(rows * c.vocab_size)?;
        self.bufs.argmax = self.gpu.zeros::<i32>(rows)?;
        self.bufs.logit_rows = rows;
        // Captured graphs point at the old buffers.
        self.graphs.clear();
        self.remap_final_in()
    }

    fn k(&self, name: &str) -> String {
        format!("{name}_{}", T::SUFFIX)
    }

    /// Launches one fused group's LoRA shrink over the work items (`y = x · Aᵀ`, in partial
    /// planes) on `stream`.
    fn lora_shrink(
        &self,
        lora: &LoraSlots<T>,
        stream: &CudaStream,
        li: usize,
        g: usize,
        x: u64,
        s: &StepShape,
    ) -> Result<()> {
        let gpu = &self.gpu;
        let (in_dim, outs) = group_dims(&self.config, g);
        let nt = outs.len() as i32;
        let splits = lora_splits(in_dim, self.lora_mma[g]);
        let (name, threads, rank_groups) = if self.lora_mma[g] {
            (
                format!("lora_shrink_mma_{}", T::SUFFIX),
                LORA_MMA_SHRINK_THREADS,
                lora_mma_shrink_rank_groups(lora.rank, s.items),
            )
        } else {
            let kw = shrink_rank_rows(lora.rank, s.rows);
            (format!("lora_shrink_{}_kw{kw}", T::SUFFIX), 256, 1)
        };
        launch!(
            gpu,
            on = stream,
            &name,
            (nt as u32 * splits as u32, s.items as u32, rank_groups as u32),
            (threads, 1, 1),
            gpu.ptr(&self.bufs.lora_y),
            x,
            gpu.ptr(&lora.layers[li][g].a),
            self.meta_ptr(4),
            gpu.ptr(&lora.slot_rank),
            in_dim as i32,
            lora.rank as i32,
            nt,
            lora_y_plane(self.bufs.cap, lora.rank) as u64
        )
    }

    /// On the delta path ([`StepShape::lora_delta`]), issues one group's whole LoRA delta on the
    /// side stream before its base GEMM (both read `x`): the shrink, then an expand that writes
    /// `scale · (x Aᵀ) Bᵀ` into the group's delta buffer. Returns that buffer, which the caller
    /// joins after the GEMM and hands to the group's next kernel to add; 0 off the delta path.
    fn lora_beside(&self, li: usize, g: usize, x: u64, s: &StepShape) -> Result<u64> {
        // NB: `lora_delta` implies both the pool and the delta buffers.
        let (true, Some(lora), Some(deltas)) = (s.lora_delta, &self.lora, &self.bufs.lora_delta) else {
            return Ok(0);
        };
        let gpu = &self.gpu;
        // o and down share the hidden-width buffer: o's delta is added (by the post-attention
        // RMSNorm) before down's is written.
        let delta = gpu.ptr(&deltas[[0, 1, 2, 1][g]]);
        let width: usize = group_dims(&self.config, g).1.iter().sum();
        gpu.fork_side()?;
        self.lora_shrink(lora, &gpu.side, li, g, x, s)?;
        self.lora_expand(lora, &gpu.side, li, g, delta, width, s.items, true)?;
        Ok(delta)
    }

    /// On the delta path, asks L2 (on the side stream) for layer `li` group `g`'s factors of the
    /// step's slots, unless they take more than [`LORA_L2_PREFETCH_MAX_BYTES`] (the kernel
    /// decides, so that one graph serves every mix of adapters).
    fn lora_prefetch_l2(&self, li: usize, g: usize, s: &StepShape) -> Result<()> {
        let (true, Some(lora)) = (s.lora_delta, &self.lora) else {
            return Ok(());
        };
        let gpu = &self.gpu;
        let (in_dim, outs) = group_dims(&self.config, g);
        launch!(
            gpu,
            on = &gpu.side,
            "lora_prefetch_l2",
            (4, s.items as u32, 1),
            (128, 1, 1),
            gpu.ptr(&lora.layers[li][g].a),
            gpu.ptr(&lora.layers[li][g].bt),
            self.meta_ptr(4),
            gpu.ptr(&lora.slot_rank),
            in_dim as i32,
            lora.rank as i32,
            outs.len() as i32,
            outs.iter().sum::<usize>() as i32,
            std::mem::size_of::<T>() as i32,
            LORA_L2_PREFETCH_MAX_BYTES as i64
        )
    }

    /// Launches one fused group's LoRA expand over the work items on `stream`: adds
    /// `scale · y Bᵀ` to `out`, or with `store` writes it (a delta buffer).
    #[allow(clippy::too_many_arguments)]
    fn lora_expand(
        &self,
        lora: &LoraSlots<T>,
        stream: &CudaStream,
        li: usize,
        g: usize,
        out: u64,
        out_stride: usize,
        items: usize,
        store: bool,
    ) -> Result<()> {
        let gpu = &self.gpu;
        let (in_dim, outs) = group_dims(&self.config, g);
        let nt = outs.len() as i32;
        let out_total: usize = outs.iter().sum();
        let (splits, plane) = (
            lora_splits(in_dim, self.lora_mma[g]),
            lora_y_plane(self.bufs.cap, lora.rank) as u64,
        );
        let b1 = outs[0] as i32;
        let b2 = if outs.len() > 1 {
            b1 + outs[1] as i32
        } else {
            i32::MAX
        };
        let kind = if store { "lora_expand_store" } else { "lora_expand" };
        let elem = std::mem::size_of::<T>();
        // The tensor-core expand takes two more arguments: the column groups each block walks,
        // for items of several rows and for short ones.
        let (name, grid_x, threads, shared, groups) = if self.lora_mma[g] && out_stride.is_multiple_of(8) {
            let cols = out_total.div_ceil(LORA_MMA_EXPAND_THREADS as usize / 32 * 64);
            let (groups, short_groups) = lora_mma_expand_groups(cols, items);
            (
                format!("{kind}_mma_{}", T::SUFFIX),
                cols.div_ceil(groups) as u32,
                LORA_MMA_EXPAND_THREADS,
                loraplane_kernels::lora_mma_expand_shared(outs.len(), lora.rank, elem),
                Some((groups as i32, short_groups as i32)),
            )
        } else {
            // 16 bytes of Bᵀ per thread and rank row when every target boundary and the
            // output stride keep those loads aligned, else one column per thread.
            let vec = 16 / elem;
            let (variant, cols) =
                if outs.iter().all(|o| o.is_multiple_of(vec)) && out_stride.is_multiple_of(vec) {
                    ("vec", vec)
                } else {
                    ("c1", 1)
                };
            (
                format!("{kind}_{}_{variant}", T::SUFFIX),
                (out_total as u32).div_ceil(128 * cols as u32),
                128,
                EXPAND_ROWS * outs.len() * lora.rank * 4,
                None,
            )
        };
        macro_rules! expand {
            ($($extra:expr),*) => {
                launch!(
                    gpu,
                    on = stream,
                    &name,
                    (grid_x, items as u32, 1),
                    (threads, 1, 1),
                    shared = shared as u32,
                    out,
                    out_stride as i32,
                    gpu.ptr(&self.bufs.lora_y),
                    splits as i32,
                    plane,
                    gpu.ptr(&lora.layers[li][g].bt),
                    self.meta_ptr(4),
                    gpu.ptr(&lora.slot_rank),
                    gpu.ptr(&lora.slot_scale),
                    out_total as i32,
                    lora.rank as i32,
                    nt,
                    b1,
                    b2
                    $(, $extra)*
                )
            };
        }
        match groups {
            Some((groups, short_groups)) => expand!(groups, short_groups),
            None => expand!(),
        }
    }

    /// Applies one fused group's LoRA delta after its base GEMM: `out[:, col] += scale · (x Aᵀ) Bᵀ`
    /// for the long segments as GEMMs (unless `gemms_done`: [`Self::lora_gemms_first`] wrote
    /// them), then for the kernels' work items. Off the delta path only.
    #[allow(clippy::too_many_arguments)]
    fn lora_group(
        &self,
        li: usize,
        g: usize,
        x: u64,
        out: u64,
        out_stride: usize,
        s: &StepShape,
        gemms_done: bool,
    ) -> Result<()> {
        let Some(lora) = &self.lora else { return Ok(()) };
        if !s.lora {
            return Ok(());
        }
        if !gemms_done {
            self.lora_group_gemms(lora, li, g, x, out, out_stride, 1.0)?;
        }
        if s.items == 0 {
            return Ok(());
        }
        let stream = &self.gpu.stream;
        self.lora_shrink(lora, stream, li, g, x, s)?;
        self.lora_expand(lora, stream, li, g, out, out_stride, s.items, false)
    }

    /// After a group's base GEMM: joins the side stream when its delta is being computed there
    /// (`delta` from [`Self::lora_beside`]), else applies the group's LoRA ([`Self::lora_group`]).
    #[allow(clippy::too_many_arguments)]
    fn lora_join_or_apply(
        &self,
        delta: u64,
        li: usize,
        g: usize,
        x: u64,
        out: u64,
        out_stride: usize,
        s: &StepShape,
        gemms_done: bool,
    ) -> Result<()> {
        if delta != 0 {
            self.gpu.join_side()
        } else {
            self.lora_group(li, g, x, out, out_stride, s, gemms_done)
        }
    }

    /// For a group whose base GEMM overwrites its output (q/k/v, gate/up) in a step with long
    /// LoRA segments: writes those segments' deltas into `out` (expand with beta 0) and zeros
    /// every other row, so that the base GEMM then accumulates onto them (beta 1) in its
    /// epilogue, where reading `out` hides under the math. That saves the expand's
    /// read-modify-write of an output far wider than the rank. Returns whether it did, i.e.
    /// whether the base GEMM must accumulate. `out_stride` must be the group's full width (its
    /// rows are contiguous).
    #[allow(clippy::too_many_arguments)]
    fn lora_gemms_first(
        &self,
        li: usize,
        g: usize,
        x: u64,
        out: u64,
        out_stride: usize,
        rows: usize,
        s: &StepShape,
    ) -> Result<bool> {
        let Some(lora) = &self.lora else { return Ok(false) };
        if !s.lora || self.gemm_lora.is_empty() {
            return Ok(false);
        }
        let row_bytes = out_stride * std::mem::size_of::<T>();
        let mut zero_from = 0;
        // Segments are in row order; a rank-0 slot writes nothing, so its rows are zeroed too.
        for &(first, n, slot) in &self.gemm_lora {
            if lora.slot_params(slot).0 > 0 {
                self.gpu.zero_bytes(
                    out + (zero_from * row_bytes) as u64,
                    (first - zero_from) * row_bytes,
                )?;
                zero_from = first + n;
            }
        }
        self.gpu.zero_bytes(
            out + (zero_from * row_bytes) as u64,
            (rows - zero_from) * row_bytes,
        )?;
        self.lora_group_gemms(lora, li, g, x, out, out_stride, 0.0)?;
        Ok(true)
    }

    /// The long segments' LoRA delta as cuBLAS GEMMs: one shrink for the whole group
    /// (`y = x · [A_t]ᵀ`, target t at column t·R), then one expand per target,
    /// `out = scale · y_t · B_tᵀ + beta · out`.
    #[allow(clippy::too_many_arguments)]
    fn lora_group_gemms(
        &self,
        lora: &LoraSlots<T>,
        li: usize,
        g: usize,
        x: u64,
        out: u64,
        out_stride: usize,
        beta: f32,
    ) -> Result<()> {
        let gpu = &self.gpu;
        let (in_dim, outs) = group_dims(&self.config, g);
        let (nt, r_pool) = (outs.len(), lora.rank);
        let out_total: usize = outs.iter().sum();
        let bufs = &lora.layers[li][g];
        let ts = std::mem::size_of::<T>();
        let y = gpu.ptr(&self.bufs.lora_y_t);
        for &(first, rows, slot) in &self.gemm_lora {
            let (rank, scale) = lora.slot_params(slot);
            if rank == 0 {
                continue;
            }
            // y[rows, y_w] = x[first.., in] · A_slotᵀ over the rows the targets use: each
            // target's first `rank` of its R rows (the rows between belong to no one and are
            // computed but never read). Reads x once for the group.
            let y_w = (nt - 1) * r_pool + rank;
            let a = gpu.ptr(&bufs.a) + (slot * nt * r_pool * in_dim * ts) as u64;
            let xs = x + (first * in_dim * ts) as u64;
            gpu.gemm_nt::<T>(y, y_w, false, xs, in_dim, a, rows, y_w, in_dim, 0.0)?;
            let mut col = 0;
            for (t, &out_t) in outs.iter().enumerate() {
                // out[first.., col..col+out_t] = scale · y_t · Bᵀ_t + beta · out
                // (Bᵀ: [R, out_total] per slot).
                let bt = gpu.ptr(&bufs.bt) + ((slot * r_pool * out_total + col) * ts) as u64;
                let o = out + ((first * out_stride + col) * ts) as u64;
                gpu.gemm_batched(
                    false,
                    false,
                    (out_t, rows, rank),
                    (scale, beta),
                    (bt, T::BLAS_TYPE, out_total, 0),
                    (y + (t * r_pool * ts) as u64, T::BLAS_TYPE, y_w, 0),
                    (o, T::BLAS_TYPE, out_stride, 0),
                    1,
                )?;
                col += out_t;
            }
        }
        Ok(())
    }

    /// `out[r] = rmsnorm(x[rows_map[r]]) · w` for `rows` rows (`rows_map` 0: identity), after
    /// adding `delta` (0: none) to those rows of x in place.
    fn rms_norm(
        &self,
        out: u64,
        x: u64,
        delta: u64,
        w: &CudaSlice<T>,
        rows_map: u64,
        rows: usize,
    ) -> Result<()> {
        let c = &self.config;
        // A thread per 16-byte pack of the row (up to 1024), so the kernel keeps the row in
        // registers; rows that are not whole packs take 1024 threads and two passes.
        let pack = 16 / std::mem::size_of::<T>();
        let threads = if c.hidden_size.is_multiple_of(pack) {
            (c.hidden_size / pack).next_multiple_of(32).min(1024)
        } else {
            1024
        };
        launch!(
            self.gpu,
            &self.k("rms_norm"),
            (rows as u32, 1, 1),
            (threads as u32, 1, 1),
            out,
            x,
            delta,
            self.gpu.ptr(w),
            rows_map,
            c.hidden_size as i32,
            c.rms_norm_eps
        )
    }

    fn bias(&self, out: u64, bias: &Option<CudaSlice<T>>, rows: usize, n: usize) -> Result<()> {
        let Some(b) = bias else { return Ok(()) };
        launch!(
            self.gpu,
            &self.k("add_bias"),
            (((rows * n) as u32).div_ceil(256).min(65535), 1, 1),
            (256, 1, 1),
            out,
            self.gpu.ptr(b),
            rows as i32,
            n as i32
        )
    }

    /// Every kernel of one forward pass, from the uploaded metadata to the logits, issued
    /// eagerly or into a graph being captured, with cuBLAS planning for
    /// [`StepShape::blas_sms`] (a captured graph keeps the kernels it chose). Launches only (no
    /// allocation, no synchronisation), so it can be captured as a graph.
    fn run(&self, s: &StepShape) -> Result<()> {
        let sms = s.blas_sms(self.gpu.sms);
        if sms.is_none() {
            return self.issue(s);
        }
        self.gpu.set_blas_sm_target(sms)?;
        let issued = self.issue(s);
        // The step's own error, if any, before the reset's.
        let reset = self.gpu.set_blas_sm_target(None);
        issued.and(reset)
    }

    /// [`CudaLlama::run`]'s work, with cuBLAS as it is set.
    fn issue(&self, s: &StepShape) -> Result<()> {
        let c = &self.config;
        let gpu = &self.gpu;
        let (h, qd, kvd, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let qkv_w = qd + 2 * kvd;
        let rows = s.rows;
        let b = &self.bufs;
        let (x, normed, qkv, attn, gu, act) = (
            gpu.ptr(&b.x),
            gpu.ptr(&b.normed),
            gpu.ptr(&b.qkv),
            gpu.ptr(&b.attn),
            gpu.ptr(&b.gate_up),
            gpu.ptr(&b.act),
        );
        let (ids, positions, slots, row_seq, wanted, tables) = (
            self.meta_ptr(0),
            self.meta_ptr(1),
            self.meta_ptr(2),
            self.meta_ptr(3),
            self.meta_ptr(7),
            self.meta_ptr(8),
        );
        let r32 = rows as u32;
        launch!(
            gpu,
            &self.k("embed"),
            (r32, 1, 1),
            (256, 1, 1),
            x,
            gpu.ptr(&self.embed),
            ids,
            self.pipe.prev_tokens(gpu),
            h as i32
        )?;
        let null: u64 = 0;
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let window = c.sliding_window.map_or(0, |w| w as i32);
        let rope = gpu.ptr(&b.rope);
        launch!(
            gpu,
            "rope_table_f32",
            (r32, 1, 1),
            (64, 1, 1),
            rope,
            positions,
            gpu.ptr(&self.inv_freq),
            (c.head_dim / 2) as i32
        )?;
        let splits = if self.opts.attention_split_keys {
            attention_splits(rows, c.num_kv_heads)
        } else {
            1
        };
        let tensor_cores = self
            .decode_attention_kernel
            .as_ref()
            .filter(|(_, min_pairs)| rows * c.num_kv_heads >= *min_pairs);
        let (attention, attention_threads, attention_smem) = match tensor_cores {
            // Fixed warps, static shared memory (decode_attention.cu's DA_WARPS).
            Some((kernel, _)) => (kernel.clone(), 32 * DECODE_ATTENTION_WARPS, 0),
            None => {
                // Compile-time group bound and dims per lane of the CUDA-core kernel.
                let (g_max, dpl) = (
                    (c.num_heads / c.num_kv_heads).next_power_of_two(),
                    c.head_dim.div_ceil(32).next_power_of_two(),
                );
                // Warps per (kv head, row) block: about 2048 warps in all, from 4 per block
                // for large batches (8 measured slower at batch 64) up to 16 for a few rows, so
                // that a short batch still keeps many keys in flight; the merge area must fit
                // 48 KB of shared memory.
                let blocks = c.num_kv_heads * rows * splits;
                let merge_bytes = g_max * (2 + 32 * dpl) * 4;
                let warps = (2048 / blocks.max(1))
                    .clamp(4, 16)
                    .min(48 * 1024 / merge_bytes)
                    .max(1);
                (
                    format!("attention_{}_g{g_max}_d{dpl}", T::SUFFIX),
                    32 * warps as u32,
                    (warps * merge_bytes) as u32,
                )
            }
        };
        // RoPE threads: one per rotary pair of a head (at least a warp), heads stacked in y up
        // to 256 threads.
        let rope_x = (c.head_dim as u32 / 2).clamp(32, 128);
        let rope_heads = (256 / rope_x as usize).max(1);
        // SiLU-and-multiply: 16 bytes per thread, 256 threads per block.
        let silu_grid = (
            inter.div_ceil(256 * (16 / std::mem::size_of::<T>())) as u32,
            rows.min(65535) as u32,
            1,
        );
        if s.lora_delta {
            // Rows outside the work items get no delta: their rows of each buffer stay zero.
            let buffer_rows = self.bufs.cap.min(LORA_DELTA_ROWS);
            for d in self.bufs.lora_delta.iter().flatten() {
                let width = d.len() / buffer_rows;
                gpu.zero_bytes(gpu.ptr(d), rows * width * std::mem::size_of::<T>())?;
            }
        }
        // The down projection's LoRA delta, added by the next RMSNorm (on the delta path).
        let mut down_delta: u64 = 0;
        for (li, blk) in self.blocks.iter().enumerate() {
            self.rms_norm(normed, x, down_delta, &blk.input_norm, null, rows)?;
            let qkv_delta = self.lora_beside(li, 0, normed, s)?;
            let qkv_lora_first = self.lora_gemms_first(li, 0, normed, qkv, qkv_w, rows, s)?;
            self.linear(
                qkv,
                (GemmInput::Normed, normed),
                (li, 0, gpu.ptr(&blk.qkv.w)),
                s,
                qkv_w,
                h,
                if qkv_lora_first { 1.0 } else { 0.0 },
            )?;
            self.bias(qkv, &blk.qkv.bias, rows, qkv_w)?;
            self.lora_join_or_apply(qkv_delta, li, 0, normed, qkv, qkv_w, s, qkv_lora_first)?;
            launch!(
                gpu,
                &self.k("rope_cache"),
                (
                    r32,
                    (c.num_heads + c.num_kv_heads + 1).div_ceil(rope_heads) as u32,
                    1
                ),
                (rope_x, rope_heads as u32, 1),
                qkv,
                qkv_delta,
                gpu.ptr(&self.k_cache[li]),
                gpu.ptr(&self.v_cache[li]),
                rope,
                slots,
                c.num_heads as i32,
                c.num_kv_heads as i32,
                c.head_dim as i32
            )?;
            // o's factors go to L2 while decode attention leaves memory bandwidth unused.
            if s.lora_delta && rows <= LORA_L2_PREFETCH_MAX_ROWS {
                gpu.fork_side()?;
                self.lora_prefetch_l2(li, 1, s)?;
            }
            if s.paged {
                launch!(
                    gpu,
                    &attention,
                    (c.num_kv_heads as u32, r32, splits as u32),
                    (attention_threads, 1, 1),
                    shared = attention_smem,
                    attn,
                    qkv,
                    gpu.ptr(&self.k_cache[li]),
                    gpu.ptr(&self.v_cache[li]),
                    positions,
                    row_seq,
                    tables,
                    b.max_blocks as i32,
                    self.opts.block_size as i32,
                    c.num_heads as i32,
                    c.num_kv_heads as i32,
                    c.head_dim as i32,
                    scale,
                    window,
                    gpu.ptr(&b.attention_part),
                    gpu.ptr(&b.attention_counters)
                )?;
            }
            for g in &self.prefill_chunks {
                match &self.flash_kernel {
                    Some(kernel) => self.flash_attention(kernel, li, g, qkv, attn)?,
                    None => self.gemm_attention(li, g, qkv, attn)?,
                }
            }
            let o_delta = self.lora_beside(li, 1, attn, s)?;
            self.linear(
                x,
                (GemmInput::Attn, attn),
                (li, 1, gpu.ptr(&blk.o.w)),
                s,
                h,
                qd,
                1.0,
            )?;
            self.bias(x, &blk.o.bias, rows, h)?;
            self.lora_join_or_apply(o_delta, li, 1, attn, x, h, s, false)?;
            self.rms_norm(normed, x, o_delta, &blk.post_norm, null, rows)?;
            if !self.gate_up_silu(li, act, s)? {
                let gu_delta = self.lora_beside(li, 2, normed, s)?;
                let gu_lora_first = self.lora_gemms_first(li, 2, normed, gu, 2 * inter, rows, s)?;
                self.linear(
                    gu,
                    (GemmInput::Normed, normed),
                    (li, 2, gpu.ptr(&blk.gate_up.w)),
                    s,
                    2 * inter,
                    h,
                    if gu_lora_first { 1.0 } else { 0.0 },
                )?;
                self.lora_join_or_apply(gu_delta, li, 2, normed, gu, 2 * inter, s, gu_lora_first)?;
                launch!(
                    gpu,
                    &self.k("silu_mul"),
                    silu_grid,
                    (256, 1, 1),
                    act,
                    gu,
                    gu_delta,
                    rows as i32,
                    inter as i32
                )?;
            }
            down_delta = self.lora_beside(li, 3, act, s)?;
            self.linear(
                x,
                (GemmInput::Act, act),
                (li, 3, gpu.ptr(&blk.down.w)),
                s,
                h,
                inter,
                1.0,
            )?;
            self.lora_join_or_apply(down_delta, li, 3, act, x, h, s, false)?;
        }
        if s.wanted > 0 {
            let fin = gpu.ptr(&b.final_in);
            self.rms_norm(fin, x, down_delta, &self.norm, wanted, s.wanted)?;
            let head = gpu.ptr(self.lm_head.as_ref().unwrap_or(&self.embed));
            if let Some(d) = self.decode_gemms.as_ref().filter(|d| d.head && s.programmatic) {
                if let Some(p) = decode_gemm_logits_for_model(T::SUFFIX, (s.wanted, c.vocab_size, h), gpu.sms)
                {
                    return gpu.decode_gemm(
                        &p,
                        (d.head(), d.input(GemmInput::Final, p.tokens)),
                        gpu.ptr(&b.logits),
                        c.vocab_size,
                        (s.wanted, c.vocab_size, h),
                        0.0,
                        (gpu.ptr(&d.workspace), gpu.ptr(&d.counters)),
                    );
                }
            }
            gpu.gemm_nt::<T>(
                gpu.ptr(&b.logits),
                c.vocab_size,
                true,
                fin,
                h,
                head,
                s.wanted,
                c.vocab_size,
                h,
                0.0,
            )?;
        }
        Ok(())
    }

    /// Runs one step: eagerly, or from the graph of its bucket when it is a small decode batch.
    fn step(&mut self, kv: &KvCache, seqs: &[SeqInput<'_>]) -> Result<StepOut> {
        let seq_slots = self.assign_slots(seqs)?;
        self.step_with_slots(kv, seqs, &seq_slots)
    }

    /// Each sequence's LoRA slot (-1: base model), loading adapters that are not resident.
    fn assign_slots(&mut self, seqs: &[SeqInput<'_>]) -> Result<Vec<i32>> {
        // LoRA slots for the batch's distinct adapters.
        let mut distinct: Vec<&LoraAdapter> = Vec::new();
        for s in seqs {
            if let Some(a) = s.adapter {
                if !distinct.iter().any(|d| d.id == a.id) {
                    distinct.push(a);
                }
            }
        }
        let slot_of: Vec<usize> = if distinct.is_empty() {
            Vec::new()
        } else {
            Self::device_pool(&mut self.lora)?.assign(&self.gpu, &self.config, &distinct)?
        };
        let seq_slots: Vec<i32> = seqs
            .iter()
            .map(|s| {
                s.adapter.map_or(-1, |a| {
                    let i = distinct
                        .iter()
                        .position(|d| d.id == a.id)
                        .expect("collected above");
                    slot_of[i] as i32
                })
            })
            .collect();
        Ok(seq_slots)
    }

    fn step_with_slots(&mut self, kv: &KvCache, seqs: &[SeqInput<'_>], seq_slots: &[i32]) -> Result<StepOut> {
        // No rows, no kernels (a zero-sized grid is a launch error): every sequence gets nothing.
        if seqs.iter().all(|s| s.tokens.is_empty()) {
            return Ok(StepOut {
                per_seq: vec![(0, 0); seqs.len()],
            });
        }
        let decode_only = !seqs.is_empty()
            && seqs
                .iter()
                .all(|s| s.tokens.len() == 1 && s.logits == LogitsWanted::Last);
        let bucket = if decode_only {
            self.graph_bucket(seqs.len())
        } else {
            None
        };
        let (mut shape, out) = self.prepare(kv, seqs, seq_slots, bucket)?;
        shape.lora_decode = decode_only && shape.lora_delta;
        self.last_graph = None;
        match bucket {
            Some(b) => self.replay(b, &shape)?,
            None => self.run(&shape)?,
        }
        // Queued overlapped slot copies start now, behind this pass's uploads.
        if let Some(lora) = &mut self.lora {
            lora.issue_copies(&self.gpu)?;
        }
        Ok(out)
    }

    /// The decode graph bucket a step of `rows` decode rows pads to; None above
    /// `--cuda-graph-max-bs` (or with graphs off).
    fn graph_bucket(&self, rows: usize) -> Option<usize> {
        graph_buckets(self.opts.cuda_graph_max_bs)
            .into_iter()
            .find(|&b| b >= rows)
    }

    fn replay(&mut self, bucket: usize, shape: &StepShape) -> Result<()> {
        let key = (bucket, shape.lora);
        if !self.graphs.contains_key(&key) {
            let stream = self.gpu.stream.clone();
            stream
                .begin_capture(drv::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(|e| Error::Model(format!("CUDA: beginning graph capture: {e}")))?;
            let ran = self.run(shape);
            let graph = DecodeGraph::end_capture(&stream, &self.gpu.kernels, self.opts.programmatic_launch);
            ran?;
            let graph = graph?;
            tracing::debug!(
                bucket,
                lora = shape.lora,
                programmatic_edges = graph.programmatic_edges,
                "captured a decode graph"
            );
            self.graphs.insert(key, graph);
        }
        self.last_graph = Some(key);
        self.graphs[&key].launch()
    }

    /// Times `n` back-to-back replays of the decode graph that a step of `rows` rows takes, on
    /// the metadata of the last step (a step of that many rows): the step's device time without
    /// the host's part (building and uploading the metadata, the argmax and the copy of the ids
    /// back). Ms per replay.
    pub fn time_graph_replays(&mut self, rows: usize, n: usize) -> Result<f64> {
        // An eager step clears `last_graph`, so the metadata is the graph step's.
        let key = self
            .last_graph
            .filter(|&(b, _)| self.graph_bucket(rows) == Some(b))
            .ok_or_else(|| Error::Model(format!("the last step did not replay a graph of {rows} rows")))?;
        self.gpu.sync()?;
        let t0 = std::time::Instant::now();
        let graph = &self.graphs[&key]; // a step replayed it, and nothing dropped it since
        for _ in 0..n {
            graph.launch()?;
        }
        self.gpu.sync()?;
        Ok(t0.elapsed().as_secs_f64() * 1e3 / n.max(1) as f64)
    }

    /// One forward pass returning each sequence's wanted logits on the host (as the CPU model).
    pub fn forward(&mut self, kv: &KvCache, seqs: &[SeqInput<'_>]) -> Result<Vec<Vec<f32>>> {
        self.forward_sampled(kv, seqs, &vec![None; seqs.len()])?
            .into_iter()
            .map(|o| match o {
                SeqOutput::Logits(l) => Ok(l),
                SeqOutput::Sampled(_) => Err(Error::Model("a sequence was sampled unasked".into())),
            })
            .collect()
    }

    /// One forward pass in which each sequence with `Some` in `sampling` gets its next token
    /// sampled on the device (only the token and its log-probability cross to the host) and every
    /// other sequence its wanted logits, as [`CudaLlama::forward`] returns them.
    pub fn forward_sampled(
        &mut self,
        kv: &KvCache,
        seqs: &[SeqInput<'_>],
        sampling: &[Option<DeviceSample>],
    ) -> Result<Vec<SeqOutput>> {
        check_sampling(seqs, sampling)?;
        let out = self.step(kv, seqs)?;
        split_outputs(
            &self.gpu,
            &self.bufs.logits,
            self.config.vocab_size,
            &out.per_seq,
            sampling,
        )
    }

    /// Starts a forward pass whose device-sampled tokens [`CudaLlama::collect_sampled`]
    /// returns; see [`Forward::launch_sampled`](crate::model::Forward::launch_sampled). Nothing
    /// here waits for the device, so the host can prepare the next step (whose inputs may be
    /// this one's [`pending_token`](crate::model::pending_token)s) while this one runs.
    pub fn launch_sampled(
        &mut self,
        kv: &KvCache,
        seqs: &[SeqInput<'_>],
        sampling: &[Option<DeviceSample>],
    ) -> Result<()> {
        let seq_slots = self.assign_slots(seqs)?;
        self.launch_sampled_in_slots(kv, seqs, &seq_slots, sampling)
    }

    /// [`CudaLlama::launch_sampled`] with each sequence's LoRA slot given, as
    /// [`CudaLlama::forward_greedy_in_slots`] takes them.
    pub fn launch_sampled_in_slots(
        &mut self,
        kv: &KvCache,
        seqs: &[SeqInput<'_>],
        seq_slots: &[i32],
        sampling: &[Option<DeviceSample>],
    ) -> Result<()> {
        check_sampling(seqs, sampling)?;
        check_launchable(seqs, sampling)?;
        let out = self.step_with_slots(kv, seqs, seq_slots)?;
        let logits = self.gpu.ptr(&self.bufs.logits);
        self.pipe
            .launch(&self.gpu, logits, self.config.vocab_size, &out.per_seq, sampling)
    }

    /// The tokens of the oldest uncollected [`CudaLlama::launch_sampled`] step; waits for them.
    pub fn collect_sampled(&mut self) -> Result<Vec<SeqOutput>> {
        self.pipe.collect()
    }

    /// One forward pass returning each sequence's greedy next token, chosen on the device (only
    /// the ids cross to the host). Every sequence must want its last logits.
    pub fn forward_greedy(&mut self, kv: &KvCache, seqs: &[SeqInput<'_>]) -> Result<Vec<u32>> {
        let seq_slots = self.assign_slots(seqs)?;
        self.forward_greedy_in_slots(kv, seqs, &seq_slots)
    }

    /// [`CudaLlama::forward_greedy`] with each sequence's LoRA slot given (-1: base model), for
    /// slots filled by [`CudaLlama::dummy_adapter_in_slot`]; `SeqInput::adapter` is ignored.
    pub fn forward_greedy_in_slots(
        &mut self,
        kv: &KvCache,
        seqs: &[SeqInput<'_>],
        seq_slots: &[i32],
    ) -> Result<Vec<u32>> {
        if seqs
            .iter()
            .any(|s| s.logits != LogitsWanted::Last || s.tokens.is_empty())
        {
            return Err(Error::InvalidRequest(
                "greedy steps need the last logits of every sequence".into(),
            ));
        }
        let out = self.step_with_slots(kv, seqs, seq_slots)?;
        let rows = out.per_seq.iter().map(|p| p.0 + 1).max().unwrap_or(0);
        let gpu = &self.gpu;
        launch!(
            gpu,
            "argmax_f32",
            (rows as u32, 1, 1),
            (1024, 1, 1),
            gpu.ptr(&self.bufs.argmax),
            gpu.ptr(&self.bufs.logits),
            self.config.vocab_size as i32
        )?;
        let ids = gpu.download(&self.bufs.argmax, rows)?;
        Ok(out.per_seq.iter().map(|&(first, _)| ids[first] as u32).collect())
    }
}

impl CudaModel {
    /// Uploads `host` in `opts.dtype`.
    pub fn from_host(gpu: Arc<Gpu>, host: &LlamaModel, opts: CudaOptions) -> Result<Self> {
        Ok(match opts.dtype {
            DeviceDtype::Float32 => Self::F32(Box::new(CudaLlama::from_host(gpu, host, opts)?)),
            DeviceDtype::Bfloat16 => Self::Bf16(Box::new(CudaLlama::from_host(gpu, host, opts)?)),
            DeviceDtype::Float16 => Self::F16(Box::new(CudaLlama::from_host(gpu, host, opts)?)),
        })
    }

    /// Random weights on the device.
    pub fn dummy(gpu: Arc<Gpu>, config: ModelConfig, opts: CudaOptions, seed: u64) -> Result<Self> {
        Ok(match opts.dtype {
            DeviceDtype::Float32 => Self::F32(Box::new(CudaLlama::dummy(gpu, config, opts, seed)?)),
            DeviceDtype::Bfloat16 => Self::Bf16(Box::new(CudaLlama::dummy(gpu, config, opts, seed)?)),
            DeviceDtype::Float16 => Self::F16(Box::new(CudaLlama::dummy(gpu, config, opts, seed)?)),
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        each_dtype!(self, m => m.config())
    }

    /// A block manager matching the device cache.
    pub fn new_kv_cache(&self) -> KvCache {
        each_dtype!(self, m => m.new_kv_cache())
    }

    /// See [`CudaLlama::forward`].
    pub fn forward(&mut self, kv: &KvCache, seqs: &[SeqInput<'_>]) -> Result<Vec<Vec<f32>>> {
        each_dtype!(self, m => m.forward(kv, seqs))
    }

    /// See [`CudaLlama::forward_sampled`].
    pub fn forward_sampled(
        &mut self,
        kv: &KvCache,
        seqs: &[SeqInput<'_>],
        sampling: &[Option<DeviceSample>],
    ) -> Result<Vec<SeqOutput>> {
        each_dtype!(self, m => m.forward_sampled(kv, seqs, sampling))
    }

    /// See [`CudaLlama::launch_sampled`].
    pub fn launch_sampled(
        &mut self,
        kv: &KvCache,
        seqs: &[SeqInput<'_>],
        sampling: &[Option<DeviceSample>],
    ) -> Result<()> {
        each_dtype!(self, m => m.launch_sampled(kv, seqs, sampling))
    }

    /// See [`CudaLlama::launch_sampled_in_slots`].
    pub fn launch_sampled_in_slots(
        &mut self,
        kv: &KvCache,
        seqs: &[SeqInput<'_>],
        slots: &[i32],
        sampling: &[Option<DeviceSample>],
    ) -> Result<()> {
        each_dtype!(self, m => m.launch_sampled_in_slots(kv, seqs, slots, sampling))
    }

    /// See [`CudaLlama::collect_sampled`].
    pub fn collect_sampled(&mut self) -> Result<Vec<SeqOutput>> {
        each_dtype!(self, m => m.collect_sampled())
    }

    /// See [`CudaLlama::forward_greedy`].
    pub fn forward_greedy(&mut self, kv: &KvCache, seqs: &[SeqInput<'_>]) -> Result<Vec<u32>> {
        each_dtype!(self, m => m.forward_greedy(kv, seqs))
    }

    /// See [`CudaLlama::forward_greedy_in_slots`].
    pub fn forward_greedy_in_slots(
        &mut self,
        kv: &KvCache,
        seqs: &[SeqInput<'_>],
        slots: &[i32],
    ) -> Result<Vec<u32>> {
        each_dtype!(self, m => m.forward_greedy_in_slots(kv, seqs, slots))
    }

    /// See [`CudaLlama::load_slot`].
    pub fn load_slot(&mut self, slot: usize, adapter: &Arc<LoraAdapter>, overlap: bool) -> Result<()> {
        each_dtype!(self, m => m.load_slot(slot, adapter, overlap))
    }

    /// See [`CudaLlama::slot_ready`].
    pub fn slot_ready(&mut self, slot: usize, wait: bool) -> Result<bool> {
        each_dtype!(self, m => m.slot_ready(slot, wait))
    }

    /// See [`CudaLlama::stage_adapter`].
    pub fn stage_adapter(&mut self, adapter: &Arc<LoraAdapter>) -> Result<()> {
        each_dtype!(self, m => m.stage_adapter(adapter))
    }

    /// See [`CudaLlama::unstage_adapter`].
    pub fn unstage_adapter(&mut self, adapter_id: u64) {
        each_dtype!(self, m => m.unstage_adapter(adapter_id))
    }

    /// See [`CudaLlama::fail_staging`] (fault injection for checks).
    #[doc(hidden)]
    pub fn fail_staging(&mut self, fail: bool) -> Result<()> {
        each_dtype!(self, m => m.fail_staging(fail))
    }

    /// See [`CudaLlama::dummy_adapter_in_slot`].
    pub fn dummy_adapter_in_slot(
        &mut self,
        slot: usize,
        rank: usize,
        targets: &[LoraTarget],
        seed: u64,
    ) -> Result<()> {
        each_dtype!(self, m => m.dummy_adapter_in_slot(slot, rank, targets, seed))
    }

    /// Waits for the device.
    pub fn sync(&self) -> Result<()> {
        each_dtype!(self, m => m.gpu().sync())
    }

    /// Device bytes of the LoRA slot pool.
    pub fn lora_pool_bytes(&self) -> usize {
        each_dtype!(self, m => m.lora_pool_bytes())
    }

    /// See [`CudaLlama::kv_tokens`].
    pub fn kv_tokens(&self) -> usize {
        each_dtype!(self, m => m.kv_tokens())
    }

    /// See [`CudaLlama::kv_cache_bytes`].
    pub fn kv_cache_bytes(&self) -> usize {
        each_dtype!(self, m => m.kv_cache_bytes())
    }

    /// Programmatic edges over the decode graphs captured so far (0 without programmatic launch).
    pub fn programmatic_edges(&self) -> usize {
        each_dtype!(self, m => m.programmatic_edges())
    }

    /// See [`CudaLlama::graph_decode_gemms`].
    pub fn graph_decode_gemms(&self) -> BTreeMap<usize, usize> {
        each_dtype!(self, m => m.graph_decode_gemms())
    }

    /// See [`CudaLlama::decode_gemm_groups`].
    pub fn decode_gemm_groups(&self) -> Vec<&'static str> {
        each_dtype!(self, m => m.decode_gemm_groups())
    }

    /// See [`CudaLlama::time_graph_replays`].
    pub fn time_graph_replays(&mut self, rows: usize, n: usize) -> Result<f64> {
        each_dtype!(self, m => m.time_graph_replays(rows, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_table_copy_takes_the_used_columns_of_each_row() {
        let host = [0i32; 40];
        let c = rows_copy(host[8..].as_ptr(), 0x1000, 16, 8, 2);
        assert_eq!((c.srcPitch, c.dstPitch, c.WidthInBytes, c.Height), (16, 16, 8, 2));
        assert_eq!(
            (c.srcHost as usize, c.dstDevice),
            (host[8..].as_ptr() as usize, 0x1000)
        );
        assert_eq!((c.srcXInBytes, c.srcY, c.dstXInBytes, c.dstY), (0, 0, 0, 0));
    }

    #[test]
    fn the_kv_cache_gets_what_the_memory_fraction_leaves() {
        const GB: usize = 1_000_000_000;
        // Llama-3.1-8B in bf16: 16 tokens a block, 128 KB a token over 32 layers.
        let block = 16 * 1024 * 2 * 2 * 32;
        // 80 GB, 30 GB in use after weights and pool: 0.875 leaves 40 GB, less the spare block.
        assert_eq!(
            kv_blocks_that_fit(50 * GB, 80 * GB, 0.875, block),
            40 * GB / block - 1
        );
        // Already past the fraction (another process, a large pool): nothing.
        assert_eq!(kv_blocks_that_fit(5 * GB, 80 * GB, 0.9, block), 0);
        assert_eq!(kv_blocks_that_fit(8 * GB, 80 * GB, 0.9, block), 0);
        // Room for the spare block alone is no room.
        assert_eq!(kv_blocks_that_fit(block, 2 * block, 1.0, block), 0);
        assert_eq!(kv_blocks_that_fit(2 * block, 3 * block, 1.0, block), 1);
    }

    #[test]
    fn tensor_core_lora_takes_the_llama_and_smollm2_widths_and_not_the_others() {
        // Llama-3.1-8B: q/k/v, o, gate/up, down.
        assert!(lora_mma_takes(4096, &[4096, 1024, 1024], 64));
        assert!(lora_mma_takes(4096, &[14336, 14336], 16));
        assert!(lora_mma_takes(14336, &[4096], 256));
        // SmolLM2-135M: hidden 576, kv 192, intermediate 1536.
        assert!(lora_mma_takes(576, &[576, 192, 192], 8));
        assert!(lora_mma_takes(1536, &[576], 8));
        // An output width that would split a 64-column warp between targets, an input that is
        // not whole 32-wide chunks, a pool rank whose staged y would not fit.
        assert!(!lora_mma_takes(64, &[64, 32, 32], 16));
        assert!(!lora_mma_takes(144, &[64], 16));
        assert!(!lora_mma_takes(4096, &[4096], 257));
    }

    #[test]
    fn tensor_core_expand_blocks_walk_more_column_groups_only_when_there_are_many_blocks() {
        // Batch 1 and 8: one group per block, whatever the width.
        assert_eq!(lora_mma_expand_groups(56, 1), (1, 1));
        assert_eq!(lora_mma_expand_groups(56, 8), (1, 1));
        // Batch 64 with 64 items: gate/up (56 groups of 512 columns) walks 4, o/down (8) 1,
        // and 2 for single-row items; q/k/v (12) 1, and 3 for single-row items.
        assert_eq!(lora_mma_expand_groups(56, 64), (4, 4));
        assert_eq!(lora_mma_expand_groups(8, 64), (1, 2));
        assert_eq!(lora_mma_expand_groups(12, 64), (1, 3));
        // Short items walk a multiple of the long ones' groups.
        assert_eq!(lora_mma_expand_groups(56, 32), (3, 3));
        assert_eq!(lora_mma_expand_groups(24, 64), (3, 3));
    }

    /// The items for sequences given as (rows, slot), laid out back to back from row 0.
    fn items_for(seqs: &[(usize, i32)], mode: LoraKernelMode, step_rows: usize) -> Vec<[i32; 3]> {
        let mut items = Vec::new();
        let mut row = 0;
        for &(n, slot) in seqs {
            push_work_items(
                &mut items,
                (row, n, slot),
                mode,
                decode_merge_rows(step_rows, false),
            );
            row += n;
        }
        items
    }

    #[test]
    fn tensor_core_shrink_splits_the_rank_only_for_a_single_item() {
        assert_eq!(lora_mma_shrink_rank_groups(64, 1), 4);
        assert_eq!(lora_mma_shrink_rank_groups(16, 1), 1);
        assert_eq!(lora_mma_shrink_rank_groups(20, 1), 2);
        assert_eq!(lora_mma_shrink_rank_groups(64, 2), 1);
        assert_eq!(lora_mma_shrink_rank_groups(256, 64), 1);
    }

    #[test]
    fn attention_splits_fill_few_rows_and_fit_the_partials() {
        assert_eq!(attention_splits(1, 8), ATTENTION_MAX_SPLITS);
        assert_eq!(attention_splits(8, 8), 4);
        assert_eq!(attention_splits(16, 8), 2);
        assert_eq!(attention_splits(17, 8), 1);
        assert_eq!(attention_splits(64, 8), 1);
        for rows in 1..300 {
            for kv_heads in [1, 2, 4, 8, 32] {
                let s = attention_splits(rows, kv_heads);
                assert!(s >= 1);
                assert!(s == 1 || rows * kv_heads * s <= ATTENTION_SPLIT_BLOCKS);
            }
        }
    }

    #[test]
    fn per_sequence_items_are_whole_sequences() {
        let got = items_for(&[(40, 2), (1, 2), (3, 5)], LoraKernelMode::PerSequence, 44);
        assert_eq!(got, vec![[0, 40, 2], [40, 1, 2], [41, 3, 5]]);
    }

    #[test]
    fn chunked_prefill_rows_are_cut_at_the_chunk_and_extended_by_the_same_adapter() {
        // 40 rows in chunks of 16, then 5 more rows of the same adapter fill the short chunk
        // first; another adapter starts its own item.
        let got = items_for(&[(40, 1), (5, 1), (3, 7)], LoraKernelMode::Chunked(16), 48);
        assert_eq!(got, vec![[0, 16, 1], [16, 16, 1], [32, 13, 1], [45, 3, 7]]);
    }

    #[test]
    fn small_decode_batches_give_each_row_its_own_item() {
        let seqs = vec![(1, 3); DECODE_MERGE_MIN_BATCH - 1];
        let got = items_for(&seqs, LoraKernelMode::Chunked(16), seqs.len());
        assert_eq!(got.len(), seqs.len());
        assert!(got.iter().enumerate().all(|(i, it)| *it == [i as i32, 1, 3]));
    }

    #[test]
    fn large_decode_batches_merge_rows_of_one_adapter() {
        // Sorted by slot as the chunked scheme orders them: 6 rows of slot 0, 3 of slot 4,
        // padded with rows of the base model (no items) up to the batch.
        let mut seqs = vec![(1, 0); 6];
        seqs.extend([(1, 4); 3]);
        let got = items_for(&seqs, LoraKernelMode::Chunked(16), DECODE_MERGE_MIN_BATCH);
        assert_eq!(got, vec![[0, DECODE_MERGE_ROWS as i32, 0], [4, 2, 0], [6, 3, 4]]);
    }

    #[test]
    fn tensor_core_items_take_a_quarter_of_the_batch_up_to_one_pass() {
        assert_eq!(decode_merge_rows(DECODE_MERGE_MIN_BATCH_MMA - 1, true), 1);
        assert_eq!(decode_merge_rows(8, true), 4);
        assert_eq!(decode_merge_rows(16, true), 4);
        assert_eq!(decode_merge_rows(31, false), 1);
        assert_eq!(decode_merge_rows(32, true), 8);
        assert_eq!(decode_merge_rows(64, true), 16);
        assert_eq!(decode_merge_rows(256, true), DECODE_MERGE_ROWS_MMA);
        assert_eq!(decode_merge_rows(256, false), DECODE_MERGE_ROWS);
    }

    #[test]
    fn lora_decode_steps_leave_cublas_fewer_sms_above_64_rows() {
        assert_eq!(lora_decode_blas_sms(64, 132), None);
        assert_eq!(lora_decode_blas_sms(96, 132), Some(96));
        assert_eq!(lora_decode_blas_sms(128, 132), Some(96));
        assert_eq!(lora_decode_blas_sms(160, 132), Some(120));
        assert_eq!(lora_decode_blas_sms(256, 132), Some(120));
        // Other GPUs keep the same shares.
        assert_eq!(lora_decode_blas_sms(256, 114), Some(103));
    }

    #[test]
    fn lora_decode_steps_plan_o_for_fewer_sms_from_17_to_64_rows() {
        // Up to 16 rows the decode GEMMs take o; above 64 every GEMM has the step's target.
        assert_eq!(lora_decode_o_blas_sms(16, 132), None);
        assert_eq!(lora_decode_o_blas_sms(17, 132), Some(96));
        assert_eq!(lora_decode_o_blas_sms(64, 132), Some(96));
        assert_eq!(lora_decode_o_blas_sms(65, 132), None);
        assert_eq!(lora_decode_o_blas_sms(32, 114), Some(82));
    }

    #[test]
    fn only_lora_decode_steps_take_sm_targets() {
        let shape = |rows, lora_decode| StepShape {
            rows,
            items: rows,
            wanted: rows,
            lora: true,
            paged: true,
            lora_delta: true,
            programmatic: true,
            lora_decode,
        };
        for rows in [32, 64, 128] {
            let s = shape(rows, false);
            assert_eq!((s.blas_sms(132), s.o_blas_sms(132)), (None, None), "{rows} rows");
        }
        let s = shape(64, true);
        assert_eq!((s.blas_sms(132), s.o_blas_sms(132)), (None, Some(96)));
        let s = shape(128, true);
        assert_eq!((s.blas_sms(132), s.o_blas_sms(132)), (Some(96), None));
    }
}
