/* kvcache: a paged KV cache for transformer inference. C interface.
 *
 * Ownership: a kvc_cache lives in memory you provide (kvc_cache_size() bytes aligned to
 * kvc_cache_align()) and borrows the arena you provide; keep both alive and unmoved while you
 * use the handle, then free them yourself. Nothing here allocates (one exception: with the
 * testing switches KVCACHE_FORCE_SCALAR or KVCACHE_NO_VNNI set in the environment, the first
 * kvc_cache_init of a process copies their values while choosing the kernels). Sequence ids
 * are uint64_t.
 * Every function checks its pointers and lengths and returns a kvc_status; a call that fails
 * changes nothing. A handle is used by one thread at a time, except kvc_attention_run_item.
 * Buffers: what a call writes must not overlap anything else the call is given (inputs may
 * overlap inputs), no buffer may lie in the handle memory or the arena, and pointers must be
 * aligned for their type; such calls are refused with KVC_BAD_SHAPE (so attention is not done
 * in place: out != queries). The check sees only the handle it is given: buffers must not lie
 * in another live cache's handle or arena either, and buffers of calls running at the same
 * time (kvc_attention_run_item) must be disjoint.
 */
#ifndef KVCACHE_H
#define KVCACHE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum kvc_status {
    KVC_OK = 0,
    KVC_NULL_POINTER = 1,
    KVC_BAD_SPEC = 2,
    KVC_ARENA_TOO_SMALL = 3,
    KVC_UNKNOWN_SEQUENCE = 4,
    KVC_TOO_MANY_SEQUENCES = 5,
    KVC_TOO_LONG = 6,
    KVC_OUT_OF_BLOCKS = 7,
    KVC_BAD_POSITION = 8,
    KVC_EVICTED = 9,
    KVC_BAD_INDEX = 10,
    KVC_BAD_SHAPE = 11, /* wrong length, or a buffer overlapping one it must not */
    KVC_DUPLICATE_SEQUENCE = 12,
    KVC_SCRATCH_TOO_SMALL = 13,
    KVC_NON_FINITE = 14,
    KVC_BAD_SNAPSHOT = 15, /* kvc_seq_import: not a snapshot this cache can restore */
    KVC_INTERRUPTED = 16   /* a snapshot read or write callback returned nonzero */
} kvc_status;

/* Storage formats for kvc_spec.k_format / v_format. */
enum { KVC_F32 = 0, KVC_F16 = 1, KVC_BF16 = 2, KVC_INT8 = 3, KVC_INT4 = 4 };

typedef struct kvc_spec {
    uint32_t layers;         /* transformer layers */
    uint32_t q_heads;        /* query heads */
    uint32_t kv_heads;       /* key/value heads; divides q_heads (MHA, GQA, MQA) */
    uint32_t head_dim;       /* elements per head */
    uint32_t block_tokens;   /* token slots per block */
    uint32_t k_format;       /* KVC_F32, KVC_F16, KVC_BF16, KVC_INT8, KVC_INT4 */
    uint32_t v_format;
    uint32_t max_seqs;       /* live sequences at most */
    uint32_t max_seq_tokens; /* tokens per sequence at most */
    uint32_t window;         /* sliding window in tokens, 0 = none */
    uint32_t sink_tokens;    /* first tokens always visible with a window */
    uint32_t key_tail_tokens; /* int8/int4 keys: last keys kept in f16 per sequence, 0 = none */
} kvc_spec;

typedef struct kvc_batch_entry {
    uint64_t seq;            /* sequence id */
    uint32_t first_position; /* position of the first query token */
    uint32_t tokens;         /* query tokens (1 for decode) */
} kvc_batch_entry;

/* Options of kvc_attention_ex and of the work-item attention calls; pass NULL for the
 * defaults. A struct passed must set splits and query_tile (0 gives KVC_BAD_SPEC). */
typedef struct kvc_attention_opts {
    uint32_t splits;     /* key splits per (entry, query tile, KV head), >= 1 (default 1) */
    uint32_t query_tile; /* query tokens per item, >= 1 (default 8) */
    float scale;         /* score scale; 0 = 1/sqrt(head_dim) */
    uint32_t flags;      /* KVC_ATTN_* bits, 0 = defaults; unknown bits give KVC_BAD_SPEC */
} kvc_attention_opts;

/* kvc_attention_opts.flags: int4 values summed exactly in f32 rather than with the softmax
 * weights as 8-bit integers per 16-row run (slower; free of the weights' rounding). */
#define KVC_ATTN_EXACT_VALUES 1u

typedef struct kvc_stats {
    uint64_t sequences, blocks_total, blocks_free, bytes_used, tokens, waste_slots;
} kvc_stats;

/* Where rows live in the block storage (kvc_block_storage): inside a block, segment
 * (layer, K, head) starts at layer*layer_bytes + head*k_segment_bytes, segment (layer, V, head)
 * at layer*layer_bytes + kv_heads*k_segment_bytes + head*v_segment_bytes, and slot s of a
 * segment at s*row_bytes from its start. Row bytes are the formats' (README, "Memory format"). */
typedef struct kvc_layout {
    uint64_t block_bytes;     /* one physical block, every layer */
    uint64_t layer_bytes;     /* one layer's part of a block */
    uint64_t k_row_bytes;     /* one stored key row, scales included */
    uint64_t v_row_bytes;
    uint64_t k_segment_bytes; /* block_tokens key rows, padded to 64 */
    uint64_t v_segment_bytes;
    uint64_t blocks;          /* physical blocks in the pool */
} kvc_layout;

/* Page-table entry of a block the sliding window evicted. */
#define KVC_NO_BLOCK 0xFFFFFFFFu

typedef struct kvc_cache kvc_cache; /* opaque */

size_t kvc_cache_size(void);
size_t kvc_cache_align(void);
/* Arena bytes for `blocks` blocks (any alignment of the arena). */
kvc_status kvc_arena_bytes(const kvc_spec *spec, uint32_t blocks, size_t *out);
/* Builds a cache with as many blocks as fit in the arena; *out receives the handle. */
kvc_status kvc_cache_init(void *handle, size_t handle_len, const kvc_spec *spec, uint8_t *arena,
                          size_t arena_len, kvc_cache **out);
kvc_status kvc_add_sequence(kvc_cache *cache, uint64_t *out_seq);
/* Reserves n slots at the end of seq; *out_first (may be NULL) gets the first new position. */
kvc_status kvc_reserve(kvc_cache *cache, uint64_t seq, uint32_t n, uint32_t *out_first);
/* k, v: len floats = tokens * kv_heads * head_dim, for positions first.. of one layer. */
kvc_status kvc_write(kvc_cache *cache, uint64_t seq, uint32_t layer, uint32_t first,
                     const float *k, const float *v, size_t len);
/* k_out, v_out: len floats = kv_heads * head_dim, one token of one layer. */
kvc_status kvc_read(kvc_cache *cache, uint64_t seq, uint32_t layer, uint32_t position,
                    float *k_out, float *v_out, size_t len);
kvc_status kvc_fork(kvc_cache *cache, uint64_t seq, uint64_t *out_seq);
kvc_status kvc_truncate(kvc_cache *cache, uint64_t seq, uint32_t len);
kvc_status kvc_remove(kvc_cache *cache, uint64_t seq);
kvc_status kvc_stats_get(kvc_cache *cache, kvc_stats *out);
kvc_status kvc_attention_scratch_len(kvc_cache *cache, size_t *out);
/* queries, out: len floats, every entry's [tokens][q_heads][head_dim] in order; at most 64
 * entries. */
kvc_status kvc_attention(kvc_cache *cache, uint32_t layer, const kvc_batch_entry *entries,
                         size_t n_entries, const float *queries, float *out, size_t len,
                         float *scratch, size_t scratch_len);
/* kvc_attention with options (NULL: the defaults, the same as kvc_attention): a custom score
 * scale, KVC_ATTN_EXACT_VALUES, other query tiles and splits. Its scratch length depends on
 * the options: ask kvc_attention_scratch_len_ex with the same ones. */
kvc_status kvc_attention_scratch_len_ex(kvc_cache *cache, const kvc_attention_opts *opts,
                                        size_t *out);
kvc_status kvc_attention_ex(kvc_cache *cache, uint32_t layer, const kvc_batch_entry *entries,
                            size_t n_entries, const kvc_attention_opts *opts,
                            const float *queries, float *out, size_t len, float *scratch,
                            size_t scratch_len);
/* The same attention cut into work items, for your own threads:
 *   kvc_attention_plan     -> number of items, floats of partial state per item, floats of
 *                             scratch per thread;
 *   kvc_attention_run_item -> item i's partial state (threads may run different items at once
 *                             on one handle, as long as no other call runs meanwhile; each
 *                             call uses the plan's partial and scratch lengths of its buffers,
 *                             which must not overlap another running call's);
 *   kvc_attention_merge    -> all partial states (item i at i * partial_len) into out.
 * Every call takes the same layer, entries and options. The result does not depend on which
 * thread ran which item: merge combines them in a fixed order. */
kvc_status kvc_attention_plan(const kvc_cache *cache, uint32_t layer,
                              const kvc_batch_entry *entries, size_t n_entries,
                              const kvc_attention_opts *opts, size_t *out_items,
                              size_t *out_partial_len, size_t *out_scratch_len);
kvc_status kvc_attention_run_item(const kvc_cache *cache, uint32_t layer,
                                  const kvc_batch_entry *entries, size_t n_entries,
                                  const kvc_attention_opts *opts, size_t item,
                                  const float *queries, size_t len, float *partial,
                                  size_t partial_len, float *scratch, size_t scratch_len);
kvc_status kvc_attention_merge(const kvc_cache *cache, uint32_t layer,
                               const kvc_batch_entry *entries, size_t n_entries,
                               const kvc_attention_opts *opts, const float *partials,
                               size_t partials_len, float *out, size_t len);
/* Reading the cache from elsewhere (a GPU kernel over a device copy of the blocks, say):
 * the layout, the block storage (blocks * block_bytes bytes inside the arena, block b at
 * b * block_bytes, 64-byte aligned; readable while no call changes the cache) and a sequence's
 * page table (entry i = physical block of positions i*block_tokens.., KVC_NO_BLOCK if evicted;
 * ceil(len / block_tokens) entries, written to *out_entries; out NULL with cap 0 asks only for
 * the count; too small a cap gives KVC_BAD_SHAPE). Float and int8 rows are self-contained;
 * int4 rows also need state kept outside the blocks (see README). */
kvc_status kvc_layout_get(const kvc_cache *cache, kvc_layout *out);
kvc_status kvc_block_storage(const kvc_cache *cache, const uint8_t **out_data, size_t *out_len);
kvc_status kvc_seq_len(const kvc_cache *cache, uint64_t seq, uint32_t *out_len);
kvc_status kvc_page_table(const kvc_cache *cache, uint64_t seq, uint32_t *out, size_t cap,
                          size_t *out_entries);
/* The key tail of (seq, layer, kv_head) when the spec has one: the ring's address and bytes
 * (key_tail_tokens f16 rows of head_dim, position p in row p % key_tail_tokens, stored basis
 * minus the int4 key offsets) and the positions [first, end) it holds; attention scores those
 * from the ring. Without a tail: NULL, 0 and first == end == the sequence's length. */
kvc_status kvc_key_tail(const kvc_cache *cache, uint64_t seq, uint32_t layer, uint32_t kv_head,
                        const uint8_t **out_ring, size_t *out_len, uint32_t *out_first,
                        uint32_t *out_end);
/* Copies a NUL-terminated message into buf (len bytes); returns its full length. */
/* Saving and restoring one sequence (for example a system prompt kept in flash): the stored
 * rows, bit for bit, and the int4 state, with a checksum. kvc_seq_export with out NULL and
 * cap 0 gives the byte count; too small a cap gives KVC_BAD_SHAPE and writes nothing; a
 * sequence the window has thinned gives KVC_EVICTED. kvc_seq_import restores the bytes as a
 * new sequence into any cache of the same layers, KV heads, head dim and formats (block size,
 * pool and window may differ); bytes that are not such a snapshot give KVC_BAD_SNAPSHOT. */
kvc_status kvc_seq_export(const kvc_cache *cache, uint64_t seq, uint8_t *out, size_t cap,
                          size_t *out_len);
kvc_status kvc_seq_import(kvc_cache *cache, const uint8_t *bytes, size_t len, uint64_t *out_seq);
/* The same without a buffer of the snapshot's size (flash that is not memory-mapped, a file):
 * kvc_seq_export_to hands the bytes to `write` in order, in pieces (`data` may point into the
 * cache's blocks or key tail: copy it, do not keep it); kvc_seq_import_from reads the `len`
 * bytes through `read(user, offset, buf, len)` twice, once to check them all and once into
 * the new sequence's blocks and key tail, and undoes the sequence if a read fails (KVC_INTERRUPTED) or the bytes
 * changed between the two passes (KVC_BAD_SNAPSHOT). Callbacks return 0 for success, nonzero
 * to stop, and must not call into the cache. */
typedef int (*kvc_write_fn)(void *user, const uint8_t *data, size_t len);
typedef int (*kvc_read_fn)(void *user, size_t offset, uint8_t *buf, size_t len);
kvc_status kvc_seq_export_to(const kvc_cache *cache, uint64_t seq, kvc_write_fn write, void *user,
                             size_t *out_len);
kvc_status kvc_seq_import_from(kvc_cache *cache, size_t len, kvc_read_fn read, void *user,
                               uint64_t *out_seq);
size_t kvc_status_message(uint32_t status, char *buf, size_t len);

#ifdef __cplusplus
}
#endif

#endif /* KVCACHE_H */
