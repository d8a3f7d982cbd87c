/*
 * generic.c — portable scalar tier: the C-side reference.
 *
 * Always compiled, with no ISA flags (baseline x86-64 / any CPU).  It decodes each 64-byte
 * chunk literally as documented in bitlm_kernels.h into a 16 x BLOCK_K table of codes, then
 * takes plain dot products, so it doubles as the readable definition that the SIMD tiers must
 * match bit for bit.  Speed is secondary; a chunk is decoded once per block of 64 tokens and
 * the dot products are left to the compiler's auto-vectoriser (SSE2 / NEON baseline).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "internal.h"
#include "attn_impl.h"
#include "hadamard_impl.h"

/* 16 lanes of int16 (GCC/Clang vector extension: lowered to whatever the baseline ISA has,
 * two SSE2 registers on x86-64, two NEON registers on aarch64).  codes[k][row] of a chunk. */
typedef int16_t v16i16 __attribute__((vector_size(32)));

/* ---- the three layouts (chunk = 64 bytes of one 16-row tile), decoded byte by byte ---- */

/* i2: byte 4r+b, bits 2q..2q+1 hold code(k = 4q + b), code = w + 1. */
static inline void decode_i2(const uint8_t *chunk, v16i16 codes[BITLM_B1_BLOCK_K]) {
    for (int r = 0; r < BITLM_TILE_N; r++)
        for (int b = 0; b < 4; b++) {
            const unsigned byte = chunk[4 * r + b];
            for (int q = 0; q < 4; q++) codes[4 * q + b][r] = (int16_t)((byte >> (2 * q)) & 3);
        }
}

/* t1: byte 4r+b is a base-3 fixed-point number; digit i (k = 4i + b) is the integer part of
 * 3 x (the fraction left after i digits): m0 = byte, d_i = (3 m_i) >> 8, m_{i+1} = 3 m_i & 255. */
static inline void decode_t1(const uint8_t *chunk, v16i16 codes[BITLM_B1_BLOCK_K]) {
    for (int r = 0; r < BITLM_TILE_N; r++)
        for (int b = 0; b < 4; b++) {
            unsigned m = chunk[4 * r + b];
            for (int i = 0; i < 5; i++) {
                const unsigned m3 = 3 * m;
                codes[4 * i + b][r] = (int16_t)(m3 >> 8);
                m = m3 & 255;
            }
        }
}

/* b1: little-endian uint64 word q (bytes 8q..8q+7), bit 4r+b <-> k = 4q + b; 1 = +1, 0 = -1.
 * The code is the bit itself (the kernel computes 2*sum(bit*x) - sum(x)). */
static inline void decode_b1(const uint8_t *chunk, v16i16 codes[BITLM_B1_BLOCK_K]) {
    for (int q = 0; q < 8; q++)
        for (int j = 0; j < 8; j++) {
            const unsigned byte = chunk[8 * q + j];
            for (int bit = 0; bit < 8; bit++) {
                const int idx = 8 * j + bit; /* = 4r + b */
                codes[4 * q + (idx & 3)][idx >> 2] = (int16_t)((byte >> bit) & 1);
            }
        }
}

enum { MBLOCK = 64 };

/* bk is a compile-time constant at each call site.  Codes are kept transposed ([k][row]) as
 * int16 so that the inner loop is a 16-lane int16 multiply-add the compiler vectorises with
 * plain SSE2; a chunk's partial sums are exact in int16 (|sum| <= 32 * 2 * 128 = 8192). */
static inline __attribute__((always_inline)) void mm_generic_fmt(const bitlm_problem *p, int64_t t0, int64_t t1,
                                                                 const int fmt, const int bk) {
    v16i16 codes[BITLM_B1_BLOCK_K]; /* one decoded chunk, transposed: codes[k][row] */
    int32_t raw[MBLOCK][BITLM_TILE_N];
    for (int64_t t = t0; t < t1; t++) {
        const uint8_t *wt = p->w + t * p->tile_bytes;
        for (int64_t m0 = 0; m0 < p->M; m0 += MBLOCK) {
            const int64_t mb = p->M - m0 < MBLOCK ? p->M - m0 : MBLOCK;
            memset(raw, 0, sizeof raw);
            for (int64_t c = 0; c < p->nchunks; c++) {
                const uint8_t *chunk = wt + c * BITLM_CHUNK_BYTES;
                if (fmt == BITLM_FMT_I2)
                    decode_i2(chunk, codes);
                else if (fmt == BITLM_FMT_T1)
                    decode_t1(chunk, codes);
                else
                    decode_b1(chunk, codes);
                for (int64_t mi = 0; mi < mb; mi++) {
                    const int8_t *xk = p->x + (m0 + mi) * p->Kp + c * bk;
                    v16i16 s16 = {0};
#pragma GCC unroll 32
                    for (int j = 0; j < bk; j++) s16 += codes[j] * (int16_t)xk[j];
                    for (int r = 0; r < BITLM_TILE_N; r++) raw[mi][r] += s16[r];
                }
            }
            for (int64_t mi = 0; mi < mb; mi++) bitlm_store_tile_scalar(p, m0 + mi, t, raw[mi]);
        }
    }
}

static void mm_i2(const bitlm_problem *p, int64_t t0, int64_t t1) {
    mm_generic_fmt(p, t0, t1, BITLM_FMT_I2, BITLM_I2_BLOCK_K);
}
static void mm_t1(const bitlm_problem *p, int64_t t0, int64_t t1) {
    mm_generic_fmt(p, t0, t1, BITLM_FMT_T1, BITLM_T1_BLOCK_K);
}
static void mm_b1(const bitlm_problem *p, int64_t t0, int64_t t1) {
    mm_generic_fmt(p, t0, t1, BITLM_FMT_B1, BITLM_B1_BLOCK_K);
}

/* Fused RMSNorm + absmax quantisation of one row; the definition in bitlm_kernels.h. */
static void quant_row_generic(const float *x, int64_t k, const float *norm_w, double eps, int do_norm, int8_t *q,
                              float *a_out) {
    float rs = 1.0f;
    if (do_norm) {
        double lane[16] = {0};
        for (int64_t i = 0; i < k; i++) lane[i & 15] += (double)x[i] * (double)x[i];
        for (int j = 0; j < 8; j++) lane[j] += lane[j + 8];
        for (int j = 0; j < 4; j++) lane[j] += lane[j + 4];
        for (int j = 0; j < 2; j++) lane[j] += lane[j + 2];
        lane[0] += lane[1];
        rs = (float)(1.0 / sqrt(lane[0] / (double)k + eps));
    }
    /* Pass 1: the normalised values' absmax (recomputed in pass 2: same float ops, same bits). */
    float amax = 0.0f;
    for (int64_t i = 0; i < k; i++) {
        float y = x[i];
        if (do_norm) {
            y = y * rs;
            if (norm_w) y = y * norm_w[i];
        }
        const float ay = fabsf(y);
        amax = ay > amax ? ay : amax;
    }
    const float a = bitlm_act_scale(amax);
    for (int64_t i = 0; i < k; i++) {
        float y = x[i];
        if (do_norm) {
            y = y * rs;
            if (norm_w) y = y * norm_w[i];
        }
        float v = rintf(y * a); /* current rounding mode: round half to even by default */
        v = v < -128.0f ? -128.0f : (v > 127.0f ? 127.0f : v);
        q[i] = (int8_t)v;
    }
    *a_out = a;
}

/* Dense heads, the literal definition: 16 float lanes per (m, n), mul then add; int8 rows times
 * their scale, or bf16 rows (p->wb) with no scale. */
static inline float dense_weight(const bitlm_dense_problem *p, int64_t i) {
    return p->wb ? bitlm_bf16_to_f32(p->wb[i]) : (float)p->w[i];
}

static void dense_generic(const bitlm_dense_problem *p, int64_t n0, int64_t n1) {
    const int64_t K = p->K;
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t m = 0; m < p->M; m++) {
            const float *xr = p->x + m * K;
            float lane[16] = {0};
            int64_t k = 0;
            for (; k + 16 <= K; k += 16)
                for (int j = 0; j < 16; j++) lane[j] = lane[j] + xr[k + j] * dense_weight(p, n * K + k + j);
            for (; k < K; k++) lane[k & 15] = lane[k & 15] + xr[k] * dense_weight(p, n * K + k);
            const float y = bitlm_fold16f(lane);
            p->y[m * p->N + n] = p->scale ? y * p->scale[n] : y;
        }
    }
}

/* W8A8 head, the literal definition: an exact integer dot product per (m, n). */
static void dense_i8a8_generic(const bitlm_dense_problem *p, int64_t n0, int64_t n1) {
    const int64_t K = p->K;
    for (int64_t n = n0; n < n1; n++)
        for (int64_t m = 0; m < p->M; m++) {
            const int8_t *xr = p->xq + m * K, *wr = p->w + n * K;
            int64_t acc = 0;
            for (int64_t k = 0; k < K; k++) acc += (int32_t)xr[k] * wr[k];
            bitlm_i8a8_store(p, m, n, (uint32_t)acc);
        }
}

static uint64_t mem_read_generic(const uint8_t *buf, size_t n) {
    const uint64_t *p = (const uint64_t *)(const void *)buf;
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = 0; i + 4 <= n / 8; i += 4) {
        s0 += p[i];
        s1 += p[i + 1];
        s2 += p[i + 2];
        s3 += p[i + 3];
    }
    return s0 ^ s1 ^ s2 ^ s3;
}

const bitlm_kernel_table bitlm_generic_table = {
    "generic",
    {NULL, mm_i2, mm_t1, mm_b1},
    quant_row_generic,
    mem_read_generic,
    dense_generic,
    dense_generic,
    dense_i8a8_generic,
    bitlm_attn_heads,
    bitlm_hadamard_row,
    bitlm_attn_heads_bf16,
};

/* ---- bitlm_linear_bf16: bf16 rows in, bf16 rows out (semantics in bitlm_kernels.h) ---------- */

#include <stdlib.h>

/* torch's c10::BFloat16 round_to_nearest_even (internal.h) */
static inline uint16_t f32_to_bf16_rne(float f) { return bitlm_f32_to_bf16_rne(f); }

BITLM_API int bitlm_linear_bf16(int fmt, const uint16_t *x, int64_t m, int64_t k, const uint8_t *w, const float *s,
                                int64_t groups, int64_t n, const float *bias, uint16_t *y) {
    if (!x || !w || !s || !y || m < 0 || k < 1 || n < 1 || groups < 1) return BITLM_EINVAL;
    if (m == 0) return 0;
    const size_t mk = (size_t)m * (size_t)k, mn = (size_t)m * (size_t)n;
    /* one scratch block: float x, then float y (reused), int8 q, a */
    const size_t fbytes = (mk > mn ? mk : mn) * sizeof(float);
    unsigned char *scratch = malloc(fbytes + (size_t)m * sizeof(float) + mk + 64);
    if (!scratch) return BITLM_ENOMEM;
    float *xf = (float *)(void *)scratch;
    float *a = (float *)(void *)(scratch + fbytes);
    int8_t *q = (int8_t *)(scratch + fbytes + (size_t)m * sizeof(float));
    for (size_t i = 0; i < mk; i++) {
        const uint32_t u = (uint32_t)x[i] << 16;
        memcpy(xf + i, &u, sizeof u);
    }
    int rc = bitlm_quantize_rows(xf, m, k, NULL, 0.0, 0, q, a);
    if (rc == 0) rc = bitlm_matmul_f32(fmt, q, a, m, k, w, s, groups, n, bias, xf); /* x is no longer needed */
    if (rc == 0)
        for (size_t i = 0; i < mn; i++) y[i] = f32_to_bf16_rne(xf[i]);
    free(scratch);
    return rc;
}

/* ---- bitlm_rms_norm_rows (semantics in bitlm_kernels.h) ------------------------------------- */

static inline float bf16_to_f32(uint16_t b) {
    const uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16_rne(f)); }

BITLM_API int bitlm_rms_norm_rows(int bf16, const void *x, int64_t m, int64_t k, const void *w, double eps, void *y) {
    if (!x || !w || !y || m < 0 || k < 1 || (bf16 != 0 && bf16 != 1)) return BITLM_EINVAL;
    const float *xf32 = (const float *)x, *wf32 = (const float *)w;
    const uint16_t *xb = (const uint16_t *)x, *wb = (const uint16_t *)w;
    float *yf32 = (float *)y;
    uint16_t *yb = (uint16_t *)y;
    for (int64_t i = 0; i < m; i++) {
        double lane[16] = {0};
        for (int64_t j = 0; j < k; j++) {
            const double v = bf16 ? (double)bf16_to_f32(xb[i * k + j]) : (double)xf32[i * k + j];
            lane[j & 15] += v * v;
        }
        for (int j = 0; j < 8; j++) lane[j] += lane[j + 8];
        for (int j = 0; j < 4; j++) lane[j] += lane[j + 4];
        for (int j = 0; j < 2; j++) lane[j] += lane[j + 2];
        lane[0] += lane[1];
        const float r = (float)(1.0 / sqrt(lane[0] / (double)k + eps));
        if (bf16) {
            for (int64_t j = 0; j < k; j++) {
                const float n = round_bf16(bf16_to_f32(xb[i * k + j]) * r);
                yb[i * k + j] = f32_to_bf16_rne(bf16_to_f32(wb[j]) * n);
            }
        } else {
            for (int64_t j = 0; j < k; j++) yf32[i * k + j] = wf32[j] * (xf32[i * k + j] * r);
        }
    }
    return 0;
}
