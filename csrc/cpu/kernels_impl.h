// Body of the CPU statistics kernels. Included by one .cpp per instruction set, which defines MINIGPT_ISA
// (the namespace) and the target; plain loops over contiguous columns that the compiler vectorises.
// Built with -ffp-contract=off (every instruction set rounds identically), -fno-trapping-math (selects vectorise)
// and -fno-tree-loop-distribute-patterns (no memcpy/memset calls for short rows).
#ifndef MINIGPT_ISA
#error "define MINIGPT_ISA before including kernels_impl.h"
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels.h"

namespace minigpt::cpu::MINIGPT_ISA {
namespace {

// Tokens summed in fp32 before the partial sums are folded into fp64 totals: keeps the fp32 rounding error
// of Σ|h| and Σh² near that of a pairwise sum while the hot loop stays fp32.
constexpr int64_t kChunk = 32;

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

template <class To, class From>
inline To bit_cast(From x) {
  static_assert(sizeof(To) == sizeof(From));
  To y;
  std::memcpy(&y, &x, sizeof(To));
  return y;
}

inline float to_float(float x) { return x; }
inline float to_float(BFloat16 x) { return bit_cast<float>(uint32_t(x.bits) << 16); }
// IEEE half -> float without branches (Maratyszcza's FP16 library, exact for every input).
inline float to_float(Half x) {
  const uint32_t w = uint32_t(x.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bit_cast<float>((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bit_cast<float>((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude = two_w < (1u << 27) ? bit_cast<uint32_t>(denormalized) : bit_cast<uint32_t>(normalized);
  return bit_cast<float>(sign | magnitude);
}

// float -> T, round to nearest even, as torch's .to(dtype).
template <class T>
inline T from_float(float f);
template <>
inline float from_float<float>(float f) {
  return f;
}
template <>
inline BFloat16 from_float<BFloat16>(float f) {
  const uint32_t u = bit_cast<uint32_t>(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return {uint16_t(f != f ? 0x7FC0u : rounded)};
}
template <>
inline Half from_float<Half>(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = bit_cast<uint32_t>(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t bias = std::max(shl1_w & 0xFF000000u, 0x71000000u);
  base = bit_cast<float>((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = bit_cast<uint32_t>(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return {uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
}

// exp(x) (Cephes expf: x = n ln2 + r, degree-6 polynomial in r; about 1 ulp). Vectorisable: no calls, no branches.
// Returns 0 below -87.3 and inf above 88.37 (where 2^n would leave the normal range), NaN for NaN.
inline float exp_f32(float x) {
  constexpr float kLo = -87.3f, kHi = 88.3762626647949f;
  const float xc = std::min(std::max(x, kLo), kHi);
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(xc / ln2)
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const float y = p * bit_cast<float>(uint32_t(int32_t(n) + 127) << 23);
  return x > kHi ? std::numeric_limits<float>::infinity() : (x < kLo ? 0.0f : y);
}

// erfc(z) (Numerical Recipes erfcc: relative error about 1e-7 for z >= 0, reflected for z < 0).
inline float erfc_f32(float z) {
  const float a = std::fabs(z);
  const float t = 1.0f / (1.0f + 0.5f * a);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  const float r = t * exp_f32(p - a * a);
  return z >= 0.0f ? r : 2.0f - r;
}

// The activations of minigpt.reference, written without cancellation: x·sigmoid(x); 0.5x(1 + tanh y) = x·sigmoid(2y);
// 0.5x(1 + erf(x/√2)) = 0.5x·erfc(-x/√2). NaN in, NaN out.
template <Act A>
inline float activate(float x) {
  if constexpr (A == Act::silu) {
    return x / (1.0f + exp_f32(-x));
  } else if constexpr (A == Act::gelu_tanh) {
    const float y = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    return x / (1.0f + exp_f32(-2.0f * y));
  } else if constexpr (A == Act::gelu) {
    return 0.5f * x * erfc_f32(-0.7071067811865476f * x);
  } else if constexpr (A == Act::relu) {
    return x < 0.0f ? 0.0f : x;
  } else {
    return x;
  }
}

// Whether a token counts as active (minigpt.reference.active_ref): gate >= active_min, gate != ±0, up a non-zero
// number. Comparisons only, so it is exact whatever the activation's rounding.
inline int32_t is_active(float g, float active_min) {
  return int32_t(g >= active_min) & int32_t(g != 0.0f);
}
inline int32_t is_number_nonzero(float u) { return int32_t(u < 0.0f) | int32_t(u > 0.0f); }

// Row t for columns [c0, c0 + nc), in one pass: h = act(gate) * up (written to a.out when kOut), its statistics
// added into the chunk accumulators s1 (Σ|h|), s2 (Σh²), mx (max|h|, NaN skipped) and nz (active count).
template <class T, Act A, bool kGated, bool kOut>
inline void accumulate_row(const StatsArgs& a, int64_t t, int64_t c0, int64_t nc, float* __restrict s1,
                           float* __restrict s2, float* __restrict mx, int32_t* __restrict nz) {
  const int64_t off = t * a.N + c0;
  const T* __restrict g = static_cast<const T*>(a.gate) + off;
  const T* __restrict u = kGated ? static_cast<const T*>(a.up) + off : nullptr;
  T* __restrict o = kOut ? static_cast<T*>(a.out) + off : nullptr;
  const float active_min = a.active_min;
  for (int64_t j = 0; j < nc; ++j) {
    const float x = to_float(g[j]);
    float v = activate<A>(x);
    int32_t active = is_active(x, active_min);
    if constexpr (kGated) {
      const float y = to_float(u[j]);
      v *= y;
      active &= is_number_nonzero(y);
    }
    if constexpr (kOut) o[j] = from_float<T>(v);
    const float av = std::fabs(v);
    s1[j] += av;
    s2[j] += v * v;
    mx[j] = av > mx[j] ? av : mx[j];  // NaN skipped here, restored from Σ|h| below
    nz[j] += active;
  }
}

template <class T, Act A, bool kGated, bool kOut>
void stats_block_impl(const StatsArgs& a, int64_t c0, int64_t nc) {
  alignas(64) float s1[kBlock], s2[kBlock], mx[kBlock];
  alignas(64) int32_t nz[kBlock];
  alignas(64) double tot1[kBlock] = {}, tot2[kBlock] = {};
  alignas(64) float totmx[kBlock] = {};
  alignas(64) int64_t totnz[kBlock] = {};
  for (int64_t t0 = 0; t0 < a.T; t0 += kChunk) {
    std::fill_n(s1, nc, 0.0f);
    std::fill_n(s2, nc, 0.0f);
    std::fill_n(mx, nc, 0.0f);
    std::fill_n(nz, nc, 0);
    for (int64_t t = t0, t_end = std::min(a.T, t0 + kChunk); t < t_end; ++t) {
      accumulate_row<T, A, kGated, kOut>(a, t, c0, nc, s1, s2, mx, nz);
    }
    for (int64_t j = 0; j < nc; ++j) {
      tot1[j] += s1[j];
      tot2[j] += s2[j];
      totmx[j] = std::max(totmx[j], mx[j]);
      totnz[j] += nz[j];
    }
  }
  float* acc1 = a.acc + c0;
  float* acc2 = acc1 + a.N;
  float* accmx = acc2 + a.N;
  for (int64_t j = 0; j < nc; ++j) {
    acc1[j] = float(acc1[j] + tot1[j]);
    acc2[j] = float(acc2[j] + tot2[j]);
    const bool nan = std::isnan(tot1[j]) || std::isnan(accmx[j]);  // Σ|h| is NaN iff some h is NaN
    accmx[j] = nan ? std::numeric_limits<float>::quiet_NaN() : std::max(accmx[j], totmx[j]);
    a.nnz[c0 + j] += totnz[j];
  }
}

template <class T, Act A>
void by_gate(const StatsArgs& a, int64_t c0, int64_t nc) {
  if (a.up) {
    stats_block_impl<T, A, true, true>(a, c0, nc);
  } else {
    stats_block_impl<T, A, false, true>(a, c0, nc);
  }
}

template <class T>
void by_act(const StatsArgs& a, int64_t c0, int64_t nc) {
  if (!a.out) return stats_block_impl<T, Act::identity, false, false>(a, c0, nc);  // column_stats
  switch (a.act) {
    case Act::silu:
      return by_gate<T, Act::silu>(a, c0, nc);
    case Act::gelu_tanh:
      return by_gate<T, Act::gelu_tanh>(a, c0, nc);
    case Act::gelu:
      return by_gate<T, Act::gelu>(a, c0, nc);
    case Act::relu:
      return by_gate<T, Act::relu>(a, c0, nc);
    case Act::identity:
      return by_gate<T, Act::identity>(a, c0, nc);
  }
}

}  // namespace

void stats_block(const StatsArgs& a, int64_t c0, int64_t nc) {
  switch (a.dtype) {
    case DType::f32:
      return by_act<float>(a, c0, nc);
    case DType::f16:
      return by_act<Half>(a, c0, nc);
    case DType::bf16:
      return by_act<BFloat16>(a, c0, nc);
  }
}

}  // namespace minigpt::cpu::MINIGPT_ISA
