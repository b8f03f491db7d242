// Statistics kernels for AVX2 CPUs, chosen at run time (see ops_cpu.cpp).
#if defined(__x86_64__)
#pragma GCC target("avx2,fma")
#define MINIGPT_ISA avx2
#define MINIGPT_FMA
#include "kernels_impl.h"
#endif
