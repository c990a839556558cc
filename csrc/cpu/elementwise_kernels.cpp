// Fused small ops on the CPU, one row (or token) at a time: RMSNorm, fused add + RMSNorm, rotary
// embedding (NeoX and GPT-J), SiLU/GELU-and-mul. Compiled once per ISA (see cpu/vec.h).
//
// Layout: rows of `hidden` contiguous elements at arbitrary row offsets (RowLayout). Every op is
// memory-bound: RMSNorm moves 2 * hidden elements per row (+ weight, cached), fused add + norm
// 4, rotary 2 * rot_dim per head, gated activations 3 * d. fp32 arithmetic throughout; results
// are rounded to the storage dtype at the same points as the Hugging Face modules, so a model
// built on these ops reproduces transformers.
#include <cmath>
#include <vector>

#include "cpu/elementwise_kernels.h"
#include "cpu/vec.h"

namespace sagellm::cpu::SAGELLM_ISA {
namespace {

constexpr int64_t W = Vec::kWidth;

inline int64_t row_offset(const RowLayout& l, int64_t r) {
  return (r / l.inner) * l.outer_stride + (r % l.inner) * l.inner_stride;
}

// Round every lane to T's precision and back (identity for float): HF rounds the normalised
// activations to the input dtype before the weight multiply. In registers where the ISA allows:
// a round trip through memory costs a store-forwarding stall per vector.
template <typename T>
inline Vec round_to(Vec v) {
  T tmp[W];
  v.store(tmp);
  return Vec::load(static_cast<const T*>(tmp));
}
template <>
inline Vec round_to<float>(Vec v) {
  return v;
}
#if SAGELLM_ISA_LEVEL == 2
template <>
inline Vec round_to<bf16>(Vec v) {
  // Round to nearest even on the upper 16 bits; NaN lanes pass through unchanged.
  const __m512i u = _mm512_castps_si512(v.v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  r = _mm512_and_si512(r, _mm512_set1_epi32(int(0xffff0000u)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v.v, v.v, _CMP_UNORD_Q);
  return Vec(_mm512_mask_blend_ps(nan, _mm512_castsi512_ps(r), v.v));
}
template <>
inline Vec round_to<f16>(Vec v) {
  return Vec(_mm512_cvtph_ps(_mm512_cvtps_ph(v.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
}
#elif SAGELLM_ISA_LEVEL == 1
template <>
inline Vec round_to<bf16>(Vec v) {
  const __m256i u = _mm256_castps_si256(v.v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  r = _mm256_and_si256(r, _mm256_set1_epi32(int(0xffff0000u)));
  const __m256 nan = _mm256_cmp_ps(v.v, v.v, _CMP_UNORD_Q);
  return Vec(_mm256_blendv_ps(_mm256_castsi256_ps(r), v.v, nan));
}
template <>
inline Vec round_to<f16>(Vec v) {
  return Vec(_mm256_cvtph_ps(_mm256_cvtps_ph(v.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
}
#endif

// Swap the lanes of every adjacent pair (0 1 2 3 ... -> 1 0 3 2 ...), for GPT-J rotary.
inline Vec swap_pairs(Vec x) {
#if SAGELLM_ISA_LEVEL == 2
  return Vec(_mm512_permute_ps(x.v, 0xB1));
#elif SAGELLM_ISA_LEVEL == 1
  return Vec(_mm256_permute_ps(x.v, 0xB1));
#else
  Vec r;
  for (int i = 0; i < W; ++i) r.v[i] = x.v[i ^ 1];
  return r;
#endif
}

// ---- RMSNorm ----------------------------------------------------------------------------------

template <typename T>
inline float sum_squares(const T* x, int64_t n) {
  Vec a0 = Vec::zero(), a1 = Vec::zero();
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    Vec u = Vec::load(x + i), v = Vec::load(x + i + W);
    a0 = Vec::fma(u, u, a0);
    a1 = Vec::fma(v, v, a1);
  }
  for (; i + W <= n; i += W) {
    Vec u = Vec::load(x + i);
    a0 = Vec::fma(u, u, a0);
  }
  if (i < n) {
    Vec u = Vec::load(x + i, int(n - i));
    a1 = Vec::fma(u, u, a1);
  }
  return (a0 + a1).reduce_add();
}

// out = round(round(x * scale) * w). x may alias out: each chunk is read before it is written.
template <typename T>
inline void scale_by_weight(T* out, const T* x, const T* w, float scale, int64_t n) {
  const Vec s = Vec::set1(scale);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    (round_to<T>(Vec::load(x + i) * s) * Vec::load(w + i)).store(out + i);
  }
  if (i < n) {
    const int m = int(n - i);
    (round_to<T>(Vec::load(x + i, m) * s) * Vec::load(w + i, m)).store(out + i, m);
  }
}

inline float inv_rms(float sum_sq, int64_t n, float eps) {
  return 1.0f / std::sqrt(sum_sq / float(n) + eps);
}

template <typename T>
void rms_norm_rows(const RmsNormParams& p, int64_t begin, int64_t end) {
  const T* w = static_cast<const T*>(p.weight);
  for (int64_t r = begin; r < end; ++r) {
    const T* x = static_cast<const T*>(p.input) + row_offset(p.input_rows, r);
    T* out = static_cast<T*>(p.out) + row_offset(p.out_rows, r);
    scale_by_weight(out, x, w, inv_rms(sum_squares(x, p.hidden), p.hidden, p.eps), p.hidden);
  }
}

template <typename T>
void fused_add_rms_norm_rows(const FusedAddRmsNormParams& p, int64_t begin, int64_t end) {
  const T* w = static_cast<const T*>(p.weight);
  const int64_t n = p.hidden;
  for (int64_t r = begin; r < end; ++r) {
    T* x = static_cast<T*>(p.input) + row_offset(p.input_rows, r);
    T* res = static_cast<T*>(p.residual) + row_offset(p.residual_rows, r);
    // The norm sees the sum as stored (rounded to T), as in HF where the residual stream is a
    // tensor of the model's dtype.
    Vec a0 = Vec::zero(), a1 = Vec::zero();
    int64_t i = 0;
    for (; i + W <= n; i += W) {
      Vec s = round_to<T>(Vec::load(x + i) + Vec::load(res + i));
      s.store(res + i);
      a0 = Vec::fma(s, s, a0);
    }
    if (i < n) {
      const int m = int(n - i);
      Vec s = round_to<T>(Vec::load(x + i, m) + Vec::load(res + i, m));
      s.store(res + i, m);
      a1 = Vec::fma(s, s, a1);
    }
    scale_by_weight(x, res, w, inv_rms((a0 + a1).reduce_add(), n, p.eps), n);
  }
}

// ---- Rotary embedding -------------------------------------------------------------------------

template <typename T, typename C>
void rotary_neox_heads(T* base, int64_t heads, int64_t head_stride, const C* cos, const C* sin,
                       int64_t half) {
  for (int64_t h = 0; h < heads; ++h) {
    T* x = base + h * head_stride;
    int64_t i = 0;
    for (; i + W <= half; i += W) {
      Vec c = Vec::load(cos + i), s = Vec::load(sin + i);
      Vec x1 = Vec::load(x + i), x2 = Vec::load(x + half + i);
      Vec::fma(x1, c, Vec::zero() - x2 * s).store(x + i);
      Vec::fma(x2, c, x1 * s).store(x + half + i);
    }
    if (i < half) {
      const int m = int(half - i);
      Vec c = Vec::load(cos + i, m), s = Vec::load(sin + i, m);
      Vec x1 = Vec::load(x + i, m), x2 = Vec::load(x + half + i, m);
      Vec::fma(x1, c, Vec::zero() - x2 * s).store(x + i, m);
      Vec::fma(x2, c, x1 * s).store(x + half + i, m);
    }
  }
}

// GPT-J pairs are adjacent lanes: y = x * cos_rep + swap_pairs(x) * sin_signed, where cos_rep
// repeats each cos twice and sin_signed is (-sin, +sin) per pair (built once per token).
template <typename T>
void rotary_gptj_heads(T* base, int64_t heads, int64_t head_stride, const float* cos_rep,
                       const float* sin_signed, int64_t rot_dim) {
  for (int64_t h = 0; h < heads; ++h) {
    T* x = base + h * head_stride;
    int64_t i = 0;
    for (; i + W <= rot_dim; i += W) {
      Vec v = Vec::load(x + i);
      Vec::fma(v, Vec::load(cos_rep + i), swap_pairs(v) * Vec::load(sin_signed + i)).store(x + i);
    }
    if (i < rot_dim) {  // rot_dim and W are even, so the tail holds whole pairs
      const int m = int(rot_dim - i);
      Vec v = Vec::load(x + i, m);
      Vec::fma(v, Vec::load(cos_rep + i, m), swap_pairs(v) * Vec::load(sin_signed + i, m))
          .store(x + i, m);
    }
  }
}

template <typename T, typename C>
void rotary_tokens(const RotaryParams& p, int64_t begin, int64_t end) {
  const int64_t half = p.rot_dim / 2;
  std::vector<float> table(p.is_neox ? 0 : 2 * p.rot_dim);
  for (int64_t t = begin; t < end; ++t) {
    const C* cos = static_cast<const C*>(p.cos_sin_cache) + p.positions[t] * p.cache_stride;
    const C* sin = cos + half;
    T* q = static_cast<T*>(p.query) + t * p.query_token_stride;
    T* k = p.key ? static_cast<T*>(p.key) + t * p.key_token_stride : nullptr;
    if (p.is_neox) {
      rotary_neox_heads(q, p.num_query_heads, p.query_head_stride, cos, sin, half);
      if (k) rotary_neox_heads(k, p.num_key_heads, p.key_head_stride, cos, sin, half);
    } else {
      float* cos_rep = table.data();
      float* sin_signed = cos_rep + p.rot_dim;
      for (int64_t i = 0; i < half; ++i) {
        const float c = to_float(cos[i]), s = to_float(sin[i]);
        cos_rep[2 * i] = c;
        cos_rep[2 * i + 1] = c;
        sin_signed[2 * i] = -s;
        sin_signed[2 * i + 1] = s;
      }
      rotary_gptj_heads(q, p.num_query_heads, p.query_head_stride, cos_rep, sin_signed, p.rot_dim);
      if (k) {
        rotary_gptj_heads(k, p.num_key_heads, p.key_head_stride, cos_rep, sin_signed,
                          p.rot_dim);
      }
    }
  }
}

// ---- Gated activations ------------------------------------------------------------------------

inline Vec silu(Vec x) { return x / (Vec::set1(1.0f) + exp(Vec::zero() - x)); }

// gelu_tanh(x) = 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3); the
// sigmoid form avoids the cancellation in 1 + tanh(u) for negative x.
inline Vec gelu_tanh(Vec x) {
  const Vec k = Vec::set1(-2.0f * 0.7978845608028654f);
  Vec u = x * Vec::fma(Vec::set1(0.044715f) * x, x, Vec::set1(1.0f));
  return x / (Vec::set1(1.0f) + exp(k * u));
}

// gelu(x) = x * Phi(x), Phi(x) = 1 - erfc(x / sqrt 2) / 2 for x >= 0 and erfc(|x| / sqrt 2) / 2
// below. erfc(z) for z >= 0 by Hastings' approximation (Abramowitz & Stegun 7.1.26): absolute
// error <= 1.5e-7, so |gelu error| <= 0.75e-7 |x| plus fp32 rounding (tested against fp64).
inline Vec gelu_erf(Vec x) {
  const Vec one = Vec::set1(1.0f);
  const Vec z = Vec::max(x, Vec::zero() - x) * Vec::set1(0.70710678118654752f);
  const Vec t = one / Vec::fma(Vec::set1(0.3275911f), z, one);
  Vec poly = Vec::set1(1.061405429f);
  poly = Vec::fma(poly, t, Vec::set1(-1.453152027f));
  poly = Vec::fma(poly, t, Vec::set1(1.421413741f));
  poly = Vec::fma(poly, t, Vec::set1(-0.284496736f));
  poly = Vec::fma(poly, t, Vec::set1(0.254829592f));
  const Vec half_erfc = Vec::set1(0.5f) * poly * t * exp(Vec::zero() - z * z);
  const Vec phi = (one - half_erfc).select_lt(x, Vec::zero(), half_erfc);
  return x * phi;
}

template <GatedAct A>
inline Vec activate(Vec x) {
  if constexpr (A == GatedAct::kSilu) return silu(x);
  if constexpr (A == GatedAct::kGeluErf) return gelu_erf(x);
  if constexpr (A == GatedAct::kGeluTanh) return gelu_tanh(x);
}

template <typename T, GatedAct A>
void gated_act_rows(const GatedActParams& p, int64_t begin, int64_t end) {
  const int64_t d = p.d;
  for (int64_t r = begin; r < end; ++r) {
    const T* x = static_cast<const T*>(p.input) + row_offset(p.input_rows, r);
    T* out = static_cast<T*>(p.out) + row_offset(p.out_rows, r);
    int64_t i = 0;
    for (; i + W <= d; i += W) {
      (round_to<T>(activate<A>(Vec::load(x + i))) * Vec::load(x + d + i)).store(out + i);
    }
    if (i < d) {
      const int m = int(d - i);
      (round_to<T>(activate<A>(Vec::load(x + i, m))) * Vec::load(x + d + i, m)).store(out + i, m);
    }
  }
}

template <typename T>
void gated_act_dispatch(const GatedActParams& p, int64_t begin, int64_t end) {
  switch (p.act) {
    case GatedAct::kSilu:
      return gated_act_rows<T, GatedAct::kSilu>(p, begin, end);
    case GatedAct::kGeluErf:
      return gated_act_rows<T, GatedAct::kGeluErf>(p, begin, end);
    case GatedAct::kGeluTanh:
      return gated_act_rows<T, GatedAct::kGeluTanh>(p, begin, end);
  }
}

// Calls fn.template operator()<T>() with T the storage type of `dtype`.
template <typename Fn>
void with_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kF32:
      return fn(float{});
    case DType::kF16:
      return fn(f16{});
    case DType::kBF16:
      return fn(bf16{});
  }
}

}  // namespace

void rms_norm_kernel(const RmsNormParams& p, int64_t begin, int64_t end) {
  with_dtype(p.dtype, [&](auto tag) { rms_norm_rows<decltype(tag)>(p, begin, end); });
}

void fused_add_rms_norm_kernel(const FusedAddRmsNormParams& p, int64_t begin, int64_t end) {
  with_dtype(p.dtype, [&](auto tag) { fused_add_rms_norm_rows<decltype(tag)>(p, begin, end); });
}

void rotary_embedding_kernel(const RotaryParams& p, int64_t begin, int64_t end) {
  // The cos/sin cache is either fp32 or the query's dtype: five instantiations, not nine.
  with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (p.cache_dtype == DType::kF32) {
      rotary_tokens<T, float>(p, begin, end);
    } else {
      rotary_tokens<T, T>(p, begin, end);
    }
  });
}

void gated_act_kernel(const GatedActParams& p, int64_t begin, int64_t end) {
  with_dtype(p.dtype, [&](auto tag) { gated_act_dispatch<decltype(tag)>(p, begin, end); });
}

}  // namespace sagellm::cpu::SAGELLM_ISA
