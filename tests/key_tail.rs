//! The key tail (`CacheSpec::key_tail_tokens`): which positions it holds under appends,
//! truncation and forks (against a model of the rule and a twin cache without a tail), that
//! held keys come back within `f16` rounding, that attention over held keys matches the f64
//! oracle as tightly as float keys do, snapshots, and the spec's limits.

use kvcache::attention::{attention, attention_scratch_len, AttentionOptions, BatchEntry};
use kvcache::spec::Kind;
use kvcache::{CacheSpec, Error, KvCache, KvFormat, Layout, SeqId};
use proptest::prelude::*;

mod common;
use common::{naive_attention, Rng};

/// `n` values in `[-1, 1)` plus a per-channel bias (element `i` is channel `i mod head_dim`),
/// so that int4 keys get offsets to remove.
fn biased(rng: &mut Rng, n: usize, head_dim: usize) -> Vec<f32> {
    (0..n)
        .map(|i| rng.value() + (i % head_dim % 5) as f32 * 0.5)
        .collect()
}

fn spec(k_format: KvFormat, head_dim: usize, tail: usize) -> CacheSpec {
    let mut spec = CacheSpec::new(2, 6, 2, head_dim);
    spec.block_tokens = 5;
    spec.k_format = k_format;
    spec.v_format = KvFormat::F32;
    spec.max_seqs = 6;
    spec.max_seq_tokens = 96;
    spec.key_tail_tokens = tail;
    spec
}

fn arena_for(spec: CacheSpec) -> Vec<u8> {
    vec![0u8; Layout::new(spec).unwrap().arena_bytes(200).unwrap()]
}

fn row(cache: &KvCache, seq: SeqId, layer: usize, kind: Kind, head: usize, p: usize) -> Vec<f32> {
    let mut out = vec![0.0; cache.spec().head_dim];
    cache.read_row(seq, layer, kind, head, p, &mut out).unwrap();
    out
}

/// Largest error of attention for `tokens` queries ending at the sequence's last position,
/// against the oracle on the rows read back (`window`: the spec's).
fn worst_error(cache: &KvCache, seq: SeqId, tokens: usize, rng: &mut Rng) -> f64 {
    let spec = *cache.spec();
    let len = cache.len(seq).unwrap();
    let entries = [BatchEntry {
        seq,
        first_position: len - tokens,
        tokens,
    }];
    let elems = tokens * spec.q_heads * spec.head_dim;
    let queries: Vec<f32> = rng.vec(elems);
    let options = AttentionOptions {
        splits: 2,
        query_tile: 3,
        ..AttentionOptions::default()
    };
    let mut worst = 0.0f64;
    for layer in 0..spec.layers {
        let mut out = vec![f32::NAN; elems];
        let mut scratch = vec![0.0; attention_scratch_len(cache, &options)];
        attention(
            cache,
            layer,
            &entries,
            &queries,
            &mut out,
            &mut scratch,
            &options,
        )
        .unwrap();
        let first_seen = |p: usize| {
            if spec.window == 0 {
                0
            } else {
                (p + 1).saturating_sub(spec.window)
            }
        };
        for t in 0..tokens {
            let position = len - tokens + t;
            let from = first_seen(position);
            let visible: Vec<bool> = (0..=position).map(|k| k >= from).collect();
            for head in 0..spec.q_heads {
                let kv_head = head / spec.group();
                // Rows before the window are never seen (and may be evicted): zeros.
                let rows = |kind: Kind| -> Vec<Vec<f32>> {
                    (0..=position)
                        .map(|p| match p >= from {
                            true => row(cache, seq, layer, kind, kv_head, p),
                            false => vec![0.0; spec.head_dim],
                        })
                        .collect()
                };
                let (keys, values) = (rows(Kind::K), rows(Kind::V));
                let at = (t * spec.q_heads + head) * spec.head_dim;
                let query = &queries[at..at + spec.head_dim];
                let scale = 1.0 / (spec.head_dim as f64).sqrt();
                let want = naive_attention(query, &keys, &values, &visible, scale);
                for (&got, want) in out[at..at + spec.head_dim].iter().zip(want) {
                    worst = worst.max((got as f64 - want).abs());
                }
            }
        }
    }
    worst
}

#[test]
fn attention_over_held_keys_matches_the_oracle_tightly() {
    // With every visible key in the tail (a prompt no longer than the tail, or a window no
    // wider), attention scores them from the f16 copies in f32: as tight as float keys, while
    // quantized scores (the query quantized to 8 bits) would miss this bound by far.
    for k_format in [KvFormat::Int4, KvFormat::Int8] {
        for head_dim in [1, 7, 32, 64, 100] {
            for (tail, prompt, window) in [
                (32usize, 20usize, 0usize),
                (32, 32, 0),
                (7, 7, 0),
                (8, 60, 8),
                (9, 47, 5),
            ] {
                let mut spec = spec(k_format, head_dim, tail);
                spec.window = window;
                let mut arena = arena_for(spec);
                let mut cache = KvCache::new(spec, &mut arena).unwrap();
                let mut rng = Rng(head_dim as u64 * 31 + tail as u64);
                let seq = cache.add_sequence().unwrap();
                // A prefill in two chunks, then decode steps.
                let elems = spec.kv_heads * head_dim;
                let first = prompt.saturating_sub(3).max(1);
                let mut written = 0;
                for n in [first.min(prompt), prompt - first.min(prompt), 1, 1, 1] {
                    if n == 0 {
                        continue;
                    }
                    cache.reserve(seq, n).unwrap();
                    for layer in 0..spec.layers {
                        let k = biased(&mut rng, n * elems, head_dim);
                        let v = biased(&mut rng, n * elems, head_dim);
                        cache.write_run(seq, layer, written, &k, &v).unwrap();
                    }
                    written += n;
                    // The queries of this step whose keys are all held.
                    let len = cache.len(seq).unwrap();
                    let held = cache.tail_rows(seq, 0, 0).unwrap().1;
                    // A query at `p` sees `p + 1 - window ..= p` (all of `0..=p` without a
                    // window); those whose keys are all held are a suffix of the step.
                    let tokens = (len - n..len)
                        .filter(|&p| {
                            let first = if window == 0 {
                                0
                            } else {
                                (p + 1).saturating_sub(window)
                            };
                            first >= held.start
                        })
                        .count();
                    if tokens == 0 {
                        continue;
                    }
                    let worst = worst_error(&cache, seq, tokens, &mut rng);
                    assert!(
                        worst < 2e-5,
                        "{k_format:?} head_dim {head_dim} tail {tail} len {len}: error {worst}"
                    );
                }
            }
        }
    }
}

/// Independent model of the rule: the ring holds `max(from, len - tail) .. len`, `from` rising
/// to `old_len - tail` on a truncation (and clamped to the new length).
#[derive(Clone, Copy, Debug)]
struct Model {
    len: usize,
    from: usize,
}

impl Model {
    fn held(&self, tail: usize) -> std::ops::Range<usize> {
        self.from.max(self.len.saturating_sub(tail))..self.len
    }
}

#[derive(Clone, Debug)]
enum Op {
    Append {
        seq: usize,
        tokens: usize,
    },
    Truncate {
        seq: usize,
        keep: usize,
    },
    /// Writes one position again (`at` modulo the length).
    Rewrite {
        seq: usize,
        at: usize,
    },
    Fork {
        seq: usize,
    },
    Remove {
        seq: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..4usize, 1..12usize).prop_map(|(seq, tokens)| Op::Append { seq, tokens }),
        2 => (0..4usize, 0..40usize).prop_map(|(seq, keep)| Op::Truncate { seq, keep }),
        2 => (0..4usize, 0..96usize).prop_map(|(seq, at)| Op::Rewrite { seq, at }),
        1 => (0..4usize).prop_map(|seq| Op::Fork { seq }),
        1 => (0..4usize).prop_map(|seq| Op::Remove { seq }),
    ]
}

/// Runs `ops` on a cache with a tail and on a twin without one, writing the same keys, and
/// checks after each op that every position reads back as the rule says: held positions within
/// `f16` rounding of the key last written there, the others bit for bit as the twin's rows.
fn run_ops(
    k_format: KvFormat,
    tail: usize,
    head_dim: usize,
    ops: &[Op],
    seed: u64,
) -> Result<(), TestCaseError> {
    let with = spec(k_format, head_dim, tail);
    let without = spec(k_format, head_dim, 0);
    let (mut arena_a, mut arena_b) = (arena_for(with), arena_for(without));
    let mut a = KvCache::new(with, &mut arena_a).unwrap();
    let mut b = KvCache::new(without, &mut arena_b).unwrap();
    let mut rng = Rng(seed);
    // Live sequences: ids in both caches, the model, and the keys last written per position.
    let mut live: Vec<(SeqId, SeqId, Model, Vec<Vec<f32>>)> = Vec::new();
    let elems = with.kv_heads * head_dim;
    for op in ops {
        match *op {
            Op::Append { seq, tokens } => {
                if live.len() < 4 && seq >= live.len() {
                    let (x, y) = (a.add_sequence().unwrap(), b.add_sequence().unwrap());
                    live.push((x, y, Model { len: 0, from: 0 }, Vec::new()));
                }
                let i = seq % live.len();
                let (x, y, model, keys) = &mut live[i];
                if model.len + tokens > with.max_seq_tokens {
                    continue;
                }
                let start = a.reserve(*x, tokens).unwrap().start;
                b.reserve(*y, tokens).unwrap();
                model.len += tokens;
                for layer in 0..with.layers {
                    let k = biased(&mut rng, tokens * elems, head_dim);
                    let v = biased(&mut rng, tokens * elems, head_dim);
                    a.write_run(*x, layer, start, &k, &v).unwrap();
                    b.write_run(*y, layer, start, &k, &v).unwrap();
                    if layer == 0 {
                        keys.truncate(start);
                        keys.extend(k.chunks(elems).map(<[f32]>::to_vec));
                    }
                }
            }
            Op::Truncate { seq, keep } => {
                if live.is_empty() {
                    continue;
                }
                let i = seq % live.len();
                let (x, y, model, keys) = &mut live[i];
                let new_len = keep.min(model.len);
                a.truncate(*x, new_len).unwrap();
                b.truncate(*y, new_len).unwrap();
                model.from = model.held(tail).start.min(new_len);
                if new_len == 0 {
                    model.from = 0;
                }
                model.len = new_len;
                keys.truncate(new_len);
            }
            Op::Rewrite { seq, at } => {
                if live.is_empty() {
                    continue;
                }
                let i = seq % live.len();
                let (x, y, model, keys) = &mut live[i];
                if model.len == 0 {
                    continue;
                }
                let at = at % model.len;
                let k = biased(&mut rng, elems, head_dim);
                let v = biased(&mut rng, elems, head_dim);
                a.write(*x, 0, at, &k, &v).unwrap();
                b.write(*y, 0, at, &k, &v).unwrap();
                keys[at] = k;
            }
            Op::Fork { seq } => {
                if live.is_empty() || live.len() >= 4 {
                    continue;
                }
                let i = seq % live.len();
                let (x, y, model, keys) = live[i].clone();
                live.push((a.fork(x).unwrap(), b.fork(y).unwrap(), model, keys));
            }
            Op::Remove { seq } => {
                if live.is_empty() {
                    continue;
                }
                let (x, y, _, _) = live.remove(seq % live.len());
                a.remove(x).unwrap();
                b.remove(y).unwrap();
            }
        }
        a.check_invariants().map_err(TestCaseError::fail)?;
        for (x, y, model, keys) in &live {
            let (_, held) = a.tail_rows(*x, 0, 1).unwrap();
            prop_assert_eq!(
                held.clone(),
                model.held(tail),
                "held range, model {:?}",
                model
            );
            for (p, key) in keys.iter().enumerate().take(model.len) {
                let got = row(&a, *x, 0, Kind::K, 1, p);
                if held.contains(&p) {
                    let key = &key[head_dim..2 * head_dim];
                    for (g, k) in got.iter().zip(key) {
                        // f16 rounding of the key minus its offset (|k - μ| < 4 here), plus
                        // the rotation's f32 rounding.
                        prop_assert!(
                            (g - k).abs() <= 4.0 / 2048.0 + 1e-5,
                            "position {p}: {g} vs {k}"
                        );
                    }
                } else {
                    prop_assert_eq!(got, row(&b, *y, 0, Kind::K, 1, p), "position {}", p);
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn the_tail_holds_what_the_rule_says(
        ops in proptest::collection::vec(op(), 1..40),
        tail in 1..20usize,
        head_dim in prop_oneof![Just(8usize), Just(64), 1..20usize],
        int8 in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let format = if int8 { KvFormat::Int8 } else { KvFormat::Int4 };
        run_ops(format, tail, head_dim, &ops, seed)?;
    }
}

#[test]
fn a_truncation_keeps_only_the_copies_later_writes_left() {
    let spec = spec(KvFormat::Int4, 16, 8);
    let mut arena = arena_for(spec);
    let mut cache = KvCache::new(spec, &mut arena).unwrap();
    let mut rng = Rng(5);
    let seq = cache.add_sequence().unwrap();
    let elems = spec.kv_heads * 16;
    cache.reserve(seq, 30).unwrap();
    for layer in 0..2 {
        cache
            .write_run(
                seq,
                layer,
                0,
                &biased(&mut rng, 30 * elems, 16),
                &biased(&mut rng, 30 * elems, 16),
            )
            .unwrap();
    }
    assert_eq!(cache.tail_rows(seq, 0, 0).unwrap().1, 22..30);
    // Positions 18..22 had their ring rows overwritten by 26..30: not held after the cut.
    cache.truncate(seq, 26).unwrap();
    assert_eq!(cache.tail_rows(seq, 0, 0).unwrap().1, 22..26);
    cache.truncate(seq, 10).unwrap();
    assert_eq!(cache.tail_rows(seq, 0, 0).unwrap().1, 10..10);
    // Growing again holds the new positions, and the window of the last 8 once past them.
    cache.reserve(seq, 3).unwrap();
    assert_eq!(cache.tail_rows(seq, 1, 1).unwrap().1, 10..13);
    cache.reserve(seq, 10).unwrap();
    assert_eq!(cache.tail_rows(seq, 1, 1).unwrap().1, 15..23);
    cache.truncate(seq, 0).unwrap();
    assert_eq!(cache.tail_rows(seq, 0, 0).unwrap().1, 0..0);
}

#[test]
fn spec_limits_of_the_tail() {
    let mut s = spec(KvFormat::F16, 8, 4);
    assert_eq!(Layout::new(s), Err(Error::InvalidSpec("key_tail_tokens")));
    s.k_format = KvFormat::Int4;
    s.key_tail_tokens = s.max_seq_tokens + 1;
    assert_eq!(Layout::new(s), Err(Error::InvalidSpec("key_tail_tokens")));
    s.key_tail_tokens = 4;
    let layout = Layout::new(s).unwrap();
    // layers × kv heads × tail × head_dim × 2 bytes per slot, padded to 64 in all.
    assert_eq!(layout.tail_ring_bytes(), 4 * 8 * 2);
    assert_eq!(layout.tail_bytes(), (6 * 2 * 2 * 64usize).div_ceil(64) * 64);
    let without = Layout::new(spec(KvFormat::Int4, 8, 0)).unwrap();
    assert_eq!(
        layout.arena_bytes(10).unwrap(),
        without.arena_bytes(10).unwrap() + layout.tail_bytes()
    );
    assert_eq!(without.tail_bytes(), 0);
    // No tail, no ring: `tail_rows` says so, and for bad indices too.
    let mut arena = arena_for(s);
    let mut cache = KvCache::new(s, &mut arena).unwrap();
    let seq = cache.add_sequence().unwrap();
    assert!(cache.tail_rows(seq, 2, 0).is_none());
    assert!(cache.tail_rows(seq, 0, 2).is_none());
    assert_eq!(
        cache.tail_rows(seq, 1, 1).unwrap().0.len(),
        layout.tail_ring_bytes()
    );
}

#[test]
fn keys_beyond_the_f16_range_are_saturated_in_the_tail() {
    let spec = spec(KvFormat::Int8, 4, 4);
    let mut arena = arena_for(spec);
    let mut cache = KvCache::new(spec, &mut arena).unwrap();
    let seq = cache.add_sequence().unwrap();
    cache.reserve(seq, 1).unwrap();
    let k = [1e30f32, -1e30, 70000.0, 1.5, 0.0, -0.0, 65504.0, -3.0];
    cache.write(seq, 0, 0, &k, &[0.0; 8]).unwrap();
    let got = row(&cache, seq, 0, Kind::K, 0, 0);
    assert_eq!(got, [65504.0, -65504.0, 65504.0, 1.5]);
    assert!(row(&cache, seq, 0, Kind::K, 1, 0)
        .iter()
        .all(|x| x.is_finite()));
}
