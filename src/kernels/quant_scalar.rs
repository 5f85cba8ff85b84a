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

/// Rows whose weights share one integer scale in [`accumulate_rows_int`]. With weights in
/// `0..=255` and int4 elements in `0..=15`, the products of 16 rows sum to at most 61,200:
/// the AVX2 twin sums them in 16-bit lanes (read back as unsigned).
pub const WEIGHT_ROWS: usize = 16;

/// The smallest largest weight [`weight_scale`] divides by: `2^-100`, so that `255 / a` stays
/// finite for tiny (or all-zero) weights.
pub(crate) const WEIGHT_FLOOR_BITS: u32 = 0x0d80_0000;

/// Whether [`accumulate_rows_int`] takes its integer path: int4 rows whose groups are all
/// whole (`head_dim` a multiple of 32) and weights that are all finite and `>= 0` (softmax
/// weights are). Otherwise it is exactly [`accumulate_rows`].
#[inline]
pub fn integer_weights(format: KvFormat, head_dim: usize, weights: &[f32]) -> bool {
    integer_rows(format, head_dim) && weights.iter().all(|&w| (0.0..=f32::MAX).contains(&w))
}

/// The row half of [`integer_weights`]: int4 with `head_dim` a non-zero multiple of 32.
#[inline]
pub fn integer_rows(format: KvFormat, head_dim: usize) -> bool {
    format == KvFormat::Int4 && head_dim > 0 && head_dim.is_multiple_of(GROUP)
}

/// `(inv, step)` for a run of weights whose largest magnitude has the `f32` bits `amax_bits`
/// (sign cleared; NaN compares above every number, as the AVX2 twin's integer maximum does):
/// a weight `u` becomes `q = round(u · inv)` and stands for `q · step`, with `inv = 255 / a`,
/// `step = a / 255` and `a` the largest magnitude, at least `2^-100`.
#[inline]
pub(crate) fn weight_scale(amax_bits: u32) -> (f32, f32) {
    let a = f32::from_bits(amax_bits.max(WEIGHT_FLOOR_BITS));
    (255.0 / a, a / 255.0)
}

/// `y` rounded to the nearest integer, ties to even, and saturated to `0..=255`, exactly as
/// AVX2's `vcvtps2dq` and two saturating packs (`i32 → i16 → u8`): NaN and magnitudes of
/// `2^31` or more convert to `i32::MIN` and so become `0`. For the weights of a run,
/// `0 <= y <= 255` (see [`weight_scale`]).
#[inline]
pub(crate) fn weight_int(y: f32) -> i32 {
    if y.is_nan() || !(-2_147_483_648.0..2_147_483_648.0).contains(&y) {
        return 0;
    }
    let t = y as i32; // towards zero; exact for |y| < 2^31
    let frac = y - t as f32; // exact: below 2^23 `t as f32` is exact, above it `y` is whole
    let up = if y < 0.0 { -1 } else { 1 };
    let r = if frac.abs() > 0.5 || (frac.abs() == 0.5 && t % 2 != 0) {
        t.saturating_add(up)
    } else {
        t
    };
    r.clamp(0, 255)
}

/// `Σ_i a[i]` of 16 values in the order of the AVX2 twin's reduction: lanes `i` and `i + 8`,
/// then `i` and `i + 4`, then `i` and `i + 2`, then the two left.
#[inline]
pub(crate) fn sum16(a: &[f32; WEIGHT_ROWS]) -> f32 {
    let p: [f32; 8] = core::array::from_fn(|i| a[i] + a[i + 8]);
    let b: [f32; 4] = core::array::from_fn(|i| p[i] + p[i + 4]);
    let c: [f32; 2] = core::array::from_fn(|i| b[i] + b[i + 2]);
    c[0] + c[1]
}

/// The constant term of a run's weighted sum for one head and group: `exact`
/// (`Σ_r w·(m + 7.5·s)`, the rows' weights on their mid-range value) less `7.5 · step · Σ q`
/// (`q_sum` over all 16 lanes), so that the integer sums `step · Σ q·n` only carry the
/// nibbles' distance from the middle, `n - 7.5`.
#[inline]
pub(crate) fn centred(exact: f32, step: f32, q_sum: i32) -> f32 {
    exact - 7.5 * step * q_sum as f32
}

/// [`super::accumulate_rows`] with integer weights, where [`integer_weights`] allows it
/// (otherwise exactly [`accumulate_rows`]). For each head `h`, group `g` and run of up to
/// [`WEIGHT_ROWS`] rows:
///
/// - `u_r = w[h][r] · s_r` (`s_r` the row's group scale) is rounded to
///   `q_r = round(u_r · 255 / a)` (ties to even), `a = max_r u_r` (at least `2^-100`), which
///   stands for `q_r · step`, `step = a / 255`: at most `step / 2` from `u_r`;
/// - the integer sums `S[d] = Σ_r q_r · n_r[d]` of the rows' nibbles `n_r[d]` are exact;
/// - `M = Σ_r w[h][r] · (m_r + 7.5 · s_r)` (the rows' mid-range values, `m` the group
///   minimum) summed over 16 lanes (zero past the run) in the order of the AVX2 twin's
///   reduction (lanes `i` and `i + 8`, then `i + 4`, then `i + 2`, then the two left), then
///   less `7.5 · step · Σ_r q_r` over the 16 lanes;
/// - `out[h][d] = out[h][d] + (M + step · S[d])`, a multiply and two adds, no FMA.
///
/// So each row's weighted value `w·(m + s·n)` becomes `w·(m + 7.5·s) + q·step·(n - 7.5)`: an
/// error of at most `step / 2 · |n - 7.5| <= 3.75 · step` per row and element, `step` being
/// `1/255` of the run's largest `w·s`. The centring matters: a rotated row's nibbles gather
/// around the middle, so most of each weight's rounding multiplies a small `n - 7.5`.
pub fn accumulate_rows_int(
    format: KvFormat,
    rows: &[u8],
    head_dim: usize,
    weights: &[f32],
    group: usize,
    out: &mut [f32],
) {
    if !integer_weights(format, head_dim, weights) {
        return accumulate_rows(format, rows, head_dim, weights, group, out);
    }
    if group == 0 {
        return;
    }
    let per_head = weights.len() / group;
    debug_assert_eq!(out.len(), group * head_dim);
    let Some((row_bytes, n_rows)) = geometry(format, rows, head_dim, per_head) else {
        return;
    };
    for (head, acc) in out.chunks_exact_mut(head_dim).take(group).enumerate() {
        let w = &weights[head * per_head..head * per_head + n_rows];
        for g in 0..head_dim / GROUP {
            for first in (0..n_rows).step_by(WEIGHT_ROWS) {
                let n = (n_rows - first).min(WEIGHT_ROWS);
                let row = |i: usize| &rows[(first + i) * row_bytes..(first + i + 1) * row_bytes];
                let (mut u, mut wm) = ([0.0f32; WEIGHT_ROWS], [0.0f32; WEIGHT_ROWS]);
                for i in 0..n {
                    let (s, m) = quant::group_params(format, row(i), head_dim, g);
                    u[i] = w[first + i] * s;
                    wm[i] = w[first + i] * (m + 7.5 * s);
                }
                let amax = u
                    .iter()
                    .map(|x| x.to_bits() & 0x7fff_ffff)
                    .max()
                    .unwrap_or(0);
                let (inv, step) = weight_scale(amax);
                let q: [i32; WEIGHT_ROWS] = core::array::from_fn(|i| weight_int(u[i] * inv));
                let min_term = centred(sum16(&wm), step, q.iter().sum());
                for (d, a) in acc.iter_mut().enumerate().skip(g * GROUP).take(GROUP) {
                    let sum: i32 = (0..n)
                        .map(|i| q[i] * quant::stored_q(format, row(i), d))
                        .sum();
                    // `+=` is the same single addition of the bracket.
                    *a += min_term + step * sum as f32;
                }
            }
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
