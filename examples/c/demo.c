/* Builds a cache in a static arena from C, runs a sequence through it, and checks errors.
 * Build: cargo rustc --release --lib --crate-type staticlib
 *        gcc -O2 -Iinclude examples/c/demo.c target/release/libkvcache.a -lpthread -ldl -lm */
#include <math.h>
#include <stdalign.h>
#include <stdio.h>
#include <string.h>

#include "kvcache.h"

static uint8_t arena[1 << 20];
static alignas(64) uint8_t handle_memory[512];

#define CHECK(call)                                                          \
    do {                                                                     \
        kvc_status s_ = (call);                                              \
        if (s_ != KVC_OK) {                                                  \
            char m_[64];                                                     \
            kvc_status_message(s_, m_, sizeof m_);                           \
            fprintf(stderr, "%s failed: %s\n", #call, m_);                   \
            return 1;                                                        \
        }                                                                    \
    } while (0)

/* IEEE binary16 bits to float (normal, subnormal, zero; the demo stores no inf or NaN). */
static float f16_to_f32(uint16_t h) {
    float magnitude = (h >> 10 & 0x1f) == 0 ? ldexpf((float)(h & 0x3ff), -24)
                                            : ldexpf((float)((h & 0x3ff) | 0x400), (h >> 10 & 0x1f) - 25);
    return h & 0x8000 ? -magnitude : magnitude;
}

/* Streaming save and restore through callbacks: here a byte array stands in for flash that
 * is written and read page by page. */
typedef struct { uint8_t *bytes; size_t len, cap; } flash;
static int flash_write(void *user, const uint8_t *data, size_t len) {
    flash *f = user;
    if (len > f->cap - f->len) return 1;
    memcpy(f->bytes + f->len, data, len);
    f->len += len;
    return 0;
}
static int flash_read(void *user, size_t offset, uint8_t *buf, size_t len) {
    const flash *f = user;
    if (offset > f->len || len > f->len - offset) return 1;
    memcpy(buf, f->bytes + offset, len);
    return 0;
}

int main(void) {
    kvc_spec spec = {2, 4, 2, 8, 16, KVC_F16, KVC_F16, 4, 256, 0, 0, 0};
    kvc_cache *cache = NULL;
    if (kvc_cache_size() > sizeof handle_memory) return 1;
    CHECK(kvc_cache_init(handle_memory, sizeof handle_memory, &spec, arena, sizeof arena, &cache));
    uint64_t seq;
    uint32_t first;
    CHECK(kvc_add_sequence(cache, &seq));
    CHECK(kvc_reserve(cache, seq, 5, &first));
    float k[5 * 2 * 8], v[5 * 2 * 8];
    for (int i = 0; i < 5 * 2 * 8; i++) { k[i] = 0.25f * (i % 7); v[i] = 1.0f; }
    for (uint32_t layer = 0; layer < 2; layer++) CHECK(kvc_write(cache, seq, layer, first, k, v, 80));
    size_t scratch_len;
    CHECK(kvc_attention_scratch_len(cache, &scratch_len));
    float scratch[4096], q[4 * 8], out[4 * 8];
    if (scratch_len > 4096) return 1;
    for (int i = 0; i < 32; i++) q[i] = 0.1f * i;
    kvc_batch_entry entry = {seq, 4, 1};
    CHECK(kvc_attention(cache, 0, &entry, 1, q, out, 32, scratch, scratch_len));
    for (int i = 0; i < 32; i++)
        if (fabsf(out[i] - 1.0f) > 1e-3f) { fprintf(stderr, "attention out[%d] = %f\n", i, out[i]); return 1; }
    /* The same call cut into work items, as a host thread pool would run them (here one
     * after another, last item first): the merged result is the same attention. */
    kvc_attention_opts opts = {2, 1, 0.0f};
    size_t items, partial_len, item_scratch_len;
    CHECK(kvc_attention_plan(cache, 0, &entry, 1, &opts, &items, &partial_len, &item_scratch_len));
    float partials[4096], merged[4 * 8];
    if (items * partial_len > 4096 || item_scratch_len > 4096) return 1;
    for (size_t i = items; i-- > 0;)
        CHECK(kvc_attention_run_item(cache, 0, &entry, 1, &opts, i, q, 32, partials + i * partial_len,
                                     partial_len, scratch, item_scratch_len));
    CHECK(kvc_attention_merge(cache, 0, &entry, 1, &opts, partials, items * partial_len, merged, 32));
    for (int i = 0; i < 32; i++)
        if (fabsf(merged[i] - out[i]) > 1e-5f) { fprintf(stderr, "work items out[%d] = %f\n", i, merged[i]); return 1; }
    if (kvc_attention_run_item(cache, 0, &entry, 1, &opts, items, q, 32, partials, partial_len, scratch,
                               item_scratch_len) != KVC_BAD_INDEX) return 1;
    /* One call with the same options gives the merged work items bit for bit. */
    size_t ex_scratch_len;
    CHECK(kvc_attention_scratch_len_ex(cache, &opts, &ex_scratch_len));
    if (ex_scratch_len > 4096) return 1;
    float one_call[4 * 8];
    CHECK(kvc_attention_ex(cache, 0, &entry, 1, &opts, q, one_call, 32, scratch, ex_scratch_len));
    if (memcmp(one_call, merged, sizeof merged) != 0) { fprintf(stderr, "kvc_attention_ex differs\n"); return 1; }
    /* Reading the cache in place, as a GPU kernel over a copy of the blocks would: the
     * layout, the block bytes and the page table locate every key row; an f16 element is
     * decoded by hand here and must equal what kvc_read gives. */
    kvc_layout layout;
    const uint8_t *blocks;
    size_t blocks_len, entries;
    uint32_t table[4], len;
    CHECK(kvc_layout_get(cache, &layout));
    CHECK(kvc_block_storage(cache, &blocks, &blocks_len));
    CHECK(kvc_seq_len(cache, seq, &len));
    CHECK(kvc_page_table(cache, seq, table, 4, &entries));
    if (len != 5 || entries != 1 || blocks_len != layout.blocks * layout.block_bytes) return 1;
    float k_row[16], v_row[16];
    for (uint32_t pos = 0; pos < len; pos++) {
        CHECK(kvc_read(cache, seq, 1, pos, k_row, v_row, 16));
        for (uint32_t head = 0; head < 2; head++) {
            const uint8_t *row = blocks + table[pos / 16] * layout.block_bytes + layout.layer_bytes
                                 + head * layout.k_segment_bytes + (pos % 16) * layout.k_row_bytes;
            for (int d = 0; d < 8; d++) {
                if (f16_to_f32((uint16_t)(row[2 * d] | row[2 * d + 1] << 8)) != k_row[head * 8 + d]) {
                    fprintf(stderr, "block bytes disagree with kvc_read at %u/%u/%d\n", pos, head, d);
                    return 1;
                }
            }
        }
    }
    /* Saving the sequence (a prompt's cache, say, to keep in flash) and restoring it as a new
     * sequence: attention over the restored copy gives the same output, bit for bit; damaged
     * bytes are refused. */
    static uint8_t saved[8192];
    size_t saved_len;
    uint64_t restored;
    CHECK(kvc_seq_export(cache, seq, NULL, 0, &saved_len));
    if (saved_len > sizeof saved) return 1;
    CHECK(kvc_seq_export(cache, seq, saved, sizeof saved, &saved_len));
    CHECK(kvc_seq_import(cache, saved, saved_len, &restored));
    kvc_batch_entry again = {restored, 4, 1};
    float out_restored[4 * 8];
    CHECK(kvc_attention(cache, 0, &again, 1, q, out_restored, 32, scratch, scratch_len));
    if (memcmp(out_restored, out, sizeof out) != 0) { fprintf(stderr, "restored attention differs\n"); return 1; }
    CHECK(kvc_remove(cache, restored));
    static uint8_t pages[8192];
    flash f = {pages, 0, sizeof pages};
    size_t streamed_len;
    CHECK(kvc_seq_export_to(cache, seq, flash_write, &f, &streamed_len));
    if (streamed_len != saved_len || memcmp(pages, saved, saved_len) != 0) return 1;
    CHECK(kvc_seq_import_from(cache, f.len, flash_read, &f, &restored));
    again.seq = restored;
    CHECK(kvc_attention(cache, 0, &again, 1, q, out_restored, 32, scratch, scratch_len));
    if (memcmp(out_restored, out, sizeof out) != 0) { fprintf(stderr, "streamed restore differs\n"); return 1; }
    CHECK(kvc_remove(cache, restored));
    saved[saved_len / 2] ^= 1;
    if (kvc_seq_import(cache, saved, saved_len, &restored) != KVC_BAD_SNAPSHOT) return 1;
    /* int8 keys with a key tail of 4 tokens: each sequence keeps its last 4 keys in f16 too,
     * and attention and kvc_read use those copies (the values here are exact in f16). */
    static uint8_t tail_arena[1 << 18];
    static alignas(64) uint8_t tail_handle[512];
    kvc_spec tail_spec = {2, 4, 2, 8, 16, KVC_INT8, KVC_F16, 2, 64, 0, 0, 4};
    kvc_cache *tailed = NULL;
    CHECK(kvc_cache_init(tail_handle, sizeof tail_handle, &tail_spec, tail_arena, sizeof tail_arena, &tailed));
    uint64_t tseq;
    CHECK(kvc_add_sequence(tailed, &tseq));
    CHECK(kvc_reserve(tailed, tseq, 5, &first));
    for (uint32_t layer = 0; layer < 2; layer++) CHECK(kvc_write(tailed, tseq, layer, first, k, v, 80));
    const uint8_t *ring;
    size_t ring_len;
    uint32_t held_first, held_end;
    CHECK(kvc_key_tail(tailed, tseq, 1, 0, &ring, &ring_len, &held_first, &held_end));
    if (held_first != 1 || held_end != 5 || ring_len != 4 * 8 * 2) return 1;
    CHECK(kvc_read(tailed, tseq, 1, 4, k_row, v_row, 16));
    if (memcmp(k_row, k + 4 * 16, sizeof k_row) != 0) { fprintf(stderr, "a held key is not exact\n"); return 1; }
    CHECK(kvc_attention_scratch_len(tailed, &scratch_len));
    if (scratch_len > 4096) return 1;
    entry.seq = tseq;
    CHECK(kvc_attention(tailed, 0, &entry, 1, q, out, 32, scratch, scratch_len));
    for (int i = 0; i < 32; i++)
        if (fabsf(out[i] - 1.0f) > 1e-3f) { fprintf(stderr, "tail attention out[%d] = %f\n", i, out[i]); return 1; }
    /* Bad input: errors, not crashes. */
    if (kvc_reserve(cache, seq + 99, 1, NULL) != KVC_UNKNOWN_SEQUENCE) return 1;
    if (kvc_truncate(cache, seq, 6) != KVC_BAD_POSITION) return 1;
    if (kvc_add_sequence(NULL, &seq) != KVC_NULL_POINTER) return 1;
    if (kvc_write(cache, seq, 0, 0, NULL, v, 80) != KVC_NULL_POINTER) return 1;
    if (kvc_write(cache, seq, 0, 0, k, v, 79) != KVC_BAD_SHAPE) return 1;
    kvc_stats stats;
    CHECK(kvc_stats_get(cache, &stats));
    printf("C demo: %llu sequence, %llu tokens, %llu of %llu blocks free, attention ok (%zu work items)\n",
           (unsigned long long)stats.sequences, (unsigned long long)stats.tokens,
           (unsigned long long)stats.blocks_free, (unsigned long long)stats.blocks_total, items);
    return 0;
}
