/* bf16 <-> fp32 conversions shared by the CPU kernels. */
#ifndef HETSERVE_BF16_H
#define HETSERVE_BF16_H

#include <stdint.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

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

#endif
