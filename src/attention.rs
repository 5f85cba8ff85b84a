//! Attention over the paged cache: decode, prefill and chunked prefill for ragged batches.
//!
//! A batch is a list of [`BatchEntry`]: a sequence and a run of `tokens` query positions
//! starting at `first_position` (one token for a decode step, many for a prefill chunk; the
//! rows must already be written to the cache). The queries of all entries are concatenated,
//! each entry `[tokens][q_heads][head_dim]`, and the output has the same shape. The query at
//! absolute position `p` attends to the keys `0..=p` of its own sequence (causal); with a
//! window `W` only to `p-W+1..=p` plus the sink tokens.
//!
//! # How it runs
//!
//! The work is cut into *work items*: one (entry, tile of up to `query_tile` query tokens,
//! KV head, key split). An item streams the cached blocks of its key range once; each K and V
//! row is loaded once and used for every query of the tile and every query head of the group
//! (GQA/MQA). Softmax is computed online, block by block (running max `m`, running sum `l`,
//! running weighted value `acc`), so no score row longer than one block is ever stored and the
//! scratch memory does not depend on the context length.
//!
//! An item leaves a *partial state* `(m, l, acc)`; [`AttentionPlan::merge`] combines the
//! splits of a key range in split order (so the result does not depend on which thread ran
//! which item) and normalises. A host runtime can run items on its own threads
//! ([`AttentionPlan::run_item`]); [`attention`] runs them one after another with caller scratch,
//! and under `std` [`attention_threaded`] runs them on `std::thread::scope` threads.

use crate::cache::{KvCache, SeqId};
use crate::error::Error;
use crate::format::KvFormat;
use crate::kernels;
use crate::spec::Kind;

/// One sequence's part of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchEntry {
    /// The sequence.
    pub seq: SeqId,
    /// Absolute position of the entry's first query token.
    pub first_position: usize,
    /// Query tokens (positions `first_position .. first_position + tokens`, all below the
    /// sequence's length).
    pub tokens: usize,
}

/// Tuning and semantics knobs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionOptions {
    /// Score scale; `None` means `1 / sqrt(head_dim)`.
    pub scale: Option<f32>,
    /// Key splits per (entry, tile, head): more splits, more parallel items (split-K). At
    /// least 1.
    pub splits: usize,
    /// Query tokens handled together by one item (they share every K/V row load). At least 1;
    /// a tile longer than every entry of a batch acts as one of the longest entry's length
    /// (the same items and results, buffers sized by the batch).
    pub query_tile: usize,
    /// int4 values: sum the softmax weights times the rows in `f32`, exactly as the other
    /// formats do, rather than as 8-bit integers per 16-row run (the default, `false`; see
    /// `kernels::accumulate_rows_int`). Slower, and free of the weights' rounding. No effect on
    /// other value formats.
    pub exact_values: bool,
}

impl Default for AttentionOptions {
    fn default() -> Self {
        AttentionOptions {
            scale: None,
            splits: 1,
            query_tile: 8,
            exact_values: false,
        }
    }
}

/// One work item, decoded from its index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkItem {
    /// Index into the batch.
    pub entry: usize,
    /// First query token of the tile (relative to the entry).
    pub token_start: usize,
    /// Query tokens in the tile.
    pub tokens: usize,
    /// KV head.
    pub kv_head: usize,
    /// Key split index (`0..splits`).
    pub split: usize,
}

/// A validated batch for one layer, cut into work items.
pub struct AttentionPlan<'c, 'a, 'b> {
    cache: &'c KvCache<'a>,
    layer: usize,
    entries: &'b [BatchEntry],
    scale: f32,
    splits: usize,
    exact_values: bool,
    /// The options' query tile, clamped to the longest entry (the same tiles: an entry never
    /// spans more than one tile of its own length), so that the buffer sizes below follow the
    /// batch, not the option.
    query_tile: usize,
    items: usize,
    /// Query rows of one item at most: `query_tile × group`.
    max_rows: usize,
    partial_len: usize,
    scratch_len: usize,
}

impl<'c, 'a, 'b> AttentionPlan<'c, 'a, 'b> {
    /// Validates the batch: live sequences, positions below each sequence's length, the
    /// needed keys still stored (not evicted by the window), a valid layer.
    pub fn new(
        cache: &'c KvCache<'a>,
        layer: usize,
        entries: &'b [BatchEntry],
        options: &AttentionOptions,
    ) -> Result<Self, Error> {
        let spec = cache.spec();
        if layer >= spec.layers {
            return Err(Error::BadIndex("layer"));
        }
        if options.splits == 0 {
            return Err(Error::ZeroDimension("splits"));
        }
        if options.query_tile == 0 {
            return Err(Error::ZeroDimension("query_tile"));
        }
        let scale = options
            .scale
            .unwrap_or(1.0 / libm_sqrt(spec.head_dim as f32));
        if !scale.is_finite() {
            return Err(Error::NonFinite);
        }
        let longest = entries.iter().map(|e| e.tokens).max().unwrap_or(0);
        let query_tile = options.query_tile.min(longest.max(1));
        let mut items = 0usize;
        for entry in entries {
            let (_, len) = cache.slot_and_len(entry.seq)?;
            let end = entry
                .first_position
                .checked_add(entry.tokens)
                .filter(|&e| e <= len);
            if end.is_none() {
                return Err(Error::BadPosition {
                    position: entry.first_position.saturating_add(entry.tokens),
                    len,
                });
            }
            if entry.tokens > 0 {
                // Every block the entry's queries need must still be stored (O(1) per range).
                let last = entry.first_position + entry.tokens - 1;
                let needed = NeededBlocks::new(
                    spec.window,
                    spec.sink_tokens,
                    spec.block_tokens,
                    entry.first_position,
                    last,
                );
                cache.check_stored(entry.seq, 0..needed.sink_blocks)?;
                cache.check_stored(entry.seq, needed.first..needed.last + 1)?;
            }
            let tiles = entry.tokens.div_ceil(query_tile);
            items = tiles
                .checked_mul(spec.kv_heads)
                .and_then(|i| i.checked_mul(options.splits))
                .and_then(|i| i.checked_add(items))
                .ok_or(Error::SizeOverflow)?;
        }
        // Every buffer size a caller will compute from the plan, checked once here.
        let max_rows = query_tile
            .checked_mul(spec.group())
            .ok_or(Error::SizeOverflow)?;
        let partial_len = max_rows
            .checked_mul(spec.head_dim + 2)
            .ok_or(Error::SizeOverflow)?;
        items.checked_mul(partial_len).ok_or(Error::SizeOverflow)?;
        let prepared = kernels::prepared_query_len(spec.k_format, spec.head_dim, max_rows);
        let scratch_len = spec
            .head_dim
            .checked_add(spec.block_tokens)
            .and_then(|n| n.checked_add(spec.key_tail_tokens))
            .and_then(|n| n.checked_mul(max_rows))
            .filter(|_| prepared != usize::MAX)
            .and_then(|n| n.checked_add(prepared.div_ceil(4)))
            .ok_or(Error::SizeOverflow)?;
        Ok(AttentionPlan {
            cache,
            layer,
            entries,
            scale,
            splits: options.splits,
            exact_values: options.exact_values,
            query_tile,
            items,
            max_rows,
            partial_len,
            scratch_len,
        })
    }

    /// Number of work items.
    pub fn work_items(&self) -> usize {
        self.items
    }

    /// Query vectors handled by one item at most: `query_tile × group` (the tile clamped to
    /// the longest entry).
    fn max_rows(&self) -> usize {
        self.max_rows
    }

    /// `f32` elements of one item's partial state: `max_rows × (head_dim + 2)`, where
    /// `max_rows` is the query tile (clamped to the longest entry) times the GQA group.
    /// `work_items() × partial_len()` does not overflow (checked by [`AttentionPlan::new`]).
    pub fn partial_len(&self) -> usize {
        self.partial_len
    }

    /// `f32` scratch one worker needs to run items: gathered queries, one block of scores, the
    /// key tail's scores and, for quantized keys, the prepared (quantized) queries.
    pub fn scratch_len(&self) -> usize {
        self.scratch_len
    }

    /// `f32` elements of queries (and of the output) the batch needs.
    pub fn queries_len(&self) -> usize {
        let spec = self.cache.spec();
        self.entries.iter().map(|e| e.tokens).sum::<usize>() * spec.q_heads * spec.head_dim
    }

    /// Decodes an item index. Items are ordered entry, tile, KV head, split.
    pub fn item(&self, index: usize) -> Option<WorkItem> {
        let kv_heads = self.cache.spec().kv_heads;
        let per_tile = kv_heads * self.splits;
        let mut rest = index;
        for (entry_index, entry) in self.entries.iter().enumerate() {
            let tiles = entry.tokens.div_ceil(self.query_tile);
            if rest < tiles * per_tile {
                let tile = rest / per_tile;
                let token_start = tile * self.query_tile;
                return Some(WorkItem {
                    entry: entry_index,
                    token_start,
                    tokens: (entry.tokens - token_start).min(self.query_tile),
                    kv_head: rest % per_tile / self.splits,
                    split: rest % self.splits,
                });
            }
            rest -= tiles * per_tile;
        }
        None
    }

    /// Offset, in `f32`, of an entry's first query in the concatenated queries.
    fn entry_offset(&self, entry: usize) -> usize {
        let spec = self.cache.spec();
        self.entries[..entry]
            .iter()
            .map(|e| e.tokens)
            .sum::<usize>()
            * spec.q_heads
            * spec.head_dim
    }

    /// Runs item `index`: reads its queries from `queries` (the whole batch's), leaves its
    /// partial state in `partial` (`partial_len()` elements) using `scratch`
    /// (`scratch_len()` elements).
    pub fn run_item(
        &self,
        index: usize,
        queries: &[f32],
        partial: &mut [f32],
        scratch: &mut [f32],
    ) -> Result<(), Error> {
        let item = self.item(index).ok_or(Error::BadIndex("work item"))?;
        if queries.len() != self.queries_len() {
            return Err(Error::BadShape("queries"));
        }
        if partial.len() < self.partial_len() {
            return Err(Error::BadShape("partial"));
        }
        if scratch.len() < self.scratch_len() {
            return Err(Error::ScratchTooSmall {
                needed: self.scratch_len(),
                available: scratch.len(),
            });
        }
        let spec = *self.cache.spec();
        let (head_dim, group, block_tokens) = (spec.head_dim, spec.group(), spec.block_tokens);
        let entry = self.entries[item.entry];
        let rows = item.tokens * group;
        let (query_buf, rest) = scratch.split_at_mut(self.max_rows() * head_dim);
        let query_buf = &mut query_buf[..rows * head_dim];
        let (scores_buf, rest) = rest.split_at_mut(self.max_rows() * block_tokens);
        let scores_buf = &mut scores_buf[..rows * block_tokens];
        let tail_tokens = spec.key_tail_tokens;
        let (tail_scores, prepared_buf) = rest.split_at_mut(self.max_rows() * tail_tokens);
        let tail_scores = &mut tail_scores[..rows * tail_tokens];
        let prepared_len = kernels::prepared_query_len(spec.k_format, head_dim, rows);
        let prepared = &mut kernels::scratch_bytes(prepared_buf)[..prepared_len];
        let (state, acc) = partial.split_at_mut(2 * self.max_rows());
        let (running_max, running_sum) = state.split_at_mut(self.max_rows());
        let (running_max, running_sum) = (&mut running_max[..rows], &mut running_sum[..rows]);
        let acc = &mut acc[..rows * head_dim];
        running_max.fill(f32::NEG_INFINITY);
        running_sum.fill(0.0);
        acc.fill(0.0);

        // Gather the tile's queries for this KV head, [token][head in group][head_dim], scaled.
        let base = self.entry_offset(item.entry);
        for t in 0..item.tokens {
            let from =
                base + ((item.token_start + t) * spec.q_heads + item.kv_head * group) * head_dim;
            let to = t * group * head_dim;
            for (dst, src) in query_buf[to..to + group * head_dim]
                .iter_mut()
                .zip(&queries[from..from + group * head_dim])
            {
                *dst = src * self.scale;
            }
        }
        // Keys stored in the rotated basis: rotate the queries instead (`Hq·Hk = q·k`).
        if crate::quant::rotated(spec.k_format, head_dim) {
            query_buf
                .chunks_exact_mut(head_dim)
                .for_each(crate::quant::hadamard);
        }
        // Quantized keys: quantize the queries once for the integer dot products.
        kernels::prepare_queries(spec.k_format, head_dim, query_buf, rows, prepared);
        let prepared = &*prepared;

        let first_query = entry.first_position + item.token_start;
        let last_query = first_query + item.tokens - 1;
        let needed = NeededBlocks::new(
            spec.window,
            spec.sink_tokens,
            block_tokens,
            first_query,
            last_query,
        );
        let (from, to) = split_range(needed.count(), self.splits, item.split);
        let v_row_bytes = self.cache.layout().row_bytes(Kind::V);
        let lookup = |list_index: usize| self.cache.block(entry.seq, needed.logical(list_index));
        // Each block is looked up once, one iteration ahead, so that its rows can be prefetched
        // while the current block is processed; a failed look-up is reported when its turn comes.
        // Key tail: the positions it holds are scored from their full-precision copies, all
        // at once on the first block that has any (`tail_scores`: `[rows][key_tail_tokens]`).
        let tail = self
            .cache
            .tail_rows(entry.seq, self.layer, item.kv_head)
            .filter(|(_, held)| !held.is_empty());
        let mut tail_scored = false;
        let mut next = (from < to).then(|| lookup(from));
        for list_index in from..to {
            let block = match next.take() {
                Some(block) => block?,
                None => lookup(list_index)?,
            };
            next = (list_index + 1 < to).then(|| lookup(list_index + 1));
            // The next block's rows, prefetched in three parts spread over this block's work
            // (K now, half of V after the scores, the rest before the values): one burst of
            // every line stalls on the CPU's miss buffers.
            let (next_k, next_v) = match &next {
                Some(Ok(next)) => (
                    next.rows(self.layer, Kind::K, item.kv_head),
                    next.rows(self.layer, Kind::V, item.kv_head),
                ),
                _ => (&[][..], &[][..]),
            };
            let (next_v_first, next_v_second) = next_v.split_at(next_v.len() / 128 * 64);
            kernels::prefetch(next_k);
            // Keys of this block that the tile may see at all: up to the last query.
            let keys = block.tokens.min(last_query + 1 - block.first_position);
            // Scores are computed for every slot of the block and the slots past `keys` masked,
            // so that each key's score comes out of the same kernel path whatever the tile and
            // batch: results do not depend on how a prompt was chunked or batched (except
            // through what the cache holds: int4 keys' offsets come from the first write, and a
            // key tail holds the last positions at the time of the call).
            let k_rows = block.segment(self.layer, Kind::K, item.kv_head);
            let v_rows = &block.rows(self.layer, Kind::V, item.kv_head)[..keys * v_row_bytes];
            let scores = &mut scores_buf[..rows * block_tokens];
            if spec.k_format.is_float() {
                kernels::dot_rows(spec.k_format, k_rows, head_dim, query_buf, rows, scores);
            } else {
                kernels::dot_rows_prepared(spec.k_format, k_rows, head_dim, prepared, rows, scores);
            }
            if let Some((ring, held)) = &tail {
                let slots = block.first_position..block.first_position + keys;
                let start = held.start.max(slots.start);
                let end = held.end.min(slots.end);
                if start < end {
                    if !tail_scored {
                        kernels::dot_rows(
                            KvFormat::F16,
                            ring,
                            head_dim,
                            query_buf,
                            rows,
                            tail_scores,
                        );
                        tail_scored = true;
                    }
                    for r in 0..rows {
                        for position in start..end {
                            scores[r * block_tokens + position - block.first_position] =
                                tail_scores[r * tail_tokens + position % tail_tokens];
                        }
                    }
                }
            }
            // int4 keys: the sequence's first key is held exact (it draws most of the
            // attention); its score comes from it, in the same f32 order on every path.
            if block.first_position == 0 {
                if let Some(exact) =
                    self.cache
                        .first_row(Kind::K, entry.seq, self.layer, item.kv_head)
                {
                    for (r, query) in query_buf.chunks_exact(head_dim).enumerate() {
                        scores[r * block_tokens] = query
                            .iter()
                            .zip(exact)
                            .fold(0.0f32, |sum, (&q, &k)| sum + q * f32::from_bits(k));
                    }
                }
            }
            kernels::prefetch(next_v_first);
            let mask = Mask {
                window: spec.window,
                sinks: spec.sink_tokens,
                first_key: block.first_position,
            };
            let masked = mask.needed(first_query, last_query, keys);
            for (r, row) in scores.chunks_exact_mut(block_tokens).enumerate() {
                row[keys..].fill(f32::NEG_INFINITY);
                if masked {
                    mask.apply(first_query + r / group, &mut row[..keys]);
                }
            }
            // Online softmax update, `SOFTMAX_ROWS` query rows per kernel call.
            for first in (0..rows).step_by(SOFTMAX_ROWS) {
                let n = (rows - first).min(SOFTMAX_ROWS);
                let chunk = &mut scores[first * block_tokens..(first + n) * block_tokens];
                let (mut block_max, mut sums) = ([0.0f32; SOFTMAX_ROWS], [0.0f32; SOFTMAX_ROWS]);
                kernels::softmax_rows(
                    chunk,
                    block_tokens,
                    &running_max[first..first + n],
                    &mut block_max[..n],
                    &mut sums[..n],
                );
                for i in 0..n {
                    let r = first + i;
                    // A row with nothing visible (max -inf) keeps its state; its shift only
                    // kept the `exp` harmless, and its weights are zeroed.
                    if block_max[i] == f32::NEG_INFINITY {
                        chunk[i * block_tokens..(i + 1) * block_tokens].fill(0.0);
                        continue;
                    }
                    let new_max = kernels::softmax_shift(block_max[i], running_max[r]);
                    // The max rarely moves after the first blocks: `exp(0)` is exactly 1, so
                    // skip the call (not for an infinite max, whose difference is NaN).
                    let correction = if running_max[r] == new_max && new_max.is_finite() {
                        1.0
                    } else {
                        kernels::scalar::exp(running_max[r] - new_max)
                    };
                    if correction != 1.0 {
                        for value in &mut acc[r * head_dim..(r + 1) * head_dim] {
                            *value *= correction;
                        }
                    }
                    running_sum[r] = running_sum[r] * correction + sums[i];
                    running_max[r] = new_max;
                }
            }
            // The weights of the stored keys only: `[rows][keys]` (stale slots never reach V).
            if keys < block_tokens {
                for r in 1..rows {
                    scores.copy_within(r * block_tokens..r * block_tokens + keys, r * keys);
                }
            }
            let scores = &mut scores[..rows * keys];
            kernels::prefetch(next_v_second);
            // int4 values: the sequence's first value is held exact, and it takes its weight
            // exactly: it is usually the attention sink, whose weight dwarfs the block's
            // others, and the integer weights of the kernel below are steps of the largest.
            let first_exact = (block.first_position == 0 && keys > 0)
                .then(|| {
                    self.cache
                        .first_row(Kind::V, entry.seq, self.layer, item.kv_head)
                })
                .flatten();
            let (v_rows, scores, keys) = match first_exact {
                Some(exact) => {
                    for r in 0..rows {
                        let w = scores[r * keys];
                        for (a, &x) in acc[r * head_dim..(r + 1) * head_dim].iter_mut().zip(exact) {
                            *a += w * f32::from_bits(x);
                        }
                    }
                    // The other rows' weights, `[rows][keys - 1]`.
                    for r in 0..rows {
                        scores.copy_within(r * keys + 1..(r + 1) * keys, r * (keys - 1));
                    }
                    (
                        &v_rows[v_row_bytes..],
                        &scores[..rows * (keys - 1)],
                        keys - 1,
                    )
                }
                None => (v_rows, &scores[..], keys),
            };
            debug_assert_eq!(scores.len(), rows * keys);
            // int4 values: the softmax weights meet the nibbles as 8-bit integers (see
            // `kernels::accumulate_rows_int`) unless the options ask for exact sums; other
            // formats sum them exactly.
            if self.exact_values {
                kernels::accumulate_rows(spec.v_format, v_rows, head_dim, scores, rows, acc);
            } else {
                kernels::accumulate_rows_int(spec.v_format, v_rows, head_dim, scores, rows, acc);
            }
        }
        // Values stored in the rotated basis: rotate the weighted sum back, once (it is linear,
        // so the merge of partial states is unaffected).
        if crate::quant::rotated(spec.v_format, head_dim) {
            acc.chunks_exact_mut(head_dim)
                .for_each(crate::quant::hadamard);
        }
        Ok(())
    }

    /// Merges the partial states of every item (`partials`: `work_items() × partial_len()`,
    /// item `i` at `i × partial_len()`) into `out` (same shape as the queries).
    pub fn merge(&self, partials: &[f32], out: &mut [f32]) -> Result<(), Error> {
        let partial_len = self.partial_len();
        if partials.len() < self.items * partial_len {
            return Err(Error::BadShape("partials"));
        }
        self.merge_with(
            |item| &partials[item * partial_len..(item + 1) * partial_len],
            out,
        )
    }

    /// Merges every item's partial state, fetched by `state(item)`, into `out`.
    fn merge_with<'s>(
        &self,
        state: impl Fn(usize) -> &'s [f32],
        out: &mut [f32],
    ) -> Result<(), Error> {
        if out.len() != self.queries_len() {
            return Err(Error::BadShape("out"));
        }
        for first in (0..self.items).step_by(self.splits) {
            self.merge_splits(first, &state, out)?;
        }
        Ok(())
    }

    /// Combines the `splits` partial states of one (entry, tile, head), in split order, and
    /// writes the normalised output.
    fn merge_splits<'s>(
        &self,
        first_item: usize,
        state: &impl Fn(usize) -> &'s [f32],
        out: &mut [f32],
    ) -> Result<(), Error> {
        let item = self.item(first_item).ok_or(Error::BadIndex("work item"))?;
        let spec = self.cache.spec();
        let (head_dim, group) = (spec.head_dim, spec.group());
        let max_rows = self.max_rows();
        let base = self.entry_offset(item.entry);
        let splits = first_item..first_item + self.splits;
        for r in 0..item.tokens * group {
            let (t, j) = (r / group, r % group);
            let max = splits
                .clone()
                .map(|i| state(i)[r])
                .fold(f32::NEG_INFINITY, f32::max);
            let at = base
                + ((item.token_start + t) * spec.q_heads + item.kv_head * group + j) * head_dim;
            let dst = &mut out[at..at + head_dim];
            dst.fill(0.0);
            let mut sum = 0.0f32;
            for partial in splits.clone().map(&state) {
                if partial[r] == f32::NEG_INFINITY {
                    continue;
                }
                let weight = kernels::scalar::exp(partial[r] - max);
                sum += partial[max_rows + r] * weight;
                let acc = &partial[2 * max_rows + r * head_dim..2 * max_rows + (r + 1) * head_dim];
                for (d, a) in dst.iter_mut().zip(acc) {
                    *d += a * weight;
                }
            }
            if sum > 0.0 {
                let inverse = 1.0 / sum;
                for d in dst.iter_mut() {
                    *d *= inverse;
                }
            }
        }
        Ok(())
    }
}

/// `f32` scratch [`attention`] needs for any batch with these options: one worker's scratch
/// plus a partial state per split. Independent of the context length; saturates at
/// `usize::MAX` for options too large to run (a call with them gets
/// [`Error::ScratchTooSmall`]).
pub fn attention_scratch_len(cache: &KvCache<'_>, options: &AttentionOptions) -> usize {
    let spec = cache.spec();
    let rows = options.query_tile.max(1).saturating_mul(spec.group());
    let prepared = kernels::prepared_query_len(spec.k_format, spec.head_dim, rows);
    let prepared = if prepared == usize::MAX {
        usize::MAX
    } else {
        prepared.div_ceil(4)
    };
    rows.saturating_mul(
        spec.head_dim
            .saturating_add(spec.block_tokens)
            .saturating_add(spec.key_tail_tokens),
    )
    .saturating_add(prepared)
    .saturating_add(
        rows.saturating_mul(spec.head_dim + 2)
            .saturating_mul(options.splits.max(1))
            .saturating_mul(2),
    )
}

/// Attention for a batch on the calling thread, in caller scratch (no allocation).
/// `queries` and `out` are the concatenated `[tokens][q_heads][head_dim]` of every entry;
/// `scratch` needs [`attention_scratch_len`] elements.
pub fn attention(
    cache: &KvCache<'_>,
    layer: usize,
    entries: &[BatchEntry],
    queries: &[f32],
    out: &mut [f32],
    scratch: &mut [f32],
    options: &AttentionOptions,
) -> Result<(), Error> {
    let plan = AttentionPlan::new(cache, layer, entries, options)?;
    if queries.len() != plan.queries_len() {
        return Err(Error::BadShape("queries"));
    }
    if out.len() != plan.queries_len() {
        return Err(Error::BadShape("out"));
    }
    let needed = attention_scratch_len(cache, options);
    if scratch.len() < needed {
        return Err(Error::ScratchTooSmall {
            needed,
            available: scratch.len(),
        });
    }
    let (work, partials) = scratch.split_at_mut(plan.scratch_len());
    let partial_len = plan.partial_len();
    let partials = &mut partials[..partial_len * plan.splits];
    for first in (0..plan.work_items()).step_by(plan.splits) {
        for (split, partial) in partials.chunks_exact_mut(partial_len).enumerate() {
            plan.run_item(first + split, queries, partial, work)?;
        }
        let partials = &*partials;
        plan.merge_splits(
            first,
            &|item| &partials[(item - first) * partial_len..(item - first + 1) * partial_len],
            out,
        )?;
    }
    Ok(())
}

/// Buffers for running a plan's work items on several threads (`std`): per thread, its
/// scratch and one item's partial state; per item, a slot its state is stored to. Reused
/// across calls; grows, never shrinks.
#[cfg(feature = "std")]
#[derive(Default)]
pub struct AttentionWorkspace {
    threads: std::vec::Vec<std::sync::Mutex<ThreadBuffers>>,
    /// Every item's partial state in item order, as `f32` bits, stored by whichever thread
    /// ran it (relaxed stores: `execute`'s return orders them before the merge reads them).
    slots: std::vec::Vec<core::sync::atomic::AtomicU32>,
    /// The slots read back as `f32`, for the merge.
    partials: std::vec::Vec<f32>,
}

#[cfg(feature = "std")]
#[derive(Default)]
struct ThreadBuffers {
    scratch: std::vec::Vec<f32>,
    /// The partial state of the item being run.
    partial: std::vec::Vec<f32>,
    /// Items this thread ran in the current call.
    ran: usize,
    result: Option<Error>,
}

/// Resizes `buffer` to `needed` elements, refusing (rather than aborting on) a size that
/// cannot be allocated; no allocation when it is already that large.
#[cfg(feature = "std")]
fn resize_buffer<T>(
    buffer: &mut std::vec::Vec<T>,
    needed: usize,
    fill: impl FnMut() -> T,
) -> Result<(), Error> {
    let available = buffer.len();
    if needed > available && buffer.try_reserve(needed - available).is_err() {
        return Err(Error::ScratchTooSmall { needed, available });
    }
    buffer.resize_with(needed, fill);
    Ok(())
}

#[cfg(feature = "std")]
impl AttentionWorkspace {
    /// A workspace for up to `threads` threads.
    pub fn new(threads: usize) -> Self {
        let threads = (0..threads.max(1))
            .map(|_| std::sync::Mutex::new(ThreadBuffers::default()))
            .collect();
        AttentionWorkspace {
            threads,
            slots: std::vec::Vec::new(),
            partials: std::vec::Vec::new(),
        }
    }

    /// Runs every work item of `plan` and merges them into `out`. `execute` must call the
    /// function it is given with thread indices `0..n` (`n` at most the workspace's thread
    /// count; the second argument is not used), possibly concurrently, and return when all
    /// calls have returned: a thread pool's "run on every thread". The threads claim items one
    /// at a time from a shared counter, so a thread that runs slower (a busy core, a late
    /// start) takes fewer of them; each item's state goes to its own slot and the merge is in
    /// item order, so the result is the same bits whichever thread ran which item, and for
    /// every `n`. Fails with [`Error::IncompleteRun`] when `execute` returned with items unrun
    /// (it called no thread index of the workspace).
    pub fn run(
        &mut self,
        plan: &AttentionPlan<'_, '_, '_>,
        queries: &[f32],
        out: &mut [f32],
        execute: impl FnOnce(&(dyn Fn(usize, usize) + Sync)),
    ) -> Result<(), Error> {
        use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering::Relaxed};
        if queries.len() != plan.queries_len() {
            return Err(Error::BadShape("queries"));
        }
        if out.len() != plan.queries_len() {
            return Err(Error::BadShape("out"));
        }
        let partial_len = plan.partial_len();
        let items = plan.work_items();
        // `items × partial_len` fits (checked by the plan). Sizes from huge options are
        // refused here rather than aborting on allocation; once warm, nothing allocates.
        for cell in &mut self.threads {
            cell.clear_poison();
            let buffers = cell.get_mut().unwrap_or_else(|e| e.into_inner());
            buffers.result = None;
            buffers.ran = 0;
            resize_buffer(&mut buffers.scratch, plan.scratch_len(), || 0.0)?;
            resize_buffer(&mut buffers.partial, partial_len, || 0.0)?;
        }
        resize_buffer(&mut self.slots, items * partial_len, || AtomicU32::new(0))?;
        resize_buffer(&mut self.partials, items * partial_len, || 0.0)?;
        let next = AtomicUsize::new(0);
        let (buffers, slots) = (&self.threads, &self.slots);
        let work = |thread: usize, _threads: usize| {
            let Some(cell) = buffers.get(thread) else {
                return;
            };
            let Ok(mut guard) = cell.lock() else { return };
            let buffers = &mut *guard;
            while buffers.result.is_none() {
                let item = next.fetch_add(1, Relaxed);
                if item >= items {
                    break;
                }
                if let Err(e) =
                    plan.run_item(item, queries, &mut buffers.partial, &mut buffers.scratch)
                {
                    buffers.result = Some(e);
                    break;
                }
                // `item < items`, and the slots hold `items × partial_len`.
                let slot = &slots[item * partial_len..(item + 1) * partial_len];
                for (slot, value) in slot.iter().zip(&buffers.partial) {
                    slot.store(value.to_bits(), Relaxed);
                }
                buffers.ran += 1;
            }
        };
        execute(&work);
        // Every call has returned: the buffers are reached without locking.
        let mut ran = 0;
        for cell in &mut self.threads {
            let buffers = cell
                .get_mut()
                .map_err(|_| Error::BadIndex("poisoned thread buffer"))?;
            if let Some(error) = buffers.result {
                return Err(error);
            }
            ran += buffers.ran;
        }
        // Each item is claimed once, so `ran == items` means every one of them ran.
        if ran != items {
            return Err(Error::IncompleteRun);
        }
        for (value, slot) in self.partials.iter_mut().zip(&self.slots) {
            *value = f32::from_bits(slot.load(Relaxed));
        }
        let partials = &self.partials;
        plan.merge_with(
            |item| &partials[item * partial_len..(item + 1) * partial_len],
            out,
        )
    }
}

/// Attention for a batch with its work items spread over `threads` scoped threads (`std`).
/// The result is bitwise the same for every thread count.
#[cfg(feature = "std")]
pub fn attention_threaded(
    cache: &KvCache<'_>,
    layer: usize,
    entries: &[BatchEntry],
    queries: &[f32],
    out: &mut [f32],
    threads: usize,
    options: &AttentionOptions,
) -> Result<(), Error> {
    let plan = AttentionPlan::new(cache, layer, entries, options)?;
    let threads = threads.max(1);
    let mut workspace = AttentionWorkspace::new(threads);
    workspace.run(&plan, queries, out, |work| {
        std::thread::scope(|scope| {
            for thread in 1..threads {
                scope.spawn(move || work(thread, threads));
            }
            work(0, threads);
        })
    })
}

/// Key splits per (sequence, KV head) for decode on `threads` threads: the work items are a
/// multiple of the thread count and at least four per thread (so that threads claiming them
/// can even out), and no split is smaller than one block (`blocks`: the longest sequence's
/// blocks).
pub fn auto_splits(batch: usize, kv_heads: usize, threads: usize, blocks: usize) -> usize {
    let base = batch.saturating_mul(kv_heads).max(1);
    let threads = threads.max(1);
    let mut splits = (4 * threads).div_ceil(base).max(1);
    while !(base * splits).is_multiple_of(threads) {
        splits += 1;
    }
    splits.min(blocks.max(1))
}

/// Query rows whose softmax update one [`kernels::softmax_rows`] call makes (a stack
/// buffer of this many maxima and sums; more rows take more calls).
const SOFTMAX_ROWS: usize = 16;

/// First key position the query at `position` sees in the window, and whether sinks apply.
fn key_window(window: usize, sinks: usize, position: usize) -> (usize, bool) {
    if window == 0 || position < window {
        (0, false)
    } else {
        (position + 1 - window, sinks > 0)
    }
}

/// The logical blocks a tile of queries needs, in order: sink blocks (when the window has
/// moved past them), then the blocks from the first query's window start to the last query.
struct NeededBlocks {
    sink_blocks: usize,
    first: usize,
    last: usize,
}

impl NeededBlocks {
    fn new(
        window: usize,
        sinks: usize,
        block_tokens: usize,
        first_query: usize,
        last_query: usize,
    ) -> Self {
        let (start, with_sinks) = key_window(window, sinks, first_query);
        let first = start / block_tokens;
        let sink_blocks = if with_sinks {
            sinks.div_ceil(block_tokens).min(first)
        } else {
            0
        };
        NeededBlocks {
            sink_blocks,
            first,
            last: last_query / block_tokens,
        }
    }

    fn count(&self) -> usize {
        self.sink_blocks + (self.last + 1 - self.first)
    }

    fn logical(&self, index: usize) -> usize {
        if index < self.sink_blocks {
            index
        } else {
            self.first + index - self.sink_blocks
        }
    }
}

/// The `split`-th of `splits` near-equal contiguous parts of `0..count`.
fn split_range(count: usize, splits: usize, split: usize) -> (usize, usize) {
    // In `u128`, so that no `count × split` overflows (both are `usize`).
    let at = |k: usize| (count as u128 * k as u128 / splits.max(1) as u128) as usize;
    (at(split), at(split + 1))
}

/// Causal and window masking of one block's scores.
struct Mask {
    window: usize,
    sinks: usize,
    first_key: usize,
}

impl Mask {
    fn visible(&self, query: usize, key: usize) -> bool {
        key <= query && (self.window == 0 || query - key < self.window || key < self.sinks)
    }

    /// True when some key of the block is hidden from some query of `first..=last`.
    fn needed(&self, first: usize, last: usize, keys: usize) -> bool {
        let last_key = self.first_key + keys - 1;
        let causal_ok = last_key <= first;
        let window_ok = self.window == 0
            || last < self.first_key
            || last - self.first_key < self.window
            || last_key < self.sinks;
        !(causal_ok && window_ok)
    }

    fn apply(&self, query: usize, scores: &mut [f32]) {
        for (i, score) in scores.iter_mut().enumerate() {
            if !self.visible(query, self.first_key + i) {
                *score = f32::NEG_INFINITY;
            }
        }
    }
}

/// `sqrt` without `std` (Newton's method from a bit-level first guess; exact to an ulp or two,
/// used once per plan).
fn libm_sqrt(x: f32) -> f32 {
    if x <= 0.0 || !x.is_finite() {
        return if x == 0.0 { 0.0 } else { f32::NAN };
    }
    let mut y = f32::from_bits((x.to_bits() >> 1) + 0x1fc0_0000);
    for _ in 0..4 {
        y = 0.5 * (y + x / y);
    }
    y
}
