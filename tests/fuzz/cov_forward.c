/* Preloaded ahead of GCC's ASan runtime for the fuzzing campaign (tests/fuzz/campaign.py).
 *
 * libasan.so defines the __sanitizer_cov_* coverage hooks as weak no-op stubs. Preloaded (ASan must interpose malloc
 * before libc), it would be the first definition the dynamic linker finds, so atheris' libFuzzer (inside its
 * core_with_libfuzzer extension, loaded later) would never receive the Python coverage counters and comparisons: a
 * campaign without feedback. These strong definitions come first and forward each hook to libFuzzer's own
 * definition in the library named by IWS_LIBFUZZER_CORE (looked up with dlsym on that library's handle). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdlib.h>

static void* core(void) {
    static void* handle;
    if (!handle) {
        const char* path = getenv("IWS_LIBFUZZER_CORE");
        if (path) handle = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    }
    return handle;
}

#define FORWARD(name, params, args)                                   \
    void name params {                                                \
        static void(*target) params;                                  \
        if (!target) {                                                \
            void* h = core();                                         \
            if (!h) return;                                           \
            target = (void(*) params)dlsym(h, #name);                  \
            if (!target) return;                                      \
        }                                                             \
        target args;                                                  \
    }

FORWARD(__sanitizer_cov_8bit_counters_init, (uint8_t* a, uint8_t* b), (a, b))
FORWARD(__sanitizer_cov_pcs_init, (const uintptr_t* a, const uintptr_t* b), (a, b))
FORWARD(__sanitizer_cov_trace_cmp1, (uint8_t a, uint8_t b), (a, b))
FORWARD(__sanitizer_cov_trace_cmp2, (uint16_t a, uint16_t b), (a, b))
FORWARD(__sanitizer_cov_trace_cmp4, (uint32_t a, uint32_t b), (a, b))
FORWARD(__sanitizer_cov_trace_cmp8, (uint64_t a, uint64_t b), (a, b))
FORWARD(__sanitizer_cov_trace_const_cmp1, (uint8_t a, uint8_t b), (a, b))
FORWARD(__sanitizer_cov_trace_const_cmp2, (uint16_t a, uint16_t b), (a, b))
FORWARD(__sanitizer_cov_trace_const_cmp4, (uint32_t a, uint32_t b), (a, b))
FORWARD(__sanitizer_cov_trace_const_cmp8, (uint64_t a, uint64_t b), (a, b))
FORWARD(__sanitizer_cov_trace_div4, (uint32_t a), (a))
FORWARD(__sanitizer_cov_trace_div8, (uint64_t a), (a))
FORWARD(__sanitizer_cov_trace_gep, (uintptr_t a), (a))
FORWARD(__sanitizer_cov_trace_switch, (uint64_t a, uint64_t* b), (a, b))
FORWARD(__sanitizer_cov_trace_pc_indir, (uintptr_t a), (a))
FORWARD(__sanitizer_cov_trace_pc_guard_init, (uint32_t* a, uint32_t* b), (a, b))
FORWARD(__sanitizer_cov_trace_pc_guard, (uint32_t* a), (a))
