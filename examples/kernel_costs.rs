//! Where a decode step's cycles go, per stored token, with the data in L1 (no memory traffic):
//! `cargo run --release --example kernel_costs [-- GROUP]`.
//!
//! For each KV format it times, on one thread and best of 25 rounds, the three kernels one KV
//! head runs per block of 16 tokens for `GROUP` query heads (default 3, SmolLM2's): the scores
//! (`dot_rows`, or `dot_rows_prepared` for int8 / int4 keys), the softmax of each query row
//! (`softmax_rows`, as attention calls it) and the weighted sum of values
//! (`accumulate_rows_int`: integer weights for int4, exact `accumulate_rows` otherwise; int4's
//! exact sums are printed too). It prints
//! nanoseconds per token and the same as a multiple of the FMA floor: the time
//! [`kvcache::kernels::fma_burn`] takes for that kernel's multiply-adds (`GROUP × head_dim`
//! per token for scores and for values; the softmax has none, so its row shows the ratio to
//! one of them). A format can only make the step faster than f16 where these in-cache costs
//! are lower, or where f16 waits on memory and it does not.

use kvcache::kernels;
use kvcache::KvFormat;
use std::hint::black_box;
use std::time::Instant;

const HEAD_DIM: usize = 64;
const TOKENS: usize = 16;
const REPS: usize = 20_000;

/// Best of 7 rounds of `REPS` calls of `f`, in nanoseconds per call.
fn best_ns(mut f: impl FnMut()) -> f64 {
    (0..25)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..REPS {
                f();
            }
            start.elapsed().as_secs_f64() * 1e9 / REPS as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let group: usize = std::env::args()
        .nth(1)
        .map_or(3, |s| s.parse().expect("GROUP must be a number"));
    // The multiply-adds of one kernel call: `group × head_dim` per token, 8 per chunk.
    let chunks = group * HEAD_DIM * TOKENS / 8;
    let floor = best_ns(|| {
        black_box(kernels::fma_burn(black_box(chunks)));
    }) / TOKENS as f64;
    println!(
        "isa {}, group {group}, head_dim {HEAD_DIM}, {TOKENS} tokens per call, one thread",
        kernels::active_isa()
    );
    println!("FMA floor of one kernel: {floor:.2} ns per token\n");
    println!("format   scores ns (×floor)   softmax ns (×floor)   values ns (×floor)   total ns");
    let src: Vec<f32> = (0..HEAD_DIM).map(|i| (i as f32 * 0.37).sin()).collect();
    let queries: Vec<f32> = (0..group * HEAD_DIM)
        .map(|i| (i as f32 * 0.11).cos())
        .collect();
    for format in [
        KvFormat::F32,
        KvFormat::F16,
        KvFormat::Bf16,
        KvFormat::Int8,
        KvFormat::Int4,
    ] {
        let row_bytes = format
            .row_bytes(HEAD_DIM)
            .expect("head_dim 64 fits every format");
        let mut rows = vec![0u8; row_bytes * TOKENS];
        for row in rows.chunks_exact_mut(row_bytes) {
            kernels::encode_row(format, &src, row);
        }
        let mut prepared = vec![0u8; kernels::prepared_query_len(format, HEAD_DIM, group)];
        kernels::prepare_queries(format, HEAD_DIM, &queries, group, &mut prepared);
        let mut scores = vec![0.0f32; group * TOKENS];
        let scores_ns = best_ns(|| {
            if format.is_float() {
                kernels::dot_rows(format, &rows, HEAD_DIM, &queries, group, &mut scores);
            } else {
                kernels::dot_rows_prepared(format, &rows, HEAD_DIM, &prepared, group, &mut scores);
            }
            black_box(&mut scores);
        }) / TOKENS as f64;
        let template = scores.clone();
        let running = vec![f32::NEG_INFINITY; group];
        let mut maxima = vec![0.0f32; group];
        let mut sums = vec![0.0f32; group];
        let softmax_ns = best_ns(|| {
            scores.copy_from_slice(&template);
            kernels::softmax_rows(&mut scores, TOKENS, &running, &mut maxima, &mut sums);
            black_box(&mut sums);
        }) / TOKENS as f64;
        let weights: Vec<f32> = (0..group * TOKENS).map(|i| 1.0 / (1 + i) as f32).collect();
        let mut out = vec![0.0f32; group * HEAD_DIM];
        // What attention calls: integer weights for int4, exact sums otherwise.
        let values_ns = best_ns(|| {
            kernels::accumulate_rows_int(format, &rows, HEAD_DIM, &weights, group, &mut out);
            black_box(&mut out);
        }) / TOKENS as f64;
        let exact_values_ns = best_ns(|| {
            kernels::accumulate_rows(format, &rows, HEAD_DIM, &weights, group, &mut out);
            black_box(&mut out);
        }) / TOKENS as f64;
        println!(
            "{:<8} {scores_ns:>8.2} ({:>4.2}×)      {softmax_ns:>8.2} ({:>4.2}×)       {values_ns:>8.2} ({:>4.2}×)     {:>8.2}",
            format.to_string(),
            scores_ns / floor,
            softmax_ns / floor,
            values_ns / floor,
            scores_ns + softmax_ns + values_ns,
        );
        if format == KvFormat::Int4 {
            println!("         (int4 values summed exactly in f32, `accumulate_rows`: {exact_values_ns:.2} ns)");
        }
    }
}
