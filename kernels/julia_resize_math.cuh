// The IWS preprocessing arithmetic per output pixel, bit for bit as engine/preprocess.py (the NumPy reference)
// computes it for resize="julia-imresize-linear", order="resize-then-grey", grey="rec601-fixedpoint":
//
//   per colour channel:  unit = code / peak                                   (float64, exact for codes <= 65535)
//                        row  = cw0 * unit(x0) + cw1 * unit(x1)               (two rounded products, one rounded sum)
//                        v    = rw0 * row(y0) + rw1 * row(y1)                 (columns first, then rows)
//                        code = rint(v * peak)                                (half to even)
//   grey:   1 colour channel -> code;  3 -> rint(float32(0.001) * float32(299 R + 587 G + 114 B))
//   output: (float32(grey) / float32(peak) - mean) / std                      (float32)
//
// Shared by kernels/grey_resize.cu (GPU) and the native CPU decoder (kernels/cpu_decode.cpp). Every step is one
// correctly rounded IEEE-754 operation: on the device the _rn intrinsics (never contracted into FMAs), on the host
// plain operators compiled with -ffp-contract=off (CMakeLists.txt) and SSE2 arithmetic (no x87 excess precision).
// No includes under NVRTC (it has no system headers); rint/rintf are its built-ins.
#ifndef IWS_JULIA_RESIZE_MATH_CUH
#define IWS_JULIA_RESIZE_MATH_CUH

#include "iws_hd.cuh"

#if !defined(__CUDACC_RTC__) && !defined(__CUDACC__)
#include <math.h>
#endif

IWS_HD IWS_INLINE double iws_code_to_unit(unsigned code, double peak) {
#if defined(__CUDA_ARCH__)
    return __ddiv_rn((double)code, peak);
#else
    return (double)code / peak;
#endif
}

// w0*a + w1*b as NumPy evaluates it: two rounded products, one rounded sum.
IWS_HD IWS_INLINE double iws_two_tap(double w0, double a, double w1, double b) {
#if defined(__CUDA_ARCH__)
    return __dadd_rn(__dmul_rn(w0, a), __dmul_rn(w1, b));
#else
    const double p = w0 * a;
    const double q = w1 * b;
    return p + q;
#endif
}

// The interpolated value back to a fixed-point code (N0f8/N0f16 conversion: round half to even).
IWS_HD IWS_INLINE unsigned iws_unit_to_code(double v, double peak) {
#if defined(__CUDA_ARCH__)
    return (unsigned)rint(__dmul_rn(v, peak));
#else
    return (unsigned)rint(v * peak);
#endif
}

// One colour channel of the resized image from its 2x2 source codes a b (row y0) / c d (row y1).
IWS_HD IWS_INLINE unsigned iws_resized_code(unsigned a, unsigned b, unsigned c, unsigned d, double peak, double cw0,
                                            double cw1, double rw0, double rw1) {
    const double top = iws_two_tap(cw0, iws_code_to_unit(a, peak), cw1, iws_code_to_unit(b, peak));  // along the row...
    const double bottom = iws_two_tap(cw0, iws_code_to_unit(c, peak), cw1, iws_code_to_unit(d, peak));
    return iws_unit_to_code(iws_two_tap(rw0, top, rw1, bottom), peak);  // ...then along the column
}

// Colors.jl Gray of fixed-point RGB codes: integer Rec.601 luma (<= 65,535,000: fits 32 bits), float32 scale.
IWS_HD IWS_INLINE unsigned iws_luma_grey(unsigned red, unsigned green, unsigned blue, float luma_scale) {
    const unsigned luma = 299u * red + 587u * green + 114u * blue;
#if defined(__CUDA_ARCH__)
    return (unsigned)rintf(__fmul_rn(luma_scale, __uint2float_rn(luma)));
#else
    const float scaled = luma_scale * (float)luma;
    return (unsigned)rintf(scaled);
#endif
}

// The model input value of a grey code: (grey / peak - mean) / std in float32.
IWS_HD IWS_INLINE float iws_normalise(unsigned grey, unsigned peak_code, float mean, float std_dev) {
#if defined(__CUDA_ARCH__)
    const float scaled = __fdiv_rn((float)grey, (float)peak_code);
    return __fdiv_rn(__fsub_rn(scaled, mean), std_dev);
#else
    const float scaled = (float)grey / (float)peak_code;
    const float centred = scaled - mean;
    return centred / std_dev;
#endif
}

#endif  // IWS_JULIA_RESIZE_MATH_CUH
