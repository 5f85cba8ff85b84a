//! Paged attention against a naive f64 oracle over contiguous keys and values.

use kvcache::attention::{
    attention, attention_scratch_len, attention_threaded, AttentionOptions, AttentionPlan,
    BatchEntry,
};
use kvcache::spec::Kind;
use kvcache::{CacheSpec, Error, KvCache, KvFormat, Layout, SeqId};
use proptest::prelude::*;

mod common;
use common::{naive_attention, Rng};

/// A sequence's tokens as stored (read back from the cache), per layer and KV head.
fn stored(cache: &KvCache, seq: SeqId, layer: usize, kind: Kind, head: usize) -> Vec<Vec<f32>> {
    let len = cache.len(seq).unwrap();
    let head_dim = cache.spec().head_dim;
    (0..len)
        .map(|p| {
            let mut row = vec![0.0; head_dim];
            // Evicted positions read as zeros; the oracle never looks at them.
            let _ = cache.read_row(seq, layer, kind, head, p, &mut row);
            row
        })
        .collect()
}

fn visible(window: usize, sinks: usize, query: usize, len: usize) -> Vec<bool> {
    (0..len)
        .map(|k| k <= query && (window == 0 || k + window > query || k < sinks))
        .collect()
}

/// Appends `n` random tokens to `seq` in every layer.
fn append(cache: &mut KvCache, seq: SeqId, n: usize, rng: &mut Rng) {
    let spec = *cache.spec();
    let range = cache.reserve(seq, n).unwrap();
    let elems = n * spec.kv_heads * spec.head_dim;
    for layer in 0..spec.layers {
        cache
            .write_run(seq, layer, range.start, &rng.vec(elems), &rng.vec(elems))
            .unwrap();
    }
}

/// Checks `out` against the oracle for every entry, token and query head; returns the largest
/// error relative to the largest |value| in the output.
fn check_against_oracle(
    cache: &KvCache,
    layer: usize,
    entries: &[BatchEntry],
    queries: &[f32],
    out: &[f32],
    scale: f64,
) -> f64 {
    let spec = *cache.spec();
    let (head_dim, group) = (spec.head_dim, spec.group());
    let mut worst = 0.0f64;
    let mut offset = 0;
    for entry in entries {
        let len = cache.len(entry.seq).unwrap();
        let keys: Vec<_> = (0..spec.kv_heads)
            .map(|h| stored(cache, entry.seq, layer, Kind::K, h))
            .collect();
        let values: Vec<_> = (0..spec.kv_heads)
            .map(|h| stored(cache, entry.seq, layer, Kind::V, h))
            .collect();
        for t in 0..entry.tokens {
            let position = entry.first_position + t;
            let mask = visible(spec.window, spec.sink_tokens, position, len);
            for head in 0..spec.q_heads {
                let at = offset + (t * spec.q_heads + head) * head_dim;
                let expect = naive_attention(
                    &queries[at..at + head_dim],
                    &keys[head / group],
                    &values[head / group],
                    &mask,
                    scale,
                );
                for (got, want) in out[at..at + head_dim].iter().zip(&expect) {
                    worst = worst.max((*got as f64 - want).abs());
                }
            }
        }
        offset += entry.tokens * spec.q_heads * head_dim;
    }
    worst
}

#[derive(Clone, Debug)]
struct Case {
    heads: (usize, usize),
    head_dim: usize,
    block_tokens: usize,
    format: (KvFormat, KvFormat),
    window: usize,
    sinks: usize,
    lengths: Vec<(usize, usize)>, // (context before, new query tokens)
    splits: usize,
    threads: usize,
    query_tile: usize,
    fork: bool,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    let heads = prop_oneof![
        Just((4, 4)),
        Just((6, 2)),
        Just((9, 3)),
        Just((8, 1)),
        Just((1, 1)),
        Just((12, 4))
    ];
    let head_dim = prop_oneof![
        1..=9usize,
        Just(16),
        Just(63),
        Just(64),
        Just(127),
        Just(128),
        129..=256usize
    ];
    let format = prop_oneof![
        3 => Just((KvFormat::F32, KvFormat::F32)),
        1 => Just((KvFormat::F16, KvFormat::F16)),
        1 => Just((KvFormat::Bf16, KvFormat::F16)),
        1 => Just((KvFormat::F32, KvFormat::Bf16)),
        // int4 values summed exactly (`exact_values`): the oracle reads the stored rows.
        1 => Just((KvFormat::F16, KvFormat::Int4)),
    ];
    let window = prop_oneof![3 => Just(0usize), 1 => 1..40usize];
    (
        heads,
        head_dim,
        1..=20usize,
        format,
        window,
        0..6usize,
        proptest::collection::vec((0..70usize, 1..12usize), 1..4),
        1..5usize,
        1..4usize,
        1..6usize,
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(
                heads,
                head_dim,
                block_tokens,
                format,
                window,
                sinks,
                lengths,
                splits,
                threads,
                query_tile,
                fork,
                seed,
            )| Case {
                heads,
                head_dim,
                block_tokens,
                format,
                window,
                sinks,
                lengths,
                splits,
                threads,
                query_tile,
                fork,
                seed,
            },
        )
}

fn run_case(case: &Case) -> Result<(), TestCaseError> {
    let mut rng = Rng(case.seed);
    let mut spec = CacheSpec::new(2, case.heads.0, case.heads.1, case.head_dim);
    spec.block_tokens = case.block_tokens;
    spec.k_format = case.format.0;
    spec.v_format = case.format.1;
    spec.window = case.window;
    spec.sink_tokens = case.sinks;
    spec.max_seqs = 8;
    spec.max_seq_tokens = 128;
    let layout = Layout::new(spec).unwrap();
    let mut arena = vec![0u8; layout.arena_bytes(300).unwrap()];
    let mut cache = KvCache::new(spec, &mut arena).unwrap();
    let mut entries = Vec::new();
    for &(context, tokens) in &case.lengths {
        let mut seq = cache.add_sequence().unwrap();
        if context > 0 {
            append(&mut cache, seq, context, &mut rng);
        }
        if case.fork && context > 0 {
            // Attend from a fork that shares the prefix and was truncated.
            let child = cache.fork(seq).unwrap();
            cache.truncate(child, context - context / 3).unwrap_or(());
            seq = child;
        }
        let first_position = cache.len(seq).unwrap();
        append(&mut cache, seq, tokens, &mut rng);
        entries.push(BatchEntry {
            seq,
            first_position,
            tokens,
        });
    }
    cache.check_invariants().unwrap();
    let total_tokens: usize = entries.iter().map(|e| e.tokens).sum();
    let elems = total_tokens * spec.q_heads * spec.head_dim;
    let queries = rng.vec(elems);
    let options = AttentionOptions {
        scale: None,
        splits: case.splits,
        query_tile: case.query_tile,
        exact_values: case.format.1 == KvFormat::Int4,
    };
    let scale = 1.0 / (spec.head_dim as f64).sqrt();
    for layer in 0..spec.layers {
        let mut out = vec![f32::NAN; elems];
        let mut scratch = vec![0.0; attention_scratch_len(&cache, &options)];
        attention(
            &cache,
            layer,
            &entries,
            &queries,
            &mut out,
            &mut scratch,
            &options,
        )
        .unwrap();
        let worst = check_against_oracle(&cache, layer, &entries, &queries, &out, scale);
        // Values are in [-1, 1]; f32 arithmetic over at most a few hundred terms.
        prop_assert!(worst < 1e-5, "error {worst} for {case:?}");
        let mut threaded = vec![f32::NAN; elems];
        attention_threaded(
            &cache,
            layer,
            &entries,
            &queries,
            &mut threaded,
            case.threads,
            &options,
        )
        .unwrap();
        prop_assert_eq!(&threaded, &out, "thread count changed the result");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 150, ..ProptestConfig::default() })]

    #[test]
    fn paged_attention_matches_the_f64_oracle(case in case()) {
        run_case(&case)?;
    }
}

#[test]
fn chunked_prefill_equals_one_call_over_the_prompt() {
    // Bit for bit, in every format whose rows do not depend on the write they came in (int4
    // keys do: their channel offsets come from a sequence's first write), and for int4
    // values with the integer weights as well as the exact sums.
    let formats = [
        (KvFormat::F32, KvFormat::F32, false),
        (KvFormat::F16, KvFormat::F16, false),
        (KvFormat::Bf16, KvFormat::Bf16, false),
        (KvFormat::Int8, KvFormat::Int8, false),
        (KvFormat::Int8, KvFormat::Int4, false),
        (KvFormat::F16, KvFormat::Int4, false),
        (KvFormat::F16, KvFormat::Int4, true),
    ];
    for (k_format, v_format, exact_values) in formats {
        for (q_heads, kv_heads, head_dim, chunk) in
            [(9, 3, 64, 7), (4, 4, 33, 16), (8, 1, 128, 5), (6, 2, 16, 1)]
        {
            chunked_prefill_case(
                k_format,
                v_format,
                exact_values,
                q_heads,
                kv_heads,
                head_dim,
                chunk,
            );
        }
    }
}

fn chunked_prefill_case(
    k_format: KvFormat,
    v_format: KvFormat,
    exact_values: bool,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    chunk: usize,
) {
    let mut spec = CacheSpec::new(1, q_heads, kv_heads, head_dim);
    spec.k_format = k_format;
    spec.v_format = v_format;
    spec.max_seq_tokens = 100;
    let layout = Layout::new(spec).unwrap();
    let mut arena = vec![0u8; layout.arena_bytes(20).unwrap()];
    let mut cache = KvCache::new(spec, &mut arena).unwrap();
    let mut rng = Rng(7);
    let prompt = 61;
    let kv_elems = prompt * kv_heads * head_dim;
    let (keys, values) = (rng.vec(kv_elems), rng.vec(kv_elems));
    let queries = rng.vec(prompt * q_heads * head_dim);
    let token_q = q_heads * head_dim;
    let token_kv = kv_heads * head_dim;
    let options = AttentionOptions {
        exact_values,
        ..AttentionOptions::default()
    };
    let mut scratch = vec![0.0; attention_scratch_len(&cache, &options)];

    let whole = cache.add_sequence().unwrap();
    cache.reserve(whole, prompt).unwrap();
    cache.write_run(whole, 0, 0, &keys, &values).unwrap();
    let mut expect = vec![0.0; prompt * token_q];
    let entry = BatchEntry {
        seq: whole,
        first_position: 0,
        tokens: prompt,
    };
    attention(
        &cache,
        0,
        &[entry],
        &queries,
        &mut expect,
        &mut scratch,
        &options,
    )
    .unwrap();

    let chunked = cache.add_sequence().unwrap();
    let mut got = vec![0.0; prompt * token_q];
    for start in (0..prompt).step_by(chunk) {
        let n = chunk.min(prompt - start);
        cache.reserve(chunked, n).unwrap();
        cache
            .write_run(
                chunked,
                0,
                start,
                &keys[start * token_kv..(start + n) * token_kv],
                &values[start * token_kv..(start + n) * token_kv],
            )
            .unwrap();
        let entry = BatchEntry {
            seq: chunked,
            first_position: start,
            tokens: n,
        };
        let range = start * token_q..(start + n) * token_q;
        attention(
            &cache,
            0,
            &[entry],
            &queries[range.clone()],
            &mut got[range],
            &mut scratch,
            &options,
        )
        .unwrap();
    }
    let case = (k_format, v_format, exact_values, q_heads, head_dim, chunk);
    for (i, (a, b)) in got.iter().zip(&expect).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "{a} vs {b} at {i}, {case:?}");
    }
    // The float formats against the oracle on their stored rows; the quantized ones
    // round their queries (int8 keys) or their weights (int4 values) on the way.
    let bound = match (k_format, v_format, exact_values) {
        (KvFormat::Int8, _, _) => 3e-3,
        (_, KvFormat::Int4, false) => 3e-3,
        _ => 1e-5,
    };
    let worst = check_against_oracle(
        &cache,
        0,
        &[entry],
        &queries,
        &expect,
        1.0 / (head_dim as f64).sqrt(),
    );
    assert!(worst < bound, "{worst} for {case:?}");
}

#[test]
fn half_precision_caches_stay_within_their_rounding() {
    // f16 / bf16 storage against the oracle on the *original* f32 values: the error is the
    // format's rounding (2^-11 and 2^-8 relative per element), not the algorithm's.
    for (format, bound) in [(KvFormat::F16, 2e-3), (KvFormat::Bf16, 1.5e-2)] {
        let mut spec = CacheSpec::new(1, 9, 3, 64);
        spec.k_format = format;
        spec.v_format = format;
        spec.max_seq_tokens = 600;
        let layout = Layout::new(spec).unwrap();
        let mut arena = vec![0u8; layout.arena_bytes(40).unwrap()];
        let mut cache = KvCache::new(spec, &mut arena).unwrap();
        let mut rng = Rng(11);
        let seq = cache.add_sequence().unwrap();
        let len = 500;
        let (keys, values) = (rng.vec(len * 3 * 64), rng.vec(len * 3 * 64));
        cache.reserve(seq, len).unwrap();
        cache.write_run(seq, 0, 0, &keys, &values).unwrap();
        let queries: Vec<f32> = rng.vec(9 * 64).iter().map(|q| q * 4.0).collect();
        let mut out = vec![0.0; 9 * 64];
        let options = AttentionOptions::default();
        let mut scratch = vec![0.0; attention_scratch_len(&cache, &options)];
        let entry = BatchEntry {
            seq,
            first_position: len - 1,
            tokens: 1,
        };
        attention(
            &cache,
            0,
            &[entry],
            &queries,
            &mut out,
            &mut scratch,
            &options,
        )
        .unwrap();
        let mut worst = 0.0f64;
        for head in 0..9 {
            let kv = head / 3;
            let rows = |data: &[f32]| {
                (0..len)
                    .map(|p| data[(p * 3 + kv) * 64..(p * 3 + kv + 1) * 64].to_vec())
                    .collect::<Vec<_>>()
            };
            let expect = naive_attention(
                &queries[head * 64..(head + 1) * 64],
                &rows(&keys),
                &rows(&values),
                &vec![true; len],
                0.125,
            );
            for (got, want) in out[head * 64..(head + 1) * 64].iter().zip(&expect) {
                worst = worst.max((*got as f64 - want).abs());
            }
        }
        assert!(worst < bound, "{format}: {worst}");
    }
}

#[test]
fn bad_batches_are_refused() {
    let spec = CacheSpec::new(2, 4, 2, 8);
    let layout = Layout::new(spec).unwrap();
    let mut arena = vec![0u8; layout.arena_bytes(8).unwrap()];
    let mut cache = KvCache::new(spec, &mut arena).unwrap();
    let seq = cache.add_sequence().unwrap();
    let mut rng = Rng(1);
    append(&mut cache, seq, 5, &mut rng);
    let options = AttentionOptions::default();
    let mut scratch = vec![0.0; attention_scratch_len(&cache, &options)];
    let q = vec![0.0; 4 * 8];
    let mut out = vec![0.0; 4 * 8];
    let past_end = BatchEntry {
        seq,
        first_position: 5,
        tokens: 1,
    };
    assert!(matches!(
        attention(&cache, 0, &[past_end], &q, &mut out, &mut scratch, &options),
        Err(Error::BadPosition { .. })
    ));
    let ok = BatchEntry {
        seq,
        first_position: 4,
        tokens: 1,
    };
    assert_eq!(
        attention(&cache, 2, &[ok], &q, &mut out, &mut scratch, &options),
        Err(Error::BadIndex("layer"))
    );
    assert_eq!(
        attention(&cache, 0, &[ok], &q[1..], &mut out, &mut scratch, &options),
        Err(Error::BadShape("queries"))
    );
    assert!(matches!(
        attention(&cache, 0, &[ok], &q, &mut out, &mut scratch[..3], &options),
        Err(Error::ScratchTooSmall { .. })
    ));
    let gone = SeqId::from_raw(77);
    let bad = BatchEntry {
        seq: gone,
        first_position: 0,
        tokens: 1,
    };
    assert_eq!(
        attention(&cache, 0, &[bad], &q, &mut out, &mut scratch, &options),
        Err(Error::UnknownSequence)
    );
    attention(&cache, 0, &[ok], &q, &mut out, &mut scratch, &options).unwrap();
}

/// Options too large to run (found by the `attention` fuzz target: the scratch size
/// overflowed) get an error, never a panic or an abort on allocation; a query tile longer
/// than every entry is the same as one of the entry's length, bitwise.
#[test]
fn windows_wider_than_any_sequence_equal_no_window() {
    let run = |window: usize, sinks: usize| {
        let mut spec = CacheSpec::new(2, 4, 2, 8);
        spec.block_tokens = 2;
        spec.window = window;
        spec.sink_tokens = sinks;
        let layout = Layout::new(spec).unwrap();
        let mut arena = vec![0u8; layout.arena_bytes(8).unwrap()];
        let mut cache = KvCache::new(spec, &mut arena).unwrap();
        let seq = cache.add_sequence().unwrap();
        let mut rng = Rng(11);
        append(&mut cache, seq, 6, &mut rng);
        let entry = BatchEntry {
            seq,
            first_position: 2,
            tokens: 4,
        };
        let q = rng.vec(4 * 4 * 8);
        let options = AttentionOptions::default();
        let mut scratch = vec![0.0; attention_scratch_len(&cache, &options)];
        let mut out = vec![0.0; q.len()];
        attention(&cache, 1, &[entry], &q, &mut out, &mut scratch, &options).unwrap();
        let mut threaded = vec![0.0; q.len()];
        attention_threaded(&cache, 1, &[entry], &q, &mut threaded, 2, &options).unwrap();
        assert_eq!(out, threaded);
        out
    };
    let unlimited = run(0, 0);
    for window in [usize::MAX, usize::MAX - 3, 1 << 40, 6] {
        for sinks in [0, 1, 5] {
            assert_eq!(
                run(window, sinks),
                unlimited,
                "window {window} sinks {sinks}"
            );
        }
    }
}

#[test]
fn a_workspace_run_needs_some_thread_not_every_thread() {
    use kvcache::attention::AttentionWorkspace;
    let spec = CacheSpec::new(2, 4, 2, 8);
    let layout = Layout::new(spec).unwrap();
    let mut arena = vec![0u8; layout.arena_bytes(8).unwrap()];
    let mut cache = KvCache::new(spec, &mut arena).unwrap();
    let seq = cache.add_sequence().unwrap();
    let mut rng = Rng(5);
    append(&mut cache, seq, 12, &mut rng);
    let entry = BatchEntry {
        seq,
        first_position: 11,
        tokens: 1,
    };
    let q = rng.vec(4 * 8);
    let options = AttentionOptions {
        splits: 3,
        ..AttentionOptions::default()
    };
    let entries = [entry];
    let plan = AttentionPlan::new(&cache, 0, &entries, &options).unwrap();
    let mut reference = vec![0.0; q.len()];
    let mut scratch = vec![0.0; attention_scratch_len(&cache, &options)];
    attention(
        &cache,
        0,
        &[entry],
        &q,
        &mut reference,
        &mut scratch,
        &options,
    )
    .unwrap();
    let mut workspace = AttentionWorkspace::new(2);
    // Thread indices called one after the other: none, or only indices the workspace lacks,
    // are refused (before and after good runs, `out` left alone); any other order, even an
    // index called twice or one left out, runs every item once: items are claimed, not
    // assigned, and the result is the reference's bits.
    for round in 0..2 {
        for (schedule, ok) in [
            (&[][..], false),
            (&[2, usize::MAX], false),
            (&[1, 0], true),
            (&[0, 0], true),
            (&[1], true),
            (&[5, 1], true),
        ] {
            let mut out = vec![7.0; q.len()];
            let result = workspace.run(&plan, &q, &mut out, |work| {
                for &thread in schedule {
                    work(thread, 2);
                }
            });
            if ok {
                assert_eq!(result, Ok(()), "round {round} {schedule:?}");
                assert_eq!(out, reference, "round {round} {schedule:?}");
            } else {
                assert_eq!(result, Err(Error::IncompleteRun), "round {round}");
                assert!(out.iter().all(|&x| x == 7.0));
            }
        }
    }
}

/// Threads that claim items at different speeds: two start together and share the items
/// (each runs some, in an order no one chose), a third starts late and finds few or none;
/// the result is still the one-thread run's bits.
#[test]
fn a_workspace_balances_items_between_uneven_threads() {
    use kvcache::attention::AttentionWorkspace;
    let mut spec = CacheSpec::new(1, 8, 2, 64);
    spec.max_seq_tokens = 4000;
    let layout = Layout::new(spec).unwrap();
    let mut arena = vec![0u8; layout.arena_bytes(250).unwrap()];
    let mut cache = KvCache::new(spec, &mut arena).unwrap();
    let seq = cache.add_sequence().unwrap();
    let mut rng = Rng(8);
    append(&mut cache, seq, 4000, &mut rng);
    let entries = [BatchEntry {
        seq,
        first_position: 3999,
        tokens: 1,
    }];
    let q = rng.vec(8 * 64);
    let options = AttentionOptions {
        splits: 25,
        ..AttentionOptions::default()
    };
    let plan = AttentionPlan::new(&cache, 0, &entries, &options).unwrap();
    let mut reference = vec![0.0; q.len()];
    AttentionWorkspace::new(1)
        .run(&plan, &q, &mut reference, |work| work(0, 1))
        .unwrap();
    let mut workspace = AttentionWorkspace::new(3);
    for _ in 0..3 {
        let mut out = vec![0.0; q.len()];
        workspace
            .run(&plan, &q, &mut out, |work| {
                let start = std::sync::Barrier::new(2);
                std::thread::scope(|scope| {
                    scope.spawn(|| {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        work(1, 3);
                    });
                    scope.spawn(|| {
                        start.wait();
                        work(2, 3);
                    });
                    start.wait();
                    work(0, 3);
                });
            })
            .unwrap();
        assert_eq!(out, reference);
    }
}

#[test]
fn huge_options_are_refused_or_clamped() {
    let spec = CacheSpec::new(2, 4, 2, 8);
    let layout = Layout::new(spec).unwrap();
    let mut arena = vec![0u8; layout.arena_bytes(8).unwrap()];
    let mut cache = KvCache::new(spec, &mut arena).unwrap();
    let seq = cache.add_sequence().unwrap();
    let mut rng = Rng(2);
    append(&mut cache, seq, 6, &mut rng);
    let entry = BatchEntry {
        seq,
        first_position: 3,
        tokens: 3,
    };
    let q = rng.vec(3 * 4 * 8);
    let reference = {
        let options = AttentionOptions::default();
        let mut scratch = vec![0.0; attention_scratch_len(&cache, &options)];
        let mut out = vec![0.0; q.len()];
        attention(&cache, 0, &[entry], &q, &mut out, &mut scratch, &options).unwrap();
        out
    };
    for (splits, query_tile) in [
        (1, usize::MAX),
        (usize::MAX, 1),
        (usize::MAX, usize::MAX),
        (1 << 40, 8),
        (8, 1 << 62),
    ] {
        let options = AttentionOptions {
            splits,
            query_tile,
            ..AttentionOptions::default()
        };
        // The entry-independent bound saturates instead of wrapping...
        let needed = attention_scratch_len(&cache, &options);
        assert!(needed >= 1 << 20, "{splits} {query_tile}: {needed}");
        // ...so `attention` refuses any scratch a caller could have (or the plan's sizes).
        let mut scratch = vec![0.0; 1024];
        let mut out = vec![0.0; q.len()];
        assert!(matches!(
            attention(&cache, 0, &[entry], &q, &mut out, &mut scratch, &options),
            Err(Error::ScratchTooSmall { .. } | Error::SizeOverflow)
        ));
        // The plan either refuses the sizes or sizes its buffers by the batch.
        match AttentionPlan::new(&cache, 0, &[entry], &options) {
            Err(e) => assert_eq!(e, Error::SizeOverflow, "{splits} {query_tile}"),
            Ok(plan) => {
                assert!(
                    plan.partial_len() <= 3 * 2 * (8 + 2),
                    "{}",
                    plan.partial_len()
                );
                if plan.work_items() <= 1 << 12 {
                    let mut partials = vec![0.0; plan.work_items() * plan.partial_len()];
                    let mut scratch = vec![0.0; plan.scratch_len()];
                    for (i, partial) in partials.chunks_mut(plan.partial_len()).enumerate() {
                        plan.run_item(i, &q, partial, &mut scratch).unwrap();
                    }
                    let mut out = vec![0.0; q.len()];
                    plan.merge(&partials, &mut out).unwrap();
                    let same = out
                        .iter()
                        .zip(&reference)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{splits} {query_tile}: differs from the default tile");
                }
            }
        }
        // Threads: an error (or the result), never an abort on a huge allocation.
        let mut out = vec![0.0; q.len()];
        if let Ok(()) = attention_threaded(&cache, 0, &[entry], &q, &mut out, 2, &options) {
            assert_eq!(out, reference);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// A batch entry is refused with `Evicted` exactly when one of the keys its queries may see
    /// (causal, window, sinks) was dropped by the window, checked key by key with `read_row`.
    #[test]
    fn evicted_keys_are_refused_exactly_when_needed(
        window in 1usize..40,
        sinks in 0usize..6,
        block_tokens in 1usize..9,
        appends in proptest::collection::vec(1usize..30, 1..6),
        first_frac in 0.0f64..1.0,
        tokens_frac in 0.0f64..1.0,
    ) {
        let len: usize = appends.iter().sum();
        let mut spec = CacheSpec::new(1, 2, 1, 4);
        spec.block_tokens = block_tokens;
        spec.window = window;
        spec.sink_tokens = sinks;
        spec.max_seq_tokens = len.max(sinks);
        let layout = Layout::new(spec).unwrap();
        let blocks = spec.max_seq_tokens.div_ceil(block_tokens);
        let mut arena = vec![0u8; layout.arena_bytes(blocks).unwrap()];
        let mut cache = KvCache::new(spec, &mut arena).unwrap();
        let seq = cache.add_sequence().unwrap();
        let mut rng = Rng(len as u64);
        for n in appends {
            append(&mut cache, seq, n, &mut rng);
        }
        let first = ((len as f64 * first_frac) as usize).min(len - 1);
        let tokens = 1 + ((len - first - 1) as f64 * tokens_frac) as usize;
        let mut row = vec![0.0f32; 4];
        let all_stored = (first..first + tokens).all(|q| {
            visible(window, sinks, q, len)
                .iter()
                .enumerate()
                .all(|(k, &v)| !v || cache.read_row(seq, 0, Kind::K, 0, k, &mut row).is_ok())
        });
        let entry = BatchEntry { seq, first_position: first, tokens };
        let options = AttentionOptions::default();
        let mut scratch = vec![0.0; attention_scratch_len(&cache, &options)];
        let q = vec![0.5; tokens * 2 * 4];
        let mut out = vec![0.0; tokens * 2 * 4];
        // The plan itself refuses the batch, before any item runs.
        let plan = AttentionPlan::new(&cache, 0, &[entry], &options).map(|_| ());
        prop_assert_eq!(plan.is_ok(), all_stored, "{:?}", plan);
        let result = attention(&cache, 0, &[entry], &q, &mut out, &mut scratch, &options);
        if all_stored {
            prop_assert!(result.is_ok(), "{:?}", result);
        } else {
            prop_assert!(matches!(plan, Err(Error::Evicted { .. })), "{:?}", plan);
            prop_assert!(matches!(result, Err(Error::Evicted { .. })), "{:?}", result);
            prop_assert!(out.iter().all(|&x| x == 0.0), "output written on error");
        }
    }
}
