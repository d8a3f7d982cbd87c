/*
 * kv.c — the fused decode step's f16 and int8 KV caches: the row store (rounding points) and
 * the attention that reads them directly.  Semantics: bitlm_kernels.h ("KV cache types"); the
 * torch twin is bitlm.engine.PackedKVCache (its update() rounds exactly as kv_store does).
 *
 * The attention is bitlm_attn_head (attn_impl.h) with every cached value replaced by its
 * dequantised float (f16 -> float exactly; int8: (float)q * scale, one rounding), in the same
 * order, so every tier gives the same bits.  Built with no ISA flags; the AVX-512 version carries
 * a GCC target attribute and is entered only when bitlm_tier() says so.
 */
#include <math.h>
#include <string.h>

#include "internal.h"

#if defined(__x86_64__) && defined(BITLM_HAVE_AVX512)
#include <immintrin.h>
#endif

/* ---- conversions --------------------------------------------------------------------------- */

/* float32 -> f16, round to nearest even, overflow to inf, NaN stays NaN (torch's .half()). */
static inline uint16_t kv_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0)); /* inf / nan */
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds to >= 65520: inf */
    if (ax < 0x38800000u) {                                    /* below 2^-14: f16 subnormal or zero */
        if (ax < 0x33000000u) return sign;                     /* < 2^-25: rounds to 0 */
        const uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;
        const int shift = (int)(126 - e); /* value = m * 2^(e-150), in units of 2^-24: m >> (126 - e) */
        const uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        const uint32_t r = q + (rem > half || (rem == half && (q & 1)));
        return (uint16_t)(sign | r);
    }
    const uint32_t e = (ax >> 23) - 112, m = ax & 0x7fffffu;
    uint32_t h = (e << 10) | (m >> 13);
    const uint32_t rem = m & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++; /* may carry into the exponent: correct */
    return (uint16_t)(sign | h);
}

/* ---- store --------------------------------------------------------------------------------- */

BITLM_HIDDEN void bitlm_kv_store(int type, void *cache, float *scales, int64_t row, const float *src, int64_t D) {
    if (type == BITLM_KV_F16) {
        uint16_t *dst = (uint16_t *)cache + row * D;
        for (int64_t j = 0; j < D; j++) dst[j] = kv_f32_to_f16(src[j]);
    } else if (type == BITLM_KV_I8) {
        int8_t *dst = (int8_t *)cache + row * D;
        float amax = 0.0f;
        for (int64_t j = 0; j < D; j++) {
            const float v = fabsf(src[j]);
            amax = v > amax ? v : amax;
        }
        const float s = amax / 127.0f;
        scales[row] = s;
        for (int64_t j = 0; j < D; j++) {
            float q = s > 0.0f ? rintf(src[j] / s) : 0.0f;
            q = q < -127.0f ? -127.0f : (q > 127.0f ? 127.0f : q);
            dst[j] = (int8_t)q;
        }
    } else {
        memcpy((float *)cache + row * D, src, (size_t)D * 4);
    }
}

/* ---- attention ----------------------------------------------------------------------------- */

static inline float kv_load(int type, const void *c, const float *s, int64_t t, int64_t D, int64_t j) {
    if (type == BITLM_KV_F16) return bitlm_f16_to_f32(((const uint16_t *)c)[t * D + j]);
    return (float)((const int8_t *)c)[t * D + j] * s[t];
}

static void kv_attn_generic(int type, const float *q, const void *kc, const float *ks, const void *vc, const float *vs,
                            int64_t T, int64_t D, float scale, float *scores, float *out) {
    float m = -INFINITY;
    for (int64_t t = 0; t < T; t++) {
        float lane[16] = {0};
        int64_t j = 0;
        for (; j + 16 <= D; j += 16)
            for (int l = 0; l < 16; l++) lane[l] = lane[l] + q[j + l] * kv_load(type, kc, ks, t, D, j + l);
        for (; j < D; j++) lane[j & 15] = lane[j & 15] + q[j] * kv_load(type, kc, ks, t, D, j);
        const float s = bitlm_fold16f(lane) * scale;
        scores[t] = s;
        m = s > m ? s : m;
    }
    const float sum = bitlm_softmax_exp(scores, T, m);
    for (int64_t j = 0; j < D; j++) out[j] = 0.0f;
    for (int64_t t = 0; t < T; t++) {
        const float e = scores[t];
        for (int64_t j = 0; j < D; j++) out[j] = out[j] + e * kv_load(type, vc, vs, t, D, j);
    }
    for (int64_t j = 0; j < D; j++) out[j] = out[j] / sum;
}

#if defined(__x86_64__) && defined(BITLM_HAVE_AVX512)
#define KV512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))

KV512 static inline __m512 kv_load16(int type, const void *c, const float *s, int64_t t, int64_t D, int64_t j) {
    if (type == BITLM_KV_F16)
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)((const uint16_t *)c + t * D + j)));
    const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(const void *)((const int8_t *)c + t * D + j))));
    return _mm512_mul_ps(v, _mm512_set1_ps(s[t]));
}

/* out = (sum_t e_t * v_t) / sum for D = 16 * NV, t outermost: every row is read once. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"), always_inline)) static inline void
kv_v_rows(int type, const void *vc, const float *vs, int64_t T, const float *e, float sum, float *out, const int NV) {
    const int64_t D = 16 * NV;
    __m512 o[8];
    for (int c = 0; c < NV; c++) o[c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < T; t++) {
        const __m512 et = _mm512_set1_ps(e[t]);
        for (int c = 0; c < NV; c++) o[c] = _mm512_add_ps(o[c], _mm512_mul_ps(et, kv_load16(type, vc, vs, t, D, 16 * c)));
    }
    for (int c = 0; c < NV; c++) _mm512_storeu_ps(out + 16 * c, _mm512_div_ps(o[c], _mm512_set1_ps(sum)));
}

/* D % 16 == 0: lane l of the score accumulator is exactly the generic lane l. */
KV512 static void kv_attn_avx512(int type, const float *q, const void *kc, const float *ks, const void *vc,
                                 const float *vs, int64_t T, int64_t D, float scale, float *scores, float *out) {
    float m = -INFINITY;
    for (int64_t t = 0; t < T; t++) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t j = 0; j < D; j += 16)
            acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(q + j), kv_load16(type, kc, ks, t, D, j)));
        float lane[16];
        _mm512_storeu_ps(lane, acc);
        const float s = bitlm_fold16f(lane) * scale;
        scores[t] = s;
        m = s > m ? s : m;
    }
    const float sum = bitlm_softmax_exp(scores, T, m);
    if (D == 128) { /* one pass over the rows, the 128 sums in registers (same order per element) */
        kv_v_rows(type, vc, vs, T, scores, sum, out, 8);
        return;
    }
    if (D == 64) {
        kv_v_rows(type, vc, vs, T, scores, sum, out, 4);
        return;
    }
    for (int64_t j = 0; j < D; j += 16) {
        __m512 o = _mm512_setzero_ps();
        for (int64_t t = 0; t < T; t++)
            o = _mm512_add_ps(o, _mm512_mul_ps(_mm512_set1_ps(scores[t]), kv_load16(type, vc, vs, t, D, j)));
        _mm512_storeu_ps(out + j, _mm512_div_ps(o, _mm512_set1_ps(sum)));
    }
}
#endif

BITLM_HIDDEN void bitlm_kv_attn_run(void *ctx, int64_t b, int64_t e) {
    const bitlm_kv_attn_task *a = (const bitlm_kv_attn_task *)ctx;
    const size_t esz = a->type == BITLM_KV_F16 ? 2 : 1;
#if defined(__x86_64__) && defined(BITLM_HAVE_AVX512)
    const int wide = a->D % 16 == 0 && bitlm_tier() >= BITLM_TIER_AVX512;
#endif
    for (int64_t h = b; h < e; h++) {
        const int64_t kv = h / a->rep, row0 = kv * a->max_len;
        const void *kc = (const uint8_t *)a->kc + (size_t)(row0 * a->D) * esz;
        const void *vc = (const uint8_t *)a->vc + (size_t)(row0 * a->D) * esz;
        const float *ks = a->ks ? a->ks + row0 : NULL, *vs = a->vs ? a->vs + row0 : NULL;
#if defined(__x86_64__) && defined(BITLM_HAVE_AVX512)
        if (wide) {
            kv_attn_avx512(a->type, a->q + h * a->D, kc, ks, vc, vs, a->T, a->D, a->scale, a->scores + h * a->T,
                           a->out + h * a->D);
            continue;
        }
#endif
        kv_attn_generic(a->type, a->q + h * a->D, kc, ks, vc, vs, a->T, a->D, a->scale, a->scores + h * a->T,
                        a->out + h * a->D);
    }
}

BITLM_API int bitlm_kv_quantize(int type, const float *x, int64_t rows, int64_t d, void *out, float *scales) {
    if (!x || !out || rows < 0 || d < 1 || (type != BITLM_KV_F32 && type != BITLM_KV_F16 && type != BITLM_KV_I8) ||
        (type == BITLM_KV_I8 && !scales))
        return BITLM_EINVAL;
    for (int64_t r = 0; r < rows; r++) bitlm_kv_store(type, out, scales, r, x + r * d, d);
    return 0;
}
