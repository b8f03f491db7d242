// Statistics kernels for AVX2 CPUs (with FMA and F16C), chosen at run time (see ops_cpu.cpp). Explicit 8-lane
// vectors (vec256.h) running the same operations in the same order as the other instruction sets: the same bits.
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c,prfchw")
#define MINIGPT_ISA avx2
#define MINIGPT_FMA
#define MINIGPT_AVX2
#include "kernels_impl.h"
#endif
