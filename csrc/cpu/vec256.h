// vec512.h for AVX2 (+ FMA, F16C): 8 fp32 lanes with the scalar primitives of kernels_impl.h, so that exp, erfc and
// the activations give the same bits as the scalar and AVX-512 code; the loads and stores of the three input dtypes,
// rounded as from_float; the active test and the chunk statistics. A mask is a vector of all-ones or all-zeros
// lanes. Included by kernels_impl.h, inside the AVX2 target only (MINIGPT_AVX2).
#pragma once

#include <immintrin.h>

#define MINIGPT_VEC

namespace minigpt::cpu::MINIGPT_ISA {
namespace {

constexpr int kLanes = 8;

struct Vec {
  __m256 v;
  Vec(__m256 x) : v(x) {}
  Vec(float x) : v(_mm256_set1_ps(x)) {}
};
struct Mask {
  __m256 m;
};
inline Mask all_lanes() { return {_mm256_castsi256_ps(_mm256_set1_epi32(-1))}; }

inline Vec operator+(Vec a, Vec b) { return _mm256_add_ps(a.v, b.v); }
inline Vec operator-(Vec a, Vec b) { return _mm256_sub_ps(a.v, b.v); }
inline Vec operator*(Vec a, Vec b) { return _mm256_mul_ps(a.v, b.v); }
inline Vec operator/(Vec a, Vec b) { return _mm256_div_ps(a.v, b.v); }
inline Vec operator-(Vec a) { return _mm256_xor_ps(a.v, _mm256_set1_ps(-0.0f)); }
inline Vec fma_f32(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a.v, b.v, c.v); }
inline Mask lt(Vec a, Vec b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ)}; }
inline Vec select(Mask c, Vec a, Vec b) { return _mm256_blendv_ps(b.v, a.v, c.m); }
inline Vec abs_f32(Vec a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v); }
inline Vec pow2i(Vec n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n.v), _mm256_set1_epi32(127)), 23));
}

// p[0, 8) as fp32, exact as to_float (whole vectors only: kernels_impl.h takes the last columns one at a time).
template <bool kTail>
inline Vec load(const float* p, Mask) {
  static_assert(!kTail);
  return _mm256_loadu_ps(p);
}
inline __m256i load_u16(const void* p) {
  return _mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
}
template <bool kTail>
inline Vec load(const BFloat16* p, Mask) {
  static_assert(!kTail);
  return _mm256_castsi256_ps(_mm256_slli_epi32(load_u16(p), 16));
}
template <bool kTail>
inline Vec load(const Half* p, Mask) {
  static_assert(!kTail);
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// v rounded to T into p[0, 8), with from_float's bits (NaN: any NaN for Half, 0x7FC0 for BFloat16). Never streamed
// (kStream): an 8-lane store fills at most half a line (kernels_impl.h streams_out).
template <bool kTail, bool kStream>
inline void store(float* p, Mask, Vec v) {
  static_assert(!kTail && !kStream);
  _mm256_storeu_ps(p, v.v);
}
template <bool kTail, bool kStream>
inline void store(Half* p, Mask, Vec v) {
  static_assert(!kTail && !kStream);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
template <bool kTail, bool kStream>
inline void store(BFloat16* p, Mask, Vec v) {
  static_assert(!kTail && !kStream);
  const __m256i u = _mm256_castps_si256(v.v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd), 16);
  const __m256 nan = _mm256_cmp_ps(v.v, v.v, _CMP_UNORD_Q);
  const __m256 quiet_nan = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC0));
  r = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), quiet_nan, nan));
  // 8 x 32-bit lanes (< 0x10000) to 8 x 16 bits: packus works per 128-bit half, then the two low quarters join
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

// act(x) looked up in lut for the 16-bit x at p.
template <bool kTail, class T>
inline Vec lookup(const float* lut, const T* p, Mask) {
  static_assert(!kTail);
  return _mm256_i32gather_ps(lut, load_u16(p), 4);
}

// is_active of 8 gates by kRule.
template <GateRule kRule>
inline Mask gate_active(Vec x, Vec active_min) {
  const __m256 zero = _mm256_setzero_ps();
  if constexpr (kRule == GateRule::nonzero) {
    return {_mm256_cmp_ps(x.v, zero, _CMP_NEQ_OQ)};
  } else if constexpr (kRule == GateRule::positive) {
    return {_mm256_cmp_ps(x.v, zero, _CMP_GT_OQ)};
  } else {
    return {_mm256_and_ps(_mm256_cmp_ps(x.v, active_min.v, _CMP_GE_OQ), _mm256_cmp_ps(x.v, zero, _CMP_NEQ_UQ))};
  }
}

// h = act(gate) * up: v *= y, and is_number_nonzero(y) added to the active mask.
inline void times_up(Vec& v, Mask& active, Vec y) {
  v = v * y;
  active.m = _mm256_and_ps(active.m, _mm256_cmp_ps(y.v, _mm256_setzero_ps(), _CMP_NEQ_OQ));
}

// The chunk statistics of 8 columns, in registers for R rows: accumulate_rows's sum1, sum2, m and count.
struct VecStats {
  __m256 sum1, sum2, m;
  __m256i count;
  VecStats(const float* s1, const float* s2, const float* mx, const int32_t* nz)
      : sum1(_mm256_load_ps(s1)),
        sum2(_mm256_load_ps(s2)),
        m(_mm256_load_ps(mx)),
        count(_mm256_load_si256(reinterpret_cast<const __m256i*>(nz))) {}
  // h = v, counted where active (is_number_nonzero(y) already in it): an active lane is -1, and count - (-1)
  void add(Vec v, Mask active) {
    const __m256 av = abs_f32(v).v;
    sum1 = _mm256_add_ps(sum1, av);
    sum2 = _mm256_fmadd_ps(v.v, v.v, sum2);  // fma_f32(v, v, sum2)
    m = _mm256_max_ps(av, m);  // av > m ? av : m
    count = _mm256_sub_epi32(count, _mm256_castps_si256(active.m));
  }
  void store(float* s1, float* s2, float* mx, int32_t* nz) const {
    _mm256_store_ps(s1, sum1);
    _mm256_store_ps(s2, sum2);
    _mm256_store_ps(mx, m);
    _mm256_store_si256(reinterpret_cast<__m256i*>(nz), count);
  }
};

}  // namespace
}  // namespace minigpt::cpu::MINIGPT_ISA
