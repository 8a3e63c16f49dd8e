// PNG filter reconstruction (filter method 0, PNG spec section 9) for one byte lane: the arithmetic that
// kernels/png_unfilter.cu (GPU) and the native CPU decoder (kernels/cpu_decode.cpp) both run, so the CPU tests
// check the GPU kernel's arithmetic. Plain C++ without includes (NVRTC has no system headers).
//
// x: the filtered byte; a: the same byte lane of the pixel to the left (0 left of the image); b: the byte above
// (0 above the first row); c: the byte above-left. All 0..255.
#ifndef IWS_PNG_FILTER_MATH_CUH
#define IWS_PNG_FILTER_MATH_CUH

#include "iws_hd.cuh"

#define IWS_FILTER_NONE 0u
#define IWS_FILTER_SUB 1u
#define IWS_FILTER_UP 2u
#define IWS_FILTER_AVERAGE 3u
#define IWS_FILTER_PAETH 4u

// PNG spec 9.4 with p = a + b - c, written without the intermediate p, and as selects rather than early returns
// so that compilers emit conditional moves (rows of noisy SAR data make the branches unpredictable).
// Written once for any signed integer type T with +, -, comparisons and ?: : int here, and in the CPU decoder
// (kernels/cpu_decode.cpp) also a GCC/Clang vector of int16 lanes, one per row and byte lane, where a comparison
// gives a lane mask and ?: selects per lane.
template <typename T>
IWS_HD IWS_INLINE T iws_paeth_select(T a, T b, T c) {
    T pa = b - c;
    T pb = a - c;
    T pc = a + b - 2 * c;
    pa = pa < 0 ? -pa : pa;
    pb = pb < 0 ? -pb : pb;
    pc = pc < 0 ? -pc : pc;
    const T b_or_c = pb <= pc ? b : c;
    return ((pa <= pb) & (pa <= pc)) ? a : b_or_c;  // & rather than &&: no short-circuit branch
}

IWS_HD IWS_INLINE unsigned iws_paeth_predictor(unsigned a, unsigned b, unsigned c) {
    return (unsigned)iws_paeth_select<int>((int)a, (int)b, (int)c);
}

// The predictor of filter type `filter` (the same for every lane of T); 0 for None and for invalid types (which
// the callers flag).
template <typename T>
IWS_HD IWS_INLINE T iws_filter_predict_t(unsigned filter, T a, T b, T c) {
    if (filter == IWS_FILTER_SUB) return a;
    if (filter == IWS_FILTER_UP) return b;
    if (filter == IWS_FILTER_AVERAGE) return (a + b) >> 1;
    if (filter == IWS_FILTER_PAETH) return iws_paeth_select(a, b, c);
    return a - a;  // 0 of type T
}

IWS_HD IWS_INLINE unsigned iws_filter_predict(unsigned filter, unsigned a, unsigned b, unsigned c) {
    return (unsigned)iws_filter_predict_t<int>(filter, (int)a, (int)b, (int)c);
}

// The reconstructed byte: (x + predictor) mod 256.
template <typename T>
IWS_HD IWS_INLINE T iws_unfilter_byte_t(unsigned filter, T x, T a, T b, T c) {
    return (x + iws_filter_predict_t(filter, a, b, c)) & 0xff;
}

IWS_HD IWS_INLINE unsigned iws_unfilter_byte(unsigned filter, unsigned x, unsigned a, unsigned b, unsigned c) {
    return (unsigned)iws_unfilter_byte_t<int>(filter, (int)x, (int)a, (int)b, (int)c);
}

#endif  // IWS_PNG_FILTER_MATH_CUH
