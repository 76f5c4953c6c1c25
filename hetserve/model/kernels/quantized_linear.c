/* Weight-only quantized linear layers on the CPU: y = x W^T (+ bias), x and y bf16 [M, K] / [M, N],
 * W int4 (groups of 32 along K, each weight value * scale + min with value in [0, 15], as GGUF's
 * Q4_1) or int8 (one scale per row), bias bf16 [N] or NULL.
 *
 * Up to 6 rows of x (a decode step of a few sequences), as in llama.cpp's Q4_1 x Q8_1 dot products:
 * each row of x is first rounded to int8 in blocks of 32 with one fp32 scale per block. A block's 32
 * products are then summed exactly in int32 by VPDPBUSD (64 unsigned-by-signed byte products per
 * instruction), and scaled in fp32. A decode step reads each weight once, in 0.625 bytes (int4 with
 * its scales) or 1 (int8) instead of bf16's 2.
 *
 * From DEQUANTIZED_MIN_ROWS rows the byte products are compute-bound, and W is dequantized a tile at
 * a time into L1 for linear.c's bf16 dot products (dequantized_tiles). On SmolLM2's 120 layer
 * linears in turn (2 threads of an AMD EPYC) that takes 0.95x the byte products' time at 7-8 rows,
 * 0.8-0.9x at 9-16 and 0.65x at 32, about as much as bf16 weights' tiles at 7-256, and 0.65-0.9x
 * oneDNN's time on the whole dequantized matrix at 64-256.
 *
 * In either path each output is the same fixed-order sum whatever the other rows of x: a token's
 * result does not depend on the rows beside it (though the two paths differ in rounding).
 *
 * Layout (written by to_chunk_order and pack_int4_chunks in hetserve.model.cpu_kernels). K is a
 * multiple of 64, taken in chunks of 64 = two blocks. In a chunk, 32-bit lane L of a 512-bit vector
 * holds elements 4 (L / 2) .. 4 (L / 2) + 3 of block L % 2: the blocks' lanes alternate, so a
 * broadcast pair of per-block scales scales every lane by its own block's.
 *   int4: uint8 [N, K / 2], a chunk's 32 bytes holding its positions p (low nibble) and p + 32 (high
 *         nibble); fp16 scales and mins [N, K / 32].
 *   int8: uint8 [N, K], each weight + 128 (VPDPBUSD's unsigned operand), in chunk order; fp32 scales [N].
 *
 * Built only with AVX512-VNNI (-march=native on a CPU that has it); elsewhere
 * quantized_linear_available returns 0 and the caller keeps PyTorch's kernels. Without AVX512_BF16
 * the byte products take every row count.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define BLOCK 32
#define CHUNK 64
/* Rows of x per pass over a tile of W: their int8 copies and the tile stay in L1. */
#define ROW_GROUP 8
/* Rows of W per parallel task. */
#define TILE_ROWS 16
/* W is prefetched this far ahead, into L2 (as in linear.c). */
#define PREFETCH_BYTES 16384
/* From this many rows of x, dequantized_tiles (where the CPU has bf16 dot products). */
#define DEQUANTIZED_MIN_ROWS 7
/* Below this many elements of x its quantization runs on one thread. */
#define PARALLEL_MIN_ELEMENTS 65536
#define UNROLL _Pragma("GCC unroll 16")

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#include <immintrin.h>

typedef struct {
    int8_t *values;  /* [M, K], chunk order */
    float *scales;   /* [M, K / 32] */
    float *sums;     /* [M, K / 32]: scale * sum of the block's values */
    float *totals;   /* [M]: sum of `sums` */
} QuantizedRows;

ALWAYS_INLINE __m512 load_bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* One block of 32 to int8 (round to nearest): its 8 dwords, scale and scaled sum. */
ALWAYS_INLINE __m256i quantize_block(const uint16_t *x, float *scale, float *sum) {
    __m512 lo = load_bf16x16(x), hi = load_bf16x16(x + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    float d = amax / 127.0f, inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
    __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, _mm512_set1_ps(inverse)));
    __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, _mm512_set1_ps(inverse)));
    *scale = d;
    *sum = d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
    return _mm256_set_m128i(_mm512_cvtsepi32_epi8(qhi), _mm512_cvtsepi32_epi8(qlo));
}

static void quantize_rows(const uint16_t *x, int M, int K, QuantizedRows q, int num_threads) {
    const int blocks = K / BLOCK;
    /* Dword j of block 0 goes to lane 2 j, of block 1 to lane 2 j + 1. */
    const __m512i interleave = _mm512_set_epi32(15, 7, 14, 6, 13, 5, 12, 4, 11, 3, 10, 2, 9, 1, 8, 0);
    int threads = (int64_t)M * K >= PARALLEL_MIN_ELEMENTS ? num_threads : 1;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int m = 0; m < M; m++) {
        float total = 0.0f;
        for (int c = 0; c < K / CHUNK; c++) {
            int b = 2 * c;
            float *scales = q.scales + (int64_t)m * blocks, *sums = q.sums + (int64_t)m * blocks;
            __m256i first = quantize_block(x + (int64_t)m * K + c * CHUNK, scales + b, sums + b);
            __m256i second = quantize_block(x + (int64_t)m * K + c * CHUNK + BLOCK, scales + b + 1, sums + b + 1);
            __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(first), second, 1);
            _mm512_storeu_si512(q.values + (int64_t)m * K + c * CHUNK, _mm512_permutexvar_epi32(interleave, both));
            total += sums[b] + sums[b + 1];
        }
        q.totals[m] = total;
    }
}

/* The two blocks' values of x chunk c times their scales, lane by lane. */
ALWAYS_INLINE __m512 chunk_scales(const float *scales, int c) {
    double pair;
    memcpy(&pair, scales + 2 * c, sizeof pair);
    return _mm512_castpd_ps(_mm512_set1_pd(pair));
}

ALWAYS_INLINE __m512 dot_chunk(__m512i w, __m512i x) {
    return _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x));
}

ALWAYS_INLINE void store(uint16_t *y, const uint16_t *bias, int N, int m, int n, float value) {
    y[(int64_t)m * N + n] = f32_to_bf16(value + (bias ? bf16_to_f32(bias[n]) : 0.0f));
}

/* A chunk's 64 int4 values, from its 32 packed bytes, one per byte in chunk order. */
ALWAYS_INLINE __m512i unpack_int4_chunk(const uint8_t *packed_chunk) {
    __m256i packed = _mm256_loadu_si256((const __m256i *)packed_chunk);
    return _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(packed), _mm256_srli_epi16(packed, 4), 1),
                            _mm512_set1_epi8(0x0f));
}

/* R rows of int4 W from row n against M (<= ROW_GROUP) rows of quantized x: R * M accumulators. */
ALWAYS_INLINE void int4_rows(QuantizedRows x, const uint8_t *w, const uint16_t *scales, const uint16_t *mins,
                             const uint16_t *bias, uint16_t *y, int M, int R, int N, int K, int n) {
    const int blocks = K / BLOCK;
    __m512 acc[16];
    UNROLL for (int i = 0; i < R * M; i++) acc[i] = _mm512_setzero_ps();
    for (int c = 0; c < K / CHUNK; c++) {
        __m512i wv[4];
        __m512 sv[4];
        UNROLL for (int r = 0; r < R; r++) {
            const uint8_t *row = w + (int64_t)(n + r) * (K / 2) + c * (CHUNK / 2);
            wv[r] = unpack_int4_chunk(row);
            _mm_prefetch((const char *)(row + PREFETCH_BYTES), _MM_HINT_T1);
            uint32_t pair;
            memcpy(&pair, scales + (int64_t)(n + r) * blocks + 2 * c, sizeof pair);
            sv[r] = _mm512_cvtph_ps(_mm256_set1_epi32((int)pair));
        }
        UNROLL for (int m = 0; m < M; m++) {
            __m512i xv = _mm512_loadu_si512(x.values + (int64_t)m * K + c * CHUNK);
            __m512 dv = chunk_scales(x.scales + (int64_t)m * blocks, c);
            UNROLL for (int r = 0; r < R; r++)
                acc[r * M + m] = _mm512_fmadd_ps(dot_chunk(wv[r], xv), _mm512_mul_ps(sv[r], dv), acc[r * M + m]);
        }
    }
    /* The mins' share: sum over blocks of min * (x's scaled block sum), 16 blocks at a time. */
    for (int b = 0; b < blocks; b += 16) {
        __mmask16 mask = blocks - b >= 16 ? 0xffff : (__mmask16)((1u << (blocks - b)) - 1);
        UNROLL for (int r = 0; r < R; r++) {
            __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, mins + (int64_t)(n + r) * blocks + b));
            UNROLL for (int m = 0; m < M; m++)
                acc[r * M + m] = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(mask, x.sums + (int64_t)m * blocks + b),
                                                 acc[r * M + m]);
        }
    }
    UNROLL for (int r = 0; r < R; r++)
        UNROLL for (int m = 0; m < M; m++) store(y, bias, N, m, n + r, _mm512_reduce_add_ps(acc[r * M + m]));
}

/* R rows of int8 W (stored + 128) from row n against M rows of quantized x. */
ALWAYS_INLINE void int8_rows(QuantizedRows x, const uint8_t *w, const float *scales, const uint16_t *bias,
                             uint16_t *y, int M, int R, int N, int K, int n) {
    const int blocks = K / BLOCK;
    __m512 acc[16];
    UNROLL for (int i = 0; i < R * M; i++) acc[i] = _mm512_setzero_ps();
    for (int c = 0; c < K / CHUNK; c++) {
        __m512i wv[4];
        UNROLL for (int r = 0; r < R; r++) {
            const uint8_t *row = w + (int64_t)(n + r) * K + c * CHUNK;
            wv[r] = _mm512_loadu_si512(row);
            _mm_prefetch((const char *)(row + PREFETCH_BYTES), _MM_HINT_T1);
        }
        UNROLL for (int m = 0; m < M; m++) {
            __m512i xv = _mm512_loadu_si512(x.values + (int64_t)m * K + c * CHUNK);
            __m512 dv = chunk_scales(x.scales + (int64_t)m * blocks, c);
            UNROLL for (int r = 0; r < R; r++) acc[r * M + m] = _mm512_fmadd_ps(dot_chunk(wv[r], xv), dv, acc[r * M + m]);
        }
    }
    /* The + 128 added 128 times x's sum to each dot product. */
    UNROLL for (int r = 0; r < R; r++)
        UNROLL for (int m = 0; m < M; m++)
            store(y, bias, N, m, n + r, scales[n + r] * (_mm512_reduce_add_ps(acc[r * M + m]) - 128.0f * x.totals[m]));
}

/* Rows of W per step for M rows of x: at most 16 accumulators. */
#define ROWS_PER_STEP(M) ((M) <= 4 ? 4 : 2)

typedef struct {
    int bits;
    const uint8_t *w;
    const void *scales;
    const uint16_t *mins;
    const uint16_t *bias;
} Weights;

/* W's rows [n, end) against M rows of x, in steps of R rows, then single rows. */
ALWAYS_INLINE void tile_m(QuantizedRows x, Weights w, uint16_t *y, int M, int N, int K, int n, int end) {
    const int R = ROWS_PER_STEP(M);
    for (; n + R <= end; n += R) {
        if (w.bits == 4) int4_rows(x, w.w, w.scales, w.mins, w.bias, y, M, R, N, K, n);
        else int8_rows(x, w.w, w.scales, w.bias, y, M, R, N, K, n);
    }
    for (; n < end; n++) {
        if (w.bits == 4) int4_rows(x, w.w, w.scales, w.mins, w.bias, y, M, 1, N, K, n);
        else int8_rows(x, w.w, w.scales, w.bias, y, M, 1, N, K, n);
    }
}

static void tile(QuantizedRows x, Weights w, uint16_t *y, int M, int N, int K, int n, int end) {
    /* One copy per M, so that the loops over M and R unroll and the accumulators live in registers. */
    switch (M) {
#define CASE(m) case m: tile_m(x, w, y, m, N, K, n, end); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
    }
}

static void quantized_linear(const uint16_t *x, Weights w, uint16_t *y, int M, int N, int K, int num_threads) {
    const int blocks = K / BLOCK;
    QuantizedRows q;
    q.values = malloc((size_t)M * K);
    q.scales = malloc(sizeof(float) * ((size_t)2 * M * blocks + M));
    q.sums = q.scales + (size_t)M * blocks;
    q.totals = q.sums + (size_t)M * blocks;
    quantize_rows(x, M, K, q, num_threads);
    const int tiles = (N + TILE_ROWS - 1) / TILE_ROWS;
    #pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int t = 0; t < tiles; t++) {
        int end = (t + 1) * TILE_ROWS < N ? (t + 1) * TILE_ROWS : N;
        for (int m = 0; m < M; m += ROW_GROUP) {
            QuantizedRows group = {q.values + (int64_t)m * K, q.scales + (int64_t)m * blocks,
                                   q.sums + (int64_t)m * blocks, q.totals + m};
            tile(group, w, y + (int64_t)m * N, M - m < ROW_GROUP ? M - m : ROW_GROUP, N, K, t * TILE_ROWS, end);
        }
    }
    free(q.values);
    free(q.scales);
}

/* Rounded to bf16 (nearest even), 16 at a time. */
ALWAYS_INLINE void store_bf16x16(uint16_t *out, __m512 f) {
    __m512i u = _mm512_castps_si512(f);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    _mm256_storeu_si256((__m256i *)out, _mm512_cvtepi32_epi16(u));
}

/* A chunk's 64 bytes from chunk order back to element order. */
ALWAYS_INLINE __m512i element_order(__m512i chunk) {
    return _mm512_permutexvar_epi32(_mm512_set_epi32(15, 13, 11, 9, 7, 5, 3, 1, 14, 12, 10, 8, 6, 4, 2, 0), chunk);
}

ALWAYS_INLINE __m512 bytes_to_f32(__m512i bytes, int i) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(bytes, i)));
}

/* Row n of W as bf16 in element order, into out [K]: each weight's value times its scale (plus its
 * block's minimum, for int4) in fp32, rounded once. */
static inline void dequantize_row(Weights w, uint16_t *out, int n, int K) {
    const int blocks = K / BLOCK;
    for (int c = 0; c < K / CHUNK; c++) {
        const uint8_t *chunk = w.w + (int64_t)n * K * w.bits / 8 + c * CHUNK * w.bits / 8;
        _mm_prefetch((const char *)(chunk + PREFETCH_BYTES), _MM_HINT_T1);
        if (w.bits == 4) {
            __m512i values = element_order(unpack_int4_chunk(chunk));
            const uint16_t *scales = (const uint16_t *)w.scales + (int64_t)n * blocks + 2 * c;
            const uint16_t *mins = w.mins + (int64_t)n * blocks + 2 * c;
            UNROLL for (int i = 0; i < 4; i++) {
                __m512 scale = _mm512_set1_ps(_cvtsh_ss(scales[i / 2])), min = _mm512_set1_ps(_cvtsh_ss(mins[i / 2]));
                store_bf16x16(out + c * CHUNK + 16 * i, _mm512_fmadd_ps(bytes_to_f32(values, i), scale, min));
            }
        } else {
            const float scale = ((const float *)w.scales)[n];
            __m512i values = element_order(_mm512_loadu_si512(chunk));
            UNROLL for (int i = 0; i < 4; i++)
                store_bf16x16(out + c * CHUNK + 16 * i, _mm512_fmadd_ps(bytes_to_f32(values, i), _mm512_set1_ps(scale),
                                                                       _mm512_set1_ps(-128.0f * scale)));
        }
    }
}

/* W as bf16 [N, K] in element order, for products of many rows, which oneDNN's bf16 kernels do faster
 * than byte dot products with their per-block scaling. */
static void dequantize(Weights w, uint16_t *out, int N, int K, int num_threads) {
    #pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int n = 0; n < N; n++) dequantize_row(w, out + (int64_t)n * K, n, K);
}

#if defined(__AVX512BF16__)
/* From linear.c, linked into the same library. */
int linear_tile_rows(int K);
void linear_tile_bf16(const uint16_t *x, const uint16_t *wt, const uint16_t *bias, uint16_t *y,
                      int M, int N, int K, int start, int end, int ahead);

/* Row n of int4 W as bf16, kept in chunk order. A block's weights take only 16 values (value * scale +
 * minimum, rounded once to bf16), so a chunk's two blocks make a 32-entry table, and one word
 * permutation looks up 32 weights at once. */
ALWAYS_INLINE void int4_row_to_bf16(Weights w, uint16_t *out, int n, int K) {
    const int blocks = K / BLOCK;
    const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    /* Word j of either half of a chunk is of block (j / 4) % 2, whose entries start at 16. */
    const __m512i second_block = _mm512_set_epi64(0x0010001000100010, 0, 0x0010001000100010, 0,
                                                  0x0010001000100010, 0, 0x0010001000100010, 0);
    const uint16_t *scales = (const uint16_t *)w.scales + (int64_t)n * blocks, *mins = w.mins + (int64_t)n * blocks;
    for (int c = 0; c < K / CHUNK; c++) {
        const uint8_t *chunk = w.w + (int64_t)n * (K / 2) + c * (CHUNK / 2);
        _mm_prefetch((const char *)(chunk + PREFETCH_BYTES), _MM_HINT_T1);
        uint32_t scale_pair, min_pair;
        memcpy(&scale_pair, scales + 2 * c, sizeof scale_pair);
        memcpy(&min_pair, mins + 2 * c, sizeof min_pair);
        const __m128 s = _mm_cvtph_ps(_mm_cvtsi32_si128((int)scale_pair));
        const __m128 m = _mm_cvtph_ps(_mm_cvtsi32_si128((int)min_pair));
        const __m512 first = _mm512_fmadd_ps(iota, _mm512_broadcastss_ps(s), _mm512_broadcastss_ps(m));
        const __m512 second = _mm512_fmadd_ps(iota, _mm512_broadcastss_ps(_mm_movehdup_ps(s)),
                                              _mm512_broadcastss_ps(_mm_movehdup_ps(m)));
        const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(second, first);
        const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)chunk));
        const __m512i low = _mm512_or_si512(_mm512_and_si512(bytes, _mm512_set1_epi16(0x0f)), second_block);
        const __m512i high = _mm512_or_si512(_mm512_srli_epi16(bytes, 4), second_block);
        _mm512_storeu_si512(out + c * CHUNK, _mm512_permutexvar_epi16(low, table));
        _mm512_storeu_si512(out + c * CHUNK + 32, _mm512_permutexvar_epi16(high, table));
    }
}

/* A row of x [K] bf16 with each chunk of 64 columns in the weights' chunk order (as quantize_rows
 * orders its int8 copy): the same permutation on both sides of a dot product. */
ALWAYS_INLINE void bf16_chunk_order(const uint16_t *x, uint16_t *out, int K) {
    /* Chunk position p holds element 32 ((p / 4) % 2) + 4 (p / 8) + p % 4. */
    uint16_t order[64];
    for (int p = 0; p < 64; p++) order[p] = (uint16_t)(32 * ((p / 4) % 2) + 4 * (p / 8) + p % 4);
    const __m512i first = _mm512_loadu_si512(order), second = _mm512_loadu_si512(order + 32);
    for (int i = 0; i < K; i += CHUNK) {
        const __m512i a = _mm512_loadu_si512(x + i), b = _mm512_loadu_si512(x + i + 32);
        _mm512_storeu_si512(out + i, _mm512_permutex2var_epi16(a, first, b));
        _mm512_storeu_si512(out + i + 32, _mm512_permutex2var_epi16(a, second, b));
    }
}

/* Row n of int8 W as bf16, kept in chunk order: (value - 128) * the row's scale, rounded once. */
ALWAYS_INLINE void int8_row_to_bf16(Weights w, uint16_t *out, int n, int K) {
    const float scale = ((const float *)w.scales)[n];
    const __m512 scales = _mm512_set1_ps(scale), offsets = _mm512_set1_ps(-128.0f * scale);
    for (int c = 0; c < K / CHUNK; c++) {
        const uint8_t *chunk = w.w + (int64_t)n * K + c * CHUNK;
        _mm_prefetch((const char *)(chunk + PREFETCH_BYTES), _MM_HINT_T1);
        const __m512i bytes = _mm512_loadu_si512(chunk);
        UNROLL for (int i = 0; i < 2; i++) {
            const __m512 first = _mm512_fmadd_ps(bytes_to_f32(bytes, 2 * i), scales, offsets);
            const __m512 second = _mm512_fmadd_ps(bytes_to_f32(bytes, 2 * i + 1), scales, offsets);
            _mm512_storeu_si512(out + c * CHUNK + 32 * i, (__m512i)_mm512_cvtne2ps_pbh(second, first));
        }
    }
}

/* From DEQUANTIZED_MIN_ROWS rows of x the byte dot products are compute-bound: per block of 32, a
 * row of x costs an integer product, a conversion and one or two fp32 multiplies. Here each thread
 * turns a tile of W into bf16 in L1 once, and then every row of x meets it in bf16 dot products, as
 * linear.c's bf16 tiles do (one instruction per 32 products), while W still crosses memory in its
 * 0.625 or 1 byte a weight. */
static void dequantized_tiles(const uint16_t *x, Weights w, uint16_t *y, int M, int N, int K, int num_threads) {
    const int tile = linear_tile_rows(K), tiles = (N + tile - 1) / tile;
    uint16_t *ordered = malloc(sizeof(uint16_t) * M * K);
    #pragma omp parallel num_threads(num_threads)
    {
        #pragma omp for schedule(static)
        for (int m = 0; m < M; m++) bf16_chunk_order(x + (int64_t)m * K, ordered + (int64_t)m * K, K);
        uint16_t *dense = aligned_alloc(64, sizeof(uint16_t) * tile * K);
        #pragma omp for schedule(static)
        for (int t = 0; t < tiles; t++) {
            const int start = t * tile, end = start + tile < N ? start + tile : N;
            for (int n = start; n < end; n++) {
                if (w.bits == 4) int4_row_to_bf16(w, dense + (int64_t)(n - start) * K, n, K);
                else int8_row_to_bf16(w, dense + (int64_t)(n - start) * K, n, K);
            }
            linear_tile_bf16(ordered, dense, w.bias, y, M, N, K, start, end, 0);
        }
        free(dense);
    }
    free(ordered);
}
#endif

static void byte_linear(const uint16_t *x, Weights w, uint16_t *y, int M, int N, int K, int num_threads) {
#if defined(__AVX512BF16__)
    if (M >= DEQUANTIZED_MIN_ROWS) {
        dequantized_tiles(x, w, y, M, N, K, num_threads);
        return;
    }
#endif
    quantized_linear(x, w, y, M, N, K, num_threads);
}

int quantized_linear_available(void) { return 1; }

void int4_dequantize_bf16(const uint8_t *w, const uint16_t *scales, const uint16_t *mins, uint16_t *out,
                          int N, int K, int num_threads) {
    Weights weights = {4, w, scales, mins, NULL};
    dequantize(weights, out, N, K, num_threads);
}

void int8_dequantize_bf16(const uint8_t *w, const float *scales, uint16_t *out, int N, int K, int num_threads) {
    Weights weights = {8, w, scales, NULL, NULL};
    dequantize(weights, out, N, K, num_threads);
}

void int4_linear_bf16(const uint16_t *x, const uint8_t *w, const uint16_t *scales, const uint16_t *mins,
                      const uint16_t *bias, uint16_t *y, int M, int N, int K, int num_threads) {
    Weights weights = {4, w, scales, mins, bias};
    byte_linear(x, weights, y, M, N, K, num_threads);
}

void int8_linear_bf16(const uint16_t *x, const uint8_t *w, const float *scales, const uint16_t *bias,
                      uint16_t *y, int M, int N, int K, int num_threads) {
    Weights weights = {8, w, scales, NULL, bias};
    byte_linear(x, weights, y, M, N, K, num_threads);
}

#else

int quantized_linear_available(void) { return 0; }

void int4_dequantize_bf16(const uint8_t *w, const uint16_t *scales, const uint16_t *mins, uint16_t *out,
                          int N, int K, int num_threads) {
    (void)w; (void)scales; (void)mins; (void)out; (void)N; (void)K; (void)num_threads;
}

void int8_dequantize_bf16(const uint8_t *w, const float *scales, uint16_t *out, int N, int K, int num_threads) {
    (void)w; (void)scales; (void)out; (void)N; (void)K; (void)num_threads;
}

void int4_linear_bf16(const uint16_t *x, const uint8_t *w, const uint16_t *scales, const uint16_t *mins,
                      const uint16_t *bias, uint16_t *y, int M, int N, int K, int num_threads) {
    (void)x; (void)w; (void)scales; (void)mins; (void)bias; (void)y; (void)M; (void)N; (void)K; (void)num_threads;
}

void int8_linear_bf16(const uint16_t *x, const uint8_t *w, const float *scales, const uint16_t *bias,
                      uint16_t *y, int M, int N, int K, int num_threads) {
    (void)x; (void)w; (void)scales; (void)bias; (void)y; (void)M; (void)N; (void)K; (void)num_threads;
}

#endif
