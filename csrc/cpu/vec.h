// A small fp32 vector type for the CPU kernels, one definition per ISA.
//
// Included only by files in SAGELLM_CPU_KERNEL_SOURCES, which CMake compiles once per ISA with
// SAGELLM_ISA set to scalar, avx2 or avx512. Everything here lives in namespace
// sagellm::cpu::<isa>, so the three variants never share an inline function (an AVX-512 copy
// picked by the linker for the scalar path would fault on an older CPU).
//
// Vec holds kWidth floats (16 on AVX-512, 8 on AVX2 and on the scalar path, where the compiler
// vectorises the plain loops with SSE2). Loads and stores convert from and to fp32, bf16 and fp16;
// arithmetic is always fp32. Rounding to bf16/fp16 is round-to-nearest-even, as torch does.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/types.h"

#if !defined(SAGELLM_ISA)
#error "vec.h is compiled per ISA: SAGELLM_ISA must be scalar, avx2 or avx512"
#endif

#define SAGELLM_ISA_scalar 0
#define SAGELLM_ISA_avx2 1
#define SAGELLM_ISA_avx512 2
#define SAGELLM_ISA_ID_(isa) SAGELLM_ISA_##isa
#define SAGELLM_ISA_ID(isa) SAGELLM_ISA_ID_(isa)
#define SAGELLM_ISA_LEVEL SAGELLM_ISA_ID(SAGELLM_ISA)

#if SAGELLM_ISA_LEVEL > 0
#include <immintrin.h>
#endif

namespace sagellm::cpu::SAGELLM_ISA {

// ---------------------------------------------------------------------------------------------
// Scalar conversions (used on every path for tails and by the scalar Vec).

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) { return bits_to_float(uint32_t(x.bits) << 16); }
inline float to_float(f16 x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);  // signed zero
    // Subnormal half: normalise.
    int e = -1;
    do {
      man <<= 1;
      ++e;
    } while ((man & 0x400u) == 0);
    man &= 0x3ffu;
    return bits_to_float(sign | uint32_t(127 - 15 - e) << 23 | (man << 13));
  }
  return bits_to_float(sign | (exp + (127 - 15)) << 23 | (man << 13));
}

template <typename T>
inline T from_float(float f);
template <>
inline float from_float<float>(float f) {
  return f;
}
template <>
inline bf16 from_float<bf16>(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40u)};  // quiet nan
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(u >> 16)};
}
template <>
inline f16 from_float<f16>(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t au = u & 0x7fffffffu;
  if (au > 0x7f800000u) return f16{uint16_t(sign | 0x7e00u)};  // nan
  if (au >= 0x477ff000u) return f16{uint16_t(sign | 0x7c00u)};  // rounds to inf
  if (au < 0x38800000u) {
    // Result is subnormal (or zero) in half: scale so the integer part is the mantissa, then
    // round to nearest even in float arithmetic, which is exact here.
    const float a = bits_to_float(au) * 16777216.0f;  // * 2^24 = / 2^-24 (half's smallest step)
    const float r = std::nearbyint(a);
    return f16{uint16_t(sign | uint32_t(r))};
  }
  // Normal: rebias the exponent and round the 13 dropped mantissa bits to nearest even.
  uint32_t v = au - ((127u - 15u) << 23);
  v += 0x0fffu + ((v >> 13) & 1u);
  return f16{uint16_t(sign | (v >> 13))};
}

// ---------------------------------------------------------------------------------------------
#if SAGELLM_ISA_LEVEL == 2  // AVX-512 (F, BW, VL, DQ) + FMA + F16C

struct Vec {
  static constexpr int kWidth = 16;
  __m512 v;

  Vec() = default;
  explicit Vec(__m512 x) : v(x) {}
  static Vec zero() { return Vec(_mm512_setzero_ps()); }
  static Vec set1(float x) { return Vec(_mm512_set1_ps(x)); }

  static Vec load(const float* p) { return Vec(_mm512_loadu_ps(p)); }
  static Vec load(const bf16* p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return Vec(_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
  }
  static Vec load(const f16* p) {
    return Vec(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
  }
  static Vec load(const float* p, int n) {
    return Vec(_mm512_maskz_loadu_ps(__mmask16((1u << n) - 1u), p));
  }
  static Vec load(const bf16* p, int n) {
    __m256i h = _mm256_maskz_loadu_epi16(__mmask16((1u << n) - 1u), p);
    return Vec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  }
  static Vec load(const f16* p, int n) {
    return Vec(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(__mmask16((1u << n) - 1u), p)));
  }

  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store(bf16* p) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16_bits());
  }
  void store(f16* p) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  void store(float* p, int n) const { _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1u), v); }
  void store(bf16* p, int n) const {
    _mm256_mask_storeu_epi16(p, __mmask16((1u << n) - 1u), to_bf16_bits());
  }
  void store(f16* p, int n) const {
    _mm256_mask_storeu_epi16(p, __mmask16((1u << n) - 1u),
                             _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }

  __m256i to_bf16_bits() const {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    r = _mm512_srli_epi32(r, 16);
    // NaN stays NaN (quiet), whatever the rounding carry did.
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(r);
  }

  friend Vec operator+(Vec a, Vec b) { return Vec(_mm512_add_ps(a.v, b.v)); }
  friend Vec operator-(Vec a, Vec b) { return Vec(_mm512_sub_ps(a.v, b.v)); }
  friend Vec operator*(Vec a, Vec b) { return Vec(_mm512_mul_ps(a.v, b.v)); }
  friend Vec operator/(Vec a, Vec b) { return Vec(_mm512_div_ps(a.v, b.v)); }
  static Vec fma(Vec a, Vec b, Vec c) { return Vec(_mm512_fmadd_ps(a.v, b.v, c.v)); }
  static Vec max(Vec a, Vec b) { return Vec(_mm512_max_ps(a.v, b.v)); }
  static Vec min(Vec a, Vec b) { return Vec(_mm512_min_ps(a.v, b.v)); }
  float reduce_add() const { return _mm512_reduce_add_ps(v); }
  float reduce_max() const { return _mm512_reduce_max_ps(v); }

  // 2^n for an integral-valued float vector n in [-126, 127].
  static Vec pow2i(Vec n) {
    __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127));
    return Vec(_mm512_castsi512_ps(_mm512_slli_epi32(e, 23)));
  }
  static Vec round(Vec x) {
    return Vec(_mm512_roundscale_ps(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // Lanes where x < t take `a`, the others keep this vector's value.
  Vec select_lt(Vec x, Vec t, Vec a) const {
    return Vec(_mm512_mask_blend_ps(_mm512_cmp_ps_mask(x.v, t.v, _CMP_LT_OQ), v, a.v));
  }
};

// ---------------------------------------------------------------------------------------------
#elif SAGELLM_ISA_LEVEL == 1  // AVX2 + FMA + F16C

struct Vec {
  static constexpr int kWidth = 8;
  __m256 v;

  Vec() = default;
  explicit Vec(__m256 x) : v(x) {}
  static Vec zero() { return Vec(_mm256_setzero_ps()); }
  static Vec set1(float x) { return Vec(_mm256_set1_ps(x)); }

  static Vec load(const float* p) { return Vec(_mm256_loadu_ps(p)); }
  static Vec load(const bf16* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return Vec(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  static Vec load(const f16* p) {
    return Vec(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  template <typename T>
  static Vec load(const T* p, int n) {
    T tmp[kWidth];
    std::memset(static_cast<void*>(tmp), 0, sizeof(tmp));
    std::memcpy(static_cast<void*>(tmp), p, sizeof(T) * n);
    return load(static_cast<const T*>(tmp));
  }

  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store(bf16* p) const {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    r = _mm256_blendv_epi8(r, qnan, nan);
    // Pack the eight 32-bit lanes (values < 2^16) into eight 16-bit ones, in order.
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  void store(f16* p) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  template <typename T>
  void store(T* p, int n) const {
    T tmp[kWidth];
    store(static_cast<T*>(tmp));
    std::memcpy(static_cast<void*>(p), tmp, sizeof(T) * n);
  }

  friend Vec operator+(Vec a, Vec b) { return Vec(_mm256_add_ps(a.v, b.v)); }
  friend Vec operator-(Vec a, Vec b) { return Vec(_mm256_sub_ps(a.v, b.v)); }
  friend Vec operator*(Vec a, Vec b) { return Vec(_mm256_mul_ps(a.v, b.v)); }
  friend Vec operator/(Vec a, Vec b) { return Vec(_mm256_div_ps(a.v, b.v)); }
  static Vec fma(Vec a, Vec b, Vec c) { return Vec(_mm256_fmadd_ps(a.v, b.v, c.v)); }
  static Vec max(Vec a, Vec b) { return Vec(_mm256_max_ps(a.v, b.v)); }
  static Vec min(Vec a, Vec b) { return Vec(_mm256_min_ps(a.v, b.v)); }
  float reduce_add() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  float reduce_max() const {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static Vec pow2i(Vec n) {
    __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127));
    return Vec(_mm256_castsi256_ps(_mm256_slli_epi32(e, 23)));
  }
  static Vec round(Vec x) {
    return Vec(_mm256_round_ps(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  Vec select_lt(Vec x, Vec t, Vec a) const {
    return Vec(_mm256_blendv_ps(v, a.v, _mm256_cmp_ps(x.v, t.v, _CMP_LT_OQ)));
  }
};

// ---------------------------------------------------------------------------------------------
#else  // scalar: plain loops the compiler vectorises with the baseline ISA

struct Vec {
  static constexpr int kWidth = 8;
  float v[kWidth];

  static Vec zero() { return set1(0.0f); }
  static Vec set1(float x) {
    Vec r;
    for (int i = 0; i < kWidth; ++i) r.v[i] = x;
    return r;
  }
  template <typename T>
  static Vec load(const T* p) {
    Vec r;
    for (int i = 0; i < kWidth; ++i) r.v[i] = to_float(p[i]);
    return r;
  }
  template <typename T>
  static Vec load(const T* p, int n) {
    Vec r = zero();
    for (int i = 0; i < n; ++i) r.v[i] = to_float(p[i]);
    return r;
  }
  template <typename T>
  void store(T* p) const {
    for (int i = 0; i < kWidth; ++i) p[i] = from_float<T>(v[i]);
  }
  template <typename T>
  void store(T* p, int n) const {
    for (int i = 0; i < n; ++i) p[i] = from_float<T>(v[i]);
  }

#define SAGELLM_SCALAR_BINOP(op)                                  \
  friend Vec operator op(const Vec& a, const Vec& b) {            \
    Vec r;                                                        \
    for (int i = 0; i < kWidth; ++i) r.v[i] = a.v[i] op b.v[i];   \
    return r;                                                     \
  }
  SAGELLM_SCALAR_BINOP(+)
  SAGELLM_SCALAR_BINOP(-)
  SAGELLM_SCALAR_BINOP(*)
  SAGELLM_SCALAR_BINOP(/)
#undef SAGELLM_SCALAR_BINOP

  static Vec fma(const Vec& a, const Vec& b, const Vec& c) {
    Vec r;
    for (int i = 0; i < kWidth; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
    return r;
  }
  static Vec max(const Vec& a, const Vec& b) {
    Vec r;
    for (int i = 0; i < kWidth; ++i) r.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i];
    return r;
  }
  static Vec min(const Vec& a, const Vec& b) {
    Vec r;
    for (int i = 0; i < kWidth; ++i) r.v[i] = a.v[i] < b.v[i] ? a.v[i] : b.v[i];
    return r;
  }
  float reduce_add() const {
    float s = 0.0f;
    for (int i = 0; i < kWidth; ++i) s += v[i];
    return s;
  }
  float reduce_max() const {
    float m = v[0];
    for (int i = 1; i < kWidth; ++i) m = v[i] > m ? v[i] : m;
    return m;
  }
  static Vec pow2i(const Vec& n) {
    Vec r;
    for (int i = 0; i < kWidth; ++i) r.v[i] = bits_to_float(uint32_t(int32_t(n.v[i]) + 127) << 23);
    return r;
  }
  static Vec round(const Vec& x) {
    Vec r;
    for (int i = 0; i < kWidth; ++i) r.v[i] = std::nearbyint(x.v[i]);
    return r;
  }
  Vec select_lt(const Vec& x, const Vec& t, const Vec& a) const {
    Vec r;
    for (int i = 0; i < kWidth; ++i) r.v[i] = x.v[i] < t.v[i] ? a.v[i] : v[i];
    return r;
  }
};

#endif

// ---------------------------------------------------------------------------------------------
// Functions built on Vec, the same source for every ISA.

// exp(x) to about 2 ulp over the float range: x = n ln2 + r, |r| <= ln2/2, a Cephes-style polynomial
// for e^r, then scaling by 2^n through the exponent bits. Inputs below -87.3 (including -inf)
// give exactly 0, which the softmax masking relies on; NaN is not propagated (callers never feed
// it one: scores are finite or -inf).
inline Vec exp(Vec x) {
  const Vec lo = Vec::set1(-87.33654f);
  const Vec hi = Vec::set1(88.37626f);
  Vec xc = Vec::min(Vec::max(x, lo), hi);
  Vec n = Vec::round(xc * Vec::set1(1.44269504088896341f));
  Vec r = Vec::fma(n, Vec::set1(-0.693359375f), xc);
  r = Vec::fma(n, Vec::set1(2.12194440e-4f), r);
  Vec p = Vec::set1(1.9875691500e-4f);
  p = Vec::fma(p, r, Vec::set1(1.3981999507e-3f));
  p = Vec::fma(p, r, Vec::set1(8.3334519073e-3f));
  p = Vec::fma(p, r, Vec::set1(4.1665795894e-2f));
  p = Vec::fma(p, r, Vec::set1(1.6666665459e-1f));
  p = Vec::fma(p, r, Vec::set1(5.0000001201e-1f));
  p = Vec::fma(p, r * r, r + Vec::set1(1.0f));
  // n reaches 128 only for x near the top of the range; split the scale so 2^n never overflows
  // the exponent field.
  Vec half_n = Vec::round(n * Vec::set1(0.5f));
  Vec y = p * Vec::pow2i(half_n) * Vec::pow2i(n - half_n);
  return y.select_lt(x, lo, Vec::zero());
}

// tanh(x) = 1 - 2 / (exp(2x) + 1), saturating cleanly at both ends.
inline Vec tanh(Vec x) {
  Vec e = exp(Vec::min(x * Vec::set1(2.0f), Vec::set1(88.0f)));
  return Vec::set1(1.0f) - Vec::set1(2.0f) / (e + Vec::set1(1.0f));
}

}  // namespace sagellm::cpu::SAGELLM_ISA
