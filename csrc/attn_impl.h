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

/* One body for float32 and bf16 caches (LOAD reads element i of a row as float32, exactly): NH
 * (1-4) query heads that share one kv head (GQA), q / out (NH, D), scores (NH, T).  Every key and
 * value row is read from memory once for all of them (one head at a time read each row once per
 * query head: 4x the bytes for a 2B4T's groups of 4); each head's numbers are the single-head
 * loop's, in the same order, so the same bits however heads are grouped. */
#define BITLM_ATTN_HEADS_BODY(KV_T, LOAD)                                                         \
    float m[4], sum[4];                                                                             \
    for (int r = 0; r < nh; r++) m[r] = -INFINITY;                                                  \
    for (int64_t t = 0; t < T; t++) {                                                               \
        const KV_T *kr = kc + t * D;                                                                \
        for (int r = 0; r < nh; r++) {                                                              \
            const float *qr = q + r * D;                                                            \
            float lane[16] = {0};                                                                   \
            int64_t j = 0;                                                                          \
            for (; j + 16 <= D; j += 16)                                                            \
                for (int l = 0; l < 16; l++) lane[l] = lane[l] + qr[j + l] * LOAD(kr[j + l]);      \
            for (; j < D; j++) lane[j & 15] = lane[j & 15] + qr[j] * LOAD(kr[j]);                   \
            const float s = bitlm_fold16f(lane) * scale;                                            \
            scores[r * T + t] = s;                                                                  \
            m[r] = s > m[r] ? s : m[r];                                                             \
        }                                                                                           \
    }                                                                                               \
    for (int r = 0; r < nh; r++) {                                                                  \
        sum[r] = bitlm_softmax_exp(scores + r * T, scores + r * T, T, m[r]);                        \
        for (int64_t j = 0; j < D; j++) out[r * D + j] = 0.0f;                                      \
    }                                                                                               \
    for (int64_t t = 0; t < T; t++) {                                                               \
        const KV_T *vr = vc + t * D;                                                                \
        for (int r = 0; r < nh; r++) {                                                              \
            const float e = scores[r * T + t];                                                      \
            float *o = out + r * D;                                                                 \
            for (int64_t j = 0; j < D; j++) o[j] = o[j] + e * LOAD(vr[j]);                          \
        }                                                                                           \
    }                                                                                               \
    for (int r = 0; r < nh; r++)                                                                    \
        for (int64_t j = 0; j < D; j++) out[r * D + j] = out[r * D + j] / sum[r];

#define BITLM_ATTN_LOAD_F32(v) (v)
static void bitlm_attn_heads(const float *q, const float *kc, const float *vc, int64_t T, int64_t D, float scale,
                             float *scores, float *out, int nh) {
    BITLM_ATTN_HEADS_BODY(float, BITLM_ATTN_LOAD_F32)
}

/* The same over a bfloat16 cache (transformers' bf16 KV, bitlm_hf_decode_layers). */
static void bitlm_attn_heads_bf16(const float *q, const uint16_t *kc, const uint16_t *vc, int64_t T, int64_t D,
                                  float scale, float *scores, float *out, int nh) {
    BITLM_ATTN_HEADS_BODY(uint16_t, bitlm_bf16_to_f32)
}

#endif /* BITLM_ATTN_IMPL_H */
