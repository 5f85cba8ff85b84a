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

/// See [`super::prepare_queries`]: quantizes `group` query rows of `head_dim` (`queries` is
/// `[group][head_dim]` `f32`) into `prepared` (`group` rows of
/// [`quant::prepared_row_bytes`]`(head_dim)` bytes). Rows that do not fit are not written.
pub fn prepare_queries(
    format: KvFormat,
    head_dim: usize,
    queries: &[f32],
    group: usize,
    prepared: &mut [u8],
) {
    if format.is_float() || head_dim == 0 {
        return;
    }
    let Some(stride) = quant::prepared_row_bytes(head_dim) else {
        return;
    };
    for (query, dst) in queries
        .chunks_exact(head_dim)
        .zip(prepared.chunks_exact_mut(stride))
        .take(group)
    {
        quant::prepare_query(format, query, dst);
    }
}

/// The score of one stored row against one prepared query row, in the exact arithmetic order
/// of the AVX2 kernel:
///
/// - per group `g`, the products `k·q` of its 32 prepared positions are summed exactly into
///   one `i32` `S_g` (at most `32·128·127`, so its conversion to `f32` is exact too);
/// - `acc = acc + S_g · c_g` from `acc = 0`, in group order (a multiply then an add, no FMA),
///   with `c_g = s_q[g] · s_k[g]`;
/// - int4 then adds `Σ_g m_k[g] · w[g]` (summed in group order), `w = s_q · Σ q`.
///
/// `row` must hold a whole stored row and `query` a whole prepared row.
#[inline]
fn prepared_dot(format: KvFormat, row: &[u8], head_dim: usize, query: &[u8]) -> f32 {
    let ng = quant::groups(head_dim);
    let mut acc = 0.0f32;
    let mut min_term = 0.0f32;
    let stored_len = match format {
        KvFormat::Int4 => head_dim.div_ceil(2) * 2,
        _ => head_dim,
    };
    for g in 0..ng {
        let (sk, mk) = quant::group_params(format, row, head_dim, g);
        let sq = quant::read_f32(query, ng * GROUP + 4 * g);
        let c = sq * sk;
        let mut exact = 0i32;
        for t in 0..GROUP {
            let d = g * GROUP + quant::prepared_element(format, t);
            // Past `head_dim` the key lane is 0, except the high nibble of an int4 row's last
            // byte, which the AVX2 kernel loads too (the prepared query is 0 there anyway).
            let k = if d < stored_len {
                quant::stored_q(format, row, d)
            } else {
                0
            };
            exact += k * query[g * GROUP + t] as i8 as i32;
        }
        acc += exact as f32 * c;
        if format == KvFormat::Int4 {
            min_term += mk * quant::read_f32(query, ng * GROUP + 4 * ng + 4 * g);
        }
    }
    if format == KvFormat::Int4 {
        acc + min_term
    } else {
        acc
    }
}

/// See [`super::dot_rows_prepared`]: `scores[h][r]` = the integer dot product of prepared
/// query `h` with stored row `r` (see `prepared_dot` below for the exact arithmetic).
pub fn dot_rows_prepared(
    format: KvFormat,
    rows: &[u8],
    head_dim: usize,
    prepared: &[u8],
    group: usize,
    scores: &mut [f32],
) {
    if group == 0 || head_dim == 0 {
        return;
    }
    let per_head = scores.len() / group;
    let Some(stride) = quant::prepared_row_bytes(head_dim).filter(|&n| n > 0) else {
        return;
    };
    debug_assert_eq!(prepared.len(), group * stride);
    let Some((row_bytes, n_rows)) = geometry(format, rows, head_dim, per_head) else {
        return;
    };
    for (head, query) in prepared.chunks_exact(stride).take(group).enumerate() {
        for r in 0..n_rows {
            let row = &rows[r * row_bytes..(r + 1) * row_bytes];
            scores[head * per_head + r] = prepared_dot(format, row, head_dim, query);
        }
    }
}
