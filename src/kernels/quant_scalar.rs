//! Scalar kernels for the quantized formats ([`KvFormat::Int8`], [`KvFormat::Int4`]): the
//! reference the AVX2 twins in [`super::quant_avx2`] are tested against.
//!
//! Rows are read in place: each element is dequantized on the fly (`s·q`, or `m + s·q`, see
//! [`crate::quant`]) and used at once; no dequantized copy of a row is ever made. Shapes and
//! the slice-length rules are those of [`super`] (the number of rows is derived from the slice
//! lengths; inconsistent lengths process the largest consistent prefix).

use crate::format::KvFormat;
use crate::quant::{self, GROUP};

/// See [`super::encode_row`]; `format` must be quantized (others are ignored).
pub fn encode_row(format: KvFormat, src: &[f32], dst: &mut [u8]) {
    match format {
        KvFormat::Int8 => quant::encode_int8(src, dst),
        KvFormat::Int4 => quant::encode_int4(src, dst),
        _ => {}
    }
}

/// See [`super::decode_row`]; `format` must be quantized (others are ignored).
pub fn decode_row(format: KvFormat, src: &[u8], dst: &mut [f32]) {
    if !format.is_float() {
        quant::decode(format, src, dst);
    }
}

/// `(row_bytes, n_rows)` for a run of rows, or `None` when there is nothing to do.
#[inline]
pub(crate) fn geometry(
    format: KvFormat,
    rows: &[u8],
    head_dim: usize,
    per_head: usize,
) -> Option<(usize, usize)> {
    if format.is_float() || head_dim == 0 {
        return None;
    }
    let row_bytes = format.row_bytes(head_dim).filter(|&b| b > 0)?;
    let n_rows = per_head.min(rows.len() / row_bytes);
    (n_rows > 0).then_some((row_bytes, n_rows))
}

/// Calls `f(d, value)` for every element of one stored row, dequantized.
#[inline]
fn for_each_element(format: KvFormat, row: &[u8], head_dim: usize, mut f: impl FnMut(usize, f32)) {
    for g in 0..quant::groups(head_dim) {
        let (s, m) = quant::group_params(format, row, head_dim, g);
        let end = (g * GROUP + GROUP).min(head_dim);
        for d in g * GROUP..end {
            let q = quant::stored_q(format, row, d) as f32;
            let value = match format {
                KvFormat::Int4 => m + s * q,
                _ => s * q,
            };
            f(d, value);
        }
    }
}

/// See [`super::dot_rows`]: `scores[h][r] = Σ_d queries[h][d] · x_r[d]` with `x_r` the
/// dequantized row `r`.
pub fn dot_rows(
    format: KvFormat,
    rows: &[u8],
    head_dim: usize,
    queries: &[f32],
    group: usize,
    scores: &mut [f32],
) {
    if group == 0 || head_dim == 0 {
        return;
    }
    let per_head = scores.len() / group;
    debug_assert_eq!(queries.len(), group * head_dim);
    let Some((row_bytes, n_rows)) = geometry(format, rows, head_dim, per_head) else {
        return;
    };
    for (head, query) in queries.chunks_exact(head_dim).take(group).enumerate() {
        for r in 0..n_rows {
            let row = &rows[r * row_bytes..(r + 1) * row_bytes];
            let mut sum = 0.0f32;
            for_each_element(format, row, head_dim, |d, x| sum += query[d] * x);
            scores[head * per_head + r] = sum;
        }
    }
}

/// See [`super::accumulate_rows`]: `out[h][d] += Σ_r weights[h][r] · x_r[d]`.
pub fn accumulate_rows(
    format: KvFormat,
    rows: &[u8],
    head_dim: usize,
    weights: &[f32],
    group: usize,
    out: &mut [f32],
) {
    if group == 0 || head_dim == 0 {
        return;
    }
    let per_head = weights.len() / group;
    debug_assert_eq!(out.len(), group * head_dim);
    let Some((row_bytes, n_rows)) = geometry(format, rows, head_dim, per_head) else {
        return;
    };
    for (head, acc) in out.chunks_exact_mut(head_dim).take(group).enumerate() {
        for r in 0..n_rows {
            let weight = weights[head * per_head + r];
            let row = &rows[r * row_bytes..(r + 1) * row_bytes];
            for_each_element(format, row, head_dim, |d, x| acc[d] += weight * x);
        }
    }
}
