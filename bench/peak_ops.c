/* The arithmetic peak of one core: a loop of independent multiply-accumulates that nothing but the
 * vector units limits (no loads, 12 accumulators to hide the latency). bench/roofline.py compiles and
 * runs it, one process per core, to turn "the model is slow" into "the model runs at X % of this CPU".
 *
 *   peak_ops KIND SECONDS      KIND: fp32 (FMA), bf16 (VDPBF16PS), int8 (VPDPBUSD) or list
 * prints one line: "KIND MAC_PER_S" (multiply-accumulates per second on this core), or exits 3 when the
 * CPU lacks the instructions. Built with -O2; each kernel is compiled for its ISA only (target attributes).
 * SPDX-License-Identifier: MIT
 */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ACC 12          /* independent chains: > latency x throughput of every kernel here */
#define INNER 4096      /* instructions per chain between clock reads */
/* The chains must live in registers: the k loops are fully unrolled (a loop over an array in memory
 * would measure loads and stores instead). */

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Each kernel returns MACs done; `sink` keeps the compiler from dropping the work. */
static volatile float sink;

__attribute__((target("avx512f"))) static double run_fp32(double seconds) {
    __m512 acc[ACC];
    for (int k = 0; k < ACC; k++) acc[k] = _mm512_set1_ps((float)k * 1e-3f);
    const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
    double macs = 0, t0 = now();
    while (now() - t0 < seconds) {
        for (int i = 0; i < INNER; i++)
#pragma GCC unroll 16
            for (int k = 0; k < ACC; k++) acc[k] = _mm512_fmadd_ps(acc[k], a, b);
        macs += (double)INNER * ACC * 16;
    }
    __m512 s = acc[0];
    for (int k = 1; k < ACC; k++) s = _mm512_add_ps(s, acc[k]);
    sink = _mm512_reduce_add_ps(s);
    return macs;
}

__attribute__((target("avx512f,avx512bf16"))) static double run_bf16(double seconds) {
    __m512 acc[ACC];
    for (int k = 0; k < ACC; k++) acc[k] = _mm512_setzero_ps();
    const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x0001);
    double macs = 0, t0 = now();
    while (now() - t0 < seconds) {
        for (int i = 0; i < INNER; i++)
#pragma GCC unroll 16
            for (int k = 0; k < ACC; k++) acc[k] = _mm512_dpbf16_ps(acc[k], a, b);
        macs += (double)INNER * ACC * 32;  /* 16 lanes x 2 bf16 pairs */
    }
    __m512 s = acc[0];
    for (int k = 1; k < ACC; k++) s = _mm512_add_ps(s, acc[k]);
    sink = _mm512_reduce_add_ps(s);
    return macs;
}

__attribute__((target("avx512f,avx512vnni"))) static double run_int8(double seconds) {
    __m512i acc[ACC];
    for (int k = 0; k < ACC; k++) acc[k] = _mm512_setzero_si512();
    const __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
    double macs = 0, t0 = now();
    while (now() - t0 < seconds) {
        for (int i = 0; i < INNER; i++)
#pragma GCC unroll 16
            for (int k = 0; k < ACC; k++) acc[k] = _mm512_dpbusd_epi32(acc[k], a, b);
        macs += (double)INNER * ACC * 64;  /* 16 lanes x 4 u8*s8 pairs */
    }
    __m512i s = acc[0];
    for (int k = 1; k < ACC; k++) s = _mm512_add_epi32(s, acc[k]);
    sink = (float)_mm512_reduce_add_epi32(s);
    return macs;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s fp32|bf16|int8 SECONDS\n", argv[0]);
        return 2;
    }
    __builtin_cpu_init();
    const char *kind = argv[1];
    double seconds = atof(argv[2]), macs, t0;
    if (!(seconds > 0)) return 2;
    if (strcmp(kind, "fp32") == 0) {
        if (!__builtin_cpu_supports("avx512f")) return 3;
        t0 = now(); macs = run_fp32(seconds);
    } else if (strcmp(kind, "bf16") == 0) {
        if (!__builtin_cpu_supports("avx512bf16")) return 3;
        t0 = now(); macs = run_bf16(seconds);
    } else if (strcmp(kind, "int8") == 0) {
        if (!__builtin_cpu_supports("avx512vnni")) return 3;
        t0 = now(); macs = run_int8(seconds);
    } else {
        fprintf(stderr, "unknown kind %s\n", kind);
        return 2;
    }
    printf("%s %.6e\n", kind, macs / (now() - t0));
    return 0;
}
