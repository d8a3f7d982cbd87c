/*
 * internal.h — private declarations shared by the tier files, the dispatcher and the pool.
 * Not installed, not part of the ABI.
 */
#ifndef BITLM_INTERNAL_H
#define BITLM_INTERNAL_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bitlm_kernels.h"

#define BITLM_HIDDEN __attribute__((visibility("hidden")))

/* One integer matmul problem, fully prepared by dispatch.c before the parallel split:
 * activations already padded to Kp with zeros, their row sums and the epilogue factors
 * already computed.  A tier kernel computes every token m < M for row tiles [t0, t1). */
typedef struct bitlm_problem {
    int fmt;
    int64_t M, N, K;
    int64_t Kp;           /* K rounded up to the format's BLOCK_K */
    int64_t nchunks;      /* Kp / BLOCK_K */
    int64_t tile_bytes;   /* nchunks * 64: one tile of 16 rows */
    const uint8_t *w;     /* packed weights */
    const int8_t *x;      /* (M, Kp) int8, row stride Kp, zero padded */
    const int32_t *xsum;  /* (M,) sum over k of x[m, k] */
    int32_t *yi;          /* (M, N) int32 output, or NULL when yf is used */
    float *yf;            /* (M, N) float32 output (dequant epilogue), or NULL */
    const float *f;       /* (M, groups) epilogue factors s[g] / a[m] */
    int64_t groups, rows_per_group;
    const float *bias;    /* (N,) or NULL */
    int64_t x_block_bytes; /* GEMM: activation rows per outer block x Kp stay under this (L2 based) */
    int64_t small_m_max;   /* GEMM: M up to this runs as one M-token register block (0: off) */
    int64_t gemv_streams;  /* GEMV (avx512): tiles read at once, 1, 2 or 4 (t1: 1 or 2, b1: 1 or 2) */
    int64_t gemv_prefetch; /* GEMV (avx512): software prefetch distance in bytes, per stream */
    int64_t gemv_pf_l2;    /* GEMV (avx512): 1 = prefetch into L2 (prefetcht1), 0 = into L1 */
    int64_t gemv_i2_mask;  /* GEMV (avx512, i2): 1 = codes masked in place (no shifts), 0 = shifted */
    int64_t gemm_codes;    /* GEMM (avx512, large M): 1 = unpack each tile once per activation block */
} bitlm_problem;

/* Blocking and path choices, fixed once per process (dispatch.c, from the measured cache sizes
 * and the BITLM_GEMM_* environment; bitlm_kernel_config() reports them). */
typedef struct {
    int64_t l1d_bytes, l2_bytes, l3_bytes; /* per core (l3: the whole cache), 0 if unknown */
    int64_t x_block_bytes;
    int64_t small_m_max;
    int64_t gemv_streams[4];  /* per format (BITLM_FMT_*): the GEMV plan, see dispatch.c */
    int64_t gemv_prefetch[4];
    int64_t gemv_pf_l2[4];
    int64_t gemv_i2_mask;
    int64_t gemm_codes[4]; /* per format: the large-M GEMM reads codes unpacked once (see dispatch.c) */
    int64_t head_rows;     /* W8A8 head decode (avx512): rows read at once, 1 (one stream) or 4 */
    int64_t head_prefetch; /* ... and, with 1, the software prefetch distance in bytes */
    int64_t head_pf_l2;    /* ... and level: 1 = into L2 (prefetcht1), 0 = into L1 */
} bitlm_kernel_cfg;
BITLM_HIDDEN const bitlm_kernel_cfg *bitlm_cfg(void);

typedef void (*bitlm_mm_fn)(const bitlm_problem *p, int64_t t0, int64_t t1);
/* One row of the fused RMSNorm + absmax quantiser (semantics in bitlm_kernels.h). */
typedef void (*bitlm_quant_row_fn)(const float *x, int64_t k, const float *norm_w, double eps, int do_norm,
                                   int8_t *q, float *a);
typedef uint64_t (*bitlm_read_fn)(const uint8_t *buf, size_t n);

/* Dense head: rows [n0, n1) of y for all M tokens (semantics in bitlm_kernels.h).  dense_i8
 * reads w and scale, dense_bf16 reads wb (and neither reads the other's fields). */
typedef struct bitlm_dense_problem {
    const float *x;      /* (M, K) */
    const int8_t *w;     /* (N, K) int8, or NULL */
    const float *scale;  /* (N,), or NULL */
    float *y;            /* (M, N) */
    int64_t M, N, K;
    const uint16_t *wb;  /* (N, K) bf16 bits, or NULL */
    /* dense_i8a8 only (x is NULL then): quantised activations, their scales and row sums */
    const int8_t *xq;    /* (M, K) */
    const float *a;      /* (M,) */
    const int32_t *xsum; /* (M,) sum over k of xq[m, k] */
} bitlm_dense_problem;
typedef void (*bitlm_dense_fn)(const bitlm_dense_problem *p, int64_t n0, int64_t n1);

/* The W8A8 head's epilogue for one output: acc (exact, modulo 2^32) -> float (bitlm_dense_i8a8). */
static inline void bitlm_i8a8_store(const bitlm_dense_problem *p, int64_t m, int64_t n, uint32_t acc) {
    p->y[m * p->N + n] = (float)(int32_t)acc * (p->scale[n] / p->a[m]);
}
/* Attention of nh (1-4) query heads that share one kv head over T cached positions (semantics in
 * bitlm_kernels.h, see bitlm_decode_step; the one implementation is attn_impl.h, compiled once per
 * tier).  q, out: (nh, D); kc, vc: (T, D) rows of the kv head; scores: (nh, T) scratch.  Each
 * head's bits do not depend on nh. */
typedef void (*bitlm_attn_bf16_fn)(const float *q, const uint16_t *kc, const uint16_t *vc, int64_t T, int64_t D,
                                   float scale, float *scores, float *out, int nh);
typedef void (*bitlm_attn_fn)(const float *q, const float *kc, const float *vc, int64_t T, int64_t D, float scale,
                              float *scores, float *out, int nh);

/* From query head h of [h, e): how many heads the attention takes in one call, the rest of h's
 * kv group (rep query heads per kv head) inside the range, at most 4. */
static inline int64_t bitlm_group_heads(int64_t h, int64_t e, int64_t rep) {
    const int64_t end = (h / rep + 1) * rep < e ? (h / rep + 1) * rep : e;
    return end - h < 4 ? end - h : 4;
}

/* f16 / int8 KV caches of the fused decode step (kv.c; semantics in bitlm_kernels.h). */
typedef struct bitlm_kv_attn_task {
    int type;                 /* BITLM_KV_F16 or BITLM_KV_I8 */
    const float *q;           /* (H, D) */
    const void *kc, *vc;      /* (Hkv, max_len, D) of the type */
    const float *ks, *vs;     /* (Hkv, max_len) row scales (int8), or NULL */
    int64_t T, D, rep, max_len;
    float scale;
    float *scores, *out;      /* (H, T), (H, D) */
    /* the split passes only (bitlm_kv_keys_run / bitlm_kv_values_run): */
    int64_t Hkv, parts;       /* kv heads; position ranges per kv head in the key pass */
    float *pmax;              /* (Hkv, parts, rep): each range's max score per query head */
    float *escores;           /* (bitlm_kv_col_blocks(D), H, T): each value unit's softmax numerators */
} bitlm_kv_attn_task;
/* Round row `row` (= kv_head * max_len + pos) of a cache of `type` from src (D floats). */
BITLM_HIDDEN void bitlm_kv_store(int type, void *cache, float *scales, int64_t row, const float *src, int64_t D);
/* bitlm_task_fn over query heads [b, e) of a bitlm_kv_attn_task. */
BITLM_HIDDEN void bitlm_kv_attn_run(void *ctx, int64_t b, int64_t e);
/* The same attention in two parallel passes, for long caches (the same bits: each score, maximum,
 * numerator and output element is computed as in bitlm_kv_attn_run):
 *   bitlm_kv_keys_run over Hkv * parts units: unit (g, c) scores positions [T c / parts,
 *     T (c + 1) / parts) for every query head of kv head g, their max per head into pmax;
 *   bitlm_kv_values_run over Hkv * bitlm_kv_col_blocks(D) units: unit (g, b) takes each head's
 *     max over the parts in order, writes its softmax numerators into its own rows of escores,
 *     and the output columns [64 b, 64 b + 64) of the heads of kv head g.
 * Every thread then streams its own kv heads' keys and values once: splitting by query head
 * (bitlm_kv_attn_run) gives each thread its heads' kv groups whole, 3 of 5 per thread at 2
 * threads, and a claim that splits a group reads it again. */
BITLM_HIDDEN void bitlm_kv_keys_run(void *ctx, int64_t b, int64_t e);
BITLM_HIDDEN void bitlm_kv_values_run(void *ctx, int64_t b, int64_t e);
BITLM_HIDDEN int64_t bitlm_kv_col_blocks(int64_t D);
/* The cache length from which bitlm_decode_step uses the split passes (0: never). */
BITLM_HIDDEN int64_t bitlm_attn_split(void);

/* Lane fold of the documented 16-lane float sums: l[j] += l[j+8], += l[j+4], += l[j+2], += l[j+1]. */
static inline float bitlm_fold16f(float *l) {
    for (int j = 0; j < 8; j++) l[j] = l[j] + l[j + 8];
    for (int j = 0; j < 4; j++) l[j] = l[j] + l[j + 4];
    for (int j = 0; j < 2; j++) l[j] = l[j] + l[j + 2];
    return l[0] + l[1];
}

/* exp(x) for the softmax numerators: one fixed sequence of float32 operations (no FMA, no
 * library call), so that a scalar loop, an auto-vectorised loop and the AVX-512 twin in kv.c
 * (kv_exp16) give the same bits on every tier.  Cephes' expf: x clamped to [BITLM_EXP_LO, 0]
 * (so that 2^n stays a normal float; exp(BITLM_EXP_LO) ~ 1.6e-38 stands in for anything
 * smaller, and NaN stays NaN), n = round-half-even(x * log2 e) by the 1.5 * 2^23
 * trick, r = x - n * C1 - n * C2 (C1 + C2 = ln 2, C1 exact in 9 bits), then 1 + r + r^2 * P(r)
 * with Cephes' degree-5 P, times 2^n built from its exponent bits.  Within 2 ulp of expf for
 * x in [BITLM_EXP_LO, 0], the range the softmax feeds it (x = s_t - max_t s_t). */
#define BITLM_EXP_LO (-87.0f)
#define BITLM_EXP_MAGIC 12582912.0f /* 1.5 * 2^23 */
#define BITLM_EXP_LOG2E 1.44269504088896341f
#define BITLM_EXP_C1 0.693359375f
#define BITLM_EXP_C2 (-2.12194440e-4f)
#define BITLM_EXP_P0 1.9875691500e-4f /* P(r) = ((((P0 r + P1) r + P2) r + P3) r + P4) r + P5 */
#define BITLM_EXP_P1 1.3981999507e-3f
#define BITLM_EXP_P2 8.3334519073e-3f
#define BITLM_EXP_P3 4.1665795894e-2f
#define BITLM_EXP_P4 1.6666665459e-1f
#define BITLM_EXP_P5 5.0000001201e-1f
static inline float bitlm_exp_softmax(float x) {
    x = x < BITLM_EXP_LO ? BITLM_EXP_LO : x; /* NaN: the comparisons are false, NaN goes on */
    x = 0.0f < x ? 0.0f : x;                 /* never above 0 here; keeps n in [-126, 0] regardless */
    const float n = (x * BITLM_EXP_LOG2E + BITLM_EXP_MAGIC) - BITLM_EXP_MAGIC;
    const float r = (x - n * BITLM_EXP_C1) - n * BITLM_EXP_C2;
    float p = BITLM_EXP_P0;
    p = p * r + BITLM_EXP_P1;
    p = p * r + BITLM_EXP_P2;
    p = p * r + BITLM_EXP_P3;
    p = p * r + BITLM_EXP_P4;
    p = p * r + BITLM_EXP_P5;
    const float e = (p * (r * r) + r) + 1.0f;
    /* 2^n for n in [-126, 0]; NaN (x NaN) makes 2^0, as cvttps2dq's 0x80000000 does in kv_exp16 */
    const uint32_t bits = (uint32_t)((n == n ? (int32_t)n : 0) + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, 4);
    return e * two_n;
}

/* Attention's softmax numerators: dst[t] = bitlm_exp_softmax(src[t] - m) (m: the row's max; dst
 * may be src), returning their sum as 16 lanes (lane t mod 16 adds its numerators in t order)
 * folded by bitlm_fold16f -- the one order every tier and KV type uses (kv.c's kv_softmax16 is
 * the AVX-512 twin). */
static inline float bitlm_softmax_exp(const float *src, float *dst, int64_t T, float m) {
    float lane[16] = {0};
    for (int64_t t = 0; t < T; t++) {
        const float e = bitlm_exp_softmax(src[t] - m);
        dst[t] = e;
        lane[t & 15] = lane[t & 15] + e;
    }
    return bitlm_fold16f(lane);
}

/* bf16 bits -> float32, exact: the bf16 is the upper half of the float32. */
static inline float bitlm_bf16_to_f32(uint16_t b) {
    const uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* float32 -> bf16 bits as torch's c10::BFloat16 round_to_nearest_even: NaN -> quiet NaN (0x7FC0,
 * sign kept), else the float's bits + 0x7FFF + (bit 16), truncated. */
static inline uint16_t bitlm_f32_to_bf16_rne(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if (f != f) return (uint16_t)((u >> 16) | 0x0040u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* IEEE half bits -> float32, exact (every f16 is a float32; subnormals normalised). */
static inline float bitlm_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ffu, u;
    if (e == 0x1f) {
        u = sign | 0x7f800000u | (m << 13);
    } else if (e != 0) {
        u = sign | ((e + 112u) << 23) | (m << 13);
    } else if (m == 0) {
        u = sign;
    } else { /* subnormal: normalise */
        e = 113;
        while (!(m & 0x400u)) {
            m <<= 1;
            e--;
        }
        u = sign | (e << 23) | ((m & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

typedef struct bitlm_kernel_table {
    const char *name;
    bitlm_mm_fn mm[4]; /* indexed by BITLM_FMT_*; [0] unused */
    bitlm_quant_row_fn quant_row;
    bitlm_read_fn mem_read;
    bitlm_dense_fn dense_i8;
    bitlm_dense_fn dense_bf16;
    bitlm_dense_fn dense_i8a8;
    bitlm_attn_fn attn;
    /* appended: the Hadamard row transform (hadamard_impl.h, one definition compiled per tier) */
    void (*hadamard)(float *x, int64_t k, int64_t block, float scale);
    /* appended: attention over a bfloat16 cache (attn_impl.h; bitlm_hf_decode_layers) */
    bitlm_attn_bf16_fn attn_bf16;
} bitlm_kernel_table;

BITLM_HIDDEN extern const bitlm_kernel_table bitlm_generic_table;
#ifdef BITLM_HAVE_AVX2
BITLM_HIDDEN extern const bitlm_kernel_table bitlm_avx2_table;
#endif
#ifdef BITLM_HAVE_AVX512
BITLM_HIDDEN extern const bitlm_kernel_table bitlm_avx512_table;
#endif

/* AMX int8 GEMM for M >= 2 (x86_amx.c; dispatch.c decides when, see bitlm_amx_on()): the same
 * contract as bitlm_mm_fn except that p->x has row stride bitlm_amx_kq(p->Kp), zero padded. */
static inline int64_t bitlm_amx_kq(int64_t kp) { return (kp + 63) / 64 * 64; }
#ifdef BITLM_HAVE_AMX
BITLM_HIDDEN extern const bitlm_mm_fn bitlm_amx_mm[4];
#endif
/* The W8A8 head (bitlm_dense_i8a8, x86_amx.c's last section) on AMX tiles, threaded: 0, or -1
 * (K = 0, or no memory for the transposed activations; nothing written: run the tier's kernel). */
#ifdef BITLM_HAVE_AMX
BITLM_HIDDEN int bitlm_amx_i8a8(const bitlm_dense_problem *p);
#endif

/* The active tier's table (dispatch.c; chosen once, see bitlm_tier()). */
BITLM_HIDDEN const bitlm_kernel_table *bitlm_active_table(void);

/* ---- thread pool (threadpool.c) ---- */
typedef void (*bitlm_task_fn)(void *ctx, int64_t begin, int64_t end);
/* Runs fn over [0, n) on up to min(bitlm_num_threads(), max_threads) threads, the caller
 * included, in contiguous pieces whose boundaries are multiples of grain, handed out
 * dynamically.  If another thread is already using the pool, runs everything inline (never
 * blocks, never deadlocks). */
BITLM_HIDDEN void bitlm_parallel_for(int64_t n, int64_t grain, int max_threads, bitlm_task_fn fn, void *ctx);
/* Participant i of nt's first unit: the pool splits [0, nunits) into nt equal contiguous shares. */
static inline int64_t bitlm_share_begin(int64_t nunits, int i, int nt) { return nunits * i / nt; }
/* What worker i (of nt participants in the job being started) should pull into its L2 once its
 * part of the job is done: *p, *len (len 0: nothing).  Called on the caller's thread before
 * the job starts; the worker prefetches while the caller goes on alone (the serial work
 * between two products of a decode step), and stops as soon as a new job is published. */
typedef void (*bitlm_plan_fn)(void *ctx, int i, int nt, const void **p, size_t *len);
/* Profiling of the decode step (bitlm_decode_profile): while bitlm_prof_on is set, the pool adds
 * the time its caller spends waiting for the workers after running out of units of its own
 * (their wake-up, imbalance, a descheduled worker) to bitlm_prof_wait_s, and the number of
 * parallel jobs it started to bitlm_prof_jobs.  Caller-thread only: no atomics needed. */
BITLM_HIDDEN extern int bitlm_prof_on;
BITLM_HIDDEN extern double bitlm_prof_wait_s;
BITLM_HIDDEN extern double bitlm_prof_jobs;
BITLM_HIDDEN double bitlm_now_s(void);
/* The pool's thread count (bitlm_num_threads) without taking the pool's lock: a caller that
 * plans its work while another thread runs a job on the pool must not wait for it. */
BITLM_HIDDEN int bitlm_pool_threads(void);
/* A 64-byte aligned buffer of at least n bytes owned by the calling thread (kept between calls
 * and grown on demand, freed when the thread exits; threadpool.c), or NULL when out of memory.
 * For kernels that unpack weights once and read them back (x86_amx.c, the AVX-512 GEMM). */
BITLM_HIDDEN int8_t *bitlm_thread_scratch(size_t n);
/* bitlm_parallel_for, then each worker prefetches what plan names for it. */
BITLM_HIDDEN void bitlm_parallel_for_then(int64_t n, int64_t grain, int max_threads, bitlm_task_fn fn, void *ctx,
                                          bitlm_plan_fn plan, void *plan_ctx);

/* ---- helpers usable from every tier ---- */
static inline int32_t bitlm_load_i32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4); /* unaligned-safe; compiles to one load */
    return v;
}

static inline int bitlm_block_k(int fmt) {
    return fmt == BITLM_FMT_I2 ? BITLM_I2_BLOCK_K
         : fmt == BITLM_FMT_T1 ? BITLM_T1_BLOCK_K
         : fmt == BITLM_FMT_B1 ? BITLM_B1_BLOCK_K : 0;
}

/* Work below this many MACs per extra thread is not worth a wake-up (~2-5 us). */
#define BITLM_MIN_MACS_PER_THREAD (1 << 15)

static inline int bitlm_threads_for(double macs) {
    const int t = (int)(macs / BITLM_MIN_MACS_PER_THREAD);
    return t < 1 ? 1 : t;
}

/* A decode GEMV claim should stream at least ~32 KB of weights (b1 at K = 2560 is 5 KB per
 * tile), so that the per-claim cost stays small against it. */
static inline int64_t bitlm_gemv_grain(int64_t tile_bytes) {
    const int64_t g = 32768 / tile_bytes;
    return g < 1 ? 1 : g;
}

/* The geometry and outputs of a problem (fmt must be valid); x, xsum and f are set by the caller. */
static inline void bitlm_problem_init(bitlm_problem *p, int fmt, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                                      int64_t groups, const float *bias, int32_t *yi, float *yf) {
    const int bk = bitlm_block_k(fmt);
    memset(p, 0, sizeof *p);
    p->fmt = fmt;
    p->M = m;
    p->N = n;
    p->K = k;
    p->nchunks = (k + bk - 1) / bk;
    p->Kp = p->nchunks * bk;
    p->tile_bytes = p->nchunks * BITLM_CHUNK_BYTES;
    p->w = w;
    p->yi = yi;
    p->yf = yf;
    p->groups = groups < 1 ? 1 : groups;
    p->rows_per_group = n / p->groups;
    p->bias = bias;
    p->x_block_bytes = bitlm_cfg()->x_block_bytes;
    p->small_m_max = bitlm_cfg()->small_m_max;
    p->gemv_streams = bitlm_cfg()->gemv_streams[fmt & 3];
    p->gemv_prefetch = bitlm_cfg()->gemv_prefetch[fmt & 3];
    p->gemv_pf_l2 = bitlm_cfg()->gemv_pf_l2[fmt & 3];
    p->gemv_i2_mask = bitlm_cfg()->gemv_i2_mask;
    p->gemm_codes = bitlm_cfg()->gemm_codes[fmt & 3];
}

/* Scalar epilogue for one (token m, tile t) pair: raw[r] = sum_k code*x (i2, t1) or
 * sum_k bit*x (b1) for the 16 rows of the tile.  Writes rows n < N only.  The float path is
 * the documented order: (float)acc * f[m, g] then + bias[n], with no FMA contraction (the
 * library is built with -ffp-contract=off). */
static inline void bitlm_store_tile_scalar(const bitlm_problem *p, int64_t m, int64_t t, const int32_t raw[16]) {
    const int64_t n0 = t * BITLM_TILE_N;
    const int64_t nr = p->N - n0 < BITLM_TILE_N ? p->N - n0 : BITLM_TILE_N;
    const int32_t xs = p->xsum[m];
    for (int64_t r = 0; r < nr; r++) {
        /* b1: w = 2*bit - 1, so sum w*x = 2*sum bit*x - sum x; i2/t1: w = code - 1. */
        const int32_t acc = (p->fmt == BITLM_FMT_B1 ? 2 * raw[r] : raw[r]) - xs;
        const int64_t n = n0 + r;
        if (p->yf) {
            float y = (float)acc * p->f[m * p->groups + n / p->rows_per_group];
            if (p->bias) y = y + p->bias[n];
            p->yf[m * p->N + n] = y;
        } else {
            p->yi[m * p->N + n] = acc;
        }
    }
}

/* Common tail of the quantiser: amax -> a -> q, exactly torch's float32 sequence. */
static inline float bitlm_act_scale(float amax) {
    const float c = amax > 1e-5f ? amax : 1e-5f; /* clamp(min=1e-5) */
    return (1.0f / c) * 127.0f;                   /* torch: 127 / t == t.reciprocal() * 127 */
}

#endif /* BITLM_INTERNAL_H */
