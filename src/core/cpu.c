/* CPU features: cpuid leaves 1 and 7 (subleaf 0 and 1), xgetbv for OS-enabled state, and on Linux the AMX
 * XTILEDATA permission (arch_prctl ARCH_REQ_XCOMP_PERM), without which the first tile instruction faults. */
#include <stdio.h>
#include <string.h>

#include "core/cpu_impl.h"

#if defined(__x86_64__)
#    include <cpuid.h>
#    include <sys/syscall.h>
#    include <unistd.h>

#    define ARCH_GET_XCOMP_PERM 0x1022
#    define ARCH_REQ_XCOMP_PERM 0x1023
#    define XFEATURE_XTILEDATA 18

static unsigned long long read_xcr0(void) {
    unsigned int lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}

static bool request_amx(void) {
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) {
        return false;
    }
    unsigned long long bitmask = 0;
    if (syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &bitmask) != 0) {
        return false;
    }
    return (bitmask & (1ull << XFEATURE_XTILEDATA)) != 0;
}

static void detect(caprl_cpu_features *f) {
    unsigned a, b, c, d;
    memset(f, 0, sizeof *f);
    if (!__get_cpuid(1, &a, &b, &c, &d)) {
        return;
    }
    bool osxsave = (c >> 27) & 1;
    bool fma = (c >> 12) & 1;
    bool f16c = (c >> 29) & 1;
    unsigned long long xcr0 = osxsave ? read_xcr0() : 0;
    bool ymm_ok = (xcr0 & 0x6) == 0x6;
    bool zmm_ok = (xcr0 & 0xE6) == 0xE6;
    bool tile_ok = (xcr0 & 0x60000) == 0x60000;
    unsigned max_leaf = __get_cpuid_max(0, NULL);
    unsigned b7 = 0, c7 = 0, d7 = 0, a71 = 0;
    if (max_leaf >= 7) {
        __cpuid_count(7, 0, a, b7, c7, d7);
        unsigned b71, c71, d71;
        __cpuid_count(7, 1, a71, b71, c71, d71);
    }
    f->fma = fma && ymm_ok;
    f->f16c = f16c && ymm_ok;
    f->avx2 = ((b7 >> 5) & 1) && ymm_ok;
    f->avx512f = ((b7 >> 16) & 1) && zmm_ok;
    f->avx512bw = ((b7 >> 30) & 1) && zmm_ok;
    f->avx512vl = ((b7 >> 31) & 1) && zmm_ok;
    f->avx512_bf16 = ((a71 >> 5) & 1) && zmm_ok;
    f->amx_bf16 = ((d7 >> 22) & 1) && tile_ok;
    f->amx_tile = ((d7 >> 24) & 1) && tile_ok;
    f->amx_usable = f->amx_tile && f->amx_bf16 && request_amx();
}
#else
static void detect(caprl_cpu_features *f) {
    memset(f, 0, sizeof *f);
}
#endif

static caprl_cpu_features g_cpu;
static bool               g_cpu_done;
static char               g_cpu_desc[160];

const caprl_cpu_features *caprl_cpu(void) {
    if (!g_cpu_done) {
        detect(&g_cpu);
        g_cpu_done = true;
    }
    return &g_cpu;
}

const char *caprl_cpu_describe(void) {
    const caprl_cpu_features *f = caprl_cpu();
    snprintf(g_cpu_desc, sizeof g_cpu_desc, "%s%s%s%s%s%s%s", f->avx2 ? "avx2 " : "", f->fma ? "fma " : "",
             f->f16c ? "f16c " : "", f->avx512f ? "avx512f " : "", f->avx512bw ? "avx512bw " : "",
             f->avx512_bf16 ? "avx512_bf16 " : "", f->amx_usable ? "amx-bf16" : (f->amx_bf16 ? "amx(denied)" : ""));
    return g_cpu_desc;
}
