/*
 * linears_impl.h — the decode products shared by the fused steps (decode.c's bitlm_decode_step,
 * hf_layer.c's transformers layer): one token's norm + quantise, the problems of up to three
 * products over one parallel pass, and the pass plans whose shares the pool's workers prefetch
 * while the caller runs the serial work in between; the attention pass over the query heads and
 * its thread count.  Static functions: each file that includes it compiles its own copy (no ISA
 * flags; the wide code is reached through the tier table).
 */
#ifndef BITLM_LINEARS_IMPL_H
#define BITLM_LINEARS_IMPL_H

#include <string.h>

#include "internal.h"

/* n rounded up to a multiple of 64 (the scratch blocks' alignment) */
static inline size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

/* A projection of n rows over k inputs with a valid format, scales and weights; *gmax: the most
 * scale groups seen. */
static int linear_ok(const bitlm_linear_desc *L, int64_t n, int64_t k, int64_t *gmax) {
    if (L->fmt != BITLM_FMT_I2 && L->fmt != BITLM_FMT_T1 && L->fmt != BITLM_FMT_B1) return 0;
    if (!L->w || !L->s || L->n != n || L->k != k || L->groups < 1 || L->n % L->groups) return 0;
    if (L->groups > *gmax) *gmax = L->groups;
    return 1;
}

/* Norm + quantise one row into q (zero padded past k for every format's block) and return the
 * row sum the kernels' epilogue needs. */
static int32_t quantize(const bitlm_kernel_table *tab, const float *x, int64_t k, const float *norm_w, double eps,
                        int8_t *q, float *a) {
    tab->quant_row(x, k, norm_w, eps, norm_w != NULL, q, a);
    memset(q + k, 0, 64);
    int32_t s = 0;
    for (int64_t i = 0; i < k; i++) s += q[i];
    return s;
}

/* The bitlm_problem run_matmul (dispatch.c) would build for one token. */
static void prepare(bitlm_problem *p, const bitlm_linear_desc *L, const int8_t *xq, const int32_t *xsum, float a,
                    float *f, float *y) {
    bitlm_problem_init(p, (int)L->fmt, 1, L->k, L->w, L->n, L->groups, L->bias, NULL, y);
    p->x = xq;
    p->xsum = xsum;
    p->f = f;
    for (int64_t g = 0; g < L->groups; g++) f[g] = L->s[g] / a; /* float32, as in run_matmul */
}

/* Up to three products over one parallel range: their row tiles laid end to end. */
typedef struct {
    int np;
    const bitlm_problem *p[3];
    bitlm_mm_fn fn[3];
    int64_t end[3]; /* cumulative tile counts */
} lin_task;

static void lin_run(void *ctx, int64_t b, int64_t e) {
    const lin_task *t = (const lin_task *)ctx;
    int64_t start = 0;
    for (int i = 0; i < t->np; i++) {
        const int64_t lo = b > start ? b : start, hi = e < t->end[i] ? e : t->end[i];
        if (lo < hi) t->fn[i](t->p[i], lo - start, hi - start);
        start = t->end[i];
    }
}

/* The weights of the next parallel pass (up to three products, tiles end to end), so that a
 * worker that has finished its part of the current pass can pull the start of its next share
 * into its L2 while the caller runs the serial work in between (norms, RoPE, residuals): on
 * the 2-core test VM that work leaves memory idle for ~25 us per block. */
#ifndef NEXT_PREFETCH_BYTES
#define NEXT_PREFETCH_BYTES (256 * 1024)
#endif

typedef struct {
    int np;
    const uint8_t *w[3];
    int64_t tile_bytes[3], end[3]; /* end: cumulative tile counts */
    int64_t grain;
    int max_threads;
} lin_plan;

static int64_t tile_bytes_of(const bitlm_linear_desc *L) {
    const int64_t bk = bitlm_block_k((int)L->fmt);
    return (L->k + bk - 1) / bk * BITLM_CHUNK_BYTES; /* as bitlm_problem_init */
}

/* How a pass over these products is split (tiles end to end, grain, threads): run_linears runs
 * it, next_share predicts its shares. */
static void plan_linears(lin_plan *pl, int np, const bitlm_linear_desc *const *L) {
    memset(pl, 0, sizeof *pl);
    pl->np = np;
    int64_t total = 0, tb = 1;
    double macs = 0;
    for (int i = 0; i < np; i++) {
        pl->w[i] = L[i]->w;
        pl->tile_bytes[i] = tile_bytes_of(L[i]);
        total += (L[i]->n + BITLM_TILE_N - 1) / BITLM_TILE_N;
        pl->end[i] = total;
        macs += (double)L[i]->n * (double)L[i]->k;
        if (pl->tile_bytes[i] > tb) tb = pl->tile_bytes[i];
    }
    pl->grain = bitlm_gemv_grain(tb);
    pl->max_threads = bitlm_threads_for(macs);
}

/* bitlm_plan_fn: where worker i's share of the next pass starts, assuming it runs on as many
 * threads as this one (a wrong guess only costs a useless prefetch). */
static void next_share(void *ctx, int i, int nt, const void **p, size_t *len) {
    const lin_plan *pl = (const lin_plan *)ctx;
    if (!pl || pl->np == 0) return;
    const int64_t total = pl->end[pl->np - 1], nunits = (total + pl->grain - 1) / pl->grain;
    const int nt2 = nt < pl->max_threads ? nt : pl->max_threads;
    if (i >= nt2 || nunits < nt2) return;
    const int64_t t0 = bitlm_share_begin(nunits, i, nt2) * pl->grain;
    int64_t start = 0;
    for (int j = 0; j < pl->np; j++) {
        if (t0 < pl->end[j]) {
            const int64_t left = (pl->end[j] - t0) * pl->tile_bytes[j];
            *p = pl->w[j] + (t0 - start) * pl->tile_bytes[j];
            *len = (size_t)(left < NEXT_PREFETCH_BYTES ? left : NEXT_PREFETCH_BYTES);
            return;
        }
        start = pl->end[j];
    }
}

/* The products ps (laid out as `self` plans them) in one parallel pass; then workers prefetch `next`. */
static void run_linears(const bitlm_kernel_table *tab, int np, const bitlm_problem *ps, const lin_plan *self,
                        lin_plan *next) {
    lin_task t;
    memset(&t, 0, sizeof t);
    t.np = np;
    for (int i = 0; i < np; i++) {
        t.p[i] = &ps[i];
        t.fn[i] = tab->mm[ps[i].fmt];
        t.end[i] = self->end[i];
    }
    bitlm_parallel_for_then(self->end[np - 1], self->grain, self->max_threads, lin_run, &t, next_share, next);
}

/* The attention pass over query heads [b, e) of one token: q (H, D) float32, the float32 or
 * bfloat16 (`bf16`) cache of each kv head at kc / vc + kv * cap * D (tab->attn / tab->attn_bf16). */
typedef struct {
    const bitlm_kernel_table *tab;
    int bf16;
    const float *q;          /* (H, D) float32 values of the dtype */
    const void *kc, *vc;     /* (Hkv, cap, D) of the dtype */
    int64_t T, D, rep, cap;
    float scale;
    float *scores, *out;     /* (H, T), (H, D) */
} attn_task;

/* Heads [b, e): each kv head's heads in this range, up to 4 at a time, in one call of f32 (a
 * float32 cache) or of the table's attn_bf16 (t->bf16). */
static void attn_run_fn(const attn_task *t, bitlm_attn_fn f32, int64_t b, int64_t e) {
    for (int64_t h = b; h < e;) {
        const int64_t kv = h / t->rep, off = kv * t->cap * t->D;
        const int64_t n = bitlm_group_heads(h, e, t->rep);
        if (t->bf16)
            t->tab->attn_bf16(t->q + h * t->D, (const uint16_t *)t->kc + off, (const uint16_t *)t->vc + off, t->T, t->D,
                              t->scale, t->scores + h * t->T, t->out + h * t->D, (int)n);
        else
            f32(t->q + h * t->D, (const float *)t->kc + off, (const float *)t->vc + off, t->T, t->D, t->scale,
                t->scores + h * t->T, t->out + h * t->D, (int)n);
        h += n;
    }
}

static void attn_run(void *ctx, int64_t b, int64_t e) {
    const attn_task *t = (const attn_task *)ctx;
    attn_run_fn(t, t->tab->attn, b, e);
}

/* Threads for the attention pass over H heads of T cached positions. */
static int attn_threads(int64_t H, int64_t T, int64_t D) {
    return bitlm_threads_for((double)(H * T * D * 2) + BITLM_MIN_MACS_PER_THREAD);
}

/* relu_f, except that NaN stays NaN (as torch.relu keeps it). */
static inline float relu_nan(float v) {
    uint32_t b;
    memcpy(&b, &v, 4);
    b &= ((b - 1u) < 0x7f800000u || (b & 0x7fffffffu) > 0x7f800000u) ? ~0u : 0u;
    float g;
    memcpy(&g, &b, 4);
    return g;
}

#endif /* BITLM_LINEARS_IMPL_H */
