/* CPU backend internals: the matmul kernels of gemm_cpu.c and a backend constructor that caps the ISA level
 * (tests and benchmarks use it to run every code path the machine has). */
#ifndef CAPRL_GEMM_IMPL_H
#define CAPRL_GEMM_IMPL_H

#include "backend/backend.h"
#include "caprl/tensor.h"
#include "ops/ops_impl.h"

/* out (M, N) = in (M, K) @ w (N, K)^T (+ bias (N)). On a context with AMX enabled and a weight packed by
 * caprl_gemm_prepare, the operands are rounded to bf16 and multiplied on the tile unit (f32 accumulation); on
 * one with c->bf16_dot, a bf16 weight's inputs are rounded to bf16 and multiplied with vdpbf16ps (f32
 * accumulation); otherwise the f32 kernels of c->isa run, widening bf16 weights exactly. Either way every output
 * row is a function of its input row alone (bit-identical for any M, N blocking and thread count). */
void caprl_gemm(caprl_cpu_ctx *c,
                float *out,            /* (M, N) */
                const float *in,       /* (M, K) */
                const caprl_weight *w, /* (N, K) */
                const float *bias,     /* (N) or NULL */
                int64_t M);

/* Matmul backward (gemm_bwd.c). With a bf16 matrix unit enabled (AMX, or vdpbf16ps) and w prepared for training
 * (w->backward, packed), both products run on that unit with bf16 operands (dy, x rounded to nearest even; f32
 * accumulation; gemm_amx.c); otherwise
 * on the f32 kernels of c->isa, where every output element is one FMA chain over the reduction index in order, so
 * the AVX2 and AVX-512 kernels agree bit for bit. Either way results do not depend on the thread count, and dx row
 * m is a function of dy row m alone (not of M).
 * dx (M, K) = dy (M, N) @ w (N, K), w f32 or bf16 (widened exactly); overwrites dx. */
void caprl_gemm_bwd_data(caprl_cpu_ctx *c, float *dx, const float *dy, const caprl_weight *w, int64_t M);
/* dw (N, K) += dy^T (N, M) @ x (M, K) for the weight w (N, K) (its shape and packing; its values are not read):
 * each element's chain starts from its old value; dbias (N) += column sums of dy (one f32 chain over m in order,
 * on every path) when not NULL. */
void caprl_gemm_bwd_weight(caprl_cpu_ctx *c, float *dw, float *dbias, const float *dy, const float *x,
                           const caprl_weight *w, int64_t M);

/* Packs a bf16 weight into tile panels (sets w->packed): with AMX the forward panels, and the backward ones when
 * w->backward; with vdpbf16ps (c->bf16_dot) the backward ones only. Packing a weight that already has them repacks
 * in place (after an optimizer step). A no-op without either unit or for f32 weights. */
caprl_status caprl_gemm_prepare(caprl_cpu_ctx *c, caprl_weight *w, caprl_error *err);
void         caprl_gemm_release(caprl_weight *w);

/* ---- AMX (gemm_amx.c) ----------------------------------------------------------------------------------
 * B operand of C (R, n) = A (R, k) @ B (k, n) in tile panels: panel p holds columns [16 p, 16 p + 16) of C as
 * k_pad / 32 tiles of 16 rows x 32 bf16 in the VNNI order tile[r][2 c + e] = B[32 t + 2 r + e][16 p + c]
 * (tile t of panel p at data + (p k_pad / 32 + t) 512), zero beyond n and k. */
typedef struct caprl_amx_panels {
    int64_t   n, k;         /* columns of C, reduction length */
    int64_t   n_pad, k_pad; /* both rounded up to 32 */
    uint16_t *data;         /* n_pad * k_pad */
} caprl_amx_panels;

/* caprl_weight.packed on the CPU backend: fwd holds B = W^T (out = in @ W^T; AMX only, else data NULL), bwd holds
 * B = W (dx = dy @ W; data NULL unless the weight was prepared for training). */
typedef struct caprl_amx_weight {
    caprl_amx_panels fwd, bwd;
} caprl_amx_weight;

/* The packing steps (plain C and AVX2: they run without AMX, so tests check them everywhere).
 * p's shape must be W^T's (backward false: n = W rows, k = W cols) or W's (backward true: n = W cols, k = W rows). */
void caprl_amx_pack_weight(caprl_cpu_ctx *c, const caprl_amx_panels *p, const uint16_t *w, bool backward);
/* B = bf16(x), x (p->k, p->n) f32 row-major. */
void caprl_amx_pack_f32(caprl_cpu_ctx *c, const caprl_amx_panels *p, const float *x);
/* A operand of the tile products: rows in blocks of 16, the reduction in tiles of 32, each 16 x 32 tile stored
 * contiguously (row-major inside). Element (row, k) of an A with lda (a multiple of 32) reduction columns: */
static inline int64_t caprl_amx_a_index(int64_t row, int64_t k, int64_t lda) {
    return ((row / 16) * (lda / 32) + k / 32) * 512 + (row % 16) * 32 + k % 32;
}
/* A = bf16(dy^T): element (n, m) = bf16(dy[m N + n]) for n < round_up(N, 16), m < lda (a multiple of 32, >= M),
 * zero beyond N and M. */
void caprl_amx_pack_dy_t(caprl_cpu_ctx *c, uint16_t *a, int64_t lda, const float *dy, int64_t M, int64_t N);

#if CAPRL_X86
/* Sixteen f32 -> bf16 with caprl_f32_to_bf16's rounding (nearest even; NaN kept quiet with its sign): the operand
 * rule of both bf16 matrix units. */
static CAPRL_AVX512_INLINE __m256i caprl_bf16_round16_avx512(__m512 x) {
    __m512i u = _mm512_castps_si512(x);
    __m512i hi = _mm512_srli_epi32(u, 16);
    __m512i bias = _mm512_add_epi32(_mm512_and_si512(hi, _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7FFF));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, hi, _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(r);
}

/* Configures all eight tiles as 16 rows x 64 bytes (palette 1), the one shape caprl's tile code uses. */
static inline __attribute__((target("amx-tile"))) void caprl_amx_config_tiles(void) {
    struct {
        uint8_t  palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t  rows[16];
    } cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; i++) {
        cfg.colsb[i] = 64;
        cfg.rows[i] = 16;
    }
    /* ldtilecfg's asm operand names only the first 8 bytes of cfg: make the other stores happen first. */
    __asm__ volatile("" : : "r"(&cfg) : "memory");
    _tile_loadconfig(&cfg);
}
#endif

/* The products on the tile unit (w prepared; bwd_data needs its backward panels). false when the scratch for the
 * bf16 activations cannot be had. */
bool caprl_gemm_amx_fwd(caprl_cpu_ctx *c, float *out, const float *in, const caprl_weight *w, const float *bias,
                        int64_t M);
bool caprl_gemm_amx_bwd_data(caprl_cpu_ctx *c, float *dx, const float *dy, const caprl_weight *w, int64_t M);
bool caprl_gemm_amx_bwd_weight(caprl_cpu_ctx *c, float *dw, const float *dy, const float *x, int64_t M, int64_t N,
                               int64_t K);

/* Serial forms for kernels that split work across threads themselves (the segment attention), each on the
 * calling thread: B = bf16(src) into panels p, src[k][n] at src[k ld + n], or at src[n ld + k] when transposed;
 * A = bf16(in) (R, K) into tile blocks of lda (a multiple of 32) reduction columns, zero beyond R (up to 16) and
 * K; and C (R, p->n) at out with row stride ldo = A @ B on the context's bf16 matrix unit (AMX tiles, else
 * vdpbf16ps; one of them must be on), the same products and bits as the threaded driver's. */
void caprl_amx_pack_f32_serial(const caprl_cpu_ctx *c, const caprl_amx_panels *p, const float *src, int64_t ld,
                               bool transposed);
void caprl_amx_convert_serial(uint16_t *a, const float *in, int64_t R, int64_t K, int64_t lda);
void caprl_bf16_matmul_serial(const caprl_cpu_ctx *c, float *out, int64_t ldo, const uint16_t *a,
                              const caprl_amx_panels *p, int64_t R);
/* Whether the context has a bf16 matrix unit on (AMX, or vdpbf16ps). */
static inline bool caprl_bf16_unit_on(const caprl_cpu_ctx *c) {
    return c->amx || c->bf16_dot;
}

/* The unit that runs one of w's products: the FMA kernels (f32 operands, bf16 weights widened), or a bf16 matrix
 * unit with the activations rounded to bf16: AMX tiles, or vdpbf16ps on AVX512-BF16 CPUs without AMX. */
typedef enum { CAPRL_UNIT_FMA, CAPRL_UNIT_AMX, CAPRL_UNIT_DOT } caprl_matmul_unit;

/* Forward: AMX for packed bf16 weights (caprl_gemm_prepare), vdpbf16ps for every bf16 weight. */
static inline caprl_matmul_unit caprl_gemm_fwd_unit(const caprl_cpu_ctx *c, const caprl_weight *w) {
    if (w->dtype != CAPRL_DTYPE_BF16) {
        return CAPRL_UNIT_FMA;
    }
    return c->amx && w->packed ? CAPRL_UNIT_AMX : c->bf16_dot ? CAPRL_UNIT_DOT : CAPRL_UNIT_FMA;
}

/* Backward (both products): bf16 weights prepared for training (their backward panels packed) on either unit. */
static inline caprl_matmul_unit caprl_gemm_bwd_unit(const caprl_cpu_ctx *c, const caprl_weight *w) {
    if (w->dtype != CAPRL_DTYPE_BF16 || !w->packed || !((const caprl_amx_weight *)w->packed)->bwd.data) {
        return CAPRL_UNIT_FMA;
    }
    return c->amx ? CAPRL_UNIT_AMX : c->bf16_dot ? CAPRL_UNIT_DOT : CAPRL_UNIT_FMA;
}

/* The unit's name in profiles and benchmarks ("fma" for the FMA kernels). */
static inline const char *caprl_matmul_unit_name(caprl_matmul_unit u) {
    return u == CAPRL_UNIT_AMX ? "amx-bf16" : u == CAPRL_UNIT_DOT ? "avx512-bf16" : "fma";
}

/* caprl_backend_cpu_init with the kernels limited to max_isa (CAPRL_ISA_*) and the bf16 matrix units (AMX, or
 * vdpbf16ps on AVX512-BF16 CPUs without AMX) allowed or not; the machine's own features still apply (asking for
 * AVX-512 on an AVX2 machine gives AVX2). */
caprl_status caprl_backend_cpu_init_isa(caprl_backend **out, int32_t n_threads, int32_t max_isa,
                                        bool allow_bf16_units, caprl_error *err);

/* The ISA level and AMX switch a CPU backend runs (for tests and bench reports). */
int32_t caprl_backend_cpu_isa(const caprl_backend *be);
bool    caprl_backend_cpu_amx(const caprl_backend *be);
/* Whether bf16-weight matmuls round their inputs to bf16 (AMX or vdpbf16ps) rather than widen the weights. */
bool    caprl_backend_cpu_bf16_inputs(const caprl_backend *be);

#endif /* CAPRL_GEMM_IMPL_H */
