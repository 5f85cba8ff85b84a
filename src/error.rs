//! The crate's one error type. Every fallible call returns it and, when it does, has changed
//! nothing.

use core::fmt;

/// Why an operation was refused. A call that returns an error leaves the cache exactly as it
/// was before the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// A spec field that must be positive is zero (the field's name).
    ZeroDimension(&'static str),
    /// Query heads are not a multiple of KV heads.
    HeadsNotMultiple {
        /// Query heads asked for.
        q_heads: usize,
        /// KV heads asked for.
        kv_heads: usize,
    },
    /// A derived size does not fit in `usize` (or a per-sequence length in `u32`).
    SizeOverflow,
    /// A spec field is out of its allowed range (the field's name).
    InvalidSpec(&'static str),
    /// The arena cannot hold the metadata plus at least the requested blocks.
    ArenaTooSmall {
        /// Bytes needed (for one block if no count was requested).
        needed: usize,
        /// Bytes given.
        available: usize,
    },
    /// The id names no live sequence (never added, removed, or from another cache).
    UnknownSequence,
    /// All sequence slots are in use.
    TooManySequences,
    /// The sequence would grow past the spec's `max_seq_tokens`.
    TooLong {
        /// Length the operation would reach.
        requested: usize,
        /// The spec's limit.
        max: usize,
    },
    /// The pool has fewer free blocks than the operation needs.
    OutOfBlocks {
        /// Blocks the operation needs.
        needed: usize,
        /// Blocks free.
        free: usize,
    },
    /// A position or length outside what the sequence holds (e.g. writing past its reserved
    /// slots, or truncating to a longer length).
    BadPosition {
        /// The position or length given.
        position: usize,
        /// The sequence's length.
        len: usize,
    },
    /// The position was dropped by the sliding window and is no longer stored.
    Evicted {
        /// The position asked for.
        position: usize,
    },
    /// A layer or head index outside the spec.
    BadIndex(&'static str),
    /// A slice has the wrong length (the argument's name).
    BadShape(&'static str),
    /// The same sequence appears twice in one batch.
    DuplicateSequence,
    /// The scratch buffer is smaller than the operation needs.
    ScratchTooSmall {
        /// `f32` elements needed.
        needed: usize,
        /// `f32` elements given.
        available: usize,
    },
    /// A value is NaN or infinite where the storage format cannot hold it.
    NonFinite,
    /// A threaded attention run returned before every work item had run (the `execute` given
    /// to `AttentionWorkspace::run` broke its contract: it called no thread index).
    IncompleteRun,
    /// Bytes given to [`crate::KvCache::import_sequence`] are not a snapshot this cache can
    /// restore (what is wrong with them).
    BadSnapshot(&'static str),
    /// A read or write callback of a streaming save or restore reported a failure.
    Interrupted,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::ZeroDimension(field) => write!(f, "spec field `{field}` must be positive"),
            Error::HeadsNotMultiple { q_heads, kv_heads } => write!(
                f,
                "query heads ({q_heads}) must be a multiple of KV heads ({kv_heads})"
            ),
            Error::SizeOverflow => f.write_str("a derived size overflows"),
            Error::InvalidSpec(field) => write!(f, "spec field `{field}` is out of range"),
            Error::ArenaTooSmall { needed, available } => {
                write!(
                    f,
                    "arena too small: {needed} bytes needed, {available} given"
                )
            }
            Error::UnknownSequence => f.write_str("unknown or removed sequence"),
            Error::TooManySequences => f.write_str("all sequence slots are in use"),
            Error::TooLong { requested, max } => {
                write!(
                    f,
                    "sequence would hold {requested} tokens, the limit is {max}"
                )
            }
            Error::OutOfBlocks { needed, free } => {
                write!(f, "out of blocks: {needed} needed, {free} free")
            }
            Error::BadPosition { position, len } => {
                write!(
                    f,
                    "position or length {position} is invalid for a sequence of {len} tokens"
                )
            }
            Error::Evicted { position } => {
                write!(f, "position {position} was dropped by the sliding window")
            }
            Error::BadIndex(what) => write!(f, "{what} index out of range"),
            Error::BadShape(what) => write!(f, "`{what}` has the wrong length"),
            Error::DuplicateSequence => f.write_str("a sequence appears twice in one batch"),
            Error::ScratchTooSmall { needed, available } => {
                write!(
                    f,
                    "scratch too small: {needed} f32 needed, {available} given"
                )
            }
            Error::NonFinite => f.write_str("NaN or infinite value"),
            Error::IncompleteRun => {
                f.write_str("attention returned before every work item had run")
            }
            Error::BadSnapshot(what) => write!(f, "not a valid sequence snapshot: {what}"),
            Error::Interrupted => f.write_str("a snapshot read or write callback failed"),
        }
    }
}

impl core::error::Error for Error {}
