// loraplane's CUDA kernels for Llama-family decoders with batched multi-LoRA.
//
// Every kernel is a template over the activation type T (float, __nv_bfloat16 or __half),
// instantiated with `_f32` / `_bf16` / `_f16` suffixes at the end of this file. Arithmetic is in float; values are
// rounded to T once per output element. Row-major layouts throughout; "rows" are the new tokens
// of one forward pass (prefill chunks and decode tokens of many sequences, concatenated).

#include <cuda_bf16.h>
#include <cuda_fp16.h>

typedef unsigned long long u64;
#define INFINITY __int_as_float(0x7f800000)

// Programmatic dependent launch (sm_90+). Every kernel opens with pdl_entry(): it waits until
// the kernels it depends on have finished and their writes are visible, then lets the kernels
// that depend on it be scheduled. Decode graphs (`server/src/backend/cuda/graph.rs`) mark the
// edges into these kernels programmatic, so a kernel's launch overlaps the drain of the one
// before it. A kernel may read memory that no kernel of a step writes (slot weights, step
// metadata) before its wait, in a function it calls first; opening with pdl_trigger() it also
// lets its dependents launch early. Launched without the attribute, these instructions do nothing.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_entry() {
    pdl_wait();
    pdl_trigger();
}

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// Sum over a block of up to 1024 threads; every thread gets the result.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    int nwarps = (blockDim.x + 31) >> 5;
    float t = lane < nwarps ? part[lane] : 0.f;
    return warp_sum(t);
}

// p[i] + delta[i] rounded to T, as float (p[i] alone when there is no delta): how a LoRA delta
// computed beside a GEMM joins that GEMM's output in the next kernel.
template <typename T>
__device__ __forceinline__ float plus_delta(const T* p, const T* delta, size_t i) {
    return delta ? to_f(from_f<T>(to_f(p[i]) + to_f(delta[i]))) : to_f(p[i]);
}
// The same for a 16-byte pack of T, with the delta's pack at `delta`.
template <typename T>
__device__ __forceinline__ uint4 add_pack(uint4 a, const T* delta) {
    uint4 d = *reinterpret_cast<const uint4*>(delta);
    T* av = reinterpret_cast<T*>(&a);
    const T* dv = reinterpret_cast<const T*>(&d);
#pragma unroll
    for (int k = 0; k < 16 / (int)sizeof(T); k++) av[k] = from_f<T>(to_f(av[k]) + to_f(dv[k]));
    return a;
}

// dst[i] = src[i] (+ delta[i], rounded to T) for i < n, by threads tid of nthreads: 16-byte
// packs where the pointers allow, each thread's loads of up to 4 packs issued ahead of their
// stores. A plain element loop waits a round trip per element, since for all the compiler knows
// dst aliases src.
template <typename T>
__device__ __forceinline__ void copy_row(T* dst, const T* src, const T* delta, int n, int tid, int nthreads) {
    constexpr int V = 16 / sizeof(T), U = 4;
    size_t addr = (size_t)dst | (size_t)src | (size_t)(delta ? delta : src);
    if (n % V != 0 || addr % 16 != 0) {
        for (int i = tid; i < n; i += nthreads) dst[i] = from_f<T>(plus_delta(src, delta, i));
        return;
    }
    int packs = n / V;
    for (int p0 = tid; p0 < packs; p0 += nthreads * U) {
        uint4 v[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            int p = p0 + u * nthreads;
            if (p < packs) {
                v[u] = *reinterpret_cast<const uint4*>(src + (size_t)p * V);
                if (delta) v[u] = add_pack(v[u], delta + (size_t)p * V);
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            int p = p0 + u * nthreads;
            if (p < packs) *reinterpret_cast<uint4*>(dst + (size_t)p * V) = v[u];
        }
    }
}

// out[r, :] = table[ids[r], :]. A negative id -(k + 1) is a token the host has not seen yet:
// the k-th token the previous step sampled, prev[k].x (sampling.cu's SampleOut rows), so that a
// step can be queued before the host has read the one before it.
template <typename T>
__device__ void embed(T* out, const T* table, const int* ids, const int2* prev, int h) {
    int r = blockIdx.x;
    int id = ids[r];
    if (id < 0) id = prev[-(id + 1)].x;
    copy_row(out + (size_t)r * h, table + (size_t)id * h, (const T*)nullptr, h, threadIdx.x, blockDim.x);
}

// Rows of up to RMS_PACKS_PER_THREAD 16-byte packs per thread stay in registers between the
// sum of squares and the scaling in rms_norm (the host launches enough threads for that).
#define RMS_PACKS_PER_THREAD 4

// out[r, :] = rmsnorm(x[src_row(r), :]) * w, HF LlamaRMSNorm (normalised value rounded to T
// before the weight). `rows_map` selects input rows (nullptr: identity). With `delta` (a LoRA
// delta computed beside the GEMM that wrote x, same row layout), the row is first updated in
// place: x += delta.
template <typename T>
__device__ void rms_norm(T* out, T* x, const T* delta, const T* w, const int* rows_map, int h, float eps) {
    int r = blockIdx.x;
    int src = rows_map ? rows_map[r] : r;
    T* xr = x + (size_t)src * h;
    const T* dr = delta ? delta + (size_t)src * h : nullptr;
    T* orow = out + (size_t)r * h;
    constexpr int V = 16 / sizeof(T);
    float ss = 0.f;
    if (h % V == 0 && h <= (int)blockDim.x * V * RMS_PACKS_PER_THREAD) {
        // One pass over memory: 16-byte loads kept in registers, 16-byte stores. A second pass
        // that reloaded x element by element made every H100 decode step 0.04-0.10 ms slower.
        uint4 keep[RMS_PACKS_PER_THREAD];
#pragma unroll
        for (int j = 0; j < RMS_PACKS_PER_THREAD; j++) {
            int i = (threadIdx.x + j * blockDim.x) * V;
            if (i < h) {
                uint4 raw = *reinterpret_cast<const uint4*>(xr + i);
                if (dr) {
                    raw = add_pack(raw, dr + i);
                    *reinterpret_cast<uint4*>(xr + i) = raw;
                }
                keep[j] = raw;
                const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
                for (int k = 0; k < V; k++) ss += to_f(v[k]) * to_f(v[k]);
            }
        }
        float inv = rsqrtf(block_sum(ss) / h + eps);
#pragma unroll
        for (int j = 0; j < RMS_PACKS_PER_THREAD; j++) {
            int i = (threadIdx.x + j * blockDim.x) * V;
            if (i < h) {
                uint4 wp = *reinterpret_cast<const uint4*>(w + i), res;
                const T* v = reinterpret_cast<const T*>(&keep[j]);
                const T* wv = reinterpret_cast<const T*>(&wp);
                T* o = reinterpret_cast<T*>(&res);
#pragma unroll
                for (int k = 0; k < V; k++) o[k] = from_f<T>(to_f(from_f<T>(to_f(v[k]) * inv)) * to_f(wv[k]));
                *reinterpret_cast<uint4*>(orow + i) = res;
            }
        }
        return;
    }
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        if (dr) xr[i] = from_f<T>(plus_delta(xr, dr, i));
        ss += to_f(xr[i]) * to_f(xr[i]);
    }
    // NB: block_sum's barriers also make this block's updates of x visible to all its threads.
    float inv = rsqrtf(block_sum(ss) / h + eps);
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float n = to_f(from_f<T>(to_f(xr[i]) * inv));
        orow[i] = from_f<T>(n * to_f(w[i]));
    }
}

// Rotates q and k of every row in place (HF rotate_half) with the step's cos/sin table, and
// writes k and v into the paged cache at slots[r]. qkv rows are [q_dim | kv_dim | kv_dim]. A
// non-null `delta` (same layout) is added first: the LoRA delta computed beside the GEMM.
template <typename T>
__device__ void rope_cache(T* qkv, const T* delta, T* k_cache, T* v_cache, const float* cs, const int* slots,
                           int n_heads, int n_kv_heads, int d) {
    // Block (x, y) threads take (pair, head): blockDim.y heads per block (thousands of
    // single-head blocks per prefill chunk left the SMs waiting on block launches); the extra
    // head index n_heads + n_kv_heads copies v.
    int r = blockIdx.x, head = blockIdx.y * blockDim.y + threadIdx.y;
    if (head > n_heads + n_kv_heads) return;
    int half = d / 2;
    int qd = n_heads * d, kvd = n_kv_heads * d;
    T* row = qkv + (size_t)r * (qd + 2 * kvd);
    const T* drow = delta ? delta + (size_t)r * (qd + 2 * kvd) : nullptr;
    size_t slot = (size_t)slots[r];
    if (head == n_heads + n_kv_heads) {
        copy_row(v_cache + slot * kvd, row + qd + kvd, drow ? drow + qd + kvd : nullptr, kvd, threadIdx.x,
                 blockDim.x);
        return;
    }
    const float* cr = cs + (size_t)r * d;
    T* hp = row + head * d;
    const T* dp = drow ? drow + head * d : nullptr;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float c = cr[i], s = cr[half + i];
        float x1 = plus_delta(hp, dp, i), x2 = plus_delta(hp, dp, i + half);
        T a = from_f<T>(x1 * c - x2 * s), b = from_f<T>(x2 * c + x1 * s);
        hp[i] = a;
        hp[i + half] = b;
        if (head >= n_heads) {
            int off = (head - n_heads) * d;
            k_cache[slot * kvd + off + i] = a;
            k_cache[slot * kvd + off + i + half] = b;
        }
    }
}

// out[r, j] = silu(gu[r, j]) * gu[r, inter + j]. Grid: (column blocks, rows); each thread takes
// 16 bytes of one row (V values) when inter is a multiple of V, else strides over the row. A
// non-null `delta` (same layout as gu: the LoRA delta computed beside the GEMM) is added first.
template <typename T>
__device__ __forceinline__ T silu_mul_one(T g, T u) {
    float gf = to_f(g);
    float s = to_f(from_f<T>(gf / (1.f + __expf(-gf))));
    return from_f<T>(s * to_f(u));
}
template <typename T>
__device__ void silu_mul(T* out, const T* gu, const T* delta, int rows, int inter) {
    constexpr int V = 16 / sizeof(T);
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        const T* g = gu + (size_t)r * 2 * inter;
        const T* u = g + inter;
        const T* dg = delta ? delta + (size_t)r * 2 * inter : nullptr;
        T* o = out + (size_t)r * inter;
        if (inter % V == 0) {
            for (int j = (blockIdx.x * blockDim.x + threadIdx.x) * V; j < inter; j += gridDim.x * blockDim.x * V) {
                uint4 graw = *reinterpret_cast<const uint4*>(g + j), uraw = *reinterpret_cast<const uint4*>(u + j);
                if (dg) {
                    graw = add_pack(graw, dg + j);
                    uraw = add_pack(uraw, dg + inter + j);
                }
                const T* gv = reinterpret_cast<const T*>(&graw);
                const T* uv = reinterpret_cast<const T*>(&uraw);
                uint4 oraw;
                T* ov = reinterpret_cast<T*>(&oraw);
#pragma unroll
                for (int k = 0; k < V; k++) ov[k] = silu_mul_one(gv[k], uv[k]);
                *reinterpret_cast<uint4*>(o + j) = oraw;
            }
        } else {
            for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < inter; j += gridDim.x * blockDim.x)
                o[j] = silu_mul_one(from_f<T>(plus_delta(g, dg, j)), from_f<T>(plus_delta(u, dg ? dg + inter : nullptr, j)));
        }
    }
}

// DPL values of T: one lane's dims of a key or value row, loaded as one vector where aligned.
template <typename T, int C>
struct alignas(C * sizeof(T) >= 16 ? 16 : C * sizeof(T)) DimPack {
    T v[C];
};

// Block z (of gridDim.z) of a decode row at position `pos`: the row uses
// `used` = min(splits, ceil(n / split_min_keys)) blocks for its n keys (within the window), and
// this one takes the z-th of `used` equal ranges, [lo, hi]; false for a block past `used`.
__device__ __forceinline__ bool split_key_range(int pos, int window, int split_min_keys, int& used, int& lo,
                                                int& hi) {
    int first = window > 0 ? max(0, pos + 1 - window) : 0;
    int n_keys = pos + 1 - first;
    used = min((int)gridDim.z, (n_keys + split_min_keys - 1) / split_min_keys);
    if ((int)blockIdx.z >= used) return false;
    int per = (n_keys + used - 1) / used;
    lo = first + blockIdx.z * per;
    hi = min(pos, lo + per - 1);
    return true;
}

// The end of a decode attention block (`attention` here, `decode_attention` in
// decode_attention.cu): merges the block's warps' partial softmaxes, kept in shared memory as
// sm_m / sm_l [warps][gs] (max in natural-log units, sum) and sm_acc [warps][gs][acc_stride]
// (unnormalised output), then writes the row's output, or with split keys this block's partial
// to `part` ([rows][kv heads][splits][group][d + 2]); the last of a (row, kv head)'s blocks to
// finish, found with `counters` (zero between launches: that block resets it), merges them.
template <typename T>
__device__ void attention_finish(T* out, const float* sm_m, const float* sm_l, const float* sm_acc, int gs,
                                 int acc_stride, int warps, int used, int group, int d, int n_heads,
                                 int n_kv_heads, float* part, int* counters) {
    int kvh = blockIdx.x, r = blockIdx.y, z = blockIdx.z, splits = gridDim.z;
    int qd = n_heads * d;
    // This block's partials for (row, kv head, split): `group` entries of [o; d, max, sum].
    float* pz = part + (((size_t)r * n_kv_heads + kvh) * splits + z) * group * (d + 2);
    for (int idx = threadIdx.x; idx < group * d; idx += blockDim.x) {
        int g = idx / d, j = idx % d;
        float mx = -INFINITY;
        for (int w = 0; w < warps; w++) mx = fmaxf(mx, sm_m[w * gs + g]);
        float sum = 0.f, o = 0.f;
        for (int w = 0; w < warps; w++) {
            float mw = sm_m[w * gs + g];
            if (mw == -INFINITY) continue;
            float c = __expf(mw - mx);
            sum += sm_l[w * gs + g] * c;
            o += sm_acc[(w * gs + g) * acc_stride + j] * c;
        }
        if (used == 1) {
            out[(size_t)r * qd + (kvh * group + g) * d + j] = from_f<T>(o / sum);
        } else {
            pz[g * (d + 2) + j] = o;
            if (j == 0) {
                pz[g * (d + 2) + d] = mx;
                pz[g * (d + 2) + d + 1] = sum;
            }
        }
    }
    if (used == 1) return;
    // Last block of this (row, kv head) merges every split (the threadFenceReduction pattern).
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    int* counter = counters + (size_t)r * n_kv_heads + kvh;
    if (threadIdx.x == 0) last = atomicAdd(counter, 1) == used - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    const float* p0 = part + ((size_t)r * n_kv_heads + kvh) * splits * group * (d + 2);
    for (int idx = threadIdx.x; idx < group * d; idx += blockDim.x) {
        int g = idx / d, j = idx % d;
        float mx = -INFINITY;
#pragma unroll 4
        for (int zz = 0; zz < used; zz++) mx = fmaxf(mx, __ldcg(p0 + (zz * group + g) * (d + 2) + d));
        float sum = 0.f, o = 0.f;
        // No branch on the loaded max: the loads of several splits go out together.
#pragma unroll 4
        for (int zz = 0; zz < used; zz++) {
            const float* pp = p0 + (zz * group + g) * (d + 2);
            float mz = __ldcg(pp + d), lz = __ldcg(pp + d + 1), oz = __ldcg(pp + j);
            float c = mz == -INFINITY ? 0.f : __expf(mz - mx);
            sum += lz * c;
            o += oz * c;
        }
        out[(size_t)r * qd + (kvh * group + g) * d + j] = from_f<T>(o / sum);
    }
    if (threadIdx.x == 0) *counter = 0;
}

// Causal attention of each row against its sequence's cached keys (paged), GQA-aware: one block
// per (kv head, row) handles the group of query heads sharing that kv head, so each key and
// value is read once per group. Warps take keys round-robin with an online softmax each (the
// next key's loads are issued before the current one is used), then merge through shared
// memory. G bounds the group size and DPL = ceil(head_dim / 32) (dims per lane), both
// compile-time so that every per-head array stays in registers. The warp count is the launch's
// (more warps per block when there are few blocks); the merge area is dynamic shared memory of
// warps * G * (2 + 32 * DPL) floats. `row_seq[r]` indexes
// `block_tables` ([seqs, max_blocks]); rows with row_seq < 0 are attended elsewhere.
//
// Split keys (flash-decoding): with gridDim.z = splits > 1, a row whose context has n keys uses
// `used` = min(splits, ceil(n / SPLIT_MIN_KEYS)) of its blocks (the rest exit at once; the grid
// is fixed in a CUDA graph, the context is not), and block z < used takes the z-th of `used`
// equal ranges of the row's keys, so that a few rows with long contexts still fill the GPU. Each
// block writes its partial softmax (max, sum, unnormalised output) to `part` and the last of a
// (row, kv head)'s blocks to finish merges them into `out` (`attention_finish`).
// 256: at 128 keys, 16 splits of 8 keys took 0.06-0.11 ms per step more than one block (H100).
#define SPLIT_MIN_KEYS 256
template <typename T, int G, int DPL>
__device__ void attention(T* out, const T* qkv, const T* k_cache, const T* v_cache,
                          const int* positions, const int* row_seq, const int* block_tables,
                          int max_blocks, int block_size, int n_heads, int n_kv_heads, int d,
                          float scale, int window, float* part, int* counters) {
    const int ATTN_WARPS = blockDim.x >> 5;
    int kvh = blockIdx.x, r = blockIdx.y;
    // Both loads before the branch: one round trip, not two.
    int seq = row_seq[r], pos = positions[r];
    if (seq < 0) return;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int group = n_heads / n_kv_heads;
    int qd = n_heads * d, kvd = n_kv_heads * d;
    const T* qrow = qkv + (size_t)r * (qd + 2 * kvd);
    int used, lo, hi;  // this block's keys [lo, hi]
    if (!split_key_range(pos, window, SPLIT_MIN_KEYS, used, lo, hi)) return;
    const int* table = block_tables + (size_t)seq * max_blocks;

    // Lane `lane` holds dims [d0, d0 + DPL) of q, of each key and value, and of the output.
    int d0 = lane * DPL;
    // Whole packs per lane: one vector load per key (and per value) instead of DPL loads.
    // Lanes past the head's dims (d < 32 * DPL) load lane 0's pack: their q is zero and their
    // output dims are never read.
    bool vec = d % DPL == 0;
    int dv = d0 < d ? d0 : 0;
    float q[G][DPL], acc[G][DPL], m[G], l[G];
#pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.f;
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            acc[g][i] = 0.f;
            q[g][i] = (g < group && d0 + i < d) ? to_f(qrow[(kvh * group + g) * d + d0 + i]) * scale : 0.f;
        }
    }
    // KPW keys per warp per iteration: their block-table entries, then their keys and values,
    // are all loaded before the first is used, so a warp waits for one round trip per KPW keys
    // instead of two per key.
    // 4, not 8: on the H100, batch-1 base decode took 6.76 ms with 4 and 6.87 with 8.
    constexpr int KPW = 4;
    using P = DimPack<T, DPL>;
    for (int p0 = lo + warp * KPW; p0 <= hi; p0 += ATTN_WARPS * KPW) {
        P k[KPW], v[KPW];
        size_t slot[KPW];
#pragma unroll
        for (int u = 0; u < KPW; u++) {
            int p = min(p0 + u, hi);  // past the end: re-read the last key, masked below
            slot[u] = (size_t)table[p / block_size] * block_size + p % block_size;
        }
        // One branch around all KPW loads: a branch per key made the compiler unpack each key
        // before issuing the next key's load, one round trip per key (H100, same call: batch-64
        // base decode 8.20 -> 7.96 ms, batch 8 at 4,000 tokens 10.26 -> 9.37 ms).
        if (vec) {
#pragma unroll
            for (int u = 0; u < KPW; u++) {
                k[u] = *reinterpret_cast<const P*>(k_cache + slot[u] * kvd + kvh * d + dv);
                v[u] = *reinterpret_cast<const P*>(v_cache + slot[u] * kvd + kvh * d + dv);
            }
        } else {
#pragma unroll
            for (int u = 0; u < KPW; u++) {
                const T* kp = k_cache + slot[u] * kvd + kvh * d + d0;
                const T* vp = v_cache + slot[u] * kvd + kvh * d + d0;
#pragma unroll
                for (int i = 0; i < DPL; i++) {
                    bool in = d0 + i < d;
                    k[u].v[i] = in ? kp[i] : from_f<T>(0.f);
                    v[u].v[i] = in ? vp[i] : from_f<T>(0.f);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < KPW; u++) {
            if (p0 + u > hi) break;
            float s[G];
#pragma unroll
            for (int g = 0; g < G; g++) {
                s[g] = 0.f;
#pragma unroll
                for (int i = 0; i < DPL; i++) s[g] += q[g][i] * to_f(k[u].v[i]);
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
                for (int g = 0; g < G; g++) s[g] += __shfl_xor_sync(0xffffffff, s[g], o);
            }
#pragma unroll
            for (int g = 0; g < G; g++) {
                float mn = fmaxf(m[g], s[g]);
                float corr = __expf(m[g] - mn), e = __expf(s[g] - mn);
                l[g] = l[g] * corr + e;
#pragma unroll
                for (int i = 0; i < DPL; i++) acc[g][i] = acc[g][i] * corr + e * to_f(v[u].v[i]);
                m[g] = mn;
            }
        }
    }
    // Merge the warps' partial softmaxes.
    extern __shared__ float attn_smem[];
    float* sm_m = attn_smem;                       // [warps][G]
    float* sm_l = sm_m + ATTN_WARPS * G;           // [warps][G]
    float* sm_acc = sm_l + ATTN_WARPS * G;         // [warps][G][DPL * 32]
#pragma unroll
    for (int g = 0; g < G; g++) {
        if (lane == 0) {
            sm_m[warp * G + g] = m[g];
            sm_l[warp * G + g] = l[g];
        }
#pragma unroll
        for (int i = 0; i < DPL; i++) sm_acc[(warp * G + g) * DPL * 32 + d0 + i] = acc[g][i];
    }
    __syncthreads();
    attention_finish<T>(out, sm_m, sm_l, sm_acc, G, DPL * 32, ATTN_WARPS, used, group, d, n_heads, n_kv_heads,
                        part, counters);
}

// cos and sin of every row's position for each rotary frequency, once per forward pass:
// cs[r] = [cos; half, sin; half].
__device__ void rope_table(float* cs, const int* positions, const float* inv_freq, int half) {
    int r = blockIdx.x;
    float pos = (float)positions[r];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float s, c;
        sincosf(pos * inv_freq[i], &s, &c);
        cs[(size_t)r * 2 * half + i] = c;
        cs[(size_t)r * 2 * half + half + i] = s;
    }
}

// LoRA shrink over a fused group of targets (q/k/v, gate/up, or a single one), split over `in`:
// yp[split][r, t*R + k] = x[r, slice] . A[slot][t*R + k, slice] for every row r of work item `it`,
// where slice = [split * SHRINK_SLICE, (split + 1) * SHRINK_SLICE) and the expand sums the splits.
// Work items are (first row, rows, slot); A is [slots, n_targets * R, in]; planes are `plane`
// floats apart. One block per (target, split, item), so the grid does not grow with the pool's
// rank (blocks that exit at once cost time in a CUDA graph at batch 64): warp w takes rank rows
// w, w + warps, ... below the slot's rank, SHRINK_KW of them at a time, holding their slices of A
// in registers (every load in flight at once: a rank-16 slice is one round trip), then walks the
// item's rows, reading each x slice once for those rank rows.
#define SHRINK_ROWS 4
#define SHRINK_SLICE 512
template <typename T, int SHRINK_KW>
__device__ void lora_shrink(float* yp, const T* x, const T* A, const int* items, const int* slot_rank,
                            int in_dim, int R, int n_targets, u64 plane) {
    int t = blockIdx.x % n_targets, split = blockIdx.x / n_targets, it = blockIdx.y;
    int first = items[it * 3], len = items[it * 3 + 1], slot = items[it * 3 + 2];
    if (slot < 0 || len <= 0) return;
    int rank = slot_rank[slot];
    int lo = split * SHRINK_SLICE, hi = min(in_dim, lo + SHRINK_SLICE);
    int ylen = n_targets * R;
    float* out = yp + split * plane;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    constexpr int V = 16 / sizeof(T);           // elements per 16-byte load
    constexpr int L = SHRINK_SLICE / (32 * V);  // 16-byte loads per lane per slice
    bool vec = in_dim % V == 0;
    for (int k0 = warp; k0 < rank; k0 += warps * SHRINK_KW) {
        const T* a[SHRINK_KW];
        uint4 areg[SHRINK_KW][L];
#pragma unroll
        for (int u = 0; u < SHRINK_KW; u++) {
            int k = k0 + u * warps;
            a[u] = A + ((size_t)slot * ylen + t * R + min(k, rank - 1)) * in_dim;
            if (vec) {
#pragma unroll
                for (int l = 0; l < L; l++) {
                    int i = lo + (l * 32 + lane) * V;
                    areg[u][l] = (k < rank && i < hi) ? *reinterpret_cast<const uint4*>(a[u] + i)
                                                      : make_uint4(0, 0, 0, 0);
                }
            }
        }
        for (int r0 = 0; r0 < len; r0 += SHRINK_ROWS) {
            int rows = min(SHRINK_ROWS, len - r0);
            const T* xr = x + (size_t)(first + r0) * in_dim;
            float s[SHRINK_KW][SHRINK_ROWS];
#pragma unroll
            for (int u = 0; u < SHRINK_KW; u++)
#pragma unroll
                for (int q = 0; q < SHRINK_ROWS; q++) s[u][q] = 0.f;
            if (vec) {
#pragma unroll
                for (int l = 0; l < L; l++) {
                    int i = lo + (l * 32 + lane) * V;
                    if (i < hi) {
#pragma unroll
                        for (int q = 0; q < SHRINK_ROWS; q++) {
                            if (q < rows) {
                                uint4 xraw = *reinterpret_cast<const uint4*>(xr + (size_t)q * in_dim + i);
                                const T* xv = reinterpret_cast<const T*>(&xraw);
#pragma unroll
                                for (int u = 0; u < SHRINK_KW; u++) {
                                    const T* av = reinterpret_cast<const T*>(&areg[u][l]);
#pragma unroll
                                    for (int v = 0; v < V; v++) s[u][q] += to_f(av[v]) * to_f(xv[v]);
                                }
                            }
                        }
                    }
                }
            } else {
                for (int i = lo + lane; i < hi; i += 32) {
#pragma unroll
                    for (int u = 0; u < SHRINK_KW; u++) {
                        float av = to_f(a[u][i]);
#pragma unroll
                        for (int q = 0; q < SHRINK_ROWS; q++)
                            if (q < rows) s[u][q] += av * to_f(xr[(size_t)q * in_dim + i]);
                    }
                }
            }
#pragma unroll
            for (int u = 0; u < SHRINK_KW; u++) {
                int k = k0 + u * warps;
#pragma unroll
                for (int q = 0; q < SHRINK_ROWS; q++) {
                    float v = warp_sum(s[u][q]);
                    if (lane == 0 && q < rows && k < rank) out[(size_t)(first + r0 + q) * ylen + t * R + k] = v;
                }
            }
        }
    }
}

// LoRA expand over a fused group: out[r, col] += scale[slot] * sum_k y[r, t(col)*R + k] * Bt[slot][k, col]
// where y is the sum of the shrink's `splits` planes, Bt is [slots, R, out_total] and columns
// [bounds[t], bounds[t+1]) belong to target t. One thread per C consecutive output columns (one
// 16-byte load of a Bt row when C > 1) for all rows of one item, EXPAND_ROWS rows at a time: the
// block first sums those rows' y over the splits into shared memory, and the loads of EXPAND_K
// rank rows are issued before the first is used (about rank / EXPAND_K round trips, not rank).
#define EXPAND_ROWS 4
#define EXPAND_K 8
// C values of T, aligned so that a 16-byte pack is one vector load.
template <typename T, int C>
struct alignas(C * sizeof(T) >= 16 ? 16 : sizeof(T)) Pack {
    T v[C];
};
template <typename T, int C, bool STORE>
__device__ void lora_expand(T* out, int out_stride, const float* yp, int splits, u64 plane, const T* Bt,
                            const int* items, const int* slot_rank, const float* slot_scale, int out_total,
                            int R, int n_targets, int b1, int b2) {
    int it = blockIdx.y;
    int first = items[it * 3], len = items[it * 3 + 1], slot = items[it * 3 + 2];
    if (slot < 0 || len <= 0) return;
    int col = (blockIdx.x * blockDim.x + threadIdx.x) * C;
    bool active = col < out_total;  // inactive threads still help fill shared memory
    int t = col < b1 ? 0 : (col < b2 ? 1 : 2);
    int rank = slot_rank[slot];
    float scale = slot_scale[slot];
    int ylen = n_targets * R;
    extern __shared__ float ys[];  // [EXPAND_ROWS][target][k < rank]: launched with room for R
    const T* b = Bt + (size_t)slot * R * out_total + (active ? col : 0);
    for (int r0 = 0; r0 < len; r0 += EXPAND_ROWS) {
        int rows = min(EXPAND_ROWS, len - r0);
        __syncthreads();
        for (int e = threadIdx.x; e < rows * n_targets * rank; e += blockDim.x) {
            int q = e / (n_targets * rank), tk = e % (n_targets * rank);
            const float* src = yp + (size_t)(first + r0 + q) * ylen + (tk / rank) * R + tk % rank;
            float v = 0.f;
#pragma unroll 8
            for (int sp = 0; sp < splits; sp++) v += src[sp * plane];
            ys[e] = v;
        }
        __syncthreads();
        if (!active) continue;
        const float* yr = ys + t * rank;
        float s[EXPAND_ROWS][C];
#pragma unroll
        for (int q = 0; q < EXPAND_ROWS; q++)
#pragma unroll
            for (int c = 0; c < C; c++) s[q][c] = 0.f;
        for (int k0 = 0; k0 < rank; k0 += EXPAND_K) {
            Pack<T, C> bv[EXPAND_K];
#pragma unroll
            for (int kk = 0; kk < EXPAND_K; kk++)
                if (k0 + kk < rank) bv[kk] = *reinterpret_cast<const Pack<T, C>*>(b + (size_t)(k0 + kk) * out_total);
#pragma unroll
            for (int kk = 0; kk < EXPAND_K; kk++) {
                if (k0 + kk < rank) {
#pragma unroll
                    for (int q = 0; q < EXPAND_ROWS; q++) {
                        if (q < rows) {
                            float yv = yr[q * n_targets * rank + k0 + kk];
#pragma unroll
                            for (int c = 0; c < C; c++) s[q][c] += to_f(bv[kk].v[c]) * yv;
                        }
                    }
                }
            }
        }
#pragma unroll
        for (int q = 0; q < EXPAND_ROWS; q++) {
            if (q < rows) {
                Pack<T, C>* o = reinterpret_cast<Pack<T, C>*>(out + (size_t)(first + r0 + q) * out_stride + col);
                Pack<T, C> ov;
                if (STORE) {
#pragma unroll
                    for (int c = 0; c < C; c++) ov.v[c] = from_f<T>(scale * s[q][c]);
                } else {
                    ov = *o;
#pragma unroll
                    for (int c = 0; c < C; c++) ov.v[c] = from_f<T>(to_f(ov.v[c]) + scale * s[q][c]);
                }
                *o = ov;
            }
        }
    }
}

// out[r] = argmax_j logits[r, j] (lowest index on ties).
__device__ void argmax(int* out, const float* logits, int vocab) {
    int r = blockIdx.x;
    const float* l = logits + (size_t)r * vocab;
    float best = -INFINITY;
    int idx = 0x7fffffff;
    auto take = [&](float v, int j) {
        if (v > best || (v == best && j < idx)) {
            best = v;
            idx = j;
        }
    };
    if (vocab % 4 == 0 && (size_t)l % 16 == 0) {
        // 4 float4 loads per thread in flight, not one float at a time (a warp issues in order).
        const float4* l4 = reinterpret_cast<const float4*>(l);
        int n4 = vocab / 4;
        for (int j0 = threadIdx.x; j0 < n4; j0 += 4 * blockDim.x) {
            float4 v[4];
#pragma unroll
            for (int u = 0; u < 4; u++)
                if (j0 + u * (int)blockDim.x < n4) v[u] = l4[j0 + u * blockDim.x];
#pragma unroll
            for (int u = 0; u < 4; u++) {
                int j = 4 * (j0 + u * blockDim.x);
                if (j >= vocab) break;
                take(v[u].x, j);
                take(v[u].y, j + 1);
                take(v[u].z, j + 2);
                take(v[u].w, j + 3);
            }
        }
    } else {
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) take(l[j], j);
    }
    __shared__ float sb[1024];
    __shared__ int si[1024];
    sb[threadIdx.x] = best;
    si[threadIdx.x] = idx;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            float ob = sb[threadIdx.x + s];
            int oi = si[threadIdx.x + s];
            if (ob > sb[threadIdx.x] || (ob == sb[threadIdx.x] && oi < si[threadIdx.x])) {
                sb[threadIdx.x] = ob;
                si[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[r] = si[0];
}

// Deterministic uniform values in [-scale, scale) from (seed, index): dummy weights without a
// host round trip (a splitmix64 hash per element).
template <typename T>
__device__ void fill_uniform(T* p, u64 n, u64 seed, float scale) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        u64 z = seed + i * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        float u = (float)(z >> 40) * (1.0f / 16777216.0f);
        p[i] = from_f<T>((2.f * u - 1.f) * scale);
    }
}

// lora_shrink_{S}_kw{KW}: KW rank rows per warp in flight.
#define INSTANTIATE_SHRINK(T, S, KW)                                                                       \
    extern "C" __global__ void lora_shrink_##S##_kw##KW(float* y, const T* x, const T* A, const int* items, \
                                                       const int* slot_rank, int in_dim, int R, int nt,    \
                                                       u64 plane) {                                        \
        pdl_entry();                                                                                       \
        lora_shrink<T, KW>(y, x, A, items, slot_rank, in_dim, R, nt, plane);                               \
    }
#define INSTANTIATE(T, S)                                                                                  \
    extern "C" __global__ void embed_##S(T* out, const T* table, const int* ids, const int2* prev, int h) { \
        pdl_entry();                                                                                        \
        embed<T>(out, table, ids, prev, h);                                                                \
    }                                                                                                      \
    extern "C" __global__ void rms_norm_##S(T* out, T* x, const T* delta, const T* w, const int* rows_map,  \
                                            int h, float eps) {                                            \
        pdl_entry();                                                                                       \
        rms_norm<T>(out, x, delta, w, rows_map, h, eps);                                                   \
    }                                                                                                      \
    extern "C" __global__ void rope_cache_##S(T* qkv, const T* delta, T* kc, T* vc, const float* cs,        \
                                              const int* slots, int nh, int nkv, int d) {                  \
        pdl_entry();                                                                                       \
        rope_cache<T>(qkv, delta, kc, vc, cs, slots, nh, nkv, d);                                          \
    }                                                                                                      \
    extern "C" __global__ void silu_mul_##S(T* out, const T* gu, const T* delta, int rows, int inter) {     \
        pdl_entry();                                                                                        \
        silu_mul<T>(out, gu, delta, rows, inter);                                                          \
    }                                                                                                      \
    INSTANTIATE_SHRINK(T, S, 1)                                                                            \
    INSTANTIATE_SHRINK(T, S, 4)                                                                            \
    extern "C" __global__ void fill_uniform_##S(T* p, u64 n, u64 seed, float scale) {                       \
        pdl_entry();                                                                                        \
        fill_uniform<T>(p, n, seed, scale);                                                                \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)

extern "C" __global__ void argmax_f32(int* out, const float* logits, int vocab) {
    pdl_entry();
    argmax(out, logits, vocab);
}

#define INSTANTIATE_BIAS(T, S)                                                                   \
    extern "C" __global__ void add_bias_##S(T* out, const T* bias, int rows, int n) {          \
        pdl_entry();                                                                           \
        size_t total = (size_t)rows * n;                                                         \
        for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;                \
             i += (size_t)gridDim.x * blockDim.x)                                                \
            out[i] = from_f<T>(to_f(out[i]) + to_f(bias[i % n]));                                \
    }
INSTANTIATE_BIAS(float, f32)
INSTANTIATE_BIAS(__nv_bfloat16, bf16)
INSTANTIATE_BIAS(__half, f16)

// Copies one sequence's first L cached keys and values out of the paged cache into dense
// [kv_heads, L, d] buffers, so that prefill attention can run as batched GEMMs.
template <typename T>
__device__ void gather_kv(T* k_out, T* v_out, const T* k_cache, const T* v_cache, const int* table, int L,
                          int block_size, int n_kv_heads, int d) {
    int p = blockIdx.x;
    size_t slot = (size_t)table[p / block_size] * block_size + p % block_size;
    int kvd = n_kv_heads * d;
    for (int i = threadIdx.x; i < kvd; i += blockDim.x) {
        int h = i / d, j = i % d;
        size_t o = ((size_t)h * L + p) * d + j;
        k_out[o] = k_cache[slot * kvd + i];
        v_out[o] = v_cache[slot * kvd + i];
    }
}

// Causal softmax of score rows: s is [rows, L] f32 (already scaled) for query positions
// first_pos + (row % rows_per_head); keys past the position (or before the sliding window) get
// probability 0. Writes p as T.
template <typename T>
__device__ void causal_softmax(T* p, const float* s, int L, int rows_per_head, int first_pos, int window) {
    size_t row = blockIdx.x;
    int pos = first_pos + (int)(row % rows_per_head);
    int lo = window > 0 ? max(0, pos + 1 - window) : 0;
    int hi = min(pos, L - 1);
    const float* sr = s + row * L;
    T* pr = p + row * L;
    float mx = -INFINITY;
    for (int k = lo + threadIdx.x; k <= hi; k += blockDim.x) mx = fmaxf(mx, sr[k]);
    __shared__ float red[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
    if (lane == 0) red[warp] = mx;
    __syncthreads();
    if (warp == 0) {
        float v = lane < (blockDim.x >> 5) ? red[lane] : -INFINITY;
        for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
        if (lane == 0) red[0] = v;
    }
    __syncthreads();
    mx = red[0];
    __syncthreads();
    float sum = 0.f;
    for (int k = lo + threadIdx.x; k <= hi; k += blockDim.x) sum += __expf(sr[k] - mx);
    sum = block_sum(sum);
    float inv = 1.f / sum;
    for (int k = threadIdx.x; k < L; k += blockDim.x)
        pr[k] = from_f<T>((k >= lo && k <= hi) ? __expf(sr[k] - mx) * inv : 0.f);
}

#define INSTANTIATE_PREFILL(T, S)                                                                          \
    extern "C" __global__ void gather_kv_##S(T* ko, T* vo, const T* kc, const T* vc, const int* table, int L, \
                                             int bs, int nkv, int d) {                                     \
        pdl_entry();                                                                                       \
        gather_kv<T>(ko, vo, kc, vc, table, L, bs, nkv, d);                                               \
    }                                                                                                      \
    extern "C" __global__ void causal_softmax_##S(T* p, const float* s, int L, int rows_per_head,          \
                                                  int first_pos, int window) {                             \
        pdl_entry();                                                                                       \
        causal_softmax<T>(p, s, L, rows_per_head, first_pos, window);                                      \
    }
INSTANTIATE_PREFILL(float, f32)
INSTANTIATE_PREFILL(__nv_bfloat16, bf16)
INSTANTIATE_PREFILL(__half, f16)

#define INSTANTIATE_ATTN(T, S, G, D)                                                                        \
    extern "C" __global__ void attention_##S##_g##G##_d##D(                                                \
        T* out, const T* qkv, const T* kc, const T* vc, const int* positions, const int* row_seq,          \
        const int* tables, int max_blocks, int block_size, int nh, int nkv, int d, float scale, int window,   \
        float* part, int* counters) {                                                                        \
        pdl_entry();                                                                                         \
        attention<T, G, D>(out, qkv, kc, vc, positions, row_seq, tables, max_blocks, block_size, nh, nkv, d, \
                           scale, window, part, counters);                                                 \
    }
#define INSTANTIATE_ATTN_G(T, S, G) \
    INSTANTIATE_ATTN(T, S, G, 1) INSTANTIATE_ATTN(T, S, G, 2) INSTANTIATE_ATTN(T, S, G, 4) INSTANTIATE_ATTN(T, S, G, 8)
INSTANTIATE_ATTN_G(float, f32, 1)
INSTANTIATE_ATTN_G(float, f32, 2)
INSTANTIATE_ATTN_G(float, f32, 4)
INSTANTIATE_ATTN_G(float, f32, 8)
INSTANTIATE_ATTN_G(__nv_bfloat16, bf16, 1)
INSTANTIATE_ATTN_G(__half, f16, 1)
INSTANTIATE_ATTN_G(__nv_bfloat16, bf16, 2)
INSTANTIATE_ATTN_G(__half, f16, 2)
INSTANTIATE_ATTN_G(__nv_bfloat16, bf16, 4)
INSTANTIATE_ATTN_G(__half, f16, 4)
INSTANTIATE_ATTN_G(__nv_bfloat16, bf16, 8)
INSTANTIATE_ATTN_G(__half, f16, 8)

// lora_expand adds the delta to `out`; lora_expand_store writes it (into a delta buffer).
#define INSTANTIATE_EXPAND_AS(T, S, C, NAME, KIND, STORE)                                                  \
    extern "C" __global__ void KIND##_##S##_##NAME(T* out, int out_stride, const float* y, int splits,       \
                                                   u64 plane, const T* Bt, const int* items,                 \
                                                   const int* slot_rank, const float* slot_scale,            \
                                                   int out_total, int R, int nt, int b1, int b2) {           \
        pdl_entry();                                                                                         \
        lora_expand<T, C, STORE>(out, out_stride, y, splits, plane, Bt, items, slot_rank, slot_scale, out_total, \
                                 R, nt, b1, b2);                                                           \
    }
#define INSTANTIATE_EXPAND(T, S, C, NAME)                          \
    INSTANTIATE_EXPAND_AS(T, S, C, NAME, lora_expand, false)       \
    INSTANTIATE_EXPAND_AS(T, S, C, NAME, lora_expand_store, true)
// c1: one column per thread (any shape); vec: one 16-byte load of Bt per thread per rank row.
INSTANTIATE_EXPAND(float, f32, 1, c1)
INSTANTIATE_EXPAND(float, f32, 4, vec)
INSTANTIATE_EXPAND(__nv_bfloat16, bf16, 1, c1)
INSTANTIATE_EXPAND(__half, f16, 1, c1)
INSTANTIATE_EXPAND(__nv_bfloat16, bf16, 8, vec)
INSTANTIATE_EXPAND(__half, f16, 8, vec)

extern "C" __global__ void rope_table_f32(float* cs, const int* positions, const float* inv_freq, int half) {
    pdl_entry();
    rope_table(cs, positions, inv_freq, half);
}
