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
//!
//! # Kernel selection
//!
//! On x86_64 the AVX2 + FMA + F16C kernels of [`avx2`] are used when the CPU has them, the
//! scalar ones of [`scalar`] otherwise:
//! - built with those target features (`-C target-cpu=...`), the choice is made at compile time;
//! - otherwise, under the `std` feature, the CPU is asked once (`is_x86_feature_detected!`) and
//!   the answer cached; without `std` the scalar kernels are used;
//! - the cargo feature `force-scalar`, or (under `std`) the environment variable
//!   `KVCACHE_FORCE_SCALAR` set to anything but `""` or `"0"` when the first cache is built
//!   (or the first kernel runs, if that comes first), forces the scalar kernels. Reading the
//!   variable allocates a copy of its value when it is set (so does `KVCACHE_NO_VNNI`, below):
//!   the only allocations the cache ever makes, once per process, during construction.
//!
//! The integer dot products of the attention path ([`dot_rows_prepared`]) also use the 256-bit
//! AVX-512 VNNI instruction `vpdpbusd` where the CPU has it ([`quant_avx2::Vnni`]; chosen the
//! same way, and `KVCACHE_NO_VNNI` set like the variable above keeps them on plain AVX2). The
//! results are the same bits on every path.
//!
//! [`active_isa`] says which set is in use.

use crate::format::KvFormat;

#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod quant_avx2;
pub mod quant_scalar;
pub mod scalar;

/// Calls the AVX2 kernel when [`simd`] allows it, else the scalar twin.
macro_rules! dispatch {
    ($name:ident($($arg:expr),* $(,)?)) => {{
        #[cfg(all(target_arch = "x86_64", not(feature = "force-scalar")))]
        {
            if let Some(isa) = simd() {
                return isa.$name($($arg),*);
            }
        }
        scalar::$name($($arg),*)
    }};
}

/// Same as `dispatch!` for the quantized formats: [`quant_avx2`] or [`quant_scalar`].
macro_rules! dispatch_quant {
    ($name:ident($($arg:expr),* $(,)?)) => {{
        #[cfg(all(target_arch = "x86_64", not(feature = "force-scalar")))]
        {
            if let Some(isa) = simd() {
                return quant_avx2::$name(isa, $($arg),*);
            }
        }
        return quant_scalar::$name($($arg),*)
    }};
}

/// Kernel sets, as cached by [`isa_state`].
#[cfg(all(target_arch = "x86_64", not(feature = "force-scalar"), feature = "std"))]
mod state {
    pub const UNKNOWN: u8 = 0;
    pub const SCALAR: u8 = 1;
    pub const AVX2: u8 = 2;
    pub const VNNI: u8 = 3;
}

/// Which kernel set to use, chosen once: scalar when `KVCACHE_FORCE_SCALAR` is set or the CPU
/// lacks AVX2, FMA or F16C; AVX2 with the AVX-512 VNNI integer dot products when the CPU has
/// them too and `KVCACHE_NO_VNNI` is not set (to anything but `""` or `"0"`); AVX2 otherwise.
#[cfg(all(target_arch = "x86_64", not(feature = "force-scalar"), feature = "std"))]
#[inline]
fn isa_state() -> u8 {
    use core::sync::atomic::{AtomicU8, Ordering};
    // Relaxed is enough: every thread that races on the first call computes the same answer.
    static STATE: AtomicU8 = AtomicU8::new(state::UNKNOWN);
    let known = STATE.load(Ordering::Relaxed);
    if known != state::UNKNOWN {
        return known;
    }
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty() && v != "0");
    let chosen = if set("KVCACHE_FORCE_SCALAR") || avx2::Avx2::new().is_none() {
        state::SCALAR
    } else if !set("KVCACHE_NO_VNNI") && quant_avx2::Vnni::new().is_some() {
        state::VNNI
    } else {
        state::AVX2
    };
    STATE.store(chosen, Ordering::Relaxed);
    chosen
}

/// The AVX2 token when the AVX2 kernels are to be used.
#[cfg(all(target_arch = "x86_64", not(feature = "force-scalar"), feature = "std"))]
#[inline]
fn simd() -> Option<avx2::Avx2> {
    match isa_state() {
        // SAFETY: `isa_state` only answers AVX2 or VNNI after `Avx2::new()` returned `Some`.
        state::AVX2 | state::VNNI => Some(unsafe { avx2::Avx2::new_unchecked() }),
        _ => None,
    }
}

/// The VNNI token when the integer dot products are to use `vpdpbusd`.
#[cfg(all(target_arch = "x86_64", not(feature = "force-scalar"), feature = "std"))]
#[inline]
fn vnni() -> Option<quant_avx2::Vnni> {
    // SAFETY: `isa_state` only answers VNNI after `Vnni::new()` returned `Some`.
    (isa_state() == state::VNNI).then(|| unsafe { quant_avx2::Vnni::new_unchecked() })
}

/// Makes the kernel choice now rather than at the first kernel call: under `std` that choice
/// reads the environment, which allocates a copy of `KVCACHE_FORCE_SCALAR` or
/// `KVCACHE_NO_VNNI` when it is set. Building a [`crate::KvCache`] calls it, so that nothing
/// allocates after construction.
pub(crate) fn choose() {
    #[cfg(all(target_arch = "x86_64", not(feature = "force-scalar"), feature = "std"))]
    let _ = simd();
}

/// The AVX2 token when the AVX2 kernels are to be used (without `std`: only when the target
/// features are enabled at compile time).
#[cfg(all(
    target_arch = "x86_64",
    not(feature = "force-scalar"),
    not(feature = "std")
))]
#[inline]
fn simd() -> Option<avx2::Avx2> {
    avx2::Avx2::new()
}

/// The VNNI token when the integer dot products are to use `vpdpbusd` (without `std`: only
/// when the target features are enabled at compile time).
#[cfg(all(
    target_arch = "x86_64",
    not(feature = "force-scalar"),
    not(feature = "std")
))]
#[inline]
fn vnni() -> Option<quant_avx2::Vnni> {
    quant_avx2::Vnni::new()
}

/// Writes one row of `src.len()` elements into `dst` in `format` (`dst.len()` must be
/// `format.row_bytes(src.len())`).
pub fn encode_row(format: KvFormat, src: &[f32], dst: &mut [u8]) {
    if !format.is_float() {
        dispatch_quant!(encode_row(format, src, dst))
    }
    dispatch!(encode_row(format, src, dst))
}

/// Reads one stored row back into `dst` (`dst.len()` elements).
pub fn decode_row(format: KvFormat, src: &[u8], dst: &mut [f32]) {
    if !format.is_float() {
        dispatch_quant!(decode_row(format, src, dst))
    }
    dispatch!(decode_row(format, src, dst))
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
    if !format.is_float() {
        dispatch_quant!(dot_rows(format, rows, head_dim, queries, group, scores))
    }
    dispatch!(dot_rows(format, rows, head_dim, queries, group, scores))
}

/// Bytes of scratch [`prepare_queries`] needs for `group` query rows of `head_dim` against
/// keys stored as `format`: `group × `[`crate::quant::prepared_row_bytes`]`(head_dim)`
/// (`group × 40 × ceil(head_dim / 32)`), saturating on overflow; `0` for the float formats.
pub fn prepared_query_len(format: KvFormat, head_dim: usize, group: usize) -> usize {
    if format.is_float() {
        return 0;
    }
    crate::quant::prepared_row_bytes(head_dim).map_or(usize::MAX, |n| n.saturating_mul(group))
}

/// Quantizes `group` query rows (`queries`: `[group][head_dim]` `f32`) once, for
/// [`dot_rows_prepared`] against int8 / int4 keys: per group of 32 elements an `f32` scale and
/// `i8` values, laid out as described at [`crate::quant::prepared_row_bytes`]. `prepared`
/// needs [`prepared_query_len`] bytes; rows that do not fit are not written. Float formats
/// write nothing.
pub fn prepare_queries(
    format: KvFormat,
    head_dim: usize,
    queries: &[f32],
    group: usize,
    prepared: &mut [u8],
) {
    if !format.is_float() {
        dispatch_quant!(prepare_queries(format, head_dim, queries, group, prepared))
    }
}

/// [`dot_rows`] with queries prepared by [`prepare_queries`] (same `format`, `head_dim` and
/// `group`): `scores[h][r] ≈ queries[h] · row[r]` for `h < group`, `r < n_rows =
/// scores.len() / group`, computed with integer dot products per group of 32 elements, then
/// scaled by the query and key scales. The query's quantization error is at most half a step
/// per element (`|x - s_q·q| <= s_q / 2`), so each score is within `Σ_d |k_d| · s_q(d) / 2`
/// of the `f32` query's, plus `f32` rounding. Counts are clamped to the slice lengths like
/// [`dot_rows`]. Float formats write nothing (use [`dot_rows`]).
pub fn dot_rows_prepared(
    format: KvFormat,
    rows: &[u8],
    head_dim: usize,
    prepared: &[u8],
    group: usize,
    scores: &mut [f32],
) {
    if !format.is_float() {
        #[cfg(all(target_arch = "x86_64", not(feature = "force-scalar")))]
        if let Some(token) = vnni() {
            return quant_avx2::dot_rows_prepared_vnni(
                token, format, rows, head_dim, prepared, group, scores,
            );
        }
        dispatch_quant!(dot_rows_prepared(
            format, rows, head_dim, prepared, group, scores
        ))
    }
}

/// Views `f32` scratch as bytes, for the byte buffers of [`prepare_queries`] and
/// [`dot_rows_prepared`] carved out of the `f32` scratch of attention (`4 × len` bytes).
pub fn scratch_bytes(scratch: &mut [f32]) -> &mut [u8] {
    let len = core::mem::size_of_val(scratch);
    // SAFETY: the pointer and length cover exactly the memory of `scratch`, which stays
    // mutably borrowed for the result's lifetime; `u8` has alignment 1, and every byte
    // pattern is a valid `u8` and every 4-byte pattern a valid `f32`.
    unsafe { core::slice::from_raw_parts_mut(scratch.as_mut_ptr().cast::<u8>(), len) }
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
    if !format.is_float() {
        dispatch_quant!(accumulate_rows(format, rows, head_dim, weights, group, out))
    }
    dispatch!(accumulate_rows(format, rows, head_dim, weights, group, out))
}

/// [`accumulate_rows`] with the weights rounded to integers, for int4 rows whose `head_dim` is
/// a multiple of 32 and weights that are all finite and `>= 0`, as softmax weights are
/// (otherwise exactly [`accumulate_rows`]): per head, group of 32 elements and run of 16 rows,
/// each `weight · scale` becomes an 8-bit integer times a step of `1/255` of the run's
/// largest, and the rows' nibbles are summed against them exactly in integers (`vpmaddubsw`).
/// Each row's contribution to an element is within `3.75 · step` of the exact one; see
/// [`quant_scalar::accumulate_rows_int`] for the arithmetic, which the AVX2 twin matches bit
/// for bit.
pub fn accumulate_rows_int(
    format: KvFormat,
    rows: &[u8],
    head_dim: usize,
    weights: &[f32],
    group: usize,
    out: &mut [f32],
) {
    if !format.is_float() {
        dispatch_quant!(accumulate_rows_int(
            format, rows, head_dim, weights, group, out
        ))
    }
    dispatch!(accumulate_rows(format, rows, head_dim, weights, group, out))
}

/// Replaces every `x` in `values` by `exp(x - shift)` and returns their sum.
/// `exp(-inf)` is 0, so masked scores set to `-inf` drop out.
pub fn exp_shifted_sum(values: &mut [f32], shift: f32) -> f32 {
    dispatch!(exp_shifted_sum(values, shift))
}

/// Largest value in `values` (`-inf` for an empty slice; NaN is ignored).
pub fn max(values: &[f32]) -> f32 {
    dispatch!(max(values))
}

/// [`max`] of each row of `values` seen as rows of `n` (`out[r] = max(values[r·n..(r+1)·n])`),
/// for `r < min(values.len() / n, out.len())`; bitwise the same as one call per row, but one
/// call lets the rows' reductions overlap. `n == 0` writes nothing.
pub fn max_rows(values: &[f32], n: usize, out: &mut [f32]) {
    dispatch!(max_rows(values, n, out))
}

/// [`exp_shifted_sum`] of each row of `values` seen as rows of `n`, row `r` shifted by
/// `shifts[r]` and its sum written to `sums[r]`, for `r < min(values.len() / n, shifts.len(),
/// sums.len())`; bitwise the same as one call per row, but one call lets the rows' `exp`
/// latencies overlap (a decode block's rows are 16 values each, too short to hide them alone).
/// `n == 0` writes nothing.
pub fn exp_shifted_rows(values: &mut [f32], n: usize, shifts: &[f32], sums: &mut [f32]) {
    dispatch!(exp_shifted_rows(values, n, shifts, sums))
}

/// The shift [`softmax_rows`] gives a row whose largest value is `block_max`, with the
/// row's running maximum `running_max` from earlier blocks: the larger of the two (as
/// [`f32::max`]: a NaN running maximum is ignored), or `0.0` when the row has nothing visible
/// (`block_max == -inf`), which only keeps its `exp` harmless (its values all become 0).
#[inline]
pub fn softmax_shift(block_max: f32, running_max: f32) -> f32 {
    if block_max == f32::NEG_INFINITY {
        0.0
    } else {
        block_max.max(running_max)
    }
}

/// One block's online-softmax update of each row of `values` seen as rows of `n` (a query
/// row's scores against the block's `n` token slots): `block_max[r]` becomes the row's
/// [`max`], and the row becomes `exp(x - shift)` with `shift =`
/// [`softmax_shift`]`(block_max[r], running_max[r])`, `sums[r]` their sum; for
/// `r < min(values.len() / n, running_max.len(), block_max.len(), sums.len())`. Bitwise
/// [`max_rows`] then [`exp_shifted_rows`] with those shifts, in one pass over the rows (a
/// decode block's rows are 16 values: the two calls' reductions and loop set-up cost about as
/// much as the `exp` itself). `n == 0` writes nothing.
pub fn softmax_rows(
    values: &mut [f32],
    n: usize,
    running_max: &[f32],
    block_max: &mut [f32],
    sums: &mut [f32],
) {
    dispatch!(softmax_rows(values, n, running_max, block_max, sums))
}

/// Name of the kernel set in use (`"scalar"`, `"avx2"`, or `"avx2+vnni"` when the integer dot
/// products use AVX-512 VNNI), for reports.
pub fn active_isa() -> &'static str {
    #[cfg(all(target_arch = "x86_64", not(feature = "force-scalar")))]
    {
        if vnni().is_some() {
            return "avx2+vnni";
        }
        if simd().is_some() {
            return "avx2";
        }
    }
    "scalar"
}

/// XOR of the little-endian 8-byte words of `bytes` (the last partial word zero-padded),
/// computed with plain full-width loads: it touches every byte once at the kernels' load
/// width, so its speed over a buffer is the memory-bandwidth roofline for kernels that stream
/// the same bytes.
pub fn stream_read(bytes: &[u8]) -> u64 {
    dispatch!(stream_read(bytes))
}

/// Runs `chunks` independent 8-lane multiply-adds (`f32`) from registers, no memory traffic,
/// and returns a value derived from them (so the work cannot be optimised away). Its speed is
/// the arithmetic roofline: a decode step needs at least `4 × stored elements × group` flops
/// (`q·k` and `p·v`), so timing this many FMAs with the same threads gives the fastest a step
/// can be on this CPU however the data arrives.
pub fn fma_burn(chunks: usize) -> f32 {
    dispatch!(fma_burn(chunks))
}

/// Asks the CPU to start loading `bytes` into its caches, one hint per 64-byte line. Only a
/// hint: it never faults and never changes a result. Attention issues it for the next block's
/// rows, which lie a whole block (all layers) away from the current ones, too far for the
/// hardware prefetcher to follow.
#[inline]
pub fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in bytes.chunks(64) {
        // SAFETY: a prefetch hint has no architectural effect and cannot fault; the address
        // is inside `bytes` anyway. SSE is part of the x86_64 baseline.
        #[allow(unused_unsafe)]
        unsafe {
            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}
