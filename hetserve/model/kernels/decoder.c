/* A small step's bf16 decoder layers in one call (CPU): the layers of a stage, run on the kernels of
 * the other files here (linked into the same library), with no Python between them.
 *
 * At decode batch sizes a layer's work is a few matrix-vector products that read its weights once,
 * and the dozen Python-level calls around them (each a ctypes call, a supported check, a tensor
 * allocation: 3-5 us) cost about a third of a step of a small model. Here a step of the whole
 * stage is one call. Every operation is the kernel that the layer-by-layer path calls on the same
 * operands, in the same order, so the two give the same bits (hetserve.model.native_decoder).
 *
 * The residual add that ends a layer is fused into the next layer's input norm, as the add that
 * ends the attention sublayer is into the post-attention norm: both round the sum to bf16 as
 * PyTorch's add does.
 *
 * Layouts as in fused_ops.c and paged_decode.c: x [T, H]; cos, sin [T, D]; slots [T]; the block
 * tables [T, max_blocks] and context lengths [T] of every token (a prefill query's context being
 * its sequence up to itself); caches [num_blocks, Hkv, block_size, D].
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

/* The kernels this file strings together, from fused_ops.c, linear.c, quantized_linear.c and
 * paged_decode.c. */
void rms_norm_bf16(const uint16_t *x, const uint16_t *delta, const uint16_t *weight, uint16_t *out,
                   uint16_t *sum_out, int T, int H, float eps, int num_threads);
void rope_store_bf16(uint16_t *qkv, const uint16_t *cos, const uint16_t *sin, const int64_t *slots,
                     uint16_t *k_cache, uint16_t *v_cache, int T, int Hq, int Hkv, int D, int block_size,
                     int num_threads);
void silu_mul_bf16(const uint16_t *gate_up, uint16_t *out, int T, int C, int num_threads);
void linear_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y,
                 int M, int N, int K, int num_threads);
void int4_linear_bf16(const uint16_t *x, const uint8_t *w, const uint16_t *scales, const uint16_t *mins,
                      const uint16_t *bias, uint16_t *y, int M, int N, int K, int num_threads);
void int8_linear_bf16(const uint16_t *x, const uint8_t *w, const float *scales, const uint16_t *bias,
                      uint16_t *y, int M, int N, int K, int num_threads);
void paged_decode_bf16(const void *q, const void *k_cache, const void *v_cache, const float *k_scales,
                       const float *v_scales, const int64_t *block_tables, const int64_t *context_lens,
                       void *out, int batch, int num_heads, int num_kv_heads, int head_dim, int block_size,
                       int max_blocks, float scale, int num_threads);

enum { WEIGHT_BF16 = 0, WEIGHT_INT4 = 1, WEIGHT_INT8 = 2 };

/* One linear layer: bf16 weight [N, K] as nn.Linear holds it, or the byte kernels' int4 (packed
 * nibbles, fp16 scales and minimums) or int8 (bytes, fp32 scales per row). */
typedef struct {
    int kind, out_features, in_features;
    const void *weight, *scales, *mins;
    const uint16_t *bias;
} Linear;

typedef struct {
    const uint16_t *input_norm, *post_attention_norm;
    Linear qkv, o, gate_up, down;
    uint16_t *k_cache, *v_cache;
} Layer;

typedef struct {
    int hidden, num_heads, num_kv_heads, head_dim, intermediate, block_size;
    float eps, scale;
} Dims;

static void linear(const Linear *l, const uint16_t *x, uint16_t *y, int T, int threads) {
    switch (l->kind) {
    case WEIGHT_INT4:
        int4_linear_bf16(x, l->weight, l->scales, l->mins, l->bias, y, T, l->out_features, l->in_features, threads);
        break;
    case WEIGHT_INT8:
        int8_linear_bf16(x, l->weight, l->scales, l->bias, y, T, l->out_features, l->in_features, threads);
        break;
    default:
        linear_bf16(x, l->weight, l->bias, y, T, l->out_features, l->in_features, threads);
    }
}

/* bf16 elements of scratch memory a step of T tokens needs. */
int64_t decoder_scratch_elements(const Dims *d, int T) {
    const int64_t q = (int64_t)d->num_heads * d->head_dim, kv = (int64_t)d->num_kv_heads * d->head_dim;
    return (int64_t)T * ((q + 2 * kv) + 2 * q + 2 * (int64_t)d->hidden + 3 * (int64_t)d->intermediate);
}

/* x [T, H] in place: the hidden states after `num_layers` layers. */
void decoder_layers_bf16(const Dims *d, const Layer *layers, int num_layers, uint16_t *x, int T,
                         const uint16_t *cos, const uint16_t *sin, const int64_t *slots,
                         const int64_t *block_tables, const int64_t *context_lens, int max_blocks,
                         uint16_t *scratch, int threads) {
    const int H = d->hidden, D = d->head_dim, Hq = d->num_heads, Hkv = d->num_kv_heads;
    const int64_t q_width = (int64_t)Hq * D, qkv_width = q_width + 2 * (int64_t)Hkv * D;
    uint16_t *qkv = scratch, *q = qkv + T * qkv_width, *attn = q + T * q_width;
    uint16_t *normed = attn + T * q_width, *delta = normed + (int64_t)T * H;
    uint16_t *gate_up = delta + (int64_t)T * H, *act = gate_up + (int64_t)T * 2 * d->intermediate;
    for (int i = 0; i < num_layers; i++) {
        const Layer *l = layers + i;
        rms_norm_bf16(x, i ? delta : NULL, l->input_norm, normed, i ? x : NULL, T, H, d->eps, threads);
        linear(&l->qkv, normed, qkv, T, threads);
        rope_store_bf16(qkv, cos, sin, slots, l->k_cache, l->v_cache, T, Hq, Hkv, D, d->block_size, threads);
        /* The queries, without the keys and values beside them in each row. */
        for (int t = 0; t < T; t++) memcpy(q + t * q_width, qkv + t * qkv_width, q_width * sizeof(uint16_t));
        paged_decode_bf16(q, l->k_cache, l->v_cache, NULL, NULL, block_tables, context_lens, attn, T, Hq, Hkv, D,
                          d->block_size, max_blocks, d->scale, threads);
        linear(&l->o, attn, delta, T, threads);
        rms_norm_bf16(x, delta, l->post_attention_norm, normed, x, T, H, d->eps, threads);
        linear(&l->gate_up, normed, gate_up, T, threads);
        silu_mul_bf16(gate_up, act, T, d->intermediate, threads);
        linear(&l->down, act, delta, T, threads);
    }
    for (int64_t i = 0; i < (int64_t)T * H; i++) x[i] = f32_to_bf16(bf16_to_f32(x[i]) + bf16_to_f32(delta[i]));
}
