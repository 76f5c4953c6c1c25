/* The small per-layer operations of a bf16 decoder layer, each fused into one call (CPU).
 *
 * At decode batch sizes these tensors hold a few thousand elements, and a layer spends more time
 * dispatching PyTorch's eight ops of an RMSNorm, or the dozen of RoPE and the KV-cache writes, than
 * computing them. At prefill sizes one pass over memory beats several: the MLP's activation fused
 * here takes a quarter of the time of PyTorch's silu and product. Each function here replaces such
 * a sequence with one pass, rounding to bf16 exactly where the PyTorch sequence it replaces rounds
 * (hetserve.model.llama), so the two agree bit for bit except for the fp32 sum of squares in the
 * norm, whose order differs.
 *
 * Layouts: x, delta, out, sum_out [T, H]; gate_up [T, 2 C] and its activation [T, C];
 * qkv [T, (Hq + 2 Hkv) * D] (q heads, then k heads, then v heads); cos, sin [T, D] (already in
 * bf16, at each token's position); slots [T] (block * block_size + offset); k_cache, v_cache
 * [num_blocks, Hkv, block_size, D].
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

/* Below this many elements a parallel region costs more than it saves. */
#define PARALLEL_MIN_ELEMENTS 65536
#define MAX_HEAD_DIM 512

ALWAYS_INLINE float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* out = weight * bf16(x * rsqrt(mean(x^2) + eps)), the norm taken in fp32. With `delta`, the norm is
 * of sum = bf16(x + delta), which is written too (the residual stream after a sublayer). */
void rms_norm_bf16(const uint16_t *x, const uint16_t *delta, const uint16_t *weight, uint16_t *out,
                   uint16_t *sum_out, int T, int H, float eps, int num_threads) {
    int threads = (int64_t)T * H >= PARALLEL_MIN_ELEMENTS ? num_threads : 1;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < T; t++) {
        const uint16_t *row = x + (int64_t)t * H;
        float sum = 0.0f;
        if (delta) {
            const uint16_t *d = delta + (int64_t)t * H;
            uint16_t *s = sum_out + (int64_t)t * H;
            for (int i = 0; i < H; i++) s[i] = f32_to_bf16(bf16_to_f32(row[i]) + bf16_to_f32(d[i]));
            row = s;
        }
        for (int i = 0; i < H; i++) sum += bf16_to_f32(row[i]) * bf16_to_f32(row[i]);
        float scale = 1.0f / sqrtf(sum / H + eps);
        uint16_t *o = out + (int64_t)t * H;
        for (int i = 0; i < H; i++)
            o[i] = f32_to_bf16(bf16_to_f32(weight[i]) * round_bf16(bf16_to_f32(row[i]) * scale));
    }
}

/* Rotate-half RoPE of one head in place: x * cos + rotate_half(x) * sin, rounding each product and
 * the sum to bf16 as PyTorch's bf16 ops do. */
ALWAYS_INLINE void rotate_head(uint16_t *head, const uint16_t *cos, const uint16_t *sin, int D) {
    float rotated[MAX_HEAD_DIM];
    int half = D / 2;
    for (int i = 0; i < half; i++) {
        rotated[i] = -bf16_to_f32(head[half + i]);
        rotated[half + i] = bf16_to_f32(head[i]);
    }
    for (int i = 0; i < D; i++) {
        float a = round_bf16(bf16_to_f32(head[i]) * bf16_to_f32(cos[i]));
        float b = round_bf16(rotated[i] * bf16_to_f32(sin[i]));
        head[i] = f32_to_bf16(a + b);
    }
}

int rope_store_max_head_dim(void) { return MAX_HEAD_DIM; }

/* Rotate the q and k heads of every token in place, then copy its k and v heads into its cache slot. */
void rope_store_bf16(uint16_t *qkv, const uint16_t *cos, const uint16_t *sin, const int64_t *slots,
                     uint16_t *k_cache, uint16_t *v_cache, int T, int Hq, int Hkv, int D, int block_size,
                     int num_threads) {
    const int64_t stride = (int64_t)(Hq + 2 * Hkv) * D;
    int threads = T * stride >= PARALLEL_MIN_ELEMENTS ? num_threads : 1;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < T; t++) {
        uint16_t *row = qkv + t * stride;
        for (int h = 0; h < Hq + Hkv; h++) rotate_head(row + (int64_t)h * D, cos + (int64_t)t * D, sin + (int64_t)t * D, D);
        int64_t block = slots[t] / block_size, offset = slots[t] % block_size;
        for (int h = 0; h < Hkv; h++) {
            int64_t at = ((block * Hkv + h) * block_size + offset) * D;
            memcpy(k_cache + at, row + (int64_t)(Hq + h) * D, D * sizeof(uint16_t));
            memcpy(v_cache + at, row + (int64_t)(Hq + Hkv + h) * D, D * sizeof(uint16_t));
        }
    }
}

/* The MLP's activation: out [T, C] = silu(gate) * up for gate_up [T, 2C] = (gate | up), rounding
 * silu's result to bf16 as F.silu does before the product. */
void silu_mul_bf16(const uint16_t *gate_up, uint16_t *out, int T, int C, int num_threads) {
    int threads = (int64_t)T * C >= PARALLEL_MIN_ELEMENTS ? num_threads : 1;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < T; t++) {
        const uint16_t *gate = gate_up + (int64_t)t * 2 * C, *up = gate + C;
        uint16_t *o = out + (int64_t)t * C;
        for (int i = 0; i < C; i++) {
            float g = bf16_to_f32(gate[i]);
            o[i] = f32_to_bf16(round_bf16(g / (1.0f + expf(-g))) * bf16_to_f32(up[i]));
        }
    }
}
