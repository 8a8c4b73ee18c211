/* CPU feature detection (cpuid + OS support via xgetbv) and the one-time AMX tile permission request. */
#ifndef CAPRL_CPU_IMPL_H
#define CAPRL_CPU_IMPL_H

#include <stdbool.h>

typedef struct caprl_cpu_features {
    bool avx2;
    bool fma;
    bool f16c;
    bool avx512f;
    bool avx512bw;
    bool avx512vl;
    bool avx512_bf16;
    bool amx_tile;
    bool amx_bf16;
    bool amx_usable; /* amx_bf16 and the kernel granted XTILEDATA */
} caprl_cpu_features;

/* Detected once, cached. Thread-safe after the first call (call it once from the main thread at start-up). */
const caprl_cpu_features *caprl_cpu(void);
/* "avx2 fma avx512f ..." for logs and bench reports. */
const char *caprl_cpu_describe(void);

#endif /* CAPRL_CPU_IMPL_H */
