//! `kvcache generate`, `kvcache ppl` and `kvcache bench decode`: the model runner at work.

use std::time::Instant;

use super::args::Args;
use crate::arena::HeapArena;
use crate::model::llama::{Model, Runner, Step};
use crate::model::sampler::{Sampler, SamplerConfig};
use crate::model::tokenizer::StreamDecoder;
use crate::{KvCache, KvFormat, Layout, SeqId};

/// Where the model is looked for when `--model` is not given.
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The model path from `--model`, `KVCACHE_MODEL`, or the default.
pub fn model_path(args: &Args) -> String {
    args.string("model")
        .map(str::to_string)
        .or_else(|| std::env::var("KVCACHE_MODEL").ok())
        .unwrap_or_else(|| DEFAULT_MODEL.to_string())
}

fn threads(args: &Args) -> Result<usize, String> {
    let default = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: usize = args.value("threads", default)?;
    if threads == 0 {
        return Err("--threads must be positive".into());
    }
    Ok(threads)
}

/// An arena and the spec for `seqs` sequences of up to `tokens` tokens each.
pub fn cache_arena(
    model: &Model,
    format: KvFormat,
    seqs: usize,
    tokens: usize,
) -> Result<(crate::CacheSpec, HeapArena), String> {
    cache_arena_kv(
        model,
        (format, format),
        (crate::CacheSpec::new(1, 1, 1, 1).block_tokens, 0),
        seqs,
        tokens,
    )
}

/// [`cache_arena`] with separate key and value formats and a block size.
pub fn cache_arena_kv(
    model: &Model,
    (k_format, v_format): (KvFormat, KvFormat),
    (block_tokens, key_tail): (usize, usize),
    seqs: usize,
    tokens: usize,
) -> Result<(crate::CacheSpec, HeapArena), String> {
    let mut spec = model.cache_spec(k_format, seqs, tokens.max(1));
    spec.v_format = v_format;
    spec.block_tokens = block_tokens;
    spec.key_tail_tokens = key_tail.min(spec.max_seq_tokens);
    let layout = Layout::new(spec).map_err(|e| e.to_string())?;
    let blocks = tokens.max(1).div_ceil(spec.block_tokens) * seqs;
    let bytes = layout.arena_bytes(blocks).map_err(|e| e.to_string())?;
    let arena = HeapArena::new(bytes).map_err(|_| {
        format!("cannot allocate a cache arena of {bytes} bytes for {tokens} tokens")
    })?;
    Ok((spec, arena))
}

/// Runs `generate`.
pub fn generate(args: &Args) -> Result<(), String> {
    let path = model_path(args);
    let prompt = args
        .string("prompt")
        .ok_or("--prompt TEXT is required")?
        .to_string();
    let n: usize = args.value("n", 64)?;
    let (format, v_format) = super::kv_formats(args)?;
    let key_tail = super::key_tail(args, format)?;
    let block_tokens: usize = args.value(
        "block-tokens",
        crate::CacheSpec::new(1, 1, 1, 1).block_tokens,
    )?;
    let threads = threads(args)?;
    let config = SamplerConfig {
        temperature: args.value("temp", 0.0)?,
        top_k: args.value("top-k", 0)?,
        top_p: args.value("top-p", 1.0)?,
        seed: args.value("seed", 0)?,
    };
    // The sampler defines every value (a negative or NaN temperature is greedy, a top-p above
    // 1 keeps everything), but on the command line such values are typing mistakes.
    if !(config.temperature.is_finite() && config.temperature >= 0.0) {
        return Err("--temp must be a finite number, 0 or more (0 is greedy)".into());
    }
    if !(0.0..=1.0).contains(&config.top_p) {
        return Err("--top-p must be between 0 and 1".into());
    }
    let chat = args.flag("chat");
    let show_ids = args.flag("ids");
    let no_cache = args.flag("no-cache");
    let ctx: usize = args.value("ctx", 8192)?;
    let chunk: usize = args.value("chunk", 256)?;
    let prompt_cache = args.string("prompt-cache").map(std::path::PathBuf::from);
    let exact_values = args.flag("exact-values");
    args.reject_unknown()?;
    if n == 0 {
        return Err("-n must be at least 1".into());
    }
    if prompt.is_empty() {
        return Err("the prompt is empty".into());
    }
    if chunk == 0 {
        return Err("--chunk must be positive".into());
    }
    let model = Model::load(&path).map_err(|e| e.to_string())?;
    let tokenizer = model.tokenizer();
    let text = if chat {
        tokenizer.chat_prompt(&prompt)
    } else {
        prompt.clone()
    };
    let prompt_ids = tokenizer.encode(&text);
    if prompt_ids.is_empty() {
        return Err("the prompt encodes to no tokens".into());
    }
    if prompt_ids
        .len()
        .checked_add(n)
        .is_none_or(|total| total > ctx)
    {
        return Err(format!(
            "prompt of {} tokens plus {n} new ones does not fit the cache of {ctx} tokens (--ctx)",
            prompt_ids.len()
        ));
    }
    let (spec, mut arena) = cache_arena_kv(
        &model,
        (format, v_format),
        (block_tokens, key_tail),
        1,
        prompt_ids.len() + n,
    )?;
    let mut cache = KvCache::new(spec, arena.as_mut_slice()).map_err(|e| e.to_string())?;
    let mut runner = Runner::new(&model, threads).with_exact_values(exact_values);
    let mut sampler = Sampler::new(config);
    let vocab = model.config().vocab;
    let mut logits = vec![0.0f32; vocab];

    let start = Instant::now();
    let (seq, restored) = match &prompt_cache {
        Some(path) => restore_prompt(&mut cache, path, &model, &prompt_ids),
        None => (None, 0),
    };
    let seq = match seq {
        Some(seq) => seq,
        None => cache.add_sequence().map_err(|e| e.to_string())?,
    };
    feed(
        &mut runner,
        &mut cache,
        seq,
        &prompt_ids[restored..],
        chunk,
        &mut logits,
    )?;
    if let Some(path) = &prompt_cache {
        if let Err(e) = save_prompt(&cache, seq, path, &model, &prompt_ids) {
            eprintln!("kvcache: prompt cache not saved to {}: {e}", path.display());
        }
    }
    let prefill = start.elapsed().as_secs_f64();
    let mut generated = Vec::with_capacity(n);
    let mut stream = StreamDecoder::new();
    let stop: Vec<u32> = [tokenizer.eos_id(), tokenizer.token_id("<|im_end|>")]
        .into_iter()
        .flatten()
        .collect();
    let start = Instant::now();
    let mut all = prompt_ids.clone();
    loop {
        let token = sampler.sample(&logits);
        generated.push(token);
        all.push(token);
        if stop.contains(&token) {
            break;
        }
        out!("{}", stream.push_token(tokenizer, token));
        if generated.len() == n {
            break;
        }
        decode_step(
            &mut runner,
            &mut cache,
            seq,
            &all,
            no_cache,
            chunk,
            &mut logits,
        )?;
    }
    let decode = start.elapsed().as_secs_f64();
    outln!("{}", stream.finish());
    if show_ids {
        outln!("prompt ids: {}", join(&prompt_ids));
        outln!("generated ids: {}", join(&generated));
    }
    let stats = cache.stats();
    if restored > 0 {
        eprintln!(
            "prompt cache: {restored} of {} prompt tokens restored, not recomputed",
            prompt_ids.len()
        );
    }
    eprintln!(
        "prompt: {} tokens in {:.3} s ({:.1} tok/s); generation: {} tokens in {:.3} s ({:.1} tok/s){}; KV cache: {} bytes in use ({} blocks, {format}), threads {threads}",
        prompt_ids.len(),
        prefill,
        prompt_ids.len() as f64 / prefill,
        generated.len(),
        decode,
        generated.len() as f64 / decode.max(1e-9),
        if no_cache { " without the cache" } else { "" },
        stats.bytes_used,
        stats.blocks_used,
    );
    Ok(())
}

/// `--prompt-cache` files: this magic, the model's vocabulary size and weight bytes (`u64`
/// each: a file from another model is not used), the prompt's token count and ids (`u32`),
/// then the prompt's sequence as `KvCache::export_sequence` saves it.
const PROMPT_CACHE_MAGIC: &[u8; 8] = b"KVCPRMT1";

/// The model's identity as a prompt-cache file records it.
fn model_identity(model: &Model) -> [u64; 2] {
    [model.config().vocab as u64, model.weight_bytes() as u64]
}

/// Restores the prompt's cache from `path` when the file holds a prefix of `prompt_ids` for
/// this model: returns the restored sequence and how many of its tokens to keep (at most all
/// but the last prompt token, whose logits the generation needs). Anything else (no file,
/// another prompt or model, a damaged or unfitting snapshot) restores nothing and says why on
/// stderr, except for a missing file.
fn restore_prompt(
    cache: &mut KvCache,
    path: &std::path::Path,
    model: &Model,
    prompt_ids: &[u32],
) -> (Option<SeqId>, usize) {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (None, 0),
        Err(e) => {
            eprintln!("kvcache: prompt cache {} not read: {e}", path.display());
            return (None, 0);
        }
    };
    let word = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
    };
    let parsed = (|| {
        if bytes.get(..8)? != PROMPT_CACHE_MAGIC || [word(8)?, word(16)?] != model_identity(model) {
            return None;
        }
        let count = usize::try_from(word(24)?).ok()?;
        let ids_end = count.checked_mul(4)?.checked_add(32)?;
        let ids: Vec<u32> = bytes
            .get(32..ids_end)?
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect();
        Some((ids, &bytes[ids_end..]))
    })();
    let Some((ids, snapshot)) = parsed else {
        eprintln!(
            "kvcache: prompt cache {} is not a prompt cache of this model; computing the prompt",
            path.display()
        );
        return (None, 0);
    };
    let shared = ids
        .iter()
        .zip(prompt_ids)
        .take_while(|(a, b)| a == b)
        .count()
        .min(prompt_ids.len() - 1);
    if shared == 0 {
        return (None, 0);
    }
    let seq = match cache.import_sequence(snapshot) {
        Ok(seq) => seq,
        Err(e) => {
            eprintln!("kvcache: prompt cache {} not restored: {e}", path.display());
            return (None, 0);
        }
    };
    if cache.len(seq) != Ok(ids.len()) || cache.truncate(seq, shared).is_err() {
        let _ = cache.remove(seq);
        eprintln!(
            "kvcache: prompt cache {} does not match its token list",
            path.display()
        );
        return (None, 0);
    }
    (Some(seq), shared)
}

/// Saves `seq` (the whole prompt) and its token ids to `path` (see [`PROMPT_CACHE_MAGIC`]).
fn save_prompt(
    cache: &KvCache,
    seq: SeqId,
    path: &std::path::Path,
    model: &Model,
    prompt_ids: &[u32],
) -> Result<(), String> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(PROMPT_CACHE_MAGIC);
    for word in model_identity(model)
        .into_iter()
        .chain([prompt_ids.len() as u64])
    {
        bytes.extend_from_slice(&word.to_le_bytes());
    }
    for id in prompt_ids {
        bytes.extend_from_slice(&id.to_le_bytes());
    }
    let start = bytes.len();
    bytes.resize(
        start + cache.exported_len(seq).map_err(|e| e.to_string())?,
        0,
    );
    cache
        .export_sequence(seq, &mut bytes[start..])
        .map_err(|e| e.to_string())?;
    std::fs::write(path, &bytes).map_err(|e| e.to_string())
}

/// Feeds `tokens` to `seq` in prefill chunks of `chunk`, leaving the last token's logits.
fn feed(
    runner: &mut Runner,
    cache: &mut KvCache,
    seq: SeqId,
    tokens: &[u32],
    chunk: usize,
    logits: &mut [f32],
) -> Result<(), String> {
    for piece in tokens.chunks(chunk) {
        runner
            .forward(cache, &[Step { seq, tokens: piece }], logits)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// One decode step for `sequence`, whose last token is the new one: through the cache, or
/// (`recompute`, the baseline the cache removes) by rebuilding every position of the prefix
/// from an empty cache.
fn decode_step(
    runner: &mut Runner,
    cache: &mut KvCache,
    seq: SeqId,
    sequence: &[u32],
    recompute: bool,
    chunk: usize,
    logits: &mut [f32],
) -> Result<(), String> {
    if recompute {
        cache.truncate(seq, 0).map_err(|e| e.to_string())?;
        feed(runner, cache, seq, sequence, chunk, logits)
    } else {
        feed(
            runner,
            cache,
            seq,
            &sequence[sequence.len().saturating_sub(1)..],
            chunk,
            logits,
        )
    }
}

fn join(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
}

/// Runs `ppl`: perplexity over a text file in windows of `--ctx` tokens, scoring the second
/// half of each window (as llama.cpp's perplexity tool does).
pub fn ppl(args: &Args) -> Result<(), String> {
    let path = model_path(args);
    let file = args
        .string("file")
        .ok_or("--file TEXT is required")?
        .to_string();
    let ctx: usize = args.value("ctx", 512)?;
    let max_chunks: usize = args.value("chunks", usize::MAX)?;
    let max_chars: usize = args.value("chars", usize::MAX)?;
    let (format, v_format) = super::kv_formats(args)?;
    let key_tail = super::key_tail(args, format)?;
    let block_tokens: usize = args.value(
        "block-tokens",
        crate::CacheSpec::new(1, 1, 1, 1).block_tokens,
    )?;
    let threads = threads(args)?;
    let exact_values = args.flag("exact-values");
    let decode_from: usize = args.value("decode-from", usize::MAX)?;
    args.reject_unknown()?;
    if ctx < 4 {
        return Err("--ctx must be at least 4".into());
    }
    if decode_from == 0 {
        return Err("--decode-from must be at least 1 (the prefill before decoding)".into());
    }
    let prefill = decode_from.min(ctx);
    let text = std::fs::read_to_string(&file).map_err(|e| format!("{file}: {e}"))?;
    let text: String = text.chars().take(max_chars).collect();
    let model = Model::load(&path).map_err(|e| e.to_string())?;
    let ids = model.tokenizer().encode(&text);
    let chunks = (ids.len() / ctx).min(max_chunks);
    if chunks == 0 {
        return Err(format!(
            "the text has {} tokens, fewer than one window of {ctx}",
            ids.len()
        ));
    }
    let (spec, mut arena) =
        cache_arena_kv(&model, (format, v_format), (block_tokens, key_tail), 1, ctx)?;
    let mut cache = KvCache::new(spec, arena.as_mut_slice()).map_err(|e| e.to_string())?;
    let mut runner = Runner::new(&model, threads).with_exact_values(exact_values);
    let vocab = model.config().vocab;
    let mut logits = vec![0.0f32; ctx * vocab];
    let (mut nll, mut count) = (0.0f64, 0usize);
    let start = Instant::now();
    for c in 0..chunks {
        let window = &ids[c * ctx..(c + 1) * ctx];
        let seq = cache.add_sequence().map_err(|e| e.to_string())?;
        // The prefill in one call, then (with --decode-from) one token per call.
        let mut fed = 0;
        while fed < ctx {
            let n = if fed == 0 { prefill } else { 1 };
            runner
                .forward_all(
                    &mut cache,
                    &[Step {
                        seq,
                        tokens: &window[fed..fed + n],
                    }],
                    &mut logits[fed * vocab..(fed + n) * vocab],
                )
                .map_err(|e| e.to_string())?;
            fed += n;
        }
        for j in ctx / 2..ctx - 1 {
            nll -= log_softmax_at(&logits[j * vocab..(j + 1) * vocab], window[j + 1] as usize);
            count += 1;
        }
        cache.remove(seq).map_err(|e| e.to_string())?;
        outln!("[{}] {:.4}", c + 1, (nll / count as f64).exp());
    }
    let ppl = (nll / count as f64).exp();
    outln!("perplexity: {ppl:.4} over {chunks} windows of {ctx} tokens ({count} scored), kv {format}/{v_format}, key tail {key_tail}, prefill {prefill}, {:.1} s", start.elapsed().as_secs_f64());
    outln!("{{\"ppl\":{ppl:.5},\"ctx\":{ctx},\"chunks\":{chunks},\"kv\":\"{format}\",\"kv_v\":\"{v_format}\",\"key_tail\":{key_tail},\"prefill\":{prefill},\"scored\":{count}}}");
    Ok(())
}

fn log_softmax_at(logits: &[f32], index: usize) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    logits[index] as f64 - max - sum.ln()
}

/// Runs `bench decode`: generation speed after `--depth` tokens of context.
pub fn bench_decode(args: &Args) -> Result<(), String> {
    let path = model_path(args);
    let depth: usize = args.value("depth", 0)?;
    let n: usize = args.value("n", 64)?;
    let (format, v_format) = super::kv_formats(args)?;
    let key_tail = super::key_tail(args, format)?;
    let block_tokens: usize = args.value(
        "block-tokens",
        crate::CacheSpec::new(1, 1, 1, 1).block_tokens,
    )?;
    let threads = threads(args)?;
    let chunk: usize = args.value("chunk", 512)?;
    let no_cache = args.flag("no-cache");
    let exact_values = args.flag("exact-values");
    args.reject_unknown()?;
    if n == 0 || chunk == 0 {
        return Err("-n and --chunk must be positive".into());
    }
    let model = Model::load(&path).map_err(|e| e.to_string())?;
    let vocab = model.config().vocab;
    let tokens = depth
        .checked_add(n)
        .and_then(|t| t.checked_add(1))
        .ok_or("--depth plus -n is too large")?;
    let (spec, mut arena) = cache_arena_kv(
        &model,
        (format, v_format),
        (block_tokens, key_tail),
        1,
        tokens,
    )?;
    let mut cache = KvCache::new(spec, arena.as_mut_slice()).map_err(|e| e.to_string())?;
    let seq: SeqId = cache.add_sequence().map_err(|e| e.to_string())?;
    let mut runner = Runner::new(&model, threads).with_exact_values(exact_values);
    let mut logits = vec![0.0f32; vocab];
    // Deterministic pseudo-random context tokens, like llama-bench's.
    let mut state = 12345u64;
    let context: Vec<u32> = (0..depth.max(1))
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % vocab as u64) as u32
        })
        .collect();
    let start = Instant::now();
    feed(&mut runner, &mut cache, seq, &context, chunk, &mut logits)?;
    let prefill = start.elapsed().as_secs_f64();
    let mut all = context.clone();
    let start = Instant::now();
    let mut token = 0u32;
    for _ in 0..n {
        all.push(token);
        decode_step(
            &mut runner,
            &mut cache,
            seq,
            &all,
            no_cache,
            chunk,
            &mut logits,
        )?;
        token = crate::model::sampler::argmax(&logits);
    }
    let decode = start.elapsed().as_secs_f64();
    let tok_per_s = n as f64 / decode;
    let prefill_tok_per_s = context.len() as f64 / prefill;
    outln!("decode after {depth} tokens of context: {n} tokens in {decode:.3} s = {tok_per_s:.2} tok/s{} (kv {format}, threads {threads})", if no_cache { " without the cache" } else { "" });
    outln!("prefill: {} tokens in {prefill:.3} s = {prefill_tok_per_s:.1} tok/s; KV cache {} bytes in use", context.len(), cache.stats().bytes_used);
    outln!(
        "{{\"depth\":{depth},\"kv\":\"{format}\",\"threads\":{threads},\"n\":{n},\"no_cache\":{no_cache},\"tok_per_s\":{tok_per_s:.3},\"prefill_tok_per_s\":{prefill_tok_per_s:.2}}}"
    );
    Ok(())
}
