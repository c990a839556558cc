// Unpacking GGUF weight blocks for the AVX-512 kernels: 64 elements (two sub-blocks of 32, a
// "unit") per 512-bit register, in element order, so one vpdpbusd covers both. Included only by
// the AVX-512 variant of quant_kernels.cpp (after its VNNI target pragma).
//
// Against one sub-block per 256-bit register (gguf_decode.h) this halves the instructions per
// element of the dot product, conversion and scaling, which bound the kernel at M = 1 (the
// unpacking stays about the same per element).
//
// Per format:
//   Formats of 32-element blocks (kSub = 1): pair(b) decodes blocks b and b + kBytes, single(b)
//     block b with the upper half zero (the odd block at the end of a row), with the blocks'
//     min terms (kHasMin formats) in Unit::mins.
//   K-quants (kSub = 8): scales(b) once per block, mins(scales) its 8 min terms, then
//     unit(b, sc, uu) for uu = 0..3, a compile-time constant after unrolling.
// A Unit holds the 64 bytes (unsigned, but the raw int8 for Q8_0) and the fp32 scale of each
// int32 lane of the dot product (lane i = elements 4i..4i+3). Offsets (Q4_0 8, Q5_0 16, Q8_0
// 128 once its top bit is flipped) are subtracted through corr or the min term (kByCorr, see
// act_layout::offsets_by_corr); Q6_K's always through corr.
#pragma once

#include <cstdint>

#include "quant/cpu/gguf_decode.h"

#if SAGELLM_ISA_LEVEL != 2
#error "gguf_decode_avx512.h is for the AVX-512 variant only"
#endif

namespace sagellm::cpu::SAGELLM_ISA::gguf_decode512 {

using gguf_decode::fp16_at;
using gguf_decode::kquant_scales;
using gguf_decode::load_u16;
using gguf_decode::load_u32;

struct Unit {
  __m512i q;
  __m512 scale;
  __m128 mins;  // formats of 32-element blocks with a min term: the two blocks' in lanes 0, 1
};

SAGELLM_ALWAYS_INLINE __m128i load128(const uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}
SAGELLM_ALWAYS_INLINE __m256i load256(const uint8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
SAGELLM_ALWAYS_INLINE __m512i low4(__m512i x) {
  return _mm512_and_si512(x, _mm512_set1_epi8(0x0f));
}
SAGELLM_ALWAYS_INLINE __m512i high4(__m512i x) {
  return _mm512_and_si512(_mm512_srli_epi16(x, 4), _mm512_set1_epi8(0x0f));
}
// Per 16-bit element shift counts: `lo` in the low 256 bits, `hi` in the high ones.
SAGELLM_ALWAYS_INLINE __m512i counts256(int lo, int hi) {
  return _mm512_inserti64x4(_mm512_set1_epi16(static_cast<short>(lo)),
                            _mm256_set1_epi16(static_cast<short>(hi)), 1);
}

// The first 4 bytes of two blocks (the second zero when absent), as fp32:
// [d0, m0, d1, m1] where the blocks start with fp16 d and m (m is junk for formats without it).
SAGELLM_ALWAYS_INLINE __m128 head_pair(const uint8_t* b0, const uint8_t* b1, bool two) {
  __m128i h = _mm_cvtsi32_si128(static_cast<int>(load_u32(b0)));
  if (two) h = _mm_insert_epi32(h, static_cast<int>(load_u32(b1)), 1);
  return _mm_cvtph_ps(h);
}
// [d0 x 8, d1 x 8] from head_pair's result.
SAGELLM_ALWAYS_INLINE __m512 d_pair(__m128 head) {
  const __m512i idx = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi32(2), 1);
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(head));
}
// [d0 x 4, d1 x 4, d0 x 4, d1 x 4]: the lane scales of a unit with split halves.
SAGELLM_ALWAYS_INLINE __m512 d_pair_split(__m128 head) {
  const __m512i idx = _mm512_set_epi32(2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0);
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(head));
}
// [m0, m1] from head_pair's result.
SAGELLM_ALWAYS_INLINE __m128 m_pair(__m128 head) {
  return _mm_shuffle_ps(head, head, _MM_SHUFFLE(3, 1, 3, 1));
}
// -offset * [d0, d1] from head_pair's result.
SAGELLM_ALWAYS_INLINE __m128 offset_pair(__m128 head, float offset) {
  return _mm_mul_ps(_mm_shuffle_ps(head, head, _MM_SHUFFLE(2, 0, 2, 0)), _mm_set1_ps(-offset));
}

// qs of blocks 0 and 1 (16 bytes each) -> [lo nibbles 0, lo nibbles 1, hi 0, hi 1]: elements
// 0-15 of both blocks, then 16-31 of both (the split-halves order of gguf_act_layout.h).
SAGELLM_ALWAYS_INLINE __m512i nibble_pair(__m128i qs0, __m128i qs1) {
  const __m256i y = _mm256_inserti128_si256(_mm256_castsi128_si256(qs0), qs1, 1);
  const __m256i mask = _mm256_set1_epi8(0x0f);
  const __m256i lo = _mm256_and_si256(y, mask);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(y, 4), mask);
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

// Q4_0, Q4_1, Q5_0, Q5_1, unpacked in the split-halves order (act_layout::split_halves). Q4_0
// and Q5_0 keep q unsigned and subtract their offset through corr (kByCorr) or the min term
// (-offset * d), as in gguf_decode.h.
template <int kType, bool kByCorr>
struct Small {
  static constexpr bool kFive = kType == gguf::kQ5_0 || kType == gguf::kQ5_1;
  static constexpr bool kStoredMin = kType == gguf::kQ4_1 || kType == gguf::kQ5_1;
  static constexpr int kQOffset = kStoredMin ? 0 : (kFive ? 16 : 8);
  static constexpr bool kHasMin = kStoredMin || !kByCorr, kSigned = false;
  static constexpr int kElems = 32, kSub = 1, kOffset = kByCorr ? kQOffset : 0;
  static constexpr int kHead = kStoredMin ? 4 : 2;
  static constexpr int kBytes = kHead + (kFive ? 4 : 0) + 16;

  // Blocks b0 and (when `two`) b1 -> their unit.
  static SAGELLM_ALWAYS_INLINE Unit decode(const uint8_t* b0, const uint8_t* b1, bool two) {
    const __m128i qs1 = two ? load128(b1 + kBytes - 16) : _mm_setzero_si128();
    __m512i q = nibble_pair(load128(b0 + kBytes - 16), qs1);
    if constexpr (kFive) {
      // Fifth bits in the same order: bit j of qh is element j of its block.
      const uint64_t h0 = load_u32(b0 + kHead), h1 = two ? load_u32(b1 + kHead) : 0u;
      const uint64_t bits = (h0 & 0xffffu) | (h1 & 0xffffu) << 16 | (h0 >> 16) << 32 |
                            (h1 >> 16) << 48;
      q = _mm512_or_si512(q, _mm512_maskz_mov_epi8(static_cast<__mmask64>(bits),
                                                   _mm512_set1_epi8(0x10)));
    }
    const __m128 head = head_pair(b0, b1, two);
    const __m128 mins = kStoredMin ? m_pair(head) : offset_pair(head, float(kQOffset));
    return {q, d_pair_split(head), mins};
  }
  static SAGELLM_ALWAYS_INLINE Unit pair(const uint8_t* b) { return decode(b, b + kBytes, true); }
  static SAGELLM_ALWAYS_INLINE Unit single(const uint8_t* b) { return decode(b, b, false); }
};
template <bool kByCorr>
struct Q8_0 {
  // Raw int8; the kernel flips the top bit (q + 128) and subtracts 128 * sum(a) through corr
  // (kByCorr) or 128 * d through the min term.
  static constexpr bool kHasMin = !kByCorr, kSigned = true;
  static constexpr int kElems = 32, kSub = 1, kBytes = 34, kOffset = kByCorr ? 128 : 0;
  static SAGELLM_ALWAYS_INLINE Unit pair(const uint8_t* b) {
    const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(load256(b + 2)),
                                         load256(b + kBytes + 2), 1);
    const __m128 head = head_pair(b, b + kBytes, true);
    return {q, d_pair(head), offset_pair(head, 128.0f)};
  }
  static SAGELLM_ALWAYS_INLINE Unit single(const uint8_t* b) {
    const __m128 head = head_pair(b, b, false);
    return {_mm512_zextsi256_si512(load256(b + 2)), d_pair(head), offset_pair(head, 128.0f)};
  }
};

// [v[i] x 8, v[i + 1] x 8] from the first 8 (or 16) floats of v.
SAGELLM_ALWAYS_INLINE __m512 scale_pair(__m512 v, int i) {
  const __m512i idx = _mm512_inserti64x4(_mm512_set1_epi32(i), _mm256_set1_epi32(i + 1), 1);
  return _mm512_permutexvar_ps(idx, v);
}

// Q4_K / Q5_K: d * sc[j] (in the low 8 lanes of sd) and -dmin * mn[j], j < 8.
struct KScales {
  __m512 sd;
  __m256 md;
};
SAGELLM_ALWAYS_INLINE KScales kquant_scales512(const uint8_t* b) {
  alignas(16) uint8_t sm[16];
  kquant_scales(b + 4, sm);
  const __m128i v = _mm_load_si128(reinterpret_cast<const __m128i*>(sm));
  const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
  const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8)));
  return {_mm512_castps256_ps512(_mm256_mul_ps(sc, _mm256_set1_ps(fp16_at(b)))),
          _mm256_mul_ps(mn, _mm256_set1_ps(-fp16_at(b + 2)))};
}

template <bool kFive>
struct KQuant {
  static constexpr bool kHasMin = true, kSigned = false;
  static constexpr int kElems = 256, kSub = 8, kBytes = kFive ? 176 : 144, kOffset = 0;
  static constexpr int kQs = kFive ? 48 : 16;
  using Scales = KScales;
  static SAGELLM_ALWAYS_INLINE Scales scales(const uint8_t* b) { return kquant_scales512(b); }
  static SAGELLM_ALWAYS_INLINE __m256 mins(const Scales& sc) { return sc.md; }
  // Unit uu = sub-blocks 2uu (low nibbles of the 32-byte chunk uu) and 2uu + 1 (high nibbles).
  static SAGELLM_ALWAYS_INLINE Unit unit(const uint8_t* b, Scales sc, int uu) {
    const __m512i x = _mm512_broadcast_i64x4(load256(b + kQs + 32 * uu));
    __m512i q = low4(_mm512_srlv_epi16(x, counts256(0, 4)));
    if constexpr (kFive) {
      // Bits 2uu and 2uu + 1 of every qh byte, moved to bit 4.
      const __m512i qh = _mm512_broadcast_i64x4(load256(b + 16));
      const __m512i h = _mm512_and_si512(_mm512_srlv_epi16(qh, counts256(2 * uu, 2 * uu + 1)),
                                         _mm512_set1_epi8(0x01));
      q = _mm512_or_si512(q, _mm512_slli_epi16(h, 4));
    }
    return {q, scale_pair(sc.sd, 2 * uu), _mm_setzero_ps()};
  }
};
using Q4_K = KQuant<false>;
using Q5_K = KQuant<true>;

struct Q6_K {
  static constexpr bool kHasMin = false, kSigned = false;
  static constexpr int kElems = 256, kSub = 8, kBytes = 210, kOffset = 32;
  using Scales = __m512;  // d * scales[i], i < 16
  static SAGELLM_ALWAYS_INLINE __m256 mins(const Scales&) { return _mm256_setzero_ps(); }
  static SAGELLM_ALWAYS_INLINE Scales scales(const uint8_t* b) {
    const __m512 s = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load128(b + 192)));
    return _mm512_mul_ps(s, _mm512_set1_ps(fp16_at(b + 208)));
  }
  // Unit uu = sub-blocks g = 2uu, 2uu + 1, in half h = uu / 2 with k = 2 (uu % 2) and k + 1:
  // low 4 bits from ql[64 h ... 64 h + 64] (nibble uu % 2), top 2 bits = bits 2k, 2k + 2 of
  // qh[32 h ...] for the two sub-blocks, moved to bits 4-5.
  static SAGELLM_ALWAYS_INLINE Unit unit(const uint8_t* b, Scales sc, int uu) {
    const int h = uu / 2, kk = uu % 2;
    const __m512i ql = _mm512_loadu_si512(b + 64 * h);
    const __m512i lo = kk == 0 ? low4(ql) : high4(ql);
    const __m512i qh = _mm512_broadcast_i64x4(load256(b + 128 + 32 * h));
    const __m512i top = kk == 0 ? _mm512_sllv_epi16(qh, counts256(4, 2))
                                : _mm512_srlv_epi16(qh, counts256(0, 2));
    const __m512i q = _mm512_or_si512(lo, _mm512_and_si512(top, _mm512_set1_epi8(0x30)));
    // Lanes 4i..4i+3 take scale 4uu + i (16 elements each).
    const __m512i idx = _mm512_add_epi32(
        _mm512_set1_epi32(4 * uu),
        _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0));
    return {q, _mm512_permutexvar_ps(idx, sc), _mm_setzero_ps()};
  }
};

}  // namespace sagellm::cpu::SAGELLM_ISA::gguf_decode512
