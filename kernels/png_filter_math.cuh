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
IWS_HD IWS_INLINE unsigned iws_paeth_predictor(unsigned a, unsigned b, unsigned c) {
    int pa = (int)b - (int)c;
    int pb = (int)a - (int)c;
    int pc = (int)a + (int)b - 2 * (int)c;
    pa = pa < 0 ? -pa : pa;
    pb = pb < 0 ? -pb : pb;
    pc = pc < 0 ? -pc : pc;
    const unsigned b_or_c = pb <= pc ? b : c;
    return ((pa <= pb) & (pa <= pc)) ? a : b_or_c;  // & rather than &&: no short-circuit branch
}

// The predictor of filter type `filter`; 0 for None and for invalid types (which the callers flag).
IWS_HD IWS_INLINE unsigned iws_filter_predict(unsigned filter, unsigned a, unsigned b, unsigned c) {
    if (filter == IWS_FILTER_SUB) return a;
    if (filter == IWS_FILTER_UP) return b;
    if (filter == IWS_FILTER_AVERAGE) return (a + b) >> 1;
    if (filter == IWS_FILTER_PAETH) return iws_paeth_predictor(a, b, c);
    return 0u;
}

// The reconstructed byte: (x + predictor) mod 256.
IWS_HD IWS_INLINE unsigned iws_unfilter_byte(unsigned filter, unsigned x, unsigned a, unsigned b, unsigned c) {
    return (x + iws_filter_predict(filter, a, b, c)) & 0xffu;
}

#endif  // IWS_PNG_FILTER_MATH_CUH
