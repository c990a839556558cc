// Loads of quantized KV rows (int8, float8_e4m3fn) as fp32 vectors, for the attention kernel
// file only (compiled once per ISA, like vec.h). The per-(token, head) scale is not applied here:
// the kernel folds it into the score (K) and the softmax weight (V), or into the fp32 tile when a
// chunk is widened once for many query rows.
//
// e4m3fn is widened through fp16: its 7 exponent/mantissa bits, shifted left by 7, are an fp16 of
// the same value times 2^-8 (normals and subnormals alike, since both formats' subnormal ranges
// line up under that shift), which F16C converts exactly. The 2^8 goes into the scale
// (kv_load_factor). NaN encodings (0x7f / 0xff) are written by reshape_and_cache only for NaN inputs.
#pragma once

#include <cstdint>

#include "attention/cpu/attention_kernels.h"
#include "cpu/vec.h"

namespace sagellm::cpu::SAGELLM_ISA {

template <typename T>
inline Vec load_kv(const T* p) {
  return Vec::load(p);
}

// What a loaded row must be multiplied by (besides its scale) to give the stored value.
template <typename T>
inline constexpr float kv_load_factor = 1.0f;
template <>
inline constexpr float kv_load_factor<e4m3> = 256.0f;

// The byte sign-extended to 16 bits and shifted left by 7 holds the sign at bit 15 and the
// exponent/mantissa at bits 13..7, plus a copy of the sign at bit 14 that this mask clears.
inline constexpr short kFp16FromE4m3 = static_cast<short>(0xBFFF);

#if SAGELLM_ISA_LEVEL == 2

inline Vec load_kv(const q8* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return Vec(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)));
}

inline Vec load_kv(const e4m3* p) {
  const __m256i b = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i h = _mm256_and_si256(_mm256_slli_epi16(b, 7), _mm256_set1_epi16(kFp16FromE4m3));
  return Vec(_mm512_cvtph_ps(h));
}

#elif SAGELLM_ISA_LEVEL == 1

inline Vec load_kv(const q8* p) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return Vec(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)));
}

inline Vec load_kv(const e4m3* p) {
  const __m128i b = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m128i h = _mm_and_si128(_mm_slli_epi16(b, 7), _mm_set1_epi16(kFp16FromE4m3));
  return Vec(_mm256_cvtph_ps(h));
}

#else

inline Vec load_kv(const q8* p) {
  Vec r;
  for (int i = 0; i < Vec::kWidth; ++i) r.v[i] = static_cast<float>(p[i].v);
  return r;
}

inline Vec load_kv(const e4m3* p) {
  Vec r;
  for (int i = 0; i < Vec::kWidth; ++i) {
    const uint16_t b = p[i].bits;
    r.v[i] = to_float(f16{static_cast<uint16_t>(((b & 0x80u) << 8) | ((b & 0x7fu) << 7))});
  }
  return r;
}

#endif

}  // namespace sagellm::cpu::SAGELLM_ISA
