// Statistics kernels for AVX-512 CPUs (F, BW, VL, DQ), chosen at run time (see ops_cpu.cpp). 512-bit vectors and 32
// registers; the same operations in the same order as the other instruction sets, so the same bits.
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,prefer-vector-width=512")
#define MINIGPT_ISA avx512
#define MINIGPT_FMA
#include "kernels_impl.h"
#endif
