//! Damages the synthetic model's GGUF file (bytes patched in its metadata and tensor infos, or
//! anywhere, and the file cut short) and runs what still loads: the file must be refused with
//! an error, or load into a model that tokenizes a prompt, runs it and four decode steps
//! through a small cache of a drawn format, and samples, all without a panic. A step that
//! fails (a cache refusing non-finite keys, say) must leave its sequence's length as it was,
//! and the cache's invariants must hold at the end.
#![no_main]

use std::sync::OnceLock;

use kvcache::model::gguf::Gguf;
use kvcache::model::llama::{Model, Runner, Step};
use kvcache::model::sampler::{Sampler, SamplerConfig};
use kvcache::{KvCache, KvFormat};
use libfuzzer_sys::fuzz_target;

/// The undamaged file.
fn healthy() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| kvcache::model::synthetic::synthetic_gguf(3))
}

fuzz_target!(|data: &[u8]| {
    let Some((&options, patches)) = data.split_first() else {
        return;
    };
    let mut bytes = healthy().to_vec();
    // Each patch: a 3-byte offset (into the first 4 KiB, where the metadata and tensor infos
    // are, when the mode's low bit is set), a value and a mode (set, xor or add).
    for patch in patches.chunks_exact(5) {
        let offset = u32::from_le_bytes([patch[0], patch[1], patch[2], 0]) as usize;
        let at = if patch[4] & 1 == 1 { offset % 4096 } else { offset } % bytes.len();
        bytes[at] = match patch[4] / 2 % 3 {
            0 => patch[3],
            1 => bytes[at] ^ patch[3],
            _ => bytes[at].wrapping_add(patch[3]),
        };
    }
    if options & 0x80 != 0 {
        let keep = bytes.len() * usize::from(options & 0x7f) / 128;
        bytes.truncate(keep);
    }
    let Ok(gguf) = Gguf::from_bytes(bytes) else {
        return;
    };
    let Ok(model) = Model::from_gguf(gguf) else {
        return;
    };
    let format = [KvFormat::F16, KvFormat::Int8, KvFormat::Int4][usize::from(options) % 3];
    let Ok((spec, mut arena)) = kvcache::cli::generate::cache_arena(&model, format, 1, 24) else {
        return;
    };
    let Ok(mut cache) = KvCache::new(spec, arena.as_mut_slice()) else {
        return;
    };
    let seq = cache.add_sequence().expect("an empty cache takes a sequence");
    let vocab = model.config().vocab;
    let mut prompt = model.tokenizer().encode("Hi <|im_start|>é!");
    prompt.retain(|&id| (id as usize) < vocab);
    prompt.truncate(16);
    if prompt.is_empty() {
        prompt.push(0);
    }
    let mut logits = vec![0.0f32; vocab];
    let mut runner = Runner::new(&model, 1);
    let mut sampler = Sampler::new(SamplerConfig::greedy());
    let mut tokens = prompt;
    for _ in 0..5 {
        let before = cache.len(seq).expect("live");
        let step = [Step { seq, tokens: &tokens }];
        match runner.forward(&mut cache, &step, &mut logits) {
            Ok(()) => assert_eq!(cache.len(seq), Ok(before + tokens.len())),
            Err(_) => {
                assert_eq!(cache.len(seq), Ok(before), "a failed step changed the sequence");
                break;
            }
        }
        let next = sampler.sample(&logits);
        assert!((next as usize) < vocab, "sampled {next} of {vocab}");
        let _ = model.tokenizer().decode(next);
        tokens = vec![next];
    }
    cache.check_invariants().expect("invariants");
});
