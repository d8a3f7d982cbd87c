/*
 * bitlm_kernels.h — the one public header of the bitlm native kernel library.
 *
 * A torch-free C library: int8 activations x {ternary, binary} packed weights -> int32 (or
 * float32 after the dequant epilogue), a fused RMSNorm + per-token absmax int8 quantiser,
 * float32 x {int8-row, bf16-row} products for output heads, a memory-bandwidth probe, CPU
 * feature dispatch (generic / AVX2 / AVX-512 VNNI) and a small persistent thread pool.  Python
 * loads it with ctypes (src/bitlm/kernels/native.py); every pointer is a caller-owned,
 * contiguous buffer (zero copy), every size an int64.
 *
 * The packed weight layouts are defined byte by byte in src/bitlm/packing.py (the pure-torch
 * pack/unpack there is the reference) and summarised here:
 *
 *   all formats: rows are grouped in tiles of BITLM_TILE_N = 16 output rows; K is cut into
 *   chunks of BLOCK_K columns; one chunk of one tile is 64 bytes; tiles are stored one after
 *   the other, each tile's chunks in increasing k.  Inside a chunk, dword r (bytes 4r..4r+3)
 *   belongs to tile row r for i2/t1.  N and K are padded up to the tile / chunk with the
 *   format's padding value (a zero weight for i2/t1, bit 0 for b1); padded activations are 0.
 *
 *   I2 (2.0 bpw, BLOCK_K 16): byte 4r+b of chunk c, bits 2q..2q+1 = code(n=16t+r, k=16c+4q+b),
 *       code = w + 1 in {0,1,2}.
 *   T1 (1.6 bpw, BLOCK_K 20): byte 4r+b of chunk c = ceil(256*v/243), v = sum_i d_i*3^(4-i),
 *       d_i = code(n=16t+r, k=20c+4i+b); decoded by m0 = byte, d_i = (3*m_i)>>8,
 *       m_{i+1} = (3*m_i) & 255.
 *   B1 (1.0 bpw, BLOCK_K 32): little-endian uint64 word q (bytes 8q..8q+7) of chunk c,
 *       bit 4r+b = [w(n=16t+r, k=32c+4q+b) == +1].
 *
 * Integer semantics (what every tier computes, bit for bit):
 *   acc[m, n] = sum_k x[m, k] * w[n, k]    (w in {-1,0,+1} or {-1,+1}; exact in int32 for
 *                                            K < 2^24, i.e. |acc| <= 128 K < 2^31)
 *   implemented as  sum_k code*x - sum_k x  (i2, t1)  or  2*sum_k bit*x - sum_k x  (b1).
 * Dequant epilogue (the one fixed order, float32):
 *   f[m, g] = s[g] / a[m];   y[m, n] = (float)acc[m, n] * f[m, n / (N/G)]  (+ bias[n])
 * Fused RMSNorm + quantisation of a float32 row x (length K), see bitlm_quantize_rows().
 *
 * Return codes: 0 on success, a negative BITLM_E* value otherwise.  No function prints.
 */
#ifndef BITLM_KERNELS_H
#define BITLM_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define BITLM_API __declspec(dllexport)
#else
#define BITLM_API __attribute__((visibility("default")))
#endif

/* Bumped whenever a signature, a layout or the semantics of an op change; native.py refuses a
 * library whose ABI differs from the one it was written for. */
#define BITLM_ABI_VERSION 14

/* Packed weight format ids (the Python registry in bitlm.packing carries the same ids). */
#define BITLM_FMT_I2 1
#define BITLM_FMT_T1 2
#define BITLM_FMT_B1 3

#define BITLM_TILE_N 16
#define BITLM_I2_BLOCK_K 16
#define BITLM_T1_BLOCK_K 20
#define BITLM_B1_BLOCK_K 32
#define BITLM_CHUNK_BYTES 64

/* Kernel tiers, in increasing order of capability. */
#define BITLM_TIER_GENERIC 0
#define BITLM_TIER_AVX2 1   /* AVX2 + FMA: vpmaddubsw / vpmaddwd */
#define BITLM_TIER_AVX512 2 /* AVX-512 F/BW/VL + VNNI: vpdpbusd */
#define BITLM_NUM_TIERS 3

/* Error codes. */
#define BITLM_EINVAL (-1)     /* bad argument (null pointer, negative size, unknown format) */
#define BITLM_ENOMEM (-2)     /* scratch allocation failed */
#define BITLM_ENOTIER (-3)    /* tier not compiled in or not supported by this CPU / OS */

/* ---- library / dispatch -------------------------------------------------------------------- */
BITLM_API int bitlm_abi_version(void);
/* Tier in use.  Chosen once (lazily) from cpuid/xgetbv, or from env BITLM_KERNEL_TIER=
 * generic|avx2|avx512 (an unsupported request falls back to the best supported tier below it;
 * bitlm_tier_note() says so). */
BITLM_API int bitlm_tier(void);
BITLM_API int bitlm_best_tier(void);             /* best tier this CPU + build supports */
BITLM_API int bitlm_tier_supported(int tier);    /* 1 if compiled in and supported by CPU/OS */
BITLM_API int bitlm_set_tier(int tier);          /* 0, or BITLM_ENOTIER */
BITLM_API const char *bitlm_tier_name(int tier); /* "generic", "avx2", "avx512", or "?" */
BITLM_API const char *bitlm_tier_note(void);     /* why the current tier was chosen */
BITLM_API const char *bitlm_cpu_flags(void);     /* space separated features detected */
BITLM_API const char *bitlm_build_info(void);    /* compiler + which tiers were compiled */
/* The CPU as cpuid names it (vendor, family/model/stepping), the cache sizes found and the
 * blocking / path choices made from them and the environment (BITLM_GEMM_XBLOCK: activation
 * block bytes of the GEMM; BITLM_GEMM_SMALL_M: largest M run as one register block, 0 = off),
 * as space-separated key=value pairs. */
BITLM_API const char *bitlm_kernel_config(void);

/* ---- thread pool ---------------------------------------------------------------------------- */
/* Default: env BITLM_NUM_THREADS, else the number of CPUs this process may run on. */
BITLM_API int bitlm_num_threads(void);
BITLM_API int bitlm_set_num_threads(int n); /* 1..256; returns the previous value or EINVAL */

/* ---- packed weight geometry ------------------------------------------------------------------- */
BITLM_API int bitlm_format_block_k(int fmt);               /* BLOCK_K, or EINVAL */
BITLM_API int64_t bitlm_packed_bytes(int fmt, int64_t n, int64_t k); /* bytes, or EINVAL */

/* ---- integer matmul ---------------------------------------------------------------------------
 * y[m, n] = sum_k x[m, k] * W[n, k] for m < M, n < N: x int8 row-major (M, K), w packed (fmt,
 * N, K) as bitlm_packed_bytes() bytes, y int32 row-major (M, N).  M == 1 runs the decode GEMV,
 * M > 1 the blocked GEMM. */
BITLM_API int bitlm_gemm(int fmt, const int8_t *x, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                         int32_t *y);

/* Same product followed by the dequant epilogue, written as float32 (M, N):
 *   y[m, n] = (float)acc[m, n] * (s[g] / a[m]) (+ bias[n]),  g = n / (N / groups).
 * a: (M,) activation scales; s: (groups,) weight scales; bias: (N,) or NULL. */
BITLM_API int bitlm_matmul_f32(int fmt, const int8_t *x, const float *a, int64_t m, int64_t k,
                               const uint8_t *w, const float *s, int64_t groups, int64_t n,
                               const float *bias, float *y);

/* ---- fused RMSNorm + absmax int8 quantisation -------------------------------------------------
 * For each row x (length K) of a float32 (M, K) array, when do_norm != 0:
 *   ss   = sum of (double)x_k^2 in 16 interleaved lanes: lane j sums k = j, j+16, j+32, ...
 *          sequentially from +0.0, then lanes fold pairwise l[j] += l[j+8], l[j] += l[j+4],
 *          l[j] += l[j+2], l[j] += l[j+1] (double, no FMA contraction that changes results:
 *          x^2 of a float32 is exact in double);
 *   r    = (float)(1.0 / sqrt(ss / K + eps))             (double, correctly rounded, then float)
 *   y_k  = (x_k * r) * w_k   (float32; "* w_k" only when norm_w != NULL)
 * else y_k = x_k.  Then, exactly as bitlm.quant.activation_quantize (torch float32 semantics):
 *   amax = max_k |y_k|;  a = (1.0f / max(amax, 1e-5f)) * 127.0f   (torch's 127 / t is
 *          t.reciprocal() * 127, two roundings, reproduced on purpose);
 *   q_k  = clamp(round_half_even(y_k * a), -128, 127).
 * q: int8 (M, K); a: float32 (M,).  NaN/Inf inputs give unspecified q. */
BITLM_API int bitlm_quantize_rows(const float *x, int64_t m, int64_t k, const float *norm_w, double eps,
                                  int do_norm, int8_t *q, float *a);

/* ---- dense int8-weight head ---------------------------------------------------------------------
 * For an output head / embedding stored as int8 rows with one float scale per row (W ~ w*s):
 *   y[m, n] = (sum_k x[m, k] * (float)w[n, k]) * scale[n]
 * x float32 (M, K), w int8 (N, K), scale float32 (N,), y float32 (M, N).  The float32 sum has
 * one fixed order in every tier: 16 lanes, lane j accumulates k = j, j+16, j+32, ... as
 * acc = acc + x*w (the product rounded, then the sum: no FMA) from +0.0, and the lanes fold
 * l[j] += l[j+8], += l[j+4], += l[j+2], += l[j+1]; then one multiply by scale[n].  Decode
 * (M = 1) streams the int8 matrix once: memory-bound at 1 byte per weight. */
BITLM_API int bitlm_dense_i8(const float *x, int64_t m, int64_t k, const int8_t *w, const float *scale, int64_t n,
                             float *y);

/* ---- dense int8-weight head with int8 activations (W8A8) ------------------------------------------
 * The same int8 head read with quantised activations, as a BitLinear does (and as llama.cpp's
 * q8_0 head does with blocks of 32): xq int8 (M, K) and a float32 (M,) from bitlm_quantize_rows
 * (x ~ xq / a), then
 *   acc[m, n] = sum_k xq[m, k] * w[n, k]        (exact: int32, K < 131072)
 *   y[m, n]   = (float)acc[m, n] * (scale[n] / a[m])   (float32: one division, one multiply)
 * exactly the BitLinear epilogue.  Integer sums have no order, so every tier gives the same bits;
 * decode needs one vpdpbusd per 64 weights instead of a float convert, multiply and add per
 * weight, and stays memory-bound at 1 byte per weight.  K >= 131072 is EINVAL. */
BITLM_API int bitlm_dense_i8a8(const int8_t *xq, const float *a, int64_t m, int64_t k, const int8_t *w,
                               const float *scale, int64_t n, float *y);

/* ---- dense bf16-weight head ---------------------------------------------------------------------
 * The same product for a head stored as bfloat16 rows, with no scale:
 *   y[m, n] = sum_k x[m, k] * float(w[n, k]),   float(b) = the float32 whose bits are b << 16 (exact)
 * x float32 (M, K), w (N, K) bf16 bit patterns as uint16, y float32 (M, N).  The float32 sum has
 * the order of bitlm_dense_i8 in every tier: 16 lanes, lane j accumulates k = j, j+16, j+32, ...
 * (for K not a multiple of 16 the last, partial group adds k to lane k % 16 the same way) as
 * acc = acc + x*w (product rounded, then the sum: no FMA) from +0.0, then the fold
 * l[j] += l[j+8], += l[j+4], += l[j+2], += l[j+1]; no final multiply.  NaN payloads are
 * unspecified.  x is not rounded to bf16 (torch's bf16 F.linear does round it).  Decode (M = 1)
 * streams the matrix once: memory-bound at 2 bytes per weight. */
BITLM_API int bitlm_dense_bf16(const float *x, int64_t m, int64_t k, const uint16_t *w, int64_t n, float *y);

/* ---- low-bit heads: 6-bit / 4-bit rows with per-group f16 scales (W6A8 / W4A8) -----------------
 * For an output head stored with BITLM_HEAD_GROUP = 32 weights per scale group along K, symmetric:
 *   W[n, k] ~ w[n, k] * s[n, g],  g = k / 32,  w in [-31, 31] (bits 6) or [-7, 7] (bits 4),
 *   s an IEEE half (f16) per (row, group).
 * Read with quantised activations as the W8A8 head is (xq int8 (M, K), a float32 (M,) from
 * bitlm_quantize_rows, x ~ xq / a):
 *   acc[m, n, g] = sum_{k in group g} xq[m, k] * w[n, k]              (exact int32, |acc| < 2^17)
 *   sum = +0.0f;  for g = 0, 1, ...: sum = sum + (float)acc[m, n, g] * (float)s[n, g]
 *   y[m, n] = sum / a[m]
 * (float32, product rounded then added: no FMA; the f16 -> float conversion is exact), the same
 * bits on every tier.  K is padded to a multiple of 32 with zero weights (and activations),
 * N to a multiple of 16 with zero rows.
 * Layout: rows in tiles of 16 (BITLM_TILE_N); tile t's groups one after the other, each a block
 * of 256 bytes (bits 4) or 384 bytes (bits 6); code = w + 8 (bits 4) or w + 32 (bits 6).  In a
 * block, operand o (0..7) holds k = 32g + 4o + b (b = 0..3) of tile row r:
 *   low 4 bits of the code: byte 64*(o/2) + 4r + b, low nibble if o is even, high nibble if odd;
 *   bits 6 only, high 2 bits: byte 256 + 64*(o/4) + 4r + b, bits 2*(o%4) .. 2*(o%4)+1.
 * Scales: f16 bits, (tiles, groups, 16) — tile t, group g, row r at index (t*groups + g)*16 + r.
 * Decode (M = 1) streams the matrix once at 4.5 (bits 4) or 6.5 (bits 6) bits per weight. */
#define BITLM_HEAD_GROUP 32
BITLM_API int64_t bitlm_head_bytes(int bits, int64_t n, int64_t k); /* packed bytes, or EINVAL */
BITLM_API int bitlm_dense_lowbit(int bits, const int8_t *xq, const float *a, int64_t m, int64_t k, const uint8_t *w,
                                 const uint16_t *scale, int64_t n, float *y);

/* ---- fused decode step ------------------------------------------------------------------------
 * One token through every transformer block of a BitNet b1.58 / 2B4T style decoder (RMSNorm
 * sub-layer norms, gated FFN), in one call: what bitlm.engine.PackedModel.forward computes for
 * B = T = 1 with a KV cache, without a round trip to Python per projection.  Per block:
 *   xq, a   = quantize_rows(x, input_norm)                     (bitlm_quantize_rows semantics)
 *   q, k, v = matmul_f32(xq, a, W_q / W_k / W_v) (+ bias)       (one parallel pass over all three)
 *   q, k    = RoPE: y_j = x_j*cos_j + (-x_{j+D/2})*sin_j (j < D/2), x_j*cos_j + x_{j-D/2}*sin_j
 *   k_cache[h, pos] = k_h; v_cache[h, pos] = v_h
 *   o_h     = attention of q_h over positions 0..pos of kv head h / (H / H_kv), scale 1/sqrt(D):
 *             s_t = fold16(lanes of q*k_t products) * scale;  m = max s_t;
 *             e_t = exp(s_t - m) by one fixed float32 recipe (internal.h bitlm_exp_softmax: argument
 *             clamped to [-87, 0], Cephes' range reduction and degree-5 polynomial, within 2 ulp);
 *             o = (sum_t e_t * v_t, sequential in t) / (fold16 of 16 lanes, lane l summing the
 *             e_t of t = l mod 16 in t order)
 *   x      += matmul_f32(quantize_rows(o, attn_sub_norm), W_o)
 *   g, u    = matmul_f32(quantize_rows(x, post_norm), W_up)   (W_up = gate rows, then up rows)
 *   h       = act(g) * u,  act = silu (x / (1 + expf(-x))) or relu^2 ((max(x, 0))^2)
 *   x      += matmul_f32(quantize_rows(h, ffn_sub_norm), W_down)
 * A NULL norm weight means "no norm, plain quantisation" (models without sub-norms).  Every
 * float op is a separate multiply / add (no FMA), so every tier gives the same bits; the
 * attention differs from torch's SDPA only by rounding. */
typedef struct bitlm_linear_desc {
    int64_t fmt;       /* BITLM_FMT_* */
    int64_t n, k;      /* output rows, input columns */
    int64_t groups;    /* weight scale groups (n % groups == 0) */
    const uint8_t *w;  /* bitlm_packed_bytes(fmt, n, k) bytes */
    const float *s;    /* (groups,) */
    const float *bias; /* (n,) or NULL */
} bitlm_linear_desc;

typedef struct bitlm_block_desc {
    bitlm_linear_desc q, k, v, o, up, down;
    const float *input_norm, *attn_sub_norm, *post_norm, *ffn_sub_norm; /* (K,) each, or NULL */
    float *k_cache, *v_cache; /* (kv_heads, max_len, head_dim) each, of the decoder's kv_type */
} bitlm_block_desc;

#define BITLM_ACT_SILU_GLU 1
#define BITLM_ACT_RELU2_GLU 2

/* KV cache types.  A row (one position of one kv head, D values) is rounded once, when written:
 *   F32: as is;  F16: IEEE half, round to nearest even (overflow -> inf; a NaN -> 0x7E00 with its
 *        sign: torch's .half() keeps a payload in some elements and not others), read back exactly;
 *   I8:  s = amax_j |x_j| / 127.0f (float32 division), q_j = clamp(rint(x_j / s), -127, 127)
 *        (q = 0 when s = 0 or x_j / s is NaN), read back as (float)q_j * s (one rounding) — per token, per head.
 * The attention then runs exactly as for F32 on the values read back. */
#define BITLM_KV_F32 0
#define BITLM_KV_F16 1
#define BITLM_KV_I8 2

typedef struct bitlm_decoder_desc {
    int64_t n_layers, d_model, n_heads, kv_heads, head_dim, ffn_dim, max_len, act;
    double eps;                     /* RMSNorm epsilon */
    const bitlm_block_desc *blocks; /* (n_layers,) */
    int64_t kv_type;                /* BITLM_KV_*: blocks' k_cache / v_cache hold float, f16 or int8 */
    float *const *kv_scales;        /* I8: 2 * n_layers (kv_heads, max_len) float32 arrays, k then v of
                                     * each layer; NULL otherwise */
} bitlm_decoder_desc;

/* x: (d_model,) float32 residual stream, in: the token's embedding, out: the stream after the
 * last block (before the final norm).  pos: the token's position (= tokens already cached,
 * < max_len).  cos, sin: (head_dim,) rotary factors for pos.  Returns 0, EINVAL on an
 * inconsistent description (nothing is written then), or ENOMEM. */
BITLM_API int bitlm_decode_step(const bitlm_decoder_desc *d, float *x, int64_t pos, const float *cos,
                                const float *sin);

/* One whole decode token in one call (bitlm.engine.PackedModel's fused decode): the embedding row
 * of `token`, bitlm_decode_step at `pos`, then the final RMSNorm + int8 quantisation
 * (bitlm_quantize_rows with final_norm) and the output head with int8 activations
 * (bitlm_dense_i8a8, or bitlm_dense_lowbit with head_bits 6 / 4) into logits (vocab,) — the very
 * calls the per-call path makes from Python, so the same bits, without the ~10 Python and torch
 * calls per token between them (each runs with cold caches after a token's weights have streamed
 * through: ~0.7 ms of a 2B4T token).  Embedding rows: embed_kind 0 float32, 1 bf16 bits, 2 int8
 * with a float32 scale per row (row = (float)q * scale, as Dense.rows).  cos_tab / sin_tab:
 * (rope_rows, head_dim) float32 tables, row pos used.  x: (d_model,) float32 scratch, the residual
 * stream after the last block on return.  0; EINVAL when token is outside [0, vocab), pos is
 * outside the cache or the rope table, or the description is inconsistent (logits and the caches
 * untouched); ENOMEM. */
typedef struct bitlm_token_desc {
    int64_t vocab;
    int64_t embed_kind;         /* 0 f32, 1 bf16, 2 int8 + scale */
    const void *embed;          /* (vocab, d_model) */
    const float *embed_scale;   /* (vocab,) for int8, else NULL */
    const float *final_norm;    /* (d_model,) */
    int64_t head_bits;          /* 8: int8 rows + float32 scale per row; 6 / 4: bitlm_dense_lowbit */
    const void *head;           /* the head's rows */
    const void *head_scale;     /* float32 (vocab,) for 8, f16 group scales for 6 / 4 */
    const float *cos_tab, *sin_tab;
    int64_t rope_rows;
} bitlm_token_desc;
BITLM_API int bitlm_decode_token(const bitlm_decoder_desc *d, const bitlm_token_desc *t, int64_t token, int64_t pos,
                                 float *x, float *logits);
/* bitlm_decode_token, then the greedy pick of its logits (bitlm_argmax_f32): returns the next
 * token id (>= 0), or EINVAL / ENOMEM as bitlm_decode_token.  A greedy generation loop then makes
 * one call per token. */
BITLM_API int64_t bitlm_decode_token_greedy(const bitlm_decoder_desc *d, const bitlm_token_desc *t, int64_t token,
                                            int64_t pos, float *x, float *logits);

/* Batched decode (bitlm.engine.PackedModel.decode_batch): the attention part of one step of N
 * independent sequences, one token each.  Sequence j (at position pos[j] < max_len[j]): RoPE of
 * its q (H, D) and k (Hkv, D) rows with cos, sin rows j (D,) each, in place; its k and v rows
 * stored into its caches at pos[j], rounded to kv_type (BITLM_KV_*); then attention of its H query
 * heads over its pos[j] + 1 cached positions into out (N, H, D).  kc[j], vc[j]: (Hkv, max_len[j], D)
 * caches of kv_type; ks, vs: NULL, or for I8 N arrays of (Hkv, max_len[j]) scales.  q (N, H, D),
 * k and v (N, Hkv, D) float32.  Per sequence exactly the operations of bitlm_decode_step (same
 * bits on every tier and thread count), all N * H heads in one parallel pass.  0 or EINVAL. */
BITLM_API int bitlm_attn_batch(int64_t kv_type, int64_t N, int64_t H, int64_t Hkv, int64_t D, float *q, float *k,
                               const float *v, const int64_t *pos, const int64_t *max_len, const float *cos,
                               const float *sin, void *const *kc, void *const *vc, float *const *ks, float *const *vs,
                               float *out);
/* From how many cached positions bitlm_decode_step runs the attention of an f16 / int8 cache on
 * more than one thread as two passes split by kv head and position range, then by kv head and
 * output columns (the same bits; faster for long caches); 0: never.  positions < 0 only asks.
 * The first value comes from the environment variable BITLM_ATTN_SPLIT, else 256.  Returns the
 * previous value. */
BITLM_API int64_t bitlm_set_attn_split(int64_t positions);
/* The greedy pick (pick.c): the index of the largest of x[0, n) as torch's argmax gives it — the
 * first of tied maxima (-0.0 and 0.0 tie), or the first NaN if there is one.  EINVAL for n < 1 or
 * n > INT32_MAX. */
BITLM_API int64_t bitlm_argmax_f32(const float *x, int64_t n);

/* The ReLU² gated activation of bitlm_decode_step on m rows: y (m, 2f) gate then up values,
 * out[r, j] = (relu(g) * relu(g)) * u (torch's relu(g).square_().mul_(u), the same bits; unlike
 * the fused step's loop, a NaN gate stays NaN as in torch). */
BITLM_API int bitlm_glu_relu2(const float *y, int64_t m, int64_t f, float *out);

/* Rotary embedding in place on m rows of nh heads: x (m, nh, d) float32, cos / sin (m, d), d
 * even.  For j < d/2: x[j] * cos[j] + (-x[j + d/2]) * sin[j]; else x[j] * cos[j] + x[j - d/2] *
 * sin[j] — bitlm.model.apply_rope's x * cos + rotate_half(x) * sin, the same bits (the fused
 * decode step's rope()).  Rows on the thread pool. */
BITLM_API int bitlm_rope_rows(float *x, int64_t m, int64_t nh, int64_t d, const float *cos, const float *sin);

/* One whole decode step of N independent sequences (bitlm.engine.PackedModel.decode_batch, ReLU²
 * models): x (N, d_model) float32, the tokens' embeddings in, the residual streams after the last
 * block out (before the final norm).  Per block exactly the per-op batched path's calls, in its
 * order — bitlm_quantize_rows (with the site's norm, none when NULL), bitlm_matmul_f32 for q, k, v
 * (M = N: the weights are read once for all rows), bitlm_attn_batch, the o product, x += y, the
 * gate/up product, bitlm_glu_relu2, the down product, x += y — so the same bits, without a round
 * trip to Python per op.  d: as for bitlm_decode_step (act must be BITLM_ACT_RELU2_GLU), except that
 * the blocks' k_cache / v_cache, d->max_len and d->kv_scales are not read: the caches are per
 * sequence.  pos, max_len, cos, sin: as bitlm_attn_batch.  kv: (n_layers, nk, N) pointers, layer i's
 * k caches of the N sequences, then their v caches (then, for I8, nk = 4: their k and v scales),
 * nk = 2 otherwise.  0, EINVAL (nothing written when the description is inconsistent) or ENOMEM. */
BITLM_API int bitlm_decode_rows(const bitlm_decoder_desc *d, int64_t N, float *x, const int64_t *pos,
                                const int64_t *max_len, const float *cos, const float *sin, void *const *kv);

/* ---- one transformers BitNet decoder layer at decode (csrc/hf_layer.c) -------------------------------
 * transformers' BitNetDecoderLayer for one token (batch 1, q_len 1) in two calls around its KV
 * cache update and attention, which stay transformers' (bitlm.integrations.transformers): every
 * value is rounded to the model's dtype R (identity for float32; bf16 round to nearest even for
 * bfloat16) at the points where the per-module swapped path (BitlmRMSNorm, BitlmLinear /
 * SharedProjection, transformers' own RoPE, ReLU² and residual adds) rounds it, so the layer's
 * output equals that path's bit for bit.  norm(x) below is bitlm_rms_norm_rows (its two roundings);
 * lin(x) = R(bitlm_matmul_f32(bitlm_quantize_rows(x, no norm), W)) (+ bias inside, as there).
 *   bitlm_hf_layer_qkv:  n = norm_in(x);  q, k, v = lin(n) (one parallel pass);
 *                        for q and k (RoPE, transformers' apply_rotary_pos_emb, rot = rotate_half):
 *                          y_j = R(R(v_j * cos_j) + R(rot_j * sin_j)),  rot_j = -v_{j+D/2} (j < D/2), v_{j-D/2};
 *                        cos, sin: (head_dim,) of the dtype.  q (H*D), k, v (Hkv*D) out, head-major.
 *   bitlm_hf_layer_out:  h = R(x + lin(norm_attn_sub(attn)));  g, u = lin(norm_post(h));
 *                        a = R(R(relu(g) * relu(g)) * u)  (torch's relu, square, mul: NaN stays NaN);
 *                        y = R(h + lin(norm_ffn_sub(a))).   attn: (H*D,) the attention output.
 * x, attn, y, q, k, v, cos, sin and the norm weights hold float32 (bf16 = 0) or bf16 bits (bf16 = 1);
 * the products use each projection's own packed weight (scale groups, optional float32 bias).  The
 * workers prefetch the next pass's weights while the caller runs the serial work: after q/k/v the o
 * weights (during transformers' cache update and attention), after down the next layer's q/k/v
 * (`next`, or NULL).  0, EINVAL (nothing written) or ENOMEM. */
typedef struct bitlm_hf_layer_desc {
    int64_t bf16;                                  /* 0: float32 model, 1: bfloat16 model */
    int64_t d_model, n_heads, kv_heads, head_dim, ffn_dim;
    int64_t act;                                   /* BITLM_ACT_RELU2_GLU (the only one) */
    double eps[4];                                 /* input, attn_sub, post_attention, ffn_sub norms */
    const void *norm[4];                           /* their weights: d_model, H*D, d_model, ffn_dim values */
    bitlm_linear_desc q, k, v, o, gate, up, down;
    const struct bitlm_hf_layer_desc *next;        /* the next layer (prefetch only), or NULL */
} bitlm_hf_layer_desc;

BITLM_API int bitlm_hf_layer_qkv(const bitlm_hf_layer_desc *d, const void *x, const void *cos, const void *sin,
                                 void *q, void *k, void *v);
BITLM_API int bitlm_hf_layer_out(const bitlm_hf_layer_desc *d, const void *x, const void *attn, void *y);

/* Every decoder layer of one decode token (batch 1) in one call, each as bitlm_hf_layer_qkv, then
 * the attention, then bitlm_hf_layer_out.  layers[i] (n of them, one dtype and shape): the layers in
 * order; x: the token's embedding (d_model values of the dtype); cos / sin: its RoPE factors
 * (head_dim values).  kc[i] / vc[i]: layer i's key / value cache, (kv_heads, cap[i], head_dim) values
 * of the dtype; the token's key and value are written at row pos of every kv head (cap[i] > pos) and
 * each query head h attends over rows [0, pos] of kv head h / (n_heads / kv_heads): scores
 * q·k * scale (16 lanes, folded as bitlm_decode_step does), softmax, weighted sum of the values,
 * the output rounded to the dtype.  y: the last layer's output (d_model values; may be x).
 * 0, EINVAL (nothing written) or ENOMEM. */
BITLM_API int bitlm_hf_decode_layers(const bitlm_hf_layer_desc *const *layers, int64_t n, const void *x,
                                     const void *cos, const void *sin, void *const *kc, void *const *vc,
                                     const int64_t *cap, int64_t pos, float scale, void *y);

/* ---- the fast QAT step's element passes (csrc/qat.c: semantics there; torch twins in
 * bitlm/kernels/reference.py) ---------------------------------------------------------------- */
BITLM_API int bitlm_qat_rows_to_f32(const int8_t *q, const float *f, int64_t m, int64_t k, int64_t f_stride, int op,
                                    float *y);
BITLM_API int bitlm_qat_ternary(const float *w, int64_t n, const float *s, int8_t *t);
BITLM_API int bitlm_qat_binary(const float *w, int64_t n, const float *alpha, int8_t *t);
BITLM_API int bitlm_qat_quantize_tensor(const float *x, int64_t m, int64_t k, int8_t *q, float *a);

/* Round rows of x (rows, d) as a KV cache of `type` stores them (see BITLM_KV_*): out gets rows x d
 * floats / f16 bits / int8, scales (I8 only) rows floats.  For tests and tools. */
BITLM_API int bitlm_kv_quantize(int type, const float *x, int64_t rows, int64_t d, void *out, float *scales);
/* Per-phase timers of bitlm_decode_step, for profiling (off by default; when on, each block
 * reads the clock ~15 times).  Copies up to n accumulated values into out (may be NULL): the
 * seconds spent in each phase, the synchronisations (parallel jobs) and the calls profiled, in
 * the order bitlm_decode_profile_names() lists, comma separated.  Then enable = 1 resets them and
 * starts profiling, 0 stops, any other value leaves it as is.  Returns the number of values.
 * Not thread safe: profile one decoder at a time. */
BITLM_API int bitlm_decode_profile(int enable, double *out, int n);
BITLM_API const char *bitlm_decode_profile_names(void);

/* ---- memory bandwidth probe ------------------------------------------------------------------- */
/* Reads n bytes (n multiple of 64, buf 64-byte aligned) with the current tier's widest loads on
 * all pool threads; returns a checksum so that nothing is optimised away. */
BITLM_API uint64_t bitlm_mem_read(const void *buf, size_t n);
/* memcpy split over the pool threads (n bytes). */
BITLM_API void bitlm_mem_copy(void *dst, const void *src, size_t n);

/* ---- Hadamard transform (BitNet v2 H-BitLinear, arXiv 2504.18415 Eq. 3-4; csrc/hadamard.c) ----
 * y[m, :] = (H / sqrt(B)) x[m, :] per block of B = bitlm_hadamard_block(k) features (the largest power
 * of two dividing k; k itself for a power of two; 1 = identity for odd k), H the Sylvester matrix.
 * Float32: log2(B) butterfly stages h = 1, 2, ..., B/2 ((a, b) -> (a + b, a - b) for the pairs
 * (i, i + h) of every 2h-run), then one multiply by bitlm_hadamard_scale(B) = (float)(1/sqrt((double)B)).
 * Identical on every tier and thread count.  x and y may be the same buffer; (m, k) row-major. */
BITLM_API int64_t bitlm_hadamard_block(int64_t k);
BITLM_API float bitlm_hadamard_scale(int64_t block);
BITLM_API int bitlm_hadamard_f32(const float *x, int64_t m, int64_t k, float *y);

/* ---- BitLinear on bfloat16 rows in and out (csrc/generic.c) -------------------------------------
 * For a bf16 model's projection in one call: x (M, K) and y (M, N) bf16 bit patterns (uint16).
 *   xf = float(x) (exact: bits << 16);  (q, a) = bitlm_quantize_rows(xf, no norm);
 *   yf = bitlm_matmul_f32(fmt, q, a, w, s, groups, N, bias);
 *   y  = bf16(yf), rounded to nearest even (torch's float -> bfloat16 conversion; NaN -> 0x7FC0
 *        with the sign kept).
 * The same bits as those three steps on every tier and thread count.  0, EINVAL or ENOMEM. */
BITLM_API int bitlm_linear_bf16(int fmt, const uint16_t *x, int64_t m, int64_t k, const uint8_t *w, const float *s,
                                int64_t groups, int64_t n, const float *bias, uint16_t *y);

/* ---- RMSNorm rows as transformers' LlamaRMSNorm / BitNetRMSNorm compute them (csrc/generic.c) ----
 * x, w and y (M, K) / (K,) / (M, K) all float32 (bf16 = 0) or all bfloat16 bit patterns (bf16 = 1).
 * Per row, with xf = float(x):  ss = the sum of squares of bitlm_quantize_rows (16 double lanes,
 * same fold);  r = (float)(1.0 / sqrt(ss / K + eps));  n_k = R(xf_k * r);  y_k = R(float(w_k) * n_k),
 * R = identity for float32, round to nearest even bf16 for bf16 (torch's two roundings of
 * `weight * (x * rsqrt(var + eps)).to(bf16)`).  The same bits on every tier.  0 or EINVAL. */
BITLM_API int bitlm_rms_norm_rows(int bf16, const void *x, int64_t m, int64_t k, const void *w, double eps, void *y);

#ifdef __cplusplus
}
#endif
#endif /* BITLM_KERNELS_H */
