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

static void bitlm_attn_head(const float *q, const float *kc, const float *vc, int64_t T, int64_t D, float scale,
                            float *scores, float *out) {
    float m = -INFINITY;
    for (int64_t t = 0; t < T; t++) {
        const float *kr = kc + t * D;
        float lane[16] = {0};
        int64_t j = 0;
        for (; j + 16 <= D; j += 16)
            for (int l = 0; l < 16; l++) lane[l] = lane[l] + q[j + l] * kr[j + l];
        for (; j < D; j++) lane[j & 15] = lane[j & 15] + q[j] * kr[j];
        const float s = bitlm_fold16f(lane) * scale;
        scores[t] = s;
        m = s > m ? s : m;
    }
    const float sum = bitlm_softmax_exp(scores, T, m);
    for (int64_t j = 0; j < D; j++) out[j] = 0.0f;
    for (int64_t t = 0; t < T; t++) {
        const float e = scores[t];
        const float *vr = vc + t * D;
        for (int64_t j = 0; j < D; j++) out[j] = out[j] + e * vr[j];
    }
    for (int64_t j = 0; j < D; j++) out[j] = out[j] / sum;
}

#endif /* BITLM_ATTN_IMPL_H */
