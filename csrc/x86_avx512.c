/*
 * x86_avx512.c — AVX-512 (F/BW/VL) + VNNI tier.  The only file built with those flags; the
 * dispatcher enters it only after cpuid/xgetbv said the CPU and OS support them.
 *
 * Core instruction: vpdpbusd (u8 x s8, four products summed into each int32 lane).  The packed
 * layouts were designed for it: one 64-byte chunk of a 16-row tile is one zmm whose dword lane
 * r belongs to output row r, so after unpacking, lane r holds 4 codes of row r for 4
 * consecutive k, and a single broadcast of x[k..k+3] feeds all 16 rows.  Accumulators are
 * therefore already "one lane per output row": no horizontal reductions anywhere.
 *
 * Codes are unsigned ({0,1,2} = w+1 for i2/t1, {0,1} = bit for b1) because vpdpbusd's first
 * multiplicand is unsigned; the -1 offset becomes one subtraction of sum(x) per output
 * (i2/t1: acc = S - sum x; b1: acc = 2S - sum x).  vpdpbusd accumulates in 32 bits, so there
 * is no int16 saturation to worry about (unlike vpmaddubsw).
 *
 * GEMV (M = 1, decode): one tile at a time (one sequential weight stream per thread), one
 * accumulator per (chunk parity, quad) to hide the dpbusd latency; memory-bound.
 * GEMM (M > 1, prefill): a 2-tile x 6-token register block (12 accumulators); each unpacked
 * weight register is reused 6 times, each activation broadcast twice; activations are blocked
 * so that the rows in use stay in L2.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "internal.h"
#include "attn_impl.h"
#include "hadamard_impl.h"

#include "x86_avx512_ops.h"

/* ---- GEMV: M = 1 -------------------------------------------------------------------------- */

/* One tile at a time, so that each thread reads its rows as one sequential stream (the
 * hardware prefetcher's best case; interleaving several tiles' 10-27 KB streams measured much
 * slower from DRAM).  Two chunks per iteration with one accumulator per (chunk, quad) keeps
 * 8-16 independent vpdpbusd chains in flight to hide their latency. */
/* Software prefetch: the GEMV plan (dispatch.c, per format and vendor) gives the distance in
 * bytes ahead of each stream and the level.  Measured on Zen 5 from DRAM (i2, 1 thread, C
 * harness, into L1): none ~32 GB/s, 2 KB ~29, 4 KB ~39, 8 KB 43-45 (= the read probe's 40-42),
 * 12-24 KB 39-44: the hardware prefetcher alone does not run far enough ahead of a loop that
 * spends ~20 instructions per 64-byte line.  On the Intel Xeon of 2026-12-03 four i2 streams 2 KB
 * ahead and t1 8 KB ahead into L2 were fastest (dispatch.c).  GEMV_PREFETCH stays the distance
 * of the GEMM's small-M blocks. */
#ifndef GEMV_PREFETCH
#define GEMV_PREFETCH 8192
#endif
#ifndef GEMV_HINT
#define GEMV_HINT _MM_HINT_T0
#endif

/* Prefetch offset, from chunk ch, of a GEMV reading J tiles' streams at once (tiles of tb bytes,
 * end to end): pf bytes ahead within the tile; past its end, the same stream's next tile (J - 1
 * tiles further on), not the tile the next stream is reading now.  On the Xeon of 2026-12-03 (C
 * harness, 2B4T matrices, i2, J = 4) 26 -> 28.4 GB/s at 2 threads, 95 % of a plain read. */
ALWAYS_INLINE int64_t stream_pf(const int64_t ch, const int64_t pf, const int64_t tb, const int J) {
    return ch * 64 + pf < tb ? pf : pf + (J - 1) * tb;
}

/* l2: a constant at every call site, so the branch folds away */
ALWAYS_INLINE void gemv_pf(const uint8_t *a, const int l2) {
    if (l2)
        _mm_prefetch((const char *)a, _MM_HINT_T1);
    else
        _mm_prefetch((const char *)a, _MM_HINT_T0);
}

/* One 64-byte chunk of one tile; quad qd goes to accumulator (base + qd) mod 8. */
ALWAYS_INLINE void gemv_chunk(const int fmt, const uint8_t *chunk, const int8_t *xk, __m512i acc[8], const int base,
                              const consts_t *c, const int64_t pf, const int l2) {
    gemv_pf(chunk + pf, l2);
    __m512i st = chunk_load(fmt, chunk);
#pragma GCC unroll 8
    for (int qd = 0; qd < 8; qd++) {
        if (qd >= QPC(fmt)) break;
        const __m512i xb = _mm512_set1_epi32(bitlm_load_i32(xk + 4 * qd));
        acc[(base + qd) & 7] = _mm512_dpbusd_epi32(acc[(base + qd) & 7], unpack_quad(fmt, &st, chunk, qd, c), xb);
    }
}

/* Eight accumulators: i2 puts the 4 quads of an even chunk in 0-3 and of an odd chunk in 4-7,
 * b1 its 8 quads in 0-7, so every vpdpbusd chain sees at most 2 links per 2-chunk step.
 * (16 accumulators made GCC spill and copy registers: b1 ran 25% slower.) */
ALWAYS_INLINE void gemv_tile(const bitlm_problem *p, const int fmt, int64_t t, const int l2) {
    const consts_t c = make_consts();
    const int bk = 4 * QPC(fmt);
    const int64_t pf = p->gemv_prefetch;
    __m512i acc[8];
    for (int i = 0; i < 8; i++) acc[i] = _mm512_setzero_si512();
    const uint8_t *wt = p->w + t * p->tile_bytes;
    const int8_t *x = p->x;
    const int64_t nch = p->nchunks;
    int64_t ch = 0;
    for (; ch + 2 <= nch; ch += 2) {
        gemv_chunk(fmt, wt + ch * 64, x + ch * bk, acc, 0, &c, pf, l2);
        gemv_chunk(fmt, wt + (ch + 1) * 64, x + (ch + 1) * bk, acc, QPC(fmt), &c, pf, l2);
    }
    if (ch < nch) gemv_chunk(fmt, wt + ch * 64, x + ch * bk, acc, 0, &c, pf, l2);
    const __m512i s = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(acc[0], acc[1]), _mm512_add_epi32(acc[2], acc[3])),
                                       _mm512_add_epi32(_mm512_add_epi32(acc[4], acc[5]), _mm512_add_epi32(acc[6], acc[7])));
    store_tile(p, fmt, 0, t, s);
}

/* Two tiles' streams at once (b1, and i2 with BITLM_GEMV_I2_SHIFT=1; BITLM_GEMV_STREAMS=2): tile t's quads go
 * to accumulators 0-3 (b1: 0-7 fold into 0-3), tile t+1's to 4-7; exact integer sums, so the
 * same bits as gemv_tile. */
ALWAYS_INLINE void gemv_tile2(const bitlm_problem *p, const int fmt, int64_t t, const int l2) {
    const consts_t c = make_consts();
    const int bk = 4 * QPC(fmt);
    const int64_t pf = p->gemv_prefetch;
    __m512i acc[8];
    for (int i = 0; i < 8; i++) acc[i] = _mm512_setzero_si512();
    const uint8_t *w0 = p->w + t * p->tile_bytes, *w1 = w0 + p->tile_bytes;
    const int8_t *x = p->x;
    for (int64_t ch = 0; ch < p->nchunks; ch++) {
        const int64_t po = ch * 64 + stream_pf(ch, pf, p->tile_bytes, 2);
        gemv_pf(w0 + po, l2);
        gemv_pf(w1 + po, l2);
        __m512i s0 = chunk_load(fmt, w0 + ch * 64), s1 = chunk_load(fmt, w1 + ch * 64);
#pragma GCC unroll 8
        for (int qd = 0; qd < 8; qd++) {
            if (qd >= QPC(fmt)) break;
            const __m512i xb = _mm512_set1_epi32(bitlm_load_i32(x + ch * bk + 4 * qd));
            acc[qd & 3] = _mm512_dpbusd_epi32(acc[qd & 3], unpack_quad(fmt, &s0, w0 + ch * 64, qd, &c), xb);
            acc[4 + (qd & 3)] = _mm512_dpbusd_epi32(acc[4 + (qd & 3)], unpack_quad(fmt, &s1, w1 + ch * 64, qd, &c), xb);
        }
    }
    store_tile(p, fmt, 0, t, _mm512_add_epi32(_mm512_add_epi32(acc[0], acc[1]), _mm512_add_epi32(acc[2], acc[3])));
    store_tile(p, fmt, 0, t + 1, _mm512_add_epi32(_mm512_add_epi32(acc[4], acc[5]), _mm512_add_epi32(acc[6], acc[7])));
}

/* t1 GEMV without extracting digits.  With m_0 = byte and m_{i+1} = 3 m_i mod 256, each digit
 * is d_i = (3 m_i - m_{i+1}) / 256 exactly, so
 *     256 * sum_i d_i x_i = 3 * sum_i m_i x_i - sum_i m_{i+1} x_i = 3A - B,
 * two plain u8 x s8 dot products of the fractional states (vpdpbusd takes m as the unsigned
 * operand directly).  Per chunk that is 10 byte adds + 10 vpdpbusd instead of 5 x (2 compares +
 * 2 mask ops + 2 adds) + 5 vpdpbusd: decode is ~1.5x faster and becomes memory-bound.
 * Exactness: all int32 arithmetic wraps, and |256 S| <= 256 * 256 * K < 2^31 per segment of
 * at most 1024 chunks (20480 k), so 3A - B is exact modulo 2^32 and the shift recovers S.
 * (Prefill keeps the compare decode: there vpdpbusd, not unpacking, is the bottleneck.) */
#define T1_SEGMENT_CHUNKS 1024

/* J = 1 or 2 tiles' streams at once (the plan's gemv_streams): tile t + j's sums from its own
 * accumulators, the same bits either way. */
ALWAYS_INLINE void gemv_t1(const bitlm_problem *p, const int J, int64_t t, const int l2) {
    const uint8_t *wt = p->w + t * p->tile_bytes;
    const int8_t *x = p->x;
    const int64_t pf = p->gemv_prefetch;
    __m512i S[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
    for (int64_t s0 = 0; s0 < p->nchunks; s0 += T1_SEGMENT_CHUNKS) {
        const int64_t s1 = s0 + T1_SEGMENT_CHUNKS < p->nchunks ? s0 + T1_SEGMENT_CHUNKS : p->nchunks;
        __m512i A[2][5], B[2][5]; /* one chain per (tile, digit): hides the vpdpbusd latency */
        for (int j = 0; j < J; j++)
            for (int i = 0; i < 5; i++) A[j][i] = B[j][i] = _mm512_setzero_si512();
        for (int64_t ch = s0; ch < s1; ch++) {
            __m512i m[2];
            const int64_t po = stream_pf(ch, pf, p->tile_bytes, J);
            for (int j = 0; j < J; j++) {
                const uint8_t *chunk = wt + j * p->tile_bytes + ch * 64;
                gemv_pf(chunk + po, l2);
                m[j] = _mm512_loadu_si512((const void *)chunk);
            }
#pragma GCC unroll 5
            for (int i = 0; i < 5; i++) {
                const __m512i xb = _mm512_set1_epi32(bitlm_load_i32(x + ch * BITLM_T1_BLOCK_K + 4 * i));
                for (int j = 0; j < J; j++) {
                    const __m512i next = _mm512_add_epi8(_mm512_add_epi8(m[j], m[j]), m[j]); /* 3m mod 256 */
                    A[j][i] = _mm512_dpbusd_epi32(A[j][i], m[j], xb);
                    B[j][i] = _mm512_dpbusd_epi32(B[j][i], next, xb);
                    m[j] = next;
                }
            }
        }
        for (int j = 0; j < J; j++) {
            __m512i a = A[j][0], b = B[j][0];
            for (int i = 1; i < 5; i++) {
                a = _mm512_add_epi32(a, A[j][i]);
                b = _mm512_add_epi32(b, B[j][i]);
            }
            const __m512i d = _mm512_sub_epi32(_mm512_add_epi32(_mm512_add_epi32(a, a), a), b); /* 3A - B */
            S[j] = _mm512_add_epi32(S[j], _mm512_srai_epi32(d, 8));
        }
    }
    for (int j = 0; j < J; j++) store_tile(p, BITLM_FMT_T1, 0, t + j, S[j]);
}

/* i2 GEMV without shifts.  Quad qd's codes sit at bits 2qd..2qd+1 of every byte; masking them in
 * place (byte & (3 << 2qd)) gives code * 4^qd, so a vpdpbusd per quad into the quad's own
 * accumulators sums 4^qd * sum code * x, and a final arithmetic shift by 2qd returns the exact
 * sum (a multiple of 4^qd).  One AND per quad instead of a shift and an AND: the unpack shared
 * the vector ALU ports with vpdpbusd, and at memory speed a decode GEMV is close to that limit.
 * Bound: |sum| <= (K / 4) * 2 * 64 * 127 per lane < 2^31 for K <= I2_NOSHIFT_MAX_K (the shifting
 * loop takes larger K, and BITLM_GEMV_I2_SHIFT=1).  Exact integer sums: the same bits as gemv_tile. */
#define I2_NOSHIFT_MAX_K (1 << 19)

ALWAYS_INLINE __m512i i2_fold(const __m512i *acc) {
    return _mm512_add_epi32(_mm512_add_epi32(acc[0], _mm512_srai_epi32(acc[1], 2)),
                            _mm512_add_epi32(_mm512_srai_epi32(acc[2], 4), _mm512_srai_epi32(acc[3], 6)));
}

/* One chunk of J = 1, 2 or 4 tiles (tile stride tb): quad qd of tile j into a[j][qd]. */
ALWAYS_INLINE void i2_chunk(const int J, const uint8_t *w, const int64_t tb, const int8_t *xk, __m512i (*a)[4],
                            const __m512i mk[4], const int64_t pf, const int l2) {
    __m512i s[4];
    for (int j = 0; j < J; j++) {
        gemv_pf(w + j * tb + pf, l2);
        s[j] = _mm512_loadu_si512((const void *)(w + j * tb));
    }
#pragma GCC unroll 4
    for (int qd = 0; qd < 4; qd++) {
        const __m512i xb = _mm512_set1_epi32(bitlm_load_i32(xk + 4 * qd));
        for (int j = 0; j < J; j++) a[j][qd] = _mm512_dpbusd_epi32(a[j][qd], _mm512_and_si512(s[j], mk[qd]), xb);
    }
}

/* One tile (J = 1: two chunks per step, the even one into a[0], the odd one into a[1], folded at
 * the end) or J = 2 / 4 tiles' streams at once (tile t + j into a[j]). */
ALWAYS_INLINE void gemv_i2(const bitlm_problem *p, const int J, int64_t t, const int l2) {
    __m512i mk[4], a[4][4];
    for (int qd = 0; qd < 4; qd++) {
        mk[qd] = _mm512_set1_epi8((char)(3 << (2 * qd)));
        for (int j = 0; j < 4; j++) a[j][qd] = _mm512_setzero_si512();
    }
    const int64_t tb = p->tile_bytes, pf = p->gemv_prefetch, nch = p->nchunks;
    const uint8_t *w = p->w + t * tb;
    const int8_t *x = p->x;
    if (J > 1) {
        for (int64_t ch = 0; ch < nch; ch++)
            i2_chunk(J, w + ch * 64, tb, x + ch * 16, a, mk, stream_pf(ch, pf, tb, J), l2);
        for (int j = 0; j < J; j++) store_tile(p, BITLM_FMT_I2, 0, t + j, i2_fold(a[j]));
        return;
    }
    int64_t ch = 0;
    for (; ch + 2 <= nch; ch += 2) {
        i2_chunk(1, w + ch * 64, tb, x + ch * 16, a, mk, pf, l2);
        i2_chunk(1, w + (ch + 1) * 64, tb, x + (ch + 1) * 16, a + 1, mk, pf, l2);
    }
    if (ch < nch) i2_chunk(1, w + ch * 64, tb, x + ch * 16, a, mk, pf, l2);
    store_tile(p, BITLM_FMT_I2, 0, t, _mm512_add_epi32(i2_fold(a[0]), i2_fold(a[1])));
}

/* The loops prefetch the plan's distance ahead; the first that many bytes of each stream of a
 * piece of work get a burst of prefetches up front instead of waiting for the hardware
 * prefetcher to ramp up (a 2560x2560 GEMV is cut into 16 pieces of ~100 KB per call). */
ALWAYS_INLINE void prefetch_start(const bitlm_problem *p, int64_t t0, int64_t t1) {
    const int64_t n = p->gemv_prefetch < p->tile_bytes ? p->gemv_prefetch : p->tile_bytes;
    for (int64_t j = 0; j < p->gemv_streams && t0 + j < t1; j++) {
        const uint8_t *w = p->w + (t0 + j) * p->tile_bytes;
        for (int64_t off = 0; off < n; off += 64) _mm_prefetch((const char *)w + off, _MM_HINT_T0);
    }
}

ALWAYS_INLINE void gemv_run(const bitlm_problem *p, const int fmt, int64_t t0, int64_t t1, const int l2) {
    int64_t t = t0;
    const int64_t J = p->gemv_streams;
    if (fmt == BITLM_FMT_T1) {
        if (J >= 2)
            for (; t + 2 <= t1; t += 2) gemv_t1(p, 2, t, l2);
        for (; t < t1; t++) gemv_t1(p, 1, t, l2);
        return;
    }
    if (fmt == BITLM_FMT_I2 && p->K <= I2_NOSHIFT_MAX_K && p->gemv_i2_mask) {
        if (J == 4)
            for (; t + 4 <= t1; t += 4) gemv_i2(p, 4, t, l2);
        if (J >= 2)
            for (; t + 2 <= t1; t += 2) gemv_i2(p, 2, t, l2);
        for (; t < t1; t++) gemv_i2(p, 1, t, l2);
        return;
    }
    if (J >= 2)
        for (; t + 2 <= t1; t += 2) gemv_tile2(p, fmt, t, l2);
    for (; t < t1; t++) gemv_tile(p, fmt, t, l2);
}

ALWAYS_INLINE void gemv(const bitlm_problem *p, const int fmt, int64_t t0, int64_t t1) {
    prefetch_start(p, t0, t1);
    if (p->gemv_pf_l2)
        gemv_run(p, fmt, t0, t1, 1);
    else
        gemv_run(p, fmt, t0, t1, 0);
}

/* ---- GEMM: M > 1 ---------------------------------------------------------------------------- */

/* Register block: JG tiles x MT_MAX tokens.  Swept on Zen 5 (M = 512, 2560 x 2560, GMAC/s per
 * core, i2 / t1 / b1): 2x6 490/426/496, 2x8 418/415/458, 2x12 ~340/-/-, 3x6 410/373/440,
 * 4x4 418/320/443, 4x6 335/309/399.  More accumulators did not help: the block is limited by
 * vpdpbusd issue, not by broadcast loads, and the smaller loop body unrolls better. */
#define JG 2
#define MT_MAX(fmt) 6

/* J tiles x MT tokens (MT <= 8; 6 in the large-M loop).  pf: prefetch the weight stream
 * GEMV_PREFETCH bytes ahead, as the GEMV does (the small-M path, where the block runs at about
 * the speed memory delivers the weights).  cd (a constant): read the tiles' codes from `codes`
 * (unpack_codes: tile j at j x nchunks x QPC x 64 bytes) instead of unpacking the packed chunks. */
ALWAYS_INLINE void gemm_block_pf(const bitlm_problem *p, const int fmt, const int J, const int MT, int64_t t, int64_t m0,
                                 const int pf, const int cd, const int8_t *codes) {
    const consts_t c = make_consts();
    const int bk = 4 * QPC(fmt);
    const int64_t kp = p->Kp, qb = p->nchunks * QPC(fmt) * 64;
    __m512i acc[JG][8];
    const uint8_t *wt[JG];
    for (int j = 0; j < J; j++) {
        wt[j] = p->w + (t + j) * p->tile_bytes;
        for (int mi = 0; mi < MT; mi++) acc[j][mi] = _mm512_setzero_si512();
    }
    const int8_t *x = p->x + m0 * kp;
    for (int64_t ch = 0; ch < p->nchunks; ch++) {
        __m512i st[JG];
        for (int j = 0; j < J && !cd; j++) {
            if (pf) _mm_prefetch((const char *)wt[j] + ch * 64 + GEMV_PREFETCH, GEMV_HINT);
            st[j] = chunk_load(fmt, wt[j] + ch * 64);
        }
#pragma GCC unroll 8
        for (int qd = 0; qd < 8; qd++) {
            if (qd >= QPC(fmt)) break;
            __m512i w[JG];
            for (int j = 0; j < J; j++)
                w[j] = cd ? _mm512_load_si512((const void *)(codes + j * qb + (ch * QPC(fmt) + qd) * 64))
                          : unpack_quad(fmt, &st[j], wt[j] + ch * 64, qd, &c);
#pragma GCC unroll 8
            for (int mi = 0; mi < MT; mi++) {
                const __m512i xb = _mm512_set1_epi32(bitlm_load_i32(x + mi * kp + ch * bk + 4 * qd));
                for (int j = 0; j < J; j++) acc[j][mi] = _mm512_dpbusd_epi32(acc[j][mi], w[j], xb);
            }
        }
    }
    for (int j = 0; j < J; j++)
        for (int mi = 0; mi < MT; mi++) store_tile(p, fmt, m0 + mi, t + j, acc[j][mi]);
}

/* Small M (2..small_m_max <= 8 tokens: serving's batched decode).  The large-M loop would cut
 * M = 8 into blocks of 6 and 2, unpacking every weight twice, and read the weights without
 * software prefetch; at this M the work per weight byte is small enough that the weight stream
 * from DRAM is what the block waits for.  Here: one block of all M tokens per tile pair (each
 * weight unpacked once), a prefetch burst at the start of the range and the GEMV's prefetch
 * distance inside it.  Same accumulators, same epilogue: the same bits as the large-M loop. */
ALWAYS_INLINE void gemm_small_j(const bitlm_problem *p, const int fmt, const int J, int64_t t) {
    switch (p->M) {
    case 2: gemm_block_pf(p, fmt, J, 2, t, 0, 1, 0, NULL); break;
    case 3: gemm_block_pf(p, fmt, J, 3, t, 0, 1, 0, NULL); break;
    case 4: gemm_block_pf(p, fmt, J, 4, t, 0, 1, 0, NULL); break;
    case 5: gemm_block_pf(p, fmt, J, 5, t, 0, 1, 0, NULL); break;
    case 6: gemm_block_pf(p, fmt, J, 6, t, 0, 1, 0, NULL); break;
    case 7: gemm_block_pf(p, fmt, J, 7, t, 0, 1, 0, NULL); break;
    default: gemm_block_pf(p, fmt, J, 8, t, 0, 1, 0, NULL); break;
    }
}

/* Large M with the codes unpacked once (p->gemm_codes).  Without it each 64-byte chunk is
 * unpacked again for every block of 6 tokens: for t1, whose base-3 digits cost ~6 vector ops per
 * quad, that is about as much work as the 12 vpdpbusd the quad feeds.  With it each tile of an
 * activation block's pass is unpacked once into per-thread scratch (one code per byte, quads in k
 * order, 40 KB per tile at K = 2560: L2-resident) and every 6-token block reads the codes back:
 * the inner loop is loads and vpdpbusd only.  Same codes, same int32 sums, same epilogue: the
 * same bits. */
ALWAYS_INLINE void unpack_codes(const bitlm_problem *p, const int fmt, int64_t t, int8_t *dst) {
    const consts_t c = make_consts();
    const uint8_t *wt = p->w + t * p->tile_bytes;
    for (int64_t ch = 0; ch < p->nchunks; ch++) {
        __m512i st = chunk_load(fmt, wt + ch * 64);
#pragma GCC unroll 8
        for (int qd = 0; qd < 8; qd++) {
            if (qd >= QPC(fmt)) break;
            _mm512_store_si512((void *)(dst + (ch * QPC(fmt) + qd) * 64), unpack_quad(fmt, &st, wt + ch * 64, qd, &c));
        }
    }
}

/* Tokens [m0, m1) against tiles t (and t+1 when J = 2); cd as gemm_block_pf. */
ALWAYS_INLINE void gemm_tiles_run(const bitlm_problem *p, const int fmt, const int J, int64_t t, int64_t m0, int64_t m1,
                                  const int cd, const int8_t *codes) {
    for (; m0 + MT_MAX(fmt) <= m1; m0 += MT_MAX(fmt)) gemm_block_pf(p, fmt, J, MT_MAX(fmt), t, m0, 0, cd, codes);
    /* remainder (1..5 tokens): at most 3 passes with blocks of 4, 2, 1 */
    while (m0 < m1) {
        const int64_t r = m1 - m0;
        if (r >= 4) {
            gemm_block_pf(p, fmt, J, 4, t, m0, 0, cd, codes);
            m0 += 4;
        } else if (r >= 2) {
            gemm_block_pf(p, fmt, J, 2, t, m0, 0, cd, codes);
            m0 += 2;
        } else {
            gemm_block_pf(p, fmt, J, 1, t, m0, 0, cd, codes);
            m0 += 1;
        }
    }
}

/* ... with `codes` (per-thread scratch, or NULL: unpack in registers) the tiles are unpacked
 * there first. */
ALWAYS_INLINE void gemm_tiles(const bitlm_problem *p, const int fmt, const int J, int64_t t, int64_t m0, int64_t m1,
                              int8_t *codes) {
    if (!codes) {
        gemm_tiles_run(p, fmt, J, t, m0, m1, 0, NULL);
        return;
    }
    for (int j = 0; j < J; j++) unpack_codes(p, fmt, t + j, codes + j * p->nchunks * QPC(fmt) * 64);
    gemm_tiles_run(p, fmt, J, t, m0, m1, 1, codes);
}

/* Activation rows per outer block: keep the block (MB x Kp bytes, p->x_block_bytes: a quarter
 * of the per-core L2, see dispatch.c) inside L2 while every tile pair of this thread's range
 * streams past it (measured: M = 512 at K = 2560, 1.3 MB of activations, ran at half the speed
 * of M = 128 without this). */

ALWAYS_INLINE void mm_any(const bitlm_problem *p, const int fmt, int64_t t0, int64_t t1) {
    if (p->M == 1) {
        gemv(p, fmt, t0, t1);
        return;
    }
    if (p->M <= p->small_m_max && p->M <= 8) {
        prefetch_start(p, t0, t1);
        int64_t t = t0;
        for (; t + JG <= t1; t += JG) gemm_small_j(p, fmt, JG, t);
        if (t < t1) gemm_small_j(p, fmt, 1, t);
        return;
    }
    int8_t *codes = p->gemm_codes ? bitlm_thread_scratch((size_t)(JG * p->nchunks * QPC(fmt) * 64)) : NULL;
    /* reading unpacked codes, a 4x larger block amortises each unpack over 4x more tokens (Zen 4,
     * t1, M = 512: 196 / 187 GMAC/s per core at 256 KB, 205 / 209 at 1 MB and above) */
    int64_t mb = (codes ? 4 : 1) * p->x_block_bytes / p->Kp;
    mb = mb < MT_MAX(fmt) ? MT_MAX(fmt) : mb - mb % MT_MAX(fmt);
    for (int64_t m0 = 0; m0 < p->M; m0 += mb) {
        const int64_t m1 = m0 + mb < p->M ? m0 + mb : p->M;
        int64_t t = t0;
        for (; t + JG <= t1; t += JG) gemm_tiles(p, fmt, JG, t, m0, m1, codes);
        if (t < t1) gemm_tiles(p, fmt, 1, t, m0, m1, codes); /* odd tile count */
    }
}

static void mm_i2(const bitlm_problem *p, int64_t t0, int64_t t1) { mm_any(p, BITLM_FMT_I2, t0, t1); }
static void mm_t1(const bitlm_problem *p, int64_t t0, int64_t t1) { mm_any(p, BITLM_FMT_T1, t0, t1); }
static void mm_b1(const bitlm_problem *p, int64_t t0, int64_t t1) { mm_any(p, BITLM_FMT_B1, t0, t1); }

/* ---- fused RMSNorm + quantiser ------------------------------------------------------------ */

static void quant_row_avx512(const float *x, int64_t k, const float *nw, double eps, int do_norm, int8_t *q,
                             float *a_out) {
    float rs = 1.0f;
    if (do_norm) {
        /* 16 double lanes, lane j = elements j, j+16, ... (the documented order) */
        __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
        int64_t i = 0;
        for (; i + 16 <= k; i += 16) {
            const __m512 v = _mm512_loadu_ps(x + i);
            const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
            const __m512d hi = _mm512_cvtps_pd(_mm256_castsi256_ps(_mm512_extracti64x4_epi64(_mm512_castps_si512(v), 1)));
            s0 = _mm512_add_pd(s0, _mm512_mul_pd(lo, lo));
            s1 = _mm512_add_pd(s1, _mm512_mul_pd(hi, hi));
        }
        double lane[16];
        _mm512_storeu_pd(lane, s0);
        _mm512_storeu_pd(lane + 8, s1);
        for (; i < k; i++) lane[i & 15] += (double)x[i] * (double)x[i];
        for (int j = 0; j < 8; j++) lane[j] += lane[j + 8];
        for (int j = 0; j < 4; j++) lane[j] += lane[j + 4];
        for (int j = 0; j < 2; j++) lane[j] += lane[j + 2];
        lane[0] += lane[1];
        rs = (float)(1.0 / sqrt(lane[0] / (double)k + eps));
    }
    const __m512 vr = _mm512_set1_ps(rs);
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) {
        const __mmask16 mk = k - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (k - i)) - 1);
        __m512 y = _mm512_maskz_loadu_ps(mk, x + i);
        if (do_norm) {
            y = _mm512_mul_ps(y, vr);
            if (nw) y = _mm512_mul_ps(y, _mm512_maskz_loadu_ps(mk, nw + i));
        }
        vmax = _mm512_max_ps(vmax, _mm512_abs_ps(y));
    }
    const float a = bitlm_act_scale(_mm512_reduce_max_ps(vmax));
    const __m512 va = _mm512_set1_ps(a);
    for (int64_t i = 0; i < k; i += 16) {
        const __mmask16 mk = k - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (k - i)) - 1);
        __m512 y = _mm512_maskz_loadu_ps(mk, x + i);
        if (do_norm) {
            y = _mm512_mul_ps(y, vr);
            if (nw) y = _mm512_mul_ps(y, _mm512_maskz_loadu_ps(mk, nw + i));
        }
        const __m512i iv = _mm512_cvt_roundps_epi32(_mm512_mul_ps(y, va), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_mask_storeu_epi8(q + i, mk, _mm512_cvtsepi32_epi8(iv)); /* saturating = clamp(-128, 127) */
    }
    *a_out = a;
}

/* ---- dense int8 / bf16 heads ------------------------------------------------------------------ */

#define W_I8 0   /* int8 rows, one float scale per row */
#define W_BF16 1 /* bf16 rows, no scale */
#define W_I8A8 2 /* int8 rows and scale, int8 activations (exact integer sums) */

/* 16 int8 -> 16 float (exact); masked for the K tail (masked-off lanes read as 0: they add
 * x*0 = +-0 to a lane, which leaves it unchanged, as the definition requires). */
ALWAYS_INLINE __m512 load_w16(const int8_t *p, __mmask16 mk) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, p)));
}

/* 16 bf16 -> 16 float (exact: zero-extend, shift into the upper half); masked like load_w16. */
ALWAYS_INLINE __m512 load_bf16x16(const uint16_t *p, __mmask16 mk) {
    const __m512i u = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, (const void *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}

ALWAYS_INLINE __m512 load_w(const int WT, const bitlm_dense_problem *p, int64_t i, __mmask16 mk) {
    return WT == W_BF16 ? load_bf16x16(p->wb + i, mk) : load_w16(p->w + i, mk);
}

/* The documented fold l[j] += l[j+8], += l[j+4], += l[j+2], += l[j+1], as vector adds. */
ALWAYS_INLINE float fold16(__m512 v) {
    const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)));
}

/* R rows x T tokens, one accumulator (16 lanes) per pair: mul then add, never FMA, so the
 * lane sums are the definition's.  R*T <= 16 accumulators (R = 8 only for T = 1).  WT: the
 * weight type.  Decode (T = 1) prefetches the next R rows, 512 bytes ahead of the loads: into
 * L1 for int8 (4 rows = 10 KB ahead at K = 2560), into L2 for bf16 (8 rows = 40 KB ahead; 8
 * rows with an L2 prefetch measured ~5% faster than 4 rows into L1 on the 2B4T head). */
ALWAYS_INLINE void dense_block(const int WT, const bitlm_dense_problem *p, const int R, const int T, int64_t n,
                               int64_t m) {
    const int64_t K = p->K;
    const int B = WT == W_BF16 ? 2 : 1; /* bytes per weight */
    __m512 acc[8][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();
    const int64_t w0 = n * K; /* element index of row n */
    const char *wbytes = WT == W_BF16 ? (const char *)p->wb : (const char *)p->w;
    const float *x = p->x + m * K;
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 mk = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        if (T == 1 && ((k * B) & 63) == 0) /* decode: stream the next rows' bytes ahead */
            for (int r = 0; r < R; r++)
                _mm_prefetch(wbytes + (w0 + (r + R) * K + k) * B + 512, WT == W_BF16 ? _MM_HINT_T1 : _MM_HINT_T0);
        __m512 xv[4];
        for (int t = 0; t < T; t++) xv[t] = _mm512_maskz_loadu_ps(mk, x + t * K + k);
        for (int r = 0; r < R; r++) {
            const __m512 wv = load_w(WT, p, w0 + r * K + k, mk);
            for (int t = 0; t < T; t++) acc[r][t] = _mm512_add_ps(acc[r][t], _mm512_mul_ps(xv[t], wv));
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) {
            const float s = fold16(acc[r][t]);
            p->y[(m + t) * p->N + n + r] = WT == W_BF16 ? s : s * p->scale[n + r];
        }
}

/* Rows per W8A8 panel (dense_panels' PR for int8 weights). */
#define I8A8_PANEL 64

/* W8A8 head (W_I8A8), R rows x T tokens.  vpdpbusd wants one unsigned operand: the weights are read as w ^ 0x80 = w + 128 (u8), so
 * the lanes hold sum (w + 128) x = acc + 128 sum x, and one subtraction of 128 * xsum[m] per
 * output gives acc (all in wrapping int32: exact, since |acc| < 2^31).  A masked K tail loads
 * zeros on both sides: (0 ^ 0x80) * 0 adds nothing.  One xor + one vpdpbusd per 64 weights.
 * Prefetch: decode (T = 1) the next R rows, 512 bytes ahead, into L1; M > 1 (serving's batched
 * decode) the first token block of each R-row group the same rows of the next panel, one panel
 * (160 KB at K = 2560) ahead, into L2 — without it the M = 8 head waited on DRAM behind the
 * hardware prefetcher (65 -> 23 ms per step on the 2B4T head, docs/performance.md). */
ALWAYS_INLINE void i8a8_block(const bitlm_dense_problem *p, const int R, const int T, int64_t n, int64_t m) {
    const int64_t K = p->K;
    const __m512i bias = _mm512_set1_epi8((char)0x80);
    __m512i acc[4][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_si512();
    const int8_t *w = p->w + n * K, *x = p->xq + m * K;
    for (int64_t k = 0; k < K; k += 64) {
        const __mmask64 mk = K - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (K - k)) - 1);
        if (T == 1)
            for (int r = 0; r < R; r++) _mm_prefetch((const char *)(w + (r + R) * K + k) + 512, _MM_HINT_T0);
        else if (m == 0) /* M > 1: the first token block pulls the next panel's rows into L2 */
            for (int r = 0; r < R; r++) _mm_prefetch((const char *)(w + (r + I8A8_PANEL) * K + k), _MM_HINT_T1);
        __m512i xv[4];
        for (int t = 0; t < T; t++) xv[t] = _mm512_maskz_loadu_epi8(mk, x + t * K + k);
        for (int r = 0; r < R; r++) {
            const __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, w + r * K + k), bias);
            for (int t = 0; t < T; t++) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], wv, xv[t]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) {
            const uint32_t s = (uint32_t)_mm512_reduce_add_epi32(acc[r][t]) - 128u * (uint32_t)p->xsum[m + t];
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

ALWAYS_INLINE void dense_rows(const int WT, const bitlm_dense_problem *p, const int R, int64_t n) {
    int64_t m = 0;
    for (; m + 4 <= p->M; m += 4) head_block(WT, p, R, 4, n, m);
    switch (p->M - m) {
    case 3: head_block(WT, p, R, 3, n, m); break;
    case 2: head_block(WT, p, R, 2, n, m); break;
    case 1: head_block(WT, p, R, 1, n, m); break;
    default: break;
    }
}

/* Panels of PR rows (PR*K weights, L2-resident: 64 int8 or 32 bf16 rows, the same bytes)
 * against all tokens. */
ALWAYS_INLINE void dense_panels(const int WT, const bitlm_dense_problem *p, int64_t n0, int64_t n1) {
    const int64_t PR = WT == W_BF16 ? 32 : I8A8_PANEL;
    for (int64_t pn = n0; pn < n1; pn += PR) {
        const int64_t pe = pn + PR < n1 ? pn + PR : n1;
        int64_t n = pn;
        if (WT == W_BF16 && p->M == 1) /* decode: 8 rows (8 add chains) per step */
            for (; n + 8 <= pe; n += 8) dense_block(WT, p, 8, 1, n, 0);
        for (; n + 4 <= pe; n += 4) dense_rows(WT, p, 4, n);
        switch (pe - n) {
        case 3: dense_rows(WT, p, 3, n); break;
        case 2: dense_rows(WT, p, 2, n); break;
        case 1: dense_rows(WT, p, 1, n); break;
        default: break;
        }
    }
}

static void dense_avx512(const bitlm_dense_problem *p, int64_t n0, int64_t n1) { dense_panels(W_I8, p, n0, n1); }

static void dense_bf16_avx512(const bitlm_dense_problem *p, int64_t n0, int64_t n1) {
    dense_panels(W_BF16, p, n0, n1);
}

/* W8A8 decode (M = 1), one row at a time: each row's K bytes are read front to back (four
 * accumulators, one reduction per row), so the head is one sequential stream with a software
 * prefetch pf bytes ahead in it (into L2 with l2, else L1), like the packed GEMV.  The plan's
 * choice on AMD (dispatch.c): on Zen 4 (2B4T head, 328 MB, huge pages) 13.3 -> 21.9 GB/s at 1
 * thread against the four-row blocks of i8a8_block, whose four streams 2.5 KB apart the
 * prefetchers there follow poorly; then 4 KB ahead into L2 instead of 8 KB into L1: in the
 * decode step, head 11.8-12.4 -> 9.95-9.98 ms per token at 2 threads (rounds whose probes read
 * alike), decode +10-16 % at 1 and 2 threads.  Same integer sums
 * (wrapping int32, exact), same epilogue: the same bits. */
ALWAYS_INLINE void i8a8_gemv_rows1(const bitlm_dense_problem *p, int64_t n0, int64_t n1, const int64_t pf,
                                   const int l2) {
    const int64_t K = p->K;
    const __m512i bias = _mm512_set1_epi8((char)0x80);
    const int8_t *x = p->xq;
    const uint32_t corr = 128u * (uint32_t)p->xsum[0];
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *w = p->w + n * K;
        __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                          _mm512_setzero_si512()};
        int64_t k = 0;
        for (; k + 256 <= K; k += 256)
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) {
                gemv_pf((const uint8_t *)(w + k + 64 * i + pf), l2);
                const __m512i wv = _mm512_xor_si512(_mm512_loadu_si512((const void *)(w + k + 64 * i)), bias);
                acc[i] = _mm512_dpbusd_epi32(acc[i], wv, _mm512_loadu_si512((const void *)(x + k + 64 * i)));
            }
        for (; k < K; k += 64) { /* masked tail: zeros on both sides add nothing */
            const __mmask64 mk = K - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (K - k)) - 1);
            gemv_pf((const uint8_t *)(w + k + pf), l2);
            const __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, w + k), bias);
            acc[0] = _mm512_dpbusd_epi32(acc[0], wv, _mm512_maskz_loadu_epi8(mk, x + k));
        }
        const __m512i s4 = _mm512_add_epi32(_mm512_add_epi32(acc[0], acc[1]), _mm512_add_epi32(acc[2], acc[3]));
        bitlm_i8a8_store(p, 0, n, (uint32_t)_mm512_reduce_add_epi32(s4) - corr);
    }
}

static void dense_i8a8_avx512(const bitlm_dense_problem *p, int64_t n0, int64_t n1) {
    const bitlm_kernel_cfg *cfg = bitlm_cfg();
    if (p->M == 1 && cfg->head_rows == 1) {
        if (cfg->head_pf_l2) /* a constant level in each copy (gemv_pf) */
            i8a8_gemv_rows1(p, n0, n1, cfg->head_prefetch, 1);
        else
            i8a8_gemv_rows1(p, n0, n1, cfg->head_prefetch, 0);
        return;
    }
    dense_panels(W_I8A8, p, n0, n1);
}

/* ---- bandwidth probe -------------------------------------------------------------------------- */

static uint64_t mem_read_avx512(const uint8_t *buf, size_t n) {
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
    size_t i = 0;
    for (; i + 256 <= n; i += 256) {
        s0 = _mm512_add_epi64(s0, _mm512_load_si512((const void *)(buf + i)));
        s1 = _mm512_add_epi64(s1, _mm512_load_si512((const void *)(buf + i + 64)));
        s2 = _mm512_add_epi64(s2, _mm512_load_si512((const void *)(buf + i + 128)));
        s3 = _mm512_add_epi64(s3, _mm512_load_si512((const void *)(buf + i + 192)));
    }
    for (; i + 64 <= n; i += 64) s0 = _mm512_add_epi64(s0, _mm512_load_si512((const void *)(buf + i)));
    s0 = _mm512_add_epi64(_mm512_add_epi64(s0, s1), _mm512_add_epi64(s2, s3));
    return (uint64_t)_mm512_reduce_add_epi64(s0);
}

const bitlm_kernel_table bitlm_avx512_table = {
    "avx512",
    {NULL, mm_i2, mm_t1, mm_b1},
    quant_row_avx512,
    mem_read_avx512,
    dense_avx512,
    dense_bf16_avx512,
    dense_i8a8_avx512,
    bitlm_attn_heads,
    bitlm_hadamard_row,
    bitlm_attn_heads_bf16,
};
