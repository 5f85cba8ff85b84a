//! A reader for GGUF model files (versions 2 and 3, little-endian).
//!
//! Layout of a GGUF file:
//! - header: magic `GGUF`, `u32` version, `u64` tensor count, `u64` metadata count;
//! - metadata: `count` key/value pairs (key string, `u32` value type, value);
//! - tensor infos: name string, `u32` dimension count, `u64` dimensions (innermost first),
//!   `u32` ggml type, `u64` offset relative to the data section;
//! - the data section, starting at the end of the tensor infos rounded up to
//!   `general.alignment` bytes (default 32).
//!
//! Strings are a `u64` byte length followed by UTF-8 bytes. [`Gguf`] owns the file bytes and
//! validates everything up front: every count, length, offset and size is bounds- and
//! overflow-checked, preallocation never exceeds what the remaining bytes could hold, and any
//! defect becomes a [`GgufError`] naming what is wrong and at which byte offset. Once
//! [`Gguf::from_bytes`] succeeds, every [`Gguf::tensor`] view is in range.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

/// The four magic bytes every GGUF file starts with.
pub const MAGIC: [u8; 4] = *b"GGUF";

/// Data-section alignment in bytes when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// The most tensor dimensions ggml supports.
pub const MAX_DIMS: u32 = 4;

/// How deeply arrays may nest inside arrays. Real files nest at most once; the cap keeps a
/// hostile file from recursing the reader off the stack.
pub const MAX_ARRAY_DEPTH: u32 = 16;

/// Everything that can be wrong with a GGUF file. Offsets are byte offsets from the start of
/// the file.
#[derive(Debug)]
pub enum GgufError {
    /// Reading the file failed.
    Io(std::io::Error),
    /// The file ended before `what` (which needed `needed` bytes at `offset`) was complete.
    Truncated {
        /// The item being read.
        what: &'static str,
        /// Where it starts.
        offset: u64,
        /// Bytes it needs.
        needed: u64,
        /// Bytes left in the file from `offset`.
        available: u64,
    },
    /// The file does not start with `GGUF`.
    BadMagic {
        /// The first four bytes found.
        found: [u8; 4],
    },
    /// A version other than 2 or 3.
    UnsupportedVersion {
        /// The version found.
        version: u32,
    },
    /// A metadata value type id outside `0..=12`.
    InvalidValueType {
        /// The type id found.
        type_id: u32,
        /// Where it was read.
        offset: u64,
    },
    /// A boolean byte other than 0 or 1.
    InvalidBool {
        /// The byte found.
        value: u8,
        /// Where it was read.
        offset: u64,
    },
    /// A string that is not UTF-8.
    InvalidUtf8 {
        /// Where the string's bytes start.
        offset: u64,
    },
    /// Arrays nested deeper than [`MAX_ARRAY_DEPTH`].
    NestingTooDeep {
        /// Where the too-deep array starts.
        offset: u64,
    },
    /// The same metadata key twice.
    DuplicateKey {
        /// The key.
        key: String,
        /// Where the second occurrence starts.
        offset: u64,
    },
    /// `general.alignment` is not a non-zero power of two that fits a `u32`.
    BadAlignment {
        /// The value found, if it was an integer at all.
        value: Option<u64>,
    },
    /// The same tensor name twice.
    DuplicateTensor {
        /// The name.
        name: String,
        /// Where the second tensor info starts.
        offset: u64,
    },
    /// More than [`MAX_DIMS`] dimensions.
    TooManyDims {
        /// The tensor.
        name: String,
        /// The count found.
        n_dims: u32,
        /// Where the count was read.
        offset: u64,
    },
    /// A ggml type id this reader does not know the block layout of.
    UnsupportedTensorType {
        /// The tensor.
        name: String,
        /// The type id found.
        type_id: u32,
        /// Where the type id was read.
        offset: u64,
    },
    /// Dimensions whose element or byte count overflows, or whose innermost dimension is not a
    /// whole number of quantization blocks.
    BadShape {
        /// The tensor.
        name: String,
        /// Its dimensions, innermost first.
        dims: Vec<u64>,
        /// What is wrong.
        reason: &'static str,
        /// Where the tensor info starts.
        offset: u64,
    },
    /// A tensor offset that is not a multiple of the alignment.
    MisalignedTensor {
        /// The tensor.
        name: String,
        /// Its offset relative to the data section.
        tensor_offset: u64,
        /// The alignment in bytes.
        alignment: u64,
    },
    /// Tensor data that does not lie inside the file.
    TensorOutOfBounds {
        /// The tensor.
        name: String,
        /// Absolute byte offset where its data would start.
        start: u64,
        /// Its size in bytes.
        size: u64,
        /// The file length in bytes.
        file_len: u64,
    },
}

impl fmt::Display for GgufError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GgufError::Io(e) => write!(f, "gguf: i/o error: {e}"),
            GgufError::Truncated {
                what,
                offset,
                needed,
                available,
            } => write!(
                f,
                "gguf: truncated {what} at byte {offset}: needs {needed} bytes, {available} left"
            ),
            GgufError::BadMagic { found } => {
                write!(
                    f,
                    "gguf: bad magic at byte 0: expected \"GGUF\", found {found:02x?}"
                )
            }
            GgufError::UnsupportedVersion { version } => {
                write!(
                    f,
                    "gguf: unsupported version {version} at byte 4 (expected 2 or 3)"
                )
            }
            GgufError::InvalidValueType { type_id, offset } => {
                write!(
                    f,
                    "gguf: invalid metadata value type {type_id} at byte {offset}"
                )
            }
            GgufError::InvalidBool { value, offset } => {
                write!(f, "gguf: invalid bool byte {value} at byte {offset}")
            }
            GgufError::InvalidUtf8 { offset } => {
                write!(f, "gguf: string at byte {offset} is not UTF-8")
            }
            GgufError::NestingTooDeep { offset } => write!(
                f,
                "gguf: arrays nested deeper than {MAX_ARRAY_DEPTH} at byte {offset}"
            ),
            GgufError::DuplicateKey { key, offset } => {
                write!(f, "gguf: duplicate metadata key {key:?} at byte {offset}")
            }
            GgufError::BadAlignment { value: Some(v) } => write!(
                f,
                "gguf: general.alignment = {v} is not a non-zero power of two fitting a u32"
            ),
            GgufError::BadAlignment { value: None } => {
                write!(f, "gguf: general.alignment is not an unsigned integer")
            }
            GgufError::DuplicateTensor { name, offset } => {
                write!(f, "gguf: duplicate tensor {name:?} at byte {offset}")
            }
            GgufError::TooManyDims {
                name,
                n_dims,
                offset,
            } => write!(
                f,
                "gguf: tensor {name:?} has {n_dims} dimensions (max {MAX_DIMS}) at byte {offset}"
            ),
            GgufError::UnsupportedTensorType {
                name,
                type_id,
                offset,
            } => write!(
                f,
                "gguf: tensor {name:?} has unsupported ggml type {type_id} at byte {offset}"
            ),
            GgufError::BadShape {
                name,
                dims,
                reason,
                offset,
            } => write!(
                f,
                "gguf: tensor {name:?} (info at byte {offset}) has bad shape {dims:?}: {reason}"
            ),
            GgufError::MisalignedTensor {
                name,
                tensor_offset,
                alignment,
            } => write!(
                f,
                "gguf: tensor {name:?} offset {tensor_offset} is not a multiple of {alignment}"
            ),
            GgufError::TensorOutOfBounds {
                name,
                start,
                size,
                file_len,
            } => write!(
                f,
                "gguf: tensor {name:?} data [{start}, {start}+{size}) lies outside the \
                 {file_len}-byte file"
            ),
        }
    }
}

impl std::error::Error for GgufError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            GgufError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<std::io::Error> for GgufError {
    fn from(e: std::io::Error) -> Self {
        GgufError::Io(e)
    }
}

/// The metadata value types, by their GGUF type id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ValueType {
    /// 0
    U8 = 0,
    /// 1
    I8 = 1,
    /// 2
    U16 = 2,
    /// 3
    I16 = 3,
    /// 4
    U32 = 4,
    /// 5
    I32 = 5,
    /// 6
    F32 = 6,
    /// 7
    Bool = 7,
    /// 8
    String = 8,
    /// 9
    Array = 9,
    /// 10
    U64 = 10,
    /// 11
    I64 = 11,
    /// 12
    F64 = 12,
}

impl ValueType {
    /// The type with GGUF type id `id`, if any.
    pub fn from_id(id: u32) -> Option<ValueType> {
        Some(match id {
            0 => ValueType::U8,
            1 => ValueType::I8,
            2 => ValueType::U16,
            3 => ValueType::I16,
            4 => ValueType::U32,
            5 => ValueType::I32,
            6 => ValueType::F32,
            7 => ValueType::Bool,
            8 => ValueType::String,
            9 => ValueType::Array,
            10 => ValueType::U64,
            11 => ValueType::I64,
            12 => ValueType::F64,
            _ => return None,
        })
    }

    /// The fewest bytes one value of this type occupies in the file (a string is at least its
    /// `u64` length, an array at least its `u32` type and `u64` count). Used to reject
    /// impossible counts before allocating.
    fn min_encoded_size(self) -> u64 {
        match self {
            ValueType::U8 | ValueType::I8 | ValueType::Bool => 1,
            ValueType::U16 | ValueType::I16 => 2,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 4,
            ValueType::U64 | ValueType::I64 | ValueType::F64 | ValueType::String => 8,
            ValueType::Array => 12,
        }
    }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Type 0.
    U8(u8),
    /// Type 1.
    I8(i8),
    /// Type 2.
    U16(u16),
    /// Type 3.
    I16(i16),
    /// Type 4.
    U32(u32),
    /// Type 5.
    I32(i32),
    /// Type 6.
    F32(f32),
    /// Type 7.
    Bool(bool),
    /// Type 8.
    String(String),
    /// Type 9.
    Array(Array),
    /// Type 10.
    U64(u64),
    /// Type 11.
    I64(i64),
    /// Type 12.
    F64(f64),
}

/// A typed metadata array. Stored per element type (rather than as `Vec<Value>`) so a large
/// array costs what its elements cost, not a `Value` each.
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    /// Elements of type 0.
    U8(Vec<u8>),
    /// Elements of type 1.
    I8(Vec<i8>),
    /// Elements of type 2.
    U16(Vec<u16>),
    /// Elements of type 3.
    I16(Vec<i16>),
    /// Elements of type 4.
    U32(Vec<u32>),
    /// Elements of type 5.
    I32(Vec<i32>),
    /// Elements of type 6.
    F32(Vec<f32>),
    /// Elements of type 7.
    Bool(Vec<bool>),
    /// Elements of type 8.
    String(Vec<String>),
    /// Elements of type 9 (each with its own element type).
    Array(Vec<Array>),
    /// Elements of type 10.
    U64(Vec<u64>),
    /// Elements of type 11.
    I64(Vec<i64>),
    /// Elements of type 12.
    F64(Vec<f64>),
}

impl Array {
    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::Array(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type.
    pub fn element_type(&self) -> ValueType {
        match self {
            Array::U8(_) => ValueType::U8,
            Array::I8(_) => ValueType::I8,
            Array::U16(_) => ValueType::U16,
            Array::I16(_) => ValueType::I16,
            Array::U32(_) => ValueType::U32,
            Array::I32(_) => ValueType::I32,
            Array::F32(_) => ValueType::F32,
            Array::Bool(_) => ValueType::Bool,
            Array::String(_) => ValueType::String,
            Array::Array(_) => ValueType::Array,
            Array::U64(_) => ValueType::U64,
            Array::I64(_) => ValueType::I64,
            Array::F64(_) => ValueType::F64,
        }
    }

    /// The elements as `i64`s, if the array holds integers that all fit. Allocates.
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        fn conv<T: Copy>(v: &[T], f: impl Fn(T) -> Option<i64>) -> Option<Vec<i64>> {
            v.iter().map(|&x| f(x)).collect()
        }
        match self {
            Array::U8(v) => conv(v, |x| Some(i64::from(x))),
            Array::I8(v) => conv(v, |x| Some(i64::from(x))),
            Array::U16(v) => conv(v, |x| Some(i64::from(x))),
            Array::I16(v) => conv(v, |x| Some(i64::from(x))),
            Array::U32(v) => conv(v, |x| Some(i64::from(x))),
            Array::I32(v) => conv(v, |x| Some(i64::from(x))),
            Array::U64(v) => conv(v, |x| i64::try_from(x).ok()),
            Array::I64(v) => Some(v.clone()),
            _ => None,
        }
    }
}

impl Value {
    /// The value's type.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(_) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// The value as an `i128`, if it is an integer of any width (wide enough for every
    /// GGUF integer type, so conversions to narrower types can be checked in one place).
    fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(x) => x.into(),
            Value::I8(x) => x.into(),
            Value::U16(x) => x.into(),
            Value::I16(x) => x.into(),
            Value::U32(x) => x.into(),
            Value::I32(x) => x.into(),
            Value::U64(x) => x.into(),
            Value::I64(x) => x.into(),
            _ => return None,
        })
    }

    /// The value as a `u64`, if it is an integer that fits.
    pub fn as_u64(&self) -> Option<u64> {
        self.as_i128().and_then(|x| u64::try_from(x).ok())
    }

    /// The value as a `u32`, if it is an integer that fits.
    pub fn as_u32(&self) -> Option<u32> {
        self.as_i128().and_then(|x| u32::try_from(x).ok())
    }

    /// The value as an `i64`, if it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        self.as_i128().and_then(|x| i64::try_from(x).ok())
    }

    /// The value as an `f32`: an `f32`, or an `f64` rounded to nearest.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(x) => Some(x),
            // Rounding is what a reader wants from a wider float key; there is no exact form.
            Value::F64(x) => Some(x as f32),
            _ => None,
        }
    }

    /// The value as an `f64`, if it is a float.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(x) => Some(x.into()),
            Value::F64(x) => Some(x),
            _ => None,
        }
    }

    /// The value as a `bool`.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// The ggml tensor element types this reader knows the block layout of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    /// 32-bit float (id 0).
    F32,
    /// IEEE half (id 1).
    F16,
    /// 4-bit, 32 per block: f16 scale + 16 bytes (id 2).
    Q4_0,
    /// 4-bit, 32 per block: f16 scale, f16 min + 16 bytes (id 3).
    Q4_1,
    /// 5-bit, 32 per block (id 6).
    Q5_0,
    /// 5-bit with min, 32 per block (id 7).
    Q5_1,
    /// 8-bit, 32 per block: f16 scale + 32 bytes (id 8).
    Q8_0,
    /// 8-bit with sum, 32 per block (id 9).
    Q8_1,
    /// 2-bit k-quant, 256 per block (id 10).
    Q2_K,
    /// 3-bit k-quant, 256 per block (id 11).
    Q3_K,
    /// 4-bit k-quant, 256 per block (id 12).
    Q4_K,
    /// 5-bit k-quant, 256 per block (id 13).
    Q5_K,
    /// 6-bit k-quant, 256 per block (id 14).
    Q6_K,
    /// 8-bit k-quant, 256 per block (id 15).
    Q8_K,
    /// 8-bit integer (id 24).
    I8,
    /// 16-bit integer (id 25).
    I16,
    /// 32-bit integer (id 26).
    I32,
    /// 64-bit integer (id 27).
    I64,
    /// 64-bit float (id 28).
    F64,
    /// bfloat16 (id 30).
    BF16,
}

impl GgmlType {
    /// The type with ggml type id `id`, if this reader knows it.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            9 => GgmlType::Q8_1,
            10 => GgmlType::Q2_K,
            11 => GgmlType::Q3_K,
            12 => GgmlType::Q4_K,
            13 => GgmlType::Q5_K,
            14 => GgmlType::Q6_K,
            15 => GgmlType::Q8_K,
            24 => GgmlType::I8,
            25 => GgmlType::I16,
            26 => GgmlType::I32,
            27 => GgmlType::I64,
            28 => GgmlType::F64,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// The ggml type id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q8_1 => 9,
            GgmlType::Q2_K => 10,
            GgmlType::Q3_K => 11,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::Q8_K => 15,
            GgmlType::I8 => 24,
            GgmlType::I16 => 25,
            GgmlType::I32 => 26,
            GgmlType::I64 => 27,
            GgmlType::F64 => 28,
            GgmlType::BF16 => 30,
        }
    }

    /// Elements per block (1 for plain types).
    pub fn block_size(self) -> u64 {
        match self {
            GgmlType::F32
            | GgmlType::F16
            | GgmlType::I8
            | GgmlType::I16
            | GgmlType::I32
            | GgmlType::I64
            | GgmlType::F64
            | GgmlType::BF16 => 1,
            GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q8_1 => 32,
            GgmlType::Q2_K
            | GgmlType::Q3_K
            | GgmlType::Q4_K
            | GgmlType::Q5_K
            | GgmlType::Q6_K
            | GgmlType::Q8_K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> u64 {
        match self {
            GgmlType::I8 => 1,
            GgmlType::F16 | GgmlType::BF16 | GgmlType::I16 => 2,
            GgmlType::F32 | GgmlType::I32 => 4,
            GgmlType::F64 | GgmlType::I64 => 8,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q8_1 => 36,
            GgmlType::Q2_K => 84,
            GgmlType::Q3_K => 110,
            GgmlType::Q4_K => 144,
            GgmlType::Q5_K => 176,
            GgmlType::Q6_K => 210,
            GgmlType::Q8_K => 292,
        }
    }

    /// Bytes taken by `n_elements` elements, or `None` if `n_elements` is not a whole number
    /// of blocks or the size overflows.
    pub fn bytes_for(self, n_elements: u64) -> Option<u64> {
        if !n_elements.is_multiple_of(self.block_size()) {
            return None;
        }
        (n_elements / self.block_size()).checked_mul(self.block_bytes())
    }
}

/// One tensor's description, validated against the file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// The tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions, innermost (contiguous) first: a `[rows, cols]` matrix has `dims = [cols,
    /// rows]`.
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section, in bytes.
    pub offset: u64,
    /// Number of elements (product of `dims`).
    pub n_elements: u64,
    /// Size of the data in bytes.
    pub size: u64,
}

/// A tensor and its bytes, borrowed from a [`Gguf`].
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    /// The tensor name.
    pub name: &'a str,
    /// Dimensions, innermost first.
    pub dims: &'a [u64],
    /// Element type.
    pub ggml_type: GgmlType,
    /// The raw data, `TensorInfo::size` bytes, in ggml's block layout.
    pub data: &'a [u8],
}

/// A parsed GGUF file. Owns the file bytes; tensor views borrow from it.
#[derive(Debug)]
pub struct Gguf {
    bytes: Vec<u8>,
    version: u32,
    metadata: Vec<(String, Value)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    /// Absolute offset of the data section. `usize` because the whole file is in memory.
    data_offset: usize,
}

impl Gguf {
    /// Reads and parses the file at `path`. The bytes are read into memory advised to use
    /// huge pages (see [`crate::arena::HeapArena::new`]): every decode step streams all the
    /// weights, and with 4 KiB pages each page costs a TLB miss.
    pub fn open(path: impl AsRef<Path>) -> Result<Gguf, GgufError> {
        use std::io::Read;
        let mut file = std::fs::File::open(path)?;
        let len = usize::try_from(file.metadata()?.len()).unwrap_or(0);
        let mut bytes = Vec::new();
        // The length is a hint: a file that grows or shrinks meanwhile is still read whole.
        if bytes.try_reserve_exact(len.saturating_add(1)).is_ok() {
            crate::arena::advise_huge_pages(bytes.as_mut_ptr(), bytes.capacity());
        }
        file.read_to_end(&mut bytes)?;
        Gguf::from_bytes(bytes)
    }

    /// Parses a GGUF file held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Gguf, GgufError> {
        let mut r = Reader {
            bytes: &bytes,
            pos: 0,
        };

        let magic = r.array4("magic")?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic { found: magic });
        }
        let version = r.u32("version")?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion { version });
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;

        // Each pair is at least a key length (8), a type (4) and a one-byte value.
        let mut metadata = Vec::with_capacity(r.capacity_for(n_kv, 13));
        let mut metadata_index = HashMap::with_capacity(r.capacity_for(n_kv, 13));
        for _ in 0..n_kv {
            let at = r.offset();
            let key = r.string("metadata key")?;
            let type_at = r.offset();
            let type_id = r.u32("metadata value type")?;
            let ty = ValueType::from_id(type_id).ok_or(GgufError::InvalidValueType {
                type_id,
                offset: type_at,
            })?;
            let value = r.value(ty, 0)?;
            if metadata_index.contains_key(&key) {
                return Err(GgufError::DuplicateKey { key, offset: at });
            }
            metadata_index.insert(key.clone(), metadata.len());
            metadata.push((key, value));
        }

        let alignment = match metadata_index
            .get("general.alignment")
            .and_then(|&i| metadata.get(i))
        {
            None => DEFAULT_ALIGNMENT,
            Some((_, v)) => {
                let a = v.as_u64().ok_or(GgufError::BadAlignment { value: None })?;
                if a == 0 || !a.is_power_of_two() || a > u64::from(u32::MAX) {
                    return Err(GgufError::BadAlignment { value: Some(a) });
                }
                a
            }
        };

        // Each info is at least a name length (8), n_dims (4), type (4) and offset (8).
        let mut tensors = Vec::with_capacity(r.capacity_for(n_tensors, 24));
        let mut tensor_index = HashMap::with_capacity(r.capacity_for(n_tensors, 24));
        for _ in 0..n_tensors {
            let at = r.offset();
            let info = r.tensor_info(at, alignment)?;
            if tensor_index.contains_key(&info.name) {
                return Err(GgufError::DuplicateTensor {
                    name: info.name,
                    offset: at,
                });
            }
            tensor_index.insert(info.name.clone(), tensors.len());
            tensors.push(info);
        }

        // The data section starts at the next multiple of the alignment. `pos <= len` and the
        // alignment is at most 2^32, so this only overflows on absurd address spaces; check
        // anyway.
        let file_len = bytes.len() as u64;
        let data_offset =
            (r.offset())
                .checked_next_multiple_of(alignment)
                .ok_or(GgufError::Truncated {
                    what: "data section",
                    offset: r.offset(),
                    needed: alignment,
                    available: 0,
                })?;
        for t in &tensors {
            let out_of_bounds = || GgufError::TensorOutOfBounds {
                name: t.name.clone(),
                start: data_offset.saturating_add(t.offset),
                size: t.size,
                file_len,
            };
            let start = data_offset
                .checked_add(t.offset)
                .ok_or_else(out_of_bounds)?;
            let end = start.checked_add(t.size).ok_or_else(out_of_bounds)?;
            if end > file_len {
                return Err(out_of_bounds());
            }
        }
        // Every tensor ends inside the file, so either there are none or `data_offset` is at
        // most the file length; either way it fits a usize when it matters. With no tensors
        // the padding may be missing, which is harmless.
        let data_offset = usize::try_from(data_offset).unwrap_or(usize::MAX);

        Ok(Gguf {
            bytes,
            version,
            metadata,
            metadata_index,
            tensors,
            tensor_index,
            alignment,
            data_offset,
        })
    }

    /// The format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The data-section alignment in bytes.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// The absolute byte offset of the data section.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// All metadata pairs in file order.
    pub fn metadata_entries(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// The metadata value under `key`.
    pub fn metadata(&self, key: &str) -> Option<&Value> {
        let &i = self.metadata_index.get(key)?;
        self.metadata.get(i).map(|(_, v)| v)
    }

    /// An integer value of any width under `key`, if it fits a `u32`.
    pub fn get_u32(&self, key: &str) -> Option<u32> {
        self.metadata(key)?.as_u32()
    }

    /// An integer value of any width under `key`, if it fits a `u64`.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.metadata(key)?.as_u64()
    }

    /// An integer value of any width under `key`, if it fits an `i64`.
    pub fn get_i64(&self, key: &str) -> Option<i64> {
        self.metadata(key)?.as_i64()
    }

    /// A float value under `key` (`f64` rounded to `f32`).
    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.metadata(key)?.as_f32()
    }

    /// A bool value under `key`.
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.metadata(key)?.as_bool()
    }

    /// A string value under `key`.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.metadata(key)?.as_str()
    }

    /// A string array under `key`.
    pub fn get_string_array(&self, key: &str) -> Option<&[String]> {
        match self.metadata(key)?.as_array()? {
            Array::String(v) => Some(v),
            _ => None,
        }
    }

    /// An `f32` array under `key`.
    pub fn get_f32_array(&self, key: &str) -> Option<&[f32]> {
        match self.metadata(key)?.as_array()? {
            Array::F32(v) => Some(v),
            _ => None,
        }
    }

    /// An integer array of any width under `key`, converted to `i32` (`None` if any element
    /// does not fit). Allocates.
    pub fn get_i32_array(&self, key: &str) -> Option<Vec<i32>> {
        match self.metadata(key)?.as_array()? {
            Array::I32(v) => Some(v.clone()),
            a => a
                .to_i64_vec()?
                .into_iter()
                .map(|x| i32::try_from(x).ok())
                .collect(),
        }
    }

    /// All tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor called `name`, with its bytes.
    pub fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        let &i = self.tensor_index.get(name)?;
        self.view(self.tensors.get(i)?)
    }

    /// The view of a tensor from [`Gguf::tensors`]. `None` only if `info` did not come from
    /// this file and lies outside it.
    pub fn view<'a>(&'a self, info: &'a TensorInfo) -> Option<TensorView<'a>> {
        let start = self
            .data_offset
            .checked_add(usize::try_from(info.offset).ok()?)?;
        let end = start.checked_add(usize::try_from(info.size).ok()?)?;
        Some(TensorView {
            name: &info.name,
            dims: &info.dims,
            ggml_type: info.ggml_type,
            data: self.bytes.get(start..end)?,
        })
    }
}

/// A bounds-checked little-endian cursor over the file bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.pos)
    }

    /// How many items of at least `min_size` bytes each to preallocate for a claimed `count`:
    /// never more than the remaining bytes could hold, so a hostile count cannot make us
    /// allocate more than a small multiple of the file size.
    fn capacity_for(&self, count: u64, min_size: u64) -> usize {
        let fit = self.remaining() as u64 / min_size.max(1);
        usize::try_from(count.min(fit)).unwrap_or(0)
    }

    fn truncated(&self, what: &'static str, needed: u64) -> GgufError {
        GgufError::Truncated {
            what,
            offset: self.offset(),
            needed,
            available: self.remaining() as u64,
        }
    }

    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], GgufError> {
        let len = usize::try_from(n).map_err(|_| self.truncated(what, n))?;
        let end = self
            .pos
            .checked_add(len)
            .ok_or_else(|| self.truncated(what, n))?;
        let slice = self
            .bytes
            .get(self.pos..end)
            .ok_or_else(|| self.truncated(what, n))?;
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }

    fn array4(&mut self, what: &'static str) -> Result<[u8; 4], GgufError> {
        self.array::<4>(what)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &'static str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let at = self.offset();
        let raw = self.take(len, what)?;
        std::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| GgufError::InvalidUtf8 { offset: at })
    }

    fn bool(&mut self) -> Result<bool, GgufError> {
        let at = self.offset();
        match self.array::<1>("bool")?[0] {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(GgufError::InvalidBool { value, offset: at }),
        }
    }

    /// Reads one value of type `ty`; `depth` counts enclosing arrays.
    fn value(&mut self, ty: ValueType, depth: u32) -> Result<Value, GgufError> {
        Ok(match ty {
            ValueType::U8 => Value::U8(u8::from_le_bytes(self.array("u8 value")?)),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array("i8 value")?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array("u16 value")?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array("i16 value")?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array("u32 value")?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array("i32 value")?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array("f32 value")?)),
            ValueType::Bool => Value::Bool(self.bool()?),
            ValueType::String => Value::String(self.string("string value")?),
            ValueType::Array => Value::Array(self.array_value(depth)?),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array("u64 value")?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array("i64 value")?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array("f64 value")?)),
        })
    }

    /// Reads an array body (element type, count, elements).
    fn array_value(&mut self, depth: u32) -> Result<Array, GgufError> {
        let at = self.offset();
        if depth >= MAX_ARRAY_DEPTH {
            return Err(GgufError::NestingTooDeep { offset: at });
        }
        let type_id = self.u32("array element type")?;
        let ty = ValueType::from_id(type_id).ok_or(GgufError::InvalidValueType {
            type_id,
            offset: at,
        })?;
        let count = self.u64("array length")?;
        // Reject counts the rest of the file cannot possibly hold before reading anything.
        let min_bytes = count.saturating_mul(ty.min_encoded_size());
        if min_bytes > self.remaining() as u64 {
            return Err(self.truncated("array elements", min_bytes));
        }
        let cap = self.capacity_for(count, ty.min_encoded_size());

        /// Reads `count` fixed-size elements with `f`.
        fn fixed<T, const N: usize>(
            r: &mut Reader<'_>,
            count: u64,
            cap: usize,
            what: &'static str,
            f: fn([u8; N]) -> T,
        ) -> Result<Vec<T>, GgufError> {
            let mut v = Vec::with_capacity(cap);
            for _ in 0..count {
                v.push(f(r.array(what)?));
            }
            Ok(v)
        }

        Ok(match ty {
            ValueType::U8 => Array::U8(fixed(self, count, cap, "u8 element", u8::from_le_bytes)?),
            ValueType::I8 => Array::I8(fixed(self, count, cap, "i8 element", i8::from_le_bytes)?),
            ValueType::U16 => {
                Array::U16(fixed(self, count, cap, "u16 element", u16::from_le_bytes)?)
            }
            ValueType::I16 => {
                Array::I16(fixed(self, count, cap, "i16 element", i16::from_le_bytes)?)
            }
            ValueType::U32 => {
                Array::U32(fixed(self, count, cap, "u32 element", u32::from_le_bytes)?)
            }
            ValueType::I32 => {
                Array::I32(fixed(self, count, cap, "i32 element", i32::from_le_bytes)?)
            }
            ValueType::F32 => {
                Array::F32(fixed(self, count, cap, "f32 element", f32::from_le_bytes)?)
            }
            ValueType::U64 => {
                Array::U64(fixed(self, count, cap, "u64 element", u64::from_le_bytes)?)
            }
            ValueType::I64 => {
                Array::I64(fixed(self, count, cap, "i64 element", i64::from_le_bytes)?)
            }
            ValueType::F64 => {
                Array::F64(fixed(self, count, cap, "f64 element", f64::from_le_bytes)?)
            }
            ValueType::Bool => {
                let mut v = Vec::with_capacity(cap);
                for _ in 0..count {
                    v.push(self.bool()?);
                }
                Array::Bool(v)
            }
            ValueType::String => {
                let mut v = Vec::with_capacity(cap);
                for _ in 0..count {
                    v.push(self.string("string element")?);
                }
                Array::String(v)
            }
            ValueType::Array => {
                let mut v = Vec::with_capacity(cap);
                for _ in 0..count {
                    v.push(self.array_value(depth + 1)?);
                }
                Array::Array(v)
            }
        })
    }

    /// Reads and validates one tensor info starting at `at`.
    fn tensor_info(&mut self, at: u64, alignment: u64) -> Result<TensorInfo, GgufError> {
        let name = self.string("tensor name")?;
        let dims_at = self.offset();
        let n_dims = self.u32("tensor dimension count")?;
        if n_dims > MAX_DIMS {
            return Err(GgufError::TooManyDims {
                name,
                n_dims,
                offset: dims_at,
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.u64("tensor dimension")?);
        }
        let type_at = self.offset();
        let type_id = self.u32("tensor type")?;
        let ggml_type =
            GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnsupportedTensorType {
                name: name.clone(),
                type_id,
                offset: type_at,
            })?;
        let offset = self.u64("tensor offset")?;

        let bad_shape = |name: String, dims: Vec<u64>, reason| GgufError::BadShape {
            name,
            dims,
            reason,
            offset: at,
        };
        // ggml stores dimensions and element counts as i64.
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| i64::try_from(n).is_ok());
        let Some(n_elements) = n_elements else {
            return Err(bad_shape(name, dims, "element count overflows"));
        };
        // Blocks run along the innermost dimension, so it (and hence the count) must be a
        // whole number of them.
        let block = ggml_type.block_size();
        if dims.first().is_some_and(|&d| d % block != 0) || n_elements % block != 0 {
            return Err(bad_shape(
                name,
                dims,
                "innermost dimension is not a whole number of blocks",
            ));
        }
        let Some(size) = ggml_type.bytes_for(n_elements) else {
            return Err(bad_shape(name, dims, "byte size overflows"));
        };
        if offset % alignment != 0 {
            return Err(GgufError::MisalignedTensor {
                name,
                tensor_offset: offset,
                alignment,
            });
        }
        Ok(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            n_elements,
            size,
        })
    }
}
