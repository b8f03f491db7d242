// Body of the CPU statistics kernels. Included by one .cpp per instruction set, which defines MINIGPT_ISA
// (the namespace) and the target; plain loops over contiguous columns that the compiler vectorises (the SSE2
// baseline), or the same math on explicit vectors, 16 lanes on AVX-512 (MINIGPT_AVX512, vec512.h) and 8 on AVX2
// (MINIGPT_AVX2, vec256.h); a 16-bit gate's smooth activation is looked up in a table (act_table); a large h is
// streamed past the caches (streams_out). bench/bench_cpu_stats.py compares them with the eager activation they
// replace.
// Built with -ffp-contract=off (FMAs only where written, fma_f32: the AVX2 and AVX-512 kernels give the same bits),
// -fno-trapping-math (selects vectorise) and -fno-tree-loop-distribute-patterns (no memcpy/memset calls).
#ifndef MINIGPT_ISA
#error "define MINIGPT_ISA before including kernels_impl.h"
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace minigpt::cpu::MINIGPT_ISA {
namespace {

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

// a * b + c: rounded once (an FMA instruction) where the target has one (MINIGPT_FMA: AVX2, AVX-512; ARM), so
// those give the same bits; rounded twice on the SSE2 baseline, where libm's fmaf would be a slow scalar call.
inline float fma_f32(float a, float b, float c) {
#if defined(MINIGPT_FMA) || defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// The scalar primitives of the activations (vec512.h has the same for 16 lanes, so one definition of the math gives
// the same bits in both): a < b, a > b, c ? a : b, |a|, 2^n for an integral n.
inline bool lt(float a, float b) { return a < b; }
inline float select(bool c, float a, float b) { return c ? a : b; }
inline float abs_f32(float a) { return std::fabs(a); }
inline float pow2i(float n) { return bit_cast<float>(uint32_t(int32_t(n) + 127) << 23); }

// is_active in one comparison where active_min allows (the vector kernels): any non-zero number (-inf), x > 0 (0).
enum class GateRule { general, nonzero, positive };

// Whether and how h is written: not at all (column_stats), through the caches, or streamed past them (non-temporal
// stores, vector kernels only: see streams_out).
enum class Out { none, cached, streamed };

}  // namespace
}  // namespace minigpt::cpu::MINIGPT_ISA

// The vector kernels' types and memory operations (MINIGPT_VEC): 16 lanes on AVX-512, 8 on AVX2.
#if defined(MINIGPT_AVX512)
#include "vec512.h"
#elif defined(MINIGPT_AVX2)
#include "vec256.h"
#endif

namespace minigpt::cpu::MINIGPT_ISA {
namespace {

// exp(x) (Cephes expf: x = n ln2 + r, degree-6 polynomial in r; about 1 ulp). Vectorisable: no calls, no branches.
// Returns 0 below -87.3 and inf above 88.37 (where 2^n would leave the normal range), NaN for NaN. V: float or Vec;
// kUpper = false for x <= 0 only (the same values without the work of the upper bound).
template <class V, bool kUpper = true>
inline V exp_f32(V x) {
  constexpr float kLo = -87.3f, kHi = 88.3762626647949f;
  V xc = select(lt(x, kLo), V(kLo), x);  // NaN stays NaN
  if constexpr (kUpper) xc = select(lt(kHi, xc), V(kHi), xc);
  const V n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(xc / ln2)
  const V r = fma_f32(n, 2.12194440e-4f, fma_f32(n, -0.693359375f, xc));
  V p = 1.9875691500e-4f;
  p = fma_f32(p, r, 1.3981999507e-3f);
  p = fma_f32(p, r, 8.3334519073e-3f);
  p = fma_f32(p, r, 4.1665795894e-2f);
  p = fma_f32(p, r, 1.6666665459e-1f);
  p = fma_f32(p, r, 5.0000001201e-1f);
  p = fma_f32(p, r * r, r) + 1.0f;
  const V y = p * pow2i(n);
  const V low = select(lt(x, kLo), V(0.0f), y);
  return kUpper ? select(lt(kHi, x), V(std::numeric_limits<float>::infinity()), low) : low;
}

// erfc(z) (Numerical Recipes erfcc: relative error about 1e-7 for z >= 0, reflected for z < 0).
template <class V>
inline V erfc_f32(V z) {
  const V a = abs_f32(z);
  const V t = 1.0f / fma_f32(0.5f, a, 1.0f);
  V p = 0.17087277f;
  p = fma_f32(p, t, -0.82215223f);
  p = fma_f32(p, t, 1.48851587f);
  p = fma_f32(p, t, -1.13520398f);
  p = fma_f32(p, t, 0.27886807f);
  p = fma_f32(p, t, -0.18628806f);
  p = fma_f32(p, t, 0.09678418f);
  p = fma_f32(p, t, 0.37409196f);
  p = fma_f32(p, t, 1.00002368f);
  p = fma_f32(p, t, -1.26551223f);
  const V r = t * exp_f32<V, false>(fma_f32(-a, a, p));  // -a² + p <= about 0
  return select(lt(z, 0.0f), 2.0f - r, r);  // z >= 0 ? r : 2 - r (NaN: r, NaN)
}

// The activations of minigpt.reference, written without cancellation: x·sigmoid(x); 0.5x(1 + tanh y) = x·sigmoid(2y);
// 0.5x(1 + erf(x/√2)) = 0.5x·erfc(-x/√2). NaN in, NaN out.
template <Act A, class V>
inline V activate(V x) {
  if constexpr (A == Act::silu) {
    return x / (1.0f + exp_f32(-x));
  } else if constexpr (A == Act::gelu_tanh) {
    const V y = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    return x / (1.0f + exp_f32(-2.0f * y));
  } else if constexpr (A == Act::gelu) {
    return 0.5f * x * erfc_f32(-0.7071067811865476f * x);
  } else if constexpr (A == Act::relu) {
    return select(lt(x, 0.0f), V(0.0f), x);
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

// Whether act(gate) is looked up rather than computed: a 16-bit gate has 65,536 values, and one table lookup (a
// gather on 16 lanes) costs less than exp or erfc.
template <class T, Act A>
constexpr bool kLookup = sizeof(T) == 2 && (A == Act::silu || A == Act::gelu_tanh || A == Act::gelu);

// act(x) for every bit pattern of the 16-bit type T, computed once per process by activate<A> itself: a lookup
// gives the same bits as computing.
template <class T, Act A>
const float* act_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(1 << 16);
    for (uint32_t b = 0; b < t.size(); ++b) t[b] = activate<A>(to_float(T{uint16_t(b)}));
    return t;
  }();
  return table.data();
}

// Rows [t, t + R) for columns [c0, c0 + nc), in one pass: h = act(gate) * up (written to a.out unless Out::none), its
// statistics added into the chunk accumulators s1 (Σ|h|), s2 (Σh²), mx (max|h|, NaN skipped) and nz (active count).
// Each accumulator is loaded and stored once per R rows and the rows are added in order, so R changes no bits.
template <class T, Act A, bool kGated, Out kOut, GateRule kRule, int R>
inline void accumulate_rows(const StatsArgs& a, const float* __restrict lut, int64_t t, int64_t c0, int64_t nc,
                            float* __restrict s1, float* __restrict s2, float* __restrict mx, int32_t* __restrict nz) {
  const int64_t N = a.N, off = t * N + c0;
  const T* __restrict g = static_cast<const T*>(a.gate) + off;
  const T* __restrict u = kGated ? static_cast<const T*>(a.up) + off : nullptr;
  T* __restrict o = kOut != Out::none ? static_cast<T*>(a.out) + off : nullptr;
  const float active_min = a.active_min;
#pragma GCC ivdep  // o is a new tensor and the accumulators live on the stack: no store aliases a load
  for (int64_t j = 0; j < nc; ++j) {
    float sum1 = s1[j], sum2 = s2[j], m = mx[j];
    int32_t count = nz[j];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float x = to_float(g[r * N + j]);
      float v;
      if constexpr (kLookup<T, A>) {
        v = lut[bit_cast<uint16_t>(g[r * N + j])];
      } else {
        v = activate<A>(x);
      }
      int32_t active = is_active(x, active_min);
      if constexpr (kGated) {
        const float y = to_float(u[r * N + j]);
        v *= y;
        active &= is_number_nonzero(y);
      }
      if constexpr (kOut != Out::none) o[r * N + j] = from_float<T>(v);
      const float av = std::fabs(v);
      sum1 += av;
      sum2 = fma_f32(v, v, sum2);
      m = av > m ? av : m;  // NaN skipped here, restored from Σ|h| in the fold (ops_cpu.cpp)
      count += active;
    }
    s1[j] = sum1;
    s2[j] = sum2;
    mx[j] = m;
    nz[j] = count;
  }
}

// Whether the kernels take bf16 columns 32 at a time (accumulate_pair, AVX-512 only).
#if defined(MINIGPT_AVX512)
template <class T>
constexpr bool kPaired = std::is_same_v<T, BFloat16>;
#else
template <class T>
constexpr bool kPaired = false;
#endif

#if defined(MINIGPT_VEC)
// Rows prefetched ahead of the row being read: with the hardware prefetchers alone, a memory-bound product (identity)
// fell further behind eager's single sequential pass in quick trials.
constexpr int kAhead = 8;

// kAhead rows ahead of row r: the inputs into L2, and a 16-bit cached output for writing (an fp32 output did better
// without, in quick trials; a streamed one is never read). A prefetch never faults past the end.
template <bool kGated, Out kOut, class T>
inline void prefetch_ahead(const T* g, const T* u, const T* o, int64_t at) {
  __builtin_prefetch(g + at, 0, 2);
  if constexpr (kGated) __builtin_prefetch(u + at, 0, 2);
  if constexpr (kOut == Out::cached && sizeof(T) == 2) __builtin_prefetch(o + at, 1, 3);
}

// accumulate_rows for the kLanes columns [j, j + kLanes) (the lanes `lanes` only where kTail) with the same
// operations in the same order: the same bits. The accumulators have 16 lanes of padding: whole vectors.
template <class T, Act A, bool kGated, Out kOut, GateRule kRule, int R, bool kTail>
inline void accumulate_vec(const StatsArgs& a, const float* lut, const T* g, const T* u, T* o, int64_t j, Mask lanes,
                           float* __restrict s1, float* __restrict s2, float* __restrict mx, int32_t* __restrict nz) {
  const int64_t N = a.N;
  const Vec active_min = a.active_min;
  VecStats st(s1 + j, s2 + j, mx + j, nz + j);
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r) {
    const int64_t at = r * N + j;
    prefetch_ahead<kGated, kOut>(g, u, o, at + kAhead * N);
    const Vec x = load<kTail>(g + at, lanes);
    Vec v = 0.0f;
    if constexpr (kLookup<T, A>) {
      v = lookup<kTail>(lut, g + at, lanes);
    } else {
      v = activate<A>(x);
    }
    Mask active = gate_active<kRule>(x, active_min);
    if constexpr (kGated) times_up(v, active, load<kTail>(u + at, lanes));
    // streamed only as whole 64-byte lines: not a paired type's last 16 columns (streams_out)
    if constexpr (kOut != Out::none) store<kTail, kOut == Out::streamed && kLanes * sizeof(T) == 64>(o + at, lanes, v);
    st.add(v, active);
  }
  st.store(s1 + j, s2 + j, mx + j, nz + j);
}

#if defined(MINIGPT_AVX512)
// bf16 columns [j, j + 32) from one 64-byte load per row, split by a shift and a mask into the even columns (their
// statistics in lanes [j, j + 16) of the accumulators) and the odd ones ([j + 16, j + 32)): widening 16 at a time
// costs two operations each. The same operations per column as accumulate_vec (the same bits); unpair() restores
// the column order of the statistics.
template <Act A, bool kGated, Out kOut, GateRule kRule, int R>
inline void accumulate_pair(const StatsArgs& a, const float* lut, const BFloat16* g, const BFloat16* u, BFloat16* o,
                            int64_t j, float* __restrict s1, float* __restrict s2, float* __restrict mx,
                            int32_t* __restrict nz) {
  const int64_t N = a.N;
  const Vec active_min = a.active_min;
  const __m512i high = _mm512_set1_epi32(int32_t(0xFFFF0000u));
  const auto even = [](__m512i w) { return Vec(_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))); };
  const auto odd = [&](__m512i w) { return Vec(_mm512_castsi512_ps(_mm512_and_si512(w, high))); };
  VecStats st_even(s1 + j, s2 + j, mx + j, nz + j), st_odd(s1 + j + 16, s2 + j + 16, mx + j + 16, nz + j + 16);
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r) {
    const int64_t at = r * N + j;
    prefetch_ahead<kGated, kOut>(g, u, o, at + kAhead * N);
    const __m512i gw = _mm512_loadu_si512(g + at);
    const Vec xe = even(gw), xo = odd(gw);
    Vec ve = 0.0f, vo = 0.0f;
    if constexpr (kLookup<BFloat16, A>) {
      ve = _mm512_i32gather_ps(_mm512_andnot_si512(high, gw), lut, 4);
      vo = _mm512_i32gather_ps(_mm512_srli_epi32(gw, 16), lut, 4);
    } else {
      ve = activate<A>(xe);
      vo = activate<A>(xo);
    }
    Mask ae = gate_active<kRule>(xe, active_min), ao = gate_active<kRule>(xo, active_min);
    if constexpr (kGated) {
      const __m512i uw = _mm512_loadu_si512(u + at);
      times_up(ve, ae, even(uw));
      times_up(vo, ao, odd(uw));
    }
    if constexpr (kOut != Out::none) store_pair<kOut == Out::streamed>(o + at, ve, vo);
    st_even.add(ve, ae);
    st_odd.add(vo, ao);
  }
  st_even.store(s1 + j, s2 + j, mx + j, nz + j);
  st_odd.store(s1 + j + 16, s2 + j + 16, mx + j + 16, nz + j + 16);
}

#endif

// accumulate_rows, kLanes columns a vector (AVX-512 bf16: 32 at a time while 32 are left); the last nc % kLanes
// columns under a lane mask on AVX-512, by accumulate_rows on AVX2 (which has no 16-bit masked loads).
template <class T, Act A, bool kGated, Out kOut, GateRule kRule, int R>
inline void accumulate_rows_vec(const StatsArgs& a, const float* lut, int64_t t, int64_t c0, int64_t nc,
                                float* __restrict s1, float* __restrict s2, float* __restrict mx,
                                int32_t* __restrict nz) {
  const int64_t off = t * a.N + c0;
  const T* g = static_cast<const T*>(a.gate) + off;
  const T* u = kGated ? static_cast<const T*>(a.up) + off : nullptr;
  T* o = kOut != Out::none ? static_cast<T*>(a.out) + off : nullptr;
  int64_t j = 0;
#if defined(MINIGPT_AVX512)
  if constexpr (kPaired<T>) {
    for (; j + 32 <= nc; j += 32) accumulate_pair<A, kGated, kOut, kRule, R>(a, lut, g, u, o, j, s1, s2, mx, nz);
  }
#endif
  for (; j + kLanes <= nc; j += kLanes) {
    accumulate_vec<T, A, kGated, kOut, kRule, R, false>(a, lut, g, u, o, j, all_lanes(), s1, s2, mx, nz);
  }
  if (j < nc) {
#if defined(MINIGPT_AVX512)
    accumulate_vec<T, A, kGated, kOut, kRule, R, true>(a, lut, g, u, o, j, tail_lanes(nc - j), s1, s2, mx, nz);
#else
    accumulate_rows<T, A, kGated, kOut, kRule, R>(a, lut, t, c0 + j, nc - j, s1 + j, s2 + j, mx + j, nz + j);
#endif
  }
}
#define MINIGPT_ACCUMULATE_ROWS accumulate_rows_vec
#else
#define MINIGPT_ACCUMULATE_ROWS accumulate_rows
#endif

// Columns [0, 32 * (n / 32)) of x back in order from accumulate_pair's layout (in each 32: the even columns, then
// the odd ones).
template <class E>
void unpair(E* x, int64_t n) {
  E block[32];
  for (int64_t b = 0; b + 32 <= n; b += 32) {
    std::copy_n(x + b, 32, block);
    for (int k = 0; k < 16; ++k) {
      x[b + 2 * k] = block[k];
      x[b + 2 * k + 1] = block[16 + k];
    }
  }
}

// Rows per accumulator pass (kChunk is a multiple): the accumulators are loaded and stored once per kRows rows, so
// more rows mean fewer stores per element, and more streams in flight. For bf16 identity, the most memory-bound
// case, 8 beat 4 and 16 in quick trials (bench/bench_cpu_stats.py measures the result).
constexpr int kRows = 8;

template <class T, Act A, bool kGated, Out kOut, GateRule kRule = GateRule::general>
void stats_tile_impl(const StatsArgs& a, int64_t t0, int64_t t1, int64_t c0, int64_t nc, const Partial& p) {
  // one buffer, the arrays kPad floats apart: 4 KiB apart they would alias in the load/store unit
  constexpr int64_t kPad = kBlock + 16;
  alignas(64) float chunk[4 * kPad];
  float *s1 = chunk, *s2 = chunk + kPad, *mx = chunk + 2 * kPad;
  int32_t* nz = reinterpret_cast<int32_t*>(chunk + 3 * kPad);
  const float* lut = nullptr;
  if constexpr (kLookup<T, A>) lut = act_table<T, A>();
  std::fill_n(p.s1, nc, 0.0);
  std::fill_n(p.s2, nc, 0.0);
  std::fill_n(p.mx, nc, 0.0f);
  std::fill_n(p.nz, nc, 0);
  for (int64_t c = t0; c < t1; c += kChunk) {
    std::fill_n(s1, nc, 0.0f);
    std::fill_n(s2, nc, 0.0f);
    std::fill_n(mx, nc, 0.0f);
    std::fill_n(nz, nc, 0);
    const int64_t c_end = std::min(t1, c + kChunk);
    int64_t t = c;
    for (; t + kRows <= c_end; t += kRows) {
      MINIGPT_ACCUMULATE_ROWS<T, A, kGated, kOut, kRule, kRows>(a, lut, t, c0, nc, s1, s2, mx, nz);
    }
    for (; t < c_end; ++t) MINIGPT_ACCUMULATE_ROWS<T, A, kGated, kOut, kRule, 1>(a, lut, t, c0, nc, s1, s2, mx, nz);
    for (int64_t j = 0; j < nc; ++j) {
      p.s1[j] += s1[j];
      p.s2[j] += s2[j];
      p.mx[j] = std::max(p.mx[j], mx[j]);
      p.nz[j] += nz[j];
    }
  }
  if constexpr (kPaired<T>) {
    unpair(p.s1, nc);
    unpair(p.s2, nc);
    unpair(p.mx, nc);
    unpair(p.nz, nc);
  }
}

#if defined(MINIGPT_VEC)
// Whether the tile writes h with streaming (non-temporal) stores, which skip reading each line before writing it:
// the bound on a memory-bound product, and a quarter of its traffic. Only where each vector store fills a whole
// 64-byte line (kWholeLines; AVX-512: fp32, and bf16 paired, the few 16-column bf16 stores left are not streamed):
// a part of a line, with the other rows' parts stored in between, leaves the write-combining buffers as a partial
// line, which made AVX2's bf16 kernels slower in trials. Only for an h of kStreamBytes or more, too large to stay
// in a core's L2 for the down projection that reads it next, and when every row of the tile starts 64-byte aligned
// (at::empty aligns to 64 bytes; rows then need N * sizeof(T) a multiple of 64).
constexpr int64_t kStreamBytes = int64_t(4) << 20;
template <class T>
constexpr bool kWholeLines = kLanes * sizeof(T) == 64 || kPaired<T>;
template <class T>
bool streams_out(const StatsArgs& a, int64_t c0) {
  constexpr int64_t size = sizeof(T);
  return a.T * a.N * size >= kStreamBytes && a.N * size % 64 == 0 &&
         reinterpret_cast<uintptr_t>(static_cast<T*>(a.out) + c0) % 64 == 0;
}
#endif

template <class T, Act A, bool kGated, GateRule kRule>
void by_out(const StatsArgs& a, int64_t t0, int64_t t1, int64_t c0, int64_t nc, const Partial& p) {
#if defined(MINIGPT_VEC)
  if constexpr (kWholeLines<T>) {
    if (streams_out<T>(a, c0)) {
      stats_tile_impl<T, A, kGated, Out::streamed, kRule>(a, t0, t1, c0, nc, p);
      return _mm_sfence();  // the streamed h in memory before the caller reads it
    }
  }
#endif
  stats_tile_impl<T, A, kGated, Out::cached, kRule>(a, t0, t1, c0, nc, p);
}

template <class T, Act A, GateRule kRule>
void by_gate(const StatsArgs& a, int64_t t0, int64_t t1, int64_t c0, int64_t nc, const Partial& p) {
  if (a.up) {
    by_out<T, A, true, kRule>(a, t0, t1, c0, nc, p);
  } else {
    by_out<T, A, false, kRule>(a, t0, t1, c0, nc, p);
  }
}

// by_gate with the one-comparison rule of the activation's own active_min (minigpt.reference.active_min).
template <class T, Act A>
void by_rule(const StatsArgs& a, int64_t t0, int64_t t1, int64_t c0, int64_t nc, const Partial& p) {
  constexpr GateRule own = A == Act::identity ? GateRule::nonzero : A == Act::relu ? GateRule::positive
                                                                                    : GateRule::general;
  const bool is_own = own == GateRule::nonzero    ? a.active_min == -std::numeric_limits<float>::infinity()
                      : own == GateRule::positive ? a.active_min == 0.0f
                                                  : true;
  if (is_own) return by_gate<T, A, own>(a, t0, t1, c0, nc, p);
  if constexpr (own != GateRule::general) by_gate<T, A, GateRule::general>(a, t0, t1, c0, nc, p);
}

template <class T>
void by_act(const StatsArgs& a, int64_t t0, int64_t t1, int64_t c0, int64_t nc, const Partial& p) {
  if (!a.out) {  // column_stats
    return stats_tile_impl<T, Act::identity, false, Out::none, GateRule::nonzero>(a, t0, t1, c0, nc, p);
  }
  switch (a.act) {
    case Act::silu:
      return by_rule<T, Act::silu>(a, t0, t1, c0, nc, p);
    case Act::gelu_tanh:
      return by_rule<T, Act::gelu_tanh>(a, t0, t1, c0, nc, p);
    case Act::gelu:
      return by_rule<T, Act::gelu>(a, t0, t1, c0, nc, p);
    case Act::relu:
      return by_rule<T, Act::relu>(a, t0, t1, c0, nc, p);
    case Act::identity:
      return by_rule<T, Act::identity>(a, t0, t1, c0, nc, p);
  }
}

}  // namespace

void stats_tile(const StatsArgs& a, int64_t t0, int64_t t1, int64_t c0, int64_t nc, const Partial& p) {
  switch (a.dtype) {
    case DType::f32:
      return by_act<float>(a, t0, t1, c0, nc, p);
    case DType::f16:
      return by_act<Half>(a, t0, t1, c0, nc, p);
    case DType::bf16:
      return by_act<BFloat16>(a, t0, t1, c0, nc, p);
  }
}

}  // namespace minigpt::cpu::MINIGPT_ISA
