// Flash-style causal prefill attention over the paged KV cache (bf16 and f16, head dims 16 to
// 128), compiled after llama.cu (it uses its to_f/from_f and INFINITY).
//
// One prefill chunk of `rows` new tokens whose sequence already has `cached` tokens in the cache:
// query row i sits at position cached + i and attends keys 0..=cached + i (within the sliding
// window when `window` > 0), keys read through the sequence's block table. The chunk's own keys
// are already in the cache (rope_cache runs first). Scores and probabilities never leave the
// chip: each block keeps FA_BR query rows of one head in registers, streams FA_BC keys at a time
// through shared memory and keeps a running softmax (FlashAttention-2's loop), so memory traffic
// is Q, K, V and O once per block instead of the [rows, keys] score matrices of the GEMM path.
//
// Tensor cores through mma.sync m16n8k16 (sm_80+): warp w owns query rows w*16 .. w*16+15 of the
// block; S = Q·Kᵀ accumulates in f32, P = exp2(S - max) is rounded to T and reused as the A
// operand of P·V straight from the S accumulators (their layouts line up), V's B operand comes from
// ldmatrix.trans. Shared rows are padded by 8 elements so the fragment loads are free of bank
// conflicts.

#define FA_BR 64  // query rows per block: 4 warps x 16
#define FA_BC 64  // keys per shared-memory tile
#define FA_THREADS 128

template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
    static __device__ __forceinline__ void run(float* c, const unsigned* a, const unsigned* b) {
        asm(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
    static __device__ __forceinline__ unsigned pack(float lo, float hi) {
        __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<unsigned*>(&v);
    }
};
template <> struct Mma<__half> {
    static __device__ __forceinline__ void run(float* c, const unsigned* a, const unsigned* b) {
        asm(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
    static __device__ __forceinline__ unsigned pack(float lo, float hi) {
        __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<unsigned*>(&v);
    }
};

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// Four 8x8 b16 matrices, transposed: thread t gives the row address of row t%8 of matrix t/8.
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p))
                 : "memory");
}

// Cache rows of keys k0 .. k0 + KEYS - 1 through a sequence's block table, -1 from kend on, by
// the block's first KEYS threads (once per tile, not per 16-byte load).
template <int KEYS>
__device__ __forceinline__ void find_key_slots(int* key_slot, const int* table, int k0, int kend, int block_size) {
    if (threadIdx.x < KEYS) {
        int p = k0 + threadIdx.x;
        key_slot[threadIdx.x] = p < kend ? table[p / block_size] * block_size + p % block_size : -1;
    }
}

// One cache's (K or V) tile of KEYS keys of kv head `kvh` into shared rows of LD elements with
// cp.async, by THREADS threads, then one commit; keys whose slot is -1 are zero (a masked key's
// V must not be NaN: 0 x NaN is NaN). Thread t always copies piece t % (D / 8) of keys
// t / (D / 8) + i * THREADS / (D / 8): its offsets are computed once and the loop unrolls, where
// a loop over flat chunk indices cost about 30 PTX instructions per 16 bytes (a division, 64-bit
// address arithmetic and a branch each), about 1,400 of decode attention's 3,300 instructions
// per warp at batch 64.
template <typename T, int D, int KEYS, int THREADS, int LD>
__device__ __forceinline__ void load_kv_tile(T* dst, const T* cache, const int* key_slot, int kvd, int kvh) {
    constexpr int PIECES = D / 8;  // 16-byte pieces of a key's row
    constexpr int KEY_STEP = THREADS / PIECES;
    static_assert(THREADS % PIECES == 0 && KEYS % KEY_STEP == 0, "every thread copies whole steps of keys");
    const int piece = threadIdx.x % PIECES, key0 = threadIdx.x / PIECES;
    const T* src = cache + kvh * D + piece * 8;
    T* d = dst + key0 * LD + piece * 8;
#pragma unroll
    for (int i = 0; i < KEYS / KEY_STEP; i++) {
        int slot = key_slot[key0 + i * KEY_STEP];
        T* di = d + i * KEY_STEP * LD;
        if (slot >= 0) {
            cp_async16(di, src + (size_t)slot * kvd);
        } else {
            *reinterpret_cast<uint4*>(di) = make_uint4(0, 0, 0, 0);
        }
    }
    cp_async_commit();
}

// out[first_row + i, head*D ..] = softmax(q_i · Kᵀ · scale, causal) · V for one chunk. Grid:
// (heads, ceil(rows / FA_BR)): every head's last query tile (the most keys) starts first, and
// the heads of one kv group read the same keys at about the same time.
// `scale_log2` is 1/sqrt(D) · log2(e): the softmax runs in base 2.
template <typename T, int D>
__device__ void flash_attention(T* out, const T* qkv, const T* kc, const T* vc, const int* table, int first_row,
                                int rows, int cached, int block_size, int nh, int nkv, float scale_log2,
                                int window) {
    constexpr int LD = D + 8;  // padded shared row, in elements
    constexpr int KT = D / 16; // k-steps of Q·Kᵀ
    constexpr int DN = D / 8;  // n-tiles of P·V
    constexpr int SN = FA_BC / 8;
    __shared__ alignas(16) T ks[FA_BC * LD];
    __shared__ alignas(16) T vs[FA_BC * LD];
    int head = blockIdx.x, kvh = head / (nh / nkv);
    int q0 = (gridDim.y - 1 - blockIdx.y) * FA_BR;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int g = lane >> 2, t4 = lane & 3;
    int qkv_w = (nh + 2 * nkv) * D, kvd = nkv * D;
    int wr = q0 + warp * 16;                 // the warp's first query row
    int ra = wr + g, rb = ra + 8;            // this thread's two rows
    int pa = cached + ra, pb = cached + rb;  // and their positions

    // The warp's Q rows as A fragments (zero past the chunk).
    unsigned qf[KT][4];
    {
        const T* qa = qkv + (size_t)(first_row + ra) * qkv_w + head * D;
        const T* qb = qkv + (size_t)(first_row + rb) * qkv_w + head * D;
#pragma unroll
        for (int kk = 0; kk < KT; kk++) {
            int c = kk * 16 + t4 * 2;
            qf[kk][0] = ra < rows ? *reinterpret_cast<const unsigned*>(qa + c) : 0u;
            qf[kk][1] = rb < rows ? *reinterpret_cast<const unsigned*>(qb + c) : 0u;
            qf[kk][2] = ra < rows ? *reinterpret_cast<const unsigned*>(qa + c + 8) : 0u;
            qf[kk][3] = rb < rows ? *reinterpret_cast<const unsigned*>(qb + c + 8) : 0u;
        }
    }
    float o[DN][4];
#pragma unroll
    for (int n = 0; n < DN; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

    int last = min(q0 + FA_BR, rows) - 1;  // the block's last real row
    int kend = cached + last + 1;          // keys [kbeg, kend) can be seen by some row
    int kbeg = window > 0 ? max(0, cached + q0 + 1 - window) / FA_BC * FA_BC : 0;
    int tiles = (kend - kbeg + FA_BC - 1) / FA_BC;
    int warp_last_pos = cached + min(wr + 15, last);
    int warp_first_pos = cached + wr;
    // Cache rows of a tile's keys, computed once per tile (not per 16-byte load) into one of two
    // buffers: -1 past kend.
    __shared__ int key_slot[2][FA_BC];
    auto find_slots = [&](int buf, int k0) {
        find_key_slots<FA_BC>(key_slot[buf], table, k0, kend, block_size);
    };
    auto load_tile = [&](T* dst, const T* cache, int buf) {
        load_kv_tile<T, D, FA_BC, FA_THREADS, LD>(dst, cache, key_slot[buf], kvd, kvh);
    };
    // Staggered pipeline with one K and one V buffer: K of the next tile loads during this
    // tile's P·V, V of the next tile during the next tile's Q·Kᵀ and softmax. Every thread
    // commits the same groups (empty ones past the end), so wait_group 1 always means "all but
    // the newest landed". Slots of tile j + 1 are found at the top of iteration j; the barrier
    // after them publishes them before any load of that tile.
    find_slots(0, kbeg);
    __syncthreads();
    load_tile(ks, kc, 0);
    load_tile(vs, vc, 0);
    for (int j = 0; j < tiles; j++) {
        int k0 = kbeg + j * FA_BC, next = (j + 1) & 1;
        if (j + 1 < tiles) find_slots(next, k0 + FA_BC);
        cp_async_wait<1>();  // K of tile j
        __syncthreads();
        // A warp none of whose rows sees a key of this tile (rows past the chunk, keys past
        // every row's position or before its window) skips the math; the barriers stay uniform.
        bool active = wr <= last && warp_last_pos >= k0 &&
                      (window <= 0 || warp_first_pos - window < k0 + FA_BC - 1);
        unsigned pf[FA_BC / 16][4];
        if (active) {
            float s[SN][4];
#pragma unroll
            for (int n = 0; n < SN; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KT; kk++) {
#pragma unroll
                for (int n = 0; n < SN; n++) {
                    const T* kr = ks + (n * 8 + g) * LD + kk * 16 + t4 * 2;
                    unsigned b[2] = {*reinterpret_cast<const unsigned*>(kr),
                                     *reinterpret_cast<const unsigned*>(kr + 8)};
                    Mma<T>::run(s[n], qf[kk], b);
                }
            }
            // Mask (not needed when every key of the tile is visible to every row of the warp)
            // and the running max of each of the thread's two rows, in raw score units; the
            // max is kept scaled (m), and exp2(s · scale - m) is one FFMA and one EX2.
            bool full = k0 + FA_BC - 1 <= cached + wr && (window <= 0 || warp_last_pos - window < k0);
            if (!full) {
#pragma unroll
                for (int n = 0; n < SN; n++) {
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        int key = k0 + n * 8 + t4 * 2 + (i & 1);
                        int pos = i < 2 ? pa : pb;
                        if (key > pos || (window > 0 && key <= pos - window)) s[n][i] = -INFINITY;
                    }
                }
            }
            float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
            for (int n = 0; n < SN; n++) {
                mx[0] = fmaxf(mx[0], fmaxf(s[n][0], s[n][1]));
                mx[1] = fmaxf(mx[1], fmaxf(s[n][2], s[n][3]));
            }
            float base[2];
#pragma unroll
            for (int j2 = 0; j2 < 2; j2++) {
                mx[j2] = fmaxf(mx[j2], __shfl_xor_sync(0xffffffff, mx[j2], 1));
                mx[j2] = fmaxf(mx[j2], __shfl_xor_sync(0xffffffff, mx[j2], 2));
                // A row with no key seen yet keeps max -inf: subtract 0 so exp2 gives 0, not NaN.
                float mn = fmaxf(m[j2], mx[j2] * scale_log2);
                base[j2] = mn == -INFINITY ? 0.f : mn;
                float corr = exp2f(m[j2] - base[j2]);
                l[j2] *= corr;
#pragma unroll
                for (int n = 0; n < DN; n++) {
                    o[n][2 * j2] *= corr;
                    o[n][2 * j2 + 1] *= corr;
                }
                m[j2] = mn;
            }
            // P as A fragments: n-tiles 2k and 2k+1 of S hold the 16 keys of k-step k. The
            // thread's partial row sums are reduced over its quad once, at the end.
#pragma unroll
            for (int n = 0; n < SN; n++) {
                float p0 = exp2f(fmaf(s[n][0], scale_log2, -base[0]));
                float p1 = exp2f(fmaf(s[n][1], scale_log2, -base[0]));
                float p2 = exp2f(fmaf(s[n][2], scale_log2, -base[1]));
                float p3 = exp2f(fmaf(s[n][3], scale_log2, -base[1]));
                l[0] += p0 + p1;
                l[1] += p2 + p3;
                pf[n / 2][(n & 1) * 2] = Mma<T>::pack(p0, p1);
                pf[n / 2][(n & 1) * 2 + 1] = Mma<T>::pack(p2, p3);
            }
        }
        __syncthreads();  // every warp is done with K of tile j
        if (j + 1 < tiles) load_tile(ks, kc, next);
        else cp_async_commit();
        cp_async_wait<1>();  // V of tile j
        __syncthreads();
        if (active) {
#pragma unroll
            for (int kk = 0; kk < FA_BC / 16; kk++) {
#pragma unroll
                for (int n2 = 0; n2 < DN / 2; n2++) {
                    // Matrices: keys +0 / +8 of the k-step, for dims n2*16 and n2*16 + 8.
                    unsigned b[4];
                    int key = kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
                    ldmatrix_x4_trans(b, vs + key * LD + n2 * 16 + (lane >> 4) * 8);
                    Mma<T>::run(o[2 * n2], pf[kk], b);
                    Mma<T>::run(o[2 * n2 + 1], pf[kk], b + 2);
                }
            }
        }
        __syncthreads();  // every warp is done with V of tile j
        if (j + 1 < tiles) load_tile(vs, vc, next);
        else cp_async_commit();
    }
    // Each row's sum is spread over the 4 threads of its quad.
#pragma unroll
    for (int j = 0; j < 2; j++) {
        l[j] += __shfl_xor_sync(0xffffffff, l[j], 1);
        l[j] += __shfl_xor_sync(0xffffffff, l[j], 2);
        l[j] = l[j] > 0.f ? 1.f / l[j] : 0.f;
    }
    int qd = nh * D;
#pragma unroll
    for (int n = 0; n < DN; n++) {
        int c = head * D + n * 8 + t4 * 2;
        if (ra < rows)
            *reinterpret_cast<unsigned*>(out + (size_t)(first_row + ra) * qd + c) =
                Mma<T>::pack(o[n][0] * l[0], o[n][1] * l[0]);
        if (rb < rows)
            *reinterpret_cast<unsigned*>(out + (size_t)(first_row + rb) * qd + c) =
                Mma<T>::pack(o[n][2] * l[1], o[n][3] * l[1]);
    }
}

#define INSTANTIATE_FLASH(T, S, D)                                                                          \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, 3) flash_attention_##S##_d##D(                     \
        T* out, const T* qkv, const T* kc, const T* vc, const int* table, int first_row, int rows, int cached, \
        int block_size, int nh, int nkv, float scale_log2, int window) {                                     \
        pdl_entry();                                                                                         \
        flash_attention<T, D>(out, qkv, kc, vc, table, first_row, rows, cached, block_size, nh, nkv, scale_log2, \
                              window);                                                                       \
    }
INSTANTIATE_FLASH(__nv_bfloat16, bf16, 16)
INSTANTIATE_FLASH(__nv_bfloat16, bf16, 32)
INSTANTIATE_FLASH(__nv_bfloat16, bf16, 64)
INSTANTIATE_FLASH(__nv_bfloat16, bf16, 128)
INSTANTIATE_FLASH(__half, f16, 16)
INSTANTIATE_FLASH(__half, f16, 32)
INSTANTIATE_FLASH(__half, f16, 64)
INSTANTIATE_FLASH(__half, f16, 128)
