/*
 * x86_avx512_ops.h — the AVX-512 unpack helpers and the tile epilogue, shared by the AVX-512
 * tier (x86_avx512.c) and the AMX GEMM (x86_amx.c).  Include only from files compiled with the
 * AVX-512 flags (F/BW/VL/VNNI).  Not installed, not part of the ABI.
 */
#ifndef BITLM_X86_AVX512_OPS_H
#define BITLM_X86_AVX512_OPS_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "internal.h"

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* quads (groups of 4 k) per 64-byte chunk */
#define QPC(fmt) ((fmt) == BITLM_FMT_I2 ? 4 : (fmt) == BITLM_FMT_T1 ? 5 : 8)

typedef struct {
    __m512i m3, one, c86, c171;
} consts_t;

ALWAYS_INLINE consts_t make_consts(void) {
    consts_t c;
    c.m3 = _mm512_set1_epi8(3);
    c.one = _mm512_set1_epi8(1);
    c.c86 = _mm512_set1_epi8((char)86);
    c.c171 = _mm512_set1_epi8((char)171);
    return c;
}

/* Per-chunk unpack state: i2/t1 keep the loaded chunk in a register (t1 updates it digit by
 * digit), b1 reads its 8-byte masks straight from memory into k registers. */
ALWAYS_INLINE __m512i chunk_load(const int fmt, const uint8_t *chunk) {
    if (fmt == BITLM_FMT_B1) return _mm512_setzero_si512();
    return _mm512_loadu_si512((const void *)chunk);
}

/* Codes for quad qd (k = 4qd .. 4qd+3 of the chunk) of all 16 rows, one row per dword lane. */
ALWAYS_INLINE __m512i unpack_quad(const int fmt, __m512i *st, const uint8_t *chunk, const int qd, const consts_t *c) {
    if (fmt == BITLM_FMT_I2) {
        /* bits 2qd..2qd+1 of every byte; the dword shift leaks the neighbour byte's bits into
         * positions >= 8-2qd, which the mask removes */
        return _mm512_and_si512(_mm512_srli_epi32(*st, 2 * qd), c->m3);
    } else if (fmt == BITLM_FMT_T1) {
        /* d = (3m) >> 8 = [m >= 86] + [m >= 171];  m <- 3m mod 256 */
        const __m512i m = *st;
        const __mmask64 k1 = _mm512_cmpge_epu8_mask(m, c->c86);
        const __mmask64 k2 = _mm512_cmpge_epu8_mask(m, c->c171);
        __m512i d = _mm512_maskz_mov_epi8(k1, c->one);
        d = _mm512_mask_add_epi8(d, k2, d, c->one);
        *st = _mm512_add_epi8(_mm512_add_epi8(m, m), m);
        return d;
    } else {
        __mmask64 k;
        memcpy(&k, chunk + 8 * qd, 8); /* little-endian word -> bit 4r+b = lane byte 4r+b */
        return _mm512_maskz_mov_epi8(k, c->one);
    }
}

/* Epilogue for one (token m, tile t): raw = sum code*x (i2/t1) or sum bit*x (b1). */
ALWAYS_INLINE void store_tile(const bitlm_problem *p, const int fmt, int64_t m, int64_t t, __m512i raw) {
    const int64_t n0 = t * BITLM_TILE_N;
    const int64_t nr = p->N - n0 < BITLM_TILE_N ? p->N - n0 : BITLM_TILE_N;
    const __mmask16 mask = nr == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nr) - 1);
    if (p->yf) {
        const int64_t g0 = n0 / p->rows_per_group, g1 = (n0 + nr - 1) / p->rows_per_group;
        if (g0 != g1) { /* tile straddles a weight-group boundary: rare, do it one by one */
            int32_t tmp[16];
            _mm512_storeu_si512((void *)tmp, raw);
            bitlm_store_tile_scalar(p, m, t, tmp);
            return;
        }
        __m512i acc = fmt == BITLM_FMT_B1 ? _mm512_add_epi32(raw, raw) : raw;
        acc = _mm512_sub_epi32(acc, _mm512_set1_epi32(p->xsum[m]));
        __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(p->f[m * p->groups + g0]));
        if (p->bias) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, p->bias + n0));
        _mm512_mask_storeu_ps(p->yf + m * p->N + n0, mask, y);
    } else {
        __m512i acc = fmt == BITLM_FMT_B1 ? _mm512_add_epi32(raw, raw) : raw;
        acc = _mm512_sub_epi32(acc, _mm512_set1_epi32(p->xsum[m]));
        _mm512_mask_storeu_epi32(p->yi + m * p->N + n0, mask, acc);
    }
}

#endif /* BITLM_X86_AVX512_OPS_H */
