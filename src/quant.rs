//! Quantized row formats: [`KvFormat::Int8`] and [`KvFormat::Int4`].
//!
//! Both split a row of `head_dim` elements into *groups* of [`GROUP`] = 32 consecutive elements
//! along `head_dim` (the last group holds the remaining `head_dim % 32` elements when that is not
//! zero, so every `head_dim >= 1` is supported). Each group has its own parameters, stored as
//! bfloat16 after all the elements of the row (a row stays self-contained, see
//! [`crate::format`]). bfloat16 has the exponent range of `f32`, so a scale for values up to
//! 1e30 and beyond never overflows, at 2 bytes; its 8-bit significand only costs precision in
//! the *parameters*, which the encoder absorbs: it rounds the scale **up** (and the int4 minimum
//! **down**) to bfloat16 first and then quantizes against the stored values, so the
//! round-trip error stays within half a step of the *stored* scale.
//!
//! # int8: symmetric, one scale per group
//!
//! `x ≈ s · q`, `q ∈ -127..=127` (two's complement `i8`; `-128` is never written),
//! `s = max|x| / 127` rounded up to bfloat16 (`0` for an all-zero group).
//!
//! ```text
//! byte:  0      1            D-1    D         D+2            D+2·(G-1)
//!        [q0:i8][q1:i8] ... [qD-1]  [s0:bf16] [s1:bf16] ...  [sG-1:bf16]
//!        └──── D bytes, element d at byte d ┘ └─ G = ceil(D/32) scales, little-endian ─┘
//! row bytes = D + 2·ceil(D/32)        (head_dim 64: 68 bytes = 0.53× of f16)
//! ```
//!
//! # int4: asymmetric, scale and minimum per group
//!
//! `x ≈ m + s · q`, `q ∈ 0..=15`, `m = min(x)` rounded down to bfloat16,
//! `s = (max(x) - m) / 15` rounded up to bfloat16 (`0` for a constant group: then `x = m` is
//! exact whenever the constant is a bfloat16, and within half a step otherwise).
//! Elements `2i` and `2i + 1` share byte `i`: `2i` in the low nibble, `2i + 1` in the high one
//! (for an odd `head_dim` the last high nibble is `0`). Groups are 32 elements = 16 bytes, so no
//! byte straddles two groups.
//!
//! ```text
//! byte:  0               1                   P-1        P         P+2       P+4
//!        [q1<<4 | q0]    [q3<<4 | q2]  ...   [..]       [s0:bf16] [m0:bf16] [s1:bf16][m1:bf16]…
//!        └── P = ceil(D/2) bytes of nibbles ──┘         └── G = ceil(D/32) (scale, min) pairs ──┘
//! row bytes = ceil(D/2) + 4·ceil(D/32)  (head_dim 64: 40 bytes = 0.31× of f16)
//! ```
//!
//! # int4 keys: per-channel offsets (in the cache)
//!
//! Keys share a large component across tokens (per channel, a mean that is most of their
//! energy: 62% on SmolLM2-135M), which a per-token group has to span with its 16 levels. The
//! cache therefore stores int4 *keys* as `x - μ`, with `μ` one `f32` offset per (sequence,
//! layer, KV head, channel), in the basis the rows are stored in (rotated, see below), fixed
//! by the sequence's first write to the layer: the mean of that write's keys
//! ([`crate::KvCache::key_offsets`]). The row format is unchanged (the encoder is
//! [`encode_int4_shifted`]); a read adds `μ` back, and attention needs nothing: `μ` adds the
//! same `q·μ` to every score of a query, which softmax ignores. Values (whose weighted sum
//! would need `μ` back) are stored without offsets. The cache also keeps each sequence's
//! first key (position 0, the attention sink) exact next to `μ` and uses it instead of that
//! int4 row in attention and reads; for int4 values it keeps the first value exact the same
//! way (attention adds the first row's weight times its exact-minus-stored difference). A key read back from the cache is within
//! half a step of `x - μ` as rounded to `f32`, plus the `f32` rounding of adding `μ` back (and
//! of the inverse rotation).
//!
//! # Range
//!
//! Inputs are saturated to `±2^126` (≈ 8.5e37) before quantizing so that every dequantized
//! value (`s·q`, `m + s·q`) is finite; below that the error bound holds for every finite
//! input. NaN encodes as `0` and `±inf` as `±2^126`: the kernels never panic on them, but the
//! cache refuses them before they get here ([`crate::Error::NonFinite`]). int4 rows the cache
//! stores rotated (see [`rotated`]) saturate their inputs at `±2^118` instead
//! ([`ROTATION_INPUT_LIMIT`]), so that the rotation's sums stay finite.
//!
//! # Why groups of 32 with bfloat16 parameters
//!
//! For `head_dim` a multiple of 32, a group-of-32 int8 row costs exactly what one `f32` scale
//! per row would (`2 · D/32 = 4` bytes at `D = 64`) while an outlier only coarsens the step of
//! its own 32 elements; for int4 the (scale, min) pair per 32 elements keeps the row at
//! `0.31×` of f16. The exact kernels dequantize 8 elements at a time in registers
//! (`q · s` is exact in `f32`: at most 4 + 8 or 7 + 8 significant bits), exact arithmetic on
//! the dequantized values up to `f32` summation. Attention instead meets int8 / int4 keys with
//! a query quantized to int8 per 32 elements ([`prepare_query`]) and int4 values with softmax
//! weights rounded to 8 bits per 16-row block (`kernels::accumulate_rows_int`); both errors
//! are bounded and tested against f64 oracles.

use crate::format::KvFormat;
use crate::half::bf16_to_f32;

/// Elements per quantization group (along `head_dim`).
pub const GROUP: usize = 32;

/// Largest magnitude stored unsaturated: `2^126`.
pub const SATURATE: f32 = 8.507_059e37;

/// Number of groups in a row of `head_dim` elements: `ceil(head_dim / 32)`.
#[inline]
pub const fn groups(head_dim: usize) -> usize {
    head_dim.div_ceil(GROUP)
}

/// Bytes of one int8 row: `head_dim + 2·ceil(head_dim/32)`; `None` on overflow.
#[inline]
pub const fn int8_row_bytes(head_dim: usize) -> Option<usize> {
    head_dim.checked_add(2 * groups(head_dim))
}

/// Bytes of one int4 row: `ceil(head_dim/2) + 4·ceil(head_dim/32)`; `None` on overflow.
#[inline]
pub const fn int4_row_bytes(head_dim: usize) -> Option<usize> {
    head_dim.div_ceil(2).checked_add(4 * groups(head_dim))
}

/// Byte offset, inside a row, of the parameters of group `g`: the int8 scale, or the int4
/// (scale, min) pair.
#[inline]
pub const fn params_offset(format: KvFormat, head_dim: usize, g: usize) -> usize {
    match format {
        KvFormat::Int4 => head_dim.div_ceil(2) + 4 * g,
        _ => head_dim + 2 * g,
    }
}

/// The bfloat16 at `row[at..at + 2]` as `f32`; `0.0` if out of bounds.
#[inline]
pub fn read_bf16(row: &[u8], at: usize) -> f32 {
    match row.get(at..at + 2) {
        Some(b) => bf16_to_f32(u16::from_le_bytes([b[0], b[1]])),
        None => 0.0,
    }
}

/// `(scale, min)` of group `g` of a stored row (`min` is `0.0` for int8). Both are `0.0` when
/// the row is too short.
#[inline]
pub fn group_params(format: KvFormat, row: &[u8], head_dim: usize, g: usize) -> (f32, f32) {
    let at = params_offset(format, head_dim, g);
    match format {
        KvFormat::Int4 => (read_bf16(row, at), read_bf16(row, at + 2)),
        _ => (read_bf16(row, at), 0.0),
    }
}

/// The stored integer `q` of element `d` (`i8` for int8, `0..=15` for int4); `0` when the row is
/// too short.
#[inline]
pub fn stored_q(format: KvFormat, row: &[u8], d: usize) -> i32 {
    match format {
        KvFormat::Int4 => match row.get(d / 2) {
            Some(&b) => ((b >> ((d & 1) * 4)) & 0x0f) as i32,
            None => 0,
        },
        _ => row.get(d).map_or(0, |&b| b as i8 as i32),
    }
}

/// Element `d` of a stored int8 / int4 row of `head_dim` elements, dequantized exactly as the
/// kernels do: `s·q` (int8) or `m + s·q` (int4, one rounding: `s·q` is exact).
#[inline]
pub fn element(format: KvFormat, row: &[u8], head_dim: usize, d: usize) -> f32 {
    let (s, m) = group_params(format, row, head_dim, d / GROUP);
    let q = stored_q(format, row, d) as f32;
    match format {
        KvFormat::Int4 => m + s * q,
        _ => s * q,
    }
}

/// bfloat16 bits of the smallest bfloat16 `>= x` (`x` finite and `>= 0`).
#[inline]
fn bf16_up(x: f32) -> u16 {
    let bits = x.to_bits();
    let top = (bits >> 16) as u16;
    if bits & 0xffff != 0 {
        top + 1
    } else {
        top
    }
}

/// bfloat16 bits of the largest bfloat16 `<= x` (`x` finite).
#[inline]
fn bf16_down(x: f32) -> u16 {
    let bits = x.to_bits();
    let top = (bits >> 16) as u16;
    if bits & 0xffff != 0 && x < 0.0 {
        // Truncating a negative value rounds it towards zero, i.e. up: one more step down.
        top + 1
    } else {
        top
    }
}

/// The smallest `f32 >= x` for `x >= 0` given in `f64`.
#[inline]
fn f32_up(x: f64) -> f32 {
    let y = x as f32;
    if (y as f64) < x {
        f32::from_bits(y.to_bits() + 1)
    } else {
        y
    }
}

/// Input value clamped to the stored range (NaN → 0).
#[inline]
fn sanitize(x: f32) -> f32 {
    if x.is_nan() {
        0.0
    } else {
        x.clamp(-SATURATE, SATURATE)
    }
}

/// Round half away from zero, for `|v| < 2^31` (no `f64::round` without `std`).
#[inline]
fn round_i32(v: f64) -> i32 {
    if v >= 0.0 {
        (v + 0.5) as i32
    } else {
        -((-v + 0.5) as i32)
    }
}

/// Quantizes `src` (one row, `head_dim = src.len()`) to int8. `dst.len()` must be
/// [`int8_row_bytes`]`(src.len())`; if it is shorter nothing is written.
pub fn encode_int8(src: &[f32], dst: &mut [u8]) {
    let head_dim = src.len();
    match int8_row_bytes(head_dim) {
        Some(n) if n <= dst.len() => {}
        _ => return,
    }
    for (g, chunk) in src.chunks(GROUP).enumerate() {
        let amax = chunk.iter().fold(0.0f32, |m, &x| m.max(sanitize(x).abs()));
        let bits = if amax == 0.0 {
            0
        } else {
            bf16_up(f32_up(amax as f64 / 127.0))
        };
        let s = bf16_to_f32(bits) as f64;
        for (i, &x) in chunk.iter().enumerate() {
            let q = if bits == 0 {
                0
            } else {
                round_i32(sanitize(x) as f64 / s).clamp(-127, 127)
            };
            dst[g * GROUP + i] = q as i8 as u8;
        }
        let at = params_offset(KvFormat::Int8, head_dim, g);
        dst[at..at + 2].copy_from_slice(&bits.to_le_bytes());
    }
}

/// Quantizes `src` (one row, `head_dim = src.len()`) to int4. `dst.len()` must be
/// [`int4_row_bytes`]`(src.len())`; if it is shorter nothing is written.
pub fn encode_int4(src: &[f32], dst: &mut [u8]) {
    encode_int4_shifted(src, |_| 0.0, dst);
}

/// [`encode_int4`] of the row `src[d] - offset(d)` (the subtraction in `f32`, then sanitized
/// like any input): the cache stores int4 keys minus their per-channel offsets this way
/// ([`crate::KvCache::key_offsets`]).
pub fn encode_int4_shifted(src: &[f32], offset: impl Fn(usize) -> f32, dst: &mut [u8]) {
    let head_dim = src.len();
    match int4_row_bytes(head_dim) {
        Some(n) if n <= dst.len() => {}
        _ => return,
    }
    let value = |d: usize| sanitize(src[d] - offset(d));
    for (g, chunk) in src.chunks(GROUP).enumerate() {
        let first = g * GROUP;
        let (lo, hi) =
            (first..first + chunk.len()).fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), d| {
                let x = value(d);
                (lo.min(x), hi.max(x))
            });
        let m_bits = bf16_down(lo);
        let m = bf16_to_f32(m_bits) as f64;
        // In f64 `hi - m` cannot overflow; `/ 15` brings it back into f32 range.
        let range = hi as f64 - m;
        let s_bits = if range <= 0.0 {
            0
        } else {
            bf16_up(f32_up(range / 15.0))
        };
        let s = bf16_to_f32(s_bits) as f64;
        for d in first..first + chunk.len() {
            let q = if s_bits == 0 {
                0
            } else {
                round_i32((value(d) as f64 - m) / s).clamp(0, 15)
            };
            let byte = &mut dst[d / 2];
            if d % 2 == 0 {
                *byte = q as u8;
            } else {
                *byte |= (q as u8) << 4;
            }
        }
        let at = params_offset(KvFormat::Int4, head_dim, g);
        dst[at..at + 2].copy_from_slice(&s_bits.to_le_bytes());
        dst[at + 2..at + 4].copy_from_slice(&m_bits.to_le_bytes());
    }
}

/// Dequantizes one int8 or int4 row into `dst` (`head_dim = dst.len()`); if `src` is shorter
/// than the row, `dst` is left unchanged.
pub fn decode(format: KvFormat, src: &[u8], dst: &mut [f32]) {
    let head_dim = dst.len();
    match format.row_bytes(head_dim) {
        Some(n) if n <= src.len() => {}
        _ => return,
    }
    for (d, out) in dst.iter_mut().enumerate() {
        *out = element(format, src, head_dim, d);
    }
}

// ---------------------------------------------------------------------------------------------
// Prepared (quantized) queries for the integer dot products.

/// Bytes of one *prepared* query row of `head_dim` elements for dot products against int8 or
/// int4 keys ([`crate::kernels::prepare_queries`]): with `G = ceil(head_dim / 32)`,
///
/// ```text
/// byte:  0                         32·G            32·G + 4·G
///        [q: i8 × 32 per group]    [s_q: f32 × G]  [w: f32 × G]
/// ```
///
/// - `q`: the query quantized per group of 32 elements, `x ≈ s_q · q`, `q ∈ -127..=127`,
///   zero-padded past `head_dim` (padding lanes contribute exactly 0 to the integer sums).
///   For int8 keys group `g` holds elements `32g..32g + 32` in order; for int4 keys it holds the
///   even elements `32g, 32g + 2, …, 32g + 30` then the odd ones (the order in which the
///   kernel unpacks a group's nibbles: low nibbles, then high nibbles).
/// - `s_q`: the group's query scale, little-endian `f32`: the smallest `f32 >= max|x| / 127`
///   (`0` for an all-zero group), so `|x - s_q·q| <= s_q / 2` for every element.
/// - `w`: `s_q · Σ q` over the group, little-endian `f32` (used by int4 for the `m · Σ x`
///   term; written for int8 too).
///
/// `None` on overflow.
#[inline]
pub const fn prepared_row_bytes(head_dim: usize) -> Option<usize> {
    groups(head_dim).checked_mul(GROUP + 8)
}

/// Position, inside its group's 32 bytes of a prepared query row, of element `i` (`i < 32`) of
/// the group: `i` for int8, even elements first then odd ones for int4.
#[inline]
pub const fn prepared_position(format: KvFormat, i: usize) -> usize {
    match format {
        KvFormat::Int4 => (i & 1) * 16 + i / 2,
        _ => i,
    }
}

/// Element of a group for position `t < 32` of a prepared group (inverse of
/// [`prepared_position`]).
#[inline]
pub const fn prepared_element(format: KvFormat, t: usize) -> usize {
    match format {
        KvFormat::Int4 => {
            if t < 16 {
                2 * t
            } else {
                2 * (t - 16) + 1
            }
        }
        _ => t,
    }
}

/// Little-endian `f32` at `bytes[at..at + 4]`; `0.0` if out of bounds.
#[inline]
pub fn read_f32(bytes: &[u8], at: usize) -> f32 {
    match bytes.get(at..at + 4) {
        Some(b) => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        None => 0.0,
    }
}

/// Quantizes one query row (`head_dim = query.len()`) into `dst` in the layout of
/// [`prepared_row_bytes`] for keys stored as `format` (int8 or int4; other formats write
/// nothing). If `dst` is shorter than a prepared row nothing is written. Inputs are sanitized
/// like stored rows (NaN → 0, clamped to `±2^126`).
pub fn prepare_query(format: KvFormat, query: &[f32], dst: &mut [u8]) {
    let head_dim = query.len();
    if format.is_float() {
        return;
    }
    let ng = groups(head_dim);
    let dst = match prepared_row_bytes(head_dim) {
        Some(n) if n <= dst.len() => &mut dst[..n],
        _ => return,
    };
    dst[..ng * GROUP].fill(0);
    for (g, chunk) in query.chunks(GROUP).enumerate() {
        let amax = chunk.iter().fold(0.0f32, |m, &x| m.max(sanitize(x).abs()));
        let s = if amax == 0.0 {
            0.0
        } else {
            f32_up(amax as f64 / 127.0)
        };
        let mut sum = 0i32;
        for (i, &x) in chunk.iter().enumerate() {
            let q = if s == 0.0 {
                0
            } else {
                round_i32(sanitize(x) as f64 / s as f64).clamp(-127, 127)
            };
            sum += q;
            dst[g * GROUP + prepared_position(format, i)] = q as i8 as u8;
        }
        let at = ng * GROUP + 4 * g;
        dst[at..at + 4].copy_from_slice(&s.to_le_bytes());
        let at = ng * GROUP + 4 * ng + 4 * g;
        dst[at..at + 4].copy_from_slice(&(s * sum as f32).to_le_bytes());
    }
}

/// Element `d` of a prepared query row (see [`prepared_row_bytes`]) dequantized exactly, in
/// `f64`: `s_q · q` (`0.0` when the row is too short).
pub fn prepared_value(format: KvFormat, prepared: &[u8], head_dim: usize, d: usize) -> f64 {
    let ng = groups(head_dim);
    let (g, i) = (d / GROUP, d % GROUP);
    let q = prepared
        .get(g * GROUP + prepared_position(format, i))
        .map_or(0, |&b| b as i8);
    read_f32(prepared, ng * GROUP + 4 * g) as f64 * q as f64
}

/// Largest `head_dim` whose int4 rows are stored rotated (the rotation works in a stack buffer).
pub const MAX_ROTATED_DIM: usize = 256;

/// Largest input magnitude a stored rotated row keeps, `2^118`: the cache saturates larger
/// finite inputs to it before [`hadamard`], whose unscaled sums reach `MAX_ROTATED_DIM` times
/// the largest input (`2^126`, still finite) before the final scaling.
pub const ROTATION_INPUT_LIMIT: f32 = f32::from_bits((127 + 118) << 23);

/// Whether rows of `format` with `head_dim` elements are stored in the Hadamard-rotated basis:
/// int4 rows whose `head_dim` is a power of two from 2 to [`MAX_ROTATED_DIM`].
///
/// Keys have a few channels far larger than the rest; with one scale per 32 elements those
/// outliers set a coarse step for their whole group, and 4 bits cannot afford that. An
/// orthonormal Hadamard rotation spreads every channel over all of them, so the groups become
/// even and the step fine, while dot products are unchanged (`Hq·Hk = q·k`). The cache rotates
/// a row before quantizing it and rotates it back when reading it; attention rotates the
/// queries once and the weighted value sum once per work item instead of touching the rows.
pub const fn rotated(format: KvFormat, head_dim: usize) -> bool {
    matches!(format, KvFormat::Int4)
        && head_dim.is_power_of_two()
        && head_dim >= 2
        && head_dim <= MAX_ROTATED_DIM
}

/// The orthonormal Walsh–Hadamard transform of `x` in place (`x.len()` a power of two). It is
/// its own inverse. `O(n log n)` additions and one scaling by `1/sqrt(n)`.
pub fn hadamard(x: &mut [f32]) {
    let n = x.len();
    if n < 2 || !n.is_power_of_two() {
        return;
    }
    let mut half = 1;
    while half < n {
        for block in x.chunks_exact_mut(2 * half) {
            let (lo, hi) = block.split_at_mut(half);
            for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                let (sum, difference) = (*a + *b, *a - *b);
                *a = sum;
                *b = difference;
            }
        }
        half *= 2;
    }
    // 1/sqrt(n) for n = 2^k: 2^(-k/2), exact for even k and one rounding for odd k.
    let k = n.trailing_zeros() as i32;
    let mut scale = f32::from_bits(((127 - k / 2) as u32) << 23);
    if k % 2 == 1 {
        scale *= core::f32::consts::FRAC_1_SQRT_2;
    }
    for value in x.iter_mut() {
        *value *= scale;
    }
}

#[cfg(test)]
mod rotation_tests {
    use super::*;

    #[test]
    fn hadamard_is_orthonormal_and_self_inverse() {
        for n in [2usize, 4, 8, 16, 64, 128, 256] {
            let x: std::vec::Vec<f32> =
                (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0).collect();
            let mut y = x.clone();
            hadamard(&mut y);
            let norm = |v: &[f32]| v.iter().map(|a| (*a as f64).powi(2)).sum::<f64>();
            assert!((norm(&x) - norm(&y)).abs() < 1e-4 * norm(&x));
            hadamard(&mut y);
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() < 1e-5, "n {n}: {a} vs {b}");
            }
            // A single outlier channel is spread evenly over all channels.
            let mut spike = std::vec![0.0f32; n];
            spike[n - 1] = 8.0;
            hadamard(&mut spike);
            let expected = 8.0 / (n as f32).sqrt();
            assert!(spike.iter().all(|v| (v.abs() - expected).abs() < 1e-5));
        }
        assert!(
            rotated(KvFormat::Int4, 64)
                && !rotated(KvFormat::Int4, 48)
                && !rotated(KvFormat::Int8, 64)
        );
    }
}
