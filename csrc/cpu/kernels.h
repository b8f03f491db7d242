// CPU statistics kernels, compiled once per instruction set (kernels_base.cpp, kernels_avx2.cpp, kernels_avx512.cpp,
// kernels_avx512bf16.cpp).
#pragma once

#include "../kernel_args.h"

namespace minigpt::cpu {

// Widest column block of a tile. Full rows up to this width (one contiguous stream per array, which the prefetchers
// follow); the per-column chunk accumulators (16 B a column) stay in L1/L2.
constexpr int64_t kBlock = 2048;

// Tokens summed in fp32 before the partial sums are folded into fp64 totals: keeps the fp32 rounding error
// of Σ|h| and Σh² near that of a pairwise sum while the hot loop stays fp32.
constexpr int64_t kChunk = 32;

// The statistics of one tile, stored (not added): Σ|h|, Σh² in fp64, max|h| (NaN skipped: a NaN h shows in s1),
// active count; each points at the tile's first column.
struct Partial {
  double* s1;
  double* s2;
  float* mx;
  int64_t* nz;
};

// h (written to a.out) and the statistics of rows [t0, t1) and columns [c0, c0 + nc) into p, nc <= kBlock.
// Rows are summed in a fixed order that depends on t0 and t1 only.
using StatsTileFn = void (*)(const StatsArgs& a, int64_t t0, int64_t t1, int64_t c0, int64_t nc, const Partial& p);

namespace base {
void stats_tile(const StatsArgs& a, int64_t t0, int64_t t1, int64_t c0, int64_t nc, const Partial& p);
}
#if defined(__x86_64__)
namespace avx2 {
void stats_tile(const StatsArgs& a, int64_t t0, int64_t t1, int64_t c0, int64_t nc, const Partial& p);
}
namespace avx512 {
void stats_tile(const StatsArgs& a, int64_t t0, int64_t t1, int64_t c0, int64_t nc, const Partial& p);
}
namespace avx512bf16 {
void stats_tile(const StatsArgs& a, int64_t t0, int64_t t1, int64_t c0, int64_t nc, const Partial& p);
}
#endif

}  // namespace minigpt::cpu
