//! Memory analysis: how the cache grows with context, batch and storage format.
//!
//! Cache bytes grow linearly: `tokens × bytes_per_token`, where one token costs, in every layer,
//! one K row and one V row per KV head. Paging adds at most one partly filled block per
//! sequence; segment padding (64 bytes) adds nothing for the usual shapes.

use crate::error::Error;
use crate::spec::{CacheSpec, Layout};

/// Cache footprint of `batch` sequences of `context` tokens each.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Footprint {
    /// Bytes per token at full blocks (K and V, every layer and KV head, scales included).
    pub bytes_per_token: f64,
    /// Blocks the batch needs: `batch × ceil(context / block_tokens)`.
    pub blocks: usize,
    /// Bytes of those blocks.
    pub block_bytes: usize,
    /// Arena bytes for those blocks plus all metadata ([`Layout::arena_bytes`]).
    pub arena_bytes: usize,
    /// Bytes a contiguous, unpaged `[batch][context]` cache in the same formats would take.
    pub contiguous_bytes: f64,
}

/// Footprint of a batch under `spec` (the spec's `max_seqs` and `max_seq_tokens` are raised
/// to fit the batch so the metadata is counted for exactly this workload).
pub fn footprint(spec: CacheSpec, context: usize, batch: usize) -> Result<Footprint, Error> {
    let mut sized = spec;
    sized.max_seqs = batch.max(1);
    sized.max_seq_tokens = context.max(1);
    let layout = Layout::new(sized)?;
    let per_seq = context.div_ceil(spec.block_tokens);
    let blocks = per_seq.checked_mul(batch).ok_or(Error::SizeOverflow)?;
    let block_bytes = blocks
        .checked_mul(layout.block_bytes())
        .ok_or(Error::SizeOverflow)?;
    let row_bytes = layout.row_bytes(crate::spec::Kind::K) + layout.row_bytes(crate::spec::Kind::V);
    let contiguous =
        (spec.layers * spec.kv_heads * row_bytes) as f64 * context as f64 * batch as f64;
    Ok(Footprint {
        bytes_per_token: layout.bytes_per_token(),
        blocks,
        block_bytes,
        arena_bytes: layout.arena_bytes(blocks)?,
        contiguous_bytes: contiguous,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KvFormat;

    #[test]
    fn smollm2_at_8192_tokens() {
        let fp = footprint(CacheSpec::smollm2_135m(), 8192, 1).unwrap();
        assert_eq!(fp.bytes_per_token, 23_040.0);
        assert_eq!(fp.block_bytes, 8192 * 23_040);
        assert_eq!(fp.contiguous_bytes, 8192.0 * 23_040.0);
        let mut f32_spec = CacheSpec::smollm2_135m();
        f32_spec.k_format = KvFormat::F32;
        f32_spec.v_format = KvFormat::F32;
        assert_eq!(footprint(f32_spec, 100, 3).unwrap().blocks, 3 * 7);
    }
}
