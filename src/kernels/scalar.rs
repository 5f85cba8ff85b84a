//! Scalar reference kernels: plain loops, the twin every SIMD kernel is tested against.

use crate::format::KvFormat;
use crate::half::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};

/// See [`super::encode_row`].
pub fn encode_row(format: KvFormat, src: &[f32], dst: &mut [u8]) {
    match format {
        KvFormat::F32 => {
            for (value, out) in src.iter().zip(dst.chunks_exact_mut(4)) {
                out.copy_from_slice(&value.to_le_bytes());
            }
        }
        KvFormat::F16 => {
            for (value, out) in src.iter().zip(dst.chunks_exact_mut(2)) {
                out.copy_from_slice(&f32_to_f16(*value).to_le_bytes());
            }
        }
        KvFormat::Bf16 => {
            for (value, out) in src.iter().zip(dst.chunks_exact_mut(2)) {
                out.copy_from_slice(&f32_to_bf16(*value).to_le_bytes());
            }
        }
        KvFormat::Int8 | KvFormat::Int4 => super::quant_scalar::encode_row(format, src, dst),
    }
}

/// See [`super::decode_row`].
pub fn decode_row(format: KvFormat, src: &[u8], dst: &mut [f32]) {
    match format {
        KvFormat::F32 => {
            for (out, bytes) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *out = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            }
        }
        KvFormat::F16 => {
            for (out, bytes) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *out = f16_to_f32(u16::from_le_bytes([bytes[0], bytes[1]]));
            }
        }
        KvFormat::Bf16 => {
            for (out, bytes) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *out = bf16_to_f32(u16::from_le_bytes([bytes[0], bytes[1]]));
            }
        }
        KvFormat::Int8 | KvFormat::Int4 => super::quant_scalar::decode_row(format, src, dst),
    }
}

/// Element `index` of a stored row.
#[inline]
fn element(format: KvFormat, row: &[u8], index: usize) -> f32 {
    match format {
        KvFormat::F32 => {
            let b = &row[index * 4..index * 4 + 4];
            f32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }
        KvFormat::F16 => f16_to_f32(u16::from_le_bytes([row[index * 2], row[index * 2 + 1]])),
        KvFormat::Bf16 => bf16_to_f32(u16::from_le_bytes([row[index * 2], row[index * 2 + 1]])),
        // Quantized rows are forwarded to `quant_scalar` before any element is read.
        KvFormat::Int8 | KvFormat::Int4 => 0.0,
    }
}

/// Rows that fit in all the slices; see the module docs of [`super`].
fn rows_in(format: KvFormat, rows: &[u8], head_dim: usize, per_head: usize) -> usize {
    let row_bytes = format.row_bytes(head_dim).unwrap_or(usize::MAX).max(1);
    per_head.min(rows.len() / row_bytes)
}

/// See [`super::dot_rows`].
pub fn dot_rows(
    format: KvFormat,
    rows: &[u8],
    head_dim: usize,
    queries: &[f32],
    group: usize,
    scores: &mut [f32],
) {
    if !format.is_float() {
        return super::quant_scalar::dot_rows(format, rows, head_dim, queries, group, scores);
    }
    if group == 0 || head_dim == 0 {
        return;
    }
    let per_head = scores.len() / group;
    debug_assert_eq!(queries.len(), group * head_dim);
    let n_rows = rows_in(format, rows, head_dim, per_head);
    let row_bytes = format.row_bytes(head_dim).unwrap_or(0);
    for (head, query) in queries.chunks_exact(head_dim).take(group).enumerate() {
        for r in 0..n_rows {
            let row = &rows[r * row_bytes..(r + 1) * row_bytes];
            let mut sum = 0.0f32;
            for (d, q) in query.iter().enumerate() {
                sum += q * element(format, row, d);
            }
            scores[head * per_head + r] = sum;
        }
    }
}

/// See [`super::accumulate_rows`].
pub fn accumulate_rows(
    format: KvFormat,
    rows: &[u8],
    head_dim: usize,
    weights: &[f32],
    group: usize,
    out: &mut [f32],
) {
    if !format.is_float() {
        return super::quant_scalar::accumulate_rows(format, rows, head_dim, weights, group, out);
    }
    if group == 0 || head_dim == 0 {
        return;
    }
    let per_head = weights.len() / group;
    debug_assert_eq!(out.len(), group * head_dim);
    let n_rows = rows_in(format, rows, head_dim, per_head);
    let row_bytes = format.row_bytes(head_dim).unwrap_or(0);
    for (head, acc) in out.chunks_exact_mut(head_dim).take(group).enumerate() {
        for r in 0..n_rows {
            let weight = weights[head * per_head + r];
            let row = &rows[r * row_bytes..(r + 1) * row_bytes];
            for (d, value) in acc.iter_mut().enumerate() {
                *value += weight * element(format, row, d);
            }
        }
    }
}

/// See [`super::exp_shifted_sum`].
pub fn exp_shifted_sum(values: &mut [f32], shift: f32) -> f32 {
    let mut sum = 0.0f32;
    for value in values.iter_mut() {
        *value = exp(*value - shift);
        sum += *value;
    }
    sum
}

/// See [`super::max`].
pub fn max(values: &[f32]) -> f32 {
    values
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// See [`super::max_rows`].
pub fn max_rows(values: &[f32], n: usize, out: &mut [f32]) {
    if n == 0 {
        return;
    }
    for (row, m) in values.chunks_exact(n).zip(out.iter_mut()) {
        *m = max(row);
    }
}

/// See [`super::exp_shifted_rows`].
pub fn exp_shifted_rows(values: &mut [f32], n: usize, shifts: &[f32], sums: &mut [f32]) {
    if n == 0 {
        return;
    }
    for ((row, &shift), sum) in values.chunks_exact_mut(n).zip(shifts).zip(sums.iter_mut()) {
        *sum = exp_shifted_sum(row, shift);
    }
}

/// See [`super::softmax_rows`].
pub fn softmax_rows(
    values: &mut [f32],
    n: usize,
    running_max: &[f32],
    block_max: &mut [f32],
    sums: &mut [f32],
) {
    if n == 0 {
        return;
    }
    let rows = values.chunks_exact_mut(n).zip(running_max);
    for ((row, &running), (m, sum)) in rows.zip(block_max.iter_mut().zip(sums.iter_mut())) {
        *m = max(row);
        *sum = exp_shifted_sum(row, super::softmax_shift(*m, running));
    }
}

/// `e^x` for `f32` without `std`: range reduction `x = k·ln2 + r`, |r| ≤ ln2/2, then a degree-7
/// polynomial for `e^r` (relative error below 2e-7 over the whole normal range), scaled by `2^k`.
#[inline]
pub fn exp(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    // Below ln(2^-150) even the smallest subnormal is more than twice the true value.
    if x < -103.972_08 {
        return 0.0;
    }
    if x > 89.0 {
        // Past ln(f32::MAX) ≈ 88.72 the scaling below overflows to +inf by itself; the cut
        // only keeps `k` small enough for the exponent arithmetic.
        return f32::INFINITY;
    }
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let k = (x * core::f32::consts::LOG2_E + if x < 0.0 { -0.5 } else { 0.5 }) as i32;
    let kf = k as f32;
    let r = (x - kf * LN2_HI) - kf * LN2_LO;
    // Cephes' expf polynomial, `e^r ≈ 1 + r + r²·P(r)`: adding the large terms last keeps
    // the rounding error near half an ulp.
    let poly = 0.5
        + r * (1.666_666_5e-1
            + r * (4.166_579_6e-2
                + r * (8.333_452e-3 + r * (1.398_199_9e-3 + r * 1.987_569_1e-4))));
    let p = 1.0 + (r + r * r * poly);
    // 2^k in two steps so that k down to -149 (subnormal results) stays representable.
    let half = k / 2;
    p * pow2(half) * pow2(k - half)
}

#[inline]
fn pow2(k: i32) -> f32 {
    f32::from_bits(((k + 127).clamp(0, 255) as u32) << 23)
}

/// See [`super::fma_burn`].
pub fn fma_burn(chunks: usize) -> f32 {
    // Twelve independent chains of 8 lanes, as the SIMD twin; `0.999·a + 0.001` stays finite.
    let mut acc = [[0.5f32; 8]; 12];
    let mut done = 0;
    while done < chunks {
        for chain in acc.iter_mut().take(chunks - done) {
            for lane in chain.iter_mut() {
                *lane = *lane * 0.999 + 0.001;
            }
            done += 1;
        }
    }
    acc.iter().flatten().sum()
}

/// See [`super::stream_read`]: XOR of the little-endian 8-byte words of `bytes`, the last
/// partial word zero-padded.
pub fn stream_read(bytes: &[u8]) -> u64 {
    let mut words = bytes.chunks_exact(8);
    let mut acc = 0u64;
    for word in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(word);
        acc ^= u64::from_le_bytes(b);
    }
    let mut b = [0u8; 8];
    let rest = words.remainder();
    b[..rest.len()].copy_from_slice(rest);
    acc ^ u64::from_le_bytes(b)
}
