/* Embedding forward: out row m = row ids[m] of the table, widened exactly from bf16 when the table is bf16.
 * Ids are range-checked by the caller (asserted here). */
#include <string.h>

#include "caprl/tensor.h"
#include "core/error_impl.h"
#include "ops/ops_impl.h"

enum { EMBED_GRAIN_ELEMS = 32768 };

typedef struct embed_task {
    float              *out; /* (M, C) */
    const int32_t      *ids; /* (M) */
    const caprl_weight *table; /* (V, C) */
} embed_task;

static void embed_rows(void *ctx, int64_t m0, int64_t m1, int32_t tid) {
    (void)tid;
    const embed_task *t = ctx;
    int64_t           C = t->table->cols;
    for (int64_t m = m0; m < m1; m++) {
        int64_t id = t->ids[m];
        CAPRL_ASSERT(id >= 0 && id < t->table->rows);
        if (t->table->dtype == CAPRL_DTYPE_F32) {
            memcpy(t->out + m * C, (const float *)t->table->data + id * C, (size_t)C * sizeof(float));
        } else {
            caprl_bf16_to_f32_row(t->out + m * C, (const uint16_t *)t->table->data + id * C, (size_t)C);
        }
    }
}

void caprl_op_embed(caprl_cpu_ctx *c, float *out, const int32_t *ids, const caprl_weight *table, int64_t M) {
    CAPRL_ASSERT(table->dtype == CAPRL_DTYPE_F32 || table->dtype == CAPRL_DTYPE_BF16);
    CAPRL_ASSERT(M >= 0 && table->cols > 0);
    embed_task t = {.out = out, .ids = ids, .table = table};
    caprl_parallel_for_grain(c->pool, M, EMBED_GRAIN_ELEMS / table->cols + 1, embed_rows, &t);
}
