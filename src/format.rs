//! Storage formats for cached keys and values, and the byte size of one stored row.
//!
//! A *row* is one token's vector for one KV head: `head_dim` elements. Its bytes are the
//! elements in order, little-endian, followed by the row's scale parameters when the format has
//! any (so a row, and therefore a block, is self-contained). The kernels in [`crate::kernels`]
//! read and write rows in exactly this shape.

/// How one row of `head_dim` elements is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum KvFormat {
    /// 4 bytes per element, IEEE binary32.
    F32 = 0,
    /// 2 bytes per element, IEEE binary16.
    F16 = 1,
    /// 2 bytes per element, bfloat16 (the top half of an f32).
    Bf16 = 2,
    /// 1 byte per element, symmetric, plus one bfloat16 scale per 32 elements
    /// (see [`crate::quant`]).
    Int8 = 3,
    /// 4 bits per element, asymmetric, plus a bfloat16 scale and minimum per 32 elements
    /// (see [`crate::quant`]).
    Int4 = 4,
}

impl KvFormat {
    /// Every format, in declaration order.
    pub const ALL: [KvFormat; 5] = [
        KvFormat::F32,
        KvFormat::F16,
        KvFormat::Bf16,
        KvFormat::Int8,
        KvFormat::Int4,
    ];

    /// The float formats (stored exactly up to rounding).
    pub const FLOATS: [KvFormat; 3] = [KvFormat::F32, KvFormat::F16, KvFormat::Bf16];

    /// The quantized formats (see [`crate::quant`]).
    pub const QUANTIZED: [KvFormat; 2] = [KvFormat::Int8, KvFormat::Int4];

    /// Bytes of one stored row of `head_dim` elements, scales included; `None` on overflow or
    /// when the format cannot hold that many elements per row.
    pub const fn row_bytes(self, head_dim: usize) -> Option<usize> {
        match self {
            KvFormat::F32 => head_dim.checked_mul(4),
            KvFormat::F16 | KvFormat::Bf16 => head_dim.checked_mul(2),
            KvFormat::Int8 => crate::quant::int8_row_bytes(head_dim),
            KvFormat::Int4 => crate::quant::int4_row_bytes(head_dim),
        }
    }

    /// The short lower-case name used by the CLI and in reports (`f32`, `f16`, `bf16`, `int8`,
    /// `int4`).
    pub const fn name(self) -> &'static str {
        match self {
            KvFormat::F32 => "f32",
            KvFormat::F16 => "f16",
            KvFormat::Bf16 => "bf16",
            KvFormat::Int8 => "int8",
            KvFormat::Int4 => "int4",
        }
    }

    /// Parses a name as printed by [`KvFormat::name`].
    pub fn from_name(name: &str) -> Option<KvFormat> {
        KvFormat::ALL
            .into_iter()
            .find(|format| format.name() == name)
    }

    /// True when rows are stored exactly as floats (no quantization error beyond rounding).
    pub const fn is_float(self) -> bool {
        matches!(self, KvFormat::F32 | KvFormat::F16 | KvFormat::Bf16)
    }
}

impl core::fmt::Display for KvFormat {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}
