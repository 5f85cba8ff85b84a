//! Bytes → calls through the C ABI: a spec of raw `u32` fields (mostly small, sometimes
//! anything), then operations with NULL or valid pointers, lengths at or below the buffers'
//! real sizes, any sequence id, layer, position and option values, and now and then buffers
//! that overlap each other, the handle or the arena (which must be refused with
//! `KVC_BAD_SHAPE`). Every call must return a status (a panic here would be an abort in C),
//! and a mutating call that fails must leave the cache's accounting unchanged.
#![no_main]

use kvcache::ffi::*;
use libfuzzer_sys::fuzz_target;

mod bytes;
use bytes::Bytes;

fn stats(cache: *mut KvcCache) -> KvcStats {
    let mut s = KvcStats::default();
    // SAFETY: a live handle and a valid out pointer.
    assert_eq!(unsafe { kvc_stats_get(cache, &mut s) } as u32, 0);
    s
}

/// A snapshot source or sink for the streaming calls: `len` bytes at `bytes`, and the call
/// (1-based) at which the callback reports a failure (0: never).
struct Stream {
    bytes: *mut u8,
    len: usize,
    calls: usize,
    fail_at: usize,
}

unsafe extern "C" fn stream_write(user: *mut core::ffi::c_void, data: *const u8, len: usize) -> i32 {
    // SAFETY: `user` is a live `Stream` over a buffer of `len` bytes; `data` has `len` bytes.
    let s = unsafe { &mut *user.cast::<Stream>() };
    s.calls += 1;
    if s.calls == s.fail_at || len > s.len {
        return 1;
    }
    unsafe { core::ptr::copy_nonoverlapping(data, s.bytes, len) };
    s.bytes = s.bytes.wrapping_add(len);
    s.len -= len;
    0
}

unsafe extern "C" fn stream_read(user: *mut core::ffi::c_void, at: usize, buf: *mut u8, len: usize) -> i32 {
    // SAFETY: as above; `buf` has `len` writable bytes.
    let s = unsafe { &mut *user.cast::<Stream>() };
    s.calls += 1;
    if s.calls == s.fail_at || at > s.len || len > s.len - at {
        return 1;
    }
    unsafe { core::ptr::copy_nonoverlapping(s.bytes.add(at), buf, len) };
    0
}

fn same(a: &KvcStats, b: &KvcStats) -> bool {
    (a.sequences, a.blocks_free, a.bytes_used, a.tokens, a.waste_slots)
        == (b.sequences, b.blocks_free, b.bytes_used, b.tokens, b.waste_slots)
}

fuzz_target!(|data: &[u8]| {
    let mut bytes = Bytes::new(data);
    let kv_heads = 1 + bytes.below_u32(3);
    let spec = KvcSpec {
        layers: 1 + bytes.below_u32(3),
        q_heads: kv_heads * (1 + bytes.below_u32(3)),
        kv_heads,
        head_dim: if bytes.byte() == 0 { bytes.word() } else { 1 + bytes.below_u32(20) },
        block_tokens: if bytes.byte() == 0 { bytes.word() } else { 1 + bytes.below_u32(5) },
        k_format: bytes.below_u32(6),
        v_format: bytes.below_u32(6),
        max_seqs: bytes.word(),
        max_seq_tokens: bytes.word(),
        window: if bytes.below_u32(3) == 0 { bytes.word() } else { 0 },
        sink_tokens: bytes.below_u32(4),
        key_tail_tokens: if bytes.below_u32(3) == 0 { bytes.below_u32(9) } else { 0 },
    };
    let mut arena_len = 0usize;
    // SAFETY (every call below): pointers are NULL or point at live buffers of at least the
    // length passed; the handle memory and the arena outlive the handle's last use.
    let status = unsafe { kvc_arena_bytes(&spec, 1 + bytes.below_u32(16), &mut arena_len) };
    if status as u32 != 0 || arena_len > 1 << 22 {
        return;
    }
    let mut arena = vec![0u8; arena_len + bytes.below_u32(64) as usize];
    let mut handle = vec![0u64; kvc_cache_size().div_ceil(8) + 1];
    let (arena_ptr, arena_bytes) = (arena.as_mut_ptr(), arena.len());
    let handle_ptr = handle.as_mut_ptr();
    let mut cache: *mut KvcCache = core::ptr::null_mut();
    let status = unsafe {
        kvc_cache_init(handle_ptr.cast(), handle.len() * 8, &spec, arena_ptr, arena_bytes, &mut cache)
    };
    if status as u32 != 0 {
        return;
    }
    let elems = (spec.kv_heads * spec.head_dim) as usize;
    let mut ids: Vec<u64> = vec![0, u64::MAX];
    let mut floats = vec![0.5f32; 4096];
    let mut out = vec![0.0f32; 4096];
    let mut scratch = vec![0.0f32; 1 << 16];
    // Float rows are stored as given, NaN included (as `kvc_write` stores them): once a
    // made-up snapshot has been restored into a cache with a float format, attention over it
    // may rightly give NaN.
    let float_rows = [spec.k_format, spec.v_format].iter().any(|&f| f <= 2);
    let mut rows_made_up = false;
    while !bytes.done() {
        let before = stats(cache);
        let seq = ids[bytes.below_u32(ids.len() as u32) as usize];
        let (status, mutating) = match bytes.below_u32(12) {
            0 => {
                let mut id = 0u64;
                let p: *mut u64 = if bytes.null() { core::ptr::null_mut() } else { &mut id };
                let s = unsafe { kvc_add_sequence(cache, p) };
                if s as u32 == 0 {
                    ids.push(id);
                }
                (s, true)
            }
            1 => (unsafe { kvc_reserve(cache, seq, bytes.word(), core::ptr::null_mut()) }, true),
            2 => {
                let tokens = bytes.below_u32(4) as usize;
                let len = (tokens * elems).min(floats.len()) - bytes.below_u32(2) as usize * (tokens * elems > 0) as usize;
                for x in floats.iter_mut().take(len) {
                    *x = (bytes.byte() as f32 - 128.0) / 8.0;
                }
                let k = if bytes.null() { core::ptr::null() } else { floats.as_ptr() };
                (unsafe { kvc_write(cache, seq, bytes.word(), bytes.word(), k, floats.as_ptr(), len) }, true)
            }
            3 => {
                let (k, v) = out.split_at_mut(2048);
                let len = elems.min(2048) - (bytes.below_u32(2) as usize).min(elems);
                (unsafe { kvc_read(cache, seq, bytes.word(), bytes.word(), k.as_mut_ptr(), v.as_mut_ptr(), len) }, false)
            }
            4 => {
                let mut id = 0u64;
                let s = unsafe { kvc_fork(cache, seq, &mut id) };
                if s as u32 == 0 {
                    ids.push(id);
                }
                (s, true)
            }
            5 => (unsafe { kvc_truncate(cache, seq, bytes.word()) }, true),
            6 => (unsafe { kvc_remove(cache, seq) }, true),
            7 => {
                let entries: Vec<KvcBatchEntry> = (0..bytes.below_u32(3))
                    .map(|_| KvcBatchEntry {
                        seq: ids[bytes.below_u32(ids.len() as u32) as usize],
                        first_position: bytes.word(),
                        tokens: bytes.word(),
                    })
                    .collect();
                let tokens: usize = entries.iter().map(|e| e.tokens as usize).sum();
                let len = (tokens * (spec.q_heads * spec.head_dim) as usize).min(2048);
                let mut needed = 0usize;
                unsafe { kvc_attention_scratch_len(cache, &mut needed) };
                let scratch_len = needed.min(scratch.len()) - bytes.below_u32(2) as usize * (needed > 0) as usize;
                let e = if bytes.null() { core::ptr::null() } else { entries.as_ptr() };
                let s = unsafe {
                    kvc_attention(cache, bytes.word(), e, entries.len(), floats.as_ptr(), out.as_mut_ptr(), len, scratch.as_mut_ptr(), scratch_len)
                };
                if s as u32 == 0 && !rows_made_up {
                    assert!(out[..len].iter().all(|x| x.is_finite()), "non-finite attention output");
                }
                (s, false)
            }
            8 => {
                // Overlapping buffers: refused before anything is read or written.
                let len = 1 + bytes.below_u32(64) as usize;
                let base = out.as_mut_ptr();
                let in_arena = arena_ptr.wrapping_add(bytes.below_u32(arena_bytes as u32) as usize).cast::<f32>();
                let (k, v) = match bytes.below_u32(4) {
                    0 => (base, base),
                    1 => (base, base.wrapping_add(bytes.below_u32(len as u32) as usize)),
                    2 => (in_arena, base),
                    _ => (base, handle_ptr.cast::<f32>()),
                };
                let s = unsafe { kvc_read(cache, seq, bytes.word(), bytes.word(), k, v, len) };
                assert_eq!(s as u32, 11, "overlapping read buffers accepted");
                let entries = [KvcBatchEntry { seq, first_position: 0, tokens: 1 }];
                let q = floats.as_mut_ptr();
                let (o, sc) = match bytes.below_u32(3) {
                    0 => (q, scratch.as_mut_ptr()),
                    1 => (base, base.wrapping_add(bytes.below_u32(len as u32) as usize)),
                    _ => (base, in_arena),
                };
                let s = unsafe { kvc_attention(cache, 0, entries.as_ptr(), 1, q, o, len, sc, len) };
                assert_eq!(s as u32, 11, "overlapping attention buffers accepted");
                (s, false)
            }
            9 => {
                // Reading the cache from elsewhere: a page table into a buffer that is NULL, too
                // short, in the arena or fine; it must agree with the length and the layout.
                let mut table = [0u32; 64];
                let cap = bytes.below_u32(66) as usize;
                let mut entries = usize::MAX;
                let t: *mut u32 = match bytes.below_u32(4) {
                    0 => core::ptr::null_mut(),
                    1 => arena_ptr.wrapping_add(arena_bytes / 2 & !3).cast(),
                    _ => table.as_mut_ptr(),
                };
                let cap = if t == table.as_mut_ptr() { cap.min(64) } else { cap };
                let s = unsafe { kvc_page_table(cache, seq, t, cap, &mut entries) };
                let (mut len, mut layout) = (0u32, KvcLayout::default());
                let (mut data, mut data_len) = (core::ptr::null::<u8>(), 0usize);
                unsafe {
                    assert_eq!(kvc_layout_get(cache, &mut layout) as u32, 0);
                    assert_eq!(kvc_block_storage(cache, &mut data, &mut data_len) as u32, 0);
                }
                assert_eq!(data_len as u64, layout.blocks * layout.block_bytes);
                if s as u32 == 0 {
                    assert_eq!(unsafe { kvc_seq_len(cache, seq, &mut len) } as u32, 0);
                    assert_eq!(entries, (len as usize).div_ceil(spec.block_tokens as usize));
                    if !t.is_null() {
                        for &block in &table[..entries] {
                            assert!(block == KVC_NO_BLOCK || u64::from(block) < layout.blocks);
                        }
                    }
                } else {
                    assert_eq!(entries, usize::MAX, "a failed page-table call wrote its count");
                }
                // The key tail: a held range inside the sequence, at most the tail long, and a
                // ring inside the arena.
                let (mut ring, mut ring_len, mut from, mut end) = (core::ptr::null::<u8>(), 0usize, 0u32, 0u32);
                let (layer, head) = (bytes.below_u32(spec.layers + 1), bytes.below_u32(spec.kv_heads + 1));
                let t = unsafe { kvc_key_tail(cache, seq, layer, head, &mut ring, &mut ring_len, &mut from, &mut end) };
                if t as u32 == 0 {
                    unsafe { kvc_seq_len(cache, seq, &mut len) };
                    assert!(from <= end && end == len && end - from <= spec.key_tail_tokens);
                    assert_eq!(ring.is_null(), spec.key_tail_tokens == 0);
                    if !ring.is_null() {
                        let (a, n) = (arena_ptr as usize, arena_bytes);
                        assert!(ring as usize >= a && ring as usize + ring_len <= a + n);
                        assert_eq!(ring_len, (spec.key_tail_tokens * spec.head_dim * 2) as usize);
                    }
                }
                (s, false)
            }
            10 => {
                // Saving and restoring: export into a buffer that is NULL, short, in the arena or
                // fine; then import those bytes (maybe damaged), or made-up bytes under a valid
                // header and checksum, or the arena itself.
                let mut saved = vec![0u8; 1 << 14];
                let cap = bytes.below(saved.len() + 1);
                let mut len = usize::MAX;
                let out: *mut u8 = match bytes.below_u32(4) {
                    0 => core::ptr::null_mut(),
                    1 => arena_ptr,
                    _ => saved.as_mut_ptr(),
                };
                let s = unsafe { kvc_seq_export(cache, seq, out, if out.is_null() { 0 } else { cap }, &mut len) };
                if s as u32 != 0 {
                    assert_eq!(len, usize::MAX, "a failed export wrote its length");
                }
                let exported = s as u32 == 0 && out == saved.as_mut_ptr();
                let clean = if exported { saved[..len].to_vec() } else { Vec::new() };
                let mut made = Vec::new();
                let source = bytes.below_u32(3);
                let (from, n): (*const u8, usize) = match source {
                    0 if exported => {
                        if bytes.null() {
                            let at = bytes.below(len);
                            saved[at] ^= 1 << bytes.below(8);
                        }
                        (saved.as_ptr(), len - bytes.below(2).min(len))
                    }
                    1 => {
                        made.extend_from_slice(b"KVCSEQ02");
                        for w in [spec.layers, spec.kv_heads, spec.head_dim, spec.k_format, spec.v_format, bytes.below_u32(4)] {
                            made.extend_from_slice(&w.to_le_bytes());
                        }
                        made.extend_from_slice(&[0; 8]);
                        for _ in 0..bytes.below(2048) {
                            made.push(bytes.byte());
                        }
                        let sum = kvcache::cache::snapshot::checksum(&made[40..]);
                        made[32..40].copy_from_slice(&sum.to_le_bytes());
                        (made.as_ptr(), made.len())
                    }
                    _ => (arena_ptr.cast_const(), bytes.below(arena_bytes + 1)),
                };
                let mut restored = u64::MAX;
                let r = if bytes.null() {
                    // Through a reader callback that may fail at some call.
                    let mut source = Stream { bytes: from.cast_mut(), len: n, calls: 0, fail_at: bytes.below(40) };
                    let user = (&mut source as *mut Stream).cast();
                    unsafe { kvc_seq_import_from(cache, n, Some(stream_read), user, &mut restored) }
                } else {
                    unsafe { kvc_seq_import(cache, from, n, &mut restored) }
                };
                if exported && bytes.null() {
                    // And a streamed export into a buffer, maybe too short or failing.
                    let mut sink_bytes = vec![0u8; bytes.below(len + 1)];
                    let mut sink = Stream { bytes: sink_bytes.as_mut_ptr(), len: sink_bytes.len(), calls: 0, fail_at: bytes.below(40) };
                    let mut n2 = 0usize;
                    let user = (&mut sink as *mut Stream).cast();
                    let w = unsafe { kvc_seq_export_to(cache, seq, Some(stream_write), user, &mut n2) };
                    if w as u32 == 0 {
                        assert_eq!(&sink_bytes[..n2], &clean[..], "streamed export differs");
                    }
                }
                if r as u32 == 0 {
                    ids.push(restored);
                    rows_made_up |= source == 1 && float_rows;
                } else {
                    assert_eq!(restored, u64::MAX, "a failed import wrote an id");
                }
                (r, true)
            }
            _ => {
                let entries = [KvcBatchEntry { seq, first_position: bytes.word(), tokens: bytes.word() }];
                let opts = KvcAttentionOptions {
                    splits: bytes.word(),
                    query_tile: bytes.word(),
                    scale: if bytes.null() { f32::NAN } else { 0.0 },
                    flags: bytes.word() % 4,
                };
                let (mut items, mut partial_len, mut item_scratch) = (0usize, 0usize, 0usize);
                let s = unsafe {
                    kvc_attention_plan(cache, 0, entries.as_ptr(), 1, &opts, &mut items, &mut partial_len, &mut item_scratch)
                };
                // Queries of the batch's real length (at most 2048 floats here).
                let len = entries[0].tokens as usize * (spec.q_heads * spec.head_dim) as usize;
                if s as u32 == 0 && items.saturating_mul(partial_len) <= 1 << 16 && item_scratch <= 1 << 16 && len <= 2048 {
                    let mut partials = vec![0.0f32; items * partial_len];
                    for i in (0..items).rev() {
                        let r = unsafe {
                            kvc_attention_run_item(cache, 0, entries.as_ptr(), 1, &opts, i, floats.as_ptr(), len,
                                partials[i * partial_len..].as_mut_ptr(), partial_len, scratch.as_mut_ptr(), item_scratch)
                        };
                        assert_eq!(r as u32, 0, "a planned item failed");
                    }
                    let r = unsafe {
                        kvc_attention_merge(cache, 0, entries.as_ptr(), 1, &opts, partials.as_ptr(), partials.len(), out.as_mut_ptr(), len)
                    };
                    assert_eq!(r as u32, 0, "merge of a planned batch failed");
                    // The one-shot call with the same options: the same bits.
                    let mut needed = 0usize;
                    let r = unsafe { kvc_attention_scratch_len_ex(cache, &opts, &mut needed) };
                    assert_eq!(r as u32, 0, "scratch length of planned options refused");
                    if needed <= scratch.len() {
                        let mut one_shot = vec![0.0f32; len];
                        let r = unsafe {
                            kvc_attention_ex(cache, 0, entries.as_ptr(), 1, &opts, floats.as_ptr(), one_shot.as_mut_ptr(), len,
                                scratch.as_mut_ptr(), needed)
                        };
                        assert_eq!(r as u32, 0, "one-shot call of a planned batch failed");
                        let same_bits = one_shot.iter().zip(&out[..len]).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same_bits, "one-shot and work-item attention differ");
                    }
                }
                (s, false)
            }
        };
        let after = stats(cache);
        if status as u32 != 0 || !mutating {
            assert!(same(&before, &after), "a failed or read-only call changed the cache: {status:?}");
        }
        let mut message = [0u8; 8];
        unsafe { kvc_status_message(status as u32, message.as_mut_ptr().cast(), message.len()) };
    }
    drop(arena);
    drop(handle);
});
