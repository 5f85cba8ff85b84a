//! Model geometry, storage formats and the byte layout derived from them.
//!
//! [`CacheSpec`] is what the caller asks for; [`Layout`] is every size and stride derived from
//! it once, with checked arithmetic, so that nothing later can overflow.
//!
//! # Memory format of one block
//!
//! A physical block holds `block_tokens` token slots for **every** layer, so one page-table
//! entry serves all layers. Inside a block, layer by layer, the keys of every KV head come
//! first, then the values; each (layer, K/V, head) *segment* is `block_tokens` rows, one per
//! token slot, each row `head_dim` elements in the K (or V) format followed by that row's
//! scales if the format has any. Segments start on 64-byte boundaries.
//!
//! ```text
//! block b ─┬─ layer 0 ─┬─ K head 0: [slot 0 row][slot 1 row]…[slot T-1 row] (pad to 64)
//!          │           ├─ K head 1: …
//!          │           ├─ …
//!          │           ├─ V head 0: [slot 0 row]…[slot T-1 row] (pad to 64)
//!          │           └─ V head H-1
//!          ├─ layer 1 ─ …
//!          └─ layer L-1
//! row (f16, head_dim D): D × 2 bytes, little-endian, element d at byte 2·d
//! ```
//!
//! The byte offset of (block `b`, layer `l`, K, head `h`, slot `s`) is
//! `b·block_bytes + l·layer_bytes + h·k_segment_bytes + s·k_row_bytes`; for V add
//! `kv_heads·k_segment_bytes` and use the V strides. [`Layout::row_offset`] computes it.

use crate::error::Error;
use crate::format::KvFormat;

/// Alignment, in bytes, of every segment inside a block and of the block region in the arena.
pub const SEGMENT_ALIGN: usize = 64;

/// Whether a row belongs to the keys or the values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Keys.
    K,
    /// Values.
    V,
}

/// What the caller asks for: model geometry, block size, formats and limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheSpec {
    /// Transformer layers (each has its own keys and values).
    pub layers: usize,
    /// Query heads per layer.
    pub q_heads: usize,
    /// Key/value heads per layer; `q_heads` must be a multiple (MHA: equal, MQA: 1).
    pub kv_heads: usize,
    /// Elements per head vector.
    pub head_dim: usize,
    /// Token slots per physical block.
    pub block_tokens: usize,
    /// Storage format of keys.
    pub k_format: KvFormat,
    /// Storage format of values.
    pub v_format: KvFormat,
    /// Sequences that may be live at once.
    pub max_seqs: usize,
    /// Longest sequence, in tokens (at most `u32::MAX`).
    pub max_seq_tokens: usize,
    /// Sliding window in tokens: a query at position `p` sees keys `p-window+1 ..= p` (plus the
    /// sink tokens). `0` means no window: every earlier key is seen.
    pub window: usize,
    /// With a window, the first `sink_tokens` positions stay visible to every query and are
    /// never evicted. Ignored without a window.
    pub sink_tokens: usize,
    /// Quantized keys (int8, int4) only: each sequence also keeps its last `key_tail_tokens`
    /// keys of every layer and KV head at full precision (`f16`, in a ring beside the blocks),
    /// and attention scores those positions from them instead of from their quantized rows:
    /// a decode step sees its most recent keys almost exact. Costs
    /// `layers × kv_heads × key_tail_tokens × head_dim × 2` bytes per sequence slot
    /// ([`Layout::tail_bytes`]). `0` (the default) keeps none; must be `0` for float keys and
    /// at most `max_seq_tokens`. See [`crate::cache`] for which positions it covers.
    pub key_tail_tokens: usize,
}

impl CacheSpec {
    /// A spec for the given geometry with defaults: 16-token blocks, f16 keys and values,
    /// 8 sequences of up to 4096 tokens, no window.
    pub const fn new(layers: usize, q_heads: usize, kv_heads: usize, head_dim: usize) -> Self {
        CacheSpec {
            layers,
            q_heads,
            kv_heads,
            head_dim,
            block_tokens: 16,
            k_format: KvFormat::F16,
            v_format: KvFormat::F16,
            max_seqs: 8,
            max_seq_tokens: 4096,
            window: 0,
            sink_tokens: 0,
            key_tail_tokens: 0,
        }
    }

    /// SmolLM2-135M: 30 layers, 9 query heads on 3 KV heads, head dim 64.
    pub const fn smollm2_135m() -> Self {
        CacheSpec::new(30, 9, 3, 64)
    }

    /// Llama-2-7B: 32 layers, 32 query heads each with its own KV head (multi-head attention,
    /// no sharing), head dim 128.
    pub const fn llama2_7b() -> Self {
        CacheSpec::new(32, 32, 32, 128)
    }

    /// Llama-3-8B: 32 layers, 32 query heads on 8 KV heads, head dim 128.
    pub const fn llama3_8b() -> Self {
        CacheSpec::new(32, 32, 8, 128)
    }

    /// Query heads that share one KV head (`q_heads / kv_heads`).
    pub const fn group(&self) -> usize {
        match self.q_heads.checked_div(self.kv_heads) {
            Some(group) => group,
            None => 0,
        }
    }
}

/// Every size and stride derived from a [`CacheSpec`], checked once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    spec: CacheSpec,
    k_row_bytes: usize,
    v_row_bytes: usize,
    k_segment_bytes: usize,
    v_segment_bytes: usize,
    layer_bytes: usize,
    block_bytes: usize,
    max_blocks_per_seq: usize,
    /// Bytes of every sequence slot's key tail ring (see [`CacheSpec::key_tail_tokens`]).
    tail_bytes: usize,
}

/// `u32` words of metadata per sequence slot (see [`crate::cache`]).
pub(crate) const SEQ_WORDS: usize = 5;

fn round_up(value: usize, align: usize) -> Option<usize> {
    value.checked_add(align - 1).map(|v| v / align * align)
}

impl Layout {
    /// Validates `spec` and derives the layout.
    pub fn new(spec: CacheSpec) -> Result<Layout, Error> {
        let positive = [
            ("layers", spec.layers),
            ("q_heads", spec.q_heads),
            ("kv_heads", spec.kv_heads),
            ("head_dim", spec.head_dim),
            ("block_tokens", spec.block_tokens),
            ("max_seqs", spec.max_seqs),
            ("max_seq_tokens", spec.max_seq_tokens),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::ZeroDimension(name));
            }
        }
        if !spec.q_heads.is_multiple_of(spec.kv_heads) {
            return Err(Error::HeadsNotMultiple {
                q_heads: spec.q_heads,
                kv_heads: spec.kv_heads,
            });
        }
        if spec.max_seq_tokens > u32::MAX as usize {
            return Err(Error::InvalidSpec("max_seq_tokens"));
        }
        if spec.max_seqs > u32::MAX as usize / 2 {
            return Err(Error::InvalidSpec("max_seqs"));
        }
        if spec.block_tokens > u32::MAX as usize {
            return Err(Error::InvalidSpec("block_tokens"));
        }
        if spec.window != 0 && spec.sink_tokens > spec.max_seq_tokens {
            return Err(Error::InvalidSpec("sink_tokens"));
        }
        if spec.key_tail_tokens != 0
            && (spec.k_format.is_float() || spec.key_tail_tokens > spec.max_seq_tokens)
        {
            return Err(Error::InvalidSpec("key_tail_tokens"));
        }
        let overflow = Error::SizeOverflow;
        let k_row_bytes = spec.k_format.row_bytes(spec.head_dim).ok_or(overflow)?;
        let v_row_bytes = spec.v_format.row_bytes(spec.head_dim).ok_or(overflow)?;
        let k_segment_bytes = k_row_bytes
            .checked_mul(spec.block_tokens)
            .and_then(|b| round_up(b, SEGMENT_ALIGN))
            .ok_or(overflow)?;
        let v_segment_bytes = v_row_bytes
            .checked_mul(spec.block_tokens)
            .and_then(|b| round_up(b, SEGMENT_ALIGN))
            .ok_or(overflow)?;
        let layer_bytes = k_segment_bytes
            .checked_add(v_segment_bytes)
            .and_then(|b| b.checked_mul(spec.kv_heads))
            .ok_or(overflow)?;
        let block_bytes = layer_bytes.checked_mul(spec.layers).ok_or(overflow)?;
        let max_blocks_per_seq = spec.max_seq_tokens.div_ceil(spec.block_tokens);
        let tail_bytes = KvFormat::F16
            .row_bytes(spec.head_dim)
            .and_then(|b| b.checked_mul(spec.key_tail_tokens))
            .and_then(|b| b.checked_mul(spec.kv_heads))
            .and_then(|b| b.checked_mul(spec.layers))
            .and_then(|b| b.checked_mul(spec.max_seqs))
            .and_then(|b| round_up(b, SEGMENT_ALIGN))
            .ok_or(overflow)?;
        let layout = Layout {
            spec,
            k_row_bytes,
            v_row_bytes,
            k_segment_bytes,
            v_segment_bytes,
            layer_bytes,
            block_bytes,
            max_blocks_per_seq,
            tail_bytes,
        };
        // The metadata for zero blocks must be representable; block counts are checked later.
        layout.arena_bytes(0)?;
        Ok(layout)
    }

    /// The spec this layout was derived from.
    pub const fn spec(&self) -> &CacheSpec {
        &self.spec
    }

    /// Bytes of one stored row of `kind`.
    pub const fn row_bytes(&self, kind: Kind) -> usize {
        match kind {
            Kind::K => self.k_row_bytes,
            Kind::V => self.v_row_bytes,
        }
    }

    /// Storage format of `kind`.
    pub const fn format(&self, kind: Kind) -> KvFormat {
        match kind {
            Kind::K => self.spec.k_format,
            Kind::V => self.spec.v_format,
        }
    }

    /// Bytes of one (layer, kind, head) segment: `block_tokens` rows, padded to 64.
    pub const fn segment_bytes(&self, kind: Kind) -> usize {
        match kind {
            Kind::K => self.k_segment_bytes,
            Kind::V => self.v_segment_bytes,
        }
    }

    /// Bytes of one layer's part of a block (K and V of every KV head).
    pub const fn layer_bytes(&self) -> usize {
        self.layer_bytes
    }

    /// Bytes of one physical block (every layer).
    pub const fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    /// Page-table entries per sequence: `ceil(max_seq_tokens / block_tokens)`.
    pub const fn max_blocks_per_seq(&self) -> usize {
        self.max_blocks_per_seq
    }

    /// Offset of a segment inside a block. Indices must be in range (checked by callers).
    pub const fn segment_offset(&self, layer: usize, kind: Kind, kv_head: usize) -> usize {
        let within = match kind {
            Kind::K => kv_head * self.k_segment_bytes,
            Kind::V => self.spec.kv_heads * self.k_segment_bytes + kv_head * self.v_segment_bytes,
        };
        layer * self.layer_bytes + within
    }

    /// Offset of one row inside a block (`slot < block_tokens`).
    pub const fn row_offset(&self, layer: usize, kind: Kind, kv_head: usize, slot: usize) -> usize {
        self.segment_offset(layer, kind, kv_head) + slot * self.row_bytes(kind)
    }

    /// Bytes of the key tail rings of all sequence slots, after the blocks in the arena:
    /// slot by slot, layer by layer, KV head by KV head, `key_tail_tokens` `f16` rows of
    /// `head_dim` (position `p` in row `p mod key_tail_tokens`), padded to 64 bytes in all;
    /// `0` without a tail.
    pub const fn tail_bytes(&self) -> usize {
        self.tail_bytes
    }

    /// Bytes of one (sequence slot, layer, KV head) key tail ring:
    /// `key_tail_tokens × head_dim × 2`.
    pub const fn tail_ring_bytes(&self) -> usize {
        self.spec.key_tail_tokens * self.spec.head_dim * 2
    }

    /// Cache bytes per token at full blocks: K and V rows of every layer and head, with the
    /// segment padding spread over the block's slots.
    pub fn bytes_per_token(&self) -> f64 {
        self.block_bytes as f64 / self.spec.block_tokens as f64
    }

    /// `u32` words of the key offsets of int4 keys (see [`crate::cache`]): per sequence slot
    /// and layer one "set" flag, `kv_heads × head_dim` `f32` offsets and as many `f32` for the
    /// exact first key; `0` for other key formats.
    pub(crate) fn key_offset_words(&self) -> Option<usize> {
        if self.spec.k_format != KvFormat::Int4 {
            return Some(0);
        }
        let per_layer = self.spec.kv_heads.checked_mul(self.spec.head_dim)?;
        self.spec
            .max_seqs
            .checked_mul(self.spec.layers)?
            .checked_mul(per_layer.checked_mul(2)?.checked_add(1)?)
    }

    /// `u32` words of the exact first values of int4 values (see [`crate::cache`]): per
    /// sequence slot and layer `kv_heads × head_dim` `f32`; `0` for other value formats.
    pub(crate) fn first_value_words(&self) -> Option<usize> {
        if self.spec.v_format != KvFormat::Int4 {
            return Some(0);
        }
        self.spec
            .max_seqs
            .checked_mul(self.spec.layers)?
            .checked_mul(self.spec.kv_heads.checked_mul(self.spec.head_dim)?)
    }

    /// `u32` words of metadata for `blocks` blocks: reference counts, free stack and a scratch
    /// array (one word per block each), the sequence table, the page tables, the key offsets
    /// and first keys, and the first values.
    fn metadata_words(&self, blocks: usize) -> Option<usize> {
        let per_block = blocks.checked_mul(3)?;
        let seq_table = self.spec.max_seqs.checked_mul(SEQ_WORDS)?;
        let page_tables = self.spec.max_seqs.checked_mul(self.max_blocks_per_seq)?;
        per_block
            .checked_add(seq_table)?
            .checked_add(page_tables)?
            .checked_add(self.key_offset_words()?)?
            .checked_add(self.first_value_words()?)
    }

    /// Exact arena bytes a cache of `blocks` blocks needs, whatever the arena's alignment
    /// (it includes `SEGMENT_ALIGN - 1` bytes of slack for aligning the start).
    pub fn arena_bytes(&self, blocks: usize) -> Result<usize, Error> {
        if blocks > u32::MAX as usize - 1 {
            return Err(Error::SizeOverflow);
        }
        let data = blocks
            .checked_mul(self.block_bytes)
            .and_then(|b| b.checked_add(self.tail_bytes))
            .ok_or(Error::SizeOverflow)?;
        let words = self.metadata_words(blocks).ok_or(Error::SizeOverflow)?;
        words
            .checked_mul(4)
            .and_then(|m| m.checked_add(data))
            .and_then(|b| b.checked_add(SEGMENT_ALIGN - 1))
            .ok_or(Error::SizeOverflow)
    }

    /// The most blocks whose [`Layout::arena_bytes`] fits in `bytes` (0 if not even one).
    pub fn blocks_fitting(&self, bytes: usize) -> usize {
        let Ok(fixed) = self.arena_bytes(0) else {
            return 0;
        };
        let Some(room) = bytes.checked_sub(fixed) else {
            return 0;
        };
        let per_block = self.block_bytes + 3 * 4;
        (room / per_block).min(u32::MAX as usize - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm2_f16_is_23040_bytes_per_token() {
        let layout = Layout::new(CacheSpec::smollm2_135m()).unwrap();
        assert_eq!(layout.bytes_per_token(), 23_040.0);
        assert_eq!(layout.row_bytes(Kind::K), 128);
        assert_eq!(layout.segment_bytes(Kind::V), 2048);
        assert_eq!(
            layout.row_offset(1, Kind::V, 2, 3),
            6 * 2048 + 3 * 2048 + 2 * 2048 + 3 * 128
        );
    }

    #[test]
    fn offsets_tile_the_block_without_overlap() {
        let mut spec = CacheSpec::new(3, 6, 2, 5);
        spec.block_tokens = 3;
        spec.v_format = KvFormat::F32;
        let layout = Layout::new(spec).unwrap();
        let mut covered = std::vec![0u8; layout.block_bytes()];
        for layer in 0..3 {
            for kind in [Kind::K, Kind::V] {
                for head in 0..2 {
                    for slot in 0..3 {
                        let start = layout.row_offset(layer, kind, head, slot);
                        for byte in &mut covered[start..start + layout.row_bytes(kind)] {
                            *byte += 1;
                        }
                    }
                }
            }
        }
        assert!(covered.iter().all(|&c| c <= 1));
        assert_eq!(
            covered.iter().filter(|&&c| c == 1).count(),
            3 * 2 * 3 * (10 + 20)
        );
    }

    #[test]
    fn arena_bytes_and_blocks_fitting_are_inverse() {
        let layout = Layout::new(CacheSpec::new(2, 4, 2, 8)).unwrap();
        for blocks in [0, 1, 2, 7, 100] {
            let bytes = layout.arena_bytes(blocks).unwrap();
            assert_eq!(layout.blocks_fitting(bytes), blocks);
            assert_eq!(
                layout.blocks_fitting(bytes + layout.block_bytes() + 11),
                blocks
            );
            if blocks > 0 {
                assert_eq!(layout.blocks_fitting(bytes - 1), blocks - 1);
            }
        }
    }

    #[test]
    fn bad_specs_are_rejected() {
        let mut spec = CacheSpec::new(2, 10, 3, 8);
        assert_eq!(
            Layout::new(spec),
            Err(Error::HeadsNotMultiple {
                q_heads: 10,
                kv_heads: 3
            })
        );
        spec = CacheSpec::new(2, 4, 2, 0);
        assert_eq!(Layout::new(spec), Err(Error::ZeroDimension("head_dim")));
        spec = CacheSpec::new(2, 4, 2, 8);
        spec.max_seq_tokens = 1 << 40;
        assert_eq!(Layout::new(spec), Err(Error::InvalidSpec("max_seq_tokens")));
        spec = CacheSpec::new(usize::MAX / 2, 4, 2, usize::MAX / 8);
        assert_eq!(Layout::new(spec), Err(Error::SizeOverflow));
    }
}
