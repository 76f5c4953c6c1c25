/* Decode attention over a paged KV cache, one query token per sequence (CPU).
 *
 * Reads each sequence's keys and values straight from their blocks: no gathered copy, no padding
 * to the longest sequence. One task per (sequence, KV head) serves all the query heads that share
 * that KV head (grouped-query attention), accumulating in fp32. A task's result depends only on
 * its own sequence, never on the batch around it.
 *
 * With AVX-512 (the usual build: -march=native on a recent x86 CPU) a task walks its sequence in
 * chunks of 16 tokens with an online softmax, reading each chunk's keys and values once, in one
 * pass, and allocating nothing:
 *  - the scores of the 16 tokens for one query head fill one vector. For bf16 caches on CPUs with
 *    AMX they come from one tile product per chunk for all the query heads at once (keys loaded
 *    straight from the cache as a 16-row tile); else from AVX512_BF16 dot products (fp32 FMAs
 *    without it, and for fp32 caches), summed across lanes 16 tokens at a time;
 *  - the running maximum and sum of each head are rescaled only when the maximum grows, and the
 *    softmax-weighted values accumulate in fp32 registers;
 *  - the rows two chunks ahead are prefetched into L2 while the current chunk is computed.
 *    Prefetches into L1 queue behind its few miss buffers: on 2 cores of an AMD EPYC, 64
 *    sequences' cold KV streamed at 13.5 GB/s that way, 19.4 GB/s into L2.
 * Every product of bf16 inputs is exact in fp32, so results differ from the scalar reference only
 * by fp32 rounding. Copies are compiled for the common (group, head size) pairs.
 * Without AVX-512 (or for head sizes it does not handle) a portable two-pass version runs:
 * scores (reading K once), then the softmax-weighted sum of V (reading V once), with loops the
 * compiler vectorises.
 *
 * Quantized caches (q and out stay fp32 or bf16) are widened to fp32 in registers, never
 * dequantized to memory: int8 caches hold symmetric int8 values with one fp32 scale per (block,
 * KV head, slot) (a key's score is its scale times q . k_int8, a value's weight its softmax
 * probability times its scale); fp8 caches hold float8 e4m3 values without scales.
 *
 * Layouts: q, out [B, H, D]; k_cache, v_cache [num_blocks, H_kv, block_size, D]; k_scales,
 * v_scales [num_blocks, H_kv, block_size] (int8 caches only, else NULL);
 * block_tables [B, max_blocks] (int64); context_lens [B] (int64).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"

#define MAX_GROUP 16
#define CACHE_INT8 1 /* cache kinds; 0: the cache has q's dtype */
#define CACHE_FP8 2
#define MAX_HEAD_DIM 256

typedef struct {
    int num_heads, num_kv_heads, head_dim, block_size, max_blocks;
    float scale;
    const float *k_scales, *v_scales; /* int8 caches only */
} Shape;

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

/* float8 e4m3 (sign, 4 exponent bits with bias 7, 3 mantissa bits; no infinities) -> fp32. */
ALWAYS_INLINE float e4m3_to_f32(uint8_t x) {
    const uint32_t magnitude = x & 0x7fu;
    union { uint32_t u; float f; } y;
    if (magnitude < 8) { /* subnormal: m * 2^-9 */
        y.f = (float)magnitude * (1.0f / 512.0f);
    } else {             /* rebias the exponent from 7 to 127 */
        y.u = (magnitude << 20) + (120u << 23);
    }
    y.u |= (uint32_t)(x & 0x80u) << 24;
    return y.f;
}

/* A K or V row as fp32: int8 rows times their scale (index / n is the row's slot), fp8 rows widened. */
ALWAYS_INLINE void load_kv_row(const void *base, const float *scales, int64_t index, int bf16, int cache, int n,
                               float *restrict dst) {
    if (cache == CACHE_INT8) {
        const int8_t *src = (const int8_t *)base + index;
        const float scale = scales[index / n];
        for (int d = 0; d < n; d++) dst[d] = (float)src[d] * scale;
    } else if (cache == CACHE_FP8) {
        const uint8_t *src = (const uint8_t *)base + index;
        for (int d = 0; d < n; d++) dst[d] = e4m3_to_f32(src[d]);
    } else {
        load_row(base, index, bf16, n, dst);
    }
}

/* Element offset of token t's row for KV head kvh in a K or V cache. */
ALWAYS_INLINE int64_t kv_offset(const int64_t *table, int64_t t, int kvh, const Shape *s, int dim) {
    const int64_t block = table[t / s->block_size];
    return ((block * s->num_kv_heads + kvh) * s->block_size + t % s->block_size) * dim;
}

/* Portable path: two passes over the sequence, scores kept in a buffer (on the stack unless the
 * context is long). */
#define STACK_SCORES 8192

ALWAYS_INLINE void attend_one(const void *q, const void *k_cache, const void *v_cache,
                              const int64_t *table, int64_t len, void *out, int b, int kvh,
                              const Shape *s, int bf16, int cache, int dim) {
    const int group = s->num_heads / s->num_kv_heads;
    float qf[MAX_GROUP][MAX_HEAD_DIM], acc[MAX_GROUP][MAX_HEAD_DIM], row[MAX_HEAD_DIM];
    float stack_scores[STACK_SCORES];
    const int64_t need = (int64_t)group * (len > 0 ? len : 1);
    float *scores = need <= STACK_SCORES ? stack_scores : malloc(sizeof(float) * need);
    if (scores == NULL) return;
    const int64_t first_head = (int64_t)b * s->num_heads + (int64_t)kvh * group;
    for (int g = 0; g < group; g++) {
        load_row(q, (first_head + g) * dim, bf16, dim, qf[g]);
        for (int d = 0; d < dim; d++) { qf[g][d] *= s->scale; acc[g][d] = 0.0f; }
    }
    for (int64_t t = 0; t < len; t++) {
        load_kv_row(k_cache, s->k_scales, kv_offset(table, t, kvh, s, dim), bf16, cache, dim, row);
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
        load_kv_row(v_cache, s->v_scales, kv_offset(table, t, kvh, s, dim), bf16, cache, dim, row);
        for (int g = 0; g < group; g++) {
            const float p = scores[g * len + t];
            for (int d = 0; d < dim; d++) acc[g][d] += p * row[d];
        }
    }
    if (scores != stack_scores) free(scores);
    for (int g = 0; g < group; g++) store_row(out, (first_head + g) * dim, bf16, dim, acc[g], inv_sum[g]);
}

ALWAYS_INLINE void attend_portable(const void *q, const void *k_cache, const void *v_cache,
                                   const int64_t *table, int64_t len, void *out, int b, int kvh,
                                   const Shape *s, int bf16, int cache) {
    /* Common head sizes get their own copy with a constant trip count, which the compiler
     * unrolls and keeps in registers. */
    switch (s->head_dim) {
    case 64: attend_one(q, k_cache, v_cache, table, len, out, b, kvh, s, bf16, cache, 64); break;
    case 128: attend_one(q, k_cache, v_cache, table, len, out, b, kvh, s, bf16, cache, 128); break;
    default: attend_one(q, k_cache, v_cache, table, len, out, b, kvh, s, bf16, cache, s->head_dim);
    }
}

#if defined(__AVX512F__)
#include <immintrin.h>

#include "sums.h"

#define CHUNK 16         /* tokens per step: one score vector per query head */
#define PV_REGS 16       /* fp32 accumulators (vectors) per pass over a chunk's values */
#define NEG_BIG (-1e30f) /* "minus infinity" that stays finite under -ffast-math */
#define AHEAD 2          /* chunks prefetched ahead */
#define RING 4           /* row sets kept: the current chunk up to the one AHEAD (a power of 2) */

/* e^x, x <= 0, to about 1 ulp (Cephes expf polynomial); exactly 0 far below the fp32 range. */
ALWAYS_INLINE __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-100.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* acc + q.k over one vector's worth of dimensions (32 for bf16, 16 for fp32). */
ALWAYS_INLINE __m512 dot_step(__m512 acc, const void *q, const void *k, int j, int bf16) {
    if (bf16) {
        const __m512i qv = _mm512_loadu_si512((const uint16_t *)q + 32 * j);
        const __m512i kv = _mm512_loadu_si512((const uint16_t *)k + 32 * j);
#if defined(__AVX512BF16__)
        return _mm512_dpbf16_ps(acc, (__m512bh)qv, (__m512bh)kv);
#else
        const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
        acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(qv, 16)),
                              _mm512_castsi512_ps(_mm512_slli_epi32(kv, 16)), acc);
        return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(qv, high)),
                               _mm512_castsi512_ps(_mm512_and_si512(kv, high)), acc);
#endif
    }
    return _mm512_fmadd_ps(_mm512_loadu_ps((const float *)q + 16 * j),
                           _mm512_loadu_ps((const float *)k + 16 * j), acc);
}

/* 16 one-byte values (int8, or fp8 e4m3 as in e4m3_to_f32) from src on, widened to fp32. */
ALWAYS_INLINE __m512 load_bytes16(const void *src, int cache) {
    const __m128i bytes = _mm_loadu_si128((const __m128i *)src);
    if (cache == CACHE_INT8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
    const __m512i x = _mm512_cvtepu8_epi32(bytes);
    const __m512i magnitude = _mm512_and_si512(x, _mm512_set1_epi32(0x7f));
    const __m512 normal = _mm512_castsi512_ps(
        _mm512_add_epi32(_mm512_slli_epi32(magnitude, 20), _mm512_set1_epi32(120 << 23)));
    const __m512 subnormal = _mm512_mul_ps(_mm512_cvtepi32_ps(magnitude), _mm512_set1_ps(1.0f / 512.0f));
    const __m512 value = _mm512_mask_blend_ps(_mm512_cmplt_epi32_mask(magnitude, _mm512_set1_epi32(8)),
                                              normal, subnormal);
    const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(x, _mm512_set1_epi32(0x80)), 24);
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(value), sign));
}

/* q . k for a row of `vectors` vectors; one-byte keys meet an fp32 copy of q. */
ALWAYS_INLINE __m512 dot_row(const void *q, const void *k, int vectors, int bf16, int cache) {
    __m512 dot = _mm512_setzero_ps();
    for (int j = 0; j < vectors; j++)
        dot = cache ? _mm512_fmadd_ps(_mm512_loadu_ps((const float *)q + 16 * j),
                                      load_bytes16((const uint8_t *)k + 16 * j, cache), dot)
                    : dot_step(dot, q, k, j, bf16);
    return dot;
}

ALWAYS_INLINE const void *elem(const void *base, int64_t index, int esize) {
    return (const char *)base + index * esize;
}

/* Offsets (in elements) of the rows of tokens t0 .. t0+CHUNK-1 for KV head kvh; rows past the
 * context repeat the last real one, so that nothing unwritten is ever read. Returns the count of
 * real rows. */
ALWAYS_INLINE int chunk_rows(const int64_t *table, int64_t t0, int64_t len, int kvh, const Shape *s,
                             int dim, int contiguous, int64_t *rows) {
    const int n = len - t0 < CHUNK ? (int)(len - t0) : CHUNK;
    if (contiguous) { /* block_size is a multiple of CHUNK: the chunk's rows follow each other */
        const int64_t base = ((table[t0 / s->block_size] * s->num_kv_heads + kvh) * s->block_size
                              + t0 % s->block_size) * dim;
        for (int i = 0; i < CHUNK; i++) rows[i] = base + (i < n ? i : n - 1) * dim;
        return n;
    }
    int64_t j = t0 / s->block_size, off = t0 % s->block_size;
    for (int i = 0; i < n; i++) {
        rows[i] = ((table[j] * s->num_kv_heads + kvh) * s->block_size + off) * dim;
        if (++off == s->block_size) { off = 0; j++; }
    }
    for (int i = n; i < CHUNK; i++) rows[i] = rows[n - 1];
    return n;
}

ALWAYS_INLINE void prefetch_rows(const void *k_cache, const void *v_cache, const int64_t *rows, int n,
                                 int esize, int dim, int contiguous) {
    const int64_t bytes = (int64_t)dim * esize;
    const int count = contiguous ? 1 : n;
    const int64_t span = contiguous ? n * bytes : bytes;
    for (int i = 0; i < count; i++) {
        const char *k = (const char *)k_cache + rows[i] * esize, *v = (const char *)v_cache + rows[i] * esize;
        #pragma GCC unroll 4
        for (int64_t o = 0; o < span; o += 64) {
            _mm_prefetch(k + o, _MM_HINT_T1);
            _mm_prefetch(v + o, _MM_HINT_T1);
        }
    }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
/* AMX (bf16 tiles) computes a chunk's scores for all the query heads at once: C[token][head] =
 * K[token][:] . q[head][:], the keys loaded straight from the cache as a 16-row tile, the query
 * heads as tiles laid out once per task. Linux hands out the tile registers on request; where it
 * refuses, the AVX-512 dot products run instead. */
#define HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#define AMX_MAX_DIM 128 /* four B tiles (2-5), two A tiles (6, 7), C in tile 0 */

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) TileConfig;

static int amx_usable(void) {
    static int state = 0; /* 0 unknown, 1 yes, -1 no */
    if (state == 0) {
        const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
        state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : -1;
    }
    return state > 0;
}
/* Starts the scores of the 16 rows from k on (row stride D) for the query heads in tiles 2..:
 * they accumulate in tile 0 (tiles 6 and 7 take the keys) until amx_scores_store. Storing them
 * only when they are needed lets the tile unit work while the vector units do the rest. */
ALWAYS_INLINE void amx_scores_start(const uint16_t *k, int D) {
    const int KV = D / 32;
    _tile_zero(0);
    _tile_loadd(6, k, 2 * D);
    if (KV > 1) _tile_loadd(7, k + 32, 2 * D);
    _tile_dpbf16ps(0, 6, 2);
    if (KV > 1) _tile_dpbf16ps(0, 7, 3);
    if (KV > 2) { _tile_loadd(6, k + 64, 2 * D); _tile_dpbf16ps(0, 6, 4); }
    if (KV > 3) { _tile_loadd(7, k + 96, 2 * D); _tile_dpbf16ps(0, 7, 5); }
}

/* dst[token * G + head] */
ALWAYS_INLINE void amx_scores_store(float *dst, int G) { _tile_stored(0, dst, 4 * G); }
#else
#define HAVE_AMX 0
static int amx_usable(void) { return 0; }
#endif

/* One (sequence, KV head) task with G query heads of size D; constant G and D (after inlining)
 * let the compiler keep the accumulators in registers. D is a multiple of 32 for bf16, of 16 for
 * fp32 and int8. amx: the tiles may be used (bf16 only; needs chunks that do not straddle blocks).
 * bf16: q and out are bf16; cache: the cache's kind, CACHE_INT8 (with scales), CACHE_FP8 or 0 (q's dtype). */
ALWAYS_INLINE void attend_avx512(const void *q, const void *k_cache, const void *v_cache,
                                 const int64_t *table, int64_t len, void *out, int b, int kvh,
                                 const Shape *s, int bf16, int cache, int amx, const int G, const int D) {
    const int cache_bf16 = bf16 && !cache;
    const int esize = cache ? 1 : bf16 ? 2 : 4;      /* bytes per cache element */
    const int KV = cache_bf16 ? D / 32 : D / 16; /* vectors per K or V row, as stored */
    const int NACC = D / 16;                     /* fp32 accumulators per head */
    const int VT = PV_REGS / NACC > 0 ? PV_REGS / NACC : 1;
    const int contiguous = s->block_size % CHUNK == 0;
    const int64_t first_head = (int64_t)b * s->num_heads + (int64_t)kvh * G;
    const void *qg[MAX_GROUP];
    float q_f32[MAX_GROUP * MAX_HEAD_DIM] __attribute__((aligned(64))); /* one-byte keys meet fp32 queries */
    for (int g = 0; g < G; g++) {
        qg[g] = elem(q, (first_head + g) * D, bf16 ? 2 : 4);
        if (cache) {
            load_row(q, (first_head + g) * D, bf16, D, q_f32 + g * D);
            qg[g] = q_f32 + g * D;
        }
    }
    /* Accumulated sum of p * v per head, in fp32; for bf16 caches each 32-dimension slice holds
     * its even dimensions, then its odd ones (the order they come out of a bf16 vector). */
    float acc[MAX_GROUP * MAX_HEAD_DIM] __attribute__((aligned(64)));
    float p[MAX_GROUP][CHUNK] __attribute__((aligned(64)));
    float top[MAX_GROUP], alpha[MAX_GROUP];
    __m512 sums[MAX_GROUP];
    for (int g = 0; g < G; g++) {
        top[g] = NEG_BIG;
        sums[g] = _mm512_setzero_ps();
        for (int j = 0; j < NACC; j++) _mm512_store_ps(acc + g * D + 16 * j, _mm512_setzero_ps());
    }
#if HAVE_AMX
    amx = amx && bf16 && contiguous && D <= AMX_MAX_DIM;
    float tile_scores[CHUNK * MAX_GROUP] __attribute__((aligned(64)));
    const __m512i token_index = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(G));
    if (amx) {
        /* B tile j, row r, column n: the pair of query head n at dimensions 32j + 2r, 32j + 2r + 1. */
        uint32_t qt[AMX_MAX_DIM / 32][16][MAX_GROUP] __attribute__((aligned(64)));
        for (int g = 0; g < G; g++)
            for (int j = 0; j < KV; j++)
                for (int r = 0; r < 16; r++) qt[j][r][g] = ((const uint32_t *)qg[g])[16 * j + r];
        TileConfig config = {0};
        config.palette = 1;
        for (int t = 0; t < 8; t++) { config.rows[t] = 16; config.colsb[t] = (uint16_t)(4 * G); }
        config.colsb[6] = config.colsb[7] = 64;
        _tile_loadconfig(&config);
        _tile_loadd(2, qt[0], 4 * MAX_GROUP);
        if (KV > 1) _tile_loadd(3, qt[1], 4 * MAX_GROUP);
        if (KV > 2) _tile_loadd(4, qt[2], 4 * MAX_GROUP);
        if (KV > 3) _tile_loadd(5, qt[3], 4 * MAX_GROUP);
    }
#endif
    const __m512 scale = _mm512_set1_ps(s->scale);
    /* Chunk c's rows sit in rows[c % RING]. While chunk c is computed, chunk c + AHEAD is
     * prefetched and (with AMX) chunk c + 1's scores are already under way. */
    const int64_t chunks = (len + CHUNK - 1) / CHUNK;
    int64_t rows[RING][CHUNK];
    int count[RING];
    for (int c = 0; c < AHEAD && c < chunks; c++) {
        count[c] = chunk_rows(table, (int64_t)c * CHUNK, len, kvh, s, D, contiguous, rows[c]);
        prefetch_rows(k_cache, v_cache, rows[c], count[c], esize, D, contiguous);
    }
#if HAVE_AMX
    if (amx && chunks > 0) amx_scores_start((const uint16_t *)k_cache + rows[0][0], D);
#endif
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t *cur = rows[c % RING];
        const int n = count[c % RING];
        if (c + AHEAD < chunks) {
            int64_t *ahead = rows[(c + AHEAD) % RING];
            count[(c + AHEAD) % RING] = chunk_rows(table, (c + AHEAD) * CHUNK, len, kvh, s, D, contiguous, ahead);
            prefetch_rows(k_cache, v_cache, ahead, count[(c + AHEAD) % RING], esize, D, contiguous);
        }
        /* int8: each token's score and value carry its scale (a row's slot is its offset / D). */
        __m512 chunk_scale = scale;
        float v_scale[CHUNK];
        if (cache == CACHE_INT8) {
            float k_scale[CHUNK] __attribute__((aligned(64)));
            for (int i = 0; i < CHUNK; i++) {
                k_scale[i] = s->k_scales[cur[i] / D];
                v_scale[i] = s->v_scales[cur[i] / D];
            }
            chunk_scale = _mm512_mul_ps(scale, _mm512_load_ps(k_scale));
        }
        __m512 score[MAX_GROUP];
#if HAVE_AMX
        if (amx) {
            /* A tile's rows past the context stay inside the block; their scores are masked. */
            amx_scores_store(tile_scores, G);
            for (int g = 0; g < G; g++)
                score[g] = _mm512_i32gather_ps(_mm512_add_epi32(token_index, _mm512_set1_epi32(g)), tile_scores, 4);
            if (c + 1 < chunks) amx_scores_start((const uint16_t *)k_cache + rows[(c + 1) % RING][0], D);
        } else
#endif
        /* Scores of the chunk's 16 tokens, one query head at a time (the keys stay in L1). */
        for (int g = 0; g < G; g++) {
            __m512 x[4];
            for (int quad = 0; quad < 4; quad++) {
                const int64_t *r = cur + 4 * quad;
                x[quad] = sum4_lanes(dot_row(qg[g], elem(k_cache, r[0], esize), KV, cache_bf16, cache),
                                     dot_row(qg[g], elem(k_cache, r[1], esize), KV, cache_bf16, cache),
                                     dot_row(qg[g], elem(k_cache, r[2], esize), KV, cache_bf16, cache),
                                     dot_row(qg[g], elem(k_cache, r[3], esize), KV, cache_bf16, cache));
            }
            score[g] = sum16_finish(x[0], x[1], x[2], x[3]);
        }
        /* Online softmax: rescale what was accumulated when the running maximum grows. */
        const __mmask16 real = (__mmask16)((1u << n) - 1u);
        for (int g = 0; g < G; g++) {
            const __m512 sc = _mm512_mask_mul_ps(_mm512_set1_ps(NEG_BIG), real, score[g], chunk_scale);
            alpha[g] = 1.0f;
            if (_mm512_cmp_ps_mask(sc, _mm512_set1_ps(top[g]), _CMP_GT_OQ)) { /* a new maximum */
                const float m = _mm512_reduce_max_ps(sc);
                alpha[g] = expf(top[g] - m);
                top[g] = m;
            }
            const __m512 e = _mm512_maskz_mov_ps(real, exp512(_mm512_sub_ps(sc, _mm512_set1_ps(top[g]))));
            sums[g] = _mm512_fmadd_ps(sums[g], _mm512_set1_ps(alpha[g]), e);
            _mm512_store_ps(p[g], e);
        }
        /* acc = alpha * acc + sum over the chunk of p * v, up to PV_REGS accumulators at a time. */
        for (int g0 = 0; g0 < G; g0 += VT) {
            const int gn = G - g0 < VT ? G - g0 : VT;
            __m512 a[PV_REGS];
            for (int h = 0; h < gn; h++)
                for (int j = 0; j < NACC; j++)
                    a[h * NACC + j] = _mm512_mul_ps(_mm512_load_ps(acc + (g0 + h) * D + 16 * j),
                                                    _mm512_set1_ps(alpha[g0 + h]));
            for (int i = 0; i < n; i++) {
                const void *row = elem(v_cache, cur[i], esize);
                __m512 w[PV_REGS];
                for (int h = 0; h < gn; h++) w[h] = _mm512_set1_ps(cache == CACHE_INT8 ? p[g0 + h][i] * v_scale[i] : p[g0 + h][i]);
                for (int j = 0; j < KV; j++) {
                    if (cache_bf16) {
                        const __m512i raw = _mm512_loadu_si512((const uint16_t *)row + 32 * j);
                        const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
                        const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32((int)0xffff0000u)));
                        for (int h = 0; h < gn; h++) {
                            a[h * NACC + 2 * j] = _mm512_fmadd_ps(w[h], even, a[h * NACC + 2 * j]);
                            a[h * NACC + 2 * j + 1] = _mm512_fmadd_ps(w[h], odd, a[h * NACC + 2 * j + 1]);
                        }
                    } else {
                        const __m512 x = cache ? load_bytes16((const uint8_t *)row + 16 * j, cache)
                                            : _mm512_loadu_ps((const float *)row + 16 * j);
                        for (int h = 0; h < gn; h++) a[h * NACC + j] = _mm512_fmadd_ps(w[h], x, a[h * NACC + j]);
                    }
                }
            }
            for (int h = 0; h < gn; h++)
                for (int j = 0; j < NACC; j++) _mm512_store_ps(acc + (g0 + h) * D + 16 * j, a[h * NACC + j]);
        }
    }
#if HAVE_AMX
    if (amx) _tile_release();
#endif
    for (int g = 0; g < G; g++) {
        const float total = _mm512_reduce_add_ps(sums[g]);
        const __m512 inv = _mm512_set1_ps(total > 0.0f ? 1.0f / total : 0.0f);
        const float *a = acc + g * D;
        if (cache && bf16) { /* dimensions in order: round to nearest even, keep the high halves */
            uint16_t *dst = (uint16_t *)out + (first_head + g) * D;
            const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
            for (int j = 0; j < NACC; j++) {
                __m512i x = _mm512_castps_si512(_mm512_mul_ps(_mm512_load_ps(a + 16 * j), inv));
                x = _mm512_add_epi32(_mm512_add_epi32(x, bias), _mm512_and_si512(_mm512_srli_epi32(x, 16), one));
                _mm256_storeu_si256((__m256i *)(dst + 16 * j), _mm512_cvtepi32_epi16(_mm512_srli_epi32(x, 16)));
            }
        } else if (bf16) {
            uint16_t *dst = (uint16_t *)out + (first_head + g) * D;
            const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
            for (int j = 0; j < KV; j++) { /* round to nearest even, then interleave even and odd */
                __m512i even = _mm512_castps_si512(_mm512_mul_ps(_mm512_load_ps(a + 32 * j), inv));
                __m512i odd = _mm512_castps_si512(_mm512_mul_ps(_mm512_load_ps(a + 32 * j + 16), inv));
                even = _mm512_add_epi32(_mm512_add_epi32(even, bias), _mm512_and_si512(_mm512_srli_epi32(even, 16), one));
                odd = _mm512_add_epi32(_mm512_add_epi32(odd, bias), _mm512_and_si512(_mm512_srli_epi32(odd, 16), one));
                _mm512_storeu_si512(dst + 32 * j, _mm512_or_si512(_mm512_srli_epi32(even, 16),
                                    _mm512_and_si512(odd, _mm512_set1_epi32((int)0xffff0000u))));
            }
        } else {
            float *dst = (float *)out + (first_head + g) * D;
            for (int j = 0; j < NACC; j++) _mm512_storeu_ps(dst + 16 * j, _mm512_mul_ps(_mm512_load_ps(a + 16 * j), inv));
        }
    }
}

typedef void (*AttendFn)(const void *q, const void *k_cache, const void *v_cache, const int64_t *table,
                         int64_t len, void *out, int b, int kvh, const Shape *s, int amx);

/* One compiled copy per (query dtype, cache dtype) and (group, head size) for the common sizes,
 * G = D = 0 standing for the generic copy that reads them from the shape. */
#define DEFINE_ATTEND(BF16, CACHE, G, D)                                                               \
    static void attend_##BF16##CACHE##_##G##_##D(const void *q, const void *k_cache, const void *v_cache, \
                                              const int64_t *table, int64_t len, void *out, int b,  \
                                              int kvh, const Shape *s, int amx) {                   \
        attend_avx512(q, k_cache, v_cache, table, len, out, b, kvh, s, BF16, CACHE, amx,              \
                      G ? G : s->num_heads / s->num_kv_heads, D ? D : s->head_dim);                \
    }
#define DEFINE_ATTEND_GROUPS(BF16, CACHE, D)                                                           \
    DEFINE_ATTEND(BF16, CACHE, 1, D) DEFINE_ATTEND(BF16, CACHE, 2, D) DEFINE_ATTEND(BF16, CACHE, 3, D)       \
    DEFINE_ATTEND(BF16, CACHE, 4, D) DEFINE_ATTEND(BF16, CACHE, 5, D) DEFINE_ATTEND(BF16, CACHE, 6, D)       \
    DEFINE_ATTEND(BF16, CACHE, 7, D) DEFINE_ATTEND(BF16, CACHE, 8, D)
#define DEFINE_ATTEND_ALL(BF16, CACHE)                                                                 \
    DEFINE_ATTEND_GROUPS(BF16, CACHE, 64) DEFINE_ATTEND_GROUPS(BF16, CACHE, 128) DEFINE_ATTEND(BF16, CACHE, 0, 0)
DEFINE_ATTEND_ALL(0, 0) DEFINE_ATTEND_ALL(1, 0) DEFINE_ATTEND_ALL(0, 1) DEFINE_ATTEND_ALL(1, 1)
DEFINE_ATTEND_ALL(0, 2) DEFINE_ATTEND_ALL(1, 2)

#define GROUP_TABLE(BF16, CACHE, D)                                                                    \
    { attend_##BF16##CACHE##_1_##D, attend_##BF16##CACHE##_2_##D, attend_##BF16##CACHE##_3_##D,              \
      attend_##BF16##CACHE##_4_##D, attend_##BF16##CACHE##_5_##D, attend_##BF16##CACHE##_6_##D,              \
      attend_##BF16##CACHE##_7_##D, attend_##BF16##CACHE##_8_##D }
#define TYPE_TABLES(BF16, CACHE) {GROUP_TABLE(BF16, CACHE, 64), GROUP_TABLE(BF16, CACHE, 128)}

/* The vector-path copy for this shape, or NULL where it does not apply (head size not a multiple
 * of the vector). */
static AttendFn pick_attend(const Shape *s, int bf16, int cache) {
    static const AttendFn by_group[2][3][2][8] = {{TYPE_TABLES(0, 0), TYPE_TABLES(0, 1), TYPE_TABLES(0, 2)},
                                                  {TYPE_TABLES(1, 0), TYPE_TABLES(1, 1), TYPE_TABLES(1, 2)}};
    static const AttendFn generic[2][3] = {{attend_00_0_0, attend_01_0_0, attend_02_0_0},
                                           {attend_10_0_0, attend_11_0_0, attend_12_0_0}};
    const int G = s->num_heads / s->num_kv_heads, D = s->head_dim;
    if (D % (bf16 && !cache ? 32 : 16) != 0 || D > MAX_HEAD_DIM || G > MAX_GROUP || G < 1) return NULL;
    if ((D == 64 || D == 128) && G <= 8) return by_group[bf16][cache][D == 128][G - 1];
    return generic[bf16][cache];
}
#endif

ALWAYS_INLINE void paged_decode(const void *q, const void *k_cache, const void *v_cache,
                                const int64_t *block_tables, const int64_t *context_lens, void *out,
                                int batch, const Shape *s, int num_threads, int bf16, int cache) {
#if defined(__AVX512F__)
    const AttendFn vector_path = pick_attend(s, bf16, cache);
    const int amx = bf16 && !cache && vector_path != NULL && amx_usable();
#endif
    #pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(num_threads)
    for (int b = 0; b < batch; b++) {
        for (int kvh = 0; kvh < s->num_kv_heads; kvh++) {
            const int64_t *table = block_tables + (int64_t)b * s->max_blocks;
#if defined(__AVX512F__)
            if (vector_path != NULL) {
                vector_path(q, k_cache, v_cache, table, context_lens[b], out, b, kvh, s, amx);
                continue;
            }
#endif
            attend_portable(q, k_cache, v_cache, table, context_lens[b], out, b, kvh, s, bf16, cache);
        }
    }
}

/* q and out in fp32 or bf16 (BF16); the cache in q's dtype, int8 with scales or fp8 (CACHE). */
#define EXPORT(NAME, BF16, CACHE)                                                                      \
    void NAME(const void *q, const void *k_cache, const void *v_cache, const float *k_scales,      \
              const float *v_scales, const int64_t *block_tables, const int64_t *context_lens,      \
              void *out, int batch, int num_heads, int num_kv_heads, int head_dim, int block_size,  \
              int max_blocks, float scale, int num_threads) {                                       \
        const Shape s = {num_heads, num_kv_heads, head_dim, block_size, max_blocks, scale,          \
                         k_scales, v_scales};                                                       \
        paged_decode(q, k_cache, v_cache, block_tables, context_lens, out, batch, &s, num_threads,  \
                     BF16, CACHE);                                                                     \
    }

EXPORT(paged_decode_f32, 0, 0)
EXPORT(paged_decode_bf16, 1, 0)
EXPORT(paged_decode_int8_f32, 0, 1)
EXPORT(paged_decode_int8_bf16, 1, 1)
EXPORT(paged_decode_fp8_f32, 0, 2)
EXPORT(paged_decode_fp8_bf16, 1, 2)

void paged_decode_limits(int *max_group, int *max_head_dim) {
    *max_group = MAX_GROUP;
    *max_head_dim = MAX_HEAD_DIM;
}
