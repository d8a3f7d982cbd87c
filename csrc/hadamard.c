/*
 * hadamard.c — entry point of the Hadamard transform op (BitNet v2's H-BitLinear): argument
 * checks, the per-row split over the pool, the active tier's row kernel (hadamard_impl.h).
 */
#include <math.h>
#include <stdlib.h>

#include "internal.h"

typedef struct {
    float *y;
    int64_t k, block;
    float scale;
    void (*fn)(float *, int64_t, int64_t, float);
} hadamard_task;

static void hadamard_rows(void *ctx, int64_t r0, int64_t r1) {
    const hadamard_task *t = ctx;
    for (int64_t r = r0; r < r1; r++) t->fn(t->y + r * t->k, t->k, t->block, t->scale);
}

BITLM_API int64_t bitlm_hadamard_block(int64_t k) { return k < 1 ? 0 : (k & -k); }

BITLM_API float bitlm_hadamard_scale(int64_t block) {
    return block < 1 ? 0.0f : (float)(1.0 / sqrt((double)block)); /* rounded once from double, as Python does */
}

BITLM_API int bitlm_hadamard_f32(const float *x, int64_t m, int64_t k, float *y) {
    if (!x || !y || m < 0 || k < 1) return BITLM_EINVAL;
    if (m == 0) return 0;
    if (x != y) memmove(y, x, (size_t)m * (size_t)k * sizeof(float));
    const int64_t block = bitlm_hadamard_block(k);
    if (block == 1) return 0; /* odd width: the identity */
    hadamard_task t = {y, k, block, bitlm_hadamard_scale(block), bitlm_active_table()->hadamard};
    const double work = (double)m * (double)k * (double)__builtin_ctzll((unsigned long long)block);
    bitlm_parallel_for(m, 1, bitlm_threads_for(work), hadamard_rows, &t);
    return 0;
}
