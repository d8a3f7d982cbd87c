/*
 * x86_avx2.c — AVX2 + FMA tier (Haswell / Zen 1 and later).  The only file built with
 * -mavx2 -mfma.
 *
 * Same layouts as the AVX-512 tier, processed as two ymm halves per 64-byte chunk: bytes 0..31
 * are tile rows 0..7, bytes 32..63 rows 8..15 (one row per dword lane).  Without VNNI the
 * 4-wide u8 x s8 dot product is vpmaddubsw (pairs -> int16) + vpmaddwd with ones (-> int32).
 *
 * Saturation: vpmaddubsw saturates its int16 pair sums, but with codes <= 2 a pair is at most
 * 2*128 + 2*128 = 512 in magnitude, and each pair sum goes straight to int32 through
 * vpmaddwd — no int16 accumulation, so the extremal cases (all +127 x all +1, -128 x -1) are
 * exact.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "internal.h"
#include "attn_impl.h"
#include "hadamard_impl.h"

#define ALWAYS_INLINE static inline __attribute__((always_inline))

#define QPC(fmt) ((fmt) == BITLM_FMT_I2 ? 4 : (fmt) == BITLM_FMT_T1 ? 5 : 8)

typedef struct {
    __m256i m3, one, c85, c170, ones16, zero, bsel, bidx;
} consts_t;

ALWAYS_INLINE consts_t make_consts(void) {
    consts_t c;
    c.m3 = _mm256_set1_epi8(3);
    c.one = _mm256_set1_epi8(1);
    c.c85 = _mm256_set1_epi8((char)85);
    c.c170 = _mm256_set1_epi8((char)170);
    c.ones16 = _mm256_set1_epi16(1);
    c.zero = _mm256_setzero_si256();
    /* b1: lane byte j takes bit j of a 32-bit word: byte j/8 of the word, bit j%8 */
    c.bsel = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    c.bidx = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
                              3, 3, 3);
    return c;
}

ALWAYS_INLINE __m256i dot4(__m256i acc, __m256i w, __m256i xb, const consts_t *c) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, xb), c->ones16));
}

/* Codes of quad qd for half h (rows 8h..8h+7) of a chunk. */
ALWAYS_INLINE __m256i unpack_quad(const int fmt, __m256i *st, const uint8_t *chunk, const int h, const int qd,
                                  const consts_t *c) {
    if (fmt == BITLM_FMT_I2) {
        return _mm256_and_si256(_mm256_srli_epi32(*st, 2 * qd), c->m3);
    } else if (fmt == BITLM_FMT_T1) {
        /* d = [m >= 86] + [m >= 171]; [m >= t+1] = min(m -sat t, 1) (AVX2 has no unsigned
         * byte compare; this is one op shorter than max + cmpeq) */
        const __m256i m = *st;
        const __m256i ge86 = _mm256_min_epu8(_mm256_subs_epu8(m, c->c85), c->one);
        const __m256i ge171 = _mm256_min_epu8(_mm256_subs_epu8(m, c->c170), c->one);
        *st = _mm256_add_epi8(_mm256_add_epi8(m, m), m);
        return _mm256_add_epi8(ge86, ge171);
    } else {
        const __m256i v = _mm256_set1_epi32(bitlm_load_i32(chunk + 8 * qd + 4 * h));
        const __m256i bits = _mm256_and_si256(_mm256_shuffle_epi8(v, c->bidx), c->bsel);
        return _mm256_min_epu8(bits, c->one); /* nonzero -> 1 */
    }
}

ALWAYS_INLINE __m256i chunk_half(const int fmt, const uint8_t *chunk, const int h) {
    if (fmt == BITLM_FMT_B1) return _mm256_setzero_si256();
    return _mm256_loadu_si256((const __m256i *)(const void *)(chunk + 32 * h));
}

ALWAYS_INLINE void store_tile(const bitlm_problem *p, int64_t m, int64_t t, __m256i lo, __m256i hi) {
    int32_t raw[16];
    _mm256_storeu_si256((__m256i *)(void *)raw, lo);
    _mm256_storeu_si256((__m256i *)(void *)(raw + 8), hi);
    bitlm_store_tile_scalar(p, m, t, raw);
}

/* ---- GEMV ---------------------------------------------------------------------------------- */

#ifndef GEMV_PREFETCH
#define GEMV_PREFETCH 8192 /* bytes ahead; see x86_avx512.c */
#endif

/* One tile at a time (one sequential weight stream per thread).  Within a chunk the vpmaddubsw
 * results of all quads are summed in int16 before a single vpmaddwd: at most 8 terms of
 * magnitude <= 512 (codes <= 2) or <= 256 (b1), far from int16 saturation. */
ALWAYS_INLINE void gemv_tile(const bitlm_problem *p, const int fmt, int64_t t) {
    const consts_t c = make_consts();
    const int bk = 4 * QPC(fmt);
    __m256i acc[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
    const uint8_t *wt = p->w + t * p->tile_bytes;
    for (int64_t ch = 0; ch < p->nchunks; ch++) {
        const uint8_t *chunk = wt + ch * 64;
        _mm_prefetch((const char *)chunk + GEMV_PREFETCH, _MM_HINT_T0);
        __m256i xb[8];
#pragma GCC unroll 8
        for (int qd = 0; qd < 8; qd++) {
            if (qd >= QPC(fmt)) break;
            xb[qd] = _mm256_set1_epi32(bitlm_load_i32(p->x + ch * bk + 4 * qd));
        }
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            __m256i st = chunk_half(fmt, chunk, h);
            __m256i s16 = _mm256_setzero_si256();
#pragma GCC unroll 8
            for (int qd = 0; qd < 8; qd++) {
                if (qd >= QPC(fmt)) break;
                s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(unpack_quad(fmt, &st, chunk, h, qd, &c), xb[qd]));
            }
            acc[h] = _mm256_add_epi32(acc[h], _mm256_madd_epi16(s16, c.ones16));
        }
    }
    store_tile(p, 0, t, acc[0], acc[1]);
}

/* ---- GEMM: one tile x MT tokens (2*MT accumulators of the 16 ymm) ------------------------------ */

/* pf: prefetch the weight stream GEMV_PREFETCH bytes ahead (small M, see x86_avx512.c). */
ALWAYS_INLINE void gemm_block(const bitlm_problem *p, const int fmt, const int MT, int64_t t, int64_t m0, const int pf) {
    const consts_t c = make_consts();
    const int bk = 4 * QPC(fmt);
    const int64_t kp = p->Kp;
    __m256i acc[4][2];
    for (int mi = 0; mi < MT; mi++) acc[mi][0] = acc[mi][1] = _mm256_setzero_si256();
    const uint8_t *wt = p->w + t * p->tile_bytes;
    const int8_t *x = p->x + m0 * kp;
    for (int64_t ch = 0; ch < p->nchunks; ch++) {
        __m256i st[2];
        if (pf) _mm_prefetch((const char *)wt + ch * 64 + GEMV_PREFETCH, _MM_HINT_T0);
        for (int h = 0; h < 2; h++) st[h] = chunk_half(fmt, wt + ch * 64, h);
#pragma GCC unroll 8
        for (int qd = 0; qd < 8; qd++) {
            if (qd >= QPC(fmt)) break;
            __m256i w[2];
            for (int h = 0; h < 2; h++) w[h] = unpack_quad(fmt, &st[h], wt + ch * 64, h, qd, &c);
            for (int mi = 0; mi < MT; mi++) {
                const __m256i xb = _mm256_set1_epi32(bitlm_load_i32(x + mi * kp + ch * bk + 4 * qd));
                for (int h = 0; h < 2; h++) acc[mi][h] = dot4(acc[mi][h], w[h], xb, &c);
            }
        }
    }
    for (int mi = 0; mi < MT; mi++) store_tile(p, m0 + mi, t, acc[mi][0], acc[mi][1]);
}

ALWAYS_INLINE void mm_any(const bitlm_problem *p, const int fmt, int64_t t0, int64_t t1) {
    if (p->M == 1) {
        for (int64_t t = t0; t < t1; t++) gemv_tile(p, fmt, t);
        return;
    }
    /* activation rows per outer block: keep MB x Kp bytes in L2 (see x86_avx512.c) */
    int64_t mb = p->x_block_bytes / p->Kp;
    mb = mb < 4 ? 4 : mb - mb % 4;
    if (p->M <= p->small_m_max) { /* small M: the weight stream is what the blocks wait for */
        for (int64_t t = t0; t < t1; t++) {
            int64_t m0 = 0;
            for (; m0 + 4 <= p->M; m0 += 4) gemm_block(p, fmt, 4, t, m0, 1);
            switch (p->M - m0) {
            case 3: gemm_block(p, fmt, 3, t, m0, 1); break;
            case 2: gemm_block(p, fmt, 2, t, m0, 1); break;
            case 1: gemm_block(p, fmt, 1, t, m0, 1); break;
            default: break;
            }
        }
        return;
    }
    for (int64_t mb0 = 0; mb0 < p->M; mb0 += mb) {
        const int64_t mb1 = mb0 + mb < p->M ? mb0 + mb : p->M;
        for (int64_t t = t0; t < t1; t++) {
            int64_t m0 = mb0;
            for (; m0 + 4 <= mb1; m0 += 4) gemm_block(p, fmt, 4, t, m0, 0);
            switch (mb1 - m0) {
            case 3: gemm_block(p, fmt, 3, t, m0, 0); break;
            case 2: gemm_block(p, fmt, 2, t, m0, 0); break;
            case 1: gemm_block(p, fmt, 1, t, m0, 0); break;
            default: break;
            }
        }
    }
}

static void mm_i2(const bitlm_problem *p, int64_t t0, int64_t t1) { mm_any(p, BITLM_FMT_I2, t0, t1); }
static void mm_t1(const bitlm_problem *p, int64_t t0, int64_t t1) { mm_any(p, BITLM_FMT_T1, t0, t1); }
static void mm_b1(const bitlm_problem *p, int64_t t0, int64_t t1) { mm_any(p, BITLM_FMT_B1, t0, t1); }

/* ---- fused RMSNorm + quantiser --------------------------------------------------------------- */

static void quant_row_avx2(const float *x, int64_t k, const float *nw, double eps, int do_norm, int8_t *q,
                           float *a_out) {
    float rs = 1.0f;
    if (do_norm) {
        /* lanes 0-3, 4-7, 8-11, 12-15 of the documented 16-lane double sum */
        __m256d s[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
        int64_t i = 0;
        for (; i + 16 <= k; i += 16) {
            for (int h = 0; h < 4; h++) {
                const __m256d v = _mm256_cvtps_pd(_mm_loadu_ps(x + i + 4 * h));
                s[h] = _mm256_add_pd(s[h], _mm256_mul_pd(v, v));
            }
        }
        double lane[16];
        for (int h = 0; h < 4; h++) _mm256_storeu_pd(lane + 4 * h, s[h]);
        for (; i < k; i++) lane[i & 15] += (double)x[i] * (double)x[i];
        for (int j = 0; j < 8; j++) lane[j] += lane[j + 8];
        for (int j = 0; j < 4; j++) lane[j] += lane[j + 4];
        for (int j = 0; j < 2; j++) lane[j] += lane[j + 2];
        lane[0] += lane[1];
        rs = (float)(1.0 / sqrt(lane[0] / (double)k + eps));
    }
    const __m256 vr = _mm256_set1_ps(rs);
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 vmax = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
        __m256 y = _mm256_loadu_ps(x + i);
        if (do_norm) {
            y = _mm256_mul_ps(y, vr);
            if (nw) y = _mm256_mul_ps(y, _mm256_loadu_ps(nw + i));
        }
        vmax = _mm256_max_ps(vmax, _mm256_and_ps(y, absmask));
    }
    float lanes[8], amax = 0.0f;
    _mm256_storeu_ps(lanes, vmax);
    for (int j = 0; j < 8; j++) amax = lanes[j] > amax ? lanes[j] : amax;
    for (int64_t r = i; r < k; r++) {
        float y = x[r];
        if (do_norm) {
            y = y * rs;
            if (nw) y = y * nw[r];
        }
        amax = fabsf(y) > amax ? fabsf(y) : amax;
    }
    const float a = bitlm_act_scale(amax);
    const __m256 va = _mm256_set1_ps(a);
    const __m256i gather = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (i = 0; i + 8 <= k; i += 8) {
        __m256 y = _mm256_loadu_ps(x + i);
        if (do_norm) {
            y = _mm256_mul_ps(y, vr);
            if (nw) y = _mm256_mul_ps(y, _mm256_loadu_ps(nw + i));
        }
        const __m256 r = _mm256_round_ps(_mm256_mul_ps(y, va), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m256i iv = _mm256_cvtps_epi32(r); /* exact: r is integral */
        /* saturating packs = clamp to [-128, 127]; packs work per 128-bit lane, so gather the
         * two lanes' low dwords back together */
        const __m256i w16 = _mm256_packs_epi32(iv, iv);
        const __m256i b8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w16, w16), gather);
        _mm_storel_epi64((__m128i *)(void *)(q + i), _mm256_castsi256_si128(b8));
    }
    for (; i < k; i++) {
        float y = x[i];
        if (do_norm) {
            y = y * rs;
            if (nw) y = y * nw[i];
        }
        float v = rintf(y * a);
        v = v < -128.0f ? -128.0f : (v > 127.0f ? 127.0f : v);
        q[i] = (int8_t)v;
    }
    *a_out = a;
}

/* ---- dense int8 / bf16 heads: 16 lanes = two ymm (lanes 0-7, 8-15); mul then add, no FMA ---- */

#define W_I8 0   /* int8 rows, one float scale per row */
#define W_BF16 1 /* bf16 rows, no scale */
#define W_I8A8 2 /* int8 rows and scale, int8 activations (exact integer sums) */

ALWAYS_INLINE __m256 load_w8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)p)));
}

/* 8 bf16 -> 8 float (exact: zero-extend, shift into the upper half). */
ALWAYS_INLINE __m256 load_bf16x8(const uint16_t *p) {
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(const void *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}

ALWAYS_INLINE __m256 load_w(const int WT, const bitlm_dense_problem *p, int64_t i) {
    return WT == W_BF16 ? load_bf16x8(p->wb + i) : load_w8(p->w + i);
}

ALWAYS_INLINE float w_at(const int WT, const bitlm_dense_problem *p, int64_t i) {
    return WT == W_BF16 ? bitlm_bf16_to_f32(p->wb[i]) : (float)p->w[i];
}

/* R rows x T tokens (R*T <= 4, 8 accumulators); the K tail (< 16) is added lane by lane in
 * scalar code, then the documented fold.  WT: the weight type. */
ALWAYS_INLINE void dense_block(const int WT, const bitlm_dense_problem *p, const int R, const int T, int64_t n,
                               int64_t m) {
    const int64_t K = p->K, K16 = K & ~(int64_t)15;
    const int B = WT == W_BF16 ? 2 : 1; /* bytes per weight */
    __m256 acc[4][2][2];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t][0] = acc[r][t][1] = _mm256_setzero_ps();
    const int64_t w0 = n * K; /* element index of row n */
    const char *wbytes = WT == W_BF16 ? (const char *)p->wb : (const char *)p->w;
    const float *x = p->x + m * K;
    for (int64_t k = 0; k < K16; k += 16) {
        if (T == 1 && ((k * B) & 63) == 0)
            for (int r = 0; r < R; r++) _mm_prefetch(wbytes + (w0 + (r + R) * K + k) * B + 512, _MM_HINT_T0);
        for (int h = 0; h < 2; h++) {
            __m256 xv[2];
            for (int t = 0; t < T; t++) xv[t] = _mm256_loadu_ps(x + t * K + k + 8 * h);
            for (int r = 0; r < R; r++) {
                const __m256 wv = load_w(WT, p, w0 + r * K + k + 8 * h);
                for (int t = 0; t < T; t++) acc[r][t][h] = _mm256_add_ps(acc[r][t][h], _mm256_mul_ps(xv[t], wv));
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) {
            float lane[16];
            _mm256_storeu_ps(lane, acc[r][t][0]);
            _mm256_storeu_ps(lane + 8, acc[r][t][1]);
            const int64_t wr = w0 + r * K;
            const float *xr = x + t * K;
            for (int64_t k = K16; k < K; k++) lane[k & 15] = lane[k & 15] + xr[k] * w_at(WT, p, wr + k);
            const float s = bitlm_fold16f(lane);
            p->y[(m + t) * p->N + n + r] = WT == W_BF16 ? s : s * p->scale[n + r];
        }
}

/* W8A8 head (W_I8A8): exact int32 sums of int8 x int8 (vpmaddwd on sign-extended 16-bit pairs),
 * R rows x T tokens (R*T <= 4); the K tail (< 16) in scalar code. */
ALWAYS_INLINE void i8a8_block(const bitlm_dense_problem *p, const int R, const int T, int64_t n, int64_t m) {
    const int64_t K = p->K, K16 = K & ~(int64_t)15;
    __m256i acc[4][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm256_setzero_si256();
    const int8_t *w = p->w + n * K, *x = p->xq + m * K;
    for (int64_t k = 0; k < K16; k += 16) {
        if (T == 1 && (k & 63) == 0)
            for (int r = 0; r < R; r++) _mm_prefetch((const char *)(w + (r + R) * K + k) + 512, _MM_HINT_T0);
        __m256i xv[4];
        for (int t = 0; t < T; t++) xv[t] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(const void *)(x + t * K + k)));
        for (int r = 0; r < R; r++) {
            const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(const void *)(w + r * K + k)));
            for (int t = 0; t < T; t++) acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(wv, xv[t]));
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) {
            int32_t lane[8];
            _mm256_storeu_si256((__m256i *)(void *)lane, acc[r][t]);
            uint32_t s = 0; /* wrapping: exact modulo 2^32, and the true sum fits (K < 2^17) */
            for (int j = 0; j < 8; j++) s += (uint32_t)lane[j];
            for (int64_t k = K16; k < K; k++) s += (uint32_t)((int32_t)x[t * K + k] * w[r * K + k]);
            bitlm_i8a8_store(p, m + t, n + r, s);
        }
}

/* One block of any head kind (WT a constant: the branch folds away). */
ALWAYS_INLINE void head_block(const int WT, const bitlm_dense_problem *p, const int R, const int T, int64_t n,
                              int64_t m) {
    if (WT == W_I8A8)
        i8a8_block(p, R, T, n, m);
    else
        dense_block(WT, p, R, T, n, m);
}

ALWAYS_INLINE void dense_rows_avx2(const int WT, const bitlm_dense_problem *p, int64_t n0, int64_t n1) {
    if (p->M == 1) { /* decode: 4 rows at a time, one token */
        int64_t n = n0;
        for (; n + 4 <= n1; n += 4) head_block(WT, p, 4, 1, n, 0);
        for (; n < n1; n++) head_block(WT, p, 1, 1, n, 0);
        return;
    }
    /* panels of PR rows (PR*K weights, L2-resident: 64 int8 or 32 bf16 rows, the same bytes)
     * against all tokens */
    const int64_t PR = WT == W_BF16 ? 32 : 64;
    for (int64_t pn = n0; pn < n1; pn += PR) {
        const int64_t pe = pn + PR < n1 ? pn + PR : n1;
        for (int64_t m = 0; m < p->M; m += 2) {
            const int T = p->M - m >= 2 ? 2 : 1;
            int64_t n = pn;
            if (T == 2) {
                for (; n + 2 <= pe; n += 2) head_block(WT, p, 2, 2, n, m);
                if (n < pe) head_block(WT, p, 1, 2, n, m);
            } else {
                for (; n + 2 <= pe; n += 2) head_block(WT, p, 2, 1, n, m);
                if (n < pe) head_block(WT, p, 1, 1, n, m);
            }
        }
    }
}

static void dense_avx2(const bitlm_dense_problem *p, int64_t n0, int64_t n1) { dense_rows_avx2(W_I8, p, n0, n1); }

static void dense_bf16_avx2(const bitlm_dense_problem *p, int64_t n0, int64_t n1) {
    dense_rows_avx2(W_BF16, p, n0, n1);
}

static void dense_i8a8_avx2(const bitlm_dense_problem *p, int64_t n0, int64_t n1) { dense_rows_avx2(W_I8A8, p, n0, n1); }

static uint64_t mem_read_avx2(const uint8_t *buf, size_t n) {
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    size_t i = 0;
    for (; i + 128 <= n; i += 128) {
        s0 = _mm256_add_epi64(s0, _mm256_load_si256((const __m256i *)(const void *)(buf + i)));
        s1 = _mm256_add_epi64(s1, _mm256_load_si256((const __m256i *)(const void *)(buf + i + 32)));
        s2 = _mm256_add_epi64(s2, _mm256_load_si256((const __m256i *)(const void *)(buf + i + 64)));
        s3 = _mm256_add_epi64(s3, _mm256_load_si256((const __m256i *)(const void *)(buf + i + 96)));
    }
    for (; i + 32 <= n; i += 32) s0 = _mm256_add_epi64(s0, _mm256_load_si256((const __m256i *)(const void *)(buf + i)));
    s0 = _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3));
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)(void *)lanes, s0);
    return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

const bitlm_kernel_table bitlm_avx2_table = {
    "avx2",
    {NULL, mm_i2, mm_t1, mm_b1},
    quant_row_avx2,
    mem_read_avx2,
    dense_avx2,
    dense_bf16_avx2,
    dense_i8a8_avx2,
    bitlm_attn_heads,
    bitlm_hadamard_row,
    bitlm_attn_heads_bf16,
};
