//! The Llama-family forward pass, driving the KV cache.
//!
//! One call of [`Runner::forward`] takes a ragged batch — for each sequence a run of new
//! tokens (a prompt chunk, or one token for a decode step) — appends their keys and values to
//! the cache layer by layer, attends over everything the cache holds for each sequence, and
//! returns the logits of each sequence's last new token. Past tokens are never recomputed.
//!
//! Per layer, for the `T` new tokens of the batch (`x`: `[T][embed]`):
//! ```text
//! h = rmsnorm(x)·attn_norm;  q,k,v = h·Wqᵀ, h·Wkᵀ, h·Wvᵀ;  rope(q, k at each token's position)
//! cache ← k, v;  a = attention(q, cache);  x += a·Woᵀ
//! h = rmsnorm(x)·ffn_norm;  x += (silu(h·Wgateᵀ) ⊙ h·Wupᵀ)·Wdownᵀ
//! ```
//! then `logits = rmsnorm(x_last)·output_norm·Woutᵀ`, with `Wout = token_embd` when the file
//! has no `output.weight` (tied embeddings).

use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::sync::Mutex;

use super::gguf::{GgmlType, Gguf};
use super::quant::{
    matmul, matmul_f32, matmul_many, quantize_activations_pool, QuantizedActivations, WeightMatrix,
    WeightType,
};
use super::threads::ThreadPool;
use super::tokenizer::Tokenizer;
use crate::attention::{AttentionOptions, AttentionPlan, AttentionWorkspace, BatchEntry};
use crate::{CacheSpec, KvCache, KvFormat, SeqId};

/// Why a model could not be loaded or run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelError(pub String);

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ModelError {}

fn err(message: impl Into<String>) -> ModelError {
    ModelError(message.into())
}

impl From<crate::Error> for ModelError {
    fn from(e: crate::Error) -> Self {
        ModelError(format!("cache: {e}"))
    }
}

impl From<super::quant::QuantError> for ModelError {
    fn from(e: super::quant::QuantError) -> Self {
        ModelError(format!("weights: {e}"))
    }
}

/// Model geometry and constants, from the GGUF metadata.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LlamaConfig {
    /// Transformer blocks.
    pub layers: usize,
    /// Residual stream width.
    pub embed: usize,
    /// Feed-forward hidden width.
    pub ffn: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Elements per head (`embed / heads`).
    pub head_dim: usize,
    /// Vocabulary size (rows of the output projection).
    pub vocab: usize,
    /// Rotary embedding base.
    pub rope_base: f32,
    /// Dimensions rotated per head (pairs `(2i, 2i+1)` for `2i < rope_dim`).
    pub rope_dim: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Training context length.
    pub context_length: usize,
}

/// Where a weight matrix lies in the file.
#[derive(Clone, Debug)]
struct TensorRef {
    ty: WeightType,
    rows: usize,
    cols: usize,
    bytes: Range<usize>,
}

struct LayerRefs {
    attn_norm: Vec<f32>,
    wq: TensorRef,
    wk: TensorRef,
    wv: TensorRef,
    wo: TensorRef,
    ffn_norm: Vec<f32>,
    gate: TensorRef,
    up: TensorRef,
    down: TensorRef,
}

/// A loaded model: the file's bytes, the geometry, per-layer weight locations, the tokenizer.
pub struct Model {
    gguf: Gguf,
    config: LlamaConfig,
    token_embd: TensorRef,
    output: TensorRef,
    output_norm: Vec<f32>,
    layers: Vec<LayerRefs>,
    tokenizer: Tokenizer,
}

impl Model {
    /// Reads and checks a GGUF file.
    pub fn load(path: impl AsRef<Path>) -> Result<Model, ModelError> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(err(format!("model file {} not found", path.display())));
        }
        let gguf = Gguf::open(path).map_err(|e| err(format!("{}: {e}", path.display())))?;
        Model::from_gguf(gguf)
    }

    /// Builds a model from a parsed file (architecture `llama`).
    pub fn from_gguf(gguf: Gguf) -> Result<Model, ModelError> {
        let arch = gguf.get_str("general.architecture").unwrap_or("(none)");
        if arch != "llama" {
            return Err(err(format!(
                "unknown architecture `{arch}` (only `llama` is supported)"
            )));
        }
        let int = |key: &str| -> Result<usize, ModelError> {
            gguf.get_u64(key)
                .map(|v| v as usize)
                .ok_or_else(|| err(format!("missing metadata `{key}`")))
        };
        let layers = int("llama.block_count")?;
        let embed = int("llama.embedding_length")?;
        let ffn = int("llama.feed_forward_length")?;
        let heads = int("llama.attention.head_count")?;
        let kv_heads = int("llama.attention.head_count_kv").unwrap_or(heads);
        if layers == 0
            || embed == 0
            || ffn == 0
            || heads == 0
            || kv_heads == 0
            || embed % heads != 0
            || heads % kv_heads != 0
        {
            return Err(err("inconsistent model geometry in metadata"));
        }
        let head_dim = embed / heads;
        let rope_dim = int("llama.rope.dimension_count")
            .unwrap_or(head_dim)
            .min(head_dim);
        let token_embd = tensor_ref(&gguf, "token_embd.weight", None)?;
        let config = LlamaConfig {
            layers,
            embed,
            ffn,
            heads,
            kv_heads,
            head_dim,
            vocab: token_embd.rows,
            rope_base: gguf.get_f32("llama.rope.freq_base").unwrap_or(10_000.0),
            rope_dim,
            rms_eps: gguf
                .get_f32("llama.attention.layer_norm_rms_epsilon")
                .unwrap_or(1e-5),
            context_length: int("llama.context_length").unwrap_or(2048),
        };
        if !(config.rms_eps.is_finite() && config.rms_eps >= 0.0) {
            return Err(err("metadata `llama.attention.layer_norm_rms_epsilon` is not a finite, non-negative number"));
        }
        if !(config.rope_base.is_finite() && config.rope_base > 0.0) {
            return Err(err(
                "metadata `llama.rope.freq_base` is not a finite, positive number",
            ));
        }
        if token_embd.cols != embed {
            return Err(err("token_embd.weight does not match the embedding length"));
        }
        let output = match gguf.tensor("output.weight") {
            Some(_) => tensor_ref(&gguf, "output.weight", Some((config.vocab, embed)))?,
            None => token_embd.clone(),
        };
        let output_norm = norm_weights(&gguf, "output_norm.weight", embed)?;
        let kv = kv_heads * head_dim;
        // Grown per layer found, not sized from `layers`: a hostile count must not allocate.
        let mut layer_refs = Vec::new();
        for i in 0..layers {
            let name = |suffix: &str| format!("blk.{i}.{suffix}.weight");
            layer_refs.push(LayerRefs {
                attn_norm: norm_weights(&gguf, &name("attn_norm"), embed)?,
                wq: tensor_ref(&gguf, &name("attn_q"), Some((embed, embed)))?,
                wk: tensor_ref(&gguf, &name("attn_k"), Some((kv, embed)))?,
                wv: tensor_ref(&gguf, &name("attn_v"), Some((kv, embed)))?,
                wo: tensor_ref(&gguf, &name("attn_output"), Some((embed, embed)))?,
                ffn_norm: norm_weights(&gguf, &name("ffn_norm"), embed)?,
                gate: tensor_ref(&gguf, &name("ffn_gate"), Some((ffn, embed)))?,
                up: tensor_ref(&gguf, &name("ffn_up"), Some((ffn, embed)))?,
                down: tensor_ref(&gguf, &name("ffn_down"), Some((embed, ffn)))?,
            });
        }
        let tokenizer = Tokenizer::from_gguf(&gguf).map_err(|e| err(format!("tokenizer: {e}")))?;
        Ok(Model {
            gguf,
            config,
            token_embd,
            output,
            output_norm,
            layers: layer_refs,
            tokenizer,
        })
    }

    /// Geometry and constants.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The tokenizer built from the file's vocabulary.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Bytes of all weight matrices (what a decode step streams at least once).
    pub fn weight_bytes(&self) -> usize {
        let layer: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down]
                    .iter()
                    .map(|t| t.bytes.len())
                    .sum::<usize>()
            })
            .sum();
        layer + self.output.bytes.len()
    }

    fn matrix(&self, t: &TensorRef) -> Result<WeightMatrix<'_>, ModelError> {
        let data = self
            .gguf
            .bytes()
            .get(t.bytes.clone())
            .ok_or_else(|| err("tensor outside the file"))?;
        Ok(WeightMatrix::new(t.ty, t.rows, t.cols, data)?)
    }

    /// A cache spec for this model's geometry.
    pub fn cache_spec(
        &self,
        format: KvFormat,
        max_seqs: usize,
        max_seq_tokens: usize,
    ) -> CacheSpec {
        let c = &self.config;
        let mut spec = CacheSpec::new(c.layers, c.heads, c.kv_heads, c.head_dim);
        spec.k_format = format;
        spec.v_format = format;
        spec.max_seqs = max_seqs;
        spec.max_seq_tokens = max_seq_tokens;
        spec
    }
}

fn weight_type(ty: GgmlType) -> Option<WeightType> {
    WeightType::from_ggml(ty.id())
}

fn tensor_ref(
    gguf: &Gguf,
    name: &str,
    shape: Option<(usize, usize)>,
) -> Result<TensorRef, ModelError> {
    let view = gguf
        .tensor(name)
        .ok_or_else(|| err(format!("missing tensor `{name}`")))?;
    let ty = weight_type(view.ggml_type).ok_or_else(|| {
        err(format!(
            "tensor `{name}` has unsupported type {:?}",
            view.ggml_type
        ))
    })?;
    if view.dims.len() != 2 {
        return Err(err(format!("tensor `{name}` is not a matrix")));
    }
    let (cols, rows) = (view.dims[0] as usize, view.dims[1] as usize);
    if let Some(expected) = shape {
        if (rows, cols) != expected {
            return Err(err(format!(
                "tensor `{name}` is {rows}×{cols}, expected {}×{}",
                expected.0, expected.1
            )));
        }
    }
    let start = view.data.as_ptr() as usize - gguf.bytes().as_ptr() as usize;
    let t = TensorRef {
        ty,
        rows,
        cols,
        bytes: start..start + view.data.len(),
    };
    WeightMatrix::new(ty, rows, cols, view.data)
        .map_err(|e| err(format!("tensor `{name}`: {e}")))?;
    Ok(t)
}

fn norm_weights(gguf: &Gguf, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
    let view = gguf
        .tensor(name)
        .ok_or_else(|| err(format!("missing tensor `{name}`")))?;
    if view.ggml_type != GgmlType::F32 || len.checked_mul(4) != Some(view.data.len()) {
        return Err(err(format!("tensor `{name}` must be {len} f32 values")));
    }
    Ok(view
        .data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// Rotary embedding tables: `cos`/`sin` of `pos · base^(-2i/rope_dim)`, `[pos][rope_dim/2]`.
struct Rope {
    half: usize,
    base: f64,
    rope_dim: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    fn new(config: &LlamaConfig) -> Rope {
        Rope {
            half: config.rope_dim / 2,
            base: config.rope_base as f64,
            rope_dim: config.rope_dim,
            cos: Vec::new(),
            sin: Vec::new(),
        }
    }

    fn ensure(&mut self, positions: usize) {
        let have = self.cos.len() / self.half.max(1);
        for pos in have..positions {
            for i in 0..self.half {
                let theta = pos as f64 * self.base.powf(-2.0 * i as f64 / self.rope_dim as f64);
                self.cos.push(theta.cos() as f32);
                self.sin.push(theta.sin() as f32);
            }
        }
    }

    /// Rotates adjacent pairs of every head in `x` (`[heads][head_dim]`) for `position`.
    fn apply(&self, x: &mut [f32], head_dim: usize, position: usize) {
        let cos = &self.cos[position * self.half..(position + 1) * self.half];
        let sin = &self.sin[position * self.half..(position + 1) * self.half];
        for head in x.chunks_exact_mut(head_dim) {
            for (i, pair) in head[..2 * self.half].chunks_exact_mut(2).enumerate() {
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a * cos[i] - b * sin[i];
                pair[1] = a * sin[i] + b * cos[i];
            }
        }
    }
}

/// Working buffers, grown on demand and reused across calls.
#[derive(Default)]
struct Buffers {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    last: Vec<f32>,
    quant: QuantizedActivations,
}

/// A forward call's bookkeeping, kept between calls so that a warm step allocates nothing.
#[derive(Default)]
struct BatchBuffers {
    /// (sequence, new tokens) per step, as `reserve_batch` takes them.
    requests: Vec<(SeqId, usize)>,
    /// Each step's sequence length before the call.
    starts: Vec<usize>,
    /// The attention batch: each step's new tokens.
    entries: Vec<BatchEntry>,
    /// The position of every new token, in step order.
    positions: Vec<usize>,
}

/// Runs the model over a cache: owns the thread pool and the working buffers.
pub struct Runner<'m> {
    model: &'m Model,
    /// [`AttentionOptions::exact_values`] for every layer's attention.
    exact_values: bool,
    pool: ThreadPool,
    workspace: AttentionWorkspace,
    rope: Rope,
    buffers: Buffers,
    batch: BatchBuffers,
}

/// One sequence's part of a forward call.
#[derive(Clone, Copy, Debug)]
pub struct Step<'t> {
    /// The sequence (its new tokens are appended to the cache).
    pub seq: SeqId,
    /// The new tokens.
    pub tokens: &'t [u32],
}

impl<'m> Runner<'m> {
    /// A runner with `threads` threads.
    pub fn new(model: &'m Model, threads: usize) -> Runner<'m> {
        let threads = threads.max(1);
        Runner {
            model,
            exact_values: false,
            pool: ThreadPool::new(threads),
            workspace: AttentionWorkspace::new(threads),
            rope: Rope::new(&model.config),
            buffers: Buffers::default(),
            batch: BatchBuffers::default(),
        }
    }

    /// int4 values summed exactly in `f32` ([`AttentionOptions::exact_values`]) rather than
    /// with integer weights (the default).
    pub fn with_exact_values(mut self, exact: bool) -> Self {
        self.exact_values = exact;
        self
    }

    /// The model.
    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// Threads in use.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// Appends each step's tokens to its sequence and writes the logits of each step's last
    /// token to `logits` (`[steps][vocab]`). All or nothing: a bad token id or buffer is
    /// refused before anything changes, and if the pass fails later (a cache refusing a
    /// non-finite key, say) every sequence is truncated back to its length before the call.
    pub fn forward(
        &mut self,
        cache: &mut KvCache<'_>,
        steps: &[Step<'_>],
        logits: &mut [f32],
    ) -> Result<(), ModelError> {
        self.forward_with(cache, steps, logits, false)
    }

    /// Like [`Runner::forward`], but writes the logits of every new token
    /// (`[total new tokens][vocab]`, in step order), as perplexity needs.
    pub fn forward_all(
        &mut self,
        cache: &mut KvCache<'_>,
        steps: &[Step<'_>],
        logits: &mut [f32],
    ) -> Result<(), ModelError> {
        self.forward_with(cache, steps, logits, true)
    }

    fn forward_with(
        &mut self,
        cache: &mut KvCache<'_>,
        steps: &[Step<'_>],
        logits: &mut [f32],
        all: bool,
    ) -> Result<(), ModelError> {
        let config = *self.model.config();
        let (_, rows) = token_counts(steps, all);
        if logits.len() != rows * config.vocab {
            return Err(err("logits buffer has the wrong length"));
        }
        if steps.iter().any(|s| s.tokens.is_empty()) {
            return Err(err("a step has no tokens"));
        }
        if let Some(bad) = steps
            .iter()
            .flat_map(|s| s.tokens)
            .find(|&&t| t as usize >= config.vocab)
        {
            return Err(err(format!(
                "token id {bad} is outside the vocabulary ({})",
                config.vocab
            )));
        }
        let batch = &mut self.batch;
        batch.requests.clear();
        batch
            .requests
            .extend(steps.iter().map(|s| (s.seq, s.tokens.len())));
        batch.starts.clear();
        for step in steps {
            batch.starts.push(cache.len(step.seq)?);
        }
        cache.reserve_batch(&batch.requests)?;
        let result = self.forward_reserved(cache, steps, logits, all);
        if result.is_err() {
            // Give the reservation back: each sequence ends where it did (the rows this call
            // wrote past that end are dropped with it).
            for (step, &start) in steps.iter().zip(&self.batch.starts) {
                let _ = cache.truncate(step.seq, start);
            }
        }
        result
    }

    /// The forward pass of [`Runner::forward_with`] once the cache holds room for every step's
    /// tokens (sequence `i` grew from `self.batch.starts[i]`).
    fn forward_reserved(
        &mut self,
        cache: &mut KvCache<'_>,
        steps: &[Step<'_>],
        logits: &mut [f32],
        all: bool,
    ) -> Result<(), ModelError> {
        let BatchBuffers {
            starts,
            entries,
            positions,
            ..
        } = &mut self.batch;
        let config = *self.model.config();
        let (total, rows) = token_counts(steps, all);
        let max_position = steps
            .iter()
            .zip(starts.iter())
            .map(|(s, &p)| p + s.tokens.len())
            .max()
            .unwrap_or(0);
        self.rope.ensure(max_position);
        entries.clear();
        entries.extend(steps.iter().zip(starts.iter()).map(|(s, &p)| BatchEntry {
            seq: s.seq,
            first_position: p,
            tokens: s.tokens.len(),
        }));
        positions.clear();
        positions.extend(
            entries
                .iter()
                .flat_map(|e| e.first_position..e.first_position + e.tokens),
        );
        let (entries, positions) = (&*entries, &*positions);

        let (embed, kv, ffn) = (config.embed, config.kv_heads * config.head_dim, config.ffn);
        let b = &mut self.buffers;
        b.x.resize(total * embed, 0.0);
        b.h.resize(total * embed, 0.0);
        b.q.resize(total * embed, 0.0);
        b.k.resize(total * kv, 0.0);
        b.v.resize(total * kv, 0.0);
        b.attn.resize(total * embed, 0.0);
        b.proj.resize(total * embed, 0.0);
        b.gate.resize(total * ffn, 0.0);
        b.up.resize(total * ffn, 0.0);
        let embedding = self.model.matrix(&self.model.token_embd)?;
        for (row, &token) in
            b.x.chunks_exact_mut(embed)
                .zip(steps.iter().flat_map(|s| s.tokens))
        {
            embedding.dequantize_row(token as usize, row)?;
        }
        let options = AttentionOptions {
            splits: 1,
            query_tile: 8,
            exact_values: self.exact_values,
            ..AttentionOptions::default()
        };
        for (layer_index, layer) in self.model.layers.iter().enumerate() {
            per_tokens(&self.pool, &mut b.h, embed, |t0, h| {
                let x = &b.x[t0 * embed..t0 * embed + h.len()];
                rms_norm(x, &layer.attn_norm, config.rms_eps, h)
            });
            project_many(
                self.model,
                [&layer.wq, &layer.wk, &layer.wv],
                &b.h,
                total,
                &mut b.quant,
                [&mut b.q, &mut b.k, &mut b.v],
                &self.pool,
            )?;
            for (t, &position) in positions.iter().enumerate() {
                self.rope.apply(
                    &mut b.q[t * embed..(t + 1) * embed],
                    config.head_dim,
                    position,
                );
                self.rope
                    .apply(&mut b.k[t * kv..(t + 1) * kv], config.head_dim, position);
            }
            let mut offset = 0;
            for entry in entries {
                let rows = offset * kv..(offset + entry.tokens) * kv;
                cache.write_run(
                    entry.seq,
                    layer_index,
                    entry.first_position,
                    &b.k[rows.clone()],
                    &b.v[rows],
                )?;
                offset += entry.tokens;
            }
            let splits = attention_splits(entries, config.kv_heads, cache.spec().block_tokens);
            let plan = AttentionPlan::new(
                cache,
                layer_index,
                entries,
                &AttentionOptions { splits, ..options },
            )?;
            let pool = &self.pool;
            self.workspace
                .run(&plan, &b.q, &mut b.attn, |work| pool.run(work))?;
            project(
                self.model,
                &layer.wo,
                &b.attn,
                total,
                &mut b.quant,
                &mut b.proj,
                &self.pool,
                true,
            )?;
            add(&mut b.x, &b.proj);
            per_tokens(&self.pool, &mut b.h, embed, |t0, h| {
                let x = &b.x[t0 * embed..t0 * embed + h.len()];
                rms_norm(x, &layer.ffn_norm, config.rms_eps, h)
            });
            project_many(
                self.model,
                [&layer.gate, &layer.up],
                &b.h,
                total,
                &mut b.quant,
                [&mut b.gate, &mut b.up],
                &self.pool,
            )?;
            per_tokens(&self.pool, &mut b.gate, ffn, |t0, gate| {
                for (g, u) in gate.iter_mut().zip(&b.up[t0 * ffn..]) {
                    *g = *g / (1.0 + (-*g).exp()) * u;
                }
            });
            project(
                self.model,
                &layer.down,
                &b.gate,
                total,
                &mut b.quant,
                &mut b.proj,
                &self.pool,
                true,
            )?;
            add(&mut b.x, &b.proj);
        }
        // Final norm and output projection: every token, or each step's last token only.
        b.last.resize(rows * embed, 0.0);
        if all {
            rms_norm(&b.x, &self.model.output_norm, config.rms_eps, &mut b.last);
        } else {
            let mut end = 0;
            for (i, step) in steps.iter().enumerate() {
                end += step.tokens.len();
                let row = &b.x[(end - 1) * embed..end * embed];
                rms_norm(
                    row,
                    &self.model.output_norm,
                    config.rms_eps,
                    &mut b.last[i * embed..(i + 1) * embed],
                );
            }
        }
        let last = std::mem::take(&mut b.last);
        let result = project(
            self.model,
            &self.model.output,
            &last,
            rows,
            &mut b.quant,
            logits,
            &self.pool,
            true,
        );
        b.last = last;
        result
    }
}

/// `(new tokens in all steps, rows of logits)`: a row per new token with `all`, else per step.
fn token_counts(steps: &[Step<'_>], all: bool) -> (usize, usize) {
    let total: usize = steps.iter().map(|s| s.tokens.len()).sum();
    (total, if all { total } else { steps.len() })
}

/// Key splits so that each thread has work even for one sequence: none when the context is
/// short or the step is not all decode. The count depends on the batch and the context only,
/// never on the thread count (as if for [`SPLIT_THREADS`] threads): splits change how the
/// softmax sums round, so a count that followed the threads would make the tokens depend on
/// `--threads`.
fn attention_splits(entries: &[BatchEntry], kv_heads: usize, block_tokens: usize) -> usize {
    let longest = entries
        .iter()
        .map(|e| e.first_position + e.tokens)
        .max()
        .unwrap_or(0);
    let decode_only = entries.iter().all(|e| e.tokens == 1);
    if !decode_only || longest < 16 * block_tokens {
        return 1;
    }
    crate::attention::auto_splits(
        entries.len(),
        kv_heads,
        SPLIT_THREADS,
        longest.div_ceil(block_tokens),
    )
}

/// The thread count decode splits are sized for (see [`attention_splits`]): enough work items
/// for up to this many threads, evenly, whatever the runner's own count.
const SPLIT_THREADS: usize = 8;

/// `outs[i] = x · Wᵢᵀ` for matrices that share their input (Q, K, V; gate, up): `x` is
/// quantized once and, when every matrix is a block type, all of them run in one pass over
/// the thread pool.
#[allow(clippy::too_many_arguments)]
fn project_many<const N: usize>(
    model: &Model,
    weights: [&TensorRef; N],
    x: &[f32],
    tokens: usize,
    quant: &mut QuantizedActivations,
    outs: [&mut [f32]; N],
    pool: &ThreadPool,
) -> Result<(), ModelError> {
    if weights
        .iter()
        .all(|w| w.ty.is_quantized() && w.cols == weights[0].cols)
    {
        // (An array, not a Vec: a warm decode step allocates nothing.)
        let mut matrices = [model.matrix(weights[0])?; N];
        for (slot, weight) in matrices.iter_mut().zip(weights).skip(1) {
            *slot = model.matrix(weight)?;
        }
        let cols = weights[0].cols;
        quantize_activations_pool(&x[..tokens * cols], cols, quant, pool)?;
        let refs: [&WeightMatrix; N] = matrices.each_ref();
        let mut index = 0;
        let outs = outs.map(|out| {
            let rows = weights[index].rows;
            index += 1;
            &mut out[..tokens * rows]
        });
        matmul_many(refs, quant, outs, pool)?;
        return Ok(());
    }
    for (i, (weight, out)) in weights.into_iter().zip(outs).enumerate() {
        project(model, weight, x, tokens, quant, out, pool, i == 0)?;
    }
    Ok(())
}

/// `out = x · Wᵀ` for `tokens` rows of `x`; quantizes `x` first for block types unless
/// `quantize` is false (the previous call quantized the same `x`).
#[allow(clippy::too_many_arguments)]
fn project(
    model: &Model,
    weight: &TensorRef,
    x: &[f32],
    tokens: usize,
    quant: &mut QuantizedActivations,
    out: &mut [f32],
    pool: &ThreadPool,
    quantize: bool,
) -> Result<(), ModelError> {
    let w = model.matrix(weight)?;
    let out = &mut out[..tokens * w.rows];
    if w.ty.is_quantized() {
        if quantize || quant.tokens() != tokens || quant.cols() != w.cols {
            quantize_activations_pool(&x[..tokens * w.cols], w.cols, quant, pool)?;
        }
        matmul(&w, quant, out, pool)?;
    } else {
        matmul_f32(&w, &x[..tokens * w.cols], tokens, out, pool)?;
    }
    Ok(())
}

/// Tokens per task in [`per_tokens`].
const TOKEN_CHUNK: usize = 16;

/// Calls `f(first_token, rows)` on chunks of whole rows of `out` (`[tokens][width]`), spread
/// over the pool's threads when there are many tokens (a prefill): per-token work (norms, the
/// SiLU gate) that would otherwise run on one thread while the others wait. Each row gets what
/// one serial call gives.
fn per_tokens(
    pool: &ThreadPool,
    out: &mut [f32],
    width: usize,
    f: impl Fn(usize, &mut [f32]) + Sync,
) {
    let tokens = out.len() / width.max(1);
    if tokens < 2 * TOKEN_CHUNK || pool.threads() == 1 {
        f(0, out);
        return;
    }
    let chunks: Vec<Mutex<&mut [f32]>> = out
        .chunks_mut(TOKEN_CHUNK * width)
        .map(Mutex::new)
        .collect();
    pool.run_tasks(chunks.len(), &|i, _| {
        let mut rows = chunks[i].lock().unwrap_or_else(|e| e.into_inner());
        f(i * TOKEN_CHUNK, &mut rows);
    });
}

/// `out[t] = x[t] / rms(x[t]) · weight` for every row of `x` (rows of `weight.len()`).
fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    for (row, dst) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let mean_square = row.iter().map(|v| v * v).sum::<f32>() / n as f32;
        let inverse = 1.0 / (mean_square + eps).sqrt();
        for ((d, v), w) in dst.iter_mut().zip(row).zip(weight) {
            *d = v * inverse * w;
        }
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
