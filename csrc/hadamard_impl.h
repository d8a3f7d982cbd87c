/*
 * hadamard_impl.h — the orthonormal fast Walsh–Hadamard transform of one row (BitNet v2's
 * H-BitLinear, arXiv 2504.18415 Eq. 3-4), the one definition, included by every tier file so that
 * each compiles it with its own ISA flags.  Every output is the same sequence of float32 adds and
 * subtracts in every tier (the butterflies of one stage are independent, so vectorising them
 * reorders nothing; -ffp-contract=off), then one multiply by `scale`: bit-identical to
 * bitlm.kernels.reference.hadamard.  Semantics: bitlm_hadamard_f32 in bitlm_kernels.h.
 */
#ifndef BITLM_HADAMARD_IMPL_H
#define BITLM_HADAMARD_IMPL_H

#include "internal.h"

/* In place on x[0..k): stages h = 1, 2, 4, ..., block/2, each pair (i, i + h) of every 2h-run
 * becomes (a + b, a - b); then x *= scale.  block (a power of two dividing k) = the width of the
 * block-diagonal transform. */
static void bitlm_hadamard_row(float *x, int64_t k, int64_t block, float scale) {
    for (int64_t h = 1; h < block; h *= 2) {
        for (int64_t j = 0; j < k; j += 2 * h) {
            float *restrict a = x + j;
            float *restrict b = x + j + h;
            for (int64_t i = 0; i < h; i++) {
                const float u = a[i], v = b[i];
                a[i] = u + v;
                b[i] = u - v;
            }
        }
    }
    for (int64_t i = 0; i < k; i++) x[i] = x[i] * scale;
}

#endif /* BITLM_HADAMARD_IMPL_H */
