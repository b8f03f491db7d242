// CPU implementations of the minigpt ops: OpenMP (at::parallel_for) over tiles of rows and columns (statistics),
// bins (histogram) or rows (gather); no atomics.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "../common.h"
#include "kernels.h"

namespace minigpt::cpu {
namespace {

// Inputs smaller than this (elements) run on one thread.
constexpr int64_t kSerialWork = 1 << 15;

// The widest kernel this CPU runs, or the one MINIGPT_CPU_ISA names (base, avx2, avx512, avx512bf16: the tests
// compare their bits).
StatsTileFn pick_stats_tile() {
  const char* env = std::getenv("MINIGPT_CPU_ISA");
  const std::string want = env ? env : "";
#if defined(__x86_64__)
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const bool avx512bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
  if (want.empty()) {
    return avx512bf16 ? avx512bf16::stats_tile : avx512 ? avx512::stats_tile : avx2 ? avx2::stats_tile : base::stats_tile;
  }
  if (want == "avx512bf16" && avx512bf16) return avx512bf16::stats_tile;
  if (want == "avx512" && avx512) return avx512::stats_tile;
  if (want == "avx2" && avx2) return avx2::stats_tile;
#endif
  TORCH_CHECK(want.empty() || want == "base", "minigpt: MINIGPT_CPU_ISA=", want,
              " is not an instruction set of this CPU's kernels (base, avx2, avx512, avx512bf16)");
  return base::stats_tile;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows of a slab: at least kMinSlab, at most kMaxSlabs slabs, a multiple of kChunk. A function of T only, so the
// statistics have the same bits whatever the thread count.
constexpr int64_t kMinSlab = 512, kMaxSlabs = 16;
int64_t slab_rows(int64_t T) { return std::max(kMinSlab, ceil_div(ceil_div(T, kMaxSlabs), kChunk) * kChunk); }

// Tiles of slab_rows(T) rows by column blocks of at most kBlock (a multiple of 16; narrower when there are fewer
// slabs than threads), one pass each with full rows where they fit, so each thread streams through contiguous
// memory. Every tile stores its partial statistics; they are then folded per column in slab order (no atomics:
// the same inputs give the same bits on every run and any number of threads).
void run_stats(const StatsArgs& a) {
  if (a.T == 0 || a.N == 0) return;
  static const StatsTileFn stats_tile = pick_stats_tile();
  const int64_t threads = a.T * a.N < kSerialWork ? 1 : at::get_num_threads();
  const int64_t slab = slab_rows(a.T), n_slabs = ceil_div(a.T, slab);
  const int64_t blocks = std::min(ceil_div(a.N, 16), std::max(ceil_div(a.N, kBlock), ceil_div(threads, n_slabs)));
  const int64_t width = ceil_div(ceil_div(a.N, blocks), 16) * 16;
  const int64_t n_blocks = ceil_div(a.N, width);
  std::vector<double> s1(n_slabs * a.N), s2(n_slabs * a.N);
  std::vector<float> mx(n_slabs * a.N);
  std::vector<int64_t> nz(n_slabs * a.N);
  at::parallel_for(0, n_slabs * n_blocks, threads == 1 ? n_slabs * n_blocks : 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t s = i / n_blocks, c0 = (i % n_blocks) * width, off = s * a.N + c0;
      stats_tile(a, s * slab, std::min(a.T, (s + 1) * slab), c0, std::min(width, a.N - c0),
                 {s1.data() + off, s2.data() + off, mx.data() + off, nz.data() + off});
    }
  });
  float* acc1 = a.acc;
  float* acc2 = acc1 + a.N;
  float* accmx = acc2 + a.N;
  for (int64_t j = 0; j < a.N; ++j) {
    double tot1 = s1[j], tot2 = s2[j];
    float totmx = mx[j];
    int64_t totnz = nz[j];
    for (int64_t s = 1; s < n_slabs; ++s) {
      tot1 += s1[s * a.N + j];
      tot2 += s2[s * a.N + j];
      totmx = std::max(totmx, mx[s * a.N + j]);
      totnz += nz[s * a.N + j];
    }
    acc1[j] = float(acc1[j] + tot1);
    acc2[j] = float(acc2[j] + tot2);
    const bool nan = std::isnan(tot1) || std::isnan(accmx[j]);  // Σ|h| is NaN iff some h is NaN
    accmx[j] = nan ? std::numeric_limits<float>::quiet_NaN() : std::max(accmx[j], totmx);
    a.nnz[j] += totnz;
  }
}

at::Tensor act_stats(const at::Tensor& gate, const std::optional<at::Tensor>& up, c10::string_view act,
                     double active_min, at::Tensor& acc, at::Tensor& nnz) {
  const at::Tensor g = as_rows(gate);
  const std::optional<at::Tensor> u = up ? std::optional(as_rows(*up)) : std::nullopt;
  at::Tensor out;
  run_stats(act_stats_args(gate, g, u, std::string_view(act.data(), act.size()), active_min, acc, nnz, &out));
  return out;
}

void column_stats(const at::Tensor& x, at::Tensor& acc, at::Tensor& nnz) {
  const at::Tensor rows = as_rows(x);
  run_stats(stats_args(rows, acc, nnz));
}

// Counts ids[i] where mask[i]; ids are checked first so counts is untouched on error. Each thread owns a range
// of bins and walks every id.
template <class I>
void histogram(const I* ids, const bool* mask, int64_t n, int64_t* counts, int64_t V) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(!(mask == nullptr || mask[i]) || (ids[i] >= 0 && ids[i] < V), "minigpt: token_histogram id ",
                int64_t(ids[i]), " at position ", i, " is outside the vocabulary [0, ", V, ")");
  }
  const int64_t threads = n < kSerialWork ? 1 : at::get_num_threads();
  const int64_t width = ceil_div(V, threads);
  at::parallel_for(0, threads, 1, [&](int64_t r0, int64_t r1) {
    const int64_t lo = r0 * width, hi = std::min(V, r1 * width);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t id = ids[i];
      if ((mask == nullptr || mask[i]) && id >= lo && id < hi) ++counts[id];
    }
  });
}

void token_histogram(const at::Tensor& ids, const std::optional<at::Tensor>& mask, at::Tensor& counts) {
  const std::optional<at::Tensor> m = check_histogram(ids, mask, counts);
  const at::Tensor flat = ids.contiguous();
  const bool* mask_ptr = m ? m->const_data_ptr<bool>() : nullptr;
  AT_DISPATCH_INDEX_TYPES(flat.scalar_type(), "token_histogram", [&] {
    histogram(flat.const_data_ptr<index_t>(), mask_ptr, flat.numel(), counts.data_ptr<int64_t>(), counts.numel());
  });
}

// out (rows, cols) contiguous = src (strides s0, s1, elements) at idx along dim; E is a type of the element size.
template <class E, class I>
void gather_2d(const E* src, int64_t s0, int64_t s1, const I* idx, int64_t dim, E* out, int64_t rows,
               int64_t cols) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kSerialWork / std::max<int64_t>(cols, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      E* o = out + r * cols;
      if (dim == 0) {
        const E* row = src + int64_t(idx[r]) * s0;
        if (s1 == 1) {
          std::memcpy(o, row, cols * sizeof(E));
        } else {
          for (int64_t c = 0; c < cols; ++c) o[c] = row[c * s1];
        }
      } else {
        const E* row = src + r * s0;
        for (int64_t c = 0; c < cols; ++c) o[c] = row[int64_t(idx[c]) * s1];
      }
    }
  });
}

struct alignas(16) Bytes16 {
  uint64_t lo, hi;
};

template <class I>
void gather_one(const at::Tensor& src, const at::Tensor& idx, int64_t dim, at::Tensor& out) {
  const auto run = [&](auto elem) {
    using E = decltype(elem);
    gather_2d(static_cast<const E*>(src.const_data_ptr()), src.stride(0), src.stride(1), idx.const_data_ptr<I>(),
              dim, static_cast<E*>(out.data_ptr()), out.size(0), out.size(1));
  };
  switch (src.element_size()) {
    case 1:
      return run(uint8_t{});
    case 2:
      return run(uint16_t{});
    case 4:
      return run(uint32_t{});
    case 8:
      return run(uint64_t{});
    case 16:
      return run(Bytes16{});
    default:
      TORCH_CHECK(false, "minigpt: gather does not support ", src.scalar_type());
  }
}

std::vector<at::Tensor> gather(at::TensorList srcs, at::TensorList indices, at::IntArrayRef dims) {
  return gather_all(srcs, indices, dims, [](const at::Tensor& src, const at::Tensor& idx, int64_t dim, at::Tensor& out) {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "gather", [&] { gather_one<index_t>(src, idx, dim, out); });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(minigpt, CPU, m) {
  m.impl("act_stats", &act_stats);
  m.impl("column_stats", &column_stats);
  m.impl("token_histogram", &token_histogram);
  m.impl("gather", &gather);
}

}  // namespace minigpt::cpu
