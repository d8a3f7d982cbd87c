/*
 * head_lowbit.c — 6-bit and 4-bit output heads with per-group scales (bitlm_dense_lowbit).
 *
 * Layout and semantics: bitlm_kernels.h ("low-bit heads"); the pure-torch twin is
 * bitlm.kernels.reference.dense_lowbit_matmul and the packer bitlm.packing.pack_head.
 *
 * The sums are laid out so that every tier computes them vertically, lanes = the 16 rows of a
 * tile: one group (32 k) of one tile is 8 operands of 16 rows x 4 k, each a single vpdpbusd
 * (AVX-512 VNNI) or vpmaddubsw + vpmaddwd pair per 8 rows (AVX2) against 4 broadcast
 * activation bytes.  The group's int32 sum is exact, so the only float work (convert, multiply
 * by the group scale, add, in g order) is the same per lane on every tier: the tiers agree
 * bit for bit by construction, and no horizontal reduction is ever needed.
 *
 * This file is built with no ISA flags (like dispatch.c); the AVX2 and AVX-512 kernels carry
 * GCC target attributes and are entered only when bitlm_tier() says so.
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#if defined(__x86_64__) && (defined(BITLM_HAVE_AVX2) || defined(BITLM_HAVE_AVX512))
#include <immintrin.h>
#endif

#define LB_G BITLM_HEAD_GROUP        /* k per group */
#define LB_TOK 64                    /* tokens per block of the token loop */

typedef struct {
    int bits;                 /* 4 or 6 */
    int64_t M, N, K, G;       /* G = ceil(K / 32) */
    int64_t block_bytes;      /* one group of one tile: 256 (int4) or 384 (int6) */
    const int8_t *xq;         /* (M, G*32), zero padded */
    const int32_t *xsum;      /* (M, G): sum of each group's activations */
    const float *a;           /* (M,) */
    const uint8_t *w;         /* packed */
    const uint16_t *scale;    /* (Ntiles, G, 16) f16 bits */
    float *y;                 /* (M, N) */
} lb_problem;

typedef void (*lb_fn)(const lb_problem *p, int64_t t0, int64_t t1);

static inline int lb_offset(int bits) { return bits == 6 ? 32 : 8; }

/* The store of one tile: y = sum / a, rows n < N only. */
static inline void lb_store(const lb_problem *p, int64_t m, int64_t t, const float *sum) {
    const int64_t n0 = t * BITLM_TILE_N, nr = p->N - n0 < BITLM_TILE_N ? p->N - n0 : BITLM_TILE_N;
    for (int64_t r = 0; r < nr; r++) p->y[m * p->N + n0 + r] = sum[r] / p->a[m];
}

/* ---- generic: the literal definition ---------------------------------------------------------- */

/* code(row r, k = 4o + b) of one group block. */
static inline int lb_code(const uint8_t *blk, int bits, int r, int o, int b) {
    const uint8_t lo = blk[(o >> 1) * 64 + 4 * r + b];
    int c = (o & 1) ? lo >> 4 : lo & 15;
    if (bits == 6) c |= ((blk[256 + (o >> 2) * 64 + 4 * r + b] >> (2 * (o & 3))) & 3) << 4;
    return c;
}

static void lb_generic(const lb_problem *p, int64_t t0, int64_t t1) {
    const int off = lb_offset(p->bits);
    float sum[LB_TOK][BITLM_TILE_N];
    int16_t codes[LB_G][BITLM_TILE_N];
    for (int64_t t = t0; t < t1; t++) {
        for (int64_t m0 = 0; m0 < p->M; m0 += LB_TOK) {
            const int64_t mb = p->M - m0 < LB_TOK ? p->M - m0 : LB_TOK;
            memset(sum, 0, sizeof sum);
            for (int64_t g = 0; g < p->G; g++) {
                const uint8_t *blk = p->w + (t * p->G + g) * p->block_bytes;
                const uint16_t *sc = p->scale + (t * p->G + g) * BITLM_TILE_N;
                for (int o = 0; o < 8; o++)
                    for (int b = 0; b < 4; b++)
                        for (int r = 0; r < BITLM_TILE_N; r++) codes[4 * o + b][r] = (int16_t)lb_code(blk, p->bits, r, o, b);
                for (int64_t mi = 0; mi < mb; mi++) {
                    const int8_t *x = p->xq + (m0 + mi) * p->G * LB_G + g * LB_G;
                    const int32_t xs = p->xsum[(m0 + mi) * p->G + g];
                    for (int r = 0; r < BITLM_TILE_N; r++) {
                        int32_t acc = 0;
                        for (int k = 0; k < LB_G; k++) acc += codes[k][r] * x[k];
                        acc -= off * xs;
                        sum[mi][r] = sum[mi][r] + (float)acc * bitlm_f16_to_f32(sc[r]);
                    }
                }
            }
            for (int64_t mi = 0; mi < mb; mi++) lb_store(p, m0 + mi, t, sum[mi]);
        }
    }
}

/* ---- AVX2: vpmaddubsw + vpmaddwd, 8 rows per register ------------------------------------------ */

#if defined(__x86_64__) && defined(BITLM_HAVE_AVX2)
#define AVX2_FN __attribute__((target("avx2,fma"), always_inline)) static inline

/* The 8 operands of one group for rows 8h..8h+7 (h = half of the tile). */
AVX2_FN void lb_codes_avx2(const uint8_t *blk, int bits, int h, __m256i c[8]) {
    const __m256i m4 = _mm256_set1_epi8(15), m2 = _mm256_set1_epi8(3);
    for (int j = 0; j < 4; j++) {
        const __m256i lo = _mm256_loadu_si256((const __m256i *)(const void *)(blk + j * 64 + h * 32));
        c[2 * j] = _mm256_and_si256(lo, m4);
        c[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(lo, 4), m4);
    }
    if (bits == 6)
        for (int j = 0; j < 2; j++) {
            const __m256i hi = _mm256_loadu_si256((const __m256i *)(const void *)(blk + 256 + j * 64 + h * 32));
            for (int q = 0; q < 4; q++) {
                const __m256i h2 = _mm256_and_si256(_mm256_srli_epi16(hi, 2 * q), m2);
                c[4 * j + q] = _mm256_or_si256(c[4 * j + q], _mm256_slli_epi16(h2, 4));
            }
        }
}

__attribute__((target("avx2,fma"))) static void lb_avx2(const lb_problem *p, int64_t t0, int64_t t1) {
    const int off = lb_offset(p->bits);
    const __m256i ones = _mm256_set1_epi16(1);
    float sum[LB_TOK][BITLM_TILE_N] __attribute__((aligned(32)));
    for (int64_t t = t0; t < t1; t++) {
        for (int64_t m0 = 0; m0 < p->M; m0 += LB_TOK) {
            const int64_t mb = p->M - m0 < LB_TOK ? p->M - m0 : LB_TOK;
            memset(sum, 0, sizeof sum);
            for (int64_t g = 0; g < p->G; g++) {
                const uint8_t *blk = p->w + (t * p->G + g) * p->block_bytes;
                const uint16_t *sc = p->scale + (t * p->G + g) * BITLM_TILE_N;
                _mm_prefetch((const char *)(blk + 4 * p->block_bytes), _MM_HINT_T0);
                float scf[BITLM_TILE_N] __attribute__((aligned(32)));
                for (int r = 0; r < BITLM_TILE_N; r++) scf[r] = bitlm_f16_to_f32(sc[r]);
                __m256i c[2][8];
                lb_codes_avx2(blk, p->bits, 0, c[0]);
                lb_codes_avx2(blk, p->bits, 1, c[1]);
                for (int64_t mi = 0; mi < mb; mi++) {
                    const int8_t *x = p->xq + (m0 + mi) * p->G * LB_G + g * LB_G;
                    const __m256i corr = _mm256_set1_epi32(off * p->xsum[(m0 + mi) * p->G + g]);
                    for (int h = 0; h < 2; h++) {
                        __m256i acc = _mm256_setzero_si256();
                        for (int o = 0; o < 8; o++) {
                            const __m256i xv = _mm256_set1_epi32(bitlm_load_i32(x + 4 * o));
                            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(c[h][o], xv), ones));
                        }
                        acc = _mm256_sub_epi32(acc, corr);
                        const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), _mm256_load_ps(scf + 8 * h));
                        _mm256_store_ps(sum[mi] + 8 * h, _mm256_add_ps(_mm256_load_ps(sum[mi] + 8 * h), f));
                    }
                }
            }
            for (int64_t mi = 0; mi < mb; mi++) lb_store(p, m0 + mi, t, sum[mi]);
        }
    }
}
#endif

/* ---- AVX-512 VNNI: one vpdpbusd per operand, 16 rows per register ------------------------------- */

#if defined(__x86_64__) && defined(BITLM_HAVE_AVX512)
#define AVX512_TGT "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma"
#define AVX512_FN __attribute__((target(AVX512_TGT), always_inline)) static inline

AVX512_FN void lb_codes_avx512(const uint8_t *blk, const int bits, __m512i c[8]) {
    const __m512i m4 = _mm512_set1_epi8(15), m2 = _mm512_set1_epi8(3);
    for (int j = 0; j < 4; j++) {
        const __m512i lo = _mm512_loadu_si512((const void *)(blk + j * 64));
        c[2 * j] = _mm512_and_si512(lo, m4);
        c[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(lo, 4), m4);
    }
    if (bits == 6)
        for (int j = 0; j < 2; j++) {
            const __m512i hi = _mm512_loadu_si512((const void *)(blk + 256 + j * 64));
            for (int q = 0; q < 4; q++) {
                const __m512i h2 = _mm512_and_si512(_mm512_srli_epi16(hi, 2 * q), m2);
                c[4 * j + q] = _mm512_or_si512(c[4 * j + q], _mm512_slli_epi16(h2, 4));
            }
        }
}

/* Decode (one token): tiles t .. t + J - 1 (J = 1, 2), group by group, each tile's running sum
 * in its own register; the same operations per tile as one at a time, so the same bits.  Two
 * tiles' streams at once where the GEMV plan reads i2 with several (Intel, dispatch.c), each
 * prefetching on into its own next tile: on the Xeon of 2026-12-03 the 2B4T head went from 22.0
 * to 25.9-26.8 GB/s (int4) and 21.4 to 27.3-28.0 (int6) at 2 threads; four streams measured the
 * same as two. */
AVX512_FN void lb_decode_tiles(const lb_problem *p, int64_t t, int64_t m0, const int bits, const int off, const int J) {
    float sum[BITLM_TILE_N] __attribute__((aligned(64)));
    const int8_t *x = p->xq + m0 * p->G * LB_G;
    const int32_t *xs = p->xsum + m0 * p->G;
    __m512 s[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t g = 0; g < p->G; g++) {
        /* 4 groups ahead; past a tile's end, its tile in the next pair (not the other stream's) */
        const int64_t ahead = g + 4 < p->G ? 4 : 4 + (J - 1) * p->G;
        for (int j = 0; j < J; j++) {
            const uint8_t *blk = p->w + ((t + j) * p->G + g + ahead) * p->block_bytes;
            for (int l = 0; l < (bits == 6 ? 6 : 4); l++) _mm_prefetch((const char *)(blk + 64 * l), _MM_HINT_T0);
        }
        for (int j = 0; j < J; j++) {
            const uint8_t *blk = p->w + ((t + j) * p->G + g) * p->block_bytes;
            __m512i c[8];
            lb_codes_avx512(blk, bits, c);
            __m512i acc = _mm512_set1_epi32(-off * xs[g]);
            for (int o = 0; o < 8; o++)
                acc = _mm512_dpbusd_epi32(acc, c[o], _mm512_set1_epi32(bitlm_load_i32(x + g * LB_G + 4 * o)));
            const __m512 sc = _mm512_cvtph_ps(
                _mm256_loadu_si256((const __m256i *)(const void *)(p->scale + ((t + j) * p->G + g) * BITLM_TILE_N)));
            s[j] = _mm512_add_ps(s[j], _mm512_mul_ps(_mm512_cvtepi32_ps(acc), sc));
        }
    }
    for (int j = 0; j < J; j++) {
        _mm512_store_ps(sum, s[j]);
        lb_store(p, m0, t + j, sum);
    }
}

AVX512_FN void lb_avx512_bits(const lb_problem *p, int64_t t0, int64_t t1, const int bits) {
    const int off = lb_offset(bits);
    float sum[LB_TOK][BITLM_TILE_N] __attribute__((aligned(64)));
    if (p->M == 1 && bitlm_cfg()->gemv_streams[BITLM_FMT_I2] >= 2) { /* decode, two tiles' streams at once */
        for (; t0 + 2 <= t1; t0 += 2) lb_decode_tiles(p, t0, 0, bits, off, 2);
    }
    for (int64_t t = t0; t < t1; t++) {
        for (int64_t m0 = 0; m0 < p->M; m0 += LB_TOK) {
            const int64_t mb = p->M - m0 < LB_TOK ? p->M - m0 : LB_TOK;
            if (mb == 1) { /* one token: the running sum stays in a register */
                lb_decode_tiles(p, t, m0, bits, off, 1);
                continue;
            }
            for (int mi = 0; mi < mb; mi++) _mm512_store_ps(sum[mi], _mm512_setzero_ps());
            for (int64_t g = 0; g < p->G; g++) {
                const uint8_t *blk = p->w + (t * p->G + g) * p->block_bytes;
                __m512i c[8];
                lb_codes_avx512(blk, bits, c);
                const __m512 sc = _mm512_cvtph_ps(
                    _mm256_loadu_si256((const __m256i *)(const void *)(p->scale + (t * p->G + g) * BITLM_TILE_N)));
                for (int64_t mi = 0; mi < mb; mi++) {
                    const int8_t *x = p->xq + (m0 + mi) * p->G * LB_G + g * LB_G;
                    __m512i acc = _mm512_set1_epi32(-off * p->xsum[(m0 + mi) * p->G + g]);
                    for (int o = 0; o < 8; o++) acc = _mm512_dpbusd_epi32(acc, c[o], _mm512_set1_epi32(bitlm_load_i32(x + 4 * o)));
                    _mm512_store_ps(sum[mi], _mm512_add_ps(_mm512_load_ps(sum[mi]), _mm512_mul_ps(_mm512_cvtepi32_ps(acc), sc)));
                }
            }
            for (int64_t mi = 0; mi < mb; mi++) lb_store(p, m0 + mi, t, sum[mi]);
        }
    }
}

__attribute__((target(AVX512_TGT))) static void lb_avx512(const lb_problem *p, int64_t t0, int64_t t1) {
    if (p->bits == 6)
        lb_avx512_bits(p, t0, t1, 6);
    else
        lb_avx512_bits(p, t0, t1, 4);
}
#endif

/* ---- entry point ------------------------------------------------------------------------------ */

static lb_fn lb_kernel(void) {
    const int tier = bitlm_tier();
#if defined(__x86_64__) && defined(BITLM_HAVE_AVX512)
    if (tier >= BITLM_TIER_AVX512) return lb_avx512;
#endif
#if defined(__x86_64__) && defined(BITLM_HAVE_AVX2)
    if (tier >= BITLM_TIER_AVX2) return lb_avx2;
#endif
    (void)tier;
    return lb_generic;
}

typedef struct {
    const lb_problem *p;
    lb_fn fn;
} lb_task;

static void lb_run(void *ctx, int64_t b, int64_t e) {
    const lb_task *t = (const lb_task *)ctx;
    t->fn(t->p, b, e);
}

BITLM_API int64_t bitlm_head_bytes(int bits, int64_t n, int64_t k) {
    if ((bits != 4 && bits != 6) || n < 0 || k < 0) return BITLM_EINVAL;
    const int64_t tiles = (n + BITLM_TILE_N - 1) / BITLM_TILE_N, groups = (k + LB_G - 1) / LB_G;
    return tiles * groups * (bits == 6 ? 384 : 256);
}

BITLM_API int bitlm_dense_lowbit(int bits, const int8_t *xq, const float *a, int64_t m, int64_t k, const uint8_t *w,
                                 const uint16_t *scale, int64_t n, float *y) {
    if ((bits != 4 && bits != 6) || !xq || !a || !w || !scale || !y || m < 0 || k < 1 || n < 0) return BITLM_EINVAL;
    if (m == 0 || n == 0) return 0;
    const int64_t G = (k + LB_G - 1) / LB_G, Kp = G * LB_G;
    int8_t *xp = aligned_alloc(64, (size_t)((m * Kp + 63) / 64 * 64));
    int32_t *xs = malloc((size_t)(m * (G ? G : 1)) * sizeof(int32_t));
    if (!xp || !xs) {
        free(xp);
        free(xs);
        return BITLM_ENOMEM;
    }
    for (int64_t i = 0; i < m; i++) {
        memcpy(xp + i * Kp, xq + i * k, (size_t)k);
        memset(xp + i * Kp + k, 0, (size_t)(Kp - k));
        for (int64_t g = 0; g < G; g++) {
            int32_t s = 0;
            for (int j = 0; j < LB_G; j++) s += xp[i * Kp + g * LB_G + j];
            xs[i * G + g] = s;
        }
    }
    const lb_problem p = {bits, m, n, k, G, bits == 6 ? 384 : 256, xp, xs, a, w, scale, y};
    const lb_task task = {&p, lb_kernel()};
    const int64_t tiles = (n + BITLM_TILE_N - 1) / BITLM_TILE_N;
    bitlm_parallel_for(tiles, 16, bitlm_threads_for((double)m * (double)n * (double)k), lb_run, (void *)&task);
    free(xp);
    free(xs);
    return 0;
}
