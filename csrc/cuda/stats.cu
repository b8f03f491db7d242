// act_stats / column_stats on CUDA: a (32 columns x 8 token lanes) block walks a slice of tokens, reduces its lanes
// in shared memory in a fixed order and writes one partial per column and slice; the caller folds the slices in a
// fixed order (common.h fold_partials), so no float atomics and the same bits on every run.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "launchers.h"

namespace minigpt::cuda {
namespace {

constexpr int kCols = 32, kLanes = 8;
constexpr int64_t kTargetBlocks = 1024;  // enough blocks to fill any current GPU
constexpr int64_t kMinRowsPerBlock = 64;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Same formulas as the CPU kernels (cpu/kernels_impl.h), with CUDA's accurate expf/erfcf.
template <Act A>
__device__ __forceinline__ float activate(float x) {
  if constexpr (A == Act::silu) {
    return x / (1.0f + expf(-x));
  } else if constexpr (A == Act::gelu_tanh) {
    const float y = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    return x / (1.0f + expf(-2.0f * y));
  } else if constexpr (A == Act::gelu) {
    return 0.5f * x * erfcf(-0.7071067811865476f * x);
  } else if constexpr (A == Act::relu) {
    return x < 0.0f ? 0.0f : x;
  } else {
    return x;
  }
}

__device__ __forceinline__ float nan_max(float a, float b) { return (b > a || isnan(b)) ? b : a; }

// x is a number other than ±0, decided on its bits (exact even where subnormals would be flushed to zero).
__device__ __forceinline__ bool is_number_nonzero(float x) {
  const unsigned magnitude = __float_as_uint(x) & 0x7FFFFFFFu;
  return magnitude != 0 && magnitude <= 0x7F800000u;
}

// minigpt.reference.active_ref on the gate (and up): gate >= active_min and not ±0; up a non-zero number.
__device__ __forceinline__ bool is_active(float g, float active_min) {
  return g >= active_min && (__float_as_uint(g) & 0x7FFFFFFFu) != 0;
}

// part: (gridDim.y, 3, N) fp32 and part_nnz: (gridDim.y, N) int64, one row per token slice.
template <class T, Act A, bool kGated, bool kOut>
__global__ void stats_kernel(StatsArgs a, int64_t rows_per_block, float* part, int64_t* part_nnz) {
  const int64_t col = int64_t(blockIdx.x) * kCols + threadIdx.x;
  const int64_t t_begin = int64_t(blockIdx.y) * rows_per_block;
  const int64_t t_end = min(a.T, t_begin + rows_per_block);
  float s1 = 0.0f, s2 = 0.0f, mx = 0.0f;
  unsigned long long nz = 0;
  if (col < a.N) {
    const T* gate = static_cast<const T*>(a.gate);
    const T* up = static_cast<const T*>(a.up);
    for (int64_t t = t_begin + threadIdx.y; t < t_end; t += kLanes) {
      const int64_t i = t * a.N + col;
      const float x = to_float(gate[i]);
      float h = activate<A>(x);
      bool active = is_active(x, a.active_min);
      if constexpr (kGated) {
        const float y = to_float(up[i]);
        h *= y;
        active = active && is_number_nonzero(y);
      }
      if constexpr (kOut) static_cast<T*>(a.out)[i] = from_float<T>(h);
      s1 += fabsf(h);
      s2 += h * h;
      mx = nan_max(mx, fabsf(h));
      nz += active;
    }
  }
  __shared__ float sh[3][kLanes][kCols];
  __shared__ unsigned long long shnz[kLanes][kCols];
  sh[0][threadIdx.y][threadIdx.x] = s1;
  sh[1][threadIdx.y][threadIdx.x] = s2;
  sh[2][threadIdx.y][threadIdx.x] = mx;
  shnz[threadIdx.y][threadIdx.x] = nz;
  __syncthreads();
  if (threadIdx.y != 0 || col >= a.N) return;
  for (int l = 1; l < kLanes; ++l) {
    s1 += sh[0][l][threadIdx.x];
    s2 += sh[1][l][threadIdx.x];
    mx = nan_max(mx, sh[2][l][threadIdx.x]);
    nz += shnz[l][threadIdx.x];
  }
  float* p = part + int64_t(blockIdx.y) * 3 * a.N + col;
  p[0] = s1;
  p[a.N] = s2;
  p[2 * a.N] = mx;
  part_nnz[int64_t(blockIdx.y) * a.N + col] = int64_t(nz);
}

struct Partials {
  float* part;
  int64_t* part_nnz;
};

template <class T, Act A, bool kGated, bool kOut>
cudaError_t launch(const StatsArgs& a, Partials p, cudaStream_t stream) {
  const int64_t col_blocks = (a.N + kCols - 1) / kCols;
  const int64_t splits = stats_slices(a.T, a.N);
  const int64_t rows_per_block = (a.T + splits - 1) / splits;
  stats_kernel<T, A, kGated, kOut><<<dim3(unsigned(col_blocks), unsigned(splits)), dim3(kCols, kLanes), 0, stream>>>(
      a, rows_per_block, p.part, p.part_nnz);
  return cudaGetLastError();
}

template <class T, Act A>
cudaError_t by_gate(const StatsArgs& a, Partials p, cudaStream_t stream) {
  return a.up ? launch<T, A, true, true>(a, p, stream) : launch<T, A, false, true>(a, p, stream);
}

template <class T>
cudaError_t by_act(const StatsArgs& a, Partials p, cudaStream_t stream) {
  if (!a.out) return launch<T, Act::identity, false, false>(a, p, stream);  // column_stats
  switch (a.act) {
    case Act::silu:
      return by_gate<T, Act::silu>(a, p, stream);
    case Act::gelu_tanh:
      return by_gate<T, Act::gelu_tanh>(a, p, stream);
    case Act::gelu:
      return by_gate<T, Act::gelu>(a, p, stream);
    case Act::relu:
      return by_gate<T, Act::relu>(a, p, stream);
    case Act::identity:
      return by_gate<T, Act::identity>(a, p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int64_t stats_slices(int64_t T, int64_t N) {
  const int64_t col_blocks = std::max<int64_t>(1, (N + kCols - 1) / kCols);
  const int64_t max_splits = (T + kMinRowsPerBlock - 1) / kMinRowsPerBlock;
  return std::max<int64_t>(1, std::min(max_splits, (kTargetBlocks + col_blocks - 1) / col_blocks));
}

cudaError_t launch_stats(const StatsArgs& a, float* part, int64_t* part_nnz, cudaStream_t stream) {
  if (a.T == 0 || a.N == 0) return cudaSuccess;
  const Partials p{part, part_nnz};
  switch (a.dtype) {
    case DType::f32:
      return by_act<float>(a, p, stream);
    case DType::f16:
      return by_act<__half>(a, p, stream);
    case DType::bf16:
      return by_act<__nv_bfloat16>(a, p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace minigpt::cuda
