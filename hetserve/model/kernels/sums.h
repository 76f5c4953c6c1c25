/* Horizontal sums of 16 fp32 vectors at once, by transposing and adding: the same order of additions
 * for each vector, at a fraction of the cost of 16 separate reductions. Needs AVX-512. */
#ifndef HETSERVE_SUMS_H
#define HETSERVE_SUMS_H

#include <immintrin.h>

#include "bf16.h"

/* Four vectors -> one whose 128-bit lane j holds the sums of lane j of a, b, c and d. */
ALWAYS_INLINE __m512 sum4_lanes(__m512 a, __m512 b, __m512 c, __m512 d) {
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
    return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
}

/* sum4_lanes of vectors 0-3, 4-7, 8-11, 12-15 -> the 16 full horizontal sums, in order. */
ALWAYS_INLINE __m512 sum16_finish(__m512 x0, __m512 x1, __m512 x2, __m512 x3) {
    const __m512 y0 = _mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(x0, x1, _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 y1 = _mm512_add_ps(_mm512_shuffle_f32x4(x2, x3, _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(x2, x3, _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(y0, y1, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(y0, y1, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* The horizontal sums of v[0] .. v[15], in order. */
ALWAYS_INLINE __m512 sum16(const __m512 *v) {
    return sum16_finish(sum4_lanes(v[0], v[1], v[2], v[3]), sum4_lanes(v[4], v[5], v[6], v[7]),
                        sum4_lanes(v[8], v[9], v[10], v[11]), sum4_lanes(v[12], v[13], v[14], v[15]));
}

#endif
