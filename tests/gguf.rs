//! GGUF reader: the real model file (skipped when absent), synthetic round trips, and hostile
//! input (truncation, corruption, random bytes).

use kvcache::model::gguf::{Array, GgmlType, Gguf, GgufError, Value};
use proptest::prelude::*;
use std::path::PathBuf;

fn model_path() -> Option<PathBuf> {
    let p = std::env::var_os("KVCACHE_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if p.exists() {
        Some(p)
    } else {
        println!("skipped: model file {} not found", p.display());
        None
    }
}

/// A minimal GGUF writer for building test files.
struct Writer {
    version: u32,
    alignment: u64,
    kv: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

impl Writer {
    fn new() -> Self {
        Writer {
            version: 3,
            alignment: 32,
            kv: Vec::new(),
            tensors: Vec::new(),
        }
    }

    fn kv(mut self, key: &str, v: Value) -> Self {
        self.kv.push((key.to_owned(), v));
        self
    }

    fn tensor(mut self, name: &str, dims: &[u64], ty: GgmlType) -> Self {
        let n: u64 = dims.iter().product();
        let size = ty.bytes_for(n).expect("test tensor shape") as usize;
        // Distinct, recognisable bytes per tensor.
        let seed = self.tensors.len() as u8;
        let data = (0..size)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        self.tensors
            .push((name.to_owned(), dims.to_vec(), ty, data));
        self
    }

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn type_id(v: &Value) -> u32 {
        v.value_type() as u32
    }

    fn array(out: &mut Vec<u8>, a: &Array) {
        out.extend_from_slice(&(a.element_type() as u32).to_le_bytes());
        out.extend_from_slice(&(a.len() as u64).to_le_bytes());
        match a {
            Array::U8(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Array::I8(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Array::U16(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Array::I16(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Array::U32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Array::I32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Array::F32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Array::Bool(v) => v.iter().for_each(|&x| out.push(x as u8)),
            Array::String(v) => v.iter().for_each(|s| Self::string(out, s)),
            Array::Array(v) => v.iter().for_each(|a| Self::array(out, a)),
            Array::U64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Array::I64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Array::F64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        }
    }

    fn value(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U8(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::Bool(x) => out.push(*x as u8),
            Value::String(s) => Self::string(out, s),
            Value::Array(a) => Self::array(out, a),
            Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        }
    }

    /// Serialises the file. The last tensor's data ends exactly at the end of the file, so
    /// every truncation removes something the reader needs.
    fn build(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            Self::string(&mut out, k);
            out.extend_from_slice(&Self::type_id(v).to_le_bytes());
            Self::value(&mut out, v);
        }
        let align = |x: u64| x.div_ceil(self.alignment) * self.alignment;
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for (name, dims, ty, data) in &self.tensors {
            Self::string(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            dims.iter()
                .for_each(|d| out.extend_from_slice(&d.to_le_bytes()));
            out.extend_from_slice(&ty.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = align(offset + data.len() as u64);
        }
        if !self.tensors.is_empty() {
            out.resize(align(out.len() as u64) as usize, 0);
            let base = out.len();
            for ((_, _, _, data), off) in self.tensors.iter().zip(&offsets) {
                out.resize(base + *off as usize, 0);
                out.extend_from_slice(data);
            }
        }
        out
    }
}

fn all_value_kinds() -> Writer {
    Writer::new()
        .kv("general.architecture", Value::String("llama".into()))
        .kv("t.u8", Value::U8(200))
        .kv("t.i8", Value::I8(-5))
        .kv("t.u16", Value::U16(60000))
        .kv("t.i16", Value::I16(-30000))
        .kv("t.u32", Value::U32(4_000_000_000))
        .kv("t.i32", Value::I32(-2_000_000_000))
        .kv("t.f32", Value::F32(1.5))
        .kv("t.bool", Value::Bool(true))
        .kv("t.u64", Value::U64(1 << 40))
        .kv("t.i64", Value::I64(-(1 << 40)))
        .kv("t.f64", Value::F64(0.25))
        .kv("t.empty", Value::String(String::new()))
        .kv("t.unicode", Value::String("héllo ✓ 🦀".into()))
        .kv(
            "t.strs",
            Value::Array(Array::String(vec!["a".into(), "".into(), "Ġthe".into()])),
        )
        .kv("t.f32s", Value::Array(Array::F32(vec![1.0, -2.0, 0.5])))
        .kv("t.i32s", Value::Array(Array::I32(vec![1, -1, 3])))
        .kv("t.u8s", Value::Array(Array::U8(vec![1, 2, 255])))
        .kv("t.bools", Value::Array(Array::Bool(vec![true, false])))
        .kv(
            "t.nested",
            Value::Array(Array::Array(vec![
                Array::U16(vec![7, 8]),
                Array::Array(vec![Array::F64(vec![1.25])]),
                Array::String(vec![]),
            ])),
        )
}

fn with_tensors(w: Writer) -> Writer {
    w.tensor("tok.weight", &[64, 3], GgmlType::Q8_0)
        .tensor("norm", &[5], GgmlType::F32)
        .tensor("q4", &[32, 2], GgmlType::Q4_1)
        .tensor("q40", &[32], GgmlType::Q4_0)
        .tensor("h", &[3, 1, 1, 2], GgmlType::F16)
        .tensor("b", &[7], GgmlType::BF16)
}

#[test]
fn real_model_facts() {
    let Some(path) = model_path() else { return };
    let g = Gguf::open(&path).expect("model parses");
    assert_eq!(g.version(), 3);
    assert_eq!(g.get_str("general.architecture"), Some("llama"));
    assert_eq!(g.get_u32("llama.block_count"), Some(30));
    assert_eq!(g.get_u32("llama.attention.head_count"), Some(9));
    assert_eq!(g.get_u32("llama.attention.head_count_kv"), Some(3));
    assert_eq!(g.get_u32("llama.embedding_length"), Some(576));
    assert_eq!(g.get_f32("llama.rope.freq_base"), Some(100000.0));
    assert_eq!(g.get_str("tokenizer.ggml.model"), Some("gpt2"));
    assert_eq!(
        g.get_string_array("tokenizer.ggml.tokens").map(<[_]>::len),
        Some(49152)
    );
    assert_eq!(
        g.get_i32_array("tokenizer.ggml.token_type")
            .map(|v| v.len()),
        Some(49152)
    );
    assert_eq!(g.tensors().len(), 272);
    let emb = g.tensor("token_embd.weight").expect("token_embd.weight");
    assert_eq!(emb.dims, &[576, 49152]);
    assert_eq!(emb.ggml_type, GgmlType::Q8_0);
    assert_eq!(emb.data.len(), 576 / 32 * 34 * 49152);
    let q = g.tensor("blk.0.attn_q.weight").expect("attn_q");
    assert_eq!(q.dims, &[576, 576]);
    assert_eq!(q.ggml_type, GgmlType::Q4_1);
    assert_eq!(q.data.len(), 576 * 576 / 32 * 20);
    assert_eq!(
        g.tensor("blk.0.attn_norm.weight").map(|t| t.ggml_type),
        Some(GgmlType::F32)
    );
    assert_eq!(g.data_offset() % 32, 0);
    for t in g.tensors() {
        let v = g.tensor(&t.name).expect("every listed tensor has a view");
        assert_eq!(v.data.len() as u64, t.size);
    }
}

#[test]
fn round_trip_all_value_kinds() {
    let w = with_tensors(all_value_kinds());
    let bytes = w.build();
    let g = Gguf::from_bytes(bytes.clone()).expect("parses");
    assert_eq!(g.version(), 3);
    for (k, v) in &w.kv {
        assert_eq!(g.metadata(k), Some(v), "key {k}");
    }
    assert_eq!(g.metadata_entries().len(), w.kv.len());
    // Typed getters, integers converting where lossless.
    assert_eq!(g.get_u32("t.u8"), Some(200));
    assert_eq!(g.get_u32("t.u16"), Some(60000));
    assert_eq!(g.get_u32("t.i8"), None);
    assert_eq!(g.get_i64("t.i8"), Some(-5));
    assert_eq!(g.get_u32("t.u64"), None);
    assert_eq!(g.get_u64("t.u64"), Some(1 << 40));
    assert_eq!(g.get_f32("t.f32"), Some(1.5));
    assert_eq!(g.get_f32("t.f64"), Some(0.25));
    assert_eq!(g.get_bool("t.bool"), Some(true));
    assert_eq!(g.get_str("t.unicode"), Some("héllo ✓ 🦀"));
    assert_eq!(g.get_str("t.u8"), None);
    assert_eq!(g.get_string_array("t.strs").map(<[_]>::len), Some(3));
    assert_eq!(g.get_f32_array("t.f32s"), Some(&[1.0f32, -2.0, 0.5][..]));
    assert_eq!(g.get_i32_array("t.i32s"), Some(vec![1, -1, 3]));
    assert_eq!(g.get_i32_array("t.u8s"), Some(vec![1, 2, 255]));
    assert_eq!(g.get_i32_array("t.strs"), None);
    assert_eq!(g.metadata("missing"), None);

    assert_eq!(g.tensors().len(), w.tensors.len());
    for (name, dims, ty, data) in &w.tensors {
        let t = g.tensor(name).expect("tensor present");
        assert_eq!(t.name, name);
        assert_eq!(t.dims, &dims[..]);
        assert_eq!(t.ggml_type, *ty);
        assert_eq!(t.data, &data[..], "tensor {name}");
    }
    assert!(g.tensor("nope").is_none());
    assert_eq!(g.data_offset() % 32, 0);
}

#[test]
fn version_2_and_custom_alignment() {
    let mut w = with_tensors(Writer::new().kv("general.alignment", Value::U32(64)));
    w.version = 2;
    w.alignment = 64;
    let g = Gguf::from_bytes(w.build()).expect("parses");
    assert_eq!(g.version(), 2);
    assert_eq!(g.alignment(), 64);
    assert_eq!(g.data_offset() % 64, 0);
    assert_eq!(g.tensor("norm").map(|t| t.data.len()), Some(20));
}

#[test]
fn empty_file_with_header_only() {
    let g = Gguf::from_bytes(Writer::new().build()).expect("parses");
    assert!(g.tensors().is_empty());
    assert!(g.metadata_entries().is_empty());
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = with_tensors(all_value_kinds()).build();
    for len in 0..bytes.len() {
        let r = Gguf::from_bytes(bytes[..len].to_vec());
        assert!(
            r.is_err(),
            "truncated to {len} of {} bytes parsed",
            bytes.len()
        );
        // Display must work and name a location.
        let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.starts_with("gguf:"), "{msg}");
    }
}

#[test]
fn every_corruption_is_handled() {
    let bytes = with_tensors(all_value_kinds()).build();
    for i in 0..bytes.len() {
        for x in [0x00u8, 0xff, 0x80, 0x01, 0x7f] {
            if bytes[i] == x {
                continue;
            }
            let mut b = bytes.clone();
            b[i] = x;
            // Must not panic; corrupting the magic or version must be an error.
            if let Ok(g) = Gguf::from_bytes(b) {
                assert!(i >= 8, "corrupt byte {i} in magic/version accepted");
                for t in g.tensors() {
                    let v = g.tensor(&t.name).expect("listed tensor has a view");
                    assert_eq!(v.data.len() as u64, t.size);
                }
            }
        }
    }
}

#[test]
fn specific_errors() {
    let good = with_tensors(all_value_kinds()).build();

    let mut b = good.clone();
    b[0] = b'X';
    assert!(matches!(
        Gguf::from_bytes(b),
        Err(GgufError::BadMagic { .. })
    ));

    let mut b = good.clone();
    b[4] = 9;
    assert!(matches!(
        Gguf::from_bytes(b),
        Err(GgufError::UnsupportedVersion { version: 9 })
    ));

    // 2^60 metadata pairs: fails fast, without a huge allocation.
    let mut b = good.clone();
    b[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(Gguf::from_bytes(b).is_err());

    // 2^60 tensors.
    let mut b = good.clone();
    b[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(Gguf::from_bytes(b).is_err());

    // An array of 2^60 strings.
    let w = Writer::new().kv("big", Value::Array(Array::String(vec!["x".into()])));
    let mut b = w.build();
    let count_at = 24 + 8 + 3 + 4 + 4;
    b[count_at..count_at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let e = Gguf::from_bytes(b).expect_err("hostile count");
    assert!(matches!(e, GgufError::Truncated { .. }), "{e}");

    // A string claiming 2^63 bytes.
    let w = Writer::new().kv("s", Value::String("abc".into()));
    let mut b = w.build();
    let len_at = 24 + 8 + 1 + 4;
    b[len_at..len_at + 8].copy_from_slice(&(1u64 << 63).to_le_bytes());
    assert!(matches!(
        Gguf::from_bytes(b),
        Err(GgufError::Truncated { .. })
    ));

    // Invalid value type.
    let w = Writer::new().kv("k", Value::U8(1));
    let mut b = w.build();
    b[24 + 8 + 1] = 13;
    assert!(matches!(
        Gguf::from_bytes(b),
        Err(GgufError::InvalidValueType { type_id: 13, .. })
    ));

    // Duplicate key and duplicate tensor.
    let w = Writer::new().kv("k", Value::U8(1)).kv("k", Value::U8(2));
    assert!(matches!(
        Gguf::from_bytes(w.build()),
        Err(GgufError::DuplicateKey { .. })
    ));
    let w = Writer::new()
        .tensor("t", &[4], GgmlType::F32)
        .tensor("t", &[4], GgmlType::F32);
    assert!(matches!(
        Gguf::from_bytes(w.build()),
        Err(GgufError::DuplicateTensor { .. })
    ));

    // Bad alignment.
    let w = Writer::new().kv("general.alignment", Value::U32(48));
    assert!(matches!(
        Gguf::from_bytes(w.build()),
        Err(GgufError::BadAlignment { .. })
    ));

    // A quantized tensor whose row is not a whole number of blocks.
    let w = Writer::new().tensor("t", &[64], GgmlType::Q4_0);
    let mut b = w.build();
    let dim_at = 24 + 8 + 1 + 4;
    b[dim_at..dim_at + 8].copy_from_slice(&48u64.to_le_bytes());
    assert!(matches!(
        Gguf::from_bytes(b),
        Err(GgufError::BadShape { .. })
    ));

    // Tensor data beyond the end of the file.
    let w = Writer::new().tensor("t", &[8], GgmlType::F32);
    let mut b = w.build();
    b.pop();
    assert!(matches!(
        Gguf::from_bytes(b),
        Err(GgufError::TensorOutOfBounds { .. })
    ));

    // Deeply nested arrays are refused, not recursed into.
    let mut a = Array::U8(vec![]);
    for _ in 0..40 {
        a = Array::Array(vec![a]);
    }
    let w = Writer::new().kv("deep", Value::Array(a));
    assert!(matches!(
        Gguf::from_bytes(w.build()),
        Err(GgufError::NestingTooDeep { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Gguf::from_bytes(bytes);
    }

    #[test]
    fn random_bodies_after_a_valid_header_never_panic(
        n_tensors in 0u64..4,
        n_kv in 0u64..4,
        body in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&n_tensors.to_le_bytes());
        b.extend_from_slice(&n_kv.to_le_bytes());
        b.extend_from_slice(&body);
        if let Ok(g) = Gguf::from_bytes(b) {
            for t in g.tensors() {
                prop_assert!(g.tensor(&t.name).is_some());
            }
        }
    }

    #[test]
    fn mutated_valid_files_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut b = with_tensors(all_value_kinds()).build();
        for (i, x) in edits {
            let at = i.index(b.len());
            b[at] = x;
        }
        if let Ok(g) = Gguf::from_bytes(b) {
            for t in g.tensors() {
                let v = g.tensor(&t.name);
                prop_assert!(v.is_some_and(|v| v.data.len() as u64 == t.size));
            }
        }
    }
}
