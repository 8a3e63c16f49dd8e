// CUDA on the CPU, for tests: compile a kernels/*.cu file unchanged as C++ and run its kernels with real threads.
//
//   g++ -std=c++17 -x c++ wrapper.cpp   where wrapper.cpp is:
//       #include "cuda_cpu_emulation.h"
//       #include "png_unfilter.cu"
//       CUDA_CPU_EXPORT(png_unfilter)
//       int main(int argc, char** argv) { return cuda_cpu::harness_main(argc, argv); }
//
// (tests/cuda_cpu.py generates, builds and drives these executables.)
//
// Execution model: a launch runs its blocks one after the other; the threads of a block are real std::threads,
// blockDim of them, running concurrently. So `__shared__` can simply be `static` storage (one block at a time owns
// it, and every thread of the block sees the same object), `__syncthreads()` is a real barrier across the block's
// threads (the unfilter's shared-memory hand-off between threads is exercised for real, ThreadSanitizer sees it),
// and a warp's shuffles exchange values through a per-warp barrier. A __syncthreads() that not every thread of the
// block reaches (a divergent barrier: undefined behaviour on a GPU) aborts with an error instead of hanging.
//
// What the kernels' device-only constructs become: __global__/__device__/__host__/__forceinline__/
// __launch_bounds__ nothing (or inline), the _rn arithmetic intrinsics plain IEEE operations (built with
// -ffp-contract=off, SSE2: one correctly rounded operation each, as on the device), atomics GCC __atomic builtins.
// __CUDACC__ and __CUDA_ARCH__ are defined, so headers shared with the host compile their device branches.
// Inline PTX cannot run here: a kernel guards it with IWS_CUDA_CPU_EMULATION and calls the equivalent below.
//
// The harness protocol (stdin, one command per line; all numbers decimal):
//   buffer <id> <bytes> <path>        load a device buffer from a file (written back after the launches)
//   poison <id> <offset> <bytes>      AddressSanitizer builds: make these bytes of a buffer unaddressable
//   launch <entry> <gx> <gy> <gz> <bx> <by> <bz> <nargs> <independent blocks: 0|1>, then nargs lines:
//   ptr <id> <offset>                 a pointer argument into a buffer
//   val <f|i|u> <bytes> <hex>         a scalar argument, its bytes in memory order (little-endian)
#pragma once

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <climits>
#include <cstdint>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

#define IWS_CUDA_CPU_EMULATION 1

namespace cuda_cpu {

struct uint3 {
    unsigned x, y, z;
};

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
    constexpr operator uint3() const { return {x, y, z}; }
};

[[noreturn]] inline void fatal(const std::string& message) {
    fprintf(stderr, "cuda_cpu: %s\n", message.c_str());
    fflush(stderr);
    abort();
}

// A reusable barrier that also checks that every arrival in one round comes from the same kind of point
// (a __syncthreads() or the end of the block): a mix means some thread skipped a __syncthreads().
// Atomics order the memory (ThreadSanitizer follows them); a futex on the round number does the sleeping, so a
// released thread needs no lock (hundreds of threads on two cores: a mutex would make every round a convoy).
class Barrier {
public:
    explicit Barrier(unsigned count) : count_(count) {}
    void wait(int kind, const char* where) {
        const unsigned round = round_.load(std::memory_order_acquire);
        kinds_.fetch_or(1u << kind, std::memory_order_relaxed);
        if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == count_) {
            const unsigned kinds = kinds_.exchange(0, std::memory_order_relaxed);
            if (kinds & (kinds - 1)) {
                fatal(std::string("a barrier was not reached by every thread of the block (") + where +
                      "): divergent __syncthreads() or warp operation");
            }
            arrived_.store(0, std::memory_order_relaxed);
            round_.fetch_add(1, std::memory_order_release);
            syscall(SYS_futex, (unsigned*)&round_, FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
            return;
        }
        while (round_.load(std::memory_order_acquire) == round) {
            syscall(SYS_futex, (unsigned*)&round_, FUTEX_WAIT_PRIVATE, round, nullptr, nullptr, 0);
        }
    }

private:
    static_assert(sizeof(std::atomic<unsigned>) == sizeof(unsigned), "the futex word is the atomic itself");
    const unsigned count_;
    std::atomic<unsigned> arrived_{0};
    std::atomic<unsigned> kinds_{0};
    std::atomic<unsigned> round_{0};
};

enum BarrierKind { SYNCTHREADS = 0, BLOCK_END = 1, WARP = 2 };

struct Warp {
    explicit Warp(unsigned size) : size(size), barrier(size) {}
    unsigned size;
    Barrier barrier;
    alignas(16) unsigned char lanes[32][16];
};

struct Block {
    explicit Block(unsigned threads) : threads(threads), barrier(threads) {
        for (unsigned w = 0; w * 32 < threads; ++w) warps.emplace_back(new Warp(std::min(32u, threads - w * 32)));
    }
    unsigned threads;
    Barrier barrier;
    std::vector<std::unique_ptr<Warp>> warps;
};

inline thread_local Block* current_block = nullptr;
inline thread_local unsigned linear_thread = 0;

}  // namespace cuda_cpu

using cuda_cpu::dim3;
using cuda_cpu::uint3;

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(16) int4 {
    int x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};

// ----- execution-space and qualifier keywords -----
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __shared__ static
#define __constant__ static
#define __launch_bounds__(...)
#define __CUDACC__ 1
#define __CUDA_ARCH__ 900

// ----- synchronisation -----
inline void __syncthreads() { cuda_cpu::current_block->barrier.wait(cuda_cpu::SYNCTHREADS, "__syncthreads"); }

namespace cuda_cpu {
inline Warp& this_warp() { return *current_block->warps[linear_thread / 32]; }

// Every lane publishes `value`, then reads lane `source(lane)` (its own value when the source is outside the warp).
template <class T, class Source>
T warp_exchange(T value, Source source, const char* what) {
    static_assert(sizeof(T) <= 16, "shuffle of a type over 16 bytes");
    Warp& warp = this_warp();
    const unsigned lane = linear_thread % 32;
    memcpy(warp.lanes[lane], &value, sizeof(T));
    warp.barrier.wait(WARP, what);
    const int from = source((int)lane);
    T result = value;
    if (from >= 0 && from < (int)warp.size) memcpy(&result, warp.lanes[from], sizeof(T));
    warp.barrier.wait(WARP, what);  // the lanes are rewritten by the next exchange
    return result;
}

inline void check_mask(unsigned mask, const char* what) {
    const unsigned size = this_warp().size;
    const unsigned full = size == 32 ? 0xffffffffu : (1u << size) - 1u;
    if ((mask & full) != full) fatal(std::string(what) + ": partial-warp masks are not emulated");
}
}  // namespace cuda_cpu

inline void __syncwarp(unsigned mask = 0xffffffffu) {
    cuda_cpu::check_mask(mask, "__syncwarp");
    cuda_cpu::this_warp().barrier.wait(cuda_cpu::WARP, "__syncwarp");
}

template <class T>
T __shfl_sync(unsigned mask, T value, int src_lane, int width = 32) {
    cuda_cpu::check_mask(mask, "__shfl_sync");
    return cuda_cpu::warp_exchange(value, [&](int lane) { return (lane / width) * width + (src_lane % width); },
                                   "__shfl_sync");
}
template <class T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
    cuda_cpu::check_mask(mask, "__shfl_down_sync");
    return cuda_cpu::warp_exchange(
        value, [&](int lane) { return (lane % width) + (int)delta < width ? lane + (int)delta : lane; },
        "__shfl_down_sync");
}
template <class T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32) {
    cuda_cpu::check_mask(mask, "__shfl_up_sync");
    return cuda_cpu::warp_exchange(
        value, [&](int lane) { return (lane % width) >= (int)delta ? lane - (int)delta : lane; }, "__shfl_up_sync");
}
template <class T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
    cuda_cpu::check_mask(mask, "__shfl_xor_sync");
    return cuda_cpu::warp_exchange(
        value, [&](int lane) { return ((lane ^ lane_mask) / width == lane / width) ? lane ^ lane_mask : lane; },
        "__shfl_xor_sync");
}

// ----- atomics (sequentially consistent: at least as strong as the device's) -----
template <class T>
T atomicOr(T* address, T value) { return __atomic_fetch_or(address, value, __ATOMIC_SEQ_CST); }
template <class T>
T atomicAnd(T* address, T value) { return __atomic_fetch_and(address, value, __ATOMIC_SEQ_CST); }
template <class T>
T atomicXor(T* address, T value) { return __atomic_fetch_xor(address, value, __ATOMIC_SEQ_CST); }
template <class T>
T atomicExch(T* address, T value) { return __atomic_exchange_n(address, value, __ATOMIC_SEQ_CST); }
template <class T>
T atomicCAS(T* address, T expected, T desired) {
    __atomic_compare_exchange_n(address, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return expected;
}
template <class T>
T atomicAdd(T* address, T value) {
    if constexpr (std::is_floating_point<T>::value) {
        T old = __atomic_load_n(address, __ATOMIC_SEQ_CST);
        while (!__atomic_compare_exchange(address, &old, &(const T&)(old + value), false, __ATOMIC_SEQ_CST,
                                          __ATOMIC_SEQ_CST)) {
        }
        return old;
    } else {
        return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
    }
}
template <class T>
T atomicSub(T* address, T value) { return __atomic_fetch_sub(address, value, __ATOMIC_SEQ_CST); }
template <class T>
T atomicMax(T* address, T value) {
    T old = __atomic_load_n(address, __ATOMIC_SEQ_CST);
    while (old < value && !__atomic_compare_exchange_n(address, &old, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return old;
}
template <class T>
T atomicMin(T* address, T value) {
    T old = __atomic_load_n(address, __ATOMIC_SEQ_CST);
    while (value < old && !__atomic_compare_exchange_n(address, &old, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return old;
}

// ----- integer and floating-point intrinsics -----
// CUDA's min/max overloads follow the usual arithmetic conversions (min(int, unsigned) is unsigned).
template <class A, class B>
inline typename std::common_type<A, B>::type min(A a, B b) {
    typedef typename std::common_type<A, B>::type C;
    return (C)a < (C)b ? (C)a : (C)b;
}
template <class A, class B>
inline typename std::common_type<A, B>::type max(A a, B b) {
    typedef typename std::common_type<A, B>::type C;
    return (C)a < (C)b ? (C)b : (C)a;
}
template <class T>
inline T __ldg(const T* p) { return *p; }

// One IEEE-754 operation each, rounded to nearest even (the build uses -ffp-contract=off: no fused multiply-adds).
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __uint2float_rn(unsigned v) { return (float)v; }  // cvtsi2ss of the zero-extended value: RN
inline float __int2float_rn(int v) { return (float)v; }
inline double __uint2double_rn(unsigned v) { return (double)v; }
inline int __float2int_rn(float v) { return (int)rintf(v); }
inline unsigned __float2uint_rn(float v) { return (unsigned)rintf(v); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz((unsigned)v); }
inline int __ffs(int v) { return __builtin_ffs(v); }

namespace cuda_cpu {
// PTX cvt.rn.f16.f32: IEEE binary16 bits of v, rounded to nearest even (GCC's _Float16 conversion is exactly that).
inline unsigned short float_to_half_rn_bits(float v) {
    const _Float16 h = (_Float16)v;
    unsigned short bits;
    memcpy(&bits, &h, sizeof bits);
    return bits;
}

// ----- launching -----

// Runs fn() for every thread of every block: a block's threads concurrently, blocks one after the other. With
// `independent_blocks` (the caller knows the kernel has no __shared__ storage and no barrier: nothing could tell
// the difference) a thread goes on to its part of the next block without waiting for the others.
inline void launch(dim3 grid, dim3 block, const std::function<void()>& fn, bool independent_blocks) {
    const unsigned threads = block.x * block.y * block.z;
    if (threads == 0 || threads > 1024) fatal("block of " + std::to_string(threads) + " threads (CUDA: 1..1024)");
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) fatal("empty grid");
    if (grid.y > 65535 || grid.z > 65535) fatal("grid.y or grid.z over 65535");
    Block shared_state(threads);
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
            current_block = &shared_state;
            linear_thread = t;
            blockDim = block;
            gridDim = grid;
            threadIdx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            for (unsigned z = 0; z < grid.z; ++z)
                for (unsigned y = 0; y < grid.y; ++y)
                    for (unsigned x = 0; x < grid.x; ++x) {
                        blockIdx = uint3{x, y, z};
                        fn();
                        // No thread starts the next block (and its __shared__ storage) before all have left this one.
                        if (!independent_blocks) shared_state.barrier.wait(BLOCK_END, "end of block");
                    }
        });
    }
    for (std::thread& thread : pool) thread.join();
}

struct Buffer {
    std::string path;
    size_t size = 0;
    unsigned char* data = nullptr;
};

struct Argument {
    bool pointer = false;
    int buffer = -1;
    size_t offset = 0;
    char kind = 0;  // f, i, u
    std::vector<unsigned char> bytes;
};

using Entry = std::function<void(dim3, dim3, std::map<int, Buffer>&, const std::vector<Argument>&, bool)>;

inline std::map<std::string, Entry>& registry() {
    static std::map<std::string, Entry> entries;
    return entries;
}

template <class T>
T argument_value(const Argument& arg, std::map<int, Buffer>& buffers, size_t index) {
    const std::string where = "argument " + std::to_string(index);
    if constexpr (std::is_pointer<T>::value) {
        if (!arg.pointer) fatal(where + ": a scalar where the kernel takes a pointer");
        auto found = buffers.find(arg.buffer);
        if (found == buffers.end()) fatal(where + ": unknown buffer");
        if (arg.offset > found->second.size) fatal(where + ": offset past the end of its buffer");
        return reinterpret_cast<T>(found->second.data + arg.offset);
    } else {
        static_assert(std::is_arithmetic<T>::value, "kernel arguments: pointers and arithmetic scalars");
        if (arg.pointer) fatal(where + ": a pointer where the kernel takes a scalar");
        if (arg.bytes.size() != sizeof(T)) {
            fatal(where + ": " + std::to_string(arg.bytes.size()) + "-byte scalar for a " + std::to_string(sizeof(T)) +
                  "-byte parameter");
        }
        const char want = std::is_floating_point<T>::value ? 'f' : (std::is_signed<T>::value ? 'i' : 'u');
        const bool same_class = (want == 'f') == (arg.kind == 'f');
        if (!same_class) fatal(where + ": scalar kind '" + arg.kind + "' for a parameter of kind '" + want + "'");
        T value;
        memcpy(&value, arg.bytes.data(), sizeof(T));
        return value;
    }
}

template <class... Params>
struct Registrar {
    Registrar(const char* name, void (*kernel)(Params...)) {
        registry()[name] = [kernel, name](dim3 grid, dim3 block, std::map<int, Buffer>& buffers,
                                          const std::vector<Argument>& args, bool independent_blocks) {
            if (args.size() != sizeof...(Params)) {
                fatal(std::string(name) + ": " + std::to_string(args.size()) + " arguments for " +
                      std::to_string(sizeof...(Params)) + " parameters");
            }
            auto values = convert(buffers, args, std::index_sequence_for<Params...>{});
            launch(grid, block, [&] { std::apply(kernel, values); }, independent_blocks);
        };
    }
    template <size_t... I>
    static std::tuple<Params...> convert(std::map<int, Buffer>& buffers, const std::vector<Argument>& args,
                                         std::index_sequence<I...>) {
        return std::tuple<Params...>{argument_value<Params>(args[I], buffers, I)...};
    }
};

inline std::vector<unsigned char> parse_hex(const std::string& hex) {
    std::vector<unsigned char> bytes;
    for (size_t k = 0; k + 1 < hex.size(); k += 2) bytes.push_back((unsigned char)std::stoul(hex.substr(k, 2), nullptr, 16));
    return bytes;
}

inline int harness_main(int, char**) {
    std::map<int, Buffer> buffers;
    std::string line;
    while (std::getline(std::cin, line)) {
        std::istringstream in(line);
        std::string command;
        if (!(in >> command)) continue;
        if (command == "buffer") {
            Buffer buffer;
            int id;
            in >> id >> buffer.size >> buffer.path;
            // Exactly `size` bytes (aligned like device allocations): AddressSanitizer flags any access past them.
            void* memory = nullptr;
            if (posix_memalign(&memory, 256, buffer.size ? buffer.size : 1) != 0) fatal("out of memory");
            buffer.data = (unsigned char*)memory;
            std::ifstream file(buffer.path, std::ios::binary);
            if (!file.read((char*)buffer.data, (std::streamsize)buffer.size)) fatal("cannot read " + buffer.path);
#if defined(__SANITIZE_ADDRESS__)
            if (buffer.size == 0) ASAN_POISON_MEMORY_REGION(buffer.data, 1);  // an empty array has no byte to touch
#endif
            buffers[id] = buffer;
        } else if (command == "poison") {
            int id;
            size_t offset, bytes;
            in >> id >> offset >> bytes;
            const Buffer& buffer = buffers.at(id);
            if (offset + bytes > buffer.size) fatal("poison range past the end of its buffer");
#if defined(__SANITIZE_ADDRESS__)
            ASAN_POISON_MEMORY_REGION(buffer.data + offset, bytes);
#endif
        } else if (command == "launch") {
            std::string entry;
            dim3 grid, block;
            size_t count;
            int independent_blocks = 0;
            in >> entry >> grid.x >> grid.y >> grid.z >> block.x >> block.y >> block.z >> count >> independent_blocks;
            std::vector<Argument> args(count);
            for (Argument& arg : args) {
                if (!std::getline(std::cin, line)) fatal("missing argument lines");
                std::istringstream arg_in(line);
                std::string type;
                arg_in >> type;
                if (type == "ptr") {
                    arg.pointer = true;
                    arg_in >> arg.buffer >> arg.offset;
                } else if (type == "val") {
                    size_t size;
                    std::string hex;
                    arg_in >> arg.kind >> size >> hex;
                    arg.bytes = parse_hex(hex);
                    if (arg.bytes.size() != size) fatal("scalar bytes do not match its size");
                } else {
                    fatal("unknown argument line: " + line);
                }
            }
            auto found = registry().find(entry);
            if (found == registry().end()) fatal("no kernel named " + entry + " in this executable");
            found->second(grid, block, buffers, args, independent_blocks != 0);
        } else {
            fatal("unknown command: " + command);
        }
    }
    for (auto& [id, buffer] : buffers) {
#if defined(__SANITIZE_ADDRESS__)
        ASAN_UNPOISON_MEMORY_REGION(buffer.data, buffer.size);
#endif
        std::ofstream file(buffer.path, std::ios::binary | std::ios::trunc);
        if (!file.write((const char*)buffer.data, (std::streamsize)buffer.size)) fatal("cannot write " + buffer.path);
        free(buffer.data);
    }
    return 0;
}

}  // namespace cuda_cpu

#define CUDA_CPU_EXPORT(kernel) static cuda_cpu::Registrar cuda_cpu_registrar_##kernel(#kernel, &kernel);
