//! AVX2 + FMA + F16C twins of the kernels in [`super::scalar`].
//!
//! The safe entry points are the methods of [`Avx2`], a zero-sized token that can only be made
//! once the CPU is known to have the three extensions (the same pattern as memchr's vector
//! searchers): holding one is the proof the `unsafe` `#[target_feature]` functions below need.
//!
//! Layout of the work, and why:
//! - Each 8-element chunk of a stored row is loaded and widened to `f32` once (`vcvtph2ps` for
//!   f16, a 16-bit shift for bf16) and then fed to the FMAs of every query head of the group,
//!   so the loop costs one conversion per 8 elements plus the unavoidable `group / 8` FMA per
//!   element. (On cores where `vcvtph2ps ymm` and 256-bit FMAs share half-width pipes, e.g.
//!   Zen 1, f16 is bound by those pipes rather than by memory.)
//! - [`Avx2::dot_rows`] keeps `R` rows × `G` heads of accumulators (at most 12 of the 16 ymm
//!   registers) and reduces them four at a time with a `vhaddps` tree, which amortises the
//!   horizontal sums over rows.
//! - [`Avx2::accumulate_rows`] keeps `C` chunks of `out` for each of the `G` heads in registers
//!   while it walks the rows, broadcasting one weight per head and row.
//! - Groups wider than 4 heads (MQA) are done 4 heads at a time; the rows they re-read are in
//!   L1 by then.
//! - A `head_dim` that is not a multiple of 8 ends with one partial chunk: `vmaskmovps` for
//!   `f32` data, and a zero-padded stack copy for 16-bit rows (there is no 16-bit masked load).
//!   Zero padding in both the row and the query makes the extra lanes add exactly `0`.
//!
//! Every function here reads and writes only inside the slices it is given; the row, head and
//! element counts are derived from the slice lengths exactly as the scalar kernels do.

use core::arch::x86_64::*;

use super::scalar;
use crate::format::KvFormat;

/// Format tags used as const generic parameters, so that every kernel is compiled once per
/// format with the element load inlined.
const F32: u8 = 0;
const F16: u8 = 1;
const BF16: u8 = 2;

/// A proof that the running CPU supports AVX2, FMA and F16C; its methods are the safe entry
/// points to the kernels of this module.
#[derive(Clone, Copy, Debug)]
pub struct Avx2 {
    _private: (),
}

impl Avx2 {
    /// The token, or `None` when the CPU lacks AVX2, FMA or F16C. Known at compile time when
    /// the crate is built with those target features; otherwise detected at run time under
    /// the `std` feature, and `None` without `std`.
    #[inline]
    pub fn new() -> Option<Avx2> {
        if detected() {
            Some(Avx2 { _private: () })
        } else {
            None
        }
    }

    /// The token without checking the CPU.
    ///
    /// # Safety
    ///
    /// - The running CPU must support AVX2, FMA and F16C (for example because
    ///   [`Avx2::new`] returned `Some` earlier in this process).
    #[inline]
    pub unsafe fn new_unchecked() -> Avx2 {
        Avx2 { _private: () }
    }

    /// See [`super::encode_row`].
    #[inline]
    pub fn encode_row(self, format: KvFormat, src: &[f32], dst: &mut [u8]) {
        // SAFETY: the token exists, so the CPU has the features `encode_row` is compiled for.
        unsafe { encode_row(format, src, dst) }
    }

    /// See [`super::decode_row`].
    #[inline]
    pub fn decode_row(self, format: KvFormat, src: &[u8], dst: &mut [f32]) {
        // SAFETY: the token exists, so the CPU has the features `decode_row` is compiled for.
        unsafe { decode_row(format, src, dst) }
    }

    /// See [`super::dot_rows`].
    #[inline]
    pub fn dot_rows(
        self,
        format: KvFormat,
        rows: &[u8],
        head_dim: usize,
        queries: &[f32],
        group: usize,
        scores: &mut [f32],
    ) {
        // SAFETY: the token exists, so the CPU has the features `dot_rows` is compiled for.
        unsafe { dot_rows(format, rows, head_dim, queries, group, scores) }
    }

    /// See [`super::accumulate_rows`].
    #[inline]
    pub fn accumulate_rows(
        self,
        format: KvFormat,
        rows: &[u8],
        head_dim: usize,
        weights: &[f32],
        group: usize,
        out: &mut [f32],
    ) {
        // SAFETY: the token exists, so the CPU has the features `accumulate_rows` is compiled
        // for.
        unsafe { accumulate_rows(format, rows, head_dim, weights, group, out) }
    }

    /// See [`super::exp_shifted_sum`].
    #[inline]
    pub fn exp_shifted_sum(self, values: &mut [f32], shift: f32) -> f32 {
        // SAFETY: the token exists, so the CPU has the features `exp_shifted_sum` is compiled
        // for.
        unsafe { exp_shifted_sum(values, shift) }
    }

    /// See [`super::max`].
    #[inline]
    pub fn max(self, values: &[f32]) -> f32 {
        // SAFETY: the token exists, so the CPU has the features `max` is compiled for.
        unsafe { max(values) }
    }

    /// See [`super::max_rows`].
    #[inline]
    pub fn max_rows(self, values: &[f32], n: usize, out: &mut [f32]) {
        // SAFETY: the token exists, so the CPU has the features `max_rows` is compiled for.
        unsafe { max_rows(values, n, out) }
    }

    /// See [`super::exp_shifted_rows`].
    #[inline]
    pub fn exp_shifted_rows(self, values: &mut [f32], n: usize, shifts: &[f32], sums: &mut [f32]) {
        // SAFETY: the token exists, so the CPU has the features `exp_shifted_rows` is compiled
        // for.
        unsafe { exp_shifted_rows(values, n, shifts, sums) }
    }

    /// See [`super::softmax_rows`].
    #[inline]
    pub fn softmax_rows(
        self,
        values: &mut [f32],
        n: usize,
        running_max: &[f32],
        block_max: &mut [f32],
        sums: &mut [f32],
    ) {
        // SAFETY: the token exists, so the CPU has the features `softmax_rows` is compiled
        // for.
        unsafe { softmax_rows(values, n, running_max, block_max, sums) }
    }

    /// See [`super::fma_burn`].
    #[inline]
    pub fn fma_burn(self, chunks: usize) -> f32 {
        // SAFETY: the token exists, so the CPU has the features `fma_burn` is compiled for.
        unsafe { fma_burn(chunks) }
    }

    /// See [`super::stream_read`].
    #[inline]
    pub fn stream_read(self, bytes: &[u8]) -> u64 {
        // SAFETY: the token exists, so the CPU has the features `stream_read` is compiled for.
        unsafe { stream_read(bytes) }
    }
}

#[cfg(all(
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
#[inline]
fn detected() -> bool {
    true
}

#[cfg(all(
    feature = "std",
    not(all(
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))
))]
#[inline]
fn detected() -> bool {
    // std caches the CPUID answer, so this is a couple of relaxed loads.
    std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
}

#[cfg(all(
    not(feature = "std"),
    not(all(
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))
))]
#[inline]
fn detected() -> bool {
    false
}

/// Bytes per stored element of format tag `FMT`.
#[inline(always)]
const fn elem_bytes<const FMT: u8>() -> usize {
    if FMT == F32 {
        4
    } else {
        2
    }
}

/// `-1` (all bits set) eight times, then `0` eight times: the 8 lanes starting at `8 - n` are a
/// mask of the first `n` lanes.
static MASK_TABLE: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];

/// A lane mask with the first `n` of 8 lanes set.
///
/// # Safety
///
/// - The CPU must support AVX2.
/// - `n <= 8`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn first_lanes(n: usize) -> __m256i {
    debug_assert!(n <= 8);
    // SAFETY: `8 - n` is in `0..=8`, so the 8 lanes read lie inside the 16-entry table.
    _mm256_loadu_si256(MASK_TABLE.as_ptr().add(8 - n).cast())
}

/// Eight stored elements at `p`, widened to `f32`.
///
/// # Safety
///
/// - The CPU must support AVX2, FMA and F16C.
/// - `p` must be valid for reading `8 * elem_bytes::<FMT>()` bytes (any alignment).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8<const FMT: u8>(p: *const u8) -> __m256 {
    match FMT {
        F32 => _mm256_loadu_ps(p.cast()),
        F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
        // bf16 is the top half of an f32: widen to 32 bits and shift into place.
        _ => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
            _mm_loadu_si128(p.cast()),
        ))),
    }
}

/// The first `n` stored elements at `p`, widened to `f32`, with the other lanes `0.0`.
///
/// # Safety
///
/// - The CPU must support AVX2, FMA and F16C.
/// - `n <= 8` and `p` must be valid for reading `n * elem_bytes::<FMT>()` bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_partial<const FMT: u8>(p: *const u8, n: usize) -> __m256 {
    if FMT == F32 {
        // SAFETY: masked-off lanes are neither read nor able to fault.
        return _mm256_maskload_ps(p.cast(), first_lanes(n));
    }
    let mut buf = [0u16; 8];
    // SAFETY: the caller vouches for `2n` readable bytes at `p`; `buf` holds 16 bytes.
    core::ptr::copy_nonoverlapping(p, buf.as_mut_ptr().cast::<u8>(), n * 2);
    load8::<FMT>(buf.as_ptr().cast())
}

/// The first `n` floats at `p`, other lanes `0.0`.
///
/// # Safety
///
/// - The CPU must support AVX2; `n <= 8` and `p` must be valid for reading `n` floats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_f32_partial(p: *const f32, n: usize) -> __m256 {
    // SAFETY: masked-off lanes are neither read nor able to fault.
    _mm256_maskload_ps(p, first_lanes(n))
}

/// Sum of the 8 lanes.
///
/// # Safety
///
/// - The CPU must support AVX2.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// `[Σa, Σb, Σc, Σd]`: four horizontal sums for the price of three `vhaddps`.
///
/// # Safety
///
/// - The CPU must support AVX2.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum4(a: __m256, b: __m256, c: __m256, d: __m256) -> __m128 {
    // Lanes after the two levels: [a0123 b0123 c0123 d0123 | a4567 b4567 c4567 d4567].
    let s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s))
}

// ---------------------------------------------------------------------------------------------
// Row conversion.

/// See [`super::encode_row`].
///
/// # Safety
///
/// - The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn encode_row(format: KvFormat, src: &[f32], dst: &mut [u8]) {
    let size = match format {
        KvFormat::F32 => 4,
        KvFormat::F16 | KvFormat::Bf16 => 2,
        KvFormat::Int8 | KvFormat::Int4 => return scalar::encode_row(format, src, dst),
    };
    let n = src.len().min(dst.len() / size);
    let full = n / 8 * 8;
    let s = src.as_ptr();
    let d = dst.as_mut_ptr();
    let mut i = 0;
    // SAFETY (all loops): `i + 8 <= full <= n`, so the 8 floats read lie in `src` and the
    // `8 * size` bytes written lie in `dst` (`n * size <= dst.len()`).
    match format {
        KvFormat::F32 => {
            while i < full {
                _mm256_storeu_ps(d.add(i * 4).cast(), _mm256_loadu_ps(s.add(i)));
                i += 8;
            }
        }
        KvFormat::F16 => {
            while i < full {
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(s.add(i)));
                _mm_storeu_si128(d.add(i * 2).cast(), h);
                i += 8;
            }
        }
        KvFormat::Bf16 => {
            while i < full {
                let h = f32_to_bf16_x8(_mm256_loadu_ps(s.add(i)));
                _mm_storeu_si128(d.add(i * 2).cast(), h);
                i += 8;
            }
        }
        KvFormat::Int8 | KvFormat::Int4 => {}
    }
    scalar::encode_row(format, &src[full..n], &mut dst[full * size..n * size]);
}

/// Eight floats rounded to bfloat16 bits exactly as [`crate::half::f32_to_bf16`] does
/// (nearest even; NaN stays a quiet NaN).
///
/// # Safety
///
/// - The CPU must support AVX2.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f32_to_bf16_x8(v: __m256) -> __m128i {
    let bits = _mm256_castps_si256(v);
    let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
    let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(
        bits,
        _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb),
    ));
    let quiet_nan = _mm256_or_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(0x40));
    let is_nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
    let halves = _mm256_blendv_epi8(rounded, quiet_nan, is_nan);
    // Every lane is below 0x10000, so the unsigned-saturating pack is exact; it packs within
    // 128-bit lanes, and the permute brings the two useful quarters together.
    let packed = _mm256_packus_epi32(halves, halves);
    _mm256_castsi256_si128(_mm256_permute4x64_epi64::<0b11_01_10_00>(packed))
}

/// See [`super::decode_row`].
///
/// # Safety
///
/// - The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_row(format: KvFormat, src: &[u8], dst: &mut [f32]) {
    match format {
        KvFormat::F32 => decode::<F32>(src, dst),
        KvFormat::F16 => decode::<F16>(src, dst),
        KvFormat::Bf16 => decode::<BF16>(src, dst),
        KvFormat::Int8 | KvFormat::Int4 => scalar::decode_row(format, src, dst),
    }
}

/// # Safety
///
/// - The CPU must support AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode<const FMT: u8>(src: &[u8], dst: &mut [f32]) {
    let size = elem_bytes::<FMT>();
    let n = dst.len().min(src.len() / size);
    let full = n / 8 * 8;
    let mut i = 0;
    while i < full {
        // SAFETY: `i + 8 <= n`, so `8 * size` bytes of `src` and 8 floats of `dst` are in
        // bounds.
        _mm256_storeu_ps(
            dst.as_mut_ptr().add(i),
            load8::<FMT>(src.as_ptr().add(i * size)),
        );
        i += 8;
    }
    if full < n {
        let format = match FMT {
            F32 => KvFormat::F32,
            F16 => KvFormat::F16,
            _ => KvFormat::Bf16,
        };
        scalar::decode_row(format, &src[full * size..n * size], &mut dst[full..n]);
    }
}

// ---------------------------------------------------------------------------------------------
// Dot products.

/// Rows that fit in all the slices (the rule of the scalar kernels).
#[inline]
fn rows_in(row_bytes: Option<usize>, rows: &[u8], per_head: usize) -> usize {
    match row_bytes {
        Some(bytes) if bytes > 0 => per_head.min(rows.len() / bytes),
        _ => 0,
    }
}

/// See [`super::dot_rows`].
///
/// # Safety
///
/// - The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows(
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
    debug_assert_eq!(queries.len(), group * head_dim);
    let per_head = scores.len() / group;
    let heads = group.min(queries.len() / head_dim);
    let n_rows = rows_in(format.row_bytes(head_dim), rows, per_head);
    if n_rows == 0 || heads == 0 {
        return;
    }
    let shape = Shape {
        rows: rows.as_ptr(),
        head_dim,
        per_head,
    };
    // From here on `n_rows * row_bytes <= rows.len()`, `heads * head_dim <= queries.len()` and
    // `heads * per_head <= scores.len()`, which is what the block kernels rely on.
    match format {
        KvFormat::F32 => dot_heads::<F32>(shape, n_rows, queries, heads, scores),
        KvFormat::F16 => dot_heads::<F16>(shape, n_rows, queries, heads, scores),
        KvFormat::Bf16 => dot_heads::<BF16>(shape, n_rows, queries, heads, scores),
        KvFormat::Int8 | KvFormat::Int4 => super::quant_avx2::dot_rows(
            Avx2 { _private: () },
            format,
            rows,
            head_dim,
            queries,
            group,
            scores,
        ),
    }
}

/// Where the stored rows are and how the `[group][n]` arrays are strided.
#[derive(Clone, Copy)]
struct Shape {
    rows: *const u8,
    head_dim: usize,
    /// Stride between heads in `scores` / `weights`.
    per_head: usize,
}

/// Splits the heads into runs of at most 4 and each run's rows into register blocks.
///
/// # Safety
///
/// - The CPU must support AVX2, FMA and F16C.
/// - `shape.rows` must be valid for reading `n_rows` rows of `head_dim` elements of `FMT`.
/// - `queries.len() >= heads * head_dim`, `scores.len() >= heads * per_head`,
///   `n_rows <= per_head`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_heads<const FMT: u8>(
    shape: Shape,
    n_rows: usize,
    queries: &[f32],
    heads: usize,
    scores: &mut [f32],
) {
    let q = queries.as_ptr();
    let s = scores.as_mut_ptr();
    let mut h = 0;
    while h < heads {
        let left = heads - h;
        // SAFETY: head `h + g` for `g < G <= left` has its query at `(h + g) * head_dim` and its
        // scores at `(h + g) * per_head`, both inside the slices (see the contract above).
        let (q, s) = (q.add(h * shape.head_dim), s.add(h * shape.per_head));
        let done = match left {
            1 => dot_group::<FMT, 8, 1>(shape, n_rows, q, s),
            2 => dot_group::<FMT, 4, 2>(shape, n_rows, q, s),
            3 => dot_group::<FMT, 4, 3>(shape, n_rows, q, s),
            _ => dot_group::<FMT, 3, 4>(shape, n_rows, q, s),
        };
        h += done;
    }
}

/// All `n_rows` rows against `G` heads, `R` rows at a time; returns `G`.
///
/// # Safety
///
/// - As for [`dot_heads`], with `q` / `s` pointing at the first of `G` heads.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_group<const FMT: u8, const R: usize, const G: usize>(
    shape: Shape,
    n_rows: usize,
    q: *const f32,
    s: *mut f32,
) -> usize {
    let mut r = 0;
    while r + R <= n_rows {
        dot_block::<FMT, R, G>(shape, r, q, s);
        r += R;
    }
    while r < n_rows {
        dot_block::<FMT, 1, G>(shape, r, q, s);
        r += 1;
    }
    G
}

/// Scores of rows `row..row + R` against `G` heads: `R × G` ymm accumulators over the 8-wide
/// chunks of `head_dim`, each row chunk widened once and used `G` times.
///
/// # Safety
///
/// - As for [`dot_heads`], with `row + R <= n_rows`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_block<const FMT: u8, const R: usize, const G: usize>(
    shape: Shape,
    row: usize,
    q: *const f32,
    s: *mut f32,
) {
    let head_dim = shape.head_dim;
    let row_bytes = head_dim * elem_bytes::<FMT>();
    // SAFETY: `row < n_rows`, so the start of row `row` is inside the rows slice.
    let base = shape.rows.add(row * row_bytes);
    let mut acc = [[_mm256_setzero_ps(); G]; R];
    let full = head_dim / 8 * 8;
    let mut d = 0;
    while d < full {
        // Query chunks loaded once per R rows: on cores that split 256-bit loads, reloading
        // them for every row makes the loop load-bound.
        let mut qv = [_mm256_setzero_ps(); G];
        for (g, v) in qv.iter_mut().enumerate() {
            // SAFETY: `d + 8 <= head_dim`: the chunk lies in head `g`'s `head_dim` floats.
            *v = _mm256_loadu_ps(q.add(g * head_dim + d));
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            // SAFETY: `d + 8 <= head_dim`, so the chunk lies in row `row + r < n_rows`.
            let x = load8::<FMT>(base.add(r * row_bytes + d * elem_bytes::<FMT>()));
            for (a, qg) in acc_r.iter_mut().zip(qv.iter()) {
                *a = _mm256_fmadd_ps(x, *qg, *a);
            }
        }
        d += 8;
    }
    if d < head_dim {
        let tail = head_dim - d;
        let mut qt = [_mm256_setzero_ps(); G];
        for (g, v) in qt.iter_mut().enumerate() {
            // SAFETY: the `tail` floats from `d` are the end of head `g`'s query.
            *v = load_f32_partial(q.add(g * head_dim + d), tail);
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            // SAFETY: the last `tail` elements of row `row + r`.
            let x = load_partial::<FMT>(base.add(r * row_bytes + d * elem_bytes::<FMT>()), tail);
            for (a, qv) in acc_r.iter_mut().zip(qt.iter()) {
                *a = _mm256_fmadd_ps(x, *qv, *a);
            }
        }
    }
    // Reduce four accumulators at a time in (head, row) order, so that with `R` a multiple of
    // 4 each `hsum4` is four consecutive scores of one head: a single 16-byte store.
    let flat = |i: usize| acc[i % R][i / R];
    let n = R * G;
    let mut i = 0;
    while i + 4 <= n {
        let v = hsum4(flat(i), flat(i + 1), flat(i + 2), flat(i + 3));
        let (h, r) = (i / R, i % R);
        // SAFETY (stores): each score written is for a head `< G` of this run and a row
        // `row + r' < row + R <= n_rows <= per_head`.
        if R.is_multiple_of(4) {
            _mm_storeu_ps(s.add(h * shape.per_head + row + r), v);
        } else if R == 2 {
            _mm_store_sd(s.add(h * shape.per_head + row).cast(), _mm_castps_pd(v));
            _mm_storeh_pd(
                s.add((h + 1) * shape.per_head + row).cast(),
                _mm_castps_pd(v),
            );
        } else {
            let mut sums = [0.0f32; 4];
            _mm_storeu_ps(sums.as_mut_ptr(), v);
            for (k, sum) in sums.iter().enumerate() {
                *s.add(((i + k) / R) * shape.per_head + row + (i + k) % R) = *sum;
            }
        }
        i += 4;
    }
    while i < n {
        // SAFETY: as above.
        *s.add((i / R) * shape.per_head + row + i % R) = hsum(flat(i));
        i += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// Weighted sums.

/// See [`super::accumulate_rows`].
///
/// # Safety
///
/// - The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn accumulate_rows(
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
    debug_assert_eq!(out.len(), group * head_dim);
    let per_head = weights.len() / group;
    let heads = group.min(out.len() / head_dim);
    let n_rows = rows_in(format.row_bytes(head_dim), rows, per_head);
    if n_rows == 0 || heads == 0 {
        return;
    }
    let shape = Shape {
        rows: rows.as_ptr(),
        head_dim,
        per_head,
    };
    // From here on `n_rows * row_bytes <= rows.len()`, `heads * per_head <= weights.len()`
    // and `heads * head_dim <= out.len()`, which is what the block kernels rely on.
    match format {
        KvFormat::F32 => acc_heads::<F32>(shape, n_rows, weights, heads, out),
        KvFormat::F16 => acc_heads::<F16>(shape, n_rows, weights, heads, out),
        KvFormat::Bf16 => acc_heads::<BF16>(shape, n_rows, weights, heads, out),
        KvFormat::Int8 | KvFormat::Int4 => super::quant_avx2::accumulate_rows(
            Avx2 { _private: () },
            format,
            rows,
            head_dim,
            weights,
            group,
            out,
        ),
    }
}

/// Splits the heads into runs of at most 4 and `head_dim` into register blocks of chunks.
///
/// # Safety
///
/// - The CPU must support AVX2, FMA and F16C.
/// - `shape.rows` must be valid for reading `n_rows` rows of `head_dim` elements of `FMT`.
/// - `weights.len() >= heads * per_head`, `out.len() >= heads * head_dim`,
///   `n_rows <= per_head`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn acc_heads<const FMT: u8>(
    shape: Shape,
    n_rows: usize,
    weights: &[f32],
    heads: usize,
    out: &mut [f32],
) {
    let w = weights.as_ptr();
    let o = out.as_mut_ptr();
    let mut h = 0;
    while h < heads {
        let left = heads - h;
        // SAFETY: head `h + g` for `g < G <= left` has its weights at `(h + g) * per_head` and
        // its output at `(h + g) * head_dim`, both inside the slices.
        let (w, o) = (w.add(h * shape.per_head), o.add(h * shape.head_dim));
        let done = match left {
            1 => acc_group::<FMT, 8, 1>(shape, n_rows, w, o),
            2 => acc_group::<FMT, 4, 2>(shape, n_rows, w, o),
            3 => acc_group::<FMT, 4, 3>(shape, n_rows, w, o),
            _ => acc_group::<FMT, 2, 4>(shape, n_rows, w, o),
        };
        h += done;
    }
}

/// All of `head_dim` for `G` heads, `C` chunks of 8 at a time; returns `G`.
///
/// # Safety
///
/// - As for [`acc_heads`], with `w` / `o` pointing at the first of `G` heads.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn acc_group<const FMT: u8, const C: usize, const G: usize>(
    shape: Shape,
    n_rows: usize,
    w: *const f32,
    o: *mut f32,
) -> usize {
    let full = shape.head_dim / 8 * 8;
    let mut d = 0;
    while d + 8 * C <= full {
        acc_block::<FMT, C, G>(shape, n_rows, d, 8, w, o);
        d += 8 * C;
    }
    while d < full {
        acc_block::<FMT, 1, G>(shape, n_rows, d, 8, w, o);
        d += 8;
    }
    if d < shape.head_dim {
        acc_block::<FMT, 1, G>(shape, n_rows, d, shape.head_dim - d, w, o);
    }
    G
}

/// `out[g][d..d + 8C] += Σ_r w[g][r] · row_r[d..d + 8C]` with the `G × C` output chunks held in
/// registers across all rows. With `last < 8` (only for `C == 1`) the chunk is partial.
///
/// # Safety
///
/// - As for [`acc_heads`], with `d + 8 * (C - 1) + last <= head_dim` and `1 <= last <= 8`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn acc_block<const FMT: u8, const C: usize, const G: usize>(
    shape: Shape,
    n_rows: usize,
    d: usize,
    last: usize,
    w: *const f32,
    o: *mut f32,
) {
    debug_assert!(C == 1 || last == 8);
    let head_dim = shape.head_dim;
    let row_bytes = head_dim * elem_bytes::<FMT>();
    let partial = last < 8;
    let mask = first_lanes(last);
    let mut acc = [[_mm256_setzero_ps(); C]; G];
    for (g, acc_g) in acc.iter_mut().enumerate() {
        for (c, a) in acc_g.iter_mut().enumerate() {
            // SAFETY: chunk `c` of head `g`'s output; a partial one is masked to `last` lanes.
            let p = o.add(g * head_dim + d + 8 * c);
            *a = if partial {
                _mm256_maskload_ps(p, mask)
            } else {
                _mm256_loadu_ps(p)
            };
        }
    }
    // SAFETY: element `d` of row 0 is inside the rows slice (`d < head_dim`, `n_rows >= 1`).
    let mut p = shape.rows.add(d * elem_bytes::<FMT>());
    for r in 0..n_rows {
        let mut wv = [_mm256_setzero_ps(); G];
        for (g, v) in wv.iter_mut().enumerate() {
            // SAFETY: `r < n_rows <= per_head`, inside head `g`'s weights.
            *v = _mm256_broadcast_ss(&*w.add(g * shape.per_head + r));
        }
        for c in 0..C {
            // SAFETY: chunk `c` of row `r` lies within its `head_dim` elements.
            let x = if partial {
                load_partial::<FMT>(p, last)
            } else {
                load8::<FMT>(p.add(8 * c * elem_bytes::<FMT>()))
            };
            for (acc_g, wg) in acc.iter_mut().zip(wv.iter()) {
                acc_g[c] = _mm256_fmadd_ps(*wg, x, acc_g[c]);
            }
        }
        // `wrapping_add` so the step past the last row never forms an out-of-bounds pointer.
        p = p.wrapping_add(row_bytes);
    }
    for (g, acc_g) in acc.iter().enumerate() {
        for (c, a) in acc_g.iter().enumerate() {
            // SAFETY: as for the loads above.
            let p = o.add(g * head_dim + d + 8 * c);
            if partial {
                _mm256_maskstore_ps(p, mask, *a);
            } else {
                _mm256_storeu_ps(p, *a);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Softmax helpers.

/// See [`super::exp_shifted_sum`]: [`exp_shifted_rows`] with one row.
///
/// # Safety
///
/// - The CPU must support AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn exp_shifted_sum(values: &mut [f32], shift: f32) -> f32 {
    let mut sum = 0.0;
    exp_shifted_rows(
        values,
        values.len(),
        &[shift],
        core::slice::from_mut(&mut sum),
    );
    sum
}

/// `e^x` for 8 lanes with the same reduction as [`scalar::exp`]: `x = k·ln2 + r`,
/// `|r| <= ln2/2`, Cephes' degree-7 polynomial for `e^r`, then `2^k` applied in two halves so
/// that subnormal results (down to `k = -149`) and `k = 128` stay representable.
/// Relative error is below 2e-7 for normal results; `x < ln(2^-150)` gives `0`, `x > ln(f32::MAX)`
/// gives `+inf` and NaN stays NaN.
///
/// # Safety
///
/// - The CPU must support AVX2 and FMA.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn exp8(x: __m256) -> __m256 {
    // With every lane in -86..=88 (the usual case for shifted scores) `k` is in -124..=127
    // and every result normal, so neither the clamps nor the masks below change anything,
    // and `2^k` in two halves is exactly `2^k` added to the exponent: the same bits with
    // half the instructions.
    if exp8_inside(x) {
        return exp8_short([x])[0];
    }
    // Clamping keeps k in -150..=129 so the exponent arithmetic cannot wrap; the real answer
    // for lanes outside is restored below (0, +inf by overflow, or NaN).
    let xc = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-104.0)),
        _mm256_set1_ps(89.0),
    );
    let kf = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        xc,
        _mm256_set1_ps(core::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(kf, _mm256_set1_ps(LN2_HI), xc);
    let r = _mm256_fnmadd_ps(kf, _mm256_set1_ps(LN2_LO), r);
    let [y] = exp_poly8([r]);
    let k = _mm256_cvtps_epi32(kf);
    let k1 = _mm256_srai_epi32::<1>(k);
    let k2 = _mm256_sub_epi32(k, k1);
    let bias = _mm256_set1_epi32(127);
    let p1 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(k1, bias)));
    let p2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(k2, bias)));
    let y = _mm256_mul_ps(_mm256_mul_ps(y, p1), p2);
    let tiny = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(-103.972_08));
    let y = _mm256_andnot_ps(tiny, y);
    let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
    _mm256_blendv_ps(y, x, nan)
}

/// `ln 2` in two parts for the range reduction: `LN2_HI` has few enough bits that `k·LN2_HI`
/// is exact for the `k` of every finite result.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// Whether every lane of `x` lies in `-86..=88`, where [`exp8_short`] gives [`exp8`]'s bits.
///
/// # Safety
///
/// - The CPU must support AVX.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn exp8_inside(x: __m256) -> bool {
    let inside = _mm256_and_ps(
        _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(-86.0)),
        _mm256_cmp_ps::<_CMP_LE_OQ>(x, _mm256_set1_ps(88.0)),
    );
    _mm256_movemask_ps(inside) == 0xff
}

/// [`exp8`] of each vector of `x`, for lanes all in `-86..=88` (see [`exp8_inside`]): `k`
/// rounded, `r` reduced, the polynomial, then `2^k` added straight to the exponent. Each step
/// is done for every vector before the next, so that their dependency chains overlap (the
/// softmax of a block's 3 rows: 63 against 85 ns when each row's `exp`s ran after the
/// previous row's).
///
/// # Safety
///
/// - The CPU must support AVX2 and FMA.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn exp8_short<const N: usize>(x: [__m256; N]) -> [__m256; N] {
    let kf = x.map(|x| {
        _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            x,
            _mm256_set1_ps(core::f32::consts::LOG2_E),
        ))
    });
    let mut r = [_mm256_setzero_ps(); N];
    for i in 0..N {
        r[i] = _mm256_fnmadd_ps(kf[i], _mm256_set1_ps(LN2_HI), x[i]);
    }
    for i in 0..N {
        r[i] = _mm256_fnmadd_ps(kf[i], _mm256_set1_ps(LN2_LO), r[i]);
    }
    let y = exp_poly8(r);
    let mut out = [_mm256_setzero_ps(); N];
    for i in 0..N {
        let k = _mm256_slli_epi32::<23>(_mm256_cvtps_epi32(kf[i]));
        out[i] = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(y[i]), k));
    }
    out
}

/// Cephes' polynomial for `e^r`, `|r| <= ln2/2`: `1 + r + r²·P(r)`, the large terms last;
/// for each vector of `r`, each step done for all of them before the next.
///
/// # Safety
///
/// - The CPU must support AVX2 and FMA.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn exp_poly8<const N: usize>(r: [__m256; N]) -> [__m256; N] {
    let mut y = [_mm256_set1_ps(1.987_569_1e-4); N];
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        for i in 0..N {
            y[i] = _mm256_fmadd_ps(y[i], r[i], _mm256_set1_ps(c));
        }
    }
    for i in 0..N {
        let r2 = _mm256_mul_ps(r[i], r[i]);
        y[i] = _mm256_add_ps(_mm256_fmadd_ps(y[i], r2, r[i]), _mm256_set1_ps(1.0));
    }
    y
}

/// See [`super::max`].
///
/// # Safety
///
/// - The CPU must support AVX2.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn max(values: &[f32]) -> f32 {
    let n = values.len();
    let p = values.as_ptr();
    let mut m0 = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut m1 = m0;
    let mut i = 0;
    // `vmaxps a, m` returns `m` when `a` is NaN, which is what ignores NaN inputs.
    while i + 16 <= n {
        // SAFETY: `i + 16 <= n`.
        m0 = _mm256_max_ps(_mm256_loadu_ps(p.add(i)), m0);
        m1 = _mm256_max_ps(_mm256_loadu_ps(p.add(i + 8)), m1);
        i += 16;
    }
    let m = _mm256_max_ps(m0, m1);
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_movehdup_ps(m));
    let head = _mm_cvtss_f32(m);
    let tail = scalar::max(&values[i..]);
    if tail > head {
        tail
    } else {
        head
    }
}

/// See [`super::max_rows`]: [`max`] inlined per row.
///
/// # Safety
///
/// - The CPU must support AVX2.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn max_rows(values: &[f32], n: usize, out: &mut [f32]) {
    if n == 0 {
        return;
    }
    for (row, m) in values.chunks_exact(n).zip(out.iter_mut()) {
        *m = max(row);
    }
}

/// See [`super::exp_shifted_rows`]. Two passes: first every `exp` of every row (independent
/// of each other, so the out-of-order core overlaps their long dependency chains: a block's
/// row is only two chunks), then each row's sum, re-read from the stored values into two
/// 8-lane sums (chunks at `i ≡ 0 (mod 16)` and any tail into one, `i ≡ 8` into the other) so
/// consecutive adds do not wait on each other. [`exp_shifted_sum`] is this with one row, so
/// the results are bitwise those of one call per row.
///
/// # Safety
///
/// - The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn exp_shifted_rows(values: &mut [f32], n: usize, shifts: &[f32], sums: &mut [f32]) {
    if n == 0 {
        return;
    }
    let rows = (values.len() / n).min(shifts.len()).min(sums.len());
    let p = values.as_mut_ptr();
    for (r, &shift) in shifts.iter().enumerate().take(rows) {
        let shift_v = _mm256_set1_ps(shift);
        // SAFETY (this loop): `r < rows <= values.len() / n`, so `row..row + n` lies in
        // `values`; full chunks end at or before `n`, the last one is masked to what is left.
        let row = p.add(r * n);
        let mut i = 0;
        while i + 8 <= n {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row.add(i)), shift_v));
            _mm256_storeu_ps(row.add(i), e);
            i += 8;
        }
        if i < n {
            let m = first_lanes(n - i);
            let e = exp8(_mm256_sub_ps(_mm256_maskload_ps(row.add(i), m), shift_v));
            _mm256_maskstore_ps(row.add(i), m, e);
        }
    }
    for (r, sum) in sums.iter_mut().enumerate().take(rows) {
        // SAFETY (this loop): as above; masked-off lanes load as `0.0`, which is what
        // `exp_shifted_sum` adds for them.
        let row = p.add(r * n);
        let mut sum0 = _mm256_setzero_ps();
        let mut sum1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            sum0 = _mm256_add_ps(sum0, _mm256_loadu_ps(row.add(i)));
            sum1 = _mm256_add_ps(sum1, _mm256_loadu_ps(row.add(i + 8)));
            i += 16;
        }
        while i < n {
            let m = first_lanes((n - i).min(8));
            sum0 = _mm256_add_ps(sum0, _mm256_maskload_ps(row.add(i), m));
            i += 8;
        }
        *sum = hsum(_mm256_add_ps(sum0, sum1));
    }
}

/// See [`super::softmax_rows`]. Rows of 16 (the default block) take one pass per 4 rows with
/// everything in registers: [`max`]'s reduction, the shift, two [`exp8`] per row and
/// [`exp_shifted_rows`]'s sum, in the same order, so the same bits. Other lengths call
/// [`max_rows`] and [`exp_shifted_rows`], up to 16 rows at a time.
///
/// # Safety
///
/// - The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn softmax_rows(
    values: &mut [f32],
    n: usize,
    running_max: &[f32],
    block_max: &mut [f32],
    sums: &mut [f32],
) {
    if n == 0 {
        return;
    }
    let rows = (values.len() / n)
        .min(running_max.len())
        .min(block_max.len())
        .min(sums.len());
    if n != 16 {
        const CHUNK: usize = 16;
        let mut shifts = [0.0f32; CHUNK];
        for first in (0..rows).step_by(CHUNK) {
            let k = (rows - first).min(CHUNK);
            let chunk = &mut values[first * n..(first + k) * n];
            max_rows(chunk, n, &mut block_max[first..first + k]);
            for i in 0..k {
                shifts[i] = super::softmax_shift(block_max[first + i], running_max[first + i]);
            }
            exp_shifted_rows(chunk, n, &shifts[..k], &mut sums[first..first + k]);
        }
        return;
    }
    let p = values.as_mut_ptr();
    let mut r = 0;
    while r < rows {
        // SAFETY: rows `r..r + take` are whole (`r + take <= rows <= values.len() / 16`).
        let row = p.add(16 * r);
        let take = (rows - r).min(4);
        match take {
            1 => softmax_16::<2>(row, running_max, block_max, sums, r),
            2 => softmax_16::<4>(row, running_max, block_max, sums, r),
            3 => softmax_16::<6>(row, running_max, block_max, sums, r),
            _ => softmax_16::<8>(row, running_max, block_max, sums, r),
        }
        r += take;
    }
}

/// [`softmax_rows`] of `N / 2` rows of 16 from `row` (rows `first..first + N / 2` of the
/// other slices; `N` chunks of 8): the rows' steps interleaved, so that their dependency
/// chains overlap.
///
/// # Safety
///
/// - The CPU must support AVX2, FMA and F16C.
/// - `N` must be even; `row` must point at `N / 2` whole rows of 16 values, and
///   `first + N / 2` must not exceed the other slices' lengths.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn softmax_16<const N: usize>(
    row: *mut f32,
    running_max: &[f32],
    block_max: &mut [f32],
    sums: &mut [f32],
    first: usize,
) {
    let neg_inf = _mm256_set1_ps(f32::NEG_INFINITY);
    // SAFETY: the rows are whole.
    let v: [__m256; N] = core::array::from_fn(|i| _mm256_loadu_ps(row.add(8 * i)));
    let mut x = [_mm256_setzero_ps(); N];
    for i in 0..N / 2 {
        // `max`'s reduction for 16 values (a NaN input loses every `vmaxps` against the
        // running maximum), and its empty tail, `-inf`, never above it.
        let m = _mm256_max_ps(
            _mm256_max_ps(v[2 * i], neg_inf),
            _mm256_max_ps(v[2 * i + 1], neg_inf),
        );
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        block_max[first + i] = m;
        let shift = _mm256_set1_ps(super::softmax_shift(m, running_max[first + i]));
        x[2 * i] = _mm256_sub_ps(v[2 * i], shift);
        x[2 * i + 1] = _mm256_sub_ps(v[2 * i + 1], shift);
    }
    let mut inside = true;
    for &x in &x {
        inside &= exp8_inside(x);
    }
    let e = if inside {
        exp8_short(x)
    } else {
        x.map(|x| exp8(x))
    };
    let zero = _mm256_setzero_ps();
    for i in 0..N / 2 {
        // SAFETY: as above.
        _mm256_storeu_ps(row.add(16 * i), e[2 * i]);
        _mm256_storeu_ps(row.add(16 * i + 8), e[2 * i + 1]);
        // `exp_shifted_rows`'s sum: each chunk added to a zero sum, then the two together.
        sums[first + i] = hsum(_mm256_add_ps(
            _mm256_add_ps(zero, e[2 * i]),
            _mm256_add_ps(zero, e[2 * i + 1]),
        ));
    }
}

/// See [`super::fma_burn`].
///
/// # Safety
///
/// - The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fma_burn(chunks: usize) -> f32 {
    // Twelve independent chains: enough to cover the FMA latency on both pipes.
    let mut acc = [_mm256_set1_ps(0.5); 12];
    let (a, b) = (_mm256_set1_ps(0.999), _mm256_set1_ps(0.001));
    let mut done = 0;
    while done + 12 <= chunks {
        for v in acc.iter_mut() {
            *v = _mm256_fmadd_ps(*v, a, b);
        }
        done += 12;
    }
    for v in acc.iter_mut().take(chunks - done) {
        *v = _mm256_fmadd_ps(*v, a, b);
    }
    let mut sum = _mm256_setzero_ps();
    for v in acc {
        sum = _mm256_add_ps(sum, v);
    }
    hsum(sum)
}

/// See [`super::stream_read`].
///
/// # Safety
///
/// - The CPU must support AVX2.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn stream_read(bytes: &[u8]) -> u64 {
    let n = bytes.len();
    let p = bytes.as_ptr();
    // Four independent XORs so the loop is bound by loads, not by a dependency chain.
    let mut x = [_mm256_setzero_si256(); 4];
    let mut i = 0;
    while i + 128 <= n {
        for (j, v) in x.iter_mut().enumerate() {
            // SAFETY: `i + 128 <= n`, so all four 32-byte loads are in bounds.
            *v = _mm256_xor_si256(*v, _mm256_loadu_si256(p.add(i + 32 * j).cast()));
        }
        i += 128;
    }
    while i + 32 <= n {
        // SAFETY: `i + 32 <= n`.
        x[0] = _mm256_xor_si256(x[0], _mm256_loadu_si256(p.add(i).cast()));
        i += 32;
    }
    let v = _mm256_xor_si256(_mm256_xor_si256(x[0], x[1]), _mm256_xor_si256(x[2], x[3]));
    let v = _mm_xor_si128(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let head = (_mm_cvtsi128_si64(v) ^ _mm_extract_epi64::<1>(v)) as u64;
    // XOR is associative, so the 8-byte words of the vector part and the scalar tail combine
    // into exactly the scalar twin's answer (`i` is a multiple of 8).
    head ^ scalar::stream_read(&bytes[i..])
}
