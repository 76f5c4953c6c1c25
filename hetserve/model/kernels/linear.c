/* y = x W^T (+ bias) for the few rows of a decode step: bf16 x [M, K], W [N, K] (as nn.Linear holds it,
 * no repacking), bias [N] or NULL, y [M, N]; fp32 accumulation, bf16 result (round to nearest even).
 *
 * At decode batch sizes a linear layer is a matrix-vector product bound by reading W, and oneDNN's
 * bf16 path reads it at well under the memory bandwidth for one or a few rows. Here each thread
 * streams its own range of W's rows once, prefetching ahead, and every row it reads meets all M rows
 * of x, which sit in L1. Each output is one dot product over K in fixed 32-element steps
 * (AVX512_BF16), summed across lanes in a fixed order: it depends on its own x row and W row only,
 * so a token's result is the same whatever the batch around it. Up to MAX_ROWS rows of x: past
 * that the products are compute-bound, and oneDNN's blocked kernels, which reuse each loaded
 * weight vector across more rows, are faster.
 *
 * Built only with AVX512_BF16 (-march=native on a CPU that has it); elsewhere linear_bf16_available
 * returns 0 and the caller keeps PyTorch's matmul.
 */
#include <stdint.h>

#include "bf16.h"

#define MAX_ROWS 8
/* Rows of W prefetched ahead, into L2. Prefetches into L1 queue behind its few miss buffers: on 2
 * cores of an AMD EPYC they held a 56 MB weight to 23-27 GB/s, against 55-70 GB/s into L2. */
#define PREFETCH_ROWS 16
/* Full unrolling of the loops over rows lets the accumulator array live in registers. */
#define UNROLL _Pragma("GCC unroll 16")

#if defined(__AVX512BF16__)
#include <immintrin.h>

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

/* `R` rows of W from row n, against the `M` rows of x. R * M accumulators stay in registers (the
 * caller keeps R * M <= 16); R independent rows also hide the latency of each dot-product chain. */
ALWAYS_INLINE void rows(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y,
                        int M, int R, int N, int K, int n) {
    __m512 acc[16];
    UNROLL for (int i = 0; i < R * M; i++) acc[i] = _mm512_setzero_ps();
    const uint16_t *wr = w + (int64_t)n * K;
    for (int k = 0; k < K; k += 32) {
        if (K - k >= 32) step(x, wr, acc, M, R, K, k, 0xffffffffu);
        else step(x, wr, acc, M, R, K, k, (1u << (K - k)) - 1);
    }
    UNROLL for (int r = 0; r < R; r++) {
        float b = bias ? bf16_to_f32(bias[n + r]) : 0.0f;
        UNROLL for (int m = 0; m < M; m++) y[(int64_t)m * N + n + r] = f32_to_bf16(_mm512_reduce_add_ps(acc[r * M + m]) + b);
    }
}

/* Rows of W per step for M rows of x: 16 accumulators. */
#define ROWS_PER_STEP(M) ((M) <= 4 ? 4 : 2)

ALWAYS_INLINE void linear_m(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y,
                            int M, int N, int K, int num_threads) {
    const int R = ROWS_PER_STEP(M);
    const int steps = N / R;
    #pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int s = 0; s < steps; s++) rows(x, w, bias, y, M, R, N, K, s * R);
    for (int n = steps * R; n < N; n++) rows(x, w, bias, y, M, 1, N, K, n);
}

int linear_bf16_available(void) { return MAX_ROWS; }

void linear_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y,
                 int M, int N, int K, int num_threads) {
    /* One copy per M, so that the loops over M and R unroll and the accumulators live in registers. */
    switch (M) {
#define CASE(m) case m: linear_m(x, w, bias, y, m, N, K, num_threads); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
    }
}

#else

int linear_bf16_available(void) { return 0; }

void linear_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y,
                 int M, int N, int K, int num_threads) {
    (void)x; (void)w; (void)bias; (void)y; (void)M; (void)N; (void)K; (void)num_threads;
}

#endif
