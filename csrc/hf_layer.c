/*
 * hf_layer.c — one transformers BitNetDecoderLayer at decode in two native calls
 * (bitlm_hf_layer_qkv, bitlm_hf_layer_out; semantics in bitlm_kernels.h).
 *
 * Why: driven module by module (bitlm.integrations.transformers' BitlmLinear / BitlmRMSNorm),
 * a decode token crosses ctypes ~10 times per layer and every product starts from cold weights.
 * Here the layer's projections run as bitlm_decode_step runs them (linears_impl.h: q/k/v in one
 * parallel pass, the workers prefetching the next pass's weights while the caller does the
 * serial work), while transformers keeps its KV cache object and its attention between the two
 * calls.  Every intermediate is rounded to the model's dtype where the per-module path rounds
 * it, so the two give the same bits.
 *
 * Built with no ISA flags, like decode.c: the wide code is reached through the active tier.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "linears_impl.h"

/* The model dtype's rounding of a float32 value: bf16 round to nearest even as
 * bitlm_f32_to_bf16_rne (NaN -> quiet NaN, sign kept), back to float32; written without a branch
 * so that the loops below vectorise. */
static inline float rnd_bf16(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    const uint32_t nan = (u & 0x7fffffffu) > 0x7f800000u;
    const uint32_t r = nan ? ((u & 0xffff0000u) | 0x00400000u) : ((u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u);
    float f;
    memcpy(&f, &r, 4);
    return f;
}

static inline float rnd(int bf16, float v) { return bf16 ? rnd_bf16(v) : v; }

/* n values of the dtype -> float32 (exact) */
static void to_f32(int bf16, const void *src, float *dst, int64_t n) {
    if (bf16) {
        const uint16_t *b = (const uint16_t *)src;
        for (int64_t i = 0; i < n; i++) dst[i] = bitlm_bf16_to_f32(b[i]);
    } else {
        memcpy(dst, src, (size_t)n * 4);
    }
}

/* n float32 values that are already values of the dtype -> the dtype (exact) */
static void from_f32(int bf16, const float *src, void *dst, int64_t n) {
    if (bf16) {
        uint16_t *b = (uint16_t *)dst;
        for (int64_t i = 0; i < n; i++) {
            uint32_t u;
            memcpy(&u, src + i, 4);
            b[i] = (uint16_t)(u >> 16);
        }
    } else {
        memcpy(dst, src, (size_t)n * 4);
    }
}

/* y[i] = R(y[i]) for n values */
static void round_all(int bf16, float *y, int64_t n) {
    if (bf16)
        for (int64_t i = 0; i < n; i++) y[i] = rnd_bf16(y[i]);
}

static int layer_ok(const bitlm_hf_layer_desc *d, int64_t *gmax) {
    if (!d || (d->bf16 != 0 && d->bf16 != 1) || d->d_model < 1 || d->n_heads < 1 || d->kv_heads < 1 ||
        d->head_dim < 2 || d->head_dim % 2 || d->n_heads % d->kv_heads || d->ffn_dim < 1 ||
        d->act != BITLM_ACT_RELU2_GLU)
        return 0;
    for (int i = 0; i < 4; i++)
        if (!d->norm[i] || !(d->eps[i] >= 0.0)) return 0;
    const int64_t dm = d->d_model, hd = d->n_heads * d->head_dim, kvd = d->kv_heads * d->head_dim, F = d->ffn_dim;
    return linear_ok(&d->q, hd, dm, gmax) && linear_ok(&d->k, kvd, dm, gmax) && linear_ok(&d->v, kvd, dm, gmax) &&
           linear_ok(&d->o, dm, hd, gmax) && linear_ok(&d->gate, F, dm, gmax) && linear_ok(&d->up, F, dm, gmax) &&
           linear_ok(&d->down, dm, F, gmax);
}

/* Scratch of one call: the normed row as float (kmax), its int8 codes (kmax + 64 padding), the
 * products' float32 outputs (ymax), the epilogue factors (3 * gmax), the normed row in the dtype
 * (kmax, bitlm_rms_norm_rows' output) and a norm input in the dtype (kmax). */
typedef struct {
    unsigned char *mem;
    float *xf, *y, *f;
    int8_t *xq;
    void *xn, *xin;
} scratch;

static int scratch_new(scratch *s, int64_t kmax, int64_t ymax, int64_t gmax) {
    const size_t sz_x = align64((size_t)kmax * 4), sz_q = align64((size_t)kmax + 64), sz_y = align64((size_t)ymax * 4),
                 sz_f = align64((size_t)(3 * gmax) * 4);
    s->mem = aligned_alloc(64, sz_x + sz_q + sz_y + sz_f + 2 * sz_x);
    if (!s->mem) return BITLM_ENOMEM;
    s->xf = (float *)(void *)s->mem;
    s->xq = (int8_t *)(s->mem + sz_x);
    s->y = (float *)(void *)(s->mem + sz_x + sz_q);
    s->f = (float *)(void *)(s->mem + sz_x + sz_q + sz_y);
    s->xn = s->mem + sz_x + sz_q + sz_y + sz_f;
    s->xin = s->mem + sz_x + sz_q + sz_y + sz_f + sz_x;
    return 0;
}

/* norm(x) (bitlm_rms_norm_rows, in the dtype) -> float32 -> int8 codes without a second norm;
 * returns the codes' row sum, *a the activation scale. */
static int32_t norm_quantize(const bitlm_kernel_table *tab, int bf16, const void *x, int64_t k, const void *w,
                             double eps, scratch *s, float *a) {
    bitlm_rms_norm_rows(bf16, x, 1, k, w, eps, s->xn);
    to_f32(bf16, s->xn, s->xf, k);
    return quantize(tab, s->xf, k, NULL, 0.0, s->xq, a);
}

BITLM_API int bitlm_hf_layer_qkv(const bitlm_hf_layer_desc *d, const void *x, const void *cos, const void *sin,
                                 void *q, void *k, void *v) {
    int64_t gmax = 1;
    if (!layer_ok(d, &gmax) || !x || !cos || !sin || !q || !k || !v) return BITLM_EINVAL;
    const bitlm_kernel_table *tab = bitlm_active_table();
    const int bf = (int)d->bf16;
    const int64_t dm = d->d_model, D = d->head_dim, hd = d->n_heads * D, kvd = d->kv_heads * D;
    scratch s;
    if (scratch_new(&s, dm > 4 * D ? dm : 4 * D, hd + 2 * kvd, gmax)) return BITLM_ENOMEM;
    lin_plan pl_qkv, pl_o;
    const bitlm_linear_desc *lq[3] = {&d->q, &d->k, &d->v}, *lo[1] = {&d->o};
    plan_linears(&pl_qkv, 3, lq);
    plan_linears(&pl_o, 1, lo);
    float a;
    const int32_t xsum = norm_quantize(tab, bf, x, dm, d->norm[0], d->eps[0], &s, &a);
    float *yq = s.y, *yk = s.y + hd, *yv = s.y + hd + kvd;
    bitlm_problem ps[3];
    prepare(&ps[0], &d->q, s.xq, &xsum, a, s.f, yq);
    prepare(&ps[1], &d->k, s.xq, &xsum, a, s.f + gmax, yk);
    prepare(&ps[2], &d->v, s.xq, &xsum, a, s.f + 2 * gmax, yv);
    run_linears(tab, 3, ps, &pl_qkv, &pl_o); /* the workers then prefetch o during the cache update + attention */
    round_all(bf, s.y, hd + 2 * kvd); /* the projections' outputs, in the dtype */
    /* RoPE of q (H heads) and k (Hkv heads), as transformers' q * cos + rotate_half(q) * sin */
    const int64_t h2 = D / 2;
    float *cf = s.xf, *sf = s.xf + D; /* cos, sin as float32 (xf is free again once the codes are made) */
    to_f32(bf, cos, cf, D);
    to_f32(bf, sin, sf, D);
    for (int64_t h = 0; h < d->n_heads + d->kv_heads; h++) {
        float *r = h < d->n_heads ? yq + h * D : yk + (h - d->n_heads) * D; /* yq, yk are contiguous */
        float *t = s.xf + 2 * D; /* the rotated head, then copied back */
        for (int64_t j = 0; j < h2; j++) {
            t[j] = rnd(bf, rnd(bf, r[j] * cf[j]) + rnd(bf, (-r[j + h2]) * sf[j]));
            t[j + h2] = rnd(bf, rnd(bf, r[j + h2] * cf[j + h2]) + rnd(bf, r[j] * sf[j + h2]));
        }
        memcpy(r, t, (size_t)D * 4);
    }
    from_f32(bf, yq, q, hd);
    from_f32(bf, yk, k, kvd);
    from_f32(bf, yv, v, kvd);
    free(s.mem);
    return 0;
}

BITLM_API int bitlm_hf_layer_out(const bitlm_hf_layer_desc *d, const void *x, const void *attn, void *y) {
    int64_t gmax = 1;
    if (!layer_ok(d, &gmax) || !x || !attn || !y) return BITLM_EINVAL;
    const bitlm_hf_layer_desc *nx = d->next;
    int64_t ngmax = 1;
    if (nx && !layer_ok(nx, &ngmax)) return BITLM_EINVAL;
    const bitlm_kernel_table *tab = bitlm_active_table();
    const int bf = (int)d->bf16;
    const int64_t dm = d->d_model, hd = d->n_heads * d->head_dim, F = d->ffn_dim;
    int64_t kmax = dm > hd ? dm : hd;
    kmax = kmax > F ? kmax : F;
    int64_t ymax = 2 * F > dm ? 2 * F : dm;
    scratch s;
    /* + dm floats: the residual stream h after o (kept in float32, each value one dtype value) */
    if (scratch_new(&s, kmax, ymax + dm, gmax)) return BITLM_ENOMEM;
    float *hres = s.y + ymax;
    lin_plan pl_o, pl_up, pl_down, pl_next;
    const bitlm_linear_desc *lo[1] = {&d->o}, *lu[2] = {&d->gate, &d->up}, *ld[1] = {&d->down};
    plan_linears(&pl_o, 1, lo);
    plan_linears(&pl_up, 2, lu);
    plan_linears(&pl_down, 1, ld);
    if (nx) {
        const bitlm_linear_desc *nq[3] = {&nx->q, &nx->k, &nx->v};
        plan_linears(&pl_next, 3, nq);
    } else {
        memset(&pl_next, 0, sizeof pl_next);
    }
    bitlm_problem ps[2];
    float a;
    /* attention out: attn_sub_norm -> o -> residual */
    int32_t xsum = norm_quantize(tab, bf, attn, hd, d->norm[1], d->eps[1], &s, &a);
    prepare(&ps[0], &d->o, s.xq, &xsum, a, s.f, s.y);
    run_linears(tab, 1, ps, &pl_o, &pl_up);
    to_f32(bf, x, hres, dm);
    round_all(bf, s.y, dm);
    for (int64_t j = 0; j < dm; j++) hres[j] = rnd(bf, hres[j] + s.y[j]);
    /* feed-forward: post_attention_layernorm -> gate / up (one pass) -> relu² * up */
    from_f32(bf, hres, s.xin, dm); /* h in the dtype (exact), the norm's input */
    xsum = norm_quantize(tab, bf, s.xin, dm, d->norm[2], d->eps[2], &s, &a);
    float *yg = s.y, *yu = s.y + F;
    prepare(&ps[0], &d->gate, s.xq, &xsum, a, s.f, yg);
    prepare(&ps[1], &d->up, s.xq, &xsum, a, s.f + gmax, yu);
    run_linears(tab, 2, ps, &pl_up, &pl_down);
    round_all(bf, yg, 2 * F);
    if (bf) {
        for (int64_t j = 0; j < F; j++) {
            const float g = relu_nan(yg[j]);
            yg[j] = rnd_bf16(rnd_bf16(g * g) * yu[j]); /* act in place of the gate rows */
        }
    } else {
        for (int64_t j = 0; j < F; j++) {
            const float g = relu_nan(yg[j]);
            yg[j] = (g * g) * yu[j];
        }
    }
    /* ffn_sub_norm -> down -> residual */
    from_f32(bf, yg, s.xin, F);
    xsum = norm_quantize(tab, bf, s.xin, F, d->norm[3], d->eps[3], &s, &a);
    prepare(&ps[0], &d->down, s.xq, &xsum, a, s.f, s.y);
    run_linears(tab, 1, ps, &pl_down, &pl_next);
    round_all(bf, s.y, dm);
    for (int64_t j = 0; j < dm; j++) s.y[j] = rnd(bf, hres[j] + s.y[j]);
    from_f32(bf, s.y, y, dm);
    free(s.mem);
    return 0;
}

/* ---- every layer of one decode token in one call (bitlm_hf_decode_layers) ------------------- */

BITLM_API int bitlm_hf_decode_layers(const bitlm_hf_layer_desc *const *layers, int64_t n, const void *x,
                                     const void *cos, const void *sin, void *const *kc, void *const *vc,
                                     const int64_t *cap, int64_t pos, float scale, void *y) {
    if (!layers || n < 1 || !x || !cos || !sin || !kc || !vc || !cap || pos < 0 || !y || !(scale == scale))
        return BITLM_EINVAL;
    const bitlm_hf_layer_desc *d0 = layers[0];
    int64_t gmax = 1;
    for (int64_t i = 0; i < n; i++) {
        const bitlm_hf_layer_desc *d = layers[i];
        if (!layer_ok(d, &gmax) || d->bf16 != d0->bf16 || d->d_model != d0->d_model || d->n_heads != d0->n_heads ||
            d->kv_heads != d0->kv_heads || d->head_dim != d0->head_dim || !kc[i] || !vc[i] || cap[i] <= pos)
            return BITLM_EINVAL;
    }
    const bitlm_kernel_table *tab = bitlm_active_table();
    const int bf = (int)d0->bf16;
    const size_t es = bf ? 2 : 4;
    const int64_t dm = d0->d_model, D = d0->head_dim, H = d0->n_heads, Hkv = d0->kv_heads, hd = H * D, kvd = Hkv * D,
                  T = pos + 1;
    /* the residual stream (two, in turn), q / k / v and the attention output in the dtype, q and the
     * attention output as float32, the scores */
    const size_t sz_h = align64((size_t)dm * es), sz_q = align64((size_t)hd * es), sz_kv = align64((size_t)kvd * es),
                 sz_qf = align64((size_t)hd * 4), sz_s = align64((size_t)(H * T) * 4);
    unsigned char *mem = aligned_alloc(64, 2 * sz_h + 2 * sz_q + 2 * sz_kv + 2 * sz_qf + sz_s);
    if (!mem) return BITLM_ENOMEM;
    unsigned char *h[2] = {mem, mem + sz_h};
    unsigned char *q = mem + 2 * sz_h, *att = q + sz_q, *k = att + sz_q, *v = k + sz_kv;
    float *qf = (float *)(void *)(v + sz_kv), *attf = qf + sz_qf / 4, *scores = attf + sz_qf / 4;
    memcpy(h[0], x, (size_t)dm * es);
    int rc = 0;
    for (int64_t i = 0; i < n && rc == 0; i++) {
        const bitlm_hf_layer_desc *d = layers[i];
        unsigned char *cur = h[i & 1], *nxt = h[(i + 1) & 1];
        rc = bitlm_hf_layer_qkv(d, cur, cos, sin, q, k, v);
        if (rc) break;
        /* the new token's key and value at row pos of every kv head (what cache.update appends) */
        for (int64_t g = 0; g < Hkv; g++) {
            memcpy((unsigned char *)kc[i] + ((size_t)(g * cap[i] + pos) * D) * es, k + (size_t)(g * D) * es, (size_t)D * es);
            memcpy((unsigned char *)vc[i] + ((size_t)(g * cap[i] + pos) * D) * es, v + (size_t)(g * D) * es, (size_t)D * es);
        }
        to_f32(bf, q, qf, hd);
        attn_task at = {tab, bf, qf, kc[i], vc[i], T, D, H / Hkv, cap[i], scale, scores, attf};
        bitlm_parallel_for(H, 1, attn_threads(H, T, D), attn_run, &at);
        round_all(bf, attf, hd); /* the attention output in the dtype, as the attention function returns it */
        from_f32(bf, attf, att, hd);
        rc = bitlm_hf_layer_out(d, cur, att, nxt);
    }
    if (rc == 0) memcpy(y, h[n & 1], (size_t)dm * es);
    free(mem);
    return rc;
}
