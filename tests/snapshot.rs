//! Saving a sequence to bytes and restoring it (`export_sequence` / `import_sequence`): the
//! restored sequence reads, attends and grows exactly like the original, in any cache of the
//! same geometry and formats; bytes that are not a valid snapshot are refused and change
//! nothing.

use kvcache::attention::{attention, attention_scratch_len, AttentionOptions, BatchEntry};
use kvcache::spec::Kind;
use kvcache::{CacheSpec, Error, KvCache, KvFormat, Layout, SeqId};
use proptest::prelude::*;

use KvFormat::{Bf16, Int4, Int8, F16, F32};

const FORMATS: [(KvFormat, KvFormat); 8] = [
    (F32, F32),
    (F16, F16),
    (Bf16, Bf16),
    (Int8, Int8),
    (Int4, Int4),
    (Int8, Int4),
    (F16, Int4),
    (Int4, F16),
];

/// Two layers, GQA 3 (6 query heads, 2 KV heads), head dim 64 (int4 rows stored rotated).
fn spec(k: KvFormat, v: KvFormat, block_tokens: usize) -> CacheSpec {
    let mut spec = CacheSpec::new(2, 6, 2, 64);
    spec.block_tokens = block_tokens;
    spec.k_format = k;
    spec.v_format = v;
    spec.max_seqs = 3;
    spec.max_seq_tokens = 200;
    spec
}

fn arena(spec: CacheSpec, blocks: usize) -> Vec<u8> {
    vec![0u8; Layout::new(spec).unwrap().arena_bytes(blocks).unwrap()]
}

/// Deterministic values in [-2, 2) plus a per-channel bias (keys share one, as in real models,
/// which is what int4's offsets remove).
fn values(seed: &mut u64, n: usize, channels: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let unit = (*seed >> 40) as f32 / (1u64 << 24) as f32;
            4.0 * unit - 2.0 + ((i % channels) % 7) as f32 * 0.5
        })
        .collect()
}

/// Appends `prefill` tokens in one write per layer, then `decode` tokens one at a time.
fn grow(cache: &mut KvCache, seq: SeqId, prefill: usize, decode: usize, seed: &mut u64) {
    let spec = *cache.spec();
    let elems = spec.kv_heads * spec.head_dim;
    for run in std::iter::once(prefill).chain(std::iter::repeat_n(1, decode)) {
        if run == 0 {
            continue;
        }
        let first = cache.reserve(seq, run).unwrap().start;
        for layer in 0..spec.layers {
            let k = values(seed, run * elems, elems);
            let v = values(seed, run * elems, elems);
            cache.write_run(seq, layer, first, &k, &v).unwrap();
        }
    }
}

/// Every stored row of `seq` as read back, in f32 bits.
fn rows(cache: &KvCache, seq: SeqId) -> Vec<u32> {
    let spec = *cache.spec();
    let mut out = Vec::new();
    let mut row = vec![0.0f32; spec.head_dim];
    for position in 0..cache.len(seq).unwrap() {
        for layer in 0..spec.layers {
            for kind in [Kind::K, Kind::V] {
                for head in 0..spec.kv_heads {
                    cache
                        .read_row(seq, layer, kind, head, position, &mut row)
                        .unwrap();
                    out.extend(row.iter().map(|x| x.to_bits()));
                }
            }
        }
    }
    out
}

/// Decode attention of one query (the last position) in every layer.
fn attend(cache: &KvCache, seq: SeqId, seed: u64) -> Vec<f32> {
    let spec = *cache.spec();
    let len = cache.len(seq).unwrap();
    let entries = [BatchEntry {
        seq,
        first_position: len - 1,
        tokens: 1,
    }];
    let options = AttentionOptions::default();
    let mut scratch = vec![0.0; attention_scratch_len(cache, &options)];
    let mut seed = seed;
    let q = values(&mut seed, spec.q_heads * spec.head_dim, spec.head_dim);
    let mut all = Vec::new();
    for layer in 0..spec.layers {
        let mut out = vec![0.0; q.len()];
        attention(cache, layer, &entries, &q, &mut out, &mut scratch, &options).unwrap();
        all.extend(out);
    }
    all
}

fn export(cache: &KvCache, seq: SeqId) -> Vec<u8> {
    let mut bytes = vec![0u8; cache.exported_len(seq).unwrap()];
    assert_eq!(cache.export_sequence(seq, &mut bytes).unwrap(), bytes.len());
    bytes
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn restored_sequences_read_attend_and_grow_like_the_original() {
    for (k, v) in FORMATS {
        for (prefill, decode) in [(0, 0), (1, 0), (37, 3), (48, 0), (5, 20)] {
            let what = format!("{k:?}/{v:?} prefill {prefill} decode {decode}");
            let spec16 = spec(k, v, 16);
            let mut a_arena = arena(spec16, 40);
            let mut a = KvCache::with_blocks(spec16, 40, &mut a_arena).unwrap();
            let mut seed = 7 + prefill as u64;
            let original = a.add_sequence().unwrap();
            grow(&mut a, original, prefill, decode, &mut seed);
            let bytes = export(&a, original);

            // Same geometry and block size: reads and attention bit for bit, and the restored
            // sequence exports to the same bytes.
            let mut b_arena = arena(spec16, 40);
            let mut b = KvCache::with_blocks(spec16, 40, &mut b_arena).unwrap();
            let other = b.add_sequence().unwrap(); // the restored one takes another slot
            let restored = b.import_sequence(&bytes).unwrap();
            assert_ne!(restored, other);
            assert_eq!(b.len(restored).unwrap(), prefill + decode, "{what}");
            assert_eq!(rows(&b, restored), rows(&a, original), "{what}");
            assert_eq!(export(&b, restored), bytes, "{what}");
            b.check_invariants().unwrap();
            if prefill + decode > 0 {
                assert_eq!(
                    bits(&attend(&b, restored, 3)),
                    bits(&attend(&a, original, 3)),
                    "{what}"
                );
            }

            // Both grow the same way: the int4 state (offsets, exact first rows) came along.
            let mut seed_a = 99;
            let mut seed_b = 99;
            grow(&mut a, original, 0, 5, &mut seed_a);
            grow(&mut b, restored, 0, 5, &mut seed_b);
            assert_eq!(rows(&b, restored), rows(&a, original), "{what}: grown");
            assert_eq!(
                bits(&attend(&b, restored, 4)),
                bits(&attend(&a, original, 4)),
                "{what}: grown"
            );

            // Another block size: the same rows, and attention bit for bit as in a cache of
            // that block size grown the same way from the start.
            let spec8 = spec(k, v, 8);
            let mut c_arena = arena(spec8, 80);
            let mut c = KvCache::with_blocks(spec8, 80, &mut c_arena).unwrap();
            let moved = c.import_sequence(&bytes).unwrap();
            c.check_invariants().unwrap();
            let mut seed_c = 99;
            grow(&mut c, moved, 0, 5, &mut seed_c);
            assert_eq!(rows(&c, moved), rows(&a, original), "{what}: block size 8");
            let mut d_arena = arena(spec8, 80);
            let mut d = KvCache::with_blocks(spec8, 80, &mut d_arena).unwrap();
            let fresh = d.add_sequence().unwrap();
            let (mut seed_d, mut seed_d2) = (7 + prefill as u64, 99);
            grow(&mut d, fresh, prefill, decode, &mut seed_d);
            grow(&mut d, fresh, 0, 5, &mut seed_d2);
            let got = attend(&c, moved, 4);
            assert_eq!(
                bits(&got),
                bits(&attend(&d, fresh, 4)),
                "{what}: block size 8"
            );
            // Against block size 16: the blocks' sums round differently, within float noise
            // where the values are summed exactly. (int4 values meet their weights as 8-bit
            // integers scaled per block, so there the two differ by that rounding; its bound
            // is tested in `tests/kv_quant.rs`.)
            if v != KvFormat::Int4 {
                let want = attend(&a, original, 4);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "{what}: {g} vs {w}"
                    );
                }
            }
        }
    }
}

/// The documented checksum, written again here from the layout's description: FNV-1a's step
/// over little-endian 64-bit words in four interleaved lanes, folded with the length.
fn checksum(bytes: &[u8]) -> u64 {
    const PRIME: u64 = 0x100000001b3;
    let mut lanes: Vec<u64> = (0..4).map(|i| 0xcbf29ce484222325 ^ i).collect();
    for (i, word) in bytes.chunks(8).enumerate() {
        let mut padded = [0u8; 8];
        padded[..word.len()].copy_from_slice(word);
        lanes[i % 4] = (lanes[i % 4] ^ u64::from_le_bytes(padded)).wrapping_mul(PRIME);
    }
    let mut h = (bytes.len() as u64).wrapping_mul(PRIME);
    for lane in lanes {
        h = (h ^ lane).wrapping_mul(PRIME);
    }
    h
}

fn reseal(bytes: &mut [u8]) {
    let sum = checksum(&bytes[40..]);
    bytes[32..40].copy_from_slice(&sum.to_le_bytes());
}

#[test]
fn bad_snapshots_are_refused_and_change_nothing() {
    let s = spec(Int8, Int4, 16);
    let mut a_arena = arena(s, 20);
    let mut a = KvCache::with_blocks(s, 20, &mut a_arena).unwrap();
    let mut seed = 1;
    let seq = a.add_sequence().unwrap();
    grow(&mut a, seq, 20, 2, &mut seed);
    let good = export(&a, seq);

    let mut b_arena = arena(s, 20);
    let mut b = KvCache::with_blocks(s, 20, &mut b_arena).unwrap();
    let resident = b.add_sequence().unwrap();
    grow(&mut b, resident, 9, 0, &mut seed);
    let before = (b.stats(), rows(&b, resident));
    let unchanged = |b: &mut KvCache, what: &str| {
        assert_eq!((b.stats(), rows(b, resident)), before, "{what}");
        b.check_invariants().unwrap();
    };
    let bad = |e: Result<SeqId, Error>| matches!(e, Err(Error::BadSnapshot(_)));

    for len in 0..good.len() {
        assert!(bad(b.import_sequence(&good[..len])), "truncated to {len}");
    }
    unchanged(&mut b, "truncated");
    let longer = [&good[..], &[0]].concat();
    assert!(bad(b.import_sequence(&longer)));
    for at in 0..40 {
        let mut flipped = good.clone();
        flipped[at] ^= 0x10;
        assert!(b.import_sequence(&flipped).is_err(), "header byte {at}");
    }
    for at in (40..good.len()).step_by(97) {
        let mut flipped = good.clone();
        flipped[at] ^= 1;
        assert!(bad(b.import_sequence(&flipped)), "payload byte {at}");
    }
    unchanged(&mut b, "flipped bytes");

    // Well sealed but wrong inside: a NaN int8 scale, a NaN exact first value.
    let row_bytes = a.layout().row_bytes(Kind::K);
    let mut nan_scale = good.clone();
    nan_scale[40 + 64..40 + 66].copy_from_slice(&0x7fc0u16.to_le_bytes());
    reseal(&mut nan_scale);
    assert!(matches!(
        b.import_sequence(&nan_scale),
        Err(Error::BadSnapshot(m)) if m.contains("scale")
    ));
    assert_eq!(row_bytes, 68);
    let mut nan_state = good.clone();
    // The last state word, before the key tail's count (0: int8 keys here have no tail).
    let n = nan_state.len() - 4;
    nan_state[n - 4..n].copy_from_slice(&f32::NAN.to_bits().to_le_bytes());
    reseal(&mut nan_state);
    assert!(matches!(
        b.import_sequence(&nan_state),
        Err(Error::BadSnapshot(m)) if m.contains("first row")
    ));
    unchanged(&mut b, "sealed but wrong");

    // Another cache's geometry or formats.
    let other = spec(Int8, Int8, 16);
    let mut o_arena = arena(other, 20);
    let mut o = KvCache::with_blocks(other, 20, &mut o_arena).unwrap();
    assert!(matches!(
        o.import_sequence(&good),
        Err(Error::BadSnapshot(m)) if m.contains("geometry")
    ));

    // No room: too long for the spec, too few blocks, no free slot.
    let mut short = s;
    short.max_seq_tokens = 21;
    let mut short_arena = arena(short, 20);
    let mut short_cache = KvCache::with_blocks(short, 20, &mut short_arena).unwrap();
    assert!(matches!(
        short_cache.import_sequence(&good),
        Err(Error::TooLong {
            requested: 22,
            max: 21
        })
    ));
    let mut small_arena = arena(s, 1);
    let mut small = KvCache::with_blocks(s, 1, &mut small_arena).unwrap();
    assert!(matches!(
        small.import_sequence(&good),
        Err(Error::OutOfBlocks { needed: 2, free: 1 })
    ));
    assert_eq!(small.stats().sequences, 0);
    for _ in 1..s.max_seqs {
        b.add_sequence().unwrap();
    }
    let full = b.stats();
    assert_eq!(b.import_sequence(&good), Err(Error::TooManySequences));
    assert_eq!(b.stats(), full);
}

#[test]
fn export_refuses_what_it_cannot_save() {
    let s = spec(F16, F16, 16);
    let mut arena_bytes = arena(s, 20);
    let mut cache = KvCache::with_blocks(s, 20, &mut arena_bytes).unwrap();
    let seq = cache.add_sequence().unwrap();
    let mut seed = 5;
    grow(&mut cache, seq, 10, 0, &mut seed);
    let needed = cache.exported_len(seq).unwrap();
    let mut out = vec![0xAAu8; needed - 1];
    assert_eq!(
        cache.export_sequence(seq, &mut out),
        Err(Error::BadShape("out"))
    );
    assert!(out.iter().all(|&b| b == 0xAA), "nothing written");
    cache.remove(seq).unwrap();
    assert_eq!(cache.exported_len(seq), Err(Error::UnknownSequence));
    assert_eq!(
        cache.export_sequence(seq, &mut vec![0; needed]),
        Err(Error::UnknownSequence)
    );

    // A window: saved while whole, refused once it has evicted blocks.
    let mut windowed = s;
    windowed.window = 20;
    let mut w_arena = arena(windowed, 20);
    let mut w = KvCache::with_blocks(windowed, 20, &mut w_arena).unwrap();
    let seq = w.add_sequence().unwrap();
    grow(&mut w, seq, 30, 0, &mut seed);
    assert!(w.exported_len(seq).is_ok());
    let saved = export(&w, seq);
    grow(&mut w, seq, 0, 20, &mut seed);
    assert!(matches!(
        w.export_sequence(seq, &mut vec![0; saved.len() * 2]),
        Err(Error::Evicted { position: 0 })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Any formats, lengths and target block size: the restored rows are the original's.
    #[test]
    fn round_trips_keep_every_row(
        formats in 0..FORMATS.len(),
        prefill in 0usize..70,
        decode in 0usize..6,
        target_block in prop::sample::select(vec![4usize, 16, 32]),
        seed in any::<u64>(),
    ) {
        let (k, v) = FORMATS[formats];
        let s = spec(k, v, 16);
        let mut a_arena = arena(s, 12);
        let mut a = KvCache::with_blocks(s, 12, &mut a_arena).unwrap();
        let seq = a.add_sequence().unwrap();
        let mut seed = seed;
        grow(&mut a, seq, prefill, decode, &mut seed);
        let bytes = export(&a, seq);
        let t = spec(k, v, target_block);
        let blocks = 200usize.div_ceil(target_block);
        let mut b_arena = arena(t, blocks);
        let mut b = KvCache::with_blocks(t, blocks, &mut b_arena).unwrap();
        let restored = b.import_sequence(&bytes).unwrap();
        prop_assert_eq!(rows(&b, restored), rows(&a, seq));
        prop_assert!(b.check_invariants().is_ok());
    }
}

/// `export_sequence_to` / `import_sequence_from`: the same bytes and rows as the slice forms;
/// a writer or reader that fails (at any call, in either pass of the import) gives
/// `Interrupted`, and bytes that change between the import's two passes give `BadSnapshot`,
/// both leaving the cache as it was.
#[test]
fn streaming_save_and_restore_match_the_slice_forms_and_undo_failures() {
    for (k, v) in [(F16, F16), (Int4, Int8)] {
        let s = spec(k, v, 16);
        let mut a_arena = arena(s, 20);
        let mut a = KvCache::with_blocks(s, 20, &mut a_arena).unwrap();
        let seq = a.add_sequence().unwrap();
        let mut seed = 17;
        grow(&mut a, seq, 40, 3, &mut seed);
        let bytes = export(&a, seq);

        let (mut streamed, mut pieces) = (Vec::new(), 0);
        let n = a
            .export_sequence_to(seq, |piece| {
                streamed.extend_from_slice(piece);
                pieces += 1;
                true
            })
            .unwrap();
        assert_eq!((n, &streamed), (bytes.len(), &bytes));
        assert!(pieces > 2, "{pieces} pieces");
        let mut calls = 0;
        let stopped = a.export_sequence_to(seq, |_| {
            calls += 1;
            calls < 3
        });
        assert_eq!(stopped, Err(Error::Interrupted));

        let mut b_arena = arena(s, 20);
        let mut b = KvCache::with_blocks(s, 20, &mut b_arena).unwrap();
        let resident = b.add_sequence().unwrap();
        grow(&mut b, resident, 7, 0, &mut seed);
        let mut reads = 0;
        let restored = b
            .import_sequence_from(bytes.len(), |at, buf| {
                reads += 1;
                buf.copy_from_slice(&bytes[at..at + buf.len()]);
                true
            })
            .unwrap();
        assert_eq!(rows(&b, restored), rows(&a, seq));
        b.remove(restored).unwrap();
        let before = (b.stats(), rows(&b, resident));

        for fail_at in 1..=reads {
            let mut call = 0;
            let result = b.import_sequence_from(bytes.len(), |at, buf| {
                call += 1;
                buf.copy_from_slice(&bytes[at..at + buf.len()]);
                call != fail_at
            });
            assert_eq!(
                result,
                Err(Error::Interrupted),
                "read {fail_at} of {reads} failed"
            );
            assert_eq!((b.stats(), rows(&b, resident)), before, "read {fail_at}");
        }
        // The bytes change after the first pass (the body is read from offset 40 twice).
        let mut source = bytes.clone();
        let mut body_reads = 0;
        let result = b.import_sequence_from(bytes.len(), |at, buf| {
            if at == 40 {
                body_reads += 1;
                if body_reads == 2 {
                    source[41] ^= 1;
                }
            }
            buf.copy_from_slice(&source[at..at + buf.len()]);
            true
        });
        assert!(
            matches!(result, Err(Error::BadSnapshot(m)) if m.contains("changed")),
            "{result:?}"
        );
        assert_eq!((b.stats(), rows(&b, resident)), before);
        b.check_invariants().unwrap();
    }
}

/// `spec` with a key tail of `tail` tokens.
fn tail_spec(k: KvFormat, v: KvFormat, tail: usize) -> CacheSpec {
    let mut spec = spec(k, v, 16);
    spec.key_tail_tokens = tail;
    spec
}

#[test]
fn the_key_tail_survives_a_snapshot() {
    for (k, v, tail) in [(Int4, Int4, 12), (Int8, F16, 5), (Int4, F32, 1)] {
        for truncate_to in [None, Some(33)] {
            let what = format!("{k:?}/{v:?} tail {tail} truncated {truncate_to:?}");
            let s = tail_spec(k, v, tail);
            let mut a_arena = arena(s, 40);
            let mut a = KvCache::with_blocks(s, 40, &mut a_arena).unwrap();
            let mut seed = 11;
            let original = a.add_sequence().unwrap();
            grow(&mut a, original, 37, 3, &mut seed);
            if let Some(len) = truncate_to {
                a.truncate(original, len).unwrap();
            }
            let held = a.tail_rows(original, 1, 1).unwrap().1;
            let bytes = export(&a, original);

            // The same tail: the same rows, held range, attention and bytes.
            let mut b_arena = arena(s, 40);
            let mut b = KvCache::with_blocks(s, 40, &mut b_arena).unwrap();
            let restored = b.import_sequence(&bytes).unwrap();
            assert_eq!(b.tail_rows(restored, 1, 1).unwrap().1, held, "{what}");
            assert_eq!(rows(&b, restored), rows(&a, original), "{what}");
            assert_eq!(
                bits(&attend(&b, restored, 3)),
                bits(&attend(&a, original, 3)),
                "{what}"
            );
            assert_eq!(export(&b, restored), bytes, "{what}");
            b.check_invariants().unwrap();

            // No tail: every key reads as its quantized row, as in a cache that never had one.
            let none = tail_spec(k, v, 0);
            let mut c_arena = arena(none, 40);
            let mut c = KvCache::with_blocks(none, 40, &mut c_arena).unwrap();
            let plain = c.import_sequence(&bytes).unwrap();
            let mut d_arena = arena(none, 40);
            let mut d = KvCache::with_blocks(none, 40, &mut d_arena).unwrap();
            let twin = d.add_sequence().unwrap();
            let mut seed_d = 11;
            grow(&mut d, twin, 37, 3, &mut seed_d);
            if let Some(len) = truncate_to {
                d.truncate(twin, len).unwrap();
            }
            assert_eq!(rows(&c, plain), rows(&d, twin), "{what}: no tail");
            assert!(c.tail_rows(plain, 0, 0).is_none());

            // A shorter tail keeps the latest positions; the rest read as quantized rows.
            if tail > 1 {
                let short = tail_spec(k, v, tail / 2);
                let mut e_arena = arena(short, 40);
                let mut e = KvCache::with_blocks(short, 40, &mut e_arena).unwrap();
                let cut = e.import_sequence(&bytes).unwrap();
                let kept = held.end - held.len().min(tail / 2)..held.end;
                assert_eq!(e.tail_rows(cut, 0, 1).unwrap().1, kept, "{what}");
                let len = held.end;
                let mut row = vec![0.0; 64];
                for p in 0..len {
                    let want = if kept.contains(&p) {
                        (&b, restored)
                    } else {
                        (&c, plain)
                    };
                    for layer in 0..2 {
                        e.read_row(cut, layer, Kind::K, 1, p, &mut row).unwrap();
                        let got = bits(&row);
                        want.0
                            .read_row(want.1, layer, Kind::K, 1, p, &mut row)
                            .unwrap();
                        assert_eq!(got, bits(&row), "{what}: position {p}");
                    }
                }
            }

            // Both grow the same way.
            let (mut seed_a, mut seed_b) = (5, 5);
            grow(&mut a, original, 0, 4, &mut seed_a);
            grow(&mut b, restored, 0, 4, &mut seed_b);
            assert_eq!(rows(&b, restored), rows(&a, original), "{what}: grown");
            assert_eq!(
                bits(&attend(&b, restored, 4)),
                bits(&attend(&a, original, 4)),
                "{what}: grown"
            );
        }
    }
}

#[test]
fn bad_key_tails_are_refused() {
    let s = tail_spec(Int4, Int4, 6);
    let mut a_arena = arena(s, 20);
    let mut a = KvCache::with_blocks(s, 20, &mut a_arena).unwrap();
    let mut seed = 3;
    let seq = a.add_sequence().unwrap();
    grow(&mut a, seq, 20, 2, &mut seed);
    let good = export(&a, seq);
    let mut b_arena = arena(s, 20);
    let mut b = KvCache::with_blocks(s, 20, &mut b_arena).unwrap();
    let tail_bytes = 6 * 2 * 2 * 64 * 2; // held × layers × KV heads × head_dim × 2
    let count_at = good.len() - tail_bytes - 4;
    assert_eq!(&good[count_at..count_at + 4], &6u32.to_le_bytes());
    // An infinite element, sealed.
    let mut inf = good.clone();
    inf[count_at + 4 + 130..count_at + 4 + 132].copy_from_slice(&0x7c00u16.to_le_bytes());
    reseal(&mut inf);
    assert!(matches!(
        b.import_sequence(&inf),
        Err(Error::BadSnapshot(m)) if m.contains("key tail")
    ));
    // A count past the sequence's length, and one that disagrees with the length.
    for count in [23u32, 5] {
        let mut wrong = good.clone();
        wrong[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
        reseal(&mut wrong);
        assert!(
            matches!(b.import_sequence(&wrong), Err(Error::BadSnapshot(_))),
            "{count}"
        );
    }
    // The version before the key tail.
    let mut v1 = good.clone();
    v1[..8].copy_from_slice(b"KVCSEQ01");
    assert!(matches!(
        b.import_sequence(&v1),
        Err(Error::BadSnapshot(m)) if m.contains("version 1")
    ));
    assert_eq!(b.sequences(), 0);
    b.check_invariants().unwrap();
    assert!(b.import_sequence(&good).is_ok());
}
