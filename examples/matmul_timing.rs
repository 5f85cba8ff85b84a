//! Best-of-N timing of one quantized matmul on one thread, steadier than wall-clock benches
//! on a shared machine: `cargo run --release --example matmul_timing -- TOKENS ROWS [q8] [REPS]`
//! (576 columns; Q4_1 unless `q8`).

use kvcache::model::quant::{
    matmul, quantize_activations, quantize_row, QuantizedActivations, WeightMatrix, WeightType,
};
use kvcache::model::threads::ThreadPool;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, default: usize| args.get(i).map_or(default, |s| s.parse().unwrap());
    let (tokens, rows, reps) = (arg(1, 64), arg(2, 1536), arg(4, 200));
    let cols = 576;
    let ty = if args.get(3).is_some_and(|s| s == "q8") {
        WeightType::Q8_0
    } else {
        WeightType::Q4_1
    };
    let mut state = 1u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let src: Vec<f32> = (0..cols * 1536).map(|_| next()).collect();
    let rb = ty.row_bytes(cols).unwrap();
    let mut data = vec![0u8; rows * rb];
    for (r, row) in data.chunks_exact_mut(rb).enumerate() {
        let r = r % 1536;
        quantize_row(ty, &src[r * cols..(r + 1) * cols], row).unwrap();
    }
    let w = WeightMatrix::new(ty, rows, cols, &data).unwrap();
    let x: Vec<f32> = (0..cols * tokens).map(|_| next()).collect();
    let mut qa = QuantizedActivations::new();
    quantize_activations(&x, cols, &mut qa).unwrap();
    let mut out = vec![0f32; rows * tokens];
    let pool = ThreadPool::new(1);
    let mut best = f64::MAX;
    for _ in 0..reps {
        let start = Instant::now();
        matmul(&w, &qa, &mut out, &pool).unwrap();
        best = best.min(start.elapsed().as_secs_f64());
    }
    let blocks = (rows * cols / 32 * tokens) as f64;
    println!(
        "{ty:?} {rows}×{cols}, {tokens} tokens: best {:.3} ms, {:.2} ns per block·token, {:.2} GB/s of weights",
        best * 1e3,
        best * 1e9 / blocks,
        data.len() as f64 / best / 1e9
    );
}
