// Argument checks and conversions shared by the CPU and CUDA torch glue.
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <optional>
#include <string_view>
#include <vector>

#include "kernel_args.h"

namespace minigpt {

inline Act parse_act(std::string_view act) {
  if (act == "silu") return Act::silu;
  if (act == "gelu_tanh") return Act::gelu_tanh;
  if (act == "gelu") return Act::gelu;
  if (act == "relu") return Act::relu;
  if (act == "identity") return Act::identity;
  TORCH_CHECK(false, "minigpt: unknown activation '", act, "'; expected one of silu, gelu_tanh, gelu, relu, identity");
}

inline DType stats_dtype(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return DType::f32;
    case at::kHalf:
      return DType::f16;
    case at::kBFloat16:
      return DType::bf16;
    default:
      TORCH_CHECK(false, "minigpt: statistics take float32, float16 or bfloat16 inputs, got ", x.scalar_type());
  }
}

// x (..., N) as contiguous (T, N) rows.
inline at::Tensor as_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, "minigpt: expected a tensor of shape (..., N), got a scalar");
  return (x.dim() == 1 ? x.unsqueeze(0) : x.flatten(0, -2)).contiguous();
}

// acc (3, N) += the partial statistics of P row slices, part (P, 3, N); nnz (N,) += part_nnz (P, N). A fixed-order
// reduction (no float atomics): the same inputs give the same bits on every run. NaN maxima propagate.
inline void fold_partials(at::Tensor& acc, at::Tensor& nnz, const at::Tensor& part, const at::Tensor& part_nnz) {
  acc.narrow(0, 0, 2).add_(part.narrow(1, 0, 2).sum(0));
  at::Tensor max_abs = acc[2];
  at::maximum_out(max_abs, max_abs, part.select(1, 2).amax(0));
  nnz.add_(part_nnz.sum(0));
}

// Validates acc (3, N) fp32 and nnz (N,) int64 for rows x (T, N) and returns the kernel arguments.
inline StatsArgs stats_args(const at::Tensor& x, const at::Tensor& acc, const at::Tensor& nnz) {
  const int64_t N = x.size(1);
  TORCH_CHECK(acc.scalar_type() == at::kFloat && acc.dim() == 2 && acc.size(0) == 3 && acc.size(1) == N &&
                  acc.is_contiguous(),
              "minigpt: acc must be a contiguous float32 tensor of shape (3, ", N, "), got ", acc.scalar_type(), " ",
              acc.sizes());
  TORCH_CHECK(nnz.scalar_type() == at::kLong && nnz.dim() == 1 && nnz.size(0) == N && nnz.is_contiguous(),
              "minigpt: nnz must be a contiguous int64 tensor of shape (", N, ",), got ", nnz.scalar_type(), " ",
              nnz.sizes());
  TORCH_CHECK(acc.device() == x.device() && nnz.device() == x.device(), "minigpt: acc and nnz must be on ",
              x.device());
  return {x.const_data_ptr(), nullptr, nullptr, acc.data_ptr<float>(), nnz.data_ptr<int64_t>(), x.size(0), N,
          stats_dtype(x), Act::identity, -std::numeric_limits<float>::infinity()};
}

// act_stats: h's kernel arguments (h allocated like gate, returned through *out).
inline StatsArgs act_stats_args(const at::Tensor& gate, const at::Tensor& gate_rows,
                                const std::optional<at::Tensor>& up_rows, std::string_view act, double active_min,
                                const at::Tensor& acc, const at::Tensor& nnz, at::Tensor* out) {
  StatsArgs a = stats_args(gate_rows, acc, nnz);
  a.act = parse_act(act);
  a.active_min = float(active_min);
  if (up_rows) {
    TORCH_CHECK(up_rows->sizes() == gate_rows.sizes() && up_rows->scalar_type() == gate.scalar_type() &&
                    up_rows->device() == gate.device(),
                "minigpt: up must match gate in shape, dtype and device");
    a.up = up_rows->const_data_ptr();
  }
  *out = at::empty(gate.sizes(), gate.options());
  a.out = out->data_ptr();
  return a;
}

// ids (any shape, int32/int64), mask (same numel, any dtype, or None) and counts (V,) int64; returns mask as bool.
inline std::optional<at::Tensor> check_histogram(const at::Tensor& ids, const std::optional<at::Tensor>& mask,
                                                 const at::Tensor& counts) {
  TORCH_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong,
              "minigpt: token_histogram takes int32 or int64 ids, got ", ids.scalar_type());
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.dim() == 1 && counts.is_contiguous() &&
                  counts.device() == ids.device(),
              "minigpt: counts must be a contiguous int64 (V,) tensor on ", ids.device());
  if (!mask) return std::nullopt;
  TORCH_CHECK(mask->numel() == ids.numel() && mask->device() == ids.device(),
              "minigpt: mask must have as many elements as ids and sit on the same device");
  return mask->to(at::kBool).contiguous();
}

// gather: one 2-D source, 1-D int index (moved to src's device) with values in [0, src.size(dim)), dim in {0, 1}.
// The range is checked where the index lives on the CPU (no device synchronisation); an index already on a GPU is
// the caller's to check (minigpt.ops.gather checks on the host).
inline at::Tensor check_gather(const at::Tensor& src, const at::Tensor& index, int64_t dim) {
  TORCH_CHECK(dim == 0 || dim == 1, "minigpt: gather dims must be 0 or 1, got ", dim);
  TORCH_CHECK(src.dim() == 2, "minigpt: gather takes 2-D sources, got ", src.sizes());
  TORCH_CHECK(index.dim() == 1 && (index.scalar_type() == at::kInt || index.scalar_type() == at::kLong),
              "minigpt: gather indices must be 1-D int32/int64, got ", index.scalar_type(), " ", index.sizes());
  if (index.is_cpu() && index.numel() > 0) {
    const auto [lo, hi] = at::aminmax(index);
    const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
    TORCH_CHECK(lo_v >= 0 && hi_v < src.size(dim), "minigpt: gather index out of range [0, ", src.size(dim),
                ") along dim ", dim, ": min ", lo_v, ", max ", hi_v);
  }
  return index.to(src.device()).contiguous();
}

// index.numel() rows (dim 0) or columns (dim 1) of src as a new contiguous tensor.
inline at::Tensor gather_output(const at::Tensor& src, const at::Tensor& index, int64_t dim) {
  auto sizes = src.sizes().vec();
  sizes[dim] = index.numel();
  return at::empty(sizes, src.options());
}

// The gather op over many sources: checks each (src, index, dim), allocates its output and, unless empty, has
// fill(src, idx, dim, out) copy the kept rows/columns (idx: index on src's device, contiguous).
template <class Fill>
std::vector<at::Tensor> gather_all(at::TensorList srcs, at::TensorList indices, at::IntArrayRef dims, Fill fill) {
  TORCH_CHECK(srcs.size() == indices.size() && srcs.size() == dims.size(),
              "minigpt: gather needs as many indices and dims as sources");
  std::vector<at::Tensor> outs;
  outs.reserve(srcs.size());
  for (size_t i = 0; i < srcs.size(); ++i) {
    const at::Tensor idx = check_gather(srcs[i], indices[i], dims[i]);
    at::Tensor out = gather_output(srcs[i], idx, dims[i]);
    if (out.numel() > 0) fill(srcs[i], idx, dims[i], out);
    outs.push_back(std::move(out));
  }
  return outs;
}

}  // namespace minigpt
