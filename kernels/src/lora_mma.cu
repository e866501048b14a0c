// LoRA shrink and expand on tensor cores (bf16 and f16), compiled after llama.cu (Pack, to_f,
// from_f) and flash_attention.cu (Mma<T>). Same work items, partial-plane layout and results as
// llama.cu's lora_shrink / lora_expand (with slices of LMMA_SLICE inputs, so fewer planes),
// which stay for f32 and for shapes these do not take (the host's `lora_mma_takes`): every
// output width of a group a multiple of 64, the input a multiple of 32, the pool's rank at most
// 256 (the expand's staged y).
//
// Why: an item of several rows of one adapter (a prefill piece, or merged decode rows) costs the
// CUDA-core kernels rows x rank FMAs per weight they read; at batch 64 with one rank-64 adapter
// that made the LoRA chain, not the weights, the step's bottleneck. mma.sync m16n8k16 takes 16
// rows at once for the price of one.
//
// Fragment loads without shared memory: a sum over k may visit k in any order as long as both
// operands agree. So lane (g = lane / 4, c = lane % 4) loads 16 contiguous bytes (8 k) of its row
// and hands mma step s the 4 k at 8c + 4s .. 8c + 4s + 3 as if they were the k 2c, 2c+1, 2c+8,
// 2c+9 that the PTX layout gives it. The expand's B (the slot's Bᵀ, [rank, cols] row-major) has
// its k in different rows; there lane (g, c) loads rank rows 4c .. 4c+3 at columns 8g .. 8g+7 and
// pairs them with byte permutes, mma j taking column 8n + j for its n-th column, so that after
// the 8 mmas each lane holds 16 consecutive output columns of rows g and g + 8.

#define LMMA_ROWS 16          // rows of an item per pass (the mma's M)
#define LMMA_SHRINK_WARPS 8   // each takes LMMA_CHUNKS of the slice's chunks of 32 k
#define LMMA_CHUNKS 4
#define LMMA_SLICE (LMMA_SHRINK_WARPS * LMMA_CHUNKS * 32)  // input elements per shrink block
#ifndef LMMA_TILES
#define LMMA_TILES 2          // rank tiles of 8 whose loads are in flight at once
#endif
#define LMMA_EXPAND_WARPS 8   // each takes 64 output columns
#define LMMA_SHORT_ROWS 2     // items of at most this many rows walk short_groups in the expand
#ifndef LMMA_EXPAND_KSTEPS
#define LMMA_EXPAND_KSTEPS 2  // k-steps of 16 whose Bᵀ loads are in flight at once
#endif
// Rank at most 16 (one k-step): the registers of the other k-steps hold the next column
// groups' Bᵀ instead, so that LMMA_EXPAND_KSTEPS groups' loads are in flight, not one. A decode
// row's item walks several groups, each otherwise a round trip of its own. On the H100 batch 64
// with 64 distinct rank-16 adapters got 0.14 ms faster a step; the kernel's registers went from
// 106 to 114, and batch-64 steps with rank-64 adapters 0.03-0.06 ms slower (twenty-eighth
// session; the pair path as a separate instantiation took 128 registers and lost the gain).
#ifndef LMMA_EXPAND_PAIR
#define LMMA_EXPAND_PAIR 1
#endif
#ifndef LMMA_STAGE_ELEMS
#define LMMA_STAGE_ELEMS 4    // elements of y per thread whose split loads are in flight at once
#endif
// The shrink is compiled to fit two 256-thread blocks per SM (127 registers, no spills; gpu_check
// checks it). Given a bound of one block, the compiler took 134 registers, and every batch-64
// adapter step on the H100 got 0.07-0.39 ms slower (64 rank-16 adapters 9.80 -> 10.21 ms, same
// call). Three blocks (80 registers) spill or serialise the loads: rank-64 rows up to 0.45 ms
// slower. The expand keeps the compiler's choice (106 registers, two blocks) unless
// LMMA_EXPAND_MIN is set; see BENCHMARKS.md (eighteenth session) for the variants tried.
#ifndef LMMA_SHRINK_MIN
#define LMMA_SHRINK_MIN 2
#endif
#ifdef LMMA_EXPAND_MIN
#define LMMA_EXPAND_BOUNDS __launch_bounds__(LMMA_EXPAND_WARPS * 32, LMMA_EXPAND_MIN)
#else
#define LMMA_EXPAND_BOUNDS __launch_bounds__(LMMA_EXPAND_WARPS * 32)
#endif

__device__ __forceinline__ unsigned word_of(const uint4& v, int i) {
    return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// yp[split][r, t*R + k] = x[r, slice] . A[slot][t*R + k, slice], as lora_shrink. Grid
// (n_targets * splits, items, rank groups) over slices of LMMA_SLICE inputs, LMMA_SHRINK_WARPS
// warps, each taking LMMA_CHUNKS chunks of 32 k for every rank tile of its group (the groups
// take LMMA_TILES tiles of 8 rank rows round-robin, so a high rank costs more blocks, not a
// longer chain of round trips in each). Rank tiles go LMMA_TILES at a time:
// every warp's loads for them are in flight at once, then the warps' partial sums meet in
// shared memory and are added in a fixed order, so that results do not depend on scheduling.
template <typename T>
__device__ void lora_shrink_mma(float* yp, const T* x, const T* A, const int* items, const int* slot_rank,
                                int in_dim, int R, int n_targets, u64 plane) {
    __shared__ float4 part[LMMA_SHRINK_WARPS][LMMA_TILES][32];
    int t = blockIdx.x % n_targets, split = blockIdx.x / n_targets, it = blockIdx.y;
    int first = items[it * 3], len = items[it * 3 + 1], slot = items[it * 3 + 2];
    if (slot < 0 || len <= 0) return;
    int rank = slot_rank[slot];
    int tiles = (rank + 7) / 8;
    // This block's rank tiles start at blockIdx.z * LMMA_TILES, then every gridDim.z-th group.
    int n_first = blockIdx.z * LMMA_TILES;
    if (n_first >= tiles) return;
    int lo = split * LMMA_SLICE, hi = min(in_dim, lo + LMMA_SLICE);
    int ylen = n_targets * R;
    float* out = yp + split * plane;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    const T* a_slot = A + ((size_t)slot * ylen + t * R) * in_dim;
    // This warp's chunks (in_dim is a multiple of 32, so a chunk is wholly in or out).
    int kc[LMMA_CHUNKS];
    bool has[LMMA_CHUNKS];
#pragma unroll
    for (int j = 0; j < LMMA_CHUNKS; j++) {
        kc[j] = lo + 32 * (warp + j * LMMA_SHRINK_WARPS);
        has[j] = kc[j] < hi;
    }
    uint4 w[LMMA_TILES][LMMA_CHUNKS];
    auto load_a = [&](int n0) {
#pragma unroll
        for (int u = 0; u < LMMA_TILES; u++) {
            int row = (n0 + u) * 8 + g;
#pragma unroll
            for (int j = 0; j < LMMA_CHUNKS; j++)
                w[u][j] = (row < rank && has[j])
                              ? *reinterpret_cast<const uint4*>(a_slot + (size_t)row * in_dim + kc[j] + 8 * c)
                              : make_uint4(0, 0, 0, 0);
        }
    };
    // The slot's A is not written by any kernel of the step: its first tiles load while the
    // kernel before this one drains (programmatic launch), x only after it.
    load_a(n_first);
    pdl_wait();
    for (int r0 = 0; r0 < len; r0 += LMMA_ROWS) {
        int rows = min(LMMA_ROWS, len - r0);
        const T* xr = x + (size_t)(first + r0) * in_dim;
        uint4 xa[LMMA_CHUNKS][2];  // [chunk][rows g, g + 8]
#pragma unroll
        for (int j = 0; j < LMMA_CHUNKS; j++)
#pragma unroll
            for (int h = 0; h < 2; h++)
                xa[j][h] = (has[j] && g + 8 * h < rows)
                               ? *reinterpret_cast<const uint4*>(xr + (size_t)(g + 8 * h) * in_dim + kc[j] + 8 * c)
                               : make_uint4(0, 0, 0, 0);
        for (int n0 = n_first; n0 < tiles; n0 += LMMA_TILES * gridDim.z) {
            if (r0 > 0 || n0 > n_first) load_a(n0);
#pragma unroll
            for (int u = 0; u < LMMA_TILES; u++) {
                float acc[4] = {0.f, 0.f, 0.f, 0.f};
                if (n0 + u < tiles) {
#pragma unroll
                    for (int j = 0; j < LMMA_CHUNKS; j++)
#pragma unroll
                        for (int s = 0; s < 2; s++) {
                            unsigned a[4] = {word_of(xa[j][0], 2 * s), word_of(xa[j][1], 2 * s),
                                             word_of(xa[j][0], 2 * s + 1), word_of(xa[j][1], 2 * s + 1)};
                            unsigned b[2] = {word_of(w[u][j], 2 * s), word_of(w[u][j], 2 * s + 1)};
                            Mma<T>::run(acc, a, b);
                        }
                }
                part[warp][u][lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
            }
            __syncthreads();
            // Thread (u, l) of the first LMMA_TILES warps adds tile n0 + u of lane l over the
            // warps: rows l/4 and l/4 + 8, rank rows (n0 + u) * 8 + 2 (l % 4) and the next.
            if (threadIdx.x < LMMA_TILES * 32) {
                int u = threadIdx.x >> 5, l = threadIdx.x & 31;
                if (n0 + u < tiles) {
                    float4 v = part[0][u][l];
#pragma unroll
                    for (int w2 = 1; w2 < LMMA_SHRINK_WARPS; w2++) {
                        float4 p = part[w2][u][l];
                        v.x += p.x;
                        v.y += p.y;
                        v.z += p.z;
                        v.w += p.w;
                    }
                    float vs[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        int row = (l >> 2) + 8 * (i >> 1), k = (n0 + u) * 8 + 2 * (l & 3) + (i & 1);
                        if (row < rows && k < rank) out[(size_t)(first + r0 + row) * ylen + t * R + k] = vs[i];
                    }
                }
            }
            __syncthreads();
        }
    }
}

// out[r, col] (+)= scale[slot] * sum_k y[r, t(col)*R + k] * Bt[slot][k, col], as lora_expand.
// Grid (ceil(out_total / (64 * LMMA_EXPAND_WARPS * groups)), items): each block stages its
// item's y once per 16 rows, then its warps walk `groups` column groups of 64 * warps columns
// (more than one where there are many blocks: staging y and reading the item cost the same
// for one group as for four). A short item (LMMA_SHORT_ROWS rows or fewer: one decode row of
// its adapter) has little to do per group, so it walks `short_groups` (a multiple of `groups`)
// in every short_groups / groups-th block, and the blocks between exit. Dynamic shared memory
// for 16 rows of y as T:
// LMMA_ROWS * (n_targets * round16(R) + 8) elements. Target boundaries b1, b2 and out_total are
// multiples of 64 (one target per warp and group), out_stride a multiple of 8.
template <typename T, bool STORE>
__device__ void lora_expand_mma(T* out, int out_stride, const float* yp, int splits, u64 plane, const T* Bt,
                                const int* items, const int* slot_rank, const float* slot_scale, int out_total,
                                int R, int n_targets, int b1, int b2, int groups, int short_groups) {
    int it = blockIdx.y;
    int first = items[it * 3], len = items[it * 3 + 1], slot = items[it * 3 + 2];
    if (slot < 0 || len <= 0) return;
    int walk = groups;
    if (len <= LMMA_SHORT_ROWS && short_groups > groups) {
        if (blockIdx.x % (short_groups / groups) != 0) return;
        walk = short_groups;
    }
    int rank = slot_rank[slot];
    float scale = slot_scale[slot];
    int ylen = n_targets * R;
    int rk = (rank + 15) & ~15;     // y columns per target in shared memory: whole k-steps
    int ld = n_targets * rk + 8;    // padded row, in elements (keeps 16-byte rows, spreads banks)
    int ksteps = rk / 16;
    extern __shared__ uint4 ys_raw[];
    T* ys = reinterpret_cast<T*>(ys_raw);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    const T* b_slot = Bt + (size_t)slot * R * out_total;
    // This warp's 64 columns in group q start at col0(q).
    auto col0 = [&](int q) { return ((blockIdx.x * groups + q) * LMMA_EXPAND_WARPS + warp) * 64; };
    uint4 bw[LMMA_EXPAND_KSTEPS][4];  // rank rows 16 s + 4c + i, 8 columns from col0 + 8g
    // k-step s of group q into bw[u].
    auto load_one = [&](int u, int q, int s) {
        int base = col0(q);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int k = 16 * s + 4 * c + i;
            bw[u][i] = base < out_total && k < rank
                           ? *reinterpret_cast<const uint4*>(b_slot + (size_t)k * out_total + base + 8 * g)
                           : make_uint4(0, 0, 0, 0);
        }
    };
    // k-steps s0 .. s0 + LMMA_EXPAND_KSTEPS - 1 of group q.
    auto load_b = [&](int q, int s0) {
#pragma unroll
        for (int u = 0; u < LMMA_EXPAND_KSTEPS; u++) load_one(u, q, s0 + u);
    };
    // One group in flight per k-step register set (see LMMA_EXPAND_PAIR): groups 0 .. KSTEPS - 1.
    const bool pair = LMMA_EXPAND_PAIR && LMMA_EXPAND_KSTEPS > 1 && ksteps == 1;
    auto load_first = [&]() {
        if (!pair) {
            load_b(0, 0);
            return;
        }
#pragma unroll
        for (int u = 0; u < LMMA_EXPAND_KSTEPS; u++)
            if (u < walk) load_one(u, u, 0);
    };
    // acc += k-step s of the group whose y rows start at y0 / y1, Bᵀ from bw[u].
    auto mma_step = [&](float (*acc)[4], const T* y0, const T* y1, int u, int s) {
        uint2 ya = *reinterpret_cast<const uint2*>(y0 + 16 * s);
        uint2 yb = *reinterpret_cast<const uint2*>(y1 + 16 * s);
        unsigned a[4] = {ya.x, yb.x, ya.y, yb.y};
#pragma unroll
        for (int j = 0; j < 8; j++) {
            unsigned sel = (j & 1) ? 0x7632 : 0x5410;
            unsigned bb[2] = {__byte_perm(word_of(bw[u][0], j >> 1), word_of(bw[u][1], j >> 1), sel),
                              __byte_perm(word_of(bw[u][2], j >> 1), word_of(bw[u][3], j >> 1), sel)};
            Mma<T>::run(acc[j], a, bb);
        }
    };
    for (int r0 = 0; r0 < len; r0 += LMMA_ROWS) {
        int rows = min(LMMA_ROWS, len - r0);
        // The first Bᵀ loads do not depend on y: issue them before staging it, and (slot
        // weights are not written by any kernel of the step) before the wait for the shrink.
        load_first();
        if (r0 == 0) pdl_wait();
        __syncthreads();
        // y summed over the splits, rounded to T; k past the rank is zero. Rows past `rows` are
        // left as they are: they only reach output rows that are not written. A short item has
        // fewer elements than threads: then `tpe` lanes share an element's splits and add them
        // up with shuffles (in a fixed order).
        // Each thread's loads for LMMA_STAGE_ELEMS elements go out together: a warp issues in
        // order, so an element at a time cost a round trip each (12 for a 16-row item of rank 64
        // on q/k/v). The loop bounds are the block's, not the thread's: every lane reaches the
        // shuffles.
        int total = rows * n_targets * rk;
        int tpe = total >= (int)blockDim.x ? 1 : (2 * total >= (int)blockDim.x ? 2 : (4 * total >= (int)blockDim.x ? 4 : 8));
        int step = blockDim.x / tpe, sp0 = threadIdx.x % tpe;
        for (int e0 = 0; e0 < total; e0 += LMMA_STAGE_ELEMS * step) {
            const float* src[LMMA_STAGE_ELEMS];
            int dst[LMMA_STAGE_ELEMS];  // the element's place in ys, -1 past the end
            float v[LMMA_STAGE_ELEMS];
#pragma unroll
            for (int u = 0; u < LMMA_STAGE_ELEMS; u++) {
                int e = e0 + threadIdx.x / tpe + u * step;
                int q = e / (n_targets * rk), tk = e % (n_targets * rk), k = tk % rk;
                src[u] = e < total && k < rank ? yp + (size_t)(first + r0 + q) * ylen + (tk / rk) * R + k : nullptr;
                dst[u] = e < total ? q * ld + tk : -1;
                v[u] = 0.f;
            }
#pragma unroll 2
            for (int sp = sp0; sp < splits; sp += tpe)
#pragma unroll
                for (int u = 0; u < LMMA_STAGE_ELEMS; u++)
                    if (src[u]) v[u] += src[u][sp * plane];
#pragma unroll
            for (int u = 0; u < LMMA_STAGE_ELEMS; u++) {
                for (int o = tpe / 2; o > 0; o >>= 1) v[u] += __shfl_xor_sync(0xffffffff, v[u], o);
                if (dst[u] >= 0 && sp0 == 0) ys[dst[u]] = from_f<T>(v[u]);
            }
        }
        __syncthreads();
        // Lane (g, c) holds columns base + 16c .. + 15 of rows g and g + 8: acc[j][2h] is
        // column 16c + j, acc[j][2h + 1] column 16c + 8 + j.
        auto store = [&](int base, float (*acc)[4]) {
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int row = g + 8 * h;
                if (row >= rows) continue;
                Pack<T, 8>* o =
                    reinterpret_cast<Pack<T, 8>*>(out + (size_t)(first + r0 + row) * out_stride + base + 16 * c);
#pragma unroll
                for (int half = 0; half < 2; half++) {
                    Pack<T, 8> ov;
                    if (STORE) {
#pragma unroll
                        for (int j = 0; j < 8; j++) ov.v[j] = from_f<T>(scale * acc[j][2 * h + half]);
                    } else {
                        ov = o[half];
#pragma unroll
                        for (int j = 0; j < 8; j++)
                            ov.v[j] = from_f<T>(to_f(ov.v[j]) + scale * acc[j][2 * h + half]);
                    }
                    o[half] = ov;
                }
            }
        };
        auto y_of = [&](int base) {
            int t = base < b1 ? 0 : (base < b2 ? 1 : 2);
            return ys + g * ld + t * rk + 4 * c;
        };
        if (pair) {
            // Group q's Bᵀ is in bw[q % LMMA_EXPAND_KSTEPS]; its refill, group q + KSTEPS, goes
            // out before q's stores.
            for (int q0 = 0; q0 < walk; q0 += LMMA_EXPAND_KSTEPS) {
#pragma unroll
                for (int u = 0; u < LMMA_EXPAND_KSTEPS; u++) {
                    int q = q0 + u, base = col0(q);
                    if (q >= walk || base >= out_total) break;
                    const T* y0 = y_of(base);
                    float acc[8][4];
#pragma unroll
                    for (int j = 0; j < 8; j++)
#pragma unroll
                        for (int i = 0; i < 4; i++) acc[j][i] = 0.f;
                    mma_step(acc, y0, y0 + 8 * ld, u, 0);
                    if (q + LMMA_EXPAND_KSTEPS < walk) load_one(u, q + LMMA_EXPAND_KSTEPS, 0);
                    store(base, acc);
                }
            }
            continue;
        }
        for (int q = 0; q < walk; q++) {
            int base = col0(q);
            if (base >= out_total) break;
            const T* y0 = y_of(base);
            float acc[8][4];
#pragma unroll
            for (int j = 0; j < 8; j++)
#pragma unroll
                for (int i = 0; i < 4; i++) acc[j][i] = 0.f;
            for (int s0 = 0; s0 < ksteps; s0 += LMMA_EXPAND_KSTEPS) {
                if (s0 > 0) load_b(q, s0);
#pragma unroll
                for (int u = 0; u < LMMA_EXPAND_KSTEPS; u++) {
                    if (s0 + u >= ksteps) break;
                    mma_step(acc, y0, y0 + 8 * ld, u, s0 + u);
                }
            }
            // The next group's first loads go out before this group's stores.
            if (q + 1 < walk) load_b(q + 1, 0);
            store(base, acc);
        }
    }
}

#define INSTANTIATE_LORA_MMA(T, S)                                                                         \
    INSTANTIATE_SHRINK_MMA(T, S)                                                                          \
    INSTANTIATE_EXPAND_MMA(T, S, lora_expand, false)                                                      \
    INSTANTIATE_EXPAND_MMA(T, S, lora_expand_store, true)
#define INSTANTIATE_SHRINK_MMA(T, S)                                                                       \
    extern "C" __global__ void __launch_bounds__(LMMA_SHRINK_WARPS * 32, LMMA_SHRINK_MIN)                  \
        lora_shrink_mma_##S(float* y, const T* x, const T* A, const int* items, const int* slot_rank,        \
                            int in_dim, int R, int nt, u64 plane) {                                        \
        pdl_trigger();                                                                                     \
        lora_shrink_mma<T>(y, x, A, items, slot_rank, in_dim, R, nt, plane);                                \
    }
// lora_expand_mma_{S} adds the delta to `out`; lora_expand_store_mma_{S} writes it.
#define INSTANTIATE_EXPAND_MMA(T, S, KIND, STORE)                                                          \
    extern "C" __global__ void LMMA_EXPAND_BOUNDS                                                          \
        KIND##_mma_##S(T* out, int out_stride, const float* y, int splits, u64 plane, const T* Bt,          \
                       const int* items, const int* slot_rank, const float* slot_scale, int out_total, int R, \
                       int nt, int b1, int b2, int groups, int short_groups) {                             \
        pdl_trigger();                                                                                     \
        lora_expand_mma<T, STORE>(out, out_stride, y, splits, plane, Bt, items, slot_rank, slot_scale,      \
                                  out_total, R, nt, b1, b2, groups, short_groups);                         \
    }
INSTANTIATE_LORA_MMA(__nv_bfloat16, bf16)
INSTANTIATE_LORA_MMA(__half, f16)

// Asks L2 for one fused group's factors of the step's slots (each target's A rows up to the
// slot's rank, then Bᵀ's rank rows; the layouts of lora_shrink_mma and lora_expand_mma), so that
// the group's LoRA chain, issued later on the side stream, finds them there. Launched beside a
// kernel that leaves memory bandwidth unused (decode attention). Grid (x, items); each thread
// asks for LPF_CHUNK bytes at a time. Past max_bytes for the whole step the factors would not
// stay in L2 until their chain and would only take bandwidth from the kernel beside: it asks
// for nothing.
#define LPF_CHUNK 8192
__device__ void lora_prefetch_l2_items(const char* A, const char* Bt, const int* items, const int* slot_rank,
                                       int in_dim, int R, int nt, int out_total, int elem, long long max_bytes) {
    // Reads only the step's metadata and slot ranks, which host copies write before the step,
    // and asks for slot factors, which no kernel writes: nothing here waits for the kernel before.
    long long ranks = 0;
    for (int i = 0; i < gridDim.y; i++) {
        int len = items[i * 3 + 1], slot = items[i * 3 + 2];
        if (slot >= 0 && len > 0) ranks += slot_rank[slot];
    }
    if (ranks * elem * ((long long)nt * in_dim + out_total) > max_bytes) return;
    int len = items[blockIdx.y * 3 + 1], slot = items[blockIdx.y * 3 + 2];
    if (slot < 0 || len <= 0) return;
    const long long rank = slot_rank[slot];
    const long long a_bytes = rank * in_dim * elem, b_bytes = rank * out_total * elem;
    const long long a_chunks = (a_bytes + LPF_CHUNK - 1) / LPF_CHUNK, b_chunks = (b_bytes + LPF_CHUNK - 1) / LPF_CHUNK;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < nt * a_chunks + b_chunks;
         i += (long long)gridDim.x * blockDim.x) {
        const char* p;
        long long bytes;
        if (i < nt * a_chunks) {
            long long t = i / a_chunks, c = i % a_chunks;
            p = A + ((long long)slot * nt + t) * R * in_dim * elem + c * LPF_CHUNK;
            bytes = min((long long)LPF_CHUNK, a_bytes - c * LPF_CHUNK);
        } else {
            long long c = i - nt * a_chunks;
            p = Bt + (long long)slot * R * out_total * elem + c * LPF_CHUNK;
            bytes = min((long long)LPF_CHUNK, b_bytes - c * LPF_CHUNK);
        }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p), "r"((unsigned)bytes) : "memory");
#else
        for (long long o = 0; o < bytes; o += 128) asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p + o));
#endif
    }
}

__device__ void lora_prefetch_l2_then_wait(const char* A, const char* Bt, const int* items, const int* slot_rank,
                                           int in_dim, int R, int nt, int out_total, int elem, long long max_bytes) {
    lora_prefetch_l2_items(A, Bt, items, slot_rank, in_dim, R, nt, out_total, elem, max_bytes);
    // Finishes no earlier than the kernel before it, as every kernel of a step does, so that
    // whatever waits on this one has waited on that one too.
    pdl_wait();
}

extern "C" __global__ void lora_prefetch_l2(const char* A, const char* Bt, const int* items, const int* slot_rank,
                                            int in_dim, int R, int nt, int out_total, int elem,
                                            long long max_bytes) {
    pdl_trigger();
    lora_prefetch_l2_then_wait(A, Bt, items, slot_rank, in_dim, R, nt, out_total, elem, max_bytes);
}
