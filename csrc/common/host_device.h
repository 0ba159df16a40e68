// Portability macros for code shared by the C++ CPU kernels and the CUDA kernels.
#pragma once
#if defined(__CUDACC__)
#define DSA_HD __host__ __device__ __forceinline__
#else
#define DSA_HD inline
#endif
