//! How long saving and restoring one sequence takes: SmolLM2-135M's cache geometry at 8192
//! tokens, per storage format (one thread, best of 5; the bytes are checksummed both ways).
//!
//! `cargo run --release --example snapshot_timing`

use std::time::Instant;

use kvcache::arena::HeapArena;
use kvcache::{CacheSpec, KvCache, KvFormat, Layout};

fn main() {
    let tokens = 8192;
    println!("SmolLM2-135M geometry, {tokens} tokens, one thread, best of 5 runs");
    for format in [KvFormat::F16, KvFormat::Int8, KvFormat::Int4] {
        let mut spec = CacheSpec::smollm2_135m();
        spec.k_format = format;
        spec.v_format = format;
        spec.max_seqs = 2;
        spec.max_seq_tokens = tokens;
        let blocks = 2 * tokens.div_ceil(spec.block_tokens);
        let layout = Layout::new(spec).unwrap();
        let mut arena = HeapArena::new(layout.arena_bytes(blocks).unwrap()).unwrap();
        let mut cache = KvCache::with_blocks(spec, blocks, arena.as_mut_slice()).unwrap();
        let seq = cache.add_sequence().unwrap();
        cache.reserve(seq, tokens).unwrap();
        let elems = spec.kv_heads * spec.head_dim;
        let run = 256;
        let values: Vec<f32> = (0..run * elems)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        for layer in 0..spec.layers {
            for first in (0..tokens).step_by(run) {
                cache
                    .write_run(seq, layer, first, &values, &values)
                    .unwrap();
            }
        }
        let mut bytes = vec![0u8; cache.exported_len(seq).unwrap()];
        let (mut save, mut restore) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..5 {
            let start = Instant::now();
            cache.export_sequence(seq, &mut bytes).unwrap();
            save = save.min(start.elapsed().as_secs_f64());
            let start = Instant::now();
            let restored = cache.import_sequence(&bytes).unwrap();
            restore = restore.min(start.elapsed().as_secs_f64());
            cache.remove(restored).unwrap();
        }
        let mb = bytes.len() as f64 / 1e6;
        println!(
            "{:>5}: {mb:7.1} MB, save {:6.1} ms ({:.2} GB/s), restore {:6.1} ms ({:.2} GB/s)",
            format.name(),
            save * 1e3,
            mb / 1e3 / save,
            restore * 1e3,
            mb / 1e3 / restore
        );
    }
}
