// Plain-pointer launchers of the CUDA kernels (stats.cu, histogram.cu, gather.cu). No torch headers, so the .cu
// files compile with nvcc alone (tests/test_cuda_sources.py); ops_cuda.cpp holds the torch glue.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../kernel_args.h"

namespace minigpt::cuda {

// Number of token slices launch_stats splits (T, N) rows into.
int64_t stats_slices(int64_t T, int64_t N);

// act_stats / column_stats (see StatsArgs; acc and nnz are not touched): each slice's statistics go to
// part (slices, 3, N) fp32 and part_nnz (slices, N) int64, for a fixed-order fold by the caller.
cudaError_t launch_stats(const StatsArgs& a, float* part, int64_t* part_nnz, cudaStream_t stream);

// counts (V,) int64 += counts of ids in [0, V) where mask (ids outside are not counted); per-block shared-memory histograms when V * 4 bytes fit in
// smem_bytes (the device's opt-in shared memory per block), global atomics otherwise.
cudaError_t launch_histogram(const void* ids, bool ids64, const bool* mask, int64_t n, int64_t* counts, int64_t V,
                             int smem_bytes, int num_sms, cudaStream_t stream);

// out (rows, cols) contiguous = src (element strides s0, s1) indexed by idx along dim (0: rows, 1: columns);
// elem_size in {1, 2, 4, 8, 16} bytes. Returns cudaErrorInvalidValue for other sizes.
cudaError_t launch_gather(const void* src, int64_t s0, int64_t s1, const void* idx, bool idx64, int64_t dim,
                          void* out, int64_t rows, int64_t cols, int64_t elem_size, cudaStream_t stream);

}  // namespace minigpt::cuda
