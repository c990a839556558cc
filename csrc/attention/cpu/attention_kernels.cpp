// Paged attention kernel (decode and prefill), compiled once per ISA.
//
// Layout: K/V rows are [head_size] runs inside [num_blocks, block_size, num_kv_heads, head_size];
// the block table maps a sequence's logical block to a physical one. A work item (see
// attention_kernels.h) holds up to kAttentionMaxRows query rows of one or more KV heads and walks
// its key range in chunks of kChunk keys with an online softmax (running max m, running sum l,
// fp32 accumulator rescaled when m grows), so no score matrix over the whole context exists.
//
// Bound: decode reads each K/V row once for all query heads of its GQA group (2 * head_size
// elements per key and KV head) and does 4 * group * head_size flops on it: memory-bound; its
// items take all KV heads of a sequence when they fit, so whole cache blocks are read, in
// address order. Prefill tiles several tokens x the group's heads, so a row read from memory
// feeds up to 32 query rows: compute-bound, with K/V chunks widened to fp32 once per tile when
// the dtype is 16-bit.
//
// Quantized caches (int8 / e4m3, one fp32 scale per token and KV head) read a quarter of fp32's
// bytes (half of bf16's). Decode converts the bytes to fp32 in registers (kv_quant_load.h) and
// applies the scales once per key: to the score after q.k, and to the softmax weight before p.V.
// Prefill widens a chunk to dequantized fp32 once per tile, as for 16-bit caches.
#include "attention/cpu/attention_kernels.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "attention/cpu/kv_quant_load.h"
#include "cpu/vec.h"

namespace sagellm::cpu::SAGELLM_ISA {
namespace {

constexpr int W = Vec::kWidth;
constexpr int kChunk = 32;  // keys per online-softmax step (a multiple of 4 and of W)
constexpr int kMaxRows = kAttentionMaxRows;
// Query rows per register block: 4 x 4 score accumulators fit AVX-512's 32 registers; AVX2 and
// the scalar path have 16, so they take 2 rows at a time.
constexpr int kRowBlock = W == 16 ? 4 : 2;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Horizontal sums of four vectors, written to out[0..3].
inline void reduce4(const Vec& a, const Vec& b, const Vec& c, const Vec& d, float* out) {
#if SAGELLM_ISA_LEVEL == 2
  auto half = [](__m512 x) {
    return _mm256_add_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1));
  };
  __m256 ab = _mm256_hadd_ps(half(a.v), half(b.v));
  __m256 cd = _mm256_hadd_ps(half(c.v), half(d.v));
  __m256 abcd = _mm256_hadd_ps(ab, cd);
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
#elif SAGELLM_ISA_LEVEL == 1
  __m256 ab = _mm256_hadd_ps(a.v, b.v);
  __m256 cd = _mm256_hadd_ps(c.v, d.v);
  __m256 abcd = _mm256_hadd_ps(ab, cd);
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
#else
  out[0] = a.reduce_add();
  out[1] = b.reduce_add();
  out[2] = c.reduce_add();
  out[3] = d.reduce_add();
#endif
}

// s[r * kChunk + c] = q_r . k_c for RB query rows (fp32, [RB][D]) and 4 key rows.
template <int D, int RB, typename TK>
inline void qk_block(const float* q, const TK* const* k, float* s) {
  Vec acc[RB][4];
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = Vec::zero();
  for (int j = 0; j < D; j += W) {
    Vec kv[4];
    for (int c = 0; c < 4; ++c) kv[c] = load_kv(k[c] + j);
    for (int r = 0; r < RB; ++r) {
      Vec qv = Vec::load(q + r * D + j);
      for (int c = 0; c < 4; ++c) acc[r][c] = Vec::fma(qv, kv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < RB; ++r) reduce4(acc[r][0], acc[r][1], acc[r][2], acc[r][3], s + r * kChunk);
}

// acc_r[j0 .. j0 + JB*W) = acc_r * alpha_r + sum_t p[r][t] * v_t for RB rows.
template <int D, int RB, int JB, typename TV>
inline void pv_block(const float* p, const float* alpha, const TV* const* v, int nk, float* acc,
                     int j0) {
  Vec a[RB][JB];
  for (int r = 0; r < RB; ++r) {
    Vec al = Vec::set1(alpha[r]);
    for (int b = 0; b < JB; ++b) a[r][b] = Vec::load(acc + r * D + j0 + b * W) * al;
  }
  for (int t = 0; t < nk; ++t) {
    Vec vv[JB];
    for (int b = 0; b < JB; ++b) vv[b] = load_kv(v[t] + j0 + b * W);
    for (int r = 0; r < RB; ++r) {
      Vec pr = Vec::set1(p[r * kChunk + t]);
      for (int b = 0; b < JB; ++b) a[r][b] = Vec::fma(pr, vv[b], a[r][b]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int b = 0; b < JB; ++b) a[r][b].store(acc + r * D + j0 + b * W);
}

template <int D, int RB, typename TV>
inline void pv_rows(const float* p, const float* alpha, const TV* const* v, int nk, float* acc) {
  // Column blocks as wide as the registers allow (RB * JB accumulators + JB values of V: 32
  // registers on AVX-512, 16 otherwise), then single vectors.
  constexpr int kWant = W == 16 ? (RB == 4 ? 4 : 8) : 4;
  constexpr int JB = kWant < D / W ? kWant : D / W;
  constexpr int kFull = (D / W) / JB * JB * W;
  for (int j = 0; j < kFull; j += JB * W) pv_block<D, RB, JB>(p, alpha, v, nk, acc, j);
  for (int j = kFull; j < D; j += W) pv_block<D, RB, 1>(p, alpha, v, nk, acc, j);
}

// Per-tile state on the stack (132 KiB at head_size 256): fp32 query rows (pre-scaled),
// accumulators, scores, and the fp32 copies of a 16-bit K/V chunk.
template <int D>
struct Tile {
  alignas(64) float q[kMaxRows * D];
  alignas(64) float acc[kMaxRows * D];
  alignas(64) float s[kMaxRows * kChunk];
  alignas(64) float kbuf[kChunk * D];
  alignas(64) float vbuf[kChunk * D];
  float m[kMaxRows];
  float l[kMaxRows];
  float alpha[kMaxRows];
  int32_t lo[kMaxRows];  // first visible key of each row
  int32_t hi[kMaxRows];  // last visible key of each row
};

// The rows of one KV head inside a tile (the same arrays, offset to that head's first row).
struct RowState {
  float* q;
  float* acc;
  float* s;
  float* m;
  float* l;
  float* alpha;
  int32_t* lo;
  int32_t* hi;
};

template <int D>
RowState rows_from(Tile<D>& t, int row0) {
  return {t.q + row0 * D, t.acc + row0 * D, t.s + row0 * kChunk, t.m + row0,
          t.l + row0,     t.alpha + row0,   t.lo + row0,         t.hi + row0};
}

// Reads one byte of every cache line of n runs of `bytes` bytes at base + offsets[i], in address
// order. Measured on the development machine (Zen 4 guest), software prefetches into the
// randomly placed cache blocks changed nothing, while this sweep of real loads just before the
// chunk is used lets the hardware stream the lines in: decode went from ~85 to ~50 ns per key
// and KV head (bf16, head_size 128, 4 query heads per KV head, one thread, context in DRAM).
inline void touch_lines(const char* base, const int64_t* offsets, int n, int64_t bytes) {
  unsigned sink = 0;
  for (int i = 0; i < n; ++i) {
    const unsigned char* row = reinterpret_cast<const unsigned char*>(base + offsets[i]);
    for (int64_t b = 0; b < bytes; b += 64) sink += row[b];
  }
  volatile unsigned keep = sink;  // keeps the loads
  (void)keep;
}

// One chunk of nk keys starting at key k0; krow/vrow point at the rows (4-padded for krow).
// ks/vs: per key, the factor that turns a loaded row into the key/value (quantized caches read
// in registers), or null.
template <int D, typename TK>
void attend_chunk(const RowState& t, int rows, int k0, int nk, const TK* const* krow,
                  const TK* const* vrow, const float* ks, const float* vs, float soft_cap) {
  // Row blocks of kRowBlock, then 2, then 1 (a group of 3 or 7 heads is common).
  int r = 0;
  for (; r + kRowBlock <= rows; r += kRowBlock)
    for (int c = 0; c < nk; c += 4)
      qk_block<D, kRowBlock>(t.q + r * D, krow + c, t.s + r * kChunk + c);
  if (kRowBlock > 2 && r + 2 <= rows) {
    for (int c = 0; c < nk; c += 4) qk_block<D, 2>(t.q + r * D, krow + c, t.s + r * kChunk + c);
    r += 2;
  }
  for (; r < rows; ++r)
    for (int c = 0; c < nk; c += 4) qk_block<D, 1>(t.q + r * D, krow + c, t.s + r * kChunk + c);
  if (ks != nullptr)
    for (r = 0; r < rows; ++r)
      for (int c = 0; c < nk; ++c) t.s[r * kChunk + c] *= ks[c];

  const Vec cap = Vec::set1(soft_cap);
  const Vec inv_cap = Vec::set1(soft_cap > 0.0f ? 1.0f / soft_cap : 0.0f);
  for (r = 0; r < rows; ++r) {
    float* s = t.s + r * kChunk;
    if (soft_cap > 0.0f)
      for (int c = 0; c < nk; c += W) Vec(cap * tanh(Vec::load(s + c) * inv_cap)).store(s + c);
    // Keys outside [lo, hi] (causal limit, sliding window) and the padding get -inf.
    const int first = std::clamp(t.lo[r] - k0, 0, nk);
    const int last = std::clamp(t.hi[r] - k0 + 1, first, nk);
    for (int c = 0; c < first; ++c) s[c] = kNegInf;
    for (int c = last; c < kChunk; ++c) s[c] = kNegInf;
    Vec mx = Vec::set1(kNegInf);
    for (int c = 0; c < kChunk; c += W) mx = Vec::max(mx, Vec::load(s + c));
    const float m_new = std::max(t.m[r], mx.reduce_max());
    if (m_new == kNegInf) {  // nothing visible yet: keep the state, add nothing
      t.alpha[r] = 1.0f;
      for (int c = 0; c < kChunk; ++c) s[c] = 0.0f;
      continue;
    }
    const Vec mv = Vec::set1(m_new);
    Vec sum = Vec::zero();
    for (int c = 0; c < kChunk; c += W) {
      Vec e = exp(Vec::load(s + c) - mv);
      e.store(s + c);
      sum = sum + e;
    }
    t.alpha[r] = std::exp(t.m[r] - m_new);  // exp(-inf) = 0 on the first visible chunk
    t.l[r] = t.l[r] * t.alpha[r] + sum.reduce_add();
    t.m[r] = m_new;
    if (vs != nullptr)
      for (int c = 0; c < nk; ++c) s[c] *= vs[c];
  }

  for (r = 0; r + kRowBlock <= rows; r += kRowBlock)
    pv_rows<D, kRowBlock>(t.s + r * kChunk, t.alpha + r, vrow, nk, t.acc + r * D);
  if (kRowBlock > 2 && r + 2 <= rows) {
    pv_rows<D, 2>(t.s + r * kChunk, t.alpha + r, vrow, nk, t.acc + r * D);
    r += 2;
  }
  for (; r < rows; ++r) pv_rows<D, 1>(t.s + r * kChunk, t.alpha + r, vrow, nk, t.acc + r * D);
}

// T: query/out dtype; TC: cache element type (T, or q8 / e4m3 with scales).
template <typename T, typename TC, int D>
void run_item(const PagedAttentionParams& p, const AttentionWorkItem& w, Tile<D>& t) {
  constexpr bool kQuant = std::is_same<TC, q8>::value || std::is_same<TC, e4m3>::value;
  const int group = p.num_heads / p.num_kv_heads;
  const int nh = w.head_end - w.head_begin;
  const int rows_per_kv = (w.q_end - w.q_begin) * nh;
  const int num_kv = w.kv_head_end - w.kv_head;
  const int rows = rows_per_kv * num_kv;
  // Row r: kv head w.kv_head + r / rows_per_kv, then token-major, head-minor within it.
  auto token_of = [&](int r) { return int64_t(w.q_begin) + (r % rows_per_kv) / nh; };
  auto head_of = [&](int r) {
    return (w.kv_head + r / rows_per_kv) * group + w.head_begin + (r % rows_per_kv) % nh;
  };
  const T* query = static_cast<const T*>(p.query);
  const Vec sc = Vec::set1(p.scale);
  for (int r = 0; r < rows; ++r) {
    const T* src = query + token_of(r) * p.q_stride_token + head_of(r) * p.q_stride_head;
    for (int j = 0; j < D; j += W) (Vec::load(src + j) * sc).store(t.q + r * D + j);
    for (int j = 0; j < D; j += W) Vec::zero().store(t.acc + r * D + j);
    t.m[r] = kNegInf;
    t.l[r] = 0.0f;
    const int64_t pos = w.pos_begin + (token_of(r) - w.q_begin);
    t.hi[r] = static_cast<int32_t>(pos);
    t.lo[r] = static_cast<int32_t>(std::max<int64_t>(0, pos - p.sliding_window + 1));
  }

  // A 16-bit or quantized chunk is widened to fp32 once when enough row blocks reuse it;
  // otherwise the microkernels convert while loading (cheaper for decode's few rows per KV head).
  const bool widen = !std::is_same<TC, float>::value && rows_per_kv > 2 * kRowBlock;
  const TC* kc = static_cast<const TC*>(p.key_cache);
  const TC* vc = static_cast<const TC*>(p.value_cache);
  const int64_t stride_token = int64_t(p.num_kv_heads) * D;
  const int64_t stride_block = stride_token * p.block_size;
  const int32_t* table = p.block_tables + int64_t(w.seq) * p.block_tables_stride;
  // Cache offsets (in elements) of the chunk's tokens, KV head 0.
  int64_t base[kChunk];
  int64_t base_bytes[kChunk];
  const TC* krow[kChunk];
  const TC* vrow[kChunk];
  const float* kf[kChunk];
  const float* vf[kChunk];
  // Quantized caches: scale index of each token (KV head 0), and the chunk's factors.
  int64_t sbase[kChunk];
  alignas(64) float ks[kChunk];
  alignas(64) float vs[kChunk];
  const int64_t run_bytes = int64_t(num_kv) * D * sizeof(TC);  // the item's heads of one token
  for (int k0 = w.key_begin; k0 < w.key_end; k0 += kChunk) {
    const int nk = std::min(kChunk, w.key_end - k0);
    int blk = k0 / p.block_size;
    int off = k0 % p.block_size;
    for (int c = 0; c < nk; ++c) {
      base[c] = table[blk] * stride_block + off * stride_token;
      base_bytes[c] = (base[c] + int64_t(w.kv_head) * D) * int64_t(sizeof(TC));
      if constexpr (kQuant) sbase[c] = (int64_t(table[blk]) * p.block_size + off) * p.num_kv_heads;
      if (++off == p.block_size) {
        off = 0;
        ++blk;
      }
    }
    touch_lines(reinterpret_cast<const char*>(kc), base_bytes, nk, run_bytes);
    touch_lines(reinterpret_cast<const char*>(vc), base_bytes, nk, run_bytes);
    // All KV heads of the item walk the same chunk one after the other, so the blocks' rows of
    // every head are read close together in time (whole blocks rather than strided runs).
    for (int kv = 0; kv < num_kv; ++kv) {
      const int64_t head_off = int64_t(w.kv_head + kv) * D;
      for (int c = 0; c < nk; ++c) {
        krow[c] = kc + base[c] + head_off;
        vrow[c] = vc + base[c] + head_off;
      }
      const int nk4 = (nk + 3) & ~3;
      for (int c = nk; c < nk4; ++c) krow[c] = krow[nk - 1];  // padding, masked to -inf later
      const RowState rs = rows_from(t, kv * rows_per_kv);
      if constexpr (kQuant) {
        for (int c = 0; c < nk; ++c) {
          const int64_t si = sbase[c] + w.kv_head + kv;
          ks[c] = p.k_scales[si] * kv_load_factor<TC>;
          vs[c] = p.v_scales[si] * kv_load_factor<TC>;
        }
        for (int c = nk; c < nk4; ++c) ks[c] = ks[nk - 1];
      }
      if (widen) {
        for (int c = 0; c < nk4; ++c) {
          float* dst = t.kbuf + c * D;
          if constexpr (kQuant) {
            const Vec f = Vec::set1(ks[c]);
            for (int j = 0; j < D; j += W) (load_kv(krow[c] + j) * f).store(dst + j);
          } else {
            for (int j = 0; j < D; j += W) load_kv(krow[c] + j).store(dst + j);
          }
          kf[c] = dst;
        }
        for (int c = 0; c < nk; ++c) {
          float* dst = t.vbuf + c * D;
          if constexpr (kQuant) {
            const Vec f = Vec::set1(vs[c]);
            for (int j = 0; j < D; j += W) (load_kv(vrow[c] + j) * f).store(dst + j);
          } else {
            for (int j = 0; j < D; j += W) load_kv(vrow[c] + j).store(dst + j);
          }
          vf[c] = dst;
        }
        attend_chunk<D>(rs, rows_per_kv, k0, nk, kf, vf, nullptr, nullptr, p.soft_cap);
      } else if constexpr (kQuant) {
        attend_chunk<D>(rs, rows_per_kv, k0, nk, krow, vrow, ks, vs, p.soft_cap);
      } else {
        attend_chunk<D>(rs, rows_per_kv, k0, nk, krow, vrow, nullptr, nullptr, p.soft_cap);
      }
    }
  }

  if (w.part < 0) {
    T* out = static_cast<T*>(p.out);
    for (int r = 0; r < rows; ++r) {
      T* dst = out + token_of(r) * p.out_stride_token + head_of(r) * p.out_stride_head;
      const Vec inv = Vec::set1(1.0f / t.l[r]);
      for (int j = 0; j < D; j += W) (Vec::load(t.acc + r * D + j) * inv).store(dst + j);
    }
  } else {
    for (int r = 0; r < rows; ++r) {
      const int64_t slot = int64_t(w.part) * p.num_heads + head_of(r);
      std::copy(t.acc + r * D, t.acc + (r + 1) * D, p.partial_acc + slot * D);
      p.partial_ml[2 * slot] = t.m[r];
      p.partial_ml[2 * slot + 1] = t.l[r];
    }
  }
}

template <typename T, typename TC, int D>
void run_items(const PagedAttentionParams& p, int64_t begin, int64_t end) {
  Tile<D> tile;
  for (int64_t i = begin; i < end; ++i) run_item<T, TC, D>(p, p.items[i], tile);
}

template <typename T, int D>
void merge_rows(const PagedAttentionParams& p, int64_t begin, int64_t end) {
  T* out = static_cast<T*>(p.out);
  alignas(64) float acc[D];
  for (int64_t row = begin; row < end; ++row) {
    const int32_t* info = p.merge_info + (row / p.num_heads) * 3;
    const int64_t head = row % p.num_heads;
    const int n = info[2];
    // Slot i of this (sequence, head): index (info[1] + i) * num_heads + head.
    auto at = [&](int i) { return (int64_t(info[1]) + i) * p.num_heads + head; };
    float m = kNegInf;  // over non-empty slots only (an empty one has l = 0)
    for (int i = 0; i < n; ++i)
      if (p.partial_ml[2 * at(i) + 1] > 0.0f) m = std::max(m, p.partial_ml[2 * at(i)]);
    std::fill(acc, acc + D, 0.0f);
    float l = 0.0f;
    for (int i = 0; i < n; ++i) {
      const float li = p.partial_ml[2 * at(i) + 1];
      if (li == 0.0f) continue;
      const float w = std::exp(p.partial_ml[2 * at(i)] - m);
      l += w * li;
      const float* part = p.partial_acc + at(i) * D;
      const Vec wv = Vec::set1(w);
      for (int j = 0; j < D; j += W)
        Vec::fma(wv, Vec::load(part + j), Vec::load(acc + j)).store(acc + j);
    }
    T* dst = out + int64_t(info[0]) * p.out_stride_token + head * p.out_stride_head;
    const Vec inv = Vec::set1(1.0f / l);
    for (int j = 0; j < D; j += W) (Vec::load(acc + j) * inv).store(dst + j);
  }
}

// The kernels compiled: 3 dtypes x 3 cache storages (the dtype itself, int8, e4m3) x 5 head
// sizes (kAttentionHeadSizes); the entry file rejects any other head size before dispatching
// here. kByStore = false (merge) ignores the cache storage.
template <template <typename, typename, int> class Fn, typename T, typename TC>
void by_head(const PagedAttentionParams& p, int64_t begin, int64_t end) {
  switch (p.head_size) {
    case 64:
      return Fn<T, TC, 64>::run(p, begin, end);
    case 80:
      return Fn<T, TC, 80>::run(p, begin, end);
    case 96:
      return Fn<T, TC, 96>::run(p, begin, end);
    case 128:
      return Fn<T, TC, 128>::run(p, begin, end);
    case 256:
      return Fn<T, TC, 256>::run(p, begin, end);
  }
}

template <template <typename, typename, int> class Fn, bool kByStore>
void dispatch(const PagedAttentionParams& p, int64_t begin, int64_t end) {
  auto by_store = [&](auto tag) {
    using T = decltype(tag);
    if constexpr (kByStore) {
      switch (p.kv_store) {
        case KVStore::kInt8:
          return by_head<Fn, T, q8>(p, begin, end);
        case KVStore::kFp8E4M3:
          return by_head<Fn, T, e4m3>(p, begin, end);
        case KVStore::kModel:
          break;
      }
    }
    return by_head<Fn, T, T>(p, begin, end);
  };
  switch (p.dtype) {
    case DType::kF32:
      return by_store(float{});
    case DType::kF16:
      return by_store(f16{});
    case DType::kBF16:
      return by_store(bf16{});
  }
}

template <typename T, typename TC, int D>
struct RunFn {
  static void run(const PagedAttentionParams& p, int64_t b, int64_t e) {
    run_items<T, TC, D>(p, b, e);
  }
};
template <typename T, typename TC, int D>
struct MergeFn {
  static void run(const PagedAttentionParams& p, int64_t b, int64_t e) { merge_rows<T, D>(p, b, e); }
};

}  // namespace

void paged_attention_run(const PagedAttentionParams& p, int64_t begin, int64_t end) {
  dispatch<RunFn, true>(p, begin, end);
}

void paged_attention_merge(const PagedAttentionParams& p, int64_t begin, int64_t end) {
  dispatch<MergeFn, false>(p, begin, end);
}

}  // namespace sagellm::cpu::SAGELLM_ISA
