// Unpacking GGUF weight blocks (gguf_formats.h) into 32-element sub-blocks, one definition per
// ISA. Included only by ISA kernel files (compiled with SAGELLM_ISA set), like cpu/vec.h.
//
// Each format is a struct with its traits and, for the SIMD paths (AVX2, AVX-512), the block
// decoded one 32-element sub-block at a time (kSub sub-blocks per block):
//   scales(blk)      the block's fp32 scales, once per block;
//   quants(blk, j)   sub-block j as a __m256i of 32 bytes in element order, unsigned (0..63)
//                    except for Q8_0, whose bytes are the stored int8 values;
//   scale(sc, j)     a __m256 with the fp32 scale of the elements each int32 lane of a u8 x s8
//                    dot product covers (lane i = elements 4i..4i+3; only Q6_K has two scales
//                    per 32 elements);
//   min(sc, j)       the additive term of kHasMin formats (element = scale * q + min), else 0.
// The scalar path instead decodes a whole row: row_scalar(w, blocks, q, s16, mins) gives q[k]
// the signed integer values (offset already removed), s16[k / 16] the scales of each 16
// elements and mins[k / 32] the additive terms (kHasMin formats).
// Offsets: the SIMD paths keep q unsigned and subtract offset * d through the min term (Q4_0,
// Q5_0), except for Q6_K (kOffset = 32), whose offset applies per 16 elements under two scales:
// it is folded into the dot product's start value instead (GgufActivations::corr).
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu/vec.h"
#include "quant/cpu/gguf_formats.h"

#ifndef SAGELLM_ALWAYS_INLINE
#define SAGELLM_ALWAYS_INLINE inline __attribute__((always_inline))
#endif

namespace sagellm::cpu::SAGELLM_ISA::gguf_decode {

using namespace ::sagellm::cpu::gguf;

SAGELLM_ALWAYS_INLINE uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
SAGELLM_ALWAYS_INLINE uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// sc[0..7] then mn[0..7] of a Q4_K / Q5_K block, unpacked from its 12 scale bytes, working on
// four bytes at a time (see BlockQ4_K for the packing).
SAGELLM_ALWAYS_INLINE void kquant_scales(const uint8_t* scales, uint8_t out[16]) {
  uint32_t u[3];
  std::memcpy(u, scales, sizeof(u));
  const uint32_t r[4] = {
      u[0] & 0x3f3f3f3fu,
      (u[2] & 0x0f0f0f0fu) | ((u[0] >> 2) & 0x30303030u),
      u[1] & 0x3f3f3f3fu,
      ((u[2] >> 4) & 0x0f0f0f0fu) | ((u[1] >> 2) & 0x30303030u),
  };
  std::memcpy(out, r, sizeof(r));
}

#if SAGELLM_ISA_LEVEL > 0

SAGELLM_ALWAYS_INLINE float fp16_at(const uint8_t* p) { return _cvtsh_ss(load_u16(p)); }

SAGELLM_ALWAYS_INLINE __m256i load256(const void* p) {
  return _mm256_loadu_si256(static_cast<const __m256i*>(p));
}
SAGELLM_ALWAYS_INLINE __m256i low_nibbles(__m256i x) {
  return _mm256_and_si256(x, _mm256_set1_epi8(0x0f));
}
SAGELLM_ALWAYS_INLINE __m256i high_nibbles(__m256i x) {
  return _mm256_and_si256(_mm256_srli_epi16(x, 4), _mm256_set1_epi8(0x0f));
}

// 16 bytes of nibble pairs -> 32 bytes: the 16 low nibbles, then the 16 high ones.
SAGELLM_ALWAYS_INLINE __m256i nibbles16(const uint8_t* p) {
  const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i y = _mm256_inserti128_si256(_mm256_castsi128_si256(x), _mm_srli_epi16(x, 4), 1);
  return low_nibbles(y);
}

// Byte i = 0x10 where bit i of `bits` is set, else 0 (the fifth bit of Q5_0 / Q5_1).
SAGELLM_ALWAYS_INLINE __m256i bit4_of_bits32(uint32_t bits) {
#if SAGELLM_ISA_LEVEL == 2
  return _mm256_maskz_mov_epi8(static_cast<__mmask32>(bits), _mm256_set1_epi8(0x10));
#else
  // Byte i gets byte i / 8 of `bits`, then keeps bit i % 8 of it.
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int>(bits)),
      _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ull));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
#endif
}

// Formats with one fp16 scale (and min) per 32 elements.
struct SmallScales {
  float d, m;
};

// Q4_0, Q4_1, Q5_0, Q5_1. Q4_0 and Q5_0 keep q unsigned and subtract their offset either
// through corr (kByCorr: the dot product starts at -offset * sum(a)) or through the min term
// (min = -offset * d): the first costs nothing per sub-block but 4 bytes per input element of
// cache, the second a min term per sub-block (see act_layout::offsets_by_corr).
template <int kType, bool kByCorr>
struct Small {
  static constexpr bool kFive = kType == kQ5_0 || kType == kQ5_1;
  static constexpr bool kStoredMin = kType == kQ4_1 || kType == kQ5_1;
  static constexpr int kQOffset = kStoredMin ? 0 : (kFive ? 16 : 8);
  static constexpr int kElems = 32, kSub = 1;
  static constexpr int kHead = kStoredMin ? 4 : 2;
  static constexpr int kBytes = kHead + (kFive ? 4 : 0) + 16;
  static constexpr int kOffset = kByCorr ? kQOffset : 0;
  static constexpr bool kHasMin = kStoredMin || !kByCorr, kSigned = false;
  using Scales = SmallScales;
  static SAGELLM_ALWAYS_INLINE Scales scales(const uint8_t* b) {
    const float d = fp16_at(b);
    return {d, kStoredMin ? fp16_at(b + 2) : -float(kQOffset) * d};
  }
  static SAGELLM_ALWAYS_INLINE __m256i quants(const uint8_t* b, int) {
    const __m256i q = nibbles16(b + kBytes - 16);
    if constexpr (kFive) {
      return _mm256_or_si256(q, bit4_of_bits32(load_u32(b + kHead)));
    } else {
      return q;
    }
  }
  static SAGELLM_ALWAYS_INLINE __m256 scale(const Scales& s, int) { return _mm256_set1_ps(s.d); }
  static SAGELLM_ALWAYS_INLINE float min(const Scales& s, int) { return s.m; }
};

struct Q8_0 {
  // Signed bytes, multiplied as |w| x sign(a, w).
  static constexpr int kElems = 32, kBytes = 34, kSub = 1, kOffset = 0;
  static constexpr bool kHasMin = false, kSigned = true;
  using Scales = SmallScales;
  static SAGELLM_ALWAYS_INLINE Scales scales(const uint8_t* b) { return {fp16_at(b), 0.0f}; }
  static SAGELLM_ALWAYS_INLINE __m256i quants(const uint8_t* b, int) { return load256(b + 2); }
  static SAGELLM_ALWAYS_INLINE __m256 scale(const Scales& s, int) { return _mm256_set1_ps(s.d); }
  static SAGELLM_ALWAYS_INLINE float min(const Scales&, int) { return 0.0f; }
};

// Q4_K / Q5_K: d * sc[j] and -dmin * mn[j] per sub-block j.
struct KScales {
  float sd[8], md[8];
};
SAGELLM_ALWAYS_INLINE KScales kquant_scale_floats(const uint8_t* blk) {
  alignas(16) uint8_t sm[16];
  kquant_scales(blk + 4, sm);
  const __m128i v = _mm_load_si128(reinterpret_cast<const __m128i*>(sm));
  const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
  const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8)));
  KScales s;
  _mm256_storeu_ps(s.sd, _mm256_mul_ps(sc, _mm256_set1_ps(fp16_at(blk))));
  _mm256_storeu_ps(s.md, _mm256_mul_ps(mn, _mm256_set1_ps(-fp16_at(blk + 2))));
  return s;
}

// The sub-blocks of a 256-element block are decoded by j = 0..7 with j a compile-time constant
// after unrolling, so loads shared by several sub-blocks (a 32-byte chunk of nibbles, the high
// bits) are emitted once.
struct Q4_K {
  static constexpr int kElems = 256, kBytes = 144, kSub = 8, kOffset = 0;
  static constexpr bool kHasMin = true, kSigned = false;
  using Scales = KScales;
  static SAGELLM_ALWAYS_INLINE Scales scales(const uint8_t* b) { return kquant_scale_floats(b); }
  static SAGELLM_ALWAYS_INLINE __m256i quants(const uint8_t* b, int j) {
    const __m256i x = load256(b + 16 + 32 * (j / 2));
    return j % 2 == 0 ? low_nibbles(x) : high_nibbles(x);
  }
  static SAGELLM_ALWAYS_INLINE __m256 scale(const Scales& s, int j) {
    return _mm256_set1_ps(s.sd[j]);
  }
  static SAGELLM_ALWAYS_INLINE float min(const Scales& s, int j) { return s.md[j]; }
};

struct Q5_K {
  static constexpr int kElems = 256, kBytes = 176, kSub = 8, kOffset = 0;
  static constexpr bool kHasMin = true, kSigned = false;
  using Scales = KScales;
  static SAGELLM_ALWAYS_INLINE Scales scales(const uint8_t* b) { return kquant_scale_floats(b); }
  static SAGELLM_ALWAYS_INLINE __m256i quants(const uint8_t* b, int j) {
    const __m256i x = load256(b + 48 + 32 * (j / 2));
    const __m256i lo = j % 2 == 0 ? low_nibbles(x) : high_nibbles(x);
    // Bit j of every qh byte, moved to bit 4.
    const __m256i h = _mm256_and_si256(_mm256_srli_epi16(load256(b + 16), j),
                                       _mm256_set1_epi8(0x01));
    return _mm256_or_si256(lo, _mm256_slli_epi16(h, 4));
  }
  static SAGELLM_ALWAYS_INLINE __m256 scale(const Scales& s, int j) {
    return _mm256_set1_ps(s.sd[j]);
  }
  static SAGELLM_ALWAYS_INLINE float min(const Scales& s, int j) { return s.md[j]; }
};

struct Q6_K {
  static constexpr int kElems = 256, kBytes = 210, kSub = 8, kOffset = 32;
  static constexpr bool kHasMin = false, kSigned = false;
  struct Scales {
    alignas(32) float sd[16];  // d * scales[i] for the 16 sub-blocks of 16
  };
  static SAGELLM_ALWAYS_INLINE Scales scales(const uint8_t* b) {
    Scales s;
    const __m256 d = _mm256_set1_ps(fp16_at(b + 208));
    const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192));
    const __m128i sc_hi = _mm_srli_si128(sc, 8);
    _mm256_store_ps(s.sd, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc))));
    _mm256_store_ps(s.sd + 8, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc_hi))));
    return s;
  }
  // Sub-block g = 4 h + k: low 4 bits from ql[64 h + 32 (k % 2) ...] (nibble k / 2), top 2 bits
  // = bits 2k, 2k+1 of qh[32 h ...], moved to bits 4-5.
  static SAGELLM_ALWAYS_INLINE __m256i quants(const uint8_t* b, int g) {
    const int h = g / 4, k = g % 4;
    const __m256i ql = load256(b + 64 * h + 32 * (k % 2));
    const __m256i lo = k < 2 ? low_nibbles(ql) : high_nibbles(ql);
    const __m256i qh = load256(b + 128 + 32 * h);
    const __m256i top = 2 * k <= 4 ? _mm256_slli_epi16(qh, 4 - 2 * k) : _mm256_srli_epi16(qh, 2);
    return _mm256_or_si256(lo, _mm256_and_si256(top, _mm256_set1_epi8(0x30)));
  }
  // Lanes 0-3 cover elements 0-15 (scale 2g), lanes 4-7 elements 16-31 (scale 2g+1).
  static SAGELLM_ALWAYS_INLINE __m256 scale(const Scales& s, int g) {
    return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_broadcast_ss(s.sd + 2 * g)),
                                _mm_broadcast_ss(s.sd + 2 * g + 1), 1);
  }
  static SAGELLM_ALWAYS_INLINE float min(const Scales&, int) { return 0.0f; }
};

#else  // scalar

SAGELLM_ALWAYS_INLINE float fp16_at(const uint8_t* p) { return to_float(f16{load_u16(p)}); }

// Q4_0 / Q4_1 / Q5_0 / Q5_1: element i of a block from its nibbles (and fifth bits).
SAGELLM_ALWAYS_INLINE int small_q(const uint8_t* qs, uint32_t qh, int i, bool five_bits) {
  const int nib = i < 16 ? (qs[i] & 0x0f) : (qs[i - 16] >> 4);
  return five_bits ? nib | int((qh >> i) & 1u) << 4 : nib;
}

template <int kType>
struct Small {
  static constexpr bool kFive = kType == kQ5_0 || kType == kQ5_1;
  static constexpr bool kHasMin = kType == kQ4_1 || kType == kQ5_1;
  static constexpr int kElems = 32;
  static constexpr int kBytes = 2 + (kHasMin ? 2 : 0) + (kFive ? 4 : 0) + 16;
  static constexpr int kOffset = kHasMin ? 0 : (kFive ? 16 : 8);
  static void row_scalar(const uint8_t* w, int64_t blocks, int8_t* q, float* s16, float* mins) {
    for (int64_t b = 0; b < blocks; ++b, w += kBytes) {
      const int head = kHasMin ? 4 : 2;  // d (and m)
      const uint32_t qh = kFive ? load_u32(w + head) : 0u;
      const uint8_t* qs = w + head + (kFive ? 4 : 0);
      for (int i = 0; i < 32; ++i) q[32 * b + i] = int8_t(small_q(qs, qh, i, kFive) - kOffset);
      s16[2 * b] = s16[2 * b + 1] = fp16_at(w);
      if (kHasMin) mins[b] = fp16_at(w + 2);
    }
  }
};
using Q4_0 = Small<kQ4_0>;
using Q4_1 = Small<kQ4_1>;
using Q5_0 = Small<kQ5_0>;
using Q5_1 = Small<kQ5_1>;

struct Q8_0 {
  static constexpr int kElems = 32, kBytes = 34;
  static constexpr bool kHasMin = false;
  static void row_scalar(const uint8_t* w, int64_t blocks, int8_t* q, float* s16, float*) {
    for (int64_t b = 0; b < blocks; ++b, w += kBytes) {
      std::memcpy(q + 32 * b, w + 2, 32);
      s16[2 * b] = s16[2 * b + 1] = fp16_at(w);
    }
  }
};

template <bool kFive>
struct KQuant {
  static constexpr int kElems = 256, kBytes = kFive ? 176 : 144;
  static constexpr bool kHasMin = true;
  static void row_scalar(const uint8_t* w, int64_t blocks, int8_t* q, float* s16, float* mins) {
    for (int64_t b = 0; b < blocks; ++b, w += kBytes) {
      uint8_t sm[16];
      kquant_scales(w + 4, sm);
      const float d = fp16_at(w), dmin = fp16_at(w + 2);
      const uint8_t* qh = w + 16;
      const uint8_t* qs = w + (kFive ? 48 : 16);
      for (int j = 0; j < 8; ++j) {
        int8_t* out = q + 256 * b + 32 * j;
        for (int l = 0; l < 32; ++l) {
          const uint8_t byte = qs[32 * (j / 2) + l];
          int v = (j % 2 == 0) ? (byte & 0x0f) : (byte >> 4);
          if (kFive) v |= ((qh[l] >> j) & 1) << 4;
          out[l] = int8_t(v);
        }
        s16[16 * b + 2 * j] = s16[16 * b + 2 * j + 1] = d * float(sm[j]);
        mins[8 * b + j] = -dmin * float(sm[8 + j]);
      }
    }
  }
};
using Q4_K = KQuant<false>;
using Q5_K = KQuant<true>;

struct Q6_K {
  static constexpr int kElems = 256, kBytes = 210;
  static constexpr bool kHasMin = false;
  static void row_scalar(const uint8_t* w, int64_t blocks, int8_t* q, float* s16, float*) {
    for (int64_t b = 0; b < blocks; ++b, w += kBytes) {
      const float d = fp16_at(w + 208);
      for (int g = 0; g < 8; ++g) {
        const int h = g / 4, k = g % 4;
        for (int l = 0; l < 32; ++l) {
          const uint8_t lo = w[64 * h + 32 * (k % 2) + l];
          const int low4 = k < 2 ? (lo & 0x0f) : (lo >> 4);
          const int top2 = (w[128 + 32 * h + l] >> (2 * k)) & 3;
          q[256 * b + 32 * g + l] = int8_t((low4 | top2 << 4) - 32);
        }
      }
      for (int s = 0; s < 16; ++s) s16[16 * b + s] = d * float(int8_t(w[192 + s]));
    }
  }
};

#endif

}  // namespace sagellm::cpu::SAGELLM_ISA::gguf_decode
