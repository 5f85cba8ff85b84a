//! The kernels against their references: every AVX2 kernel (called through its token, so the
//! SIMD path runs whatever the dispatcher picked) against its scalar twin, the dispatched entry
//! points against the scalar ones, and the scalar kernels against naive `f64` arithmetic.

use kvcache::half::{bf16_to_f32, f16_to_f32};
use kvcache::kernels::{self, scalar};
use kvcache::KvFormat;

#[cfg(target_arch = "x86_64")]
use kvcache::kernels::avx2::Avx2;

/// Tolerance for sums whose order differs, relative to the sum of the magnitudes of the terms.
const REL: f64 = 1e-5;

/// splitmix64: tiny, seeded, good enough to make test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1)` times a power of two in `2^-3..=2^3`, so magnitudes vary.
    fn value(&mut self) -> f32 {
        let bits = self.next();
        let unit = (bits >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
        unit * f32::powi(2.0, ((bits & 7) as i32) - 3)
    }

    fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.value()).collect()
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn row_bytes(format: KvFormat, head_dim: usize) -> usize {
    format.row_bytes(head_dim).unwrap()
}

/// Element `d` of a stored row, exactly, as `f64`.
fn element(format: KvFormat, row: &[u8], d: usize) -> f64 {
    match format {
        KvFormat::F32 => f32::from_le_bytes(row[d * 4..d * 4 + 4].try_into().unwrap()) as f64,
        KvFormat::F16 => f16_to_f32(u16::from_le_bytes([row[d * 2], row[d * 2 + 1]])) as f64,
        KvFormat::Bf16 => bf16_to_f32(u16::from_le_bytes([row[d * 2], row[d * 2 + 1]])) as f64,
        _ => unreachable!("float formats only here; int8/int4 are tested in kv_quant.rs"),
    }
}

/// `n_rows` random rows stored in `format`, starting `offset` bytes into the returned buffer.
fn stored_rows(
    rng: &mut Rng,
    format: KvFormat,
    head_dim: usize,
    n_rows: usize,
    offset: usize,
) -> Vec<u8> {
    let rb = row_bytes(format, head_dim);
    let mut buf = vec![0u8; offset + n_rows * rb];
    for r in 0..n_rows {
        let values = rng.values(head_dim);
        let start = offset + r * rb;
        scalar::encode_row(format, &values, &mut buf[start..start + rb]);
    }
    buf
}

fn close(got: f32, want: f64, scale: f64) -> bool {
    (got as f64 - want).abs() <= REL * scale + 1e-30
}

fn same_float(a: f32, b: f32) -> bool {
    (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits()
}

/// The AVX2 token, or `None` (with a note) on a CPU without the features.
#[cfg(target_arch = "x86_64")]
fn avx2() -> Option<Avx2> {
    let token = Avx2::new();
    if token.is_none() {
        eprintln!("CPU lacks AVX2/FMA/F16C: AVX2 kernels not tested");
    }
    token
}

type DotFn<'a> = &'a dyn Fn(KvFormat, &[u8], usize, &[f32], usize, &mut [f32]);
type AccFn<'a> = &'a dyn Fn(KvFormat, &[u8], usize, &[f32], usize, &mut [f32]);

const HEAD_DIMS: [usize; 16] = [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 64, 65, 100, 128, 256];
const GROUPS: [usize; 10] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 32];

/// `dot` against the scalar kernel over formats, head dims, groups, row counts and
/// misaligned starts; also checks that score slots past the rows present stay untouched.
fn check_dot(name: &str, dot: DotFn) {
    let mut rng = Rng(0x05ee_dd07);
    let mut cases = 0;
    for format in KvFormat::FLOATS {
        for head_dim in HEAD_DIMS {
            for group in GROUPS {
                for n_rows in 0..=17usize {
                    let offset = (head_dim + group + n_rows) % 4;
                    let buf = stored_rows(&mut rng, format, head_dim, n_rows, offset);
                    let rows = &buf[offset..];
                    let queries = rng.values(group * head_dim);
                    // One spare slot per head when there is room: the kernels must derive
                    // n_rows from the rows slice and leave it alone.
                    let per_head = n_rows + (n_rows % 2);
                    let mut want = vec![f32::from_bits(0x7fc0_1234); group * per_head];
                    let mut got = want.clone();
                    scalar::dot_rows(format, rows, head_dim, &queries, group, &mut want);
                    dot(format, rows, head_dim, &queries, group, &mut got);
                    let rb = row_bytes(format, head_dim);
                    for h in 0..group {
                        for r in 0..per_head {
                            let i = h * per_head + r;
                            if r >= n_rows {
                                assert_eq!(got[i].to_bits(), 0x7fc0_1234, "{name}: slot written");
                                continue;
                            }
                            let row = &rows[r * rb..(r + 1) * rb];
                            let scale: f64 = (0..head_dim)
                                .map(|d| {
                                    (queries[h * head_dim + d] as f64 * element(format, row, d))
                                        .abs()
                                })
                                .sum();
                            assert!(
                                close(got[i], want[i] as f64, scale),
                                "{name} {format} hd {head_dim} g {group} n {n_rows} h {h} r {r}: {} vs {}",
                                got[i],
                                want[i]
                            );
                            cases += 1;
                        }
                    }
                }
            }
        }
    }
    assert!(cases > 10_000);
}

/// Same sweep for the weighted sum; `out` starts random so the `+=` is checked too.
fn check_accumulate(name: &str, acc: AccFn) {
    let mut rng = Rng(0x0acc_0001);
    for format in KvFormat::FLOATS {
        for head_dim in HEAD_DIMS {
            for group in GROUPS {
                for n_rows in 0..=17usize {
                    let offset = (head_dim * 3 + group + n_rows) % 4;
                    let buf = stored_rows(&mut rng, format, head_dim, n_rows, offset);
                    let rows = &buf[offset..];
                    let per_head = n_rows + (n_rows % 2);
                    let weights = rng.values(group * per_head);
                    let start = rng.values(group * head_dim);
                    let mut want = start.clone();
                    let mut got = start.clone();
                    scalar::accumulate_rows(format, rows, head_dim, &weights, group, &mut want);
                    acc(format, rows, head_dim, &weights, group, &mut got);
                    let rb = row_bytes(format, head_dim);
                    for h in 0..group {
                        for d in 0..head_dim {
                            let i = h * head_dim + d;
                            let scale: f64 = start[i].abs() as f64
                                + (0..n_rows)
                                    .map(|r| {
                                        let row = &rows[r * rb..(r + 1) * rb];
                                        (weights[h * per_head + r] as f64 * element(format, row, d))
                                            .abs()
                                    })
                                    .sum::<f64>();
                            assert!(
                                close(got[i], want[i] as f64, scale),
                                "{name} {format} hd {head_dim} g {group} n {n_rows} h {h} d {d}: {} vs {}",
                                got[i],
                                want[i]
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Every head dim in `0..=300` for one group and row count (the sweep above covers the rest).
fn check_all_head_dims(name: &str, dot: DotFn, acc: AccFn) {
    let mut rng = Rng(0x0ddd_01e5);
    for format in KvFormat::FLOATS {
        for head_dim in 0..=300usize {
            let group = 1 + head_dim % 5;
            let n_rows = 1 + head_dim % 17;
            let offset = head_dim % 3 + 1;
            let buf = stored_rows(&mut rng, format, head_dim, n_rows, offset);
            let rows = &buf[offset..];
            let queries = rng.values(group * head_dim);
            let mut want = vec![0.0f32; group * n_rows];
            let mut got = vec![0.0f32; group * n_rows];
            scalar::dot_rows(format, rows, head_dim, &queries, group, &mut want);
            dot(format, rows, head_dim, &queries, group, &mut got);
            for (g, w) in got.iter().zip(&want) {
                let scale = want.iter().map(|v| v.abs() as f64).sum::<f64>() + head_dim as f64;
                assert!(close(*g, *w as f64, scale), "{name} {format} hd {head_dim}");
            }
            let weights = rng.values(group * n_rows);
            let mut want = vec![0.5f32; group * head_dim];
            let mut got = want.clone();
            scalar::accumulate_rows(format, rows, head_dim, &weights, group, &mut want);
            acc(format, rows, head_dim, &weights, group, &mut got);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    close(*g, *w as f64, 64.0 + n_rows as f64 * 64.0),
                    "{name} {format} hd {head_dim}"
                );
            }
        }
    }
}

/// Floats with every kind of special value mixed in.
fn mixed_floats(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| match rng.next() % 16 {
            0 => f32::NAN,
            1 => f32::INFINITY,
            2 => f32::NEG_INFINITY,
            3 => f32::from_bits(rng.next() as u32), // any bit pattern
            4 => 65504.0 + i as f32 * 8.0,          // around the f16 overflow
            5 => 1e-6 * rng.value(),                // f16 subnormals
            6 => -0.0,
            _ => rng.value() * 100.0,
        })
        .collect()
}

type EncFn<'a> = &'a dyn Fn(KvFormat, &[f32], &mut [u8]);
type DecFn<'a> = &'a dyn Fn(KvFormat, &[u8], &mut [f32]);

fn check_rows(name: &str, encode: EncFn, decode: DecFn) {
    let mut rng = Rng(0xc0de);
    for format in KvFormat::FLOATS {
        for n in 0..=300usize {
            let offset = n % 4;
            let src = mixed_floats(&mut rng, n);
            let rb = row_bytes(format, n);
            let mut want = vec![0xa5u8; rb + offset + 3];
            let mut got = want.clone();
            scalar::encode_row(format, &src, &mut want[offset..offset + rb]);
            encode(format, &src, &mut got[offset..offset + rb]);
            let mut back_want = vec![0.0f32; n];
            let mut back_got = vec![0.0f32; n];
            scalar::decode_row(format, &want[offset..offset + rb], &mut back_want);
            scalar::decode_row(format, &got[offset..offset + rb], &mut back_got);
            for i in 0..n {
                // NaN payloads may differ (the hardware keeps more of them); everything else
                // must be bit-exact.
                assert!(
                    same_float(back_got[i], back_want[i]),
                    "{name} encode {format} n {n} i {i}: {} from {}",
                    back_got[i],
                    src[i]
                );
                if !back_want[i].is_nan() {
                    let size = rb / n;
                    let at = offset + i * size;
                    assert_eq!(
                        got[at..at + size],
                        want[at..at + size],
                        "{name} encode {format} n {n} i {i}"
                    );
                }
            }
            assert_eq!(got[..offset], want[..offset], "{name}: wrote before dst");
            assert_eq!(
                got[offset + rb..],
                want[offset + rb..],
                "{name}: wrote past dst"
            );

            // Decode every bit pattern the random bytes give, misaligned.
            let bytes = rng.bytes(rb + offset);
            let mut want = vec![7.0f32; n + 1];
            let mut got = want.clone();
            scalar::decode_row(format, &bytes[offset..], &mut want[..n]);
            decode(format, &bytes[offset..], &mut got[..n]);
            for i in 0..=n {
                assert!(
                    same_float(got[i], want[i]),
                    "{name} decode {format} n {n} i {i}"
                );
            }
        }
    }
}

/// Inputs that must be handled: -inf, huge negative, the ends of the f32 range, and a dense
/// sweep in between.
fn exp_inputs() -> Vec<f32> {
    let mut xs = vec![
        f32::NEG_INFINITY,
        -1e30,
        -150.0,
        -104.0,
        -103.5,
        -103.0,
        -100.0,
        -88.0,
        -87.3,
        -10.0,
        -1e-8,
        -0.0,
        0.0,
        1e-8,
        0.5,
        0.346_573_6,
        1.0,
        10.0,
        88.0,
        88.7,
        88.72,
    ];
    let mut x = -105.0f32;
    while x < 88.7 {
        xs.push(x);
        x += 0.013_7;
    }
    xs
}

/// Error bound for one exp result: 3e-7 relative, plus one subnormal step (below 2^-126 the
/// format itself has less relative precision).
fn exp_ok(got: f32, x: f32) -> bool {
    let want = (x as f64).exp();
    if x.is_nan() {
        return got.is_nan();
    }
    if want > f32::MAX as f64 {
        return got == f32::INFINITY;
    }
    (got as f64 - want).abs() <= 3e-7 * want + f32::from_bits(1) as f64
}

type ExpFn<'a> = &'a dyn Fn(&mut [f32], f32) -> f32;

fn check_exp(name: &str, exp_sum: ExpFn) {
    let xs = exp_inputs();
    // Report the worst relative error over normal results (run with --nocapture to see it).
    let mut worst = 0.0f64;
    for x in &xs {
        let mut v = [*x];
        exp_sum(&mut v, 0.0);
        let want = (*x as f64).exp();
        if want >= f32::MIN_POSITIVE as f64 && want <= f32::MAX as f64 {
            worst = worst.max((v[0] as f64 - want).abs() / want);
        }
    }
    eprintln!("{name}: worst exp relative error {worst:.3e}");
    assert!(
        worst <= 3e-7,
        "{name}: worst exp relative error {worst:.3e}"
    );
    for shift in [0.0f32, 3.25, -2.0] {
        let mut values: Vec<f32> = xs.iter().map(|x| x + shift).collect();
        let sum = exp_sum(&mut values, shift);
        let mut want_sum = 0.0f64;
        for (got, x) in values.iter().zip(&xs) {
            // The shift is added and subtracted in f32, so compare against the x the kernel saw.
            let seen = (x + shift) - shift;
            assert!(
                exp_ok(*got, seen),
                "{name}: exp({seen}) = {got}, want {}",
                (seen as f64).exp()
            );
            want_sum += (seen as f64).exp();
        }
        assert!(
            ((sum as f64) - want_sum).abs() <= REL * want_sum
                || (sum.is_infinite() && want_sum > f32::MAX as f64),
            "{name}: sum {sum} vs {want_sum}"
        );
    }
    // Every length (tails and masks), masked entries at -inf, a NaN-free sum.
    let mut rng = Rng(0xe4f);
    for n in 0..=300usize {
        let mut values: Vec<f32> = (0..n)
            .map(|i| {
                if i % 7 == 3 {
                    f32::NEG_INFINITY
                } else {
                    rng.value() * 20.0
                }
            })
            .collect();
        let shift = kernels::scalar::max(&values);
        let original = values.clone();
        let sum = exp_sum(&mut values, shift);
        let mut want = 0.0f64;
        for (v, x) in values.iter().zip(&original) {
            let seen = x - shift;
            assert!(exp_ok(*v, seen), "{name}: n {n} exp({seen}) = {v}");
            want += (seen as f64).exp();
        }
        assert!(
            ((sum as f64) - want).abs() <= REL * want + 1e-30,
            "{name}: n {n} sum {sum} vs {want}"
        );
    }
}

type MaxFn<'a> = &'a dyn Fn(&[f32]) -> f32;

fn check_max(name: &str, max: MaxFn) {
    let mut rng = Rng(0x3a7);
    for n in 0..=300usize {
        for offset in 0..3 {
            let mut values = rng.values(n + offset);
            for v in values.iter_mut() {
                if rng.next().is_multiple_of(9) {
                    *v = f32::NAN;
                }
            }
            let values = &values[offset.min(values.len())..];
            let want = values
                .iter()
                .filter(|v| !v.is_nan())
                .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            assert_eq!(max(values), want, "{name} n {n}");
            assert_eq!(scalar::max(values), want, "scalar n {n}");
        }
    }
}

type MaxRowsFn<'a> = &'a dyn Fn(&[f32], usize, &mut [f32]);
type ExpRowsFn<'a> = &'a dyn Fn(&mut [f32], usize, &[f32], &mut [f32]);

/// The row-batched softmax kernels are bitwise one call per row of their single-row kernels
/// (attention relies on it: batching must not change a result), for every row length up to
/// 70 (full chunks, 16-pairs, masked tails), rows of -inf, NaN entries and rows with nothing
/// visible, and they write no row or sum past the shortest input.
fn check_rows_batched(
    name: &str,
    max_rows: MaxRowsFn,
    exp_rows: ExpRowsFn,
    max: MaxFn,
    exp_sum: ExpFn,
) {
    let mut rng = Rng(0x50f7);
    for n in 0..=70usize {
        for rows in [0usize, 1, 3, 5] {
            let mut values: Vec<f32> = (0..rows * n)
                .map(|i| match rng.next() % 11 {
                    0 => f32::NEG_INFINITY,
                    1 if i % 5 == 0 => f32::NAN,
                    _ => rng.value() * 30.0,
                })
                .collect();
            if rows >= 3 {
                // One row with nothing visible.
                values[2 * n..3 * n].fill(f32::NEG_INFINITY);
            }
            let mut maxima = vec![7.0f32; rows + 1];
            max_rows(&values, n, &mut maxima[..rows]);
            if n == 0 {
                let mut sums = vec![7.0f32; rows];
                exp_rows(&mut values, n, &vec![0.0; rows], &mut sums);
                assert!(
                    maxima.iter().chain(&sums).all(|&v| v == 7.0),
                    "{name}: n 0 wrote"
                );
                continue;
            }
            let shifts: Vec<f32> = (0..rows)
                .map(|r| {
                    let m = max(&values[r * n..(r + 1) * n]);
                    assert_eq!(
                        maxima[r].to_bits(),
                        m.to_bits(),
                        "{name}: max n {n} row {r}"
                    );
                    if m == f32::NEG_INFINITY {
                        0.0
                    } else {
                        m + rng.value()
                    }
                })
                .collect();
            assert_eq!(maxima[rows], 7.0, "{name}: max_rows wrote past its rows");
            let mut batched = values.clone();
            let mut sums = vec![7.0f32; rows + 1];
            exp_rows(&mut batched, n, &shifts, &mut sums[..rows]);
            assert_eq!(
                sums[rows], 7.0,
                "{name}: exp_shifted_rows wrote past its rows"
            );
            let mut single = values.clone();
            for r in 0..rows {
                let sum = exp_sum(&mut single[r * n..(r + 1) * n], shifts[r]);
                assert_eq!(
                    sum.to_bits(),
                    sums[r].to_bits(),
                    "{name}: sum n {n} row {r}"
                );
            }
            for (i, (a, b)) in batched.iter().zip(&single).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{name}: n {n} element {i}");
            }
        }
    }
    // Fewer shifts than rows: only the rows with a shift are touched.
    let mut values = vec![1.0f32; 4 * 8];
    let mut sums = [0.0f32; 4];
    exp_rows(&mut values, 8, &[1.0, 1.0], &mut sums);
    assert!(
        values[..16].iter().all(|&v| v == 1.0),
        "{name}: exp(0) is 1"
    );
    assert_eq!(sums, [8.0, 8.0, 0.0, 0.0], "{name}: sums");
    // Rows past the shifts keep their inputs (2.0 would become exp(2 - shift)).
    let mut values = vec![2.0f32; 4 * 8];
    exp_rows(&mut values, 8, &[2.0, 2.0], &mut sums);
    assert!(
        values[16..].iter().all(|&v| v == 2.0),
        "{name}: touched a row without a shift"
    );
}

#[test]
fn scalar_rows_batched_match_single_rows() {
    check_rows_batched(
        "scalar",
        &scalar::max_rows,
        &scalar::exp_shifted_rows,
        &scalar::max,
        &scalar::exp_shifted_sum,
    );
}

#[test]
fn dispatched_rows_batched_match_single_rows() {
    check_rows_batched(
        "dispatch",
        &kernels::max_rows,
        &kernels::exp_shifted_rows,
        &kernels::max,
        &kernels::exp_shifted_sum,
    );
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_rows_batched_match_single_rows() {
    if let Some(t) = avx2() {
        check_rows_batched(
            "avx2",
            &|v, n, o| t.max_rows(v, n, o),
            &|v, n, s, o| t.exp_shifted_rows(v, n, s, o),
            &|v| t.max(v),
            &|v, s| t.exp_shifted_sum(v, s),
        );
    }
}

/// XOR of the little-endian 8-byte words, one byte at a time.
fn naive_stream(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .enumerate()
        .fold(0u64, |acc, (i, b)| acc ^ ((*b as u64) << (8 * (i % 8))))
}

fn check_stream(name: &str, read: &dyn Fn(&[u8]) -> u64) {
    let mut rng = Rng(0x57e4);
    let buf = rng.bytes(5000);
    for n in (0..=300usize).chain([1000, 4096, 4999]) {
        for offset in 0..=(1.min(5000 - n)) {
            let bytes = &buf[offset..offset + n];
            let want = naive_stream(bytes);
            assert_eq!(scalar::stream_read(bytes), want, "scalar n {n}");
            assert_eq!(read(bytes), want, "{name} n {n}");
        }
    }
}

// ------------------------------------------------------------------------------------------
// The AVX2 kernels, called through their token.

#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_token_matches_cpu() {
    let has = std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c");
    assert_eq!(Avx2::new().is_some(), has);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn vnni_token_matches_cpu() {
    let has = Avx2::new().is_some()
        && std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512vl")
        && std::is_x86_feature_detected!("avx512vnni");
    assert_eq!(kvcache::kernels::quant_avx2::Vnni::new().is_some(), has);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_dot_rows_matches_scalar() {
    if let Some(t) = avx2() {
        check_dot("avx2", &|f, r, hd, q, g, s| t.dot_rows(f, r, hd, q, g, s));
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_accumulate_rows_matches_scalar() {
    if let Some(t) = avx2() {
        check_accumulate("avx2", &|f, r, hd, w, g, o| {
            t.accumulate_rows(f, r, hd, w, g, o)
        });
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_every_head_dim() {
    if let Some(t) = avx2() {
        check_all_head_dims(
            "avx2",
            &|f, r, hd, q, g, s| t.dot_rows(f, r, hd, q, g, s),
            &|f, r, hd, w, g, o| t.accumulate_rows(f, r, hd, w, g, o),
        );
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_encode_decode_match_scalar() {
    if let Some(t) = avx2() {
        check_rows("avx2", &|f, s, d| t.encode_row(f, s, d), &|f, s, d| {
            t.decode_row(f, s, d)
        });
    }
}

/// `exp` of 8 lanes all in `-86..=88` takes a shorter path (one exponent add for `2^k`);
/// it must give the bits of the general path, which a single lane outside forces. Dense
/// sweep of the range, each value in every lane position.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_exp_short_path_gives_the_general_bits() {
    let Some(t) = avx2() else { return };
    let mut x = -86.0f32;
    let mut checked = 0;
    while x <= 88.0 {
        let xs: [f32; 8] = core::array::from_fn(|i| (x + i as f32 * 0.000_37).min(88.0));
        let mut short = xs;
        t.exp_shifted_sum(&mut short, 0.0);
        for outside in 0..8 {
            // Lane `outside` at -200 sends the whole register down the general path.
            let mut general = xs;
            general[outside] = -200.0;
            t.exp_shifted_sum(&mut general, 0.0);
            for i in (0..8).filter(|&i| i != outside) {
                assert_eq!(
                    short[i].to_bits(),
                    general[i].to_bits(),
                    "exp({}): {} vs {}",
                    xs[i],
                    short[i],
                    general[i]
                );
                checked += 1;
            }
        }
        x += 0.002_9;
    }
    assert!(checked > 1_000_000);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_exp_shifted_sum_accurate() {
    if let Some(t) = avx2() {
        check_exp("avx2", &|v, s| t.exp_shifted_sum(v, s));
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_max_matches() {
    if let Some(t) = avx2() {
        check_max("avx2", &|v| t.max(v));
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_stream_read_matches() {
    if let Some(t) = avx2() {
        check_stream("avx2", &|b| t.stream_read(b));
    }
}

/// The FMA roofline kernel does the recurrence `x ← 0.999·x + 0.001` on 12 × 8 lanes, `chunks`
/// steps spread over the chains; the closed form (each lane tends to 1) is the oracle.
fn check_fma_burn(name: &str, burn: &dyn Fn(usize) -> f32) {
    for chunks in (0..=40usize).chain([1000, 12_345]) {
        let want: f64 = (0..12)
            .map(|chain| {
                let steps = chunks / 12 + usize::from(chain < chunks % 12);
                8.0 * (1.0 - 0.5 * 0.999f64.powi(steps as i32))
            })
            .sum();
        let got = f64::from(burn(chunks));
        assert!(
            (got - want).abs() < 1e-3,
            "{name} chunks {chunks}: {got} vs {want}"
        );
    }
}

#[test]
fn scalar_fma_burn_follows_its_recurrence() {
    check_fma_burn("scalar", &scalar::fma_burn);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_fma_burn_follows_its_recurrence() {
    if let Some(t) = avx2() {
        check_fma_burn("avx2", &|n| t.fma_burn(n));
    }
}

/// Lengths that disagree (the release-build contract: largest consistent prefix, no panic, no
/// access outside the slices) give the scalar answer.
#[cfg(all(target_arch = "x86_64", not(debug_assertions)))]
#[test]
fn avx2_inconsistent_lengths_match_scalar() {
    let Some(t) = avx2() else { return };
    let mut rng = Rng(0xbad);
    for format in KvFormat::FLOATS {
        for (head_dim, group, n_rows, q_len, s_len) in [
            (64, 3, 16, 64 * 2, 3 * 16),     // queries for 2 of 3 heads
            (64, 3, 16, 64 * 3 + 5, 3 * 16), // extra queries
            (17, 4, 5, 17 * 4, 4 * 5 + 3),   // scores not a multiple of group
            (9, 2, 7, 3, 2 * 7),             // not even one query
            (8, 5, 3, 8 * 5, 2),             // fewer score slots than heads
            (usize::MAX / 2, 1, 0, 0, 4),    // row_bytes overflows
        ] {
            let buf = stored_rows(&mut rng, format, head_dim.min(1024), n_rows, 1);
            let queries = rng.values(q_len);
            let mut want = vec![1.5f32; s_len];
            let mut got = want.clone();
            scalar::dot_rows(format, &buf[1..], head_dim, &queries, group, &mut want);
            t.dot_rows(format, &buf[1..], head_dim, &queries, group, &mut got);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{format} hd {head_dim}"
                );
            }
            let weights = rng.values(s_len);
            let mut want = vec![0.25f32; q_len];
            let mut got = want.clone();
            scalar::accumulate_rows(format, &buf[1..], head_dim, &weights, group, &mut want);
            t.accumulate_rows(format, &buf[1..], head_dim, &weights, group, &mut got);
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
// The dispatched entry points (AVX2 or scalar, whichever is active).

#[test]
fn dispatched_kernels_match_scalar() {
    check_dot("dispatch", &kernels::dot_rows);
    check_accumulate("dispatch", &kernels::accumulate_rows);
    check_rows("dispatch", &kernels::encode_row, &kernels::decode_row);
    check_exp("dispatch", &kernels::exp_shifted_sum);
    check_max("dispatch", &kernels::max);
    check_stream("dispatch", &kernels::stream_read);
}

#[test]
fn active_isa_is_consistent() {
    let isa = kernels::active_isa();
    let forced = cfg!(feature = "force-scalar")
        || std::env::var_os("KVCACHE_FORCE_SCALAR").is_some_and(|v| !v.is_empty() && v != "0");
    let no_vnni = std::env::var_os("KVCACHE_NO_VNNI").is_some_and(|v| !v.is_empty() && v != "0");
    #[cfg(target_arch = "x86_64")]
    let (simd, vnni) = (
        Avx2::new().is_some(),
        kvcache::kernels::quant_avx2::Vnni::new().is_some(),
    );
    #[cfg(not(target_arch = "x86_64"))]
    let (simd, vnni) = (false, false);
    let want = match (simd && !forced, vnni && !no_vnni) {
        (false, _) => "scalar",
        (true, false) => "avx2",
        (true, true) => "avx2+vnni",
    };
    assert_eq!(isa, want);
}

/// Reruns test `name` of this binary in a child process with `variable=1` in its environment
/// (the kernel choice is cached per process), and checks that it ran and passed.
fn rerun_with(name: &str, variable: &str) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--test-threads", "1"])
        .env(variable, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed: {stdout}");
    assert!(stdout.contains("1 passed"), "child ran nothing: {stdout}");
}

/// `KVCACHE_NO_VNNI=1` leaves the AVX2 kernels in use but without `vpdpbusd`.
#[test]
fn no_vnni_env_var() {
    rerun_with("active_isa_is_consistent", "KVCACHE_NO_VNNI");
}

/// `KVCACHE_FORCE_SCALAR=1` must switch the dispatcher off.
#[test]
fn force_scalar_env_var() {
    if std::env::var_os("KVCACHE_FORCE_SCALAR").is_some() {
        assert_eq!(kernels::active_isa(), "scalar");
        return;
    }
    rerun_with("force_scalar_env_var", "KVCACHE_FORCE_SCALAR");
}

// ------------------------------------------------------------------------------------------
// The scalar kernels against naive f64 arithmetic.

#[test]
fn scalar_dot_rows_matches_f64() {
    let mut rng = Rng(0xf64d);
    for format in KvFormat::FLOATS {
        for head_dim in HEAD_DIMS {
            for group in [1, 3, 8] {
                let n_rows = 1 + (head_dim + group) % 17;
                let buf = stored_rows(&mut rng, format, head_dim, n_rows, 0);
                let queries = rng.values(group * head_dim);
                let mut scores = vec![0.0f32; group * n_rows];
                scalar::dot_rows(format, &buf, head_dim, &queries, group, &mut scores);
                let rb = row_bytes(format, head_dim);
                for h in 0..group {
                    for r in 0..n_rows {
                        let row = &buf[r * rb..(r + 1) * rb];
                        let terms: Vec<f64> = (0..head_dim)
                            .map(|d| queries[h * head_dim + d] as f64 * element(format, row, d))
                            .collect();
                        let want: f64 = terms.iter().sum();
                        let scale: f64 = terms.iter().map(|t| t.abs()).sum();
                        assert!(
                            close(scores[h * n_rows + r], want, scale),
                            "{format} hd {head_dim}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn scalar_accumulate_rows_matches_f64() {
    let mut rng = Rng(0xf64a);
    for format in KvFormat::FLOATS {
        for head_dim in HEAD_DIMS {
            for group in [1, 3, 8] {
                let n_rows = 1 + (head_dim * 5 + group) % 17;
                let buf = stored_rows(&mut rng, format, head_dim, n_rows, 0);
                let weights = rng.values(group * n_rows);
                let start = rng.values(group * head_dim);
                let mut out = start.clone();
                scalar::accumulate_rows(format, &buf, head_dim, &weights, group, &mut out);
                let rb = row_bytes(format, head_dim);
                for h in 0..group {
                    for d in 0..head_dim {
                        let terms: Vec<f64> = (0..n_rows)
                            .map(|r| {
                                weights[h * n_rows + r] as f64
                                    * element(format, &buf[r * rb..(r + 1) * rb], d)
                            })
                            .collect();
                        let i = h * head_dim + d;
                        let want = start[i] as f64 + terms.iter().sum::<f64>();
                        let scale =
                            start[i].abs() as f64 + terms.iter().map(|t| t.abs()).sum::<f64>();
                        assert!(close(out[i], want, scale), "{format} hd {head_dim}");
                    }
                }
            }
        }
    }
}

#[test]
fn scalar_exp_shifted_sum_accurate() {
    check_exp("scalar", &scalar::exp_shifted_sum);
}

#[test]
fn scalar_encode_decode_round_trip() {
    let mut rng = Rng(0x7417);
    for format in KvFormat::FLOATS {
        let src = rng.values(300);
        let mut bytes = vec![0u8; row_bytes(format, 300)];
        scalar::encode_row(format, &src, &mut bytes);
        let mut back = vec![0.0f32; 300];
        scalar::decode_row(format, &bytes, &mut back);
        let ulp = match format {
            KvFormat::F32 => 0.0,
            KvFormat::F16 => 1.0 / 2048.0,
            KvFormat::Bf16 => 1.0 / 256.0,
            _ => unreachable!("float formats only"),
        };
        for (a, b) in src.iter().zip(&back) {
            // Rounding to nearest: within half a unit in the last place, relative.
            assert!(
                (a - b).abs() as f64 <= ulp * a.abs() as f64 + 3e-8,
                "{format}: {a} -> {b}"
            );
        }
    }
}

/// Attention skips the softmax correction `exp(old_max - new_max)` when the max did not move,
/// taking it as 1: that is bitwise what the scalar `exp` gives for a zero difference.
#[test]
fn scalar_exp_of_zero_is_exactly_one() {
    assert_eq!(scalar::exp(0.0).to_bits(), 1.0f32.to_bits());
    assert_eq!(scalar::exp(-0.0).to_bits(), 1.0f32.to_bits());
    assert!(scalar::exp(f32::INFINITY - f32::INFINITY).is_nan());
}

type SoftmaxRowsFn<'a> = &'a dyn Fn(&mut [f32], usize, &[f32], &mut [f32], &mut [f32]);

/// The fused softmax update is bitwise `max_rows`, then `exp_shifted_rows` with
/// `softmax_shift` of each row's maximum and running maximum, for every row length up to 40
/// and up to 9 rows (whole groups of 4 and every remainder), with running maxima of `-inf`,
/// NaN, below and above the rows', rows of `-inf` and NaN entries; and it writes nothing past
/// the shortest of its slices.
fn check_softmax_rows(
    name: &str,
    softmax: SoftmaxRowsFn,
    max_rows: MaxRowsFn,
    exp_rows: ExpRowsFn,
) {
    let mut rng = Rng(0x50f8);
    // Clean rows (finite scores within a few dozen of the running maxima: `exp`'s short path,
    // every block but a sequence's last) and dirty ones (`-inf`, NaN and signed zeros among
    // them, running maxima far above, a row with nothing visible).
    for (n, rows, dirty) in (0..=40usize)
        .flat_map(|n| (0..=9usize).flat_map(move |rows| [(n, rows, false), (n, rows, true)]))
    {
        let mut values: Vec<f32> = (0..rows * n)
            .map(|i| match rng.next() % 13 {
                0 if dirty => f32::NEG_INFINITY,
                1 if dirty && i % 3 == 0 => f32::NAN,
                2 if dirty => 0.0,
                3 if dirty => -0.0,
                _ => rng.value() * if dirty { 20.0 } else { 2.0 },
            })
            .collect();
        if dirty && rows >= 2 {
            // One row with nothing visible.
            values[n..2 * n].fill(f32::NEG_INFINITY);
        }
        let running: Vec<f32> = (0..rows)
            .map(|r| match (dirty, r % 4) {
                (_, 0) => f32::NEG_INFINITY,
                (true, 1) => f32::NAN,
                (true, 3) => 100.0 * rng.value(),
                _ => rng.value() * 2.0,
            })
            .collect();
        // The reference: the two kernels attention called before.
        let mut want = values.clone();
        let mut want_max = vec![0.0f32; rows];
        max_rows(&want, n, &mut want_max);
        let shifts: Vec<f32> = (0..rows)
            .map(|r| kernels::softmax_shift(want_max[r], running[r]))
            .collect();
        let mut want_sums = vec![0.0f32; rows];
        exp_rows(&mut want, n, &shifts, &mut want_sums);
        // Each output slice one longer than the rows, to catch a write past them.
        let mut got = values.clone();
        got.extend_from_slice(&[5.0; 16]);
        let (mut got_max, mut got_sums) = (vec![7.0f32; rows + 1], vec![7.0f32; rows + 1]);
        softmax(&mut got, n, &running, &mut got_max, &mut got_sums);
        if n == 0 {
            assert!(
                got_max.iter().chain(&got_sums).all(|&v| v == 7.0),
                "{name}: n 0 wrote"
            );
            continue;
        }
        assert_eq!(
            got_max[rows], 7.0,
            "{name}: n {n} rows {rows}: max past the rows"
        );
        assert_eq!(
            got_sums[rows], 7.0,
            "{name}: n {n} rows {rows}: sum past the rows"
        );
        assert!(
            got[rows * n..].iter().all(|&v| v == 5.0),
            "{name}: wrote past the rows"
        );
        for r in 0..rows {
            assert_eq!(
                got_max[r].to_bits(),
                want_max[r].to_bits(),
                "{name}: n {n} row {r} max"
            );
            assert_eq!(
                got_sums[r].to_bits(),
                want_sums[r].to_bits(),
                "{name}: n {n} row {r} sum"
            );
        }
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{name}: n {n} rows {rows} element {i}"
            );
        }
    }
    // Fewer running maxima than rows: only those rows are touched.
    let mut values = vec![2.0f32; 4 * 16];
    let (mut m, mut sums) = ([0.0f32; 4], [0.0f32; 4]);
    softmax(&mut values, 16, &[2.0, 2.0], &mut m, &mut sums);
    assert!(
        values[..32].iter().all(|&v| v == 1.0),
        "{name}: exp(0) is 1"
    );
    assert!(
        values[32..].iter().all(|&v| v == 2.0),
        "{name}: touched a row past the maxima"
    );
    assert_eq!(sums, [16.0, 16.0, 0.0, 0.0], "{name}: sums");
    assert_eq!(m, [2.0, 2.0, 0.0, 0.0], "{name}: maxima");
}

#[test]
fn scalar_softmax_rows_match_the_two_kernels() {
    check_softmax_rows(
        "scalar",
        &scalar::softmax_rows,
        &scalar::max_rows,
        &scalar::exp_shifted_rows,
    );
}

#[test]
fn dispatched_softmax_rows_match_the_two_kernels() {
    check_softmax_rows(
        "dispatch",
        &kernels::softmax_rows,
        &kernels::max_rows,
        &kernels::exp_shifted_rows,
    );
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_softmax_rows_match_the_two_kernels() {
    if let Some(t) = avx2() {
        check_softmax_rows(
            "avx2",
            &|v, n, m, b, s| t.softmax_rows(v, n, m, b, s),
            &|v, n, o| t.max_rows(v, n, o),
            &|v, n, s, o| t.exp_shifted_rows(v, n, s, o),
        );
    }
}
