//! The fixed pool of physical blocks: O(1) allocate and free, a reference count per block.
//!
//! A block is free exactly when its count is zero; the free blocks sit on a stack, so taking
//! and returning one is a single push or pop. Counts above one mean the block is shared by
//! several page-table entries (forked sequences) and must be copied before it is written.

/// Index of a physical block in the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockId(pub u32);

impl BlockId {
    /// The index as `usize`.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

/// Reference counts and the free stack, in words carved from the arena.
pub(crate) struct BlockPool<'a> {
    /// `refcounts[b]`: page-table entries pointing at block `b`.
    refcounts: &'a mut [u32],
    /// `free_stack[..free_count]`: the free blocks.
    free_stack: &'a mut [u32],
    free_count: usize,
}

impl<'a> BlockPool<'a> {
    /// A pool whose blocks are all free. Both slices have one word per block.
    pub fn new(refcounts: &'a mut [u32], free_stack: &'a mut [u32]) -> Self {
        debug_assert_eq!(refcounts.len(), free_stack.len());
        refcounts.fill(0);
        let blocks = free_stack.len();
        // Lowest ids on top so that a fresh pool hands out 0, 1, 2, …
        for (slot, id) in free_stack.iter_mut().zip((0..blocks as u32).rev()) {
            *slot = id;
        }
        BlockPool {
            refcounts,
            free_stack,
            free_count: blocks,
        }
    }

    /// Blocks in the pool.
    pub fn capacity(&self) -> usize {
        self.refcounts.len()
    }

    /// Free blocks.
    pub fn free_count(&self) -> usize {
        self.free_count
    }

    /// Takes a free block and gives it a count of one; `None` when the pool is empty.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let top = self.free_count.checked_sub(1)?;
        let id = *self.free_stack.get(top)?;
        let count = self.refcounts.get_mut(id as usize)?;
        *count = 1;
        self.free_count = top;
        Some(BlockId(id))
    }

    /// Adds a reference to a block in use.
    pub fn retain(&mut self, block: BlockId) {
        if let Some(count) = self.refcounts.get_mut(block.index()) {
            debug_assert!(*count > 0, "retain of a free block");
            *count += 1;
        }
    }

    /// Drops a reference; the block returns to the free stack when its count reaches zero.
    pub fn release(&mut self, block: BlockId) {
        let Some(count) = self.refcounts.get_mut(block.index()) else {
            return;
        };
        debug_assert!(*count > 0, "release of a free block");
        if *count == 0 {
            return;
        }
        *count -= 1;
        if *count == 0 {
            if let Some(slot) = self.free_stack.get_mut(self.free_count) {
                *slot = block.0;
                self.free_count += 1;
            }
        }
    }

    /// The block's reference count (0 = free).
    pub fn refcount(&self, block: BlockId) -> u32 {
        self.refcounts.get(block.index()).copied().unwrap_or(0)
    }

    /// The free stack (for invariant checks).
    pub fn free_blocks(&self) -> &[u32] {
        &self.free_stack[..self.free_count]
    }
}
