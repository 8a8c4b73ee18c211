/* Machine-peak probes (caprl_measure_peaks): the fp32 FMA peak, the bf16 matrix-unit peak and the STREAM triad
 * bandwidth, each measured with all requested threads running at once on the pool. Benchmarks report their
 * figures as fractions of these, so the probes aim at the real ceilings: many independent FMA chains on the
 * widest vector unit, register-resident AMX tiles, and arrays far larger than the last-level cache. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "caprl/bench.h"
#include "core/clock_impl.h"
#include "core/cpu_impl.h"
#include "core/error_impl.h"
#include "core/pool_impl.h"
#include "backend/gemm_impl.h"
#include "ops/ops_impl.h"

#define PROBE_SECONDS 0.2         /* per compute probe */
#define PROBE_WARMUP_SECONDS 0.05
enum { TRIAD_REPS = 4 };

/* Keeps the probe results observable so the compiler cannot drop the loops. */
static volatile float g_probe_sink;

/* ---- compute kernels: each returns the flops it performed -------------------------------------------------- */

static double fma_scalar(int64_t iters) {
    float a[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    for (int64_t it = 0; it < iters; it++) {
        for (int j = 0; j < 8; j++) {
            a[j] = fmaf(a[j], 0.999999f, 1e-6f);
        }
    }
    g_probe_sink = a[0] + a[7];
    return (double)iters * 8 * 2;
}

#if CAPRL_X86
/* 12 chains: FMA latency 4-5 cycles times 2 pipes needs at least 10 in flight. */
static CAPRL_AVX2 double fma_avx2(int64_t iters) {
    __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-6f);
    __m256 a0 = _mm256_set1_ps(1.0f), a1 = _mm256_set1_ps(1.1f), a2 = _mm256_set1_ps(1.2f);
    __m256 a3 = _mm256_set1_ps(1.3f), a4 = _mm256_set1_ps(1.4f), a5 = _mm256_set1_ps(1.5f);
    __m256 a6 = _mm256_set1_ps(1.6f), a7 = _mm256_set1_ps(1.7f), a8 = _mm256_set1_ps(1.8f);
    __m256 a9 = _mm256_set1_ps(1.9f), a10 = _mm256_set1_ps(2.0f), a11 = _mm256_set1_ps(2.1f);
    for (int64_t it = 0; it < iters; it++) {
        a0 = _mm256_fmadd_ps(a0, m, c);
        a1 = _mm256_fmadd_ps(a1, m, c);
        a2 = _mm256_fmadd_ps(a2, m, c);
        a3 = _mm256_fmadd_ps(a3, m, c);
        a4 = _mm256_fmadd_ps(a4, m, c);
        a5 = _mm256_fmadd_ps(a5, m, c);
        a6 = _mm256_fmadd_ps(a6, m, c);
        a7 = _mm256_fmadd_ps(a7, m, c);
        a8 = _mm256_fmadd_ps(a8, m, c);
        a9 = _mm256_fmadd_ps(a9, m, c);
        a10 = _mm256_fmadd_ps(a10, m, c);
        a11 = _mm256_fmadd_ps(a11, m, c);
    }
    __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                             _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
    s = _mm256_add_ps(s, _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)));
    g_probe_sink = caprl_hsum8_avx2(s);
    return (double)iters * 12 * 8 * 2;
}

#    define CAPRL_PROBE_AVX512 __attribute__((target("avx512f,avx2,fma")))

static CAPRL_PROBE_AVX512 double fma_avx512(int64_t iters) {
    __m512 m = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-6f);
    __m512 a0 = _mm512_set1_ps(1.0f), a1 = _mm512_set1_ps(1.1f), a2 = _mm512_set1_ps(1.2f);
    __m512 a3 = _mm512_set1_ps(1.3f), a4 = _mm512_set1_ps(1.4f), a5 = _mm512_set1_ps(1.5f);
    __m512 a6 = _mm512_set1_ps(1.6f), a7 = _mm512_set1_ps(1.7f), a8 = _mm512_set1_ps(1.8f);
    __m512 a9 = _mm512_set1_ps(1.9f), a10 = _mm512_set1_ps(2.0f), a11 = _mm512_set1_ps(2.1f);
    for (int64_t it = 0; it < iters; it++) {
        a0 = _mm512_fmadd_ps(a0, m, c);
        a1 = _mm512_fmadd_ps(a1, m, c);
        a2 = _mm512_fmadd_ps(a2, m, c);
        a3 = _mm512_fmadd_ps(a3, m, c);
        a4 = _mm512_fmadd_ps(a4, m, c);
        a5 = _mm512_fmadd_ps(a5, m, c);
        a6 = _mm512_fmadd_ps(a6, m, c);
        a7 = _mm512_fmadd_ps(a7, m, c);
        a8 = _mm512_fmadd_ps(a8, m, c);
        a9 = _mm512_fmadd_ps(a9, m, c);
        a10 = _mm512_fmadd_ps(a10, m, c);
        a11 = _mm512_fmadd_ps(a11, m, c);
    }
    __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                             _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
    s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)));
    g_probe_sink = _mm512_reduce_add_ps(s);
    return (double)iters * 12 * 16 * 2;
}

#    define CAPRL_PROBE_BF16 __attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl")))

/* vdpbf16ps: 16 lanes x 2 products x 2 flops per instruction. */
static CAPRL_PROBE_BF16 double dpbf16_avx512(int64_t iters) {
    __m512bh a = (__m512bh)_mm512_set1_epi16(0x3F80), b = (__m512bh)_mm512_set1_epi16(0x3000);
    __m512   c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
    __m512   c6 = c0, c7 = c0, c8 = c0, c9 = c0, c10 = c0, c11 = c0;
    for (int64_t it = 0; it < iters; it++) {
        c0 = _mm512_dpbf16_ps(c0, a, b);
        c1 = _mm512_dpbf16_ps(c1, a, b);
        c2 = _mm512_dpbf16_ps(c2, a, b);
        c3 = _mm512_dpbf16_ps(c3, a, b);
        c4 = _mm512_dpbf16_ps(c4, a, b);
        c5 = _mm512_dpbf16_ps(c5, a, b);
        c6 = _mm512_dpbf16_ps(c6, a, b);
        c7 = _mm512_dpbf16_ps(c7, a, b);
        c8 = _mm512_dpbf16_ps(c8, a, b);
        c9 = _mm512_dpbf16_ps(c9, a, b);
        c10 = _mm512_dpbf16_ps(c10, a, b);
        c11 = _mm512_dpbf16_ps(c11, a, b);
    }
    __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(c0, c1), _mm512_add_ps(c2, c3)),
                             _mm512_add_ps(_mm512_add_ps(c4, c5), _mm512_add_ps(c6, c7)));
    s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(c8, c9), _mm512_add_ps(c10, c11)));
    g_probe_sink = _mm512_reduce_add_ps(s);
    return (double)iters * 12 * 16 * 2 * 2;
}

#    define CAPRL_PROBE_AMX __attribute__((target("amx-tile,amx-bf16")))

/* Four independent 16 x 16 f32 accumulators fed by register-resident A and B tiles: each tdpbf16ps is
 * 16 * 16 * 32 multiply-adds = 16384 flops. */
static CAPRL_PROBE_AMX double dpbf16_amx(int64_t iters) {
    _Alignas(64) uint16_t ab[16 * 32];
    _Alignas(64) float    cbuf[16 * 16];
    for (int i = 0; i < 16 * 32; i++) {
        ab[i] = (uint16_t)(i % 7 == 0 ? 0x3F80 : 0x3000); /* 1.0 and 2^-31: sums stay finite */
    }
    __asm__ volatile("" : : "r"(ab) : "memory"); /* the tile loads below name only the pointer */
    caprl_amx_config_tiles();
    _tile_loadd(4, ab, 64);
    _tile_loadd(5, ab, 64);
    _tile_loadd(6, ab, 64);
    _tile_loadd(7, ab, 64);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t it = 0; it < iters; it++) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, cbuf, 64);
    _tile_release();
    g_probe_sink = cbuf[0];
    return (double)iters * 4 * 16 * 16 * 32 * 2;
}
#endif /* CAPRL_X86 */

/* ---- running a compute probe on every thread at once ------------------------------------------------------- */

typedef double (*probe_kernel)(int64_t iters);

typedef struct compute_task {
    probe_kernel kernel;
    int64_t      chunk;   /* iterations between clock reads */
    double       seconds; /* per thread */
    double      *flops;   /* (n_threads) */
    double      *elapsed; /* (n_threads) */
} compute_task;

static void compute_range(void *ctx, int64_t i0, int64_t i1, int32_t tid) {
    (void)i0;
    (void)i1;
    const compute_task *t = ctx;
    /* Warm-up: clocks ramp and, for AMX, the tile state and the unit's power-up (measured: a cold start gives
     * half the AMX rate). */
    double t0 = caprl_seconds_now(), t1 = t0;
    while (t1 - t0 < PROBE_WARMUP_SECONDS) {
        t->kernel(t->chunk);
        t1 = caprl_seconds_now();
    }
    double flops = 0;
    t0 = t1 = caprl_seconds_now();
    while (t1 - t0 < t->seconds) {
        flops += t->kernel(t->chunk);
        t1 = caprl_seconds_now();
    }
    t->flops[tid] = flops;
    t->elapsed[tid] = t1 - t0;
}

/* Total GFLOP/s: each thread's flops over its own elapsed time (they run concurrently), summed. */
static double run_compute(caprl_pool *pool, probe_kernel kernel, int64_t chunk, double *flops, double *elapsed) {
    int32_t      nt = caprl_pool_n_threads(pool);
    compute_task t = {.kernel = kernel, .chunk = chunk, .seconds = PROBE_SECONDS, .flops = flops, .elapsed = elapsed};
    caprl_parallel_for(pool, nt, compute_range, &t);
    double total = 0;
    for (int32_t i = 0; i < nt; i++) {
        total += elapsed[i] > 0 ? flops[i] / elapsed[i] : 0;
    }
    return total * 1e-9;
}

/* ---- STREAM triad ------------------------------------------------------------------------------------------- */

typedef struct triad_task {
    float *a, *b, *c; /* (n) each */
    bool   init;
    bool   read_only; /* the read probe: sum b and c, write nothing */
    float  sums[64];  /* per-thread sink of the read probe */
} triad_task;

static void triad_scalar(float *restrict a, const float *restrict b, const float *restrict c, int64_t i0,
                         int64_t i1) {
    for (int64_t i = i0; i < i1; i++) {
        a[i] = b[i] + 3.0f * c[i];
    }
}

#if CAPRL_X86
static CAPRL_AVX2 void triad_avx2(float *restrict a, const float *restrict b, const float *restrict c, int64_t i0,
                                  int64_t i1) {
    __m256  s = _mm256_set1_ps(3.0f);
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8) {
        _mm256_storeu_ps(a + i, _mm256_add_ps(_mm256_loadu_ps(b + i), _mm256_mul_ps(s, _mm256_loadu_ps(c + i))));
    }
    triad_scalar(a, b, c, i, i1);
}
#endif

/* Read-only streaming (what a decode GEMV does to the weights): several independent accumulators so the loads,
 * not the adds, are the limit. */
static float read_scalar(const float *restrict b, const float *restrict c, int64_t i0, int64_t i1) {
    float s0 = 0.0f, s1 = 0.0f;
    for (int64_t i = i0; i < i1; i++) {
        s0 += b[i];
        s1 += c[i];
    }
    return s0 + s1;
}

#if CAPRL_X86
static CAPRL_AVX2 float read_avx2(const float *restrict b, const float *restrict c, int64_t i0, int64_t i1) {
    __m256  s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    int64_t i = i0;
    for (; i + 16 <= i1; i += 16) {
        s0 = _mm256_add_ps(s0, _mm256_loadu_ps(b + i));
        s1 = _mm256_add_ps(s1, _mm256_loadu_ps(b + i + 8));
        s2 = _mm256_add_ps(s2, _mm256_loadu_ps(c + i));
        s3 = _mm256_add_ps(s3, _mm256_loadu_ps(c + i + 8));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    return lanes[0] + lanes[1] + lanes[2] + lanes[3] + lanes[4] + lanes[5] + lanes[6] + lanes[7] +
           read_scalar(b, c, i, i1);
}
#endif

static void triad_range(void *ctx, int64_t i0, int64_t i1, int32_t tid) {
    triad_task *t = ctx;
    if (t->read_only) {
#if CAPRL_X86
        if (caprl_cpu()->avx2) {
            t->sums[tid % 64] += read_avx2(t->b, t->c, i0, i1);
            return;
        }
#endif
        t->sums[tid % 64] += read_scalar(t->b, t->c, i0, i1);
        return;
    }
    if (t->init) { /* first touch by the thread that will stream this part */
        for (int64_t i = i0; i < i1; i++) {
            t->a[i] = 0.0f;
            t->b[i] = 1.0f;
            t->c[i] = 2.0f;
        }
        return;
    }
#if CAPRL_X86
    if (caprl_cpu()->avx2) {
        triad_avx2(t->a, t->b, t->c, i0, i1);
        return;
    }
#endif
    triad_scalar(t->a, t->b, t->c, i0, i1);
}

/* Last-level cache size in bytes (sysfs first: it reports what this machine's cores share; 32 MB if unknown). */
static int64_t l3_bytes(void) {
    FILE *f = fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r");
    long  kb = 0;
    if (f) {
        if (fscanf(f, "%ldK", &kb) != 1) {
            kb = 0;
        }
        fclose(f);
    }
    if (kb > 0) {
        return (int64_t)kb * 1024;
    }
    long v = -1;
#ifdef _SC_LEVEL3_CACHE_SIZE
    v = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return v > 0 ? v : 32 << 20;
}

/* Triad a[i] = b[i] + s c[i] over three float arrays whose total is at least 4x the LLC (64 MB each at least).
 * Counts 12 bytes per element (three float streams; STREAM's 24 are for doubles); the write-allocate read of a[]
 * is real traffic but not counted, as in STREAM. Best of TRIAD_REPS. */
static caprl_status run_triad(caprl_pool *pool, double *gbs, double *read_gbs, caprl_error *err) {
    int64_t each = l3_bytes() * 4 / 3;
    if (each < (64 << 20)) {
        each = 64 << 20;
    }
    if (each > ((int64_t)512 << 20)) {
        each = (int64_t)512 << 20;
    }
    int64_t    n = each / (int64_t)sizeof(float);
    triad_task t = {.init = true};
    t.a = caprl_try_aligned_alloc((size_t)each);
    t.b = caprl_try_aligned_alloc((size_t)each);
    t.c = caprl_try_aligned_alloc((size_t)each);
    if (!t.a || !t.b || !t.c) {
        caprl_aligned_free(t.a);
        caprl_aligned_free(t.b);
        caprl_aligned_free(t.c);
        return caprl_err_set(err, CAPRL_ERR_OOM, "cannot allocate 3 x %lld bytes for the triad probe",
                             (long long)each);
    }
    caprl_parallel_for(pool, n, triad_range, &t);
    t.init = false;
    double best = 0;
    for (int r = 0; r < TRIAD_REPS; r++) {
        double t0 = caprl_seconds_now();
        caprl_parallel_for(pool, n, triad_range, &t);
        double dt = caprl_seconds_now() - t0;
        double rate = dt > 0 ? 12.0 * (double)n / dt * 1e-9 : 0;
        best = rate > best ? rate : best;
    }
    g_probe_sink = t.a[n / 2];
    /* read-only: the same arrays, two read streams, 8 bytes per element */
    t.read_only = true;
    double best_read = 0;
    for (int r = 0; r < TRIAD_REPS; r++) {
        double t0 = caprl_seconds_now();
        caprl_parallel_for(pool, n, triad_range, &t);
        double dt = caprl_seconds_now() - t0;
        double rate = dt > 0 ? 8.0 * (double)n / dt * 1e-9 : 0;
        best_read = rate > best_read ? rate : best_read;
    }
    g_probe_sink += t.sums[0];
    *read_gbs = best_read;
    caprl_aligned_free(t.a);
    caprl_aligned_free(t.b);
    caprl_aligned_free(t.c);
    *gbs = best;
    return CAPRL_OK;
}

/* ---- entry point --------------------------------------------------------------------------------------------- */

caprl_status caprl_measure_peaks(int32_t n_threads, caprl_machine_peaks *out, caprl_error *err) {
    const caprl_cpu_features *f = caprl_cpu(); /* before the pool: AMX permission */
    caprl_pool               *pool = NULL;
    CAPRL_TRY(caprl_pool_init(&pool, n_threads, err));
    int32_t             nt = caprl_pool_n_threads(pool);
    caprl_machine_peaks r;
    memset(&r, 0, sizeof r);
    r.n_threads = nt;
    double *flops = caprl_xcalloc((size_t)nt * 2, sizeof(double)), *elapsed = flops + nt;

    probe_kernel fp32 = fma_scalar;
    int64_t      chunk = 1 << 14;
#if CAPRL_X86
    if (f->avx512f) {
        fp32 = fma_avx512;
        chunk = 1 << 16;
    } else if (f->avx2 && f->fma) {
        fp32 = fma_avx2;
        chunk = 1 << 16;
    }
#endif
    r.fp32_fma_gflops = run_compute(pool, fp32, chunk, flops, elapsed);

    snprintf(r.bf16_unit, sizeof r.bf16_unit, "none");
#if CAPRL_X86
    if (f->amx_usable) {
        r.bf16_matrix_gflops = run_compute(pool, dpbf16_amx, 1 << 12, flops, elapsed);
        snprintf(r.bf16_unit, sizeof r.bf16_unit, "amx-bf16");
    } else if (f->avx512_bf16) {
        r.bf16_matrix_gflops = run_compute(pool, dpbf16_avx512, 1 << 16, flops, elapsed);
        snprintf(r.bf16_unit, sizeof r.bf16_unit, "avx512-bf16");
    }
#endif
    free(flops);

    caprl_status st = run_triad(pool, &r.mem_bw_gbs, &r.mem_read_gbs, err);
    caprl_pool_free(pool);
    if (st != CAPRL_OK) {
        return st;
    }
    snprintf(r.cpu_features, sizeof r.cpu_features, "%s", caprl_cpu_describe());
    *out = r;
    return CAPRL_OK;
}
