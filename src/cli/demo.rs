//! `kvcache demo` and `kvcache memory`: the cache at work on synthetic data, and its footprint.

use super::args::Args;
use crate::arena::HeapArena;
use crate::attention::{attention, attention_scratch_len, AttentionOptions, BatchEntry};
use crate::memory::footprint;
use crate::{CacheSpec, KvCache, KvFormat, Layout};

/// The demo: the built-in synthetic model generating through the cache (and the same steps
/// recomputed without it, for comparison), then the cache's paging at work on a ragged batch.
pub fn demo(args: &Args) -> Result<(), String> {
    args.reject_unknown()?;
    synthetic_model_demo()?;
    paging_demo()
}

fn synthetic_model_demo() -> Result<(), String> {
    use crate::model::gguf::Gguf;
    use crate::model::llama::{Model, Runner, Step};
    use crate::model::sampler::argmax;
    let gguf =
        Gguf::from_bytes(crate::model::synthetic::synthetic_gguf(7)).map_err(|e| e.to_string())?;
    let model = Model::from_gguf(gguf).map_err(|e| e.to_string())?;
    let config = *model.config();
    outln!(
        "synthetic model: {} layers, width {}, {} query heads on {} KV heads, vocab {} (random weights)",
        config.layers, config.embed, config.heads, config.kv_heads, config.vocab
    );
    let prompt = model.tokenizer().encode("The cache remembers ");
    let steps = 48;
    let mut runner = Runner::new(&model, 1);
    let mut run = |recompute: bool| -> Result<(Vec<u32>, f64, usize), String> {
        let (spec, mut arena) =
            super::generate::cache_arena(&model, KvFormat::F16, 1, prompt.len() + steps)?;
        let mut cache = KvCache::new(spec, arena.as_mut_slice()).map_err(|e| e.to_string())?;
        let seq = cache.add_sequence().map_err(|e| e.to_string())?;
        let mut logits = vec![0.0; config.vocab];
        let mut all = prompt.clone();
        let start = std::time::Instant::now();
        runner
            .forward(
                &mut cache,
                &[Step {
                    seq,
                    tokens: &prompt,
                }],
                &mut logits,
            )
            .map_err(|e| e.to_string())?;
        let mut generated = Vec::new();
        for _ in 0..steps {
            let token = argmax(&logits);
            generated.push(token);
            all.push(token);
            if recompute {
                cache.truncate(seq, 0).map_err(|e| e.to_string())?;
                runner
                    .forward(&mut cache, &[Step { seq, tokens: &all }], &mut logits)
                    .map_err(|e| e.to_string())?;
            } else {
                runner
                    .forward(
                        &mut cache,
                        &[Step {
                            seq,
                            tokens: &[token],
                        }],
                        &mut logits,
                    )
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok((
            generated,
            start.elapsed().as_secs_f64(),
            cache.stats().bytes_used,
        ))
    };
    let (cached, cached_time, bytes) = run(false)?;
    let (recomputed, recompute_time, _) = run(true)?;
    outln!(
        "  prompt: {} tokens; generated {steps} tokens greedily",
        prompt.len()
    );
    outln!(
        "  with the cache:    {:>8.2} ms, KV cache {bytes} bytes",
        cached_time * 1e3
    );
    outln!(
        "  recomputing all:   {:>8.2} ms ({:.1}x slower)",
        recompute_time * 1e3,
        recompute_time / cached_time
    );
    outln!(
        "  same tokens: {}",
        if cached == recomputed { "yes" } else { "NO" }
    );
    if cached != recomputed {
        return Err("cached and recomputed generations differ".into());
    }
    Ok(())
}

/// Builds a small cache, runs a ragged batch of sequences through prefill, decode, fork and
/// truncate, and prints the accounting after each step.
fn paging_demo() -> Result<(), String> {
    let mut spec = CacheSpec::new(4, 8, 2, 32);
    spec.max_seqs = 4;
    spec.max_seq_tokens = 256;
    let layout = Layout::new(spec).map_err(|e| e.to_string())?;
    let mut arena = HeapArena::new(layout.arena_bytes(64).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let mut cache = KvCache::new(spec, arena.as_mut_slice()).map_err(|e| e.to_string())?;
    outln!(
        "cache: {} blocks of {} bytes ({} tokens each), {:.0} bytes per token",
        cache.capacity_blocks(),
        layout.block_bytes(),
        spec.block_tokens,
        layout.bytes_per_token()
    );
    let mut seed = 1u64;
    let token_kv = spec.kv_heads * spec.head_dim;
    let mut seqs = Vec::new();
    for prompt in [37usize, 5, 18] {
        let seq = cache.add_sequence().map_err(|e| e.to_string())?;
        cache.reserve(seq, prompt).map_err(|e| e.to_string())?;
        let mut k = vec![0.0; prompt * token_kv];
        let mut v = vec![0.0; prompt * token_kv];
        for layer in 0..spec.layers {
            super::bench::fill_random(&mut k, &mut seed);
            super::bench::fill_random(&mut v, &mut seed);
            cache
                .write_run(seq, layer, 0, &k, &v)
                .map_err(|e| e.to_string())?;
        }
        seqs.push(seq);
    }
    print_stats("after prefill of 37, 5 and 18 tokens", &cache);
    let options = AttentionOptions::default();
    let mut scratch = vec![0.0; attention_scratch_len(&cache, &options)];
    for _ in 0..10 {
        let requests: Vec<_> = seqs.iter().map(|&s| (s, 1)).collect();
        cache.reserve_batch(&requests).map_err(|e| e.to_string())?;
        let mut entries = Vec::new();
        for &seq in &seqs {
            let position = cache.len(seq).map_err(|e| e.to_string())? - 1;
            let mut k = vec![0.0; token_kv];
            let mut v = vec![0.0; token_kv];
            for layer in 0..spec.layers {
                super::bench::fill_random(&mut k, &mut seed);
                super::bench::fill_random(&mut v, &mut seed);
                cache
                    .write(seq, layer, position, &k, &v)
                    .map_err(|e| e.to_string())?;
            }
            entries.push(BatchEntry {
                seq,
                first_position: position,
                tokens: 1,
            });
        }
        let mut queries = vec![0.0; entries.len() * spec.q_heads * spec.head_dim];
        super::bench::fill_random(&mut queries, &mut seed);
        let mut out = vec![0.0; queries.len()];
        for layer in 0..spec.layers {
            attention(
                &cache,
                layer,
                &entries,
                &queries,
                &mut out,
                &mut scratch,
                &options,
            )
            .map_err(|e| e.to_string())?;
        }
    }
    print_stats("after 10 decode steps of the batch", &cache);
    let fork = cache.fork(seqs[0]).map_err(|e| e.to_string())?;
    print_stats("after forking the first sequence (blocks shared)", &cache);
    cache.reserve(fork, 1).map_err(|e| e.to_string())?;
    print_stats(
        "after the fork grows by one token (tail block copied)",
        &cache,
    );
    cache.truncate(seqs[0], 20).map_err(|e| e.to_string())?;
    print_stats("after truncating the first sequence to 20 tokens", &cache);
    for seq in seqs.into_iter().chain([fork]) {
        cache.remove(seq).map_err(|e| e.to_string())?;
    }
    print_stats("after removing every sequence", &cache);
    cache.check_invariants().map_err(|e| e.to_string())?;
    outln!("invariants hold");
    Ok(())
}

fn print_stats(label: &str, cache: &KvCache<'_>) {
    let stats = cache.stats();
    outln!(
        "{label}:\n  sequences {}, tokens {}, blocks used {}/{} ({} bytes), unused slots {}",
        stats.sequences,
        stats.tokens,
        stats.blocks_used,
        stats.blocks_total,
        stats.bytes_used,
        stats.waste_slots
    );
}

/// Prints the cache footprint by context length, batch and format for a model shape.
pub fn memory(args: &Args) -> Result<(), String> {
    let (name, spec) = super::shape(args)?;
    let batch: usize = args.value("batch", 1)?;
    args.reject_unknown()?;
    if batch == 0 {
        return Err("--batch must be at least 1".into());
    }
    outln!("KV cache footprint, shape {name} ({} layers, {} query heads, {} KV heads, head dim {}), batch {batch}", spec.layers, spec.q_heads, spec.kv_heads, spec.head_dim);
    out!("{:>8}", "context");
    for format in KvFormat::ALL {
        out!(" {:>14}", format.name());
    }
    outln!();
    for context in [512usize, 2048, 8192, 32768, 131072] {
        out!("{context:>8}");
        for format in KvFormat::ALL {
            let mut s = spec;
            s.k_format = format;
            s.v_format = format;
            let fp = footprint(s, context, batch).map_err(|e| e.to_string())?;
            out!(" {:>11.1} MB", fp.arena_bytes as f64 / 1e6);
        }
        outln!();
    }
    for format in KvFormat::ALL {
        let mut s = spec;
        s.k_format = format;
        s.v_format = format;
        let fp = footprint(s, 1, 1).map_err(|e| e.to_string())?;
        outln!(
            "bytes per token, {:>5}: {:.0}",
            format.name(),
            fp.bytes_per_token
        );
    }
    Ok(())
}
