/*
 * pick.c — the greedy next-token pick: the index of the largest of n floats, as torch's
 * max(dim).indices / argmax give it (the first of tied maxima; a NaN wins, the first NaN).
 * A 128k-vocabulary row in one native pass: torch's reduction spends ~0.4 ms per decode token
 * there (its dispatch runs with cold caches after a token's weights have streamed through).
 * Built with no ISA flags; the AVX-512 version carries a GCC target attribute and is entered only
 * when bitlm_tier() says so.  Every tier returns the same index (comparisons only).
 */
#include <stdint.h>

#include "internal.h"

#if defined(__x86_64__) && defined(BITLM_HAVE_AVX512)
#include <immintrin.h>
#endif

/* The first maximum of x[best] (not NaN) and x[b, n), or the first NaN there. */
static int64_t argmax_scalar(const float *x, int64_t b, int64_t n, int64_t best) {
    float m = x[best];
    for (int64_t i = b; i < n; i++) {
        if (x[i] != x[i]) return i; /* NaN */
        if (x[i] > m) {
            m = x[i];
            best = i;
        }
    }
    return best;
}

#if defined(__x86_64__) && defined(BITLM_HAVE_AVX512)
/* 16 lanes, each keeping its own first maximum (strict >); the first NaN stops the scan; the
 * lanes' maxima are then combined, a tie going to the smaller index: the first maximum overall. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx2"))) static int64_t argmax_avx512(const float *x, int64_t n) {
    __m512 m = _mm512_loadu_ps(x);
    if (_mm512_cmp_ps_mask(m, m, _CMP_UNORD_Q)) return x[0] != x[0] ? 0 : argmax_scalar(x, 1, 16, 0);
    __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i cur = idx;
    const __m512i step = _mm512_set1_epi32(16);
    int64_t i = 16;
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        cur = _mm512_add_epi32(cur, step);
        if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)) return argmax_scalar(x, i, i + 16, i);
        const __mmask16 gt = _mm512_cmp_ps_mask(v, m, _CMP_GT_OQ);
        m = _mm512_mask_mov_ps(m, gt, v);
        idx = _mm512_mask_mov_epi32(idx, gt, cur);
    }
    float mv[16];
    int32_t iv[16];
    _mm512_storeu_ps(mv, m);
    _mm512_storeu_si512((void *)iv, idx);
    int64_t best = iv[0];
    float mb = mv[0];
    for (int l = 1; l < 16; l++)
        if (mv[l] > mb || (mv[l] == mb && iv[l] < best)) {
            mb = mv[l];
            best = iv[l];
        }
    return i < n ? argmax_scalar(x, i, n, best) : best;
}
#endif

BITLM_API int64_t bitlm_argmax_f32(const float *x, int64_t n) {
    if (!x || n < 1 || n > INT32_MAX) return BITLM_EINVAL;
#if defined(__x86_64__) && defined(BITLM_HAVE_AVX512)
    if (n >= 16 && bitlm_tier() >= BITLM_TIER_AVX512) return argmax_avx512(x, n);
#endif
    return x[0] != x[0] ? 0 : argmax_scalar(x, 1, n, 0);
}
