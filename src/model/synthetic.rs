//! A small synthetic Llama model, built in memory as a GGUF file: the demo runs it through the
//! same reader, tokenizer, forward pass and cache as the real model, and tests use it where
//! the real file is not needed.
//!
//! Geometry: 2 layers, width 64, 4 query heads on 2 KV heads (head dim 16), feed-forward 128,
//! a byte-level vocabulary of 256 tokens plus `<|endoftext|>`; Q4_1 layer weights, a Q8_0
//! embedding tied to the output, f32 norms, all drawn from a seeded generator.

use super::quant::{quantize_row, WeightType};

const LAYERS: usize = 2;
const EMBED: usize = 64;
const FFN: usize = 128;
const HEADS: u32 = 4;
const KV_HEADS: u32 = 2;
const VOCAB: usize = 257;

/// The GPT-2 byte-to-character map: printable bytes stand for themselves, the others for
/// code points from 256 on.
fn byte_symbol(byte: u8) -> char {
    let printable = |b: u8| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    if printable(byte) {
        return byte as char;
    }
    let rank = (0..byte).filter(|&b| !printable(b)).count() as u32;
    char::from_u32(256 + rank).unwrap_or('?')
}

struct Writer {
    bytes: Vec<u8>,
}

impl Writer {
    fn u32(&mut self, v: u32) {
        self.bytes.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes.extend_from_slice(&v.to_le_bytes());
    }
    fn string(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.bytes.extend_from_slice(s.as_bytes());
    }
    fn key_u32(&mut self, key: &str, v: u32) {
        self.string(key);
        self.u32(4);
        self.u32(v);
    }
    fn key_f32(&mut self, key: &str, v: f32) {
        self.string(key);
        self.u32(6);
        self.bytes.extend_from_slice(&v.to_le_bytes());
    }
    fn key_str(&mut self, key: &str, v: &str) {
        self.string(key);
        self.u32(8);
        self.string(v);
    }
}

/// Seeded values in [-1, 1) (SplitMix64).
struct Values(u64);

impl Values {
    fn next(&mut self) -> f32 {
        super::sampler::unit_f32(super::sampler::splitmix64(&mut self.0))
    }
}

/// The bytes of the synthetic model's GGUF file for `seed`.
pub fn synthetic_gguf(seed: u64) -> Vec<u8> {
    let mut values = Values(seed);
    // (name, rows, cols, type, data)
    let mut tensors: Vec<(String, usize, usize, u32, Vec<u8>)> = Vec::new();
    let mut matrix = |name: String,
                      rows: usize,
                      cols: usize,
                      ty: WeightType,
                      scale: f32,
                      values: &mut Values| {
        let row_bytes = ty.row_bytes(cols).unwrap_or(0);
        let mut data = vec![0u8; rows * row_bytes];
        let mut row = vec![0.0f32; cols];
        for chunk in data.chunks_exact_mut(row_bytes) {
            row.iter_mut().for_each(|v| *v = values.next() * scale);
            let _ = quantize_row(ty, &row, chunk);
        }
        tensors.push((name, rows, cols, ty.ggml_id(), data));
    };
    matrix(
        "token_embd.weight".into(),
        VOCAB,
        EMBED,
        WeightType::Q8_0,
        1.0,
        &mut values,
    );
    let kv = KV_HEADS as usize * (EMBED / HEADS as usize);
    for layer in 0..LAYERS {
        let name = |part: &str| format!("blk.{layer}.{part}.weight");
        let attn = 1.0 / (EMBED as f32).sqrt();
        matrix(
            name("attn_q"),
            EMBED,
            EMBED,
            WeightType::Q4_1,
            3.0 * attn,
            &mut values,
        );
        matrix(
            name("attn_k"),
            kv,
            EMBED,
            WeightType::Q4_1,
            3.0 * attn,
            &mut values,
        );
        matrix(
            name("attn_v"),
            kv,
            EMBED,
            WeightType::Q4_1,
            attn,
            &mut values,
        );
        matrix(
            name("attn_output"),
            EMBED,
            EMBED,
            WeightType::Q4_1,
            attn,
            &mut values,
        );
        matrix(
            name("ffn_gate"),
            FFN,
            EMBED,
            WeightType::Q4_1,
            attn,
            &mut values,
        );
        matrix(
            name("ffn_up"),
            FFN,
            EMBED,
            WeightType::Q4_1,
            attn,
            &mut values,
        );
        matrix(
            name("ffn_down"),
            EMBED,
            FFN,
            WeightType::Q4_1,
            1.0 / (FFN as f32).sqrt(),
            &mut values,
        );
    }
    let ones: Vec<u8> = (0..EMBED).flat_map(|_| 1.0f32.to_le_bytes()).collect();
    let norm_names = (0..LAYERS).flat_map(|l| {
        [
            format!("blk.{l}.attn_norm.weight"),
            format!("blk.{l}.ffn_norm.weight"),
        ]
    });
    for name in norm_names.chain(["output_norm.weight".to_string()]) {
        tensors.push((name, 1, EMBED, 0, ones.clone()));
    }

    let mut w = Writer { bytes: Vec::new() };
    w.bytes.extend_from_slice(b"GGUF");
    w.u32(3);
    w.u64(tensors.len() as u64);
    w.u64(13);
    w.key_str("general.architecture", "llama");
    w.key_str("general.name", "kvcache synthetic");
    w.key_u32("llama.block_count", LAYERS as u32);
    w.key_u32("llama.embedding_length", EMBED as u32);
    w.key_u32("llama.feed_forward_length", FFN as u32);
    w.key_u32("llama.attention.head_count", HEADS);
    w.key_u32("llama.attention.head_count_kv", KV_HEADS);
    w.key_f32("llama.rope.freq_base", 10_000.0);
    w.key_f32("llama.attention.layer_norm_rms_epsilon", 1e-5);
    w.key_str("tokenizer.ggml.model", "gpt2");
    w.string("tokenizer.ggml.tokens");
    w.u32(9);
    w.u32(8);
    w.u64(VOCAB as u64);
    for byte in 0..=255u8 {
        w.string(&byte_symbol(byte).to_string());
    }
    w.string("<|endoftext|>");
    w.string("tokenizer.ggml.token_type");
    w.u32(9);
    w.u32(5);
    w.u64(VOCAB as u64);
    for id in 0..VOCAB {
        w.u32(if id == VOCAB - 1 { 3 } else { 1 });
    }
    w.key_u32("tokenizer.ggml.eos_token_id", VOCAB as u32 - 1);
    let mut offset = 0u64;
    for (name, rows, cols, ty, data) in &tensors {
        w.string(name);
        if *rows == 1 {
            w.u32(1);
            w.u64(*cols as u64);
        } else {
            w.u32(2);
            w.u64(*cols as u64);
            w.u64(*rows as u64);
        }
        w.u32(*ty);
        w.u64(offset);
        offset += (data.len() as u64).div_ceil(32) * 32;
    }
    while !w.bytes.len().is_multiple_of(32) {
        w.bytes.push(0);
    }
    for (_, _, _, _, data) in &tensors {
        w.bytes.extend_from_slice(data);
        while !w.bytes.len().is_multiple_of(32) {
            w.bytes.push(0);
        }
    }
    w.bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::Gguf;
    use crate::model::llama::Model;

    #[test]
    fn the_synthetic_model_loads_and_tokenizes_bytes() {
        let model = Model::from_gguf(Gguf::from_bytes(synthetic_gguf(1)).unwrap()).unwrap();
        assert_eq!(model.config().layers, 2);
        assert_eq!(model.config().head_dim, 16);
        let ids = model.tokenizer().encode("héllo<|endoftext|>");
        assert_eq!(ids.len(), 7);
        assert_eq!(*ids.last().unwrap(), 256);
        assert_eq!(model.tokenizer().decode_all(&ids[..6]), "héllo");
    }
}
