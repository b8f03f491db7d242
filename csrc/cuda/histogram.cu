// token_histogram on CUDA: per-block shared-memory histograms flushed with one global atomic per non-zero bin
// when the vocabulary fits in shared memory, global 64-bit atomics otherwise.
#include <algorithm>

#include "launchers.h"

namespace minigpt::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kIdsPerBlock = 16 * kThreads;  // a block's ids must outweigh zeroing and flushing its bins

// ids outside [0, V) are never counted: no host synchronisation per call; calibration finds the shortfall in Σ counts
// at its checkpoints
template <class I>
__device__ __forceinline__ bool counted(const I* ids, const bool* mask, int64_t i, int64_t V) {
  return (mask == nullptr || mask[i]) && ids[i] >= 0 && ids[i] < V;
}

template <class I>
__global__ void histogram_shared_kernel(const I* ids, const bool* mask, int64_t n, int64_t* counts, int64_t V) {
  extern __shared__ unsigned int bins[];
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) bins[v] = 0;
  __syncthreads();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    if (counted(ids, mask, i, V)) atomicAdd(bins + ids[i], 1u);
  }
  __syncthreads();
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    if (bins[v] != 0) atomicAdd(reinterpret_cast<unsigned long long*>(counts + v), (unsigned long long)bins[v]);
  }
}

template <class I>
__global__ void histogram_global_kernel(const I* ids, const bool* mask, int64_t n, int64_t* counts, int64_t V) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    if (counted(ids, mask, i, V)) atomicAdd(reinterpret_cast<unsigned long long*>(counts + ids[i]), 1ull);
  }
}

unsigned grid_for(int64_t n, int64_t max_blocks) {
  return unsigned(std::max<int64_t>(1, std::min(max_blocks, (n + kIdsPerBlock - 1) / kIdsPerBlock)));
}

template <class I>
cudaError_t histogram(const I* ids, const bool* mask, int64_t n, int64_t* counts, int64_t V, int smem_bytes,
                      int num_sms, cudaStream_t stream) {
  const int64_t bytes = V * int64_t(sizeof(unsigned int));
  if (bytes <= smem_bytes) {
    cudaError_t err = cudaFuncSetAttribute(histogram_shared_kernel<I>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           int(bytes));
    if (err != cudaSuccess) return err;
    histogram_shared_kernel<I><<<grid_for(n, 2 * int64_t(num_sms)), kThreads, size_t(bytes), stream>>>(
        ids, mask, n, counts, V);
  } else {
    histogram_global_kernel<I><<<grid_for(n, 32 * int64_t(num_sms)), kThreads, 0, stream>>>(ids, mask, n, counts, V);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_histogram(const void* ids, bool ids64, const bool* mask, int64_t n, int64_t* counts, int64_t V,
                             int smem_bytes, int num_sms, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return ids64 ? histogram(static_cast<const int64_t*>(ids), mask, n, counts, V, smem_bytes, num_sms, stream)
               : histogram(static_cast<const int32_t*>(ids), mask, n, counts, V, smem_bytes, num_sms, stream);
}

}  // namespace minigpt::cuda
