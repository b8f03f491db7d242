// CPU statistics kernels, compiled once per instruction set (kernels_base.cpp, kernels_avx2.cpp).
#pragma once

#include "../kernel_args.h"

namespace minigpt::cpu {

// Widest column block one thread owns. Wide blocks keep long contiguous runs per row (the prefetchers stream them);
// the 44 KiB of per-column accumulators live on the thread's stack, in L1/L2.
constexpr int64_t kBlock = 1024;

// Statistics (and h) of columns [c0, c0 + nc) over all a.T rows, nc <= kBlock. One call per thread and block.
using StatsBlockFn = void (*)(const StatsArgs& a, int64_t c0, int64_t nc);

namespace base {
void stats_block(const StatsArgs& a, int64_t c0, int64_t nc);
}
#if defined(__x86_64__)
namespace avx2 {
void stats_block(const StatsArgs& a, int64_t c0, int64_t nc);
}
#endif

}  // namespace minigpt::cpu
