/* CPU backend internals: the matmul kernels of gemm_cpu.c and a backend constructor that caps the ISA level
 * (tests and benchmarks use it to run every code path the machine has). */
#ifndef CAPRL_GEMM_IMPL_H
#define CAPRL_GEMM_IMPL_H

#include "backend/backend.h"
#include "ops/ops_impl.h"

/* out (M, N) = in (M, K) @ w (N, K)^T (+ bias (N)). On a context with AMX enabled and a weight packed by
 * caprl_gemm_prepare, the operands are rounded to bf16 and multiplied on the tile unit (f32 accumulation);
 * otherwise the f32 kernels of c->isa run, widening bf16 weights exactly. Either way every output row is a
 * function of its input row alone (bit-identical for any M, N blocking and thread count). */
void caprl_gemm(caprl_cpu_ctx *c,
                float *out,            /* (M, N) */
                const float *in,       /* (M, K) */
                const caprl_weight *w, /* (N, K) */
                const float *bias,     /* (N) or NULL */
                int64_t M);

/* Matmul backward (gemm_bwd.c), f32 kernels of c->isa (never AMX). Every output element is one FMA chain over the
 * reduction index in order, so results do not depend on the thread count, on M (data: dx row m is a function of
 * dy row m) or on the blocking, and the AVX2 and AVX-512 kernels agree bit for bit.
 * dx (M, K) = dy (M, N) @ w (N, K), w f32 or bf16 (widened exactly); overwrites dx. */
void caprl_gemm_bwd_data(caprl_cpu_ctx *c, float *dx, const float *dy, const caprl_weight *w, int64_t M);
/* dw (N, K) += dy^T (N, M) @ x (M, K): each element's chain starts from its old value; dbias (N) += column sums of
 * dy (chains over m in order) when not NULL. */
void caprl_gemm_bwd_weight(caprl_cpu_ctx *c, float *dw, float *dbias, const float *dy, const float *x, int64_t M,
                           int64_t N, int64_t K);

/* Packs a bf16 weight into AMX tile panels when c->amx (sets w->packed); a no-op otherwise. */
caprl_status caprl_gemm_prepare(caprl_cpu_ctx *c, caprl_weight *w, caprl_error *err);
void         caprl_gemm_release(caprl_weight *w);

/* caprl_backend_cpu_init with the kernels limited to max_isa (CAPRL_ISA_*) and AMX allowed or not; the
 * machine's own features still apply (asking for AVX-512 on an AVX2 machine gives AVX2). */
caprl_status caprl_backend_cpu_init_isa(caprl_backend **out, int32_t n_threads, int32_t max_isa, bool allow_amx,
                                        caprl_error *err);

/* The ISA level and AMX switch a CPU backend runs (for tests and bench reports). */
int32_t caprl_backend_cpu_isa(const caprl_backend *be);
bool    caprl_backend_cpu_amx(const caprl_backend *be);

#endif /* CAPRL_GEMM_IMPL_H */
