// Token sampling on the device: one block per sampled row of f32 logits `[rows, vocab]`, so that
// only the chosen token and its log-probability cross to the host.
//
// Compiled after llama.cu in one NVRTC program (kernels/src/lib.rs) but self-contained: the
// helpers live in namespace smp. The kept set is the host's (`kept_tokens()` in
// server/src/engine/sampling.rs): with w = exp((l - max) / T), top-k keeps the k largest w, min-p
// drops w < min_p (w_max = 1), top-p keeps the shortest run, in descending order of what is left,
// whose mass reaches top_p of the top-k set's mass; the token is drawn in proportion to w.
// Thresholds come from radix select over order-preserving bits of the logits (count or mass
// histograms in shared memory, 8 bits per pass), not from a sort. Tokens exactly tied with a
// threshold are all kept (the host keeps the lower ids among them). Masses are fixed point
// summed with integer atomics, so no sum depends on thread timing: a row's token is a function
// of its logits, parameters and seed.

namespace smp {

typedef unsigned long long u64;

constexpr unsigned FULL = 0xffffffffu;
constexpr int BINS = 256;
constexpr int NO_TOKEN = 0x7fffffff;
// w = 1 in fixed point (2^40): tokens with w below 2^-41 weigh nothing, and 2^24 tokens of w = 1
// still fit in 64 bits (the host refuses larger vocabularies).
constexpr float MASS_ONE = 1099511627776.0f;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// a < b  <=>  key(a) < key(b) for non-NaN floats (-0 sorts just below +0).
__device__ __forceinline__ unsigned key(float f) {
    unsigned u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// SplitMix64's finaliser: host seeds may be small consecutive integers.
__device__ __forceinline__ u64 mix(u64 z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Per-row parameters, laid out as `SampleRow` in server/src/backend/cuda/sampling.rs.
struct SampleRow {
    float temperature;  // <= 0: greedy
    float top_p;        // (0, 1]; 1: off
    float min_p;        // [0, 1]; 0: off
    int top_k;          // 0: off; 1: greedy
    int row;            // row of the logits matrix
    int penalized;      // row of the penalised copies to draw from; -1: the logits row itself
    u64 seed;
};

// One row's penalties, laid out as `PenaltyRow` in server/src/backend/cuda/sampling.rs: tokens
// [first, first + count) of the token and count lists.
struct PenaltyRow {
    int row;
    int first;
    int count;
    float repetition;  // 1: off
    float frequency;
    float presence;
};

struct SampleOut {
    int token;
    float logprob;  // under the unmodified distribution: l[token] - logsumexp(l)
};

// Running max, sum of exp(l - max) and the lowest index of the max.
struct Stats {
    float max;
    float sum;
    int arg;
};

// Commutative bit for bit, so every lane of a butterfly reduction agrees.
__device__ __forceinline__ Stats merge(Stats a, Stats b) {
    float m = fmaxf(a.max, b.max);
    float sa = a.sum == 0.f ? 0.f : a.sum * expf(a.max - m);
    float sb = b.sum == 0.f ? 0.f : b.sum * expf(b.max - m);
    int arg = a.max > b.max ? a.arg : (b.max > a.max ? b.arg : min(a.arg, b.arg));
    return {m, sa + sb, arg};
}

// Adds logit v of token j to a thread's running stats (a thread visits its tokens in ascending
// order, so a tie keeps the lower id).
__device__ __forceinline__ void take(Stats& st, float v, int j) {
    if (v > st.max) {
        st.sum = st.sum * expf(st.max - v) + 1.f;
        st.max = v;
        st.arg = j;
    } else if (v > neg_inf()) {
        st.sum += expf(v - st.max);
    }
}

// One pass: max, argmax (lowest index on ties) and the softmax normaliser. Every thread gets it.
__device__ Stats row_stats(const float* l, int vocab) {
    __shared__ Stats s_warp[32];
    __shared__ Stats s_all;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    Stats st = {neg_inf(), 0.f, NO_TOKEN};
    if (vocab % 4 == 0 && (size_t)l % 16 == 0) {
        // Four float4 loads per thread in flight, as argmax_f32 loads: one float at a time left
        // a block waiting on memory latency (on the H100, 64 greedy rows of 128256 logits took
        // 61 us here against 11-14 us in argmax_f32).
        const float4* l4 = reinterpret_cast<const float4*>(l);
        const int n4 = vocab / 4, step = (int)blockDim.x;
        for (int j0 = threadIdx.x; j0 < n4; j0 += 4 * step) {
            float4 v[4];
#pragma unroll
            for (int u = 0; u < 4; u++)
                if (j0 + u * step < n4) v[u] = l4[j0 + u * step];
#pragma unroll
            for (int u = 0; u < 4; u++) {
                const int j = 4 * (j0 + u * step);
                if (j >= vocab) break;
                take(st, v[u].x, j);
                take(st, v[u].y, j + 1);
                take(st, v[u].z, j + 2);
                take(st, v[u].w, j + 3);
            }
        }
    } else {
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) take(st, l[j], j);
    }
    for (int o = 16; o > 0; o >>= 1) {
        Stats x = {__shfl_xor_sync(FULL, st.max, o), __shfl_xor_sync(FULL, st.sum, o),
                   __shfl_xor_sync(FULL, st.arg, o)};
        st = merge(st, x);
    }
    if (lane == 0) s_warp[warp] = st;
    __syncthreads();
    if (threadIdx.x == 0) {
        Stats a = s_warp[0];
        for (int w = 1; w < nwarps; w++) a = merge(a, s_warp[w]);
        s_all = a;
    }
    __syncthreads();
    return s_all;
}

// BINS sums of u64 weights in shared memory, each kept as two 32-bit halves: 32-bit shared
// atomics are native, while 64-bit ones are compare-and-swap loops that lanes hitting one bin
// (most of a row, on the first pass) serialise. The sums stay exact: the low half's atomic
// returns the value it added to, which tells whether that add carried into the high half.
struct Hist {
    unsigned lo[BINS];
    unsigned hi[BINS];
    __device__ __forceinline__ void clear() {
        for (int i = threadIdx.x; i < BINS; i += blockDim.x) lo[i] = hi[i] = 0;
    }
    __device__ __forceinline__ void add(int bin, u64 v) {
        const unsigned l = (unsigned)v;
        unsigned h = (unsigned)(v >> 32);
        if (l != 0) {
            const unsigned old = atomicAdd(lo + bin, l);
            h += (unsigned)(old + l < old);
        }
        if (h != 0) atomicAdd(hi + bin, h);
    }
    __device__ __forceinline__ u64 get(int bin) const { return ((u64)hi[bin] << 32) | lo[bin]; }
};

// A thread's pending histogram increment: consecutive hits on one bin become one add, which
// matters on the first pass, where most logits share a few exponent bins.
struct BinRun {
    int bin = -1;
    u64 acc = 0;
    __device__ __forceinline__ void add(Hist& hist, int b, u64 v) {
        if (b != bin) {
            flush(hist);
            bin = b;
        }
        acc += v;
    }
    __device__ __forceinline__ void flush(Hist& hist) {
        if (bin >= 0 && acc != 0) hist.add(bin, acc);
        acc = 0;
    }
};

// The largest key K such that the tokens with key >= K, among those with key >= floor, weigh at
// least `need` (by `weight`: counts or fixed-point masses), found 8 bits per pass. `need_of` turns
// the candidates' total weight (known after the first pass) into `need`. Every thread gets K;
// all tokens with key exactly K are included.
template <typename Weight, typename Need>
__device__ unsigned radix_select(const float* l, int vocab, unsigned floor, Weight weight, Need need_of,
                                 Hist& hist) {
    __shared__ unsigned s_prefix;
    __shared__ u64 s_need;
    __shared__ bool s_done;
    const int lane = threadIdx.x & 31;
    unsigned prefix = 0, mask = 0;
    u64 need = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        hist.clear();
        __syncthreads();
        BinRun run;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
            float v = l[j];
            unsigned k = key(v);
            if (k >= floor && (k & mask) == prefix) run.add(hist, (k >> shift) & (BINS - 1), weight(v));
        }
        run.flush(hist);
        __syncthreads();
        if (threadIdx.x < 32) {
            // Warp 0: lane L owns bins [8L, 8L + 8); suffix sums over lanes find the bin where the
            // weight from the top first reaches `need`.
            constexpr int PER = BINS / 32;
            u64 own = 0;
            for (int i = 0; i < PER; i++) own += hist.get(lane * PER + i);
            u64 suf = own;
            for (int o = 1; o < 32; o <<= 1) {
                u64 x = __shfl_down_sync(FULL, suf, o);
                if (lane + o < 32) suf += x;
            }
            if (shift == 24) need = need_of(__shfl_sync(FULL, suf, 0));
            unsigned ok = __ballot_sync(FULL, suf >= need);
            // NB: `ok` is never 0 (need <= the total); if it were, the threshold would keep all.
            int owner = ok ? 31 - __clz(ok) : 0;
            if (lane == owner) {
                u64 above = suf - own, h = 0;
                int d = 0;
                if (ok) {
                    for (int i = PER - 1; i >= 0; i--) {
                        h = hist.get(lane * PER + i);
                        if (above + h >= need) {
                            d = lane * PER + i;
                            break;
                        }
                        above += h;
                    }
                }
                s_prefix = prefix | ((unsigned)d << shift);
                s_need = ok ? need - above : need;
                // The whole bin is needed: the threshold is its lowest key.
                s_done = !ok || h == need - above;
            }
        }
        __syncthreads();
        prefix = s_prefix;
        need = s_need;
        mask |= (unsigned)(BINS - 1) << shift;
        if (s_done) break;
    }
    return prefix;
}

__device__ __forceinline__ u64 warp_sum_u64(u64 v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
    return v;
}

// Exclusive prefix sum over the block, in thread order.
__device__ u64 block_exclusive_scan(u64 v) {
    __shared__ u64 s_tot[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u64 inc = v;
    for (int o = 1; o < 32; o <<= 1) {
        u64 x = __shfl_up_sync(FULL, inc, o);
        if (lane >= o) inc += x;
    }
    if (lane == 31) s_tot[warp] = inc;
    __syncthreads();
    u64 off = 0;
    for (int w = 0; w < warp; w++) off += s_tot[w];
    return off + inc - v;
}

// Inverse CDF in token-id order over `mass(j)`, with one uniform from `seed`: warps sum
// contiguous chunks, then the block scans the chosen chunk. Returns NO_TOKEN when all masses are 0.
template <typename Mass>
__device__ int draw(int vocab, u64 seed, Mass mass) {
    __shared__ u64 s_chunk[32];
    __shared__ int s_lo, s_hi, s_tok;
    __shared__ u64 s_rest;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    int chunk = ((vocab + nwarps - 1) / nwarps + 31) & ~31;
    int lo = warp * chunk, hi = min(lo + chunk, vocab);
    u64 sum = 0;
    for (int j = lo + lane; j < hi; j += 32) sum += mass(j);
    sum = warp_sum_u64(sum);
    if (lane == 0) s_chunk[warp] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        u64 total = 0;
        for (int w = 0; w < nwarps; w++) total += s_chunk[w];
        s_tok = NO_TOKEN;
        s_lo = s_hi = 0;
        if (total > 0) {
            u64 r = __umul64hi(mix(seed), total);  // uniform in [0, total)
            int w = 0;
            while (r >= s_chunk[w]) r -= s_chunk[w++];
            s_lo = w * chunk;
            s_hi = min(s_lo + chunk, vocab);
            s_rest = r;
        }
    }
    __syncthreads();
    int lo2 = s_lo, hi2 = s_hi;
    u64 rest = s_rest;
    int per = (hi2 - lo2 + (int)blockDim.x - 1) / (int)blockDim.x;
    int a = lo2 + threadIdx.x * per, b = min(a + per, hi2);
    u64 own = 0;
    for (int j = a; j < b; j++) own += mass(j);
    u64 before = block_exclusive_scan(own);
    if (hi2 > lo2 && own > 0 && rest >= before && rest - before < own) {
        u64 x = rest - before;
        for (int j = a; j < b; j++) {
            u64 m = mass(j);
            if (x < m) {
                s_tok = j;
                break;
            }
            x -= m;
        }
    }
    __syncthreads();
    return s_tok;
}

}  // namespace smp

// pen[i, :] = logits[rows[i].row, :] with the host's penalties (`apply_penalties` in
// server/src/engine/sampling.rs): for each listed (distinct) token t with output count c,
// repetition (positive logits divided, negative multiplied), then, when c > 0, minus
// frequency * c + presence. Rounded as the host rounds (no fused multiply-add).
extern "C" __global__ void penalize_f32(float* pen, const float* logits, const smp::PenaltyRow* rows,
                                        const int* tokens, const int* counts, int vocab) {
    pdl_entry();
    const smp::PenaltyRow p = rows[blockIdx.x];
    const float* src = logits + (size_t)p.row * vocab;
    float* dst = pen + (size_t)blockIdx.x * vocab;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) dst[j] = src[j];
    __syncthreads();  // a token's logit may have been copied by another thread
    for (int i = threadIdx.x; i < p.count; i += blockDim.x) {
        int t = tokens[p.first + i], c = counts[p.first + i];
        if (t < 0 || t >= vocab) continue;
        float v = dst[t];
        if (p.repetition != 1.f) v = v > 0.f ? __fdiv_rn(v, p.repetition) : __fmul_rn(v, p.repetition);
        if (c > 0) v = __fsub_rn(v, __fadd_rn(__fmul_rn(p.frequency, (float)c), p.presence));
        dst[t] = v;
    }
}

// out[i] = the token drawn for rows[i] (see the top of this file) and its log-probability under
// the unmodified logits row. A row with `penalized >= 0` draws from that row of `penalized`
// (penalize_f32's output). Any block size that is a multiple of 32, up to 1024; any vocabulary
// below 2^24.
extern "C" __global__ void __launch_bounds__(1024)
    sample_f32(smp::SampleOut* out, const float* logits, const smp::SampleRow* rows, int vocab,
               const float* penalized) {
    pdl_entry();
    using namespace smp;
    const SampleRow p = rows[blockIdx.x];
    const float* raw = logits + (size_t)p.row * vocab;
    const float* l = (penalized && p.penalized >= 0) ? penalized + (size_t)p.penalized * vocab : raw;
    const Stats st = row_stats(l, vocab);
    int tok = st.arg;
    if (p.temperature > 0.f && p.top_k != 1) {
        const float t = p.temperature, mx = st.max, min_p = p.min_p;
        auto weight = [=](float v) { return expf((v - mx) / t); };
        auto fixed = [](float w) -> u64 { return __float2ull_rn(w * MASS_ONE); };
        __shared__ Hist hist;
        unsigned kth = 0, pth = 0;
        if (p.top_k > 1 && p.top_k < vocab) {
            unsigned k = (unsigned)p.top_k;
            kth = radix_select(
                l, vocab, 0u, [](float) -> u64 { return 1; }, [=](u64) -> u64 { return k; }, hist);
        }
        if (p.top_p < 1.f) {
            // Over the top-k set, before min-p: both cut a tail of the same order, so the top-p
            // threshold found here, combined with min-p below, is the host's.
            const double top_p = p.top_p;
            pth = radix_select(
                l, vocab, kth, [=](float v) { return fixed(weight(v)); },
                [=](u64 total) {
                    u64 n = (u64)ceil(top_p * (double)total);
                    return n < 1 ? 1 : (n > total ? total : n);
                },
                hist);
        }
        const unsigned thr = max(kth, pth);
        int drawn = draw(vocab, p.seed, [=](int j) -> u64 {
            float v = l[j];
            if (key(v) < thr) return 0;
            float w = weight(v);
            return w >= min_p ? fixed(w) : 0;
        });
        if (drawn != NO_TOKEN) tok = drawn;
    }
    if (tok < 0 || tok >= vocab) tok = 0;  // no finite logit: nothing to choose from
    const Stats rs = l == raw ? st : row_stats(raw, vocab);
    if (threadIdx.x == 0) out[blockIdx.x] = {tok, (raw[tok] - rs.max) - logf(rs.sum)};
}

// out[i * max_n + k], k < min(ns[i], max_n): the k-th most likely token of logits row rows[i]
// and its log-probability under that row, in the host's top_logprobs() order (higher logit
// first, ties: lower id first). Pass k takes the best token strictly after pass k - 1's in that
// order, so n passes over the row need no sort and no list of what was taken. NaN logits are
// never taken. Any block size that is a multiple of 32, up to 1024.
extern "C" __global__ void __launch_bounds__(1024)
    top_logprobs_f32(smp::SampleOut* out, const float* logits, const int* rows, const int* ns, int vocab,
                     int max_n) {
    pdl_entry();
    using namespace smp;
    const float* l = logits + (size_t)rows[blockIdx.x] * vocab;
    const int n = min(ns[blockIdx.x], max_n);
    if (n <= 0) return;
    const Stats st = row_stats(l, vocab);
    const float log_sum = logf(st.sum);
    __shared__ float s_v[32];
    __shared__ int s_i[32];
    __shared__ float s_prev_v;
    __shared__ int s_prev_i;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    // (value, index) of the previous pick; +inf and -1 come before every token.
    float pv = __int_as_float(0x7f800000);
    int pi = -1;
    for (int k = 0; k < n; k++) {
        float bv = neg_inf();
        int bi = NO_TOKEN;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
            const float v = l[j];
            const bool after = v < pv || (v == pv && j > pi);
            if (after && (v > bv || (v == bv && j < bi))) {
                bv = v;
                bi = j;
            }
        }
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(FULL, bv, o);
            const int oi = __shfl_xor_sync(FULL, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) {
                bv = ov;
                bi = oi;
            }
        }
        if (lane == 0) {
            s_v[warp] = bv;
            s_i[warp] = bi;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int w = 1; w < nwarps; w++) {
                if (s_v[w] > bv || (s_v[w] == bv && s_i[w] < bi)) {
                    bv = s_v[w];
                    bi = s_i[w];
                }
            }
            s_prev_v = bv;
            s_prev_i = bi;
            const bool found = bi != NO_TOKEN;
            out[(size_t)blockIdx.x * max_n + k] = {found ? bi : -1, found ? (bv - st.max) - log_sum : neg_inf()};
        }
        __syncthreads();
        pv = s_prev_v;
        pi = s_prev_i;
    }
}

// out[i, :] = logits[rows[i], :]: the rows the host still needs, packed for one copy.
extern "C" __global__ void gather_rows_f32(float* out, const float* logits, const int* rows, int vocab) {
    pdl_entry();
    const float* src = logits + (size_t)rows[blockIdx.x] * vocab;
    float* dst = out + (size_t)blockIdx.x * vocab;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) dst[j] = src[j];
}
