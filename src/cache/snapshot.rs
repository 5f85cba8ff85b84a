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
//! | 0..8 | magic `KVCSEQ01` |
//! | 8..28 | layers, KV heads, head dim, K format, V format (`u32` each; formats as `KvFormat as u32`) |
//! | 28..32 | tokens (`u32`) |
//! | 32..40 | checksum of every byte from 40 on (FNV-1a's step over 64-bit words in 4 lanes: see `checksum`) |
//! | 40.. | rows: per layer, K then V, per KV head, the `tokens` stored rows in position order |
//! | then | int4 keys only: per layer a word (1 once the layer's offsets are set), then `kv_heads × head_dim` key offsets, then as many exact first-key elements (`f32` bits) |
//! | then | int4 values only: per layer, `kv_heads × head_dim` exact first-value elements |

use super::{KvCache, SeqId};
use crate::error::Error;
use crate::format::KvFormat;
use crate::quant;
use crate::spec::Kind;

const MAGIC: &[u8; 8] = b"KVCSEQ01";
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
    let mut lanes = [0u64, 1, 2, 3].map(|lane| FNV_BASIS ^ lane);
    let mut words = bytes.chunks_exact(32);
    for chunk in &mut words {
        for (lane, word) in lanes.iter_mut().zip(chunk.chunks_exact(8)) {
            let word = u64::from_le_bytes(word.try_into().unwrap_or_default());
            *lane = (*lane ^ word).wrapping_mul(FNV_PRIME);
        }
    }
    for (lane, piece) in lanes.iter_mut().zip(words.remainder().chunks(8)) {
        let mut word = [0u8; 8];
        word[..piece.len()].copy_from_slice(piece);
        *lane = (*lane ^ u64::from_le_bytes(word)).wrapping_mul(FNV_PRIME);
    }
    lanes
        .iter()
        .fold((bytes.len() as u64).wrapping_mul(FNV_PRIME), |h, &lane| {
            (h ^ lane).wrapping_mul(FNV_PRIME)
        })
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from(le_u32(bytes, at)) | u64::from(le_u32(bytes, at + 4)) << 32
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

impl KvCache<'_> {
    /// Bytes [`KvCache::export_sequence`] writes for `seq`.
    pub fn exported_len(&self, seq: SeqId) -> Result<usize, Error> {
        let slot = self.slot_of(seq)?;
        self.snapshot_len(self.len_of(slot))
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
        let slot = self.slot_of(seq)?;
        let spec = *self.spec();
        let tokens = self.len_of(slot);
        let evicted = self.evicted_range(slot);
        if !evicted.is_empty() {
            return Err(Error::Evicted {
                position: evicted.start * spec.block_tokens,
            });
        }
        let needed = self.snapshot_len(tokens).ok_or(Error::SizeOverflow)?;
        let header_words = self.header_words(tokens)?;
        let out = out.get_mut(..needed).ok_or(Error::BadShape("out"))?;
        let (header, body) = out.split_at_mut(HEADER);
        header[..8].copy_from_slice(MAGIC);
        for (i, word) in header_words.iter().enumerate() {
            header[8 + 4 * i..12 + 4 * i].copy_from_slice(&word.to_le_bytes());
        }
        let mut at = 0;
        let mut put = |bytes: &[u8]| {
            body[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        for layer in 0..spec.layers {
            for kind in [Kind::K, Kind::V] {
                for head in 0..spec.kv_heads {
                    for logical in 0..self.blocks_for(tokens) {
                        put(&self.data[self.row_run(slot, layer, kind, head, tokens, logical)]);
                    }
                }
            }
        }
        let per_layer = spec.kv_heads * spec.head_dim;
        for layer in 0..spec.layers {
            let (flag, words) = self.offsets_index(slot, layer);
            if spec.k_format == KvFormat::Int4 {
                put(&self.offsets_set[flag].to_le_bytes());
                for &w in &self.key_offsets[words..words + per_layer] {
                    put(&w.to_le_bytes());
                }
                for &w in &self.first_keys[words..words + per_layer] {
                    put(&w.to_le_bytes());
                }
            }
        }
        if spec.v_format == KvFormat::Int4 {
            for layer in 0..spec.layers {
                let words = self.offsets_index(slot, layer).1;
                for &w in &self.first_values[words..words + per_layer] {
                    put(&w.to_le_bytes());
                }
            }
        }
        let sum = checksum(body);
        header[SUM_AT..SUM_AT + 8].copy_from_slice(&sum.to_le_bytes());
        Ok(needed)
    }

    /// Restores a sequence saved by [`KvCache::export_sequence`] as a new sequence of this
    /// cache and returns its id. Everything is checked before anything changes: the bytes
    /// (magic, geometry and formats, length, checksum, finite quantization parameters and int4
    /// state: otherwise [`Error::BadSnapshot`] naming what is wrong), then room (a free
    /// sequence slot, `max_seq_tokens`, free blocks).
    pub fn import_sequence(&mut self, bytes: &[u8]) -> Result<SeqId, Error> {
        let spec = *self.spec();
        let header = bytes
            .get(..HEADER)
            .ok_or(Error::BadSnapshot("shorter than its header"))?;
        if &header[..8] != MAGIC {
            return Err(Error::BadSnapshot("not a sequence snapshot (magic)"));
        }
        let tokens = le_u32(header, 28) as usize;
        let expected = self.header_words(tokens.min(spec.max_seq_tokens))?;
        if (0..5).any(|i| le_u32(header, 8 + 4 * i) != expected[i]) {
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
        let needed = self.snapshot_len(tokens).ok_or(Error::SizeOverflow)?;
        if bytes.len() != needed {
            return Err(Error::BadSnapshot(
                "length differs from what its header implies",
            ));
        }
        let body = &bytes[HEADER..];
        let sum = le_u64(header, SUM_AT);
        if checksum(body) != sum {
            return Err(Error::BadSnapshot(
                "checksum mismatch (corrupted or truncated)",
            ));
        }
        let (rows, state) = body.split_at(needed - HEADER - 4 * self.state_words());
        self.check_snapshot_rows(rows, tokens)?;
        check_snapshot_state(
            spec.k_format,
            spec.v_format,
            spec.layers,
            spec.kv_heads * spec.head_dim,
            state,
        )?;
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

        // Checked: nothing below can fail.
        let seq = self.add_sequence()?;
        let slot = seq.slot();
        self.apply_reserve(slot, tokens);
        let mut at = 0;
        for layer in 0..spec.layers {
            for kind in [Kind::K, Kind::V] {
                for head in 0..spec.kv_heads {
                    for logical in 0..self.blocks_for(tokens) {
                        let run = self.row_run(slot, layer, kind, head, tokens, logical);
                        let len = run.len();
                        self.data[run].copy_from_slice(&rows[at..at + len]);
                        at += len;
                    }
                }
            }
        }
        let mut words = state.chunks_exact(4).map(|w| le_u32(w, 0));
        let per_layer = spec.kv_heads * spec.head_dim;
        for layer in 0..spec.layers {
            let (flag, at) = self.offsets_index(slot, layer);
            if spec.k_format == KvFormat::Int4 {
                self.offsets_set[flag] = words.next().unwrap_or(0);
                for w in &mut self.key_offsets[at..at + per_layer] {
                    *w = words.next().unwrap_or(0);
                }
                for w in &mut self.first_keys[at..at + per_layer] {
                    *w = words.next().unwrap_or(0);
                }
            }
        }
        if spec.v_format == KvFormat::Int4 {
            for layer in 0..spec.layers {
                let at = self.offsets_index(slot, layer).1;
                for w in &mut self.first_values[at..at + per_layer] {
                    *w = words.next().unwrap_or(0);
                }
            }
        }
        Ok(seq)
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

    /// Snapshot bytes for a sequence of `tokens` tokens, `None` on overflow.
    fn snapshot_len(&self, tokens: usize) -> Option<usize> {
        let spec = self.spec();
        let token_bytes = (self.layout.row_bytes(Kind::K) + self.layout.row_bytes(Kind::V))
            .checked_mul(spec.kv_heads)?
            .checked_mul(spec.layers)?;
        token_bytes
            .checked_mul(tokens)?
            .checked_add(HEADER)?
            .checked_add(self.state_words().checked_mul(4)?)
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

    /// Quantized rows of a snapshot must carry finite scales and minima (rows the cache wrote
    /// always do); float rows come back as stored, NaN included, as [`KvCache::write`] stores
    /// them.
    fn check_snapshot_rows(&self, rows: &[u8], tokens: usize) -> Result<(), Error> {
        let spec = self.spec();
        let mut at = 0;
        for _layer in 0..spec.layers {
            for kind in [Kind::K, Kind::V] {
                let format = self.layout.format(kind);
                let row_bytes = self.layout.row_bytes(kind);
                let count = spec.kv_heads * tokens;
                if format.is_float() {
                    at += count * row_bytes;
                    continue;
                }
                for row in rows[at..at + count * row_bytes].chunks_exact(row_bytes) {
                    for g in 0..quant::groups(spec.head_dim) {
                        let (scale, min) = quant::group_params(format, row, spec.head_dim, g);
                        if !(scale.is_finite() && min.is_finite()) {
                            return Err(Error::BadSnapshot("a row's scale is not finite"));
                        }
                    }
                }
                at += count * row_bytes;
            }
        }
        Ok(())
    }
}

/// The int4 state words of a snapshot: flags 0 or 1, every element finite.
fn check_snapshot_state(
    k_format: KvFormat,
    v_format: KvFormat,
    layers: usize,
    per_layer: usize,
    state: &[u8],
) -> Result<(), Error> {
    let mut words = state.chunks_exact(4).map(|w| le_u32(w, 0));
    let finite = |w: Option<u32>| w.is_some_and(|w| f32::from_bits(w).is_finite());
    if k_format == KvFormat::Int4 {
        for _ in 0..layers {
            if !matches!(words.next(), Some(0 | 1)) {
                return Err(Error::BadSnapshot("an int4 offsets flag is not 0 or 1"));
            }
            if !(0..2 * per_layer).all(|_| finite(words.next())) {
                return Err(Error::BadSnapshot(
                    "an int4 key offset or first key is not finite",
                ));
            }
        }
    }
    if v_format == KvFormat::Int4 && !(0..layers * per_layer).all(|_| finite(words.next())) {
        return Err(Error::BadSnapshot("an int4 first value is not finite"));
    }
    Ok(())
}
