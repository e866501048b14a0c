// loraplane's CUDA kernels for Llama-family decoders with batched multi-LoRA.
//
// Every kernel is a template over the activation type T (float or __nv_bfloat16), instantiated
// with `_f32` / `_bf16` suffixes at the end of this file. Arithmetic is in float; values are
// rounded to T once per output element. Row-major layouts throughout; "rows" are the new tokens
// of one forward pass (prefill chunks and decode tokens of many sequences, concatenated).

#include <cuda_bf16.h>

typedef unsigned long long u64;
#define INFINITY __int_as_float(0x7f800000)

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}

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

// out[r, :] = table[ids[r], :]
template <typename T>
__device__ void embed(T* out, const T* table, const int* ids, int h) {
    int r = blockIdx.x;
    const T* src = table + (size_t)ids[r] * h;
    for (int i = threadIdx.x; i < h; i += blockDim.x) out[(size_t)r * h + i] = src[i];
}

// out[r, :] = rmsnorm(x[src_row(r), :]) * w, HF LlamaRMSNorm (normalised value rounded to T
// before the weight). `rows_map` selects input rows (nullptr: identity).
template <typename T>
__device__ void rms_norm(T* out, const T* x, const T* w, const int* rows_map, int h, float eps) {
    int r = blockIdx.x;
    int src = rows_map ? rows_map[r] : r;
    const T* xr = x + (size_t)src * h;
    float ss = 0.f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float v = to_f(xr[i]);
        ss += v * v;
    }
    float inv = rsqrtf(block_sum(ss) / h + eps);
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float n = to_f(from_f<T>(to_f(xr[i]) * inv));
        out[(size_t)r * h + i] = from_f<T>(n * to_f(w[i]));
    }
}

// Rotates q and k of every row in place (HF rotate_half) and writes k and v into the paged
// cache at slots[r]. qkv rows are [q_dim | kv_dim | kv_dim].
template <typename T>
__device__ void rope_cache(T* qkv, T* k_cache, T* v_cache, const int* positions, const int* slots,
                           const float* inv_freq, int n_heads, int n_kv_heads, int d) {
    int r = blockIdx.x;
    int half = d / 2;
    int qd = n_heads * d, kvd = n_kv_heads * d;
    T* row = qkv + (size_t)r * (qd + 2 * kvd);
    float pos = (float)positions[r];
    int pairs = (n_heads + n_kv_heads) * half;
    size_t slot = (size_t)slots[r];
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        int head = p / half, i = p % half;
        T* hp = row + head * d;
        float s, c;
        sincosf(pos * inv_freq[i], &s, &c);
        float x1 = to_f(hp[i]), x2 = to_f(hp[i + half]);
        T a = from_f<T>(x1 * c - x2 * s), b = from_f<T>(x2 * c + x1 * s);
        hp[i] = a;
        hp[i + half] = b;
        if (head >= n_heads) {
            int off = (head - n_heads) * d;
            k_cache[slot * kvd + off + i] = a;
            k_cache[slot * kvd + off + i + half] = b;
        }
    }
    for (int i = threadIdx.x; i < kvd; i += blockDim.x) v_cache[slot * kvd + i] = row[qd + kvd + i];
}

// out[r, j] = silu(gu[r, j]) * gu[r, inter + j]
template <typename T>
__device__ void silu_mul(T* out, const T* gu, int rows, int inter) {
    size_t n = (size_t)rows * inter;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
         idx += (size_t)gridDim.x * blockDim.x) {
        size_t r = idx / inter, j = idx % inter;
        float g = to_f(gu[r * 2 * inter + j]), u = to_f(gu[r * 2 * inter + inter + j]);
        float s = to_f(from_f<T>(g / (1.f + __expf(-g))));
        out[idx] = from_f<T>(s * u);
    }
}

#define ATTN_WARPS 4
#define ATTN_MAX_DPL 8    // head_dim up to 256
#define ATTN_MAX_GROUP 8  // query heads per kv head

// Causal attention of each row against its sequence's cached keys (paged), GQA-aware: one block
// per (kv head, row) handles the group of query heads sharing that kv head, so each key and
// value is read once per group. Warps take keys round-robin with an online softmax each, then
// merge through shared memory. `row_seq[r]` indexes `block_tables` ([seqs, max_blocks]).
template <typename T>
__device__ void attention(T* out, const T* qkv, const T* k_cache, const T* v_cache,
                          const int* positions, const int* row_seq, const int* block_tables,
                          int max_blocks, int block_size, int n_heads, int n_kv_heads, int d,
                          float scale, int window) {
    int kvh = blockIdx.x, r = blockIdx.y;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int group = n_heads / n_kv_heads;
    int dpl = (d + 31) / 32;  // dims per lane; lanes past d idle
    int qd = n_heads * d, kvd = n_kv_heads * d;
    const T* qrow = qkv + (size_t)r * (qd + 2 * kvd);
    int pos = positions[r];
    int first = window > 0 ? max(0, pos + 1 - window) : 0;
    const int* table = block_tables + (size_t)row_seq[r] * max_blocks;

    float q[ATTN_MAX_GROUP][ATTN_MAX_DPL];
    float acc[ATTN_MAX_GROUP][ATTN_MAX_DPL];
    float m[ATTN_MAX_GROUP], l[ATTN_MAX_GROUP];
#pragma unroll
    for (int g = 0; g < ATTN_MAX_GROUP; g++) {
        m[g] = -INFINITY;
        l[g] = 0.f;
#pragma unroll
        for (int i = 0; i < ATTN_MAX_DPL; i++) {
            acc[g][i] = 0.f;
            q[g][i] = (g < group && i * 32 + lane < d) ? to_f(qrow[(kvh * group + g) * d + i * 32 + lane]) * scale : 0.f;
        }
    }
    for (int p = first + warp; p <= pos; p += ATTN_WARPS) {
        size_t slot = (size_t)table[p / block_size] * block_size + p % block_size;
        const T* kp = k_cache + slot * kvd + kvh * d;
        const T* vp = v_cache + slot * kvd + kvh * d;
        float k[ATTN_MAX_DPL], v[ATTN_MAX_DPL];
#pragma unroll
        for (int i = 0; i < ATTN_MAX_DPL; i++) {
            bool in = i < dpl && i * 32 + lane < d;
            k[i] = in ? to_f(kp[i * 32 + lane]) : 0.f;
            v[i] = in ? to_f(vp[i * 32 + lane]) : 0.f;
        }
#pragma unroll
        for (int g = 0; g < ATTN_MAX_GROUP; g++) {
            if (g >= group) break;
            float s = 0.f;
#pragma unroll
            for (int i = 0; i < ATTN_MAX_DPL; i++) s += q[g][i] * k[i];
            s = warp_sum(s);
            float mn = fmaxf(m[g], s);
            float corr = __expf(m[g] - mn), e = __expf(s - mn);
            l[g] = l[g] * corr + e;
#pragma unroll
            for (int i = 0; i < ATTN_MAX_DPL; i++) acc[g][i] = acc[g][i] * corr + e * v[i];
            m[g] = mn;
        }
    }
    // Merge the warps' partial softmaxes.
    __shared__ float sm_m[ATTN_WARPS][ATTN_MAX_GROUP], sm_l[ATTN_WARPS][ATTN_MAX_GROUP];
    __shared__ float sm_acc[ATTN_WARPS][ATTN_MAX_GROUP][ATTN_MAX_DPL * 32];
    for (int g = 0; g < group; g++) {
        if (lane == 0) {
            sm_m[warp][g] = m[g];
            sm_l[warp][g] = l[g];
        }
#pragma unroll
        for (int i = 0; i < ATTN_MAX_DPL; i++)
            if (i < dpl && i * 32 + lane < d) sm_acc[warp][g][i * 32 + lane] = acc[g][i];
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < group * d; idx += blockDim.x) {
        int g = idx / d, j = idx % d;
        float mx = -INFINITY;
        for (int w = 0; w < ATTN_WARPS; w++) mx = fmaxf(mx, sm_m[w][g]);
        float sum = 0.f, o = 0.f;
        for (int w = 0; w < ATTN_WARPS; w++) {
            if (sm_m[w][g] == -INFINITY) continue;
            float c = __expf(sm_m[w][g] - mx);
            sum += sm_l[w][g] * c;
            o += sm_acc[w][g][j] * c;
        }
        out[(size_t)r * qd + (kvh * group + g) * d + j] = from_f<T>(o / sum);
    }
}

// LoRA shrink over a fused group of targets (q/k/v, gate/up, or a single one):
// y[r, t*R + k] = x[r, :] . A[slot][t*R + k, :] for every row r of work item `it`.
// Work items are (first row, rows, slot); A is [slots, n_targets * R, in].
// One warp per (rank row, item, chunk of SHRINK_ROWS rows): each A row is read once per chunk.
#define SHRINK_ROWS 4
template <typename T>
__device__ void lora_shrink(float* y, const T* x, const T* A, const int* items, const int* slot_rank,
                            int in_dim, int R, int n_targets) {
    int it = blockIdx.y;
    int first = items[it * 3], len = items[it * 3 + 1], slot = items[it * 3 + 2];
    int chunk = blockIdx.z * SHRINK_ROWS;
    if (slot < 0 || chunk >= len) return;
    int rank = slot_rank[slot];
    int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);  // t*R + k
    int lane = threadIdx.x & 31;
    if (j >= n_targets * R) return;
    int ylen = n_targets * R;
    int rows = min(SHRINK_ROWS, len - chunk);
    if (j % R >= rank) {
        if (lane < rows) y[(size_t)(first + chunk + lane) * ylen + j] = 0.f;
        return;
    }
    const T* a = A + ((size_t)slot * ylen + j) * in_dim;
    const T* xr = x + (size_t)(first + chunk) * in_dim;
    float s[SHRINK_ROWS] = {0.f, 0.f, 0.f, 0.f};
    constexpr int V = 16 / sizeof(T);  // elements per 16-byte load
    if (in_dim % V == 0) {
        // 16-byte loads, several in flight per lane: the loop is latency-bound otherwise.
#pragma unroll 4
        for (int i = lane * V; i < in_dim; i += 32 * V) {
            uint4 araw = *reinterpret_cast<const uint4*>(a + i);
            const T* av = reinterpret_cast<const T*>(&araw);
#pragma unroll
            for (int q = 0; q < SHRINK_ROWS; q++) {
                if (q < rows) {
                    uint4 xraw = *reinterpret_cast<const uint4*>(xr + (size_t)q * in_dim + i);
                    const T* xv = reinterpret_cast<const T*>(&xraw);
#pragma unroll
                    for (int v = 0; v < V; v++) s[q] += to_f(av[v]) * to_f(xv[v]);
                }
            }
        }
    } else {
        for (int i = lane; i < in_dim; i += 32) {
            float av = to_f(a[i]);
#pragma unroll
            for (int q = 0; q < SHRINK_ROWS; q++)
                if (q < rows) s[q] += av * to_f(xr[(size_t)q * in_dim + i]);
        }
    }
#pragma unroll
    for (int q = 0; q < SHRINK_ROWS; q++) {
        float t = warp_sum(s[q]);
        if (lane == 0 && q < rows) y[(size_t)(first + chunk + q) * ylen + j] = t;
    }
}

// LoRA expand over a fused group: out[r, col] += scale[slot] * sum_k y[r, t(col)*R + k] * Bt[slot][k, col]
// where Bt is [slots, R, out_total] and columns [bounds[t], bounds[t+1]) belong to target t.
// One thread per output column, for a chunk of EXPAND_ROWS rows of one item.
#define EXPAND_ROWS 4
template <typename T>
__device__ void lora_expand(T* out, int out_stride, const float* y, const T* Bt, const int* items,
                            const int* slot_rank, const float* slot_scale, int out_total, int R,
                            int n_targets, int b1, int b2) {
    int it = blockIdx.y;
    int first = items[it * 3], len = items[it * 3 + 1], slot = items[it * 3 + 2];
    int chunk = blockIdx.z * EXPAND_ROWS;
    int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (slot < 0 || chunk >= len || col >= out_total) return;
    int t = col < b1 ? 0 : (col < b2 ? 1 : 2);
    int rank = slot_rank[slot];
    float scale = slot_scale[slot];
    int rows = min(EXPAND_ROWS, len - chunk);
    int ylen = n_targets * R;
    const T* b = Bt + (size_t)slot * R * out_total + col;
    float s[EXPAND_ROWS] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 8
    for (int k = 0; k < rank; k++) {
        float bv = to_f(b[(size_t)k * out_total]);
#pragma unroll
        for (int q = 0; q < EXPAND_ROWS; q++)
            if (q < rows) s[q] += bv * y[(size_t)(first + chunk + q) * ylen + t * R + k];
    }
#pragma unroll
    for (int q = 0; q < EXPAND_ROWS; q++) {
        if (q < rows) {
            T* o = out + (size_t)(first + chunk + q) * out_stride + col;
            *o = from_f<T>(to_f(*o) + scale * s[q]);
        }
    }
}

// out[r] = argmax_j logits[r, j] (lowest index on ties).
__device__ void argmax(int* out, const float* logits, int vocab) {
    int r = blockIdx.x;
    const float* l = logits + (size_t)r * vocab;
    float best = -INFINITY;
    int idx = 0x7fffffff;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float v = l[j];
        if (v > best || (v == best && j < idx)) {
            best = v;
            idx = j;
        }
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

template <typename T>
__device__ void cast_from_f32(T* out, const float* in, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = from_f<T>(in[i]);
}

template <typename T>
__device__ void to_f32(float* out, const T* in, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = to_f(in[i]);
}

#define INSTANTIATE(T, S)                                                                                  \
    extern "C" __global__ void embed_##S(T* out, const T* table, const int* ids, int h) {                   \
        embed<T>(out, table, ids, h);                                                                      \
    }                                                                                                      \
    extern "C" __global__ void rms_norm_##S(T* out, const T* x, const T* w, const int* rows_map, int h,     \
                                            float eps) {                                                   \
        rms_norm<T>(out, x, w, rows_map, h, eps);                                                          \
    }                                                                                                      \
    extern "C" __global__ void rope_cache_##S(T* qkv, T* kc, T* vc, const int* positions, const int* slots, \
                                              const float* inv_freq, int nh, int nkv, int d) {             \
        rope_cache<T>(qkv, kc, vc, positions, slots, inv_freq, nh, nkv, d);                                \
    }                                                                                                      \
    extern "C" __global__ void silu_mul_##S(T* out, const T* gu, int rows, int inter) {                     \
        silu_mul<T>(out, gu, rows, inter);                                                                 \
    }                                                                                                      \
    extern "C" __global__ void attention_##S(T* out, const T* qkv, const T* kc, const T* vc,                \
                                             const int* positions, const int* row_seq, const int* tables,  \
                                             int max_blocks, int block_size, int nh, int nkv, int d,       \
                                             float scale, int window) {                                    \
        attention<T>(out, qkv, kc, vc, positions, row_seq, tables, max_blocks, block_size, nh, nkv, d,     \
                     scale, window);                                                                       \
    }                                                                                                      \
    extern "C" __global__ void lora_shrink_##S(float* y, const T* x, const T* A, const int* items,          \
                                               const int* slot_rank, int in_dim, int R, int nt) {          \
        lora_shrink<T>(y, x, A, items, slot_rank, in_dim, R, nt);                                          \
    }                                                                                                      \
    extern "C" __global__ void lora_expand_##S(T* out, int out_stride, const float* y, const T* Bt,         \
                                               const int* items, const int* slot_rank,                     \
                                               const float* slot_scale, int out_total, int R, int nt,      \
                                               int b1, int b2) {                                           \
        lora_expand<T>(out, out_stride, y, Bt, items, slot_rank, slot_scale, out_total, R, nt, b1, b2);    \
    }                                                                                                      \
    extern "C" __global__ void fill_uniform_##S(T* p, u64 n, u64 seed, float scale) {                       \
        fill_uniform<T>(p, n, seed, scale);                                                                \
    }                                                                                                      \
    extern "C" __global__ void cast_from_f32_##S(T* out, const float* in, u64 n) {                          \
        cast_from_f32<T>(out, in, n);                                                                      \
    }                                                                                                      \
    extern "C" __global__ void to_f32_##S(float* out, const T* in, u64 n) { to_f32<T>(out, in, n); }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)

extern "C" __global__ void argmax_f32(int* out, const float* logits, int vocab) { argmax(out, logits, vocab); }

#define INSTANTIATE_BIAS(T, S)                                                                   \
    extern "C" __global__ void add_bias_##S(T* out, const T* bias, int rows, int n) {          \
        size_t total = (size_t)rows * n;                                                         \
        for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;                \
             i += (size_t)gridDim.x * blockDim.x)                                                \
            out[i] = from_f<T>(to_f(out[i]) + to_f(bias[i % n]));                                \
    }
INSTANTIATE_BIAS(float, f32)
INSTANTIATE_BIAS(__nv_bfloat16, bf16)
