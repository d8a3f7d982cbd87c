/*
 * x86_amx.c — the packed ternary / binary GEMM (M >= 2) on AMX int8 tiles.  The only file built
 * with -mamx-tile -mamx-int8 (plus the AVX-512 set, for the unpack and the epilogue); dispatch.c
 * enters it only when cpuid lists AMX-TILE and AMX-INT8, XCR0 enables the tile state, the OS
 * granted it to this process (arch_prctl ARCH_REQ_XCOMP_PERM) and the active tier is avx512.
 *
 * Why it fits the packed layouts: one 64-byte row of an AMX B tile in VNNI layout holds 16
 * columns x 4 consecutive k, and one unpacked quad of a 16-row weight tile (x86_avx512_ops.h's
 * unpack_quad: dword lane r = 4 codes of output row r) is exactly that.  So an output tile of 16
 * rows unpacked quad after quad, in k order, is a stack of B tiles: B tile s = quads
 * [16 s, 16 s + 16) = k in [64 s, 64 s + 64), 1 KB each, loaded with stride 64.  The A tile is
 * 1..16 activation rows x 64 bytes of x (row stride kq = Kp rounded up to 64; dispatch.c passes a
 * zero-padded copy when K is not a multiple of 64, so the pad quads of B multiply zeros).
 *
 * Codes stay unsigned ({0,1,2} for i2/t1, {0,1} for b1) and tdpbssd (s8 x s8) sums code * x
 * exactly in int32, so the accumulator is the same raw sum the VNNI path feeds to the same
 * epilogue (store_tile: minus sum x, b1 doubled, the float factor and bias): the same bits.
 *
 * Blocking: per pass two output tiles (32 rows of y) x up to 32 tokens (two A tiles): four C
 * tiles, two A, two B = the 8 tiles of palette 1.  M <= 32 (serving's batched decode) is one
 * token block: each weight is read once, unpacked once into a small L1 ring and fed to one
 * tdpbssd per token tile (amx_small).  M > 32 (prefill): the pass's two weight tiles are unpacked
 * whole into a per-thread scratch (2 x 16 x kq bytes: 80 KB at K = 2560, L2-resident) during the
 * first token block and read back by the others (amx_large).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "x86_avx512_ops.h"

/* Prefetch distance in the packed weight stream (the GEMV's, x86_avx512.c). */
#ifndef AMX_PREFETCH
#define AMX_PREFETCH 8192
#endif

/* Tile register names (immediates). */
#define C00 0 /* tokens m0..m0+15,  output tile t   */
#define C01 1 /* tokens m0..m0+15,  output tile t+1 */
#define C10 2 /* tokens m0+16..,    output tile t   */
#define C11 3 /* tokens m0+16..,    output tile t+1 */
#define TA0 4
#define TA1 5
#define TB0 6
#define TB1 7

typedef struct __attribute__((aligned(64))) {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Palette 1 with r0 rows in the first token tile and r1 (0: unused) in the second. */
static void configure(int r0, int r1) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette_id = 1;
    for (int i = 0; i < 8; i++) c.colsb[i] = 64;
    c.rows[C00] = c.rows[C01] = c.rows[TA0] = (uint8_t)r0;
    c.rows[C10] = c.rows[C11] = c.rows[TA1] = (uint8_t)(r1 ? r1 : 1);
    c.rows[TB0] = c.rows[TB1] = 16;
    _tile_loadconfig(&c);
}

/* ---- unpack -------------------------------------------------------------------------------- */

/* Chunk ch of a weight tile -> its QPC quads (64 bytes each, k order) at dst; pf: a line to
 * prefetch. */
ALWAYS_INLINE void unpack_chunk(const int fmt, const uint8_t *chunk, int8_t *dst, const consts_t *c, const uint8_t *pf) {
    _mm_prefetch((const char *)pf, _MM_HINT_T0);
    __m512i st = chunk_load(fmt, chunk);
#pragma GCC unroll 8
    for (int qd = 0; qd < 8; qd++) {
        if (qd >= QPC(fmt)) break;
        _mm512_store_si512((void *)(dst + 64 * qd), unpack_quad(fmt, &st, chunk, qd, c));
    }
}

/* Epilogue of one C tile (rows token m0.., output tile t), through an int32 bounce buffer. */
ALWAYS_INLINE void store_c(const bitlm_problem *p, const int fmt, const int32_t *cbuf, int rows, int64_t m0,
                           int64_t t) {
    for (int i = 0; i < rows; i++) store_tile(p, fmt, m0 + i, t, _mm512_load_si512((const void *)(cbuf + 16 * i)));
}

/* One k step (64 k: B tile s of each weight tile) of one token block: A0 (and A1 when r1) from
 * the activations at xa, B tiles from b0 / b1 (1 KB each, stride 64). */
ALWAYS_INLINE void amx_step(const int J, const int r1, const int8_t *xa, int64_t kq, const int8_t *b0,
                            const int8_t *b1) {
    _tile_loadd(TA0, xa, kq);
    _tile_loadd(TB0, b0, 64);
    _tile_dpbssd(C00, TA0, TB0);
    if (J == 2) {
        _tile_loadd(TB1, b1, 64);
        _tile_dpbssd(C01, TA0, TB1);
    }
    if (r1) {
        _tile_loadd(TA1, xa + 16 * kq, kq);
        _tile_dpbssd(C10, TA1, TB0);
        if (J == 2) _tile_dpbssd(C11, TA1, TB1);
    }
}

/* Zero the accumulators of a token block / write them out through the epilogue. */
ALWAYS_INLINE void amx_zero(const int J, const int r1) {
    _tile_zero(C00);
    if (J == 2) _tile_zero(C01);
    if (r1) {
        _tile_zero(C10);
        if (J == 2) _tile_zero(C11);
    }
}

ALWAYS_INLINE void amx_store(const bitlm_problem *p, const int fmt, const int J, const int r0, const int r1,
                             int64_t m0, int64_t t) {
    int32_t cbuf[256] __attribute__((aligned(64)));
    _tile_stored(C00, cbuf, 64);
    store_c(p, fmt, cbuf, r0, m0, t);
    if (J == 2) {
        _tile_stored(C01, cbuf, 64);
        store_c(p, fmt, cbuf, r0, m0, t + 1);
    }
    if (r1) {
        _tile_stored(C10, cbuf, 64);
        store_c(p, fmt, cbuf, r1, m0 + 16, t);
        if (J == 2) {
            _tile_stored(C11, cbuf, 64);
            store_c(p, fmt, cbuf, r1, m0 + 16, t + 1);
        }
    }
}

/* Quads per unpack batch of the small-M path: a multiple of 16 (whole B tiles) and of every
 * format's quads per chunk (4, 5, 8), so that batches start on chunk boundaries. */
#define RING_Q 80

/* M <= 32 (one token block; serving's batched decode): nothing is reused across token blocks, so
 * the unpacked weights go through a small ring (2 halves x RING_Q quads x 2 tiles = 20 KB) that
 * stays in L1: unpacking into the whole-K scratch (80 KB at K = 2560) missed L1 on every store
 * (i2 at 2560 x 2560, hot, 1 thread: 0.157 -> 0.099 ms at M = 2, 0.168 -> 0.105 at M = 8).
 * Batch b is unpacked into half b & 1 while the tiles may still work on batch b - 1.  Tried and
 * dropped: unpacking one B tile at a time, 0-4 tiles ahead of the tile loads (no faster).  The
 * limit at M <= 16 is the unpack itself (16 zmm stores per 1 KB B tile); one tdpbssd costs the
 * same ~16 cycles for 2 or 16 token rows. */
ALWAYS_INLINE void amx_small(const bitlm_problem *p, const int fmt, int8_t *ring, int64_t t0, int64_t t1) {
    const int64_t kq = bitlm_amx_kq(p->Kp), qtile = kq / 4, nq = p->nchunks * QPC(fmt), tb = p->tile_bytes;
    { /* the first AMX_PREFETCH bytes of both streams at once (the loop's prefetch covers the rest) */
        const int64_t n = tb < AMX_PREFETCH ? tb : AMX_PREFETCH;
        for (int64_t off = 0; off < n; off += 64) {
            _mm_prefetch((const char *)(p->w + t0 * tb + off), _MM_HINT_T0);
            if (t0 + 1 < t1) _mm_prefetch((const char *)(p->w + (t0 + 1) * tb + off), _MM_HINT_T0);
        }
    }
    const int r0 = p->M >= 16 ? 16 : (int)p->M;
    const int r1 = p->M > 16 ? (int)p->M - 16 : 0;
    const consts_t c = make_consts();
    configure(r0, r1);
    for (int64_t t = t0; t < t1; t += 2) {
        const int J = t + 1 < t1 ? 2 : 1;
        const uint8_t *wt[2] = {p->w + t * p->tile_bytes, p->w + (t + J - 1) * p->tile_bytes};
        amx_zero(J, r1);
        for (int64_t q0 = 0; q0 < qtile; q0 += RING_Q) {
            const int64_t q1 = q0 + RING_Q < qtile ? q0 + RING_Q : qtile; /* multiple of 16 */
            const int64_t qd1 = q1 < nq ? q1 : nq;                        /* quads with data */
            int8_t *half[2] = {ring + ((q0 / RING_Q) & 1) * RING_Q * 64, ring + (2 + ((q0 / RING_Q) & 1)) * RING_Q * 64};
            for (int j = 0; j < J; j++) {
                for (int64_t ch = q0 / QPC(fmt); ch * QPC(fmt) < qd1; ch++) {
                    /* prefetch AMX_PREFETCH ahead in this stream: past the tile's end, into the
                     * same place of the next pass's tile (t + 2 + j), not the neighbour's (which
                     * the other stream is reading already).  Measured, cold i2 M = 8, 1 thread:
                     * 0.205 -> 0.183 ms at 2560 x 2560, 0.515 -> 0.456 at 6912 x 2560 */
                    const int64_t off = ch * 64 + AMX_PREFETCH;
                    const uint8_t *pf = off < tb ? wt[j] + off : wt[j] + 2 * tb + (off - tb);
                    unpack_chunk(fmt, wt[j] + ch * 64, half[j] + (ch * QPC(fmt) - q0) * 64, &c, pf);
                }
                if (qd1 < q1) memset(half[j] + (qd1 - q0) * 64, 0, (size_t)((q1 - qd1) * 64));
            }
            for (int64_t q = q0; q < q1; q += 16)
                amx_step(J, r1, p->x + 4 * q, kq, half[0] + (q - q0) * 64, half[1] + (q - q0) * 64);
        }
        amx_store(p, fmt, J, r0, r1, 0, t);
    }
}

/* M > 32: the two weight tiles of a pass are unpacked whole (k order, pad quads zeroed) into
 * scratch during the first token block and read back by every further one. */
ALWAYS_INLINE void amx_large(const bitlm_problem *p, const int fmt, int8_t *buf, int64_t t0, int64_t t1) {
    const int64_t kq = bitlm_amx_kq(p->Kp), steps = kq / 64, qtile = kq / 4, nq = p->nchunks * QPC(fmt);
    int8_t *bj[2] = {buf, buf + qtile * 64};
    const consts_t c = make_consts();
    const int64_t M = p->M;
    int cur0 = -1, cur1 = -1;
    for (int64_t t = t0; t < t1; t += 2) {
        const int J = t + 1 < t1 ? 2 : 1;
        const uint8_t *wt[2] = {p->w + t * p->tile_bytes, p->w + (t + J - 1) * p->tile_bytes};
        for (int j = 0; j < J; j++) memset(bj[j] + nq * 64, 0, (size_t)((qtile - nq) * 64));
        int64_t next_ch = 0; /* chunks unpacked so far (both tiles) */
        for (int64_t m0 = 0; m0 < M; m0 += 32) {
            const int r0 = M - m0 >= 16 ? 16 : (int)(M - m0);
            const int r1 = M - m0 >= 32 ? 16 : M - m0 > 16 ? (int)(M - m0 - 16) : 0;
            if (r0 != cur0 || r1 != cur1) {
                configure(r0, r1);
                cur0 = r0;
                cur1 = r1;
            }
            amx_zero(J, r1);
            const int8_t *xa = p->x + m0 * kq;
            for (int64_t s = 0; s < steps; s++) {
                /* first token block: unpack the chunks this step's 16 quads need */
                for (; next_ch < p->nchunks && next_ch * QPC(fmt) < 16 * (s + 1); next_ch++)
                    for (int j = 0; j < J; j++)
                        unpack_chunk(fmt, wt[j] + next_ch * 64, bj[j] + next_ch * QPC(fmt) * 64, &c,
                                     wt[j] + next_ch * 64 + AMX_PREFETCH);
                amx_step(J, r1, xa + 64 * s, kq, bj[0] + s * 1024, bj[1] + s * 1024);
            }
            amx_store(p, fmt, J, r0, r1, m0, t);
        }
    }
}

/* Output tiles [t0, t1) for all tokens; returns 0, or -1 when the scratch could not be had
 * (then nothing was written and the caller runs vnni_mm). */
ALWAYS_INLINE int amx_mm(const bitlm_problem *p, const int fmt, int64_t t0, int64_t t1) {
    const int64_t qtile = bitlm_amx_kq(p->Kp) / 4;
    const int small = p->M <= 32;
    int8_t *buf = bitlm_thread_scratch(small ? (size_t)(4 * RING_Q * 64) : (size_t)(2 * qtile * 64));
    if (!buf) return -1;
    if (small)
        amx_small(p, fmt, buf, t0, t1);
    else
        amx_large(p, fmt, buf, t0, t1);
    _tile_release(); /* back to the init state: cheap context switches for this thread */
    return 0;
}

/* Without scratch memory (out of memory): the same sums with vpdpbusd, one token and one output
 * tile at a time, reading x with the AMX row stride kq.  Slow, exact, never expected to run. */
ALWAYS_INLINE void vnni_mm(const bitlm_problem *p, const int fmt, int64_t t0, int64_t t1) {
    const int64_t kq = bitlm_amx_kq(p->Kp);
    const int bk = 4 * QPC(fmt);
    const consts_t c = make_consts();
    for (int64_t t = t0; t < t1; t++)
        for (int64_t m = 0; m < p->M; m++) {
            const uint8_t *wt = p->w + t * p->tile_bytes;
            const int8_t *xm = p->x + m * kq;
            __m512i acc = _mm512_setzero_si512();
            for (int64_t ch = 0; ch < p->nchunks; ch++) {
                __m512i st = chunk_load(fmt, wt + ch * 64);
                for (int qd = 0; qd < QPC(fmt); qd++) {
                    const __m512i xb = _mm512_set1_epi32(bitlm_load_i32(xm + ch * bk + 4 * qd));
                    acc = _mm512_dpbusd_epi32(acc, unpack_quad(fmt, &st, wt + ch * 64, qd, &c), xb);
                }
            }
            store_tile(p, fmt, m, t, acc);
        }
}

static void amx_i2(const bitlm_problem *p, int64_t t0, int64_t t1) {
    if (amx_mm(p, BITLM_FMT_I2, t0, t1)) vnni_mm(p, BITLM_FMT_I2, t0, t1);
}
static void amx_t1(const bitlm_problem *p, int64_t t0, int64_t t1) {
    if (amx_mm(p, BITLM_FMT_T1, t0, t1)) vnni_mm(p, BITLM_FMT_T1, t0, t1);
}
static void amx_b1(const bitlm_problem *p, int64_t t0, int64_t t1) {
    if (amx_mm(p, BITLM_FMT_B1, t0, t1)) vnni_mm(p, BITLM_FMT_B1, t0, t1);
}

const bitlm_mm_fn bitlm_amx_mm[4] = {NULL, amx_i2, amx_t1, amx_b1};

/* ==== dense W8A8 (bitlm_dense_i8a8) on AMX tiles ============================================= *
 *
 * acc[m, n] = sum_k xq[m, k] w[n, k] (int8 x int8) is exactly tdpbssd's product with the weights
 * as the A operand, loaded straight from w (16 rows x 64 bytes, row stride K: no unpacking, no
 * copy), and the activations as the B operand in VNNI layout: one 16 x 16 dword transpose per
 * (16 tokens x 64 k) block, once per call (xt below).  The C tiles are 16 output rows x up to 16
 * tokens of exact int32 sums; the epilogue reads them column by column and applies the VNNI
 * path's float epilogue (bitlm_i8a8_store: (float)acc * (scale[n] / a[m])), so the float bits are
 * the same.
 *
 * xt layout (bytes, M x kq in all, kq = K rounded up to 64, pad k zero): token block b (tokens
 * [16 b, 16 b + rb), rb = min(16, M - 16 b)) starts at 16 b kq; its k step s (k in [64 s, 64 s
 * + 64)) is 16 rows of 4 rb bytes at + 64 rb s: row q = the 4 k [64 s + 4 q, + 4) of each token.
 *
 * K tail: the last k step of a weight tile reads 64 bytes from each row, past the row's end into
 * the next row's head, which meets the zero pad of xt and adds nothing; only the matrix's last
 * row would read past w, so a tile holding it takes its last step from a zero-padded copy.
 *
 * Blocking: per pass two weight tiles (32 output rows) x two token blocks (32 tokens): C 4, A 2,
 * B 2 tiles.  Passes walk n outer, token blocks inner, so a pass's weight rows (32 K bytes) are
 * read from memory once and reused from L1/L2 by every token block. */

/* Prefetch distance of the W8A8 weight stream, in rows (the next pass's rows at the same k). */
#define I8A8_PF_ROWS 32

/* Transpose 16 dword rows (r[j] = 16 dwords of token j) into r[q] = dword q of every token. */
ALWAYS_INLINE void transpose16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int g = 0; g < 4; g++) { /* rows 4g..4g+3: u[4g + e] lane L = dword 4L + e of those rows */
        u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    for (int e = 0; e < 4; e++) { /* 4 x 4 transpose of 128-bit lanes across u[e], u[4+e], ... */
        const __m512i x0 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x44), x1 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xEE);
        const __m512i x2 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x44),
                      x3 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xEE);
        r[e] = _mm512_shuffle_i32x4(x0, x2, 0x88);
        r[4 + e] = _mm512_shuffle_i32x4(x0, x2, 0xDD);
        r[8 + e] = _mm512_shuffle_i32x4(x1, x3, 0x88);
        r[12 + e] = _mm512_shuffle_i32x4(x1, x3, 0xDD);
    }
}

typedef struct {
    const bitlm_dense_problem *p;
    int8_t *xt;
    int64_t kq;
} i8a8_ctx;

/* Token blocks [b0, b1) of xq -> xt. */
static void i8a8_prep(void *ctx, int64_t b0, int64_t b1) {
    const i8a8_ctx *c = (const i8a8_ctx *)ctx;
    const int64_t K = c->p->K, M = c->p->M, kq = c->kq;
    for (int64_t b = b0; b < b1; b++) {
        const int rb = M - 16 * b >= 16 ? 16 : (int)(M - 16 * b);
        const __mmask16 cols = (__mmask16)((1u << rb) - 1);
        const int8_t *x = c->p->xq + 16 * b * K;
        int8_t *dst = c->xt + 16 * b * kq;
        for (int64_t s = 0; s < kq / 64; s++) {
            const int64_t k = 64 * s;
            const __mmask64 mk = K - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (K - k)) - 1);
            __m512i r[16];
            for (int j = 0; j < 16; j++) r[j] = j < rb ? _mm512_maskz_loadu_epi8(mk, x + j * K + k) : _mm512_setzero_si512();
            transpose16(r);
            int8_t *d = dst + 64 * rb * s;
            for (int q = 0; q < 16; q++) _mm512_mask_storeu_epi32(d + 4 * rb * q, cols, r[q]);
        }
    }
}

/* Palette 1 for one pass: weight tiles of n0 / n1 rows (n1 = 0: one tile), token blocks of t0 /
 * t1 tokens (t1 = 0: one block).  Unused tiles get a harmless 1 x 4 shape. */
static void i8a8_configure(int n0, int n1, int t0, int t1) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette_id = 1;
    const int rn1 = n1 ? n1 : 1, ct1 = t1 ? 4 * t1 : 4;
    c.rows[TA0] = (uint8_t)n0, c.colsb[TA0] = 64;
    c.rows[TA1] = (uint8_t)rn1, c.colsb[TA1] = 64;
    c.rows[TB0] = 16, c.colsb[TB0] = (uint16_t)(4 * t0);
    c.rows[TB1] = 16, c.colsb[TB1] = (uint16_t)ct1;
    /* C rows = weight rows, columns = tokens; here C00 = (tile 0, block 0), C01 = (tile 1, block 0),
     * C10 = (tile 0, block 1), C11 = (tile 1, block 1) */
    c.rows[C00] = (uint8_t)n0, c.colsb[C00] = (uint16_t)(4 * t0);
    c.rows[C01] = (uint8_t)rn1, c.colsb[C01] = (uint16_t)(4 * t0);
    c.rows[C10] = (uint8_t)n0, c.colsb[C10] = (uint16_t)ct1;
    c.rows[C11] = (uint8_t)rn1, c.colsb[C11] = (uint16_t)ct1;
    _tile_loadconfig(&c);
}

/* Epilogue of one C tile: rows = outputs [n, n + rn), columns = tokens [m, m + rt).  The tile is
 * transposed in registers (row j = token j's rn outputs) and each output gets bitlm_i8a8_store's
 * (float)acc * (scale[n] / a[m]), lane by lane: the same operations in the same order. */
ALWAYS_INLINE void i8a8_store_c(const bitlm_dense_problem *p, const int32_t *cbuf, int rn, int rt, int64_t n,
                                int64_t m) {
    const __mmask16 mk = (__mmask16)((1u << rn) - 1);
    __m512i r[16];
    for (int i = 0; i < 16; i++) r[i] = i < rn ? _mm512_load_si512((const void *)(cbuf + 16 * i)) : _mm512_setzero_si512();
    transpose16(r);
    const __m512 sc = _mm512_maskz_loadu_ps(mk, p->scale + n);
    for (int j = 0; j < rt; j++) {
        const __m512 f = _mm512_div_ps(sc, _mm512_set1_ps(p->a[m + j]));
        _mm512_mask_storeu_ps(p->y + (m + j) * p->N + n, mk, _mm512_mul_ps(_mm512_cvtepi32_ps(r[j]), f));
    }
}

/* Output rows [n0, n1) for all tokens (n0 a multiple of 16 unless it is the range's start). */
static void i8a8_rows(const bitlm_dense_problem *p, const int8_t *xt, int64_t kq, int64_t n0, int64_t n1) {
    const int64_t K = p->K, M = p->M, N = p->N, steps = kq / 64;
    int8_t tail[2][16 * 64] __attribute__((aligned(64)));
    int32_t cbuf[256] __attribute__((aligned(64)));
    int cfg[4] = {-1, -1, -1, -1};
    for (int64_t n = n0; n < n1; n += 32) {
        const int rn0 = n1 - n >= 16 ? 16 : (int)(n1 - n);
        const int rn1 = n1 - n >= 32 ? 16 : n1 - n > 16 ? (int)(n1 - n - 16) : 0;
        const int8_t *wa[2] = {p->w + n * K, p->w + (n + 16) * K};
        /* the tile holding row N - 1 takes its last (partial) k step from a zero-padded copy */
        int use_tail[2] = {0, 0};
        if (K % 64) {
            const int64_t klast = (steps - 1) * 64;
            for (int j = 0; j < 2; j++) {
                const int rn = j ? rn1 : rn0;
                if (rn && n + 16 * j + rn == N) {
                    use_tail[j] = 1;
                    memset(tail[j], 0, sizeof tail[j]);
                    for (int r = 0; r < rn; r++) memcpy(tail[j] + 64 * r, wa[j] + r * K + klast, (size_t)(K - klast));
                }
            }
        }
        for (int64_t m = 0; m < M; m += 32) {
            const int t0 = M - m >= 16 ? 16 : (int)(M - m);
            const int t1 = M - m >= 32 ? 16 : M - m > 16 ? (int)(M - m - 16) : 0;
            if (cfg[0] != rn0 || cfg[1] != rn1 || cfg[2] != t0 || cfg[3] != t1) {
                i8a8_configure(rn0, rn1, t0, t1);
                cfg[0] = rn0, cfg[1] = rn1, cfg[2] = t0, cfg[3] = t1;
            }
            _tile_zero(C00);
            if (rn1) _tile_zero(C01);
            if (t1) {
                _tile_zero(C10);
                if (rn1) _tile_zero(C11);
            }
            const int8_t *xb0 = xt + m * kq, *xb1 = xt + (m + 16) * kq;
            for (int64_t s = 0; s < steps; s++) {
                const int64_t k = 64 * s;
                if (m == 0) /* the first token block pulls the next pass's rows (same k) into the cache */
                    for (int r = 0; r < I8A8_PF_ROWS && n + 32 + r < n1; r++)
                        _mm_prefetch((const char *)(wa[0] + (32 + r) * K + k), _MM_HINT_T0);
                const int last = s == steps - 1;
                if (last && use_tail[0])
                    _tile_loadd(TA0, tail[0], 64);
                else
                    _tile_loadd(TA0, wa[0] + k, K);
                _tile_loadd(TB0, xb0 + 64 * t0 * s, 4 * t0);
                _tile_dpbssd(C00, TA0, TB0);
                if (rn1) {
                    if (last && use_tail[1])
                        _tile_loadd(TA1, tail[1], 64);
                    else
                        _tile_loadd(TA1, wa[1] + k, K);
                    _tile_dpbssd(C01, TA1, TB0);
                }
                if (t1) {
                    _tile_loadd(TB1, xb1 + 64 * t1 * s, 4 * t1);
                    _tile_dpbssd(C10, TA0, TB1);
                    if (rn1) _tile_dpbssd(C11, TA1, TB1);
                }
            }
            _tile_stored(C00, cbuf, 64);
            i8a8_store_c(p, cbuf, rn0, t0, n, m);
            if (rn1) {
                _tile_stored(C01, cbuf, 64);
                i8a8_store_c(p, cbuf, rn1, t0, n + 16, m);
            }
            if (t1) {
                _tile_stored(C10, cbuf, 64);
                i8a8_store_c(p, cbuf, rn0, t1, n, m + 16);
                if (rn1) {
                    _tile_stored(C11, cbuf, 64);
                    i8a8_store_c(p, cbuf, rn1, t1, n + 16, m + 16);
                }
            }
        }
    }
    _tile_release();
}

static void i8a8_run(void *ctx, int64_t n0, int64_t n1) {
    const i8a8_ctx *c = (const i8a8_ctx *)ctx;
    i8a8_rows(c->p, c->xt, c->kq, n0, n1);
}

int bitlm_amx_i8a8(const bitlm_dense_problem *p) {
    if (p->M < 1 || p->N < 1 || p->K < 1) return -1;
    const int64_t kq = bitlm_amx_kq(p->K);
    const size_t xt_bytes = (size_t)((p->M * kq + 63) / 64 * 64);
    int8_t *xt = (int8_t *)aligned_alloc(64, xt_bytes);
    if (!xt) return -1;
    i8a8_ctx c = {p, xt, kq};
    const int64_t blocks = (p->M + 15) / 16;
    bitlm_parallel_for(blocks, 1, (int)(p->M * kq / (1 << 18)) + 1, i8a8_prep, &c);
    bitlm_parallel_for(p->N, 64, bitlm_threads_for((double)p->M * (double)p->N * (double)p->K), i8a8_run, &c);
    free(xt);
    return 0;
}
