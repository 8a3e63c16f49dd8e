// Unfiltered PNG scanlines -> the model's input, bit for bit as engine/preprocess.py computes it
// for resize="julia-imresize-linear", order="resize-then-grey", grey="rec601-fixedpoint"
// (the per-pixel arithmetic is julia_resize_math.cuh, shared with the native CPU decoder):
//
//   per colour channel (alpha is dropped first):  v = rw0*(cw0*A/peak + cw1*B/peak) + rw1*(cw0*C/peak + cw1*D/peak)
//                                                 code = rint(v * peak)              (float64, half-to-even)
//   grey:   1 colour channel -> code;  3 -> rint(float32(0.001) * float32(299 R + 587 G + 114 B))
//   output: (float32(grey) / peak - mean) / std   (float32), stored as fp32 or fp16 (round to nearest even)
//
// The tap tables (i0, i1, w0, w1 per output row and column) are *inputs*: the host builds them with
// preprocess.imresize_axis_weights, the same function the CPU reference uses, so both sides share
// one definition of Julia's pixel-centre coordinates, clamping and edge handling.
//
// Exactness argument: every floating-point step is one IEEE-754 operation, correctly rounded, in
// the order NumPy evaluates the reference: the division code/peak, the two products and their sum
// along the row (columns first), then the same along the column, the product by peak, rint. The
// operations are written with the _rn intrinsics (__ddiv_rn, __dmul_rn, __dadd_rn, __fmul_rn,
// __fsub_rn, __fdiv_rn), which the compiler never contracts into fused multiply-adds; the file is
// also compiled with --fmad=false (NVRTC option in the loader, per-file COMPILE_OPTIONS in
// CMakeLists.txt) so no later edit can silently introduce an FMA. NumPy never fuses either. Integer
// -> float conversions are exact (codes <= 65535) or round to nearest even on both sides (the
// 32-bit luma sum, up to 65,535,000, like NumPy's int64 -> float32 cast). fp16 output uses
// cvt.rn.f16.f32, the same rounding as NumPy's astype(float16) (subnormal halves included).
// Subnormal floats: CuPy compiles with -ftz=true (float32 only; doubles are never flushed), yet no
// float32 value here is subnormal: luma_scale * luma is 0 or >= 0.001, grey / peak is 0 or
// >= 1/65535, their difference with a normal (or zero) mean is 0 or >= 2^-40, and divided by
// std < 2^86 it stays normal. The loader refuses a spec outside those bounds.
//
// Mapping: grid.y = image, grid.x * blockDim.x covers the output pixels of that image; one
// thread per output pixel reads its 2x2 source pixels (each colour channel, 8- or 16-bit samples
// stored big-endian) and writes one value to out[out_index][y][x] (NCHW with C = 1).

#include "julia_resize_math.cuh"

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

struct ResizeJob {
    u64 src_offset;       // byte offset of row 0's first sample in `pixels` (unfiltered scanlines)
    u32 src_pitch;        // bytes from one source row to the next
    u32 pixel_bytes;      // bytes per stored pixel, alpha included
    u32 sample_bytes;     // 1 (8-bit) or 2 (16-bit, big-endian)
    u32 colour_channels;  // 1 (grey, grey+alpha) or 3 (RGB, RGBA): the channels that reach grey
    u32 col_taps;         // offset of this image's column tap table (out_width entries)
    u32 row_taps;         // offset of its row tap table (out_height entries)
    u32 out_index;        // image index in the output batch
    u32 reserved;
};
static_assert(sizeof(ResizeJob) == 40, "ResizeJob layout is mirrored by RESIZE_JOB in engine/loaders/gpu.py");

__device__ __forceinline__ u32 load_sample(const u8* p, u32 sample_bytes) {
    return sample_bytes == 2 ? ((u32)p[0] << 8) | (u32)p[1] : (u32)p[0];
}

// One colour channel of the resized image, as a fixed-point code (preprocess.julia_imresize).
__device__ __forceinline__ u32 resized_code(const u8* row0, const u8* row1, u32 x0, u32 x1, u32 channel_byte,
                                            u32 sample_bytes, double peak, double cw0, double cw1, double rw0,
                                            double rw1, u32 pixel_bytes) {
    return iws_resized_code(load_sample(row0 + x0 * pixel_bytes + channel_byte, sample_bytes),
                            load_sample(row0 + x1 * pixel_bytes + channel_byte, sample_bytes),
                            load_sample(row1 + x0 * pixel_bytes + channel_byte, sample_bytes),
                            load_sample(row1 + x1 * pixel_bytes + channel_byte, sample_bytes), peak, cw0, cw1, rw0,
                            rw1);
}

__device__ __forceinline__ u16 float_to_half_bits(float v) {
    u16 bits;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(v));
    return bits;
}

extern "C" __global__ void grey_resize_normalise(
    const ResizeJob* __restrict__ jobs, u32 n_jobs, const u8* __restrict__ pixels,
    const int* __restrict__ tap_i0, const int* __restrict__ tap_i1,
    const double* __restrict__ tap_w0, const double* __restrict__ tap_w1,
    void* __restrict__ out, int out_fp16, u32 out_height, u32 out_width,
    float mean, float std_dev, float luma_scale) {
    const u32 image = blockIdx.y;
    const u32 pixel = blockIdx.x * blockDim.x + threadIdx.x;
    if (image >= n_jobs || pixel >= out_height * out_width) return;
    const ResizeJob job = jobs[image];
    const u32 y = pixel / out_width;
    const u32 x = pixel % out_width;

    const u32 col = job.col_taps + x;
    const u32 row = job.row_taps + y;
    const u32 x0 = (u32)tap_i0[col], x1 = (u32)tap_i1[col];
    const double cw0 = tap_w0[col], cw1 = tap_w1[col];
    const double rw0 = tap_w0[row], rw1 = tap_w1[row];
    const u8* row0 = pixels + job.src_offset + (u64)tap_i0[row] * job.src_pitch;
    const u8* row1 = pixels + job.src_offset + (u64)tap_i1[row] * job.src_pitch;
    const u32 peak_code = job.sample_bytes == 2 ? 65535u : 255u;
    const double peak = (double)peak_code;

    u32 grey;
    if (job.colour_channels == 1) {
        grey = resized_code(row0, row1, x0, x1, 0, job.sample_bytes, peak, cw0, cw1, rw0, rw1, job.pixel_bytes);
    } else {
        const u32 red = resized_code(row0, row1, x0, x1, 0, job.sample_bytes, peak, cw0, cw1, rw0, rw1, job.pixel_bytes);
        const u32 green = resized_code(row0, row1, x0, x1, job.sample_bytes, job.sample_bytes, peak, cw0, cw1, rw0, rw1,
                                       job.pixel_bytes);
        const u32 blue = resized_code(row0, row1, x0, x1, 2 * job.sample_bytes, job.sample_bytes, peak, cw0, cw1, rw0,
                                      rw1, job.pixel_bytes);
        grey = iws_luma_grey(red, green, blue, luma_scale);
    }
    const float value = iws_normalise(grey, peak_code, mean, std_dev);

    const u64 index = ((u64)job.out_index * out_height + y) * out_width + x;
    if (out_fp16) {
        ((u16*)out)[index] = float_to_half_bits(value);
    } else {
        ((float*)out)[index] = value;
    }
}
