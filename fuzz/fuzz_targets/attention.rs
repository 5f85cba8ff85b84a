//! Bytes → a small cache (geometry, formats, window and sinks, a key tail for quantized keys,
//! from the first bytes), a few
//! sequences of stored tokens (a fork among them, values mostly moderate, raw bits
//! sometimes), then attention calls with batches built from the bytes: stale and unknown
//! sequence ids, positions and token counts up to `usize::MAX`, zero or huge splits and
//! tiles, NaN scales, short buffers. Every call must return (no panic) and leave the cache's
//! invariants intact; an accepted call with moderate inputs gives finite outputs, bitwise the
//! same as its work items run in reverse order on the plan API and merged.
#![no_main]

use kvcache::attention::{attention, attention_scratch_len, AttentionOptions, AttentionPlan, BatchEntry};
use kvcache::spec::Kind;
use kvcache::{CacheSpec, KvCache, KvFormat, Layout, SeqId};
use libfuzzer_sys::fuzz_target;

mod bytes;
use bytes::Bytes;

const FORMATS: [KvFormat; 5] = [KvFormat::F32, KvFormat::F16, KvFormat::Bf16, KvFormat::Int8, KvFormat::Int4];

fuzz_target!(|data: &[u8]| {
    let mut bytes = Bytes::new(data);
    let kv_heads = 1 + bytes.below(3);
    let layers = 1 + bytes.below(2);
    let q_heads = kv_heads * (1 + bytes.below(4));
    // Every head dim up to 40, and one time in four 32 or 64 (the integer-weight path of int4
    // values).
    let head_dim = if bytes.below(4) == 0 { 32 * (1 + bytes.below(2)) } else { 1 + bytes.below(40) };
    let mut spec = CacheSpec::new(layers, q_heads, kv_heads, head_dim);
    // Small blocks, and one time in four the default 16 (the fused softmax kernel's fast path).
    spec.block_tokens = if bytes.below(4) == 0 { 16 } else { 1 + bytes.below(6) };
    spec.k_format = FORMATS[bytes.below(5)];
    spec.v_format = FORMATS[bytes.below(5)];
    spec.max_seqs = 4;
    spec.max_seq_tokens = 48;
    match bytes.below(6) {
        0 | 1 => {
            spec.window = 1 + bytes.below(20);
            spec.sink_tokens = bytes.below(spec.window + 1);
        }
        // Windows wider than any sequence, up to `usize::MAX`: they keep every key.
        2 => {
            spec.window = usize::MAX - bytes.below(3) * (usize::MAX / 2);
            spec.sink_tokens = bytes.below(spec.max_seq_tokens + 1);
        }
        _ => {}
    }
    // Quantized keys: half the time a key tail of 1..=12 tokens.
    if !spec.k_format.is_float() && bytes.below(2) == 0 {
        spec.key_tail_tokens = 1 + bytes.below(12);
    }
    let Ok(layout) = Layout::new(spec) else { return };
    let Ok(arena_bytes) = layout.arena_bytes(1 + bytes.below(24)) else { return };
    let mut arena = vec![0u8; arena_bytes];
    let Ok(mut cache) = KvCache::new(spec, &mut arena) else { return };

    // Sequences: the first ones live, one removed (a stale id), one forked.
    let elems = spec.kv_heads * spec.head_dim;
    let mut ids: Vec<SeqId> = Vec::new();
    // Whether every value written is moderate (|x| < 1e4): then scores cannot overflow.
    let mut moderate = true;
    for _ in 0..1 + bytes.below(3) {
        let Ok(seq) = cache.add_sequence() else { break };
        ids.push(seq);
        let n = bytes.below(30);
        let Ok(range) = cache.reserve(seq, n) else { continue };
        for layer in 0..spec.layers {
            let k: Vec<f32> = (0..n * elems).map(|_| bytes.value()).collect();
            let v: Vec<f32> = (0..n * elems).map(|_| bytes.value()).collect();
            moderate &= k.iter().chain(&v).all(|x| x.abs() < 1e4);
            // A refused write (non-finite input for a format that rejects it) leaves the
            // reserved slots unwritten; attention over them is still memory-safe.
            let _ = cache.write_run(seq, layer, range.start, &k, &v);
        }
    }
    if bytes.below(2) == 0 {
        if let Some(&last) = ids.last() {
            if cache.remove(last).is_ok() {
                // Kept in `ids`: a stale id for the batches below.
            }
        }
    }
    if let Some(&first) = ids.first() {
        if let Ok(child) = cache.fork(first) {
            ids.push(child);
            if let Ok(range) = cache.reserve(child, 1) {
                for layer in 0..spec.layers {
                    let row: Vec<f32> = (0..elems).map(|_| bytes.value()).collect();
                    moderate &= row.iter().all(|x| x.abs() < 1e4);
                    let _ = cache.write_run(child, layer, range.start, &row, &row);
                }
            }
        }
    }
    cache.check_invariants().expect("invariants after setup");
    // The quantized formats refuse non-finite input, so nothing they store reads back as NaN
    // (huge finite input saturates; the int4 rotation must not overflow into inf - inf). The
    // float formats store NaN as given.
    let mut row = vec![0.0f32; spec.head_dim];
    for &seq in &ids {
        for position in 0..cache.len(seq).unwrap_or(0) {
            for (layer, kind, head) in (0..spec.layers).flat_map(|l| {
                [Kind::K, Kind::V].into_iter().flat_map(move |k| (0..spec.kv_heads).map(move |h| (l, k, h)))
            }) {
                let format = if kind == Kind::K { spec.k_format } else { spec.v_format };
                if !format.is_float() && cache.read_row(seq, layer, kind, head, position, &mut row).is_ok() {
                    assert!(row.iter().all(|x| !x.is_nan()), "NaN stored at {position} {kind:?}");
                }
            }
        }
    }

    while !bytes.done() {
        let mut entries = Vec::new();
        for _ in 0..bytes.below(4) {
            let Some(&seq) = ids.get(bytes.below(ids.len().max(1))) else { break };
            let len = cache.len(seq).unwrap_or(0);
            let (first_position, tokens) = if bytes.below(4) == 0 {
                (bytes.count(), bytes.count())
            } else {
                let tokens = 1 + bytes.below(len.max(1));
                (len.saturating_sub(tokens), tokens.min(len))
            };
            entries.push(BatchEntry { seq, first_position, tokens });
        }
        let options = AttentionOptions {
            scale: match bytes.below(8) {
                0 => Some(f32::NAN),
                1 => Some(bytes.value()),
                _ => None,
            },
            splits: if bytes.below(8) == 0 { bytes.count() } else { 1 + bytes.below(4) },
            query_tile: if bytes.below(8) == 0 { bytes.count() } else { 1 + bytes.below(5) },
            exact_values: bytes.below(4) == 0,
        };
        let layer = if bytes.below(16) == 0 { bytes.count() } else { bytes.below(spec.layers) };
        let queries_len = entries.iter().map(|e| e.tokens.min(1 << 12)).sum::<usize>() * spec.q_heads * spec.head_dim;
        let short = bytes.below(16) == 0;
        let queries: Vec<f32> = (0..queries_len.saturating_sub(short as usize)).map(|_| bytes.value()).collect();
        let queries_moderate = queries.iter().all(|x| x.abs() < 1e4);
        let scratch_len = attention_scratch_len(&cache, &options).min(1 << 20);
        let mut scratch = vec![0.0f32; scratch_len.saturating_sub((bytes.below(16) == 0) as usize)];
        let mut out = vec![f32::NAN; queries.len()];
        let result = attention(&cache, layer, &entries, &queries, &mut out, &mut scratch, &options);
        cache.check_invariants().expect("invariants after attention");
        if result.is_err() {
            continue;
        }
        let moderate_scale = options.scale.map_or(true, |s| s.is_finite() && s.abs() < 1e3);
        if moderate && queries_moderate && moderate_scale {
            assert!(out.iter().all(|x| x.is_finite()), "non-finite output from moderate inputs");
        }
        // The plan API, items in reverse order, must give the same bits.
        let plan = AttentionPlan::new(&cache, layer, &entries, &options).expect("accepted once");
        let items = plan.work_items();
        if items > 4096 {
            continue;
        }
        let mut partials = vec![0.0f32; items * plan.partial_len()];
        let mut item_scratch = vec![0.0f32; plan.scratch_len()];
        for index in (0..items).rev() {
            let partial = &mut partials[index * plan.partial_len()..(index + 1) * plan.partial_len()];
            plan.run_item(index, &queries, partial, &mut item_scratch).expect("item");
        }
        let mut merged = vec![f32::NAN; queries.len()];
        plan.merge(&partials, &mut merged).expect("merge");
        for (a, b) in out.iter().zip(&merged) {
            assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "plan differs: {a} vs {b}");
        }
    }
});
