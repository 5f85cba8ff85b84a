//! Kernel throughput over a working set larger than L1/L2, reported as bytes of stored rows
//! per second (multiply by `2 · group / element_bytes` for FLOP/s).
//!
//! Every `dot_rows` / `accumulate_rows` call covers one 16-row block, as the attention loop
//! does; one iteration walks all blocks of a ~4 MiB buffer (`KVCACHE_BENCH_MIB` overrides the
//! size). `stream_read` over the same buffer is the memory roofline for those bytes.
//!
//! Run: `cargo bench --bench kernels -- --warm-up-time 1 --measurement-time 2`
//! (`KVCACHE_FORCE_SCALAR=1` benchmarks the scalar kernels through the same entry points).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use kvcache::kernels;
use kvcache::KvFormat;

const BLOCK_ROWS: usize = 16;

/// Deterministic values in `[-1, 1)`.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn working_set_bytes() -> usize {
    let mib = std::env::var("KVCACHE_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(4)
        .max(1);
    mib << 20
}

/// A buffer of whole 16-row blocks of `head_dim` random elements in `format`, about
/// [`working_set_bytes`] long.
fn stored_blocks(format: KvFormat, head_dim: usize) -> (Vec<u8>, usize) {
    let row_bytes = format.row_bytes(head_dim).unwrap();
    let block_bytes = row_bytes * BLOCK_ROWS;
    let blocks = (working_set_bytes() / block_bytes).max(1);
    let mut buf = vec![0u8; blocks * block_bytes];
    let src = values(head_dim, 7);
    for (i, row) in buf.chunks_exact_mut(row_bytes).enumerate() {
        // Vary rows a little so no two are identical.
        let scaled: Vec<f32> = src
            .iter()
            .map(|v| v * (1.0 + (i % 13) as f32 / 16.0))
            .collect();
        kernels::encode_row(format, &scaled, row);
    }
    (buf, block_bytes)
}

fn bench_rows(c: &mut Criterion) {
    let isa = kernels::active_isa();
    for format in KvFormat::ALL {
        for head_dim in [64usize, 128] {
            let (buf, block_bytes) = stored_blocks(format, head_dim);
            let mut group_bench = c.benchmark_group(format!("{isa}/{format}/hd{head_dim}"));
            group_bench.throughput(Throughput::Bytes(buf.len() as u64));
            for group in [1usize, 3, 4] {
                let queries = values(group * head_dim, 11);
                let mut scores = vec![0.0f32; group * BLOCK_ROWS];
                group_bench.bench_function(format!("dot_rows/g{group}"), |b| {
                    b.iter(|| {
                        for block in buf.chunks_exact(block_bytes) {
                            kernels::dot_rows(
                                format,
                                black_box(block),
                                head_dim,
                                &queries,
                                group,
                                &mut scores,
                            );
                        }
                        black_box(&mut scores);
                    })
                });
                let weights = values(group * BLOCK_ROWS, 13);
                // The attention path for int4 values takes softmax-like (non-negative) weights
                // as 8-bit integers.
                let non_negative: Vec<f32> = weights.iter().map(|w| w.abs()).collect();
                type ValueKernel = fn(KvFormat, &[u8], usize, &[f32], usize, &mut [f32]);
                let mut value_kernels: Vec<(&str, ValueKernel, &[f32])> =
                    vec![("accumulate_rows", kernels::accumulate_rows, &weights)];
                if format == KvFormat::Int4 {
                    value_kernels.push((
                        "accumulate_rows_int",
                        kernels::accumulate_rows_int,
                        &non_negative,
                    ));
                }
                let mut out = vec![0.0f32; group * head_dim];
                for (name, kernel, weights) in value_kernels {
                    group_bench.bench_function(format!("{name}/g{group}"), |b| {
                        b.iter(|| {
                            for block in buf.chunks_exact(block_bytes) {
                                kernel(
                                    format,
                                    black_box(block),
                                    head_dim,
                                    weights,
                                    group,
                                    &mut out,
                                );
                            }
                            black_box(&mut out);
                        })
                    });
                }
            }
            group_bench.bench_function("stream_read", |b| {
                b.iter(|| black_box(kernels::stream_read(black_box(&buf))))
            });
            group_bench.finish();
        }
    }
}

fn bench_softmax(c: &mut Criterion) {
    let isa = kernels::active_isa();
    let mut group_bench = c.benchmark_group(format!("{isa}/softmax"));
    for n in [16usize, 4096] {
        let src: Vec<f32> = values(n, 17).iter().map(|v| v * 30.0).collect();
        let shift = kernels::max(&src);
        group_bench.throughput(Throughput::Elements(n as u64));
        group_bench.bench_function(format!("exp_shifted_sum/{n}"), |b| {
            b.iter_batched_ref(
                || src.clone(),
                |v| black_box(kernels::exp_shifted_sum(v, shift)),
                BatchSize::SmallInput,
            )
        });
        group_bench.bench_function(format!("max/{n}"), |b| {
            b.iter(|| black_box(kernels::max(black_box(&src))))
        });
    }
    group_bench.finish();
}

criterion_group!(benches, bench_rows, bench_softmax);
criterion_main!(benches);
