//! Random bytes → rows of f32 (every bit pattern, NaN and inf included) → int8 / int4:
//! encode never panics, decodes to finite values, finite inputs round-trip within half a step
//! of the stored scale, and the SIMD kernels agree with the scalar ones on the stored rows:
//! the integer dot products against prepared queries bit for bit (also with the prepared
//! bytes taken raw from the input: any scales, NaN included), the weighted sums with integer
//! weights bit for bit (also on raw input bytes as rows), the float ones within rounding. The
//! integer dot products are checked on the dispatched path (AVX-512 VNNI where the CPU has it)
//! and on the plain AVX2 one.
#![no_main]

use kvcache::kernels::{self, quant_scalar};
use kvcache::quant::{self, GROUP, SATURATE};
use kvcache::KvFormat;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let format = if data[0] & 1 == 0 {
        KvFormat::Int8
    } else {
        KvFormat::Int4
    };
    // Every head dim up to 160; with the top bit set, a multiple of 32 (the integer-weight
    // path of int4 values).
    let head_dim = if data[1] & 0x80 != 0 {
        32 * (1 + (data[1] & 0x7f) as usize % 5)
    } else {
        1 + data[1] as usize % 160
    };
    let group = 1 + data[2] as usize % 9;
    let n_rows = data[3] as usize % 18;
    let floats: Vec<f32> = data[4..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let value = |i: usize| -> f32 {
        if floats.is_empty() {
            0.0
        } else {
            let x = floats[i % floats.len()];
            // Mostly moderate values so the kernels' sums stay finite; raw bits sometimes.
            if i % 7 == 3 {
                x
            } else if x.is_finite() {
                x.clamp(-1e6, 1e6)
            } else {
                x
            }
        }
    };
    let rb = format.row_bytes(head_dim).unwrap();
    let offset = data[0] as usize >> 6;
    let mut rows = vec![0u8; offset + n_rows * rb];
    for r in 0..n_rows {
        let src: Vec<f32> = (0..head_dim).map(|d| value(r * head_dim + d)).collect();
        let at = offset + r * rb;
        let row = &mut rows[at..at + rb];
        kernels::encode_row(format, &src, row);
        let mut back = vec![0.0f32; head_dim];
        kernels::decode_row(format, row, &mut back);
        for (d, (&x, &y)) in src.iter().zip(&back).enumerate() {
            assert!(y.is_finite(), "{format}: {x} -> {y}");
            if !x.is_finite() {
                continue;
            }
            let (s, _) = quant::group_params(format, row, head_dim, d / GROUP);
            let x = x.clamp(-SATURATE, SATURATE) as f64;
            let bound = s as f64 / 2.0 * (1.0 + 1e-6) + x.abs() * 2f64.powi(-23) + 1e-44;
            assert!(
                (y as f64 - x).abs() <= bound,
                "{format} hd {head_dim}: {x} -> {y} (s {s})"
            );
        }
    }
    let rows = &rows[offset..];
    let el = |r: usize, d: usize| {
        quant::element(format, &rows[r * rb..(r + 1) * rb], head_dim, d) as f64
    };
    let queries: Vec<f32> = (0..group * head_dim)
        .map(|i| value(i * 3 + 1).clamp(-1e3, 1e3))
        .map(|x| if x.is_finite() { x } else { 0.5 })
        .collect();
    let mut want = vec![0.0f32; group * n_rows];
    let mut got = want.clone();
    quant_scalar::dot_rows(format, rows, head_dim, &queries, group, &mut want);
    kernels::dot_rows(format, rows, head_dim, &queries, group, &mut got);
    for h in 0..group {
        for r in 0..n_rows {
            let i = h * n_rows + r;
            let mag: f64 = (0..head_dim)
                .map(|d| (queries[h * head_dim + d] as f64 * el(r, d)).abs())
                .sum();
            if mag < 1e30 {
                assert!(
                    (got[i] as f64 - want[i] as f64).abs() <= 1e-5 * mag + 1e-30,
                    "dot {} vs {}",
                    got[i],
                    want[i]
                );
            }
        }
    }
    // Integer dot products against prepared queries (the attention path): bit for bit, with
    // queries prepared from `queries` and with raw input bytes as the prepared rows (query
    // integers kept off -128, which preparation never writes).
    let stride = quant::prepared_row_bytes(head_dim).unwrap();
    let mut prepared = vec![0u8; group * stride];
    quant_scalar::prepare_queries(format, head_dim, &queries, group, &mut prepared);
    let raw: Vec<u8> = (0..group * stride)
        .map(|i| match data[4 + i % (data.len() - 4).max(1)..].first() {
            Some(&0x80) | None => 0x81,
            Some(&b) => b,
        })
        .collect();
    for prepared in [&prepared, &raw] {
        let mut want = vec![0.0f32; group * n_rows];
        let mut got = want.clone();
        quant_scalar::dot_rows_prepared(format, rows, head_dim, prepared, group, &mut want);
        kernels::dot_rows_prepared(format, rows, head_dim, prepared, group, &mut got);
        for (g, w) in got.iter().zip(&want) {
            assert!(
                g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                "prepared dot {g} vs {w}"
            );
        }
        // The dispatched kernel takes the VNNI tiles where the CPU has them: the AVX2 ones too.
        #[cfg(target_arch = "x86_64")]
        if let Some(t) = kernels::avx2::Avx2::new() {
            kernels::quant_avx2::dot_rows_prepared(
                t, format, rows, head_dim, prepared, group, &mut got,
            );
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                    "prepared dot (AVX2) {g} vs {w}"
                );
            }
        }
    }
    let weights: Vec<f32> = (0..group * n_rows)
        .map(|i| (i % 5) as f32 * 0.25 - 0.5)
        .collect();
    let mut want = vec![0.0f32; group * head_dim];
    let mut got = want.clone();
    quant_scalar::accumulate_rows(format, rows, head_dim, &weights, group, &mut want);
    kernels::accumulate_rows(format, rows, head_dim, &weights, group, &mut got);
    for h in 0..group {
        for d in 0..head_dim {
            let i = h * head_dim + d;
            let mag: f64 = (0..n_rows)
                .map(|r| (weights[h * n_rows + r] as f64 * el(r, d)).abs())
                .sum();
            if mag < 1e30 {
                assert!(
                    (got[i] as f64 - want[i] as f64).abs() <= 1e-5 * mag + 1e-30,
                    "acc {} vs {}",
                    got[i],
                    want[i]
                );
            }
        }
    }
    // Integer weights (int4 values in attention): non-negative weights from the input, on the
    // stored rows and on raw input bytes as rows; the AVX2 twin gives the scalar bits.
    let soft: Vec<f32> = (0..group * n_rows)
        .map(|i| value(i * 5 + 2).abs().min(1.0))
        .map(|x| if x.is_nan() { 0.0 } else { x })
        .collect();
    let raw_rows: Vec<u8> = (0..n_rows * rb)
        .map(|i| data[4 + i % (data.len() - 4).max(1)..].first().copied().unwrap_or(0))
        .collect();
    for (rows, weights) in [(rows, &soft), (&raw_rows[..], &soft), (rows, &weights)] {
        let start: Vec<f32> = (0..group * head_dim).map(|i| (i % 3) as f32).collect();
        let (mut want, mut got) = (start.clone(), start.clone());
        quant_scalar::accumulate_rows_int(format, rows, head_dim, weights, group, &mut want);
        kernels::accumulate_rows_int(format, rows, head_dim, weights, group, &mut got);
        if quant_scalar::integer_weights(format, head_dim, weights) {
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                    "integer-weight sum {g} vs {w}"
                );
            }
        }
    }
});
