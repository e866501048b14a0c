//! CPU primitives: GEMM through the `gemm` crate (multithreaded with rayon), RMSNorm, SiLU, softmax.

use gemm::Parallelism;
use rayon::prelude::*;

/// Up to this many rows, [`matmul_nt`] streams each weight row once for all input rows (decode
/// batches are memory-bound); above it, the blocked GEMM of the `gemm` crate wins.
const SMALL_M: usize = 16;

/// Threads for GEMMs: rayon's global pool (sized to the machine's cores).
fn parallelism(m: usize, n: usize, k: usize) -> Parallelism {
    // Tiny products are faster on one thread than split across the pool.
    if m * n * k < 32 * 1024 {
        Parallelism::None
    } else {
        Parallelism::Rayon(0)
    }
}

/// `dst[m, n] (+)= scale * lhs[m, k] · rhs[n, k]ᵀ`.
///
/// `lhs` rows are `lhs_stride` apart, `rhs` is a row-major `[n, k]` matrix (an HF linear weight),
/// and `dst` rows are `dst_stride` apart, so a column slice of a wider output can be written in
/// place (the fused q/k/v and gate/up outputs). With `accumulate` the product is added to `dst`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_nt(
    dst: &mut [f32],
    dst_stride: usize,
    lhs: &[f32],
    lhs_stride: usize,
    rhs: &[f32],
    m: usize,
    n: usize,
    k: usize,
    scale: f32,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(lhs.len() >= (m - 1) * lhs_stride + k, "lhs too small");
    assert!(rhs.len() >= n * k, "rhs too small");
    assert!(dst.len() >= (m - 1) * dst_stride + n, "dst too small");
    if m <= SMALL_M && n * k >= 4096 {
        small_m_matmul(dst, dst_stride, lhs, lhs_stride, rhs, m, n, k, scale, accumulate);
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_stride..r * dst_stride + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: the asserts above bound every index gemm touches: dst (m x n, row stride
    // dst_stride), lhs (m x k, row stride lhs_stride) and rhs viewed as k x n with column
    // stride k (the transpose of the row-major [n, k] weight).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_stride as isize,
            accumulate,
            lhs.as_ptr(),
            1,
            lhs_stride as isize,
            rhs.as_ptr(),
            k as isize,
            1,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism(m, n, k),
        );
    }
}

/// Few-row product: each weight row is read once and dotted with every input row, with the
/// output columns split across threads. `dst` columns written by different threads never overlap.
#[allow(clippy::too_many_arguments)]
fn small_m_matmul(
    dst: &mut [f32],
    dst_stride: usize,
    lhs: &[f32],
    lhs_stride: usize,
    rhs: &[f32],
    m: usize,
    n: usize,
    k: usize,
    scale: f32,
    accumulate: bool,
) {
    const COLS: usize = 32;
    let rows: Vec<&[f32]> = (0..m).map(|r| &lhs[r * lhs_stride..r * lhs_stride + k]).collect();
    let kernel = block_dots_kernel();
    // LoRA shrink/expand products are tiny: splitting them costs more than it saves.
    let chunk = if n * k <= 1 << 16 { n * k } else { COLS * k };
    let run = |block: &[f32]| {
        let mut out = vec![0.0f32; block.len() / k * m];
        kernel(block, k, &rows, &mut out);
        out
    };
    let results: Vec<Vec<f32>> = if chunk == n * k {
        vec![run(&rhs[..n * k])]
    } else {
        rhs[..n * k].par_chunks(chunk).map(run).collect()
    };
    for (b, out) in results.iter().enumerate() {
        let cols = out.len() / m;
        for c in 0..cols {
            let col = b * (chunk / k) + c;
            for r in 0..m {
                let d = &mut dst[r * dst_stride + col];
                let v = scale * out[c * m + r];
                *d = if accumulate { *d + v } else { v };
            }
        }
    }
}

type BlockDots = fn(&[f32], usize, &[&[f32]], &mut [f32]);

/// The dot-product kernel for this CPU: AVX2+FMA where available, portable otherwise.
fn block_dots_kernel() -> BlockDots {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return |w, k, rows, out| {
                // SAFETY: the features were detected above.
                unsafe { block_dots_avx2(w, k, rows, out) }
            };
        }
    }
    block_dots_portable
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_dots_avx2(w: &[f32], k: usize, rows: &[&[f32]], out: &mut [f32]) {
    block_dots::<true>(w, k, rows, out)
}

fn block_dots_portable(w: &[f32], k: usize, rows: &[&[f32]], out: &mut [f32]) {
    block_dots::<false>(w, k, rows, out)
}

/// `out[c * m + r] = dot(rows[r], w[c])` with 16 independent accumulators (one AVX2 register
/// pair); `FMA` selects fused multiply-adds, which are only fast where the CPU has them.
#[inline(always)]
fn block_dots<const FMA: bool>(w: &[f32], k: usize, rows: &[&[f32]], out: &mut [f32]) {
    let m = rows.len();
    for (c, wc) in w.chunks_exact(k).enumerate() {
        for (r, x) in rows.iter().enumerate() {
            let mut acc = [0.0f32; 16];
            let (cx, cw) = (x.chunks_exact(16), wc.chunks_exact(16));
            let tail: f32 = cx
                .remainder()
                .iter()
                .zip(cw.remainder())
                .map(|(a, b)| a * b)
                .sum();
            for (xs, ws) in cx.zip(cw) {
                for i in 0..16 {
                    acc[i] = if FMA {
                        xs[i].mul_add(ws[i], acc[i])
                    } else {
                        acc[i] + xs[i] * ws[i]
                    };
                }
            }
            out[c * m + r] = acc.iter().sum::<f32>() + tail;
        }
    }
}

/// Root-mean-square norm of each `dim`-wide row of `x`, times `weight`, into `out`.
pub fn rms_norm(out: &mut [f32], x: &[f32], weight: &[f32], dim: usize, eps: f32) {
    for (o, row) in out.chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, v), w) in o.iter_mut().zip(row).zip(weight) {
            *o = w * (v * inv);
        }
    }
}

/// `out[r, i] = silu(gate_up[r, i]) * gate_up[r, inter + i]` for a fused `[rows, 2*inter]` input.
pub fn silu_mul(out: &mut [f32], gate_up: &[f32], inter: usize) {
    for (o, gu) in out.chunks_exact_mut(inter).zip(gate_up.chunks_exact(2 * inter)) {
        let (g, u) = gu.split_at(inter);
        for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    }
}

/// Numerically stable log-softmax of one row.
pub fn log_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|v| ((v - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    row.iter().map(|&v| (v as f64 - lse) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_matches_naive_with_strides_and_accumulate() {
        let (m, n, k) = (5, 7, 300);
        let lhs: Vec<f32> = (0..m * (k + 3))
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 10.0)
            .collect();
        let rhs: Vec<f32> = (0..n * k).map(|i| ((i * 5 % 11) as f32 - 5.0) / 10.0).collect();
        let stride = n + 2;
        let mut dst = vec![1.0f32; m * stride];
        matmul_nt(&mut dst, stride, &lhs, k + 3, &rhs, m, n, k, 0.5, true);
        for r in 0..m {
            for c in 0..n {
                let dot: f32 = (0..k).map(|i| lhs[r * (k + 3) + i] * rhs[c * k + i]).sum();
                assert!((dst[r * stride + c] - (1.0 + 0.5 * dot)).abs() < 1e-3);
            }
            assert_eq!(dst[r * stride + n], 1.0, "columns past n are untouched");
        }
    }

    #[test]
    fn small_m_path_matches_naive() {
        let (m, n, k) = (3, 200, 70);
        let lhs: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 10.0).collect();
        let rhs: Vec<f32> = (0..n * k).map(|i| ((i * 5 % 11) as f32 - 5.0) / 10.0).collect();
        let mut dst = vec![2.0f32; m * n];
        matmul_nt(&mut dst, n, &lhs, k, &rhs, m, n, k, 1.5, true);
        for r in 0..m {
            for c in 0..n {
                let dot: f32 = (0..k).map(|i| lhs[r * k + i] * rhs[c * k + i]).sum();
                assert!((dst[r * n + c] - (2.0 + 1.5 * dot)).abs() < 1e-3);
            }
        }
    }

    #[test]
    fn log_softmax_sums_to_one() {
        let lp = log_softmax(&[1.0, 2.0, 3.0, -100.0]);
        let s: f32 = lp.iter().map(|v| v.exp()).sum();
        assert!((s - 1.0).abs() < 1e-6);
    }
}
