// gather on CUDA: one grid-stride copy per (source, index) pair, moving whole elements as unsigned words of the
// element's size, so every dtype is copied bit for bit.
#include <algorithm>

#include "launchers.h"

namespace minigpt::cuda {
namespace {

constexpr int kThreads = 256;

struct alignas(16) Bytes16 {
  unsigned long long lo, hi;
};

template <class E, class I>
__global__ void gather_kernel(const E* src, int64_t s0, int64_t s1, const I* idx, int64_t dim, E* out, int64_t rows,
                              int64_t cols) {
  const int64_t n = rows * cols;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    out[i] = dim == 0 ? src[int64_t(idx[r]) * s0 + c * s1] : src[r * s0 + int64_t(idx[c]) * s1];
  }
}

template <class E, class I>
cudaError_t gather(const void* src, int64_t s0, int64_t s1, const void* idx, int64_t dim, void* out, int64_t rows,
                   int64_t cols, cudaStream_t stream) {
  const int64_t n = rows * cols;
  const unsigned grid = unsigned(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
  gather_kernel<E, I><<<grid, kThreads, 0, stream>>>(static_cast<const E*>(src), s0, s1, static_cast<const I*>(idx),
                                                     dim, static_cast<E*>(out), rows, cols);
  return cudaGetLastError();
}

template <class I>
cudaError_t by_size(const void* src, int64_t s0, int64_t s1, const void* idx, int64_t dim, void* out, int64_t rows,
                    int64_t cols, int64_t elem_size, cudaStream_t stream) {
  switch (elem_size) {
    case 1:
      return gather<unsigned char, I>(src, s0, s1, idx, dim, out, rows, cols, stream);
    case 2:
      return gather<unsigned short, I>(src, s0, s1, idx, dim, out, rows, cols, stream);
    case 4:
      return gather<unsigned int, I>(src, s0, s1, idx, dim, out, rows, cols, stream);
    case 8:
      return gather<unsigned long long, I>(src, s0, s1, idx, dim, out, rows, cols, stream);
    case 16:
      return gather<Bytes16, I>(src, s0, s1, idx, dim, out, rows, cols, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_gather(const void* src, int64_t s0, int64_t s1, const void* idx, bool idx64, int64_t dim,
                          void* out, int64_t rows, int64_t cols, int64_t elem_size, cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  return idx64 ? by_size<int64_t>(src, s0, s1, idx, dim, out, rows, cols, elem_size, stream)
               : by_size<int32_t>(src, s0, s1, idx, dim, out, rows, cols, elem_size, stream);
}

}  // namespace minigpt::cuda
