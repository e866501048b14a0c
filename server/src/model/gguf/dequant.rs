//! Decoding ggml tensor encodings to f32.
//!
//! Supported: `F32`, `F16`, `BF16`, `Q8_0`, `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`, `Q4_K`, `Q5_K` and
//! `Q6_K`. Each value is computed with the same f32 operations, in the same order, as ggml's
//! reference decoder, so results are bit-identical to it. Work is split across threads with rayon.

use half::{bf16, f16};
use rayon::prelude::*;

use super::parse::GgmlType;

/// Elements decoded per parallel task for the plain float types.
const FLOAT_CHUNK: usize = 1 << 16;
/// Blocks decoded per parallel task for the block-quantized types.
const BLOCKS_PER_TASK: usize = 512;
/// Elements per super-block of the k-quants.
const QK_K: usize = 256;

/// True when [`dequantize`] can decode `ty`.
pub fn is_supported(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(
        ty,
        F32 | F16 | BF16 | Q8_0 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q4_K | Q5_K | Q6_K
    )
}

/// Decodes `n_elements` values of type `ty` from `data`, which must hold exactly their encoding.
pub fn dequantize(ty: GgmlType, data: &[u8], n_elements: usize) -> Result<Vec<f32>, String> {
    if !is_supported(ty) {
        return Err(format!(
            "ggml type {ty} is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)"
        ));
    }
    let block = ty.block_size() as usize;
    let size = ty.type_size() as usize;
    if !n_elements.is_multiple_of(block) || data.len() != n_elements / block * size {
        return Err(format!(
            "{} bytes do not hold {n_elements} {ty} values ({size} bytes per {block} values)",
            data.len()
        ));
    }
    let mut out = vec![0f32; n_elements];
    match ty {
        GgmlType::F32 => floats(data, &mut out, 4, |b| {
            f32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }),
        GgmlType::F16 => floats(data, &mut out, 2, |b| {
            f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
        }),
        GgmlType::BF16 => floats(data, &mut out, 2, |b| {
            bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
        }),
        GgmlType::Q8_0 => blocks(data, &mut out, 32, 34, q8_0),
        GgmlType::Q4_0 => blocks(data, &mut out, 32, 18, q4_0),
        GgmlType::Q4_1 => blocks(data, &mut out, 32, 20, q4_1),
        GgmlType::Q5_0 => blocks(data, &mut out, 32, 22, q5_0),
        GgmlType::Q5_1 => blocks(data, &mut out, 32, 24, q5_1),
        GgmlType::Q4_K => blocks(data, &mut out, QK_K, 144, q4_k),
        GgmlType::Q5_K => blocks(data, &mut out, QK_K, 176, q5_k),
        GgmlType::Q6_K => blocks(data, &mut out, QK_K, 210, q6_k),
        _ => unreachable!("checked by is_supported"),
    }
    Ok(out)
}

fn floats(data: &[u8], out: &mut [f32], width: usize, f: impl Fn(&[u8]) -> f32 + Sync) {
    out.par_chunks_mut(FLOAT_CHUNK)
        .zip(data.par_chunks(FLOAT_CHUNK * width))
        .for_each(|(o, d)| {
            for (v, b) in o.iter_mut().zip(d.chunks_exact(width)) {
                *v = f(b);
            }
        });
}

fn blocks(data: &[u8], out: &mut [f32], block: usize, size: usize, f: impl Fn(&[u8], &mut [f32]) + Sync) {
    out.par_chunks_mut(block * BLOCKS_PER_TASK)
        .zip(data.par_chunks(size * BLOCKS_PER_TASK))
        .for_each(|(o, d)| {
            for (ob, db) in o.chunks_exact_mut(block).zip(d.chunks_exact(size)) {
                f(db, ob);
            }
        });
}

fn half_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// `Q8_0`: f16 scale, 32 signed bytes.
fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    for (v, &q) in y.iter_mut().zip(&b[2..34]) {
        *v = (q as i8) as f32 * d;
    }
}

/// `Q4_0`: f16 scale, 16 bytes of nibbles (low nibbles are values 0..16, high 16..32), offset 8.
fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = d * ((qs[j] & 0x0f) as i32 - 8) as f32;
        y[j + 16] = d * ((qs[j] >> 4) as i32 - 8) as f32;
    }
}

/// `Q4_1`: f16 scale, f16 minimum, 16 bytes of nibbles.
fn q4_1(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let m = half_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = d * (qs[j] & 0x0f) as f32 + m;
        y[j + 16] = d * (qs[j] >> 4) as f32 + m;
    }
}

/// `Q5_0`: f16 scale, 32 high bits, 16 bytes of low nibbles, offset 16.
fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) as u8;
        let h1 = ((qh >> (j + 16)) & 1) as u8;
        let x0 = ((qs[j] & 0x0f) | (h0 << 4)) as i32 - 16;
        let x1 = ((qs[j] >> 4) | (h1 << 4)) as i32 - 16;
        y[j] = d * x0 as f32;
        y[j + 16] = d * x1 as f32;
    }
}

/// `Q5_1`: f16 scale, f16 minimum, 32 high bits, 16 bytes of low nibbles.
fn q5_1(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let m = half_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) as u8;
        let h1 = ((qh >> (j + 16)) & 1) as u8;
        y[j] = d * ((qs[j] & 0x0f) | (h0 << 4)) as f32 + m;
        y[j + 16] = d * ((qs[j] >> 4) | (h1 << 4)) as f32 + m;
    }
}

/// The 6-bit scale and minimum of sub-block `j` (0..8) from the 12 packed bytes of a
/// `Q4_K`/`Q5_K` super-block.
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// `Q4_K`: f16 super-scale, f16 super-minimum, 12 bytes of 6-bit sub-block scales and minimums,
/// 128 bytes of nibbles (each 32 bytes give two 32-value sub-blocks: low then high nibbles).
fn q4_k(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let dmin = half_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for p in 0..4 {
        let (sc0, m0) = scale_min_k4(2 * p, scales);
        let (sc1, m1) = scale_min_k4(2 * p + 1, scales);
        let (d0, min0) = (d * sc0 as f32, dmin * m0 as f32);
        let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
        let q = &qs[32 * p..32 * p + 32];
        let out = &mut y[64 * p..64 * p + 64];
        for l in 0..32 {
            out[l] = d0 * (q[l] & 0x0f) as f32 - min0;
            out[l + 32] = d1 * (q[l] >> 4) as f32 - min1;
        }
    }
}

/// `Q5_K`: like `Q4_K` plus 32 bytes of high bits (bit `s` of byte `l` belongs to sub-block `s`).
fn q5_k(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let dmin = half_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for p in 0..4 {
        let (sc0, m0) = scale_min_k4(2 * p, scales);
        let (sc1, m1) = scale_min_k4(2 * p + 1, scales);
        let (d0, min0) = (d * sc0 as f32, dmin * m0 as f32);
        let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
        let q = &qs[32 * p..32 * p + 32];
        let out = &mut y[64 * p..64 * p + 64];
        for l in 0..32 {
            let h0 = (qh[l] >> (2 * p)) & 1;
            let h1 = (qh[l] >> (2 * p + 1)) & 1;
            out[l] = d0 * ((q[l] & 0x0f) | (h0 << 4)) as f32 - min0;
            out[l + 32] = d1 * ((q[l] >> 4) | (h1 << 4)) as f32 - min1;
        }
    }
}

/// `Q6_K`: 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 signed 8-bit scales (one per
/// 16 values), f16 super-scale; values are offset by 32.
fn q6_k(b: &[u8], y: &mut [f32]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let sc = &b[192..208];
    let d = half_at(b, 208);
    for h in 0..2 {
        let ql = &ql_all[64 * h..64 * h + 64];
        let qh = &qh_all[32 * h..32 * h + 32];
        let out = &mut y[128 * h..128 * h + 128];
        for l in 0..32 {
            let q = [
                ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32,
                ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32,
                ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32,
                ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32,
            ];
            for (k, &qk) in q.iter().enumerate() {
                let i = 32 * k + l;
                let scale = d * (sc[8 * h + i / 16] as i8) as f32;
                out[i] = scale * qk as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bytes(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_bits().to_le_bytes()
    }

    #[test]
    fn decodes_hand_built_blocks() {
        // Q8_0: scale 0.5, values -128..
        let mut b = f16_bytes(0.5).to_vec();
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let y = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        assert_eq!(y[0], -8.0);
        assert_eq!(y[31], 7.5);

        // Q4_0: scale 2, byte j holds (j, 15 - j).
        let mut b = f16_bytes(2.0).to_vec();
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let y = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
        assert_eq!(y[0], -16.0);
        assert_eq!(y[15], 14.0);
        assert_eq!(y[16], 14.0);
        assert_eq!(y[31], -16.0);

        // Q4_1: scale 1, min -1.
        let mut b = f16_bytes(1.0).to_vec();
        b.extend(f16_bytes(-1.0));
        b.extend((0..16u8).map(|j| j | (j << 4)));
        let y = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        assert_eq!(y[3], 2.0);
        assert_eq!(y[19], 2.0);

        // Q5_0: value 31 - 16 = 15 where the high bit is set.
        let mut b = f16_bytes(1.0).to_vec();
        b.extend(0x8000_0001u32.to_le_bytes());
        b.extend([0xffu8; 16]);
        let y = dequantize(GgmlType::Q5_0, &b, 32).unwrap();
        assert_eq!(y[0], 15.0);
        assert_eq!(y[1], -1.0);
        assert_eq!(y[31], 15.0);

        let bf = [
            bf16::from_f32(-3.5).to_bits().to_le_bytes(),
            bf16::from_f32(1.0).to_bits().to_le_bytes(),
        ]
        .concat();
        assert_eq!(dequantize(GgmlType::BF16, &bf, 2).unwrap(), vec![-3.5, 1.0]);
    }

    #[test]
    fn refuses_unsupported_types_and_bad_sizes() {
        let e = dequantize(GgmlType::Q2_K, &[0; 84], 256).unwrap_err();
        assert!(e.contains("Q2_K") && e.contains("not supported"), "{e}");
        let e = dequantize(GgmlType::Q8_0, &[0; 33], 32).unwrap_err();
        assert!(e.contains("33 bytes"), "{e}");
    }
}
