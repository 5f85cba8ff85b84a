//! Sequences and their page tables over the block pool: the KV cache proper.
//!
//! Each live sequence has a length (tokens reserved so far) and a page table mapping logical
//! block `i` (positions `i·block_tokens ..`) to a physical block. The usual step is
//! [`KvCache::reserve`] (make room for `n` new tokens, allocating blocks) followed, per layer,
//! by [`KvCache::write`] of each new token's K and V rows, and then attention over the
//! sequence (see [`crate::attention`]).
//!
//! Blocks are shared by [`KvCache::fork`] and copied on the first write into a shared block
//! (copy-on-write); [`KvCache::reserve`] already copies a shared partial tail block, so that
//! the writes that follow a successful reserve cannot run out of blocks. With a sliding window
//! in the spec, blocks that no future query can see are returned to the pool as the sequence
//! grows (sink blocks are kept).
//!
//! Every operation validates all of its input before it changes anything: an `Err` means the
//! cache, the pool and every sequence's data are exactly as before the call.
//!
//! int4 keys are stored minus per-(sequence, layer, KV head) channel offsets that the
//! sequence's first write to each layer fixes (the mean of its keys); see
//! [`KvCache::key_offsets`] and [`crate::quant`]. A sequence's results never depend on other
//! sequences. For the best offsets, write a layer's first keys as a multi-token run (a
//! prefill) rather than one token: a single token's key is a poor estimate of the mean.
//!
//! With a key tail ([`CacheSpec::key_tail_tokens`], quantized keys only), each sequence also
//! keeps `f16` copies of its last `key_tail_tokens` keys in a ring beside the blocks, and
//! attention and [`KvCache::read_row`] use them for those positions; see
//! [`KvCache::tail_rows`] for exactly which positions a ring holds.

use core::ops::Range;

use crate::arena::carve;
use crate::error::Error;
use crate::format::KvFormat;
use crate::kernels;
use crate::pool::{BlockId, BlockPool};
use crate::spec::{CacheSpec, Kind, Layout, SEQ_WORDS};

pub mod snapshot;

/// Page-table entry of a logical block that holds no physical block (evicted by the window,
/// or past the sequence's end); [`KvCache::page_table`] shows it for evicted blocks.
pub const NO_BLOCK: u32 = u32::MAX;

// Words of a sequence-table entry.
const GENERATION: usize = 0;
const LIVE: usize = 1;
const LEN: usize = 2;
const EVICT_END: usize = 3;
/// Key tail: the ring holds every written position from `max(TAIL_FROM, len - key_tail_tokens)`
/// to `len` (see [`KvCache::tail_rows`]).
const TAIL_FROM: usize = 4;

/// Handle of a sequence: a slot index and the slot's generation, so that an id kept after
/// [`KvCache::remove`] is refused instead of naming the slot's next occupant. Each cache starts
/// its generations at its own value (see `generation_salt`), so an id from another cache is
/// refused too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SeqId {
    slot: u32,
    generation: u32,
}

impl SeqId {
    /// The sequence-table slot (below the spec's `max_seqs`).
    pub const fn slot(self) -> usize {
        self.slot as usize
    }

    /// Packs the id into one integer (for the C ABI); see [`SeqId::from_raw`].
    pub const fn to_raw(self) -> u64 {
        ((self.generation as u64) << 32) | self.slot as u64
    }

    /// Unpacks an id made by [`SeqId::to_raw`]. Any value is accepted; a wrong one is refused
    /// by the cache with [`Error::UnknownSequence`].
    pub const fn from_raw(raw: u64) -> SeqId {
        SeqId {
            slot: raw as u32,
            generation: (raw >> 32) as u32,
        }
    }
}

/// Where a new cache starts the generation counters of its slots: the arena's address and a
/// count of caches built so far, mixed so that any two differ in about half their bits. Two
/// caches alive at once have different arenas, and a cache rebuilt in the same arena has a new
/// count (on targets without 32-bit atomics, only the address), so an id from another cache
/// meets a generation that its slot would reach only after billions of sequences.
fn generation_salt(arena: *const u8) -> u32 {
    #[cfg(target_has_atomic = "32")]
    let built = {
        use core::sync::atomic::{AtomicU32, Ordering};
        static BUILT: AtomicU32 = AtomicU32::new(0);
        BUILT.fetch_add(1, Ordering::Relaxed)
    };
    #[cfg(not(target_has_atomic = "32"))]
    let built = 0u32;
    let address = arena as usize as u64;
    let mixed = (address ^ (address >> 31)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ u64::from(built).wrapping_mul(0xd6e8_feb8_6659_fd93);
    (mixed >> 32) as u32 ^ mixed as u32
}

/// Accounting for the whole cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Live sequences.
    pub sequences: usize,
    /// Physical blocks in the pool.
    pub blocks_total: usize,
    /// Blocks on the free stack.
    pub blocks_free: usize,
    /// Blocks referenced by at least one sequence.
    pub blocks_used: usize,
    /// Bytes of one block.
    pub block_bytes: usize,
    /// Bytes of blocks in use (`blocks_used × block_bytes`).
    pub bytes_used: usize,
    /// Tokens over all live sequences (a shared prefix counts once per sequence).
    pub tokens: usize,
    /// Token slots in used blocks that hold no token of any sequence (partly filled blocks).
    pub waste_slots: usize,
}

/// Accounting for one sequence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeqStats {
    /// Tokens reserved (positions `0..len`).
    pub len: usize,
    /// Tokens still stored (fewer than `len` when the window evicted some).
    pub stored_tokens: usize,
    /// Physical blocks its page table references.
    pub blocks: usize,
    /// Of those, blocks shared with another sequence.
    pub shared_blocks: usize,
    /// Slots in its blocks past its tokens.
    pub waste_slots: usize,
    /// `blocks × block_bytes`.
    pub bytes: usize,
}

/// One block of a sequence as the attention kernels stream it.
#[derive(Clone, Copy, Debug)]
pub struct BlockRef<'c> {
    layout: &'c Layout,
    data: &'c [u8],
    /// Position of the block's first slot.
    pub first_position: usize,
    /// Slots of this block that hold the sequence's tokens (1..=block_tokens).
    pub tokens: usize,
}

impl<'c> BlockRef<'c> {
    /// The `tokens` stored rows of (layer, kind, head), contiguous:
    /// `tokens × row_bytes(kind)` bytes. Indices out of range give an empty slice.
    pub fn rows(&self, layer: usize, kind: Kind, kv_head: usize) -> &'c [u8] {
        let spec = self.layout.spec();
        if layer >= spec.layers || kv_head >= spec.kv_heads {
            return &[];
        }
        let start = self.layout.segment_offset(layer, kind, kv_head);
        let len = self.tokens * self.layout.row_bytes(kind);
        self.data.get(start..start + len).unwrap_or(&[])
    }
}

impl<'c> BlockRef<'c> {
    /// All `block_tokens` stored rows of (layer, kind, head), including slots past the
    /// sequence's tokens (whose bytes are stale: callers mask them). Indices out of range give
    /// an empty slice.
    pub fn segment(&self, layer: usize, kind: Kind, kv_head: usize) -> &'c [u8] {
        let spec = self.layout.spec();
        if layer >= spec.layers || kv_head >= spec.kv_heads {
            return &[];
        }
        let start = self.layout.segment_offset(layer, kind, kv_head);
        let len = spec.block_tokens * self.layout.row_bytes(kind);
        self.data.get(start..start + len).unwrap_or(&[])
    }
}

/// The KV cache: a block pool, a sequence table and page tables, all inside one arena.
pub struct KvCache<'a> {
    layout: Layout,
    /// `blocks × block_bytes`, block `b` at `b·block_bytes`.
    data: &'a mut [u8],
    pool: BlockPool<'a>,
    /// Key tail rings ([`Layout::tail_bytes`]): per sequence slot, layer and KV head,
    /// `key_tail_tokens` `f16` rows; empty without a tail.
    tail: &'a mut [u8],
    /// `max_seqs × SEQ_WORDS`: generation, live flag, length, window eviction end, tail start.
    seq_table: &'a mut [u32],
    /// `max_seqs × max_blocks_per_seq` physical block ids (`NO_BLOCK` when none).
    page_tables: &'a mut [u32],
    /// One word per block, used by [`KvCache::check_invariants`].
    scratch: &'a mut [u32],
    /// int4 keys only (empty otherwise): per sequence slot and layer, `1` once its key
    /// offsets are set.
    offsets_set: &'a mut [u32],
    /// int4 keys only: `max_seqs × layers × kv_heads × head_dim` key offsets (`f32` bits), in
    /// the basis the rows are stored in (see [`KvCache::key_offsets`]).
    key_offsets: &'a mut [u32],
    /// int4 keys only: the same shape, the first token's keys minus the offsets, exact
    /// (`f32` bits): attention and reads use them instead of its int4 row.
    first_keys: &'a mut [u32],
    /// int4 values only (empty otherwise): `max_seqs × layers × kv_heads × head_dim`, the
    /// first token's values exact (`f32` bits, stored basis): attention and reads use them
    /// instead of its int4 row.
    first_values: &'a mut [u32],
    live: usize,
    /// Logical blocks at the start of each sequence that hold sink tokens (never evicted).
    sink_blocks: usize,
    /// Address and length in bytes of the arena the cache was built on.
    arena_span: (usize, usize),
}

impl<'a> KvCache<'a> {
    /// Builds a cache with as many blocks as fit in `arena` (any alignment).
    pub fn new(spec: CacheSpec, arena: &'a mut [u8]) -> Result<Self, Error> {
        let layout = Layout::new(spec)?;
        let blocks = layout.blocks_fitting(arena.len());
        if blocks == 0 {
            let needed = layout.arena_bytes(1)?;
            return Err(Error::ArenaTooSmall {
                needed,
                available: arena.len(),
            });
        }
        Self::with_blocks(spec, blocks, arena)
    }

    /// Builds a cache of exactly `blocks` blocks; `arena` needs
    /// [`Layout::arena_bytes`]`(blocks)` bytes.
    pub fn with_blocks(spec: CacheSpec, blocks: usize, arena: &'a mut [u8]) -> Result<Self, Error> {
        kernels::choose();
        let layout = Layout::new(spec)?;
        if blocks == 0 {
            return Err(Error::ZeroDimension("blocks"));
        }
        let needed = layout.arena_bytes(blocks)?;
        let available = arena.len();
        let data_bytes = blocks * layout.block_bytes() + layout.tail_bytes();
        let seq_words = spec.max_seqs * SEQ_WORDS;
        let table_words = spec.max_seqs * layout.max_blocks_per_seq();
        let offset_words = layout.key_offset_words().ok_or(Error::SizeOverflow)?;
        let value_words = layout.first_value_words().ok_or(Error::SizeOverflow)?;
        let words = 3 * blocks + seq_words + table_words + offset_words + value_words;
        let salt = generation_salt(arena.as_ptr());
        let arena_span = (arena.as_ptr() as usize, arena.len());
        let regions = carve(arena, data_bytes, words)
            .map_err(|_| Error::ArenaTooSmall { needed, available })?;
        let (refcounts, rest) = regions.words.split_at_mut(blocks);
        let (free_stack, rest) = rest.split_at_mut(blocks);
        let (scratch, rest) = rest.split_at_mut(blocks);
        let (seq_table, rest) = rest.split_at_mut(seq_words);
        let (page_tables, rest) = rest.split_at_mut(table_words);
        let (offsets, first_values) = rest.split_at_mut(offset_words);
        let flags = if offset_words == 0 {
            0
        } else {
            spec.max_seqs * spec.layers
        };
        let (offsets_set, rest) = offsets.split_at_mut(flags);
        let (key_offsets, first_keys) = rest.split_at_mut(rest.len() / 2);
        for words in seq_table.chunks_exact_mut(SEQ_WORDS) {
            words.copy_from_slice(&[salt, 0, 0, 0, 0]);
        }
        page_tables.fill(NO_BLOCK);
        offsets_set.fill(0);
        key_offsets.fill(0);
        first_keys.fill(0);
        first_values.fill(0);
        let sink_blocks = if spec.window == 0 {
            0
        } else {
            spec.sink_tokens.div_ceil(spec.block_tokens)
        };
        let (data, tail) = regions.data.split_at_mut(blocks * layout.block_bytes());
        // Zeros, so that a held position reserved but never written reads finite.
        tail.fill(0);
        Ok(KvCache {
            layout,
            data,
            tail,
            pool: BlockPool::new(refcounts, free_stack),
            seq_table,
            page_tables,
            scratch,
            offsets_set,
            key_offsets,
            first_keys,
            first_values,
            live: 0,
            sink_blocks,
            arena_span,
        })
    }

    /// Address and length in bytes of the memory the cache was built on (for the C ABI, which
    /// refuses caller buffers that overlap it).
    pub(crate) fn arena_span(&self) -> (usize, usize) {
        self.arena_span
    }

    /// The derived layout (sizes and strides).
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The spec the cache was built with.
    pub fn spec(&self) -> &CacheSpec {
        self.layout.spec()
    }

    /// Physical blocks in the pool.
    pub fn capacity_blocks(&self) -> usize {
        self.pool.capacity()
    }

    /// Free blocks in the pool.
    pub fn free_blocks(&self) -> usize {
        self.pool.free_count()
    }

    // ----- sequence table -------------------------------------------------------------------

    fn words(&self, slot: usize) -> &[u32] {
        &self.seq_table[slot * SEQ_WORDS..(slot + 1) * SEQ_WORDS]
    }

    fn words_mut(&mut self, slot: usize) -> &mut [u32] {
        &mut self.seq_table[slot * SEQ_WORDS..(slot + 1) * SEQ_WORDS]
    }

    fn table(&self, slot: usize) -> &[u32] {
        let per = self.layout.max_blocks_per_seq();
        &self.page_tables[slot * per..(slot + 1) * per]
    }

    fn table_mut(&mut self, slot: usize) -> &mut [u32] {
        let per = self.layout.max_blocks_per_seq();
        &mut self.page_tables[slot * per..(slot + 1) * per]
    }

    /// The slot of a live sequence, or `UnknownSequence`.
    fn slot_of(&self, seq: SeqId) -> Result<usize, Error> {
        let slot = seq.slot();
        if slot >= self.spec().max_seqs {
            return Err(Error::UnknownSequence);
        }
        let words = self.words(slot);
        if words[LIVE] != 1 || words[GENERATION] != seq.generation {
            return Err(Error::UnknownSequence);
        }
        Ok(slot)
    }

    fn len_of(&self, slot: usize) -> usize {
        self.words(slot)[LEN] as usize
    }

    /// Logical blocks `sink_blocks .. evict_end` of the slot were dropped by the window.
    fn evicted_range(&self, slot: usize) -> Range<usize> {
        let end = self.words(slot)[EVICT_END] as usize;
        self.sink_blocks..end.max(self.sink_blocks)
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.spec().block_tokens)
    }

    /// Adds an empty sequence.
    pub fn add_sequence(&mut self) -> Result<SeqId, Error> {
        let slot = self.free_slot()?;
        let words = self.words_mut(slot);
        let generation = words[GENERATION].wrapping_add(1);
        words.copy_from_slice(&[generation, 1, 0, 0, 0]);
        self.reset_int4_state(slot, None);
        self.live += 1;
        Ok(SeqId {
            slot: slot as u32,
            generation,
        })
    }

    fn free_slot(&self) -> Result<usize, Error> {
        (0..self.spec().max_seqs)
            .find(|&slot| self.words(slot)[LIVE] == 0)
            .ok_or(Error::TooManySequences)
    }

    /// Live sequences.
    pub fn sequences(&self) -> usize {
        self.live
    }

    /// Tokens reserved in the sequence (the next token goes to this position).
    pub fn len(&self, seq: SeqId) -> Result<usize, Error> {
        Ok(self.len_of(self.slot_of(seq)?))
    }

    /// True when the id names a live sequence.
    pub fn contains(&self, seq: SeqId) -> bool {
        self.slot_of(seq).is_ok()
    }

    // ----- growing ---------------------------------------------------------------------------

    /// Blocks that reserving `n` more tokens in `slot` takes from the pool (new blocks plus a
    /// copy of a shared partial tail block), and the new length.
    fn reserve_cost(&self, slot: usize, n: usize) -> Result<(usize, usize), Error> {
        let len = self.len_of(slot);
        let max = self.spec().max_seq_tokens;
        let new_len = len
            .checked_add(n)
            .filter(|&l| l <= max)
            .ok_or(Error::TooLong {
                requested: len.saturating_add(n),
                max,
            })?;
        let old_blocks = self.blocks_for(len);
        let mut cost = self.blocks_for(new_len) - old_blocks;
        if n > 0 && !len.is_multiple_of(self.spec().block_tokens) {
            let tail = self.table(slot)[old_blocks - 1];
            if self.pool.refcount(BlockId(tail)) > 1 {
                cost += 1;
            }
        }
        Ok((cost, new_len))
    }

    /// Makes room for `n` new tokens at the end of `seq` and returns their positions. After it
    /// succeeds, writing those positions never needs another block.
    pub fn reserve(&mut self, seq: SeqId, n: usize) -> Result<Range<usize>, Error> {
        let slot = self.slot_of(seq)?;
        let (cost, new_len) = self.reserve_cost(slot, n)?;
        if cost > self.pool.free_count() {
            return Err(Error::OutOfBlocks {
                needed: cost,
                free: self.pool.free_count(),
            });
        }
        Ok(self.apply_reserve(slot, new_len))
    }

    /// Reserves `n` tokens in each sequence of a ragged batch, all or nothing.
    pub fn reserve_batch(&mut self, requests: &[(SeqId, usize)]) -> Result<(), Error> {
        let mut total = 0usize;
        for (i, &(seq, n)) in requests.iter().enumerate() {
            let slot = self.slot_of(seq)?;
            if requests[..i].iter().any(|&(other, _)| other == seq) {
                return Err(Error::DuplicateSequence);
            }
            let (cost, _) = self.reserve_cost(slot, n)?;
            total = total.saturating_add(cost);
        }
        if total > self.pool.free_count() {
            return Err(Error::OutOfBlocks {
                needed: total,
                free: self.pool.free_count(),
            });
        }
        for &(seq, n) in requests {
            // Validated above: cannot fail, and the pool holds enough blocks for all.
            let slot = self.slot_of(seq)?;
            let (_, new_len) = self.reserve_cost(slot, n)?;
            self.apply_reserve(slot, new_len);
        }
        Ok(())
    }

    /// Grows `slot` to `new_len`; the caller has checked that the pool has the blocks.
    fn apply_reserve(&mut self, slot: usize, new_len: usize) -> Range<usize> {
        let len = self.len_of(slot);
        let old_blocks = self.blocks_for(len);
        if new_len > len && !len.is_multiple_of(self.spec().block_tokens) {
            // Cannot fail: counted in the cost.
            let _ = self.make_private(slot, old_blocks - 1);
        }
        for logical in old_blocks..self.blocks_for(new_len) {
            let block = self.pool.allocate().map_or(NO_BLOCK, |b| b.0);
            self.table_mut(slot)[logical] = block;
        }
        self.words_mut(slot)[LEN] = new_len as u32;
        // Reserving nothing changes nothing (not even what the window keeps).
        if new_len > len {
            self.evict_outside_window(slot, len);
        }
        len..new_len
    }

    /// With a window, drops the blocks that no query at position `>= from` can see.
    fn evict_outside_window(&mut self, slot: usize, from: usize) {
        let window = self.spec().window;
        if window == 0 || from < window {
            return;
        }
        // Queries at `from` and later see keys from `from + 1 - window` on.
        let first_visible = from + 1 - window;
        let new_end = first_visible / self.spec().block_tokens;
        let range = self.evicted_range(slot);
        for logical in range.end..new_end {
            let block = core::mem::replace(&mut self.table_mut(slot)[logical], NO_BLOCK);
            if block != NO_BLOCK {
                self.pool.release(BlockId(block));
            }
        }
        if new_end > range.end {
            self.words_mut(slot)[EVICT_END] = new_end as u32;
        }
    }

    /// Copies logical block `logical` of `slot` to a fresh block if it is shared.
    fn make_private(&mut self, slot: usize, logical: usize) -> Result<(), Error> {
        let shared = self.table(slot)[logical];
        if self.pool.refcount(BlockId(shared)) <= 1 {
            return Ok(());
        }
        let fresh = self
            .pool
            .allocate()
            .ok_or(Error::OutOfBlocks { needed: 1, free: 0 })?;
        let block_bytes = self.layout.block_bytes();
        let from = shared as usize * block_bytes;
        self.data
            .copy_within(from..from + block_bytes, fresh.index() * block_bytes);
        self.pool.release(BlockId(shared));
        self.table_mut(slot)[logical] = fresh.0;
        Ok(())
    }

    // ----- writing and reading ---------------------------------------------------------------

    /// Checks a run of `tokens` positions from `first` in `slot` for writing and returns the
    /// logical blocks it touches.
    fn check_run(&self, slot: usize, first: usize, tokens: usize) -> Result<Range<usize>, Error> {
        let len = self.len_of(slot);
        let end = first
            .checked_add(tokens)
            .filter(|&e| e <= len && tokens > 0);
        let end = end.ok_or(Error::BadPosition {
            position: first.saturating_add(tokens),
            len,
        })?;
        let block_tokens = self.spec().block_tokens;
        let blocks = first / block_tokens..end.div_ceil(block_tokens);
        let evicted = self.evicted_range(slot);
        if !evicted.is_empty() && blocks.start < evicted.end && evicted.start < blocks.end {
            let position = first.max(evicted.start * block_tokens);
            return Err(Error::Evicted { position });
        }
        Ok(blocks)
    }

    /// Stores one token's keys and values for one layer. `k` and `v` are
    /// `[kv_heads][head_dim]`; `position` must be below the sequence's length.
    pub fn write(
        &mut self,
        seq: SeqId,
        layer: usize,
        position: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), Error> {
        self.write_run(seq, layer, position, k, v)
    }

    /// Stores keys and values for a run of consecutive tokens of one layer, starting at
    /// `first`. `k` and `v` are `[tokens][kv_heads][head_dim]`. Shared blocks in the run are
    /// copied first (copy-on-write); if the pool cannot supply the copies nothing is written.
    pub fn write_run(
        &mut self,
        seq: SeqId,
        layer: usize,
        first: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), Error> {
        let slot = self.slot_of(seq)?;
        let spec = *self.spec();
        if layer >= spec.layers {
            return Err(Error::BadIndex("layer"));
        }
        let token_elems = spec.kv_heads * spec.head_dim;
        if !k.len().is_multiple_of(token_elems) || k.is_empty() {
            return Err(Error::BadShape("k"));
        }
        if v.len() != k.len() {
            return Err(Error::BadShape("v"));
        }
        for format in [spec.k_format, spec.v_format] {
            if !format.is_float() && k.iter().chain(v).any(|x| !x.is_finite()) {
                return Err(Error::NonFinite);
            }
        }
        let tokens = k.len() / token_elems;
        let blocks = self.check_run(slot, first, tokens)?;
        let copies = blocks
            .clone()
            .filter(|&b| self.pool.refcount(BlockId(self.table(slot)[b])) > 1)
            .count();
        if copies > self.pool.free_count() {
            return Err(Error::OutOfBlocks {
                needed: copies,
                free: self.pool.free_count(),
            });
        }
        for logical in blocks {
            self.make_private(slot, logical)?;
        }
        let (flag, offsets_at) = self.offsets_index(slot, layer);
        if spec.k_format == KvFormat::Int4 && self.offsets_set[flag] == 0 {
            self.set_key_offsets(slot, layer, k);
        }
        // Empty unless the keys are int4.
        let layer_offsets = self
            .key_offsets
            .get(offsets_at..offsets_at + spec.kv_heads * spec.head_dim)
            .unwrap_or(&[]);
        // Positions the key tail ring keeps: the last `key_tail_tokens` of the sequence.
        let tail_first = self.len_of(slot).saturating_sub(spec.key_tail_tokens);
        let ring_at = self.ring_offset(slot, layer, 0);
        let (ring_bytes, tail_row_bytes) = (self.layout.tail_ring_bytes(), 2 * spec.head_dim);
        for (t, (k_token, v_token)) in k
            .chunks_exact(token_elems)
            .zip(v.chunks_exact(token_elems))
            .enumerate()
        {
            let position = first + t;
            let in_tail = spec.key_tail_tokens != 0 && position >= tail_first;
            let block = self.table(slot)[position / spec.block_tokens] as usize;
            let base = block * self.layout.block_bytes();
            let slot_in_block = position % spec.block_tokens;
            for (kind, values, format) in [
                (Kind::K, k_token, spec.k_format),
                (Kind::V, v_token, spec.v_format),
            ] {
                let row_bytes = self.layout.row_bytes(kind);
                for (head, row) in values.chunks_exact(spec.head_dim).enumerate() {
                    let at = base + self.layout.row_offset(layer, kind, head, slot_in_block);
                    let dst = &mut self.data[at..at + row_bytes];
                    let mut buffer = [0.0f32; crate::quant::MAX_ROTATED_DIM];
                    let stored = if crate::quant::rotated(format, spec.head_dim) {
                        let rotated = &mut buffer[..spec.head_dim];
                        let limit = crate::quant::ROTATION_INPUT_LIMIT;
                        for (r, &x) in rotated.iter_mut().zip(row) {
                            *r = x.clamp(-limit, limit);
                        }
                        crate::quant::hadamard(rotated);
                        &*rotated
                    } else {
                        row
                    };
                    if kind == Kind::K && in_tail {
                        let at = ring_at
                            + head * ring_bytes
                            + position % spec.key_tail_tokens * tail_row_bytes;
                        let offsets = (format == KvFormat::Int4)
                            .then(|| &layer_offsets[head * spec.head_dim..][..spec.head_dim]);
                        encode_tail_row(stored, offsets, &mut self.tail[at..at + tail_row_bytes]);
                    }
                    if kind == Kind::K && format == KvFormat::Int4 {
                        let offsets = &layer_offsets[head * spec.head_dim..][..spec.head_dim];
                        if position == 0 {
                            let at = offsets_at + head * spec.head_dim;
                            let exact = &mut self.first_keys[at..at + spec.head_dim];
                            for ((e, &x), &o) in exact.iter_mut().zip(stored).zip(offsets) {
                                let shifted = x - f32::from_bits(o);
                                *e = shifted
                                    .clamp(-crate::quant::SATURATE, crate::quant::SATURATE)
                                    .to_bits();
                            }
                        }
                        crate::quant::encode_int4_shifted(
                            stored,
                            |d| f32::from_bits(offsets[d]),
                            dst,
                        );
                    } else {
                        if kind == Kind::V && format == KvFormat::Int4 && position == 0 {
                            let at = offsets_at + head * spec.head_dim;
                            let exact = &mut self.first_values[at..at + spec.head_dim];
                            for (e, &x) in exact.iter_mut().zip(stored) {
                                *e = x.to_bits();
                            }
                        }
                        kernels::encode_row(format, stored, dst);
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads one stored row back as `f32` (`out.len() == head_dim`): the values attention
    /// uses (for a key the key tail holds, its `f16` copy rather than its quantized row).
    pub fn read_row(
        &self,
        seq: SeqId,
        layer: usize,
        kind: Kind,
        kv_head: usize,
        position: usize,
        out: &mut [f32],
    ) -> Result<(), Error> {
        let slot = self.slot_of(seq)?;
        let spec = self.spec();
        if layer >= spec.layers {
            return Err(Error::BadIndex("layer"));
        }
        if kv_head >= spec.kv_heads {
            return Err(Error::BadIndex("kv_head"));
        }
        if out.len() != spec.head_dim {
            return Err(Error::BadShape("out"));
        }
        self.check_run(slot, position, 1)?;
        let block = self.table(slot)[position / spec.block_tokens] as usize;
        let at = block * self.layout.block_bytes()
            + self
                .layout
                .row_offset(layer, kind, kv_head, position % spec.block_tokens);
        let format: KvFormat = self.layout.format(kind);
        kernels::decode_row(
            format,
            &self.data[at..at + self.layout.row_bytes(kind)],
            out,
        );
        if kind == Kind::K && spec.key_tail_tokens != 0 && position >= self.tail_start(slot) {
            // Held in the key tail: the full-precision copy (minus the int4 offsets).
            let row_bytes = 2 * spec.head_dim;
            let at = self.ring_offset(slot, layer, kv_head)
                + position % spec.key_tail_tokens * row_bytes;
            kernels::decode_row(KvFormat::F16, &self.tail[at..at + row_bytes], out);
        }
        if kind == Kind::K && format == KvFormat::Int4 {
            let at = self.offsets_index(slot, layer).1 + kv_head * spec.head_dim;
            if position == 0 {
                for (x, &exact) in out.iter_mut().zip(&self.first_keys[at..at + spec.head_dim]) {
                    *x = f32::from_bits(exact);
                }
            }
            let offsets = &self.key_offsets[at..at + spec.head_dim];
            for (x, &offset) in out.iter_mut().zip(offsets) {
                *x += f32::from_bits(offset);
            }
        }
        if kind == Kind::V && format == KvFormat::Int4 && position == 0 {
            let at = self.offsets_index(slot, layer).1 + kv_head * spec.head_dim;
            for (x, &exact) in out
                .iter_mut()
                .zip(&self.first_values[at..at + spec.head_dim])
            {
                *x = f32::from_bits(exact);
            }
        }
        if crate::quant::rotated(format, spec.head_dim) {
            crate::quant::hadamard(out);
        }
        Ok(())
    }

    /// Clears `slot`'s int4 state — key offsets and their flags, exact first keys and values —
    /// for a new sequence, or copies `from`'s for a fork (which shares its parent's rows).
    /// The arrays are empty for formats other than int4.
    fn reset_int4_state(&mut self, slot: usize, from: Option<usize>) {
        let layers = self.spec().layers;
        let (first, end) = (
            self.offsets_index(slot, 0),
            self.offsets_index(slot, layers),
        );
        let source = from.map(|parent| self.offsets_index(parent, 0));
        reset_words(self.offsets_set, first.0..end.0, source.map(|s| s.0));
        for words in [
            &mut *self.key_offsets,
            &mut *self.first_keys,
            &mut *self.first_values,
        ] {
            reset_words(words, first.1..end.1, source.map(|s| s.1));
        }
    }

    /// int4 rows: the exact first key (minus the key offsets) or value of `seq`'s `layer` and
    /// `kv_head`, in the stored (rotated) basis, as `f32` bits; attention uses it for
    /// position 0. `None` when that kind is not stored as int4.
    pub(crate) fn first_row(
        &self,
        kind: Kind,
        seq: SeqId,
        layer: usize,
        kv_head: usize,
    ) -> Option<&[u32]> {
        let rows = match kind {
            Kind::K => &*self.first_keys,
            Kind::V => &*self.first_values,
        };
        if rows.is_empty() {
            return None;
        }
        let slot = self.slot_of(seq).ok()?;
        let spec = self.spec();
        if layer >= spec.layers || kv_head >= spec.kv_heads {
            return None;
        }
        let at = self.offsets_index(slot, layer).1 + kv_head * spec.head_dim;
        rows.get(at..at + spec.head_dim)
    }

    /// Bytes of one sequence slot's key tail rings (every layer and KV head).
    fn slot_tail_bytes(&self) -> usize {
        self.layout.tail_ring_bytes() * self.spec().layers * self.spec().kv_heads
    }

    /// Byte offset in `tail` of the ring of (`slot`, `layer`, `kv_head`).
    fn ring_offset(&self, slot: usize, layer: usize, kv_head: usize) -> usize {
        let spec = self.spec();
        ((slot * spec.layers + layer) * spec.kv_heads + kv_head) * self.layout.tail_ring_bytes()
    }

    /// The first position whose key the ring of `slot` holds (see [`KvCache::tail_rows`]).
    fn tail_start(&self, slot: usize) -> usize {
        let len = self.len_of(slot);
        let from = self.words(slot)[TAIL_FROM] as usize;
        from.max(len.saturating_sub(self.spec().key_tail_tokens))
    }

    /// The key tail of `seq`'s `layer` and `kv_head` (see [`CacheSpec::key_tail_tokens`]):
    /// the ring's bytes (`key_tail_tokens` `f16` rows of `head_dim`, the key at position `p`
    /// in row `p mod key_tail_tokens`, in the stored basis minus the int4 key offsets) and the
    /// positions it holds. `None` without a tail or for a bad id or index.
    ///
    /// The ring holds the last `key_tail_tokens` positions of the sequence, `len -
    /// key_tail_tokens .. len`: a write keeps a full-precision copy of each key it stores at
    /// one of those positions. After [`KvCache::truncate`] the positions whose copies later
    /// writes overwrote are left out until the sequence grows past them again.
    ///
    /// [`CacheSpec::key_tail_tokens`]: crate::CacheSpec::key_tail_tokens
    pub fn tail_rows(
        &self,
        seq: SeqId,
        layer: usize,
        kv_head: usize,
    ) -> Option<(&[u8], Range<usize>)> {
        let spec = self.spec();
        if spec.key_tail_tokens == 0 || layer >= spec.layers || kv_head >= spec.kv_heads {
            return None;
        }
        let slot = self.slot_of(seq).ok()?;
        let at = self.ring_offset(slot, layer, kv_head);
        let ring = self.tail.get(at..at + self.layout.tail_ring_bytes())?;
        Some((ring, self.tail_start(slot)..self.len_of(slot)))
    }

    /// Index of the "offsets set" flag and of the first key offset of (`slot`, `layer`).
    fn offsets_index(&self, slot: usize, layer: usize) -> (usize, usize) {
        let spec = self.spec();
        let flag = slot * spec.layers + layer;
        (flag, flag * spec.kv_heads * spec.head_dim)
    }

    /// Fixes the key offsets of `slot`'s `layer` from the keys of its first write (`k`:
    /// `[tokens][kv_heads][head_dim]`): per KV head the mean key, clamped to `±2^100` per
    /// element, in the basis the rows are stored in.
    fn set_key_offsets(&mut self, slot: usize, layer: usize, k: &[f32]) {
        let spec = *self.spec();
        let (head_dim, kv_heads) = (spec.head_dim, spec.kv_heads);
        let token_elems = kv_heads * head_dim;
        let tokens = k.len() / token_elems;
        if tokens == 0 {
            return;
        }
        let limit = f32::from_bits((127 + 100) << 23);
        for head in 0..kv_heads {
            let at = self.offsets_index(slot, layer).1 + head * head_dim;
            let offsets = &mut self.key_offsets[at..at + head_dim];
            let mut buffer = [0.0f32; crate::quant::MAX_ROTATED_DIM];
            let rotated = crate::quant::rotated(KvFormat::Int4, head_dim);
            for (d, offset) in offsets.iter_mut().enumerate() {
                let sum: f64 = k
                    .chunks_exact(token_elems)
                    .map(|token| token[head * head_dim + d] as f64)
                    .sum();
                let mean = ((sum / tokens as f64) as f32).clamp(-limit, limit);
                if rotated {
                    buffer[d] = mean;
                }
                *offset = mean.to_bits();
            }
            if rotated {
                let buffer = &mut buffer[..head_dim];
                crate::quant::hadamard(buffer);
                for (offset, &x) in offsets.iter_mut().zip(buffer.iter()) {
                    *offset = x.to_bits();
                }
            }
        }
        let flag = self.offsets_index(slot, layer).0;
        self.offsets_set[flag] = 1;
    }

    /// The key offsets of `seq`'s `layer` and `kv_head` into `out` (`head_dim` elements), and
    /// whether they are set yet. int4 keys are stored *minus* these offsets: the sequence's
    /// first write to a layer fixes them (per KV head, the mean of that write's keys, in the
    /// Hadamard-rotated basis when the rows are rotated, see [`crate::quant::rotated`]) for
    /// the sequence's lifetime; a fork inherits its parent's (they share blocks). Keys share a large per-channel component across tokens; stored without it,
    /// the int4 groups quantize only what varies from token to token, with a finer step.
    /// Attention needs no correction: a key offset `μ` adds `q·μ` to every score of a query,
    /// which softmax ignores. [`KvCache::read_row`] adds the offsets back; raw rows from
    /// [`BlockRef::rows`] do not include them. All zero (and `false`) for other key formats.
    pub fn key_offsets(
        &self,
        seq: SeqId,
        layer: usize,
        kv_head: usize,
        out: &mut [f32],
    ) -> Result<bool, Error> {
        let slot = self.slot_of(seq)?;
        let spec = self.spec();
        if layer >= spec.layers {
            return Err(Error::BadIndex("layer"));
        }
        if kv_head >= spec.kv_heads {
            return Err(Error::BadIndex("kv_head"));
        }
        if out.len() != spec.head_dim {
            return Err(Error::BadShape("out"));
        }
        if spec.k_format != KvFormat::Int4 {
            out.fill(0.0);
            return Ok(false);
        }
        let (flag, at) = self.offsets_index(slot, layer);
        let at = at + kv_head * spec.head_dim;
        for (x, &offset) in out
            .iter_mut()
            .zip(&self.key_offsets[at..at + spec.head_dim])
        {
            *x = f32::from_bits(offset);
        }
        Ok(self.offsets_set[flag] != 0)
    }

    /// Reads one token's keys and values of one layer (`[kv_heads][head_dim]` each).
    pub fn read(
        &self,
        seq: SeqId,
        layer: usize,
        position: usize,
        k_out: &mut [f32],
        v_out: &mut [f32],
    ) -> Result<(), Error> {
        let spec = self.spec();
        let elems = spec.kv_heads * spec.head_dim;
        if k_out.len() != elems {
            return Err(Error::BadShape("k_out"));
        }
        if v_out.len() != elems {
            return Err(Error::BadShape("v_out"));
        }
        let head_dim = spec.head_dim;
        for (head, (k_row, v_row)) in k_out
            .chunks_exact_mut(head_dim)
            .zip(v_out.chunks_exact_mut(head_dim))
            .enumerate()
        {
            self.read_row(seq, layer, Kind::K, head, position, k_row)?;
            self.read_row(seq, layer, Kind::V, head, position, v_row)?;
        }
        Ok(())
    }

    /// The block storage: `capacity_blocks() × block_bytes` bytes, physical block `b` at byte
    /// `b × block_bytes`, 64-byte aligned, laid out as [`Layout::row_offset`] says. With
    /// [`Self::page_table`] it is all a kernel elsewhere (a GPU copy of these bytes, say) needs
    /// to read float and int8 rows; int4 rows also need [`Self::key_offsets`] and the exact
    /// first rows the cache keeps outside the blocks (see [`crate::quant`]).
    ///
    /// ```
    /// use kvcache::spec::Kind;
    /// use kvcache::{CacheSpec, KvCache, KvFormat, Layout};
    ///
    /// let mut spec = CacheSpec::new(2, 4, 2, 8); // layers, q heads, KV heads, head dim
    /// spec.k_format = KvFormat::F32;
    /// let layout = Layout::new(spec).unwrap();
    /// let mut arena = vec![0u8; layout.arena_bytes(4).unwrap()];
    /// let mut cache = KvCache::new(spec, &mut arena).unwrap();
    /// let seq = cache.add_sequence().unwrap();
    /// cache.reserve(seq, 3).unwrap();
    /// let keys: Vec<f32> = (0..3 * 2 * 8).map(|i| i as f32).collect();
    /// cache.write_run(seq, 1, 0, &keys, &keys).unwrap();
    ///
    /// // Token 2's key for layer 1, KV head 1, element 5, read in place.
    /// let (position, head, d) = (2, 1, 5);
    /// let block = cache.page_table(seq).unwrap()[position / spec.block_tokens] as usize;
    /// let slot = position % spec.block_tokens;
    /// let at = block * layout.block_bytes() + layout.row_offset(1, Kind::K, head, slot) + 4 * d;
    /// let bytes = &cache.block_storage()[at..at + 4];
    /// assert_eq!(f32::from_le_bytes(bytes.try_into().unwrap()), keys[(position * 2 + head) * 8 + d]);
    /// ```
    pub fn block_storage(&self) -> &[u8] {
        self.data
    }

    /// The page table of `seq`: entry `i` is the physical block holding positions
    /// `i·block_tokens ..`, or [`NO_BLOCK`] where the sliding window evicted it;
    /// `ceil(len / block_tokens)` entries. Slots of the last block past `len` hold stale bytes.
    pub fn page_table(&self, seq: SeqId) -> Result<&[u32], Error> {
        let slot = self.slot_of(seq)?;
        let blocks = self.blocks_for(self.len_of(slot));
        Ok(&self.table(slot)[..blocks])
    }

    /// Logical block `logical` of `seq`: its bytes and how many of its slots hold tokens.
    pub fn block(&self, seq: SeqId, logical: usize) -> Result<BlockRef<'_>, Error> {
        let slot = self.slot_of(seq)?;
        self.block_of_slot(slot, logical)
    }

    pub(crate) fn block_of_slot(&self, slot: usize, logical: usize) -> Result<BlockRef<'_>, Error> {
        let len = self.len_of(slot);
        let block_tokens = self.spec().block_tokens;
        let first_position = logical.saturating_mul(block_tokens);
        if first_position >= len {
            return Err(Error::BadPosition {
                position: first_position,
                len,
            });
        }
        if self.evicted_range(slot).contains(&logical) {
            return Err(Error::Evicted {
                position: first_position,
            });
        }
        let block = self.table(slot)[logical] as usize;
        let block_bytes = self.layout.block_bytes();
        let data = self
            .data
            .get(block * block_bytes..(block + 1) * block_bytes)
            .ok_or(Error::BadIndex("block"))?;
        Ok(BlockRef {
            layout: &self.layout,
            data,
            first_position,
            tokens: (len - first_position).min(block_tokens),
        })
    }

    /// Checks in O(1) that logical blocks `blocks` of `seq` all hold stored tokens: below the
    /// sequence's length and not evicted by the window (the evicted blocks are one contiguous
    /// range). The error is the one [`Self::block`] gives for the first missing block.
    pub(crate) fn check_stored(&self, seq: SeqId, blocks: Range<usize>) -> Result<(), Error> {
        let slot = self.slot_of(seq)?;
        if blocks.is_empty() {
            return Ok(());
        }
        let evicted = self.evicted_range(slot);
        let first_evicted = blocks.start.max(evicted.start);
        if first_evicted < blocks.end && evicted.contains(&first_evicted) {
            return self.block_of_slot(slot, first_evicted).map(|_| ());
        }
        // Past the length (the last block is the first one that can be).
        self.block_of_slot(slot, blocks.end - 1).map(|_| ())
    }

    /// Slot and length of a live sequence (for the attention module).
    pub(crate) fn slot_and_len(&self, seq: SeqId) -> Result<(usize, usize), Error> {
        let slot = self.slot_of(seq)?;
        Ok((slot, self.len_of(slot)))
    }

    // ----- sharing and shrinking -------------------------------------------------------------

    /// A new sequence sharing every block of `seq` (same length, same tokens). Either one's
    /// first write into a shared block copies it.
    pub fn fork(&mut self, seq: SeqId) -> Result<SeqId, Error> {
        let parent = self.slot_of(seq)?;
        let child = self.free_slot()?;
        let count = self.blocks_for(self.len_of(parent));
        let per = self.layout.max_blocks_per_seq();
        self.page_tables
            .copy_within(parent * per..parent * per + count, child * per);
        for logical in 0..count {
            let block = self.table(child)[logical];
            if block != NO_BLOCK {
                self.pool.retain(BlockId(block));
            }
        }
        let parent_words = self.words(parent);
        let (len, evict_end, tail_from) = (
            parent_words[LEN],
            parent_words[EVICT_END],
            parent_words[TAIL_FROM],
        );
        let words = self.words_mut(child);
        let generation = words[GENERATION].wrapping_add(1);
        words.copy_from_slice(&[generation, 1, len, evict_end, tail_from]);
        self.reset_int4_state(child, Some(parent));
        let ring = self.slot_tail_bytes();
        self.tail
            .copy_within(parent * ring..(parent + 1) * ring, child * ring);
        self.live += 1;
        Ok(SeqId {
            slot: child as u32,
            generation,
        })
    }

    /// Shortens `seq` to `new_len` tokens (rolling back, e.g. rejected speculative tokens);
    /// blocks past the new end are released. With a window, the tokens the next query would
    /// see must still be stored. Truncated to 0, a sequence is as if new: int4 keys get fresh
    /// offsets (and first rows) from its next write.
    pub fn truncate(&mut self, seq: SeqId, new_len: usize) -> Result<(), Error> {
        let slot = self.slot_of(seq)?;
        let len = self.len_of(slot);
        if new_len > len {
            return Err(Error::BadPosition {
                position: new_len,
                len,
            });
        }
        let evicted = self.evicted_range(slot);
        let window = self.spec().window;
        if !evicted.is_empty() {
            let first_stored = evicted.end * self.spec().block_tokens;
            // The next query (at `new_len`) sees keys from `new_len + 1 - window` on.
            let first_seen = new_len.saturating_add(1).saturating_sub(window);
            if first_seen < first_stored {
                return Err(Error::Evicted {
                    position: first_seen,
                });
            }
        }
        for logical in self.blocks_for(new_len)..self.blocks_for(len) {
            let block = core::mem::replace(&mut self.table_mut(slot)[logical], NO_BLOCK);
            if block != NO_BLOCK {
                self.pool.release(BlockId(block));
            }
        }
        // The ring still holds `tail_start(slot)..new_len`; later writes keep it so.
        let tail_from = self.tail_start(slot).min(new_len);
        let words = self.words_mut(slot);
        words[LEN] = new_len as u32;
        words[TAIL_FROM] = tail_from as u32;
        if new_len == 0 {
            // Nothing of the sequence is left: its next write starts over, as in a new one.
            self.reset_int4_state(slot, None);
        }
        Ok(())
    }

    /// Removes `seq`; its blocks return to the pool once no other sequence shares them.
    pub fn remove(&mut self, seq: SeqId) -> Result<(), Error> {
        let slot = self.slot_of(seq)?;
        self.truncate_all(slot);
        let words = self.words_mut(slot);
        words[LIVE] = 0;
        words[LEN] = 0;
        words[EVICT_END] = 0;
        words[TAIL_FROM] = 0;
        self.live -= 1;
        Ok(())
    }

    fn truncate_all(&mut self, slot: usize) {
        for logical in 0..self.blocks_for(self.len_of(slot)) {
            let block = core::mem::replace(&mut self.table_mut(slot)[logical], NO_BLOCK);
            if block != NO_BLOCK {
                self.pool.release(BlockId(block));
            }
        }
    }

    // ----- accounting ------------------------------------------------------------------------

    /// Ids of the live sequences, in slot order, written to `out`; returns how many there are
    /// (only the first `out.len()` are written).
    pub fn sequence_ids(&self, out: &mut [SeqId]) -> usize {
        let mut count = 0;
        for slot in 0..self.spec().max_seqs {
            let words = self.words(slot);
            if words[LIVE] == 1 {
                if let Some(entry) = out.get_mut(count) {
                    *entry = SeqId {
                        slot: slot as u32,
                        generation: words[GENERATION],
                    };
                }
                count += 1;
            }
        }
        count
    }

    fn tokens_in_block(&self, slot: usize, logical: usize) -> usize {
        let block_tokens = self.spec().block_tokens;
        (self.len_of(slot) - logical * block_tokens).min(block_tokens)
    }

    /// Accounting for one sequence.
    pub fn seq_stats(&self, seq: SeqId) -> Result<SeqStats, Error> {
        let slot = self.slot_of(seq)?;
        let block_tokens = self.spec().block_tokens;
        let mut stats = SeqStats {
            len: self.len_of(slot),
            ..SeqStats::default()
        };
        for logical in 0..self.blocks_for(stats.len) {
            let block = self.table(slot)[logical];
            if block == NO_BLOCK {
                continue;
            }
            let tokens = self.tokens_in_block(slot, logical);
            stats.blocks += 1;
            stats.stored_tokens += tokens;
            stats.waste_slots += block_tokens - tokens;
            if self.pool.refcount(BlockId(block)) > 1 {
                stats.shared_blocks += 1;
            }
        }
        stats.bytes = stats.blocks * self.layout.block_bytes();
        Ok(stats)
    }

    /// Accounting for the whole cache. Unused slots of a block shared by several sequences
    /// count once, against the sequence that fills it furthest.
    pub fn stats(&self) -> CacheStats {
        let block_tokens = self.spec().block_tokens;
        let blocks_total = self.pool.capacity();
        let blocks_free = self.pool.free_count();
        let mut stats = CacheStats {
            sequences: self.live,
            blocks_total,
            blocks_free,
            blocks_used: blocks_total - blocks_free,
            block_bytes: self.layout.block_bytes(),
            bytes_used: (blocks_total - blocks_free) * self.layout.block_bytes(),
            ..CacheStats::default()
        };
        for slot in self.live_slots() {
            let len = self.len_of(slot);
            stats.tokens += len;
            // Only a sequence's last block can be partly filled.
            if len.is_multiple_of(block_tokens) {
                continue;
            }
            let tail_logical = len / block_tokens;
            let block = self.table(slot)[tail_logical];
            let fill = len % block_tokens;
            if block == NO_BLOCK || !self.fills_furthest(slot, tail_logical, block, fill) {
                continue;
            }
            stats.waste_slots += block_tokens - fill;
        }
        stats
    }

    fn live_slots(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.spec().max_seqs).filter(|&slot| self.words(slot)[LIVE] == 1)
    }

    /// True when no other page-table entry pointing at `block` holds more of its slots (ties:
    /// the lowest slot wins), so that a shared block's waste is counted once.
    fn fills_furthest(&self, slot: usize, logical: usize, block: u32, fill: usize) -> bool {
        if self.pool.refcount(BlockId(block)) <= 1 {
            return true;
        }
        for other in self.live_slots() {
            for other_logical in 0..self.blocks_for(self.len_of(other)) {
                if (other, other_logical) == (slot, logical)
                    || self.table(other)[other_logical] != block
                {
                    continue;
                }
                let other_fill = self.tokens_in_block(other, other_logical);
                if other_fill > fill || (other_fill == fill && other < slot) {
                    return false;
                }
            }
        }
        true
    }

    /// Checks the structural invariants and returns the first one broken:
    /// - every page-table entry of a live sequence below its block count points at a block in
    ///   the pool, except the window-evicted ones, which hold no block; entries past the end
    ///   hold no block;
    /// - each block's reference count equals the number of entries pointing at it;
    /// - the free stack holds exactly the blocks with count zero, each once;
    /// - the live-sequence count matches the table;
    /// - no key tail starts past its sequence's end.
    ///
    /// Linear in blocks plus page-table entries; uses the arena's scratch words.
    pub fn check_invariants(&mut self) -> Result<(), &'static str> {
        let capacity = self.pool.capacity();
        self.scratch.fill(0);
        let mut live = 0;
        let per = self.layout.max_blocks_per_seq();
        for slot in 0..self.spec().max_seqs {
            let words = self.words(slot);
            if words[LIVE] > 1 {
                return Err("sequence live flag is neither 0 nor 1");
            }
            let count = if words[LIVE] == 1 {
                self.blocks_for(self.len_of(slot))
            } else {
                0
            };
            if words[LIVE] == 1 {
                live += 1;
                if self.len_of(slot) > self.spec().max_seq_tokens {
                    return Err("sequence longer than max_seq_tokens");
                }
            }
            if words[TAIL_FROM] as usize > self.len_of(slot) {
                return Err("key tail starts past the sequence's end");
            }
            let evicted = self.evicted_range(slot);
            for logical in 0..per {
                let block = self.page_tables[slot * per + logical];
                let expect_block = logical < count && !evicted.contains(&logical);
                if !expect_block {
                    if block != NO_BLOCK {
                        return Err("page-table entry outside the sequence holds a block");
                    }
                    continue;
                }
                let Some(seen) = self.scratch.get_mut(block as usize) else {
                    return Err("page-table entry points outside the pool");
                };
                *seen += 1;
            }
        }
        if live != self.live {
            return Err("live sequence count is wrong");
        }
        for block in 0..capacity {
            if self.scratch[block] != self.pool.refcount(BlockId(block as u32)) {
                return Err("reference count differs from the page-table entries");
            }
        }
        let used = (0..capacity).filter(|&b| self.scratch[b] != 0).count();
        if used + self.pool.free_count() != capacity {
            return Err("free stack size differs from the blocks with count zero");
        }
        for &block in self.pool.free_blocks() {
            let Some(seen) = self.scratch.get_mut(block as usize) else {
                return Err("free stack holds a block outside the pool");
            };
            if *seen != 0 {
                return Err("free stack holds a block in use or twice");
            }
            *seen = u32::MAX;
        }
        Ok(())
    }
}

/// Largest finite `f16`.
const F16_MAX: f32 = 65504.0;

/// Writes one key tail row (`f16`, `2 × row.len()` bytes): `row` (in the stored basis) minus
/// `offsets` (int4 keys; `None` for int8), saturated to `±65504`.
fn encode_tail_row(row: &[f32], offsets: Option<&[u32]>, dst: &mut [u8]) {
    const PIECE: usize = 64;
    let mut shifted = [0.0f32; PIECE];
    for (i, (piece, dst)) in row.chunks(PIECE).zip(dst.chunks_mut(2 * PIECE)).enumerate() {
        let shifted = &mut shifted[..piece.len()];
        for (d, (s, &x)) in shifted.iter_mut().zip(piece).enumerate() {
            let offset = offsets.map_or(0.0, |o| f32::from_bits(o[i * PIECE + d]));
            *s = (x - offset).clamp(-F16_MAX, F16_MAX);
        }
        kernels::encode_row(KvFormat::F16, shifted, dst);
    }
}

/// Zeroes `words[range]`, or copies the same-length run starting at `source` over it; nothing
/// when `words` is empty (the format keeps no such state).
fn reset_words(words: &mut [u32], range: Range<usize>, source: Option<usize>) {
    if words.is_empty() {
        return;
    }
    match source {
        None => words[range].fill(0),
        Some(from) => words.copy_within(from..from + range.len(), range.start),
    }
}
