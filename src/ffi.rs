//! The C ABI: opaque handles placed in caller memory, status codes, no panics.
//!
//! Ownership rules, one per handle: a `kvc_cache` lives in memory the caller provides
//! (`kvc_cache_size()` bytes aligned to `kvc_cache_align()`) and borrows the caller's arena; the
//! caller keeps both alive and unmoved until it stops using the handle, and frees them itself
//! (the cache owns nothing, so there is no destroy call). Sequence ids are plain `uint64_t`.
//!
//! Every entry point checks its pointers (NULL gives `KVC_NULL_POINTER`) and lengths before it
//! touches anything, and returns a status; a failed call changes nothing. No path here can
//! panic: all indexing goes through checked Rust APIs. Before any buffer becomes a slice, its
//! address is checked: aligned for its type, at most `isize::MAX` bytes, not overlapping a
//! buffer the call writes (Rust references must not alias) and not inside the handle or the
//! arena; a call that breaks one gets `KVC_BAD_SHAPE`.
#![allow(clippy::missing_safety_doc)]

use core::ffi::{c_char, c_void};
use core::mem::{align_of, size_of};
use core::ptr::null;

use crate::attention::{
    attention, attention_scratch_len, AttentionOptions, AttentionPlan, BatchEntry,
};
use crate::cache::KvCache;
use crate::error::Error;
use crate::format::KvFormat;
use crate::spec::{CacheSpec, Kind, Layout};
use crate::SeqId;

/// Status codes; numbers are never reused.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvcStatus {
    /// Success.
    Ok = 0,
    /// A required pointer was NULL.
    NullPointer = 1,
    /// The spec is invalid (zero or inconsistent sizes, unknown format, overflow).
    BadSpec = 2,
    /// The arena (or the handle memory) is too small or misaligned.
    ArenaTooSmall = 3,
    /// Unknown or removed sequence.
    UnknownSequence = 4,
    /// All sequence slots are in use.
    TooManySequences = 5,
    /// The sequence would exceed `max_seq_tokens`.
    TooLong = 6,
    /// Not enough free blocks.
    OutOfBlocks = 7,
    /// Position or length out of range.
    BadPosition = 8,
    /// Position dropped by the sliding window.
    Evicted = 9,
    /// Layer, head or other index out of range.
    BadIndex = 10,
    /// A buffer has the wrong length, or overlaps one it must not (see the module doc).
    BadShape = 11,
    /// The same sequence twice in one batch.
    DuplicateSequence = 12,
    /// Scratch buffer too small.
    ScratchTooSmall = 13,
    /// NaN or infinity where the format cannot hold it.
    NonFinite = 14,
    /// Bytes that are not a sequence snapshot this cache can restore.
    BadSnapshot = 15,
    /// A read or write callback of a streaming save or restore reported a failure.
    Interrupted = 16,
}

impl From<Error> for KvcStatus {
    fn from(e: Error) -> Self {
        match e {
            Error::ZeroDimension(_)
            | Error::HeadsNotMultiple { .. }
            | Error::SizeOverflow
            | Error::InvalidSpec(_) => KvcStatus::BadSpec,
            Error::ArenaTooSmall { .. } => KvcStatus::ArenaTooSmall,
            Error::UnknownSequence => KvcStatus::UnknownSequence,
            Error::TooManySequences => KvcStatus::TooManySequences,
            Error::TooLong { .. } => KvcStatus::TooLong,
            Error::OutOfBlocks { .. } => KvcStatus::OutOfBlocks,
            Error::BadPosition { .. } => KvcStatus::BadPosition,
            Error::Evicted { .. } => KvcStatus::Evicted,
            // `IncompleteRun` comes only from the threaded workspace, which the C ABI lacks.
            Error::BadIndex(_) | Error::IncompleteRun => KvcStatus::BadIndex,
            Error::BadShape(_) => KvcStatus::BadShape,
            Error::DuplicateSequence => KvcStatus::DuplicateSequence,
            Error::ScratchTooSmall { .. } => KvcStatus::ScratchTooSmall,
            Error::NonFinite => KvcStatus::NonFinite,
            Error::BadSnapshot(_) => KvcStatus::BadSnapshot,
            Error::Interrupted => KvcStatus::Interrupted,
        }
    }
}

/// The spec as C sees it. Formats: 0 = f32, 1 = f16, 2 = bf16, 3 = int8, 4 = int4.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KvcSpec {
    /// Transformer layers.
    pub layers: u32,
    /// Query heads.
    pub q_heads: u32,
    /// KV heads (divides `q_heads`).
    pub kv_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
    /// Token slots per block.
    pub block_tokens: u32,
    /// Key format.
    pub k_format: u32,
    /// Value format.
    pub v_format: u32,
    /// Live sequences at most.
    pub max_seqs: u32,
    /// Tokens per sequence at most.
    pub max_seq_tokens: u32,
    /// Sliding window in tokens (0: none).
    pub window: u32,
    /// Sink tokens kept with a window.
    pub sink_tokens: u32,
    /// Recent keys kept at full precision per sequence (quantized keys only; 0: none).
    pub key_tail_tokens: u32,
}

/// One sequence's part of an attention batch.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KvcBatchEntry {
    /// Sequence id.
    pub seq: u64,
    /// Position of the first query token.
    pub first_position: u32,
    /// Query tokens.
    pub tokens: u32,
}

/// Options of `kvc_attention_ex` and of the work-item attention calls
/// (`kvcache::attention::AttentionOptions`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KvcAttentionOptions {
    /// Key splits per (entry, query tile, KV head); at least 1. More splits, more items to
    /// spread over threads for long contexts.
    pub splits: u32,
    /// Query tokens handled by one item; at least 1.
    pub query_tile: u32,
    /// Score scale; `0` means `1 / sqrt(head_dim)`.
    pub scale: f32,
    /// `KVC_ATTN_*` bits; `0` for the defaults. Unknown bits are refused (`BadSpec`).
    pub flags: u32,
}

/// [`KvcAttentionOptions::flags`]: int4 values summed exactly in `f32`
/// (`AttentionOptions::exact_values`).
pub const KVC_ATTN_EXACT_VALUES: u32 = 1;

/// Accounting, as `kvcache::cache::CacheStats`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KvcStats {
    /// Live sequences.
    pub sequences: u64,
    /// Blocks in the pool.
    pub blocks_total: u64,
    /// Free blocks.
    pub blocks_free: u64,
    /// Bytes of blocks in use.
    pub bytes_used: u64,
    /// Tokens over all sequences.
    pub tokens: u64,
    /// Unused slots in used blocks.
    pub waste_slots: u64,
}

/// Where rows live in the block storage (`kvc_block_storage`), as `kvcache::Layout` gives
/// it: segment (layer, K, head) starts at `layer·layer_bytes + head·k_segment_bytes` inside a
/// block, segment (layer, V, head) at `layer·layer_bytes + kv_heads·k_segment_bytes +
/// head·v_segment_bytes`, and slot `s` of a segment at `s·row_bytes` from its start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KvcLayout {
    /// Bytes of one physical block (every layer).
    pub block_bytes: u64,
    /// Bytes of one layer's part of a block.
    pub layer_bytes: u64,
    /// Bytes of one stored key row (scales included).
    pub k_row_bytes: u64,
    /// Bytes of one stored value row (scales included).
    pub v_row_bytes: u64,
    /// Bytes of one key segment: `block_tokens` rows, padded to 64.
    pub k_segment_bytes: u64,
    /// Bytes of one value segment.
    pub v_segment_bytes: u64,
    /// Physical blocks in the pool.
    pub blocks: u64,
}

/// Page-table entry of a block the sliding window evicted (`kvcache::cache::NO_BLOCK`).
pub const KVC_NO_BLOCK: u32 = crate::cache::NO_BLOCK;

/// The opaque handle: a cache whose arena the caller keeps alive.
pub type KvcCache = KvCache<'static>;

fn format_from(code: u32) -> Option<KvFormat> {
    KvFormat::ALL.into_iter().find(|f| *f as u32 == code)
}

fn spec_from(spec: &KvcSpec) -> Result<CacheSpec, KvcStatus> {
    Ok(CacheSpec {
        layers: spec.layers as usize,
        q_heads: spec.q_heads as usize,
        kv_heads: spec.kv_heads as usize,
        head_dim: spec.head_dim as usize,
        block_tokens: spec.block_tokens as usize,
        k_format: format_from(spec.k_format).ok_or(KvcStatus::BadSpec)?,
        v_format: format_from(spec.v_format).ok_or(KvcStatus::BadSpec)?,
        max_seqs: spec.max_seqs as usize,
        max_seq_tokens: spec.max_seq_tokens as usize,
        window: spec.window as usize,
        sink_tokens: spec.sink_tokens as usize,
        key_tail_tokens: spec.key_tail_tokens as usize,
    })
}

fn status(result: Result<(), Error>) -> KvcStatus {
    match result {
        Ok(()) => KvcStatus::Ok,
        Err(e) => e.into(),
    }
}

/// The bytes `[start, end)` of a buffer of `count` values of `T` at `ptr` (saturating), and
/// whether Rust may view it as a slice at all: `ptr` aligned for `T`, and at most `isize::MAX`
/// bytes that do not wrap around the address space.
#[derive(Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
    valid: bool,
}

impl Span {
    fn of<T>(ptr: *const T, count: usize) -> Span {
        Span::at::<T>(ptr as usize, count)
    }

    /// The span of `count` values of `T` from address `start` (no pointer needed).
    fn at<T>(start: usize, count: usize) -> Span {
        let bytes = count.checked_mul(size_of::<T>());
        let end = bytes.and_then(|b| start.checked_add(b));
        Span {
            start,
            end: end.unwrap_or(usize::MAX),
            valid: start.is_multiple_of(align_of::<T>())
                && end.is_some()
                && bytes.is_some_and(|b| b <= isize::MAX as usize),
        }
    }

    /// Whether both spans are non-empty and share a byte.
    fn overlaps(self, other: Span) -> bool {
        self.start < self.end
            && other.start < other.end
            && self.start < other.end
            && other.start < self.end
    }
}

/// `Ok` when the buffers of a call may be turned into Rust slices together: each is valid as
/// a slice (see [`Span`]), no `write` overlaps another buffer, and no buffer overlaps the
/// handle or the arena of `cache` (a handle from `kvc_cache_init`, not NULL); `KVC_BAD_SHAPE`
/// otherwise.
///
/// # Safety
///
/// `cache` points at a live handle that no call is mutating meanwhile.
unsafe fn check_disjoint(
    cache: *const KvcCache,
    reads: &[Span],
    writes: &[Span],
) -> Result<(), KvcStatus> {
    // SAFETY: the function's contract; only read here, before any `&mut` to it exists.
    let (arena_start, arena_len) = unsafe { (*cache).arena_span() };
    let owned = [Span::of(cache, 1), Span::at::<u8>(arena_start, arena_len)];
    if reads.iter().chain(writes).any(|span| !span.valid) {
        return Err(KvcStatus::BadShape);
    }
    for (i, write) in writes.iter().enumerate() {
        let others = owned.iter().chain(reads).chain(&writes[i + 1..]);
        if others.into_iter().any(|other| write.overlaps(*other)) {
            return Err(KvcStatus::BadShape);
        }
    }
    if reads
        .iter()
        .any(|read| owned.iter().any(|o| read.overlaps(*o)))
    {
        return Err(KvcStatus::BadShape);
    }
    Ok(())
}

/// Bytes of memory a `kvc_cache` handle needs.
#[no_mangle]
pub extern "C" fn kvc_cache_size() -> usize {
    size_of::<KvcCache>()
}

/// Alignment a `kvc_cache` handle's memory needs.
#[no_mangle]
pub extern "C" fn kvc_cache_align() -> usize {
    align_of::<KvcCache>()
}

/// Writes to `*out` the arena bytes a cache of `blocks` blocks needs (any arena alignment).
#[no_mangle]
pub unsafe extern "C" fn kvc_arena_bytes(
    spec: *const KvcSpec,
    blocks: u32,
    out: *mut usize,
) -> KvcStatus {
    if spec.is_null() || out.is_null() {
        return KvcStatus::NullPointer;
    }
    if !Span::of(spec, 1).valid || !Span::of(out, 1).valid {
        return KvcStatus::BadShape;
    }
    // SAFETY: non-NULL and aligned (checked); the caller passes a valid spec. It is copied
    // before `out` is written, so the two may even overlap.
    let spec = match spec_from(unsafe { &*spec }) {
        Ok(s) => s,
        Err(e) => return e,
    };
    match Layout::new(spec).and_then(|l| l.arena_bytes(blocks as usize)) {
        Ok(bytes) => {
            // SAFETY: non-NULL and aligned (checked); the caller's writable `size_t`.
            unsafe { out.write(bytes) };
            KvcStatus::Ok
        }
        Err(e) => e.into(),
    }
}

/// Builds a cache in `handle` (`handle_len` bytes, see `kvc_cache_size`/`kvc_cache_align`)
/// over the arena `arena[0..arena_len]`, with as many blocks as fit; `*out` receives the
/// handle. The arena and the handle memory must outlive every use of the handle.
#[no_mangle]
pub unsafe extern "C" fn kvc_cache_init(
    handle: *mut u8,
    handle_len: usize,
    spec: *const KvcSpec,
    arena: *mut u8,
    arena_len: usize,
    out: *mut *mut KvcCache,
) -> KvcStatus {
    if handle.is_null() || spec.is_null() || arena.is_null() || out.is_null() {
        return KvcStatus::NullPointer;
    }
    if handle_len < size_of::<KvcCache>()
        || !(handle as usize).is_multiple_of(align_of::<KvcCache>())
    {
        return KvcStatus::ArenaTooSmall;
    }
    // The cache will own the arena, the handle and `*out` are written: no two may overlap.
    let (handle_span, arena_span) = (
        Span::of(handle, size_of::<KvcCache>()),
        Span::of(arena, arena_len),
    );
    let out_span = Span::of(out, 1);
    if !(arena_span.valid && out_span.valid && Span::of(spec, 1).valid) {
        return KvcStatus::BadShape;
    }
    if handle_span.overlaps(arena_span)
        || out_span.overlaps(arena_span)
        || out_span.overlaps(handle_span)
    {
        return KvcStatus::BadShape;
    }
    // SAFETY: checked non-NULL above; the caller passes a valid spec.
    let spec = match spec_from(unsafe { &*spec }) {
        Ok(s) => s,
        Err(e) => return e,
    };
    // SAFETY: the caller gives `arena_len` writable bytes that outlive the handle and that
    // nothing else uses meanwhile (the header's ownership rule); they are initialized memory
    // as far as C is concerned, and every byte pattern is a valid u8.
    let arena: &'static mut [u8] = unsafe { core::slice::from_raw_parts_mut(arena, arena_len) };
    match KvCache::new(spec, arena) {
        Ok(cache) => {
            let slot = handle.cast::<KvcCache>();
            // SAFETY: `handle` is non-NULL, aligned and large enough (checked above), and is
            // caller memory reserved for this handle; writing does not drop old contents.
            unsafe { slot.write(cache) };
            // SAFETY: `out` is non-NULL (checked above).
            unsafe { *out = slot };
            KvcStatus::Ok
        }
        Err(e) => e.into(),
    }
}

/// Runs `f` on the cache behind `cache`, or returns `KVC_NULL_POINTER`.
unsafe fn with_cache(
    cache: *mut KvcCache,
    f: impl FnOnce(&mut KvcCache) -> KvcStatus,
) -> KvcStatus {
    // SAFETY: NULL is checked; a non-NULL handle comes from `kvc_cache_init` and is used by one
    // thread at a time (the header's rule).
    match unsafe { cache.as_mut() } {
        Some(cache) => f(cache),
        None => KvcStatus::NullPointer,
    }
}

/// Adds an empty sequence; `*out_seq` receives its id.
#[no_mangle]
pub unsafe extern "C" fn kvc_add_sequence(cache: *mut KvcCache, out_seq: *mut u64) -> KvcStatus {
    if cache.is_null() || out_seq.is_null() {
        return KvcStatus::NullPointer;
    }
    // SAFETY: `cache` is a non-NULL handle (the header's contract).
    if let Err(e) = unsafe { check_disjoint(cache, &[], &[Span::of(out_seq, 1)]) } {
        return e;
    }
    // SAFETY: NULL checked; the caller passes a valid pointer otherwise.
    let Some(out) = (unsafe { out_seq.as_mut() }) else {
        return KvcStatus::NullPointer;
    };
    // SAFETY: see `with_cache`.
    unsafe {
        with_cache(cache, |c| match c.add_sequence() {
            Ok(id) => {
                *out = id.to_raw();
                KvcStatus::Ok
            }
            Err(e) => e.into(),
        })
    }
}

/// Reserves `n` token slots at the end of `seq`; `*out_first` (may be NULL) receives the
/// first new position.
#[no_mangle]
pub unsafe extern "C" fn kvc_reserve(
    cache: *mut KvcCache,
    seq: u64,
    n: u32,
    out_first: *mut u32,
) -> KvcStatus {
    if cache.is_null() {
        return KvcStatus::NullPointer;
    }
    let out_span = Span::of(out_first, usize::from(!out_first.is_null()));
    // SAFETY: `cache` is a non-NULL handle (the header's contract).
    if let Err(e) = unsafe { check_disjoint(cache, &[], &[out_span]) } {
        return e;
    }
    // SAFETY: see `with_cache`; `out_first` is checked for NULL before use.
    unsafe {
        with_cache(cache, |c| {
            match c.reserve(SeqId::from_raw(seq), n as usize) {
                Ok(range) => {
                    if let Some(out) = out_first.as_mut() {
                        *out = range.start as u32;
                    }
                    KvcStatus::Ok
                }
                Err(e) => e.into(),
            }
        })
    }
}

/// Writes keys and values for `tokens` consecutive positions from `first` of one layer;
/// `k` and `v` hold `len` floats each (`tokens × kv_heads × head_dim`).
#[no_mangle]
pub unsafe extern "C" fn kvc_write(
    cache: *mut KvcCache,
    seq: u64,
    layer: u32,
    first: u32,
    k: *const f32,
    v: *const f32,
    len: usize,
) -> KvcStatus {
    if cache.is_null() || k.is_null() || v.is_null() {
        return KvcStatus::NullPointer;
    }
    // SAFETY: `cache` is a non-NULL handle (the header's contract).
    if let Err(e) = unsafe { check_disjoint(cache, &[Span::of(k, len), Span::of(v, len)], &[]) } {
        return e;
    }
    // SAFETY: non-NULL checked; the caller gives `len` readable floats behind each, outside
    // the handle and the arena (checked).
    let (k, v) = unsafe {
        (
            core::slice::from_raw_parts(k, len),
            core::slice::from_raw_parts(v, len),
        )
    };
    // SAFETY: see `with_cache`.
    unsafe {
        with_cache(cache, |c| {
            status(c.write_run(SeqId::from_raw(seq), layer as usize, first as usize, k, v))
        })
    }
}

/// Reads one token's keys and values of one layer into `k_out`/`v_out` (`len` floats each,
/// `kv_heads × head_dim`).
#[no_mangle]
pub unsafe extern "C" fn kvc_read(
    cache: *mut KvcCache,
    seq: u64,
    layer: u32,
    position: u32,
    k_out: *mut f32,
    v_out: *mut f32,
    len: usize,
) -> KvcStatus {
    if cache.is_null() || k_out.is_null() || v_out.is_null() {
        return KvcStatus::NullPointer;
    }
    let writes = [Span::of(k_out, len), Span::of(v_out, len)];
    // SAFETY: `cache` is a non-NULL handle (the header's contract).
    if let Err(e) = unsafe { check_disjoint(cache, &[], &writes) } {
        return e;
    }
    // SAFETY: non-NULL checked; the caller gives `len` writable floats behind each, which
    // overlap neither each other nor the handle or the arena (checked).
    let (k, v) = unsafe {
        (
            core::slice::from_raw_parts_mut(k_out, len),
            core::slice::from_raw_parts_mut(v_out, len),
        )
    };
    // SAFETY: see `with_cache`.
    unsafe {
        with_cache(cache, |c| {
            status(c.read(
                SeqId::from_raw(seq),
                layer as usize,
                position as usize,
                k,
                v,
            ))
        })
    }
}

/// Forks `seq`; `*out_seq` receives the child's id.
#[no_mangle]
pub unsafe extern "C" fn kvc_fork(cache: *mut KvcCache, seq: u64, out_seq: *mut u64) -> KvcStatus {
    if cache.is_null() || out_seq.is_null() {
        return KvcStatus::NullPointer;
    }
    // SAFETY: `cache` is a non-NULL handle (the header's contract).
    if let Err(e) = unsafe { check_disjoint(cache, &[], &[Span::of(out_seq, 1)]) } {
        return e;
    }
    // SAFETY: NULL checked; valid otherwise.
    let Some(out) = (unsafe { out_seq.as_mut() }) else {
        return KvcStatus::NullPointer;
    };
    // SAFETY: see `with_cache`.
    unsafe {
        with_cache(cache, |c| match c.fork(SeqId::from_raw(seq)) {
            Ok(id) => {
                *out = id.to_raw();
                KvcStatus::Ok
            }
            Err(e) => e.into(),
        })
    }
}

/// Shortens `seq` to `len` tokens.
#[no_mangle]
pub unsafe extern "C" fn kvc_truncate(cache: *mut KvcCache, seq: u64, len: u32) -> KvcStatus {
    // SAFETY: see `with_cache`.
    unsafe {
        with_cache(cache, |c| {
            status(c.truncate(SeqId::from_raw(seq), len as usize))
        })
    }
}

/// Removes `seq`.
#[no_mangle]
pub unsafe extern "C" fn kvc_remove(cache: *mut KvcCache, seq: u64) -> KvcStatus {
    // SAFETY: see `with_cache`.
    unsafe { with_cache(cache, |c| status(c.remove(SeqId::from_raw(seq)))) }
}

/// Writes the cache's accounting to `*out`.
#[no_mangle]
pub unsafe extern "C" fn kvc_stats_get(cache: *mut KvcCache, out: *mut KvcStats) -> KvcStatus {
    if cache.is_null() || out.is_null() {
        return KvcStatus::NullPointer;
    }
    // SAFETY: `cache` is a non-NULL handle (the header's contract).
    if let Err(e) = unsafe { check_disjoint(cache, &[], &[Span::of(out, 1)]) } {
        return e;
    }
    // SAFETY: NULL checked; valid otherwise.
    let Some(out) = (unsafe { out.as_mut() }) else {
        return KvcStatus::NullPointer;
    };
    // SAFETY: see `with_cache`.
    unsafe {
        with_cache(cache, |c| {
            let s = c.stats();
            *out = KvcStats {
                sequences: s.sequences as u64,
                blocks_total: s.blocks_total as u64,
                blocks_free: s.blocks_free as u64,
                bytes_used: s.bytes_used as u64,
                tokens: s.tokens as u64,
                waste_slots: s.waste_slots as u64,
            };
            KvcStatus::Ok
        })
    }
}

/// Runs `f` on the cache behind `cache` shared, or returns `KVC_NULL_POINTER`.
unsafe fn with_cache_ref(
    cache: *const KvcCache,
    f: impl FnOnce(&KvcCache) -> KvcStatus,
) -> KvcStatus {
    // SAFETY: NULL is checked; a non-NULL handle comes from `kvc_cache_init`, and no call
    // mutates it meanwhile (the header's rule).
    match unsafe { cache.as_ref() } {
        Some(cache) => f(cache),
        None => KvcStatus::NullPointer,
    }
}

/// Writes the block layout (sizes and strides of rows, segments and blocks) to `*out`.
#[no_mangle]
pub unsafe extern "C" fn kvc_layout_get(cache: *const KvcCache, out: *mut KvcLayout) -> KvcStatus {
    if cache.is_null() || out.is_null() {
        return KvcStatus::NullPointer;
    }
    // SAFETY: `cache` is a non-NULL handle (the header's contract).
    if let Err(e) = unsafe { check_disjoint(cache, &[], &[Span::of(out, 1)]) } {
        return e;
    }
    // SAFETY: see `with_cache_ref`; `out` is non-NULL, aligned and outside the handle and the
    // arena (checked).
    unsafe {
        with_cache_ref(cache, |c| {
            let layout = c.layout();
            out.write(KvcLayout {
                block_bytes: layout.block_bytes() as u64,
                layer_bytes: layout.layer_bytes() as u64,
                k_row_bytes: layout.row_bytes(Kind::K) as u64,
                v_row_bytes: layout.row_bytes(Kind::V) as u64,
                k_segment_bytes: layout.segment_bytes(Kind::K) as u64,
                v_segment_bytes: layout.segment_bytes(Kind::V) as u64,
                blocks: c.capacity_blocks() as u64,
            });
            KvcStatus::Ok
        })
    }
}

/// Writes to `*out_data` and `*out_len` the address and length of the block storage: `blocks ×
/// block_bytes` bytes inside the arena, block `b` at `b × block_bytes`, 64-byte aligned. The
/// caller may read them (to copy them to a GPU, say) while no call changes the cache.
#[no_mangle]
pub unsafe extern "C" fn kvc_block_storage(
    cache: *const KvcCache,
    out_data: *mut *const u8,
    out_len: *mut usize,
) -> KvcStatus {
    if cache.is_null() || out_data.is_null() || out_len.is_null() {
        return KvcStatus::NullPointer;
    }
    let writes = [Span::of(out_data, 1), Span::of(out_len, 1)];
    // SAFETY: `cache` is a non-NULL handle (the header's contract).
    if let Err(e) = unsafe { check_disjoint(cache, &[], &writes) } {
        return e;
    }
    // SAFETY: see `with_cache_ref`; both outputs are non-NULL, aligned, disjoint and outside
    // the handle and the arena (checked).
    unsafe {
        with_cache_ref(cache, |c| {
            let storage = c.block_storage();
            out_data.write(storage.as_ptr());
            out_len.write(storage.len());
            KvcStatus::Ok
        })
    }
}

/// Writes the length of `seq` in tokens to `*out_len`.
#[no_mangle]
pub unsafe extern "C" fn kvc_seq_len(
    cache: *const KvcCache,
    seq: u64,
    out_len: *mut u32,
) -> KvcStatus {
    if cache.is_null() || out_len.is_null() {
        return KvcStatus::NullPointer;
    }
    // SAFETY: `cache` is a non-NULL handle (the header's contract).
    if let Err(e) = unsafe { check_disjoint(cache, &[], &[Span::of(out_len, 1)]) } {
        return e;
    }
    // SAFETY: see `with_cache_ref`; `out_len` is non-NULL, aligned and outside the handle and
    // the arena (checked). Lengths fit in u32 (`max_seq_tokens` does).
    unsafe {
        with_cache_ref(cache, |c| match c.len(SeqId::from_raw(seq)) {
            Ok(len) => {
                out_len.write(len as u32);
                KvcStatus::Ok
            }
            Err(e) => e.into(),
        })
    }
}

/// The key tail of `seq`'s `layer` and `kv_head` (`KvCache::tail_rows`): `*out_ring` and
/// `*out_len` receive the ring's address and length in bytes (`key_tail_tokens` `f16` rows of
/// `head_dim`, the key at position `p` in row `p mod key_tail_tokens`, in the stored basis
/// minus the int4 key offsets; inside the arena, readable while no call changes the cache),
/// and `*out_first` and `*out_end` the positions it holds. Without a tail: NULL, 0 and an
/// empty range at the sequence's length.
#[no_mangle]
pub unsafe extern "C" fn kvc_key_tail(
    cache: *const KvcCache,
    seq: u64,
    layer: u32,
    kv_head: u32,
    out_ring: *mut *const u8,
    out_len: *mut usize,
    out_first: *mut u32,
    out_end: *mut u32,
) -> KvcStatus {
    if cache.is_null()
        || out_ring.is_null()
        || out_len.is_null()
        || out_first.is_null()
        || out_end.is_null()
    {
        return KvcStatus::NullPointer;
    }
    let writes = [
        Span::of(out_ring, 1),
        Span::of(out_len, 1),
        Span::of(out_first, 1),
        Span::of(out_end, 1),
    ];
    // SAFETY: `cache` is a non-NULL handle (the header's contract).
    if let Err(e) = unsafe { check_disjoint(cache, &[], &writes) } {
        return e;
    }
    // SAFETY: see `with_cache_ref`; the outputs are non-NULL, aligned, disjoint and outside the
    // handle and the arena (checked).
    unsafe {
        with_cache_ref(cache, |c| {
            let seq = SeqId::from_raw(seq);
            let len = match c.len(seq) {
                Ok(len) => len as u32,
                Err(e) => return e.into(),
            };
            let spec = c.spec();
            if layer as usize >= spec.layers {
                return Error::BadIndex("layer").into();
            }
            if kv_head as usize >= spec.kv_heads {
                return Error::BadIndex("kv_head").into();
            }
            let (ring, first, end) = match c.tail_rows(seq, layer as usize, kv_head as usize) {
                Some((ring, held)) => (ring.as_ptr(), held.start as u32, held.end as u32),
                None => (core::ptr::null(), len, len),
            };
            out_ring.write(ring);
            out_len.write(if ring.is_null() {
                0
            } else {
                c.layout().tail_ring_bytes()
            });
            out_first.write(first);
            out_end.write(end);
            KvcStatus::Ok
        })
    }
}

/// Copies the page table of `seq` into `out` (`cap` entries of room): entry `i` is the
/// physical block of positions `i·block_tokens ..`, `KVC_NO_BLOCK` where the window evicted
/// it; `*out_entries` receives the count, `ceil(len / block_tokens)`. With `out` NULL and
/// `cap` 0 only the count is written; too little room gives `KVC_BAD_SHAPE`.
#[no_mangle]
pub unsafe extern "C" fn kvc_page_table(
    cache: *const KvcCache,
    seq: u64,
    out: *mut u32,
    cap: usize,
    out_entries: *mut usize,
) -> KvcStatus {
    if cache.is_null() || out_entries.is_null() || (out.is_null() && cap != 0) {
        return KvcStatus::NullPointer;
    }
    let writes = [
        Span::of(out, if out.is_null() { 0 } else { cap }),
        Span::of(out_entries, 1),
    ];
    // SAFETY: `cache` is a non-NULL handle (the header's contract).
    if let Err(e) = unsafe { check_disjoint(cache, &[], &writes) } {
        return e;
    }
    // SAFETY: see `with_cache_ref`; `out` (when not NULL) has `cap` writable entries, and it
    // and `out_entries` are aligned, disjoint and outside the handle and the arena (checked).
    unsafe {
        with_cache_ref(cache, |c| {
            let table = match c.page_table(SeqId::from_raw(seq)) {
                Ok(table) => table,
                Err(e) => return e.into(),
            };
            if !out.is_null() {
                if table.len() > cap {
                    return KvcStatus::BadShape;
                }
                core::slice::from_raw_parts_mut(out, table.len()).copy_from_slice(table);
            }
            out_entries.write(table.len());
            KvcStatus::Ok
        })
    }
}

/// Saves sequence `seq` (its stored rows and int4 state) into `out` (`cap` bytes of room);
/// `*out_len` receives the byte count. With `out` NULL and `cap` 0 only the count is written;
/// too little room gives `KVC_BAD_SHAPE` and writes nothing. A sequence the window has thinned
/// gives `KVC_EVICTED`. Restore it with `kvc_seq_import`.
#[no_mangle]
pub unsafe extern "C" fn kvc_seq_export(
    cache: *const KvcCache,
    seq: u64,
    out: *mut u8,
    cap: usize,
    out_len: *mut usize,
) -> KvcStatus {
    if cache.is_null() || out_len.is_null() || (out.is_null() && cap != 0) {
        return KvcStatus::NullPointer;
    }
    let writes = [
        Span::of(out, if out.is_null() { 0 } else { cap }),
        Span::of(out_len, 1),
    ];
    // SAFETY: `cache` is a non-NULL handle (the header's contract).
    if let Err(e) = unsafe { check_disjoint(cache, &[], &writes) } {
        return e;
    }
    // SAFETY: see `with_cache_ref`; `out` (when not NULL) has `cap` writable bytes, and it and
    // `out_len` are disjoint and outside the handle and the arena (checked).
    unsafe {
        with_cache_ref(cache, |c| {
            let seq = SeqId::from_raw(seq);
            let needed = match c.exported_len(seq) {
                Ok(n) => n,
                Err(e) => return e.into(),
            };
            if !out.is_null() {
                if needed > cap {
                    return KvcStatus::BadShape;
                }
                let out = core::slice::from_raw_parts_mut(out, cap);
                if let Err(e) = c.export_sequence(seq, out) {
                    return e.into();
                }
            }
            out_len.write(needed);
            KvcStatus::Ok
        })
    }
}

/// Restores a sequence saved by `kvc_seq_export` (`len` bytes at `bytes`, from a cache of the
/// same geometry and formats) as a new sequence; `*out_seq` receives its id. Bytes that are
/// not such a snapshot (wrong magic, geometry or length, a checksum mismatch) give
/// `KVC_BAD_SNAPSHOT`; like every error, it changes nothing.
#[no_mangle]
pub unsafe extern "C" fn kvc_seq_import(
    cache: *mut KvcCache,
    bytes: *const u8,
    len: usize,
    out_seq: *mut u64,
) -> KvcStatus {
    if cache.is_null() || bytes.is_null() || out_seq.is_null() {
        return KvcStatus::NullPointer;
    }
    // SAFETY: `cache` is a non-NULL handle (the header's contract).
    if let Err(e) =
        unsafe { check_disjoint(cache, &[Span::of(bytes, len)], &[Span::of(out_seq, 1)]) }
    {
        return e;
    }
    // SAFETY: non-NULL checked; the caller gives `len` readable bytes, outside the handle and
    // the arena (checked).
    let bytes = unsafe { core::slice::from_raw_parts(bytes, len) };
    // SAFETY: see `with_cache`; `out_seq` is non-NULL, aligned and outside the handle and the
    // arena (checked).
    unsafe {
        with_cache(cache, |c| match c.import_sequence(bytes) {
            Ok(id) => {
                out_seq.write(id.to_raw());
                KvcStatus::Ok
            }
            Err(e) => e.into(),
        })
    }
}

/// `kvc_seq_export_to`'s writer: stores `len` bytes at `data` after the previous ones and
/// returns 0, or nonzero to stop. `data` points into the cache's blocks: read it, do not keep it.
pub type KvcWriteFn = unsafe extern "C" fn(user: *mut c_void, data: *const u8, len: usize) -> i32;
/// `kvc_seq_import_from`'s reader: fills `buf` (`len` bytes) with the snapshot's bytes from
/// `offset` and returns 0, or nonzero if it cannot.
pub type KvcReadFn =
    unsafe extern "C" fn(user: *mut c_void, offset: usize, buf: *mut u8, len: usize) -> i32;

/// Saves `seq` like `kvc_seq_export`, but through `write` in pieces (no buffer of the
/// snapshot's size); `*out_len` receives the byte count. A nonzero return from `write` stops
/// it with `KVC_INTERRUPTED`. `write` must not call into this cache.
#[no_mangle]
pub unsafe extern "C" fn kvc_seq_export_to(
    cache: *const KvcCache,
    seq: u64,
    write: Option<KvcWriteFn>,
    user: *mut c_void,
    out_len: *mut usize,
) -> KvcStatus {
    let Some(write) = write else {
        return KvcStatus::NullPointer;
    };
    if cache.is_null() || out_len.is_null() {
        return KvcStatus::NullPointer;
    }
    // SAFETY: `cache` is a non-NULL handle (the header's contract).
    if let Err(e) = unsafe { check_disjoint(cache, &[], &[Span::of(out_len, 1)]) } {
        return e;
    }
    // SAFETY: see `with_cache_ref`; `out_len` is non-NULL, aligned and outside the handle and
    // the arena (checked). `write` is the caller's function, given valid pieces, and by the
    // header's rule does not use the handle meanwhile.
    unsafe {
        with_cache_ref(cache, |c| {
            let sink = |piece: &[u8]| write(user, piece.as_ptr(), piece.len()) == 0;
            match c.export_sequence_to(SeqId::from_raw(seq), sink) {
                Ok(n) => {
                    out_len.write(n);
                    KvcStatus::Ok
                }
                Err(e) => e.into(),
            }
        })
    }
}

/// Restores a snapshot of `len` bytes like `kvc_seq_import`, reading it through `read` (twice:
/// once to check it, once into the new sequence's blocks) instead of from memory. A nonzero
/// return from `read` gives `KVC_INTERRUPTED`; bytes that differ the second time give
/// `KVC_BAD_SNAPSHOT`; either way the cache is as it was. `read` must not call into this cache.
#[no_mangle]
pub unsafe extern "C" fn kvc_seq_import_from(
    cache: *mut KvcCache,
    len: usize,
    read: Option<KvcReadFn>,
    user: *mut c_void,
    out_seq: *mut u64,
) -> KvcStatus {
    let Some(read) = read else {
        return KvcStatus::NullPointer;
    };
    if cache.is_null() || out_seq.is_null() {
        return KvcStatus::NullPointer;
    }
    // SAFETY: `cache` is a non-NULL handle (the header's contract).
    if let Err(e) = unsafe { check_disjoint(cache, &[], &[Span::of(out_seq, 1)]) } {
        return e;
    }
    // SAFETY: see `with_cache`; `out_seq` is non-NULL, aligned and outside the handle and the
    // arena (checked). `read` is the caller's function, given writable buffers of the length
    // passed, and by the header's rule does not use the handle meanwhile.
    unsafe {
        with_cache(cache, |c| {
            let source =
                |at: usize, buf: &mut [u8]| read(user, at, buf.as_mut_ptr(), buf.len()) == 0;
            match c.import_sequence_from(len, source) {
                Ok(id) => {
                    out_seq.write(id.to_raw());
                    KvcStatus::Ok
                }
                Err(e) => e.into(),
            }
        })
    }
}

/// Floats of scratch `kvc_attention` needs (independent of context length).
#[no_mangle]
pub unsafe extern "C" fn kvc_attention_scratch_len(
    cache: *mut KvcCache,
    out: *mut usize,
) -> KvcStatus {
    // SAFETY: the same contract, with no options.
    unsafe { kvc_attention_scratch_len_ex(cache, null(), out) }
}

/// Floats of scratch `kvc_attention_ex` needs with `options` (NULL: the defaults), independent
/// of context length.
#[no_mangle]
pub unsafe extern "C" fn kvc_attention_scratch_len_ex(
    cache: *mut KvcCache,
    options: *const KvcAttentionOptions,
    out: *mut usize,
) -> KvcStatus {
    if cache.is_null() || out.is_null() {
        return KvcStatus::NullPointer;
    }
    let reads = [Span::of(options, usize::from(!options.is_null()))];
    // SAFETY: `cache` is a non-NULL handle (the header's contract).
    if let Err(e) = unsafe { check_disjoint(cache, &reads, &[Span::of(out, 1)]) } {
        return e;
    }
    // SAFETY: NULL or a valid struct (the header's contract; alignment checked above).
    let options = match attention_options(unsafe { options.as_ref() }) {
        Ok(options) => options,
        Err(e) => return e,
    };
    // SAFETY: NULL checked; valid otherwise.
    let Some(out) = (unsafe { out.as_mut() }) else {
        return KvcStatus::NullPointer;
    };
    // SAFETY: see `with_cache`.
    unsafe {
        with_cache(cache, |c| {
            *out = attention_scratch_len(c, &options);
            KvcStatus::Ok
        })
    }
}

/// The Rust options of C options (`None`: the defaults); unknown flag bits are refused.
fn attention_options(options: Option<&KvcAttentionOptions>) -> Result<AttentionOptions, KvcStatus> {
    match options {
        None => Ok(AttentionOptions::default()),
        Some(o) if o.flags & !KVC_ATTN_EXACT_VALUES != 0 => Err(KvcStatus::BadSpec),
        Some(o) => Ok(AttentionOptions {
            scale: (o.scale != 0.0).then_some(o.scale),
            splits: o.splits as usize,
            query_tile: o.query_tile as usize,
            exact_values: o.flags & KVC_ATTN_EXACT_VALUES != 0,
        }),
    }
}

/// Attention of one layer for a ragged batch of `n_entries` entries. `queries` and `out` hold
/// `len` floats (all entries' `[tokens][q_heads][head_dim]` concatenated); `scratch` holds
/// `scratch_len` floats (see `kvc_attention_scratch_len`).
#[no_mangle]
pub unsafe extern "C" fn kvc_attention(
    cache: *mut KvcCache,
    layer: u32,
    entries: *const KvcBatchEntry,
    n_entries: usize,
    queries: *const f32,
    out: *mut f32,
    len: usize,
    scratch: *mut f32,
    scratch_len: usize,
) -> KvcStatus {
    // SAFETY: the same contract, with no options.
    unsafe {
        kvc_attention_ex(
            cache,
            layer,
            entries,
            n_entries,
            null(),
            queries,
            out,
            len,
            scratch,
            scratch_len,
        )
    }
}

/// [`kvc_attention`] with `options` (NULL: the defaults; see `kvc_attention_opts`), for a
/// custom score scale, exact int4 value sums or other query tiles and splits in one call.
/// `scratch` holds `scratch_len` floats (see `kvc_attention_scratch_len_ex` with the same
/// options).
#[no_mangle]
pub unsafe extern "C" fn kvc_attention_ex(
    cache: *mut KvcCache,
    layer: u32,
    entries: *const KvcBatchEntry,
    n_entries: usize,
    options: *const KvcAttentionOptions,
    queries: *const f32,
    out: *mut f32,
    len: usize,
    scratch: *mut f32,
    scratch_len: usize,
) -> KvcStatus {
    if cache.is_null()
        || entries.is_null()
        || queries.is_null()
        || out.is_null()
        || scratch.is_null()
    {
        return KvcStatus::NullPointer;
    }
    let reads = [
        Span::of(queries, len),
        Span::of(entries, n_entries),
        Span::of(options, usize::from(!options.is_null())),
    ];
    let writes = [Span::of(out, len), Span::of(scratch, scratch_len)];
    // SAFETY: `cache` is a non-NULL handle (the header's contract).
    if let Err(e) = unsafe { check_disjoint(cache, &reads, &writes) } {
        return e;
    }
    // SAFETY: NULL or a valid struct (the header's contract; alignment and overlap checked
    // above), copied before any buffer is written.
    let options = match attention_options(unsafe { options.as_ref() }) {
        Ok(options) => options,
        Err(e) => return e,
    };
    // SAFETY: non-NULL checked; the caller gives an array of `n_entries` entries.
    let batch = match unsafe { batch_from(entries, n_entries) } {
        Ok(batch) => batch,
        Err(e) => return e,
    };
    let batch = &batch[..n_entries];
    // SAFETY: non-NULL checked; the caller gives arrays of the stated lengths, `out` and
    // `scratch` writable; no two overlap, nor the handle or the arena (checked).
    let (queries, out, scratch) = unsafe {
        (
            core::slice::from_raw_parts(queries, len),
            core::slice::from_raw_parts_mut(out, len),
            core::slice::from_raw_parts_mut(scratch, scratch_len),
        )
    };
    // SAFETY: see `with_cache`.
    unsafe {
        with_cache(cache, |c| {
            status(attention(
                c,
                layer as usize,
                batch,
                queries,
                out,
                scratch,
                &options,
            ))
        })
    }
}

/// Entries per attention call through the C ABI (the batch is copied to the stack).
const MAX_ENTRIES: usize = 64;

/// Copies `n_entries` C entries into a stack array.
///
/// # Safety
///
/// `entries` is non-NULL and points at `n_entries` readable entries.
unsafe fn batch_from(
    entries: *const KvcBatchEntry,
    n_entries: usize,
) -> Result<[BatchEntry; MAX_ENTRIES], KvcStatus> {
    if n_entries > MAX_ENTRIES {
        return Err(KvcStatus::BadShape);
    }
    // SAFETY: the function's contract.
    let entries = unsafe { core::slice::from_raw_parts(entries, n_entries) };
    let mut batch = [BatchEntry {
        seq: SeqId::from_raw(0),
        first_position: 0,
        tokens: 0,
    }; MAX_ENTRIES];
    for (slot, entry) in batch.iter_mut().zip(entries) {
        *slot = BatchEntry {
            seq: SeqId::from_raw(entry.seq),
            first_position: entry.first_position as usize,
            tokens: entry.tokens as usize,
        };
    }
    Ok(batch)
}

/// Builds the attention plan of a call and runs `f` on it; every work-item call goes through
/// here, so each one validates the whole batch again (O(entries), independent of context).
/// The entries and options are copied before `f` runs, so `f` may make slices of the call's
/// buffers (once [`check_disjoint`] has passed them, with `entries_and_options` among the
/// reads).
///
/// # Safety
///
/// `cache` is NULL or a handle from `kvc_cache_init` that no call is mutating meanwhile;
/// `entries` is NULL or points at `n_entries` entries; `options` is NULL or valid.
unsafe fn with_plan(
    cache: *const KvcCache,
    layer: u32,
    entries: *const KvcBatchEntry,
    n_entries: usize,
    options: *const KvcAttentionOptions,
    f: impl FnOnce(&AttentionPlan<'_, '_, '_>, [Span; 2]) -> KvcStatus,
) -> KvcStatus {
    if cache.is_null() || entries.is_null() {
        return KvcStatus::NullPointer;
    }
    let entries_and_options = [
        Span::of(entries, n_entries),
        Span::of(options, usize::from(!options.is_null())),
    ];
    // SAFETY: `cache` is a non-NULL handle (the header's contract).
    if let Err(e) = unsafe { check_disjoint(cache, &entries_and_options, &[]) } {
        return e;
    }
    // SAFETY: NULL checked; shared access only, which the header allows from several threads
    // while no mutating call runs.
    let Some(cache) = (unsafe { cache.as_ref() }) else {
        return KvcStatus::NullPointer;
    };
    // SAFETY: non-NULL checked; the caller gives `n_entries` entries.
    let batch = match unsafe { batch_from(entries, n_entries) } {
        Ok(batch) => batch,
        Err(e) => return e,
    };
    // SAFETY: NULL means defaults; otherwise the caller passes a valid struct (aligned:
    // checked).
    let options = match attention_options(unsafe { options.as_ref() }) {
        Ok(options) => options,
        Err(e) => return e,
    };
    match AttentionPlan::new(cache, layer as usize, &batch[..n_entries], &options) {
        Ok(plan) => f(&plan, entries_and_options),
        Err(e) => e.into(),
    }
}

/// Plans one layer's attention for a host thread pool: `*out_items` work items, each needing
/// `*out_partial_len` floats of partial state and `*out_scratch_len` floats of scratch per
/// thread. `options` may be NULL (defaults: 1 split, query tiles of 8, 1/sqrt(head_dim)).
#[no_mangle]
pub unsafe extern "C" fn kvc_attention_plan(
    cache: *const KvcCache,
    layer: u32,
    entries: *const KvcBatchEntry,
    n_entries: usize,
    options: *const KvcAttentionOptions,
    out_items: *mut usize,
    out_partial_len: *mut usize,
    out_scratch_len: *mut usize,
) -> KvcStatus {
    if out_items.is_null() || out_partial_len.is_null() || out_scratch_len.is_null() {
        return KvcStatus::NullPointer;
    }
    let writes = [
        Span::of(out_items, 1),
        Span::of(out_partial_len, 1),
        Span::of(out_scratch_len, 1),
    ];
    // SAFETY: see `with_plan`.
    unsafe {
        with_plan(cache, layer, entries, n_entries, options, |plan, reads| {
            // SAFETY: `plan` borrows the handle `cache` shared, as `check_disjoint` needs.
            if let Err(e) = check_disjoint(cache, &reads, &writes) {
                return e;
            }
            // SAFETY: non-NULL, aligned, disjoint from each other, the inputs, the handle and
            // the arena (checked).
            out_items.write(plan.work_items());
            out_partial_len.write(plan.partial_len());
            out_scratch_len.write(plan.scratch_len());
            KvcStatus::Ok
        })
    }
}

/// Runs work item `item` of the plan that the same arguments give: reads `queries` (`len`
/// floats, as for `kvc_attention`), writes its partial state to `partial` (`partial_len`
/// floats given, the plan's partial length used) with `scratch` (`scratch_len` floats given,
/// the plan's scratch length used). Threads may run different items at once on one handle
/// while no other call uses it; the floats each call uses must be its own.
#[no_mangle]
pub unsafe extern "C" fn kvc_attention_run_item(
    cache: *const KvcCache,
    layer: u32,
    entries: *const KvcBatchEntry,
    n_entries: usize,
    options: *const KvcAttentionOptions,
    item: usize,
    queries: *const f32,
    len: usize,
    partial: *mut f32,
    partial_len: usize,
    scratch: *mut f32,
    scratch_len: usize,
) -> KvcStatus {
    if queries.is_null() || partial.is_null() || scratch.is_null() {
        return KvcStatus::NullPointer;
    }
    // SAFETY: see `with_plan`.
    unsafe {
        with_plan(cache, layer, entries, n_entries, options, |plan, inputs| {
            // Only the plan's sizes are used (and viewed as slices), so calls on several
            // threads may pass the rest of one shared array as long as the used parts differ.
            let partial_len = partial_len.min(plan.partial_len());
            let scratch_len = scratch_len.min(plan.scratch_len());
            let reads = [Span::of(queries, len), inputs[0], inputs[1]];
            let writes = [
                Span::of(partial, partial_len),
                Span::of(scratch, scratch_len),
            ];
            // SAFETY: `plan` borrows the handle `cache` shared, as `check_disjoint` needs.
            if let Err(e) = check_disjoint(cache, &reads, &writes) {
                return e;
            }
            // SAFETY: non-NULL; the caller gives arrays of at least these lengths, `partial`
            // and `scratch` writable and private to this call; valid as slices and no two
            // overlap, nor the handle or the arena (checked).
            let (queries, partial, scratch) = (
                core::slice::from_raw_parts(queries, len),
                core::slice::from_raw_parts_mut(partial, partial_len),
                core::slice::from_raw_parts_mut(scratch, scratch_len),
            );
            status(plan.run_item(item, queries, partial, scratch))
        })
    }
}

/// Merges the partial states of every item (`partials`: item `i` at `i × partial_len`,
/// `partials_len` floats in all) into `out` (`len` floats, the queries' shape).
#[no_mangle]
pub unsafe extern "C" fn kvc_attention_merge(
    cache: *const KvcCache,
    layer: u32,
    entries: *const KvcBatchEntry,
    n_entries: usize,
    options: *const KvcAttentionOptions,
    partials: *const f32,
    partials_len: usize,
    out: *mut f32,
    len: usize,
) -> KvcStatus {
    if partials.is_null() || out.is_null() {
        return KvcStatus::NullPointer;
    }
    // SAFETY: see `with_plan`.
    unsafe {
        with_plan(cache, layer, entries, n_entries, options, |plan, inputs| {
            let used = partials_len.min(plan.work_items().saturating_mul(plan.partial_len()));
            let reads = [Span::of(partials, used), inputs[0], inputs[1]];
            // SAFETY: `plan` borrows the handle `cache` shared, as `check_disjoint` needs.
            if let Err(e) = check_disjoint(cache, &reads, &[Span::of(out, len)]) {
                return e;
            }
            // SAFETY: non-NULL; the caller gives arrays of at least these lengths, `out`
            // writable; valid as slices, not overlapping each other, the handle or the arena
            // (checked).
            let (partials, out) = (
                core::slice::from_raw_parts(partials, used),
                core::slice::from_raw_parts_mut(out, len),
            );
            status(plan.merge(partials, out))
        })
    }
}

/// Copies a NUL-terminated description of `status` into `buf` (`len` bytes, truncated to
/// fit); returns the description's length without the NUL. `buf` may be NULL to ask the
/// length.
#[no_mangle]
pub unsafe extern "C" fn kvc_status_message(status: u32, buf: *mut c_char, len: usize) -> usize {
    let text: &[u8] = match status {
        0 => b"ok",
        1 => b"a required pointer was NULL",
        2 => b"invalid spec",
        3 => b"arena or handle memory too small or misaligned",
        4 => b"unknown or removed sequence",
        5 => b"all sequence slots are in use",
        6 => b"sequence would exceed max_seq_tokens",
        7 => b"out of blocks",
        8 => b"position or length out of range",
        9 => b"position dropped by the sliding window",
        10 => b"index out of range",
        11 => b"buffer has the wrong length or overlaps another",
        12 => b"sequence appears twice in one batch",
        13 => b"scratch buffer too small",
        14 => b"NaN or infinite value",
        15 => b"not a valid sequence snapshot for this cache",
        16 => b"a snapshot read or write callback failed",
        _ => b"unknown status",
    };
    if !buf.is_null() && len > 0 {
        let n = text.len().min(len - 1);
        // SAFETY: `buf` is non-NULL with `len` writable bytes (caller's contract); we write
        // `n + 1 <= len` bytes from a source that does not overlap it.
        unsafe {
            core::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), n);
            *buf.add(n) = 0;
        }
    }
    text.len()
}
