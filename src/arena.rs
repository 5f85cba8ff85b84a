//! Carving the caller's memory into the cache's regions.
//!
//! The cache never allocates: it lives in one byte slice the caller hands over (a `static`
//! buffer, a stack array, memory-mapped SRAM, or under the `alloc` feature a [`HeapArena`]
//! obtained through the crate's own [`ArenaAllocator`] trait). The slice may have any
//! alignment; `carve` aligns the start to [`SEGMENT_ALIGN`] and splits the rest into the block
//! data region (the blocks, then the key tail rings if the spec has a key tail) and the `u32`
//! metadata words.
//!
//! ```text
//! [pad to 64][block 0][block 1]…[block N-1][key tail rings][metadata u32 words …][unused]
//! ```

use crate::error::Error;
use crate::spec::SEGMENT_ALIGN;

/// The two regions carved out of an arena.
pub(crate) struct Regions<'a> {
    /// The bytes asked for (the cache's `blocks × block_bytes` and its key tail rings),
    /// starting on a [`SEGMENT_ALIGN`] boundary.
    pub data: &'a mut [u8],
    /// Metadata words (reference counts, free stack, sequence table, page tables, int4 key
    /// offsets).
    pub words: &'a mut [u32],
}

/// Splits `arena` into `data_bytes` of block storage (aligned to [`SEGMENT_ALIGN`]) followed by
/// `words` metadata words. `data_bytes` must be a multiple of [`SEGMENT_ALIGN`] (so the words
/// that follow are 4-byte aligned).
pub(crate) fn carve(
    arena: &mut [u8],
    data_bytes: usize,
    words: usize,
) -> Result<Regions<'_>, Error> {
    let available = arena.len();
    let too_small = |needed: usize| Error::ArenaTooSmall { needed, available };
    let word_bytes = words.checked_mul(4).ok_or(Error::SizeOverflow)?;
    let worst_case = data_bytes
        .checked_add(word_bytes)
        .and_then(|b| b.checked_add(SEGMENT_ALIGN - 1))
        .ok_or(Error::SizeOverflow)?;
    let pad = arena.as_ptr().align_offset(SEGMENT_ALIGN);
    if pad > SEGMENT_ALIGN || pad + data_bytes + word_bytes > available {
        return Err(too_small(worst_case));
    }
    let (_, rest) = arena.split_at_mut(pad);
    let (data, rest) = rest.split_at_mut(data_bytes);
    let (word_region, _) = rest.split_at_mut(word_bytes);
    debug_assert_eq!(data_bytes % SEGMENT_ALIGN, 0);
    // SAFETY: every bit pattern is a valid `u32`, and `align_to_mut` only hands out the part of
    // the slice that is correctly aligned for `u32`; the prefix is empty because the region
    // starts `pad + data_bytes` bytes into an allocation aligned to 64 at `pad`, and
    // `data_bytes` is a multiple of 64 (checked again below, never assumed).
    let (prefix, words_slice, _) = unsafe { word_region.align_to_mut::<u32>() };
    if !prefix.is_empty() || words_slice.len() != words {
        return Err(too_small(worst_case));
    }
    Ok(Regions {
        data,
        words: words_slice,
    })
}

/// A source of raw memory for a [`HeapArena`], standing in for the unstable
/// `core::alloc::Allocator` trait.
///
/// # Safety
/// `allocate` must return either `None` or a pointer to `bytes` bytes aligned to `align` that
/// stay valid and unaliased until passed to `deallocate` with the same size and alignment.
#[cfg(feature = "alloc")]
pub unsafe trait ArenaAllocator {
    /// Allocates `bytes` bytes aligned to `align` (`bytes > 0`, `align` a power of two).
    fn allocate(&self, bytes: usize, align: usize) -> Option<core::ptr::NonNull<u8>>;
    /// Returns memory obtained from `allocate` with the same `bytes` and `align`.
    ///
    /// # Safety
    /// `ptr` must come from `self.allocate(bytes, align)` and not be used afterwards.
    unsafe fn deallocate(&self, ptr: core::ptr::NonNull<u8>, bytes: usize, align: usize);
}

/// The global allocator (`alloc::alloc`).
#[cfg(feature = "alloc")]
#[derive(Clone, Copy, Debug, Default)]
pub struct GlobalAllocator;

// SAFETY: forwards to the global allocator with a layout built from the same size and
// alignment in both calls.
#[cfg(feature = "alloc")]
unsafe impl ArenaAllocator for GlobalAllocator {
    fn allocate(&self, bytes: usize, align: usize) -> Option<core::ptr::NonNull<u8>> {
        let layout = core::alloc::Layout::from_size_align(bytes, align).ok()?;
        if layout.size() == 0 {
            return None;
        }
        // SAFETY: the layout has a non-zero size.
        core::ptr::NonNull::new(unsafe { alloc::alloc::alloc(layout) })
    }

    unsafe fn deallocate(&self, ptr: core::ptr::NonNull<u8>, bytes: usize, align: usize) {
        if let Ok(layout) = core::alloc::Layout::from_size_align(bytes, align) {
            // SAFETY: the caller passes a pointer from `allocate` with this same layout.
            unsafe { alloc::alloc::dealloc(ptr.as_ptr(), layout) }
        }
    }
}

/// An arena in memory obtained once from an [`ArenaAllocator`], zero-filled, freed on drop.
#[cfg(feature = "alloc")]
pub struct HeapArena<A: ArenaAllocator = GlobalAllocator> {
    ptr: core::ptr::NonNull<u8>,
    len: usize,
    /// Alignment the memory was allocated with (needed again to free it).
    align: usize,
    allocator: A,
}

#[cfg(feature = "alloc")]
impl<A: ArenaAllocator> HeapArena<A> {
    /// Allocates `bytes` bytes (aligned to 64) from `allocator`.
    pub fn new_in(bytes: usize, allocator: A) -> Result<Self, Error> {
        Self::allocate_zeroed(bytes, SEGMENT_ALIGN, false, allocator)
    }

    /// Allocates `bytes` bytes aligned to `align`; with `huge_pages`, advises the kernel to
    /// back them with huge pages before they are first touched (see [`HeapArena::new`]).
    fn allocate_zeroed(
        bytes: usize,
        align: usize,
        huge_pages: bool,
        allocator: A,
    ) -> Result<Self, Error> {
        if bytes == 0 {
            return Err(Error::ArenaTooSmall {
                needed: 1,
                available: 0,
            });
        }
        let ptr = allocator
            .allocate(bytes, align)
            .ok_or(Error::ArenaTooSmall {
                needed: bytes,
                available: 0,
            })?;
        if huge_pages {
            advise_huge_pages(ptr.as_ptr(), bytes);
        }
        // SAFETY: `ptr` points to `bytes` writable bytes (the allocator's contract); zeroing
        // makes every byte initialized before a slice is formed over them.
        unsafe { core::ptr::write_bytes(ptr.as_ptr(), 0, bytes) };
        Ok(HeapArena {
            ptr,
            len: bytes,
            align,
            allocator,
        })
    }

    /// The arena's bytes, to pass to [`crate::KvCache::new`].
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` owns `len` initialized bytes for as long as `self` lives, and the
        // `&mut self` borrow makes this the only live reference to them.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

#[cfg(feature = "alloc")]
impl HeapArena<GlobalAllocator> {
    /// Allocates `bytes` bytes from the global allocator.
    ///
    /// Under `std` on Linux, an arena of at least [`HUGE_PAGE_MIN_BYTES`] is aligned to 2 MiB
    /// and advised (`madvise(MADV_HUGEPAGE)`) to be backed by transparent huge pages before it
    /// is zeroed: decode attention visits every block of a sequence once per layer and head,
    /// a few KiB at a time spread over the whole arena, so with 4 KiB pages nearly every
    /// visit is a TLB miss. The advice changes no byte and may be ignored by the kernel.
    pub fn new(bytes: usize) -> Result<Self, Error> {
        let huge = cfg!(all(feature = "std", target_os = "linux")) && bytes >= HUGE_PAGE_MIN_BYTES;
        let align = if huge { HUGE_PAGE_BYTES } else { SEGMENT_ALIGN };
        HeapArena::allocate_zeroed(bytes, align, huge, GlobalAllocator)
    }
}

#[cfg(feature = "alloc")]
impl<A: ArenaAllocator> Drop for HeapArena<A> {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `allocate(len, align)` on this allocator and no
        // borrow of it outlives `self`.
        unsafe { self.allocator.deallocate(self.ptr, self.len, self.align) }
    }
}

// SAFETY: a HeapArena owns its memory exclusively, like a Box<[u8]>.
#[cfg(feature = "alloc")]
unsafe impl<A: ArenaAllocator + Send> Send for HeapArena<A> {}

/// Size of a transparent huge page on x86_64 and aarch64 Linux (2 MiB).
#[cfg(feature = "alloc")]
const HUGE_PAGE_BYTES: usize = 2 << 20;

/// Under `std` on Linux, arenas from [`HeapArena::new`] this large or larger are aligned to
/// 2 MiB and advised to use huge pages (smaller ones would waste most of a 2 MiB page).
#[cfg(feature = "alloc")]
pub const HUGE_PAGE_MIN_BYTES: usize = 8 << 20;

/// Advises Linux to back the whole 2 MiB pages inside `bytes` bytes at `ptr` (memory the
/// caller owns) with transparent huge pages. Advice only: failure (an old kernel, THP
/// disabled) changes nothing.
#[cfg(all(feature = "std", target_os = "linux"))]
pub(crate) fn advise_huge_pages(ptr: *mut u8, bytes: usize) {
    extern "C" {
        fn madvise(
            addr: *mut core::ffi::c_void,
            len: usize,
            advice: core::ffi::c_int,
        ) -> core::ffi::c_int;
    }
    const MADV_HUGEPAGE: core::ffi::c_int = 14;
    let start = ptr as usize;
    let first = start.next_multiple_of(HUGE_PAGE_BYTES);
    let end = (start + bytes) / HUGE_PAGE_BYTES * HUGE_PAGE_BYTES;
    if end > first {
        // SAFETY: `first..end` lies inside the allocation (rounded inwards to whole pages);
        // MADV_HUGEPAGE only changes how the kernel backs the pages, never their contents,
        // and the libc `madvise` symbol is linked by `std`.
        unsafe { madvise(first as *mut core::ffi::c_void, end - first, MADV_HUGEPAGE) };
    }
}

#[cfg(all(feature = "alloc", not(all(feature = "std", target_os = "linux"))))]
pub(crate) fn advise_huge_pages(_ptr: *mut u8, _bytes: usize) {}
