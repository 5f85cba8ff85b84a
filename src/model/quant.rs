//! Quantized weight matrices (ggml layouts), activation quantization and the matmul kernels.
//!
//! # Layouts
//! A weight matrix is `rows` rows of `cols` elements, row-major; each row is a sequence of
//! blocks with no padding between rows (`row_bytes(cols)` bytes per row):
//!
//! | type | elems/block | bytes/block | block layout | element |
//! |------|-------------|-------------|--------------|---------|
//! | F32  | 1  | 4  | f32 LE | `w` |
//! | F16  | 1  | 2  | IEEE half LE | `w` |
//! | Q8_0 | 32 | 34 | f16 `d`, 32 × i8 `q` | `d·q` |
//! | Q4_0 | 32 | 18 | f16 `d`, 16 bytes: byte `j` low nibble = elem `j`, high = elem `j+16` | `d·(q−8)` |
//! | Q4_1 | 32 | 20 | f16 `d`, f16 `m`, 16 bytes as Q4_0 | `d·q + m` |
//!
//! # Activations
//! Quantized weights are multiplied with activations quantized like llama.cpp's Q8_1:
//! [`QuantizedActivations`] holds, per token and per block of 32, `d = max|x| / 127` (kept at
//! f16 precision, as llama.cpp keeps it), the 32 values `q = round(x / d)` as i8 and
//! `s = d · Σq` (which carries Q4_1's `m` term and Q4_0's `−8` offset). The block dot product is then integer: `Σ w·x ≈ d_w·d_x·Σ q_w·q_x (+ m·s_x)`.
//! Float weights (F32, F16) are multiplied with the `f32` activations directly.
//!
//! # Kernels
//! Every kernel has a scalar twin; the AVX2 (+FMA, F16C) versions are chosen at run time
//! ([`Backend::detect`], detected once), unless the `force-scalar` cargo feature is on or the
//! environment variable `KVCACHE_FORCE_SCALAR=1` is set when the detection runs. The `*_with`
//! functions take an explicit [`Backend`] (tests compare the two).
//!
//! [`matmul`] computes `y[t][r] = W[r] · x[t]` for all tokens: each thread of the pool takes a
//! contiguous range of rows, and each weight row is dotted against a tile of up to
//! [`TOKEN_TILE`] tokens at a time, so prefill is not bound by re-reading the weights; tokens go
//! in passes of about 16 KiB of activations, which stay in L1 while the rows go by. Every
//! output is computed by one thread with an order of operations that does not depend on the
//! thread count nor on the tile a token falls into, so results are bitwise reproducible.

use core::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use super::threads::ThreadPool;
use crate::half::{f16_to_f32, f32_to_f16};

/// Elements per block of the quantized types (and of the quantized activations).
pub const QK: usize = 32;

/// Tokens dotted against one weight row per pass in [`matmul`].
pub const TOKEN_TILE: usize = 4;

/// Why a quantized-weight operation was refused. Nothing was written when it is returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum QuantError {
    /// `cols` is not a multiple of the type's block size.
    ColsNotBlockMultiple {
        /// The weight type.
        ty: WeightType,
        /// Columns asked for.
        cols: usize,
    },
    /// A size computation overflows `usize`.
    SizeOverflow,
    /// The weight data is not exactly `rows · row_bytes(cols)` bytes.
    BadDataLength {
        /// Bytes expected.
        expected: usize,
        /// Bytes given.
        actual: usize,
    },
    /// A slice argument has the wrong length (the argument's name).
    BadShape {
        /// Which argument.
        what: &'static str,
        /// Elements expected.
        expected: usize,
        /// Elements given.
        actual: usize,
    },
    /// A row or token index is out of range.
    OutOfRange {
        /// Which index.
        what: &'static str,
        /// The index given.
        index: usize,
        /// The number of rows / tokens.
        len: usize,
    },
    /// The activations do not suit the weight type: float weights (F32, F16) take `f32`
    /// activations, block types take [`QuantizedActivations`].
    WrongActivations(WeightType),
}

impl fmt::Display for QuantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            QuantError::ColsNotBlockMultiple { ty, cols } => write!(
                f,
                "{cols} columns is not a multiple of the {ty:?} block size {}",
                ty.block_size()
            ),
            QuantError::SizeOverflow => f.write_str("a weight size overflows usize"),
            QuantError::BadDataLength { expected, actual } => {
                write!(f, "weight data is {actual} bytes, expected {expected}")
            }
            QuantError::BadShape {
                what,
                expected,
                actual,
            } => write!(f, "`{what}` has {actual} elements, expected {expected}"),
            QuantError::OutOfRange { what, index, len } => {
                write!(f, "{what} index {index} out of range (len {len})")
            }
            QuantError::WrongActivations(ty) => {
                write!(f, "wrong activation kind for {ty:?} weights")
            }
        }
    }
}

impl std::error::Error for QuantError {}

/// A weight storage type, as ggml numbers and lays it out (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightType {
    /// 32-bit float.
    F32,
    /// IEEE binary16.
    F16,
    /// Blocks of 32: f16 scale, 32 × i8.
    Q8_0,
    /// Blocks of 32: f16 scale, 32 × 4-bit (offset 8).
    Q4_0,
    /// Blocks of 32: f16 scale, f16 min, 32 × 4-bit.
    Q4_1,
}

impl WeightType {
    /// The type for a ggml type id (F32=0, F16=1, Q4_0=2, Q4_1=3, Q8_0=8); `None` for others.
    pub fn from_ggml(id: u32) -> Option<Self> {
        match id {
            0 => Some(WeightType::F32),
            1 => Some(WeightType::F16),
            2 => Some(WeightType::Q4_0),
            3 => Some(WeightType::Q4_1),
            8 => Some(WeightType::Q8_0),
            _ => None,
        }
    }

    /// The ggml type id.
    pub fn ggml_id(self) -> u32 {
        match self {
            WeightType::F32 => 0,
            WeightType::F16 => 1,
            WeightType::Q4_0 => 2,
            WeightType::Q4_1 => 3,
            WeightType::Q8_0 => 8,
        }
    }

    /// Elements per block (1 for the float types).
    pub fn block_size(self) -> usize {
        match self {
            WeightType::F32 | WeightType::F16 => 1,
            _ => QK,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            WeightType::F32 => 4,
            WeightType::F16 => 2,
            WeightType::Q8_0 => 34,
            WeightType::Q4_0 => 18,
            WeightType::Q4_1 => 20,
        }
    }

    /// Whether the type is a block type that takes [`QuantizedActivations`].
    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// Bytes of one row of `cols` elements; `None` when `cols` is not a multiple of the block
    /// size or the size overflows.
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        if !cols.is_multiple_of(self.block_size()) {
            return None;
        }
        (cols / self.block_size()).checked_mul(self.block_bytes())
    }
}

/// A borrowed weight matrix: `rows` rows of `cols` elements of type `ty`, `data` exactly
/// `rows · ty.row_bytes(cols)` bytes.
#[derive(Clone, Copy, Debug)]
pub struct WeightMatrix<'a> {
    /// Storage type.
    pub ty: WeightType,
    /// Output dimension (number of rows).
    pub rows: usize,
    /// Input dimension (elements per row).
    pub cols: usize,
    /// The raw bytes, row-major.
    pub data: &'a [u8],
}

impl<'a> WeightMatrix<'a> {
    /// Checks the shape against the data length (exactly) and wraps it.
    pub fn new(
        ty: WeightType,
        rows: usize,
        cols: usize,
        data: &'a [u8],
    ) -> Result<Self, QuantError> {
        let row_bytes = ty
            .row_bytes(cols)
            .ok_or(if !cols.is_multiple_of(ty.block_size()) {
                QuantError::ColsNotBlockMultiple { ty, cols }
            } else {
                QuantError::SizeOverflow
            })?;
        let expected = row_bytes
            .checked_mul(rows)
            .ok_or(QuantError::SizeOverflow)?;
        if data.len() != expected {
            return Err(QuantError::BadDataLength {
                expected,
                actual: data.len(),
            });
        }
        Ok(WeightMatrix {
            ty,
            rows,
            cols,
            data,
        })
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        // Checked in `new`; fields are public, so recompute defensively.
        self.ty.row_bytes(self.cols).unwrap_or(0)
    }

    /// Re-checks the invariants of `new` (the fields are public and may have been edited).
    fn check(&self) -> Result<usize, QuantError> {
        WeightMatrix::new(self.ty, self.rows, self.cols, self.data).map(|w| w.row_bytes())
    }

    /// The raw bytes of row `r`.
    pub fn row(&self, r: usize) -> Result<&'a [u8], QuantError> {
        let rb = self.check()?;
        if r >= self.rows {
            return Err(QuantError::OutOfRange {
                what: "row",
                index: r,
                len: self.rows,
            });
        }
        Ok(&self.data[r * rb..(r + 1) * rb])
    }

    /// Dequantizes row `r` into `out` (`cols` f32), e.g. for an embedding lookup.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<(), QuantError> {
        let row = self.row(r)?;
        if out.len() != self.cols {
            return Err(QuantError::BadShape {
                what: "out",
                expected: self.cols,
                actual: out.len(),
            });
        }
        dequantize_row_bytes(self.ty, row, out);
        Ok(())
    }
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// Dequantizes one row (`row.len() == ty.row_bytes(out.len())`, checked by the callers).
fn dequantize_row_bytes(ty: WeightType, row: &[u8], out: &mut [f32]) {
    match ty {
        WeightType::F32 => {
            for (o, c) in out.iter_mut().zip(row.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        WeightType::F16 => {
            for (o, c) in out.iter_mut().zip(row.chunks_exact(2)) {
                *o = f16_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        WeightType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(row.chunks_exact(34)) {
                let d = f16_at(b, 0);
                for (v, &q) in o.iter_mut().zip(&b[2..34]) {
                    *v = d * (q as i8) as f32;
                }
            }
        }
        WeightType::Q4_0 | WeightType::Q4_1 => {
            let (bb, off) = if ty == WeightType::Q4_1 {
                (20, 4)
            } else {
                (18, 2)
            };
            for (o, b) in out.chunks_exact_mut(QK).zip(row.chunks_exact(bb)) {
                let d = f16_at(b, 0);
                let (lo, hi) = o.split_at_mut(16);
                for j in 0..16 {
                    let byte = b[off + j];
                    let (q0, q1) = ((byte & 15) as i32, (byte >> 4) as i32);
                    if ty == WeightType::Q4_1 {
                        let m = f16_at(b, 2);
                        lo[j] = d * q0 as f32 + m;
                        hi[j] = d * q1 as f32 + m;
                    } else {
                        lo[j] = d * (q0 - 8) as f32;
                        hi[j] = d * (q1 - 8) as f32;
                    }
                }
            }
        }
    }
}

/// Quantizes `x` (`cols` f32, a multiple of 32) into `ty`'s row layout (`ty.row_bytes(cols)`
/// bytes), the way ggml's reference quantizers do (round to nearest). For tests, benches and
/// tools; not on the inference path.
pub fn quantize_row(ty: WeightType, x: &[f32], out: &mut [u8]) -> Result<(), QuantError> {
    let expected = ty
        .row_bytes(x.len())
        .ok_or(QuantError::ColsNotBlockMultiple { ty, cols: x.len() })?;
    if out.len() != expected {
        return Err(QuantError::BadShape {
            what: "out",
            expected,
            actual: out.len(),
        });
    }
    match ty {
        WeightType::F32 => {
            for (c, v) in out.chunks_exact_mut(4).zip(x) {
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        WeightType::F16 => {
            for (c, v) in out.chunks_exact_mut(2).zip(x) {
                c.copy_from_slice(&f32_to_f16(*v).to_le_bytes());
            }
        }
        WeightType::Q8_0 => {
            for (b, xs) in out.chunks_exact_mut(34).zip(x.chunks_exact(QK)) {
                let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                b[..2].copy_from_slice(&f32_to_f16(d).to_le_bytes());
                for (o, v) in b[2..].iter_mut().zip(xs) {
                    *o = ((v * id).round() as i8) as u8;
                }
            }
        }
        WeightType::Q4_0 => {
            for (b, xs) in out.chunks_exact_mut(18).zip(x.chunks_exact(QK)) {
                // ggml: the signed value of largest magnitude maps to -8.
                let max = xs
                    .iter()
                    .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                b[..2].copy_from_slice(&f32_to_f16(d).to_le_bytes());
                for j in 0..16 {
                    let q0 = ((xs[j] * id + 8.5) as i32).clamp(0, 15) as u8;
                    let q1 = ((xs[j + 16] * id + 8.5) as i32).clamp(0, 15) as u8;
                    b[2 + j] = q0 | (q1 << 4);
                }
            }
        }
        WeightType::Q4_1 => {
            for (b, xs) in out.chunks_exact_mut(20).zip(x.chunks_exact(QK)) {
                let min = xs.iter().fold(f32::INFINITY, |a, &v| a.min(v));
                let max = xs.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                b[..2].copy_from_slice(&f32_to_f16(d).to_le_bytes());
                b[2..4].copy_from_slice(&f32_to_f16(min).to_le_bytes());
                for j in 0..16 {
                    let q0 = (((xs[j] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                    let q1 = (((xs[j + 16] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                    b[4 + j] = q0 | (q1 << 4);
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Backend selection

/// Which kernel family runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Portable scalar kernels (the reference).
    Scalar,
    /// AVX2 + FMA + F16C kernels (x86_64). Falls back to scalar where unavailable.
    Avx2,
}

static DETECTED: AtomicU8 = AtomicU8::new(0);

impl Backend {
    /// The backend used by the functions without `_with`: AVX2 when the CPU has AVX2, FMA and
    /// F16C, unless the `force-scalar` feature is on or `KVCACHE_FORCE_SCALAR=1` was set at the
    /// first call. Detected once and cached.
    pub fn detect() -> Backend {
        match DETECTED.load(Ordering::Relaxed) {
            1 => return Backend::Scalar,
            2 => return Backend::Avx2,
            _ => {}
        }
        let forced = std::env::var_os("KVCACHE_FORCE_SCALAR").is_some_and(|v| v == "1");
        let b = if !forced && Backend::avx2_available() {
            Backend::Avx2
        } else {
            Backend::Scalar
        };
        DETECTED.store(if b == Backend::Avx2 { 2 } else { 1 }, Ordering::Relaxed);
        b
    }

    /// Whether the AVX2 kernels can run here (CPU support, and the `force-scalar` feature off).
    pub fn avx2_available() -> bool {
        #[cfg(all(target_arch = "x86_64", not(feature = "force-scalar")))]
        {
            std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
        }
        #[cfg(not(all(target_arch = "x86_64", not(feature = "force-scalar"))))]
        {
            false
        }
    }

    /// The backend that actually runs when `self` is asked for.
    pub fn effective(self) -> Backend {
        match self {
            Backend::Avx2 if Backend::avx2_available() => Backend::Avx2,
            _ => Backend::Scalar,
        }
    }
}

/// Proof that the AVX2/FMA/F16C kernels may run; only built after detection.
#[derive(Clone, Copy)]
struct Avx2Token(());

impl Avx2Token {
    fn get(backend: Backend) -> Option<Avx2Token> {
        (backend.effective() == Backend::Avx2).then_some(Avx2Token(()))
    }
}

// ---------------------------------------------------------------------------------------------
// Quantized activations

/// Activations quantized per block of 32 (llama.cpp's Q8_1 scheme): for `tokens` rows of
/// `cols` values, `q` is `[tokens][cols]` i8 and `ds` is `[tokens][cols / 32][2]` f32 holding
/// `(d, s)`: `x ≈ d·q`, `s = d·Σq`. As in llama.cpp, `q = round(x / d)` with
/// `d = max|x| / 127` in f32, and `d` is then stored at f16 precision (`s` is computed from
/// the stored `d`).
///
/// Built by [`quantize_activations`], which reuses the buffers (no allocation once they are as
/// large as the largest input seen).
#[derive(Clone, Debug, Default)]
pub struct QuantizedActivations {
    tokens: usize,
    cols: usize,
    /// Distance between two tokens' quants in `q`: `cols` rounded up to whole groups of
    /// [`GROUP`] blocks, the padding zero (the AVX2 Q4 kernels read whole groups).
    stride: usize,
    q: Vec<i8>,
    ds: Vec<f32>,
    /// Per token and group of [`GROUP`] blocks: the blocks' `d` then their `s`
    /// (`[tokens][groups][2][GROUP]`, zero for the padding blocks).
    g: Vec<f32>,
}

/// Blocks per group in the AVX2 Q4 kernels (see [`QuantizedActivations`]).
const GROUP: usize = 4;

impl QuantizedActivations {
    /// Empty; grows on the first [`quantize_activations`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Pre-sized for `tokens × cols` values so later calls up to that size never allocate;
    /// [`QuantError::SizeOverflow`] if that much memory cannot be reserved.
    pub fn with_capacity(tokens: usize, cols: usize) -> Result<Self, QuantError> {
        let n = tokens.checked_mul(cols).ok_or(QuantError::SizeOverflow)?;
        let padded = cols
            .div_ceil(QK * GROUP)
            .checked_mul(QK * GROUP)
            .and_then(|c| c.checked_mul(tokens))
            .ok_or(QuantError::SizeOverflow)?;
        let mut a = QuantizedActivations::default();
        a.q.try_reserve_exact(padded)
            .map_err(|_| QuantError::SizeOverflow)?;
        a.ds.try_reserve_exact(n.div_ceil(QK) * 2)
            .map_err(|_| QuantError::SizeOverflow)?;
        a.g.try_reserve_exact(padded / QK * 2)
            .map_err(|_| QuantError::SizeOverflow)?;
        Ok(a)
    }

    /// Tokens held.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Values per token.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Blocks per token (`cols / 32`).
    pub fn blocks(&self) -> usize {
        self.cols / QK
    }

    /// Token `t`'s quants (`cols` i8), or `None` if `t` is out of range.
    pub fn quants(&self, t: usize) -> Option<&[i8]> {
        (t < self.tokens).then(|| &self.q[t * self.stride..t * self.stride + self.cols])
    }

    /// Token `t`'s `(d, s)` pairs, flattened (`2 · cols / 32` f32), or `None` if out of range.
    pub fn scales(&self, t: usize) -> Option<&[f32]> {
        let n = 2 * self.blocks();
        (t < self.tokens).then(|| &self.ds[t * n..(t + 1) * n])
    }

    /// Writes token `t`'s dequantized values `d·q` into `out` (`cols` f32).
    pub fn dequantize_token(&self, t: usize, out: &mut [f32]) -> Result<(), QuantError> {
        let (q, ds) = self.token(t)?;
        if out.len() != self.cols {
            return Err(QuantError::BadShape {
                what: "out",
                expected: self.cols,
                actual: out.len(),
            });
        }
        for ((o, qb), d) in out
            .chunks_exact_mut(QK)
            .zip(q.chunks_exact(QK))
            .zip(ds.chunks_exact(2))
        {
            for (v, &qi) in o.iter_mut().zip(qb) {
                *v = d[0] * qi as f32;
            }
        }
        Ok(())
    }

    /// Bytes the kernels read per token (quants and scales).
    fn token_bytes(&self) -> usize {
        self.stride + self.stride / QK * 2 * 4
    }

    fn token(&self, t: usize) -> Result<(&[i8], &[f32]), QuantError> {
        match (self.quants(t), self.scales(t)) {
            (Some(q), Some(ds)) => Ok((q, ds)),
            _ => Err(QuantError::OutOfRange {
                what: "token",
                index: t,
                len: self.tokens,
            }),
        }
    }
}

/// Quantizes `x` (`[tokens][cols]` f32, `tokens = x.len() / cols`) into `out`, reusing its
/// buffers. `cols` must be a positive multiple of 32 dividing `x.len()`.
pub fn quantize_activations(
    x: &[f32],
    cols: usize,
    out: &mut QuantizedActivations,
) -> Result<(), QuantError> {
    quantize_activations_with(Backend::detect(), x, cols, out)
}

/// [`quantize_activations`] on an explicit backend (both give bitwise the same result).
pub fn quantize_activations_with(
    backend: Backend,
    x: &[f32],
    cols: usize,
    out: &mut QuantizedActivations,
) -> Result<(), QuantError> {
    quantize_activations_on(backend, x, cols, out, None)
}

/// [`quantize_activations`] with the tokens spread over `pool`'s threads (for many tokens;
/// the same result).
pub fn quantize_activations_pool(
    x: &[f32],
    cols: usize,
    out: &mut QuantizedActivations,
    pool: &ThreadPool,
) -> Result<(), QuantError> {
    quantize_activations_on(Backend::detect(), x, cols, out, Some(pool))
}

fn quantize_activations_on(
    backend: Backend,
    x: &[f32],
    cols: usize,
    out: &mut QuantizedActivations,
    pool: Option<&ThreadPool>,
) -> Result<(), QuantError> {
    if cols == 0 || !cols.is_multiple_of(QK) {
        return Err(QuantError::ColsNotBlockMultiple {
            ty: WeightType::Q8_0,
            cols,
        });
    }
    if !x.len().is_multiple_of(cols) {
        return Err(QuantError::BadShape {
            what: "x",
            expected: (x.len() / cols) * cols,
            actual: x.len(),
        });
    }
    let tokens = x.len() / cols;
    let nblocks = x.len() / QK;
    // Checked even for no tokens: a huge `cols` must not overflow the chunk sizes below.
    let overflow = QuantError::SizeOverflow;
    let stride = cols
        .div_ceil(QK * GROUP)
        .checked_mul(QK * GROUP)
        .ok_or(overflow)?;
    let groups = stride / (QK * GROUP);
    let n = tokens.checked_mul(stride).ok_or(overflow)?;
    let per_token = (stride, 2 * (cols / QK), groups * 2 * GROUP);
    let chunk = |elements: usize| elements.checked_mul(ACT_CHUNK).ok_or(overflow);
    let chunk_sizes = (
        chunk(cols)?,
        chunk(per_token.0)?,
        chunk(per_token.1)?,
        chunk(per_token.2)?,
    );
    out.q.clear();
    out.q.resize(n, 0);
    out.ds.resize(2 * nblocks, 0.0);
    out.g.clear();
    out.g.resize(tokens * groups * 2 * GROUP, 0.0);
    out.tokens = tokens;
    out.cols = cols;
    out.stride = stride;
    let token = Avx2Token::get(backend);
    let chunks = x
        .chunks(chunk_sizes.0)
        .zip(out.q.chunks_mut(chunk_sizes.1))
        .zip(out.ds.chunks_mut(chunk_sizes.2))
        .zip(out.g.chunks_mut(chunk_sizes.3))
        .map(|(((x, q), ds), g)| Mutex::new((x, q, ds, g)));
    match pool {
        Some(pool) if tokens >= 2 * ACT_CHUNK && pool.threads() > 1 => {
            let chunks: Vec<_> = chunks.collect();
            pool.run_tasks(chunks.len(), &|i, _| {
                let mut c = chunks[i].lock().unwrap_or_else(|e| e.into_inner());
                let (x, q, ds, g) = &mut *c;
                quantize_tokens(token, x, cols, per_token, q, ds, g);
            });
        }
        _ => {
            for c in chunks {
                let (x, q, ds, g) = c.into_inner().unwrap_or_else(|e| e.into_inner());
                quantize_tokens(token, x, cols, per_token, q, ds, g);
            }
        }
    }
    Ok(())
}

/// Tokens per task when activations are quantized on the thread pool.
const ACT_CHUNK: usize = 16;

/// Quantizes the tokens of `x` (`cols` each) into their `q`, `ds` and `g` rows
/// (`per_token` = the three rows' lengths).
fn quantize_tokens(
    token: Option<Avx2Token>,
    x: &[f32],
    cols: usize,
    (stride, nds, ng): (usize, usize, usize),
    q: &mut [i8],
    ds: &mut [f32],
    g: &mut [f32],
) {
    for (((xt, qt), dst), gt) in x
        .chunks_exact(cols)
        .zip(q.chunks_exact_mut(stride))
        .zip(ds.chunks_exact_mut(nds))
        .zip(g.chunks_exact_mut(ng))
    {
        for (b, ((xb, qb), ds)) in xt
            .chunks_exact(QK)
            .zip(qt.chunks_exact_mut(QK))
            .zip(dst.chunks_exact_mut(2))
            .enumerate()
        {
            let xb: &[f32; QK] = xb.try_into().expect("chunk of 32");
            let qb: &mut [i8; QK] = qb.try_into().expect("chunk of 32");
            let (d, sum) = match token {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the token exists only when AVX2, FMA and F16C were detected.
                Some(_) => unsafe { avx2::quantize_block(xb, qb) },
                _ => scalar::quantize_block(xb, qb),
            };
            // The scale is kept at f16 precision, as llama.cpp stores it (`q` is computed with
            // the f32 `d`).
            let d = f16_to_f32(f32_to_f16(d));
            let s = d * sum as f32;
            ds[0] = d;
            ds[1] = s;
            let (group, k) = (b / GROUP, b % GROUP);
            gt[group * 2 * GROUP + k] = d;
            gt[group * 2 * GROUP + GROUP + k] = s;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Single dot products (tests, tools)

/// `W[r] · x[t]` for a block-type weight and quantized activations, on `backend`.
pub fn dot_quantized_with(
    backend: Backend,
    w: &WeightMatrix,
    r: usize,
    x: &QuantizedActivations,
    t: usize,
) -> Result<f32, QuantError> {
    check_quantized(w, x)?;
    let row = w.row(r)?;
    x.token(t)?;
    Ok(kernel_quantized(w.ty, Avx2Token::get(backend)).dot_one(row, x, t))
}

/// `W[r] · x` for a float weight (F32, F16) and `f32` activations (`cols` long), on `backend`.
pub fn dot_f32_with(
    backend: Backend,
    w: &WeightMatrix,
    r: usize,
    x: &[f32],
) -> Result<f32, QuantError> {
    check_float(w, x, 1)?;
    let row = w.row(r)?;
    Ok(kernel_float(w.ty, Avx2Token::get(backend)).dot_one(row, x))
}

fn check_quantized(w: &WeightMatrix, x: &QuantizedActivations) -> Result<(), QuantError> {
    w.check()?;
    if !w.ty.is_quantized() {
        return Err(QuantError::WrongActivations(w.ty));
    }
    if x.cols != w.cols {
        return Err(QuantError::BadShape {
            what: "activation cols",
            expected: w.cols,
            actual: x.cols,
        });
    }
    Ok(())
}

fn check_float(w: &WeightMatrix, x: &[f32], tokens: usize) -> Result<(), QuantError> {
    w.check()?;
    if w.ty.is_quantized() {
        return Err(QuantError::WrongActivations(w.ty));
    }
    let expected = tokens.checked_mul(w.cols).ok_or(QuantError::SizeOverflow)?;
    if x.len() != expected {
        return Err(QuantError::BadShape {
            what: "x",
            expected,
            actual: x.len(),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Matmul

/// `out[t][r] = W[r] · x[t]` for a block-type `w` and every token of `x` (`out`:
/// `[x.tokens()][w.rows]` f32), rows split across `pool`'s threads.
pub fn matmul(
    w: &WeightMatrix,
    x: &QuantizedActivations,
    out: &mut [f32],
    pool: &ThreadPool,
) -> Result<(), QuantError> {
    matmul_with(Backend::detect(), w, x, out, pool)
}

/// [`matmul`] on an explicit backend.
pub fn matmul_with(
    backend: Backend,
    w: &WeightMatrix,
    x: &QuantizedActivations,
    out: &mut [f32],
    pool: &ThreadPool,
) -> Result<(), QuantError> {
    check_quantized(w, x)?;
    check_out(w, x.tokens, out)?;
    let k = kernel_quantized(w.ty, Avx2Token::get(backend));
    let (rows, rb, data) = (w.rows, w.row_bytes(), w.data);
    let shared = SharedOut::new(out);
    if x.tokens > 0 && rows > 0 {
        pool.run_tasks(tasks_for(pool, rows), &|i, n| {
            let (r0, r1) = row_range(rows, i, n);
            k.rows(data, rb, rows, r0, r1, x, &shared);
        });
    }
    Ok(())
}

/// [`matmul`] for `N` block-type matrices that share the same activations (Q, K and V; gate
/// and up), in one pass over the thread pool: their rows are split across the threads as one
/// range, so the threads meet once instead of `N` times. Each output is what [`matmul`] gives.
pub fn matmul_many<const N: usize>(
    ws: [&WeightMatrix; N],
    x: &QuantizedActivations,
    outs: [&mut [f32]; N],
    pool: &ThreadPool,
) -> Result<(), QuantError> {
    for (w, out) in ws.iter().zip(outs.iter()) {
        check_quantized(w, x)?;
        check_out(w, x.tokens, out)?;
    }
    let backend = Avx2Token::get(Backend::detect());
    let kernels = ws.map(|w| kernel_quantized(w.ty, backend));
    let shared = outs.map(SharedOut::new);
    let total = ws
        .iter()
        .try_fold(0usize, |sum, w| sum.checked_add(w.rows))
        .ok_or(QuantError::SizeOverflow)?;
    if x.tokens > 0 && total > 0 {
        pool.run_tasks(tasks_for(pool, total), &|i, n| {
            let (start, end) = row_range(total, i, n);
            let mut offset = 0;
            for ((w, k), out) in ws.iter().zip(&kernels).zip(&shared) {
                let (r0, r1) = (
                    start.max(offset) - offset,
                    end.min(offset + w.rows).saturating_sub(offset),
                );
                if r0 < r1 {
                    k.rows(w.data, w.row_bytes(), w.rows, r0, r1, x, out);
                }
                offset += w.rows;
            }
        });
    }
    Ok(())
}

/// `out[t][r] = W[r] · x[t]` for a float `w` (F32, F16) and `f32` activations `x`
/// (`[tokens][w.cols]`; `out`: `[tokens][w.rows]`), rows split across `pool`'s threads.
pub fn matmul_f32(
    w: &WeightMatrix,
    x: &[f32],
    tokens: usize,
    out: &mut [f32],
    pool: &ThreadPool,
) -> Result<(), QuantError> {
    matmul_f32_with(Backend::detect(), w, x, tokens, out, pool)
}

/// [`matmul_f32`] on an explicit backend.
pub fn matmul_f32_with(
    backend: Backend,
    w: &WeightMatrix,
    x: &[f32],
    tokens: usize,
    out: &mut [f32],
    pool: &ThreadPool,
) -> Result<(), QuantError> {
    check_float(w, x, tokens)?;
    check_out(w, tokens, out)?;
    let k = kernel_float(w.ty, Avx2Token::get(backend));
    let (rows, rb, data, cols) = (w.rows, w.row_bytes(), w.data, w.cols);
    let shared = SharedOut::new(out);
    if tokens > 0 && rows > 0 {
        pool.run_tasks(tasks_for(pool, rows), &|i, n| {
            let (r0, r1) = row_range(rows, i, n);
            k.rows(data, rb, rows, r0, r1, x, cols, tokens, &shared);
        });
    }
    Ok(())
}

/// Convenience for any weight type from `f32` activations (`[tokens][w.cols]`): block types
/// quantize `x` into `scratch` first. When several matrices share an input (Q, K, V), quantize
/// once with [`quantize_activations`] and call [`matmul`] instead.
pub fn matmul_any(
    w: &WeightMatrix,
    x: &[f32],
    tokens: usize,
    scratch: &mut QuantizedActivations,
    out: &mut [f32],
    pool: &ThreadPool,
) -> Result<(), QuantError> {
    if w.ty.is_quantized() {
        let expected = tokens.checked_mul(w.cols).ok_or(QuantError::SizeOverflow)?;
        if x.len() != expected {
            return Err(QuantError::BadShape {
                what: "x",
                expected,
                actual: x.len(),
            });
        }
        w.check()?;
        check_out(w, tokens, out)?;
        quantize_activations(x, w.cols, scratch)?;
        matmul(w, scratch, out, pool)
    } else {
        matmul_f32(w, x, tokens, out, pool)
    }
}

fn check_out(w: &WeightMatrix, tokens: usize, out: &[f32]) -> Result<(), QuantError> {
    let expected = tokens.checked_mul(w.rows).ok_or(QuantError::SizeOverflow)?;
    if out.len() != expected {
        return Err(QuantError::BadShape {
            what: "out",
            expected,
            actual: out.len(),
        });
    }
    Ok(())
}

/// Shared write access to `out` for threads that write disjoint elements.
struct SharedOut<'a> {
    ptr: *mut f32,
    len: usize,
    _out: core::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: `SharedOut` is only a pointer plus length; every thread writes a disjoint set of
// indices (its own rows) and nobody reads `out` until `ThreadPool::run` has returned.
unsafe impl Sync for SharedOut<'_> {}

impl<'a> SharedOut<'a> {
    fn new(out: &'a mut [f32]) -> SharedOut<'a> {
        SharedOut {
            ptr: out.as_mut_ptr(),
            len: out.len(),
            _out: core::marker::PhantomData,
        }
    }

    #[inline]
    fn write(&self, i: usize, v: f32) {
        assert!(i < self.len);
        // SAFETY: `i < len` so the write is inside the borrowed `out`; `run_rows` gives each
        // thread its own row range, so no element is written by two threads, and the `&mut`
        // borrow of `out` is held (unused) by `run_rows` until all threads are done.
        unsafe { self.ptr.add(i).write(v) }
    }
}

/// Row chunks per thread: a few, so that a thread the OS delays (the machine may be shared)
/// leaves only a small chunk for the others to wait on or take over.
const CHUNKS_PER_THREAD: usize = 4;

/// How many row ranges a matmul of `rows` rows is split into on `pool`.
fn tasks_for(pool: &ThreadPool, rows: usize) -> usize {
    let threads = pool.threads();
    if threads == 1 {
        1
    } else {
        (threads * CHUNKS_PER_THREAD).min(rows.div_ceil(8)).max(1)
    }
}

/// The row range task `i` of `n` takes: contiguous, balanced, in multiples of 8 rows where
/// possible (so neighbouring threads do not share output cache lines for one token).
fn row_range(rows: usize, i: usize, n: usize) -> (usize, usize) {
    let units = rows.div_ceil(8);
    let start = (units * i / n * 8).min(rows);
    let end = (units * (i + 1) / n * 8).min(rows);
    (start, end)
}

/// The loop every kernel family runs on one thread: for each row `r0..r1` (of a matrix of
/// `rows` rows, `rb` bytes each), `tile(row, t0, nt, dst)` dots the row against tokens
/// `t0..t0 + nt` (tiles of up to [`TOKEN_TILE`]) into `dst[..nt]`, written to `out[t][r]`.
/// Tokens go in passes of about [`PASS_BYTES`] of activations (`token_bytes` each): within a
/// pass a row is read once and stays in L1 for all its token tiles, and the pass's activations
/// stay in L1 for all rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn row_loop(
    data: &[u8],
    rb: usize,
    rows: usize,
    r0: usize,
    r1: usize,
    tokens: usize,
    token_bytes: usize,
    out: &SharedOut,
    mut tile: impl FnMut(&[u8], usize, usize, &mut [f32; TOKEN_TILE]),
) {
    let mut dst = [0f32; TOKEN_TILE];
    // Tokens in passes small enough for their activations to stay in L1 while the rows go by
    // (the rows, read again for every pass, stay in L2).
    let pass = (PASS_BYTES / token_bytes.max(1) / TOKEN_TILE).max(1) * TOKEN_TILE;
    let mut c0 = 0;
    while c0 < tokens {
        let c1 = tokens.min(c0 + pass);
        for r in r0..r1 {
            let row = &data[r * rb..(r + 1) * rb];
            prefetch(data, (r + PREFETCH_ROWS) * rb, rb);
            let mut t0 = c0;
            while t0 < c1 {
                let nt = (c1 - t0).min(TOKEN_TILE);
                tile(row, t0, nt, &mut dst);
                for (j, &v) in dst[..nt].iter().enumerate() {
                    out.write((t0 + j) * rows + r, v);
                }
                t0 += nt;
            }
        }
        c0 = c1;
    }
}

/// Activation bytes `row_loop` takes per pass over the rows (L1 is 32 KiB on the CPUs aimed at).
const PASS_BYTES: usize = 16 * 1024;

/// Rows ahead of the current one that `row_loop` asks the CPU to fetch.
const PREFETCH_ROWS: usize = 2;

/// Hints the CPU to bring `data[start..start + len]` (clamped to `data`) into cache.
#[inline(always)]
fn prefetch(data: &[u8], start: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let end = start.saturating_add(len).min(data.len());
        let mut i = start;
        while i < end {
            // SAFETY: SSE is part of the x86_64 baseline; a prefetch is only a hint (it never
            // faults nor changes memory), and the address is inside `data` anyway.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(data[i..].as_ptr() as *const i8) };
            i += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, start, len);
}

/// Token `t`'s quants and `(d, s)` pairs for tokens `t0..t0 + NT`.
#[inline(always)]
#[allow(clippy::type_complexity)]
fn act_tile<const NT: usize>(x: &QuantizedActivations, t0: usize) -> ([&[i8]; NT], [&[f32]; NT]) {
    let (c, st, n2) = (x.cols, x.stride, 2 * x.blocks());
    (
        core::array::from_fn(|j| &x.q[(t0 + j) * st..(t0 + j) * st + c]),
        core::array::from_fn(|j| &x.ds[(t0 + j) * n2..(t0 + j + 1) * n2]),
    )
}

/// Tokens `t0..t0 + NT`'s quants padded to whole groups of [`GROUP`] blocks, and their
/// per-group scales (see [`QuantizedActivations`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::type_complexity)]
fn act_groups<const NT: usize>(x: &QuantizedActivations, t0: usize) -> ([&[i8]; NT], [&[f32]; NT]) {
    let st = x.stride;
    let ng = st / QK * 2;
    (
        core::array::from_fn(|j| &x.q[(t0 + j) * st..(t0 + j + 1) * st]),
        core::array::from_fn(|j| &x.g[(t0 + j) * ng..(t0 + j + 1) * ng]),
    )
}

// ---------------------------------------------------------------------------------------------
// Kernel selection

#[derive(Clone, Copy)]
enum QKernel {
    Scalar(WeightType),
    #[cfg(target_arch = "x86_64")]
    Avx2(WeightType, Avx2Token),
}

fn kernel_quantized(ty: WeightType, token: Option<Avx2Token>) -> QKernel {
    match token {
        #[cfg(target_arch = "x86_64")]
        Some(tok) => QKernel::Avx2(ty, tok),
        _ => QKernel::Scalar(ty),
    }
}

impl QKernel {
    /// Rows `r0..r1` against every token of `x` into `out` (`[tokens][rows]`); callers have
    /// checked all shapes.
    #[allow(clippy::too_many_arguments)]
    fn rows(
        self,
        data: &[u8],
        rb: usize,
        rows: usize,
        r0: usize,
        r1: usize,
        x: &QuantizedActivations,
        out: &SharedOut,
    ) {
        match self {
            QKernel::Scalar(ty) => row_loop(
                data,
                rb,
                rows,
                r0,
                r1,
                x.tokens,
                x.token_bytes(),
                out,
                |row, t0, nt, dst| {
                    for (j, d) in dst[..nt].iter_mut().enumerate() {
                        let (q, ds) = act_tile::<1>(x, t0 + j);
                        *d = scalar::dot_quantized(ty, row, q[0], ds[0]);
                    }
                },
            ),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: an `Avx2Token` exists only when AVX2, FMA and F16C were detected.
            QKernel::Avx2(ty, _) => unsafe {
                avx2::rows_quantized(ty, data, rb, rows, r0, r1, x, out)
            },
        }
    }

    /// One row against token `t` (callers check), computed exactly as `rows` computes it.
    fn dot_one(self, row: &[u8], x: &QuantizedActivations, t: usize) -> f32 {
        match self {
            QKernel::Scalar(ty) => {
                let (q, ds) = act_tile::<1>(x, t);
                scalar::dot_quantized(ty, row, q[0], ds[0])
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: an `Avx2Token` exists only when AVX2, FMA and F16C were detected.
            QKernel::Avx2(ty, _) => unsafe { avx2::dot_quantized_token(ty, row, x, t) },
        }
    }
}

#[derive(Clone, Copy)]
enum FKernel {
    Scalar(WeightType),
    #[cfg(target_arch = "x86_64")]
    Avx2(WeightType, Avx2Token),
}

fn kernel_float(ty: WeightType, token: Option<Avx2Token>) -> FKernel {
    match token {
        #[cfg(target_arch = "x86_64")]
        Some(tok) => FKernel::Avx2(ty, tok),
        _ => FKernel::Scalar(ty),
    }
}

impl FKernel {
    /// Rows `r0..r1` against `tokens` tokens of `x` (`[tokens][cols]`) into `out`
    /// (`[tokens][rows]`); callers have checked all shapes.
    #[allow(clippy::too_many_arguments)]
    fn rows(
        self,
        data: &[u8],
        rb: usize,
        rows: usize,
        r0: usize,
        r1: usize,
        x: &[f32],
        cols: usize,
        tokens: usize,
        out: &SharedOut,
    ) {
        match self {
            FKernel::Scalar(ty) => row_loop(
                data,
                rb,
                rows,
                r0,
                r1,
                tokens,
                4 * cols,
                out,
                |row, t0, nt, dst| {
                    for (j, d) in dst[..nt].iter_mut().enumerate() {
                        let t = t0 + j;
                        *d = scalar::dot_float(ty, row, &x[t * cols..(t + 1) * cols]);
                    }
                },
            ),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: an `Avx2Token` exists only when AVX2, FMA and F16C were detected.
            FKernel::Avx2(ty, _) => unsafe {
                avx2::rows_float(ty, data, rb, rows, r0, r1, x, cols, tokens, out)
            },
        }
    }

    /// One row against `x` (`cols` values), computed exactly as `rows` computes it.
    fn dot_one(self, row: &[u8], x: &[f32]) -> f32 {
        match self {
            FKernel::Scalar(ty) => scalar::dot_float(ty, row, x),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: an `Avx2Token` exists only when AVX2, FMA and F16C were detected.
            FKernel::Avx2(ty, _) => unsafe { avx2::dot_float_one(ty, row, x) },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar kernels (the reference twins)

mod scalar {
    use super::{f16_at, WeightType, QK};

    /// Quantizes one block; returns `(d, Σq)` (`d` at f32 precision). A NaN anywhere in the
    /// block makes `d` NaN (so every dot product with the block is NaN, not a silent 0); a
    /// value whose scaled form is NaN (`NaN`, or `±inf` times `1/inf`) quantizes to 0.
    pub(super) fn quantize_block(x: &[f32; QK], q: &mut [i8; QK]) -> (f32, i32) {
        let amax = x.iter().fold(0f32, |a, v| {
            if a.is_nan() || v.is_nan() {
                f32::NAN
            } else {
                a.max(v.abs())
            }
        });
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (qi, &v) in q.iter_mut().zip(x) {
            // `as` maps NaN to 0.
            let r = (v * id).round_ties_even() as i32;
            *qi = r as i8;
            sum += r;
        }
        (d, sum)
    }

    /// One row of a block type against one token (`q`: cols i8, `ds`: (d, s) per block).
    pub(super) fn dot_quantized(ty: WeightType, row: &[u8], q: &[i8], ds: &[f32]) -> f32 {
        let bb = ty.block_bytes();
        let mut acc = 0f32;
        let mut acc_m = 0f32;
        for ((b, qx), dsx) in row
            .chunks_exact(bb)
            .zip(q.chunks_exact(QK))
            .zip(ds.chunks_exact(2))
        {
            let dw = f16_at(b, 0);
            let isum: i32 = match ty {
                WeightType::Q8_0 => b[2..34]
                    .iter()
                    .zip(qx)
                    .map(|(&w, &x)| (w as i8) as i32 * x as i32)
                    .sum(),
                _ => {
                    let nib = if ty == WeightType::Q4_1 {
                        &b[4..20]
                    } else {
                        &b[2..18]
                    };
                    let (lo, hi) = qx.split_at(16);
                    nib.iter()
                        .zip(lo.iter().zip(hi))
                        .map(|(&n, (&a, &c))| {
                            (n & 15) as i32 * a as i32 + (n >> 4) as i32 * c as i32
                        })
                        .sum()
                }
            };
            acc += dw * dsx[0] * isum as f32;
            match ty {
                WeightType::Q4_1 => acc_m += f16_at(b, 2) * dsx[1],
                WeightType::Q4_0 => acc_m += dw * dsx[1],
                _ => {}
            }
        }
        match ty {
            WeightType::Q4_0 => acc - 8.0 * acc_m,
            _ => acc + acc_m,
        }
    }

    /// One F32 or F16 row against one token's `f32` activations.
    pub(super) fn dot_float(ty: WeightType, row: &[u8], x: &[f32]) -> f32 {
        let mut acc = 0f32;
        if ty == WeightType::F16 {
            for (c, &v) in row.chunks_exact(2).zip(x) {
                acc += f16_at(c, 0) * v;
            }
        } else {
            for (c, &v) in row.chunks_exact(4).zip(x) {
                acc += f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * v;
            }
        }
        acc
    }
}

// ---------------------------------------------------------------------------------------------
// AVX2 kernels

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! Integer block dot products, a weight block unpacked once and used for `NT` tokens.
    //!
    //! Q8_0: the weights' absolute values, their signs moved onto the activations by
    //! `_mm256_sign_epi8`, so one `_mm256_maddubs_epi16` (u8 × i8 → pairwise i16 sums, at most
    //! 2·128·127 < 2^15, no saturation) and one `_mm256_madd_epi16` with ones (→ eight i32)
    //! give the block's integer dot in eight lanes, converted and accumulated with one FMA by
    //! `d_w·d_x`.
    //!
    //! Q4_1 / Q4_0: blocks go in groups of four ([`GROUP`]). Each block's nibbles are unpacked
    //! to bytes 0..=15 in two 128-bit halves (elements 0..16 and 16..32); per token, eight
    //! 128-bit `maddubs` give i16 pair sums (≤ 2·15·127), which are added and reduced in i16
    //! (at most 16 products per lane, ≤ 30480 < 2^15) with three `hadd`s to
    //! `[p0 p0 p1 p1 p2 p2 p3 p3]`, and one `madd` with ones gives the four blocks' exact
    //! integer dots. Then a single FMA per group and token does all the float work:
    //! `acc += [p0 p1 p2 p3 | 1 1 1 1] · [d_w·d_x ×4 | m_w·s_x ×4]` (Q4_0: `m = −8·d_w`), the
    //! activation scales coming pre-arranged per group ([`QuantizedActivations`]). The result
    //! is the lower four lanes' sum plus the upper four's.

    use super::{
        act_groups, act_tile, row_loop, QuantizedActivations, SharedOut, WeightType, GROUP, QK,
        TOKEN_TILE,
    };
    use core::arch::x86_64::*;

    /// Rows `r0..r1` of a block-type matrix against every token of `x` (see `row_loop`).
    ///
    /// # Safety
    /// - The CPU supports AVX2, FMA and F16C.
    ///
    /// (Shapes are checked by the callers; a mismatch panics, it is never read out of bounds.)
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows_quantized(
        ty: WeightType,
        data: &[u8],
        rb: usize,
        rows: usize,
        r0: usize,
        r1: usize,
        x: &QuantizedActivations,
        out: &SharedOut,
    ) {
        let tokens = x.tokens();
        match ty {
            WeightType::Q4_1 | WeightType::Q4_0 | WeightType::Q8_0 if tokens == 1 => {
                debug_assert!(r1 <= rows);
                let (q, g) = act_groups::<1>(x, 0);
                let (qc, ds) = act_tile::<1>(x, 0);
                match ty {
                    WeightType::Q4_1 => rows_one_token(
                        data,
                        rb,
                        r0,
                        r1,
                        out,
                        |two| dot_q4_two_rows::<true>(two, q[0], g[0]),
                        |row| dot_q4::<1, true>(row, q, g)[0],
                    ),
                    WeightType::Q4_0 => rows_one_token(
                        data,
                        rb,
                        r0,
                        r1,
                        out,
                        |two| dot_q4_two_rows::<false>(two, q[0], g[0]),
                        |row| dot_q4::<1, false>(row, q, g)[0],
                    ),
                    _ => rows_one_token(
                        data,
                        rb,
                        r0,
                        r1,
                        out,
                        |two| dot_q8_0_rows::<2>(two, qc[0], ds[0]),
                        |row| dot_q8_0::<1>(row, qc, ds)[0],
                    ),
                }
            }
            WeightType::Q4_1 => row_loop(
                data,
                rb,
                rows,
                r0,
                r1,
                tokens,
                x.token_bytes(),
                out,
                |row, t0, nt, dst| tile_quantized::<1>(row, x, t0, nt, dst),
            ),
            WeightType::Q4_0 => row_loop(
                data,
                rb,
                rows,
                r0,
                r1,
                tokens,
                x.token_bytes(),
                out,
                |row, t0, nt, dst| tile_quantized::<0>(row, x, t0, nt, dst),
            ),
            _ => row_loop(
                data,
                rb,
                rows,
                r0,
                r1,
                tokens,
                x.token_bytes(),
                out,
                |row, t0, nt, dst| tile_quantized::<8>(row, x, t0, nt, dst),
            ),
        }
    }

    /// One row of a block type against token `t` of `x`, exactly as `rows_quantized` computes
    /// it.
    ///
    /// # Safety
    /// - The CPU supports AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_quantized_token(
        ty: WeightType,
        row: &[u8],
        x: &QuantizedActivations,
        t: usize,
    ) -> f32 {
        match ty {
            WeightType::Q4_1 | WeightType::Q4_0 => {
                let (q, g) = act_groups::<1>(x, t);
                if ty == WeightType::Q4_1 {
                    dot_q4::<1, true>(row, q, g)[0]
                } else {
                    dot_q4::<1, false>(row, q, g)[0]
                }
            }
            _ => {
                let (q, ds) = act_tile::<1>(x, t);
                dot_q8_0::<1>(row, q, ds)[0]
            }
        }
    }

    /// Rows `r0..r1` (of `rb` bytes) against the one token of a decode step, two rows at a
    /// time (`two`) so that they share the activation loads and overlap their dependency
    /// chains; an odd last row goes to `one`. Each row must come out exactly as alone.
    #[inline(always)]
    fn rows_one_token(
        data: &[u8],
        rb: usize,
        r0: usize,
        r1: usize,
        out: &SharedOut,
        two: impl Fn([&[u8]; 2]) -> [f32; 2],
        one: impl Fn(&[u8]) -> f32,
    ) {
        let mut r = r0;
        while r + 2 <= r1 {
            super::prefetch(data, (r + super::PREFETCH_ROWS) * rb, 2 * rb);
            let (a, b) = data[r * rb..(r + 2) * rb].split_at(rb);
            let v = two([a, b]);
            out.write(r, v[0]);
            out.write(r + 1, v[1]);
            r += 2;
        }
        if r < r1 {
            out.write(r, one(&data[r * rb..(r + 1) * rb]));
        }
    }

    /// Two Q4 rows (of the same length) · one token, each exactly as [`dot_q4`] computes it.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_q4_two_rows<const HAS_MIN: bool>(row: [&[u8]; 2], q: &[i8], g: &[f32]) -> [f32; 2] {
        let bb = if HAS_MIN { 20 } else { 18 };
        let nb = row[0].len() / bb;
        assert!(row[0].len() == nb * bb && row[1].len() == nb * bb);
        let groups = nb.div_ceil(GROUP);
        assert!(q.len() >= groups * GROUP * QK && g.len() >= groups * 2 * GROUP);
        let mut acc = [_mm256_setzero_ps(); 2];
        let full = nb / GROUP;
        for gi in 0..full {
            // SAFETY: `4·gi + 4 ≤ nb`; the lengths were asserted above.
            unsafe {
                let (w0, dm0) = q4_group_weights::<HAS_MIN, true>(row[0], nb, gi);
                let (w1, dm1) = q4_group_weights::<HAS_MIN, true>(row[1], nb, gi);
                let x = q.as_ptr().add(gi * GROUP * QK);
                let s = g.as_ptr().add(gi * 2 * GROUP);
                acc[0] = q4_group_token(&w0, dm0, x, s, acc[0]);
                acc[1] = q4_group_token(&w1, dm1, x, s, acc[1]);
            }
        }
        if full < groups {
            // SAFETY: `4·full < nb` (the last, partial group); the lengths were asserted above
            // (the padding quants and scales are zero).
            unsafe {
                let (w0, dm0) = q4_group_weights::<HAS_MIN, false>(row[0], nb, full);
                let (w1, dm1) = q4_group_weights::<HAS_MIN, false>(row[1], nb, full);
                let x = q.as_ptr().add(full * GROUP * QK);
                let s = g.as_ptr().add(full * 2 * GROUP);
                acc[0] = q4_group_token(&w0, dm0, x, s, acc[0]);
                acc[1] = q4_group_token(&w1, dm1, x, s, acc[1]);
            }
        }
        acc.map(|a| q4_finish(a))
    }

    /// `KIND`: ggml id of the type (0 = Q4_0, 1 = Q4_1 here, 8 = Q8_0).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn tile_quantized<const KIND: u8>(
        row: &[u8],
        x: &QuantizedActivations,
        t0: usize,
        nt: usize,
        dst: &mut [f32; TOKEN_TILE],
    ) {
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn one<const NT: usize, const KIND: u8>(
            row: &[u8],
            x: &QuantizedActivations,
            t0: usize,
        ) -> [f32; NT] {
            match KIND {
                1 => {
                    let (q, g) = act_groups::<NT>(x, t0);
                    dot_q4::<NT, true>(row, q, g)
                }
                0 => {
                    let (q, g) = act_groups::<NT>(x, t0);
                    dot_q4::<NT, false>(row, q, g)
                }
                _ => {
                    let (q, ds) = act_tile::<NT>(x, t0);
                    dot_q8_0::<NT>(row, q, ds)
                }
            }
        }
        match nt {
            4 => *dst = one::<4, KIND>(row, x, t0),
            3 => dst[..3].copy_from_slice(&one::<3, KIND>(row, x, t0)),
            2 => dst[..2].copy_from_slice(&one::<2, KIND>(row, x, t0)),
            _ => dst[0] = one::<1, KIND>(row, x, t0)[0],
        }
    }

    /// Rows `r0..r1` of an F32/F16 matrix against `tokens` tokens of `x` (`[tokens][cols]`).
    ///
    /// # Safety
    /// - The CPU supports AVX2, FMA and F16C.
    ///
    /// (Shapes are checked by the callers; a mismatch panics, it is never read out of bounds.)
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows_float(
        ty: WeightType,
        data: &[u8],
        rb: usize,
        rows: usize,
        r0: usize,
        r1: usize,
        x: &[f32],
        cols: usize,
        tokens: usize,
        out: &SharedOut,
    ) {
        if ty == WeightType::F16 {
            row_loop(
                data,
                rb,
                rows,
                r0,
                r1,
                tokens,
                4 * cols,
                out,
                |row, t0, nt, dst| tile_float::<true>(row, x, cols, t0, nt, dst),
            )
        } else {
            row_loop(
                data,
                rb,
                rows,
                r0,
                r1,
                tokens,
                4 * cols,
                out,
                |row, t0, nt, dst| tile_float::<false>(row, x, cols, t0, nt, dst),
            )
        }
    }

    /// One F32/F16 row against `x`, exactly as `rows_float` computes it.
    ///
    /// # Safety
    /// - The CPU supports AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_float_one(ty: WeightType, row: &[u8], x: &[f32]) -> f32 {
        if ty == WeightType::F16 {
            dot_f16::<1>(row, [x])[0]
        } else {
            dot_f32::<1>(row, [x])[0]
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn tile_float<const F16: bool>(
        row: &[u8],
        x: &[f32],
        cols: usize,
        t0: usize,
        nt: usize,
        dst: &mut [f32; TOKEN_TILE],
    ) {
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn one<const NT: usize, const F16: bool>(
            row: &[u8],
            x: &[f32],
            cols: usize,
            t0: usize,
        ) -> [f32; NT] {
            let xs: [&[f32]; NT] =
                core::array::from_fn(|j| &x[(t0 + j) * cols..(t0 + j + 1) * cols]);
            if F16 {
                dot_f16::<NT>(row, xs)
            } else {
                dot_f32::<NT>(row, xs)
            }
        }
        match nt {
            4 => *dst = one::<4, F16>(row, x, cols, t0),
            3 => dst[..3].copy_from_slice(&one::<3, F16>(row, x, cols, t0)),
            2 => dst[..2].copy_from_slice(&one::<2, F16>(row, x, cols, t0)),
            _ => dst[0] = one::<1, F16>(row, x, cols, t0)[0],
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum_i32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s));
        _mm_cvtsi128_si32(s)
    }

    /// Quantizes one block of 32 exactly like `scalar::quantize_block` (same operations,
    /// round-half-even), returning `(d, Σq)`.
    ///
    /// # Safety
    /// - The CPU supports AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_block(x: &[f32; QK], q: &mut [i8; QK]) -> (f32, i32) {
        let p = x.as_ptr();
        // SAFETY: `x` is 32 f32, so the four 8-lane loads at 0, 8, 16, 24 are in bounds.
        let v = unsafe {
            [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ]
        };
        let sign = _mm256_set1_ps(-0.0);
        let m = _mm256_max_ps(
            _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
            _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])),
        );
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_movehdup_ps(m));
        // `vmaxps` drops a NaN or keeps it depending on the operand order: look for one.
        let unordered = |a: __m256| _mm256_cmp_ps::<_CMP_UNORD_Q>(a, a);
        let any_nan = _mm256_movemask_ps(_mm256_or_ps(
            _mm256_or_ps(unordered(v[0]), unordered(v[1])),
            _mm256_or_ps(unordered(v[2]), unordered(v[3])),
        )) != 0;
        let amax = if any_nan { f32::NAN } else { _mm_cvtss_f32(m) };
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let idv = _mm256_set1_ps(id);
        const R: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        // NaN products convert to i32::MIN here; the scalar twin's `as` gives 0: mask them.
        let i: [__m256i; 4] = core::array::from_fn(|k| {
            let scaled = _mm256_mul_ps(v[k], idv);
            let valid = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_ORD_Q>(scaled, scaled));
            _mm256_and_si256(valid, _mm256_cvtps_epi32(_mm256_round_ps::<R>(scaled)))
        });
        let sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        // packs work per 128-bit lane; the permute restores element order.
        let a = _mm256_packs_epi32(i[0], i[1]);
        let b = _mm256_packs_epi32(i[2], i[3]);
        let c = _mm256_packs_epi16(a, b);
        let c = _mm256_permutevar8x32_epi32(c, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: `q` is 32 bytes; unaligned store.
        unsafe { _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, c) };
        (d, hsum_i32(sum))
    }

    /// `[d₀ d₁ d₂ d₃ | m₀ m₁ m₂ m₃]` (Q4_1) or `[d₀ … d₃ | −8d₀ … −8d₃]` (Q4_0) from the four
    /// blocks' first four bytes (`(d, m)` or `d` as f16).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn q4_scales<const HAS_MIN: bool>(head: [i32; GROUP]) -> __m256 {
        let h = _mm_setr_epi32(head[0], head[1], head[2], head[3]);
        if HAS_MIN {
            // (d, m) pairs of halves → the four d, then the four m.
            let order = _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
            _mm256_cvtph_ps(_mm_shuffle_epi8(h, order))
        } else {
            let order = _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1);
            let d = _mm_cvtph_ps(_mm_shuffle_epi8(h, order));
            _mm256_set_m128(_mm_mul_ps(d, _mm_set1_ps(-8.0)), d)
        }
    }

    /// Group `gi` (blocks `4·gi..4·gi + 4`) of a Q4 row of `nb` blocks: each block's values as
    /// bytes 0..=15 in two registers (`w[2k]`: elements 0..16 of block `k`, from the low
    /// nibbles; `w[2k + 1]`: elements 16..32, from the high nibbles), and the scales of
    /// [`q4_scales`]. Blocks at or past `nb` (only when not `FULL`) are all zero.
    ///
    /// # Safety
    /// - The CPU supports AVX2, FMA and F16C.
    /// - `row` holds `nb` blocks of `bb` bytes, `bb` = 20 (`HAS_MIN`) or 18, and
    ///   `4·gi < nb` (`4·gi + 4 ≤ nb` when `FULL`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_group_weights<const HAS_MIN: bool, const FULL: bool>(
        row: &[u8],
        nb: usize,
        gi: usize,
    ) -> ([__m128i; 2 * GROUP], __m256) {
        let bb = if HAS_MIN { 20 } else { 18 };
        let low = _mm_set1_epi8(0x0f);
        let mut w = [_mm_setzero_si128(); 2 * GROUP];
        let mut head = [0i32; GROUP];
        for k in 0..GROUP {
            let b = gi * GROUP + k;
            if FULL || b < nb {
                // SAFETY: block `b < nb` lies inside `row` (caller's contract); unaligned reads.
                let (h, raw) = unsafe {
                    let p = row.as_ptr().add(b * bb);
                    let h = if HAS_MIN {
                        (p as *const u32).read_unaligned() as i32
                    } else {
                        (p as *const u16).read_unaligned() as i32
                    };
                    (h, _mm_loadu_si128(p.add(bb - 16) as *const __m128i))
                };
                head[k] = h;
                w[2 * k] = _mm_and_si128(raw, low);
                w[2 * k + 1] = _mm_and_si128(_mm_srli_epi16::<4>(raw), low);
            }
        }
        (w, q4_scales::<HAS_MIN>(head))
    }

    /// One token's part of a Q4 group: `acc + [p₀ p₁ p₂ p₃ | 1 1 1 1] · dm · g`, where `pₖ` is
    /// block `k`'s integer dot and `g` = `[dx₀ … dx₃ | sx₀ … sx₃]` (so the upper lanes gather
    /// the `m·s` terms).
    ///
    /// # Safety
    /// - The CPU supports AVX2, FMA and F16C.
    /// - `x` points at 128 readable i8 and `g` at 8 readable f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_group_token(
        w: &[__m128i; 2 * GROUP],
        dm: __m256,
        x: *const i8,
        g: *const f32,
        acc: __m256,
    ) -> __m256 {
        // SAFETY: in bounds by the caller's contract; unaligned loads.
        let (x, g) = unsafe {
            (
                [0, 1, 2, 3, 4, 5, 6, 7].map(|k| _mm_loadu_si128(x.add(16 * k) as *const __m128i)),
                _mm256_loadu_ps(g),
            )
        };
        // Per block, the low and high halves' pairwise sums added: |·| ≤ 4·15·127 = 7620.
        let p: [__m128i; GROUP] = core::array::from_fn(|k| {
            _mm_add_epi16(
                _mm_maddubs_epi16(w[2 * k], x[2 * k]),
                _mm_maddubs_epi16(w[2 * k + 1], x[2 * k + 1]),
            )
        });
        // [p0 p0 p1 p1 p2 p2 p3 p3], each |·| ≤ 30480 < 2^15.
        let h = _mm_hadd_epi16(_mm_hadd_epi16(p[0], p[1]), _mm_hadd_epi16(p[2], p[3]));
        let dots = _mm_cvtepi32_ps(_mm_madd_epi16(h, _mm_set1_epi16(1)));
        let f = _mm256_blend_ps::<0x0f>(_mm256_set1_ps(1.0), _mm256_castps128_ps256(dots));
        _mm256_fmadd_ps(f, _mm256_mul_ps(dm, g), acc)
    }

    /// Q4_1 (`HAS_MIN`) or Q4_0 row · `NT` tokens of quantized activations, in groups of four
    /// blocks: `q[j]` is token `j`'s quants padded to whole groups and `g[j]` its per-group
    /// scales (see [`act_groups`]). Lengths are checked: `row` must be whole blocks and every
    /// `q[j]` / `g[j]` must cover as many groups, or this panics.
    ///
    /// Each token has its own accumulator and the same operations whatever `NT`, so a token's
    /// result does not depend on the tile it is in.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_q4<const NT: usize, const HAS_MIN: bool>(
        row: &[u8],
        q: [&[i8]; NT],
        g: [&[f32]; NT],
    ) -> [f32; NT] {
        let bb = if HAS_MIN { 20 } else { 18 };
        let nb = row.len() / bb;
        assert!(row.len() == nb * bb);
        let groups = nb.div_ceil(GROUP);
        for j in 0..NT {
            assert!(q[j].len() >= groups * GROUP * QK && g[j].len() >= groups * 2 * GROUP);
        }
        let mut acc = [_mm256_setzero_ps(); NT];
        let full = nb / GROUP;
        for gi in 0..full {
            // SAFETY: `4·gi + 4 ≤ nb`; the lengths were asserted above.
            unsafe {
                let (w, dm) = q4_group_weights::<HAS_MIN, true>(row, nb, gi);
                for j in 0..NT {
                    let x = q[j].as_ptr().add(gi * GROUP * QK);
                    let s = g[j].as_ptr().add(gi * 2 * GROUP);
                    acc[j] = q4_group_token(&w, dm, x, s, acc[j]);
                }
            }
        }
        if full < groups {
            // SAFETY: `4·full < nb` (the last, partial group); the lengths were asserted above
            // (the padding quants and scales are zero).
            unsafe {
                let (w, dm) = q4_group_weights::<HAS_MIN, false>(row, nb, full);
                for j in 0..NT {
                    let x = q[j].as_ptr().add(full * GROUP * QK);
                    let s = g[j].as_ptr().add(full * 2 * GROUP);
                    acc[j] = q4_group_token(&w, dm, x, s, acc[j]);
                }
            }
        }
        core::array::from_fn(|j| q4_finish(acc[j]))
    }

    /// A Q4 accumulator's result: the `d` terms, then the offset terms added (as llama.cpp
    /// does).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn q4_finish(acc: __m256) -> f32 {
        let (d, m) = (_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
        hsum4(d) + hsum4(m)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum4(s: __m128) -> f32 {
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Weight block `b` of a Q8_0 row: `(|w|, w, d_w)`.
    ///
    /// # Safety
    /// - The CPU supports AVX2, FMA and F16C.
    /// - `row` holds at least `34 · (b + 1)` bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_weights(row: &[u8], b: usize) -> (__m256i, __m256i, __m128) {
        // SAFETY: the block's 34 bytes are in bounds (caller's contract); unaligned reads. The
        // scale is read as 4 bytes (d and two quants; only lane 0 is used): a full-width load
        // avoids a 16-bit insert's false dependency on a live register.
        let (head, w) = unsafe {
            let p = row.as_ptr().add(b * 34);
            (
                (p as *const u32).read_unaligned() as i32,
                _mm256_loadu_si256(p.add(2) as *const __m256i),
            )
        };
        (_mm256_abs_epi8(w), w, _mm_cvtph_ps(_mm_cvtsi32_si128(head)))
    }

    /// One token's part of a Q8_0 block: eight partial dots (as f32) and `d_w·d_x` in lane 0.
    ///
    /// # Safety
    /// - The CPU supports AVX2, FMA and F16C.
    /// - `q` holds at least `32 · (b + 1)` values and `ds` at least `2 · (b + 1)`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_token(
        aw: __m256i,
        w: __m256i,
        dw: __m128,
        q: &[i8],
        ds: &[f32],
        b: usize,
    ) -> (__m256, __m128) {
        // SAFETY: in bounds by the caller's contract; unaligned loads.
        let (x, dx) = unsafe {
            (
                _mm256_loadu_si256(q.as_ptr().add(b * QK) as *const __m256i),
                _mm_load_ss(ds.as_ptr().add(b * 2)),
            )
        };
        // |w| (u8, ≤ 128) × sign(w)·x (i8) = w·x: pairwise i16 sums ≤ 2·128·127 < 2^15.
        let sx = _mm256_sign_epi8(x, w);
        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), _mm256_set1_epi16(1));
        (_mm256_cvtepi32_ps(p), _mm_mul_ss(dw, dx))
    }

    /// Q8_0 row · `NT` tokens of quantized activations (lengths checked as in [`dot_q4`]; the
    /// same block-pair accumulation).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_q8_0<const NT: usize>(row: &[u8], q: [&[i8]; NT], ds: [&[f32]; NT]) -> [f32; NT] {
        let nb = row.len() / 34;
        assert!(row.len() == nb * 34);
        for j in 0..NT {
            assert!(q[j].len() >= nb * QK && ds[j].len() >= nb * 2);
        }
        let mut acc = [_mm256_setzero_ps(); NT];
        let mut b = 0;
        while b + 2 <= nb {
            // SAFETY: `b + 1 < nb`; the lengths were asserted above.
            unsafe {
                let (a0, w0, d0) = q8_weights(row, b);
                let (a1, w1, d1) = q8_weights(row, b + 1);
                for j in 0..NT {
                    let (p0, s0) = q8_token(a0, w0, d0, q[j], ds[j], b);
                    let (p1, s1) = q8_token(a1, w1, d1, q[j], ds[j], b + 1);
                    let t = _mm256_mul_ps(_mm256_broadcastss_ps(s0), p0);
                    let t = _mm256_fmadd_ps(_mm256_broadcastss_ps(s1), p1, t);
                    acc[j] = _mm256_add_ps(acc[j], t);
                }
            }
            b += 2;
        }
        if b < nb {
            // SAFETY: `b < nb`; the lengths were asserted above.
            unsafe {
                let (a0, w0, d0) = q8_weights(row, b);
                for j in 0..NT {
                    let (p0, s0) = q8_token(a0, w0, d0, q[j], ds[j], b);
                    acc[j] = _mm256_fmadd_ps(_mm256_broadcastss_ps(s0), p0, acc[j]);
                }
            }
        }
        core::array::from_fn(|j| hsum(acc[j]))
    }

    /// `NR` Q8_0 rows (of the same length) · one token, each exactly as [`dot_q8_0`] computes
    /// it (the rows share the activation loads).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_q8_0_rows<const NR: usize>(row: [&[u8]; NR], q: &[i8], ds: &[f32]) -> [f32; NR] {
        let nb = row[0].len() / 34;
        for r in &row {
            assert!(r.len() == nb * 34);
        }
        assert!(q.len() >= nb * QK && ds.len() >= nb * 2);
        let mut acc = [_mm256_setzero_ps(); NR];
        let mut b = 0;
        while b + 2 <= nb {
            // SAFETY: `b + 1 < nb`; the lengths were asserted above.
            unsafe {
                for i in 0..NR {
                    let (a0, w0, d0) = q8_weights(row[i], b);
                    let (a1, w1, d1) = q8_weights(row[i], b + 1);
                    let (p0, s0) = q8_token(a0, w0, d0, q, ds, b);
                    let (p1, s1) = q8_token(a1, w1, d1, q, ds, b + 1);
                    let t = _mm256_mul_ps(_mm256_broadcastss_ps(s0), p0);
                    let t = _mm256_fmadd_ps(_mm256_broadcastss_ps(s1), p1, t);
                    acc[i] = _mm256_add_ps(acc[i], t);
                }
            }
            b += 2;
        }
        if b < nb {
            // SAFETY: `b < nb`; the lengths were asserted above.
            unsafe {
                for i in 0..NR {
                    let (a0, w0, d0) = q8_weights(row[i], b);
                    let (p0, s0) = q8_token(a0, w0, d0, q, ds, b);
                    acc[i] = _mm256_fmadd_ps(_mm256_broadcastss_ps(s0), p0, acc[i]);
                }
            }
        }
        acc.map(|a| hsum(a))
    }

    /// Shared body of the float kernels: `load(i)` gives weights `i..i+8` as f32,
    /// `scalar(i)` weight `i`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_float<const NT: usize>(
        n: usize,
        x: [&[f32]; NT],
        load: impl Fn(usize) -> __m256,
        scalar: impl Fn(usize) -> f32,
    ) -> [f32; NT] {
        for xj in &x {
            assert!(xj.len() >= n);
        }
        let mut acc0 = [_mm256_setzero_ps(); NT];
        let mut acc1 = [_mm256_setzero_ps(); NT];
        let mut i = 0;
        while i + 16 <= n {
            let w0 = load(i);
            let w1 = load(i + 8);
            for j in 0..NT {
                // SAFETY: `i + 16 <= n <= x[j].len()`.
                let (x0, x1) = unsafe {
                    let p = x[j].as_ptr().add(i);
                    (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
                };
                acc0[j] = _mm256_fmadd_ps(w0, x0, acc0[j]);
                acc1[j] = _mm256_fmadd_ps(w1, x1, acc1[j]);
            }
            i += 16;
        }
        if i + 8 <= n {
            let w0 = load(i);
            for j in 0..NT {
                // SAFETY: `i + 8 <= n <= x[j].len()`.
                let x0 = unsafe { _mm256_loadu_ps(x[j].as_ptr().add(i)) };
                acc0[j] = _mm256_fmadd_ps(w0, x0, acc0[j]);
            }
            i += 8;
        }
        let mut out: [f32; NT] = core::array::from_fn(|j| hsum(_mm256_add_ps(acc0[j], acc1[j])));
        for k in i..n {
            let w = scalar(k);
            for (o, xj) in out.iter_mut().zip(&x) {
                *o += w * xj[k];
            }
        }
        out
    }

    /// F32 row (little-endian bytes) · `NT` tokens of f32 activations (every `x[j]` must hold
    /// `row.len() / 4` values, or this panics).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_f32<const NT: usize>(row: &[u8], x: [&[f32]; NT]) -> [f32; NT] {
        let n = row.len() / 4;
        let p = row.as_ptr();
        dot_float(
            n,
            x,
            // SAFETY: called with `i + 8 <= n`, so bytes `4i..4i+32` lie inside `row`.
            |i| unsafe { _mm256_loadu_ps(p.add(4 * i) as *const f32) },
            |i| f32::from_le_bytes([row[4 * i], row[4 * i + 1], row[4 * i + 2], row[4 * i + 3]]),
        )
    }

    /// F16 row · `NT` tokens of f32 activations (every `x[j]` must hold `row.len() / 2`
    /// values, or this panics).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_f16<const NT: usize>(row: &[u8], x: [&[f32]; NT]) -> [f32; NT] {
        let n = row.len() / 2;
        let p = row.as_ptr();
        dot_float(
            n,
            x,
            // SAFETY: called with `i + 8 <= n`, so bytes `2i..2i+16` lie inside `row`.
            |i| _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p.add(2 * i) as *const __m128i) }),
            |i| super::f16_at(row, 2 * i),
        )
    }
}
