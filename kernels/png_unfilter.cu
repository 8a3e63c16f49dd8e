// PNG scanline unfiltering (filter method 0: None, Sub, Up, Average, Paeth) for a batch of images.
//
// One source of truth: compiled at run time with NVRTC (engine/loaders/gpu.py, through CuPy, with -I on this
// folder) and compile-checked by nvcc in CI (CMakeLists.txt). The per-byte reconstruction is
// png_filter_math.cuh, which the native CPU decoder includes too (so CI tests this arithmetic on the CPU).
//
// Input: the inflated IDAT data of each image (one filter byte, then `row_bytes` bytes, per row),
// anywhere in one batch buffer. Output: the unfiltered scanlines (samples big-endian, as in the
// file) at `dst_offset`, `dst_pitch` bytes apart. The output may alias the input shifted by one
// byte (dst = src + 1, dst_pitch = row_bytes + 1): every byte is read before it is overwritten,
// by the same thread, so the loader unfilters in place and needs no second buffer.
//
// Parallel scheme: a wavefront over (row, pixel) with one thread block per image.
// The reconstructed byte x of row r depends on a = the same byte of the pixel to the left
// (r, p-1), b = the pixel above (r-1, p) and c = the pixel above-left (r-1, p-1); bytes of
// different lanes (offset mod bytes-per-pixel) never depend on each other. So pixel (r, p)
// depends only on (r, p-1), (r-1, p) and (r-1, p-1): all pixels on one anti-diagonal r + p = d
// are independent. Thread t owns row band + t; at step d it reconstructs pixel p = d - t of its
// row, all bytes of the pixel at once (the byte lanes). `a` and `c` stay in registers; `b` is
// handed over through shared memory by thread t-1, which produced it at step d-1 (thread 0 reads
// it from the finished row of the previous band). A band of T rows takes T + width - 1 steps,
// one barrier each. Why not per-filter strategies (parallel Up/None, prefix-sum Sub, sequential
// Average/Paeth lanes)? IWS vignettes are mostly Paeth-filtered, where lane chains leave only
// 1..8 threads busy per row; the wavefront has up to T threads busy whatever the filter, with a
// single code path for all five filters. Every filter type is handled by every thread.
//
// Status: a filter type > 4 sets UNFILTER_BAD_FILTER for that image (its output is then
// meaningless; the loader re-decodes such images on the CPU for the precise error).

#include "png_filter_math.cuh"

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;

#define UNFILTER_MAX_THREADS 256
// Status bits shared with engine/loaders/gpu.py (STATUS_*).
#define UNFILTER_BAD_FILTER 2u
#define UNFILTER_BAD_JOB 4u

struct UnfilterJob {
    u64 src_offset;     // byte offset of row 0's filter byte in `filtered`
    u64 dst_offset;     // byte offset of row 0's first sample byte in `unfiltered`
    u32 row_bytes;      // bytes per row, filter byte excluded
    u32 height;         // rows
    u32 dst_pitch;      // bytes from one output row to the next
    u32 filter_stride;  // bytes per complete pixel (1 for sub-byte depths): the filters' "left" distance
};
static_assert(sizeof(UnfilterJob) == 32, "UnfilterJob layout is mirrored by UNFILTER_JOB in engine/loaders/gpu.py");

template <int BPP>
__device__ __forceinline__ u64 load_pixel(const u8* p) {
    u64 v = 0;
#pragma unroll
    for (int k = 0; k < BPP; ++k) v |= (u64)p[k] << (8 * k);
    return v;
}

template <int BPP>
__device__ __forceinline__ void store_pixel(u8* p, u64 v) {
#pragma unroll
    for (int k = 0; k < BPP; ++k) p[k] = (u8)(v >> (8 * k));
}

// One pixel (BPP byte lanes) of a row with filter type `filter`; x is the filtered pixel.
template <int BPP>
__device__ __forceinline__ u64 reconstruct_pixel(u32 filter, u64 x, u64 a, u64 b, u64 c) {
    u64 out = 0;
#pragma unroll
    for (int k = 0; k < BPP; ++k) {
        const int shift = 8 * k;
        const u32 xk = (u32)(x >> shift) & 0xffu;
        const u32 ak = (u32)(a >> shift) & 0xffu;
        const u32 bk = (u32)(b >> shift) & 0xffu;
        const u32 ck = (u32)(c >> shift) & 0xffu;
        out |= (u64)iws_unfilter_byte(filter, xk, ak, bk, ck) << shift;  // invalid types: flagged by the caller
    }
    return out;
}

template <int BPP>
__device__ void unfilter_wavefront(const UnfilterJob& job, const u8* filtered, u8* unfiltered,
                                   u64 (*handoff)[UNFILTER_MAX_THREADS], u32* status) {
    const u32 t = threadIdx.x;
    const u32 threads = blockDim.x;
    const u32 width = job.row_bytes / BPP;  // pixels (bytes for sub-byte depths)
    const u64 src_pitch = (u64)job.row_bytes + 1;
    const u8* src = filtered + job.src_offset;
    u8* dst = unfiltered + job.dst_offset;

    for (u32 band = 0; band < job.height; band += threads) {
        const u32 rows = min(threads, job.height - band);
        const u32 r = band + t;
        const bool has_row = t < rows;
        u32 filter = 0;
        if (has_row) {
            filter = src[r * src_pitch];
            if (filter > 4) atomicOr(status, UNFILTER_BAD_FILTER);
        }
        const u8* raw = src + r * src_pitch + 1;
        u8* out = dst + (u64)r * job.dst_pitch;
        const u8* above = r > 0 ? dst + (u64)(r - 1) * job.dst_pitch : dst;  // read by thread 0 only, when r > 0
        u64 left = 0;        // a: this row's previous pixel (zero left of the image)
        u64 upper_left = 0;  // c: the previous step's b
        const u32 steps = rows + width - 1;
        for (u32 d = 0; d < steps; ++d) {
            const int p = (int)d - (int)t;
            if (has_row && p >= 0 && p < (int)width) {
                u64 up = 0;  // b: zero above the first row
                if (r > 0) up = t > 0 ? handoff[(d - 1) & 1][t - 1] : load_pixel<BPP>(above + (u64)p * BPP);
                const u64 value = reconstruct_pixel<BPP>(filter, load_pixel<BPP>(raw + (u64)p * BPP), left, up, upper_left);
                store_pixel<BPP>(out + (u64)p * BPP, value);
                handoff[d & 1][t] = value;  // read by thread t+1 at step d+1
                left = value;
                upper_left = up;
            }
            __syncthreads();  // uniform: every thread runs the same number of steps
        }
    }
}

extern "C" __global__ void __launch_bounds__(UNFILTER_MAX_THREADS)
png_unfilter(const UnfilterJob* __restrict__ jobs, const u8* filtered, u8* unfiltered, u32* __restrict__ status,
             u32 n_jobs) {
    __shared__ u64 handoff[2][UNFILTER_MAX_THREADS];
    const u32 i = blockIdx.x;
    if (i >= n_jobs) return;
    const UnfilterJob job = jobs[i];
    const bool shape_ok = job.filter_stride >= 1 && job.row_bytes % job.filter_stride == 0 && job.height > 0
                          && job.row_bytes > 0 && blockDim.x <= UNFILTER_MAX_THREADS;
    if (!shape_ok) {
        if (threadIdx.x == 0) atomicOr(&status[i], UNFILTER_BAD_JOB);
        return;
    }
    switch (job.filter_stride) {  // the strides PNG has: 8/16-bit grey, GA, RGB, RGBA (and sub-byte = 1)
        case 1: unfilter_wavefront<1>(job, filtered, unfiltered, handoff, &status[i]); break;
        case 2: unfilter_wavefront<2>(job, filtered, unfiltered, handoff, &status[i]); break;
        case 3: unfilter_wavefront<3>(job, filtered, unfiltered, handoff, &status[i]); break;
        case 4: unfilter_wavefront<4>(job, filtered, unfiltered, handoff, &status[i]); break;
        case 6: unfilter_wavefront<6>(job, filtered, unfiltered, handoff, &status[i]); break;
        case 8: unfilter_wavefront<8>(job, filtered, unfiltered, handoff, &status[i]); break;
        default:
            if (threadIdx.x == 0) atomicOr(&status[i], UNFILTER_BAD_JOB);
    }
}
