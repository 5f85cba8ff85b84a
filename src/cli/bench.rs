//! `kvcache bench attention`: one decode step over every layer of a model shape, against a
//! plain streaming read of the same bytes (the memory roofline) and against the step's
//! multiply-adds alone, from registers (the arithmetic roofline), both measured in the same run
//! with the same threads.

use std::time::Instant;

use super::args::Args;
use crate::arena::HeapArena;
use crate::attention::{AttentionOptions, AttentionPlan, AttentionWorkspace, BatchEntry};
use crate::kernels;
use crate::model::sampler::{splitmix64, unit_f32};
use crate::model::threads::ThreadPool;
use crate::spec::{Kind, Layout};
use crate::KvCache;

/// Deterministic values in [-1, 1) (SplitMix64), so runs are repeatable.
pub(crate) fn fill_random(values: &mut [f32], seed: &mut u64) {
    for value in values {
        *value = unit_f32(splitmix64(seed));
    }
}

/// One format's cache, filled, and the measurements taken of it.
struct Subject<'a> {
    format: crate::KvFormat,
    cache: KvCache<'a>,
    entries: Vec<BatchEntry>,
    /// K+V bytes one step reads.
    step_bytes: f64,
    step_times: Vec<f64>,
    read_times: Vec<f64>,
    /// The first output element of its last step (printed, so the work cannot be skipped).
    out0: f32,
}

/// Runs the attention benchmark. `--kv` takes one format or a comma-separated list (`f16,int8,
/// int4`): the formats' steps then alternate within each round of the run, each format's
/// cache holding the same keys and values, and the report ends with every format's step time
/// as a ratio of the first's, taken round by round (so that a host whose speed changes every
/// few seconds slows both sides of each ratio alike) and as the ratio of the medians.
pub fn attention(args: &Args) -> Result<(), String> {
    let (shape_name, mut spec) = super::shape(args)?;
    let names = args.string("kv").unwrap_or("f16");
    let mut formats = Vec::new();
    for name in names.split(',') {
        let format = crate::KvFormat::from_name(name)
            .ok_or_else(|| format!("unknown --kv format `{name}`"))?;
        // With a list, `--key-tail` applies to the formats that can have one.
        let key_tail = if format.is_float() && names.contains(',') {
            0
        } else {
            super::key_tail(args, format)?
        };
        formats.push((format, key_tail));
    }
    if formats.iter().all(|(format, _)| format.is_float()) && args.string("key-tail").is_some() {
        return Err("--key-tail needs int8 or int4 keys".into());
    }
    let ctx: usize = args.value("ctx", 2048)?;
    let batch: usize = args.value("batch", 1)?;
    let default_threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: usize = args.value("threads", default_threads)?;
    let steps_arg: usize = args.value("steps", 0)?;
    let block_tokens: usize = args.value("block-tokens", spec.block_tokens)?;
    let exact_values = args.flag("exact-values");
    args.reject_unknown()?;
    if ctx == 0 || batch == 0 || threads == 0 {
        return Err("--ctx, --batch and --threads must be positive".into());
    }
    spec.block_tokens = block_tokens;
    spec.max_seqs = batch;
    spec.max_seq_tokens = ctx;
    let blocks_per_seq = ctx.div_ceil(spec.block_tokens);
    let mut specs = Vec::new();
    let mut arenas = Vec::new();
    for &(format, key_tail) in &formats {
        let mut spec = spec;
        spec.k_format = format;
        spec.v_format = format;
        spec.key_tail_tokens = key_tail.min(ctx);
        let layout = Layout::new(spec).map_err(|e| e.to_string())?;
        let arena_bytes = layout
            .arena_bytes(blocks_per_seq * batch)
            .map_err(|e| e.to_string())?;
        arenas.push(HeapArena::new(arena_bytes).map_err(|e| e.to_string())?);
        specs.push((spec, layout));
    }
    let mut subjects = Vec::new();
    for (arena, &(spec, layout)) in arenas.iter_mut().zip(&specs) {
        let cache = KvCache::with_blocks(spec, blocks_per_seq * batch, arena.as_mut_slice())
            .map_err(|e| e.to_string())?;
        let row_bytes = layout.row_bytes(Kind::K) + layout.row_bytes(Kind::V);
        subjects.push(Subject {
            format: spec.k_format,
            cache,
            entries: Vec::new(),
            step_bytes: (batch * ctx * spec.layers * spec.kv_heads * row_bytes) as f64,
            step_times: Vec::new(),
            read_times: Vec::new(),
            out0: 0.0,
        });
    }

    // Fill every sequence with `ctx` tokens of random keys and values (the same in each
    // format's cache).
    let chunk = 256usize;
    let token_elems = spec.kv_heads * spec.head_dim;
    let (mut k, mut v) = (
        vec![0.0f32; chunk * token_elems],
        vec![0.0f32; chunk * token_elems],
    );
    let mut seed = 42u64;
    for subject in &mut subjects {
        seed = 42;
        let cache = &mut subject.cache;
        for _ in 0..batch {
            let seq = cache.add_sequence().map_err(|e| e.to_string())?;
            cache.reserve(seq, ctx).map_err(|e| e.to_string())?;
            for start in (0..ctx).step_by(chunk) {
                let n = chunk.min(ctx - start);
                for layer in 0..spec.layers {
                    fill_random(&mut k[..n * token_elems], &mut seed);
                    fill_random(&mut v[..n * token_elems], &mut seed);
                    cache
                        .write_run(
                            seq,
                            layer,
                            start,
                            &k[..n * token_elems],
                            &v[..n * token_elems],
                        )
                        .map_err(|e| e.to_string())?;
                }
            }
            subject.entries.push(BatchEntry {
                seq,
                first_position: ctx - 1,
                tokens: 1,
            });
        }
    }
    let q_elems = batch * spec.q_heads * spec.head_dim;
    let mut queries = vec![0.0f32; q_elems];
    fill_random(&mut queries, &mut seed);
    let mut out = vec![0.0f32; q_elems];

    let pool = ThreadPool::new(threads);
    let splits = crate::attention::auto_splits(batch, spec.kv_heads, threads, blocks_per_seq);
    let options = AttentionOptions {
        splits,
        query_tile: 1,
        exact_values,
        ..AttentionOptions::default()
    };
    let mut workspace = AttentionWorkspace::new(threads);

    // The roofline: a plain read of as many bytes as the format's step, split over the same
    // threads.
    let largest = subjects.iter().map(|s| s.step_bytes).fold(0.0, f64::max);
    let plain = vec![1u8; largest as usize];
    let sink = std::sync::atomic::AtomicU64::new(0);
    let read_once = |bytes: usize| {
        let plain = &plain[..bytes.min(plain.len())];
        let share = plain.len().div_ceil(threads);
        pool.run(&|thread, _| {
            let part = plain
                .get(thread * share..((thread + 1) * share).min(plain.len()))
                .unwrap_or(&[]);
            sink.fetch_xor(
                kernels::stream_read(part),
                std::sync::atomic::Ordering::Relaxed,
            );
        });
    };
    // The arithmetic roofline: the step's multiply-adds (8-lane FMAs), from registers only.
    let fma_chunks = (batch * ctx * spec.layers * spec.q_heads * spec.head_dim * 2).div_ceil(8);
    let fma_once = || {
        let share = fma_chunks.div_ceil(threads);
        pool.run(&|thread, _| {
            let mine = share.min(fma_chunks.saturating_sub(thread * share));
            let x = kernels::fma_burn(mine);
            sink.fetch_xor(u64::from(x.to_bits()), std::sync::atomic::Ordering::Relaxed);
        });
    };
    let mut step_once = |subject: &Subject<'_>, out: &mut [f32]| -> Result<(), String> {
        for layer in 0..spec.layers {
            let plan = AttentionPlan::new(&subject.cache, layer, &subject.entries, &options)
                .map_err(|e| e.to_string())?;
            workspace
                .run(&plan, &queries, out, |work| pool.run(work))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    };

    for subject in &subjects {
        step_once(subject, &mut out)?; // warm-up
        read_once(subject.step_bytes as usize);
    }
    fma_once();
    let first = Instant::now();
    for subject in &subjects {
        step_once(subject, &mut out)?;
    }
    let estimate = first.elapsed().as_secs_f64();
    let steps = if steps_arg > 0 {
        steps_arg
    } else {
        ((1.5 * subjects.len() as f64 / estimate.max(1e-6)) as usize).clamp(5, 500)
    };
    let mut fma_times = Vec::with_capacity(steps);
    for subject in &mut subjects {
        subject.step_times.reserve(steps);
        subject.read_times.reserve(steps);
    }
    for _ in 0..steps {
        // Interleaved, so that noise from other work on the machine hits all of them alike.
        for subject in &mut subjects {
            let start = Instant::now();
            step_once(subject, &mut out)?;
            subject.step_times.push(start.elapsed().as_secs_f64());
            subject.out0 = out[0];
            let start = Instant::now();
            read_once(subject.step_bytes as usize);
            subject.read_times.push(start.elapsed().as_secs_f64());
        }
        let start = Instant::now();
        fma_once();
        fma_times.push(start.elapsed().as_secs_f64());
    }
    let fma = median(&mut fma_times.clone());
    // Per round, each format's step over the first format's.
    let round_ratios: Vec<Vec<f64>> = subjects
        .iter()
        .map(|s| {
            s.step_times
                .iter()
                .zip(&subjects[0].step_times)
                .map(|(t, base)| t / base)
                .collect()
        })
        .collect();
    let mut medians = Vec::new();
    for subject in &mut subjects {
        let format = subject.format;
        let step_bytes = subject.step_bytes;
        let best_step = subject
            .step_times
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min);
        let step = median(&mut subject.step_times);
        medians.push(step);
        // Thread-nanoseconds per stored token and KV head: comparable across shapes and with
        // `examples/kernel_costs`, whose per-token kernel costs (data in L1) sum to the part
        // of this that is not memory waits or per-block bookkeeping.
        let token_heads = (batch * ctx * spec.layers * spec.kv_heads) as f64;
        let ns_per_token_head = step * threads as f64 * 1e9 / token_heads;
        let read = median(&mut subject.read_times);
        let gbps = step_bytes / step / 1e9;
        let read_gbps = step_bytes / read / 1e9;
        // Two FMAs (4 flops) per stored element and query head: one for q·k, one for p·v.
        let flops = 4.0 * (batch * ctx * spec.layers * spec.q_heads * spec.head_dim) as f64;
        outln!("attention decode step: shape {shape_name}, kv {format}, ctx {ctx}, batch {batch}, threads {threads}, splits {splits}, isa {}", kernels::active_isa());
        outln!("  {:<28} {:>10} {:>10} {:>10}", "", "ms", "GB/s", "GFLOP/s");
        outln!(
            "  {:<28} {:>10.3} {:>10.2} {:>10.1}",
            "decode step (all layers)",
            step * 1e3,
            gbps,
            flops / step / 1e9
        );
        outln!(
            "  {:<28} {:>10.3} {:>10.2} {:>10}",
            "plain read of same bytes",
            read * 1e3,
            read_gbps,
            "-"
        );
        outln!(
            "  {:<28} {:>10.3} {:>10} {:>10.1}",
            "its FMAs alone (registers)",
            fma * 1e3,
            "-",
            flops / fma / 1e9
        );
        outln!(
            "  K+V bytes per step: {:.1} MB, steps measured: {steps} (fastest {:.3} ms), {:.1} thread-ns per token and KV head, out[0] = {:.6}",
            step_bytes / 1e6,
            best_step * 1e3,
            ns_per_token_head,
            subject.out0
        );
        outln!(
            "{{\"shape\":\"{shape_name}\",\"kv\":\"{format}\",\"ctx\":{ctx},\"batch\":{batch},\"threads\":{threads},\"splits\":{splits},\"isa\":\"{}\",\"ms_per_step\":{:.4},\"gbps\":{:.3},\"read_ms\":{:.4},\"read_gbps\":{:.3},\"gflops\":{:.2},\"roofline_ratio\":{:.3},\"fma_ms\":{:.4},\"compute_ratio\":{:.3},\"best_ms\":{:.4},\"ns_per_token_head\":{:.2}}}",
            kernels::active_isa(),
            step * 1e3,
            gbps,
            read * 1e3,
            read_gbps,
            flops / step / 1e9,
            step / read,
            fma * 1e3,
            step / fma,
            best_step * 1e3,
            ns_per_token_head
        );
    }
    if subjects.len() > 1 {
        let base = subjects[0].format;
        outln!("step time against {base}, same run (median of the per-round ratios; ratio of the medians):");
        let mut json = Vec::new();
        for ((subject, mut ratios), step) in subjects.iter().zip(round_ratios).zip(&medians).skip(1)
        {
            let per_round = median(&mut ratios);
            let of_medians = step / medians[0];
            outln!(
                "  {:<8} {per_round:.3}  {of_medians:.3}",
                subject.format.to_string()
            );
            json.push(format!(
                "\"{}\":{{\"per_round\":{per_round:.4},\"of_medians\":{of_medians:.4}}}",
                subject.format
            ));
        }
        outln!("{{\"against\":\"{base}\",{}}}", json.join(","));
    }
    let _ = sink.load(std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}
