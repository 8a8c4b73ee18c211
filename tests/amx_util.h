/* Whether caprl's default CPU backend on this machine runs bf16 matmuls on AMX (then the activations entering each
 * weight matmul of a bf16 model are rounded to bf16, and float64 references that check bf16 models mirror it). */
#ifndef CAPRL_AMX_UTIL_H
#define CAPRL_AMX_UTIL_H

#include <stdbool.h>

#include "backend/gemm_impl.h"

static inline bool default_backend_uses_amx(void) {
    caprl_backend *be = NULL;
    caprl_error    err = {0};
    if (caprl_backend_cpu_init(&be, 1, &err) != CAPRL_OK) {
        return false;
    }
    bool amx = caprl_backend_cpu_amx(be);
    caprl_backend_free(be);
    return amx;
}

#endif /* CAPRL_AMX_UTIL_H */
