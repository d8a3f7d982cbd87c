/*
 * qat.c — the element passes of the fast QAT step (bitlm.layers' BitLinear training path), each
 * one pass over its tensor where the torch ops it replaces take two to five, and bit-identical
 * to those ops (the torch twins are in bitlm/kernels/reference.py; tests/test_qat_native.py
 * compares them with == on every tier).  Plain C: no tier-specific code, the same bits on
 * every tier; compiled with the library's common flags (-ffp-contract=off, no fast-math), so
 * every float operation below rounds exactly as torch's separate ops do, plus -fno-trapping-math
 * (setup.py: lets GCC vectorise the clamps; it changes no result).  Each loop body is written
 * once and compiled twice: for the baseline ISA, and (when the AVX-512 tier is built) with
 * AVX-512 enabled by a target attribute, used while the avx512 tier is the active one — the
 * same IEEE operations either way, so every tier gives the same bits.
 *
 *   bitlm_qat_rows_to_f32(q, f, m, k, f_stride, op, y)
 *       int8 (M, K) → float32 (M, K): y[i,j] = float(q[i,j]) / f[i·f_stride]   (op 0: X_fq = q / a)
 *                                     y[i,j] = float(q[i,j]) · f[i·f_stride]   (op 1: W_fq = T · s)
 *       f_stride 0: one factor for every row (a per-tensor scale, one weight scale).
 *   bitlm_qat_ternary(w, n, s, t)
 *       float32 (n,) → int8: t = clamp(round_half_even(w / s), -1, 1)   (b1.58 absmean codes;
 *       s = max(mean|w|, 1e-5) computed by the caller: torch's reduction order is torch's)
 *   bitlm_qat_binary(w, n, alpha, t)
 *       float32 (n,) → int8: t = (w - alpha > 0) ? 1 : -1   (b1 codes, Sign with 0 → -1; alpha =
 *       mean(w) computed by the caller)
 *   bitlm_qat_quantize_tensor(x, m, k, q, a)
 *       float32 (M, K) → int8 (M, K), one float32 a: per-tensor absmax int8 codes (the b1
 *       paper's training granularity), a = 127 / max(max|x|, 1e-5) as torch computes it
 *       (bitlm_act_scale), q = clamp(round_half_even(x · a), -128, 127).
 *
 * Rounding: round half to even through the float32 "magic number" 1.5·2^23 (v + M - M rounds
 * v to an integer in the current rounding mode, exact for |v| ≤ 2^22); v is first clamped to
 * [-256, 256] (integers: the result after the final clamp is unchanged), so the trick is always
 * in range and the loops vectorise without SSE4.1's roundps.  NaN inputs give unspecified codes
 * (as torch's float → int8 cast of NaN does).
 *
 * Returns 0, or BITLM_EINVAL for bad arguments.  Declared in bitlm_kernels.h (ABI 10); the ctypes
 * bindings are in bitlm/kernels/native.py.
 */
#include <stdint.h>
#include <stdlib.h>

#include "internal.h"

/* Threads for an element pass over n elements: ~1 ns per element, a wake-up is worth ~64 K (the
 * rule of bitlm_quantize_rows).  Running them inline instead (no pool worker woken, so none
 * spinning beside torch's next op) measured the same within the noise on a loaded machine
 * (b1.58 / fp 0.91-0.92 against 0.92-0.94, in-process pairs) and would lose the second core on
 * a quiet one. */
static int pass_threads(int64_t n) { return (int)(n / (1 << 16)) + 1; }

static inline __attribute__((always_inline)) int32_t round_even_clamped(float v, int32_t lo, int32_t hi) {
    const float magic = 12582912.0f; /* 1.5 * 2^23 */
    v = v < -256.0f ? -256.0f : v;
    v = v > 256.0f ? 256.0f : v;
    int32_t r = (int32_t)((v + magic) - magic); /* an integer in [-256, 256]: the cast is exact */
    r = r < lo ? lo : r;
    return r > hi ? hi : r;
}

/* ---- the loop bodies (always inlined into a baseline and an AVX-512 copy) --------------------- */

#define BODY static inline __attribute__((always_inline))

BODY void body_rows_div(const int8_t *restrict q, float f, int64_t k, float *restrict y) {
    for (int64_t j = 0; j < k; j++) y[j] = (float)q[j] / f;
}

BODY void body_rows_mul(const int8_t *restrict q, float f, int64_t k, float *restrict y) {
    for (int64_t j = 0; j < k; j++) y[j] = (float)q[j] * f;
}

BODY void body_ternary(const float *restrict w, int64_t n, float s, int8_t *restrict t) {
    for (int64_t i = 0; i < n; i++) t[i] = (int8_t)round_even_clamped(w[i] / s, -1, 1);
}

BODY void body_binary(const float *restrict w, int64_t n, float alpha, int8_t *restrict t) {
    for (int64_t i = 0; i < n; i++) t[i] = (int8_t)(w[i] - alpha > 0.0f ? 1 : -1);
}

/* max |x| of a row as the max of the sign-cleared bit patterns: for non-negative floats the
 * int32 order is the numeric order (NaN patterns sort above +inf, and torch's amax propagates NaN
 * too), and an integer max reduction vectorises, in any order, exactly. */
BODY float body_absmax(const float *restrict x, int64_t k) {
    int32_t mx = 0;
    for (int64_t j = 0; j < k; j++) {
        int32_t b;
        memcpy(&b, x + j, sizeof b);
        b &= 0x7fffffff;
        mx = b > mx ? b : mx;
    }
    float f;
    memcpy(&f, &mx, sizeof f);
    return f;
}

BODY void body_codes(const float *restrict x, int64_t k, float a, int8_t *restrict q) {
    for (int64_t j = 0; j < k; j++) q[j] = (int8_t)round_even_clamped(x[j] * a, -128, 127);
}

typedef struct {
    void (*rows_div)(const int8_t *, float, int64_t, float *);
    void (*rows_mul)(const int8_t *, float, int64_t, float *);
    void (*ternary)(const float *, int64_t, float, int8_t *);
    void (*binary)(const float *, int64_t, float, int8_t *);
    float (*absmax)(const float *, int64_t);
    void (*codes)(const float *, int64_t, float, int8_t *);
} qat_ops;

#define DEFINE_OPS(SUFFIX, ATTR)                                                                       \
    ATTR static void rows_div_##SUFFIX(const int8_t *q, float f, int64_t k, float *y) {                 \
        body_rows_div(q, f, k, y);                                                                     \
    }                                                                                                  \
    ATTR static void rows_mul_##SUFFIX(const int8_t *q, float f, int64_t k, float *y) {                 \
        body_rows_mul(q, f, k, y);                                                                     \
    }                                                                                                  \
    ATTR static void ternary_##SUFFIX(const float *w, int64_t n, float s, int8_t *t) {                  \
        body_ternary(w, n, s, t);                                                                      \
    }                                                                                                  \
    ATTR static void binary_##SUFFIX(const float *w, int64_t n, float a, int8_t *t) {                   \
        body_binary(w, n, a, t);                                                                       \
    }                                                                                                  \
    ATTR static float absmax_##SUFFIX(const float *x, int64_t k) { return body_absmax(x, k); }         \
    ATTR static void codes_##SUFFIX(const float *x, int64_t k, float a, int8_t *q) {                    \
        body_codes(x, k, a, q);                                                                        \
    }                                                                                                  \
    static const qat_ops ops_##SUFFIX = {rows_div_##SUFFIX, rows_mul_##SUFFIX, ternary_##SUFFIX,       \
                                         binary_##SUFFIX, absmax_##SUFFIX, codes_##SUFFIX};

DEFINE_OPS(base, )
#ifdef BITLM_HAVE_AVX512
DEFINE_OPS(avx512, __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))))
#endif

static const qat_ops *ops(void) {
#ifdef BITLM_HAVE_AVX512
    if (bitlm_active_table() == &bitlm_avx512_table) return &ops_avx512;
#endif
    return &ops_base;
}

/* ---- int8 rows → float32 ------------------------------------------------------------------- */

typedef struct {
    const qat_ops *o;
    const int8_t *q;
    const float *f;
    int64_t k, f_stride;
    int op;
    float *y;
} rows_task;

static void rows_run(void *ctx, int64_t b, int64_t e) {
    const rows_task *t = (const rows_task *)ctx;
    for (int64_t i = b; i < e; i++) {
        const float f = t->f[i * t->f_stride];
        if (t->op == 0)
            t->o->rows_div(t->q + i * t->k, f, t->k, t->y + i * t->k);
        else
            t->o->rows_mul(t->q + i * t->k, f, t->k, t->y + i * t->k);
    }
}

BITLM_API int bitlm_qat_rows_to_f32(const int8_t *q, const float *f, int64_t m, int64_t k, int64_t f_stride, int op,
                                    float *y) {
    if (!q || !f || !y || m < 0 || k < 0 || f_stride < 0 || (op != 0 && op != 1)) return BITLM_EINVAL;
    if (m == 0 || k == 0) return 0;
    rows_task t = {ops(), q, f, k, f_stride, op, y};
    bitlm_parallel_for(m, 1, pass_threads(m * k), rows_run, &t);
    return 0;
}

/* ---- b1.58 / b1 weight codes --------------------------------------------------------------------- */

typedef struct {
    void (*fn)(const float *, int64_t, float, int8_t *);
    const float *w;
    float s;
    int8_t *t;
} weight_task;

static void weight_run(void *ctx, int64_t b, int64_t e) {
    const weight_task *tk = (const weight_task *)ctx;
    tk->fn(tk->w + b, e - b, tk->s, tk->t + b);
}

BITLM_API int bitlm_qat_ternary(const float *w, int64_t n, const float *s, int8_t *t) {
    if (!w || !s || !t || n < 0) return BITLM_EINVAL;
    if (n == 0) return 0;
    weight_task tk = {ops()->ternary, w, *s, t};
    bitlm_parallel_for(n, 4096, pass_threads(n), weight_run, &tk);
    return 0;
}

BITLM_API int bitlm_qat_binary(const float *w, int64_t n, const float *alpha, int8_t *t) {
    if (!w || !alpha || !t || n < 0) return BITLM_EINVAL;
    if (n == 0) return 0;
    weight_task tk = {ops()->binary, w, *alpha, t};
    bitlm_parallel_for(n, 4096, pass_threads(n), weight_run, &tk);
    return 0;
}

/* ---- per-tensor absmax int8 activations ------------------------------------------------------ */

typedef struct {
    const qat_ops *o;
    const float *x;
    int64_t k;
    float *row_max; /* pass 1 output: max |x| of each row */
    float a;        /* pass 2 input */
    int8_t *q;
} tensor_task;

static void absmax_run(void *ctx, int64_t b, int64_t e) {
    const tensor_task *t = (const tensor_task *)ctx;
    for (int64_t i = b; i < e; i++) t->row_max[i] = t->o->absmax(t->x + i * t->k, t->k);
}

static void codes_run(void *ctx, int64_t b, int64_t e) {
    const tensor_task *t = (const tensor_task *)ctx;
    for (int64_t i = b; i < e; i++) t->o->codes(t->x + i * t->k, t->k, t->a, t->q + i * t->k);
}

BITLM_API int bitlm_qat_quantize_tensor(const float *x, int64_t m, int64_t k, int8_t *q, float *a) {
    if (!x || !q || !a || m < 0 || k < 0) return BITLM_EINVAL;
    float *row_max = malloc((size_t)(m > 0 ? m : 1) * sizeof(float));
    if (!row_max) return BITLM_ENOMEM;
    tensor_task t = {ops(), x, k, row_max, 0.0f, q};
    const int nt = pass_threads(m * k);
    if (m > 0 && k > 0) bitlm_parallel_for(m, 1, nt, absmax_run, &t);
    float amax = 0.0f;
    for (int64_t i = 0; i < m && k > 0; i++) amax = row_max[i] > amax ? row_max[i] : amax;
    free(row_max);
    t.a = bitlm_act_scale(amax);
    if (m > 0 && k > 0) bitlm_parallel_for(m, 1, nt, codes_run, &t);
    *a = t.a;
    return 0;
}
