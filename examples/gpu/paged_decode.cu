/* Paged decode attention on a GPU, straight from kvcache's own block bytes.
 *
 * The cache is built and filled on the host through the C ABI (include/kvcache.h). Its block
 * storage is copied to the GPU as it is, byte for byte, with each sequence's page table
 * (kvc_block_storage, kvc_layout_get, kvc_page_table); two kernels then run FlashDecoding-style
 * split-K attention over those blocks, the same decomposition as the CPU's work items
 * (README, "Attention, and how it maps to a GPU"):
 *
 *   split_kernel  one thread block per (key split, KV head, sequence). Each of its 4 warps
 *                 takes one 16-token block at a time: it copies the block's key and value
 *                 segments (one layer, one KV head) to shared memory with coalesced loads, a
 *                 pair of lanes per token dots the key row (f16 or int8, dequantized in
 *                 registers) with the GQA group's queries, the warp folds the scores into a
 *                 running max / sum per query head (online softmax), and each lane accumulates
 *                 two dimensions of the weighted value rows. The warps' states merge through
 *                 shared memory into one partial state (m, l, acc) per query head and split.
 *   merge_kernel  one thread block per (sequence, query head): merges the splits' states.
 *
 * What it checks: against an f64 oracle on the values read back through kvc_read, and against
 * the CPU's kvc_attention, for f16 and int8 keys and values, GQA groups of 1 to 4, ragged
 * lengths, shared (forked) blocks and a sliding window with evicted blocks. What it measures:
 * the decode step over SmolLM2-135M's 30 layers at 8192 tokens of context per sequence, against
 * a plain read of the same bytes (the memory floor), and the host CPU's kvc_attention.
 *
 * Limits of this example: head_dim 64, block_tokens 16, f16 or int8 rows (int4 rows need the
 * state kept outside the blocks), one query token per sequence (decode).
 *
 * Build and run (on a machine with nvcc and a GPU; the static library built beforehand):
 *   cargo rustc --release --lib --crate-type staticlib
 *   nvcc -O3 -std=c++17 -arch=native -Iinclude examples/gpu/paged_decode.cu \
 *        target/release/libkvcache.a -lpthread -ldl -lm -o paged_decode && ./paged_decode
 * Arguments: [ctx (8192)] [batch (8)] ["time": skip the checks] ["f16" | "int8": time one].
 * It exits non-zero if any check fails. examples/gpu/h200.log is a run on an NVIDIA H200.
 */
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kvcache.h"

#define CUDA_CHECK(call)                                                                  \
    do {                                                                                  \
        cudaError_t e_ = (call);                                                          \
        if (e_ != cudaSuccess) {                                                          \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call,                 \
                    cudaGetErrorString(e_));                                              \
            exit(1);                                                                      \
        }                                                                                 \
    } while (0)

#define KVC_CHECK(call)                                                                   \
    do {                                                                                  \
        kvc_status s_ = (call);                                                           \
        if (s_ != KVC_OK) {                                                               \
            char m_[128];                                                                 \
            kvc_status_message(s_, m_, sizeof m_);                                        \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, m_);            \
            exit(1);                                                                      \
        }                                                                                 \
    } while (0)

constexpr int HEAD_DIM = 64;
constexpr int BLOCK_TOKENS = 16;
#ifndef KVC_GPU_WARPS
#define KVC_GPU_WARPS 4
#endif
constexpr int WARPS = KVC_GPU_WARPS; /* warps per thread block */
constexpr unsigned FULL = 0xffffffffu;

/* Byte strides of the block format, from kvc_layout_get. */
struct DeviceLayout {
    uint64_t block_bytes, layer_bytes, k_row, v_row, k_seg, v_seg;
    int kv_heads;
};

/* One decode batch on the device: per sequence its page table (table_stride entries), its
 * length (the query is at position len - 1) and its queries [q_heads][HEAD_DIM]. */
struct DeviceBatch {
    const uint32_t *tables;
    int table_stride;
    const uint32_t *lens;
    const float *queries;
    int q_heads;
    uint32_t window, sink;
    float scale;
};

__device__ inline float bf16_at(const uint8_t *p) {
    uint32_t bits = (uint32_t)p[0] | ((uint32_t)p[1] << 8);
    return __uint_as_float(bits << 16);
}

/* Elements [32*half, 32*half + 32) of a key row into k[32]. */
template <int F>
__device__ inline void key_half(const uint8_t *row, int half, float *k) {
    if (F == KVC_F16) {
        const uint4 *p = reinterpret_cast<const uint4 *>(row + half * 64);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            uint4 u = p[i];
            const __half2 *h = reinterpret_cast<const __half2 *>(&u);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                float2 f = __half22float2(h[j]);
                k[8 * i + 2 * j] = f.x;
                k[8 * i + 2 * j + 1] = f.y;
            }
        }
    } else { /* int8: 64 bytes, then one bf16 scale per 32 elements; rows are 4-byte aligned */
        const uint32_t *p = reinterpret_cast<const uint32_t *>(row + half * 32);
        float s = bf16_at(row + HEAD_DIM + 2 * half);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            uint32_t w = p[i];
#pragma unroll
            for (int j = 0; j < 4; ++j) k[4 * i + j] = (float)(int8_t)(w >> (8 * j)) * s;
        }
    }
}

/* A block's 16 rows of one segment, moved from global to shared memory with coalesced loads:
 * the warp reads the segment as consecutive words (lane L takes words L, L + 32, ...). PAD
 * (for keys) widens f16 rows from 128 to 144 bytes in shared memory, so that the
 * row-per-lane-pair reads of the scores hit distinct banks; int8 rows keep their 68 bytes. */
template <int F, bool PAD>
struct Stage {
    static constexpr int ROW_BYTES = F == KVC_F16 ? 2 * HEAD_DIM : HEAD_DIM + 4;
    static constexpr int ROW = F == KVC_F16 && PAD ? 2 * HEAD_DIM + 16 : ROW_BYTES;
    static constexpr int BYTES = BLOCK_TOKENS * ROW;
    static constexpr int WORDS = BLOCK_TOKENS * ROW_BYTES / 4; /* 32-bit words of the segment */
    static constexpr int UNIT = F == KVC_F16 ? 4 : 1;          /* words per load */
    static constexpr int WORDS_PER_LANE = (WORDS + 32 - 1) / 32;

    __device__ static void load(const uint8_t *segment, int lane, uint32_t *words) {
        if (UNIT == 4) {
            const uint4 *src = reinterpret_cast<const uint4 *>(segment);
#pragma unroll
            for (int i = 0; i < WORDS_PER_LANE / 4; ++i) {
                const uint4 u = src[lane + 32 * i];
                words[4 * i] = u.x;
                words[4 * i + 1] = u.y;
                words[4 * i + 2] = u.z;
                words[4 * i + 3] = u.w;
            }
        } else {
            const uint32_t *src = reinterpret_cast<const uint32_t *>(segment);
#pragma unroll
            for (int i = 0; i < WORDS_PER_LANE; ++i) {
                const int j = lane + 32 * i;
                words[i] = j < WORDS ? src[j] : 0u;
            }
        }
    }

    __device__ static void store(uint8_t *stage, int lane, const uint32_t *words) {
        if (UNIT == 4) {
#pragma unroll
            for (int i = 0; i < WORDS_PER_LANE / 4; ++i) {
                const int j = lane + 32 * i; /* 16-byte unit j: row j / 8, column j % 8 */
                *reinterpret_cast<uint4 *>(stage + (j / 8) * ROW + (j % 8) * 16) =
                    make_uint4(words[4 * i], words[4 * i + 1], words[4 * i + 2], words[4 * i + 3]);
            }
        } else {
#pragma unroll
            for (int i = 0; i < WORDS_PER_LANE; ++i) {
                const int j = lane + 32 * i;
                if (j < WORDS) reinterpret_cast<uint32_t *>(stage)[j] = words[i];
            }
        }
    }
};

/* Elements 2*lane and 2*lane + 1 of a value row. */
template <int F>
__device__ inline float2 value_pair(const uint8_t *row, int lane) {
    if (F == KVC_F16) {
        return __half22float2(*reinterpret_cast<const __half2 *>(row + 4 * lane));
    } else {
        const uint16_t w = *reinterpret_cast<const uint16_t *>(row + 2 * lane);
        /* Both bf16 scales in one load (rows are 4-byte aligned): low half for lanes 0-15. */
        const uint32_t scales = *reinterpret_cast<const uint32_t *>(row + HEAD_DIM);
        const float s = __uint_as_float(lane < 16 ? scales << 16 : scales & 0xffff0000u);
        return make_float2((float)(int8_t)(w & 0xff) * s, (float)(int8_t)(w >> 8) * s);
    }
}

__device__ inline float warp_max(float x) {
#pragma unroll
    for (int o = 16; o >= 1; o /= 2) x = fmaxf(x, __shfl_xor_sync(FULL, x, o));
    return x;
}

__device__ inline float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o >= 1; o /= 2) x += __shfl_xor_sync(FULL, x, o);
    return x;
}

/* Partial states: ml[((b * q_heads + head) * splits + split) * 2 + {0: m, 1: l}], acc the same
 * index times HEAD_DIM. G = query heads per KV head. */
template <int KF, int VF, int G>
__global__ void __launch_bounds__(WARPS * 32)
    split_kernel(const uint8_t *__restrict__ storage, DeviceLayout lay, int layer,
                 DeviceBatch batch, int blocks_per_split, int splits, float *__restrict__ ml,
                 float *__restrict__ acc_out) {
    const int split = blockIdx.x, kv_head = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t len = batch.lens[b];
    const uint32_t query_pos = len - 1;
    const int blocks = (int)((len + BLOCK_TOKENS - 1) / BLOCK_TOKENS);
    const int begin = split * blocks_per_split;
    const int end = min(blocks, begin + blocks_per_split);

    __shared__ float q[G][2][33]; /* halves padded apart: no bank conflict */
    __shared__ float red_m[WARPS][G], red_l[WARPS][G];
    __shared__ float red_acc[WARPS][G][HEAD_DIM];
    __shared__ __align__(16) uint8_t k_stage[WARPS][Stage<KF, true>::BYTES];
    __shared__ __align__(16) uint8_t v_stage[WARPS][Stage<VF, false>::BYTES];
    for (int i = threadIdx.x; i < G * HEAD_DIM; i += blockDim.x) {
        int h = i / HEAD_DIM, d = i % HEAD_DIM;
        size_t at = ((size_t)b * batch.q_heads + (size_t)kv_head * G + h) * HEAD_DIM + d;
        q[h][d / 32][d % 32] = batch.queries[at] * batch.scale;
    }
    __syncthreads();

    float m[G], l[G], acc[G][2];
#pragma unroll
    for (int h = 0; h < G; ++h) {
        m[h] = -INFINITY;
        l[h] = 0.f;
        acc[h][0] = acc[h][1] = 0.f;
    }
    const int t = lane / 2, half = lane % 2;
    const uint32_t *table = batch.tables + (size_t)b * batch.table_stride;
    const uint64_t k_off = layer * lay.layer_bytes + kv_head * lay.k_seg;
    const uint64_t v_off =
        layer * lay.layer_bytes + lay.kv_heads * lay.k_seg + kv_head * lay.v_seg;
    /* The staging assumes segments of exactly 16 unpadded rows (f16 and int8 at head_dim 64). */

    for (int lb = begin + warp; lb < end; lb += WARPS) {
        const uint32_t phys = table[lb];
        if (phys == KVC_NO_BLOCK) continue; /* evicted by the window: no visible key */
        const uint8_t *block = storage + (uint64_t)phys * lay.block_bytes;
        const uint32_t pos = (uint32_t)lb * BLOCK_TOKENS + t;
        const bool visible = pos <= query_pos &&
                             (batch.window == 0 || query_pos - pos < batch.window ||
                              pos < batch.sink);
        /* Both segments of the block (its 16 key rows and 16 value rows) into this warp's
         * shared buffers, every load issued before any is used: one memory round trip per
         * block, coalesced. Slots past the sequence's end come along; they are never used. */
        uint32_t key_words[Stage<KF, true>::WORDS_PER_LANE];
        uint32_t value_words[Stage<VF, false>::WORDS_PER_LANE];
        Stage<KF, true>::load(block + k_off, lane, key_words);
        Stage<VF, false>::load(block + v_off, lane, value_words);
        __syncwarp(); /* the previous block's reads of the buffers are done */
        Stage<KF, true>::store(k_stage[warp], lane, key_words);
        Stage<VF, false>::store(v_stage[warp], lane, value_words);
        __syncwarp();
        const int tokens = min(BLOCK_TOKENS, (int)(len - (uint32_t)lb * BLOCK_TOKENS));
        float k[32];
        key_half<KF>(k_stage[warp] + t * Stage<KF, true>::ROW, half, k);
        float p[G];
#pragma unroll
        for (int h = 0; h < G; ++h) {
            float s = 0.f;
#pragma unroll
            for (int i = 0; i < 32; ++i) s = fmaf(q[h][half][i], k[i], s);
            s += __shfl_xor_sync(FULL, s, 1);
            s = visible ? s : -INFINITY; /* select: slots past len hold stale bytes */
            const float block_max = warp_max(s);
            const float new_m = fmaxf(m[h], block_max);
            const float alpha = m[h] == -INFINITY ? 0.f : expf(m[h] - new_m);
            p[h] = visible ? expf(s - new_m) : 0.f;
            l[h] = l[h] * alpha + warp_sum(half == 0 ? p[h] : 0.f);
            acc[h][0] *= alpha;
            acc[h][1] *= alpha;
            m[h] = new_m;
        }
        /* Slots past `tokens` are skipped (p = 0 there, and their bytes are stale). */
#pragma unroll
        for (int tt = 0; tt < BLOCK_TOKENS; ++tt) {
            const float2 v = tt < tokens
                                 ? value_pair<VF>(v_stage[warp] + tt * Stage<VF, false>::ROW, lane)
                                 : make_float2(0.f, 0.f);
#pragma unroll
            for (int h = 0; h < G; ++h) {
                const float w = __shfl_sync(FULL, p[h], 2 * tt);
                acc[h][0] = fmaf(w, v.x, acc[h][0]);
                acc[h][1] = fmaf(w, v.y, acc[h][1]);
            }
        }
    }

#pragma unroll
    for (int h = 0; h < G; ++h) {
        if (lane == 0) {
            red_m[warp][h] = m[h];
            red_l[warp][h] = l[h];
        }
        red_acc[warp][h][2 * lane] = acc[h][0];
        red_acc[warp][h][2 * lane + 1] = acc[h][1];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < G * HEAD_DIM; i += blockDim.x) {
        const int h = i / HEAD_DIM, d = i % HEAD_DIM;
        float big = -INFINITY;
        for (int w = 0; w < WARPS; ++w) big = fmaxf(big, red_m[w][h]);
        float sum = 0.f, weighted = 0.f;
        for (int w = 0; w < WARPS; ++w) {
            if (red_m[w][h] == -INFINITY) continue;
            const float f = expf(red_m[w][h] - big);
            sum += red_l[w][h] * f;
            weighted += red_acc[w][h][d] * f;
        }
        const size_t at = ((size_t)b * batch.q_heads + (size_t)kv_head * G + h) * splits + split;
        acc_out[at * HEAD_DIM + d] = weighted;
        if (d == 0) {
            ml[2 * at] = big;
            ml[2 * at + 1] = sum;
        }
    }
}

/* One thread block per (sequence, query head), MERGE_GROUPS x HEAD_DIM threads: group g folds
 * splits g, g + MERGE_GROUPS, ... (their loads in flight together), then group 0 folds the
 * groups. */
constexpr int MERGE_GROUPS = 4;

__global__ void __launch_bounds__(MERGE_GROUPS * HEAD_DIM)
    merge_kernel(const float *__restrict__ ml, const float *__restrict__ acc, int splits,
                 float *__restrict__ out) {
    const size_t row = blockIdx.x;
    const int d = threadIdx.x % HEAD_DIM, g = threadIdx.x / HEAD_DIM;
    float m = -INFINITY, l = 0.f, a = 0.f;
#pragma unroll 4
    for (int s = g; s < splits; s += MERGE_GROUPS) {
        const size_t at = row * splits + s;
        const float ms = ml[2 * at], ls = ml[2 * at + 1], as = acc[at * HEAD_DIM + d];
        if (ms == -INFINITY) continue; /* a split with no visible key */
        const float new_m = fmaxf(m, ms);
        const float f_old = m == -INFINITY ? 0.f : expf(m - new_m), f_new = expf(ms - new_m);
        l = l * f_old + ls * f_new;
        a = a * f_old + as * f_new;
        m = new_m;
    }
    __shared__ float group_m[MERGE_GROUPS], group_l[MERGE_GROUPS], group_a[MERGE_GROUPS][HEAD_DIM];
    if (d == 0) {
        group_m[g] = m;
        group_l[g] = l;
    }
    group_a[g][d] = a;
    __syncthreads();
    if (g != 0) return;
    float big = -INFINITY;
    for (int k = 0; k < MERGE_GROUPS; ++k) big = fmaxf(big, group_m[k]);
    float sum = 0.f, weighted = 0.f;
    for (int k = 0; k < MERGE_GROUPS; ++k) {
        if (group_m[k] == -INFINITY) continue;
        const float f = expf(group_m[k] - big);
        sum += group_l[k] * f;
        weighted += group_a[k][d] * f;
    }
    out[row * HEAD_DIM + d] = sum > 0.f ? weighted / sum : 0.f;
}

/* The memory floor: every 16-byte word of `words` read once. */
__global__ void read_floor(const uint4 *__restrict__ words, size_t n, unsigned *sink) {
    unsigned x = 0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const uint4 v = words[i];
        x ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (x == 0x9e3779b9u) sink[0] = x; /* keeps the loads */
}

template <int KF, int VF>
static void launch_split_formats(cudaStream_t stream, int group, dim3 grid, const uint8_t *storage,
                                 const DeviceLayout &lay, int layer, const DeviceBatch &batch,
                                 int bps, int splits, float *ml, float *acc) {
    switch (group) {
    case 1: split_kernel<KF, VF, 1><<<grid, WARPS * 32, 0, stream>>>(storage, lay, layer, batch, bps, splits, ml, acc); break;
    case 2: split_kernel<KF, VF, 2><<<grid, WARPS * 32, 0, stream>>>(storage, lay, layer, batch, bps, splits, ml, acc); break;
    case 3: split_kernel<KF, VF, 3><<<grid, WARPS * 32, 0, stream>>>(storage, lay, layer, batch, bps, splits, ml, acc); break;
    case 4: split_kernel<KF, VF, 4><<<grid, WARPS * 32, 0, stream>>>(storage, lay, layer, batch, bps, splits, ml, acc); break;
    default: fprintf(stderr, "GQA group %d not instantiated\n", group); exit(1);
    }
}

static void launch_split(cudaStream_t stream, int kf, int vf, int group, dim3 grid, const uint8_t *storage,
                         const DeviceLayout &lay, int layer, const DeviceBatch &batch, int bps,
                         int splits, float *ml, float *acc) {
    if (kf == KVC_F16 && vf == KVC_F16)
        launch_split_formats<KVC_F16, KVC_F16>(stream, group, grid, storage, lay, layer, batch, bps, splits, ml, acc);
    else if (kf == KVC_F16 && vf == KVC_INT8)
        launch_split_formats<KVC_F16, KVC_INT8>(stream, group, grid, storage, lay, layer, batch, bps, splits, ml, acc);
    else if (kf == KVC_INT8 && vf == KVC_F16)
        launch_split_formats<KVC_INT8, KVC_F16>(stream, group, grid, storage, lay, layer, batch, bps, splits, ml, acc);
    else if (kf == KVC_INT8 && vf == KVC_INT8)
        launch_split_formats<KVC_INT8, KVC_INT8>(stream, group, grid, storage, lay, layer, batch, bps, splits, ml, acc);
    else {
        fprintf(stderr, "formats %d/%d not supported by this example\n", kf, vf);
        exit(1);
    }
}

/* ----- host side ------------------------------------------------------------------------ */

static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Uniform in [-1, 1). */
static float unit(uint64_t *state) { return (float)(splitmix64(state) >> 40) / 8388608.0f - 1.0f; }

/* A cache built through the C ABI, on host memory, plus its copy on the device. */
struct HostCache {
    kvc_spec spec{};
    uint8_t *arena = nullptr;
    void *handle = nullptr;
    kvc_cache *cache = nullptr;
    kvc_layout layout{};
    uint8_t *device_storage = nullptr;
    size_t storage_len = 0;

    HostCache(const kvc_spec &s, uint32_t blocks) : spec(s) {
        size_t bytes = 0;
        KVC_CHECK(kvc_arena_bytes(&spec, blocks, &bytes));
        arena = static_cast<uint8_t *>(malloc(bytes));
        size_t align = kvc_cache_align();
        size_t handle_len = (kvc_cache_size() + align - 1) / align * align;
        handle = aligned_alloc(align, handle_len);
        if (!arena || !handle) {
            fprintf(stderr, "out of host memory (%zu bytes)\n", bytes);
            exit(1);
        }
        memset(arena, 0, bytes);
        const bool formats_ok = (spec.k_format == KVC_F16 || spec.k_format == KVC_INT8) &&
                                (spec.v_format == KVC_F16 || spec.v_format == KVC_INT8);
        if (spec.head_dim != HEAD_DIM || spec.block_tokens != BLOCK_TOKENS || !formats_ok) {
            fprintf(stderr, "this example needs head_dim %d, block_tokens %d, f16/int8 rows\n",
                    HEAD_DIM, BLOCK_TOKENS);
            exit(1);
        }
        KVC_CHECK(kvc_cache_init(handle, handle_len, &spec, arena, bytes, &cache));
        KVC_CHECK(kvc_layout_get(cache, &layout));
    }
    ~HostCache() {
        if (device_storage) cudaFree(device_storage);
        free(handle);
        free(arena);
    }

    /* Appends `n` tokens of random keys and values (from `pool`, at a per-call offset). */
    void append(uint64_t seq, uint32_t n, const std::vector<float> &pool, uint64_t *rng) {
        uint32_t first = 0;
        KVC_CHECK(kvc_reserve(cache, seq, n, &first));
        const size_t count = (size_t)n * spec.kv_heads * spec.head_dim;
        for (uint32_t layer = 0; layer < spec.layers; ++layer) {
            const size_t room = pool.size() - count;
            const float *k = pool.data() + splitmix64(rng) % room;
            const float *v = pool.data() + splitmix64(rng) % room;
            KVC_CHECK(kvc_write(cache, seq, layer, first, k, v, count));
        }
    }

    void upload() {
        const uint8_t *data = nullptr;
        KVC_CHECK(kvc_block_storage(cache, &data, &storage_len));
        if (!device_storage) CUDA_CHECK(cudaMalloc(&device_storage, storage_len));
        CUDA_CHECK(cudaMemcpy(device_storage, data, storage_len, cudaMemcpyHostToDevice));
    }

    DeviceLayout device_layout() const {
        return DeviceLayout{layout.block_bytes,     layout.layer_bytes, layout.k_row_bytes,
                            layout.v_row_bytes,     layout.k_segment_bytes,
                            layout.v_segment_bytes, (int)spec.kv_heads};
    }
};

/* A decode batch (one query per sequence at its last position) on the device. */
struct GpuBatch {
    int n = 0, q_heads = 0, splits = 0, blocks_per_split = 0;
    cudaStream_t stream = nullptr; /* blocking: the default stream's copies wait for it */
    uint32_t *tables = nullptr, *lens = nullptr;
    float *queries = nullptr, *ml = nullptr, *acc = nullptr, *out = nullptr;
    DeviceBatch view{};

    GpuBatch(const HostCache &c, const std::vector<uint64_t> &seqs, const std::vector<float> &q,
             int sm_count) {
        n = (int)seqs.size();
        q_heads = (int)c.spec.q_heads;
        std::vector<uint32_t> lens_host(n);
        size_t stride = 0;
        for (int i = 0; i < n; ++i) {
            KVC_CHECK(kvc_seq_len(c.cache, seqs[i], &lens_host[i]));
            size_t entries = 0;
            KVC_CHECK(kvc_page_table(c.cache, seqs[i], nullptr, 0, &entries));
            stride = std::max(stride, entries);
        }
        std::vector<uint32_t> tables_host(stride * n, KVC_NO_BLOCK);
        for (int i = 0; i < n; ++i) {
            size_t entries = 0;
            KVC_CHECK(kvc_page_table(c.cache, seqs[i], tables_host.data() + i * stride, stride,
                                     &entries));
        }
        /* Enough thread blocks to fill the GPU about 4 times over. */
        const int blocks = (int)stride;
        const int per_split_level = n * (int)c.spec.kv_heads;
        splits = std::max(1, std::min(blocks, (4 * sm_count + per_split_level - 1) / per_split_level));
        blocks_per_split = (blocks + splits - 1) / splits;
        splits = (blocks + blocks_per_split - 1) / blocks_per_split;

        const size_t rows = (size_t)n * q_heads;
        CUDA_CHECK(cudaStreamCreate(&stream));
        CUDA_CHECK(cudaMalloc(&tables, tables_host.size() * 4));
        CUDA_CHECK(cudaMalloc(&lens, n * 4));
        CUDA_CHECK(cudaMalloc(&queries, rows * HEAD_DIM * 4));
        CUDA_CHECK(cudaMalloc(&ml, rows * splits * 2 * 4));
        CUDA_CHECK(cudaMalloc(&acc, rows * splits * HEAD_DIM * 4));
        CUDA_CHECK(cudaMalloc(&out, rows * HEAD_DIM * 4));
        CUDA_CHECK(cudaMemcpy(tables, tables_host.data(), tables_host.size() * 4, cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemcpy(lens, lens_host.data(), n * 4, cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemcpy(queries, q.data(), rows * HEAD_DIM * 4, cudaMemcpyHostToDevice));
        view = DeviceBatch{tables, (int)stride, lens, queries, q_heads, c.spec.window,
                           c.spec.sink_tokens, 1.0f / sqrtf((float)HEAD_DIM)};
    }
    ~GpuBatch() {
        cudaStreamDestroy(stream);
        cudaFree(tables);
        cudaFree(lens);
        cudaFree(queries);
        cudaFree(ml);
        cudaFree(acc);
        cudaFree(out);
    }

    void run_layer(const HostCache &c, int layer) const {
        const int group = (int)(c.spec.q_heads / c.spec.kv_heads);
        dim3 grid(splits, c.spec.kv_heads, n);
        launch_split(stream, (int)c.spec.k_format, (int)c.spec.v_format, group, grid,
                     c.device_storage, c.device_layout(), layer, view, blocks_per_split, splits,
                     ml, acc);
        merge_kernel<<<n * q_heads, MERGE_GROUPS * HEAD_DIM, 0, stream>>>(ml, acc, splits, out);
    }

    std::vector<float> output() const {
        std::vector<float> host((size_t)n * q_heads * HEAD_DIM);
        CUDA_CHECK(cudaMemcpy(host.data(), out, host.size() * 4, cudaMemcpyDeviceToHost));
        return host;
    }
};

/* The CPU's attention for the same batch (kvc_attention, one thread). */
static std::vector<float> cpu_attention(const HostCache &c, const std::vector<uint64_t> &seqs,
                                        const std::vector<float> &q, int layer) {
    std::vector<kvc_batch_entry> entries(seqs.size());
    for (size_t i = 0; i < seqs.size(); ++i) {
        uint32_t len = 0;
        KVC_CHECK(kvc_seq_len(c.cache, seqs[i], &len));
        entries[i] = kvc_batch_entry{seqs[i], len - 1, 1};
    }
    size_t scratch_len = 0;
    KVC_CHECK(kvc_attention_scratch_len(c.cache, &scratch_len));
    std::vector<float> scratch(scratch_len), out(q.size());
    KVC_CHECK(kvc_attention(c.cache, (uint32_t)layer, entries.data(), entries.size(), q.data(),
                            out.data(), out.size(), scratch.data(), scratch.size()));
    return out;
}

/* f64 attention on the values kvc_read gives back (dequantized), with the same visibility
 * rule: keys at or before the query, inside the window or among the sink tokens. */
static std::vector<double> oracle_attention(const HostCache &c, const std::vector<uint64_t> &seqs,
                                            const std::vector<float> &q, int layer) {
    const int kvh = (int)c.spec.kv_heads, qh = (int)c.spec.q_heads, group = qh / kvh;
    const size_t row = (size_t)kvh * HEAD_DIM;
    std::vector<double> out(q.size(), 0.0);
    std::vector<float> k(row), v(row);
    for (size_t b = 0; b < seqs.size(); ++b) {
        uint32_t len = 0;
        KVC_CHECK(kvc_seq_len(c.cache, seqs[b], &len));
        const uint32_t query = len - 1;
        std::vector<std::vector<float>> keys, values;
        std::vector<uint32_t> positions;
        for (uint32_t pos = 0; pos < len; ++pos) {
            const bool visible = c.spec.window == 0 || query - pos < c.spec.window || pos < c.spec.sink_tokens;
            kvc_status s = kvc_read(c.cache, seqs[b], (uint32_t)layer, pos, k.data(), v.data(), row);
            if (s == KVC_EVICTED && !visible) continue;
            KVC_CHECK(s);
            if (!visible) continue;
            keys.push_back(k);
            values.push_back(v);
            positions.push_back(pos);
        }
        for (int h = 0; h < qh; ++h) {
            const int g = h / group;
            const float *qv = q.data() + (b * qh + h) * HEAD_DIM;
            std::vector<double> scores(keys.size());
            double big = -INFINITY;
            for (size_t t = 0; t < keys.size(); ++t) {
                double s = 0;
                for (int d = 0; d < HEAD_DIM; ++d) s += (double)qv[d] * keys[t][g * HEAD_DIM + d];
                scores[t] = s / sqrt((double)HEAD_DIM);
                big = std::max(big, scores[t]);
            }
            double sum = 0;
            for (double &s : scores) sum += (s = exp(s - big));
            for (size_t t = 0; t < keys.size(); ++t)
                for (int d = 0; d < HEAD_DIM; ++d)
                    out[(b * qh + h) * HEAD_DIM + d] += scores[t] / sum * values[t][g * HEAD_DIM + d];
        }
    }
    return out;
}

static int sm_count() {
    int device = 0, count = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    return count;
}

static std::vector<float> random_queries(size_t n, uint64_t *rng) {
    std::vector<float> q(n);
    for (float &x : q) x = 3.0f * unit(rng); /* peaked softmax: a sharper test */
    return q;
}

static const char *format_name(uint32_t f) { return f == KVC_F16 ? "f16" : f == KVC_INT8 ? "int8" : "?"; }

/* Correctness: GPU against the f64 oracle and the CPU, every layer, for one configuration. */
static bool check_config(const char *name, kvc_spec spec, const std::vector<uint32_t> &lens,
                         bool fork_last, const std::vector<float> &pool, uint64_t *rng) {
    HostCache c(spec, 1024);
    std::vector<uint64_t> seqs;
    for (uint32_t len : lens) {
        uint64_t seq = 0;
        KVC_CHECK(kvc_add_sequence(c.cache, &seq));
        /* Prefill in chunks, then some decode steps: the window evicts as it goes. */
        uint32_t done = 0;
        while (done < len) {
            uint32_t n = done + 1 >= len ? 1 : std::min<uint32_t>(len - done - 1, 300);
            c.append(seq, n, pool, rng);
            done += n;
        }
        seqs.push_back(seq);
    }
    if (fork_last) { /* a fork shares every block; its new tokens copy the tail */
        uint64_t child = 0;
        KVC_CHECK(kvc_fork(c.cache, seqs.back(), &child));
        c.append(child, 5, pool, rng);
        seqs.push_back(child);
    }
    c.upload();
    const std::vector<float> q = random_queries(seqs.size() * spec.q_heads * HEAD_DIM, rng);
    GpuBatch gpu(c, seqs, q, sm_count());
    double worst_gpu = 0, worst_cpu = 0, worst_pair = 0;
    for (uint32_t layer = 0; layer < spec.layers; ++layer) {
        gpu.run_layer(c, (int)layer);
        CUDA_CHECK(cudaGetLastError());
        const std::vector<float> got = gpu.output();
        const std::vector<float> cpu = cpu_attention(c, seqs, q, (int)layer);
        const std::vector<double> want = oracle_attention(c, seqs, q, (int)layer);
        for (size_t i = 0; i < want.size(); ++i) {
            worst_gpu = std::max(worst_gpu, fabs(got[i] - want[i]));
            worst_cpu = std::max(worst_cpu, fabs(cpu[i] - want[i]));
            worst_pair = std::max(worst_pair, fabs((double)got[i] - cpu[i]));
        }
    }
    const bool ok = worst_gpu <= 1e-4 && std::isfinite(worst_gpu);
    printf("check %-28s %s/%s q%u/kv%u window %u: %zu seqs, %u layers, %d splits | max |gpu-f64| %.2e, "
           "|cpu-f64| %.2e, |gpu-cpu| %.2e  %s\n",
           name, format_name(spec.k_format), format_name(spec.v_format), spec.q_heads,
           spec.kv_heads, spec.window, seqs.size(), spec.layers, gpu.splits, worst_gpu, worst_cpu,
           worst_pair, ok ? "ok" : "FAILED");
    return ok;
}

static double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

/* Timing: the decode step over every layer for `batch` sequences of `ctx` tokens. */
static void time_config(uint32_t format, int batch, uint32_t ctx, const std::vector<float> &pool,
                        uint64_t *rng) {
    kvc_spec spec = {30, 9, 3, 64, 16, format, format, (uint32_t)batch, ctx, 0, 0};
    const uint32_t blocks = (uint32_t)batch * ((ctx + 15) / 16);
    HostCache c(spec, blocks);
    std::vector<uint64_t> seqs(batch);
    for (auto &seq : seqs) {
        KVC_CHECK(kvc_add_sequence(c.cache, &seq));
        c.append(seq, ctx, pool, rng);
    }
    c.upload();
    const int sms = sm_count();
    for (int n : {1, batch}) {
        std::vector<uint64_t> subset(seqs.begin(), seqs.begin() + n);
        const std::vector<float> q = random_queries((size_t)n * spec.q_heads * HEAD_DIM, rng);
        GpuBatch gpu(c, subset, q, sms);
        /* Layer 0 against the CPU first. */
        gpu.run_layer(c, 0);
        CUDA_CHECK(cudaGetLastError());
        const std::vector<float> got = gpu.output();
        const std::vector<float> cpu = cpu_attention(c, subset, q, 0);
        double worst = 0;
        for (size_t i = 0; i < got.size(); ++i) worst = std::max(worst, fabs((double)got[i] - cpu[i]));

        cudaEvent_t start, stop;
        CUDA_CHECK(cudaEventCreate(&start));
        CUDA_CHECK(cudaEventCreate(&stop));
        /* The same step captured once as a CUDA graph (as a runtime would replay it). */
        cudaGraph_t captured;
        cudaGraphExec_t graph_exec;
        CUDA_CHECK(cudaStreamBeginCapture(gpu.stream, cudaStreamCaptureModeGlobal));
        for (uint32_t layer = 0; layer < spec.layers; ++layer) gpu.run_layer(c, (int)layer);
        CUDA_CHECK(cudaStreamEndCapture(gpu.stream, &captured));
        CUDA_CHECK(cudaGraphInstantiate(&graph_exec, captured, 0));
        std::vector<double> step_ms, graph_ms, floor_ms;
        const size_t words = c.storage_len / 16 * n / batch; /* this subset's blocks, about */
        unsigned *sink = nullptr;
        CUDA_CHECK(cudaMalloc(&sink, 4));
        for (int rep = 0; rep < 23; ++rep) {
            float ms = 0;
            CUDA_CHECK(cudaEventRecord(start, gpu.stream));
            for (uint32_t layer = 0; layer < spec.layers; ++layer) gpu.run_layer(c, (int)layer);
            CUDA_CHECK(cudaEventRecord(stop, gpu.stream));
            CUDA_CHECK(cudaEventSynchronize(stop));
            CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
            if (rep >= 3) step_ms.push_back(ms);
            CUDA_CHECK(cudaEventRecord(start, gpu.stream));
            CUDA_CHECK(cudaGraphLaunch(graph_exec, gpu.stream));
            CUDA_CHECK(cudaEventRecord(stop, gpu.stream));
            CUDA_CHECK(cudaEventSynchronize(stop));
            CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
            if (rep >= 3) graph_ms.push_back(ms);
            CUDA_CHECK(cudaEventRecord(start, gpu.stream));
            read_floor<<<sms * 8, 256, 0, gpu.stream>>>(reinterpret_cast<const uint4 *>(c.device_storage), words, sink);
            CUDA_CHECK(cudaEventRecord(stop, gpu.stream));
            CUDA_CHECK(cudaEventSynchronize(stop));
            CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
            if (rep >= 3) floor_ms.push_back(ms);
        }
        CUDA_CHECK(cudaGetLastError());
        /* The replayed graph's output is the last layer's. */
        const std::vector<float> replayed = gpu.output();
        const std::vector<float> cpu_last = cpu_attention(c, subset, q, (int)spec.layers - 1);
        for (size_t i = 0; i < got.size(); ++i)
            worst = std::max(worst, fabs((double)replayed[i] - cpu_last[i]));
        cudaGraphExecDestroy(graph_exec);
        cudaGraphDestroy(captured);
        cudaFree(sink);
        cudaEventDestroy(start);
        cudaEventDestroy(stop);

        /* The host CPU, one thread, the same step (kvc_attention, every layer). */
        auto t0 = std::chrono::steady_clock::now();
        for (uint32_t layer = 0; layer < spec.layers; ++layer) cpu_attention(c, subset, q, (int)layer);
        const double cpu_ms =
            std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();

        const double bytes = (double)n * ctx * spec.layers * spec.kv_heads *
                             (double)(c.layout.k_row_bytes + c.layout.v_row_bytes);
        const double step = median(step_ms), graph = median(graph_ms), floor = median(floor_ms);
        printf("time %-4s batch %d ctx %u: step %.3f ms (as a CUDA graph %.3f), %d splits x %d blocks"
               " | K+V %.1f MB, %.0f GB/s (graph) | read floor %.3f ms, %.0f GB/s, graph/floor %.2f"
               " | host CPU 1 thread %.1f ms | max |gpu-cpu| %.1e\n",
               format_name(format), n, ctx, step, graph, gpu.splits, gpu.blocks_per_split,
               bytes / 1e6, bytes / graph / 1e6, floor, words * 16.0 / floor / 1e6, graph / floor,
               cpu_ms, worst);
        printf("{\"format\":\"%s\",\"batch\":%d,\"ctx\":%u,\"step_ms\":%.4f,\"graph_ms\":%.4f,"
               "\"gb_per_s\":%.1f,\"floor_ms\":%.4f,\"cpu_1thread_ms\":%.2f,\"max_gpu_cpu\":%.2e}\n",
               format_name(format), n, ctx, step, graph, bytes / graph / 1e6, floor, cpu_ms, worst);
        fflush(stdout);
    }
}

int main(int argc, char **argv) {
    const uint32_t ctx = argc > 1 ? (uint32_t)atoi(argv[1]) : 8192;
    const int batch = argc > 2 ? atoi(argv[2]) : 8;
    cudaDeviceProp prop{};
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s, %d SMs, %.0f MB L2, %d warps per thread block\n", prop.name,
           prop.multiProcessorCount, prop.l2CacheSize / 1e6, WARPS);
    uint64_t rng = 42;
    std::vector<float> pool((size_t)1 << 24);
    for (float &x : pool) x = unit(&rng);

    const bool run_checks = !(argc > 3 && strcmp(argv[3], "time") == 0);
    if (run_checks) {
        bool ok = true;
        /* SmolLM2 geometry (GQA 3), ragged lengths from 1 token, a fork sharing blocks. */
        ok &= check_config("smollm2 ragged + fork", {4, 9, 3, 64, 16, KVC_F16, KVC_F16, 8, 4096, 0, 0},
                           {1, 17, 500, 3001}, true, pool, &rng);
        ok &= check_config("smollm2 ragged + fork", {4, 9, 3, 64, 16, KVC_INT8, KVC_INT8, 8, 4096, 0, 0},
                           {1, 17, 500, 3001}, true, pool, &rng);
        /* Llama-style GQA 4, mixed formats. */
        ok &= check_config("gqa4 mixed formats", {3, 8, 2, 64, 16, KVC_F16, KVC_INT8, 8, 4096, 0, 0},
                           {33, 2048, 1000}, false, pool, &rng);
        ok &= check_config("gqa4 mixed formats", {3, 8, 2, 64, 16, KVC_INT8, KVC_F16, 8, 4096, 0, 0},
                           {33, 2048, 1000}, false, pool, &rng);
        /* MHA with a sliding window and sink tokens: evicted blocks in the page tables. */
        ok &= check_config("mha window 700 sink 20", {2, 4, 4, 64, 16, KVC_F16, KVC_INT8, 8, 4096, 700, 20},
                           {40, 1500, 3333}, true, pool, &rng);
        if (!ok) {
            printf("FAILED\n");
            return 1;
        }
    }
    const char *only = argc > 4 ? argv[4] : ""; /* "f16" or "int8": time that format alone */
    if (strcmp(only, "int8") != 0) time_config(KVC_F16, batch, ctx, pool, &rng);
    if (strcmp(only, "f16") != 0) time_config(KVC_INT8, batch, ctx, pool, &rng);
    printf("ok\n");
    return 0;
}
