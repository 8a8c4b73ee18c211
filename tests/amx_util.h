/* Whether caprl's default CPU backend on this machine runs bf16 matmuls on a bf16 matrix unit, AMX or vdpbf16ps
 * (then the activations entering each weight matmul of a bf16 model are rounded to bf16, and float64 references
 * that check bf16 models mirror it). */
#ifndef CAPRL_AMX_UTIL_H
#define CAPRL_AMX_UTIL_H

#include <stdbool.h>
#include <stdio.h>

#include "backend/gemm_impl.h"

static inline bool default_backend_rounds_bf16(void) {
    caprl_backend *be = NULL;
    caprl_error    err = {0};
    if (caprl_backend_cpu_init(&be, 1, &err) != CAPRL_OK) {
        return false;
    }
    bool rounds = caprl_backend_cpu_bf16_inputs(be);
    caprl_backend_free(be);
    return rounds;
}

/* A 1-thread and a 3-thread CPU backend with the bf16 matrix units allowed (AMX where usable, else vdpbf16ps where
 * the CPU has AVX512-BF16). */
static inline caprl_status bf16_unit_backends(caprl_backend **be1, caprl_backend **be3, caprl_error *err) {
    caprl_status st = caprl_backend_cpu_init_isa(be1, 1, CAPRL_ISA_AVX512, true, err);
    return st != CAPRL_OK ? st : caprl_backend_cpu_init_isa(be3, 3, CAPRL_ISA_AVX512, true, err);
}

/* Whether be1 (from bf16_unit_backends) runs a bf16 matrix unit; if not, says on stderr what is skipped and frees
 * both backends. */
static inline bool bf16_unit_or_skip(caprl_backend *be1, caprl_backend *be3, const char *what) {
    if (caprl_backend_cpu_bf16_inputs(be1)) {
        return true;
    }
    fprintf(stderr, "no bf16 matrix unit here (AMX or AVX512-BF16): %s skipped\n", what);
    caprl_backend_free(be1);
    caprl_backend_free(be3);
    return false;
}

#endif /* CAPRL_AMX_UTIL_H */
