//! AVX2 + FMA twins of the quantized kernels in [`super::quant_scalar`].
//!
//! The safe entry points take the [`Avx2`] token of [`super::avx2`] as the proof that the CPU
//! has the features the `unsafe` `#[target_feature]` functions below are compiled for.
//!
//! Layout of the work, and why:
//! - Stored rows are never copied out: every 8-element chunk of a row is dequantized in
//!   registers and used at once. int8: `vpmovsxbd` (8 bytes → 8 × i32), `vcvtdq2ps`, times the
//!   group's scale. int4: the chunk's 4 bytes are broadcast to all lanes, shifted by
//!   `0, 4, …, 28` (`vpsrlvd`) and masked to a nibble, converted, then `m + s·q` with one FMA.
//!   `s·q` is exact in `f32` (4 or 7 significant bits times the 8 of a bfloat16), so these are
//!   exactly the values the scalar twin computes.
//! - The group parameters are read once per row and group (chunks never straddle a group:
//!   32 is a multiple of 8).
//! - [`dot_rows`] keeps `R` rows × `G` heads of accumulators, like the float kernel, and reuses
//!   each dequantized chunk for all `G` heads.
//! - [`dot_rows_prepared`] (the attention path: integer dot products against a quantized
//!   query) takes 8 rows at a time when every group is whole: the rows' words are transposed
//!   in registers so that lane `r` holds row `r`, each 4-byte word of the query is broadcast,
//!   and the lanes end as the rows' exact group sums, with no horizontal sum per score (in L1
//!   this took the int8 scores from 24.2 to 16.4 ns per token for 3 heads, int4 from 30.6 to
//!   17.5). Other rows reduce each score's 8 lanes exactly instead; both give the same bits.
//!   Where the CPU has AVX-512 VNNI ([`Vnni`]), [`dot_rows_prepared_vnni`] does the tiles'
//!   products with `vpdpbusd` (4 byte products added straight into an `i32` lane): the same
//!   exact sums, int8 with one instruction where AVX2 takes three (`vpmaddubsw` + `vpmaddwd` +
//!   `vpaddd`), int4 with one where AVX2 takes two (`vpmaddubsw` + a 16-bit add; its widening
//!   was already once per group). On a Cascade Lake Xeon, in L1: int8 scores 10.3 → 7.5 ns per
//!   token for 3 heads, int4 8.9 → 7.1.
//! - [`accumulate_rows`] keeps one group (4 chunks) of `out` for `G <= 3` heads in registers
//!   while it walks the rows (int4 with 3 heads: half a group). For int8 the group scale is
//!   folded into the softmax weight (`w·s`, one multiply per head, row and group), so the
//!   chunk needs no multiply; for int4 the chunk is dequantized once (`m + s·q`) and shared
//!   by the heads (folding `m` out as a per-head constant would save one FMA per chunk but
//!   adds cancellation error).
//! - [`accumulate_rows_int`] (the attention path for int4 values) rounds each run of 16 rows'
//!   `weight · scale` to 8-bit integers and sums the nibbles against them with `vpmaddubsw`
//!   in 16-bit lanes, two rows interleaved byte by byte; the weights of up to 4 groups are
//!   prepared first (their division and reduction chains then overlap), the 3 heads' maxima
//!   and constant terms reduced together by transposes.
//! - A `head_dim` that is not a multiple of 8 ends with a partial chunk, read through a
//!   zero-padded stack copy and masked to its lanes.
//!
//! Every function reads and writes only inside the slices it is given; row, head and element
//! counts are derived from the slice lengths exactly as the scalar kernels do.

use core::arch::x86_64::*;

use super::avx2::Avx2;
use super::quant_scalar::{self, geometry};
use crate::format::KvFormat;
use crate::quant::{self, GROUP};

/// Format tags used as const generic parameters.
const I8: u8 = 0;
const I4: u8 = 1;

/// A proof that the running CPU has, besides AVX2, FMA and F16C, the 256-bit forms of AVX-512
/// VNNI (AVX512F, AVX512VL and AVX512_VNNI, as on Intel Cascade Lake and later server cores and
/// AMD Zen 4): [`dot_rows_prepared_vnni`] then takes `vpdpbusd`, which multiplies 4 byte pairs
/// and adds them to an `i32` lane in one instruction, in place of `vpmaddubsw`, `vpmaddwd` and
/// `vpaddd`.
#[derive(Clone, Copy, Debug)]
pub struct Vnni {
    _avx2: Avx2,
}

impl Vnni {
    /// The token, or `None` when the CPU lacks any of the six features. Known at compile time
    /// when the crate is built with them; otherwise detected at run time under the `std`
    /// feature, and `None` without `std`.
    #[inline]
    pub fn new() -> Option<Vnni> {
        let avx2 = Avx2::new()?;
        vnni_detected().then_some(Vnni { _avx2: avx2 })
    }

    /// The token without checking the CPU.
    ///
    /// # Safety
    ///
    /// - The running CPU must support AVX2, FMA, F16C, AVX512F, AVX512VL and AVX512_VNNI (for
    ///   example because [`Vnni::new`] returned `Some` earlier in this process).
    #[inline]
    pub unsafe fn new_unchecked() -> Vnni {
        Vnni {
            // SAFETY: the caller vouches for AVX2, FMA and F16C among the rest.
            _avx2: Avx2::new_unchecked(),
        }
    }
}

#[cfg(all(
    target_feature = "avx512f",
    target_feature = "avx512vl",
    target_feature = "avx512vnni"
))]
#[inline]
fn vnni_detected() -> bool {
    true
}

#[cfg(all(
    feature = "std",
    not(all(
        target_feature = "avx512f",
        target_feature = "avx512vl",
        target_feature = "avx512vnni"
    ))
))]
#[inline]
fn vnni_detected() -> bool {
    std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512vl")
        && std::is_x86_feature_detected!("avx512vnni")
}

#[cfg(all(
    not(feature = "std"),
    not(all(
        target_feature = "avx512f",
        target_feature = "avx512vl",
        target_feature = "avx512vnni"
    ))
))]
#[inline]
fn vnni_detected() -> bool {
    false
}

/// See [`super::encode_row`]. Quantizing is done once per token and row and is not on the
/// attention path, so it is the scalar code (which also keeps the bytes identical).
#[inline]
pub fn encode_row(_token: Avx2, format: KvFormat, src: &[f32], dst: &mut [u8]) {
    quant_scalar::encode_row(format, src, dst)
}

/// See [`super::decode_row`] (scalar, like [`encode_row`]: only `KvCache::read_row` uses it).
#[inline]
pub fn decode_row(_token: Avx2, format: KvFormat, src: &[u8], dst: &mut [f32]) {
    quant_scalar::decode_row(format, src, dst)
}

/// See [`super::dot_rows`], for the quantized formats (others are ignored).
#[inline]
pub fn dot_rows(
    _token: Avx2,
    format: KvFormat,
    rows: &[u8],
    head_dim: usize,
    queries: &[f32],
    group: usize,
    scores: &mut [f32],
) {
    // SAFETY: the token exists, so the CPU has AVX2, FMA and F16C.
    unsafe { dot_rows_impl(format, rows, head_dim, queries, group, scores) }
}

/// See [`super::accumulate_rows`], for the quantized formats (others are ignored).
#[inline]
pub fn accumulate_rows(
    _token: Avx2,
    format: KvFormat,
    rows: &[u8],
    head_dim: usize,
    weights: &[f32],
    group: usize,
    out: &mut [f32],
) {
    // SAFETY: the token exists, so the CPU has AVX2, FMA and F16C.
    unsafe { accumulate_rows_impl(format, rows, head_dim, weights, group, out) }
}

/// Where the stored rows are and how the arrays are strided.
#[derive(Clone, Copy)]
struct Shape {
    rows: *const u8,
    head_dim: usize,
    row_bytes: usize,
    /// Stride between heads in `scores` / `weights`.
    per_head: usize,
}

/// `-1` eight times then `0` eight times: 8 lanes from `8 - n` are a mask of the first `n`.
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

/// The bfloat16 at `p` as `f32`.
///
/// # Safety
///
/// - `p` must be valid for reading 2 bytes (any alignment).
#[inline(always)]
unsafe fn bf16_at(p: *const u8) -> f32 {
    // SAFETY: the caller vouches for 2 readable bytes.
    let bits = u16::from_le_bytes(core::ptr::read_unaligned(p.cast::<[u8; 2]>()));
    f32::from_bits((bits as u32) << 16)
}

/// `(scale, min)` of group `g` of the row at `row` (`min = 0` for int8).
///
/// # Safety
///
/// - `row` must point at a whole stored row of `head_dim` elements of `FMT`.
#[inline(always)]
unsafe fn params<const FMT: u8>(row: *const u8, head_dim: usize, g: usize) -> (f32, f32) {
    if FMT == I8 {
        // SAFETY: the scale of group `g < groups(head_dim)` lies inside the row.
        (bf16_at(row.add(head_dim + 2 * g)), 0.0)
    } else {
        let at = head_dim.div_ceil(2) + 4 * g;
        // SAFETY: the (scale, min) pair of group `g` lies inside the row.
        (bf16_at(row.add(at)), bf16_at(row.add(at + 2)))
    }
}

/// [`params`] broadcast to 8 lanes, read straight into them: one 4-byte broadcast load and
/// a shift (and a mask for int4's minimum), where converting two scalars and broadcasting
/// them costs two shuffles, the one port Intel cores have for them (int4 values summed
/// exactly: 17.0 to 15.6 ns per token in L1 on a Xeon). The bits are [`params`]'.
///
/// # Safety
///
/// - The CPU must support AVX2.
/// - `row` must point at a whole stored row of `head_dim` elements of `FMT`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn params8<const FMT: u8>(row: *const u8, head_dim: usize, g: usize) -> (__m256, __m256) {
    let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
    if FMT == I8 {
        let at = head_dim + 2 * g;
        if at < 2 {
            // `head_dim` 1: no 2 bytes before the scale to read with it.
            let (sc, mn) = params::<FMT>(row, head_dim, g);
            return (_mm256_set1_ps(sc), _mm256_set1_ps(mn));
        }
        // SAFETY: the 4 bytes that end with the scale of group `g` lie inside the row
        // (`at >= 2`); the scale is their high half.
        let word = core::ptr::read_unaligned(row.add(at - 2).cast::<i32>());
        let word = _mm256_set1_epi32(word);
        (
            _mm256_castsi256_ps(_mm256_and_si256(word, high)),
            _mm256_setzero_ps(),
        )
    } else {
        // SAFETY: the (scale, min) pair of group `g` lies inside the row: scale low, min high.
        let at = head_dim.div_ceil(2) + 4 * g;
        let pair = _mm256_set1_epi32(core::ptr::read_unaligned(row.add(at).cast::<i32>()));
        (
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(pair)),
            _mm256_castsi256_ps(_mm256_and_si256(pair, high)),
        )
    }
}

/// The 8 stored integers of the chunk whose first element byte is at `p` (int8: 8 bytes;
/// int4: 4 bytes), as `f32`.
///
/// # Safety
///
/// - The CPU must support AVX2.
/// - `p` must be valid for reading 8 (int8) or 4 (int4) bytes, any alignment.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ints8<const FMT: u8>(p: *const u8) -> __m256 {
    if FMT == I8 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast())))
    } else {
        let word = _mm256_broadcastd_epi32(_mm_loadu_si32(p));
        let shifted = _mm256_srlv_epi32(word, _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
        _mm256_cvtepi32_ps(_mm256_and_si256(shifted, _mm256_set1_epi32(0x0f)))
    }
}

/// The 16 int4 integers packed in the 8 bytes at `p` (elements in order: low nibble, then
/// high), as two chunks of 8 `f32`: the nibbles are split with a mask and a 16-bit shift,
/// interleaved back into element order as bytes, and each half widened and converted. Two
/// chunks this way cost fewer instructions than two [`ints8`] (whose per-lane variable shift
/// is slow on Zen 1): 8% less time for the int4 values in a standalone copy of the loop.
///
/// # Safety
///
/// - The CPU must support AVX2; `p` must be valid for reading 8 bytes (any alignment).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn int4_pair(p: *const u8) -> [__m256; 2] {
    let nibble = _mm_set1_epi8(0x0f);
    let packed = _mm_loadl_epi64(p.cast());
    let low = _mm_and_si128(packed, nibble);
    let high = _mm_and_si128(_mm_srli_epi16::<4>(packed), nibble);
    let bytes = _mm_unpacklo_epi8(low, high);
    [
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)),
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(bytes, bytes))),
    ]
}

/// Byte offset of the chunk starting at element `d` (a multiple of 8) inside a row.
#[inline(always)]
const fn chunk_offset<const FMT: u8>(d: usize) -> usize {
    if FMT == I8 {
        d
    } else {
        d / 2
    }
}

/// The first `n < 8` stored integers of the chunk at element `d` of the row at `row`, as
/// `f32`, other lanes `0.0`.
///
/// # Safety
///
/// - The CPU must support AVX2.
/// - `row` must point at a whole stored row and `d + n <= head_dim`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ints_partial<const FMT: u8>(row: *const u8, d: usize, n: usize) -> __m256 {
    let bytes = if FMT == I8 { n } else { n.div_ceil(2) };
    let mut buf = [0u8; 8];
    // SAFETY: the `bytes` bytes of the chunk's elements lie in the row; `buf` holds 8.
    core::ptr::copy_nonoverlapping(row.add(chunk_offset::<FMT>(d)), buf.as_mut_ptr(), bytes);
    // An odd `n` for int4 leaves the high nibble of the last byte: mask it off with the lanes.
    _mm256_and_ps(
        ints8::<FMT>(buf.as_ptr()),
        _mm256_castsi256_ps(first_lanes(n)),
    )
}

/// Dequantizes integers: `s·q` or `m + s·q`.
///
/// # Safety
///
/// - The CPU must support AVX2 and FMA.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequant<const FMT: u8>(q: __m256, s: __m256, m: __m256) -> __m256 {
    if FMT == I8 {
        _mm256_mul_ps(q, s)
    } else {
        _mm256_fmadd_ps(q, s, m)
    }
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

/// `[Σa, Σb, Σc, Σd]`.
///
/// # Safety
///
/// - The CPU must support AVX2.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum4(a: __m256, b: __m256, c: __m256, d: __m256) -> __m128 {
    let s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s))
}

// ---------------------------------------------------------------------------------------------
// Dot products.

/// # Safety
///
/// - The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows_impl(
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
    let Some((row_bytes, n_rows)) = geometry(format, rows, head_dim, per_head) else {
        return;
    };
    if heads == 0 {
        return;
    }
    let shape = Shape {
        rows: rows.as_ptr(),
        head_dim,
        row_bytes,
        per_head,
    };
    // From here on `n_rows * row_bytes <= rows.len()`, `heads * head_dim <= queries.len()` and
    // `heads * per_head <= scores.len()`, which is what the block kernels rely on.
    match format {
        KvFormat::Int8 => dot_heads::<I8>(shape, n_rows, queries, heads, scores),
        KvFormat::Int4 => dot_heads::<I4>(shape, n_rows, queries, heads, scores),
        _ => {}
    }
}

/// Splits the heads into runs of at most 4 and each run's rows into register blocks.
///
/// # Safety
///
/// - The CPU must support AVX2, FMA and F16C.
/// - `shape.rows` must be valid for reading `n_rows` rows of `shape.row_bytes` bytes of `FMT`.
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
        // SAFETY: head `h + g` for `g < G <= heads - h` has its query and scores inside the
        // slices (see the contract above).
        let (q, s) = (q.add(h * shape.head_dim), s.add(h * shape.per_head));
        h += match heads - h {
            // Fewer rows per block than the float kernel: each row also holds its scale and
            // minimum in registers, and spilling the accumulators costs more than it saves.
            1 => dot_group::<FMT, 4, 1>(shape, n_rows, q, s),
            2 => dot_group::<FMT, 3, 2>(shape, n_rows, q, s),
            3 => dot_group::<FMT, 2, 3>(shape, n_rows, q, s),
            _ => dot_group::<FMT, 2, 4>(shape, n_rows, q, s),
        };
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

/// Scores of rows `row..row + R` against `G` heads, group by group: the rows' group parameters
/// are read once, each chunk dequantized once and used for all `G` heads.
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
    let rb = shape.row_bytes;
    // SAFETY: `row < n_rows`, so row `row` starts inside the rows slice.
    let base = shape.rows.add(row * rb);
    let mut acc = [[_mm256_setzero_ps(); G]; R];
    for g in 0..quant::groups(head_dim) {
        let d0 = g * GROUP;
        let len = (head_dim - d0).min(GROUP);
        let mut sv = [_mm256_setzero_ps(); R];
        let mut mv = [_mm256_setzero_ps(); R];
        for r in 0..R {
            // SAFETY: row `row + r < n_rows` is whole.
            let (sc, mn) = params::<FMT>(base.add(r * rb), head_dim, g);
            sv[r] = _mm256_set1_ps(sc);
            mv[r] = _mm256_set1_ps(mn);
        }
        let full = d0 + len / 8 * 8;
        let mut d = d0;
        while d < full {
            for (r, acc_r) in acc.iter_mut().enumerate() {
                // SAFETY: `d + 8 <= head_dim`: the chunk lies in row `row + r`, and each query
                // chunk in its head's `head_dim` floats.
                let x = dequant::<FMT>(
                    ints8::<FMT>(base.add(r * rb + chunk_offset::<FMT>(d))),
                    sv[r],
                    mv[r],
                );
                for (h, a) in acc_r.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(x, _mm256_loadu_ps(q.add(h * head_dim + d)), *a);
                }
            }
            d += 8;
        }
        let tail = d0 + len - full;
        if tail > 0 {
            let mask = first_lanes(tail);
            let mut qt = [_mm256_setzero_ps(); G];
            for (h, v) in qt.iter_mut().enumerate() {
                // SAFETY: the `tail` floats from `d` are the end of head `h`'s query.
                *v = _mm256_maskload_ps(q.add(h * head_dim + d), mask);
            }
            for (r, acc_r) in acc.iter_mut().enumerate() {
                // SAFETY: the last `tail` elements of row `row + r`.
                let x = ints_partial::<FMT>(base.add(r * rb), d, tail);
                // Padding lanes are `0 · s + m`; the zero query lanes cancel them (`m` is
                // finite) but NaN/inf parameters from arbitrary bytes must not leak: mask.
                let x = _mm256_and_ps(dequant::<FMT>(x, sv[r], mv[r]), _mm256_castsi256_ps(mask));
                for (a, qv) in acc_r.iter_mut().zip(qt.iter()) {
                    *a = _mm256_fmadd_ps(x, *qv, *a);
                }
            }
        }
    }
    // Reduce the accumulators four at a time in (row, head) order and scatter the sums.
    let mut sums = [0.0f32; 12];
    let n = R * G;
    debug_assert!(n <= sums.len());
    let flat = |i: usize| acc[i / G][i % G];
    let mut i = 0;
    while i + 4 <= n {
        let v = hsum4(flat(i), flat(i + 1), flat(i + 2), flat(i + 3));
        _mm_storeu_ps(sums.as_mut_ptr().add(i), v);
        i += 4;
    }
    while i < n {
        sums[i] = hsum(flat(i));
        i += 1;
    }
    for (i, sum) in sums.iter().take(n).enumerate() {
        // SAFETY: head `i % G` of this run and row `row + i / G < n_rows <= per_head`.
        *s.add((i % G) * shape.per_head + row + i / G) = *sum;
    }
}

// ---------------------------------------------------------------------------------------------
// Weighted sums.

/// # Safety
///
/// - The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn accumulate_rows_impl(
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
    let Some((row_bytes, n_rows)) = geometry(format, rows, head_dim, per_head) else {
        return;
    };
    if heads == 0 {
        return;
    }
    let shape = Shape {
        rows: rows.as_ptr(),
        head_dim,
        row_bytes,
        per_head,
    };
    // From here on `n_rows * row_bytes <= rows.len()`, `heads * per_head <= weights.len()`
    // and `heads * head_dim <= out.len()`.
    match format {
        KvFormat::Int8 => acc_heads::<I8>(shape, n_rows, weights, heads, out),
        KvFormat::Int4 => acc_heads::<I4>(shape, n_rows, weights, heads, out),
        _ => {}
    }
}

/// Splits the heads into runs of at most 3 and `head_dim` into groups.
///
/// # Safety
///
/// - The CPU must support AVX2, FMA and F16C.
/// - `shape.rows` must be valid for reading `n_rows` rows of `FMT`.
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
        // SAFETY: head `h + g` for `g < G <= heads - h` has its weights and output inside the
        // slices.
        let (w, o) = (w.add(h * shape.per_head), o.add(h * shape.head_dim));
        h += match heads - h {
            1 => acc_group::<FMT, 4, 1>(shape, n_rows, w, o),
            2 => acc_group::<FMT, 4, 2>(shape, n_rows, w, o),
            // int8: a whole group per pass (12 accumulators, 3 weights and the chunk fill the
            // 16 registers), which halves the passes' per-row scale and weight work (the int8
            // values took 13.8 ns per token in L1 with 2 chunks, 11.0 with 4, on a Xeon).
            // int4 keeps its scale and minimum in registers too: 2 chunks (4 gained nothing).
            _ if FMT == I8 => acc_group::<FMT, 4, 3>(shape, n_rows, w, o),
            _ => acc_group::<FMT, 2, 3>(shape, n_rows, w, o),
        };
    }
}

/// All of `head_dim` for `G` heads, `C` (2 or 4) chunks of one group at a time, then chunk by
/// chunk; returns `G`.
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
    let head_dim = shape.head_dim;
    let mut d = 0;
    // `8C` divides 32, so a block that starts at a multiple of `8C` stays inside one group.
    while d + 8 * C <= head_dim {
        acc_block::<FMT, C, G>(shape, n_rows, d, 8, w, o);
        d += 8 * C;
    }
    while d + 8 <= head_dim {
        acc_block::<FMT, 1, G>(shape, n_rows, d, 8, w, o);
        d += 8;
    }
    if d < head_dim {
        acc_block::<FMT, 1, G>(shape, n_rows, d, head_dim - d, w, o);
    }
    G
}

/// `out[h][d..d + 8C] += Σ_r w[h][r] · x_r[d..d + 8C]` with the `G × C` output chunks held in
/// registers across all rows; the `C` chunks lie in one group. With `last < 8` (only for
/// `C == 1`) the chunk is partial.
///
/// # Safety
///
/// - As for [`acc_heads`], with `d + 8 * (C - 1) + last <= head_dim`, `1 <= last <= 8` and
///   `d..d + 8C` inside one group.
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
    let g = d / GROUP;
    let partial = last < 8;
    let mask = first_lanes(last);
    let mut acc = [[_mm256_setzero_ps(); C]; G];
    for (h, acc_h) in acc.iter_mut().enumerate() {
        for (c, a) in acc_h.iter_mut().enumerate() {
            // SAFETY: chunk `c` of head `h`'s output; a partial one is masked to `last` lanes.
            let p = o.add(h * head_dim + d + 8 * c);
            *a = if partial {
                _mm256_maskload_ps(p, mask)
            } else {
                _mm256_loadu_ps(p)
            };
        }
    }
    let mut row = shape.rows;
    for r in 0..n_rows {
        // SAFETY: row `r < n_rows` is whole.
        let (sv, mv) = params8::<FMT>(row, head_dim, g);
        let mut wv = [_mm256_setzero_ps(); G];
        for (h, v) in wv.iter_mut().enumerate() {
            // SAFETY: `r < n_rows <= per_head`, inside head `h`'s weights.
            let weight = _mm256_set1_ps(*w.add(h * shape.per_head + r));
            // int8: the scale folds into the weight (`(w·s)·q`); int4 dequantizes the chunk.
            *v = if FMT == I8 {
                _mm256_mul_ps(weight, sv)
            } else {
                weight
            };
        }
        // int4, whole chunks: two at a time from one 8-byte load (see `int4_pair`).
        let mut pair = [_mm256_setzero_ps(); 2];
        for c in 0..C {
            let at = d + 8 * c;
            // SAFETY: chunk `c` lies within the row's elements (`at + last <= head_dim`); an
            // int4 pair starts at an even `c < C` (so chunk `c + 1` is whole too).
            let ints = if partial {
                ints_partial::<FMT>(row, at, last)
            } else if FMT == I4 && C.is_multiple_of(2) {
                if c % 2 == 0 {
                    pair = int4_pair(row.add(at / 2));
                }
                pair[c % 2]
            } else {
                ints8::<FMT>(row.add(chunk_offset::<FMT>(at)))
            };
            let x = if FMT == I8 {
                ints
            } else {
                dequant::<FMT>(ints, sv, mv)
            };
            for (acc_h, wh) in acc.iter_mut().zip(wv.iter()) {
                acc_h[c] = _mm256_fmadd_ps(*wh, x, acc_h[c]);
            }
        }
        // `wrapping_add` so the step past the last row never forms an out-of-bounds pointer.
        row = row.wrapping_add(shape.row_bytes);
    }
    for (h, acc_h) in acc.iter().enumerate() {
        for (c, a) in acc_h.iter().enumerate() {
            // SAFETY: as for the loads above.
            let p = o.add(h * head_dim + d + 8 * c);
            if partial {
                _mm256_maskstore_ps(p, mask, *a);
            } else {
                _mm256_storeu_ps(p, *a);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Weighted sums with integer weights (int4).

/// See [`super::accumulate_rows_int`]; exactly [`accumulate_rows`] where
/// [`quant_scalar::integer_weights`] says no.
#[inline]
pub fn accumulate_rows_int(
    token: Avx2,
    format: KvFormat,
    rows: &[u8],
    head_dim: usize,
    weights: &[f32],
    group: usize,
    out: &mut [f32],
) {
    if !quant_scalar::integer_rows(format, head_dim) || !usable_weights(token, weights) {
        return accumulate_rows(token, format, rows, head_dim, weights, group, out);
    }
    // SAFETY: the token exists, so the CPU has AVX2, FMA and F16C.
    unsafe { acc_int_impl(rows, head_dim, weights, group, out) }
}

/// Whether every weight is finite and `>= 0` (the weight half of
/// [`quant_scalar::integer_weights`]), 8 at a time.
#[inline]
fn usable_weights(_token: Avx2, weights: &[f32]) -> bool {
    // SAFETY: the token exists, so the CPU has AVX2.
    unsafe { usable_weights_impl(weights) }
}

/// # Safety
///
/// - The CPU must support AVX2.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn usable_weights_impl(weights: &[f32]) -> bool {
    let (zero, max) = (_mm256_setzero_ps(), _mm256_set1_ps(f32::MAX));
    let mut chunks = weights.chunks_exact(8);
    let mut ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    for chunk in &mut chunks {
        // SAFETY: 8 floats of `chunk`.
        let w = _mm256_loadu_ps(chunk.as_ptr());
        // Ordered comparisons: NaN fails both.
        let inside = _mm256_and_ps(
            _mm256_cmp_ps::<_CMP_GE_OQ>(w, zero),
            _mm256_cmp_ps::<_CMP_LE_OQ>(w, max),
        );
        ok = _mm256_and_ps(ok, inside);
    }
    _mm256_movemask_ps(ok) == 0xff
        && chunks
            .remainder()
            .iter()
            .all(|&w| (0.0..=f32::MAX).contains(&w))
}

/// # Safety
///
/// - The CPU must support AVX2, FMA and F16C.
/// - `head_dim` must be a non-zero multiple of 32.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn acc_int_impl(
    rows: &[u8],
    head_dim: usize,
    weights: &[f32],
    group: usize,
    out: &mut [f32],
) {
    if group == 0 {
        return;
    }
    debug_assert_eq!(out.len(), group * head_dim);
    let per_head = weights.len() / group;
    let heads = group.min(out.len() / head_dim);
    let Some((row_bytes, n_rows)) = geometry(KvFormat::Int4, rows, head_dim, per_head) else {
        return;
    };
    let shape = Shape {
        rows: rows.as_ptr(),
        head_dim,
        row_bytes,
        per_head,
    };
    // From here on `n_rows * row_bytes <= rows.len()`, `heads * per_head <= weights.len()`
    // and `heads * head_dim <= out.len()`.
    let (w, o) = (weights.as_ptr(), out.as_mut_ptr());
    let mut h = 0;
    while h < heads {
        // SAFETY: heads `h..h + G` with `G <= heads - h` have their weights and output inside
        // the slices.
        let (w, o) = (w.add(h * per_head), o.add(h * head_dim));
        let take = (heads - h).min(3);
        let mut first = 0;
        while first < n_rows {
            let n = (n_rows - first).min(quant_scalar::WEIGHT_ROWS);
            let mut g = 0;
            while g < head_dim / GROUP {
                let groups = (head_dim / GROUP - g).min(4);
                // SAFETY: rows `first..first + n <= n_rows`, heads `h..h + take`, groups
                // `g..g + groups <= head_dim / 32`.
                match take {
                    1 => int4_run::<1>(shape, first, n, g, groups, w, o),
                    2 => int4_run::<2>(shape, first, n, g, groups, w, o),
                    _ => int4_run::<3>(shape, first, n, g, groups, w, o),
                }
                g += groups;
            }
            first += n;
        }
        h += take;
    }
}

/// One run of `n <= 16` rows from `first`, groups `g0..g0 + groups` (at most 4), `G` heads
/// (see [`quant_scalar::accumulate_rows_int`] for the arithmetic): first every group's integer
/// weights (independent chains of a few dozen cycles each, which then overlap), then every
/// group's sums.
///
/// # Safety
///
/// - The CPU must support AVX2, FMA and F16C.
/// - Rows `first..first + n` must be whole stored int4 rows, `1 <= n <= 16`, `groups <= 4`
///   and `g0 + groups <= head_dim / 32` with `head_dim` a multiple of 32; `w` and `o` point at
///   `G` heads' weights (`per_head` apart, rows `first..first + n` inside) and outputs
///   (`head_dim` apart).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn int4_run<const G: usize>(
    shape: Shape,
    first: usize,
    n: usize,
    g0: usize,
    groups: usize,
    w: *const f32,
    o: *mut f32,
) {
    debug_assert!((1..=quant_scalar::WEIGHT_ROWS).contains(&n) && groups <= 4);
    // SAFETY: row `first` is inside the rows (`n >= 1`).
    let base = shape.rows.add(first * shape.row_bytes);
    // SAFETY: rows `first..first + n` of each head's weights are inside them.
    let w = w.add(first);
    let mut weights = [IntWeights::<G>::default(); 4];
    for (i, weights) in weights.iter_mut().enumerate().take(groups) {
        *weights = int4_weights::<G>(shape, base, n, g0 + i, w);
    }
    for (i, weights) in weights.iter().enumerate().take(groups) {
        int4_sums::<G>(shape, base, n, g0 + i, weights, o);
    }
}

/// The integer weights of one run of rows and group, for `G` heads.
#[derive(Clone, Copy)]
struct IntWeights<const G: usize> {
    /// `q[h][r]`: row `r`'s weight for head `h` (0 past the run).
    q: [[u8; 16]; G],
    /// The step each head's integers stand for (lane `h`).
    steps: [f32; 4],
    /// `Σ_r w·(m + 7.5·s) - 7.5·step·Σ_r q` per head (lane `h`).
    min_terms: [f32; 4],
}

impl<const G: usize> Default for IntWeights<G> {
    fn default() -> Self {
        Self {
            q: [[0; 16]; G],
            steps: [0.0; 4],
            min_terms: [0.0; 4],
        }
    }
}

/// [`IntWeights`] of rows `0..n` from `base`, group `g`, heads' weights from `w`.
///
/// # Safety
///
/// - As for [`int4_run`], with `base` at the run's first row and `w` at head 0's weight of it.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn int4_weights<const G: usize>(
    shape: Shape,
    base: *const u8,
    n: usize,
    g: usize,
    w: *const f32,
) -> IntWeights<G> {
    let rb = shape.row_bytes;
    let at = shape.head_dim / 2 + 4 * g;
    let masks = [first_lanes(n.min(8)), first_lanes(n.saturating_sub(8))];
    // The (scale, min) pairs of group `g`, one `u32` per row (zero past `n`), read as integers
    // straight into lanes: through a stack array, the vector loads would wait for the stores
    // to leave the store buffer.
    let word = |i: usize| {
        if i < n {
            // SAFETY: row `i < n` is whole; its pair of group `g` lies inside it.
            core::ptr::read_unaligned(base.add(i * rb + at).cast::<i32>())
        } else {
            0
        }
    };
    let eight = |i: usize| {
        _mm256_setr_epi32(
            word(i),
            word(i + 1),
            word(i + 2),
            word(i + 3),
            word(i + 4),
            word(i + 5),
            word(i + 6),
            word(i + 7),
        )
    };
    let pv = [eight(0), eight(8)];
    let scale = pv.map(|p| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(p)));
    let hi16 = _mm256_set1_epi32(0xffff_0000u32 as i32);
    let min = pv.map(|p| _mm256_castsi256_ps(_mm256_and_si256(p, hi16)));
    // `m + 7.5·s`: the value of a mid-range nibble (a multiply then an add, as in the twin).
    let mid = _mm256_set1_ps(7.5);
    let centre = [0, 1].map(|i| _mm256_add_ps(min[i], _mm256_mul_ps(mid, scale[i])));
    let abs = _mm256_set1_epi32(0x7fff_ffff);
    // Per head (up to 4 slots; unused ones stay zero): `u = w·s`, `|u|` as integers (the
    // largest magnitude is then an integer maximum, NaN above everything, as in the scalar
    // twin), and `w·(m + 7.5·s)` summed in pairs of rows `i` and `i + 8`.
    let mut u = [[_mm256_setzero_ps(); 2]; G];
    let mut mag = [_mm256_setzero_si256(); 4];
    let mut wm = [_mm256_setzero_ps(); 4];
    for h in 0..G {
        // SAFETY: rows `first..first + n` of head `h`; masked lanes are not read, and the
        // second half's pointer is formed with `wrapping_add` as it may lie past the slice.
        // Whole halves take plain loads: a masked load costs several times more on Zen 1
        // (the values kernel took 20.5 ns per token with masked loads throughout, 19.4 so).
        let wh = w.add(h * shape.per_head);
        let half = |i: usize| {
            let p = wh.wrapping_add(8 * i);
            if n >= 8 * (i + 1) {
                _mm256_loadu_ps(p)
            } else {
                _mm256_maskload_ps(p, masks[i])
            }
        };
        let wv = [half(0), half(1)];
        u[h] = [
            _mm256_mul_ps(wv[0], scale[0]),
            _mm256_mul_ps(wv[1], scale[1]),
        ];
        mag[h] = _mm256_max_epi32(
            _mm256_and_si256(_mm256_castps_si256(u[h][0]), abs),
            _mm256_and_si256(_mm256_castps_si256(u[h][1]), abs),
        );
        wm[h] = _mm256_add_ps(
            _mm256_mul_ps(wv[0], centre[0]),
            _mm256_mul_ps(wv[1], centre[1]),
        );
    }
    // The four slots' maxima at once: lane `h` of `amax` is head `h`'s.
    let t0 = _mm256_max_epi32(
        _mm256_unpacklo_epi32(mag[0], mag[1]),
        _mm256_unpackhi_epi32(mag[0], mag[1]),
    );
    let t1 = _mm256_max_epi32(
        _mm256_unpacklo_epi32(mag[2], mag[3]),
        _mm256_unpackhi_epi32(mag[2], mag[3]),
    );
    let t = _mm256_max_epi32(_mm256_unpacklo_epi64(t0, t1), _mm256_unpackhi_epi64(t0, t1));
    let amax = _mm_max_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256::<1>(t));
    // `quant_scalar::weight_scale` for the four: the same floor and the same two divisions.
    let a = _mm_castsi128_ps(_mm_max_epi32(
        amax,
        _mm_set1_epi32(quant_scalar::WEIGHT_FLOOR_BITS as i32),
    ));
    let k = _mm_set1_ps(255.0);
    let (mut inv, mut steps) = ([0.0f32; 4], [0.0f32; 4]);
    // SAFETY: 4 floats into each array.
    _mm_storeu_ps(inv.as_mut_ptr(), _mm_div_ps(k, a));
    _mm_storeu_ps(steps.as_mut_ptr(), _mm_div_ps(a, k));
    // `Σ w·(m + 7.5·s)` of the four, in `quant_scalar::sum16`'s order (its first step, rows `i`
    // and `i + 8`, is done): lanes `i` and `i + 4`, then `i` and `i + 2`, then the two left.
    let x01 = _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(wm[0], wm[1]),
        _mm256_permute2f128_ps::<0x31>(wm[0], wm[1]),
    );
    let x23 = _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(wm[2], wm[3]),
        _mm256_permute2f128_ps::<0x31>(wm[2], wm[3]),
    );
    let (x01, x23) = (_mm256_castps_pd(x01), _mm256_castps_pd(x23));
    let b = _mm256_add_ps(
        _mm256_castpd_ps(_mm256_unpacklo_pd(x01, x23)),
        _mm256_castpd_ps(_mm256_unpackhi_pd(x01, x23)),
    );
    let c = _mm256_add_ps(
        _mm256_shuffle_ps::<0b10_00_10_00>(b, b),
        _mm256_shuffle_ps::<0b11_01_11_01>(b, b),
    );
    // Lane 0: head 0, lane 1: head 2, lane 4: head 1, lane 5: head 3.
    let mut lanes = [0.0f32; 8];
    // SAFETY: 8 floats into `lanes`.
    _mm256_storeu_ps(lanes.as_mut_ptr(), c);
    let mut min_terms = [lanes[0], lanes[4], lanes[1], lanes[5]];
    let mut q = [[0u8; 16]; G];
    for (h, q) in q.iter_mut().enumerate() {
        let invv = _mm256_set1_ps(inv[h]);
        let ints = u[h].map(|x| _mm256_cvtps_epi32(_mm256_mul_ps(x, invv)));
        // Saturating packs in 128-bit halves: rows 0-7 and 8-15 as `i16`, then all 16 as `u8`.
        let words = ints
            .map(|i| _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256::<1>(i)));
        let bytes = _mm_packus_epi16(words[0], words[1]);
        // SAFETY: 16 bytes into `q`.
        _mm_storeu_si128(q.as_mut_ptr().cast(), bytes);
        // `Σ q` over all 16 lanes.
        let sums = _mm_sad_epu8(bytes, _mm_setzero_si128());
        let total = _mm_cvtsi128_si32(_mm_add_epi64(sums, _mm_unpackhi_epi64(sums, sums)));
        min_terms[h] = quant_scalar::centred(min_terms[h], steps[h], total);
    }
    IntWeights {
        q,
        steps,
        min_terms,
    }
}

/// Adds one run's (rows `0..n` from `base`) weighted sums of group `g` to `G` heads' outputs.
///
/// Two rows at a time, their group's 16 bytes of nibbles are interleaved byte by byte, so that
/// each 16-bit lane holds the same byte of both rows; the low and the high nibbles, masked out,
/// meet the two rows' weights (one `u8` each, broadcast as a pair) in `vpmaddubsw`, whose
/// 16-bit lane `j` is then element `2j` (low nibbles) or `2j + 1` (high) of both rows' weighted
/// sum. 16 rows fit 16 bits (see [`quant_scalar::WEIGHT_ROWS`]).
///
/// # Safety
///
/// - As for [`int4_weights`], with `o` at head 0's output.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn int4_sums<const G: usize>(
    shape: Shape,
    base: *const u8,
    n: usize,
    g: usize,
    weights: &IntWeights<G>,
    o: *mut f32,
) {
    let rb = shape.row_bytes;
    let q = &weights.q;
    let nibble = _mm256_set1_epi8(0x0f);
    let mut even = [_mm256_setzero_si256(); G];
    let mut odd = [_mm256_setzero_si256(); G];
    // SAFETY (loop): group `g`'s 16 bytes of nibbles start at byte `16g` of each row.
    let bytes = base.add(16 * g);
    let mut i = 0;
    while i < n {
        let a = _mm_loadu_si128(bytes.add(i * rb).cast());
        let b = if i + 1 < n {
            _mm_loadu_si128(bytes.add((i + 1) * rb).cast())
        } else {
            _mm_setzero_si128()
        };
        let x = _mm256_set_m128i(_mm_unpackhi_epi8(a, b), _mm_unpacklo_epi8(a, b));
        let lo = _mm256_and_si256(x, nibble);
        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(x), nibble);
        for h in 0..G {
            // `q[h][i + 1]` is 0 past `n` (its weight was masked to 0).
            let pair = i16::from_le_bytes([q[h][i], q[h][i + 1]]);
            let wp = _mm256_set1_epi16(pair);
            // Unsigned weights times non-negative nibbles: each pair sum is at most 7,650, and
            // 16 rows' at most 61,200, exact in 16 bits read as unsigned (`vpaddw` wraps).
            even[h] = _mm256_add_epi16(even[h], _mm256_maddubs_epi16(wp, lo));
            odd[h] = _mm256_add_epi16(odd[h], _mm256_maddubs_epi16(wp, hi));
        }
        i += 2;
    }
    for h in 0..G {
        // Lanes back in element order: `e` holds elements 0-7 | 16-23, `f` 8-15 | 24-31.
        let e = _mm256_unpacklo_epi16(even[h], odd[h]);
        let f = _mm256_unpackhi_epi16(even[h], odd[h]);
        let sums = [
            _mm256_cvtepu16_epi32(_mm256_castsi256_si128(e)),
            _mm256_cvtepu16_epi32(_mm256_castsi256_si128(f)),
            _mm256_cvtepu16_epi32(_mm256_extracti128_si256::<1>(e)),
            _mm256_cvtepu16_epi32(_mm256_extracti128_si256::<1>(f)),
        ];
        let step = _mm256_set1_ps(weights.steps[h]);
        let min_term = _mm256_set1_ps(weights.min_terms[h]);
        for (k, sum) in sums.iter().enumerate() {
            // SAFETY: elements `32g + 8k .. + 8` of head `h`'s output.
            let p = o.add(h * shape.head_dim + GROUP * g + 8 * k);
            let add = _mm256_add_ps(min_term, _mm256_mul_ps(step, _mm256_cvtepi32_ps(*sum)));
            _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), add));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Integer dot products against prepared (quantized) queries.

/// See [`super::prepare_queries`]. Done once per work item (a few hundred elements), so it is
/// the scalar code, which also keeps the prepared bytes identical on every path.
#[inline]
pub fn prepare_queries(
    _token: Avx2,
    format: KvFormat,
    head_dim: usize,
    queries: &[f32],
    group: usize,
    prepared: &mut [u8],
) {
    quant_scalar::prepare_queries(format, head_dim, queries, group, prepared)
}

/// See [`super::dot_rows_prepared`], for the quantized formats (others are ignored). The
/// result equals [`quant_scalar::dot_rows_prepared`] bit for bit: the integer sums are exact
/// and the float part is done in the same order (see `quant_scalar::prepared_dot`).
#[inline]
pub fn dot_rows_prepared(
    _token: Avx2,
    format: KvFormat,
    rows: &[u8],
    head_dim: usize,
    prepared: &[u8],
    group: usize,
    scores: &mut [f32],
) {
    // SAFETY: the token exists, so the CPU has AVX2, FMA and F16C.
    unsafe { dot_prepared_impl(format, rows, head_dim, prepared, group, scores) }
}

/// [`dot_rows_prepared`] with `vpdpbusd` for the 8-row tiles; the same bits (the integer
/// sums are exact either way).
#[inline]
pub fn dot_rows_prepared_vnni(
    _token: Vnni,
    format: KvFormat,
    rows: &[u8],
    head_dim: usize,
    prepared: &[u8],
    group: usize,
    scores: &mut [f32],
) {
    // SAFETY: the token exists, so the CPU has AVX2, FMA, F16C and the AVX-512 VNNI set.
    unsafe { dot_prepared_vnni(format, rows, head_dim, prepared, group, scores) }
}

/// Geometry of a prepared dot product.
#[derive(Clone, Copy)]
struct PShape {
    rows: *const u8,
    head_dim: usize,
    row_bytes: usize,
    /// Stride between heads in `scores`.
    per_head: usize,
    /// Bytes of one prepared query row.
    stride: usize,
    /// Groups of 32 elements per row.
    groups: usize,
}

/// # Safety
///
/// - The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_prepared_impl(
    format: KvFormat,
    rows: &[u8],
    head_dim: usize,
    prepared: &[u8],
    group: usize,
    scores: &mut [f32],
) {
    dot_prepared_body::<false>(format, rows, head_dim, prepared, group, scores)
}

/// # Safety
///
/// - The CPU must support AVX2, FMA, F16C, AVX512F, AVX512VL and AVX512_VNNI.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn dot_prepared_vnni(
    format: KvFormat,
    rows: &[u8],
    head_dim: usize,
    prepared: &[u8],
    group: usize,
    scores: &mut [f32],
) {
    dot_prepared_body::<true>(format, rows, head_dim, prepared, group, scores)
}

/// The body of both entry points. It and the functions down to [`pdot_tile`] carry no
/// `#[target_feature]` of their own but are always inlined, so that they are compiled with
/// the features of the entry point they land in (`VNNI` requires the AVX-512 VNNI set).
///
/// # Safety
///
/// - The CPU must support AVX2, FMA and F16C, and with `VNNI` the AVX-512 VNNI set.
#[inline(always)]
unsafe fn dot_prepared_body<const VNNI: bool>(
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
    let heads = group.min(prepared.len() / stride);
    let Some((row_bytes, n_rows)) = geometry(format, rows, head_dim, per_head) else {
        return;
    };
    if heads == 0 {
        return;
    }
    let shape = PShape {
        rows: rows.as_ptr(),
        head_dim,
        row_bytes,
        per_head,
        stride,
        groups: quant::groups(head_dim),
    };
    // From here on `n_rows * row_bytes <= rows.len()`, `heads * stride <= prepared.len()` and
    // `heads * per_head <= scores.len()`, which is what the block kernels rely on.
    let (q, s) = (prepared.as_ptr(), scores.as_mut_ptr());
    match format {
        KvFormat::Int8 => pdot_heads::<I8, VNNI>(shape, n_rows, q, heads, s),
        KvFormat::Int4 => pdot_heads::<I4, VNNI>(shape, n_rows, q, heads, s),
        _ => {}
    }
}

/// Splits the heads into runs of at most 4 and each run's rows into register blocks.
///
/// # Safety
///
/// - The CPU must support AVX2, FMA and F16C, and with `VNNI` the AVX-512 VNNI set.
/// - `shape.rows` must be valid for reading `n_rows` rows of `shape.row_bytes` bytes of `FMT`.
/// - `q` must be valid for reading `heads * shape.stride` bytes, `s` for writing
///   `heads * shape.per_head` floats, and `n_rows <= shape.per_head`.
#[inline(always)]
unsafe fn pdot_heads<const FMT: u8, const VNNI: bool>(
    shape: PShape,
    n_rows: usize,
    q: *const u8,
    heads: usize,
    s: *mut f32,
) {
    let mut h = 0;
    while h < heads {
        // SAFETY: head `h + g` for `g < G <= heads - h` has its prepared row and scores inside
        // the buffers (see the contract above).
        let (q, s) = (q.add(h * shape.stride), s.add(h * shape.per_head));
        h += match heads - h {
            1 => pdot_group::<FMT, 4, 1, VNNI>(shape, n_rows, q, s),
            2 => pdot_group::<FMT, 3, 2, VNNI>(shape, n_rows, q, s),
            3 => pdot_group::<FMT, 2, 3, VNNI>(shape, n_rows, q, s),
            _ => pdot_group::<FMT, 2, 4, VNNI>(shape, n_rows, q, s),
        };
    }
}

/// All `n_rows` rows against `G` prepared heads; returns `G`. With every group whole
/// (`head_dim` a multiple of 32) rows go 8 at a time through [`pdot_tile`], the rest `R` at a
/// time through [`pdot_block`]; both give the same bits.
///
/// # Safety
///
/// - As for [`pdot_heads`], with `q` / `s` pointing at the first of `G` heads.
#[inline(always)]
unsafe fn pdot_group<const FMT: u8, const R: usize, const G: usize, const VNNI: bool>(
    shape: PShape,
    n_rows: usize,
    q: *const u8,
    s: *mut f32,
) -> usize {
    let mut r = 0;
    if shape.head_dim.is_multiple_of(GROUP) {
        while r + 8 <= n_rows {
            pdot_tile::<FMT, G, VNNI>(shape, r, q, s);
            r += 8;
        }
    }
    while r + R <= n_rows {
        pdot_block::<FMT, R, G>(shape, r, q, s);
        r += R;
    }
    while r < n_rows {
        pdot_block::<FMT, 1, G>(shape, r, q, s);
        r += 1;
    }
    G
}

/// The little-endian `f32` at `p`.
///
/// # Safety
///
/// - `p` must be valid for reading 4 bytes (any alignment).
#[inline(always)]
unsafe fn f32_at(p: *const u8) -> f32 {
    // SAFETY: the caller vouches for 4 readable bytes.
    f32::from_le_bytes(core::ptr::read_unaligned(p.cast::<[u8; 4]>()))
}

/// The 4 bytes at `p` in all 8 lanes.
///
/// # Safety
///
/// - The CPU must support AVX2; `p` must be valid for reading 4 bytes (any alignment).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn broadcast4(p: *const u8) -> __m256i {
    // SAFETY: the caller vouches for 4 readable bytes.
    _mm256_set1_epi32(core::ptr::read_unaligned(p.cast::<i32>()))
}

/// Exact sum of the 8 `i32` lanes (the caller keeps it from wrapping).
///
/// # Safety
///
/// - The CPU must support AVX2.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// The 16 bytes at `base + r·stride + at` of 8 rows `r`, transposed by 4-byte words: word `j`
/// of row `r` lands in lane `r` of register `j` (rows 0–3 in the low half, 4–7 in the high
/// half: 4 loads into halves and a 4×4 transpose inside each half, no lane-crossing shuffle).
///
/// # Safety
///
/// - The CPU must support AVX2.
/// - `base + r·stride + at` must be valid for reading 16 bytes for every `r < 8`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn transpose8x4(base: *const u8, stride: usize, at: usize) -> [__m256i; 4] {
    // SAFETY (loads): rows `i` and `i + 4 < 8` have 16 readable bytes at `at`.
    let load = |i: usize| {
        let low = _mm_loadu_si128(base.add(i * stride + at).cast());
        let high = _mm_loadu_si128(base.add((i + 4) * stride + at).cast());
        _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(low), high)
    };
    let (a0, a1, a2, a3) = (load(0), load(1), load(2), load(3));
    let (t0, t1) = (_mm256_unpacklo_epi32(a0, a1), _mm256_unpackhi_epi32(a0, a1));
    let (t2, t3) = (_mm256_unpacklo_epi32(a2, a3), _mm256_unpackhi_epi32(a2, a3));
    [
        _mm256_unpacklo_epi64(t0, t2),
        _mm256_unpackhi_epi64(t0, t2),
        _mm256_unpacklo_epi64(t1, t3),
        _mm256_unpackhi_epi64(t1, t3),
    ]
}

/// [`params`] of group `g` of the 8 rows from `base` (`rb` bytes apart), lane `r` for row
/// `r`: the rows' parameter bytes are read as integers straight into lanes, then widened
/// from bfloat16 there (int8: minima 0).
///
/// # Safety
///
/// - The CPU must support AVX2; the 8 rows must be whole rows of `FMT` with group `g`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_params<const FMT: u8>(
    base: *const u8,
    rb: usize,
    head_dim: usize,
    g: usize,
) -> (__m256, __m256) {
    let at = quant::params_offset(
        if FMT == I8 {
            KvFormat::Int8
        } else {
            KvFormat::Int4
        },
        head_dim,
        g,
    );
    // Row `r`'s bfloat16 scale in the low 16 bits (int4: its minimum in the high 16).
    let word = |r: usize| {
        // SAFETY: the caller vouches for row `r` and its group `g`: 2 (int8) or 4 (int4)
        // parameter bytes at `at`.
        let p = base.add(r * rb + at);
        if FMT == I8 {
            u16::from_le_bytes(core::ptr::read_unaligned(p.cast::<[u8; 2]>())) as i32
        } else {
            i32::from_le_bytes(core::ptr::read_unaligned(p.cast::<[u8; 4]>()))
        }
    };
    let v = _mm256_setr_epi32(
        word(0),
        word(1),
        word(2),
        word(3),
        word(4),
        word(5),
        word(6),
        word(7),
    );
    let hi16 = _mm256_set1_epi32(0xffff_0000u32 as i32);
    (
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v)),
        _mm256_castsi256_ps(_mm256_and_si256(v, hi16)),
    )
}

/// Scores of rows `row..row + 8` against `G` prepared heads, every group whole. Per group the
/// 8 rows' stored integers are transposed in registers ([`transpose8x4`]) so that lane `r`
/// holds row `r`: each 4-byte word of a prepared query is broadcast and multiplied into all 8
/// rows at once (`vpmaddubsw` as in [`pdot_block`], then `vpmaddwd` with ones), and the lanes
/// end as the rows' exact group sums `S_g` with no horizontal reduction. int8 takes the group
/// in two halves of 16 bytes and widens each product pair; int4 loads its 16 packed bytes
/// once, splits low nibbles (even elements, matched with the first 16 prepared bytes) from
/// high ones (odd, the last 16), and sums the whole group's pairs in 16 bits before widening
/// them once. With `VNNI`, each product step is one `vpdpbusd` into `i32` lanes instead (int4:
/// two chains per head, low and high nibbles, added at the end of the group). The rows' scales
/// come straight into lanes ([`tile_params`]). The float part is
/// `quant_scalar::prepared_dot`'s, lane by lane.
///
/// # Safety
///
/// - As for [`pdot_heads`], with `head_dim` a multiple of 32, `row + 8 <= n_rows` and `q` /
///   `s` at the first of `G` heads.
#[inline(always)]
unsafe fn pdot_tile<const FMT: u8, const G: usize, const VNNI: bool>(
    shape: PShape,
    row: usize,
    q: *const u8,
    s: *mut f32,
) {
    let rb = shape.row_bytes;
    let ng = shape.groups;
    // SAFETY: `row + 8 <= n_rows`, so the 8 rows from `row` are whole.
    let base = shape.rows.add(row * rb);
    let ones = _mm256_set1_epi16(1);
    let nibble = _mm256_set1_epi8(0x0f);
    let mut acc = [_mm256_setzero_ps(); G];
    let mut min_terms = [_mm256_setzero_ps(); G];
    for g in 0..ng {
        let d0 = g * GROUP;
        // SAFETY: the 8 rows are whole and group `g < groups` is inside each.
        let (skv, mkv) = tile_params::<FMT>(base, rb, shape.head_dim, g);
        let mut sums = [_mm256_setzero_si256(); G];
        // int4 with VNNI: a second chain of sums per head for the high nibbles, so that each
        // chain is 4 `vpdpbusd` long, not 8 (int4 scores 7.6 → 7.1 ns per token in L1; int8,
        // whose `vpsignb` already spaces its chain out, was slower so: 7.5 → 7.8).
        let mut sums2 = [_mm256_setzero_si256(); G];
        // SAFETY (this block): the group is whole, so its 32 int8 bytes (two halves of 16) or
        // 16 int4 bytes lie in each row; head `h < G` has a whole prepared row of `stride`
        // bytes, 32 of them for group `g` at `d0`.
        if FMT == I8 {
            for half in 0..2 {
                let at = d0 + 16 * half;
                let keys = transpose8x4(base, rb, at);
                let mut abs_keys = keys;
                for k in &mut abs_keys {
                    *k = _mm256_abs_epi8(*k);
                }
                for (h, sum) in sums.iter_mut().enumerate() {
                    let qh = q.add(h * shape.stride + at);
                    for j in 0..4 {
                        let signed = _mm256_sign_epi8(broadcast4(qh.add(4 * j)), keys[j]);
                        *sum = if VNNI {
                            _mm256_dpbusd_epi32(*sum, abs_keys[j], signed)
                        } else {
                            let pairs = _mm256_maddubs_epi16(abs_keys[j], signed);
                            _mm256_add_epi32(*sum, _mm256_madd_epi16(pairs, ones))
                        };
                    }
                }
            }
        } else {
            let packed = transpose8x4(base, rb, d0 / 2);
            let (mut low, mut high) = (packed, packed);
            for j in 0..4 {
                low[j] = _mm256_and_si256(packed[j], nibble);
                high[j] = _mm256_and_si256(_mm256_srli_epi16::<4>(packed[j]), nibble);
            }
            for (h, sum) in sums.iter_mut().enumerate() {
                let qh = q.add(h * shape.stride + d0);
                if VNNI {
                    for j in 0..4 {
                        *sum = _mm256_dpbusd_epi32(*sum, low[j], broadcast4(qh.add(4 * j)));
                        sums2[h] =
                            _mm256_dpbusd_epi32(sums2[h], high[j], broadcast4(qh.add(16 + 4 * j)));
                    }
                    continue;
                }
                // The group's 8 products of pairs per 16-bit lane summed in 16 bits: each is
                // at most 2·15·128 in magnitude, so the total (at most 30,720) is exact, and
                // one `vpmaddwd` per group widens it instead of one per product.
                let mut pairs = _mm256_setzero_si256();
                for j in 0..4 {
                    let even = _mm256_maddubs_epi16(low[j], broadcast4(qh.add(4 * j)));
                    let odd = _mm256_maddubs_epi16(high[j], broadcast4(qh.add(16 + 4 * j)));
                    pairs = _mm256_add_epi16(pairs, _mm256_add_epi16(even, odd));
                }
                *sum = _mm256_madd_epi16(pairs, ones);
            }
        }
        if VNNI && FMT == I4 {
            for h in 0..G {
                sums[h] = _mm256_add_epi32(sums[h], sums2[h]);
            }
        }
        for h in 0..G {
            // SAFETY: the scales and `s_q · Σq` terms follow the groups in head `h`'s row.
            let qh = q.add(h * shape.stride);
            let c = _mm256_mul_ps(_mm256_set1_ps(f32_at(qh.add(ng * GROUP + 4 * g))), skv);
            let term = _mm256_mul_ps(_mm256_cvtepi32_ps(sums[h]), c);
            acc[h] = _mm256_add_ps(acc[h], term);
            if FMT == I4 {
                let w = _mm256_set1_ps(f32_at(qh.add(ng * GROUP + 4 * ng + 4 * g)));
                min_terms[h] = _mm256_add_ps(min_terms[h], _mm256_mul_ps(mkv, w));
            }
        }
    }
    for h in 0..G {
        let score = if FMT == I4 {
            _mm256_add_ps(acc[h], min_terms[h])
        } else {
            acc[h]
        };
        // SAFETY: head `h` of this run, rows `row..row + 8 <= n_rows <= per_head`.
        _mm256_storeu_ps(s.add(h * shape.per_head + row), score);
    }
}

/// The stored integers of group `g` (elements `d0..d0 + len`, `d0 = 32g`) of the row at `row`
/// as 32 bytes in the order of a prepared query group: int8 `i8` in element order; int4 the
/// low nibbles (even elements) then the high ones (odd elements), as `0..=15`. A partial
/// group (`len < 32`) is read through a zero-padded copy; its padding lanes meet zero query
/// lanes, so whatever they hold contributes 0.
///
/// # Safety
///
/// - The CPU must support AVX2.
/// - `row` must point at a whole stored row of `FMT`, `d0 + len <= head_dim`, `1 <= len <= 32`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn key_group<const FMT: u8>(row: *const u8, d0: usize, len: usize) -> __m256i {
    if FMT == I8 {
        if len == GROUP {
            // SAFETY: the 32 element bytes of the group lie in the row.
            _mm256_loadu_si256(row.add(d0).cast())
        } else {
            let mut buf = [0u8; GROUP];
            // SAFETY: the `len` element bytes of the group lie in the row; `buf` holds 32.
            core::ptr::copy_nonoverlapping(row.add(d0), buf.as_mut_ptr(), len);
            _mm256_loadu_si256(buf.as_ptr().cast())
        }
    } else {
        let packed = if len == GROUP {
            // SAFETY: the 16 nibble bytes of the group lie in the row.
            _mm_loadu_si128(row.add(d0 / 2).cast())
        } else {
            let mut buf = [0u8; GROUP / 2];
            // SAFETY: the `ceil(len / 2)` nibble bytes of the group lie in the row.
            core::ptr::copy_nonoverlapping(row.add(d0 / 2), buf.as_mut_ptr(), len.div_ceil(2));
            _mm_loadu_si128(buf.as_ptr().cast())
        };
        let both = _mm256_set_m128i(_mm_srli_epi16::<4>(packed), packed);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
    }
}

/// Scores of rows `row..row + R` against `G` prepared heads, row by row. Per group of 32
/// elements: the rows' 32 stored integers are loaded once (int8: also `|k|`), and for each head
/// `vpmaddubsw` (int8: `|k|` unsigned × `sign(q, k)` signed, exact even for a stray `-128`;
/// int4: nibbles unsigned × `q` signed) then `vpmaddwd` with ones give 8 `i32` lane sums of 4
/// products each (at most `2·128·127` per 16-bit pair: no saturation), reduced exactly to the
/// group sum `S_g`; the float part is that of `quant_scalar::prepared_dot`.
///
/// # Safety
///
/// - As for [`pdot_heads`], with `row + R <= n_rows` and `q` / `s` at the first of `G` heads.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pdot_block<const FMT: u8, const R: usize, const G: usize>(
    shape: PShape,
    row: usize,
    q: *const u8,
    s: *mut f32,
) {
    let head_dim = shape.head_dim;
    let rb = shape.row_bytes;
    let ng = shape.groups;
    // SAFETY: `row < n_rows`, so row `row` starts inside the rows slice.
    let base = shape.rows.add(row * rb);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[0.0f32; G]; R];
    let mut min_terms = [[0.0f32; G]; R];
    for g in 0..ng {
        let d0 = g * GROUP;
        let len = (head_dim - d0).min(GROUP);
        let mut keys = [_mm256_setzero_si256(); R];
        let mut abs_keys = [_mm256_setzero_si256(); R];
        let mut sk = [0.0f32; R];
        let mut mk = [0.0f32; R];
        for r in 0..R {
            // SAFETY: row `row + r < n_rows` is whole and group `g` is inside it.
            let p = base.add(r * rb);
            (sk[r], mk[r]) = params::<FMT>(p, head_dim, g);
            keys[r] = key_group::<FMT>(p, d0, len);
            if FMT == I8 {
                abs_keys[r] = _mm256_abs_epi8(keys[r]);
            }
        }
        for h in 0..G {
            // SAFETY: head `h < G` has a whole prepared row of `stride` bytes: 32 bytes per
            // group, then the scales, then the `s_q · Σq` terms.
            let qh = q.add(h * shape.stride);
            let qv = _mm256_loadu_si256(qh.add(d0).cast());
            let sq = f32_at(qh.add(ng * GROUP + 4 * g));
            let w = if FMT == I4 {
                f32_at(qh.add(ng * GROUP + 4 * ng + 4 * g))
            } else {
                0.0
            };
            for r in 0..R {
                let pairs = if FMT == I8 {
                    _mm256_maddubs_epi16(abs_keys[r], _mm256_sign_epi8(qv, keys[r]))
                } else {
                    _mm256_maddubs_epi16(keys[r], qv)
                };
                let exact = hsum_i32(_mm256_madd_epi16(pairs, ones));
                acc[r][h] += exact as f32 * (sq * sk[r]);
                if FMT == I4 {
                    min_terms[r][h] += mk[r] * w;
                }
            }
        }
    }
    for r in 0..R {
        for h in 0..G {
            let score = if FMT == I4 {
                acc[r][h] + min_terms[r][h]
            } else {
                acc[r][h]
            };
            // SAFETY: head `h` of this run and row `row + r < n_rows <= per_head`.
            *s.add(h * shape.per_head + row + r) = score;
        }
    }
}
