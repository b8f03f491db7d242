// Plain-C++ argument structs shared by the CPU kernels, the CUDA kernels and the torch glue (no torch headers).
#pragma once

#include <cstdint>

namespace minigpt {

enum class Act : int32_t { silu, gelu_tanh, gelu, relu, identity };
enum class DType : int32_t { f32, f16, bf16 };

// h = act(gate) * up (or act(gate)) over contiguous (T, N) rows, written to out when out != nullptr;
// Σ|h|, Σh², max|h| added into acc (3, N) fp32 and the count of active tokens into nnz (N,) int64, where active
// means gate >= active_min, gate != ±0 and (if up) up a non-zero number (minigpt.reference.active_ref).
// column_stats is the case act = identity, active_min = -inf, up = out = nullptr.
struct StatsArgs {
  const void* gate;
  const void* up;
  void* out;
  float* acc;
  int64_t* nnz;
  int64_t T;
  int64_t N;
  DType dtype;
  Act act;
  float active_min;
};

}  // namespace minigpt
