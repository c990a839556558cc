// gguf_linear, pass 2: weight-only GEMV/GEMM over GGUF blocks, compiled once per ISA.
//
// Layout: weight [n, row_bytes] (each row k / block_elems GGUF blocks, gguf_formats.h); the
// input already quantized to int8 blocks of 32 (gguf_act_kernels.cpp, laid out as
// gguf_act_layout.h says); out rows [m, n]. Grid: the entry file splits the weight rows over
// torch's threads; a task owns a contiguous range of weight rows and all m rows of those output
// columns. Each weight unit (AVX-512: 64 elements in a zmm; AVX2: 32 in a ymm) is unpacked once
// into a register and its integer dot product taken with up to kMaxRows input rows (one panel),
// each scaled by d_weight * d_input per lane and accumulated in fp32. Loop order: a tile of
// weight rows (kept in L2) against a chunk of input panels small enough for L1, so both are
// re-read from cache, not memory, when m is large.
//
// Bound: at m = 1 the weight bytes streamed once (0.56 B/element for Q4_1, 1.06 for Q8_0) when
// both cores run; on one core, unpacking (~12 instructions per 32 elements on AVX-512). From
// m ~ 8 the per-(unit, row) work bounds it: dot, convert, scale, fma = 4 vector instructions
// per 64 (AVX-512) or 32 (AVX2) multiply-adds.
//
// Integer dot products, u8 weights x s8 inputs into int32 lanes of 4 elements each:
//   AVX-512 (needs AVX512-VNNI; the entry file checks): vpdpbusd.
//   AVX2: vpmaddubsw + vpmaddwd (the 16-bit pair sums cannot saturate for q <= 63); Q8_0 uses
//     |w| x sign(a, w), as q + 128 could saturate them.
//   Scalar: each weight row decoded to signed int8 once, then plain loops over the m rows.
// Offsets and mins on the SIMD paths: an element is scale * q + min per block, q unsigned (min
// = m for Q4_1 / Q5_1 / Q4_K / Q5_K). The offsets of Q4_0 (8), Q5_0 (16) and, on AVX-512, Q8_0
// (128, after flipping its sign bit) are subtracted either through the dot product's start
// value, corr = -offset * (sum of the 4 inputs) per lane, or as a min term -offset * d
// (act_layout::offsets_by_corr chooses); Q6_K's offset (32 per 16 elements, under two scales)
// always through corr. The min terms of a weight row, sum_s min_s * d_s * sum(q_s), are
// accumulated in a register for a single row, and with one vector fma per block for a panel.
// All integer sums are exact; the only rounding is fp32 scaling and summation, so every ISA
// agrees with a float64 product of the same quantized inputs to ~1e-6 relative.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/vec.h"
#include "quant/cpu/gguf_act_layout.h"
#include "quant/cpu/gguf_formats.h"
#include "quant/cpu/quant_kernels.h"

#if SAGELLM_ISA_LEVEL == 2
// The AVX-512 variant of this file (and of the decoders, inlined into it) may use VNNI: the
// entry file never calls it on a CPU without avx512_vnni (it runs the AVX2 variant there).
// Set after the standard headers, so no std:: template instantiated elsewhere too gets a VNNI
// copy the linker could pick for another ISA.
#pragma GCC target("avx512vnni")
#include "quant/cpu/gguf_decode_avx512.h"
#else
#include "quant/cpu/gguf_decode.h"
#endif

namespace sagellm::cpu::SAGELLM_ISA {
namespace {

constexpr int kAB = gguf::kActBlock;
using act_layout::kMaxRows;

// Input rows kept in L1 while a tile of weight rows (kept in L2) passes over them, and that
// tile's size. At m = 64, k = 768 the L1-sized chunk is ~1.4x faster than a 384 KiB one.
constexpr int64_t kActChunkBytes = 32 * 1024;
constexpr int64_t kWeightTileBytes = 128 * 1024;

SAGELLM_ALWAYS_INLINE void store_out(const GgufLinearParams& p, int64_t row, int64_t col,
                                     float v) {
  if (p.dtype == DType::kF32) {
    if (p.bias != nullptr) v += static_cast<const float*>(p.bias)[col];
    static_cast<float*>(p.out)[row * p.out_row_stride + col] = v;
  } else {
    if (p.bias != nullptr) v += to_float(static_cast<const bf16*>(p.bias)[col]);
    static_cast<bf16*>(p.out)[row * p.out_row_stride + col] = from_float<bf16>(v);
  }
}

// sum_s mins[s] * dsum[s]: the min terms of one weight row against one input row.
SAGELLM_ALWAYS_INLINE float min_term(const float* mins, const float* dsum, int64_t nsub) {
  Vec acc = Vec::zero();
  int64_t s = 0;
  for (; s + Vec::kWidth <= nsub; s += Vec::kWidth) {
    acc = Vec::fma(Vec::load(mins + s), Vec::load(dsum + s), acc);
  }
  if (s < nsub) {
    const int rem = static_cast<int>(nsub - s);
    acc = Vec::fma(Vec::load(mins + s, rem), Vec::load(dsum + s, rem), acc);
  }
  return acc.reduce_add();
}

#if SAGELLM_ISA_LEVEL > 0
// y[r] += sum_s mins[s] * dsum[s * R + r]: the min terms of one weight row for the R rows of a
// panel (dsum interleaved as gguf_act_layout.h says), one vector fma per sub-block.
template <int R>
SAGELLM_ALWAYS_INLINE void add_min_terms(const float* mins, const float* dsum, int64_t nsub,
                                         float* y) {
  if constexpr (R == 1) {
    y[0] += min_term(mins, dsum, nsub);
  } else if constexpr (R == 8) {
    __m256 t = _mm256_setzero_ps();
    for (int64_t s = 0; s < nsub; ++s) {
      t = _mm256_fmadd_ps(_mm256_set1_ps(mins[s]), _mm256_loadu_ps(dsum + s * 8), t);
    }
    _mm256_storeu_ps(y, _mm256_add_ps(_mm256_loadu_ps(y), t));
  } else if constexpr (R == 4) {
    __m128 t = _mm_setzero_ps();
    for (int64_t s = 0; s < nsub; ++s) {
      t = _mm_fmadd_ps(_mm_set1_ps(mins[s]), _mm_loadu_ps(dsum + s * 4), t);
    }
    _mm_storeu_ps(y, _mm_add_ps(_mm_loadu_ps(y), t));
  } else {
    float t[R] = {};
    for (int64_t s = 0; s < nsub; ++s) {
      for (int r = 0; r < R; ++r) t[r] += mins[s] * dsum[s * R + r];
    }
    for (int r = 0; r < R; ++r) y[r] += t[r];
  }
}
#endif

#if SAGELLM_ISA_LEVEL == 2
// ---------------------------------------------------------------------------------------------
// AVX-512 + VNNI: one 64-element unit per zmm.

namespace dec = gguf_decode512;

// acc[r] += (weight unit . input unit of panel row r) * scales, for the R rows of a panel.
template <class F, int R>
SAGELLM_ALWAYS_INLINE void unit_rows(__m512 (&acc)[R], const dec::Unit& w, const int8_t* aq,
                                     const int32_t* ac, const float* ad) {
  const __m512i wq =
      F::kSigned ? _mm512_xor_si512(w.q, _mm512_set1_epi8(static_cast<char>(0x80))) : w.q;
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const __m512i init = F::kOffset != 0 ? _mm512_loadu_si512(ac + r * 16) : _mm512_setzero_si512();
    const __m512i isum = _mm512_dpbusd_epi32(init, wq, _mm512_loadu_si512(aq + r * 64));
    const __m512 sc = _mm512_mul_ps(w.scale, _mm512_loadu_ps(ad + r * 16));
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), sc, acc[r]);
  }
}

// y[i] = weight row `w` . input row r0 + i for the panel of R rows at r0 (min terms included,
// bias not). mins: scratch for the row's min terms, nsub + 1 floats.
template <class F, int R>
__attribute__((noinline)) void row_panel(const GgufLinearParams& p, const uint8_t* w, int64_t r0,
                                         float* mins, float* y) {
  const int64_t nsub = p.k / kAB;
  const int64_t units = act_layout::units(p.k);
  const int8_t* aq = p.act.q + r0 * units * 64;
  const int32_t* ac = p.act.corr + r0 * units * 16;
  const float* ad = p.act.d + r0 * units * 16;
  __m512 acc[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const int64_t blocks = p.k / F::kElems;
  // Min terms: a single row accumulates them in a register as it goes (its dsum is contiguous);
  // a panel stores them and adds them for all its rows at the end (add_min_terms).
  const float* dsum = p.act.dsum + r0 * nsub;
  [[maybe_unused]] __m256 macc = _mm256_setzero_ps();
  if constexpr (F::kSub == 1) {
    const int64_t pairs = blocks / 2;
    const uint8_t* blk = w;
#pragma GCC unroll 2
    for (int64_t u = 0; u < pairs; ++u, blk += 2 * F::kBytes) {
      const dec::Unit unit = F::pair(blk);
      if constexpr (F::kHasMin && R == 1) {
        const __m128 ds = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(dsum + 2 * u)));
        macc = _mm256_castps128_ps256(_mm_fmadd_ps(unit.mins, ds, _mm256_castps256_ps128(macc)));
      } else if constexpr (F::kHasMin) {
        _mm_storel_pi(reinterpret_cast<__m64*>(mins + 2 * u), unit.mins);
      }
      unit_rows<F, R>(acc, unit, aq + u * R * 64, ac + u * R * 16, ad + u * R * 16);
    }
    if (blocks % 2 != 0) {
      const int64_t u = pairs;
      const dec::Unit unit = F::single(blk);
      if constexpr (F::kHasMin && R == 1) {
        const __m128 ds = _mm_load_ss(dsum + 2 * u);  // the second block does not exist
        macc = _mm256_castps128_ps256(_mm_fmadd_ps(unit.mins, ds, _mm256_castps256_ps128(macc)));
      } else if constexpr (F::kHasMin) {
        mins[2 * u] = _mm_cvtss_f32(unit.mins);
      }
      unit_rows<F, R>(acc, unit, aq + u * R * 64, ac + u * R * 16, ad + u * R * 16);
    }
  } else {
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* blk = w + b * F::kBytes;
      const typename F::Scales sc = F::scales(blk);
      if constexpr (F::kHasMin && R == 1) {
        macc = _mm256_fmadd_ps(F::mins(sc), _mm256_loadu_ps(dsum + 8 * b), macc);
      } else if constexpr (F::kHasMin) {
        _mm256_storeu_ps(mins + 8 * b, F::mins(sc));
      }
#pragma GCC unroll 4
      for (int uu = 0; uu < 4; ++uu) {
        const int64_t u = 4 * b + uu;
        unit_rows<F, R>(acc, F::unit(blk, sc, uu), aq + u * R * 64, ac + u * R * 16,
                        ad + u * R * 16);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) y[r] = _mm512_reduce_add_ps(acc[r]);
  if constexpr (F::kHasMin && R == 1) {
    __m128 m4 = _mm_add_ps(_mm256_castps256_ps128(macc), _mm256_extractf128_ps(macc, 1));
    m4 = _mm_add_ps(m4, _mm_movehl_ps(m4, m4));
    y[0] += _mm_cvtss_f32(_mm_add_ss(m4, _mm_movehdup_ps(m4)));
  } else if constexpr (F::kHasMin) {
    add_min_terms<R>(mins, dsum, nsub, y);
  }
}

#elif SAGELLM_ISA_LEVEL == 1
// ---------------------------------------------------------------------------------------------
// AVX2: one 32-element sub-block per ymm.

namespace dec = gguf_decode;

SAGELLM_ALWAYS_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Lane i = sum over elements 4i..4i+3 of (w - offset) * a; q = the sub-block as decoded, wq
// the bytes the multiply takes (|q| for Q8_0).
template <class F>
SAGELLM_ALWAYS_INLINE __m256i dot(__m256i wq, __m256i q, const int8_t* ap, const int32_t* corr) {
  const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ap));
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (F::kSigned) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(wq, _mm256_sign_epi8(a, q)), ones);
  } else {
    const __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(wq, a), ones);
    if constexpr (F::kOffset != 0) {
      return _mm256_add_epi32(s, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr)));
    } else {
      return s;
    }
  }
}

template <class F, int R>
__attribute__((noinline)) void row_panel(const GgufLinearParams& p, const uint8_t* w, int64_t r0,
                                         float* mins, float* y) {
  const int64_t nsub = p.k / kAB;
  const int8_t* aq = p.act.q + r0 * p.k;
  const float* ad = p.act.d + r0 * nsub;
  const int32_t* ac = p.act.corr + r0 * nsub * 8;
  __m256 acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const int64_t blocks = p.k / F::kElems;
  // Min terms: a single row accumulates them as it goes (its dsum is contiguous); a panel
  // stores them and adds them for all its rows at the end (add_min_terms).
  const float* dsum = p.act.dsum + r0 * nsub;
  [[maybe_unused]] float macc = 0.0f;
  for (int64_t b = 0; b < blocks; ++b, w += F::kBytes) {
    const typename F::Scales scales = F::scales(w);
#pragma GCC unroll 8
    for (int j = 0; j < F::kSub; ++j) {
      const int64_t s = b * F::kSub + j;
      if constexpr (F::kHasMin && R == 1) {
        macc += F::min(scales, j) * dsum[s];
      } else if constexpr (F::kHasMin) {
        mins[s] = F::min(scales, j);
      }
      const __m256i q = F::quants(w, j);
      const __m256i wq = F::kSigned ? _mm256_abs_epi8(q) : q;
      const __m256 scale = F::scale(scales, j);
      const int8_t* as = aq + s * R * kAB;
      const int32_t* cs = ac + s * R * 8;
      const float* ds = ad + s * R;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256i isum = dot<F>(wq, q, as + r * kAB, cs + r * 8);
        const __m256 sc = _mm256_mul_ps(scale, _mm256_broadcast_ss(ds + r));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), sc, acc[r]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) y[r] = hsum(acc[r]);
  if constexpr (F::kHasMin && R == 1) {
    y[0] += macc;
  } else if constexpr (F::kHasMin) {
    add_min_terms<R>(mins, dsum, nsub, y);
  }
}
#endif

#if SAGELLM_ISA_LEVEL > 0
template <class F, int R>
SAGELLM_ALWAYS_INLINE void panel_out(const GgufLinearParams& p, const uint8_t* w, int64_t n,
                                     int64_t r0, float* mins) {
  float y[R];
  row_panel<F, R>(p, w, r0, mins, y);
  for (int r = 0; r < R; ++r) store_out(p, r0 + r, n, y[r]);
}

template <class F>
void linear(const GgufLinearParams& p, int64_t n_begin, int64_t n_end) {
  thread_local std::vector<float> mins;
  mins.resize(static_cast<size_t>(p.k / kAB + 1));
  // A multiple of kMaxRows, so chunks split the rows at panel boundaries.
  const int64_t chunk_rows = std::max<int64_t>(
      kMaxRows, kActChunkBytes / (p.k * 3) / kMaxRows * kMaxRows);
  const int64_t tile_rows = std::max<int64_t>(1, kWeightTileBytes / p.row_bytes);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += tile_rows) {
    const int64_t n1 = std::min(n_end, n0 + tile_rows);
    for (int64_t m0 = 0; m0 < p.m; m0 += chunk_rows) {
      const int64_t m1 = std::min(p.m, m0 + chunk_rows);
      for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* w = p.weight + n * p.row_bytes;
        int64_t r = m0;
        for (; r + kMaxRows <= m1; r += kMaxRows) panel_out<F, kMaxRows>(p, w, n, r, mins.data());
        // The remainder panels, largest first (gguf_act_layout.h).
        if constexpr (kMaxRows > 4) {
          if ((m1 - r) & 4) {
            panel_out<F, 4>(p, w, n, r, mins.data());
            r += 4;
          }
        }
        if ((m1 - r) & 2) {
          panel_out<F, 2>(p, w, n, r, mins.data());
          r += 2;
        }
        if ((m1 - r) & 1) panel_out<F, 1>(p, w, n, r, mins.data());
      }
    }
  }
}

#else
// ---------------------------------------------------------------------------------------------
// Scalar: each weight row decoded once to int8 + scales, then dotted with every input row.

namespace dec = gguf_decode;

template <class F>
void linear(const GgufLinearParams& p, int64_t n_begin, int64_t n_end) {
  const int64_t nsub = p.k / kAB;
  thread_local std::vector<int8_t> q;
  thread_local std::vector<float> s16, mins;
  q.resize(static_cast<size_t>(p.k));
  s16.resize(static_cast<size_t>(2 * nsub));
  mins.resize(static_cast<size_t>(nsub));
  for (int64_t n = n_begin; n < n_end; ++n) {
    F::row_scalar(p.weight + n * p.row_bytes, p.k / F::kElems, q.data(), s16.data(), mins.data());
    for (int64_t r = 0; r < p.m; ++r) {
      const int8_t* a = p.act.q + r * p.k;
      const float* ad = p.act.d + r * nsub;
      float acc = 0.0f;
      for (int64_t s = 0; s < nsub; ++s) {
        int32_t lo = 0, hi = 0;
        for (int l = 0; l < 16; ++l) lo += int32_t(q[s * kAB + l]) * a[s * kAB + l];
        for (int l = 16; l < 32; ++l) hi += int32_t(q[s * kAB + l]) * a[s * kAB + l];
        acc += ad[s] * (s16[2 * s] * float(lo) + s16[2 * s + 1] * float(hi));
      }
      if constexpr (F::kHasMin) acc += min_term(mins.data(), p.act.dsum + r * nsub, nsub);
      store_out(p, r, n, acc);
    }
  }
}

#endif

}  // namespace

void gguf_linear_kernel(const GgufLinearParams& p, int64_t n_begin, int64_t n_end) {
  if (n_begin >= n_end || p.m <= 0) return;
#if SAGELLM_ISA_LEVEL > 0
  // Offsets through corr or the min term: the same choice the input quantization made.
  if (act_layout::offsets_by_corr(p.m)) {
    switch (p.qtype) {
      case gguf::kQ4_0:
        return linear<dec::Small<gguf::kQ4_0, true>>(p, n_begin, n_end);
      case gguf::kQ5_0:
        return linear<dec::Small<gguf::kQ5_0, true>>(p, n_begin, n_end);
#if SAGELLM_ISA_LEVEL == 2
      case gguf::kQ8_0:
        return linear<dec::Q8_0<true>>(p, n_begin, n_end);
#endif
      default:
        break;
    }
  }
  switch (p.qtype) {
    case gguf::kQ4_0:
      return linear<dec::Small<gguf::kQ4_0, false>>(p, n_begin, n_end);
    case gguf::kQ4_1:
      return linear<dec::Small<gguf::kQ4_1, false>>(p, n_begin, n_end);
    case gguf::kQ5_0:
      return linear<dec::Small<gguf::kQ5_0, false>>(p, n_begin, n_end);
    case gguf::kQ5_1:
      return linear<dec::Small<gguf::kQ5_1, false>>(p, n_begin, n_end);
#if SAGELLM_ISA_LEVEL == 2
    case gguf::kQ8_0:
      return linear<dec::Q8_0<false>>(p, n_begin, n_end);
#else
    case gguf::kQ8_0:
      return linear<dec::Q8_0>(p, n_begin, n_end);
#endif
#else
  switch (p.qtype) {
    case gguf::kQ4_0:
      return linear<dec::Q4_0>(p, n_begin, n_end);
    case gguf::kQ4_1:
      return linear<dec::Q4_1>(p, n_begin, n_end);
    case gguf::kQ5_0:
      return linear<dec::Q5_0>(p, n_begin, n_end);
    case gguf::kQ5_1:
      return linear<dec::Q5_1>(p, n_begin, n_end);
    case gguf::kQ8_0:
      return linear<dec::Q8_0>(p, n_begin, n_end);
#endif
    case gguf::kQ4_K:
      return linear<dec::Q4_K>(p, n_begin, n_end);
    case gguf::kQ5_K:
      return linear<dec::Q5_K>(p, n_begin, n_end);
    case gguf::kQ6_K:
      return linear<dec::Q6_K>(p, n_begin, n_end);
    default:
      return;  // the entry file rejects every other type
  }
}

}  // namespace sagellm::cpu::SAGELLM_ISA
