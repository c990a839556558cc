// Rotary embedding on CUDA, in place on query and (optionally) key: NeoX and GPT-J pairing,
// partial rotary (only the first rot_dim dims of a head turn), 2-d [tokens, heads * head_size] or
// 3-d [tokens, heads, head_size] tensors with strided tokens and heads, cos/sin cache in fp32 or
// the query's dtype. Same schema and checks (common/elementwise_checks.h) as the CPU kernel.
//
// Memory-bound: 2 x rot_dim elements per head, with 16-byte loads/stores when the head layout
// allows, else element by element. Instantiations: five (query, cache) dtype pairs x (NeoX,
// GPT-J) x (16-byte, element-wise).
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <optional>

#include "common/elementwise_checks.h"
#include "elementwise/cuda/elementwise_cuda.cuh"

namespace sagellm {
namespace cuda_ew {

// ---- Rotary embedding -------------------------------------------------------------------------
//
// One CTA per token (grid-stride): its cos/sin row is converted to fp32 into shared memory once,
// then the threads walk the (head, chunk) items of query and key. NeoX chunks are N pairs
// (i, i + rot_dim/2) read as two packs; GPT-J chunks are N adjacent elements (N/2 pairs). Each
// thread loads kRotUnroll items before writing any; the host sizes the CTA so that one such batch
// usually covers the token.

constexpr int kRotUnroll = 2;
constexpr int kRotMaxThreads = 512;

template <typename T, typename C>
struct RotaryArgs {
  const int64_t* positions;
  T* query;
  int64_t q_token_stride;
  int64_t q_head_stride;
  int q_heads;
  T* key;  // nullptr: query only
  int64_t k_token_stride;
  int64_t k_head_stride;
  int k_heads;
  const C* cache;  // [max_position, rot_dim]: cos, then sin
  int64_t cache_stride;
  int64_t max_position;
  int64_t num_tokens;
  int rot_dim;
  int chunks_per_head;
};

// M consecutive floats of shared memory at an offset that is a multiple of M: one 16-byte (or
// 8-byte) load per 4 (2) floats. In the NeoX kernel a warp's threads read 32-byte apart runs,
// which element-wise loads turn into 8-way bank conflicts and 128-bit loads into 2-way ones.
template <int M>
__device__ __forceinline__ void load_shared(const float* p, float (&out)[M]) {
  if constexpr (M % 4 == 0) {
#pragma unroll
    for (int i = 0; i < M; i += 4) {
      const float4 v = *reinterpret_cast<const float4*>(p + i);
      out[i] = v.x;
      out[i + 1] = v.y;
      out[i + 2] = v.z;
      out[i + 3] = v.w;
    }
  } else if constexpr (M == 2) {
    const float2 v = *reinterpret_cast<const float2*>(p);
    out[0] = v.x;
    out[1] = v.y;
  } else {
#pragma unroll
    for (int i = 0; i < M; ++i) out[i] = p[i];
  }
}

// The kRotUnroll items a thread holds at once: where each lives and its packs.
template <typename T, int N>
struct RotBatch {
  T* base[kRotUnroll];
  int chunk[kRotUnroll];
  Pack<T, N> x1[kRotUnroll];
  Pack<T, N> x2[kRotUnroll];  // NeoX: the second half's pack
};

template <typename T, typename C, int N, bool kNeox, bool kAligned>
__device__ __forceinline__ void load_batch(RotBatch<T, N>& b, const RotaryArgs<T, C>& a,
                                           int64_t t, int j0, int items) {
  const int half = a.rot_dim / 2;
#pragma unroll
  for (int u = 0; u < kRotUnroll; ++u) {
    const int j = j0 + u * blockDim.x;
    if (j >= items) continue;
    const int h = j / a.chunks_per_head;
    b.chunk[u] = j - h * a.chunks_per_head;
    b.base[u] = h < a.q_heads ? a.query + t * a.q_token_stride + h * a.q_head_stride
                              : a.key + t * a.k_token_stride + (h - a.q_heads) * a.k_head_stride;
    load_pack<kAligned>(b.x1[u], b.base[u] + b.chunk[u] * N);
    if constexpr (kNeox) load_pack<kAligned>(b.x2[u], b.base[u] + half + b.chunk[u] * N);
  }
}

template <typename T, typename C, int N, bool kNeox, bool kAligned>
__device__ __forceinline__ void rotate_batch(RotBatch<T, N>& b, const float* cos_sin, int half,
                                             int j0, int items) {
  constexpr int kCs = kNeox ? N : N / 2;  // cos (and sin) values per chunk
#pragma unroll
  for (int u = 0; u < kRotUnroll; ++u) {
    const int j = j0 + u * blockDim.x;
    if (j >= items) continue;
    float c[kCs], s[kCs], f1[N];
    load_shared(cos_sin + b.chunk[u] * kCs, c);
    load_shared(cos_sin + half + b.chunk[u] * kCs, s);
    to_floats(b.x1[u], f1);
    if constexpr (kNeox) {
      float f2[N];
      to_floats(b.x2[u], f2);
#pragma unroll
      for (int e = 0; e < N; ++e) {
        const float a1 = f1[e], a2 = f2[e];
        f1[e] = fmaf(a1, c[e], -(a2 * s[e]));
        f2[e] = fmaf(a2, c[e], a1 * s[e]);
      }
      from_floats(f2, b.x2[u]);
      store_pack<kAligned>(b.base[u] + half + b.chunk[u] * N, b.x2[u]);
    } else {
#pragma unroll
      for (int e = 0; e < N; e += 2) {
        const float a1 = f1[e], a2 = f1[e + 1];
        f1[e] = fmaf(a1, c[e / 2], -(a2 * s[e / 2]));
        f1[e + 1] = fmaf(a2, c[e / 2], a1 * s[e / 2]);
      }
    }
    from_floats(f1, b.x1[u]);
    store_pack<kAligned>(b.base[u] + b.chunk[u] * N, b.x1[u]);
  }
}

template <typename T, typename C, int N, bool kNeox, bool kAligned>
__global__ void __launch_bounds__(kRotMaxThreads) rotary_kernel(const RotaryArgs<T, C> a) {
  extern __shared__ __align__(16) float cos_sin[];  // [rot_dim]: cos, then sin
  const int half = a.rot_dim / 2;
  const int items = (a.q_heads + a.k_heads) * a.chunks_per_head;
  for (int64_t t = blockIdx.x; t < a.num_tokens; t += gridDim.x) {
    // The first batch does not depend on the position: its loads go out first, so their latency
    // overlaps the position and cos/sin reads and the barriers.
    RotBatch<T, N> b;
    load_batch<T, C, N, kNeox, kAligned>(b, a, t, threadIdx.x, items);
    const int64_t pos = a.positions[t];
    // Unchecked positions (index checks off) never read outside the cache: the token is left
    // as it is. Uniform over the CTA, so the barriers below stay uniform too.
    if (pos < 0 || pos >= a.max_position) continue;
    const C* row = a.cache + pos * a.cache_stride;
    __syncthreads();  // the previous token's readers are done with cos_sin
    for (int i = threadIdx.x; i < a.rot_dim; i += blockDim.x) cos_sin[i] = to_f(row[i]);
    __syncthreads();
    for (int j0 = threadIdx.x; j0 < items; j0 += kRotUnroll * blockDim.x) {
      if (j0 != static_cast<int>(threadIdx.x)) {
        load_batch<T, C, N, kNeox, kAligned>(b, a, t, j0, items);
      }
      rotate_batch<T, C, N, kNeox, kAligned>(b, cos_sin, half, j0, items);
    }
  }
}

// NeoX chunks are N pairs; GPT-J chunks N elements, so N >= 2 there.
template <typename T, typename C, int N, bool kNeox, bool kAligned>
void launch_rotary(RotaryArgs<T, C> a, cudaStream_t stream) {
  a.chunks_per_head = kNeox ? a.rot_dim / 2 / N : a.rot_dim / N;
  const int64_t items = static_cast<int64_t>(a.q_heads + a.k_heads) * a.chunks_per_head;
  TORCH_CHECK(items <= INT_MAX, "rotary_embedding: too many heads for one launch");
  const int threads = static_cast<int>(std::clamp<int64_t>(
      ceil_div(ceil_div(items, kRotUnroll), 32) * 32, 32, kRotMaxThreads));
  const unsigned blocks = static_cast<unsigned>(std::min(a.num_tokens, kMaxGridX));
  const size_t smem = static_cast<size_t>(a.rot_dim) * sizeof(float);
  rotary_kernel<T, C, N, kNeox, kAligned><<<blocks, threads, smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void rotary_embedding_cuda(const at::Tensor& positions, at::Tensor& query,
                           std::optional<at::Tensor> key, int64_t head_size,
                           const at::Tensor& cos_sin_cache, bool is_neox) {
  const char* op = "rotary_embedding";
  check_cuda(query, op, "query");
  check_same_device(positions, query, op, "positions", "query");
  check_same_device(cos_sin_cache, query, op, "cos_sin_cache", "query");
  if (key.has_value()) check_same_device(*key, query, op, "key", "query");
  const checks::RotaryGeometry g =
      checks::check_rotary(positions, query, key, head_size, cos_sin_cache);
  if (g.num_tokens == 0) return;
  const c10::cuda::CUDAGuard guard(query.device());
  if (check_index_values_now()) {
    const at::Tensor host = positions.to(at::kCPU);
    checks::check_positions(host.data_ptr<int64_t>(), g.num_tokens, cos_sin_cache.size(0));
  }
  TORCH_CHECK(g.query.heads + g.key.heads <= INT_MAX, op, ": too many heads for one launch");
  // The cos/sin row is staged in (default-sized) shared memory.
  TORCH_CHECK(g.rot_dim <= 8192, op, ": rot_dim = ", g.rot_dim,
              " is larger than this implementation supports (8192)");
  const int64_t esize = query.element_size();
  const int64_t half_bytes = g.rot_dim / 2 * esize;
  auto layout_aligned = [&](const void* p, const checks::HeadLayout& l) {
    return aligned16(p) && (l.token_stride * esize) % 16 == 0 && (l.head_stride * esize) % 16 == 0;
  };
  const bool vec = (is_neox ? half_bytes % 16 == 0 : (g.rot_dim * esize) % 16 == 0) &&
                   layout_aligned(query.data_ptr(), g.query) &&
                   (!key.has_value() || layout_aligned(key->data_ptr(), g.key));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  with_dtype(query.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto run = [&](auto cache_tag) {
      using C = typename decltype(cache_tag)::type;
      RotaryArgs<T, C> a{};
      a.positions = positions.data_ptr<int64_t>();
      a.query = static_cast<T*>(query.data_ptr());
      a.q_token_stride = g.query.token_stride;
      a.q_head_stride = g.query.head_stride;
      a.q_heads = static_cast<int>(g.query.heads);
      a.key = key.has_value() ? static_cast<T*>(key->data_ptr()) : nullptr;
      a.k_token_stride = g.key.token_stride;
      a.k_head_stride = g.key.head_stride;
      a.k_heads = static_cast<int>(g.key.heads);
      a.cache = static_cast<const C*>(cos_sin_cache.data_ptr());
      a.cache_stride = g.cache_stride;
      a.max_position = cos_sin_cache.size(0);
      a.num_tokens = g.num_tokens;
      a.rot_dim = static_cast<int>(g.rot_dim);
      constexpr int kVec = kPack16<T>;
      if (vec && is_neox) {
        launch_rotary<T, C, kVec, true, true>(a, stream);
      } else if (vec) {
        launch_rotary<T, C, kVec, false, true>(a, stream);
      } else if (is_neox) {
        launch_rotary<T, C, 1, true, false>(a, stream);
      } else {
        launch_rotary<T, C, 2, false, false>(a, stream);
      }
    };
    // The cos/sin cache is fp32 or the query's dtype: five instantiations, not nine.
    if (cos_sin_cache.scalar_type() == at::kFloat) {
      run(Tag<float>{});
    } else {
      run(Tag<T>{});
    }
  });
}

}  // namespace cuda_ew
}  // namespace sagellm

TORCH_LIBRARY_IMPL(sagellm, CUDA, m) {
  m.impl("rotary_embedding", &sagellm::cuda_ew::rotary_embedding_cuda);
}
