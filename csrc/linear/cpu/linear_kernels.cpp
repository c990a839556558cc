// Dense linear for small batches on the CPU: out[m, n] = input[m, :] . weight[n, :] (+ bias[n]).
// Compiled once per ISA (see cpu/vec.h).
//
// Layout: weight [n, k] contiguous (nn.Linear), input rows [m, k] with k contiguous, out rows
// [m, n]. Grid: the entry file splits the weight rows into units of kDenseLinearRowsPerUnit over
// torch's threads; each task owns a contiguous slice of weight rows and all m rows of its output
// columns.
//
// Bound: at decode sizes (m <= ~8) the whole cost is streaming the weight once from DRAM,
// n * k * sizeof(dtype) bytes; input and output are a few KB and stay in L1/L2. So each register
// tile holds kNb weight rows and up to kMb input rows (kMb * kNb fp32 accumulators of k-wide dot
// products): a weight vector loaded once feeds kMb FMAs, and for m > kMb the tile's weight rows
// (kNb * k elements) are re-read from L1/L2, not DRAM. The weight is read in the order it lies
// in memory only tile by tile, so each tile software-prefetches the next one. Past m ~ 8 the
// kernel becomes FMA-bound (2 * m * n * k flops, no reuse of an input vector across tiles),
// where a blocked GEMM (F.linear, oneDNN with bf16 dot-product instructions) wins.
//
// fp16/bf16: the input rows are widened to fp32 once per task (a panel of at most
// kPanelBytes); weights are widened in registers as they stream (bf16: a shift; fp16: F16C), or,
// when two or more row groups read a tile, once into an L1 buffer. The sum is rounded to the
// dtype once, after the bias is added.
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/vec.h"
#include "linear/cpu/linear_kernels.h"

namespace sagellm::cpu::SAGELLM_ISA {
namespace {

constexpr int64_t W = Vec::kWidth;
constexpr int kNb = static_cast<int>(kDenseLinearRowsPerUnit);
// Accumulators + kNb weight vectors + 1 input vector must fit the register file: 32 zmm on
// AVX-512 (4 * 4 + 4 + 1 = 21), 16 ymm on AVX2 (2 * 4 + 4 + 1 = 13).
#if SAGELLM_ISA_LEVEL == 2
constexpr int kMb = 4;
#else
constexpr int kMb = 2;
#endif
// Input rows widened to fp32 per pass: small enough to stay in L2 beside the weight tile.
constexpr int64_t kPanelBytes = 512 * 1024;

constexpr int kLineBytes = 64;

// Prefetch `bytes` bytes from address `at` into L1, one line at a time. Addresses are integers:
// the last tile prefetches past the end of the weight, which is harmless for a prefetch but
// would be out-of-bounds pointer arithmetic.
inline void prefetch_lines(uintptr_t at, int bytes) {
  for (int b = 0; b < bytes; b += kLineBytes) {
    __builtin_prefetch(reinterpret_cast<const void*>(at + b), 0, 3);
  }
}

// r[j] = sum of the lanes of a[j], j < 4: one transpose-and-add tree instead of four separate
// horizontal reductions (the reductions are ~20% of a tile's work at K = 576 otherwise).
inline void reduce4(const Vec* a, float* r) {
#if SAGELLM_ISA_LEVEL == 2
  // Per 128-bit lane: t01 = [a0 02, a1 02, a0 13, a1 13] (sums of lanes 0+2 and 1+3), t23 alike.
  const __m512 t01 = _mm512_add_ps(_mm512_unpacklo_ps(a[0].v, a[1].v),
                                   _mm512_unpackhi_ps(a[0].v, a[1].v));
  const __m512 t23 = _mm512_add_ps(_mm512_unpacklo_ps(a[2].v, a[3].v),
                                   _mm512_unpackhi_ps(a[2].v, a[3].v));
  const __m512d d01 = _mm512_castps_pd(t01);
  const __m512d d23 = _mm512_castps_pd(t23);
  // Per 128-bit lane: [a0, a1, a2, a3] partial sums.
  const __m512 u = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(d01, d23)),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(d01, d23)));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(u), _mm512_extractf32x8_ps(u, 1));
  _mm_storeu_ps(r, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
#elif SAGELLM_ISA_LEVEL == 1
  const __m256 t01 = _mm256_add_ps(_mm256_unpacklo_ps(a[0].v, a[1].v),
                                   _mm256_unpackhi_ps(a[0].v, a[1].v));
  const __m256 t23 = _mm256_add_ps(_mm256_unpacklo_ps(a[2].v, a[3].v),
                                   _mm256_unpackhi_ps(a[2].v, a[3].v));
  const __m256d d01 = _mm256_castps_pd(t01);
  const __m256d d23 = _mm256_castps_pd(t23);
  const __m256 u = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(d01, d23)),
                                 _mm256_castpd_ps(_mm256_unpackhi_pd(d01, d23)));
  _mm_storeu_ps(r, _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1)));
#else
  for (int j = 0; j < 4; ++j) r[j] = a[j].reduce_add();
#endif
}

// Dot products of MB input rows (fp32, row stride xs) with NB weight rows (WT, row stride k):
// res[i][j] = x[i] . w[j].
//
// The NB rows are NB short interleaved streams (a row is a few KB), too short for the hardware
// prefetcher to lock onto; so when `prefetch` is set the tile prefetches the next tile (the next
// NB * k elements, contiguous) linearly at the rate it consumes its own, one tile ahead.
template <typename WT, int MB, int NB>
inline void dot_tile(const float* x, int64_t xs, const WT* w, int64_t k, bool prefetch,
                     float res[MB][NB]) {
  constexpr int kStepBytes = NB * W * static_cast<int>(sizeof(WT));
  uintptr_t ahead = reinterpret_cast<uintptr_t>(w) + NB * k * sizeof(WT);
  Vec acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = Vec::zero();
  int64_t kk = 0;
  for (; kk + W <= k; kk += W) {
    if (prefetch) {
      prefetch_lines(ahead, kStepBytes);
      ahead += kStepBytes;
    }
    Vec wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = Vec::load(w + j * k + kk);
    for (int i = 0; i < MB; ++i) {
      const Vec xv = Vec::load(x + i * xs + kk);
      for (int j = 0; j < NB; ++j) acc[i][j] = Vec::fma(xv, wv[j], acc[i][j]);
    }
  }
  if (kk < k) {
    // Masked tail: lanes past k load as zero on both sides.
    const int rem = static_cast<int>(k - kk);
    Vec wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = Vec::load(w + j * k + kk, rem);
    for (int i = 0; i < MB; ++i) {
      const Vec xv = Vec::load(x + i * xs + kk, rem);
      for (int j = 0; j < NB; ++j) acc[i][j] = Vec::fma(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    if constexpr (NB == 4) {
      reduce4(acc[i], res[i]);
    } else {
      for (int j = 0; j < NB; ++j) res[i][j] = acc[i][j].reduce_add();
    }
  }
}

// out[i, j] = x[i] . w[j] + bias[j], rounded to T.
template <typename T, typename WT, int MB, int NB>
inline void tile(const float* x, int64_t xs, const WT* w, int64_t k, const T* bias, T* out,
                 int64_t os, bool prefetch) {
  float res[MB][NB];
  dot_tile<WT, MB, NB>(x, xs, w, k, prefetch, res);
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      const float b = bias != nullptr ? to_float(bias[j]) : 0.0f;
      out[i * os + j] = from_float<T>(res[i][j] + b);
    }
}

// All `rows` input rows against NB weight rows, kMb rows at a time. Only the first row group
// streams the weight rows from memory (and prefetches the next tile, if asked); later groups
// re-read them from L1/L2.
template <typename T, typename WT, int NB>
inline void panel_tile(const float* x, int64_t xs, int64_t rows, const WT* w, int64_t k,
                       const T* bias, T* out, int64_t os, bool prefetch) {
  int64_t i = 0;
  for (; i + kMb <= rows; i += kMb) {
    tile<T, WT, kMb, NB>(x + i * xs, xs, w, k, bias, out + i * os, os, prefetch && i == 0);
  }
  const int64_t rem = rows - i;
  if (rem == 0) return;
  x += i * xs;
  out += i * os;
  prefetch = prefetch && i == 0;
  if constexpr (kMb > 3) {
    if (rem == 3) return tile<T, WT, 3, NB>(x, xs, w, k, bias, out, os, prefetch);
  }
  if constexpr (kMb > 2) {
    if (rem == 2) return tile<T, WT, 2, NB>(x, xs, w, k, bias, out, os, prefetch);
  }
  tile<T, WT, 1, NB>(x, xs, w, k, bias, out, os, prefetch);
}

// dst[e] = src[e] as fp32 for e < count, prefetching the `count` elements after src meanwhile.
template <typename T>
inline void widen(const T* src, int64_t count, float* dst, bool prefetch) {
  constexpr int kStepBytes = W * static_cast<int>(sizeof(T));
  uintptr_t ahead = reinterpret_cast<uintptr_t>(src) + count * sizeof(T);
  int64_t e = 0;
  for (; e + W <= count; e += W) {
    if (prefetch) {
      prefetch_lines(ahead, kStepBytes);
      ahead += kStepBytes;
    }
    Vec::load(src + e).store(dst + e);
  }
  if (e < count) {
    const int rem = static_cast<int>(count - e);
    Vec::load(src + e, rem).store(dst + e, rem);
  }
}

template <typename T>
void dense_linear(const DenseLinearParams& p, int64_t n_begin, int64_t n_end) {
  const T* weight = static_cast<const T*>(p.weight);
  const T* bias = static_cast<const T*>(p.bias);
  const T* input = static_cast<const T*>(p.input);
  T* out = static_cast<T*>(p.out);
  const int64_t k = p.k;
  int64_t panel_rows = std::max<int64_t>(kMb, kPanelBytes / std::max<int64_t>(1, 4 * k));
  panel_rows = std::min(p.m, panel_rows / kMb * kMb);

  thread_local std::vector<float> widened_input;
  thread_local std::vector<float> widened_tile;
  for (int64_t m0 = 0; m0 < p.m; m0 += panel_rows) {
    const int64_t rows = std::min(panel_rows, p.m - m0);
    const float* x;
    int64_t xs;
    if constexpr (std::is_same_v<T, float>) {
      x = input + m0 * p.input_row_stride;
      xs = p.input_row_stride;
    } else {
      widened_input.resize(static_cast<size_t>(rows * k));
      for (int64_t i = 0; i < rows; ++i) {
        widen(input + (m0 + i) * p.input_row_stride, k, widened_input.data() + i * k, false);
      }
      x = widened_input.data();
      xs = k;
    }
    // fp16/bf16 weights feeding two or more row groups are widened once per tile into an L1
    // buffer: re-widening them for every group would make the tile ALU-bound.
    bool widen_tiles = false;
    if constexpr (!std::is_same_v<T, float>) {
      widen_tiles = rows >= 2 * kMb;
      if (widen_tiles) widened_tile.resize(static_cast<size_t>(kNb * k));
    }
    T* out_rows = out + m0 * p.out_row_stride;
    int64_t n = n_begin;
    for (; n + kNb <= n_end; n += kNb) {
      const T* w = weight + n * k;
      const T* b = bias ? bias + n : nullptr;
      if (widen_tiles) {
        widen(w, kNb * k, widened_tile.data(), true);
        panel_tile<T, float, kNb>(x, xs, rows, widened_tile.data(), k, b, out_rows + n,
                                  p.out_row_stride, false);
      } else {
        panel_tile<T, T, kNb>(x, xs, rows, w, k, b, out_rows + n, p.out_row_stride, true);
      }
    }
    for (; n < n_end; ++n) {
      panel_tile<T, T, 1>(x, xs, rows, weight + n * k, k, bias ? bias + n : nullptr,
                          out_rows + n, p.out_row_stride, true);
    }
  }
}

}  // namespace

void dense_linear_kernel(const DenseLinearParams& p, int64_t unit_begin, int64_t unit_end) {
  const int64_t n_begin = unit_begin * kDenseLinearRowsPerUnit;
  const int64_t n_end = std::min(p.n, unit_end * kDenseLinearRowsPerUnit);
  if (n_begin >= n_end || p.m <= 0) return;
  switch (p.dtype) {
    case DType::kF32:
      return dense_linear<float>(p, n_begin, n_end);
    case DType::kF16:
      return dense_linear<f16>(p, n_begin, n_end);
    case DType::kBF16:
      return dense_linear<bf16>(p, n_begin, n_end);
  }
}

}  // namespace sagellm::cpu::SAGELLM_ISA
