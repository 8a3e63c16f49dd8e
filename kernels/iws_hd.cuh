// IWS_HD / IWS_INLINE: one spelling for functions that run on the GPU (nvcc, NVRTC) and on the CPU (g++/clang++).
// Shared by kernels/png_filter_math.cuh and kernels/julia_resize_math.cuh; no includes, so NVRTC needs none.
#ifndef IWS_HD_CUH
#define IWS_HD_CUH

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define IWS_HD __host__ __device__
#define IWS_INLINE __forceinline__
#else
#define IWS_HD
#define IWS_INLINE inline
#endif

#endif  // IWS_HD_CUH
