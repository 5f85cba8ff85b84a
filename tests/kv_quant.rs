//! The quantized formats (int8, int4): round-trip bounds derived from the stored scales,
//! special values, refusal of non-finite input, the AVX2 kernels against the scalar ones, and
//! attention on quantized caches against an f64 oracle.

use kvcache::attention::{attention, attention_scratch_len, AttentionOptions, BatchEntry};
use kvcache::kernels::{self, quant_scalar};
use kvcache::quant::{self, GROUP, SATURATE};
use kvcache::spec::Kind;
use kvcache::{CacheSpec, Error, KvCache, KvFormat, Layout};

#[cfg(target_arch = "x86_64")]
use kvcache::kernels::{avx2::Avx2, quant_avx2};

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1)`.
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// Uniform in `[-1, 1)` times `2^-3..=2^3`, so magnitudes vary.
    fn value(&mut self) -> f32 {
        let e = (self.next() % 7) as i32 - 3;
        self.unit() * f32::powi(2.0, e)
    }

    fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.value()).collect()
    }

    fn units(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.unit()).collect()
    }
}

fn encode(format: KvFormat, src: &[f32]) -> Vec<u8> {
    let mut row = vec![0xa5u8; format.row_bytes(src.len()).unwrap()];
    kernels::encode_row(format, src, &mut row);
    row
}

fn decode(format: KvFormat, row: &[u8], head_dim: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; head_dim];
    kernels::decode_row(format, row, &mut out);
    out
}

/// Checks every element of `src` against its decoded value: within half a step of the stored
/// scale (plus `f32` rounding of `m + s·q`) after saturation to `±2^126`.
fn assert_round_trip(format: KvFormat, src: &[f32]) {
    let head_dim = src.len();
    let row = encode(format, src);
    let back = decode(format, &row, head_dim);
    for (d, (&x, &y)) in src.iter().zip(&back).enumerate() {
        let (s, m) = quant::group_params(format, &row, head_dim, d / GROUP);
        assert!(
            s.is_finite() && s >= 0.0 && m.is_finite(),
            "{format} params {s} {m}"
        );
        assert!(y.is_finite(), "{format} hd {head_dim} d {d}: {x} -> {y}");
        let x = x.clamp(-SATURATE, SATURATE) as f64;
        let bound = s as f64 / 2.0 * (1.0 + 1e-6) + x.abs() * 2f64.powi(-23) + 1e-44;
        assert!(
            (y as f64 - x).abs() <= bound,
            "{format} hd {head_dim} d {d}: {x} -> {y} (scale {s}, min {m})"
        );
        // The stored integer is in range.
        let q = quant::stored_q(format, &row, d);
        match format {
            KvFormat::Int8 => assert!((-127..=127).contains(&q)),
            _ => assert!((0..=15).contains(&q)),
        }
    }
    // The step is not wasteful: at most the ideal one plus bfloat16 rounding (2^-7 relative)
    // and the int4 minimum's rounding.
    for (g, chunk) in src.chunks(GROUP).enumerate() {
        let (s, _) = quant::group_params(format, &row, head_dim, g);
        let c: Vec<f64> = chunk
            .iter()
            .map(|x| x.clamp(-SATURATE, SATURATE) as f64)
            .collect();
        let hi = c.iter().cloned().fold(f64::MIN, f64::max);
        let lo = c.iter().cloned().fold(f64::MAX, f64::min);
        let ideal = match format {
            KvFormat::Int8 => hi.abs().max(lo.abs()) / 127.0,
            _ => (hi - lo + lo.abs() / 128.0) / 15.0,
        };
        assert!(
            s as f64 <= ideal * (1.0 + 1.0 / 64.0) + 1e-39,
            "{format} scale {s} vs ideal {ideal}"
        );
    }
}

#[test]
fn row_bytes_and_targets() {
    let f16 = KvFormat::F16.row_bytes(64).unwrap() as f64;
    assert_eq!(KvFormat::Int8.row_bytes(64), Some(68));
    assert_eq!(KvFormat::Int4.row_bytes(64), Some(40));
    assert!(68.0 / f16 <= 0.56 && 40.0 / f16 <= 0.32);
    assert_eq!(KvFormat::Int8.row_bytes(1), Some(3));
    assert_eq!(KvFormat::Int4.row_bytes(1), Some(5));
    assert_eq!(KvFormat::Int4.row_bytes(33), Some(17 + 8));
    assert_eq!(KvFormat::Int8.row_bytes(usize::MAX), None);
    for format in KvFormat::QUANTIZED {
        assert_eq!(KvFormat::from_name(format.name()), Some(format));
        assert!(!format.is_float());
        // Every head dim makes a valid layout.
        for head_dim in [1, 3, 31, 33, 63, 64, 65, 127, 128, 255, 256] {
            let mut spec = CacheSpec::new(2, 4, 2, head_dim);
            spec.k_format = format;
            spec.v_format = KvFormat::Int4;
            Layout::new(spec).unwrap();
        }
    }
    let mut spec = CacheSpec::smollm2_135m();
    spec.k_format = KvFormat::Int8;
    spec.v_format = KvFormat::Int8;
    let int8 = Layout::new(spec).unwrap().bytes_per_token();
    spec.k_format = KvFormat::Int4;
    spec.v_format = KvFormat::Int4;
    let int4 = Layout::new(spec).unwrap().bytes_per_token();
    assert_eq!(int8 / 23_040.0, 68.0 / 128.0);
    assert_eq!(int4 / 23_040.0, 40.0 / 128.0);
}

#[test]
fn round_trip_random_rows_every_head_dim() {
    let mut rng = Rng(0x9a17);
    for format in KvFormat::QUANTIZED {
        for head_dim in 1..=260usize {
            assert_round_trip(format, &rng.values(head_dim));
            // Offset data (all positive) and wide-magnitude data.
            let offset: Vec<f32> = rng.units(head_dim).iter().map(|x| 100.0 + x).collect();
            assert_round_trip(format, &offset);
            let wide: Vec<f32> = (0..head_dim)
                .map(|_| rng.unit() * f32::powi(10.0, (rng.next() % 60) as i32 - 30))
                .collect();
            assert_round_trip(format, &wide);
        }
    }
}

#[test]
fn round_trip_special_rows() {
    let mut rng = Rng(5);
    for format in KvFormat::QUANTIZED {
        for head_dim in [1, 2, 7, 31, 32, 33, 64, 100, 128] {
            let zeros = vec![0.0f32; head_dim];
            let row = encode(format, &zeros);
            assert_eq!(decode(format, &row, head_dim), zeros, "{format} zeros");
            let neg_zeros = vec![-0.0f32; head_dim];
            assert_round_trip(format, &neg_zeros);
            // Constant rows: scale 0 must not give NaN; for int4 a bfloat16 constant is exact
            // (it is the stored minimum).
            for c in [1.0f32, -3.5, 0.1, 1e30, -1e30, 1e-40, 65504.0] {
                let row_values = vec![c; head_dim];
                assert_round_trip(format, &row_values);
                let back = decode(format, &encode(format, &row_values), head_dim);
                if format == KvFormat::Int4 && (c.to_bits() & 0xffff) == 0 {
                    assert!(
                        back.iter().all(|&y| y == c),
                        "{format} constant {c}: {back:?}"
                    );
                }
            }
            // Large magnitudes: 1e30 must not overflow the scale.
            let mut big = rng.values(head_dim);
            big[0] = 1e30;
            if head_dim > 1 {
                big[head_dim - 1] = -1e30;
            }
            assert_round_trip(format, &big);
            let huge: Vec<f32> = (0..head_dim)
                .map(|i| [f32::MAX, -f32::MAX, 3e38, 1.0, -1e37][i % 5])
                .collect();
            assert_round_trip(format, &huge);
            // Subnormals and tiny values.
            let tiny: Vec<f32> = (0..head_dim)
                .map(|i| {
                    f32::from_bits(1 + (i as u32 * 7919) % 5000)
                        * if i % 2 == 0 { 1.0 } else { -1.0 }
                })
                .collect();
            assert_round_trip(format, &tiny);
            // One outlier only coarsens its own group.
            let mut outlier = rng.values(head_dim);
            outlier[0] = 1000.0;
            assert_round_trip(format, &outlier);
            // Non-finite input never panics and decodes to finite values.
            let mut bad = rng.values(head_dim);
            bad[0] = f32::NAN;
            bad[head_dim / 2] = f32::INFINITY;
            bad[head_dim - 1] = f32::NEG_INFINITY;
            assert!(decode(format, &encode(format, &bad), head_dim)
                .iter()
                .all(|y| y.is_finite()));
        }
    }
}

#[test]
fn short_buffers_are_left_alone() {
    for format in KvFormat::QUANTIZED {
        let src = [1.0f32; 40];
        let mut dst = vec![7u8; format.row_bytes(40).unwrap() - 1];
        kernels::encode_row(format, &src, &mut dst);
        assert!(dst.iter().all(|&b| b == 7));
        let mut out = [3.0f32; 40];
        kernels::decode_row(format, &dst, &mut out);
        assert!(out.iter().all(|&v| v == 3.0));
    }
}

fn quant_spec(k: KvFormat, v: KvFormat, head_dim: usize) -> CacheSpec {
    let mut spec = CacheSpec::new(2, 6, 2, head_dim);
    spec.block_tokens = 5;
    spec.k_format = k;
    spec.v_format = v;
    spec.max_seq_tokens = 64;
    spec
}

#[test]
fn refused_first_write_sets_no_key_offsets() {
    let spec = quant_spec(KvFormat::Int4, KvFormat::Int4, 64);
    let mut arena = vec![0u8; Layout::new(spec).unwrap().arena_bytes(8).unwrap()];
    let mut cache = KvCache::new(spec, &mut arena).unwrap();
    let seq = cache.add_sequence().unwrap();
    cache.reserve(seq, 2).unwrap();
    let mut rng = Rng(5);
    let elems = 2 * 2 * 64;
    let (mut keys, values) = (rng.values(elems), rng.values(elems));
    keys[3] = f32::NAN;
    assert_eq!(
        cache.write_run(seq, 0, 0, &keys, &values),
        Err(Error::NonFinite)
    );
    let mut offsets = vec![0.0f32; 64];
    assert!(!cache.key_offsets(seq, 0, 1, &mut offsets).unwrap());
    keys[3] = 0.5;
    // Rows 64 wide are rotated: the offsets are the rotated mean.
    cache.write_run(seq, 0, 0, &keys, &values).unwrap();
    assert!(cache.key_offsets(seq, 0, 1, &mut offsets).unwrap());
    let mut mean: Vec<f32> = (0..64)
        .map(|d| ((keys[64 + d] as f64 + keys[3 * 64 + d] as f64) / 2.0) as f32)
        .collect();
    quant::hadamard(&mut mean);
    assert_eq!(offsets, mean);
    assert_eq!(
        cache.key_offsets(seq, 2, 0, &mut offsets),
        Err(Error::BadIndex("layer"))
    );
    assert_eq!(
        cache.key_offsets(seq, 0, 2, &mut offsets),
        Err(Error::BadIndex("kv_head"))
    );
    assert_eq!(
        cache.key_offsets(seq, 0, 0, &mut offsets[..3]),
        Err(Error::BadShape("out"))
    );
}

#[test]
fn huge_finite_inputs_stay_finite_in_every_quantized_layout() {
    // head dims 4 and 64 store int4 rows rotated, 6 does not; the rotation of ±3e38 would
    // overflow without the input limit.
    for head_dim in [4, 6, 64] {
        for (k, v) in [
            (KvFormat::Int4, KvFormat::Int4),
            (KvFormat::Int8, KvFormat::Int4),
            (KvFormat::Int4, KvFormat::Int8),
        ] {
            let mut spec = quant_spec(k, v, head_dim);
            spec.q_heads = 2;
            let mut arena = vec![0u8; Layout::new(spec).unwrap().arena_bytes(8).unwrap()];
            let mut cache = KvCache::new(spec, &mut arena).unwrap();
            let seq = cache.add_sequence().unwrap();
            cache.reserve(seq, 3).unwrap();
            let elems = 3 * 2 * head_dim;
            let huge: Vec<f32> = (0..elems)
                .map(|i| match i % 4 {
                    0 | 1 => f32::MAX * 0.9,
                    2 => -f32::MAX,
                    _ => 1.0,
                })
                .collect();
            for layer in 0..2 {
                cache.write_run(seq, layer, 0, &huge, &huge).unwrap();
            }
            for p in 0..3 {
                for kind in [Kind::K, Kind::V] {
                    let mut row = vec![0.0f32; head_dim];
                    cache.read_row(seq, 0, kind, 1, p, &mut row).unwrap();
                    assert!(
                        row.iter().all(|x| x.is_finite()),
                        "{k}/{v} hd {head_dim} {kind:?} pos {p}: {row:?}"
                    );
                }
            }
            // The first query sees one value, so its output is that value (sums of several
            // such values may overflow `f32`, in any format).
            let entry = BatchEntry {
                seq,
                first_position: 0,
                tokens: 1,
            };
            let queries = vec![1e-30f32; 2 * head_dim];
            let options = AttentionOptions::default();
            let mut scratch = vec![0.0; attention_scratch_len(&cache, &options)];
            let mut out = vec![0.0; queries.len()];
            attention(
                &cache,
                1,
                &[entry],
                &queries,
                &mut out,
                &mut scratch,
                &options,
            )
            .unwrap();
            assert!(
                out.iter().all(|x| x.is_finite()),
                "{k}/{v} hd {head_dim}: {out:?}"
            );
        }
    }
}

#[test]
fn truncating_to_zero_gives_int4_keys_fresh_offsets() {
    let spec = quant_spec(KvFormat::Int4, KvFormat::Int4, 64);
    let mut arena = vec![0u8; Layout::new(spec).unwrap().arena_bytes(8).unwrap()];
    let mut cache = KvCache::new(spec, &mut arena).unwrap();
    let seq = cache.add_sequence().unwrap();
    let mut rng = Rng(9);
    let elems = 2 * 2 * 64;
    let mut offsets = vec![0.0f32; 64];
    cache.reserve(seq, 2).unwrap();
    cache
        .write_run(seq, 0, 0, &rng.values(elems), &rng.values(elems))
        .unwrap();
    cache.truncate(seq, 1).unwrap();
    assert!(cache.key_offsets(seq, 0, 0, &mut offsets).unwrap());
    cache.truncate(seq, 0).unwrap();
    assert!(!cache.key_offsets(seq, 0, 0, &mut offsets).unwrap());
    // The next write fixes them from its own keys, as for a new sequence.
    cache.reserve(seq, 2).unwrap();
    let (keys, values) = (rng.values(elems), rng.values(elems));
    cache.write_run(seq, 0, 0, &keys, &values).unwrap();
    let fresh = cache.add_sequence().unwrap();
    cache.reserve(fresh, 2).unwrap();
    cache.write_run(fresh, 0, 0, &keys, &values).unwrap();
    let mut want = vec![0.0f32; 64];
    assert!(cache.key_offsets(seq, 0, 0, &mut offsets).unwrap());
    assert!(cache.key_offsets(fresh, 0, 0, &mut want).unwrap());
    assert_eq!(offsets, want);
    for p in 0..2 {
        let (mut a, mut b) = (vec![0.0f32; 64], vec![0.0f32; 64]);
        cache.read_row(seq, 0, Kind::K, 1, p, &mut a).unwrap();
        cache.read_row(fresh, 0, Kind::K, 1, p, &mut b).unwrap();
        assert_eq!(a, b, "position {p}");
    }
}

#[test]
fn non_finite_writes_are_refused_and_change_nothing() {
    for (k, v) in [
        (KvFormat::Int8, KvFormat::Int8),
        (KvFormat::Int4, KvFormat::Int4),
        (KvFormat::F16, KvFormat::Int4),
        (KvFormat::Int8, KvFormat::F32),
    ] {
        let spec = quant_spec(k, v, 40);
        let mut arena = vec![0u8; Layout::new(spec).unwrap().arena_bytes(8).unwrap()];
        let mut cache = KvCache::new(spec, &mut arena).unwrap();
        let seq = cache.add_sequence().unwrap();
        cache.reserve(seq, 3).unwrap();
        let mut rng = Rng(17);
        let elems = 3 * 2 * 40;
        let (keys, values) = (rng.values(elems), rng.values(elems));
        cache.write_run(seq, 1, 0, &keys, &values).unwrap();
        let snapshot = |cache: &KvCache| {
            let mut all = Vec::new();
            for p in 0..3 {
                for kind in [Kind::K, Kind::V] {
                    for h in 0..2 {
                        let mut row = vec![0.0f32; 40];
                        cache.read_row(seq, 1, kind, h, p, &mut row).unwrap();
                        all.extend(row.iter().map(|x| x.to_bits()));
                    }
                }
            }
            all
        };
        let before = snapshot(&cache);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for in_keys in [true, false] {
                let (mut k2, mut v2) = (rng.values(elems), rng.values(elems));
                if in_keys {
                    k2[elems / 2] = bad;
                } else {
                    v2[elems - 1] = bad;
                }
                assert_eq!(cache.write_run(seq, 1, 0, &k2, &v2), Err(Error::NonFinite));
                assert_eq!(snapshot(&cache), before, "{k}/{v}");
            }
        }
        // The stored rows are the quantized input (int4 keys: minus the layer's key offsets,
        // which the first write set to the mean of its keys and which `read_row` adds back).
        for p in 0..3 {
            for h in 0..2 {
                let mut row = vec![0.0f32; 40];
                cache.read_row(seq, 1, Kind::K, h, p, &mut row).unwrap();
                let src = &keys[(p * 2 + h) * 40..(p * 2 + h + 1) * 40];
                let mut offsets = vec![0.0f32; 40];
                let set = cache.key_offsets(seq, 1, h, &mut offsets).unwrap();
                assert_eq!(set, k == KvFormat::Int4);
                let shifted: Vec<f32> = src.iter().zip(&offsets).map(|(x, o)| x - o).collect();
                // int4 keys: the first token's key is held exact (minus and plus the offsets).
                let stored = if k == KvFormat::Int4 && p == 0 {
                    shifted.clone()
                } else {
                    decode(k, &encode(k, &shifted), 40)
                };
                let want: Vec<f32> = stored.iter().zip(&offsets).map(|(x, o)| x + o).collect();
                assert_eq!(row, want);
                if k == KvFormat::Int4 {
                    let mean = |d: usize| {
                        (0..3)
                            .map(|t| keys[(t * 2 + h) * 40 + d] as f64)
                            .sum::<f64>()
                            / 3.0
                    };
                    for (d, &o) in offsets.iter().enumerate() {
                        assert_eq!(o, mean(d) as f32, "offset {d}");
                    }
                }
            }
        }
        // A later write does not move them.
        let mut again = vec![0.0f32; 40];
        cache.key_offsets(seq, 1, 0, &mut again).unwrap();
        let more = rng.values(elems);
        cache.write_run(seq, 1, 0, &more, &more).unwrap();
        let mut after = vec![0.0f32; 40];
        cache.key_offsets(seq, 1, 0, &mut after).unwrap();
        assert_eq!(again, after);
        // Layer 0 was never written: its offsets are not set.
        let mut offsets = vec![1.0f32; 40];
        assert!(!cache.key_offsets(seq, 0, 0, &mut offsets).unwrap());
        assert!(offsets.iter().all(|&o| o == 0.0));
    }
}

// ------------------------------------------------------------------------------------------
// AVX2 against scalar.

type KernelFn<'a> = &'a dyn Fn(KvFormat, &[u8], usize, &[f32], usize, &mut [f32]);

/// `n_rows` random quantized rows starting `offset` bytes into the buffer.
fn stored_rows(
    rng: &mut Rng,
    format: KvFormat,
    head_dim: usize,
    n_rows: usize,
    offset: usize,
) -> Vec<u8> {
    let rb = format.row_bytes(head_dim).unwrap();
    let mut buf = vec![0u8; offset + n_rows * rb];
    for r in 0..n_rows {
        let mut values = rng.values(head_dim);
        if r % 3 == 1 {
            // Offset rows, where the int4 minimum is far from zero.
            values.iter_mut().for_each(|v| *v += 5.0);
        }
        let at = offset + r * rb;
        quant_scalar::encode_row(format, &values, &mut buf[at..at + rb]);
    }
    buf
}

/// Compares `dot` and `acc` against the scalar kernels for one shape; returns cases checked.
#[allow(clippy::too_many_arguments)]
fn compare_one(
    rng: &mut Rng,
    format: KvFormat,
    head_dim: usize,
    group: usize,
    n_rows: usize,
    offset: usize,
    dot: KernelFn,
    acc: KernelFn,
) -> usize {
    let rb = format.row_bytes(head_dim).unwrap();
    let buf = stored_rows(rng, format, head_dim, n_rows, offset);
    let rows = &buf[offset..];
    let el = |r: usize, d: usize| {
        quant::element(format, &rows[r * rb..(r + 1) * rb], head_dim, d) as f64
    };
    let per_head = n_rows + n_rows % 2;
    let queries = rng.values(group * head_dim);
    let mut want = vec![f32::from_bits(0x7fc0_1234); group * per_head];
    let mut got = want.clone();
    quant_scalar::dot_rows(format, rows, head_dim, &queries, group, &mut want);
    dot(format, rows, head_dim, &queries, group, &mut got);
    for h in 0..group {
        for r in 0..per_head {
            let i = h * per_head + r;
            if r >= n_rows {
                assert_eq!(got[i].to_bits(), 0x7fc0_1234, "slot past the rows written");
                continue;
            }
            let mag: f64 = (0..head_dim)
                .map(|d| (queries[h * head_dim + d] as f64 * el(r, d)).abs())
                .sum();
            assert!(
                (got[i] as f64 - want[i] as f64).abs() <= 1e-5 * mag + 1e-30,
                "dot {format} hd {head_dim} group {group} rows {n_rows} h {h} r {r}: {} vs {}",
                got[i],
                want[i]
            );
        }
    }
    let weights = rng.values(group * per_head);
    let start = rng.values(group * head_dim);
    let mut want = start.clone();
    let mut got = start.clone();
    quant_scalar::accumulate_rows(format, rows, head_dim, &weights, group, &mut want);
    acc(format, rows, head_dim, &weights, group, &mut got);
    for h in 0..group {
        for d in 0..head_dim {
            let i = h * head_dim + d;
            let mag = start[i].abs() as f64
                + (0..n_rows)
                    .map(|r| (weights[h * per_head + r] as f64 * el(r, d)).abs())
                    .sum::<f64>();
            assert!(
                (got[i] as f64 - want[i] as f64).abs() <= 1e-5 * mag + 1e-30,
                "acc {format} hd {head_dim} group {group} rows {n_rows} h {h} d {d}: {} vs {}",
                got[i],
                want[i]
            );
        }
    }
    group * (per_head + head_dim)
}

const GROUPS: [usize; 10] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 32];

fn sweep(dot: KernelFn, acc: KernelFn) {
    let mut rng = Rng(0x51d);
    let mut cases = 0;
    for format in KvFormat::QUANTIZED {
        // Every head dim 1..=256 and every row count, groups cycling.
        for head_dim in 1..=256usize {
            for n_rows in 0..=17usize {
                let group = GROUPS[(head_dim + n_rows) % GROUPS.len()];
                let offset = (head_dim + n_rows) % 5;
                cases += compare_one(&mut rng, format, head_dim, group, n_rows, offset, dot, acc);
            }
        }
        // Every group against a spread of head dims and row counts.
        for head_dim in [1, 7, 8, 9, 31, 32, 33, 63, 64, 65, 100, 128, 256] {
            for group in GROUPS {
                for n_rows in [0, 1, 2, 3, 5, 8, 16, 17] {
                    let offset = (head_dim * 3 + group + n_rows) % 4;
                    cases +=
                        compare_one(&mut rng, format, head_dim, group, n_rows, offset, dot, acc);
                }
            }
        }
    }
    assert!(cases > 100_000);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_kernels_match_scalar() {
    let Some(t) = Avx2::new() else {
        eprintln!("CPU lacks AVX2/FMA/F16C: AVX2 kernels not tested");
        return;
    };
    sweep(
        &|f, r, hd, q, g, s| quant_avx2::dot_rows(t, f, r, hd, q, g, s),
        &|f, r, hd, w, g, o| quant_avx2::accumulate_rows(t, f, r, hd, w, g, o),
    );
    // Through the float token's entry points too.
    sweep(
        &|f, r, hd, q, g, s| t.dot_rows(f, r, hd, q, g, s),
        &|f, r, hd, w, g, o| t.accumulate_rows(f, r, hd, w, g, o),
    );
}

#[test]
fn dispatched_kernels_match_scalar() {
    sweep(&kernels::dot_rows, &kernels::accumulate_rows);
}

/// Arbitrary bytes as rows (NaN / inf parameters included): no panic, and AVX2 agrees with
/// scalar wherever the scalar result is finite.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_on_arbitrary_bytes() {
    let Some(t) = Avx2::new() else { return };
    let mut rng = Rng(0xb17e5);
    for format in KvFormat::QUANTIZED {
        for head_dim in [1, 5, 8, 13, 32, 45, 64] {
            let rb = format.row_bytes(head_dim).unwrap();
            for n_rows in [1, 4, 9] {
                let bytes: Vec<u8> = (0..rb * n_rows + 3).map(|_| rng.next() as u8).collect();
                let rows = &bytes[1..];
                let queries = rng.values(3 * head_dim);
                let (mut want, mut got) = (vec![0.0; 3 * n_rows], vec![0.0; 3 * n_rows]);
                quant_scalar::dot_rows(format, rows, head_dim, &queries, 3, &mut want);
                quant_avx2::dot_rows(t, format, rows, head_dim, &queries, 3, &mut got);
                for (g, w) in got.iter().zip(&want) {
                    if w.is_finite() && w.abs() < 1e30 {
                        assert!((g - w).abs() <= 1e-3 * w.abs().max(1.0), "{g} vs {w}");
                    }
                }
            }
        }
    }
}

/// Lengths that disagree: the largest consistent prefix, as the scalar kernels do. (Release
/// builds only: debug builds stop such caller bugs with `debug_assert!`.)
#[cfg(not(debug_assertions))]
#[test]
fn inconsistent_lengths_match_scalar() {
    let mut rng = Rng(0xbad);
    for format in KvFormat::QUANTIZED {
        for (head_dim, group, n_rows, q_len, s_len) in [
            (64, 3, 16, 64 * 2, 3 * 16),
            (64, 3, 16, 64 * 3 + 5, 3 * 16),
            (17, 4, 5, 17 * 4, 4 * 5 + 3),
            (9, 2, 7, 3, 2 * 7),
            (8, 5, 3, 8 * 5, 2),
            (usize::MAX / 2, 1, 0, 0, 4),
        ] {
            let buf = stored_rows(&mut rng, format, head_dim.min(1024), n_rows, 1);
            let queries = rng.values(q_len);
            let mut want = vec![1.5f32; s_len];
            let mut got = want.clone();
            quant_scalar::dot_rows(format, &buf[1..], head_dim, &queries, group, &mut want);
            kernels::dot_rows(format, &buf[1..], head_dim, &queries, group, &mut got);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{format} hd {head_dim}"
                );
            }
            let weights = rng.values(s_len);
            let mut want = vec![0.25f32; q_len];
            let mut got = want.clone();
            quant_scalar::accumulate_rows(format, &buf[1..], head_dim, &weights, group, &mut want);
            kernels::accumulate_rows(format, &buf[1..], head_dim, &weights, group, &mut got);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{format} hd {head_dim}"
                );
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Attention on quantized caches.

/// Softmax attention in f64 over rows given as `[position][head_dim]`.
fn naive_attention(query: &[f64], keys: &[Vec<f32>], values: &[Vec<f32>], scale: f64) -> Vec<f64> {
    naive_attention_with(|_| query, keys, values, scale)
}

/// [`naive_attention`] with the query chosen per key position.
fn naive_attention_with<'q>(
    query: impl Fn(usize) -> &'q [f64],
    keys: &[Vec<f32>],
    values: &[Vec<f32>],
    scale: f64,
) -> Vec<f64> {
    let scores: Vec<f64> = keys
        .iter()
        .enumerate()
        .map(|(p, k)| {
            k.iter()
                .zip(query(p))
                .map(|(&a, &b)| a as f64 * b)
                .sum::<f64>()
                * scale
        })
        .collect();
    let query = query(0);
    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut out = vec![0.0; query.len()];
    for (w, v) in weights.iter().zip(values) {
        for (o, &x) in out.iter_mut().zip(v) {
            *o += w / total * x as f64;
        }
    }
    out
}

/// Worst errors of one decode step (see [`attention_errors`]).
struct Errors {
    /// Against the oracle on the dequantized rows and the query the kernels use (the scaled
    /// query, quantized when K is int8 / int4): only `f32` arithmetic separates them.
    exact: f64,
    /// Against the oracle on the dequantized rows and the `f32` query, as a fraction of the
    /// bound that the query's quantization allows (see [`attention_errors`]); `<= 1` passes.
    query: f64,
    /// Against the oracle on the original rows and the `f32` query.
    orig: f64,
    /// The largest bound of int4 values' weight rounding (0 for the other formats), which
    /// `exact` and `query` allow for.
    rounding: f64,
    /// The largest fraction of that bound the error against the exact oracle reached.
    rounding_used: f64,
}

/// The normalized softmax weights of the keys against the query chosen per position.
fn naive_weights<'q>(query: impl Fn(usize) -> &'q [f64], keys: &[Vec<f32>]) -> Vec<f64> {
    let scores: Vec<f64> = keys
        .iter()
        .enumerate()
        .map(|(p, k)| k.iter().zip(query(p)).map(|(&a, &b)| a as f64 * b).sum())
        .collect();
    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    weights.iter().map(|w| w / total).collect()
}

/// How far `kernels::accumulate_rows_int` may move one KV head's attention output from the
/// exact weighted sum of the dequantized int4 values, per element: in each block (16 rows,
/// one run of the kernel) and group, every weight `W·s` (normalized softmax weight times the
/// row's scale) is within half a step of its integer, the step being `1/255` of the block's
/// largest, and it multiplies the nibble's distance from the middle:
/// `Σ_blocks max(W·s) / 510 · Σ_rows |n - 7.5|` per
/// stored element. For rows stored rotated the bound is then per element of the rotated output. One part in 1000 more
/// covers `f32` rounding.
fn weight_rounding_bound(
    cache: &KvCache<'_>,
    seq: kvcache::SeqId,
    kv: usize,
    head_dim: usize,
    weights: &[f64],
) -> Vec<f64> {
    let format = KvFormat::Int4;
    let rb = format.row_bytes(head_dim).unwrap();
    let block_tokens = cache.spec().block_tokens;
    let mut stored = vec![0.0f64; head_dim];
    for (b, block_weights) in weights.chunks(block_tokens).enumerate() {
        let rows = cache.block(seq, b).unwrap().rows(0, Kind::V, kv);
        let row = |r: usize| &rows[r * rb..(r + 1) * rb];
        // The sequence's first value is held exact and summed apart, in float.
        let from = usize::from(b == 0);
        for g in 0..head_dim / GROUP {
            let largest = (from..block_weights.len())
                .map(|r| {
                    block_weights[r] * quant::group_params(format, row(r), head_dim, g).0 as f64
                })
                .fold(0.0f64, f64::max);
            for (d, bound) in stored.iter_mut().enumerate().skip(g * GROUP).take(GROUP) {
                let nibbles: f64 = (from..block_weights.len())
                    .map(|r| (quant::stored_q(format, row(r), d) as f64 - 7.5).abs())
                    .sum();
                *bound += largest / 510.0 * nibbles;
            }
        }
    }
    stored.iter().map(|b| b * 1.001).collect()
}

/// The orthonormal Walsh–Hadamard transform in `f64` (`x.len()` a power of two), to compare
/// outputs in the basis rotated int4 rows are stored in.
fn hadamard64(x: &[f64]) -> Vec<f64> {
    let n = x.len();
    let mut y = x.to_vec();
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (y[j], y[j + h]);
                y[j] = a + b;
                y[j + h] = a - b;
            }
        }
        h *= 2;
    }
    y.iter().map(|v| v / (n as f64).sqrt()).collect()
}

/// Runs one decode step over a cache of `len` random tokens in `format` and measures the worst
/// absolute errors against three oracles ([`Errors`]).
///
/// The query bound: with quantized keys the kernels quantize the scaled query `x = q·scale`
/// per group of 32 to `s_q·n`, `|x_d - s_q·n_d| <= s_q / 2`, so the score of key `p` moves by
/// at most `Δ_p = Σ_d |k_pd| · s_q(d) / 2` (`k` dequantized). Scores that each move by at most
/// `Δ = max_p Δ_p` change each softmax weight by a factor in `[e^-2Δ, e^2Δ]`, so
/// `Σ_p |w'_p - w_p| <= e^2Δ - 1` and each output element moves by at most
/// `(e^2Δ - 1) · max_p |v_pd|`; `2e-5` more covers `f32` arithmetic.
///
/// `exact_values` sets [`AttentionOptions::exact_values`]: int4 values are then summed in
/// `f32` and no weight-rounding allowance is made.
fn attention_errors(
    k_format: KvFormat,
    v_format: KvFormat,
    head_dim: usize,
    len: usize,
    exact_values: bool,
) -> Errors {
    let (q_heads, kv_heads) = (6, 2);
    let mut spec = CacheSpec::new(1, q_heads, kv_heads, head_dim);
    spec.k_format = k_format;
    spec.v_format = v_format;
    spec.max_seq_tokens = len;
    let layout = Layout::new(spec).unwrap();
    let mut arena = vec![0u8; layout.arena_bytes(len.div_ceil(16) + 1).unwrap()];
    let mut cache = KvCache::new(spec, &mut arena).unwrap();
    let mut rng = Rng(0xa77 + head_dim as u64);
    let seq = cache.add_sequence().unwrap();
    let elems = len * kv_heads * head_dim;
    let (keys, values) = (rng.units(elems), rng.units(elems));
    cache.reserve(seq, len).unwrap();
    cache.write_run(seq, 0, 0, &keys, &values).unwrap();
    let queries: Vec<f32> = rng
        .units(q_heads * head_dim)
        .iter()
        .map(|q| q * 4.0)
        .collect();
    let mut out = vec![0.0; q_heads * head_dim];
    let scale32 = 1.0 / (head_dim as f32).sqrt();
    let options = AttentionOptions {
        scale: Some(scale32),
        exact_values,
        ..AttentionOptions::default()
    };
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
    let scale = scale32 as f64;
    let mut errors = Errors {
        exact: 0.0,
        query: 0.0,
        orig: 0.0,
        rounding: 0.0,
        rounding_used: 0.0,
    };
    for kv in 0..kv_heads {
        let original = |data: &[f32]| {
            (0..len)
                .map(|p| {
                    data[(p * kv_heads + kv) * head_dim..(p * kv_heads + kv + 1) * head_dim]
                        .to_vec()
                })
                .collect::<Vec<_>>()
        };
        let stored = |kind: Kind| {
            (0..len)
                .map(|p| {
                    let mut row = vec![0.0; head_dim];
                    cache.read_row(seq, 0, kind, kv, p, &mut row).unwrap();
                    row
                })
                .collect::<Vec<_>>()
        };
        let (k_deq, v_deq) = (stored(Kind::K), stored(Kind::V));
        // int4 keys are stored minus the key offsets (in the stored basis): that is what the
        // kernels multiply the query with.
        let mut offsets = vec![0.0f32; head_dim];
        cache.key_offsets(seq, 0, kv, &mut offsets).unwrap();
        let (k_orig, v_orig) = (original(&keys), original(&values));
        for head in kv * 3..(kv + 1) * 3 {
            let q: Vec<f64> = queries[head * head_dim..(head + 1) * head_dim]
                .iter()
                .map(|&x| x as f64)
                .collect();
            // The query the kernels use: scaled in f32, then quantized for int8 / int4 keys.
            let scaled: Vec<f32> = queries[head * head_dim..(head + 1) * head_dim]
                .iter()
                .map(|&x| x * scale32)
                .collect();
            let (q_kernel, step): (Vec<f64>, Vec<f64>) = if k_format.is_float() {
                (
                    scaled.iter().map(|&x| x as f64).collect(),
                    vec![0.0; head_dim],
                )
            } else {
                // Rotated int4 keys: the kernel sees the rotated query against rotated rows.
                let rotated = quant::rotated(k_format, head_dim);
                let mut kernel_input = scaled.clone();
                if rotated {
                    quant::hadamard(&mut kernel_input);
                }
                let mut prepared = vec![0u8; kernels::prepared_query_len(k_format, head_dim, 1)];
                kernels::prepare_queries(k_format, head_dim, &kernel_input, 1, &mut prepared);
                let ng = quant::groups(head_dim);
                let mut used: Vec<f32> = (0..head_dim)
                    .map(|d| quant::prepared_value(k_format, &prepared, head_dim, d) as f32)
                    .collect();
                if rotated {
                    // Back to the original basis, where `read_row` returns the keys.
                    quant::hadamard(&mut used);
                }
                (
                    used.iter().map(|&x| x as f64).collect(),
                    (0..head_dim)
                        .map(|d| quant::read_f32(&prepared, ng * GROUP + 4 * (d / GROUP)) as f64)
                        .collect(),
                )
            };
            // The query's quantization error acts in the basis the keys are stored in.
            let delta = k_deq
                .iter()
                .map(|k| {
                    let mut basis = k.clone();
                    if quant::rotated(k_format, head_dim) {
                        quant::hadamard(&mut basis);
                    }
                    basis
                        .iter()
                        .zip(&offsets)
                        .zip(&step)
                        .map(|((&x, &o), s)| (x - o).abs() as f64 * s / 2.0)
                        .sum::<f64>()
                })
                .fold(0.0f64, f64::max);
            let got = &out[head * head_dim..(head + 1) * head_dim];
            // int4 keys: the first key is held exact and scored with the unquantized query.
            let q_scaled: Vec<f64> = scaled.iter().map(|&x| x as f64).collect();
            let first_exact = k_format == KvFormat::Int4;
            let query_at = |p: usize| -> &[f64] {
                if p == 0 && first_exact {
                    &q_scaled
                } else {
                    &q_kernel
                }
            };
            let want_exact = naive_attention_with(query_at, &k_deq, &v_deq, 1.0);
            let want_deq = naive_attention(&q, &k_deq, &v_deq, scale);
            let want_orig = naive_attention(&q, &k_orig, &v_orig, scale);
            // int4 values meet the softmax weights as 8-bit integers: add what that rounding
            // allows (see `weight_rounding_bound`).
            let rounding = if !exact_values && quant_scalar::integer_rows(v_format, head_dim) {
                let weights = naive_weights(query_at, &k_deq);
                weight_rounding_bound(&cache, seq, kv, head_dim, &weights)
            } else {
                vec![0.0; head_dim]
            };
            // Against the exact oracle, in the basis the values are stored in (where the
            // rounding bound applies element by element).
            let mut diff: Vec<f64> = (0..head_dim)
                .map(|d| got[d] as f64 - want_exact[d])
                .collect();
            if quant::rotated(v_format, head_dim) {
                diff = hadamard64(&diff);
            }
            for d in 0..head_dim {
                errors.exact = errors.exact.max(diff[d].abs() - rounding[d]);
                errors.rounding = errors.rounding.max(rounding[d]);
                if rounding[d] > 0.0 {
                    errors.rounding_used = errors.rounding_used.max(diff[d].abs() / rounding[d]);
                }
            }
            let rotated_rounding = if quant::rotated(v_format, head_dim) {
                // Every element of the original basis takes each rotated one's error times
                // `±1/sqrt(head_dim)`.
                let spread = rounding.iter().sum::<f64>() / (head_dim as f64).sqrt();
                vec![spread; head_dim]
            } else {
                rounding.clone()
            };
            for d in 0..head_dim {
                let v_max = v_deq.iter().map(|v| v[d].abs() as f64).fold(0.0, f64::max);
                let bound = (2.0 * delta).exp_m1() * v_max + 2e-5 + rotated_rounding[d];
                let got = got[d] as f64;
                errors.query = errors.query.max((got - want_deq[d]).abs() / bound);
                errors.orig = errors.orig.max((got - want_orig[d]).abs());
            }
        }
    }
    errors
}

#[test]
fn attention_on_quantized_caches_matches_oracle() {
    // (K, V, bound against the original values). Values are in [-1, 1), queries in [-4, 4).
    for (k, v, bound) in [
        (KvFormat::Int8, KvFormat::Int8, 0.01),
        (KvFormat::Int4, KvFormat::Int4, 0.05),
        (KvFormat::Int8, KvFormat::Int4, 0.05),
        (KvFormat::F16, KvFormat::Int8, 0.01),
    ] {
        // int4 values also with `exact_values` (no weight rounding, no allowance for it).
        let modes: &[bool] = if v == KvFormat::Int4 {
            &[false, true]
        } else {
            &[false]
        };
        for (head_dim, &exact_values) in [64, 37, 128]
            .into_iter()
            .flat_map(|d| modes.iter().map(move |m| (d, m)))
        {
            let Errors {
                exact,
                query,
                orig,
                rounding,
                rounding_used,
            } = attention_errors(k, v, head_dim, 300, exact_values);
            eprintln!("attention {k}/{v} hd {head_dim} exact_values {exact_values}: max |err| vs dequantized rows and kernel query {exact:.2e} beyond the weight-rounding bound (up to {rounding:.2e}, {rounding_used:.2} of it used), vs f32 query {query:.2} of the bound, vs original {orig:.2e}");
            assert!(
                exact < 2e-5,
                "{k}/{v} hd {head_dim} exact_values {exact_values}: {exact} against the dequantized rows and kernel query"
            );
            assert!(
                query <= 1.0,
                "{k}/{v} hd {head_dim}: {query} × the query-quantization bound against the f32 query"
            );
            assert!(
                orig < bound,
                "{k}/{v} hd {head_dim}: {orig} against the original rows"
            );
        }
    }
}

// ------------------------------------------------------------------------------------------
// Integer dot products against prepared (quantized) queries.

fn prepare(format: KvFormat, head_dim: usize, queries: &[f32], group: usize) -> Vec<u8> {
    let mut prepared = vec![0x5au8; kernels::prepared_query_len(format, head_dim, group)];
    quant_scalar::prepare_queries(format, head_dim, queries, group, &mut prepared);
    prepared
}

#[test]
fn prepared_query_layout_and_bound() {
    let mut rng = Rng(0x9e9);
    for format in KvFormat::QUANTIZED {
        assert_eq!(kernels::prepared_query_len(KvFormat::F16, 64, 3), 0);
        assert_eq!(kernels::prepared_query_len(format, 64, 3), 3 * 80);
        for head_dim in 1..=130 {
            let query = rng.values(head_dim);
            let prepared = prepare(format, head_dim, &query, 1);
            let ng = quant::groups(head_dim);
            for g in 0..ng {
                let sq = quant::read_f32(&prepared, ng * GROUP + 4 * g) as f64;
                let mut sum = 0i32;
                for t in 0..GROUP {
                    let d = g * GROUP + quant::prepared_element(format, t);
                    let n = prepared[g * GROUP + t] as i8 as i32;
                    assert!((-127..=127).contains(&n));
                    if d >= head_dim {
                        assert_eq!(n, 0, "padding lane");
                        continue;
                    }
                    sum += n;
                    let x = query[d] as f64;
                    let err = (x - quant::prepared_value(format, &prepared, head_dim, d)).abs();
                    assert!(
                        err <= sq / 2.0 * (1.0 + 1e-12),
                        "{format} hd {head_dim} d {d}"
                    );
                }
                let w = quant::read_f32(&prepared, ng * GROUP + 4 * ng + 4 * g);
                assert_eq!(w, sq as f32 * sum as f32);
            }
        }
    }
}

/// Checks `dot_rows_prepared` (dispatched) on one shape against the f64 oracle on the
/// dequantized keys and the dequantized prepared query (`1e-5` of `Σ|terms|`), and against the
/// `f32` query (the quantization bound `Σ_d |k_d| · s_q(d) / 2` plus the same slack).
fn check_prepared_oracle(
    rng: &mut Rng,
    format: KvFormat,
    head_dim: usize,
    group: usize,
    n_rows: usize,
) {
    let rb = format.row_bytes(head_dim).unwrap();
    let rows = stored_rows(rng, format, head_dim, n_rows, 0);
    let queries = rng.values(group * head_dim);
    let stride = quant::prepared_row_bytes(head_dim).unwrap();
    let prepared = prepare(format, head_dim, &queries, group);
    let mut scores = vec![f32::NAN; group * n_rows];
    kernels::dot_rows_prepared(format, &rows, head_dim, &prepared, group, &mut scores);
    let ng = quant::groups(head_dim);
    for h in 0..group {
        let pq = &prepared[h * stride..(h + 1) * stride];
        for r in 0..n_rows {
            let row = &rows[r * rb..(r + 1) * rb];
            let (mut exact, mut magnitude, mut orig, mut bound) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
            for d in 0..head_dim {
                let k = quant::element(format, row, head_dim, d) as f64;
                let q = quant::prepared_value(format, pq, head_dim, d);
                let sq = quant::read_f32(pq, ng * GROUP + 4 * (d / GROUP)) as f64;
                exact += k * q;
                magnitude += (k * q).abs();
                orig += k * queries[h * head_dim + d] as f64;
                bound += k.abs() * sq / 2.0;
            }
            let got = scores[h * n_rows + r] as f64;
            let tol = 1e-5 * magnitude + 1e-30;
            assert!(
                (got - exact).abs() <= tol,
                "{format} hd {head_dim} g {group} r {r}: {got} vs {exact} (tol {tol})"
            );
            assert!(
                (got - orig).abs() <= bound * (1.0 + 1e-9) + tol,
                "{format} hd {head_dim} g {group} r {r}: {got} vs f32 query {orig} (bound {bound})"
            );
        }
    }
}

#[test]
fn prepared_dot_matches_oracles() {
    let mut rng = Rng(0x0dd);
    for format in KvFormat::QUANTIZED {
        for head_dim in (1..=256).step_by(3).chain([32, 64, 128, 256]) {
            for (group, n_rows) in [(1, 5), (3, 16), (4, 7), (9, 3)] {
                check_prepared_oracle(&mut rng, format, head_dim, group, n_rows);
            }
        }
    }
}

/// `dot_rows_prepared` of `dot` against the scalar twin, bit for bit, for one shape; also
/// checks that slots past the rows are left alone.
#[allow(clippy::too_many_arguments)]
fn compare_prepared(
    rng: &mut Rng,
    format: KvFormat,
    head_dim: usize,
    group: usize,
    n_rows: usize,
    offset: usize,
    dot: PreparedFn,
) {
    let buf = stored_rows(rng, format, head_dim, n_rows, offset);
    let rows = &buf[offset..];
    let queries = rng.values(group * head_dim);
    let stride = quant::prepared_row_bytes(head_dim).unwrap();
    let mut pbuf = vec![0u8; offset + group * stride];
    quant_scalar::prepare_queries(format, head_dim, &queries, group, &mut pbuf[offset..]);
    let prepared = &pbuf[offset..];
    let per_head = n_rows + n_rows % 2;
    let mut want = vec![f32::from_bits(0x7fc0_1234); group * per_head];
    let mut got = want.clone();
    quant_scalar::dot_rows_prepared(format, rows, head_dim, prepared, group, &mut want);
    dot(format, rows, head_dim, prepared, group, &mut got);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            g.to_bits(),
            w.to_bits(),
            "{format} hd {head_dim} group {group} rows {n_rows} slot {i}: {g} vs {w}"
        );
        if i % per_head >= n_rows {
            assert_eq!(g.to_bits(), 0x7fc0_1234, "slot past the rows written");
        }
    }
}

type PreparedFn<'a> = &'a dyn Fn(KvFormat, &[u8], usize, &[u8], usize, &mut [f32]);

fn sweep_prepared(dot: PreparedFn) {
    let mut rng = Rng(0x5eed);
    for format in KvFormat::QUANTIZED {
        for head_dim in 1..=256 {
            for group in (1..=9).chain([32]) {
                // Every row count for the small groups, a spread for the others.
                let counts: &[usize] = if group <= 4 {
                    &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]
                } else {
                    &[0, 1, 2, 5, 16, 17]
                };
                for &n_rows in counts {
                    let offset = (head_dim + group + n_rows) % 4;
                    compare_prepared(&mut rng, format, head_dim, group, n_rows, offset, dot);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_prepared_dot_matches_scalar() {
    let Some(t) = Avx2::new() else {
        eprintln!("CPU lacks AVX2/FMA/F16C: AVX2 kernels not tested");
        return;
    };
    sweep_prepared(&|f, r, hd, p, g, s| quant_avx2::dot_rows_prepared(t, f, r, hd, p, g, s));
}

/// The `vpdpbusd` tiles, where the CPU has AVX-512 VNNI (the dispatched kernel then uses them
/// too, and `avx2_prepared_dot_matches_scalar` keeps the AVX2 tiles covered).
#[cfg(target_arch = "x86_64")]
#[test]
fn vnni_prepared_dot_matches_scalar() {
    let Some(t) = quant_avx2::Vnni::new() else {
        eprintln!("CPU lacks AVX-512 VNNI: VNNI kernels not tested");
        return;
    };
    sweep_prepared(&|f, r, hd, p, g, s| quant_avx2::dot_rows_prepared_vnni(t, f, r, hd, p, g, s));
}

#[test]
fn dispatched_prepared_dot_matches_scalar() {
    sweep_prepared(&kernels::dot_rows_prepared);
}

/// Arbitrary bytes as rows and prepared queries (NaN / inf parameters, `-128` keys included):
/// no panic, and the AVX2 and VNNI kernels equal scalar bit for bit (NaN for NaN);
/// inconsistent lengths process the same prefix.
/// (Release builds only: debug builds stop inconsistent lengths with `debug_assert!`.)
#[cfg(all(target_arch = "x86_64", not(debug_assertions)))]
#[test]
fn simd_prepared_on_arbitrary_bytes_and_lengths() {
    if let Some(t) = Avx2::new() {
        prepared_on_arbitrary_bytes(&|f, r, hd, p, g, s| {
            quant_avx2::dot_rows_prepared(t, f, r, hd, p, g, s)
        });
    }
    if let Some(t) = quant_avx2::Vnni::new() {
        prepared_on_arbitrary_bytes(&|f, r, hd, p, g, s| {
            quant_avx2::dot_rows_prepared_vnni(t, f, r, hd, p, g, s)
        });
    }
}

#[cfg(all(target_arch = "x86_64", not(debug_assertions)))]
fn prepared_on_arbitrary_bytes(dot: PreparedFn) {
    let mut rng = Rng(0xa4b);
    for format in KvFormat::QUANTIZED {
        for head_dim in [1, 5, 8, 13, 32, 45, 64, 100] {
            let rb = format.row_bytes(head_dim).unwrap();
            let stride = quant::prepared_row_bytes(head_dim).unwrap();
            for (n_rows, group, extra_rows, p_len, s_len) in [
                (4, 3, 0, 3 * stride, 12),
                (9, 3, 5, 3 * stride, 27),
                (5, 2, 0, stride + 7, 10),
                (7, 4, 3, 4 * stride, 4 * 7 + 3),
                (3, 2, 0, 0, 6),
            ] {
                let bytes: Vec<u8> = (0..rb * n_rows + extra_rows + 1)
                    .map(|_| rng.next() as u8)
                    .collect();
                let rows = &bytes[1..];
                let mut pbytes: Vec<u8> = (0..p_len + 1).map(|_| rng.next() as u8).collect();
                // Keep the query integers in range (-128 is never written) but the scales
                // arbitrary.
                for b in pbytes.iter_mut() {
                    if *b == 0x80 {
                        *b = 0x81;
                    }
                }
                let prepared = &pbytes[1..];
                let (mut want, mut got) = (vec![0.25f32; s_len], vec![0.25f32; s_len]);
                quant_scalar::dot_rows_prepared(format, rows, head_dim, prepared, group, &mut want);
                dot(format, rows, head_dim, prepared, group, &mut got);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                        "{format} hd {head_dim}: {g} vs {w}"
                    );
                }
            }
        }
    }
}

/// The integer sums at their extremes: every stored integer at its largest magnitude (int4
/// nibbles 15; int8 `127`, `-127` and a stray `-128`) against prepared queries all `127` or
/// `-127` (`prepare_queries` never writes `-128`), scales 1. Each score must be the exact
/// product sum (at most `64·15·127` or `64·128·127`, exact in `f32`), on every kernel path
/// and row count (8-row tiles and the rest), so no 16-bit partial sum may saturate or wrap.
#[test]
fn prepared_dot_is_exact_at_the_integer_extremes() {
    let head_dim = 64;
    let ng = quant::groups(head_dim);
    let stride = quant::prepared_row_bytes(head_dim).unwrap();
    let one_bf16 = 0x3f80u16.to_le_bytes();
    for format in KvFormat::QUANTIZED {
        let rb = format.row_bytes(head_dim).unwrap();
        let keys: &[i32] = if format == KvFormat::Int4 {
            &[15]
        } else {
            &[127, -127, -128]
        };
        for &k in keys {
            for q in [127i32, -127] {
                let n_rows = 19;
                let mut rows = vec![0u8; n_rows * rb];
                for row in rows.chunks_exact_mut(rb) {
                    let (ints, params) =
                        row.split_at_mut(quant::params_offset(format, head_dim, 0));
                    ints.fill(if format == KvFormat::Int4 {
                        0xff
                    } else {
                        k as i8 as u8
                    });
                    // Scale 1 (and, for int4, minimum 0) in every group.
                    for p in params.chunks_exact_mut(if format == KvFormat::Int4 { 4 } else { 2 }) {
                        p[..2].copy_from_slice(&one_bf16);
                    }
                }
                let group = 3;
                let mut prepared = vec![0u8; group * stride];
                for head in prepared.chunks_exact_mut(stride) {
                    head[..ng * GROUP].fill(q as i8 as u8);
                    for g in 0..ng {
                        let at = ng * GROUP + 4 * g;
                        head[at..at + 4].copy_from_slice(&1.0f32.to_le_bytes());
                        let at = ng * GROUP + 4 * ng + 4 * g;
                        let sum = (GROUP as i32 * q) as f32;
                        head[at..at + 4].copy_from_slice(&sum.to_le_bytes());
                    }
                }
                let want = (head_dim as i32 * k * q) as f32;
                let mut scalar = vec![0.0f32; group * n_rows];
                quant_scalar::dot_rows_prepared(
                    format,
                    &rows,
                    head_dim,
                    &prepared,
                    group,
                    &mut scalar,
                );
                let mut dispatched = vec![0.0f32; group * n_rows];
                kernels::dot_rows_prepared(
                    format,
                    &rows,
                    head_dim,
                    &prepared,
                    group,
                    &mut dispatched,
                );
                for (i, (&s, &d)) in scalar.iter().zip(&dispatched).enumerate() {
                    assert_eq!(s, want, "{format} k {k} q {q} slot {i}: scalar");
                    assert_eq!(d, want, "{format} k {k} q {q} slot {i}: dispatched");
                }
                // The dispatched kernel is the VNNI one where the CPU has it: the AVX2 tiles
                // (16-bit partial sums) explicitly too.
                #[cfg(target_arch = "x86_64")]
                if let Some(t) = Avx2::new() {
                    let mut avx2 = vec![0.0f32; group * n_rows];
                    quant_avx2::dot_rows_prepared(
                        t, format, &rows, head_dim, &prepared, group, &mut avx2,
                    );
                    assert!(
                        avx2.iter().all(|&a| a == want),
                        "{format} k {k} q {q}: avx2"
                    );
                }
            }
        }
    }
}

/// int4 key offsets belong to the sequence: a sequence's stored rows are bitwise the same
/// whether or not another sequence wrote first, a fork inherits its parent's offsets (they
/// share rows), and a slot reused after `remove` starts without any.
#[test]
fn key_offsets_are_per_sequence() {
    let spec = quant_spec(KvFormat::Int4, KvFormat::Int4, 64);
    let elems = 4 * 2 * 64;
    let mut rng = Rng(91);
    let (a_keys, b_keys, values) = (rng.values(elems), rng.values(elems), rng.values(elems));
    let b_shifted: Vec<f32> = b_keys.iter().map(|x| x + 3.0).collect();
    let rows = |cache: &KvCache, seq| {
        let mut all = Vec::new();
        for p in 0..4 {
            for h in 0..2 {
                let mut row = vec![0.0f32; 64];
                cache.read_row(seq, 0, Kind::K, h, p, &mut row).unwrap();
                all.extend(row.iter().map(|x| x.to_bits()));
            }
        }
        all
    };
    let layout = Layout::new(spec).unwrap();
    // B alone.
    let mut arena = vec![0u8; layout.arena_bytes(8).unwrap()];
    let mut cache = KvCache::new(spec, &mut arena).unwrap();
    let b = cache.add_sequence().unwrap();
    cache.reserve(b, 4).unwrap();
    cache.write_run(b, 0, 0, &b_shifted, &values).unwrap();
    let alone = rows(&cache, b);
    // A first, then B, in one cache.
    let mut arena = vec![0u8; layout.arena_bytes(8).unwrap()];
    let mut cache = KvCache::new(spec, &mut arena).unwrap();
    let a = cache.add_sequence().unwrap();
    let b = cache.add_sequence().unwrap();
    cache.reserve(a, 4).unwrap();
    cache.reserve(b, 4).unwrap();
    cache.write_run(a, 0, 0, &a_keys, &values).unwrap();
    cache.write_run(b, 0, 0, &b_shifted, &values).unwrap();
    assert_eq!(rows(&cache, b), alone);
    let (mut oa, mut ob) = (vec![0.0f32; 64], vec![0.0f32; 64]);
    assert!(cache.key_offsets(a, 0, 1, &mut oa).unwrap());
    assert!(cache.key_offsets(b, 0, 1, &mut ob).unwrap());
    assert_ne!(oa, ob);
    // A fork inherits the offsets and reads the same rows.
    let child = cache.fork(b).unwrap();
    let mut oc = vec![0.0f32; 64];
    assert!(cache.key_offsets(child, 0, 1, &mut oc).unwrap());
    assert_eq!(oc, ob);
    assert_eq!(rows(&cache, child), alone);
    // A reused slot starts with none.
    cache.remove(child).unwrap();
    cache.remove(a).unwrap();
    let fresh = cache.add_sequence().unwrap();
    assert!(!cache.key_offsets(fresh, 0, 1, &mut oc).unwrap());
    assert!(oc.iter().all(|&x| x == 0.0));
    assert_eq!(
        cache.key_offsets(a, 0, 1, &mut oc),
        Err(Error::UnknownSequence)
    );
}

/// int4 values: the first token's values read back exact (the others quantized), and a fork
/// inherits them.
#[test]
fn first_int4_value_is_held_exact() {
    let spec = quant_spec(KvFormat::F16, KvFormat::Int4, 40);
    let mut arena = vec![0u8; Layout::new(spec).unwrap().arena_bytes(8).unwrap()];
    let mut cache = KvCache::new(spec, &mut arena).unwrap();
    let seq = cache.add_sequence().unwrap();
    cache.reserve(seq, 3).unwrap();
    let mut rng = Rng(23);
    let elems = 3 * 2 * 40;
    let (keys, values) = (rng.values(elems), rng.values(elems));
    cache.write_run(seq, 1, 0, &keys, &values).unwrap();
    let child = cache.fork(seq).unwrap();
    for id in [seq, child] {
        for h in 0..2 {
            let mut row = vec![0.0f32; 40];
            cache.read_row(id, 1, Kind::V, h, 0, &mut row).unwrap();
            assert_eq!(row, values[h * 40..(h + 1) * 40]);
            cache.read_row(id, 1, Kind::V, h, 1, &mut row).unwrap();
            let want = decode(
                KvFormat::Int4,
                &encode(KvFormat::Int4, &values[(2 + h) * 40..(3 + h) * 40]),
                40,
            );
            assert_eq!(row, want);
        }
    }
}

// ------------------------------------------------------------------------------------------
// Weighted sums with integer weights (int4 values in attention).

/// The weight sets the integer-weight tests use: softmax-like (non-negative, one dominant),
/// signed, zeros, and magnitudes spread over many orders.
fn weight_cases(rng: &mut Rng, n: usize) -> Vec<Vec<f32>> {
    let soft: Vec<f32> = (0..n)
        .map(|i| {
            let x = rng.unit();
            if i % 7 == 3 {
                1.0
            } else {
                (x * 4.0 - 4.0).exp()
            }
        })
        .collect();
    let signed = rng.values(n);
    let sparse: Vec<f32> = (0..n)
        .map(|i| if i % 5 == 0 { rng.unit().abs() } else { 0.0 })
        .collect();
    let spread: Vec<f32> = (0..n)
        .map(|i| rng.unit() * f32::powi(2.0, (i % 40) as i32 - 20))
        .collect();
    vec![soft, signed, sparse, spread, vec![0.0; n]]
}

/// `accumulate_rows_int` against the f64 weighted sum of the dequantized rows: within the
/// bound its weight rounding allows (half a step of each run of 16 rows, times the nibble's
/// distance from the middle, `|n - 7.5|`), plus `f32` rounding.
fn check_int_weights_oracle(
    rows: &[u8],
    head_dim: usize,
    weights: &[f32],
    group: usize,
    start: &[f32],
    got: &[f32],
) {
    let rb = KvFormat::Int4.row_bytes(head_dim).unwrap();
    let per_head = weights.len() / group;
    let n_rows = per_head.min(rows.len() / rb);
    let row = |r: usize| &rows[r * rb..(r + 1) * rb];
    let integer = quant_scalar::integer_weights(KvFormat::Int4, head_dim, weights);
    for h in 0..group {
        for d in 0..head_dim {
            let g = d / GROUP;
            let (mut want, mut bound, mut mag) = (start[h * head_dim + d] as f64, 0.0f64, 0.0f64);
            mag += want.abs();
            for first in (0..n_rows).step_by(quant_scalar::WEIGHT_ROWS) {
                let last = (first + quant_scalar::WEIGHT_ROWS).min(n_rows);
                let amax = (first..last)
                    .map(|r| {
                        let (s, _) = quant::group_params(KvFormat::Int4, row(r), head_dim, g);
                        (weights[h * per_head + r] as f64 * s as f64).abs()
                    })
                    .fold(0.0f64, f64::max);
                // The exact path (weights not all finite and >= 0) has no rounding to allow.
                let step = if integer { amax / 255.0 } else { 0.0 };
                for r in first..last {
                    let w = weights[h * per_head + r] as f64;
                    let x = quant::element(KvFormat::Int4, row(r), head_dim, d) as f64;
                    let (s, m) = quant::group_params(KvFormat::Int4, row(r), head_dim, g);
                    let n = quant::stored_q(KvFormat::Int4, row(r), d) as f64;
                    want += w * x;
                    bound += step / 2.0 * (n - 7.5).abs() * (1.0 + 1e-5);
                    mag += (w * m as f64).abs() + (w * s as f64 * 7.5).abs() + 15.0 * step;
                }
            }
            let err = (got[h * head_dim + d] as f64 - want).abs();
            assert!(
                err <= bound + 1e-6 * mag + 1e-35,
                "hd {head_dim} group {group} rows {n_rows} h {h} d {d}: {} vs {want} (bound {bound})",
                got[h * head_dim + d]
            );
        }
    }
}

#[test]
fn integer_weight_sums_match_oracle_and_avx2_matches_scalar() {
    let mut rng = Rng(0x1e7);
    #[cfg(target_arch = "x86_64")]
    let avx2 = Avx2::new();
    let (mut cases, mut integer_paths) = (0, 0);
    for head_dim in [32, 64, 96, 128, 256] {
        for group in [1, 2, 3, 4, 5, 7] {
            for n_rows in [0, 1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 40] {
                let offset = (head_dim + group + n_rows) % 4;
                let buf = stored_rows(&mut rng, KvFormat::Int4, head_dim, n_rows, offset);
                let rows = &buf[offset..];
                for weights in weight_cases(&mut rng, group * n_rows.max(1)) {
                    let start = rng.values(group * head_dim);
                    let mut want = start.clone();
                    quant_scalar::accumulate_rows_int(
                        KvFormat::Int4,
                        rows,
                        head_dim,
                        &weights,
                        group,
                        &mut want,
                    );
                    check_int_weights_oracle(rows, head_dim, &weights, group, &start, &want);
                    // The integer path gives the scalar bits; the exact one (negative
                    // weights) agrees to `f32` rounding, as `accumulate_rows` does.
                    let integer = quant_scalar::integer_weights(KvFormat::Int4, head_dim, &weights);
                    integer_paths += integer as usize;
                    let same = |got: &[f32], what: &str| {
                        if integer {
                            assert_eq!(bits(got), bits(&want), "{what} hd {head_dim} g {group}");
                        } else {
                            check_int_weights_oracle(rows, head_dim, &weights, group, &start, got);
                        }
                    };
                    let mut got = start.clone();
                    kernels::accumulate_rows_int(
                        KvFormat::Int4,
                        rows,
                        head_dim,
                        &weights,
                        group,
                        &mut got,
                    );
                    same(&got, "dispatch");
                    #[cfg(target_arch = "x86_64")]
                    if let Some(t) = avx2 {
                        let mut got = start.clone();
                        quant_avx2::accumulate_rows_int(
                            t,
                            KvFormat::Int4,
                            rows,
                            head_dim,
                            &weights,
                            group,
                            &mut got,
                        );
                        same(&got, "avx2");
                    }
                    cases += 1;
                }
            }
        }
    }
    assert!(cases > 1000 && integer_paths > cases / 2);
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Formats and head dims without the integer path are exactly `accumulate_rows`.
#[test]
fn integer_weight_sums_elsewhere_are_exact_sums() {
    let mut rng = Rng(0xa4b);
    for format in KvFormat::QUANTIZED {
        for head_dim in [1, 8, 31, 33, 64, 100] {
            if quant_scalar::integer_rows(format, head_dim) {
                continue;
            }
            let n_rows = 9;
            let buf = stored_rows(&mut rng, format, head_dim, n_rows, 0);
            let weights = rng.values(3 * n_rows);
            let start = rng.values(3 * head_dim);
            let (mut want, mut got) = (start.clone(), start.clone());
            quant_scalar::accumulate_rows(format, &buf, head_dim, &weights, 3, &mut want);
            quant_scalar::accumulate_rows_int(format, &buf, head_dim, &weights, 3, &mut got);
            assert_eq!(bits(&got), bits(&want), "{format} hd {head_dim}");
            let (mut want, mut got) = (start.clone(), start.clone());
            kernels::accumulate_rows(format, &buf, head_dim, &weights, 3, &mut want);
            kernels::accumulate_rows_int(format, &buf, head_dim, &weights, 3, &mut got);
            assert_eq!(bits(&got), bits(&want), "{format} hd {head_dim}");
        }
    }
}

/// Arbitrary bytes as int4 rows (NaN / inf parameters included) and arbitrary weights: no
/// panic, and AVX2 gives the scalar bits (NaN for NaN).
#[cfg(target_arch = "x86_64")]
#[test]
fn integer_weight_sums_on_arbitrary_bytes() {
    let Some(t) = Avx2::new() else { return };
    let mut rng = Rng(0xa4c);
    for head_dim in [32, 64] {
        let rb = KvFormat::Int4.row_bytes(head_dim).unwrap();
        for n_rows in [1, 5, 16, 20] {
            for _ in 0..20 {
                let bytes: Vec<u8> = (0..rb * n_rows).map(|_| rng.next() as u8).collect();
                let mut cases = weight_cases(&mut rng, 3 * n_rows);
                cases.push(
                    (0..3 * n_rows)
                        .map(|_| f32::from_bits(rng.next() as u32))
                        .collect(),
                );
                for weights in cases {
                    let start = rng.values(3 * head_dim);
                    let (mut want, mut got) = (start.clone(), start.clone());
                    let int4 = KvFormat::Int4;
                    quant_scalar::accumulate_rows_int(
                        int4, &bytes, head_dim, &weights, 3, &mut want,
                    );
                    quant_avx2::accumulate_rows_int(
                        t, int4, &bytes, head_dim, &weights, 3, &mut got,
                    );
                    if !quant_scalar::integer_weights(int4, head_dim, &weights) {
                        continue; // the exact sums, tested elsewhere
                    }
                    for (g, w) in got.iter().zip(&want) {
                        assert!(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()));
                    }
                }
            }
        }
    }
}
