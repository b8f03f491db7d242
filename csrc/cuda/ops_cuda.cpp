// CUDA implementations of the minigpt ops: torch glue around the plain-pointer launchers (compiled WITH_CUDA only).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common.h"
#include "launchers.h"

namespace minigpt::cuda {
namespace {

// Per-slice partial statistics into scratch, folded into acc/nnz in a fixed order: deterministic.
void run_stats(const StatsArgs& a, at::Tensor& acc, at::Tensor& nnz) {
  if (a.T == 0 || a.N == 0) return;
  const int64_t slices = stats_slices(a.T, a.N);
  at::Tensor part = at::empty({slices, 3, a.N}, acc.options());
  at::Tensor part_nnz = at::empty({slices, a.N}, nnz.options());
  C10_CUDA_CHECK(launch_stats(a, part.data_ptr<float>(), part_nnz.data_ptr<int64_t>(),
                              c10::cuda::getCurrentCUDAStream()));
  fold_partials(acc, nnz, part, part_nnz);
}

at::Tensor act_stats(const at::Tensor& gate, const std::optional<at::Tensor>& up, c10::string_view act,
                     double active_min, at::Tensor& acc, at::Tensor& nnz) {
  const c10::cuda::CUDAGuard guard(gate.device());
  const at::Tensor g = as_rows(gate);
  const std::optional<at::Tensor> u = up ? std::optional(as_rows(*up)) : std::nullopt;
  at::Tensor out;
  run_stats(act_stats_args(gate, g, u, std::string_view(act.data(), act.size()), active_min, acc, nnz, &out), acc,
            nnz);
  return out;
}

void column_stats(const at::Tensor& x, at::Tensor& acc, at::Tensor& nnz) {
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor rows = as_rows(x);
  run_stats(stats_args(rows, acc, nnz), acc, nnz);
}

// No host synchronisation: ids outside [0, V) are not counted (see histogram.cu).
void token_histogram(const at::Tensor& ids, const std::optional<at::Tensor>& mask, at::Tensor& counts) {
  const c10::cuda::CUDAGuard guard(ids.device());
  const std::optional<at::Tensor> m = check_histogram(ids, mask, counts);
  const at::Tensor flat = ids.contiguous();
  const bool* mask_ptr = m ? m->const_data_ptr<bool>() : nullptr;
  const bool ids64 = flat.scalar_type() == at::kLong;
  const int64_t V = counts.numel();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int smem_bytes = 0, num_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, ids.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, ids.get_device()));
  C10_CUDA_CHECK(launch_histogram(flat.const_data_ptr(), ids64, mask_ptr, flat.numel(), counts.data_ptr<int64_t>(), V,
                                  smem_bytes, num_sms, stream));
}

std::vector<at::Tensor> gather(at::TensorList srcs, at::TensorList indices, at::IntArrayRef dims) {
  return gather_all(srcs, indices, dims, [](const at::Tensor& src, const at::Tensor& idx, int64_t dim, at::Tensor& out) {
    const c10::cuda::CUDAGuard guard(src.device());
    C10_CUDA_CHECK(launch_gather(src.const_data_ptr(), src.stride(0), src.stride(1), idx.const_data_ptr(),
                                 idx.scalar_type() == at::kLong, dim, out.data_ptr(), out.size(0), out.size(1),
                                 src.element_size(), c10::cuda::getCurrentCUDAStream()));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(minigpt, CUDA, m) {
  m.impl("act_stats", &act_stats);
  m.impl("column_stats", &column_stats);
  m.impl("token_histogram", &token_histogram);
  m.impl("gather", &gather);
}

}  // namespace minigpt::cuda
