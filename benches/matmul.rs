//! Matmul throughput: Q4_1 decode matvecs at SmolLM2-135M's FFN shapes, the Q8_0 output
//! projection (49152 × 576, 30 MB), a 64-token Q4_1 prefill, and the thread pool's per-call
//! overhead. Matvec throughput is in weight bytes per second (decimal GB/s); prefill in
//! "elements" = floating-point operations (2·rows·cols·tokens), so Gelem/s reads as GFLOP/s.
//!
//! Quick run: `cargo bench --bench matmul -- --warm-up-time 1 --measurement-time 3`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvcache::model::quant::{
    matmul, quantize_activations, quantize_row, QuantizedActivations, WeightMatrix, WeightType,
};
use kvcache::model::threads::ThreadPool;
use std::hint::black_box;

fn random_f32(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn make_weights(ty: WeightType, rows: usize, cols: usize) -> Vec<u8> {
    let rb = ty.row_bytes(cols).expect("cols fit the block size");
    let mut data = vec![0u8; rows * rb];
    let src = random_f32(cols * 64, 42);
    for (r, row) in data.chunks_exact_mut(rb).enumerate() {
        let start = (r % 63) * cols;
        quantize_row(ty, &src[start..start + cols], row).expect("row size");
    }
    data
}

fn matvec(c: &mut Criterion) {
    let pools = [ThreadPool::new(1), ThreadPool::new(2)];
    let shapes = [
        ("q4_1_1536x576", WeightType::Q4_1, 1536, 576),
        ("q4_1_576x1536", WeightType::Q4_1, 576, 1536),
        ("q8_0_49152x576", WeightType::Q8_0, 49152, 576),
    ];
    let mut group = c.benchmark_group("matvec");
    for (name, ty, rows, cols) in shapes {
        let data = make_weights(ty, rows, cols);
        let w = WeightMatrix::new(ty, rows, cols, &data).expect("shape");
        let mut qa = QuantizedActivations::new();
        quantize_activations(&random_f32(cols, 7), cols, &mut qa).expect("cols");
        let mut out = vec![0f32; rows];
        group.throughput(Throughput::BytesDecimal(data.len() as u64));
        for pool in &pools {
            group.bench_with_input(BenchmarkId::new(name, pool.threads()), &(), |b, _| {
                b.iter(|| matmul(&w, black_box(&qa), &mut out, pool).expect("matmul"))
            });
        }
    }
    group.finish();
}

fn prefill(c: &mut Criterion) {
    let pools = [ThreadPool::new(1), ThreadPool::new(2)];
    let tokens = 64;
    let mut group = c.benchmark_group("prefill64");
    for (name, ty, rows, cols) in [
        ("q4_1_1536x576", WeightType::Q4_1, 1536, 576),
        ("q8_0_4096x576", WeightType::Q8_0, 4096, 576),
    ] {
        let data = make_weights(ty, rows, cols);
        let w = WeightMatrix::new(ty, rows, cols, &data).expect("shape");
        let mut qa = QuantizedActivations::new();
        quantize_activations(&random_f32(tokens * cols, 9), cols, &mut qa).expect("cols");
        let mut out = vec![0f32; tokens * rows];
        group.throughput(Throughput::Elements((2 * rows * cols * tokens) as u64));
        for pool in &pools {
            group.bench_with_input(BenchmarkId::new(name, pool.threads()), &(), |b, _| {
                b.iter(|| matmul(&w, black_box(&qa), &mut out, pool).expect("matmul"))
            });
        }
    }
    group.finish();
}

fn pool_overhead(c: &mut Criterion) {
    let mut group = c.benchmark_group("pool_run_empty");
    for threads in [1, 2] {
        let pool = ThreadPool::new(threads);
        group.bench_function(BenchmarkId::from_parameter(threads), |b| {
            b.iter(|| {
                pool.run(&|i, n| {
                    black_box((i, n));
                })
            })
        });
    }
    // As matmul uses it on 2 threads: 8 claimable row chunks.
    let pool = ThreadPool::new(2);
    group.bench_function("2_threads_8_tasks", |b| {
        b.iter(|| {
            pool.run_tasks(8, &|i, n| {
                black_box((i, n));
            })
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = matvec, prefill, pool_overhead
}
criterion_main!(benches);
