/* Core: checked size math, arena, Philox known answers, RNG determinism, bf16/f16 conversions, pool chunking,
 * error records, atomic files. */
#include <float.h>

#include "caprl/tensor.h"
#include "caprl_test.h"
#include "core/arena_impl.h"
#include "core/ckmath.h"
#include "core/error_impl.h"
#include "core/file_impl.h"
#include "core/pool_impl.h"
#include "core/rng_impl.h"

static void test_ckmath(void) {
    size_t out = 0;
    CHECK(caprl_mul_size(3, 5, &out) && out == 15);
    CHECK(!caprl_mul_size(SIZE_MAX / 2 + 1, 2, &out));
    CHECK(!caprl_add_size(SIZE_MAX, 1, &out));
    CHECK(caprl_align_size(65, 64, &out) && out == 128);
    CHECK(!caprl_align_size(SIZE_MAX - 3, 64, &out));
    int64_t i = 0;
    CHECK(!caprl_mul_i64(INT64_MAX / 2 + 1, 2, &i));
    CHECK(caprl_mul_i64(-4, 5, &i) && i == -20);
}

static void test_arena(void) {
    caprl_arena a;
    caprl_error err = {0};
    CHECK_OK(caprl_arena_reserve(&a, "test", 1024, &err), &err);
    void *p = caprl_arena_alloc(&a, 10, 64);
    CHECK(p != NULL && ((uintptr_t)p % 64) == 0);
    size_t mark = caprl_arena_mark(&a);
    void  *q = caprl_arena_alloc(&a, 100, 64);
    CHECK(q != NULL && (uint8_t *)q >= (uint8_t *)p + 64);
    CHECK(caprl_arena_alloc(&a, 2000, 64) == NULL); /* does not fit */
    CHECK(caprl_arena_alloc(&a, SIZE_MAX, 64) == NULL); /* overflow */
    caprl_arena_reset(&a, mark);
    CHECK(caprl_arena_alloc(&a, 100, 64) == q);
    CHECK(a.high >= 164);
    caprl_arena_free(&a);
    caprl_arena_free(&a); /* idempotent */

    caprl_arena_plan plan = {0};
    caprl_arena_plan_add(&plan, 10, 4);
    caprl_arena_plan_add(&plan, 1, 1);
    CHECK(plan.bytes == 128 && !plan.overflow);
    caprl_arena_plan_add(&plan, SIZE_MAX, 2);
    CHECK(plan.overflow);

    caprl_test_fail_alloc_after(0);
    CHECK(caprl_arena_reserve(&a, "fails", 1024, &err) == CAPRL_ERR_OOM);
    CHECK(strstr(err.msg, "fails") != NULL);
}

static void test_philox(void) {
    /* Known-answer vectors of Random123 (kat_vectors, philox4x32 with 10 rounds). */
    uint32_t out[4];
    uint32_t c0[4] = {0, 0, 0, 0}, k0[2] = {0, 0};
    caprl_philox4x32(c0, k0, out);
    CHECK(out[0] == 0x6627e8d5u && out[1] == 0xe169c58du && out[2] == 0xbc57ac4cu && out[3] == 0x9b00dbd8u);
    uint32_t c1[4] = {0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, k1[2] = {0xffffffffu, 0xffffffffu};
    caprl_philox4x32(c1, k1, out);
    CHECK(out[0] == 0x408f276du && out[1] == 0x41c83b0eu && out[2] == 0xa20bc7c6u && out[3] == 0x6d5451fdu);
    uint32_t c2[4] = {0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, k2[2] = {0xa4093822u, 0x299f31d0u};
    caprl_philox4x32(c2, k2, out);
    CHECK(out[0] == 0xd16cfe09u && out[1] == 0x94fdccebu && out[2] == 0x5001e420u && out[3] == 0x24126ea1u);
}

static void test_rng(void) {
    caprl_rng a, b, c;
    caprl_rng_init(&a, 42, 1, 2);
    caprl_rng_init(&b, 42, 1, 2);
    caprl_rng_init(&c, 42, 1, 3);
    int same_ab = 0, same_ac = 0;
    double sum = 0, sumsq = 0;
    for (int i = 0; i < 10000; i++) {
        uint32_t x = caprl_rng_u32(&a), y = caprl_rng_u32(&b), z = caprl_rng_u32(&c);
        same_ab += x == y;
        same_ac += x == z;
        float u = caprl_rng_uniform(&a);
        (void)caprl_rng_uniform(&b);
        (void)caprl_rng_uniform(&c);
        CHECK(u >= 0.0f && u < 1.0f);
        sum += u;
        sumsq += (double)u * u;
    }
    CHECK(same_ab == 10000);
    CHECK(same_ac < 5);
    double mean = sum / 10000, var = sumsq / 10000 - mean * mean;
    CHECK_NEAR(mean, 0.5, 0, 0.02);      /* sd of the mean: 0.0029 */
    CHECK_NEAR(var, 1.0 / 12, 0, 0.005);
    for (int i = 0; i < 1000; i++) {
        CHECK(caprl_rng_below(&a, 7) < 7);
    }
}

static void test_half(void) {
    /* bf16: exact widening, round-to-nearest-even narrowing, NaN preserved. */
    CHECK(caprl_bf16_to_f32(0x3F80) == 1.0f);
    CHECK(caprl_f32_to_bf16(1.0f) == 0x3F80);
    float just_above = caprl_bf16_to_f32(0x3F80) + 0.5f * (caprl_bf16_to_f32(0x3F81) - 1.0f); /* tie */
    CHECK(caprl_f32_to_bf16(just_above) == 0x3F80);                                         /* to even */
    float tie_odd = caprl_bf16_to_f32(0x3F81) + 0.5f * (caprl_bf16_to_f32(0x3F82) - caprl_bf16_to_f32(0x3F81));
    CHECK(caprl_f32_to_bf16(tie_odd) == 0x3F82);
    CHECK(isnan(caprl_bf16_to_f32(caprl_f32_to_bf16(NAN))));
    CHECK(caprl_f32_to_bf16(INFINITY) == 0x7F80);
    /* every bf16 and f16 value round-trips; f16 widening agrees with a double formula */
    int bad_bf = 0, bad_f16 = 0, bad_f16_val = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = caprl_bf16_to_f32((uint16_t)h);
        if (!isnan(f) && caprl_f32_to_bf16(f) != h) {
            bad_bf++;
        }
        float g = caprl_f16_to_f32((uint16_t)h);
        if (!isnan(g) && caprl_f32_to_f16(g) != h) {
            bad_f16++;
        }
        int    e = (int)((h >> 10) & 31), m = (int)(h & 1023);
        double ref = e == 0 ? ldexp(m, -24) : (e == 31 ? (m ? NAN : INFINITY) : ldexp(1024 + m, e - 25));
        if (h & 0x8000) {
            ref = -ref;
        }
        if (!(isnan(ref) ? isnan(g) : (double)g == ref)) {
            bad_f16_val++;
        }
    }
    CHECK_EQ_I64(bad_bf, 0);
    CHECK_EQ_I64(bad_f16, 0);
    CHECK_EQ_I64(bad_f16_val, 0);
    /* f16 narrowing: nearest with ties to even, against a brute-force nearest search on random floats */
    caprl_rng r;
    caprl_rng_init(&r, 7, 0, 0);
    int bad_round = 0;
    for (int i = 0; i < 20000; i++) {
        float    x = (caprl_rng_uniform(&r) - 0.5f) * ldexpf(1.0f, (int)caprl_rng_below(&r, 40) - 26);
        uint16_t h = caprl_f32_to_f16(x);
        double   got = caprl_f16_to_f32(h), err_got = fabs(got - x);
        uint16_t nb[2] = {(uint16_t)(h + 1), (uint16_t)(h - 1)};
        for (int k = 0; k < 2; k++) {
            double alt = caprl_f16_to_f32(nb[k]);
            if (!isnan(alt) && (fabs(alt - x) < err_got || (fabs(alt - x) == err_got && (h & 1)))) {
                bad_round++;
            }
        }
    }
    CHECK_EQ_I64(bad_round, 0);
    CHECK(caprl_f32_to_f16(70000.0f) == 0x7C00);
    CHECK(caprl_f32_to_f16(65519.0f) == 0x7BFF);
    CHECK(caprl_f32_to_f16(65520.0f) == 0x7C00);
    CHECK(caprl_dtype_from_name("BF16") == CAPRL_DTYPE_BF16 && caprl_dtype_size(CAPRL_DTYPE_BF16) == 2);
    CHECK(caprl_dtype_from_name("bf16") == -1);
}

typedef struct chunk_log {
    int64_t lo[8], hi[8];
    int64_t total[8];
} chunk_log;

static void record_chunk(void *ctx, int64_t i0, int64_t i1, int32_t tid) {
    chunk_log *log = ctx;
    log->lo[tid] = i0;
    log->hi[tid] = i1;
    int64_t s = 0;
    for (int64_t i = i0; i < i1; i++) {
        s += i;
    }
    log->total[tid] = s;
}

static void test_pool(void) {
    caprl_error err = {0};
    for (int32_t nt = 1; nt <= 4; nt++) {
        caprl_pool *p = NULL;
        CHECK_OK(caprl_pool_init(&p, nt, &err), &err);
        for (int rep = 0; rep < 200; rep++) {
            chunk_log log;
            memset(&log, 0, sizeof log);
            caprl_parallel_for_grain(p, 1000, 16, record_chunk, &log);
            int64_t sum = 0;
            for (int t = 0; t < nt; t++) {
                sum += log.total[t];
                if (log.hi[t] > log.lo[t] && log.hi[t] < 1000) {
                    CHECK(log.hi[t] % 16 == 0);
                }
            }
            CHECK_EQ_I64(sum, 999 * 1000 / 2);
        }
        caprl_pool_free(p);
    }
    caprl_pool *bad = NULL;
    CHECK(caprl_pool_init(&bad, 5000, &err) == CAPRL_ERR_INVALID_ARG);
}

static void test_error_and_files(void) {
    caprl_error err = {0};
    CHECK(caprl_err_set(&err, CAPRL_ERR_FORMAT, "tensor '%s' bad", "x") == CAPRL_ERR_FORMAT);
    caprl_err_prefix(&err, "file.safetensors");
    CHECK_STR_EQ(err.msg, "file.safetensors: tensor 'x' bad");
    CHECK(err.line > 0 && err.file != NULL);
    CHECK(caprl_err_set(NULL, CAPRL_ERR_IO, "ignored") == CAPRL_ERR_IO);

    char              *dir = test_tmpdir("core");
    char              *path = caprl_path_join(dir, "out.txt");
    caprl_atomic_file  af;
    CHECK_OK(caprl_atomic_open(&af, path, &err), &err);
    CHECK_OK(caprl_atomic_write(&af, "hello", 5, &err), &err);
    CHECK(!caprl_path_exists(path)); /* nothing visible before commit */
    CHECK_OK(caprl_atomic_commit(&af, &err), &err);
    uint8_t *data = NULL;
    size_t   n = 0;
    CHECK_OK(caprl_file_read_all(path, 100, &data, &n, &err), &err);
    CHECK(n == 5 && memcmp(data, "hello", 5) == 0);
    free(data);
    CHECK(caprl_file_read_all(path, 3, &data, &n, &err) == CAPRL_ERR_FORMAT);
    /* an aborted write leaves the old file intact */
    CHECK_OK(caprl_atomic_open(&af, path, &err), &err);
    CHECK_OK(caprl_atomic_write(&af, "XX", 2, &err), &err);
    caprl_atomic_abort(&af);
    CHECK_OK(caprl_file_read_all(path, 100, &data, &n, &err), &err);
    CHECK(n == 5);
    free(data);
    CHECK(caprl_file_read_all("/nonexistent/x", 100, &data, &n, &err) == CAPRL_ERR_IO);
    CHECK(strstr(err.msg, "/nonexistent/x") != NULL);
    free(path);
    free(dir);
}

int main(void) {
    test_ckmath();
    test_arena();
    test_philox();
    test_rng();
    test_half();
    test_pool();
    test_error_and_files();
    return test_finish("test_core");
}
