//! Attention kernels over stored rows: the scalar reference and its SIMD twins.
//!
//! Every kernel works on a run of `n_rows` consecutive stored rows of one KV head (the layout of
//! one block segment, see [`crate::spec::Layout`]) and on a *query group*: the `group` query
//! heads that share that KV head (1 for MHA, `q_heads / kv_heads` for GQA, `q_heads` for MQA).
//! Each stored row is loaded once and used for every head of the group.
//!
//! Shapes (all `f32` slices row-major):
//! - `queries`: `[group][head_dim]`
//! - `scores` / `weights`: `[group][n_rows]`
//! - `out`: `[group][head_dim]`
//!
//! Kernels never read or write outside the slices they are given: the number of rows processed
//! is derived from the slice lengths, and inconsistent lengths are a caller bug caught by
//! `debug_assert!` (release builds process the largest consistent prefix).

use crate::format::KvFormat;

pub mod scalar;

/// Writes one row of `src.len()` elements into `dst` in `format` (`dst.len()` must be
/// `format.row_bytes(src.len())`).
pub fn encode_row(format: KvFormat, src: &[f32], dst: &mut [u8]) {
    scalar::encode_row(format, src, dst)
}

/// Reads one stored row back into `dst` (`dst.len()` elements).
pub fn decode_row(format: KvFormat, src: &[u8], dst: &mut [f32]) {
    scalar::decode_row(format, src, dst)
}

/// `scores[h][r] = queries[h] · row[r]` for every head `h < group` and row `r < n_rows`,
/// where `n_rows = scores.len() / group` and `rows` holds `n_rows` stored rows of `head_dim`.
pub fn dot_rows(
    format: KvFormat,
    rows: &[u8],
    head_dim: usize,
    queries: &[f32],
    group: usize,
    scores: &mut [f32],
) {
    scalar::dot_rows(format, rows, head_dim, queries, group, scores)
}

/// `out[h] += Σ_r weights[h][r] · row[r]` for every head `h < group`, where
/// `n_rows = weights.len() / group`.
pub fn accumulate_rows(
    format: KvFormat,
    rows: &[u8],
    head_dim: usize,
    weights: &[f32],
    group: usize,
    out: &mut [f32],
) {
    scalar::accumulate_rows(format, rows, head_dim, weights, group, out)
}

/// Replaces every `x` in `values` by `exp(x - shift)` and returns their sum.
/// `exp(-inf)` is 0, so masked scores set to `-inf` drop out.
pub fn exp_shifted_sum(values: &mut [f32], shift: f32) -> f32 {
    scalar::exp_shifted_sum(values, shift)
}

/// Largest value in `values` (`-inf` for an empty slice; NaN is ignored).
pub fn max(values: &[f32]) -> f32 {
    scalar::max(values)
}

/// Name of the kernel set in use (`"scalar"` or `"avx2"`), for reports.
pub fn active_isa() -> &'static str {
    "scalar"
}
