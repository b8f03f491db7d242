// 16 fp32 lanes of AVX-512 with the scalar primitives of kernels_impl.h (operators, fma_f32, lt, select, abs_f32,
// pow2i), so that the one definition of exp, erfc and the activations gives the same bits as the scalar code; the
// loads and stores of the three input dtypes, rounded as from_float; the active test and the chunk statistics.
// Included by kernels_impl.h, inside the AVX-512 target only (MINIGPT_AVX512); vec256.h is the same for AVX2.
// MINIGPT_AVX512_BF16 (AVX512_BF16 CPUs) rounds bf16 with vcvtneps2bf16.
#pragma once

// GCC 12 reports -Wmaybe-uninitialized inside its own AVX-512 intrinsics (their _mm512_undefined_* operands),
// thousands of times across these templates: a false positive, silenced for the files that include this one.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#define MINIGPT_VEC

namespace minigpt::cpu::MINIGPT_ISA {
namespace {

constexpr int kLanes = 16;

struct Vec {
  __m512 v;
  Vec(__m512 x) : v(x) {}
  Vec(float x) : v(_mm512_set1_ps(x)) {}
};
using Mask = __mmask16;
inline Mask all_lanes() { return 0xFFFF; }
inline Mask tail_lanes(int64_t n) { return Mask((1u << n) - 1u); }  // the first n < 16

inline Vec operator+(Vec a, Vec b) { return _mm512_add_ps(a.v, b.v); }
inline Vec operator-(Vec a, Vec b) { return _mm512_sub_ps(a.v, b.v); }
inline Vec operator*(Vec a, Vec b) { return _mm512_mul_ps(a.v, b.v); }
inline Vec operator/(Vec a, Vec b) { return _mm512_div_ps(a.v, b.v); }
inline Vec operator-(Vec a) { return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a.v), _mm512_set1_epi32(INT32_MIN))); }
inline Vec fma_f32(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a.v, b.v, c.v); }
inline Mask lt(Vec a, Vec b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ); }
inline Vec select(Mask c, Vec a, Vec b) { return _mm512_mask_blend_ps(c, b.v, a.v); }
inline Vec abs_f32(Vec a) { return _mm512_abs_ps(a.v); }
inline Vec pow2i(Vec n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n.v), _mm512_set1_epi32(127)), 23));
}


// p[0, 16) as fp32, exact as to_float; the lanes m only where kTail (0 elsewhere: masked accesses are slower).
template <bool kTail>
inline Vec load(const float* p, Mask m) {
  return kTail ? _mm512_maskz_loadu_ps(m, p) : _mm512_loadu_ps(p);
}
template <bool kTail>
inline __m512i load_u16(const void* p, Mask m) {
  return _mm512_cvtepu16_epi32(kTail ? _mm256_maskz_loadu_epi16(m, p) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
template <bool kTail>
inline Vec load(const BFloat16* p, Mask m) { return _mm512_castsi512_ps(_mm512_slli_epi32(load_u16<kTail>(p, m), 16)); }
template <bool kTail>
inline Vec load(const Half* p, Mask m) {
  return _mm512_cvtph_ps(kTail ? _mm256_maskz_loadu_epi16(m, p) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// 64 bytes x to p: streamed past the caches (a non-temporal store; p 64-byte aligned) when kStream.
template <bool kStream>
inline void put(void* p, __m512i x) {
  if constexpr (kStream) {
    _mm512_stream_si512(static_cast<__m512i*>(p), x);
  } else {
    _mm512_storeu_si512(p, x);
  }
}

// x to the 16-bit lanes m of p (all of them unless kTail).
template <bool kTail>
inline void store_u16(void* p, Mask m, __m256i x) {
  if constexpr (kTail) {
    _mm256_mask_storeu_epi16(p, m, x);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), x);
  }
}

// v rounded to T into lanes m of p, with from_float's bits (NaN: any NaN for Half, 0x7FC0 for BFloat16). Streamed
// (kStream) only as 64 whole bytes: fp32 here, bf16 by store_pair (kernels_impl.h streams_out).
template <bool kTail, bool kStream>
inline void store(float* p, Mask m, Vec v) {
  if constexpr (kTail) {
    _mm512_mask_storeu_ps(p, m, v.v);
  } else {
    put<kStream>(p, _mm512_castps_si512(v.v));
  }
}
template <bool kTail, bool kStream>
inline void store(Half* p, Mask m, Vec v) {
  static_assert(!kStream);
  store_u16<kTail>(p, m, _mm512_cvtps_ph(v.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// v rounded to bf16 as from_float, in the low 16 bits of each lane (the high 16 are 0).
inline __m512i bf16_bits(Vec v) {
  const __m512i u = _mm512_castps_si512(v.v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v.v, v.v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}

// vcvtneps2bf16 rounds to nearest even but flushes subnormals and keeps NaN payloads: a vector holding either
// (fpclass 0xA1: quiet NaN, signalling NaN, subnormal) takes bf16_bits instead.
inline bool has_nan_or_subnormal(Vec v) { return _mm512_fpclass_ps_mask(v.v, 0xA1) != 0; }

template <bool kTail, bool kStream>
inline void store(BFloat16* p, Mask m, Vec v) {
  static_assert(!kStream);
#if defined(MINIGPT_AVX512_BF16)
  if (__builtin_expect(!has_nan_or_subnormal(v), 1)) {
    store_u16<kTail>(p, m, (__m256i)_mm512_cvtneps_pbh(v.v));
    return;
  }
#endif
  store_u16<kTail>(p, m, _mm512_cvtepi32_epi16(bf16_bits(v)));
}

// e and o rounded to bf16 (as store) and interleaved into p[0, 32): p[2i] = e[i], p[2i + 1] = o[i].
template <bool kStream>
inline void store_pair(BFloat16* p, Vec e, Vec o) {
#if defined(MINIGPT_AVX512_BF16)
  if (__builtin_expect(!(has_nan_or_subnormal(e) || has_nan_or_subnormal(o)), 1)) {
    // word 2i <- word i (e), word 2i + 1 <- word 16 + i (o)
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    put<kStream>(p, _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(o.v, e.v)));
    return;
  }
#endif
  put<kStream>(p, _mm512_or_si512(bf16_bits(e), _mm512_slli_epi32(bf16_bits(o), 16)));
}

// act(x) looked up in lut for the 16-bit x at p (masked-off lanes read lut[0]).
template <bool kTail, class T>
inline Vec lookup(const float* lut, const T* p, Mask m) {
  return _mm512_i32gather_ps(load_u16<kTail>(p, m), lut, 4);
}

// is_active of 16 gates by kRule.
template <GateRule kRule>
inline Mask gate_active(Vec x, Vec active_min) {
  const __m512 zero = _mm512_setzero_ps();
  if constexpr (kRule == GateRule::nonzero) {
    return _mm512_cmp_ps_mask(x.v, zero, _CMP_NEQ_OQ);
  } else if constexpr (kRule == GateRule::positive) {
    return _mm512_cmp_ps_mask(x.v, zero, _CMP_GT_OQ);
  } else {
    return _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(x.v, active_min.v, _CMP_GE_OQ), x.v, zero, _CMP_NEQ_UQ);
  }
}

// h = act(gate) * up: v *= y, and is_number_nonzero(y) added to the active mask.
inline void times_up(Vec& v, Mask& active, Vec y) {
  v = v * y;
  active = _mm512_mask_cmp_ps_mask(active, y.v, _mm512_setzero_ps(), _CMP_NEQ_OQ);
}

// The chunk statistics of 16 columns, in registers for R rows: accumulate_rows's sum1, sum2, m and count.
struct VecStats {
  __m512 sum1, sum2, m;
  __m512i count;
  VecStats(const float* s1, const float* s2, const float* mx, const int32_t* nz)
      : sum1(_mm512_load_ps(s1)), sum2(_mm512_load_ps(s2)), m(_mm512_load_ps(mx)), count(_mm512_load_si512(nz)) {}
  // h = v, counted where active (is_number_nonzero(y) already in it)
  void add(Vec v, Mask active) {
    const __m512 av = _mm512_abs_ps(v.v);
    sum1 = _mm512_add_ps(sum1, av);
    sum2 = _mm512_fmadd_ps(v.v, v.v, sum2);  // fma_f32(v, v, sum2)
    m = _mm512_max_ps(av, m);  // av > m ? av : m
    count = _mm512_mask_sub_epi32(count, active, count, _mm512_set1_epi32(-1));
  }
  void store(float* s1, float* s2, float* mx, int32_t* nz) const {
    _mm512_store_ps(s1, sum1);
    _mm512_store_ps(s2, sum2);
    _mm512_store_ps(mx, m);
    _mm512_store_si512(nz, count);
  }
};

}  // namespace
}  // namespace minigpt::cpu::MINIGPT_ISA
