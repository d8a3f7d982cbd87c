/*
 * kv.c — the fused decode step's f16 and int8 KV caches: the row store (rounding points) and
 * the attention that reads them directly.  Semantics: bitlm_kernels.h ("KV cache types"); the
 * torch twin is bitlm.engine.PackedKVCache (its update() rounds exactly as kv_store does).
 *
 * The attention is bitlm_attn_heads (attn_impl.h) with every cached value replaced by its
 * dequantised float (f16 -> float exactly; int8: (float)q * scale, one rounding), in the same
 * order, so every tier gives the same bits.  Built with no ISA flags; the AVX-512 version carries
 * a GCC target attribute and is entered only when bitlm_tier() says so.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#if defined(__x86_64__) && defined(BITLM_HAVE_AVX512)
#include <immintrin.h>
#endif

/* ---- conversions --------------------------------------------------------------------------- */

/* float32 -> f16, round to nearest even, overflow to inf, NaN -> 0x7E00 with its sign (torch's
 * scalar .half(); its vectorised one keeps the payload's top bits). */
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

/* The int8 code of x at scale s > 0: clamp(rint(x / s), -127, 127), a NaN quotient 0. */
static inline int8_t kv_i8_code(float x, float s) {
    const float q = rintf(x / s);
    return (int8_t)(q != q ? 0.0f : (q < -127.0f ? -127.0f : (q > 127.0f ? 127.0f : q)));
}

/* ---- store --------------------------------------------------------------------------------- */

#if defined(__x86_64__) && defined(BITLM_HAVE_AVX512)
/* The AVX-512 row stores: the scalar code's bits, 16 values at a time (the scalar rounding is
 * ~9 ns a value, ~0.35 ms of a 2B4T token).  f16: vcvtps2ph rounds to nearest even and overflows
 * to inf as kv_f32_to_f16 does; NaN lanes, whose payload it keeps, become 0x7E00 with their sign.
 * int8: amax over lanes (max is exact in any order; NaN lanes are skipped as the scalar's
 * `v > amax` skips them), then the same float32 division, rint and clamp per value; a NaN
 * quotient (a NaN or infinite row) stores 0 on both. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))) static void kv_store_avx512(int type, void *cache,
                                                                                          float *scales, int64_t row,
                                                                                          const float *src, int64_t D) {
    int64_t j = 0;
    if (type == BITLM_KV_F16) {
        uint16_t *dst = (uint16_t *)cache + row * D;
        for (; j + 16 <= D; j += 16) {
            const __m512 v = _mm512_loadu_ps(src + j);
            __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            if (nan) {
                const __m512i sg = _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(v), 16), _mm512_set1_epi32(0x8000));
                h = _mm256_mask_blend_epi16(nan, h, _mm512_cvtepi32_epi16(_mm512_or_si512(sg, _mm512_set1_epi32(0x7e00))));
            }
            _mm256_storeu_si256((__m256i *)(void *)(dst + j), h);
        }
        for (; j < D; j++) dst[j] = kv_f32_to_f16(src[j]);
        return;
    }
    int8_t *dst = (int8_t *)cache + row * D;
    __m512 am = _mm512_setzero_ps();
    for (; j + 16 <= D; j += 16) /* max_ps(a, b) returns b when a is NaN: NaN lanes leave am as is */
        am = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(src + j)), am);
    float amax = _mm512_reduce_max_ps(am);
    for (; j < D; j++) {
        const float v = fabsf(src[j]);
        amax = v > amax ? v : amax;
    }
    const float s = amax / 127.0f;
    scales[row] = s;
    j = 0;
    if (s > 0.0f) {
        const __m512 sv = _mm512_set1_ps(s), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
        for (; j + 16 <= D; j += 16) {
            __m512 q = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(src + j), sv),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            q = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(q, q, _CMP_ORD_Q), q); /* NaN -> 0 */
            q = _mm512_min_ps(_mm512_max_ps(q, lo), hi);
            _mm_storeu_si128((__m128i *)(void *)(dst + j), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(q)));
        }
    }
    for (; j < D; j++) dst[j] = s > 0.0f ? kv_i8_code(src[j], s) : 0;
}
#endif

BITLM_HIDDEN void bitlm_kv_store(int type, void *cache, float *scales, int64_t row, const float *src, int64_t D) {
#if defined(__x86_64__) && defined(BITLM_HAVE_AVX512)
    if (type != BITLM_KV_F32 && bitlm_tier() >= BITLM_TIER_AVX512) {
        kv_store_avx512(type, cache, scales, row, src, D);
        return;
    }
#endif
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
        for (int64_t j = 0; j < D; j++) dst[j] = s > 0.0f ? kv_i8_code(src[j], s) : 0;
    } else {
        memcpy((float *)cache + row * D, src, (size_t)D * 4);
    }
}

/* ---- attention ----------------------------------------------------------------------------- */

/* Output columns per unit of the split value pass (bitlm_kv_values_run). */
#define KV_COL_BLOCK 64
/* bitlm_decode_step's default split point (positions); measured in docs/performance.md. */
#ifndef KV_SPLIT_DEFAULT
#define KV_SPLIT_DEFAULT 256
#endif

static inline float kv_load(int type, const void *c, const float *s, int64_t t, int64_t D, int64_t j) {
    if (type == BITLM_KV_F16) return bitlm_f16_to_f32(((const uint16_t *)c)[t * D + j]);
    return (float)((const int8_t *)c)[t * D + j] * s[t];
}

/* The pieces of one head's attention; kv_attn_generic runs them over everything, the split
 * passes (bitlm_kv_keys_run / bitlm_kv_values_run) over parts of it: the same operations on
 * every value, so the same bits. */

/* Scores of positions [t0, t1) into scores[t]; returns their max (-inf if none; a NaN score never
 * becomes it). */
static float kv_keys_generic(int type, const float *q, const void *kc, const float *ks, int64_t t0, int64_t t1,
                             int64_t D, float scale, float *scores) {
    float m = -INFINITY;
    for (int64_t t = t0; t < t1; t++) {
        float lane[16] = {0};
        int64_t j = 0;
        for (; j + 16 <= D; j += 16)
            for (int l = 0; l < 16; l++) lane[l] = lane[l] + q[j + l] * kv_load(type, kc, ks, t, D, j + l);
        for (; j < D; j++) lane[j & 15] = lane[j & 15] + q[j] * kv_load(type, kc, ks, t, D, j);
        const float s = bitlm_fold16f(lane) * scale;
        scores[t] = s;
        m = s > m ? s : m;
    }
    return m;
}

/* Output columns [c0, c1): each sums e[t] * v_t over t in order from 0, then divides by sum. */
static void kv_values_generic(int type, const void *vc, const float *vs, int64_t T, int64_t D, int64_t c0, int64_t c1,
                              const float *e, float sum, float *out) {
    for (int64_t j = c0; j < c1; j++) out[j] = 0.0f;
    for (int64_t t = 0; t < T; t++) {
        const float et = e[t];
        for (int64_t j = c0; j < c1; j++) out[j] = out[j] + et * kv_load(type, vc, vs, t, D, j);
    }
    for (int64_t j = c0; j < c1; j++) out[j] = out[j] / sum;
}

static void kv_attn_generic(int type, const float *q, const void *kc, const float *ks, const void *vc, const float *vs,
                            int64_t T, int64_t D, float scale, float *scores, float *out) {
    const float m = kv_keys_generic(type, q, kc, ks, 0, T, D, scale, scores);
    const float sum = bitlm_softmax_exp(scores, scores, T, m);
    kv_values_generic(type, vc, vs, T, D, 0, D, scores, sum, out);
}

#if defined(__x86_64__) && defined(BITLM_HAVE_AVX512)
#define KV512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))

KV512 static inline __m512 kv_load16(int type, const void *c, const float *s, int64_t t, int64_t D, int64_t j) {
    if (type == BITLM_KV_F16)
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)((const uint16_t *)c + t * D + j)));
    const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(const void *)((const int8_t *)c + t * D + j))));
    return _mm512_mul_ps(v, _mm512_set1_ps(s[t]));
}

/* bitlm_fold16f of the 16 lanes of a, in registers: the same additions of the same pairs
 * (l[j] += l[j+8], += l[j+4], += l[j+2], l[0] + l[1]; float addition is commutative). */
KV512 static inline float kv_fold16(__m512 a) {
    a = _mm512_add_ps(a, _mm512_shuffle_f32x4(a, a, _MM_SHUFFLE(3, 2, 3, 2))); /* lanes 0-7 += lanes 8-15 */
    a = _mm512_add_ps(a, _mm512_shuffle_f32x4(a, a, _MM_SHUFFLE(1, 1, 1, 1))); /* lanes 0-3 += lanes 4-7 */
    a = _mm512_add_ps(a, _mm512_permute_ps(a, _MM_SHUFFLE(3, 2, 3, 2)));       /* lanes 0-1 += lanes 2-3 */
    a = _mm512_add_ps(a, _mm512_permute_ps(a, _MM_SHUFFLE(1, 1, 1, 1)));       /* lane 0 += lane 1 */
    return _mm512_cvtss_f32(a);
}

/* bitlm_exp_softmax (internal.h) on 16 lanes: the same operations in the same order, so the same
 * bits (max(LO, x) and min(0, x) are the scalar clamps, NaN included; cvttps2dq turns a NaN n
 * into 0x80000000, whose 2^n bits are the scalar's 2^0). */
KV512 static inline __m512 kv_exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(BITLM_EXP_LO), x);
    x = _mm512_min_ps(_mm512_setzero_ps(), x); /* 0 < x ? 0 : x, NaN kept: the scalar's upper clamp */
    const __m512 magic = _mm512_set1_ps(BITLM_EXP_MAGIC);
    const __m512 n = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(BITLM_EXP_LOG2E)), magic), magic);
    const __m512 r = _mm512_sub_ps(_mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(BITLM_EXP_C1))),
                                   _mm512_mul_ps(n, _mm512_set1_ps(BITLM_EXP_C2)));
    __m512 p = _mm512_set1_ps(BITLM_EXP_P0);
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(BITLM_EXP_P1));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(BITLM_EXP_P2));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(BITLM_EXP_P3));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(BITLM_EXP_P4));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(BITLM_EXP_P5));
    const __m512 e = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(p, _mm512_mul_ps(r, r)), r), _mm512_set1_ps(1.0f));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(e, _mm512_castsi512_ps(bits));
}

/* bitlm_softmax_exp on 16 lanes, from src into dst (dst may be src): lane l adds the numerators
 * of t = l mod 16 in t order (a masked tail leaves the other lanes as they are), folded as
 * bitlm_fold16f: the same bits. */
KV512 static inline float kv_softmax16(const float *src, float *dst, int64_t T, float m) {
    const __m512 mv = _mm512_set1_ps(m);
    __m512 lane = _mm512_setzero_ps();
    int64_t t = 0;
    for (; t + 16 <= T; t += 16) {
        const __m512 e = kv_exp16(_mm512_sub_ps(_mm512_loadu_ps(src + t), mv));
        _mm512_storeu_ps(dst + t, e);
        lane = _mm512_add_ps(lane, e);
    }
    if (t < T) {
        const __mmask16 k = (__mmask16)((1u << (T - t)) - 1);
        const __m512 e = kv_exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, src + t), mv));
        _mm512_mask_storeu_ps(dst + t, k, e);
        lane = _mm512_mask_add_ps(lane, k, lane, e);
    }
    return kv_fold16(lane);
}

/* How many rows ahead kv_attn_heads prefetches its key / value rows. */
#define KV_PF_ROWS 16

/* The value pass of kv_attn_heads over columns [c0, c0 + 16 NC) of NH heads: each output element
 * sums e_t * v_t over t in order from 0, then divides by the head's sum. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"), always_inline)) static inline void
kv_values(int type, const void *vc, const float *vs, int64_t T, int64_t D, int64_t c0, const float *scores,
          const float *sum, float *out, const int NH, const int NC) {
    const int64_t es = type == BITLM_KV_F16 ? 2 : 1, rb = D * es;
    __m512 o[4][4];
    for (int r = 0; r < NH; r++)
        for (int c = 0; c < NC; c++) o[r][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < T; t++) {
        if (t + KV_PF_ROWS < T) /* this pass's 16 * NC values of the row */
            for (int64_t b = 0; b < 16 * NC * es; b += 64)
                _mm_prefetch((const char *)vc + (t + KV_PF_ROWS) * rb + c0 * es + b, _MM_HINT_T0);
        __m512 vj[4];
        for (int c = 0; c < NC; c++) vj[c] = kv_load16(type, vc, vs, t, D, c0 + 16 * c);
        for (int r = 0; r < NH; r++) {
            const __m512 et = _mm512_set1_ps(scores[r * T + t]);
            for (int c = 0; c < NC; c++) o[r][c] = _mm512_add_ps(o[r][c], _mm512_mul_ps(et, vj[c]));
        }
    }
    for (int r = 0; r < NH; r++)
        for (int c = 0; c < NC; c++)
            _mm512_storeu_ps(out + r * D + c0 + 16 * c, _mm512_div_ps(o[r][c], _mm512_set1_ps(sum[r])));
}

/* The scores of NH (1-4) query heads that share one kv head at one position t (row pointer of
 * the key row): lane l of each head's accumulator is exactly kv_keys_generic's lane l. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"), always_inline)) static inline void
kv_key_row(int type, const float *q, const void *kc, const float *ks, int64_t t, int64_t D, __m512 acc[4], const int NH) {
    for (int r = 0; r < NH; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t j = 0; j < D; j += 16) {
        const __m512 kj = kv_load16(type, kc, ks, t, D, j);
        for (int r = 0; r < NH; r++) acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(_mm512_loadu_ps(q + r * D + j), kj));
    }
}

/* Scores of positions [t0, t1) for NH (1-4) query heads that share one kv head (GQA), D % 16 == 0,
 * into scores[r * T + t]; m[r] = their max per head, as kv_keys_generic's.  Every key row is read
 * once for all of them, and the range is walked as two streams at once, its first and second
 * half (one stream of a few GB/s per core left memory idle: 2B4T shape at 4,096 positions,
 * ~15 % faster); each score is the same computation wherever it runs, and the first half's max
 * before the second's keeps the sequential loop's choice among equal maxima. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"), always_inline)) static inline void
kv_keys_heads(int type, const float *q, const void *kc, const float *ks, int64_t t0, int64_t t1, int64_t T,
              int64_t D, float scale, float *scores, float m[4], const int NH) {
    const int64_t es = type == BITLM_KV_F16 ? 2 : 1, rb = D * es; /* bytes per value, per cached row */
    const int64_t h = (t1 - t0) / 2;
    float m2[4];
    for (int r = 0; r < NH; r++) m[r] = m2[r] = -INFINITY;
    for (int64_t t = t0; t < t0 + h; t++) {
        const int64_t u = t + h;
        if (u + KV_PF_ROWS < t1)
            for (int64_t b = 0; b < rb; b += 64) {
                _mm_prefetch((const char *)kc + (t + KV_PF_ROWS) * rb + b, _MM_HINT_T0);
                _mm_prefetch((const char *)kc + (u + KV_PF_ROWS) * rb + b, _MM_HINT_T0);
            }
        __m512 a1[4], a2[4];
        kv_key_row(type, q, kc, ks, t, D, a1, NH);
        kv_key_row(type, q, kc, ks, u, D, a2, NH);
        for (int r = 0; r < NH; r++) {
            const float s1 = kv_fold16(a1[r]) * scale, s2 = kv_fold16(a2[r]) * scale;
            scores[r * T + t] = s1;
            scores[r * T + u] = s2;
            m[r] = s1 > m[r] ? s1 : m[r];
            m2[r] = s2 > m2[r] ? s2 : m2[r];
        }
    }
    for (int r = 0; r < NH; r++) m[r] = m2[r] > m[r] ? m2[r] : m[r];
    for (int64_t t = t0 + 2 * h; t < t1; t++) { /* an odd range's last position */
        __m512 a1[4];
        kv_key_row(type, q, kc, ks, t, D, a1, NH);
        for (int r = 0; r < NH; r++) {
            const float s1 = kv_fold16(a1[r]) * scale;
            scores[r * T + t] = s1;
            m[r] = s1 > m[r] ? s1 : m[r];
        }
    }
}

/* Output columns [c0, c1) (multiples of 16) of NH heads from their numerators e (stride T) and
 * sums, 64 columns per pass (the accumulators stay in registers). */
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"), always_inline)) static inline void
kv_values_cols(int type, const void *vc, const float *vs, int64_t T, int64_t D, int64_t c0, int64_t c1, const float *e,
               const float *sum, float *out, const int NH) {
    for (; c0 < c1; c0 += 64) {
        switch (c1 - c0 >= 64 ? 4 : (int)((c1 - c0) / 16)) { /* NC a constant */
        case 4: kv_values(type, vc, vs, T, D, c0, e, sum, out, NH, 4); break;
        case 3: kv_values(type, vc, vs, T, D, c0, e, sum, out, NH, 3); break;
        case 2: kv_values(type, vc, vs, T, D, c0, e, sum, out, NH, 2); break;
        default: kv_values(type, vc, vs, T, D, c0, e, sum, out, NH, 1); break;
        }
    }
}

/* NH (1-4) query heads that share one kv head (GQA), D % 16 == 0: every key and value row is read
 * once for all of them instead of once per head, and prefetched KV_PF_ROWS rows ahead (the
 * streams cross a 4 KB page every few rows).  Per head, lane l of the score accumulator is
 * exactly kv_attn_generic's lane l, and each output element sums e_t * v_t over t in order from
 * 0, then divides by the sum: the generic tier's bits. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"), always_inline)) static inline void
kv_attn_heads(int type, const float *q, const void *kc, const float *ks, const void *vc, const float *vs, int64_t T,
              int64_t D, float scale, float *scores, float *out, const int NH) {
    float m[4], sum[4];
    kv_keys_heads(type, q, kc, ks, 0, T, T, D, scale, scores, m, NH);
    for (int r = 0; r < NH; r++) sum[r] = kv_softmax16(scores + r * T, scores + r * T, T, m[r]);
    kv_values_cols(type, vc, vs, T, D, 0, D, scores, sum, out, NH);
}

KV512 static void kv_attn_avx512_heads(int type, const float *q, const void *kc, const float *ks, const void *vc,
                                       const float *vs, int64_t T, int64_t D, float scale, float *scores, float *out,
                                       int nh) {
    switch (nh) {
    case 1: kv_attn_heads(type, q, kc, ks, vc, vs, T, D, scale, scores, out, 1); break;
    case 2: kv_attn_heads(type, q, kc, ks, vc, vs, T, D, scale, scores, out, 2); break;
    case 3: kv_attn_heads(type, q, kc, ks, vc, vs, T, D, scale, scores, out, 3); break;
    default: kv_attn_heads(type, q, kc, ks, vc, vs, T, D, scale, scores, out, 4); break;
    }
}

KV512 static void kv_keys_avx512(int type, const float *q, const void *kc, const float *ks, int64_t t0, int64_t t1,
                                 int64_t T, int64_t D, float scale, float *scores, float *m, int nh) {
    switch (nh) {
    case 1: kv_keys_heads(type, q, kc, ks, t0, t1, T, D, scale, scores, m, 1); break;
    case 2: kv_keys_heads(type, q, kc, ks, t0, t1, T, D, scale, scores, m, 2); break;
    case 3: kv_keys_heads(type, q, kc, ks, t0, t1, T, D, scale, scores, m, 3); break;
    default: kv_keys_heads(type, q, kc, ks, t0, t1, T, D, scale, scores, m, 4); break;
    }
}

KV512 static void kv_values_avx512(int type, const void *vc, const float *vs, int64_t T, int64_t D, int64_t c0,
                                   int64_t c1, const float *e, const float *sum, float *out, int nh) {
    switch (nh) {
    case 1: kv_values_cols(type, vc, vs, T, D, c0, c1, e, sum, out, 1); break;
    case 2: kv_values_cols(type, vc, vs, T, D, c0, c1, e, sum, out, 2); break;
    case 3: kv_values_cols(type, vc, vs, T, D, c0, c1, e, sum, out, 3); break;
    default: kv_values_cols(type, vc, vs, T, D, c0, c1, e, sum, out, 4); break;
    }
}
#endif

/* The rows of kv head g in a task's caches. */
typedef struct {
    const void *kc, *vc;
    const float *ks, *vs;
} kv_rows;

static kv_rows kv_head_rows(const bitlm_kv_attn_task *a, int64_t g) {
    const size_t esz = a->type == BITLM_KV_F16 ? 2 : 1;
    const int64_t row0 = g * a->max_len;
    kv_rows r = {(const uint8_t *)a->kc + (size_t)(row0 * a->D) * esz, (const uint8_t *)a->vc + (size_t)(row0 * a->D) * esz,
                 a->ks ? a->ks + row0 : NULL, a->vs ? a->vs + row0 : NULL};
    return r;
}

/* The AVX-512 pieces take D % 16 == 0; everything else runs the generic ones (the same bits). */
static int kv_wide(const bitlm_kv_attn_task *a) {
#if defined(__x86_64__) && defined(BITLM_HAVE_AVX512)
    return a->D % 16 == 0 && bitlm_tier() >= BITLM_TIER_AVX512;
#else
    (void)a;
    return 0;
#endif
}

BITLM_HIDDEN void bitlm_kv_attn_run(void *ctx, int64_t b, int64_t e) {
    const bitlm_kv_attn_task *a = (const bitlm_kv_attn_task *)ctx;
    const int wide = kv_wide(a);
    for (int64_t h = b; h < e; h++) {
        const int64_t kv = h / a->rep;
        const kv_rows r = kv_head_rows(a, kv);
#if defined(__x86_64__) && defined(BITLM_HAVE_AVX512)
        if (wide) { /* this share's heads of kv head `kv`, up to 4 at a time */
            const int64_t n = bitlm_group_heads(h, e, a->rep);
            kv_attn_avx512_heads(a->type, a->q + h * a->D, r.kc, r.ks, r.vc, r.vs, a->T, a->D, a->scale,
                                 a->scores + h * a->T, a->out + h * a->D, (int)n);
            h += n - 1;
            continue;
        }
#endif
        kv_attn_generic(a->type, a->q + h * a->D, r.kc, r.ks, r.vc, r.vs, a->T, a->D, a->scale, a->scores + h * a->T,
                        a->out + h * a->D);
    }
}

/* ---- the split passes (long caches) ------------------------------------------------------ */

BITLM_HIDDEN int64_t bitlm_kv_col_blocks(int64_t D) { return (D + KV_COL_BLOCK - 1) / KV_COL_BLOCK; }

BITLM_HIDDEN void bitlm_kv_keys_run(void *ctx, int64_t b, int64_t e) {
    const bitlm_kv_attn_task *a = (const bitlm_kv_attn_task *)ctx;
    const int wide = kv_wide(a);
    const int64_t P = a->parts, T = a->T, D = a->D, rep = a->rep;
    for (int64_t u = b; u < e; u++) {
        const int64_t g = u / P, c = u % P, t0 = T * c / P, t1 = T * (c + 1) / P;
        const kv_rows r = kv_head_rows(a, g);
        float *pm = a->pmax + u * rep;
        for (int64_t h0 = 0, n = 1; h0 < rep; h0 += n) {
            const int64_t h = g * rep + h0;
#if defined(__x86_64__) && defined(BITLM_HAVE_AVX512)
            if (wide) {
                n = rep - h0 < 4 ? rep - h0 : 4;
                kv_keys_avx512(a->type, a->q + h * D, r.kc, r.ks, t0, t1, T, D, a->scale, a->scores + h * T, pm + h0, (int)n);
                continue;
            }
#endif
            pm[h0] = kv_keys_generic(a->type, a->q + h * D, r.kc, r.ks, t0, t1, D, a->scale, a->scores + h * T);
        }
    }
}

BITLM_HIDDEN void bitlm_kv_values_run(void *ctx, int64_t b, int64_t e) {
    const bitlm_kv_attn_task *a = (const bitlm_kv_attn_task *)ctx;
    const int wide = kv_wide(a);
    const int64_t P = a->parts, T = a->T, D = a->D, rep = a->rep, NB = bitlm_kv_col_blocks(D), H = a->Hkv * rep;
    for (int64_t u = b; u < e; u++) {
        const int64_t g = u / NB, cb = u % NB, c0 = cb * KV_COL_BLOCK, c1 = c0 + KV_COL_BLOCK < D ? c0 + KV_COL_BLOCK : D;
        const kv_rows r = kv_head_rows(a, g);
        float *es = a->escores + (cb * H + g * rep) * T; /* this unit's numerators, head by head */
        for (int64_t h0 = 0, n = 1; h0 < rep; h0 += n) {
            n = wide ? (rep - h0 < 4 ? rep - h0 : 4) : 1;
            float sum[4];
            for (int64_t i = 0; i < n; i++) {
                const int64_t h = g * rep + h0 + i;
                float m = -INFINITY; /* the parts' maxima in order: the sequential loop's max */
                for (int64_t c = 0; c < P; c++) {
                    const float pc = a->pmax[(g * P + c) * rep + h0 + i];
                    m = pc > m ? pc : m;
                }
#if defined(__x86_64__) && defined(BITLM_HAVE_AVX512)
                if (wide) {
                    sum[i] = kv_softmax16(a->scores + h * T, es + (h0 + i) * T, T, m);
                    continue;
                }
#endif
                sum[i] = bitlm_softmax_exp(a->scores + h * T, es + (h0 + i) * T, T, m);
            }
#if defined(__x86_64__) && defined(BITLM_HAVE_AVX512)
            if (wide) {
                kv_values_avx512(a->type, r.vc, r.vs, T, D, c0, c1, es + h0 * T, sum, a->out + (g * rep + h0) * D, (int)n);
                continue;
            }
#endif
            kv_values_generic(a->type, r.vc, r.vs, T, D, c0, c1, es + h0 * T, sum[0], a->out + (g * rep + h0) * D);
        }
    }
}

/* Positions from which bitlm_decode_step splits the attention (0: never); BITLM_ATTN_SPLIT sets
 * the first value. */
static _Atomic int64_t g_attn_split = -1;

BITLM_HIDDEN int64_t bitlm_attn_split(void) {
    int64_t v = atomic_load(&g_attn_split);
    if (v < 0) {
        const char *env = getenv("BITLM_ATTN_SPLIT");
        char *end = NULL;
        v = env && *env ? strtoll(env, &end, 10) : KV_SPLIT_DEFAULT;
        if (env && *env && (*end != '\0' || v < 0)) v = KV_SPLIT_DEFAULT; /* not a count: the default */
        int64_t expect = -1;
        if (!atomic_compare_exchange_strong(&g_attn_split, &expect, v)) v = expect;
    }
    return v;
}

BITLM_API int64_t bitlm_set_attn_split(int64_t positions) {
    const int64_t prev = bitlm_attn_split();
    if (positions >= 0) atomic_store(&g_attn_split, positions);
    return prev;
}

BITLM_API int bitlm_kv_quantize(int type, const float *x, int64_t rows, int64_t d, void *out, float *scales) {
    if (!x || !out || rows < 0 || d < 1 || (type != BITLM_KV_F32 && type != BITLM_KV_F16 && type != BITLM_KV_I8) ||
        (type == BITLM_KV_I8 && !scales))
        return BITLM_EINVAL;
    for (int64_t r = 0; r < rows; r++) bitlm_kv_store(type, out, scales, r, x + r * d, d);
    return 0;
}
