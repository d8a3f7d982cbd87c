/*
 * attn_impl.h — attention of one decode query over the KV cache, the one definition, included
 * by every tier file so that each compiles it with its own ISA flags (the 16 independent lanes
 * vectorise without reassociation; -ffp-contract=off keeps multiply and add separate, so every
 * tier gives the same bits).  Semantics: bitlm_decode_step in bitlm_kernels.h.
 */
#ifndef BITLM_ATTN_IMPL_H
#define BITLM_ATTN_IMPL_H

#include <math.h>

#include "internal.h"

/* One body for float32 and bf16 caches (LOAD reads element i of a row as float32, exactly). */
#define BITLM_ATTN_HEAD_BODY(KV_T, LOAD)                                                          \
    float m = -INFINITY;                                                                            \
    for (int64_t t = 0; t < T; t++) {                                                               \
        const KV_T *kr = kc + t * D;                                                                \
        float lane[16] = {0};                                                                       \
        int64_t j = 0;                                                                              \
        for (; j + 16 <= D; j += 16)                                                                \
            for (int l = 0; l < 16; l++) lane[l] = lane[l] + q[j + l] * LOAD(kr[j + l]);           \
        for (; j < D; j++) lane[j & 15] = lane[j & 15] + q[j] * LOAD(kr[j]);                        \
        const float s = bitlm_fold16f(lane) * scale;                                                \
        scores[t] = s;                                                                              \
        m = s > m ? s : m;                                                                          \
    }                                                                                               \
    const float sum = bitlm_softmax_exp(scores, scores, T, m);                                      \
    for (int64_t j = 0; j < D; j++) out[j] = 0.0f;                                                  \
    for (int64_t t = 0; t < T; t++) {                                                               \
        const float e = scores[t];                                                                  \
        const KV_T *vr = vc + t * D;                                                                \
        for (int64_t j = 0; j < D; j++) out[j] = out[j] + e * LOAD(vr[j]);                          \
    }                                                                                               \
    for (int64_t j = 0; j < D; j++) out[j] = out[j] / sum;

#define BITLM_ATTN_LOAD_F32(v) (v)
static void bitlm_attn_head(const float *q, const float *kc, const float *vc, int64_t T, int64_t D, float scale,
                            float *scores, float *out) {
    BITLM_ATTN_HEAD_BODY(float, BITLM_ATTN_LOAD_F32)
}

/* The same over a bfloat16 cache (transformers' bf16 KV, bitlm_hf_decode_layers). */
static void bitlm_attn_head_bf16(const float *q, const uint16_t *kc, const uint16_t *vc, int64_t T, int64_t D,
                                 float scale, float *scores, float *out) {
    BITLM_ATTN_HEAD_BODY(uint16_t, bitlm_bf16_to_f32)
}

#endif /* BITLM_ATTN_IMPL_H */
