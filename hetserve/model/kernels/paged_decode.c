/* Decode attention over a paged KV cache, one query token per sequence (CPU).
 *
 * Reads each sequence's keys and values straight from their blocks: no gathered copy, no padding
 * to the longest sequence. One task per (sequence, KV head) serves all the query heads that share
 * that KV head (grouped-query attention), in fp32, in two passes: scores (reading K once), then
 * the softmax-weighted sum of V (reading V once). Inner loops run over head_dim or over tokens so
 * that the compiler vectorises them.
 *
 * Layouts: q, out [B, H, D]; k_cache, v_cache [num_blocks, H_kv, block_size, D];
 * block_tables [B, max_blocks] (int64); context_lens [B] (int64).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_GROUP 16
#define MAX_HEAD_DIM 256
#define ALWAYS_INLINE static inline __attribute__((always_inline))

typedef struct {
    int num_heads, num_kv_heads, head_dim, block_size, max_blocks;
    float scale;
} Shape;

ALWAYS_INLINE float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } x;
    x.u = (uint32_t)h << 16;
    return x.f;
}

ALWAYS_INLINE uint16_t f32_to_bf16(float f) {
    union { uint32_t u; float f; } x;
    x.f = f;
    return (uint16_t)((x.u + 0x7fffu + ((x.u >> 16) & 1u)) >> 16);  /* round to nearest even */
}

ALWAYS_INLINE void load_row(const void *base, int64_t index, int bf16, int n, float *restrict dst) {
    if (bf16) {
        const uint16_t *src = (const uint16_t *)base + index;
        for (int d = 0; d < n; d++) dst[d] = bf16_to_f32(src[d]);
    } else {
        const float *src = (const float *)base + index;
        for (int d = 0; d < n; d++) dst[d] = src[d];
    }
}

ALWAYS_INLINE void store_row(void *base, int64_t index, int bf16, int n, const float *restrict src,
                             float factor) {
    if (bf16) {
        uint16_t *dst = (uint16_t *)base + index;
        for (int d = 0; d < n; d++) dst[d] = f32_to_bf16(src[d] * factor);
    } else {
        float *dst = (float *)base + index;
        for (int d = 0; d < n; d++) dst[d] = src[d] * factor;
    }
}

/* Element offset of token t's row for KV head kvh in a K or V cache. */
ALWAYS_INLINE int64_t kv_offset(const int64_t *table, int64_t t, int kvh, const Shape *s, int dim) {
    const int64_t block = table[t / s->block_size];
    return ((block * s->num_kv_heads + kvh) * s->block_size + t % s->block_size) * dim;
}

ALWAYS_INLINE void attend_one(const void *q, const void *k_cache, const void *v_cache,
                              const int64_t *table, int64_t len, void *out, int b, int kvh,
                              const Shape *s, int bf16, int dim) {
    const int group = s->num_heads / s->num_kv_heads;
    float qf[MAX_GROUP][MAX_HEAD_DIM], acc[MAX_GROUP][MAX_HEAD_DIM], row[MAX_HEAD_DIM];
    float *scores = malloc(sizeof(float) * group * (len > 0 ? len : 1));
    const int64_t first_head = (int64_t)b * s->num_heads + (int64_t)kvh * group;
    for (int g = 0; g < group; g++) {
        load_row(q, (first_head + g) * dim, bf16, dim, qf[g]);
        for (int d = 0; d < dim; d++) { qf[g][d] *= s->scale; acc[g][d] = 0.0f; }
    }
    for (int64_t t = 0; t < len; t++) {
        load_row(k_cache, kv_offset(table, t, kvh, s, dim), bf16, dim, row);
        for (int g = 0; g < group; g++) {
            float dot = 0.0f;
            for (int d = 0; d < dim; d++) dot += qf[g][d] * row[d];
            scores[g * len + t] = dot;
        }
    }
    float inv_sum[MAX_GROUP];
    for (int g = 0; g < group; g++) {
        float *sg = scores + g * len, top = -INFINITY, sum = 0.0f;
        for (int64_t t = 0; t < len; t++) top = sg[t] > top ? sg[t] : top;
        for (int64_t t = 0; t < len; t++) { sg[t] = expf(sg[t] - top); sum += sg[t]; }
        inv_sum[g] = sum > 0.0f ? 1.0f / sum : 0.0f;
    }
    for (int64_t t = 0; t < len; t++) {
        load_row(v_cache, kv_offset(table, t, kvh, s, dim), bf16, dim, row);
        for (int g = 0; g < group; g++) {
            const float p = scores[g * len + t];
            for (int d = 0; d < dim; d++) acc[g][d] += p * row[d];
        }
    }
    free(scores);
    for (int g = 0; g < group; g++) store_row(out, (first_head + g) * dim, bf16, dim, acc[g], inv_sum[g]);
}

ALWAYS_INLINE void paged_decode(const void *q, const void *k_cache, const void *v_cache,
                                const int64_t *block_tables, const int64_t *context_lens, void *out,
                                int batch, const Shape *s, int num_threads, int bf16) {
    #pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(num_threads)
    for (int b = 0; b < batch; b++) {
        for (int kvh = 0; kvh < s->num_kv_heads; kvh++) {
            const int64_t *table = block_tables + (int64_t)b * s->max_blocks;
            /* Common head sizes get their own copy with a constant trip count, which the
             * compiler unrolls and keeps in registers. */
            switch (s->head_dim) {
            case 64: attend_one(q, k_cache, v_cache, table, context_lens[b], out, b, kvh, s, bf16, 64); break;
            case 128: attend_one(q, k_cache, v_cache, table, context_lens[b], out, b, kvh, s, bf16, 128); break;
            default: attend_one(q, k_cache, v_cache, table, context_lens[b], out, b, kvh, s, bf16, s->head_dim);
            }
        }
    }
}

#define EXPORT(NAME, BF16)                                                                          \
    void NAME(const void *q, const void *k_cache, const void *v_cache, const int64_t *block_tables, \
              const int64_t *context_lens, void *out, int batch, int num_heads, int num_kv_heads,    \
              int head_dim, int block_size, int max_blocks, float scale, int num_threads) {          \
        const Shape s = {num_heads, num_kv_heads, head_dim, block_size, max_blocks, scale};          \
        paged_decode(q, k_cache, v_cache, block_tables, context_lens, out, batch, &s, num_threads,  \
                     BF16);                                                                         \
    }

EXPORT(paged_decode_f32, 0)
EXPORT(paged_decode_bf16, 1)

void paged_decode_limits(int *max_group, int *max_head_dim) {
    *max_group = MAX_GROUP;
    *max_head_dim = MAX_HEAD_DIM;
}
