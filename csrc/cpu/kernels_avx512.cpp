// Statistics kernels for AVX-512 CPUs (F, BW, VL, DQ), chosen at run time (see ops_cpu.cpp). Explicit 16-lane
// vectors (vec512.h) running the same operations in the same order as the other instruction sets: the same bits.
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,prfchw,prefer-vector-width=512")
#define MINIGPT_ISA avx512
#define MINIGPT_FMA
#define MINIGPT_AVX512
#include "kernels_impl.h"
#endif
