// gguf_linear, pass 1: the input rows rounded to int8 blocks of 32, compiled once per ISA.
//
// Per block of 32: amax = max |x|, d = amax / 127, q = round-half-even(x * (127 / amax)), all in
// fp32, so every ISA (and sagellm.ops.reference.quant) gets the same bits; q is in [-127, 127].
// Alongside: dsum = d * sum(q), which the min terms need, and for the formats whose offset the
// kernel folds into the dot product's start value, corr = -offset * (sums of q over each 4
// elements) (gguf_act_layout.h). A block holding a NaN or an infinity gets
// q = 0 and d = dsum = NaN, which makes that row's outputs NaN.
//
// Cost: ~2 bytes written per input element; at decode (m = 1) a few hundred ns per call.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/vec.h"
#include "quant/cpu/gguf_act_layout.h"
#include "quant/cpu/gguf_formats.h"
#include "quant/cpu/quant_kernels.h"

namespace sagellm::cpu::SAGELLM_ISA {
namespace {

constexpr int kAB = gguf::kActBlock;
using act_layout::Slot;


// One block's results, before they are scattered to its slot.
struct Block {
  alignas(32) int8_t q[32];
  alignas(32) int32_t lanes[8];  // sums of q over each 4 elements
  float d;
};

// Block of 32 at x -> b. Returns false for a block holding a NaN or an infinity.
template <typename T>
bool quantize_block(const T* x, Block& b) {
#if SAGELLM_ISA_LEVEL > 0
  __m256 v[4];
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same_v<T, float>) {
      v[i] = _mm256_loadu_ps(x + 8 * i);
    } else {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 8 * i));
      v[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }
  // max |x| on the bit patterns: every NaN and infinity compares above every finite value.
  const __m256i no_sign = _mm256_set1_epi32(0x7fffffff);
  __m256i mx = _mm256_and_si256(_mm256_castps_si256(v[0]), no_sign);
  for (int i = 1; i < 4; ++i) {
    mx = _mm256_max_epi32(mx, _mm256_and_si256(_mm256_castps_si256(v[i]), no_sign));
  }
  __m128i m4 = _mm_max_epi32(_mm256_castsi256_si128(mx), _mm256_extracti128_si256(mx, 1));
  m4 = _mm_max_epi32(m4, _mm_shuffle_epi32(m4, 0x4e));
  m4 = _mm_max_epi32(m4, _mm_shuffle_epi32(m4, 0xb1));
  const uint32_t amax_bits = static_cast<uint32_t>(_mm_cvtsi128_si32(m4));
#else
  uint32_t amax_bits = 0;
  for (int i = 0; i < kAB; ++i) {
    amax_bits = std::max(amax_bits, float_to_bits(to_float(x[i])) & 0x7fffffffu);
  }
#endif
  if (amax_bits >= 0x7f800000u) return false;
  const float amax = bits_to_float(amax_bits);
  const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
  b.d = amax / 127.0f;
#if SAGELLM_ISA_LEVEL > 0
  const __m256 vid = _mm256_set1_ps(id);
  __m256i qi[4];
  for (int i = 0; i < 4; ++i) {
    qi[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], vid),
                                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // packs interleave the 128-bit lanes; the permute restores element order.
  const __m256i packed = _mm256_permutevar8x32_epi32(
      _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3])),
      _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_store_si256(reinterpret_cast<__m256i*>(b.q), packed);
  _mm256_store_si256(
      reinterpret_cast<__m256i*>(b.lanes),
      _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), packed), _mm256_set1_epi16(1)));
#else
  for (int l = 0; l < 8; ++l) {
    int lane = 0;
    for (int i = 4 * l; i < 4 * l + 4; ++i) {
      b.q[i] = static_cast<int8_t>(std::nearbyint(to_float(x[i]) * id));
      lane += b.q[i];
    }
    b.lanes[l] = lane;
  }
#endif
  return true;
}

// b -> its slot: values, scale copies, dsum, and corr = -offset * lanes when offset != 0.
void scatter(const Block& b, int offset, const Slot& out) {
  int total = 0;
  for (int l = 0; l < 8; ++l) total += b.lanes[l];
  for (int h = 0; h < 2; ++h) {
    std::memcpy(out.q[h], b.q + 16 * h, 16);
    for (int c = 0; c < act_layout::kHalfCopies; ++c) out.d[h][c] = b.d;
    if (offset != 0) {
      for (int l = 0; l < 4; ++l) out.corr[h][l] = -offset * b.lanes[4 * h + l];
    }
  }
  *out.dsum = b.d * static_cast<float>(total);
}

// A block that contributes nothing (scale 0: the padding of an odd last unit, which has no
// dsum), or NaN to every output of its row (scale NaN: the input held a NaN or an infinity).
void fill(const Slot& out, float d, bool has_dsum) {
  for (int h = 0; h < 2; ++h) {
    std::memset(out.q[h], 0, 16);
    std::memset(out.corr[h], 0, 4 * sizeof(int32_t));
    for (int c = 0; c < act_layout::kHalfCopies; ++c) out.d[h][c] = d;
  }
  if (has_dsum) *out.dsum = d;
}

template <typename T>
void quantize_rows(const GgufLinearParams& p, int64_t r_begin, int64_t r_end) {
  const int offset = act_layout::corr_offset(p.qtype, p.m);
  const int64_t nsub = p.k / kAB;
  Block b;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const T* x = static_cast<const T*>(p.input) + r * p.input_row_stride;
    for (int64_t s = 0; s < nsub; ++s) {
      const Slot out = act_layout::slot(p.act, p.m, p.k, p.qtype, r, s);
      if (quantize_block(x + s * kAB, b)) {
        scatter(b, offset, out);
      } else {
        fill(out, std::numeric_limits<float>::quiet_NaN(), true);
      }
    }
    // The second half of a last, odd unit.
    if (nsub % act_layout::kUnitBlocks != 0) {
      fill(act_layout::slot(p.act, p.m, p.k, p.qtype, r, nsub), 0.0f, false);
    }
  }
}

}  // namespace

void gguf_quantize_activations(const GgufLinearParams& p, int64_t row_begin, int64_t row_end) {
  if (p.dtype == DType::kF32) {
    quantize_rows<float>(p, row_begin, row_end);
  } else {
    quantize_rows<bf16>(p, row_begin, row_end);
  }
}

}  // namespace sagellm::cpu::SAGELLM_ISA
