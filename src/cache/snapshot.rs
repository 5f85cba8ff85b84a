//! Saving one sequence's cached state to bytes, and restoring it: a prompt's keys and values
//! computed once (even at build time), kept in flash, and restored at boot or whenever a
//! conversation resumes, without running the model over the prompt again.
//!
//! The bytes hold the rows exactly as the cache stores them (an int8 or int4 row comes back
//! bit for bit; nothing is quantized twice), in position order, plus the int4 state the cache
//! keeps beside its blocks (key offsets, exact first rows). They restore into any cache of the
//! same geometry and formats: layers, KV heads, head dim, K and V formats. Block size, pool
//! size, `max_seqs` and the window may differ. A checksum catches truncated or corrupted
//! storage. Exporting a sequence the window has already thinned is refused
//! ([`Error::Evicted`]): its early rows are gone.
//!
//! # Layout (little-endian)
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..8 | magic `KVCSEQ02` |
//! | 8..28 | layers, KV heads, head dim, K format, V format (`u32` each; formats as `KvFormat as u32`) |
//! | 28..32 | tokens (`u32`) |
//! | 32..40 | checksum of every byte from 40 on (FNV-1a's step over 64-bit words in 4 lanes: see `checksum`) |
//! | 40.. | rows: per layer, K then V, per KV head, the `tokens` stored rows in position order |
//! | then | int4 keys only: per layer a word (1 once the layer's offsets are set), then `kv_heads × head_dim` key offsets, then as many exact first-key elements (`f32` bits) |
//! | then | int4 values only: per layer, `kv_heads × head_dim` exact first-value elements |
//! | then | key tail: a `u32` count `T` (0 for float keys), then per layer, per KV head, the `f16` copies of the keys at positions `tokens - T .. tokens` (see [`KvCache::tail_rows`]) |
//!
//! A cache with a shorter key tail than the snapshot's `T` restores the latest positions that
//! fit (none without a tail); version 1 snapshots (`KVCSEQ01`, before the key tail) are refused.

use super::{KvCache, SeqId};
use crate::error::Error;
use crate::format::KvFormat;
use crate::quant;
use crate::spec::Kind;

const MAGIC: &[u8; 8] = b"KVCSEQ02";
/// The magic of the version before the key tail.
const MAGIC_V1: &[u8; 8] = b"KVCSEQ01";
/// Bytes before the rows.
const HEADER: usize = 40;
const SUM_AT: usize = 32;

const FNV_PRIME: u64 = 0x0100_0000_01b3;
const FNV_BASIS: u64 = 0xcbf2_9ce4_8422_2325;

/// The snapshot checksum: FNV-1a's step (xor, then multiply by its 64-bit prime) over the
/// bytes as little-endian 64-bit words, word `i` into lane `i mod 4` of four lanes seeded
/// `basis ^ lane` (the last word zero-padded); then, from `len · prime`, each lane in order
/// folded in with the same step. Four lanes let the multiplies overlap (several GB/s where a
/// byte at a time managed 0.5), and every step is a bijection of its lane, so any one changed
/// word changes the sum. Public so that tools can check or seal snapshot bytes.
pub fn checksum(bytes: &[u8]) -> u64 {
    let mut sum = Checksum::new();
    sum.update(bytes);
    sum.finish()
}

/// [`checksum`] fed in pieces: the same value for the same bytes however they are cut.
#[derive(Clone, Debug)]
pub struct Checksum {
    lanes: [u64; 4],
    /// Bytes of the current 32-byte group not yet mixed.
    pending: [u8; 32],
    filled: usize,
    len: u64,
}

impl Default for Checksum {
    fn default() -> Self {
        Self::new()
    }
}

impl Checksum {
    /// The checksum of no bytes so far.
    pub fn new() -> Self {
        Checksum {
            lanes: [0u64, 1, 2, 3].map(|lane| FNV_BASIS ^ lane),
            pending: [0; 32],
            filled: 0,
            len: 0,
        }
    }

    /// Adds `bytes` after those added before.
    pub fn update(&mut self, mut bytes: &[u8]) {
        self.len = self.len.wrapping_add(bytes.len() as u64);
        if self.filled > 0 {
            let take = (32 - self.filled).min(bytes.len());
            self.pending[self.filled..self.filled + take].copy_from_slice(&bytes[..take]);
            self.filled += take;
            bytes = &bytes[take..];
            if self.filled < 32 {
                return;
            }
            let group = self.pending;
            self.mix(&group);
            self.filled = 0;
        }
        let mut groups = bytes.chunks_exact(32);
        for group in &mut groups {
            self.mix(group);
        }
        let rest = groups.remainder();
        self.pending[..rest.len()].copy_from_slice(rest);
        self.filled = rest.len();
    }

    fn mix(&mut self, group: &[u8]) {
        for (lane, word) in self.lanes.iter_mut().zip(group.chunks_exact(8)) {
            let word = u64::from_le_bytes(word.try_into().unwrap_or_default());
            *lane = (*lane ^ word).wrapping_mul(FNV_PRIME);
        }
    }

    /// The checksum of every byte added.
    pub fn finish(&self) -> u64 {
        let mut lanes = self.lanes;
        for (lane, piece) in lanes.iter_mut().zip(self.pending[..self.filled].chunks(8)) {
            let mut word = [0u8; 8];
            word[..piece.len()].copy_from_slice(piece);
            *lane = (*lane ^ u64::from_le_bytes(word)).wrapping_mul(FNV_PRIME);
        }
        lanes
            .iter()
            .fold(self.len.wrapping_mul(FNV_PRIME), |h, &lane| {
                (h ^ lane).wrapping_mul(FNV_PRIME)
            })
    }
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from(le_u32(bytes, at)) | u64::from(le_u32(bytes, at + 4)) << 32
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Bytes a streaming import reads at a time for its checks (a stack buffer).
const CHUNK: usize = 4096;

impl KvCache<'_> {
    /// Bytes [`KvCache::export_sequence`] writes for `seq`.
    pub fn exported_len(&self, seq: SeqId) -> Result<usize, Error> {
        let slot = self.slot_of(seq)?;
        self.snapshot_len(self.len_of(slot), self.tail_held(slot).len())
            .ok_or(Error::SizeOverflow)
    }

    /// Saves `seq` (its rows and int4 state) into the start of `out`, which needs
    /// [`KvCache::exported_len`] bytes; returns the bytes written. Restore it with
    /// [`KvCache::import_sequence`], into this cache or another of the same geometry and
    /// formats. The layout is in [`crate::cache::snapshot`].
    ///
    /// ```
    /// use kvcache::{CacheSpec, KvCache, Layout};
    ///
    /// let spec = CacheSpec::new(2, 4, 2, 8); // layers, query heads, KV heads, head dim
    /// let layout = Layout::new(spec).unwrap();
    /// let mut arena = vec![0u8; layout.arena_bytes(8).unwrap()];
    /// let mut cache = KvCache::with_blocks(spec, 8, &mut arena).unwrap();
    /// let seq = cache.add_sequence().unwrap();
    /// let first = cache.reserve(seq, 3).unwrap().start;
    /// let kv = vec![0.5f32; 3 * 2 * 8]; // [tokens][kv_heads][head_dim]
    /// for layer in 0..2 {
    ///     cache.write_run(seq, layer, first, &kv, &kv).unwrap();
    /// }
    ///
    /// // Save (to flash, a file...), then restore into another cache of the same geometry.
    /// let mut saved = vec![0u8; cache.exported_len(seq).unwrap()];
    /// cache.export_sequence(seq, &mut saved).unwrap();
    /// let mut other_arena = vec![0u8; layout.arena_bytes(8).unwrap()];
    /// let mut other = KvCache::with_blocks(spec, 8, &mut other_arena).unwrap();
    /// let restored = other.import_sequence(&saved).unwrap();
    /// assert_eq!(other.len(restored).unwrap(), 3);
    /// ```
    pub fn export_sequence(&self, seq: SeqId, out: &mut [u8]) -> Result<usize, Error> {
        let needed = self.exported_len(seq)?;
        let out = out.get_mut(..needed).ok_or(Error::BadShape("out"))?;
        let mut at = 0;
        self.export_sequence_to(seq, |piece| match out.get_mut(at..at + piece.len()) {
            Some(dst) => {
                dst.copy_from_slice(piece);
                at += piece.len();
                true
            }
            None => false,
        })
    }

    /// [`KvCache::export_sequence`] without a buffer of the snapshot's size: the bytes go to
    /// `write` in order, in pieces (the header, then runs of rows straight from the blocks,
    /// then the int4 state, then the key tail's count and rows straight from its rings), e.g.
    /// to flash page by page. `write` returns `false` to stop (a
    /// failed write), which gives [`Error::Interrupted`]. Returns the bytes written.
    pub fn export_sequence_to(
        &self,
        seq: SeqId,
        mut write: impl FnMut(&[u8]) -> bool,
    ) -> Result<usize, Error> {
        let slot = self.slot_of(seq)?;
        let tokens = self.len_of(slot);
        let evicted = self.evicted_range(slot);
        if !evicted.is_empty() {
            return Err(Error::Evicted {
                position: evicted.start * self.spec().block_tokens,
            });
        }
        let needed = self
            .snapshot_len(tokens, self.tail_held(slot).len())
            .ok_or(Error::SizeOverflow)?;
        let mut header = [0u8; HEADER];
        header[..8].copy_from_slice(MAGIC);
        for (i, word) in self.header_words(tokens)?.iter().enumerate() {
            header[8 + 4 * i..12 + 4 * i].copy_from_slice(&word.to_le_bytes());
        }
        // The checksum heads the bytes, so the body is read twice: once for it, once out.
        let mut sum = Checksum::new();
        self.body_pieces(slot, tokens, &mut |piece| {
            sum.update(piece);
            true
        });
        header[SUM_AT..SUM_AT + 8].copy_from_slice(&sum.finish().to_le_bytes());
        if !write(&header) || !self.body_pieces(slot, tokens, &mut write) {
            return Err(Error::Interrupted);
        }
        Ok(needed)
    }

    /// Calls `f` with the snapshot's body in order (each block's run of rows, then the int4
    /// state through a stack buffer); stops, returning `false`, when `f` does.
    fn body_pieces(&self, slot: usize, tokens: usize, f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        let spec = *self.spec();
        for layer in 0..spec.layers {
            for kind in [Kind::K, Kind::V] {
                for head in 0..spec.kv_heads {
                    for logical in 0..self.blocks_for(tokens) {
                        if !f(&self.data[self.row_run(slot, layer, kind, head, tokens, logical)]) {
                            return false;
                        }
                    }
                }
            }
        }
        let mut buffer = [0u8; 256];
        let mut filled = 0;
        for i in 0..self.state_words() {
            buffer[filled..filled + 4].copy_from_slice(&self.state_word(slot, i).to_le_bytes());
            filled += 4;
            if filled == buffer.len() {
                if !f(&buffer) {
                    return false;
                }
                filled = 0;
            }
        }
        if filled != 0 && !f(&buffer[..filled]) {
            return false;
        }
        let held = self.tail_held(slot);
        if !f(&(held.len() as u32).to_le_bytes()) {
            return false;
        }
        let (tail_tokens, row_bytes) = (spec.key_tail_tokens, 2 * spec.head_dim);
        for layer in 0..spec.layers {
            for head in 0..spec.kv_heads {
                let ring = self.ring_offset(slot, layer, head);
                for position in held.clone() {
                    let at = ring + position % tail_tokens * row_bytes;
                    if !f(&self.tail[at..at + row_bytes]) {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// The positions `slot`'s key tail holds (empty without a tail).
    fn tail_held(&self, slot: usize) -> core::ops::Range<usize> {
        if self.spec().key_tail_tokens == 0 {
            return 0..0;
        }
        self.tail_start(slot)..self.len_of(slot)
    }

    /// Bytes of a snapshot's key tail rows for `held` positions, `None` on overflow.
    fn tail_section_bytes(&self, held: usize) -> Option<usize> {
        let spec = self.spec();
        held.checked_mul(2 * spec.head_dim)?
            .checked_mul(spec.kv_heads)?
            .checked_mul(spec.layers)
    }

    /// Restores a sequence saved by [`KvCache::export_sequence`] as a new sequence of this
    /// cache and returns its id. Everything is checked before anything changes: the bytes
    /// (magic, geometry and formats, length, checksum, finite quantization parameters and int4
    /// state: otherwise [`Error::BadSnapshot`] naming what is wrong), then room (a free
    /// sequence slot, `max_seq_tokens`, free blocks). Float rows come back as stored, NaN
    /// included, as [`KvCache::write`] stores them.
    pub fn import_sequence(&mut self, bytes: &[u8]) -> Result<SeqId, Error> {
        self.import_sequence_from(bytes.len(), |at, buf| match bytes.get(at..at + buf.len()) {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        })
    }

    /// [`KvCache::import_sequence`] without the snapshot in memory: `read(offset, buf)` fills
    /// `buf` with the `len`-byte snapshot's bytes from `offset` (flash that is not mapped, a
    /// file) and returns `false` if it cannot, which gives [`Error::Interrupted`]. The bytes
    /// are read twice: once in 4 KiB pieces to check them all, then straight into the new
    /// sequence's blocks (and key tail rings). If they differ the second time (checksum again), or a read fails
    /// then, the half-made sequence is removed: on any error the cache is as it was.
    pub fn import_sequence_from(
        &mut self,
        len: usize,
        mut read: impl FnMut(usize, &mut [u8]) -> bool,
    ) -> Result<SeqId, Error> {
        let spec = *self.spec();
        if len < HEADER {
            return Err(Error::BadSnapshot("shorter than its header"));
        }
        let mut header = [0u8; HEADER];
        if !read(0, &mut header) {
            return Err(Error::Interrupted);
        }
        if &header[..8] == MAGIC_V1 {
            return Err(Error::BadSnapshot(
                "a version 1 snapshot (before the key tail); export it again",
            ));
        }
        if &header[..8] != MAGIC {
            return Err(Error::BadSnapshot("not a sequence snapshot (magic)"));
        }
        let tokens = le_u32(&header, 28) as usize;
        let expected = self.header_words(tokens.min(spec.max_seq_tokens))?;
        if (0..5).any(|i| le_u32(&header, 8 + 4 * i) != expected[i]) {
            return Err(Error::BadSnapshot(
                "geometry or formats differ from this cache's",
            ));
        }
        if tokens > spec.max_seq_tokens {
            return Err(Error::TooLong {
                requested: tokens,
                max: spec.max_seq_tokens,
            });
        }
        // The key tail's count follows the rows and int4 state.
        let count_at = self.snapshot_len(tokens, 0).ok_or(Error::SizeOverflow)? - 4;
        if len < count_at + 4 {
            return Err(Error::BadSnapshot(
                "length differs from what its header implies",
            ));
        }
        let mut count = [0u8; 4];
        if !read(count_at, &mut count) {
            return Err(Error::Interrupted);
        }
        let held = le_u32(&count, 0) as usize;
        if held > tokens || (held > 0 && spec.k_format.is_float()) {
            return Err(Error::BadSnapshot("key tail longer than the sequence"));
        }
        let needed = self.snapshot_len(tokens, held).ok_or(Error::SizeOverflow)?;
        if len != needed {
            return Err(Error::BadSnapshot(
                "length differs from what its header implies",
            ));
        }
        let sum = le_u64(&header, SUM_AT);
        self.check_snapshot(tokens, held, sum, &mut read)?;
        let free_slot = (0..spec.max_seqs).any(|slot| self.words(slot)[super::LIVE] == 0);
        if !free_slot {
            return Err(Error::TooManySequences);
        }
        let blocks = self.blocks_for(tokens);
        if blocks > self.pool.free_count() {
            return Err(Error::OutOfBlocks {
                needed: blocks,
                free: self.pool.free_count(),
            });
        }

        // Checked: from here the only failures are the source's, and they undo the sequence.
        let seq = self.add_sequence()?;
        let slot = seq.slot();
        self.apply_reserve(slot, tokens);
        match self.fill_snapshot(slot, tokens, held, sum, &mut read) {
            Ok(()) => Ok(seq),
            Err(e) => {
                let _ = self.remove(seq);
                Err(e)
            }
        }
    }

    /// The first pass of an import: reads the body in pieces and checks the checksum, every
    /// quantized row's parameters and every int4 state word.
    fn check_snapshot(
        &self,
        tokens: usize,
        held: usize,
        sum: u64,
        read: &mut dyn FnMut(usize, &mut [u8]) -> bool,
    ) -> Result<(), Error> {
        let spec = *self.spec();
        let mut buffer = [0u8; CHUNK];
        let mut checksum = Checksum::new();
        let mut at = HEADER;
        for _layer in 0..spec.layers {
            for kind in [Kind::K, Kind::V] {
                let format = self.layout.format(kind);
                let row_bytes = self.layout.row_bytes(kind);
                let per_read = (CHUNK / row_bytes).max(1);
                let mut rows = spec.kv_heads * tokens;
                while rows > 0 {
                    let n = rows.min(per_read);
                    let piece = &mut buffer[..n * row_bytes];
                    if !read(at, piece) {
                        return Err(Error::Interrupted);
                    }
                    checksum.update(piece);
                    if !format.is_float() {
                        for row in piece.chunks_exact(row_bytes) {
                            for g in 0..quant::groups(spec.head_dim) {
                                let (scale, min) =
                                    quant::group_params(format, row, spec.head_dim, g);
                                if !(scale.is_finite() && min.is_finite()) {
                                    return Err(Error::BadSnapshot("a row's scale is not finite"));
                                }
                            }
                        }
                    }
                    at += piece.len();
                    rows -= n;
                }
            }
        }
        let mut word = 0;
        let words = self.state_words();
        while word < words {
            let n = (words - word).min(CHUNK / 4);
            let piece = &mut buffer[..4 * n];
            if !read(at, piece) {
                return Err(Error::Interrupted);
            }
            checksum.update(piece);
            for (i, w) in piece.chunks_exact(4).enumerate() {
                self.check_state_word(word + i, le_u32(w, 0))?;
            }
            at += piece.len();
            word += n;
        }
        // The key tail: its count (read before), then `f16` rows, every element finite.
        let mut rest = 4 + self.tail_section_bytes(held).ok_or(Error::SizeOverflow)?;
        let mut skip = 4;
        while rest > 0 {
            let piece = &mut buffer[..rest.min(CHUNK)];
            if !read(at, piece) {
                return Err(Error::Interrupted);
            }
            checksum.update(piece);
            let finite = piece[skip..]
                .chunks_exact(2)
                .all(|h| crate::half::f16_to_f32(u16::from_le_bytes([h[0], h[1]])).is_finite());
            if !finite {
                return Err(Error::BadSnapshot("a key tail element is not finite"));
            }
            skip = 0;
            at += piece.len();
            rest -= piece.len();
        }
        if checksum.finish() != sum {
            return Err(Error::BadSnapshot(
                "checksum mismatch (corrupted or truncated)",
            ));
        }
        Ok(())
    }

    /// The second pass of an import: rows straight into `slot`'s blocks, state words into
    /// its int4 state, the checksum computed again over what was read.
    fn fill_snapshot(
        &mut self,
        slot: usize,
        tokens: usize,
        held: usize,
        sum: u64,
        read: &mut dyn FnMut(usize, &mut [u8]) -> bool,
    ) -> Result<(), Error> {
        let spec = *self.spec();
        let mut checksum = Checksum::new();
        let mut at = HEADER;
        for layer in 0..spec.layers {
            for kind in [Kind::K, Kind::V] {
                for head in 0..spec.kv_heads {
                    for logical in 0..self.blocks_for(tokens) {
                        let run = self.row_run(slot, layer, kind, head, tokens, logical);
                        let piece = &mut self.data[run];
                        if !read(at, piece) {
                            return Err(Error::Interrupted);
                        }
                        checksum.update(piece);
                        at += piece.len();
                    }
                }
            }
        }
        let mut buffer = [0u8; 256];
        let mut word = 0;
        let words = self.state_words();
        while word < words {
            let n = (words - word).min(buffer.len() / 4);
            let piece = &mut buffer[..4 * n];
            if !read(at, piece) {
                return Err(Error::Interrupted);
            }
            checksum.update(piece);
            for (i, w) in piece.chunks_exact(4).enumerate() {
                let value = le_u32(w, 0);
                self.check_state_word(word + i, value)?;
                self.set_state_word(slot, word + i, value);
            }
            at += piece.len();
            word += n;
        }
        // The key tail: the latest positions that fit this cache's ring go into it; the rest
        // are read for the checksum only.
        let count = &mut buffer[..4];
        if !read(at, count) {
            return Err(Error::Interrupted);
        }
        checksum.update(count);
        at += 4;
        let (tail_tokens, row_bytes) = (spec.key_tail_tokens, 2 * spec.head_dim);
        let kept = held.min(tail_tokens);
        for layer in 0..spec.layers {
            for head in 0..spec.kv_heads {
                let ring = self.ring_offset(slot, layer, head);
                for position in tokens - held..tokens {
                    let piece = if position >= tokens - kept {
                        let row = ring + position % tail_tokens * row_bytes;
                        &mut self.tail[row..row + row_bytes]
                    } else {
                        &mut buffer[..row_bytes.min(256)]
                    };
                    let mut done = 0;
                    while done < row_bytes {
                        let part_len = (row_bytes - done).min(piece.len());
                        let part = &mut piece[..part_len];
                        if !read(at, part) {
                            return Err(Error::Interrupted);
                        }
                        checksum.update(part);
                        at += part.len();
                        done += part.len();
                    }
                }
            }
        }
        self.words_mut(slot)[super::TAIL_FROM] = (tokens - kept) as u32;
        if checksum.finish() != sum {
            return Err(Error::BadSnapshot("changed while it was being read"));
        }
        Ok(())
    }

    /// Where state word `i` of a snapshot lives: `(which, index)` with `which` 0 for the
    /// offsets flags, 1 key offsets, 2 first keys, 3 first values (see the layout).
    fn state_place(&self, slot: usize, i: usize) -> (usize, usize) {
        let (which, layer, within) = self.state_kind(i);
        let (flag, words) = self.offsets_index(slot, layer);
        (which, if which == 0 { flag } else { words + within })
    }

    /// State word `i` of a snapshot as `(which, layer, element)`: `which` as for
    /// [`Self::state_place`], `element` the index in the layer's `kv_heads × head_dim` words.
    fn state_kind(&self, i: usize) -> (usize, usize, usize) {
        let spec = self.spec();
        let per_layer = spec.kv_heads * spec.head_dim;
        let key_words = if spec.k_format == KvFormat::Int4 {
            spec.layers * (1 + 2 * per_layer)
        } else {
            0
        };
        if i < key_words {
            let (layer, within) = (i / (1 + 2 * per_layer), i % (1 + 2 * per_layer));
            match within {
                0 => (0, layer, 0),
                w if w <= per_layer => (1, layer, w - 1),
                w => (2, layer, w - 1 - per_layer),
            }
        } else {
            let j = i - key_words;
            (3, j / per_layer, j % per_layer)
        }
    }

    fn state_word(&self, slot: usize, i: usize) -> u32 {
        let (which, index) = self.state_place(slot, i);
        [
            &*self.offsets_set,
            &*self.key_offsets,
            &*self.first_keys,
            &*self.first_values,
        ][which][index]
    }

    fn set_state_word(&mut self, slot: usize, i: usize, value: u32) {
        let (which, index) = self.state_place(slot, i);
        let words = match which {
            0 => &mut *self.offsets_set,
            1 => &mut *self.key_offsets,
            2 => &mut *self.first_keys,
            _ => &mut *self.first_values,
        };
        words[index] = value;
    }

    /// A snapshot's state word `i`: flags 0 or 1, every element finite.
    fn check_state_word(&self, i: usize, value: u32) -> Result<(), Error> {
        match self.state_kind(i).0 {
            0 if value > 1 => Err(Error::BadSnapshot("an int4 offsets flag is not 0 or 1")),
            0 => Ok(()),
            _ if !f32::from_bits(value).is_finite() => Err(Error::BadSnapshot(
                "an int4 offset or exact first row is not finite",
            )),
            _ => Ok(()),
        }
    }

    /// The header's geometry words and token count, or `SizeOverflow` if one does not fit.
    fn header_words(&self, tokens: usize) -> Result<[u32; 6], Error> {
        let spec = self.spec();
        let mut words = [0u32; 6];
        let values = [
            spec.layers,
            spec.kv_heads,
            spec.head_dim,
            spec.k_format as usize,
            spec.v_format as usize,
            tokens,
        ];
        for (w, v) in words.iter_mut().zip(values) {
            *w = u32::try_from(v).map_err(|_| Error::SizeOverflow)?;
        }
        Ok(words)
    }

    /// Words of int4 state per sequence (see the layout).
    fn state_words(&self) -> usize {
        let spec = self.spec();
        let per_layer = spec.kv_heads * spec.head_dim;
        let keys = if spec.k_format == KvFormat::Int4 {
            spec.layers * (1 + 2 * per_layer)
        } else {
            0
        };
        let values = if spec.v_format == KvFormat::Int4 {
            spec.layers * per_layer
        } else {
            0
        };
        keys + values
    }

    /// Snapshot bytes for a sequence of `tokens` tokens whose key tail holds `held`
    /// positions, `None` on overflow.
    fn snapshot_len(&self, tokens: usize, held: usize) -> Option<usize> {
        let spec = self.spec();
        let token_bytes = (self.layout.row_bytes(Kind::K) + self.layout.row_bytes(Kind::V))
            .checked_mul(spec.kv_heads)?
            .checked_mul(spec.layers)?;
        token_bytes
            .checked_mul(tokens)?
            .checked_add(HEADER)?
            .checked_add(self.state_words().checked_mul(4)?)?
            .checked_add(4)?
            .checked_add(self.tail_section_bytes(held)?)
    }

    /// The bytes, in `data`, of the rows (`layer`, `kind`, `kv_head`) that logical block
    /// `logical` holds of positions `0..tokens` (all held): a block's rows of one segment lie
    /// back to back, so a snapshot copies them as one run.
    fn row_run(
        &self,
        slot: usize,
        layer: usize,
        kind: Kind,
        kv_head: usize,
        tokens: usize,
        logical: usize,
    ) -> core::ops::Range<usize> {
        let block_tokens = self.spec().block_tokens;
        let rows = (tokens - logical * block_tokens).min(block_tokens);
        let start = self.table(slot)[logical] as usize * self.layout.block_bytes()
            + self.layout.row_offset(layer, kind, kv_head, 0);
        start..start + rows * self.layout.row_bytes(kind)
    }
}
