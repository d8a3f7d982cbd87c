/*
 * decode.c — bitlm_decode_step: one token through every block of a decoder in one call.
 *
 * Why: a decode step of a 2B4T-shaped model reads ~850 MB of packed weights in ~180 matrix
 * products of 10-80 us each.  Driving them from Python costs ~20 torch / ctypes calls per
 * block (norm + quantise, q/k/v, RoPE, cache writes, attention, o, gate/up, activation, down,
 * residual adds) at 10-20 us apiece, which was ~40 % of the token time.  Here the whole block
 * runs in C: the projections are the same tier kernels and the same epilogue as
 * bitlm_matmul_f32 (q, k and v in one parallel pass), the small vector work runs on the
 * calling thread, and the thread pool stays hot between products.
 *
 * Built with no ISA flags, like dispatch.c: the wide code (matmuls, quantiser, attention) is
 * reached through the active tier's table.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "linears_impl.h"

/* ---- description checks -------------------------------------------------------------------- */

/* need_cache: the blocks' k_cache / v_cache (and I8 kv_scales) must be set (bitlm_decode_step);
 * bitlm_decode_rows takes its caches per sequence instead. */
static int decoder_ok(const bitlm_decoder_desc *d, int64_t *gmax, int need_cache) {
    if (!d->blocks || d->n_layers < 1 || d->d_model < 1 || d->n_heads < 1 || d->kv_heads < 1 || d->head_dim < 2 ||
        d->head_dim % 2 || d->n_heads % d->kv_heads || d->ffn_dim < 1 || d->max_len < 1 ||
        (d->act != BITLM_ACT_SILU_GLU && d->act != BITLM_ACT_RELU2_GLU) ||
        (d->kv_type != BITLM_KV_F32 && d->kv_type != BITLM_KV_F16 && d->kv_type != BITLM_KV_I8))
        return 0;
    if (d->kv_type == BITLM_KV_I8 && need_cache) {
        if (!d->kv_scales) return 0;
        for (int64_t i = 0; i < 2 * d->n_layers; i++)
            if (!d->kv_scales[i]) return 0;
    }
    const int64_t dm = d->d_model, hd = d->n_heads * d->head_dim, kvd = d->kv_heads * d->head_dim;
    for (int64_t i = 0; i < d->n_layers; i++) {
        const bitlm_block_desc *b = &d->blocks[i];
        if (!linear_ok(&b->q, hd, dm, gmax) || !linear_ok(&b->k, kvd, dm, gmax) || !linear_ok(&b->v, kvd, dm, gmax) ||
            !linear_ok(&b->o, dm, hd, gmax) || !linear_ok(&b->up, 2 * d->ffn_dim, dm, gmax) ||
            !linear_ok(&b->down, dm, d->ffn_dim, gmax) || (need_cache && (!b->k_cache || !b->v_cache)))
            return 0;
    }
    return 1;
}

/* ---- pieces of a block (the products: linears_impl.h) ------------------------------------- */

/* y = x*cos + rotate_half(x)*sin for nh heads of D values, in place (torch's apply_rope). */
static void rope(float *v, int64_t nh, int64_t D, const float *cos, const float *sin) {
    const int64_t h2 = D / 2;
    for (int64_t h = 0; h < nh; h++) {
        float *r = v + h * D;
        for (int64_t j = 0; j < h2; j++) {
            const float a = r[j], b = r[j + h2];
            r[j] = a * cos[j] + (-b) * sin[j];
            r[j + h2] = b * cos[j + h2] + a * sin[j + h2];
        }
    }
}

typedef struct {
    float *x;
    int64_t nh, d;
    const float *cos, *sin;
} rope_task;

static void rope_rows_run(void *ctx, int64_t r0, int64_t r1) {
    const rope_task *t = (const rope_task *)ctx;
    const int64_t nh = t->nh, d = t->d;
    for (int64_t r = r0; r < r1; r++) rope(t->x + r * nh * d, nh, d, t->cos + r * d, t->sin + r * d);
}

BITLM_API int bitlm_rope_rows(float *x, int64_t m, int64_t nh, int64_t d, const float *cos, const float *sin) {
    if (!x || !cos || !sin || m < 0 || nh < 1 || d < 2 || d % 2) return BITLM_EINVAL;
    rope_task t = {x, nh, d, cos, sin};
    bitlm_parallel_for(m, 1, bitlm_threads_for((double)m * (double)(nh * d) * 2.0), rope_rows_run, &t);
    return 0;
}

/* v > 0 ? v : 0 without a branch.  Written as a compare, GCC keeps a conditional jump (it may
 * not if-convert a float compare under the default -ftrapping-math), and on the signs of real
 * activations that jump mispredicts half the time: the 2B4T-shaped ReLU² loop over 6912 gate
 * values took ~30 us per block (1 ms per token), ~1.4 us this way.  Same value for every input:
 * bits b with b - 1 < 0x7f800000 are exactly the positive non-zero floats up to +inf; +0, the
 * negatives and NaN become +0, as the compare made them. */
static inline float relu_f(float v) {
    uint32_t b;
    memcpy(&b, &v, 4);
    b &= (b - 1u) < 0x7f800000u ? ~0u : 0u;
    float g;
    memcpy(&g, &b, 4);
    return g;
}

/* ---- per-phase profile (bitlm_decode_profile) ---------------------------------------------- */

enum {
    PH_NORM_QUANT, /* the four RMSNorm + quantise calls per block (caller thread) */
    PH_QKV,        /* the q/k/v pass (caller's share + waiting for the workers) */
    PH_ROPE_KV,    /* RoPE of q and k, KV-cache writes */
    PH_ATTN,       /* attention over the cache (one pass over the heads) */
    PH_O,          /* the o pass */
    PH_UP,         /* the gate/up pass */
    PH_DOWN,       /* the down pass */
    PH_VECTOR,     /* residual adds, the gated activation */
    PH_OTHER,      /* set-up: scratch, pass plans */
    PH_HEAD,       /* bitlm_decode_token after the step: final norm + quantise, the head */
    PH_STEP,       /* the whole call (bitlm_decode_step; PH_HEAD is outside it) */
    PH_WAIT,       /* inside the passes above: the caller waiting for workers after its own share */
    PH_JOBS,       /* parallel jobs started (synchronisations) */
    PH_STEPS,      /* calls profiled */
    PH_N
};
static const char *const g_ph_names =
    "norm_quant,qkv,rope_kv,attn,o,up,down,vector,other,head,step,pool_wait,jobs,steps";
static double g_ph[PH_N];

BITLM_API const char *bitlm_decode_profile_names(void) { return g_ph_names; }

BITLM_API int bitlm_decode_profile(int enable, double *out, int n) {
    if (out)
        for (int i = 0; i < n && i < PH_N; i++) out[i] = g_ph[i];
    if (enable == 1) {
        memset(g_ph, 0, sizeof g_ph);
        bitlm_prof_wait_s = 0.0;
        bitlm_prof_jobs = 0.0;
        bitlm_prof_on = 1;
    } else if (enable == 0) {
        bitlm_prof_on = 0;
    }
    return PH_N;
}

/* Adds the time since *t to phase ph and restarts *t (profiling only). */
#define LAP(ph)                                                                                                        \
    do {                                                                                                               \
        if (prof) {                                                                                                    \
            const double t2_ = bitlm_now_s();                                                                          \
            g_ph[ph] += t2_ - t_lap;                                                                                   \
            t_lap = t2_;                                                                                               \
        }                                                                                                              \
    } while (0)

/* ---- the step ------------------------------------------------------------------------------ */

BITLM_API int bitlm_decode_step(const bitlm_decoder_desc *d, float *x, int64_t pos, const float *cos,
                                const float *sin) {
    int64_t gmax = 1;
    if (!d || !x || !cos || !sin || !decoder_ok(d, &gmax, 1) || pos < 0 || pos >= d->max_len) return BITLM_EINVAL;
    const bitlm_kernel_table *tab = bitlm_active_table();
    const int prof = bitlm_prof_on;
    const double t_start = prof ? bitlm_now_s() : 0.0, wait0 = bitlm_prof_wait_s, jobs0 = bitlm_prof_jobs;
    double t_lap = t_start;
    const int64_t dm = d->d_model, H = d->n_heads, Hkv = d->kv_heads, D = d->head_dim, F = d->ffn_dim;
    const int64_t hd = H * D, kvd = Hkv * D, T = pos + 1;
    int64_t kmax = dm > hd ? dm : hd;
    kmax = kmax > F ? kmax : F;
    int64_t ymax = hd + 2 * kvd;
    ymax = ymax > 2 * F ? ymax : 2 * F;
    ymax = ymax > dm ? ymax : dm;

    /* attention: over query heads in one pass, or (long f16 / int8 caches, more than one thread)
     * the split passes of kv.c, parts position ranges per kv head */
    const int nthr = attn_threads(H, T, D);
    const int64_t split = bitlm_attn_split(), parts = bitlm_pool_threads(), nb = bitlm_kv_col_blocks(D);
    const int split_on = d->kv_type != BITLM_KV_F32 && split > 0 && T >= split && parts > 1;
    const size_t sz_q = align64((size_t)kmax + 64), sz_y = align64((size_t)ymax * 4), sz_att = align64((size_t)hd * 4),
                 sz_h = align64((size_t)F * 4), sz_s = align64((size_t)(H * T) * 4), sz_f = align64((size_t)(3 * gmax) * 4),
                 sz_pm = split_on ? align64((size_t)(H * parts) * 4) : 0, sz_es = split_on ? align64((size_t)(nb * H * T) * 4) : 0;
    unsigned char *mem = aligned_alloc(64, sz_q + sz_y + sz_att + sz_h + sz_s + sz_f + sz_pm + sz_es);
    if (!mem) return BITLM_ENOMEM;
    int8_t *xq = (int8_t *)mem;
    float *y = (float *)(void *)(mem + sz_q);
    float *att = (float *)(void *)(mem + sz_q + sz_y);
    float *hb = (float *)(void *)(mem + sz_q + sz_y + sz_att);
    float *scores = (float *)(void *)(mem + sz_q + sz_y + sz_att + sz_h);
    float *f = (float *)(void *)(mem + sz_q + sz_y + sz_att + sz_h + sz_s);
    float *pmax = split_on ? (float *)(void *)(mem + sz_q + sz_y + sz_att + sz_h + sz_s + sz_f) : NULL;
    float *escores = split_on ? (float *)(void *)(mem + sz_q + sz_y + sz_att + sz_h + sz_s + sz_f + sz_pm) : NULL;

    const float scale = (float)(1.0 / sqrt((double)D));
    bitlm_problem ps[3];
    int32_t xsum;
    float a;
    for (int64_t i = 0; i < d->n_layers; i++) {
        const bitlm_block_desc *b = &d->blocks[i];
        /* the passes of this block; each one's workers prefetch the next (the last: none) */
        lin_plan pl_qkv, pl_o, pl_up, pl_down, pl_next;
        const bitlm_linear_desc *lq[3] = {&b->q, &b->k, &b->v}, *lo[1] = {&b->o}, *lu[1] = {&b->up},
                                *ld[1] = {&b->down};
        plan_linears(&pl_qkv, 3, lq);
        plan_linears(&pl_o, 1, lo);
        plan_linears(&pl_up, 1, lu);
        plan_linears(&pl_down, 1, ld);
        if (i + 1 < d->n_layers) {
            const bitlm_block_desc *nb = &d->blocks[i + 1];
            const bitlm_linear_desc *nq[3] = {&nb->q, &nb->k, &nb->v};
            plan_linears(&pl_next, 3, nq);
        } else {
            memset(&pl_next, 0, sizeof pl_next);
        }
        LAP(PH_OTHER);
        /* attention */
        xsum = quantize(tab, x, dm, b->input_norm, d->eps, xq, &a);
        float *yq = y, *yk = y + hd, *yv = y + hd + kvd;
        prepare(&ps[0], &b->q, xq, &xsum, a, f, yq);
        prepare(&ps[1], &b->k, xq, &xsum, a, f + gmax, yk);
        prepare(&ps[2], &b->v, xq, &xsum, a, f + 2 * gmax, yv);
        LAP(PH_NORM_QUANT);
        run_linears(tab, 3, ps, &pl_qkv, &pl_o);
        LAP(PH_QKV);
        rope(yq, H, D, cos, sin);
        rope(yk, Hkv, D, cos, sin);
        const int kvt = (int)d->kv_type;
        float *ksc = kvt == BITLM_KV_I8 ? d->kv_scales[2 * i] : NULL, *vsc = kvt == BITLM_KV_I8 ? d->kv_scales[2 * i + 1] : NULL;
        for (int64_t h = 0; h < Hkv; h++) { /* the cache rows, rounded to the cache type (kv.c) */
            bitlm_kv_store(kvt, b->k_cache, ksc, h * d->max_len + pos, yk + h * D, D);
            bitlm_kv_store(kvt, b->v_cache, vsc, h * d->max_len + pos, yv + h * D, D);
        }
        LAP(PH_ROPE_KV);
        if (kvt == BITLM_KV_F32) {
            attn_task at = {tab, 0, yq, b->k_cache, b->v_cache, T, D, H / Hkv, d->max_len, scale, scores, att};
            bitlm_parallel_for_then(H, 1, nthr, attn_run, &at, next_share, &pl_o);
        } else if (split_on) {
            bitlm_kv_attn_task at = {kvt,   yq,  b->k_cache, b->v_cache, ksc,  vsc,    T,      D,      H / Hkv,
                                     d->max_len, scale, scores, att,  Hkv,  parts, pmax, escores};
            bitlm_parallel_for(Hkv * parts, 1, (int)parts, bitlm_kv_keys_run, &at);
            bitlm_parallel_for_then(Hkv * nb, 1, (int)parts, bitlm_kv_values_run, &at, next_share, &pl_o);
        } else {
            bitlm_kv_attn_task at = {kvt, yq, b->k_cache, b->v_cache, ksc, vsc, T, D, H / Hkv, d->max_len, scale, scores, att};
            bitlm_parallel_for_then(H, 1, nthr, bitlm_kv_attn_run, &at, next_share, &pl_o);
        }
        LAP(PH_ATTN);
        xsum = quantize(tab, att, hd, b->attn_sub_norm, d->eps, xq, &a);
        prepare(&ps[0], &b->o, xq, &xsum, a, f, y);
        LAP(PH_NORM_QUANT);
        run_linears(tab, 1, ps, &pl_o, &pl_up);
        LAP(PH_O);
        for (int64_t j = 0; j < dm; j++) x[j] = x[j] + y[j];
        LAP(PH_VECTOR);
        /* feed-forward: gate rows, then up rows, in one product */
        xsum = quantize(tab, x, dm, b->post_norm, d->eps, xq, &a);
        prepare(&ps[0], &b->up, xq, &xsum, a, f, y);
        LAP(PH_NORM_QUANT);
        run_linears(tab, 1, ps, &pl_up, &pl_down);
        LAP(PH_UP);
        if (d->act == BITLM_ACT_RELU2_GLU) {
            for (int64_t j = 0; j < F; j++) {
                const float g = relu_f(y[j]);
                hb[j] = (g * g) * y[F + j];
            }
        } else {
            for (int64_t j = 0; j < F; j++) hb[j] = (y[j] / (1.0f + expf(-y[j]))) * y[F + j];
        }
        LAP(PH_VECTOR);
        xsum = quantize(tab, hb, F, b->ffn_sub_norm, d->eps, xq, &a);
        prepare(&ps[0], &b->down, xq, &xsum, a, f, y);
        LAP(PH_NORM_QUANT);
        run_linears(tab, 1, ps, &pl_down, &pl_next);
        LAP(PH_DOWN);
        for (int64_t j = 0; j < dm; j++) x[j] = x[j] + y[j];
        LAP(PH_VECTOR);
    }
    free(mem);
    if (prof) {
        LAP(PH_OTHER);
        g_ph[PH_STEP] += bitlm_now_s() - t_start;
        g_ph[PH_WAIT] += bitlm_prof_wait_s - wait0;
        g_ph[PH_JOBS] += bitlm_prof_jobs - jobs0;
        g_ph[PH_STEPS] += 1.0;
    }
    return 0;
}

/* ---- one whole token: embedding, step, final norm, head (bitlm_decode_token) ---------------- */

BITLM_API int bitlm_decode_token(const bitlm_decoder_desc *d, const bitlm_token_desc *t, int64_t token, int64_t pos,
                                 float *x, float *logits) {
    if (!d || !t || !x || !logits || !t->embed || !t->final_norm || !t->head || !t->head_scale || !t->cos_tab ||
        !t->sin_tab || t->vocab < 1 || token < 0 || token >= t->vocab || pos < 0 || pos >= t->rope_rows ||
        (t->embed_kind == 2) != (t->embed_scale != NULL) || t->embed_kind < 0 || t->embed_kind > 2 ||
        (t->head_bits != 8 && t->head_bits != 6 && t->head_bits != 4))
        return BITLM_EINVAL;
    const int64_t dm = d->d_model, D = d->head_dim;
    if (t->embed_kind == 0) {
        memcpy(x, (const float *)t->embed + token * dm, (size_t)dm * 4);
    } else if (t->embed_kind == 1) {
        const uint16_t *r = (const uint16_t *)t->embed + token * dm;
        for (int64_t j = 0; j < dm; j++) x[j] = bitlm_bf16_to_f32(r[j]);
    } else {
        const int8_t *r = (const int8_t *)t->embed + token * dm;
        const float s = t->embed_scale[token];
        for (int64_t j = 0; j < dm; j++) x[j] = (float)r[j] * s;
    }
    int rc = bitlm_decode_step(d, x, pos, t->cos_tab + pos * D, t->sin_tab + pos * D);
    if (rc) return rc;
    const double t_head = bitlm_prof_on ? bitlm_now_s() : 0.0;
    int8_t *xq = aligned_alloc(64, align64((size_t)dm));
    if (!xq) return BITLM_ENOMEM;
    float a;
    rc = bitlm_quantize_rows(x, 1, dm, t->final_norm, d->eps, 1, xq, &a);
    if (!rc)
        rc = t->head_bits == 8 ? bitlm_dense_i8a8(xq, &a, 1, dm, (const int8_t *)t->head, (const float *)t->head_scale,
                                                  t->vocab, logits)
                               : bitlm_dense_lowbit((int)t->head_bits, xq, &a, 1, dm, (const uint8_t *)t->head,
                                                    (const uint16_t *)t->head_scale, t->vocab, logits);
    free(xq);
    if (bitlm_prof_on) g_ph[PH_HEAD] += bitlm_now_s() - t_head;
    return rc;
}

BITLM_API int64_t bitlm_decode_token_greedy(const bitlm_decoder_desc *d, const bitlm_token_desc *t, int64_t token,
                                            int64_t pos, float *x, float *logits) {
    const int rc = bitlm_decode_token(d, t, token, pos, x, logits);
    return rc ? rc : bitlm_argmax_f32(logits, t->vocab);
}

/* ---- batched decode: attention of N sequences in one call (bitlm_attn_batch) ---------------- */

typedef struct {
    int kvt;
    int64_t H, Hkv, D;
    const float *q;
    const int64_t *pos, *max_len;
    void *const *kc, *const *vc;
    float *const *ks, *const *vs;
    int64_t tmax;
    float scale;
    float *scores, *out;
    bitlm_attn_fn fn;
} batch_attn_task;

/* items [b, e) of N * H: (sequence j, query head h) = (i / H, i % H).  An f16 / int8 cache's heads
 * of one sequence go to bitlm_kv_attn_run together, which reads each kv head's rows once for the
 * query heads that share it (one head at a time read them once per query head: 4x the bytes for
 * a 2B4T's groups of 4); the same bits either way. */
static void batch_attn_run(void *ctx, int64_t b, int64_t e) {
    const batch_attn_task *t = (const batch_attn_task *)ctx;
    for (int64_t i = b; i < e;) {
        const int64_t j = i / t->H, h = i % t->H, T = t->pos[j] + 1, he = t->H - h < e - i ? t->H : h + (e - i);
        const float *q = t->q + (j * t->H) * t->D;
        float *scores = t->scores + (j * t->H) * t->tmax, *out = t->out + (j * t->H) * t->D; /* H * tmax each */
        if (t->kvt == BITLM_KV_F32) { /* heads [h, he) of this sequence, as the fused step's attn_run */
            attn_task at = {NULL, 0, q, t->kc[j], t->vc[j], T, t->D, t->H / t->Hkv, t->max_len[j], t->scale, scores, out};
            attn_run_fn(&at, t->fn, h, he);
        } else { /* the fused step's f16 / int8 attention, heads [h, he) of this sequence */
            bitlm_kv_attn_task at = {t->kvt, q, t->kc[j], t->vc[j], t->ks ? t->ks[j] : NULL, t->vs ? t->vs[j] : NULL,
                                     T, t->D, t->H / t->Hkv, t->max_len[j], t->scale, scores, out};
            bitlm_kv_attn_run(&at, h, he);
        }
        i += he - h;
    }
}

BITLM_API int bitlm_attn_batch(int64_t kv_type, int64_t N, int64_t H, int64_t Hkv, int64_t D, float *q, float *k,
                               const float *v, const int64_t *pos, const int64_t *max_len, const float *cos,
                               const float *sin, void *const *kc, void *const *vc, float *const *ks, float *const *vs,
                               float *out) {
    if (N < 1 || H < 1 || Hkv < 1 || H % Hkv || D < 2 || D % 2 || !q || !k || !v || !pos || !max_len || !cos ||
        !sin || !kc || !vc || !out || (kv_type != BITLM_KV_F32 && kv_type != BITLM_KV_F16 && kv_type != BITLM_KV_I8) ||
        (kv_type == BITLM_KV_I8 && (!ks || !vs)))
        return BITLM_EINVAL;
    int64_t tmax = 0;
    double macs = BITLM_MIN_MACS_PER_THREAD;
    for (int64_t j = 0; j < N; j++) {
        if (pos[j] < 0 || pos[j] >= max_len[j] || !kc[j] || !vc[j] || (ks && (!ks[j] || !vs[j]))) return BITLM_EINVAL;
        tmax = pos[j] + 1 > tmax ? pos[j] + 1 : tmax;
        macs += (double)(H * (pos[j] + 1) * D * 2);
    }
    float *scores = malloc((size_t)(N * H * tmax) * sizeof(float));
    if (!scores) return BITLM_ENOMEM;
    const int kvt = (int)kv_type;
    for (int64_t j = 0; j < N; j++) { /* RoPE, then the cache rows, exactly as bitlm_decode_step */
        float *qj = q + j * H * D, *kj = k + j * Hkv * D;
        const float *vj = v + j * Hkv * D;
        rope(qj, H, D, cos + j * D, sin + j * D);
        rope(kj, Hkv, D, cos + j * D, sin + j * D);
        for (int64_t h = 0; h < Hkv; h++) {
            const int64_t row = h * max_len[j] + pos[j];
            bitlm_kv_store(kvt, kc[j], ks ? ks[j] : NULL, row, kj + h * D, D);
            bitlm_kv_store(kvt, vc[j], vs ? vs[j] : NULL, row, vj + h * D, D);
        }
    }
    batch_attn_task t = {kvt, H, Hkv, D, q, pos, max_len, kc, vc, ks, vs, tmax,
                         (float)(1.0 / sqrt((double)D)), scores, out, bitlm_active_table()->attn};
    /* claims of whole kv groups (H / Hkv query heads): a claim that split one would read it twice */
    bitlm_parallel_for(N * H, H / Hkv, bitlm_threads_for(macs), batch_attn_run, &t);
    free(scores);
    return 0;
}

typedef struct {
    const float *y;
    int64_t f;
    float *out;
} glu_task;

static void glu_rows(void *ctx, int64_t r0, int64_t r1) {
    const glu_task *t = (const glu_task *)ctx;
    const int64_t f = t->f; /* locals: a store through o could alias *t, which stops vectorising */
    for (int64_t r = r0; r < r1; r++) { /* the fused step's loop, per row */
        const float *g = t->y + r * 2 * f, *u = g + f;
        float *o = t->out + r * f;
        for (int64_t j = 0; j < f; j++) {
            const float a = relu_nan(g[j]);
            o[j] = (a * a) * u[j];
        }
    }
}

/* Rows on the pool (a prefill's 512 x 6912 was one thread's 1.6 ms); each value alone: the same
 * bits at any thread count. */
BITLM_API int bitlm_glu_relu2(const float *y, int64_t m, int64_t f, float *out) {
    if (!y || !out || m < 0 || f < 1) return BITLM_EINVAL;
    glu_task t = {y, f, out};
    if (m > 1)
        bitlm_parallel_for(m, 1, bitlm_threads_for((double)m * (double)f), glu_rows, &t);
    else
        glu_rows(&t, 0, m);
    return 0;
}

/* ---- batched decode: the whole step of N sequences (bitlm_decode_rows) ----------------------- */

static int rows_linear(const bitlm_linear_desc *L, const int8_t *xq, const float *a, int64_t m, float *y) {
    return bitlm_matmul_f32((int)L->fmt, xq, a, m, L->k, L->w, L->s, L->groups, L->n, L->bias, y);
}

static int rows_quantize(const float *x, int64_t m, int64_t k, const float *norm_w, double eps, int8_t *xq, float *a) {
    return bitlm_quantize_rows(x, m, k, norm_w, eps, norm_w != NULL, xq, a);
}

BITLM_API int bitlm_decode_rows(const bitlm_decoder_desc *d, int64_t N, float *x, const int64_t *pos,
                                const int64_t *max_len, const float *cos, const float *sin, void *const *kv) {
    int64_t gmax = 1;
    if (!d || N < 1 || !x || !pos || !max_len || !cos || !sin || !kv || !decoder_ok(d, &gmax, 0) ||
        d->act != BITLM_ACT_RELU2_GLU)
        return BITLM_EINVAL;
    const int64_t dm = d->d_model, H = d->n_heads, Hkv = d->kv_heads, D = d->head_dim, F = d->ffn_dim;
    const int64_t hd = H * D, kvd = Hkv * D, nk = d->kv_type == BITLM_KV_I8 ? 4 : 2;
    int64_t kmax = dm > hd ? dm : hd;
    kmax = kmax > F ? kmax : F;
    const int64_t ymax = 2 * F > dm ? 2 * F : dm;
    const size_t sz_q = align64((size_t)(N * kmax)), sz_a = align64((size_t)N * 4),
                 sz_qkv = align64((size_t)(N * (hd + 2 * kvd)) * 4), sz_att = align64((size_t)(N * hd) * 4),
                 sz_y = align64((size_t)(N * ymax) * 4), sz_h = align64((size_t)(N * F) * 4);
    unsigned char *mem = aligned_alloc(64, sz_q + sz_a + sz_qkv + sz_att + sz_y + sz_h);
    if (!mem) return BITLM_ENOMEM;
    int8_t *xq = (int8_t *)mem;
    float *a = (float *)(void *)(mem + sz_q);
    float *yq = (float *)(void *)(mem + sz_q + sz_a), *yk = yq + N * hd, *yv = yk + N * kvd;
    float *att = (float *)(void *)(mem + sz_q + sz_a + sz_qkv);
    float *y = (float *)(void *)(mem + sz_q + sz_a + sz_qkv + sz_att);
    float *hb = (float *)(void *)(mem + sz_q + sz_a + sz_qkv + sz_att + sz_y);
    int rc = 0;
    const int64_t n = N * dm;
    /* exactly PackedModel.decode_batch's per-op sequence (same calls, same order: same bits) */
    for (int64_t i = 0; i < d->n_layers && !rc; i++) {
        const bitlm_block_desc *b = &d->blocks[i];
        void *const *kvi = kv + i * nk * N;
        rc = rows_quantize(x, N, dm, b->input_norm, d->eps, xq, a);
        if (!rc) rc = rows_linear(&b->q, xq, a, N, yq);
        if (!rc) rc = rows_linear(&b->k, xq, a, N, yk);
        if (!rc) rc = rows_linear(&b->v, xq, a, N, yv);
        if (!rc)
            rc = bitlm_attn_batch(d->kv_type, N, H, Hkv, D, yq, yk, yv, pos, max_len, cos, sin, kvi, kvi + N,
                                  nk == 4 ? (float *const *)(kvi + 2 * N) : NULL,
                                  nk == 4 ? (float *const *)(kvi + 3 * N) : NULL, att);
        if (!rc) rc = rows_quantize(att, N, hd, b->attn_sub_norm, d->eps, xq, a);
        if (!rc) rc = rows_linear(&b->o, xq, a, N, y);
        if (rc) break;
        for (int64_t j = 0; j < n; j++) x[j] = x[j] + y[j];
        rc = rows_quantize(x, N, dm, b->post_norm, d->eps, xq, a);
        if (!rc) rc = rows_linear(&b->up, xq, a, N, y);
        if (!rc) rc = bitlm_glu_relu2(y, N, F, hb);
        if (!rc) rc = rows_quantize(hb, N, F, b->ffn_sub_norm, d->eps, xq, a);
        if (!rc) rc = rows_linear(&b->down, xq, a, N, y);
        if (rc) break;
        for (int64_t j = 0; j < n; j++) x[j] = x[j] + y[j];
    }
    free(mem);
    return rc;
}
