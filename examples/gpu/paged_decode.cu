/* Paged decode attention on a GPU, straight from kvcache's own block bytes.
 *
 * The cache is built and filled on the host through the C ABI (include/kvcache.h). Its block
 * storage is copied to the GPU as it is, byte for byte, with each sequence's page table
 * (kvc_block_storage, kvc_layout_get, kvc_page_table); one kernel per layer then runs
 * FlashDecoding-style split-K attention over those blocks, the same decomposition as the
 * CPU's work items (README, "Attention, and how it maps to a GPU"):
 *
 *   decode_kernel  one thread block per (key split, KV head, sequence). Each of its 4 warps
 *                  walks its share of the split's 16-token blocks with a double buffer: while
 *                  it computes one block, the next block's key and value segments (one layer,
 *                  one KV head) are already being copied to shared memory (cp.async,
 *                  coalesced). Per block, a pair of lanes per token dots the key row with the
 *                  GQA group's queries (f16 converted in registers; int8 in integers, __dp4a,
 *                  against the queries quantized as the CPU quantizes them), the warp folds
 *                  the scores into a running max per query head (online softmax, in base 2),
 *                  and the lanes accumulate the weighted value rows (f16: two dimensions of
 *                  every token per lane; int8: four of every other token). The warps' states
 *                  merge through shared memory into one partial state (m, l, acc) per query
 *                  head and split; the last split to finish for a (sequence, KV head) merges
 *                  all of them into the output.
 *
 * What it checks: against an f64 oracle on the values read back through kvc_read (for the
 * query as the kernels use it: scaled, and quantized like the CPU's where keys are int8), and
 * against the CPU's kvc_attention, for f16 and int8 keys and values, GQA groups of 1 to 4,
 * ragged lengths, shared (forked) blocks and a sliding window with evicted blocks. Measures:
 * the decode step over SmolLM2-135M's 30 layers at 8192 tokens of context per sequence, against
 * a plain read of the same bytes (the memory floor), and the host CPU's kvc_attention.
 *
 * Limits of this example: head_dim 64, block_tokens 16, f16 or int8 rows (int4 rows need the
 * state kept outside the blocks), one query token per sequence (decode).
 *
 * Build and run (on a machine with nvcc and a GPU of compute capability 8.0 or later, for
 * cp.async; the static library built beforehand):
 *   cargo rustc --release --lib --crate-type staticlib
 *   nvcc -O3 -std=c++17 -arch=native -Iinclude examples/gpu/paged_decode.cu \
 *        target/release/libkvcache.a -lpthread -ldl -lm -o paged_decode && ./paged_decode
 * Arguments: [ctx (8192)] [batch (8)] ["time": skip the checks] ["f16" | "int8": time one].
 * Experiments, through the environment: KVC_GPU_STAGES (pipeline depths to check and time in
 * turn, e.g. "2,3,4"), KVC_GPU_FILL and KVC_GPU_MIN_BLOCKS (the split rule, see GpuBatch).
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
/* Blocks per warp in flight or in use are a template parameter S of the kernel, 2 to
 * MAX_STAGES. The default, 2, is double buffering; 3 and 4 were slower for every format and
 * batch measured, int8 included, whose stages are half the bytes (README, "On a real GPU").
 * KVC_GPU_STAGES picks others for experiments. */
constexpr int DEFAULT_STAGES = 2, MAX_STAGES = 4;
constexpr int MAX_SPLITS = 256;        /* key splits per (sequence, KV head) */
constexpr unsigned FULL = 0xffffffffu;
constexpr float LOG2E = 1.4426950408889634f;

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
    float scale; /* 1 / sqrt(HEAD_DIM) */
};

/* Per split and query head, a partial softmax state: the running max m and sum l (both in
 * log2 units: scores are scaled by log2(e) so that exp2f, one instruction, does the softmax)
 * and acc[HEAD_DIM], the weighted sum of value rows. Index of (sequence b, query head h, split
 * s): (b * q_heads + h) * splits + s; ml holds {m, l} pairs, acc HEAD_DIM floats each. */
struct PartialStates {
    float *ml, *acc;
    unsigned *arrivals; /* per (sequence, KV head): splits done so far in this launch */
    float *out;         /* [sequences][q_heads][HEAD_DIM], the merged result */
};

__device__ inline float bf16_at(const uint8_t *p) {
    return __uint_as_float((uint32_t)*reinterpret_cast<const uint16_t *>(p) << 16);
}

/* Four int8 (one 32-bit word) to floats, exactly, without the slow int-to-float unit: each
 * byte, offset to unsigned, becomes the low mantissa byte of 2^23, which is then subtracted. */
__device__ inline float4 int8x4_to_float4(uint32_t word) {
    const uint32_t biased = word ^ 0x80808080u;
    const float base = 8388608.f + 128.f; /* 2^23 + the offset */
    return make_float4(__uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7440)) - base,
                       __uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7441)) - base,
                       __uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7442)) - base,
                       __uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7443)) - base);
}

/* 16 bytes global -> shared, asynchronously and bypassing L1 (cp.async, sm_80 and later). */
__device__ inline void copy16_async(void *shared, const void *global) {
    const unsigned to = (unsigned)__cvta_generic_to_shared(shared);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(to), "l"(global) : "memory");
}
__device__ inline void copies_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
/* Waits until at most N of this thread's committed copy groups are still in flight. */
template <int N>
__device__ inline void copies_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/* One segment of a block (its 16 rows of one layer and KV head, keys or values) as it lies in
 * the cache, and as this kernel keeps it in shared memory. PAD widens f16 key rows from 128
 * to 144 bytes there, so that the row-per-lane-pair reads of the scores hit distinct banks. */
template <int F, bool PAD>
struct Segment {
    static constexpr int ROW_BYTES = F == KVC_F16 ? 2 * HEAD_DIM : HEAD_DIM + 4; /* + 2 bf16 scales */
    static constexpr int CHUNKS = BLOCK_TOKENS * ROW_BYTES / 16; /* 16-byte units: 128 or 68 */
    static constexpr int ROW = F == KVC_F16 && PAD ? ROW_BYTES + 16 : ROW_BYTES; /* in shared */
    static constexpr int STAGE_BYTES = BLOCK_TOKENS * ROW;

    /* Starts copying the segment at `from` (16-byte aligned) to `stage`; lane L copies units
     * L, L + 32, ...: consecutive lanes read consecutive bytes. */
    __device__ static void copy(uint8_t *stage, const uint8_t *from, int lane) {
#pragma unroll
        for (int j = lane; j < CHUNKS; j += 32) {
            const int row = j * 16 / ROW_BYTES, column = j * 16 % ROW_BYTES;
            copy16_async(stage + (ROW == ROW_BYTES ? j * 16 : row * ROW + column), from + j * 16);
        }
    }
};

/* This lane's half (32 elements) of an f16 key row, dotted with the same half of the GQA
 * group's queries: dot[h] = sum_i q[h][half][i] * key[32 * half + i]. */
template <int G>
__device__ inline void key_half_dot_f16(const uint8_t *row, int half, const float (*q)[2][36],
                                        float *dot) {
    float even[G], odd[G];
#pragma unroll
    for (int h = 0; h < G; ++h) even[h] = odd[h] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) { /* elements 4i .. 4i + 3 of the half */
        const uint2 u = reinterpret_cast<const uint2 *>(row + half * 64)[i];
        const float2 a = __half22float2(*reinterpret_cast<const __half2 *>(&u.x));
        const float2 b = __half22float2(*reinterpret_cast<const __half2 *>(&u.y));
        const float4 k = make_float4(a.x, a.y, b.x, b.y);
#pragma unroll
        for (int h = 0; h < G; ++h) {
            const float4 qv = *reinterpret_cast<const float4 *>(&q[h][half][4 * i]);
            even[h] = fmaf(qv.x, k.x, even[h]);
            odd[h] = fmaf(qv.y, k.y, odd[h]);
            even[h] = fmaf(qv.z, k.z, even[h]);
            odd[h] = fmaf(qv.w, k.w, odd[h]);
        }
    }
#pragma unroll
    for (int h = 0; h < G; ++h) dot[h] = even[h] + odd[h];
}

/* This lane's half of an int8 key row (one 32-element group: 8 words of 4 integers), dotted
 * with the same group of the quantized queries in integers (__dp4a: 4 products and their sum
 * per instruction, exact in i32), then scaled once: dot[h] = S · (s_q · s_k), the CPU's
 * arithmetic (quant_scalar::prepared_dot) to the bit. */
template <int G>
__device__ inline void key_half_dot_int8(const uint8_t *row, int half, const int (*q8)[2][8],
                                         const float (*q8_scale)[2], float *dot) {
    int even[G], odd[G];
#pragma unroll
    for (int h = 0; h < G; ++h) even[h] = odd[h] = 0;
    const uint32_t *k = reinterpret_cast<const uint32_t *>(row + half * 32); /* 4-byte aligned */
#pragma unroll
    for (int i = 0; i < 8; i += 4) {
        const int k0 = (int)k[i], k1 = (int)k[i + 1], k2 = (int)k[i + 2], k3 = (int)k[i + 3];
#pragma unroll
        for (int h = 0; h < G; ++h) {
            const int4 qw = *reinterpret_cast<const int4 *>(&q8[h][half][i]);
            even[h] = __dp4a(k0, qw.x, even[h]);
            odd[h] = __dp4a(k1, qw.y, odd[h]);
            even[h] = __dp4a(k2, qw.z, even[h]);
            odd[h] = __dp4a(k3, qw.w, odd[h]);
        }
    }
    const float key_scale = bf16_at(row + HEAD_DIM + 2 * half);
#pragma unroll
    for (int h = 0; h < G; ++h) dot[h] = (float)(even[h] + odd[h]) * (q8_scale[h][half] * key_scale);
}

/* A query element quantized as quant::prepare_query does on the CPU, given its group's scale
 * s (amax / 127 rounded up to f32; 0 for an all-zero group): x / s in f64, rounded half away
 * from zero, clamped to ±127. */
__host__ __device__ inline int quantize_query_element(float x, float s) {
    if (s == 0.f) return 0;
    const double v = (double)x / (double)s;
    const int r = v >= 0 ? (int)(v + 0.5) : -(int)(-v + 0.5);
    return r < -127 ? -127 : r > 127 ? 127 : r;
}

/* The scale of a query group whose largest magnitude is amax: amax / 127 in f64, rounded up to
 * f32 (quant::prepare_query's f32_up). */
__host__ __device__ inline float query_group_scale(float amax) {
    if (amax == 0.f) return 0.f;
    const double exact = (double)amax / 127.0;
    const float s = (float)exact;
    return (double)s < exact ? nextafterf(s, INFINITY) : s;
}

/* Component j (0 to 3) of v; j is a compile-time constant after unrolling. */
__device__ inline float component(float4 v, int j) { return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; }

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

/* The first logical block at or after `lb` (stepping by WARPS) that the page table holds, or
 * `end` if none: a window may have evicted some. */
__device__ inline int next_held(const uint32_t *table, int lb, int end) {
    while (lb < end && table[lb] == KVC_NO_BLOCK) lb += WARPS;
    return lb < end ? lb : end;
}

/* One thread block per (key split, KV head, sequence); G = query heads per KV head.
 *
 * Each warp walks its share of the split's blocks (warp w takes blocks w, w + WARPS, ...),
 * double-buffered: the next block's key and value segments are copied to shared memory
 * (cp.async) while the current one is computed, so a warp always has a block's loads in
 * flight. Per block: a pair of lanes per token dots the key row with the group's queries; the
 * warp takes each query head's max (4 shuffles: the pair already agrees); every lane keeps a
 * running sum of its own tokens' weights (summed over the warp once, at the end); the weights
 * go to shared memory, and each lane accumulates two dimensions of the weighted value rows.
 * The warps' states merge through shared memory into the split's partial state. The last
 * split to finish for a (sequence, KV head), counted with an atomic, merges all the splits'
 * states into the output: no second kernel. */
template <int KF, int VF, int G, int S>
__global__ void __launch_bounds__(WARPS * 32)
    decode_kernel(const uint8_t *__restrict__ storage, DeviceLayout lay, int layer,
                  DeviceBatch batch, int blocks_per_split, int splits, PartialStates states) {
    using Keys = Segment<KF, true>;
    using Values = Segment<VF, false>;
    const int split = blockIdx.x, kv_head = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t len = batch.lens[b];
    const uint32_t query_pos = len - 1;
    const int blocks = (int)((len + BLOCK_TOKENS - 1) / BLOCK_TOKENS);
    const int begin = split * blocks_per_split;
    const int end = min(blocks, begin + blocks_per_split);

    /* The group's queries. Float keys: f32, pre-scaled by scale·log2(e), halves 144 bytes apart
     * (distinct banks). int8 keys: scaled by `scale`, then quantized per 32-element group as
     * the CPU does (its scale in q8_scale), so that the scores are the CPU's exactly. */
    __shared__ __align__(16) float q[KF == KVC_INT8 ? 1 : G][2][36];
    __shared__ __align__(16) int q8[KF == KVC_INT8 ? G : 1][2][8];
    __shared__ float q8_scale[G][2];
    /* Dynamic shared memory: per warp, S key segments then S value segments. */
    extern __shared__ __align__(16) uint8_t stage_memory[];
    uint8_t *const k_stages = stage_memory + warp * S * (Keys::STAGE_BYTES + Values::STAGE_BYTES);
    uint8_t *const v_stages = k_stages + S * Keys::STAGE_BYTES;
    __shared__ __align__(16) float weights[WARPS][G][BLOCK_TOKENS];
    __shared__ float red_m[WARPS][G], red_l[WARPS][G];
    __shared__ __align__(16) float red_acc[WARPS][G][HEAD_DIM];
    __shared__ bool merges;

    const uint32_t *table = batch.tables + (size_t)b * batch.table_stride;
    const uint64_t k_off = layer * lay.layer_bytes + kv_head * lay.k_seg;
    const uint64_t v_off = layer * lay.layer_bytes + lay.kv_heads * lay.k_seg + kv_head * lay.v_seg;
    /* `lb`: the next block to compute; `ahead`: the next block to copy in. Copies of the first
     * S - 1 blocks go out before anything else; one copy group per block. */
    int lb = next_held(table, begin + warp, end), ahead = lb;
#pragma unroll
    for (int st = 0; st < S - 1; ++st) {
        if (ahead < end) {
            const uint8_t *block = storage + (uint64_t)table[ahead] * lay.block_bytes;
            Keys::copy(k_stages + st * Keys::STAGE_BYTES, block + k_off, lane);
            Values::copy(v_stages + st * Values::STAGE_BYTES, block + v_off, lane);
            ahead = next_held(table, ahead + WARPS, end);
        }
        copies_commit();
    }
    int stage = 0;

    /* G * HEAD_DIM is a multiple of 32: each warp takes whole 32-element groups. */
    for (int i = threadIdx.x; i < G * HEAD_DIM; i += blockDim.x) {
        const int h = i / HEAD_DIM, d = i % HEAD_DIM;
        const size_t at = ((size_t)b * batch.q_heads + (size_t)kv_head * G + h) * HEAD_DIM + d;
        if constexpr (KF == KVC_INT8) {
            const float x = batch.queries[at] * batch.scale;
            const float s = query_group_scale(warp_max(fabsf(x)));
            reinterpret_cast<int8_t *>(q8[h][d / 32])[d % 32] = (int8_t)quantize_query_element(x, s);
            if (d % 32 == 0) q8_scale[h][d / 32] = s;
        } else {
            q[h][d / 32][d % 32] = batch.queries[at] * (batch.scale * LOG2E);
        }
    }
    __syncthreads();

    /* Values: with f16 rows each lane accumulates elements 2·lane and 2·lane + 1 of every
     * token. With int8 rows each lane takes one word of 4 integers (elements 4·(lane % 16) to
     * 4·(lane % 16) + 3) of every other token (lanes 0-15 the even tokens, 16-31 the odd ones:
     * their rows, 68 bytes apart, hit distinct banks but for one pair of lanes) and folds the row's
     * scale into the weight, 3 multiplies per row instead of 4; the two halves' sums are added
     * at the end. */
    constexpr int VE = VF == KVC_INT8 ? 4 : 2; /* value elements per lane */
    float m[G], l[G], acc[G][VE];              /* l: this lane's tokens only */
#pragma unroll
    for (int h = 0; h < G; ++h) {
        m[h] = -INFINITY;
        l[h] = 0.f;
#pragma unroll
        for (int e = 0; e < VE; ++e) acc[h][e] = 0.f;
    }
    const int t = lane / 2, half = lane % 2;

    while (lb < end) {
        if (ahead < end) { /* into the stage the previous iteration finished with */
            const int st = (stage + S - 1) % S;
            const uint8_t *block = storage + (uint64_t)table[ahead] * lay.block_bytes;
            Keys::copy(k_stages + st * Keys::STAGE_BYTES, block + k_off, lane);
            Values::copy(v_stages + st * Values::STAGE_BYTES, block + v_off, lane);
            ahead = next_held(table, ahead + WARPS, end);
        }
        copies_commit();
        copies_wait<S - 1>(); /* this block's copies (older than the newest groups) landed */
        __syncwarp();              /* ... every lane's */

        const uint32_t pos = (uint32_t)lb * BLOCK_TOKENS + t;
        const bool visible = pos <= query_pos && (batch.window == 0 ||
                                                  query_pos - pos < batch.window || pos < batch.sink);
        const int tokens = min(BLOCK_TOKENS, (int)(len - (uint32_t)lb * BLOCK_TOKENS));
        float score[G]; /* this lane's half of each dot product */
        const uint8_t *key_row = k_stages + stage * Keys::STAGE_BYTES + t * Keys::ROW;
        if constexpr (KF == KVC_INT8)
            key_half_dot_int8<G>(key_row, half, q8, q8_scale, score);
        else
            key_half_dot_f16<G>(key_row, half, q, score);
#pragma unroll
        for (int h = 0; h < G; ++h) {
            float x = score[h] + __shfl_xor_sync(FULL, score[h], 1);
            if constexpr (KF == KVC_INT8) x *= LOG2E; /* the f16 queries carry it already */
            x = visible ? x : -INFINITY; /* select: slots past len hold stale bytes */
            float block_max = x;
#pragma unroll
            for (int o = 16; o >= 2; o /= 2) block_max = fmaxf(block_max, __shfl_xor_sync(FULL, block_max, o));
            const float new_m = fmaxf(m[h], block_max);
            const float alpha = m[h] == new_m ? 1.f : exp2f(m[h] - new_m); /* 0 from -inf */
            const float p = visible ? exp2f(x - new_m) : 0.f;
            l[h] = l[h] * alpha + (half == 0 ? p : 0.f);
#pragma unroll
            for (int e = 0; e < VE; ++e) acc[h][e] *= alpha;
            m[h] = new_m;
            /* int8 values read the even tokens' weights, then the odd ones' */
            if (half == 0) weights[warp][h][VF == KVC_INT8 ? t % 2 * 8 + t / 2 : t] = p;
        }
        __syncwarp();
        const uint8_t *v_rows = v_stages + stage * Values::STAGE_BYTES;
        if constexpr (VF == KVC_INT8) {
            const int parity = lane / 16, word = lane % 16;
            /* The word's group scale: the low bf16 of the row's scale pair for words 0-7. */
            const int scale_shift = word < 8 ? 16 : 0;
#pragma unroll
            for (int jj = 0; jj < 8; jj += 4) { /* this half's tokens 2j + parity, 4 at a time */
                float4 w[G];
#pragma unroll
                for (int h = 0; h < G; ++h)
                    w[h] = *reinterpret_cast<const float4 *>(&weights[warp][h][8 * parity + jj]);
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                    const int token = 2 * (jj + u) + parity;
                    if (token >= tokens) break; /* stale bytes past the end: never read */
                    const uint8_t *row = v_rows + token * Values::ROW;
                    const float4 v = int8x4_to_float4(reinterpret_cast<const uint32_t *>(row)[word]);
                    const uint32_t scales = *reinterpret_cast<const uint32_t *>(row + HEAD_DIM);
                    const float s = __uint_as_float((scales << scale_shift) & 0xffff0000u);
#pragma unroll
                    for (int h = 0; h < G; ++h) {
                        const float ws = component(w[h], u) * s;
                        acc[h][0] = fmaf(ws, v.x, acc[h][0]);
                        acc[h][1] = fmaf(ws, v.y, acc[h][1]);
                        acc[h][2] = fmaf(ws, v.z, acc[h][2]);
                        acc[h][3] = fmaf(ws, v.w, acc[h][3]);
                    }
                }
            }
        } else {
#pragma unroll
            for (int tt = 0; tt < BLOCK_TOKENS; tt += 4) {
                float4 w[G];
#pragma unroll
                for (int h = 0; h < G; ++h) w[h] = *reinterpret_cast<const float4 *>(&weights[warp][h][tt]);
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                    if (tt + u >= tokens) break; /* stale bytes past the end: never read */
                    const float2 v = __half22float2(
                        *reinterpret_cast<const __half2 *>(v_rows + (tt + u) * Values::ROW + 4 * lane));
#pragma unroll
                    for (int h = 0; h < G; ++h) {
                        acc[h][0] = fmaf(component(w[h], u), v.x, acc[h][0]);
                        acc[h][1] = fmaf(component(w[h], u), v.y, acc[h][1]);
                    }
                }
            }
        }
        __syncwarp(); /* every lane is done with this stage before it is refilled */
        lb = next_held(table, lb + WARPS, end);
        stage = (stage + 1) % S;
    }
    copies_wait<0>();

#pragma unroll
    for (int h = 0; h < G; ++h) {
        const float sum = warp_sum(l[h]);
        if (lane == 0) {
            red_m[warp][h] = m[h];
            red_l[warp][h] = sum;
        }
        if constexpr (VF == KVC_INT8) { /* even tokens' sums plus odd tokens' */
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[h][e] += __shfl_xor_sync(FULL, acc[h][e], 16);
            if (lane < 16) *reinterpret_cast<float4 *>(&red_acc[warp][h][4 * lane]) =
                               make_float4(acc[h][0], acc[h][1], acc[h][2], acc[h][3]);
        } else {
            red_acc[warp][h][2 * lane] = acc[h][0];
            red_acc[warp][h][2 * lane + 1] = acc[h][1];
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < G * HEAD_DIM; i += blockDim.x) {
        const int h = i / HEAD_DIM, d = i % HEAD_DIM;
        float big = -INFINITY;
        for (int w = 0; w < WARPS; ++w) big = fmaxf(big, red_m[w][h]);
        float sum = 0.f, weighted = 0.f;
        for (int w = 0; w < WARPS; ++w) {
            if (red_m[w][h] == -INFINITY) continue;
            const float f = exp2f(red_m[w][h] - big);
            sum += red_l[w][h] * f;
            weighted += red_acc[w][h][d] * f;
        }
        const size_t at = ((size_t)b * batch.q_heads + (size_t)kv_head * G + h) * splits + split;
        states.acc[at * HEAD_DIM + d] = weighted;
        if (d == 0) {
            states.ml[2 * at] = big;
            states.ml[2 * at + 1] = sum;
        }
    }

    /* The last split of this (sequence, KV head) to get here merges them all. */
    __threadfence(); /* this split's state is visible GPU-wide before it is counted */
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned *arrived = states.arrivals + (size_t)b * gridDim.y + kv_head;
        merges = atomicAdd(arrived, 1u) == (unsigned)splits - 1;
        if (merges) *arrived = 0; /* ready for the next launch */
    }
    __syncthreads();
    if (!merges) return;
    __threadfence();
    /* Warp h takes query head h (G <= WARPS): the largest of the splits' maxima, each split's
     * factor 2^(m_s - max) into shared memory, and the factored sum of their l. */
    __shared__ float factors[G][MAX_SPLITS], total_l[G];
    if (warp < G) {
        const size_t row = (size_t)b * batch.q_heads + (size_t)kv_head * G + warp;
        const float *ml = states.ml + 2 * row * splits;
        float big = -INFINITY;
        for (int sp = lane; sp < splits; sp += 32) big = fmaxf(big, __ldcg(ml + 2 * sp));
        big = warp_max(big);
        float sum = 0.f;
        for (int sp = lane; sp < splits; sp += 32) {
            const float ms = __ldcg(ml + 2 * sp);
            const float f = ms == -INFINITY ? 0.f : exp2f(ms - big); /* no visible key: 0 */
            factors[warp][sp] = f;
            sum = fmaf(__ldcg(ml + 2 * sp + 1), f, sum);
        }
        sum = warp_sum(sum);
        if (lane == 0) total_l[warp] = sum;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < G * HEAD_DIM; i += blockDim.x) {
        const int h = i / HEAD_DIM, d = i % HEAD_DIM;
        const size_t row = (size_t)b * batch.q_heads + (size_t)kv_head * G + h;
        const float *acc_in = states.acc + row * splits * HEAD_DIM + d;
        float weighted = 0.f;
#pragma unroll 8
        for (int sp = 0; sp < splits; ++sp)
            weighted = fmaf(__ldcg(acc_in + (size_t)sp * HEAD_DIM), factors[h][sp], weighted);
        states.out[row * HEAD_DIM + d] = total_l[h] > 0.f ? weighted / total_l[h] : 0.f;
    }
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

/* Dynamic shared memory of one thread block: the warps' staged segments, S of each. */
template <int KF, int VF, int S>
constexpr int stage_bytes() {
    return WARPS * S * (Segment<KF, true>::STAGE_BYTES + Segment<VF, false>::STAGE_BYTES);
}

/* One instantiation of decode_kernel, as a type: dispatch() below hands one to its caller. */
template <int KF_, int VF_, int G_, int S_>
struct Kernel {
    static constexpr int KF = KF_, VF = VF_, G = G_, S = S_;
    static_assert(G <= WARPS, "the merge takes one warp per query head");
    static constexpr int SHARED = stage_bytes<KF, VF, S>(); /* dynamic shared memory, bytes */
    static constexpr auto function = decode_kernel<KF, VF, G, S>;

    /* Above 48 KiB, dynamic shared memory must be asked for, once per kernel. */
    static void prepare() {
        static bool done = false;
        if (!done) {
            CUDA_CHECK(cudaFuncSetAttribute(function, cudaFuncAttributeMaxDynamicSharedMemorySize, SHARED));
            done = true;
        }
    }
};

/* Calls visit(Kernel<KF, VF, G, S>{}) for the instantiation that serves these formats, GQA
 * group and pipeline depth; exits with a message if none does. */
template <int KF, int VF, int G, class Visit>
static void dispatch_stages(int stages, Visit &&visit) {
    switch (stages) {
    case 2: visit(Kernel<KF, VF, G, 2>{}); break;
    case 3: visit(Kernel<KF, VF, G, 3>{}); break;
    case 4: visit(Kernel<KF, VF, G, 4>{}); break;
    default: fprintf(stderr, "%d stages not instantiated (2 to %d)\n", stages, MAX_STAGES); exit(1);
    }
}

template <int KF, int VF, class Visit>
static void dispatch_group(int group, int stages, Visit &&visit) {
    switch (group) {
    case 1: dispatch_stages<KF, VF, 1>(stages, visit); break;
    case 2: dispatch_stages<KF, VF, 2>(stages, visit); break;
    case 3: dispatch_stages<KF, VF, 3>(stages, visit); break;
    case 4: dispatch_stages<KF, VF, 4>(stages, visit); break;
    default: fprintf(stderr, "GQA group %d not instantiated\n", group); exit(1);
    }
}

template <class Visit>
static void dispatch(int kf, int vf, int group, int stages, Visit &&visit) {
    if (kf == KVC_F16 && vf == KVC_F16)
        dispatch_group<KVC_F16, KVC_F16>(group, stages, visit);
    else if (kf == KVC_F16 && vf == KVC_INT8)
        dispatch_group<KVC_F16, KVC_INT8>(group, stages, visit);
    else if (kf == KVC_INT8 && vf == KVC_F16)
        dispatch_group<KVC_INT8, KVC_F16>(group, stages, visit);
    else if (kf == KVC_INT8 && vf == KVC_INT8)
        dispatch_group<KVC_INT8, KVC_INT8>(group, stages, visit);
    else {
        fprintf(stderr, "formats %d/%d not supported by this example\n", kf, vf);
        exit(1);
    }
}

/* How many thread blocks of that kernel one multiprocessor holds at once (its registers and
 * shared memory decide). */
static int resident_blocks(int kf, int vf, int group, int stages) {
    int blocks = 0;
    dispatch(kf, vf, group, stages, [&](auto kernel) {
        using K = decltype(kernel);
        K::prepare();
        CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, K::function, WARPS * 32, K::SHARED));
    });
    return std::max(1, blocks);
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
        /* The kernel copies segments in 16-byte units (cp.async). */
        if ((layout.block_bytes | layout.layer_bytes | layout.k_segment_bytes |
             layout.v_segment_bytes) % 16 != 0) {
            fprintf(stderr, "this example needs 16-byte aligned segments\n");
            exit(1);
        }
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
    int n = 0, q_heads = 0, splits = 0, blocks_per_split = 0, stages = 2;
    cudaStream_t stream = nullptr; /* blocking: the default stream's copies wait for it */
    uint32_t *tables = nullptr, *lens = nullptr;
    float *queries = nullptr, *ml = nullptr, *acc = nullptr, *out = nullptr;
    unsigned *arrivals = nullptr;
    DeviceBatch view{};

    /* `stages_wanted`: the kernel's pipeline depth, or 0 for DEFAULT_STAGES. */
    GpuBatch(const HostCache &c, const std::vector<uint64_t> &seqs, const std::vector<float> &q,
             int sm_count, int stages_wanted) {
        n = (int)seqs.size();
        stages = stages_wanted ? stages_wanted : DEFAULT_STAGES;
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
        /* Splits: as many as one wave of thread blocks allows (`fill` per multiprocessor: as
         * many as its registers and shared memory hold at once), each warp taking at least
         * two blocks (so that its double buffering overlaps something), or eight once the
         * batch alone gives 16 or more (sequence, KV head) pairs (fewer, longer splits: less
         * merging, longer streams), at most MAX_SPLITS. KVC_GPU_FILL and KVC_GPU_MIN_BLOCKS
         * override the two for experiments. */
        const char *fill_env = getenv("KVC_GPU_FILL"), *min_env = getenv("KVC_GPU_MIN_BLOCKS");
        const int group = (int)(c.spec.q_heads / c.spec.kv_heads);
        const int fill = fill_env ? std::max(1, atoi(fill_env))
                                  : resident_blocks((int)c.spec.k_format, (int)c.spec.v_format, group, stages);
        const int blocks = (int)stride;
        const int per_split_level = n * (int)c.spec.kv_heads;
        const int min_per_warp = per_split_level >= 16 ? 8 : 2;
        const int min_per_split = WARPS * (min_env ? std::max(1, atoi(min_env)) : min_per_warp);
        splits = std::max(1, std::min(blocks, fill * sm_count / per_split_level));
        blocks_per_split = std::max(std::min(min_per_split, blocks), (blocks + splits - 1) / splits);
        blocks_per_split = std::max(blocks_per_split, (blocks + MAX_SPLITS - 1) / MAX_SPLITS);
        splits = (blocks + blocks_per_split - 1) / blocks_per_split;

        const size_t rows = (size_t)n * q_heads;
        CUDA_CHECK(cudaStreamCreate(&stream));
        CUDA_CHECK(cudaMalloc(&tables, tables_host.size() * 4));
        CUDA_CHECK(cudaMalloc(&lens, n * 4));
        CUDA_CHECK(cudaMalloc(&queries, rows * HEAD_DIM * 4));
        CUDA_CHECK(cudaMalloc(&ml, rows * splits * 2 * 4));
        CUDA_CHECK(cudaMalloc(&acc, rows * splits * HEAD_DIM * 4));
        CUDA_CHECK(cudaMalloc(&out, rows * HEAD_DIM * 4));
        CUDA_CHECK(cudaMalloc(&arrivals, (size_t)n * c.spec.kv_heads * 4));
        CUDA_CHECK(cudaMemset(arrivals, 0, (size_t)n * c.spec.kv_heads * 4));
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
        cudaFree(arrivals);
    }

    void run_layer(const HostCache &c, int layer) const {
        const int group = (int)(c.spec.q_heads / c.spec.kv_heads);
        dim3 grid(splits, c.spec.kv_heads, n);
        const PartialStates states{ml, acc, arrivals, out};
        const DeviceLayout lay = c.device_layout();
        dispatch((int)c.spec.k_format, (int)c.spec.v_format, group, stages, [&](auto kernel) {
            using K = decltype(kernel);
            K::prepare();
            K::function<<<grid, WARPS * 32, K::SHARED, stream>>>(c.device_storage, lay, layer, view,
                                                                 blocks_per_split, splits, states);
        });
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

/* One query row as both kernels (CPU and GPU) use it, in f64: q · scale (an f32 product, as
 * the CPU scales it) and, where keys are int8, that quantized per 32 elements exactly as the
 * CPU does (the integers times their group's scale). */
static std::vector<double> query_as_used(const float *q, float scale, bool int8_keys) {
    std::vector<double> out(HEAD_DIM);
    for (int g = 0; g < HEAD_DIM / 32; ++g) {
        float x[32], amax = 0.f;
        for (int i = 0; i < 32; ++i) {
            x[i] = q[32 * g + i] * scale;
            amax = std::max(amax, fabsf(x[i]));
        }
        const float s = query_group_scale(amax);
        for (int i = 0; i < 32; ++i)
            out[32 * g + i] = int8_keys ? (double)s * quantize_query_element(x[i], s) : (double)x[i];
    }
    return out;
}

/* f64 attention on the values kvc_read gives back (dequantized), for the queries as the
 * kernels use them (query_as_used), with the same visibility rule: keys at or before the
 * query, inside the window or among the sink tokens. */
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
            const std::vector<double> qv = query_as_used(q.data() + (b * qh + h) * HEAD_DIM,
                                                         1.0f / sqrtf((float)HEAD_DIM),
                                                         c.spec.k_format == KVC_INT8);
            std::vector<double> scores(keys.size());
            double big = -INFINITY;
            for (size_t t = 0; t < keys.size(); ++t) {
                double s = 0;
                for (int d = 0; d < HEAD_DIM; ++d) s += qv[d] * keys[t][g * HEAD_DIM + d];
                scores[t] = s;
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
                         bool fork_last, const std::vector<int> &stage_list,
                         const std::vector<float> &pool, uint64_t *rng) {
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
    std::vector<std::vector<float>> cpu(spec.layers);
    std::vector<std::vector<double>> want(spec.layers);
    for (uint32_t layer = 0; layer < spec.layers; ++layer) {
        cpu[layer] = cpu_attention(c, seqs, q, (int)layer);
        want[layer] = oracle_attention(c, seqs, q, (int)layer);
    }
    bool all_ok = true;
    for (int stages : stage_list) {
        GpuBatch gpu(c, seqs, q, sm_count(), stages);
        double worst_gpu = 0, worst_cpu = 0, worst_pair = 0;
        for (uint32_t layer = 0; layer < spec.layers; ++layer) {
            gpu.run_layer(c, (int)layer);
            CUDA_CHECK(cudaGetLastError());
            const std::vector<float> got = gpu.output();
            for (size_t i = 0; i < want[layer].size(); ++i) {
                worst_gpu = std::max(worst_gpu, fabs(got[i] - want[layer][i]));
                worst_cpu = std::max(worst_cpu, fabs(cpu[layer][i] - want[layer][i]));
                worst_pair = std::max(worst_pair, fabs((double)got[i] - cpu[layer][i]));
            }
        }
        const bool ok = worst_gpu <= 1e-4 && std::isfinite(worst_gpu);
        printf("check %-28s %s/%s q%u/kv%u window %u: %zu seqs, %u layers, %d splits, %d stages | "
               "max |gpu-f64| %.2e, |cpu-f64| %.2e, |gpu-cpu| %.2e  %s\n",
               name, format_name(spec.k_format), format_name(spec.v_format), spec.q_heads,
               spec.kv_heads, spec.window, seqs.size(), spec.layers, gpu.splits, gpu.stages,
               worst_gpu, worst_cpu, worst_pair, ok ? "ok" : "FAILED");
        all_ok &= ok;
    }
    return all_ok;
}

static double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

/* One timed configuration: the step as a CUDA graph, median ms. */
struct Timing {
    uint32_t format;
    int batch, stages;
    double graph_ms;
};

/* Timing: the decode step over every layer for `batch` and for 1 sequences of `ctx` tokens,
 * once per pipeline depth in `stage_list` (0: the default). */
static void time_config(uint32_t format, int batch, uint32_t ctx, const std::vector<int> &stage_list,
                        const std::vector<float> &pool, uint64_t *rng, std::vector<Timing> *timings) {
    kvc_spec spec = {30, 9, 3, 64, 16, format, format, (uint32_t)batch, ctx, 0, 0, 0};
    const uint32_t blocks = (uint32_t)batch * ((ctx + 15) / 16);
    HostCache c(spec, blocks);
    std::vector<uint64_t> seqs(batch);
    for (auto &seq : seqs) {
        KVC_CHECK(kvc_add_sequence(c.cache, &seq));
        c.append(seq, ctx, pool, rng);
    }
    c.upload();
    const int sms = sm_count();
    std::vector<int> sizes{batch}; /* the whole batch first: its launches lead, for a profiler */
    if (batch != 1) sizes.push_back(1);
    for (int n : sizes) {
        double cpu_ms = 0; /* the host CPU's step, timed at the first depth */
        for (int stages : stage_list) {
            std::vector<uint64_t> subset(seqs.begin(), seqs.begin() + n);
            const std::vector<float> q = random_queries((size_t)n * spec.q_heads * HEAD_DIM, rng);
            GpuBatch gpu(c, subset, q, sms, stages);
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

            /* The host CPU, one thread, the same step (kvc_attention, every layer); once per batch. */
            if (stages == stage_list.front()) {
                auto t0 = std::chrono::steady_clock::now();
                for (uint32_t layer = 0; layer < spec.layers; ++layer) cpu_attention(c, subset, q, (int)layer);
                cpu_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
            }

            const double bytes = (double)n * ctx * spec.layers * spec.kv_heads *
                                 (double)(c.layout.k_row_bytes + c.layout.v_row_bytes);
            const double step = median(step_ms), graph = median(graph_ms), floor = median(floor_ms);
            printf("time %-4s batch %d ctx %u, %d stages: step %.3f ms (as a CUDA graph %.3f), %d splits x %d blocks"
                   " | K+V %.1f MB, %.0f GB/s (graph) | read floor %.3f ms, %.0f GB/s, graph/floor %.2f"
                   " | host CPU 1 thread %.1f ms | max |gpu-cpu| %.1e\n",
                   format_name(format), n, ctx, gpu.stages, step, graph, gpu.splits, gpu.blocks_per_split,
                   bytes / 1e6, bytes / graph / 1e6, floor, words * 16.0 / floor / 1e6, graph / floor,
                   cpu_ms, worst);
            printf("{\"format\":\"%s\",\"batch\":%d,\"ctx\":%u,\"stages\":%d,\"step_ms\":%.4f,\"graph_ms\":%.4f,"
                   "\"gb_per_s\":%.1f,\"floor_ms\":%.4f,\"cpu_1thread_ms\":%.2f,\"max_gpu_cpu\":%.2e}\n",
                   format_name(format), n, ctx, gpu.stages, step, graph, bytes / graph / 1e6, floor,
                   cpu_ms, worst);
            fflush(stdout);
            timings->push_back(Timing{format, n, gpu.stages, graph});
        }
    }
}

/* The pipeline depths to check and time, from KVC_GPU_STAGES (a comma-separated list, e.g.
 * "2,4"), or {0}: the default. */
static std::vector<int> stage_list_from_env() {
    std::vector<int> list;
    const char *env = getenv("KVC_GPU_STAGES");
    for (const char *p = env ? env : ""; *p;) {
        char *end = nullptr;
        const long v = strtol(p, &end, 10);
        if (end == p || v < 2 || v > MAX_STAGES) {
            fprintf(stderr, "KVC_GPU_STAGES: a comma-separated list of 2 to %d\n", MAX_STAGES);
            exit(1);
        }
        list.push_back((int)v);
        p = *end == ',' ? end + 1 : end;
    }
    if (list.empty()) list.push_back(0);
    return list;
}

int main(int argc, char **argv) {
    const uint32_t ctx = argc > 1 ? (uint32_t)atoi(argv[1]) : 8192;
    const int batch = argc > 2 ? atoi(argv[2]) : 8;
    const std::vector<int> stage_list = stage_list_from_env();
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
        const std::vector<int> &sl = stage_list;
        /* SmolLM2 geometry (GQA 3), ragged lengths from 1 token, a fork sharing blocks. */
        ok &= check_config("smollm2 ragged + fork", {4, 9, 3, 64, 16, KVC_F16, KVC_F16, 8, 4096, 0, 0},
                           {1, 17, 500, 3001}, true, sl, pool, &rng);
        ok &= check_config("smollm2 ragged + fork", {4, 9, 3, 64, 16, KVC_INT8, KVC_INT8, 8, 4096, 0, 0},
                           {1, 17, 500, 3001}, true, sl, pool, &rng);
        /* Llama-style GQA 4, mixed formats. */
        ok &= check_config("gqa4 mixed formats", {3, 8, 2, 64, 16, KVC_F16, KVC_INT8, 8, 4096, 0, 0},
                           {33, 2048, 1000}, false, sl, pool, &rng);
        ok &= check_config("gqa4 mixed formats", {3, 8, 2, 64, 16, KVC_INT8, KVC_F16, 8, 4096, 0, 0},
                           {33, 2048, 1000}, false, sl, pool, &rng);
        /* MHA with a sliding window and sink tokens: evicted blocks in the page tables. */
        ok &= check_config("mha window 700 sink 20", {2, 4, 4, 64, 16, KVC_F16, KVC_INT8, 8, 4096, 700, 20},
                           {40, 1500, 3333}, true, sl, pool, &rng);
        ok &= check_config("mha window 700 sink 20", {2, 4, 4, 64, 16, KVC_INT8, KVC_INT8, 8, 4096, 700, 20},
                           {40, 1500, 3333}, true, sl, pool, &rng);
        if (!ok) {
            printf("FAILED\n");
            return 1;
        }
    }
    const char *only = argc > 4 ? argv[4] : ""; /* "f16" or "int8": time that format alone */
    std::vector<Timing> timings;
    if (strcmp(only, "int8") != 0) time_config(KVC_F16, batch, ctx, stage_list, pool, &rng, &timings);
    if (strcmp(only, "f16") != 0) time_config(KVC_INT8, batch, ctx, stage_list, pool, &rng, &timings);
    /* int8 against f16, each at its own fastest depth among those timed. */
    for (int n : {1, batch}) {
        double best[2] = {INFINITY, INFINITY};
        for (const Timing &t : timings)
            if (t.batch == n) {
                double &slot = best[t.format == KVC_INT8];
                slot = std::min(slot, t.graph_ms);
            }
        if (std::isfinite(best[0]) && std::isfinite(best[1]))
            printf("ratio batch %d ctx %u: int8 %.3f ms / f16 %.3f ms = %.2f\n", n, ctx, best[1],
                   best[0], best[1] / best[0]);
    }
    printf("ok\n");
    return 0;
}
