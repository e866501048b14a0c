// Decode-shaped GEMMs on Hopper (sm_90a): out[r, :] = beta * out[r, :] + x[r, :] . Wᵀ for at
// most 64 rows r (tokens), the weight W [n, k] row-major, bf16 or f16. Compiled after llama.cu
// (to_f/from_f, pdl_trigger/pdl_wait) and flash_attention.cu (smem_addr).
//
// Why: a decode step is a stream of weights, and at 64 rows cuBLAS reads them at 2.1-2.7 TB/s
// against about 3.0 for a plain stream, while an mma.sync kernel (branch wip/decode-gemm) ran out
// of issue slots at 64 rows. Here one thread moves each stage with two TMA copies (the weight
// tile marked evict-first in L2) and one warpgroup multiplies it with wgmma straight from shared
// memory, so the SM's issue slots stay free and many stages stay in flight.
//
// Shapes: the weight rows are wgmma's M (two 64-row halves make a 128-row tile) and the tokens
// its N (TOK = 8, 16, 32 or 64 columns), so one weight tile serves every token. A stage is the
// weight tile [128][64 k] and the x tile [TOK][64 k], each row 128 bytes in TMA's 128-byte
// swizzle, which is wgmma's K-major SW128 layout. Rows of W or x past the tensor maps' bounds
// (n, the x buffer's rows, k) arrive as zeros.
//
// Work split (stream-K): the (tile, 64-k block) units, tile-major, are cut into gridDim.x equal
// ranges, one per block, so every block streams the same bytes whatever n/128 is. A tile whose
// k range one block covers is written directly; otherwise each block that has part of it writes
// an f32 partial to ws, and the last of them to arrive (a counter per tile, left at zero for
// the next call) adds the partials in block order, so results do not depend on scheduling. No
// block waits for another, so the kernel cannot deadlock beside other kernels.
//
// Split tiles (SPLIT > 1, whole tiles only): a tile's k range is cut over the SPLIT blocks of
// one thread-block cluster, which the hardware runs together. Each block but the first writes
// its sums into the first one's shared memory (distributed shared memory, no trip to global
// memory), and the first adds them in rank order and stores the tile. This is for projections
// too narrow to fill the GPU with whole tiles (o and down of Llama-3.1-8B: 64 tiles of 64 rows).

#define DG_HALF 64      // weight rows per wgmma (M); a tile has MH of them
#define DG_BK 64        // k per unit: one 128-byte swizzled row
#define DG_THREADS 128  // one warpgroup

#define DG_REGS4 "{%0,%1,%2,%3}"
#define DG_REGS8 "{%0,%1,%2,%3,%4,%5,%6,%7}"
#define DG_REGS16 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}"
#define DG_REGS32 \
    "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}"
#define DG_F4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define DG_F8(i) DG_F4(i), DG_F4(i + 4)
#define DG_F16(i) DG_F8(i), DG_F8(i + 8)
#define DG_F32(i) DG_F16(i), DG_F16(i + 16)

// d (+)= A . Bᵀ for a 64 x 16 A and an N x 16 B, both K-major in shared memory (descriptors);
// acc 0 overwrites d.
template <typename T, int N> struct Wgmma;
#define DG_WGMMA(T, S, N, REGS, OPS, A, B, P)                                                                    \
    template <> struct Wgmma<T, N> {                                                                             \
        static __device__ __forceinline__ void run(float* d, unsigned long long a, unsigned long long b, int acc) { \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " P ", 0;\nwgmma.mma_async.sync.aligned.m64n" #N        \
                         "k16.f32." S "." S " " REGS ", " A ", " B ", p, 1, 1, 0, 0;\n}\n"                          \
                         : OPS                                                                                   \
                         : "l"(a), "l"(b), "r"(acc));                                                            \
        }                                                                                                        \
    };
#define DG_WGMMAS(T, S)                                                  \
    DG_WGMMA(T, S, 8, DG_REGS4, DG_F4(0), "%4", "%5", "%6")              \
    DG_WGMMA(T, S, 16, DG_REGS8, DG_F8(0), "%8", "%9", "%10")            \
    DG_WGMMA(T, S, 32, DG_REGS16, DG_F16(0), "%16", "%17", "%18")        \
    DG_WGMMA(T, S, 64, DG_REGS32, DG_F32(0), "%32", "%33", "%34")
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
DG_WGMMAS(__nv_bfloat16, "bf16")
DG_WGMMAS(__half, "f16")
#endif

// Shared-memory matrix descriptor of a K-major tile in the 128-byte swizzle: rows of 128 bytes,
// 8-row groups 1024 bytes apart (the tile starts 1024-byte aligned; a k step of 16 moves the
// start by 32 bytes within the swizzled row).
__device__ __forceinline__ unsigned long long dg_desc(unsigned addr) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | (1ull << 16) | ((unsigned long long)(1024 >> 4) << 32) |
           (1ull << 62);
}

__device__ __forceinline__ void dg_bar_init(unsigned bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void dg_bar_expect(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void dg_bar_wait(unsigned bar, unsigned parity) {
    unsigned done;
    do {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!done);
}
// One 2D box of the tensor map at `map` (global memory) at (inner c0, outer c1) into shared dst.
__device__ __forceinline__ void dg_tma(unsigned dst, const void* map, int c0, int c1, unsigned bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
        "[%4];\n" ::"r"(dst),
        "l"(map), "r"(c0), "r"(c1), "r"(bar)
        : "memory");
}
__device__ __forceinline__ void dg_tma_evict_first(unsigned dst, const void* map, int c0, int c1, unsigned bar,
                                                   unsigned long long policy) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1, "
        "{%2, %3}], [%4], %5;\n" ::"r"(dst),
        "l"(map), "r"(c0), "r"(c1), "r"(bar), "l"(policy)
        : "memory");
}
// Keeps the compiler from moving accumulator reads above a wgmma wait.
__device__ __forceinline__ void dg_fence_reg(float& r) { asm volatile("" : "+f"(r)::"memory"); }

__device__ __forceinline__ void dg_cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

// The block whose unit range holds unit u, when units 0..U are cut into G ranges
// [c U / G, (c + 1) U / G).
__device__ __forceinline__ int dg_owner(long long u, long long U, long long G) {
    return (int)(((u + 1) * G + U - 1) / U - 1);
}

// O is the output type: T, or float for the LM head's logits (the sampling kernels read f32).
// SILU (whole 128-row tiles, MH = 2, beta 0): the weight is gate/up, [gate; up] of n / 2 rows
// each, and the weight map's boxes are 64 rows. Tile t takes gate rows 64t.. in its first half
// and up rows n / 2 + 64t.. in its second, so each thread holds matching gate and up sums, and
// the tile stores silu(gate) * up (silu_mul's roundings) into out [rows, n / 2] instead.
template <typename T, int TOK, int MH, int SPLIT, bool SILU = false, typename O = T>
__device__ void decode_gemm(const void* wmap, const void* xmap, O* out, int ld_out, int rows, int n, int k,
                            float beta, int stages, int ku, int evict, float* ws, unsigned* counters) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int DG_BN = DG_HALF * MH, W_BYTES = DG_BN * DG_BK * 2, X_BYTES = TOK * DG_BK * 2, ACC = TOK / 2;
    const int STAGE = ku * (W_BYTES + X_BYTES);
    extern __shared__ __align__(16) unsigned char dg_smem[];
    __shared__ unsigned long long bars[16];
    __shared__ int last;
    const unsigned base = (smem_addr(dg_smem) + 1023) & ~1023u;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int kblocks = (k + DG_BK - 1) / DG_BK, kb_n = (kblocks + ku - 1) / ku, tiles = (n + DG_BN - 1) / DG_BN;
    const long long U = (long long)tiles * kb_n, G = gridDim.x;
    const int c = blockIdx.x;
    const int u0 = (int)(c * U / G), units = (int)((c + 1) * U / G) - u0;
    const unsigned bar0 = smem_addr(bars);
    if (tid == 0) {
        for (int s = 0; s < stages; s++) dg_bar_init(bar0 + 8 * s);
        asm volatile("fence.mbarrier_init.release.cluster;\nfence.proxy.async.shared::cta;\n" ::: "memory");
        asm volatile("prefetch.tensormap [%0];\nprefetch.tensormap [%1];\n" ::"l"(wmap), "l"(xmap) : "memory");
    }
    __syncthreads();
    unsigned long long policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
    // Unit u0 + i into stage i % stages: its weight blocks (which no kernel writes), then its x
    // blocks (which the kernel before this one may still be writing).
    auto issue_w = [&](int i) {
        int u = u0 + i, s = i % stages;
        int kb0 = (u % kb_n) * ku, nk = min(ku, kblocks - kb0);
        unsigned st = base + s * STAGE, bar = bar0 + 8 * s;
        dg_bar_expect(bar, nk * (W_BYTES + X_BYTES));
        for (int j = 0; j < nk; j++) {
            // SILU: the tile's halves come from the gate and the up rows (64-row boxes).
#pragma unroll
            for (int b = 0; b < (SILU ? 2 : 1); b++) {
                const int row0 = SILU ? b * (n / 2) + (u / kb_n) * DG_HALF : (u / kb_n) * DG_BN;
                const unsigned dst = st + j * W_BYTES + b * (W_BYTES / 2);
                if (evict)
                    dg_tma_evict_first(dst, wmap, (kb0 + j) * DG_BK, row0, bar, policy);
                else
                    dg_tma(dst, wmap, (kb0 + j) * DG_BK, row0, bar);
            }
        }
    };
    auto issue_x = [&](int i) {
        int u = u0 + i, s = i % stages;
        int kb0 = (u % kb_n) * ku, nk = min(ku, kblocks - kb0);
        unsigned st = base + s * STAGE, bar = bar0 + 8 * s;
        for (int j = 0; j < nk; j++) dg_tma(st + ku * W_BYTES + j * X_BYTES, xmap, (kb0 + j) * DG_BK, 0, bar);
    };
    // The first stages' weights stream in while the previous kernel drains (programmatic
    // launch); x, out, ws and the counters only after it has finished.
    if (tid == 0)
        for (int i = 0; i < min(stages, units); i++) issue_w(i);
    pdl_wait();
    if (tid == 0)
        for (int i = 0; i < min(stages, units); i++) issue_x(i);

    float acc[MH][ACC];
#pragma unroll
    for (int h = 0; h < MH; h++)
#pragma unroll
        for (int j = 0; j < ACC; j++) acc[h][j] = 0.f;
    // The output column and token of accumulator j of half h (wgmma's D fragment layout).
    auto col_of = [&](int h, int j) { return 64 * h + 16 * warp + (lane >> 2) + 8 * ((j & 3) >> 1); };
    auto tok_of = [&](int j) { return 8 * (j >> 2) + 2 * (lane & 3) + (j & 1); };
    auto store = [&](int t, float (*v)[ACC]) {
        if (SILU) {
#pragma unroll
            for (int j = 0; j < ACC; j++) {
                int col = t * DG_HALF + col_of(0, j), r = tok_of(j);
                if (r < rows && col < n / 2)
                    out[(size_t)r * ld_out + col] =
                        from_f<O>(to_f(silu_mul_one<T>(from_f<T>(v[0][j]), from_f<T>(v[MH - 1][j]))));
            }
            return;
        }
#pragma unroll
        for (int h = 0; h < MH; h++)
#pragma unroll
            for (int j = 0; j < ACC; j++) {
                int col = t * DG_BN + col_of(h, j), r = tok_of(j);
                if (r < rows && col < n) {
                    O* o = out + (size_t)r * ld_out + col;
                    *o = from_f<O>(beta == 0.f ? v[h][j] : beta * to_f(*o) + v[h][j]);
                }
            }
    };
    bool fresh = true;  // the next unit starts this block's part of a tile
    for (int i = 0; i < units; i++) {
        const int u = u0 + i, s = i % stages, t = u / kb_n, kb = u % kb_n;
        dg_bar_wait(bar0 + 8 * s, (i / stages) & 1);
        const int nk = min(ku, kblocks - kb * ku);
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll 1
        for (int j = 0; j < nk; j++) {
            const unsigned wt = base + s * STAGE + j * W_BYTES, xt = base + s * STAGE + ku * W_BYTES + j * X_BYTES;
#pragma unroll
            for (int kk = 0; kk < DG_BK / 16; kk++) {
                int accumulate = !(fresh && j == 0 && kk == 0);
#pragma unroll
                for (int h = 0; h < MH; h++)
                    Wgmma<T, TOK>::run(acc[h], dg_desc(wt + h * (W_BYTES / MH) + 32 * kk), dg_desc(xt + 32 * kk),
                                       accumulate);
            }
        }
        asm volatile("wgmma.commit_group.sync.aligned;\nwgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#pragma unroll
        for (int h = 0; h < MH; h++)
#pragma unroll
            for (int j = 0; j < ACC; j++) dg_fence_reg(acc[h][j]);
        fresh = false;
        __syncthreads();  // every warp is done with stage s
        if (tid == 0 && i + stages < units) {
            issue_w(i + stages);
            issue_x(i + stages);
        }
        if (kb != kb_n - 1 && i != units - 1) continue;
        // This block's part of tile t ends here (split tiles: its last unit; added below).
        if (SPLIT > 1) break;
        fresh = true;
        const int first = dg_owner((long long)t * kb_n, U, G), final_ = dg_owner((long long)t * kb_n + kb_n - 1, U, G);
        if (first == final_) {
            store(t, acc);
            continue;
        }
        // Partial: slot 0 holds the tile a block starts in, slot 1 the tile it ends in.
        auto slot_of = [&](int b) { return (int)((b * U / G) / kb_n) == t ? 0 : 1; };
        float* mine = ws + (size_t)(2 * c + slot_of(c)) * DG_THREADS * MH * ACC;
#pragma unroll
        for (int h = 0; h < MH; h++)
#pragma unroll
            for (int j = 0; j < ACC; j++) mine[(h * ACC + j) * DG_THREADS + tid] = acc[h][j];
        __threadfence();
        __syncthreads();
        if (tid == 0) last = atomicAdd(counters + t, 1u) == (unsigned)(final_ - first);
        __syncthreads();
        if (!last) continue;
        __threadfence();
        float sum[MH][ACC];
#pragma unroll
        for (int h = 0; h < MH; h++)
#pragma unroll
            for (int j = 0; j < ACC; j++) sum[h][j] = 0.f;
        for (int b = first; b <= final_; b++) {
            const float* p = ws + (size_t)(2 * b + slot_of(b)) * DG_THREADS * MH * ACC;
#pragma unroll
            for (int h = 0; h < MH; h++)
#pragma unroll
                for (int j = 0; j < ACC; j++) sum[h][j] += __ldcg(p + (h * ACC + j) * DG_THREADS + tid);
        }
        store(t, sum);
        if (tid == 0) counters[t] = 0;
    }
    if (SPLIT > 1) {
        // Blocks c = SPLIT t + rank hold tile t's k ranges in rank order (the equal ranges of
        // tiles x SPLIT blocks never cross a tile). Every block is past its last stage, so the
        // first block's stages are free: the others write their sums there, then it adds them.
        unsigned rank;
        asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
        dg_cluster_sync();
        if (rank != 0) {
            unsigned dst;
            asm volatile("mapa.shared::cluster.u32 %0, %1, 0;\n" : "=r"(dst) : "r"(base));
            dst += (rank - 1) * MH * ACC * DG_THREADS * 4;
#pragma unroll
            for (int h = 0; h < MH; h++)
#pragma unroll
                for (int j = 0; j < ACC; j++)
                    asm volatile("st.shared::cluster.f32 [%0], %1;\n" ::"r"(dst + ((h * ACC + j) * DG_THREADS + tid) * 4),
                                 "f"(acc[h][j])
                                 : "memory");
        }
        dg_cluster_sync();
        if (rank == 0) {
            const float* sums = (const float*)(dg_smem + (base - smem_addr(dg_smem)));
            for (int r = 1; r < SPLIT; r++)
#pragma unroll
                for (int h = 0; h < MH; h++)
#pragma unroll
                    for (int j = 0; j < ACC; j++)
                        acc[h][j] += sums[((r - 1) * MH * ACC + h * ACC + j) * DG_THREADS + tid];
            store(u0 / kb_n, acc);
        }
    }
#endif
}

#define DECODE_GEMM_ARGS(O)                                                                                         \
    const void *wmap, const void *xmap, O *out, int ld_out, int rows, int n, int k, float beta, int stages, int ku, \
        int evict, float *ws, unsigned *counters
#define DECODE_GEMM(T, S, TOK, MH)                                                                                  \
    extern "C" __global__ void __launch_bounds__(DG_THREADS)                                                        \
        decode_gemm_##S##_t##TOK##_m##MH(DECODE_GEMM_ARGS(T)) {                                                     \
        pdl_trigger();                                                                                              \
        decode_gemm<T, TOK, MH, 1>(wmap, xmap, out, ld_out, rows, n, k, beta, stages, ku, evict, ws, counters);     \
    }
// Split tiles: 64-row tiles, k over the 2 blocks of a cluster (sm_90+; elsewhere the body is
// empty and the kernel never planned).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define DG_CLUSTER2 __cluster_dims__(2, 1, 1)
#else
#define DG_CLUSTER2
#endif
#define DECODE_GEMM_S2(T, S, TOK)                                                                                   \
    extern "C" __global__ void DG_CLUSTER2 __launch_bounds__(DG_THREADS)                                            \
        decode_gemm_##S##_t##TOK##_m1_s2(DECODE_GEMM_ARGS(T)) {                                                     \
        pdl_trigger();                                                                                              \
        decode_gemm<T, TOK, 1, 2>(wmap, xmap, out, ld_out, rows, n, k, beta, stages, ku, evict, ws, counters);      \
    }
#define DECODE_GEMMS_M(T, S, MH) \
    DECODE_GEMM(T, S, 8, MH)     \
    DECODE_GEMM(T, S, 16, MH)    \
    DECODE_GEMM(T, S, 32, MH)    \
    DECODE_GEMM(T, S, 64, MH)
// f32 output (the LM head's logits).
#define DECODE_GEMM_F32(T, S, TOK, MH)                                                                            \
    extern "C" __global__ void __launch_bounds__(DG_THREADS)                                                      \
        decode_gemm_##S##_t##TOK##_m##MH##_of32(DECODE_GEMM_ARGS(float)) {                                        \
        pdl_trigger();                                                                                            \
        decode_gemm<T, TOK, MH, 1, false, float>(wmap, xmap, out, ld_out, rows, n, k, beta, stages, ku, evict, ws, \
                                                 counters);                                                       \
    }
// Up to 32 tokens (DECODE_GEMM_LOGITS_MAX_ROWS in lib.rs).
#define DECODE_GEMMS_F32_M(T, S, MH) \
    DECODE_GEMM_F32(T, S, 8, MH)     \
    DECODE_GEMM_F32(T, S, 16, MH)    \
    DECODE_GEMM_F32(T, S, 32, MH)
// gate/up with silu_mul in the epilogue: 128-row tiles of 64 gate and 64 up rows.
#define DECODE_GEMM_SILU(T, S, TOK)                                                                                 \
    extern "C" __global__ void __launch_bounds__(DG_THREADS) decode_gemm_##S##_t##TOK##_m2_silu(                     \
        DECODE_GEMM_ARGS(T)) {                                                                                      \
        pdl_trigger();                                                                                              \
        decode_gemm<T, TOK, 2, 1, true>(wmap, xmap, out, ld_out, rows, n, k, beta, stages, ku, evict, ws, counters); \
    }
#define DECODE_GEMMS(T, S)     \
    DECODE_GEMMS_M(T, S, 1)    \
    DECODE_GEMMS_M(T, S, 2)    \
    DECODE_GEMMS_F32_M(T, S, 1) \
    DECODE_GEMMS_F32_M(T, S, 2) \
    DECODE_GEMM_SILU(T, S, 8)  \
    DECODE_GEMM_SILU(T, S, 16) \
    DECODE_GEMM_SILU(T, S, 32) \
    DECODE_GEMM_SILU(T, S, 64) \
    DECODE_GEMM_S2(T, S, 8)    \
    DECODE_GEMM_S2(T, S, 16)   \
    DECODE_GEMM_S2(T, S, 32)   \
    DECODE_GEMM_S2(T, S, 64)
DECODE_GEMMS(__nv_bfloat16, bf16)
DECODE_GEMMS(__half, f16)
