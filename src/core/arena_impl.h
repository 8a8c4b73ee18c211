/* Bump allocator over one block reserved up front. Memory is planned, then reserved once; a step allocates
 * from the arena and resets to a mark. Alignment is 64 bytes unless asked otherwise. */
#ifndef CAPRL_ARENA_IMPL_H
#define CAPRL_ARENA_IMPL_H

#include "caprl/caprl.h"

typedef struct caprl_arena {
    uint8_t    *base;
    size_t      cap;  /* bytes reserved */
    size_t      used; /* bytes handed out */
    size_t      high; /* high-water mark of used */
    const char *name; /* for error messages */
} caprl_arena;

/* Reserves cap bytes (64-byte aligned). CAPRL_ERR_OOM names the arena and the size. */
caprl_status caprl_arena_reserve(caprl_arena *a, const char *name, size_t cap, caprl_error *err);
/* Returns NULL when the request does not fit (the plan was wrong: callers treat it as a tier-2 bug or map it
 * to CAPRL_ERR_INVALID_ARG naming the limit). align must be a power of two. Memory is not zeroed. */
void        *caprl_arena_alloc(caprl_arena *a, size_t bytes, size_t align);
/* Like caprl_arena_alloc but aborts if the plan was too small (a programmer error). */
void        *caprl_arena_must_alloc(caprl_arena *a, size_t bytes);
size_t       caprl_arena_mark(const caprl_arena *a);
void         caprl_arena_reset(caprl_arena *a, size_t mark);
void         caprl_arena_free(caprl_arena *a); /* NULL-safe and safe on a zeroed struct */

/* Planning helper: accumulates aligned sizes with overflow checking. */
typedef struct caprl_arena_plan {
    size_t bytes;
    bool   overflow;
} caprl_arena_plan;
void caprl_arena_plan_add(caprl_arena_plan *p, size_t count, size_t elem_size);

#endif /* CAPRL_ARENA_IMPL_H */
