//! The C ABI with bad input: NULL pointers, small or misaligned handle memory, bad specs,
//! wrong lengths, stale ids. Each gets a status; nothing crashes or changes.

use kvcache::ffi::*;
use std::ptr::{null, null_mut};

fn spec() -> KvcSpec {
    KvcSpec {
        layers: 2,
        q_heads: 4,
        kv_heads: 2,
        head_dim: 8,
        block_tokens: 4,
        k_format: 1,
        v_format: 0,
        max_seqs: 2,
        max_seq_tokens: 64,
        window: 0,
        sink_tokens: 0,
        key_tail_tokens: 0,
    }
}

#[repr(C, align(64))]
struct Handle([u8; 1024]);

/// A cache built through the C ABI, with the arena and handle memory it lives in (both in
/// `Vec`s: moving one keeps the pointers into its buffer valid, where moving a `Box` would not
/// under Rust's aliasing rules).
struct CCache {
    arena: Vec<u8>,
    _handle: Vec<Handle>,
    cache: *mut KvcCache,
}

impl CCache {
    fn new(spec: &KvcSpec, blocks: u32) -> CCache {
        let mut bytes = 0usize;
        // SAFETY: valid pointers; the arena and handle memory move into the result with their
        // heap buffers unmoved, and outlive the handle's uses.
        unsafe {
            assert_eq!(kvc_arena_bytes(spec, blocks, &mut bytes), KvcStatus::Ok);
            let mut arena = vec![0u8; bytes];
            let mut handle = Vec::with_capacity(1);
            handle.push(Handle([0; 1024]));
            let mut cache: *mut KvcCache = null_mut();
            let status = kvc_cache_init(
                handle.as_mut_ptr().cast(),
                1024,
                spec,
                arena.as_mut_ptr(),
                bytes,
                &mut cache,
            );
            assert_eq!(status, KvcStatus::Ok);
            CCache {
                arena,
                _handle: handle,
                cache,
            }
        }
    }
}

#[test]
fn every_entry_point_refuses_bad_input() {
    unsafe {
        let mut bytes = 0usize;
        assert_eq!(
            kvc_arena_bytes(null(), 4, &mut bytes),
            KvcStatus::NullPointer
        );
        assert_eq!(
            kvc_arena_bytes(&spec(), 4, null_mut()),
            KvcStatus::NullPointer
        );
        let mut bad = spec();
        bad.k_format = 9;
        assert_eq!(kvc_arena_bytes(&bad, 4, &mut bytes), KvcStatus::BadSpec);
        bad = spec();
        bad.q_heads = 3;
        assert_eq!(kvc_arena_bytes(&bad, 4, &mut bytes), KvcStatus::BadSpec);
        assert_eq!(kvc_arena_bytes(&spec(), 4, &mut bytes), KvcStatus::Ok);

        let mut arena = vec![0u8; bytes];
        let mut handle = Box::new(Handle([0; 1024]));
        assert!(kvc_cache_size() <= 1024);
        let mut cache: *mut KvcCache = null_mut();
        let h = handle.0.as_mut_ptr();
        assert_eq!(
            kvc_cache_init(
                null_mut(),
                1024,
                &spec(),
                arena.as_mut_ptr(),
                bytes,
                &mut cache
            ),
            KvcStatus::NullPointer
        );
        assert_eq!(
            kvc_cache_init(
                h.add(1),
                1000,
                &spec(),
                arena.as_mut_ptr(),
                bytes,
                &mut cache
            ),
            KvcStatus::ArenaTooSmall
        );
        assert_eq!(
            kvc_cache_init(h, 8, &spec(), arena.as_mut_ptr(), bytes, &mut cache),
            KvcStatus::ArenaTooSmall
        );
        assert_eq!(
            kvc_cache_init(h, 1024, &spec(), arena.as_mut_ptr(), 10, &mut cache),
            KvcStatus::ArenaTooSmall
        );
        assert!(cache.is_null());
        assert_eq!(
            kvc_cache_init(h, 1024, &spec(), arena.as_mut_ptr(), bytes, &mut cache),
            KvcStatus::Ok
        );

        let mut seq = 0u64;
        assert_eq!(
            kvc_add_sequence(null_mut(), &mut seq),
            KvcStatus::NullPointer
        );
        assert_eq!(kvc_add_sequence(cache, null_mut()), KvcStatus::NullPointer);
        assert_eq!(kvc_add_sequence(cache, &mut seq), KvcStatus::Ok);
        let mut first = 7u32;
        assert_eq!(kvc_reserve(cache, seq, 3, &mut first), KvcStatus::Ok);
        assert_eq!(first, 0);
        assert_eq!(
            kvc_reserve(cache, seq, 1000, null_mut()),
            KvcStatus::TooLong
        );
        assert_eq!(
            kvc_reserve(cache, seq ^ (1 << 40), 1, null_mut()),
            KvcStatus::UnknownSequence
        );
        let k = [1.0f32; 3 * 16];
        assert_eq!(
            kvc_write(cache, seq, 0, 0, null(), k.as_ptr(), 48),
            KvcStatus::NullPointer
        );
        assert_eq!(
            kvc_write(cache, seq, 0, 0, k.as_ptr(), k.as_ptr(), 47),
            KvcStatus::BadShape
        );
        assert_eq!(
            kvc_write(cache, seq, 5, 0, k.as_ptr(), k.as_ptr(), 48),
            KvcStatus::BadIndex
        );
        let nan = [f32::NAN; 48];
        assert_eq!(
            kvc_write(cache, seq, 0, 0, nan.as_ptr(), k.as_ptr(), 48),
            KvcStatus::Ok
        ); // float formats hold NaN
        assert_eq!(
            kvc_write(cache, seq, 0, 0, k.as_ptr(), k.as_ptr(), 48),
            KvcStatus::Ok
        );
        let (mut ko, mut vo) = (vec![0.0f32; 16], vec![0.0f32; 16]);
        assert_eq!(
            kvc_read(cache, seq, 0, 2, ko.as_mut_ptr(), vo.as_mut_ptr(), 16),
            KvcStatus::Ok
        );
        assert_eq!(ko, vec![1.0; 16]);
        assert_eq!(
            kvc_read(cache, seq, 0, 3, ko.as_mut_ptr(), vo.as_mut_ptr(), 16),
            KvcStatus::BadPosition
        );
        assert_eq!(
            kvc_read(cache, seq, 0, 0, null_mut(), vo.as_mut_ptr(), 16),
            KvcStatus::NullPointer
        );
        let mut child = 0u64;
        assert_eq!(kvc_fork(cache, seq, null_mut()), KvcStatus::NullPointer);
        assert_eq!(kvc_fork(cache, seq, &mut child), KvcStatus::Ok);
        assert_eq!(
            kvc_fork(cache, seq, &mut child),
            KvcStatus::TooManySequences
        );
        assert_eq!(kvc_truncate(cache, child, 9), KvcStatus::BadPosition);
        assert_eq!(kvc_remove(cache, child), KvcStatus::Ok);
        assert_eq!(kvc_remove(cache, child), KvcStatus::UnknownSequence);
        let mut scratch_len = 0usize;
        assert_eq!(
            kvc_attention_scratch_len(cache, &mut scratch_len),
            KvcStatus::Ok
        );
        let mut scratch = vec![0.0f32; scratch_len];
        let q = [0.5f32; 32];
        let mut out = vec![0.0f32; 32];
        let entry = KvcBatchEntry {
            seq,
            first_position: 2,
            tokens: 1,
        };
        assert_eq!(
            kvc_attention(
                cache,
                1,
                &entry,
                1,
                q.as_ptr(),
                out.as_mut_ptr(),
                32,
                scratch.as_mut_ptr(),
                scratch_len
            ),
            KvcStatus::Ok
        );
        assert_eq!(
            kvc_attention(
                cache,
                1,
                &entry,
                1,
                q.as_ptr(),
                out.as_mut_ptr(),
                31,
                scratch.as_mut_ptr(),
                scratch_len
            ),
            KvcStatus::BadShape
        );
        assert_eq!(
            kvc_attention(
                cache,
                1,
                &entry,
                1,
                q.as_ptr(),
                out.as_mut_ptr(),
                32,
                scratch.as_mut_ptr(),
                1
            ),
            KvcStatus::ScratchTooSmall
        );
        assert_eq!(
            kvc_attention(
                cache,
                1,
                null(),
                1,
                q.as_ptr(),
                out.as_mut_ptr(),
                32,
                scratch.as_mut_ptr(),
                scratch_len
            ),
            KvcStatus::NullPointer
        );
        let late = KvcBatchEntry {
            seq,
            first_position: 3,
            tokens: 1,
        };
        assert_eq!(
            kvc_attention(
                cache,
                1,
                &late,
                1,
                q.as_ptr(),
                out.as_mut_ptr(),
                32,
                scratch.as_mut_ptr(),
                scratch_len
            ),
            KvcStatus::BadPosition
        );
        let mut stats = KvcStats::default();
        assert_eq!(kvc_stats_get(cache, null_mut()), KvcStatus::NullPointer);
        assert_eq!(kvc_stats_get(cache, &mut stats), KvcStatus::Ok);
        assert_eq!((stats.sequences, stats.tokens), (1, 3));
        let mut message = [0 as std::ffi::c_char; 8];
        let full = kvc_status_message(7, message.as_mut_ptr(), message.len());
        assert_eq!(full, "out of blocks".len());
        assert_eq!(
            std::ffi::CStr::from_ptr(message.as_ptr()).to_str().unwrap(),
            "out of "
        );
        assert_eq!(
            kvc_status_message(999, null_mut(), 0),
            "unknown status".len()
        );
    }
}

/// Deterministic values in [-1, 1).
fn values(seed: &mut u64, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| kvcache::model::sampler::unit_f32(kvcache::model::sampler::splitmix64(seed)))
        .collect()
}

/// The work-item calls, items run on three threads in reverse order, give bitwise what the
/// Rust plan gives run in order, and what `kvc_attention` gives up to summation order; bad
/// arguments get a status and write nothing.
#[test]
fn attention_work_items_from_c_threads_match() {
    let spec = KvcSpec {
        layers: 2,
        q_heads: 6,
        kv_heads: 2,
        head_dim: 16,
        block_tokens: 4,
        k_format: 1,
        v_format: 1,
        max_seqs: 2,
        max_seq_tokens: 64,
        window: 0,
        sink_tokens: 0,
        key_tail_tokens: 0,
    };
    let c = CCache::new(&spec, 32);
    let cache = c.cache;
    unsafe {
        let mut seed = 7u64;
        let mut entries = Vec::new();
        for (len, first, tokens) in [(37u32, 36u32, 1u32), (5, 0, 5)] {
            let mut seq = 0u64;
            assert_eq!(kvc_add_sequence(cache, &mut seq), KvcStatus::Ok);
            assert_eq!(kvc_reserve(cache, seq, len, null_mut()), KvcStatus::Ok);
            let n = (len * 2 * 16) as usize;
            for layer in 0..2 {
                let (k, v) = (values(&mut seed, n), values(&mut seed, n));
                assert_eq!(
                    kvc_write(cache, seq, layer, 0, k.as_ptr(), v.as_ptr(), n),
                    KvcStatus::Ok
                );
            }
            entries.push(KvcBatchEntry {
                seq,
                first_position: first,
                tokens,
            });
        }
        let len = 6 * 6 * 16;
        let queries = values(&mut seed, len);
        let opts = KvcAttentionOptions {
            splits: 3,
            query_tile: 2,
            scale: 0.0,
            flags: 0,
        };
        let (mut items, mut partial_len, mut scratch_len) = (0usize, 0usize, 0usize);
        let c = cache.cast_const();
        assert_eq!(
            kvc_attention_plan(
                c,
                1,
                entries.as_ptr(),
                2,
                &opts,
                &mut items,
                &mut partial_len,
                &mut scratch_len
            ),
            KvcStatus::Ok
        );
        // (1 + 3 tiles) × 2 KV heads × 3 splits.
        assert_eq!(items, 24);
        let mut partials = vec![0.0f32; items * partial_len];
        let cache_addr = c as usize;
        std::thread::scope(|scope| {
            for (t, chunk) in partials.chunks_mut(8 * partial_len).enumerate().rev() {
                let (entries, queries) = (&entries, &queries);
                scope.spawn(move || {
                    let mut scratch = vec![0.0f32; scratch_len];
                    for (i, partial) in chunk.chunks_mut(partial_len).enumerate().rev() {
                        let status = kvc_attention_run_item(
                            cache_addr as *const KvcCache,
                            1,
                            entries.as_ptr(),
                            2,
                            &opts,
                            t * 8 + i,
                            queries.as_ptr(),
                            len,
                            partial.as_mut_ptr(),
                            partial_len,
                            scratch.as_mut_ptr(),
                            scratch_len,
                        );
                        assert_eq!(status, KvcStatus::Ok);
                    }
                });
            }
        });
        let mut out = vec![0.0f32; len];
        assert_eq!(
            kvc_attention_merge(
                c,
                1,
                entries.as_ptr(),
                2,
                &opts,
                partials.as_ptr(),
                partials.len(),
                out.as_mut_ptr(),
                len
            ),
            KvcStatus::Ok
        );

        // The Rust plan, items in order on this thread.
        let rust_entries: Vec<_> = entries
            .iter()
            .map(|e| kvcache::attention::BatchEntry {
                seq: kvcache::SeqId::from_raw(e.seq),
                first_position: e.first_position as usize,
                tokens: e.tokens as usize,
            })
            .collect();
        let options = kvcache::attention::AttentionOptions {
            splits: 3,
            query_tile: 2,
            ..Default::default()
        };
        let plan = kvcache::attention::AttentionPlan::new(&*c, 1, &rust_entries, &options).unwrap();
        let mut rust_partials = vec![0.0f32; items * partial_len];
        let mut scratch = vec![0.0f32; scratch_len];
        for (i, partial) in rust_partials.chunks_mut(partial_len).enumerate() {
            plan.run_item(i, &queries, partial, &mut scratch).unwrap();
        }
        let mut rust_out = vec![0.0f32; len];
        plan.merge(&rust_partials, &mut rust_out).unwrap();
        assert_eq!(out, rust_out);

        // One call, default options: the same attention up to float summation order.
        let mut whole = vec![0.0f32; len];
        let mut one_len = 0usize;
        assert_eq!(
            kvc_attention_scratch_len(cache, &mut one_len),
            KvcStatus::Ok
        );
        let mut one_scratch = vec![0.0f32; one_len];
        assert_eq!(
            kvc_attention(
                cache,
                1,
                entries.as_ptr(),
                2,
                queries.as_ptr(),
                whole.as_mut_ptr(),
                len,
                one_scratch.as_mut_ptr(),
                one_len
            ),
            KvcStatus::Ok
        );
        for (a, b) in out.iter().zip(&whole) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }

        // Bad arguments: a status, nothing written.
        let mut partial = vec![0.0f32; partial_len];
        let mut run = |item: usize, opts: *const KvcAttentionOptions, partial: &mut [f32]| {
            kvc_attention_run_item(
                c,
                1,
                entries.as_ptr(),
                2,
                opts,
                item,
                queries.as_ptr(),
                len,
                partial.as_mut_ptr(),
                partial.len(),
                scratch.as_mut_ptr(),
                scratch_len,
            )
        };
        assert_eq!(run(items, &opts, &mut partial), KvcStatus::BadIndex);
        assert_eq!(run(0, &opts, &mut partial[..1]), KvcStatus::BadShape);
        let zero = KvcAttentionOptions { splits: 0, ..opts };
        assert_eq!(run(0, &zero, &mut partial), KvcStatus::BadSpec);
        let unknown = KvcAttentionOptions { flags: 2, ..opts };
        assert_eq!(run(0, &unknown, &mut partial), KvcStatus::BadSpec);
        assert!(partial.iter().all(|&x| x == 0.0));
        assert_eq!(
            kvc_attention_plan(
                null(),
                1,
                entries.as_ptr(),
                2,
                null(),
                &mut items,
                &mut partial_len,
                &mut scratch_len
            ),
            KvcStatus::NullPointer
        );
        assert_eq!(
            kvc_attention_plan(
                c,
                2,
                entries.as_ptr(),
                2,
                null(),
                &mut items,
                &mut partial_len,
                &mut scratch_len
            ),
            KvcStatus::BadIndex
        );
        assert_eq!(
            kvc_attention_merge(
                c,
                1,
                entries.as_ptr(),
                2,
                &opts,
                partials.as_ptr(),
                partials.len() - 1,
                out.as_mut_ptr(),
                len
            ),
            KvcStatus::BadShape
        );
        assert_eq!(
            kvc_attention_merge(
                c,
                1,
                null(),
                2,
                &opts,
                partials.as_ptr(),
                partials.len(),
                out.as_mut_ptr(),
                len
            ),
            KvcStatus::NullPointer
        );
    }
}

/// Buffers that overlap what a call writes, the handle or the arena are refused with
/// `KVC_BAD_SHAPE` before anything is touched (Rust references must not alias); disjoint
/// neighbours are fine.
#[test]
fn overlapping_buffers_are_refused() {
    unsafe {
        let mut bytes = 0usize;
        assert_eq!(kvc_arena_bytes(&spec(), 8, &mut bytes), KvcStatus::Ok);
        let mut arena = vec![0u8; bytes];
        let a = arena.as_mut_ptr();
        let align = kvc_cache_align();
        let inside = a.add(align - a as usize % align + 64);
        let mut cache: *mut KvcCache = null_mut();
        // The handle, or the pointer that receives it, inside the arena.
        assert_eq!(
            kvc_cache_init(inside, 1024, &spec(), a, bytes, &mut cache),
            KvcStatus::BadShape
        );
        let mut handle = Box::new(Handle([0; 1024]));
        let h = handle.0.as_mut_ptr();
        let out_in_arena = inside.cast::<*mut KvcCache>();
        assert_eq!(
            kvc_cache_init(h, 1024, &spec(), a, bytes, out_in_arena),
            KvcStatus::BadShape
        );
        assert_eq!(
            kvc_cache_init(h, 1024, &spec(), a, bytes, h.add(8).cast()),
            KvcStatus::BadShape
        );
        assert!(cache.is_null());
        assert_eq!(
            kvc_cache_init(h, 1024, &spec(), a, bytes, &mut cache),
            KvcStatus::Ok
        );
        let mut seq = 0u64;
        assert_eq!(kvc_add_sequence(cache, inside.cast()), KvcStatus::BadShape);
        assert_eq!(
            kvc_add_sequence(cache, h.add(16).cast()),
            KvcStatus::BadShape
        );
        assert_eq!(kvc_add_sequence(cache, &mut seq), KvcStatus::Ok);
        assert_eq!(
            kvc_reserve(cache, seq, 2, inside.cast()),
            KvcStatus::BadShape
        );
        assert_eq!(kvc_reserve(cache, seq, 2, null_mut()), KvcStatus::Ok);
        let k: Vec<f32> = (0..32).map(|i| i as f32).collect();
        let v: Vec<f32> = (0..32).map(|i| -(i as f32)).collect();
        let in_arena = inside.cast::<f32>();
        assert_eq!(
            kvc_write(cache, seq, 0, 0, in_arena, v.as_ptr(), 32),
            KvcStatus::BadShape
        );
        assert_eq!(
            kvc_write(cache, seq, 0, 0, k.as_ptr(), h.cast(), 32),
            KvcStatus::BadShape
        );
        // Inputs may overlap each other.
        assert_eq!(
            kvc_write(cache, seq, 1, 0, k.as_ptr(), k.as_ptr(), 32),
            KvcStatus::Ok
        );
        assert_eq!(
            kvc_write(cache, seq, 0, 0, k.as_ptr(), v.as_ptr(), 32),
            KvcStatus::Ok
        );
        let mut stats = KvcStats::default();
        assert_eq!(kvc_stats_get(cache, h.cast()), KvcStatus::BadShape);
        assert_eq!(kvc_stats_get(cache, &mut stats), KvcStatus::Ok);
        assert_eq!((stats.sequences, stats.tokens), (1, 2));
        let mut both = vec![7.0f32; 33];
        let p = both.as_mut_ptr();
        for (k_out, v_out) in [(p, p), (p, p.add(1)), (p.add(15), p), (in_arena, p)] {
            assert_eq!(
                kvc_read(cache, seq, 0, 0, k_out, v_out, 16),
                KvcStatus::BadShape
            );
        }
        assert!(both.iter().all(|&x| x == 7.0));
        assert_eq!(kvc_read(cache, seq, 0, 1, p, p.add(16), 16), KvcStatus::Ok);
        assert_eq!(both[..16], k[16..]);
        assert_eq!(both[16..32], v[16..]);
        let mut fork = 0u64;
        assert_eq!(kvc_fork(cache, seq, inside.cast()), KvcStatus::BadShape);
        let mut scratch_len = 0usize;
        assert_eq!(
            kvc_attention_scratch_len(cache, inside.cast()),
            KvcStatus::BadShape
        );
        assert_eq!(
            kvc_attention_scratch_len(cache, &mut scratch_len),
            KvcStatus::Ok
        );
        // Attention: not in place, scratch apart from out, nothing in the arena.
        let entry = KvcBatchEntry {
            seq,
            first_position: 0,
            tokens: 2,
        };
        let len = 2 * 4 * 8;
        let mut q: Vec<f32> = (0..len).map(|i| (i as f32 * 0.1).sin()).collect();
        let mut scratch = vec![0.0f32; scratch_len + len];
        let mut out = vec![0.0f32; len];
        let (qp, sp) = (q.as_mut_ptr(), scratch.as_mut_ptr());
        for (queries, o, s) in [
            (qp.cast_const(), qp, sp),
            (qp.cast_const(), sp, sp.add(len - 1)),
            (in_arena.cast_const(), out.as_mut_ptr(), sp),
            (qp.cast_const(), out.as_mut_ptr(), in_arena),
        ] {
            assert_eq!(
                kvc_attention(cache, 0, &entry, 1, queries, o, len, s, scratch_len),
                KvcStatus::BadShape
            );
        }
        assert_eq!(
            kvc_attention(
                cache,
                0,
                &entry,
                1,
                qp,
                out.as_mut_ptr(),
                len,
                sp,
                scratch_len
            ),
            KvcStatus::Ok
        );
        // The work-item calls.
        let c = cache.cast_const();
        let (mut items, mut partial_len, mut item_scratch) = (0usize, 0usize, 0usize);
        assert_eq!(
            kvc_attention_plan(
                c,
                0,
                &entry,
                1,
                null(),
                &mut items,
                &mut items,
                &mut item_scratch
            ),
            KvcStatus::BadShape
        );
        assert_eq!(
            kvc_attention_plan(
                c,
                0,
                &entry,
                1,
                null(),
                &mut items,
                &mut partial_len,
                &mut item_scratch
            ),
            KvcStatus::Ok
        );
        let mut partials = vec![0.0f32; items * partial_len + item_scratch];
        let pp = partials.as_mut_ptr();
        assert_eq!(
            kvc_attention_run_item(
                c,
                0,
                &entry,
                1,
                null(),
                0,
                qp,
                len,
                pp,
                partial_len,
                pp,
                item_scratch
            ),
            KvcStatus::BadShape
        );
        assert_eq!(
            kvc_attention_run_item(
                c,
                0,
                &entry,
                1,
                null(),
                0,
                qp,
                len,
                qp,
                partial_len,
                sp,
                item_scratch
            ),
            KvcStatus::BadShape
        );
        let scratch_at = pp.add(items * partial_len);
        for item in 0..items {
            assert_eq!(
                kvc_attention_run_item(
                    c,
                    0,
                    &entry,
                    1,
                    null(),
                    item,
                    qp,
                    len,
                    pp.add(item * partial_len),
                    partial_len,
                    scratch_at,
                    item_scratch
                ),
                KvcStatus::Ok
            );
        }
        // Each item written into the rest of one array (the pattern of threads sharing it):
        // only the plan's partial length is used, so the calls do not overlap.
        let mut again = vec![0.0f32; items * partial_len];
        for item in 0..items {
            let rest = again.len() - item * partial_len;
            assert_eq!(
                kvc_attention_run_item(
                    c,
                    0,
                    &entry,
                    1,
                    null(),
                    item,
                    qp,
                    len,
                    again.as_mut_ptr().add(item * partial_len),
                    rest,
                    scratch_at,
                    item_scratch
                ),
                KvcStatus::Ok
            );
        }
        assert_eq!(again[..], partials[..items * partial_len]);
        // Entries and options are inputs too: not inside what a call writes.
        let opts = KvcAttentionOptions {
            splits: 1,
            query_tile: 8,
            scale: 0.0,
            flags: 0,
        };
        let mut words = [0usize; 8];
        let w = words.as_mut_ptr();
        w.cast::<KvcBatchEntry>().write_unaligned(entry);
        assert_eq!(
            kvc_attention_plan(
                c,
                0,
                w.cast(),
                1,
                null(),
                w,
                &mut partial_len,
                &mut item_scratch
            ),
            KvcStatus::BadShape
        );
        let o = scratch_at.cast::<KvcAttentionOptions>();
        o.write_unaligned(opts);
        assert_eq!(
            kvc_attention_run_item(
                c,
                0,
                &entry,
                1,
                o,
                0,
                qp,
                len,
                pp,
                partial_len,
                scratch_at,
                item_scratch
            ),
            KvcStatus::BadShape
        );
        let mut merged = vec![0.0f32; len];
        let m = merged.as_mut_ptr();
        m.cast::<KvcBatchEntry>().write_unaligned(entry);
        assert_eq!(
            kvc_attention_merge(c, 0, m.cast(), 1, null(), pp, items * partial_len, m, len),
            KvcStatus::BadShape
        );
        assert_eq!(
            kvc_attention_merge(c, 0, &entry, 1, null(), pp, items * partial_len, pp, len),
            KvcStatus::BadShape
        );
        // Misaligned or impossibly long buffers are refused before any slice is made.
        assert_eq!(
            kvc_read(cache, seq, 0, 0, p.cast::<u8>().add(1).cast(), p.add(20), 0),
            KvcStatus::BadShape
        );
        assert_eq!(
            kvc_write(cache, seq, 0, 0, k.as_ptr(), v.as_ptr(), usize::MAX / 4),
            KvcStatus::BadShape
        );
        assert_eq!(
            kvc_attention_merge(
                c,
                0,
                &entry,
                1,
                null(),
                pp,
                items * partial_len,
                merged.as_mut_ptr(),
                len
            ),
            KvcStatus::Ok
        );
        assert_eq!(merged, out);
        assert_eq!(kvc_fork(cache, seq, &mut fork), KvcStatus::Ok);
        assert_eq!(kvc_stats_get(cache, &mut stats), KvcStatus::Ok);
        assert_eq!((stats.sequences, stats.tokens), (2, 4));
    }
}

/// `kvc_arena_bytes` reads its spec before it writes `*out`, so the two may share memory; a
/// misaligned `out` is refused.
#[test]
fn arena_bytes_reads_the_spec_before_writing() {
    unsafe {
        let mut want = 0usize;
        assert_eq!(kvc_arena_bytes(&spec(), 3, &mut want), KvcStatus::Ok);
        #[repr(C, align(8))]
        struct Both(KvcSpec);
        let mut both = Both(spec());
        let p = (&mut both as *mut Both).cast::<usize>();
        assert_eq!(kvc_arena_bytes(p.cast(), 3, p), KvcStatus::Ok);
        assert_eq!(p.read(), want);
        let mut words = [0usize; 2];
        let odd = words.as_mut_ptr().cast::<u8>().add(1).cast::<usize>();
        assert_eq!(kvc_arena_bytes(&spec(), 3, odd), KvcStatus::BadShape);
    }
}

/// Decodes element `d` of a stored row by the formats' documented byte layout (README,
/// "Memory format"): f32 and f16 little-endian, int8 `q · scale` with one bfloat16 scale per
/// 32 elements after the elements.
fn decode_element(format: u32, row: &[u8], head_dim: usize, d: usize) -> f32 {
    match format {
        0 => f32::from_le_bytes(row[4 * d..4 * d + 4].try_into().unwrap()),
        1 => kvcache::half::f16_to_f32(u16::from_le_bytes([row[2 * d], row[2 * d + 1]])),
        3 => {
            let at = head_dim + 2 * (d / 32);
            let scale = f32::from_bits(u32::from(u16::from_le_bytes([row[at], row[at + 1]])) << 16);
            f32::from(row[d] as i8) * scale
        }
        _ => unreachable!("format {format} is not used here"),
    }
}

/// The block storage, the layout and the page tables locate every stored row: decoding the
/// bytes there gives bitwise what `kvc_read` gives, for forked (shared and copied) blocks, a
/// truncated sequence and blocks the window evicted (`KVC_NO_BLOCK`, and `kvc_read` says
/// `KVC_EVICTED`). Bad arguments get a status and write nothing.
#[test]
fn block_storage_and_page_tables_locate_every_row() {
    let (kv_heads, head_dim, block_tokens) = (2usize, 40usize, 4usize);
    for (k_format, v_format) in [(1u32, 3u32), (3, 0)] {
        let spec = KvcSpec {
            layers: 2,
            q_heads: 4,
            kv_heads: kv_heads as u32,
            head_dim: head_dim as u32,
            block_tokens: block_tokens as u32,
            k_format,
            v_format,
            max_seqs: 3,
            max_seq_tokens: 64,
            window: 12,
            sink_tokens: 2,
            key_tail_tokens: 0,
        };
        let mut owner = CCache::new(&spec, 40);
        let cache = owner.cache;
        unsafe {
            let mut seed = 11u64;
            let row = kv_heads * head_dim;
            let write = |seq: u64, first: u32, n: u32, seed: &mut u64| {
                for layer in 0..2 {
                    let k = values(seed, n as usize * row);
                    let v = values(seed, n as usize * row);
                    let status =
                        kvc_write(cache, seq, layer, first, k.as_ptr(), v.as_ptr(), k.len());
                    assert_eq!(status, KvcStatus::Ok);
                }
            };
            let (mut a, mut b, mut c) = (0u64, 0u64, 0u64);
            let mut first = 0u32;
            assert_eq!(kvc_add_sequence(cache, &mut a), KvcStatus::Ok);
            assert_eq!(kvc_reserve(cache, a, 30, &mut first), KvcStatus::Ok);
            write(a, first, 30, &mut seed);
            assert_eq!(kvc_fork(cache, a, &mut b), KvcStatus::Ok);
            assert_eq!(kvc_reserve(cache, b, 3, &mut first), KvcStatus::Ok);
            write(b, first, 3, &mut seed);
            assert_eq!(kvc_add_sequence(cache, &mut c), KvcStatus::Ok);
            assert_eq!(kvc_reserve(cache, c, 7, &mut first), KvcStatus::Ok);
            write(c, first, 7, &mut seed);
            assert_eq!(kvc_truncate(cache, c, 5), KvcStatus::Ok);

            let mut layout = KvcLayout::default();
            assert_eq!(kvc_layout_get(cache, &mut layout), KvcStatus::Ok);
            let (mut data, mut len) = (null::<u8>(), 0usize);
            assert_eq!(kvc_block_storage(cache, &mut data, &mut len), KvcStatus::Ok);
            assert_eq!(len as u64, layout.blocks * layout.block_bytes);
            assert_eq!(data as usize % 64, 0);
            let arena_range =
                owner.arena.as_ptr() as usize..owner.arena.as_ptr() as usize + owner.arena.len();
            assert!(arena_range.contains(&(data as usize)));
            assert!(data as usize + len <= arena_range.end);
            let storage = std::slice::from_raw_parts(data, len);

            let mut evicted_blocks = 0;
            for (seq, expected_len) in [(a, 30u32), (b, 33), (c, 5)] {
                let mut seq_len = 0u32;
                assert_eq!(kvc_seq_len(cache, seq, &mut seq_len), KvcStatus::Ok);
                assert_eq!(seq_len, expected_len);
                let mut entries = 0usize;
                assert_eq!(
                    kvc_page_table(cache, seq, null_mut(), 0, &mut entries),
                    KvcStatus::Ok
                );
                assert_eq!(entries, (seq_len as usize).div_ceil(block_tokens));
                let mut table = vec![7u32; entries + 2];
                assert_eq!(
                    kvc_page_table(cache, seq, table.as_mut_ptr(), table.len(), &mut entries),
                    KvcStatus::Ok
                );
                assert_eq!(table[entries..], [7, 7], "only the entries are written");
                let mut k = vec![0f32; row];
                let mut v = vec![0f32; row];
                for position in 0..seq_len {
                    let block = table[position as usize / block_tokens];
                    let slot = position as usize % block_tokens;
                    for layer in 0..2u32 {
                        let status = kvc_read(
                            cache,
                            seq,
                            layer,
                            position,
                            k.as_mut_ptr(),
                            v.as_mut_ptr(),
                            row,
                        );
                        if block == KVC_NO_BLOCK {
                            assert_eq!(status, KvcStatus::Evicted);
                            continue;
                        }
                        assert_eq!(status, KvcStatus::Ok);
                        assert!(u64::from(block) < layout.blocks);
                        let base = block as usize * layout.block_bytes as usize
                            + layer as usize * layout.layer_bytes as usize;
                        for head in 0..kv_heads {
                            let k_at = base
                                + head * layout.k_segment_bytes as usize
                                + slot * layout.k_row_bytes as usize;
                            let v_at = base
                                + kv_heads * layout.k_segment_bytes as usize
                                + head * layout.v_segment_bytes as usize
                                + slot * layout.v_row_bytes as usize;
                            let k_row = &storage[k_at..k_at + layout.k_row_bytes as usize];
                            let v_row = &storage[v_at..v_at + layout.v_row_bytes as usize];
                            for d in 0..head_dim {
                                let got_k = decode_element(k_format, k_row, head_dim, d);
                                let got_v = decode_element(v_format, v_row, head_dim, d);
                                assert_eq!(got_k.to_bits(), k[head * head_dim + d].to_bits());
                                assert_eq!(got_v.to_bits(), v[head * head_dim + d].to_bits());
                            }
                        }
                    }
                }
                evicted_blocks += table[..entries]
                    .iter()
                    .filter(|&&e| e == KVC_NO_BLOCK)
                    .count();
                // The fork's full blocks are its parent's (unless its window evicted them, as
                // its 3 new tokens did: the parent, prefilled at once, still has them).
                if seq == b {
                    let mut parent = vec![0u32; 8];
                    let mut n = 0usize;
                    assert_eq!(
                        kvc_page_table(cache, a, parent.as_mut_ptr(), 8, &mut n),
                        KvcStatus::Ok
                    );
                    for (mine, theirs) in table[..7].iter().zip(&parent[..7]) {
                        assert!(
                            *mine == *theirs || *mine == KVC_NO_BLOCK,
                            "full blocks shared"
                        );
                    }
                    assert_ne!(table[7], parent[7], "the partly filled tail was copied");
                }
            }
            assert!(evicted_blocks > 0, "the window evicted blocks");

            // Bad arguments: a status, nothing written.
            let mut small = [9u32; 2];
            let mut entries = 99usize;
            assert_eq!(
                kvc_page_table(cache, a, small.as_mut_ptr(), 2, &mut entries),
                KvcStatus::BadShape
            );
            assert_eq!((small, entries), ([9, 9], 99));
            assert_eq!(
                kvc_page_table(cache, a, null_mut(), 2, &mut entries),
                KvcStatus::NullPointer
            );
            assert_eq!(
                kvc_page_table(cache, a, small.as_mut_ptr(), 2, null_mut()),
                KvcStatus::NullPointer
            );
            assert_eq!(
                kvc_page_table(null(), a, small.as_mut_ptr(), 2, &mut entries),
                KvcStatus::NullPointer
            );
            assert_eq!(
                kvc_page_table(cache, a ^ 1 << 40, null_mut(), 0, &mut entries),
                KvcStatus::UnknownSequence
            );
            let in_arena = owner.arena.as_mut_ptr().add(64).cast::<u32>();
            assert_eq!(
                kvc_page_table(cache, a, in_arena, 16, &mut entries),
                KvcStatus::BadShape
            );
            let mut both = [0u64; 2];
            let cell = both.as_mut_ptr().cast::<usize>();
            assert_eq!(
                kvc_page_table(cache, a, cell.cast::<u32>(), 16, cell.add(1)),
                KvcStatus::BadShape,
                "entries overlapping the count"
            );
            assert_eq!(entries, 99);
            assert_eq!(kvc_layout_get(cache, null_mut()), KvcStatus::NullPointer);
            assert_eq!(kvc_layout_get(null(), &mut layout), KvcStatus::NullPointer);
            assert_eq!(
                kvc_block_storage(cache, &mut data, null_mut()),
                KvcStatus::NullPointer
            );
            let aliased = both.as_mut_ptr();
            assert_eq!(
                kvc_block_storage(cache, aliased.cast::<*const u8>(), aliased.cast::<usize>()),
                KvcStatus::BadShape
            );
            let mut seq_len = 5u32;
            assert_eq!(
                kvc_seq_len(cache, a ^ 1 << 40, &mut seq_len),
                KvcStatus::UnknownSequence
            );
            assert_eq!(kvc_seq_len(cache, a, null_mut()), KvcStatus::NullPointer);
            assert_eq!(seq_len, 5);
            assert_eq!(kvc_remove(cache, c), KvcStatus::Ok);
            assert_eq!(
                kvc_page_table(cache, c, null_mut(), 0, &mut entries),
                KvcStatus::UnknownSequence
            );
        }
    }
}

/// `kvc_seq_export` / `kvc_seq_import`: the count-only call, too little room (nothing
/// written), a round trip into a second cache (every `kvc_read` equal), and bad arguments or
/// bytes (a status; the target cache unchanged).
/// Every K and V row of `positions` positions in every layer reads back through `kvc_read` the
/// same, bit for bit, from sequence `a` of cache `ca` and sequence `b` of cache `cb` (`row`
/// floats each).
///
/// # Safety
///
/// `ca` and `cb` must be live caches.
unsafe fn assert_same_rows(
    ca: *mut KvcCache,
    a: u64,
    cb: *mut KvcCache,
    b: u64,
    layers: u32,
    positions: u32,
    row: usize,
) {
    let bits = |x: &[f32]| x.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let (mut k1, mut v1, mut k2, mut v2) = (
        vec![0.0f32; row],
        vec![0.0f32; row],
        vec![0.0f32; row],
        vec![0.0f32; row],
    );
    for layer in 0..layers {
        for position in 0..positions {
            let first = kvc_read(
                ca,
                a,
                layer,
                position,
                k1.as_mut_ptr(),
                v1.as_mut_ptr(),
                row,
            );
            let second = kvc_read(
                cb,
                b,
                layer,
                position,
                k2.as_mut_ptr(),
                v2.as_mut_ptr(),
                row,
            );
            assert_eq!((first, second), (KvcStatus::Ok, KvcStatus::Ok));
            assert_eq!(
                (bits(&k1), bits(&v1)),
                (bits(&k2), bits(&v2)),
                "layer {layer} position {position}"
            );
        }
    }
}

#[test]
fn sequences_save_and_restore_through_the_c_abi() {
    let mut spec = spec();
    spec.k_format = 4; // int4 keys: their offsets and exact first row travel too
    spec.v_format = 3;
    spec.head_dim = 32;
    let row = (spec.kv_heads * spec.head_dim) as usize;
    let from = CCache::new(&spec, 16);
    let to = CCache::new(&spec, 16);
    unsafe {
        let mut seed = 3u64;
        let mut seq = 0u64;
        let mut first = 0u32;
        assert_eq!(kvc_add_sequence(from.cache, &mut seq), KvcStatus::Ok);
        assert_eq!(kvc_reserve(from.cache, seq, 9, &mut first), KvcStatus::Ok);
        for layer in 0..spec.layers {
            let (k, v) = (values(&mut seed, 9 * row), values(&mut seed, 9 * row));
            let status = kvc_write(from.cache, seq, layer, 0, k.as_ptr(), v.as_ptr(), k.len());
            assert_eq!(status, KvcStatus::Ok);
        }

        let mut len = 0usize;
        assert_eq!(
            kvc_seq_export(from.cache, seq, null_mut(), 0, &mut len),
            KvcStatus::Ok
        );
        assert!(len > 40);
        let mut bytes = vec![0xAAu8; len];
        let mut wrote = 0usize;
        assert_eq!(
            kvc_seq_export(from.cache, seq, bytes.as_mut_ptr(), len - 1, &mut wrote),
            KvcStatus::BadShape
        );
        assert!(
            bytes.iter().all(|&b| b == 0xAA) && wrote == 0,
            "nothing written"
        );
        assert_eq!(
            kvc_seq_export(from.cache, seq, null_mut(), 5, &mut wrote),
            KvcStatus::NullPointer
        );
        assert_eq!(
            kvc_seq_export(from.cache, seq, bytes.as_mut_ptr(), len, null_mut()),
            KvcStatus::NullPointer
        );
        assert_eq!(
            kvc_seq_export(from.cache, seq + 1, bytes.as_mut_ptr(), len, &mut wrote),
            KvcStatus::UnknownSequence
        );
        assert_eq!(
            kvc_seq_export(from.cache, seq, bytes.as_mut_ptr(), len, &mut wrote),
            KvcStatus::Ok
        );
        assert_eq!(wrote, len);

        let mut restored = 0u64;
        assert_eq!(
            kvc_seq_import(null_mut(), bytes.as_ptr(), len, &mut restored),
            KvcStatus::NullPointer
        );
        assert_eq!(
            kvc_seq_import(to.cache, null(), len, &mut restored),
            KvcStatus::NullPointer
        );
        assert_eq!(
            kvc_seq_import(to.cache, bytes.as_ptr(), len, null_mut()),
            KvcStatus::NullPointer
        );
        assert_eq!(
            kvc_seq_import(to.cache, bytes.as_ptr(), len - 1, &mut restored),
            KvcStatus::BadSnapshot
        );
        let mut corrupted = bytes.clone();
        corrupted[len / 2] ^= 4;
        assert_eq!(
            kvc_seq_import(to.cache, corrupted.as_ptr(), len, &mut restored),
            KvcStatus::BadSnapshot
        );
        // Bytes inside the target's own arena are refused, as for every input buffer.
        assert_eq!(
            kvc_seq_import(to.cache, to.arena.as_ptr(), len, &mut restored),
            KvcStatus::BadShape
        );
        let mut stats = KvcStats::default();
        assert_eq!(kvc_stats_get(to.cache, &mut stats), KvcStatus::Ok);
        assert_eq!(stats.sequences, 0, "refused imports changed nothing");

        assert_eq!(
            kvc_seq_import(to.cache, bytes.as_ptr(), len, &mut restored),
            KvcStatus::Ok
        );
        let mut n = 0u32;
        assert_eq!(kvc_seq_len(to.cache, restored, &mut n), KvcStatus::Ok);
        assert_eq!(n, 9);
        assert_same_rows(from.cache, seq, to.cache, restored, spec.layers, 9, row);
        let mut message = [0 as std::ffi::c_char; 64];
        kvc_status_message(15, message.as_mut_ptr(), message.len());
        let text = std::ffi::CStr::from_ptr(message.as_ptr()).to_str().unwrap();
        assert!(text.contains("snapshot"), "{text}");
    }
}

/// `kvc_seq_export_to` / `kvc_seq_import_from`: C callbacks over a `Vec`, the same bytes as
/// `kvc_seq_export`, NULL callbacks refused, and a failing callback giving `KVC_INTERRUPTED`
/// with the target cache unchanged.
#[test]
fn sequences_stream_through_c_callbacks() {
    unsafe extern "C" fn append(user: *mut std::ffi::c_void, data: *const u8, len: usize) -> i32 {
        let out = &mut *user.cast::<Vec<u8>>();
        out.extend_from_slice(std::slice::from_raw_parts(data, len));
        0
    }
    unsafe extern "C" fn refuse(_: *mut std::ffi::c_void, _: *const u8, _: usize) -> i32 {
        1
    }
    unsafe extern "C" fn read_vec(
        user: *mut std::ffi::c_void,
        at: usize,
        buf: *mut u8,
        len: usize,
    ) -> i32 {
        let source = &*user.cast::<Vec<u8>>();
        match source.get(at..at + len) {
            Some(bytes) => {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf, len);
                0
            }
            None => 1,
        }
    }
    unsafe extern "C" fn fail_read(
        _: *mut std::ffi::c_void,
        _: usize,
        _: *mut u8,
        _: usize,
    ) -> i32 {
        1
    }
    let spec = spec();
    let row = (spec.kv_heads * spec.head_dim) as usize;
    let from = CCache::new(&spec, 16);
    let to = CCache::new(&spec, 16);
    unsafe {
        let (mut seq, mut first) = (0u64, 0u32);
        assert_eq!(kvc_add_sequence(from.cache, &mut seq), KvcStatus::Ok);
        assert_eq!(kvc_reserve(from.cache, seq, 6, &mut first), KvcStatus::Ok);
        let mut seed = 9u64;
        for layer in 0..spec.layers {
            let (k, v) = (values(&mut seed, 6 * row), values(&mut seed, 6 * row));
            assert_eq!(
                kvc_write(from.cache, seq, layer, 0, k.as_ptr(), v.as_ptr(), k.len()),
                KvcStatus::Ok
            );
        }
        let mut len = 0usize;
        assert_eq!(
            kvc_seq_export(from.cache, seq, null_mut(), 0, &mut len),
            KvcStatus::Ok
        );
        let mut whole = vec![0u8; len];
        assert_eq!(
            kvc_seq_export(from.cache, seq, whole.as_mut_ptr(), len, &mut len),
            KvcStatus::Ok
        );

        let mut streamed: Vec<u8> = Vec::new();
        let user = (&mut streamed as *mut Vec<u8>).cast();
        let mut n = 0usize;
        assert_eq!(
            kvc_seq_export_to(from.cache, seq, None, user, &mut n),
            KvcStatus::NullPointer
        );
        assert_eq!(
            kvc_seq_export_to(from.cache, seq, Some(append), user, null_mut()),
            KvcStatus::NullPointer
        );
        assert_eq!(
            kvc_seq_export_to(from.cache, seq, Some(refuse), user, &mut n),
            KvcStatus::Interrupted
        );
        assert_eq!(
            kvc_seq_export_to(from.cache, seq, Some(append), user, &mut n),
            KvcStatus::Ok
        );
        assert_eq!((n, &streamed), (len, &whole));

        let user = (&mut whole as *mut Vec<u8>).cast();
        let mut restored = 0u64;
        assert_eq!(
            kvc_seq_import_from(to.cache, len, None, user, &mut restored),
            KvcStatus::NullPointer
        );
        assert_eq!(
            kvc_seq_import_from(to.cache, len, Some(fail_read), user, &mut restored),
            KvcStatus::Interrupted
        );
        assert_eq!(
            kvc_seq_import_from(to.cache, len + 1, Some(read_vec), user, &mut restored),
            KvcStatus::BadSnapshot
        );
        let mut stats = KvcStats::default();
        assert_eq!(kvc_stats_get(to.cache, &mut stats), KvcStatus::Ok);
        assert_eq!(
            (stats.sequences, stats.blocks_free),
            (0, stats.blocks_total)
        );
        assert_eq!(
            kvc_seq_import_from(to.cache, len, Some(read_vec), user, &mut restored),
            KvcStatus::Ok
        );
        assert_same_rows(from.cache, seq, to.cache, restored, spec.layers, 6, row);
    }
}

/// `KVC_ATTN_EXACT_VALUES` reaches the plan: with int4 values the work-item calls give bitwise
/// what the Rust plan gives with `exact_values` set, and without the flag what it gives by
/// default; the two differ by the weights' rounding only.
#[test]
fn exact_values_flag_selects_the_value_sums() {
    let c = CCache::new(&int4_values_spec(1, 1), 4);
    let cache = c.cache;
    let mut seed = 11u64;
    let len = 40u32;
    let mut seq = 0u64;
    let queries = values(&mut seed, 3 * 32);
    // SAFETY: a live handle; buffers of the lengths passed.
    unsafe {
        assert_eq!(kvc_add_sequence(cache, &mut seq), KvcStatus::Ok);
        assert_eq!(kvc_reserve(cache, seq, len, null_mut()), KvcStatus::Ok);
        let (k, v) = (values(&mut seed, 40 * 32), values(&mut seed, 40 * 32));
        assert_eq!(
            kvc_write(cache, seq, 0, 0, k.as_ptr(), v.as_ptr(), k.len()),
            KvcStatus::Ok
        );
    }
    let entry = KvcBatchEntry {
        seq,
        first_position: len - 1,
        tokens: 1,
    };
    let run_c = |flags: u32| -> Vec<f32> {
        let opts = KvcAttentionOptions {
            splits: 2,
            query_tile: 1,
            scale: 0.0,
            flags,
        };
        let (mut items, mut partial_len, mut scratch_len) = (0usize, 0usize, 0usize);
        let mut out = vec![0.0f32; 3 * 32];
        // SAFETY: a live handle; buffers of the lengths the plan asks for.
        unsafe {
            assert_eq!(
                kvc_attention_plan(
                    cache,
                    0,
                    &entry,
                    1,
                    &opts,
                    &mut items,
                    &mut partial_len,
                    &mut scratch_len
                ),
                KvcStatus::Ok
            );
            let mut partials = vec![0.0f32; items * partial_len];
            let mut scratch = vec![0.0f32; scratch_len];
            for (i, partial) in partials.chunks_mut(partial_len).enumerate() {
                let status = kvc_attention_run_item(
                    cache,
                    0,
                    &entry,
                    1,
                    &opts,
                    i,
                    queries.as_ptr(),
                    queries.len(),
                    partial.as_mut_ptr(),
                    partial_len,
                    scratch.as_mut_ptr(),
                    scratch_len,
                );
                assert_eq!(status, KvcStatus::Ok);
            }
            assert_eq!(
                kvc_attention_merge(
                    cache,
                    0,
                    &entry,
                    1,
                    &opts,
                    partials.as_ptr(),
                    partials.len(),
                    out.as_mut_ptr(),
                    out.len()
                ),
                KvcStatus::Ok
            );
        }
        out
    };
    let run_rust = |exact_values: bool| -> Vec<f32> {
        let options = kvcache::attention::AttentionOptions {
            splits: 2,
            query_tile: 1,
            exact_values,
            ..Default::default()
        };
        // SAFETY: a live handle, not mutated meanwhile.
        unsafe { rust_work_items(cache, &[entry], &options, &queries) }
    };
    let (integer, exact) = (run_c(0), run_c(KVC_ATTN_EXACT_VALUES));
    assert_eq!(integer, run_rust(false));
    assert_eq!(exact, run_rust(true));
    assert_ne!(integer, exact, "the flag changed nothing");
    for (a, b) in integer.iter().zip(&exact) {
        assert!((a - b).abs() < 1e-2, "{a} vs {b}");
    }
}

/// `kvc_attention_ex`: NULL options are `kvc_attention` bit for bit; with options (a custom
/// scale, exact int4 value sums, other tiles and splits) it is the Rust `attention` with the
/// same options bit for bit, in the scratch `kvc_attention_scratch_len_ex` asks for. Unknown
/// flags, zero splits, short scratch, NULL pointers and options overlapping the output are
/// refused, and leave the output as it was.
#[test]
fn one_shot_attention_takes_options() {
    let c = CCache::new(&int4_values_spec(3, 2), 8);
    let cache = c.cache;
    let mut seed = 23u64;
    let lens = [40u32, 29];
    let mut seqs = [0u64; 2];
    for (seq, &len) in seqs.iter_mut().zip(&lens) {
        let (k, v) = (
            values(&mut seed, len as usize * 32),
            values(&mut seed, len as usize * 32),
        );
        // SAFETY: a live handle; buffers of the lengths passed.
        unsafe {
            assert_eq!(kvc_add_sequence(cache, seq), KvcStatus::Ok);
            assert_eq!(kvc_reserve(cache, *seq, len, null_mut()), KvcStatus::Ok);
            assert_eq!(
                kvc_write(cache, *seq, 0, 0, k.as_ptr(), v.as_ptr(), k.len()),
                KvcStatus::Ok
            );
        }
    }
    // A decode token of the first sequence and the last 3 tokens of the second.
    let entries = [
        KvcBatchEntry {
            seq: seqs[0],
            first_position: lens[0] - 1,
            tokens: 1,
        },
        KvcBatchEntry {
            seq: seqs[1],
            first_position: lens[1] - 3,
            tokens: 3,
        },
    ];
    let queries = values(&mut seed, 4 * 3 * 32);
    let n = queries.len();
    let sentinel = -7.5f32;
    // One call with `opts` in scratch of `scratch_len` floats; the status and the output.
    let call_ex = |opts: *const KvcAttentionOptions, scratch_len: usize| {
        let mut out = vec![sentinel; n];
        let mut scratch = vec![0.0f32; scratch_len];
        // SAFETY: a live handle; buffers of the lengths passed.
        let status = unsafe {
            kvc_attention_ex(
                cache,
                0,
                entries.as_ptr(),
                2,
                opts,
                queries.as_ptr(),
                out.as_mut_ptr(),
                n,
                scratch.as_mut_ptr(),
                scratch_len,
            )
        };
        (status, out)
    };
    let scratch_len_ex = |opts: *const KvcAttentionOptions| {
        let mut len = 0usize;
        // SAFETY: a live handle and a valid output.
        let status = unsafe { kvc_attention_scratch_len_ex(cache, opts, &mut len) };
        (status, len)
    };
    // NULL options: the defaults, as `kvc_attention`.
    let (status, default_len) = scratch_len_ex(null());
    assert_eq!(status, KvcStatus::Ok);
    let mut plain_len = 0usize;
    // SAFETY: a live handle and a valid output.
    assert_eq!(
        unsafe { kvc_attention_scratch_len(cache, &mut plain_len) },
        KvcStatus::Ok
    );
    assert_eq!(plain_len, default_len);
    let mut plain = vec![sentinel; n];
    let mut scratch = vec![0.0f32; plain_len];
    // SAFETY: a live handle; buffers of the lengths passed.
    let status = unsafe {
        kvc_attention(
            cache,
            0,
            entries.as_ptr(),
            2,
            queries.as_ptr(),
            plain.as_mut_ptr(),
            n,
            scratch.as_mut_ptr(),
            plain_len,
        )
    };
    assert_eq!(status, KvcStatus::Ok);
    let (status, defaults) = call_ex(null(), default_len);
    assert_eq!(status, KvcStatus::Ok);
    assert_same_bits(&defaults, &plain, "NULL options against kvc_attention");

    // Options: the Rust call with the same ones, bit for bit.
    let opts = KvcAttentionOptions {
        splits: 3,
        query_tile: 2,
        scale: 0.21,
        flags: KVC_ATTN_EXACT_VALUES,
    };
    let rust_options = kvcache::attention::AttentionOptions {
        scale: Some(0.21),
        splits: 3,
        query_tile: 2,
        exact_values: true,
    };
    // SAFETY: a live handle, not mutated meanwhile.
    let rust_cache = unsafe { &*cache };
    let (status, len) = scratch_len_ex(&opts);
    assert_eq!(status, KvcStatus::Ok);
    assert_eq!(
        len,
        kvcache::attention::attention_scratch_len(rust_cache, &rust_options)
    );
    assert_ne!(len, default_len, "the options changed no scratch length");
    let rust_entries: Vec<_> = entries.iter().map(rust_entry).collect();
    let mut want = vec![0.0f32; n];
    let mut scratch = vec![0.0f32; len];
    kvcache::attention::attention(
        rust_cache,
        0,
        &rust_entries,
        &queries,
        &mut want,
        &mut scratch,
        &rust_options,
    )
    .unwrap();
    let (status, got) = call_ex(&opts, len);
    assert_eq!(status, KvcStatus::Ok);
    assert_same_bits(&got, &want, "options against the Rust call");
    // And against the same options' work items, merged: the same bits.
    // SAFETY: a live handle, not mutated meanwhile.
    let merged = unsafe { rust_work_items(cache, &entries, &rust_options, &queries) };
    assert_same_bits(&got, &merged, "options against the work items");
    assert_ne!(got, defaults, "the options changed nothing");

    // Refusals, each leaving the output untouched.
    let untouched = |(status, out): (KvcStatus, Vec<f32>), want: KvcStatus| {
        assert_eq!(status, want);
        assert!(
            out.iter().all(|&x| x == sentinel),
            "{want:?}: output written"
        );
    };
    untouched(call_ex(&opts, len - 1), KvcStatus::ScratchTooSmall);
    let unknown = KvcAttentionOptions { flags: 2, ..opts };
    untouched(call_ex(&unknown, len), KvcStatus::BadSpec);
    assert_eq!(scratch_len_ex(&unknown).0, KvcStatus::BadSpec);
    let no_splits = KvcAttentionOptions { splits: 0, ..opts };
    untouched(call_ex(&no_splits, len), KvcStatus::BadSpec);
    let mut out = vec![sentinel; n];
    let mut scratch = vec![0.0f32; len];
    // SAFETY: NULL handles and pointers are what is being tested; the rest are valid. The
    // last call passes options that lie inside the output buffer (refused before any read).
    unsafe {
        assert_eq!(
            kvc_attention_scratch_len_ex(null_mut(), &opts, &mut 0),
            KvcStatus::NullPointer
        );
        assert_eq!(
            kvc_attention_scratch_len_ex(cache, &opts, null_mut()),
            KvcStatus::NullPointer
        );
        let run = |cache: *mut KvcCache,
                   entries: *const KvcBatchEntry,
                   opts: *const KvcAttentionOptions,
                   queries: *const f32,
                   out: *mut f32,
                   scratch: *mut f32| {
            kvc_attention_ex(cache, 0, entries, 2, opts, queries, out, n, scratch, len)
        };
        let (e, q) = (entries.as_ptr(), queries.as_ptr());
        let (o, s) = (out.as_mut_ptr(), scratch.as_mut_ptr());
        assert_eq!(run(null_mut(), e, &opts, q, o, s), KvcStatus::NullPointer);
        assert_eq!(run(cache, null(), &opts, q, o, s), KvcStatus::NullPointer);
        assert_eq!(run(cache, e, &opts, null(), o, s), KvcStatus::NullPointer);
        assert_eq!(
            run(cache, e, &opts, q, null_mut(), s),
            KvcStatus::NullPointer
        );
        assert_eq!(
            run(cache, e, &opts, q, o, null_mut()),
            KvcStatus::NullPointer
        );
        out[..4].copy_from_slice(&[
            f32::from_bits(3),
            f32::from_bits(2),
            0.21,
            f32::from_bits(1),
        ]);
        let inside = o.cast::<KvcAttentionOptions>();
        assert_eq!(run(cache, e, inside, q, o, s), KvcStatus::BadShape);
    }
    assert!(out[4..].iter().all(|&x| x == sentinel));
}

/// Panics at the first element whose bits differ.
fn assert_same_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!("{what}: element {i}: {} vs {}", got[i], want[i]);
    }
}

/// One layer, 3 query heads on 1 KV head of 32 elements, blocks of 16, int4 values, keys of
/// `k_format`.
fn int4_values_spec(k_format: u32, max_seqs: u32) -> KvcSpec {
    KvcSpec {
        layers: 1,
        q_heads: 3,
        kv_heads: 1,
        head_dim: 32,
        block_tokens: 16,
        k_format,
        v_format: 4,
        max_seqs,
        max_seq_tokens: 64,
        window: 0,
        sink_tokens: 0,
        key_tail_tokens: 0,
    }
}

fn rust_entry(e: &KvcBatchEntry) -> kvcache::attention::BatchEntry {
    kvcache::attention::BatchEntry {
        seq: kvcache::SeqId::from_raw(e.seq),
        first_position: e.first_position as usize,
        tokens: e.tokens as usize,
    }
}

/// Layer 0's attention through the Rust work items (every item in order, then the merge).
///
/// # Safety
///
/// `cache` is a live handle that nothing mutates meanwhile.
unsafe fn rust_work_items(
    cache: *mut KvcCache,
    entries: &[KvcBatchEntry],
    options: &kvcache::attention::AttentionOptions,
    queries: &[f32],
) -> Vec<f32> {
    // SAFETY: the function's contract.
    let cache = unsafe { &*cache };
    let entries: Vec<_> = entries.iter().map(rust_entry).collect();
    let plan = kvcache::attention::AttentionPlan::new(cache, 0, &entries, options).unwrap();
    let mut partials = vec![0.0f32; plan.work_items() * plan.partial_len()];
    let mut scratch = vec![0.0f32; plan.scratch_len()];
    for (i, partial) in partials.chunks_mut(plan.partial_len()).enumerate() {
        plan.run_item(i, queries, partial, &mut scratch).unwrap();
    }
    let mut out = vec![0.0f32; queries.len()];
    plan.merge(&partials, &mut out).unwrap();
    out
}

#[test]
fn the_key_tail_through_the_c_abi() {
    // int8 keys (stored as given, no offsets), a 4-token tail; values exact in f16.
    let mut s = spec();
    s.k_format = 3;
    s.key_tail_tokens = 4;
    let c = CCache::new(&s, 8);
    let (cache, elems) = (c.cache, (s.kv_heads * s.head_dim) as usize);
    unsafe {
        let (mut seq, mut first) = (0u64, 0u32);
        assert_eq!(kvc_add_sequence(cache, &mut seq), KvcStatus::Ok);
        assert_eq!(kvc_reserve(cache, seq, 6, &mut first), KvcStatus::Ok);
        let keys: Vec<f32> = (0..6 * elems)
            .map(|i| (i % 13) as f32 * 0.25 - 1.5)
            .collect();
        for layer in 0..s.layers {
            assert_eq!(
                kvc_write(
                    cache,
                    seq,
                    layer,
                    0,
                    keys.as_ptr(),
                    keys.as_ptr(),
                    keys.len()
                ),
                KvcStatus::Ok
            );
        }
        let (mut ring, mut len, mut from, mut end) = (null(), 0usize, 0u32, 0u32);
        let call = |layer: u32,
                    head: u32,
                    ring: &mut *const u8,
                    len: &mut usize,
                    from: &mut u32,
                    end: &mut u32| {
            kvc_key_tail(cache, seq, layer, head, ring, len, from, end)
        };
        assert_eq!(
            call(1, 1, &mut ring, &mut len, &mut from, &mut end),
            KvcStatus::Ok
        );
        assert_eq!((len, from, end), (4 * s.head_dim as usize * 2, 2, 6));
        let bytes = std::slice::from_raw_parts(ring, len);
        for position in 2..6usize {
            let row = &bytes[position % 4 * s.head_dim as usize * 2..];
            for d in 0..s.head_dim as usize {
                let got =
                    kvcache::half::f16_to_f32(u16::from_le_bytes([row[2 * d], row[2 * d + 1]]));
                assert_eq!(got, keys[position * elems + s.head_dim as usize + d]);
            }
        }
        // Bad input.
        assert_eq!(
            call(2, 0, &mut ring, &mut len, &mut from, &mut end),
            KvcStatus::BadIndex
        );
        assert_eq!(
            call(0, 2, &mut ring, &mut len, &mut from, &mut end),
            KvcStatus::BadIndex
        );
        assert_eq!(
            kvc_key_tail(
                cache,
                seq ^ (1 << 40),
                0,
                0,
                &mut ring,
                &mut len,
                &mut from,
                &mut end
            ),
            KvcStatus::UnknownSequence
        );
        assert_eq!(
            kvc_key_tail(cache, seq, 0, 0, null_mut(), &mut len, &mut from, &mut end),
            KvcStatus::NullPointer
        );
        assert_eq!(
            kvc_key_tail(null(), seq, 0, 0, &mut ring, &mut len, &mut from, &mut end),
            KvcStatus::NullPointer
        );
        // A tail with float keys is refused; no tail gives an empty range.
        let mut f = spec();
        f.key_tail_tokens = 2;
        let mut bytes = 0usize;
        assert_eq!(kvc_arena_bytes(&f, 4, &mut bytes), KvcStatus::BadSpec);
        let plain = CCache::new(&spec(), 4);
        assert_eq!(kvc_add_sequence(plain.cache, &mut seq), KvcStatus::Ok);
        assert_eq!(kvc_reserve(plain.cache, seq, 3, &mut first), KvcStatus::Ok);
        assert_eq!(
            kvc_key_tail(
                plain.cache,
                seq,
                0,
                0,
                &mut ring,
                &mut len,
                &mut from,
                &mut end
            ),
            KvcStatus::Ok
        );
        assert!(ring.is_null());
        assert_eq!((len, from, end), (0, 3, 3));
    }
}
