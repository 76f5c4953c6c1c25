/* y = x W^T (+ bias) for the rows of a decode batch or a short prefill chunk (up to MAX_ROWS): bf16
 * x [M, K], W [N, K] (as nn.Linear holds it, no repacking), bias [N] or NULL, y [M, N]; fp32
 * accumulation, bf16 result (round to nearest even).
 *
 * Up to SMALL_ROWS rows a linear layer is a matrix-vector product bound by reading W, and oneDNN's
 * bf16 path reads it at well under the memory bandwidth. Here each thread streams its own range of
 * W's rows once, prefetching ahead, and every row it reads meets all M rows of x, which sit in L1.
 * Each output is one dot product over K in fixed 32-element steps (AVX512_BF16), summed across
 * lanes in a fixed order: it depends on its own x row and W row only, so a token's result is the
 * same whatever the batch around it.
 *
 * From SMALL_ROWS + 1 to MAX_ROWS rows, the more of them the more compute-bound, W is walked in tiles
 * that stay in L1 while each group of rows of x passes over them (the next tile prefetched during
 * the first pass); a block of 4 W rows against 4 x rows keeps 16 accumulators, summed across lanes
 * together by one transpose-and-add tree, in the same order for each (a row's result does not
 * depend on the rows beside it, though it differs in rounding from the few-rows path). On SmolLM2's
 * 120 layer linears in turn (cold weights, 2 threads of an AMD EPYC) the tiles take as long as the
 * few-rows path at 2 rows, 0.75x at 4 and half at 6-8, and beat oneDNN 1.4x at 32-64 rows and
 * 1.05-1.2x at 128-256; they are even at 384-512, and from 1,024 oneDNN is up to 1.14x faster: past
 * MAX_ROWS it keeps the products. quantized_linear.c runs its dequantized tiles of int4 and int8
 * weights through the same loop (linear_tile_bf16).
 *
 * Built only with AVX512_BF16 (-march=native on a CPU that has it); elsewhere linear_bf16_available
 * returns 0 and the caller keeps PyTorch's matmul.
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define SMALL_ROWS 2
#define MAX_ROWS 256
/* Rows of W prefetched ahead, into L2. Prefetches into L1 queue behind its few miss buffers: on 2
 * cores of an AMD EPYC they held a 56 MB weight to 23-27 GB/s, against 55-70 GB/s into L2. */
#define PREFETCH_ROWS 16
/* Full unrolling of the loops over rows lets the accumulator array live in registers. */
#define UNROLL _Pragma("GCC unroll 16")

#if defined(__AVX512BF16__)
#include <immintrin.h>

#include "sums.h"

/* One 32-element step of the dot products; the mask covers the tail of K. */
ALWAYS_INLINE void step(const uint16_t *x, const uint16_t *wr, __m512 *acc, int M, int R, int K, int k,
                        __mmask32 mask) {
    __m512bh wv[4];
    UNROLL for (int r = 0; r < R; r++) {
        wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, wr + (int64_t)r * K + k);
        _mm_prefetch((const char *)(wr + (int64_t)(r + PREFETCH_ROWS) * K + k), _MM_HINT_T1);
    }
    UNROLL for (int m = 0; m < M; m++) {
        __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + (int64_t)m * K + k);
        UNROLL for (int r = 0; r < R; r++) acc[r * M + m] = _mm512_dpbf16_ps(acc[r * M + m], xv, wv[r]);
    }
}

/* `R` rows of W, from wr on, against the `M` rows of x, into y's columns from n. R * M accumulators
 * stay in registers (the caller keeps R * M <= 16); R independent rows also hide the latency of each
 * dot-product chain. */
ALWAYS_INLINE void rows(const uint16_t *x, const uint16_t *wr, const uint16_t *bias, uint16_t *y,
                        int M, int R, int N, int K, int n) {
    __m512 acc[16];
    UNROLL for (int i = 0; i < R * M; i++) acc[i] = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 32) {
        if (K - k >= 32) step(x, wr, acc, M, R, K, k, 0xffffffffu);
        else step(x, wr, acc, M, R, K, k, (1u << (K - k)) - 1);
    }
    UNROLL for (int r = 0; r < R; r++) {
        float b = bias ? bf16_to_f32(bias[n + r]) : 0.0f;
        UNROLL for (int m = 0; m < M; m++) y[(int64_t)m * N + n + r] = f32_to_bf16(_mm512_reduce_add_ps(acc[r * M + m]) + b);
    }
}

/* Rows of W per step. */
#define ROWS_PER_STEP 4

ALWAYS_INLINE void linear_m(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y,
                            int M, int N, int K, int num_threads) {
    const int R = ROWS_PER_STEP;
    const int steps = N / R;
    #pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int s = 0; s < steps; s++) rows(x, w + (int64_t)s * R * K, bias, y, M, R, N, K, s * R);
    for (int n = steps * R; n < N; n++) rows(x, w + (int64_t)n * K, bias, y, M, 1, N, K, n);
}

/* -- more rows: tiles of W, blocks of 4 x 4 ----------------------------------------------------- */

#define BLOCK 4
#define TILE_BYTES (16 << 10)

/* One 32-element step of a block: BLOCK rows of W against G rows of x; the mask covers the tail of K. */
ALWAYS_INLINE void block_step(const uint16_t *x, const uint16_t *wr, __m512 *acc, int G, int K, int k, int ahead,
                              __mmask32 mask) {
    __m512bh wv[BLOCK];
    UNROLL for (int r = 0; r < BLOCK; r++) {
        wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, wr + (int64_t)r * K + k);
        if (ahead) _mm_prefetch((const char *)(wr + (int64_t)(r + ahead) * K + k), _MM_HINT_T1);
    }
    UNROLL for (int m = 0; m < G; m++) {
        __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + (int64_t)m * K + k);
        UNROLL for (int r = 0; r < BLOCK; r++) acc[m * BLOCK + r] = _mm512_dpbf16_ps(acc[m * BLOCK + r], xv, wv[r]);
    }
}

/* BLOCK rows of W, from wr on, against G (<= BLOCK) rows of x, into y's columns from n; with `ahead`,
 * the rows that far further on are prefetched. */
ALWAYS_INLINE void block(const uint16_t *x, const uint16_t *wr, const uint16_t *bias, uint16_t *y, int G,
                         int N, int K, int n, int ahead) {
    __m512 acc[BLOCK * BLOCK];
    UNROLL for (int i = 0; i < BLOCK * BLOCK; i++) acc[i] = _mm512_setzero_ps();
    int k = 0;
    /* The tail apart: masked loads in every step cost a fifth of the block's time. */
    for (; k + 32 <= K; k += 32) block_step(x, wr, acc, G, K, k, ahead, 0xffffffffu);
    if (k < K) block_step(x, wr, acc, G, K, k, ahead, (1u << (K - k)) - 1);
    /* The 16 results at once: with the bias, rounded to bf16 (to nearest even) and stored by row. */
    __m512 sums = sum16(acc);
    if (bias) {
        const __m128i b = _mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)(bias + n)));
        sums = _mm512_add_ps(sums, _mm512_broadcast_f32x4(_mm_castsi128_ps(_mm_slli_epi32(b, 16))));
    }
    __m256i packed = (__m256i)_mm512_cvtneps_pbh(sums);
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, packed);
    UNROLL for (int m = 0; m < G; m++) memcpy(y + (int64_t)m * N + n, lanes + m, 8);
}

/* Rows of W in a tile of linear_tile_bf16. */
int linear_tile_rows(int K) {
    const int tile = TILE_BYTES / (2 * K) / BLOCK * BLOCK;
    return tile < BLOCK ? BLOCK : tile;
}

/* y's columns [start, end) from the M rows of x and W's rows [start, end), held from wt on (in W
 * itself, or a copy of those rows elsewhere, as quantized_linear.c dequantizes them); while the first
 * rows of x pass, the rows of W `ahead` further on are prefetched (0: none), as far as W's N rows go.
 * A tile of linear_tile_rows(K) rows stays in L1. */
void linear_tile_bf16(const uint16_t *x, const uint16_t *wt, const uint16_t *bias, uint16_t *y,
                      int M, int N, int K, int start, int end, int ahead) {
    for (int m = 0; m < M; m += BLOCK) {
        const int G = M - m < BLOCK ? M - m : BLOCK;
        const uint16_t *xg = x + (int64_t)m * K;
        uint16_t *yg = y + (int64_t)m * N;
        int n = start;
        for (; n + BLOCK <= end; n += BLOCK) {
            const uint16_t *wr = wt + (int64_t)(n - start) * K;
            const int a = m == 0 && n + ahead + BLOCK <= N ? ahead : 0;
            switch (G) {  /* a copy per G keeps the accumulators in registers */
            case 4: block(xg, wr, bias, yg, 4, N, K, n, a); break;
            case 3: block(xg, wr, bias, yg, 3, N, K, n, a); break;
            case 2: block(xg, wr, bias, yg, 2, N, K, n, a); break;
            default: block(xg, wr, bias, yg, 1, N, K, n, a);
            }
        }
        for (; n < end; n++)
            for (int i = 0; i < G; i++)
                rows(xg + (int64_t)i * K, wt + (int64_t)(n - start) * K, bias, yg + (int64_t)i * N, 1, 1, N, K, n);
    }
}

static void linear_tiled(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y,
                         int M, int N, int K, int num_threads) {
    const int tile = linear_tile_rows(K), tiles = (N + tile - 1) / tile;
    #pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int t = 0; t < tiles; t++) {
        const int start = t * tile, end = start + tile < N ? start + tile : N;
        linear_tile_bf16(x, w + (int64_t)start * K, bias, y, M, N, K, start, end, tile);
    }
}

int linear_bf16_available(void) { return MAX_ROWS; }

void linear_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y,
                 int M, int N, int K, int num_threads) {
    if (M > SMALL_ROWS) {
        linear_tiled(x, w, bias, y, M, N, K, num_threads);
        return;
    }
    /* One copy per M, so that the loops over M and R unroll and the accumulators live in registers. */
    _Static_assert(SMALL_ROWS == 2, "a copy of linear_m for each row count up to SMALL_ROWS");
    if (M == 1) linear_m(x, w, bias, y, 1, N, K, num_threads);
    else linear_m(x, w, bias, y, 2, N, K, num_threads);
}

#else

int linear_bf16_available(void) { return 0; }

void linear_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y,
                 int M, int N, int K, int num_threads) {
    (void)x; (void)w; (void)bias; (void)y; (void)M; (void)N; (void)K; (void)num_threads;
}

#endif
