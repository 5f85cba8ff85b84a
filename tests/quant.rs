//! Quantized weights, activation quantization, dot kernels, matmul and the thread pool.
//!
//! Dot kernels are checked (SIMD and scalar) against an f64 oracle over the dequantized
//! weights and dequantized activations, so the only error allowed is summation order.

use kvcache::half::{f16_to_f32, f32_to_f16};
use kvcache::model::quant::{
    dot_f32_with, dot_quantized_with, matmul, matmul_any, matmul_f32_with, matmul_many,
    matmul_with, quantize_activations, quantize_activations_pool, quantize_activations_with,
    quantize_row, Backend, QuantError, QuantizedActivations, WeightMatrix, WeightType, QK,
};
use kvcache::model::threads::ThreadPool;
use std::sync::atomic::{AtomicUsize, Ordering};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Roughly N(0, 1).
    fn normal(&mut self) -> f32 {
        (0..4)
            .map(|_| (self.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            .sum::<f32>()
            * 1.7
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
}

const ALL: [WeightType; 5] = [
    WeightType::F32,
    WeightType::F16,
    WeightType::Q8_0,
    WeightType::Q4_0,
    WeightType::Q4_1,
];

fn backends() -> [Backend; 2] {
    [Backend::Scalar, Backend::Avx2]
}

/// Random weights of `ty`: quantized from random floats, with a few extreme blocks.
fn weights(rng: &mut Rng, ty: WeightType, rows: usize, cols: usize) -> Vec<u8> {
    let rb = ty.row_bytes(cols).unwrap();
    let mut data = vec![0u8; rows * rb];
    for r in 0..rows {
        let scale = [0.02, 1.0, 30.0][rng.below(3)];
        let mut x = rng.vec(cols, scale);
        if rng.below(4) == 0 {
            // A constant block and a zero block.
            x[..QK.min(cols)].iter_mut().for_each(|v| *v = 0.5);
            if cols >= 2 * QK {
                x[QK..2 * QK].iter_mut().for_each(|v| *v = 0.0);
            }
        }
        quantize_row(ty, &x, &mut data[r * rb..(r + 1) * rb]).unwrap();
    }
    data
}

fn random_cols(rng: &mut Rng, quantized: bool) -> usize {
    if quantized || rng.below(2) == 0 {
        QK * (1 + rng.below(128))
    } else {
        1 + rng.below(600)
    }
}

#[test]
fn type_table() {
    assert_eq!(WeightType::from_ggml(0), Some(WeightType::F32));
    assert_eq!(WeightType::from_ggml(1), Some(WeightType::F16));
    assert_eq!(WeightType::from_ggml(2), Some(WeightType::Q4_0));
    assert_eq!(WeightType::from_ggml(3), Some(WeightType::Q4_1));
    assert_eq!(WeightType::from_ggml(8), Some(WeightType::Q8_0));
    for id in [4, 5, 6, 7, 9, 10, 30, u32::MAX] {
        assert_eq!(WeightType::from_ggml(id), None);
    }
    for ty in ALL {
        assert_eq!(WeightType::from_ggml(ty.ggml_id()), Some(ty));
    }
    assert_eq!(WeightType::Q4_1.row_bytes(576), Some(18 * 20));
    assert_eq!(WeightType::Q4_0.row_bytes(64), Some(36));
    assert_eq!(WeightType::Q8_0.row_bytes(576), Some(18 * 34));
    assert_eq!(WeightType::F16.row_bytes(7), Some(14));
    assert_eq!(WeightType::F32.row_bytes(7), Some(28));
    assert_eq!(WeightType::Q8_0.row_bytes(33), None);
    assert_eq!(WeightType::F32.row_bytes(usize::MAX / 2), None);
    assert_eq!(WeightType::Q8_0.row_bytes(usize::MAX - 31), None);
}

#[test]
fn bad_sizes_are_errors() {
    let data = vec![0u8; 20 * 3];
    let ty = WeightType::Q4_1;
    assert!(matches!(
        WeightMatrix::new(ty, 3, 33, &data),
        Err(QuantError::ColsNotBlockMultiple { .. })
    ));
    assert!(matches!(
        WeightMatrix::new(ty, 2, 32, &data),
        Err(QuantError::BadDataLength {
            expected: 40,
            actual: 60
        })
    ));
    assert!(matches!(
        WeightMatrix::new(ty, usize::MAX / 4, 32, &data),
        Err(QuantError::SizeOverflow)
    ));
    let w = WeightMatrix::new(ty, 3, 32, &data).unwrap();
    let mut row = vec![0f32; 31];
    assert!(matches!(
        w.dequantize_row(0, &mut row),
        Err(QuantError::BadShape { .. })
    ));
    let mut row = vec![0f32; 32];
    assert!(matches!(
        w.dequantize_row(3, &mut row),
        Err(QuantError::OutOfRange { .. })
    ));
    // Public fields edited into an inconsistent state are caught too.
    let mut bad = w;
    bad.rows = 4;
    assert!(bad.dequantize_row(0, &mut row).is_err());

    assert!(QuantizedActivations::with_capacity(usize::MAX, 2).is_err());
    assert!(QuantizedActivations::with_capacity(usize::MAX / 64, 32).is_err());
    let mut qa = QuantizedActivations::with_capacity(2, 64).unwrap();
    assert!(quantize_activations(&[0.0; 40], 40, &mut qa).is_err());
    assert!(quantize_activations(&[0.0; 40], 32, &mut qa).is_err());
    assert!(quantize_activations(&[0.0; 64], 0, &mut qa).is_err());
    quantize_activations(&[1.0; 64], 32, &mut qa).unwrap();
    assert_eq!(qa.tokens(), 2);
    let pool = ThreadPool::new(2);
    // Activation width differs from the weight's.
    let mut out = vec![0f32; 3 * 2];
    assert!(matches!(
        matmul_with(Backend::detect(), &w, &qa, &mut out, &pool),
        Ok(())
    ));
    let mut out_bad = vec![0f32; 5];
    assert!(matches!(
        matmul_with(Backend::detect(), &w, &qa, &mut out_bad, &pool),
        Err(QuantError::BadShape { what: "out", .. })
    ));
    quantize_activations(&[1.0; 64], 64, &mut qa).unwrap();
    assert!(matches!(
        matmul_with(Backend::detect(), &w, &qa, &mut out, &pool),
        Err(QuantError::BadShape { .. })
    ));
    assert!(dot_quantized_with(Backend::Scalar, &w, 0, &qa, 0).is_err());
    quantize_activations(&[1.0; 32], 32, &mut qa).unwrap();
    assert!(matches!(
        dot_quantized_with(Backend::Scalar, &w, 0, &qa, 1),
        Err(QuantError::OutOfRange { .. })
    ));
    // Wrong activation kind.
    let fdata = vec![0u8; 4 * 32 * 3];
    let wf = WeightMatrix::new(WeightType::F32, 3, 32, &fdata).unwrap();
    assert!(matches!(
        matmul_with(Backend::detect(), &wf, &qa, &mut out[..3], &pool),
        Err(QuantError::WrongActivations(WeightType::F32))
    ));
    assert!(matches!(
        matmul_f32_with(Backend::detect(), &w, &[0.0; 32], 1, &mut out[..3], &pool),
        Err(QuantError::WrongActivations(WeightType::Q4_1))
    ));
    assert!(matches!(
        matmul_f32_with(Backend::detect(), &wf, &[0.0; 31], 1, &mut out[..3], &pool),
        Err(QuantError::BadShape { what: "x", .. })
    ));
    assert!(matches!(
        matmul_f32_with(
            Backend::detect(),
            &wf,
            &[0.0; 32],
            usize::MAX,
            &mut out[..3],
            &pool
        ),
        Err(QuantError::SizeOverflow)
    ));
    let mut scratch = QuantizedActivations::new();
    assert!(matmul_any(&w, &[0.0; 33], 1, &mut scratch, &mut out[..3], &pool).is_err());
    assert!(quantize_row(WeightType::Q8_0, &[0.0; 32], &mut [0u8; 33]).is_err());
    assert!(quantize_row(WeightType::Q8_0, &[0.0; 31], &mut [0u8; 34]).is_err());
}

#[test]
fn weight_round_trip() {
    let mut rng = Rng(7);
    for ty in ALL {
        for _ in 0..20 {
            let cols = QK * (1 + rng.below(20));
            let x = rng.vec(cols, 3.0);
            let rb = ty.row_bytes(cols).unwrap();
            let mut data = vec![0u8; rb];
            quantize_row(ty, &x, &mut data).unwrap();
            let w = WeightMatrix::new(ty, 1, cols, &data).unwrap();
            let mut y = vec![0f32; cols];
            w.dequantize_row(0, &mut y).unwrap();
            for (xb, yb) in x.chunks(QK).zip(y.chunks(QK)) {
                let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
                let range = xb.iter().fold(f32::MIN, |a, &v| a.max(v))
                    - xb.iter().fold(f32::MAX, |a, &v| a.min(v));
                // Half a step, plus the f16 rounding of the scale (and min).
                let bound = match ty {
                    WeightType::F32 => 0.0,
                    WeightType::F16 => amax * 1e-3,
                    WeightType::Q8_0 => amax / 127.0 * 0.5 + amax * 1e-3,
                    // ggml maps the signed extreme to -8: the other extreme clamps at +7.
                    WeightType::Q4_0 => amax / 8.0 + amax * 2e-2,
                    WeightType::Q4_1 => range / 15.0 * 0.5 + amax * 2e-2,
                };
                for (a, b) in xb.iter().zip(yb) {
                    assert!(
                        (a - b).abs() <= bound + 1e-6,
                        "{ty:?}: {a} vs {b}, bound {bound}"
                    );
                }
            }
        }
    }
}

#[test]
fn activation_round_trip_and_simd_equals_scalar() {
    let mut rng = Rng(11);
    let mut a = QuantizedActivations::new();
    let mut b = QuantizedActivations::new();
    for case in 0..60 {
        let cols = QK * (1 + rng.below(64));
        let tokens = 1 + rng.below(5);
        let mut x = rng.vec(cols * tokens, [1e-3, 1.0, 50.0][case % 3]);
        if case % 5 == 0 {
            x[..QK].iter_mut().for_each(|v| *v = 0.0);
        }
        if case % 7 == 0 {
            // Exact ties: values that land on k + 0.5 steps.
            for (i, v) in x[..QK].iter_mut().enumerate() {
                *v = if i == 0 { 127.0 } else { (i as f32) - 0.5 };
            }
        }
        quantize_activations_with(Backend::Scalar, &x, cols, &mut a).unwrap();
        quantize_activations_with(Backend::Avx2, &x, cols, &mut b).unwrap();
        assert_eq!((a.tokens(), a.cols()), (tokens, cols));
        let mut deq = vec![0f32; cols];
        for t in 0..tokens {
            assert_eq!(a.quants(t), b.quants(t));
            let (sa, sb) = (a.scales(t).unwrap(), b.scales(t).unwrap());
            assert!(sa.iter().zip(sb).all(|(p, q)| p.to_bits() == q.to_bits()));
            a.dequantize_token(t, &mut deq).unwrap();
            let q = a.quants(t).unwrap();
            for (blk, xb) in x[t * cols..(t + 1) * cols].chunks(QK).enumerate() {
                let d = sa[2 * blk];
                let s = sa[2 * blk + 1];
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                // The scale is stored at f16 precision (as llama.cpp's Q8_1 stores it); the
                // quants are rounded with the f32 scale.
                let d32 = amax / 127.0;
                assert_eq!(d, f16_to_f32(f32_to_f16(d32)));
                let qsum: i32 = q[blk * QK..(blk + 1) * QK].iter().map(|&v| v as i32).sum();
                assert_eq!(s, d * qsum as f32);
                let bound = d32 * 0.5 * (1.0 + 1e-5) + 127.0 * (d - d32).abs() * (1.0 + 1e-5);
                for (i, &v) in xb.iter().enumerate() {
                    let e = (v - deq[blk * QK + i]).abs();
                    assert!(e <= bound + 1e-30, "err {e} > {bound}");
                }
            }
        }
    }
    // Buffers are reused: no reallocation for the same or a smaller size (nor within a
    // reserved capacity).
    let mut c = QuantizedActivations::with_capacity(4, 128).unwrap();
    quantize_activations(&rng.vec(256, 1.0), 128, &mut c).unwrap();
    let p = c.quants(0).unwrap().as_ptr();
    quantize_activations(&rng.vec(512, 1.0), 128, &mut c).unwrap();
    assert_eq!(p, c.quants(0).unwrap().as_ptr());
    let x = rng.vec(8 * 256, 1.0);
    quantize_activations(&x, 256, &mut a).unwrap();
    let p = a.quants(0).unwrap().as_ptr();
    quantize_activations(&x[..4 * 256], 256, &mut a).unwrap();
    quantize_activations(&x, 256, &mut a).unwrap();
    assert_eq!(p, a.quants(0).unwrap().as_ptr());
}

/// f64 oracle over dequantized weights and activations; returns (value, Σ|w·x|).
fn oracle(w: &[f32], x: &[f32]) -> (f64, f64) {
    w.iter().zip(x).fold((0.0, 0.0), |(s, a), (&p, &q)| {
        let v = p as f64 * q as f64;
        (s + v, a + v.abs())
    })
}

#[test]
fn dot_kernels_match_oracle() {
    let mut rng = Rng(3);
    let mut qa = QuantizedActivations::new();
    for ty in ALL {
        for _ in 0..40 {
            let cols = random_cols(&mut rng, ty.is_quantized());
            let rows = 4;
            let data = weights(&mut rng, ty, rows, cols);
            let w = WeightMatrix::new(ty, rows, cols, &data).unwrap();
            let s = [0.01, 1.0, 20.0][rng.below(3)];
            let x = rng.vec(cols, s);
            let mut xd = vec![0f32; cols];
            if ty.is_quantized() {
                quantize_activations(&x, cols, &mut qa).unwrap();
                qa.dequantize_token(0, &mut xd).unwrap();
            } else {
                xd.copy_from_slice(&x);
            }
            let mut wd = vec![0f32; cols];
            for r in 0..rows {
                w.dequantize_row(r, &mut wd).unwrap();
                let (want, mag) = oracle(&wd, &xd);
                let tol = (cols as f64 + 16.0) * 1.2e-7 * mag + 1e-30;
                for be in backends() {
                    let got = if ty.is_quantized() {
                        dot_quantized_with(be, &w, r, &qa, 0).unwrap()
                    } else {
                        dot_f32_with(be, &w, r, &x).unwrap()
                    };
                    let err = (got as f64 - want).abs();
                    assert!(
                        err <= tol,
                        "{ty:?} {be:?} cols {cols}: got {got}, want {want}, err {err} > {tol}"
                    );
                }
            }
        }
    }
}

#[test]
fn matmul_matches_per_token_dots_and_thread_counts() {
    let mut rng = Rng(5);
    let pools: Vec<ThreadPool> = (1..=3).map(ThreadPool::new).collect();
    let mut qa = QuantizedActivations::new();
    for ty in ALL {
        for case in 0..6 {
            let cols = random_cols(&mut rng, ty.is_quantized());
            let rows = [1, 7, 33, 70, 130, 257][case];
            let data = weights(&mut rng, ty, rows, cols);
            let w = WeightMatrix::new(ty, rows, cols, &data).unwrap();
            for tokens in 1..=9 {
                let x = rng.vec(tokens * cols, 1.0);
                if ty.is_quantized() {
                    quantize_activations(&x, cols, &mut qa).unwrap();
                }
                for be in backends() {
                    let mut first: Option<Vec<f32>> = None;
                    for pool in &pools {
                        let mut out = vec![f32::NAN; tokens * rows];
                        if ty.is_quantized() {
                            matmul_with(be, &w, &qa, &mut out, pool).unwrap();
                        } else {
                            matmul_f32_with(be, &w, &x, tokens, &mut out, pool).unwrap();
                        }
                        match &first {
                            None => {
                                // Every element equals the single-token dot, bitwise.
                                for t in 0..tokens {
                                    for r in 0..rows {
                                        let want = if ty.is_quantized() {
                                            dot_quantized_with(be, &w, r, &qa, t).unwrap()
                                        } else {
                                            dot_f32_with(be, &w, r, &x[t * cols..(t + 1) * cols])
                                                .unwrap()
                                        };
                                        assert_eq!(
                                            out[t * rows + r].to_bits(),
                                            want.to_bits(),
                                            "{ty:?} {be:?} t {t} r {r} of {tokens}"
                                        );
                                    }
                                }
                                first = Some(out);
                            }
                            Some(f) => {
                                let same =
                                    f.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits());
                                assert!(same, "{ty:?} {be:?}: thread counts differ");
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn matmul_any_quantizes_when_needed() {
    let mut rng = Rng(9);
    let pool = ThreadPool::new(2);
    let mut scratch = QuantizedActivations::new();
    let mut qa = QuantizedActivations::new();
    for ty in ALL {
        let (rows, cols, tokens) = (20, 96, 3);
        let data = weights(&mut rng, ty, rows, cols);
        let w = WeightMatrix::new(ty, rows, cols, &data).unwrap();
        let x = rng.vec(tokens * cols, 1.0);
        let mut a = vec![0f32; tokens * rows];
        let mut b = vec![0f32; tokens * rows];
        matmul_any(&w, &x, tokens, &mut scratch, &mut a, &pool).unwrap();
        if ty.is_quantized() {
            quantize_activations(&x, cols, &mut qa).unwrap();
            matmul_with(Backend::detect(), &w, &qa, &mut b, &pool).unwrap();
        } else {
            matmul_f32_with(Backend::detect(), &w, &x, tokens, &mut b, &pool).unwrap();
        }
        assert_eq!(a, b);
    }
}

#[test]
fn thread_pool_runs_every_index() {
    for n in 1..=4 {
        let pool = ThreadPool::new(n);
        assert_eq!(pool.threads(), n);
        for _ in 0..200 {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run(&|i, count| {
                assert_eq!(count, n);
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }
    assert_eq!(ThreadPool::new(0).threads(), 1);
}

#[test]
fn thread_pool_run_tasks_runs_each_index_once() {
    let pool = ThreadPool::new(3);
    for tasks in [0, 1, 2, 3, 7, 64] {
        for _ in 0..50 {
            let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            pool.run_tasks(tasks, &|i, n| {
                assert_eq!(n, tasks);
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }
    // Index 0 runs on the caller.
    let me = std::thread::current().id();
    pool.run(&|i, _| {
        if i == 0 {
            assert_eq!(std::thread::current().id(), me);
        }
    });
}

#[test]
fn thread_pool_sleeps_and_wakes() {
    let pool = ThreadPool::new(3);
    let total = AtomicUsize::new(0);
    for _ in 0..3 {
        // Longer than the spin time: workers go to sleep and must be woken.
        std::thread::sleep(std::time::Duration::from_millis(5));
        pool.run(&|_, _| {
            total.fetch_add(1, Ordering::Relaxed);
        });
    }
    assert_eq!(total.load(Ordering::Relaxed), 9);
}

#[test]
fn thread_pool_nested_run_is_inline() {
    let pool = ThreadPool::new(2);
    let inner = AtomicUsize::new(0);
    pool.run(&|_, _| {
        // Runs inline: both indices on this thread.
        let me = std::thread::current().id();
        pool.run(&|_, n| {
            assert_eq!(n, 2);
            assert_eq!(std::thread::current().id(), me);
            inner.fetch_add(1, Ordering::Relaxed);
        });
    });
    assert_eq!(inner.load(Ordering::Relaxed), 4);
}

#[test]
fn thread_pool_worker_panic_propagates_and_pool_survives() {
    let pool = ThreadPool::new(3);
    for victim in 0..3 {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(&|i, _| {
                if i == victim {
                    panic!("test panic on thread {i}");
                }
            })
        }));
        assert!(r.is_err());
        let count = AtomicUsize::new(0);
        pool.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 3);
    }
}

#[test]
fn backend_detection_honours_force_scalar() {
    let b = Backend::detect();
    let forced = cfg!(feature = "force-scalar")
        || std::env::var("KVCACHE_FORCE_SCALAR").as_deref() == Ok("1");
    if forced {
        assert_eq!(b, Backend::Scalar);
    }
    if cfg!(feature = "force-scalar") {
        assert!(!Backend::avx2_available());
        assert_eq!(Backend::Avx2.effective(), Backend::Scalar);
    }
    assert_eq!(Backend::Scalar.effective(), Backend::Scalar);
    assert_eq!(Backend::detect(), b);
}

/// Several matrices sharing their input in one pass give exactly what separate calls give, on
/// every thread count; a bad shape in any of them is refused before anything runs.
#[test]
fn matmul_many_equals_separate_matmuls() {
    let mut rng = Rng(11);
    let pools: Vec<ThreadPool> = (1..=3).map(ThreadPool::new).collect();
    let mut qa = QuantizedActivations::new();
    let cols = 96;
    let shapes = [
        (WeightType::Q4_1, 40),
        (WeightType::Q8_0, 7),
        (WeightType::Q4_0, 65),
    ];
    let data: Vec<Vec<u8>> = shapes
        .iter()
        .map(|&(ty, rows)| weights(&mut rng, ty, rows, cols))
        .collect();
    let ws: Vec<WeightMatrix> = shapes
        .iter()
        .zip(&data)
        .map(|(&(ty, rows), d)| WeightMatrix::new(ty, rows, cols, d).unwrap())
        .collect();
    for tokens in [1, 3, 6] {
        let x = rng.vec(tokens * cols, 1.0);
        quantize_activations(&x, cols, &mut qa).unwrap();
        for pool in &pools {
            let expect: Vec<Vec<f32>> = ws
                .iter()
                .map(|w| {
                    let mut out = vec![f32::NAN; tokens * w.rows];
                    matmul(w, &qa, &mut out, pool).unwrap();
                    out
                })
                .collect();
            let mut outs: Vec<Vec<f32>> =
                ws.iter().map(|w| vec![f32::NAN; tokens * w.rows]).collect();
            let [a, b, c] = &mut outs[..] else {
                unreachable!()
            };
            matmul_many(
                [&ws[0], &ws[1], &ws[2]],
                &qa,
                [a.as_mut_slice(), b.as_mut_slice(), c.as_mut_slice()],
                pool,
            )
            .unwrap();
            assert_eq!(outs, expect);
        }
    }
    let mut short = vec![0.0; 1];
    let mut fine = vec![0.0; ws[0].rows];
    quantize_activations(&rng.vec(cols, 1.0), cols, &mut qa).unwrap();
    assert!(matmul_many(
        [&ws[0], &ws[1]],
        &qa,
        [fine.as_mut_slice(), short.as_mut_slice()],
        &pools[1]
    )
    .is_err());
    assert!(fine.iter().all(|&v| v == 0.0));
}

/// The AVX2 Q4 kernels sum each block's products in i16 before widening; the largest sums
/// (every weight 15, every activation ±127) must come out exact, for every number of blocks
/// (whole and partial groups of four) and in every token tile.
#[test]
fn q4_extreme_blocks_sum_exactly() {
    let pool = ThreadPool::new(2);
    let mut qa = QuantizedActivations::new();
    for ty in [WeightType::Q4_1, WeightType::Q4_0] {
        for blocks in 1..=9 {
            let cols = blocks * QK;
            let rows = 3;
            // Block: f16 d = 1.0 (0x3c00), Q4_1's f16 m = 0, then 16 bytes of nibbles 15.
            let mut block = vec![0x00u8, 0x3c];
            if ty == WeightType::Q4_1 {
                block.extend([0, 0]);
            }
            block.extend([0xff; 16]);
            let data: Vec<u8> = block
                .iter()
                .copied()
                .cycle()
                .take(block.len() * blocks * rows)
                .collect();
            let w = WeightMatrix::new(ty, rows, cols, &data).unwrap();
            let per_weight = if ty == WeightType::Q4_1 { 15.0 } else { 7.0 };
            for tokens in 1..=6 {
                // Token t: all +1 or all −1 (quantized to ±127).
                let x: Vec<f32> = (0..tokens * cols)
                    .map(|i| {
                        if (i / cols).is_multiple_of(2) {
                            1.0
                        } else {
                            -1.0
                        }
                    })
                    .collect();
                quantize_activations(&x, cols, &mut qa).unwrap();
                for be in backends() {
                    let mut out = vec![0f32; tokens * rows];
                    matmul_with(be, &w, &qa, &mut out, &pool).unwrap();
                    for t in 0..tokens {
                        let d = qa.scales(t).unwrap()[0];
                        let sign = if t % 2 == 0 { 1.0 } else { -1.0 };
                        let want = sign * per_weight * 127.0 * d as f64 * cols as f64;
                        for r in 0..rows {
                            let got = out[t * rows + r] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * want.abs(),
                                "{ty:?} {be:?} blocks {blocks} t {t}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn quantizing_on_the_pool_equals_serial() {
    let mut rng = Rng(21);
    let pool = ThreadPool::new(3);
    let mut a = QuantizedActivations::new();
    let mut b = QuantizedActivations::new();
    for (tokens, cols) in [(1, 64), (31, 576), (32, 576), (100, 96), (257, 1536)] {
        let x = rng.vec(tokens * cols, 2.0);
        quantize_activations(&x, cols, &mut a).unwrap();
        quantize_activations_pool(&x, cols, &mut b, &pool).unwrap();
        assert_eq!((b.tokens(), b.cols()), (tokens, cols));
        for t in 0..tokens {
            assert_eq!(a.quants(t), b.quants(t));
            let (sa, sb) = (a.scales(t).unwrap(), b.scales(t).unwrap());
            assert!(sa.iter().zip(sb).all(|(p, q)| p.to_bits() == q.to_bits()));
        }
        // And the matmuls on them agree bitwise.
        let data = weights(&mut rng, WeightType::Q4_1, 9, cols);
        let w = WeightMatrix::new(WeightType::Q4_1, 9, cols, &data).unwrap();
        let (mut oa, mut ob) = (vec![0f32; tokens * 9], vec![0f32; tokens * 9]);
        matmul(&w, &a, &mut oa, &pool).unwrap();
        matmul(&w, &b, &mut ob, &pool).unwrap();
        assert!(oa.iter().zip(&ob).all(|(p, q)| p.to_bits() == q.to_bits()));
    }
}

/// A task that panics with a payload whose own `Drop` panics must not kill a worker while it is
/// registered on the job (the caller would wait for it forever): the call panics, returns, and
/// the pool keeps working.
#[test]
fn thread_pool_survives_a_panic_payload_that_panics_when_dropped() {
    struct Bomb;
    impl Drop for Bomb {
        fn drop(&mut self) {
            panic!("payload dropped");
        }
    }
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let pool = ThreadPool::new(3);
        let caller = std::thread::current().id();
        for _ in 0..2 {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.run(&|i, _| {
                    if i == 0 {
                        // The caller runs index 0 first: the workers take the others meanwhile.
                        std::thread::sleep(std::time::Duration::from_millis(50));
                    } else if std::thread::current().id() != caller {
                        std::panic::panic_any(Bomb);
                    }
                })
            }));
            assert!(r.is_err());
            // The task may have run on this thread: then the payload is ours to not drop.
            std::mem::forget(r);
        }
        let count = AtomicUsize::new(0);
        pool.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        done.send(count.load(Ordering::Relaxed)).unwrap();
    });
    let count = finished
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the pool hung");
    assert_eq!(count, 3);
}

/// Sizes derived from absurd shapes are refused, not overflowed (even with no tokens).
#[test]
fn absurd_shapes_are_refused_without_overflow() {
    let mut qa = QuantizedActivations::new();
    assert_eq!(
        quantize_activations(&[], 1 << 60, &mut qa),
        Err(QuantError::SizeOverflow)
    );
    assert_eq!(
        quantize_activations(&[], usize::MAX / 32 * 32, &mut qa),
        Err(QuantError::SizeOverflow)
    );
    let pool = ThreadPool::new(2);
    if let Ok(w) = WeightMatrix::new(WeightType::Q8_0, 0, 1 << 60, &[]) {
        let mut out = Vec::new();
        let r = matmul_any(&w, &[], 0, &mut qa, &mut out, &pool);
        assert!(r.is_err() || out.is_empty());
    }
    quantize_activations(&[0.5; 32], 32, &mut qa).unwrap();
    let huge = WeightMatrix::new(WeightType::F32, usize::MAX, 0, &[]);
    if let Ok(w) = huge {
        quantize_activations(&[], 32, &mut qa).unwrap();
        let r = matmul_many([&w, &w], &qa, [&mut [], &mut []], &pool);
        assert!(r.is_err(), "{r:?}");
    }
}

/// Non-finite activations: both backends quantize them the same way, bitwise, and a NaN
/// anywhere in a block makes the block's scale, and so every dot product with it, NaN (never a
/// silent 0 in one backend and garbage in the other).
#[test]
fn non_finite_activations_quantize_alike_and_propagate() {
    let mut rng = Rng(5);
    let cols = 96;
    let specials = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        -0.0,
        0.0,
    ];
    let mut x = rng.vec(6 * cols, 3.0);
    // Token t: a special value at a few places (token 5 all NaN in its first block).
    for (t, &v) in specials.iter().enumerate() {
        for &c in &[0, 7, 40, 95] {
            x[t * cols + c] = v;
        }
    }
    x[5 * cols..5 * cols + 32].fill(f32::NAN);
    let (mut a, mut b) = (QuantizedActivations::new(), QuantizedActivations::new());
    quantize_activations_with(Backend::Scalar, &x, cols, &mut a).unwrap();
    quantize_activations_with(Backend::Avx2, &x, cols, &mut b).unwrap();
    for t in 0..6 {
        assert_eq!(a.quants(t), b.quants(t), "token {t}");
        let (sa, sb) = (a.scales(t).unwrap(), b.scales(t).unwrap());
        assert!(
            sa.iter().zip(sb).all(|(p, q)| p.to_bits() == q.to_bits()),
            "token {t}: {sa:?} vs {sb:?}"
        );
    }
    let pool = ThreadPool::new(1);
    let data = weights(&mut rng, WeightType::Q4_1, 5, cols);
    let w = WeightMatrix::new(WeightType::Q4_1, 5, cols, &data).unwrap();
    let (mut oa, mut ob) = (vec![0f32; 6 * 5], vec![0f32; 6 * 5]);
    matmul_with(Backend::Scalar, &w, &a, &mut oa, &pool).unwrap();
    matmul_with(Backend::Avx2, &w, &b, &mut ob, &pool).unwrap();
    for r in 0..5 {
        // Tokens 0 and 5 hold NaN: their outputs are NaN on both backends.
        assert!(oa[r].is_nan() && ob[r].is_nan(), "row {r}");
        assert!(oa[5 * 5 + r].is_nan() && ob[5 * 5 + r].is_nan(), "row {r}");
    }
    // Both backends agree on which outputs are NaN, and closely on token 4 (signed zeros).
    for i in 0..6 * 5 {
        assert_eq!(
            oa[i].is_nan(),
            ob[i].is_nan(),
            "{i}: {} vs {}",
            oa[i],
            ob[i]
        );
    }
    for i in 4 * 5..5 * 5 {
        assert!(
            (oa[i] - ob[i]).abs() <= 1e-4 * oa[i].abs().max(1.0),
            "{i}: {} vs {}",
            oa[i],
            ob[i]
        );
    }
}
