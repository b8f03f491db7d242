// The AVX-512 statistics kernels on CPUs with AVX512_BF16 (see ops_cpu.cpp): bf16 h rounded by vcvtneps2bf16, with
// the same bits as the integer rounding of the other instruction sets.
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,prfchw,prefer-vector-width=512")
#define MINIGPT_ISA avx512bf16
#define MINIGPT_FMA
#define MINIGPT_AVX512
#define MINIGPT_AVX512_BF16
#include "kernels_impl.h"
#endif
