// Paged decode attention on tensor cores (bf16 and f16, head dims 16 to 128, up to 8 query heads
// per kv head), compiled after llama.cu (attention_finish, to_f/from_f) and flash_attention.cu
// (Mma, cp.async, ldmatrix). Same grid, arguments, split keys and partials as llama.cu's
// `attention`, which stays for f32 and other shapes.
//
// Why: the CUDA-core kernel spends about 180 instructions per key and warp (a shuffle tree per
// score, a rescale of the output per key), so at batch 64 it issued instructions, not loads, for
// most of its 31 us a layer (H100, 1.2 TB/s). Here the query heads of one kv group are the M
// rows of mma.sync m16n8k16 (at most 8 of 16 used: the tensor cores have room to waste), so a
// warp's 16 keys cost 2 KT + DN mmas, and the softmax rescales once per 16 keys.
//
// One block of DA_WARPS warps per (kv head, row, split). The block's keys go through shared
// memory DA_KEYS at a time with cp.async, in flash_attention's staggered K / V pipeline; warp w
// takes keys 16w .. 16w + 15 of each tile with its own running softmax, and the warps meet at the
// end in attention_finish (which also merges split keys).

#define DA_WARPS 4
#define DA_KEYS (DA_WARPS * 16)  // keys per shared tile
// A row's keys are split over at most one block per DA_SPLIT_MIN_KEYS keys, as in llama.cu: the
// merge of split blocks costs about what a tile's round trip does. On the H100, 64 and 128 made
// batch 1 at 128-token contexts slower (6.57 -> 6.63-6.77 ms) and helped nowhere by more than
// noise.
#define DA_SPLIT_MIN_KEYS 256
// Blocks per SM the kernel is compiled to fit. The d128 kernel spills 64 bytes a thread at 4;
// at 3 (148 registers, no spills) base steps at batches 32-128 moved by -0.04 to +0.08 ms (H100).
#ifndef DA_MIN_BLOCKS
#define DA_MIN_BLOCKS 4
#endif
#define DA_MAX_GROUP 8  // query heads per kv head: mma rows 0..7 (rows 8..15 stay zero)

// mma.sync m16n8k16 whose A rows 8..15 are zero and whose C rows 8..15 are not kept: c holds the
// thread's row g (c0, c1), a0 / a2 its A words. Saves the registers of half the accumulators.
template <typename T> struct MmaTop;
#define MMA_TOP(T, TY)                                                                                     \
    template <> struct MmaTop<T> {                                                                         \
        static __device__ __forceinline__ void run(float* c, unsigned a0, unsigned a2, const unsigned* b) {  \
            float x2, x3;                                                                                  \
            asm("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%5}, "     \
                "{%7,%8}, {%0,%1,%9,%9};\n"                                                                \
                : "+f"(c[0]), "+f"(c[1]), "=f"(x2), "=f"(x3)                                               \
                : "r"(a0), "r"(0u), "r"(a2), "r"(b[0]), "r"(b[1]), "f"(0.f));                              \
        }                                                                                                  \
    };
MMA_TOP(__nv_bfloat16, "bf16")
MMA_TOP(__half, "f16")

template <typename T, int D>
__device__ void decode_attention(T* out, const T* qkv, const T* k_cache, const T* v_cache, const int* positions,
                                 const int* row_seq, const int* block_tables, int max_blocks, int block_size,
                                 int n_heads, int n_kv_heads, float scale, int window, float* part,
                                 int* counters) {
    constexpr int LD = D + 8;   // padded shared row, in elements (conflict-free fragment loads)
    constexpr int KT = D / 16;  // k-steps of Q·Kᵀ
    constexpr int DN = D / 8;   // n-tiles of P·V
    // K and V tiles; after the loop, the warps' partials for attention_finish.
    __shared__ alignas(16) T kv_tiles[2 * DA_KEYS * LD];
    static_assert(sizeof(float) * DA_WARPS * DA_MAX_GROUP * (D + 2) <= sizeof(T) * 2 * DA_KEYS * LD,
                  "the merge area must fit in the tiles");
    __shared__ int key_slot[2][DA_KEYS];
    T* ks = kv_tiles;
    T* vs = kv_tiles + DA_KEYS * LD;
    int kvh = blockIdx.x, r = blockIdx.y;
    // Both loads before the branch: one round trip, not two.
    int seq = row_seq[r], pos = positions[r];
    if (seq < 0) return;
    int used, lo, hi;
    if (!split_key_range(pos, window, DA_SPLIT_MIN_KEYS, used, lo, hi)) return;
    int kend = hi + 1;  // this block's keys [lo, kend)
    int tiles = (kend - lo + DA_KEYS - 1) / DA_KEYS;
    const int* table = block_tables + (size_t)seq * max_blocks;
    auto find_slots = [&](int buf, int k0) {
        find_key_slots<DA_KEYS>(key_slot[buf], table, k0, kend, block_size);
    };
    int kvd = n_kv_heads * D;
    // The step's metadata is written by no kernel of the step: the first tile's cache slots
    // are looked up while the kernels before this one drain (programmatic launch).
    find_slots(0, lo);
    pdl_entry();
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    int group = n_heads / n_kv_heads;
    float scale_log2 = scale * 1.4426950408889634f;  // the softmax runs in base 2

    // The group's query heads as the A fragments' rows g (rows g + 8 are zero).
    bool va = g < group;
    unsigned qf[KT][2];  // the A words a0, a2 of row g
    {
        const T* q = qkv + (size_t)r * (n_heads * D + 2 * kvd) + (size_t)kvh * group * D;
#pragma unroll
        for (int kk = 0; kk < KT; kk++) {
            int c = kk * 16 + t4 * 2;
            qf[kk][0] = va ? *reinterpret_cast<const unsigned*>(q + g * D + c) : 0u;
            qf[kk][1] = va ? *reinterpret_cast<const unsigned*>(q + g * D + c + 8) : 0u;
        }
    }
    float o[DN][2];  // row g of P·V: dims n*8 + 2*t4, +1
#pragma unroll
    for (int n = 0; n < DN; n++) o[n][0] = o[n][1] = 0.f;
    float m = -INFINITY, l = 0.f;  // the thread's row g: running max (scaled) and sum

    auto load_tile = [&](T* dst, const T* cache, int buf) {
        load_kv_tile<T, D, DA_KEYS, DA_WARPS * 32, LD>(dst, cache, key_slot[buf], kvd, kvh);
    };
    // flash_attention's pipeline: K of the next tile loads during this tile's P·V, V of the
    // next tile during the next tile's Q·Kᵀ; every thread commits the same groups.
    __syncthreads();
    load_tile(ks, k_cache, 0);
    load_tile(vs, v_cache, 0);
    for (int j = 0; j < tiles; j++) {
        int k0 = lo + j * DA_KEYS, next = (j + 1) & 1;
        int kw = k0 + warp * 16;  // the warp's first key
        if (j + 1 < tiles) find_slots(next, k0 + DA_KEYS);
        cp_async_wait<1>();  // K of tile j
        __syncthreads();
        bool active = kw < kend;
        unsigned pf[2];  // row g of P: keys 2*t4, +1 and 8 + 2*t4, +1 of the warp's 16
        if (active) {
            float s[2][2];
#pragma unroll
            for (int n = 0; n < 2; n++) s[n][0] = s[n][1] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KT; kk++) {
#pragma unroll
                for (int n = 0; n < 2; n++) {
                    const T* kr = ks + (warp * 16 + n * 8 + g) * LD + kk * 16 + t4 * 2;
                    unsigned b[2] = {*reinterpret_cast<const unsigned*>(kr),
                                     *reinterpret_cast<const unsigned*>(kr + 8)};
                    MmaTop<T>::run(s[n], qf[kk][0], qf[kk][1], b);
                }
            }
            if (kw + 16 > kend) {
#pragma unroll
                for (int n = 0; n < 2; n++)
#pragma unroll
                    for (int i = 0; i < 2; i++)
                        if (kw + n * 8 + t4 * 2 + i >= kend) s[n][i] = -INFINITY;
            }
            // Running max of the thread's row over its quad, kept scaled (m); the warp's first
            // key is in range, so the max is finite.
            float mx = fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
            float base = fmaxf(m, mx * scale_log2);
            float corr = exp2f(m - base);
            l *= corr;
#pragma unroll
            for (int n = 0; n < DN; n++) {
                o[n][0] *= corr;
                o[n][1] *= corr;
            }
            m = base;
            // P as the A fragment of the warp's one k-step of 16 keys (S's two n-tiles).
#pragma unroll
            for (int n = 0; n < 2; n++) {
                float p0 = exp2f(fmaf(s[n][0], scale_log2, -base));
                float p1 = exp2f(fmaf(s[n][1], scale_log2, -base));
                l += p0 + p1;
                pf[n] = Mma<T>::pack(p0, p1);
            }
        }
        __syncthreads();  // every warp is done with K of tile j
        if (j + 1 < tiles) load_tile(ks, k_cache, next);
        else cp_async_commit();
        cp_async_wait<1>();  // V of tile j
        __syncthreads();
        if (active) {
#pragma unroll
            for (int n2 = 0; n2 < DN / 2; n2++) {
                // Matrices: keys +0 / +8 of the warp's 16, for dims n2*16 and n2*16 + 8.
                unsigned b[4];
                int key = warp * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
                ldmatrix_x4_trans(b, vs + key * LD + n2 * 16 + (lane >> 4) * 8);
                MmaTop<T>::run(o[2 * n2], pf[0], pf[1], b);
                MmaTop<T>::run(o[2 * n2 + 1], pf[0], pf[1], b + 2);
            }
        }
        __syncthreads();  // every warp is done with V of tile j
        if (j + 1 < tiles) load_tile(vs, v_cache, next);
        else cp_async_commit();
    }
    // The warps' partials into the tiles' space: max in natural-log units, sums over each quad.
    constexpr int GM = DA_MAX_GROUP;
    float* sm_m = reinterpret_cast<float*>(kv_tiles);  // [warps][GM]
    float* sm_l = sm_m + DA_WARPS * GM;                // [warps][GM]
    float* sm_acc = sm_l + DA_WARPS * GM;              // [warps][GM][D]
    l += __shfl_xor_sync(0xffffffff, l, 1);
    l += __shfl_xor_sync(0xffffffff, l, 2);
    if (g < group) {
        if (t4 == 0) {
            sm_m[warp * GM + g] = m * 0.6931471805599453f;
            sm_l[warp * GM + g] = l;
        }
#pragma unroll
        for (int n = 0; n < DN; n++) {
            float* a = sm_acc + (warp * GM + g) * D + n * 8 + t4 * 2;
            a[0] = o[n][0];
            a[1] = o[n][1];
        }
    }
    __syncthreads();
    attention_finish<T>(out, sm_m, sm_l, sm_acc, GM, D, DA_WARPS, used, group, D, n_heads, n_kv_heads, part,
                        counters);
}

#define INSTANTIATE_DECODE_ATTN(T, S, D)                                                                    \
    extern "C" __global__ void __launch_bounds__(DA_WARPS * 32, DA_MIN_BLOCKS) decode_attention_##S##_d##D( \
        T* out, const T* qkv, const T* kc, const T* vc, const int* positions, const int* row_seq,           \
        const int* tables, int max_blocks, int block_size, int nh, int nkv, int d, float scale, int window,   \
        float* part, int* counters) {                                                                        \
        decode_attention<T, D>(out, qkv, kc, vc, positions, row_seq, tables, max_blocks, block_size, nh, \
                                   nkv, scale, window, part, counters);                                     \
    }
INSTANTIATE_DECODE_ATTN(__nv_bfloat16, bf16, 16)
INSTANTIATE_DECODE_ATTN(__nv_bfloat16, bf16, 32)
INSTANTIATE_DECODE_ATTN(__nv_bfloat16, bf16, 64)
INSTANTIATE_DECODE_ATTN(__nv_bfloat16, bf16, 128)
INSTANTIATE_DECODE_ATTN(__half, f16, 16)
INSTANTIATE_DECODE_ATTN(__half, f16, 32)
INSTANTIATE_DECODE_ATTN(__half, f16, 64)
INSTANTIATE_DECODE_ATTN(__half, f16, 128)
