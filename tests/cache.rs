//! The cache core against a plain model: a `Vec` of tokens per sequence.

use kvcache::spec::Kind;
use kvcache::{CacheSpec, Error, KvCache, KvFormat, Layout, SeqId};
use proptest::prelude::*;

/// A deterministic K or V vector for (token tag, layer, kind): multiples of 1/4 below 64, so
/// f32, f16 and bf16 all store them exactly.
fn vector(tag: u32, layer: usize, kind: Kind, elems: usize) -> Vec<f32> {
    let salt = layer as u32 * 7 + if kind == Kind::K { 0 } else { 3 };
    (0..elems as u32)
        .map(|e| {
            ((tag
                .wrapping_mul(2654435761)
                .wrapping_add(e * 97 + salt * 13))
                % 256) as f32
                / 4.0
                - 32.0
        })
        .collect()
}

fn small_spec(k: KvFormat, v: KvFormat) -> CacheSpec {
    let mut spec = CacheSpec::new(2, 4, 2, 3);
    spec.block_tokens = 4;
    spec.k_format = k;
    spec.v_format = v;
    spec.max_seqs = 4;
    spec.max_seq_tokens = 40;
    spec
}

fn write_token(cache: &mut KvCache, seq: SeqId, position: usize, tag: u32) -> Result<(), Error> {
    let spec = *cache.spec();
    let elems = spec.kv_heads * spec.head_dim;
    for layer in 0..spec.layers {
        cache.write(
            seq,
            layer,
            position,
            &vector(tag, layer, Kind::K, elems),
            &vector(tag, layer, Kind::V, elems),
        )?;
    }
    Ok(())
}

fn assert_token(cache: &KvCache, seq: SeqId, position: usize, tag: u32) {
    let spec = *cache.spec();
    let elems = spec.kv_heads * spec.head_dim;
    let (mut k, mut v) = (vec![0.0; elems], vec![0.0; elems]);
    for layer in 0..spec.layers {
        cache.read(seq, layer, position, &mut k, &mut v).unwrap();
        assert_eq!(
            k,
            vector(tag, layer, Kind::K, elems),
            "K seq {seq:?} pos {position} layer {layer}"
        );
        assert_eq!(
            v,
            vector(tag, layer, Kind::V, elems),
            "V seq {seq:?} pos {position} layer {layer}"
        );
    }
}

#[test]
fn write_then_read_back_every_format() {
    for k in KvFormat::FLOATS {
        for v in KvFormat::FLOATS {
            let spec = small_spec(k, v);
            let mut arena = vec![0u8; Layout::new(spec).unwrap().arena_bytes(16).unwrap()];
            let mut cache = KvCache::new(spec, &mut arena).unwrap();
            assert_eq!(cache.capacity_blocks(), 16);
            let a = cache.add_sequence().unwrap();
            let b = cache.add_sequence().unwrap();
            assert_eq!(cache.reserve(a, 6).unwrap(), 0..6);
            assert_eq!(cache.reserve(b, 3).unwrap(), 0..3);
            for p in 0..6 {
                write_token(&mut cache, a, p, 100 + p as u32).unwrap();
            }
            for p in 0..3 {
                write_token(&mut cache, b, p, 200 + p as u32).unwrap();
            }
            for p in 0..6 {
                assert_token(&cache, a, p, 100 + p as u32);
            }
            for p in 0..3 {
                assert_token(&cache, b, p, 200 + p as u32);
            }
            let stats = cache.stats();
            assert_eq!(stats.blocks_used, 3);
            assert_eq!(stats.tokens, 9);
            assert_eq!(stats.waste_slots, 2 + 1);
            cache.check_invariants().unwrap();
        }
    }
}

#[test]
fn fork_shares_then_copies_on_write() {
    let spec = small_spec(KvFormat::F32, KvFormat::F16);
    let mut arena = vec![0u8; Layout::new(spec).unwrap().arena_bytes(8).unwrap()];
    let mut cache = KvCache::new(spec, &mut arena).unwrap();
    let parent = cache.add_sequence().unwrap();
    cache.reserve(parent, 6).unwrap();
    for p in 0..6 {
        write_token(&mut cache, parent, p, p as u32).unwrap();
    }
    let child = cache.fork(parent).unwrap();
    assert_eq!(cache.stats().blocks_used, 2);
    assert_eq!(cache.seq_stats(child).unwrap().shared_blocks, 2);
    // Growing the child copies the shared partial tail block, not the full first one.
    cache.reserve(child, 1).unwrap();
    assert_eq!(cache.stats().blocks_used, 3);
    write_token(&mut cache, child, 6, 99).unwrap();
    // Overwriting a shared full block copies it too.
    write_token(&mut cache, child, 0, 77).unwrap();
    assert_eq!(cache.stats().blocks_used, 4);
    for p in 0..6 {
        assert_token(&cache, parent, p, p as u32);
    }
    assert_token(&cache, child, 0, 77);
    assert_token(&cache, child, 6, 99);
    cache.check_invariants().unwrap();
    cache.remove(parent).unwrap();
    cache.remove(child).unwrap();
    assert_eq!(cache.free_blocks(), 8);
    cache.check_invariants().unwrap();
}

/// Everything observable about a cache, to show that a failed call changed nothing.
fn snapshot(cache: &KvCache, seqs: &[SeqId]) -> (kvcache::cache::CacheStats, Vec<Vec<f32>>) {
    let spec = *cache.spec();
    let mut rows = Vec::new();
    for &seq in seqs {
        let Ok(len) = cache.len(seq) else { continue };
        for p in 0..len {
            for layer in 0..spec.layers {
                let mut k = vec![0.0; spec.kv_heads * spec.head_dim];
                let mut v = k.clone();
                if cache.read(seq, layer, p, &mut k, &mut v).is_ok() {
                    rows.push(k);
                    rows.push(v);
                }
            }
        }
    }
    (cache.stats(), rows)
}

#[test]
fn bad_input_gets_an_error_and_changes_nothing() {
    let spec = small_spec(KvFormat::F16, KvFormat::F16);
    let layout = Layout::new(spec).unwrap();
    // Arena of 0 bytes, and one byte short of a single block.
    assert!(matches!(
        KvCache::new(spec, &mut []),
        Err(Error::ArenaTooSmall { .. })
    ));
    let mut short = vec![0u8; layout.arena_bytes(1).unwrap() - 1];
    assert!(matches!(
        KvCache::new(spec, &mut short),
        Err(Error::ArenaTooSmall { .. })
    ));
    // Misaligned arena: any start works.
    let mut big = vec![0u8; layout.arena_bytes(4).unwrap() + 3];
    for offset in 1..4 {
        let cache = KvCache::with_blocks(
            spec,
            4,
            &mut big[offset..offset + layout.arena_bytes(4).unwrap()],
        )
        .unwrap();
        assert_eq!(cache.capacity_blocks(), 4);
    }
    // Bad specs.
    let mut bad = spec;
    bad.head_dim = 0;
    assert_eq!(
        KvCache::new(bad, &mut big).err(),
        Some(Error::ZeroDimension("head_dim"))
    );
    bad = spec;
    bad.q_heads = 10;
    bad.kv_heads = 3;
    assert!(matches!(
        KvCache::new(bad, &mut big),
        Err(Error::HeadsNotMultiple { .. })
    ));
    bad = spec;
    bad.max_seq_tokens = 1 << 40;
    assert_eq!(
        KvCache::new(bad, &mut big).err(),
        Some(Error::InvalidSpec("max_seq_tokens"))
    );

    let mut arena = vec![0u8; layout.arena_bytes(5).unwrap()];
    let mut cache = KvCache::new(spec, &mut arena).unwrap();
    let a = cache.add_sequence().unwrap();
    let b = cache.add_sequence().unwrap();
    cache.reserve(a, 9).unwrap(); // 3 blocks
    for p in 0..9 {
        write_token(&mut cache, a, p, p as u32).unwrap();
    }
    cache.reserve(b, 2).unwrap(); // 1 block, 1 free left
    write_token(&mut cache, b, 0, 50).unwrap();
    write_token(&mut cache, b, 1, 51).unwrap();
    let before = snapshot(&cache, &[a, b]);

    // Reserving past the pool with other sequences live.
    assert_eq!(
        cache.reserve(b, 7),
        Err(Error::OutOfBlocks { needed: 2, free: 1 })
    );
    assert_eq!(
        cache.reserve_batch(&[(a, 4), (b, 4)]),
        Err(Error::OutOfBlocks { needed: 2, free: 1 })
    );
    assert_eq!(
        cache.reserve_batch(&[(a, 1), (a, 1)]),
        Err(Error::DuplicateSequence)
    );
    // Too long.
    assert!(matches!(cache.reserve(a, 100), Err(Error::TooLong { .. })));
    assert!(matches!(
        cache.reserve(a, usize::MAX),
        Err(Error::TooLong { .. })
    ));
    // Truncating to a longer length.
    assert_eq!(
        cache.truncate(a, 10),
        Err(Error::BadPosition {
            position: 10,
            len: 9
        })
    );
    // Writing past the reserved slots, bad layer, bad shapes.
    assert!(matches!(
        write_token(&mut cache, a, 9, 1),
        Err(Error::BadPosition { .. })
    ));
    let elems = spec.kv_heads * spec.head_dim;
    assert_eq!(
        cache.write(a, 2, 0, &vec![0.0; elems], &vec![0.0; elems]),
        Err(Error::BadIndex("layer"))
    );
    assert_eq!(
        cache.write(a, 0, 0, &vec![0.0; elems - 1], &vec![0.0; elems]),
        Err(Error::BadShape("k"))
    );
    assert_eq!(
        cache.write(a, 0, 0, &vec![0.0; elems], &vec![0.0; elems + 1]),
        Err(Error::BadShape("v"))
    );
    // Forged ids.
    assert_eq!(
        cache.len(SeqId::from_raw(u64::MAX)),
        Err(Error::UnknownSequence)
    );
    assert_eq!(cache.fork(SeqId::from_raw(3)), Err(Error::UnknownSequence));
    // A fork, truncated, then the fork's write copies and runs out.
    let c = cache.fork(a).unwrap();
    cache.truncate(c, 5).unwrap();
    let forked = cache.fork(c).unwrap();
    assert_eq!(cache.free_blocks(), 1);
    cache.reserve(forked, 1).unwrap(); // copies the shared tail: last free block
    assert_eq!(cache.free_blocks(), 0);
    let mid = snapshot(&cache, &[a, b, c, forked]);
    assert!(matches!(
        write_token(&mut cache, c, 0, 9),
        Err(Error::OutOfBlocks { .. })
    ));
    assert_eq!(snapshot(&cache, &[a, b, c, forked]), mid);
    cache.remove(forked).unwrap();
    cache.remove(c).unwrap();
    // Writing to a removed sequence; removing it again.
    assert!(matches!(
        write_token(&mut cache, c, 0, 1),
        Err(Error::UnknownSequence)
    ));
    assert_eq!(cache.remove(c), Err(Error::UnknownSequence));
    // A removed id stays refused after its slot is reused.
    let d = cache.add_sequence().unwrap();
    assert_eq!(d.slot(), c.slot());
    assert_eq!(cache.len(c), Err(Error::UnknownSequence));
    cache.remove(d).unwrap();
    // Too many sequences.
    let extra: Vec<_> = (0..2).map(|_| cache.add_sequence().unwrap()).collect();
    assert_eq!(cache.add_sequence(), Err(Error::TooManySequences));
    assert_eq!(cache.fork(a), Err(Error::TooManySequences));
    for seq in extra {
        cache.remove(seq).unwrap();
    }
    assert_eq!(snapshot(&cache, &[a, b]), before);
    cache.check_invariants().unwrap();
}

#[test]
fn sliding_window_evicts_old_blocks_but_keeps_sinks() {
    let mut spec = small_spec(KvFormat::F32, KvFormat::F32);
    spec.window = 5;
    spec.sink_tokens = 2;
    let layout = Layout::new(spec).unwrap();
    let mut arena = vec![0u8; layout.arena_bytes(6).unwrap()];
    let mut cache = KvCache::new(spec, &mut arena).unwrap();
    let seq = cache.add_sequence().unwrap();
    for p in 0..30 {
        cache.reserve(seq, 1).unwrap();
        write_token(&mut cache, seq, p, p as u32).unwrap();
        cache.check_invariants().unwrap();
        // Next query at p + 1 sees p - 3 ..= p + 1 and the sinks 0, 1.
        for q in (p + 1).saturating_sub(4)..=p {
            assert_token(&cache, seq, q, q as u32);
        }
        for sink in 0..2.min(p + 1) {
            assert_token(&cache, seq, sink, sink as u32);
        }
        // At most: the sink block, the blocks covering the window, and the tail.
        assert!(cache.seq_stats(seq).unwrap().blocks <= 4, "p {p}");
    }
    let mut k = vec![0.0; 6];
    let mut v = vec![0.0; 6];
    assert_eq!(
        cache.read(seq, 0, 8, &mut k, &mut v),
        Err(Error::Evicted { position: 8 })
    );
    assert!(matches!(
        cache.truncate(seq, 10),
        Err(Error::Evicted { .. })
    ));
    cache.truncate(seq, 28).unwrap();
    cache.check_invariants().unwrap();
}

#[test]
fn ids_from_another_cache_are_refused() {
    let spec = small_spec(KvFormat::F32, KvFormat::F32);
    let bytes = Layout::new(spec).unwrap().arena_bytes(8).unwrap();
    let (mut arena_a, mut arena_b) = (vec![0u8; bytes], vec![0u8; bytes]);
    let mut a = KvCache::new(spec, &mut arena_a).unwrap();
    let mut b = KvCache::new(spec, &mut arena_b).unwrap();
    // Both caches put their first sequence in slot 0.
    let id_a = a.add_sequence().unwrap();
    let id_b = b.add_sequence().unwrap();
    assert_eq!((id_a.slot(), id_b.slot()), (0, 0));
    assert_ne!(id_a, id_b);
    b.reserve(id_b, 3).unwrap();
    for p in 0..3 {
        write_token(&mut b, id_b, p, p as u32).unwrap();
    }
    let before = snapshot(&b, &[id_b]);
    let k = vec![0.0; spec.kv_heads * spec.head_dim];
    assert_eq!(b.len(id_a), Err(Error::UnknownSequence));
    assert_eq!(b.reserve(id_a, 1), Err(Error::UnknownSequence));
    assert_eq!(b.write(id_a, 0, 0, &k, &k), Err(Error::UnknownSequence));
    assert_eq!(b.truncate(id_a, 0), Err(Error::UnknownSequence));
    assert_eq!(b.fork(id_a), Err(Error::UnknownSequence));
    assert_eq!(b.remove(id_a), Err(Error::UnknownSequence));
    assert_eq!(snapshot(&b, &[id_b]), before);
    // A cache rebuilt in the same arena (the first one no longer used) refuses the old
    // cache's ids too.
    let _ = a.len(id_a);
    let mut again = KvCache::new(spec, &mut arena_a).unwrap();
    let id_again = again.add_sequence().unwrap();
    assert_eq!(id_again.slot(), 0);
    assert_ne!(id_again, id_a);
    assert_eq!(again.len(id_a), Err(Error::UnknownSequence));
}

#[test]
fn reserving_nothing_keeps_what_the_window_holds() {
    let mut spec = small_spec(KvFormat::F32, KvFormat::F32);
    spec.window = 4;
    let layout = Layout::new(spec).unwrap();
    let mut arena = vec![0u8; layout.arena_bytes(8).unwrap()];
    let mut cache = KvCache::new(spec, &mut arena).unwrap();
    let seq = cache.add_sequence().unwrap();
    // Reserve a whole prompt before writing any of it (its queries still need every key).
    cache.reserve(seq, 16).unwrap();
    let before = snapshot(&cache, &[seq]);
    assert_eq!(cache.reserve(seq, 0), Ok(16..16));
    cache.reserve_batch(&[(seq, 0)]).unwrap();
    assert_eq!(snapshot(&cache, &[seq]), before);
    for p in 0..16 {
        write_token(&mut cache, seq, p, p as u32).unwrap();
    }
    cache.check_invariants().unwrap();
}

#[test]
fn windows_wider_than_any_sequence_keep_everything() {
    for window in [usize::MAX, usize::MAX - 1, u32::MAX as usize + 7] {
        let mut spec = small_spec(KvFormat::F32, KvFormat::F32);
        spec.window = window;
        spec.sink_tokens = 1;
        let layout = Layout::new(spec).unwrap();
        let mut arena = vec![0u8; layout.arena_bytes(10).unwrap()];
        let mut cache = KvCache::new(spec, &mut arena).unwrap();
        let seq = cache.add_sequence().unwrap();
        for p in 0..spec.max_seq_tokens {
            cache.reserve(seq, 1).unwrap();
            write_token(&mut cache, seq, p, p as u32).unwrap();
        }
        for p in 0..spec.max_seq_tokens {
            assert_token(&cache, seq, p, p as u32);
        }
        cache.truncate(seq, 1).unwrap();
        cache.check_invariants().unwrap();
    }
}

#[derive(Clone, Debug)]
enum Op {
    Add,
    Append { seq: usize, tokens: usize },
    AppendBatch { tokens: Vec<usize> },
    Overwrite { seq: usize, position: usize },
    Fork { seq: usize },
    Truncate { seq: usize, keep: usize },
    Remove { seq: usize },
    UseRemoved,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::Add),
        4 => (0..6usize, 0..12usize).prop_map(|(seq, tokens)| Op::Append { seq, tokens }),
        1 => proptest::collection::vec(0..6usize, 1..4).prop_map(|tokens| Op::AppendBatch { tokens }),
        2 => (0..6usize, 0..64usize).prop_map(|(seq, position)| Op::Overwrite { seq, position }),
        2 => (0..6usize).prop_map(|seq| Op::Fork { seq }),
        2 => (0..6usize, 0..64usize).prop_map(|(seq, keep)| Op::Truncate { seq, keep }),
        1 => (0..6usize).prop_map(|seq| Op::Remove { seq }),
        1 => Just(Op::UseRemoved),
    ]
}

fn format() -> impl Strategy<Value = KvFormat> {
    prop_oneof![
        Just(KvFormat::F32),
        Just(KvFormat::F16),
        Just(KvFormat::Bf16)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_match_a_plain_model(
        ops in proptest::collection::vec(op(), 1..60),
        k_format in format(),
        v_format in format(),
        block_tokens in 1..6usize,
        blocks in 1..24usize,
    ) {
        let mut spec = small_spec(k_format, v_format);
        spec.block_tokens = block_tokens;
        spec.max_seqs = 5;
        spec.max_seq_tokens = 30;
        let layout = Layout::new(spec).unwrap();
        let mut arena = vec![0u8; layout.arena_bytes(blocks).unwrap()];
        let mut cache = KvCache::new(spec, &mut arena).unwrap();
        // The model: live sequences with the tag of each of their tokens.
        let mut model: Vec<(SeqId, Vec<u32>)> = Vec::new();
        let mut removed: Vec<SeqId> = Vec::new();
        let mut next_tag = 0u32;
        for op in ops {
            match op {
                Op::Add => match cache.add_sequence() {
                    Ok(seq) => model.push((seq, Vec::new())),
                    Err(e) => prop_assert_eq!(e, Error::TooManySequences),
                },
                Op::Append { seq, tokens } if !model.is_empty() => {
                    let index = seq % model.len();
                    let id = model[index].0;
                    match cache.reserve(id, tokens) {
                        Ok(range) => {
                            prop_assert_eq!(range.start, model[index].1.len());
                            for position in range {
                                next_tag += 1;
                                write_token(&mut cache, id, position, next_tag).unwrap();
                                model[index].1.push(next_tag);
                            }
                        }
                        Err(Error::OutOfBlocks { .. }) | Err(Error::TooLong { .. }) => {}
                        Err(e) => prop_assert!(false, "unexpected {e}"),
                    }
                }
                Op::AppendBatch { tokens } if !model.is_empty() => {
                    let requests: Vec<(SeqId, usize)> = model.iter().zip(&tokens).map(|(s, &n)| (s.0, n)).collect();
                    if cache.reserve_batch(&requests).is_ok() {
                        for (index, &(id, n)) in requests.iter().enumerate() {
                            for _ in 0..n {
                                next_tag += 1;
                                let position = model[index].1.len();
                                write_token(&mut cache, id, position, next_tag).unwrap();
                                model[index].1.push(next_tag);
                            }
                        }
                    }
                }
                Op::Overwrite { seq, position } if !model.is_empty() => {
                    let index = seq % model.len();
                    let id = model[index].0;
                    next_tag += 1;
                    match write_token(&mut cache, id, position, next_tag) {
                        Ok(()) => model[index].1[position] = next_tag,
                        Err(Error::BadPosition { .. }) => prop_assert!(position >= model[index].1.len()),
                        // Copy-on-write failed: the first layer must not have been written.
                        Err(Error::OutOfBlocks { .. }) => {}
                        Err(e) => prop_assert!(false, "unexpected {e}"),
                    }
                }
                Op::Fork { seq } if !model.is_empty() => {
                    let index = seq % model.len();
                    match cache.fork(model[index].0) {
                        Ok(child) => {
                            let tokens = model[index].1.clone();
                            model.push((child, tokens));
                        }
                        Err(e) => prop_assert_eq!(e, Error::TooManySequences),
                    }
                }
                Op::Truncate { seq, keep } if !model.is_empty() => {
                    let index = seq % model.len();
                    let id = model[index].0;
                    let len = model[index].1.len();
                    match cache.truncate(id, keep) {
                        Ok(()) => model[index].1.truncate(keep),
                        Err(e) => {
                            prop_assert!(keep > len);
                            prop_assert_eq!(e, Error::BadPosition { position: keep, len });
                        }
                    }
                }
                Op::Remove { seq } if !model.is_empty() => {
                    let (id, _) = model.remove(seq % model.len());
                    cache.remove(id).unwrap();
                    removed.push(id);
                }
                Op::UseRemoved => {
                    if let Some(&id) = removed.last() {
                        prop_assert_eq!(cache.reserve(id, 1), Err(Error::UnknownSequence));
                        prop_assert_eq!(cache.truncate(id, 0), Err(Error::UnknownSequence));
                        prop_assert_eq!(cache.page_table(id), Err(Error::UnknownSequence));
                        prop_assert_eq!(write_token(&mut cache, id, 0, 0), Err(Error::UnknownSequence));
                    }
                }
                _ => {}
            }
            prop_assert_eq!(cache.check_invariants(), Ok(()));
            prop_assert_eq!(cache.sequences(), model.len());
            for (id, tokens) in &model {
                prop_assert_eq!(cache.len(*id).unwrap(), tokens.len());
                let stats = cache.seq_stats(*id).unwrap();
                prop_assert_eq!(stats.blocks, tokens.len().div_ceil(block_tokens));
                // The public page table: one physical block per logical one (no window here).
                let table = cache.page_table(*id).unwrap();
                prop_assert_eq!(table.len(), stats.blocks);
                prop_assert!(table.iter().all(|&b| (b as usize) < cache.capacity_blocks()));
                for (position, &tag) in tokens.iter().enumerate() {
                    assert_token(&cache, *id, position, tag);
                }
            }
        }
    }
}

/// Arenas from `HeapArena::new` on both sides of the huge-page threshold (under `std` on Linux
/// the large one is 2 MiB-aligned and advised to use huge pages): zeroed, writable through a
/// cache that fills them, and freed with the alignment they were allocated with (a mismatch
/// would be caught by the allocator or Miri).
#[test]
fn heap_arenas_small_and_huge_page_sized() {
    use kvcache::arena::{HeapArena, HUGE_PAGE_MIN_BYTES};
    for bytes in [
        4096,
        HUGE_PAGE_MIN_BYTES - 1,
        HUGE_PAGE_MIN_BYTES,
        HUGE_PAGE_MIN_BYTES + 4097,
    ] {
        let mut arena = HeapArena::new(bytes).unwrap();
        let slice = arena.as_mut_slice();
        assert_eq!(slice.len(), bytes);
        assert!(slice.iter().all(|&b| b == 0), "{bytes}: not zeroed");
        if bytes >= HUGE_PAGE_MIN_BYTES && cfg!(target_os = "linux") {
            assert_eq!(
                slice.as_ptr() as usize % (2 << 20),
                0,
                "{bytes}: not 2 MiB aligned"
            );
        }
        let spec = small_spec(KvFormat::F16, KvFormat::F16);
        if Layout::new(spec).unwrap().arena_bytes(1).unwrap() > bytes {
            continue;
        }
        let mut cache = KvCache::new(spec, arena.as_mut_slice()).unwrap();
        let seq = cache.add_sequence().unwrap();
        cache.reserve(seq, 5).unwrap();
        for position in 0..5 {
            write_token(&mut cache, seq, position, 40 + position as u32).unwrap();
        }
        for position in 0..5 {
            assert_token(&cache, seq, position, 40 + position as u32);
        }
    }
    assert!(HeapArena::new(0).is_err());
}
