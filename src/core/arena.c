/* Arena: one reservation, bump allocation, marks. */
#include <string.h>

#include "core/arena_impl.h"
#include "core/ckmath.h"
#include "core/error_impl.h"

caprl_status caprl_arena_reserve(caprl_arena *a, const char *name, size_t cap, caprl_error *err) {
    memset(a, 0, sizeof *a);
    a->name = name;
    if (cap == 0) {
        return CAPRL_OK;
    }
    a->base = caprl_try_aligned_alloc(cap);
    if (!a->base) {
        return caprl_err_set(err, CAPRL_ERR_OOM, "arena '%s': cannot reserve %zu bytes", name, cap);
    }
    a->cap = cap;
    return CAPRL_OK;
}

void *caprl_arena_alloc(caprl_arena *a, size_t bytes, size_t align) {
    CAPRL_ASSERT(align != 0 && (align & (align - 1)) == 0);
    size_t start, end;
    if (!caprl_align_size(a->used, align, &start) || !caprl_add_size(start, bytes, &end) || end > a->cap) {
        return NULL;
    }
    a->used = end;
    if (end > a->high) {
        a->high = end;
    }
    return a->base + start;
}

void *caprl_arena_must_alloc(caprl_arena *a, size_t bytes) {
    void *p = caprl_arena_alloc(a, bytes, 64);
    if (!p) {
        caprl_abort(__FILE__, __LINE__, "arena '%s' plan too small: %zu used of %zu, asked %zu", a->name ? a->name : "?",
                    a->used, a->cap, bytes);
    }
    return p;
}

size_t caprl_arena_mark(const caprl_arena *a) {
    return a->used;
}

void caprl_arena_reset(caprl_arena *a, size_t mark) {
    CAPRL_ASSERT(mark <= a->used);
    a->used = mark;
}

void caprl_arena_free(caprl_arena *a) {
    if (!a) {
        return;
    }
    caprl_aligned_free(a->base);
    memset(a, 0, sizeof *a);
}

void caprl_arena_plan_add(caprl_arena_plan *p, size_t count, size_t elem_size) {
    size_t bytes, aligned, total;
    if (!caprl_mul_size(count, elem_size, &bytes) || !caprl_align_size(bytes, 64, &aligned) ||
        !caprl_add_size(p->bytes, aligned, &total)) {
        p->overflow = true;
        return;
    }
    p->bytes = total;
}
