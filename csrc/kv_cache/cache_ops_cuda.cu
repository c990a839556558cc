// KV-cache writes and block copies on CUDA. Pure data movement, bound by memory bandwidth
// (bytes moved = 2 x bytes copied), in the widest unit (16, 8, 4, 2 or 1 bytes) that the head or
// block size and every pointer and stride allow. Checks shared with the CPU entry
// (kv_cache/cache_checks.h).
//
//   reshape_and_cache  one CTA per token: its key and value rows (num_kv_heads x head_size,
//                      token and head strides as given) -> cache slot slot_mapping[t]; -1 skips.
//                      Quantized caches (int8 / float8_e4m3fn): one warp per (token, K or V,
//                      head) row: the row's max |x| by a warp reduction, s = max / QMAX (0 with
//                      q = 0 when max < FLT_MIN), each element x / s rounded as the CPU op does
//                      (bit-identical caches), s into k_scales / v_scales [slot, head].
//   copy_blocks        one launch for up to kMaxCaches caches (all layers' key and value caches
//                      of a model), their pointers passed by value in the kernel parameters, so
//                      nothing is copied to the device for them and the launch can be captured.
//                      grid = (unit columns of a block, cache); each thread owns one unit offset
//                      of every block of its cache and applies the pairs in order, so a mapping
//                      whose dst is a later pair's src gives the CPU op's result.
//   swap_blocks        cudaMemcpyAsync on the current stream, one per run of consecutive blocks.
// Block copies move bytes, so int8 / e4m3 caches and their fp32 scale tensors (copied as a
// separate list / call of the same block count) take the same paths.
//
// Index values on the device (slot_mapping, a block_mapping on the GPU) are checked on the host
// only with sagellm.ops.set_cuda_index_checks(True) and never during graph capture; the kernels
// skip out-of-range ids instead of writing outside the caches. A block_mapping on the CPU is
// always checked (its values are already on the host).
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cstdint>
#include <string>
#include <vector>

#include "common/index_checks.h"
#include "common/kv_quant.h"
#include "kv_cache/cache_checks.h"

namespace sagellm {
namespace cache_cuda {

template <int kBytes>
struct UnitOf;
template <>
struct UnitOf<16> {
  using type = uint4;
};
template <>
struct UnitOf<8> {
  using type = uint2;
};
template <>
struct UnitOf<4> {
  using type = uint32_t;
};
template <>
struct UnitOf<2> {
  using type = uint16_t;
};
template <>
struct UnitOf<1> {
  using type = uint8_t;
};

// ---- reshape_and_cache ------------------------------------------------------------------------

constexpr int kCacheUnroll = 2;
constexpr int kCacheMaxThreads = 256;

struct CacheWriteArgs {
  const char* key;
  const char* value;
  char* key_cache;
  char* value_cache;
  const int64_t* slots;
  int64_t num_tokens;
  int64_t num_slots;
  int64_t key_token_stride;  // bytes
  int64_t key_head_stride;   // bytes
  int64_t value_token_stride;
  int64_t value_head_stride;
  int64_t row_bytes;  // num_kv_heads * head_size * element size: one cache slot
  int units_per_head;
  int units_per_token;
};

template <typename U>
__global__ void __launch_bounds__(kCacheMaxThreads) reshape_and_cache_kernel(
    const CacheWriteArgs a) {
  for (int64_t t = blockIdx.x; t < a.num_tokens; t += gridDim.x) {
    const char* k = a.key + t * a.key_token_stride;
    const char* v = a.value + t * a.value_token_stride;
    for (int i0 = threadIdx.x; i0 < a.units_per_token; i0 += kCacheUnroll * blockDim.x) {
      // The rows are loaded before the slot is known, so both latencies overlap (a padding
      // token's rows are read for nothing; there are few).
      U kr[kCacheUnroll], vr[kCacheUnroll];
#pragma unroll
      for (int u = 0; u < kCacheUnroll; ++u) {
        const int i = i0 + u * blockDim.x;
        if (i >= a.units_per_token) continue;
        const int h = i / a.units_per_head;
        const int64_t off = (i - h * a.units_per_head) * static_cast<int64_t>(sizeof(U));
        kr[u] = *reinterpret_cast<const U*>(k + h * a.key_head_stride + off);
        vr[u] = *reinterpret_cast<const U*>(v + h * a.value_head_stride + off);
      }
      const int64_t slot = a.slots[t];
      if (slot < 0 || slot >= a.num_slots) break;  // -1: padding token
      U* kc = reinterpret_cast<U*>(a.key_cache + slot * a.row_bytes);
      U* vc = reinterpret_cast<U*>(a.value_cache + slot * a.row_bytes);
#pragma unroll
      for (int u = 0; u < kCacheUnroll; ++u) {
        const int i = i0 + u * blockDim.x;
        if (i >= a.units_per_token) continue;
        kc[i] = kr[u];
        vc[i] = vr[u];
      }
    }
  }
}

// ---- reshape_and_cache into a quantized cache ------------------------------------------------

constexpr int kQuantThreads = 128;  // 4 rows per CTA

struct QuantWriteArgs {
  const void* key;
  const void* value;
  uint8_t* key_cache;  // int8 or e4m3 bytes, [num_slots, heads, head_size]
  uint8_t* value_cache;
  float* k_scales;  // [num_slots, heads]
  float* v_scales;
  const int64_t* slots;
  int64_t num_rows;  // num_tokens * 2 * heads: (token, K or V, head)
  int64_t num_slots;
  int64_t key_token_stride;  // elements
  int64_t key_head_stride;
  int64_t value_token_stride;
  int64_t value_head_stride;
  int heads;
  int head_size;
  float qmax;
};

// IEEE operations in inline PTX: the file is built with --use_fast_math, whose flush-to-zero
// would turn tiny rows (denormal |x| or scales) into zeros where the CPU op keeps them, and
// whose division is approximate. PTX written here is taken as is.
__device__ __forceinline__ float abs_ieee(float x) {
  float y;
  asm("abs.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float max_ieee(float a, float b) {  // a NaN operand yields the other
  float y;
  asm("max.f32 %0, %1, %2;" : "=f"(y) : "f"(a), "f"(b));
  return y;
}
__device__ __forceinline__ float div_ieee(float a, float b) {
  float y;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(y) : "f"(a), "f"(b));
  return y;
}

__device__ __forceinline__ float load_f32(const float* p) { return *p; }
__device__ __forceinline__ float load_f32(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_f32(const __nv_bfloat16* p) { return __bfloat162float(*p); }

// q = x / s stored as int8 (round half to even, clamped to +-127: the division may land a hair
// above 127) or as e4m3 (round to nearest even, saturating: a hair above 448 gives 448).
template <KVQuant Q>
__device__ __forceinline__ uint8_t quantize_elem(float q) {
  if constexpr (Q == KVQuant::kInt8) {
    const int v = min(max(__float2int_rn(q), -127), 127);
    return static_cast<uint8_t>(static_cast<int8_t>(v));
  } else {
    return static_cast<uint8_t>(__nv_cvt_float_to_fp8(q, __NV_SATFINITE, __NV_E4M3));
  }
}

template <typename T, KVQuant Q>
__global__ void __launch_bounds__(kQuantThreads) reshape_and_cache_quant_kernel(
    const QuantWriteArgs a) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t{gridDim.x} * (kQuantThreads / 32);
  for (int64_t row = int64_t{blockIdx.x} * (kQuantThreads / 32) + threadIdx.x / 32;
       row < a.num_rows; row += warps) {
    const int64_t t = row / (2 * a.heads);
    const int rest = static_cast<int>(row - t * 2 * a.heads);
    const bool is_value = rest >= a.heads;
    const int h = is_value ? rest - a.heads : rest;
    const int64_t slot = a.slots[t];
    if (slot < 0 || slot >= a.num_slots) continue;  // -1: padding token (uniform per warp)
    const T* x = static_cast<const T*>(is_value ? a.value : a.key) +
                 t * (is_value ? a.value_token_stride : a.key_token_stride) +
                 h * (is_value ? a.value_head_stride : a.key_head_stride);
    float amax = 0.0f;
    for (int d = lane; d < a.head_size; d += 32) amax = max_ieee(amax, abs_ieee(load_f32(x + d)));
#pragma unroll
    for (int off = 16; off > 0; off /= 2)
      amax = max_ieee(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    // max|x| < FLT_MIN (zero or subnormal row): s = 0, q = 0, as on the CPU. Tested on the bits,
    // since a float compare of a subnormal s against 0 is itself flushed under fast math; s may
    // still be subnormal (amax < QMAX * FLT_MIN), and div_ieee then divides by it exactly.
    const bool tiny = __float_as_uint(amax) < __float_as_uint(FLT_MIN);
    const float s = tiny ? 0.0f : div_ieee(amax, a.qmax);
    const int64_t dst_row = slot * a.heads + h;
    uint8_t* dst = (is_value ? a.value_cache : a.key_cache) + dst_row * a.head_size;
    // The second read of x hits L1 / L2: the row was just loaded by this warp.
    for (int d = lane; d < a.head_size; d += 32)
      dst[d] = tiny ? uint8_t{0} : quantize_elem<Q>(div_ieee(load_f32(x + d), s));
    if (lane == 0) (is_value ? a.v_scales : a.k_scales)[dst_row] = s;
  }
}

// ---- copy_blocks ------------------------------------------------------------------------------

constexpr int kMaxCaches = 128;     // per launch: 1 KiB of pointers in the kernel parameters
constexpr int kPairBatch = 8;       // loads in flight per thread
constexpr int kMappingTile = 256;   // pairs staged in shared memory at a time
constexpr int kCopyThreads = 128;

struct CacheList {
  char* ptr[kMaxCaches];
};

template <typename U>
__global__ void __launch_bounds__(kCopyThreads) copy_blocks_kernel(
    const CacheList caches, const int64_t* __restrict__ mapping, int64_t n, int64_t num_blocks,
    int64_t units_per_block) {
  __shared__ int64_t tile[2 * kMappingTile];
  U* base = reinterpret_cast<U*>(caches.ptr[blockIdx.y]);
  const int64_t unit = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = unit < units_per_block;
  for (int64_t p0 = 0; p0 < n; p0 += kMappingTile) {
    const int count = static_cast<int>(n - p0 < kMappingTile ? n - p0 : kMappingTile);
    __syncthreads();  // the previous tile is consumed
    for (int i = threadIdx.x; i < 2 * count; i += blockDim.x) tile[i] = mapping[2 * p0 + i];
    __syncthreads();
    if (!active) continue;
    for (int b0 = 0; b0 < count; b0 += kPairBatch) {
      int64_t src[kPairBatch], dst[kPairBatch];
      U val[kPairBatch];
#pragma unroll
      for (int b = 0; b < kPairBatch; ++b) {
        src[b] = dst[b] = -1;
        if (b0 + b < count) {
          const int64_t s = tile[2 * (b0 + b)], d = tile[2 * (b0 + b) + 1];
          if (s >= 0 && s < num_blocks && d >= 0 && d < num_blocks) {
            src[b] = s;
            dst[b] = d;
          }
        }
        if (src[b] >= 0) val[b] = base[src[b] * units_per_block + unit];
      }
      // The batch's loads were issued together; a pair reading a block that an earlier pair of
      // the batch writes takes that pair's value instead (earlier batches were stored already,
      // by this same thread, so its loads see them).
#pragma unroll
      for (int b = 1; b < kPairBatch; ++b) {
#pragma unroll
        for (int e = 0; e < b; ++e) {
          if (src[b] >= 0 && dst[e] == src[b]) val[b] = val[e];
        }
      }
#pragma unroll
      for (int b = 0; b < kPairBatch; ++b) {
        if (src[b] >= 0 && src[b] != dst[b]) base[dst[b] * units_per_block + unit] = val[b];
      }
    }
  }
}

}  // namespace cache_cuda

namespace {

void check_same_device(const at::Tensor& t, const at::Device& device, const char* op,
                       const std::string& name, const char* ref_name) {
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", device);
}

bool capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// Index values are read back to the host only when asked for, and never inside graph capture.
bool check_index_values_now() { return cuda_index_checks_enabled() && !capturing(); }

// The widest unit (16, 8, 4, 2 or 1 bytes) dividing every size and address in `values`.
int widest_unit(const std::vector<uint64_t>& values) {
  uint64_t all = 0;
  for (uint64_t v : values) all |= v;
  for (int u : {16, 8, 4, 2}) {
    if (all % u == 0) return u;
  }
  return 1;
}

template <typename Fn>
void with_unit(int bytes, Fn&& fn) {
  switch (bytes) {
    case 16:
      return fn(cache_cuda::UnitOf<16>{});
    case 8:
      return fn(cache_cuda::UnitOf<8>{});
    case 4:
      return fn(cache_cuda::UnitOf<4>{});
    case 2:
      return fn(cache_cuda::UnitOf<2>{});
    default:
      return fn(cache_cuda::UnitOf<1>{});
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Instantiations: {fp32, fp16, bf16} keys x {int8, e4m3} caches.
template <typename T>
void launch_quant_write(const cache_cuda::QuantWriteArgs& a, KVQuant quant, unsigned blocks,
                        cudaStream_t stream) {
  constexpr int kThreads = cache_cuda::kQuantThreads;
  if (quant == KVQuant::kInt8) {
    cache_cuda::reshape_and_cache_quant_kernel<T, KVQuant::kInt8>
        <<<blocks, kThreads, 0, stream>>>(a);
  } else {
    cache_cuda::reshape_and_cache_quant_kernel<T, KVQuant::kFp8E4M3>
        <<<blocks, kThreads, 0, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The caller has checked everything (check_reshape_and_cache, check_cache_scales) and that
// there is something to write.
void reshape_and_cache_quant(const at::Tensor& key, const at::Tensor& value,
                             at::Tensor& key_cache, at::Tensor& value_cache,
                             const at::Tensor& slot_mapping, const at::Tensor& k_scales,
                             const at::Tensor& v_scales, KVQuant quant) {
  const char* op = "reshape_and_cache";
  const int64_t heads = key.size(1), head_size = key.size(2);
  TORCH_CHECK(heads <= INT_MAX / 2 && head_size <= INT_MAX, op, ": key has too many heads or ",
              "too large a head_size: ", key.sizes());
  cache_cuda::QuantWriteArgs a{};
  a.key = key.data_ptr();
  a.value = value.data_ptr();
  a.key_cache = static_cast<uint8_t*>(key_cache.data_ptr());
  a.value_cache = static_cast<uint8_t*>(value_cache.data_ptr());
  a.k_scales = k_scales.data_ptr<float>();
  a.v_scales = v_scales.data_ptr<float>();
  a.slots = slot_mapping.data_ptr<int64_t>();
  a.num_rows = key.size(0) * 2 * heads;
  a.num_slots = key_cache.size(0) * key_cache.size(1);
  a.key_token_stride = key.stride(0);
  a.key_head_stride = key.stride(1);
  a.value_token_stride = value.stride(0);
  a.value_head_stride = value.stride(1);
  a.heads = static_cast<int>(heads);
  a.head_size = static_cast<int>(head_size);
  a.qmax = kv_quant_max(quant);
  // Rows beyond the grid are taken in a grid-stride loop.
  const unsigned blocks = static_cast<unsigned>(
      std::min<int64_t>(ceil_div(a.num_rows, cache_cuda::kQuantThreads / 32), int64_t{1} << 20));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (key.scalar_type()) {
    case at::kFloat:
      return launch_quant_write<float>(a, quant, blocks, stream);
    case at::kHalf:
      return launch_quant_write<__half>(a, quant, blocks, stream);
    case at::kBFloat16:
      return launch_quant_write<__nv_bfloat16>(a, quant, blocks, stream);
    default:
      TORCH_CHECK(false, op, ": key has dtype ", key.scalar_type(),
                  "; a quantized cache takes float32, float16 or bfloat16");
  }
}

}  // namespace

void reshape_and_cache_cuda(const at::Tensor& key, const at::Tensor& value,
                            at::Tensor& key_cache, at::Tensor& value_cache,
                            const at::Tensor& slot_mapping,
                            const std::optional<at::Tensor>& k_scales,
                            const std::optional<at::Tensor>& v_scales) {
  const char* op = "reshape_and_cache";
  TORCH_CHECK(key_cache.device().is_cuda(), op, ": key_cache is on ", key_cache.device(),
              "; this implementation needs CUDA tensors");
  const at::Device device = key_cache.device();
  check_same_device(key, device, op, "key", "key_cache");
  check_same_device(value, device, op, "value", "key_cache");
  check_same_device(value_cache, device, op, "value_cache", "key_cache");
  check_same_device(slot_mapping, device, op, "slot_mapping", "key_cache");
  checks::check_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping);
  const KVQuant quant = checks::check_cache_scales(key, key_cache, value_cache, k_scales, v_scales);

  const int64_t num_tokens = key.size(0);
  const int64_t heads = key.size(1), head_size = key.size(2);
  const int64_t num_slots = key_cache.size(0) * key_cache.size(1);
  const c10::cuda::CUDAGuard guard(device);
  if (num_tokens > 0 && check_index_values_now()) {
    const at::Tensor host = slot_mapping.to(at::kCPU);
    checks::check_slot_values(host.data_ptr<int64_t>(), num_tokens, num_slots);
  }
  if (num_tokens == 0 || heads * head_size == 0) return;
  if (quant != KVQuant::kNone) {
    return reshape_and_cache_quant(key, value, key_cache, value_cache, slot_mapping, *k_scales,
                                   *v_scales, quant);
  }

  const int64_t esize = key.element_size();
  cache_cuda::CacheWriteArgs a{};
  a.key = static_cast<const char*>(key.data_ptr());
  a.value = static_cast<const char*>(value.data_ptr());
  a.key_cache = static_cast<char*>(key_cache.data_ptr());
  a.value_cache = static_cast<char*>(value_cache.data_ptr());
  a.slots = slot_mapping.data_ptr<int64_t>();
  a.num_tokens = num_tokens;
  a.num_slots = num_slots;
  a.key_token_stride = key.stride(0) * esize;
  a.key_head_stride = key.stride(1) * esize;
  a.value_token_stride = value.stride(0) * esize;
  a.value_head_stride = value.stride(1) * esize;
  a.row_bytes = heads * head_size * esize;
  const int64_t head_bytes = head_size * esize;
  const int unit = widest_unit(
      {static_cast<uint64_t>(head_bytes), reinterpret_cast<uint64_t>(a.key),
       reinterpret_cast<uint64_t>(a.value), reinterpret_cast<uint64_t>(a.key_cache),
       reinterpret_cast<uint64_t>(a.value_cache), static_cast<uint64_t>(a.key_token_stride),
       static_cast<uint64_t>(a.key_head_stride), static_cast<uint64_t>(a.value_token_stride),
       static_cast<uint64_t>(a.value_head_stride)});
  TORCH_CHECK(a.row_bytes / unit <= INT_MAX, op, ": a token's row (", a.row_bytes,
              " bytes) is too large");
  a.units_per_head = static_cast<int>(head_bytes / unit);
  a.units_per_token = static_cast<int>(a.row_bytes / unit);
  const int threads = static_cast<int>(
      std::clamp<int64_t>(ceil_div(ceil_div(a.units_per_token, cache_cuda::kCacheUnroll), 32) * 32,
                          32, cache_cuda::kCacheMaxThreads));
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(num_tokens, INT_MAX));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  with_unit(unit, [&](auto u) {
    using U = typename decltype(u)::type;
    cache_cuda::reshape_and_cache_kernel<U><<<blocks, threads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void copy_blocks_cuda(const std::vector<at::Tensor>& key_caches,
                      const std::vector<at::Tensor>& value_caches,
                      const at::Tensor& block_mapping) {
  const char* op = "copy_blocks";
  // The device: the first cache's, or the mapping's when there are no caches.
  const at::Device device = key_caches.empty() ? block_mapping.device() : key_caches[0].device();
  TORCH_CHECK(device.is_cuda(), op, ": key_caches[0] is on ", device,
              "; this implementation needs CUDA tensors");
  const std::vector<at::Tensor> caches = checks::layer_caches(
      key_caches, value_caches, [&](const at::Tensor& t, const std::string& name) {
        check_same_device(t, device, op, name, "key_caches[0]");
      });
  TORCH_CHECK(block_mapping.device().is_cpu() || block_mapping.device() == device, op,
              ": block_mapping is on ", block_mapping.device(), "; expected the CPU or ", device);
  checks::check_block_mapping_layout(block_mapping, op);
  const int64_t num_blocks = caches.empty() ? 0 : caches[0].size(0);
  const int64_t n = block_mapping.size(0);
  const c10::cuda::CUDAGuard guard(device);

  at::Tensor mapping = block_mapping;
  if (block_mapping.device().is_cpu()) {
    checks::check_block_mapping_values(block_mapping.data_ptr<int64_t>(), n, op, num_blocks,
                                       num_blocks);
  } else if (n > 0 && check_index_values_now()) {
    const at::Tensor host = block_mapping.to(at::kCPU);
    checks::check_block_mapping_values(host.data_ptr<int64_t>(), n, op, num_blocks, num_blocks);
  }
  const int64_t bytes = caches.empty() ? 0 : checks::block_bytes(caches[0]);
  if (n == 0 || bytes == 0) return;
  if (block_mapping.device().is_cpu()) {
    // A host mapping reaches the GPU through a fresh pinned buffer (the caching host allocator
    // keeps it until the copy has run), so no host sync; a graph would replay a stale buffer.
    TORCH_CHECK(!capturing(), op,
                ": block_mapping is on the CPU, which cannot be captured in a CUDA graph; pass "
                "it on ", device);
    at::Tensor pinned = at::empty({n, 2}, block_mapping.options().pinned_memory(true));
    pinned.copy_(block_mapping);
    mapping = pinned.to(device, at::kLong, /*non_blocking=*/true);
  }

  std::vector<uint64_t> sizes_and_addrs{static_cast<uint64_t>(bytes)};
  for (const at::Tensor& c : caches) {
    sizes_and_addrs.push_back(reinterpret_cast<uint64_t>(c.data_ptr()));
  }
  const int unit = widest_unit(sizes_and_addrs);
  const int64_t units = bytes / unit;
  const int threads =
      static_cast<int>(std::min<int64_t>(cache_cuda::kCopyThreads, ceil_div(units, 32) * 32));
  const int64_t columns = ceil_div(units, threads);
  TORCH_CHECK(columns <= INT_MAX, op, ": a block of ", bytes, " bytes is too large");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t* m = mapping.data_ptr<int64_t>();
  with_unit(unit, [&](auto u) {
    using U = typename decltype(u)::type;
    for (size_t first = 0; first < caches.size(); first += cache_cuda::kMaxCaches) {
      const size_t count = std::min<size_t>(cache_cuda::kMaxCaches, caches.size() - first);
      cache_cuda::CacheList list{};
      for (size_t i = 0; i < count; ++i) {
        list.ptr[i] = static_cast<char*>(caches[first + i].data_ptr());
      }
      const dim3 grid(static_cast<unsigned>(columns), static_cast<unsigned>(count));
      cache_cuda::copy_blocks_kernel<U>
          <<<grid, threads, 0, stream>>>(list, m, n, num_blocks, units);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

// src and dst on the CPU and one GPU (either way round), or both on the same GPU; the mapping
// on the CPU, since each pair becomes a copy issued from the host.
void swap_blocks_cuda(const at::Tensor& src, at::Tensor& dst, const at::Tensor& block_mapping) {
  const char* op = "swap_blocks";
  TORCH_CHECK(block_mapping.device().is_cpu(), op, ": block_mapping is on ",
              block_mapping.device(), "; it must be on the CPU (the copies are issued from the "
              "host)");
  TORCH_CHECK(src.device().is_cuda() || src.device().is_cpu(), op, ": src is on ", src.device(),
              "; expected a CUDA device or the CPU");
  TORCH_CHECK(dst.device().is_cuda() || dst.device().is_cpu(), op, ": dst is on ", dst.device(),
              "; expected a CUDA device or the CPU");
  TORCH_CHECK(src.is_cuda() || dst.is_cuda(), op,
              ": src and dst are both on the CPU; this implementation needs a CUDA tensor");
  TORCH_CHECK(!(src.is_cuda() && dst.is_cuda()) || src.device() == dst.device(), op,
              ": src is on ", src.device(), " and dst on ", dst.device(),
              "; copies between two GPUs are not supported");
  checks::check_swap_caches(src, dst);
  checks::check_block_mapping_layout(block_mapping, op);
  const int64_t n = block_mapping.size(0);
  const int64_t* m = block_mapping.data_ptr<int64_t>();
  checks::check_block_mapping_values(m, n, op, src.size(0), dst.size(0));
  const int64_t bytes = checks::block_bytes(src);
  if (n == 0 || bytes == 0) return;

  const c10::cuda::CUDAGuard guard(src.is_cuda() ? src.device() : dst.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cudaMemcpyKind kind = src.is_cuda() && dst.is_cuda() ? cudaMemcpyDeviceToDevice
                              : src.is_cuda()                ? cudaMemcpyDeviceToHost
                                                             : cudaMemcpyHostToDevice;
  const auto* s = static_cast<const char*>(src.data_ptr());
  auto* d = static_cast<char*>(dst.data_ptr());
  if (src.is_alias_of(dst)) {
    // Same storage: pair by pair on one stream, so chained pairs see the earlier copies, as on
    // the CPU. Blocks of two views with different offsets must not partly overlap.
    for (int64_t i = 0; i < n; ++i) {
      const char* from = s + m[2 * i] * bytes;
      char* to = d + m[2 * i + 1] * bytes;
      if (from == to) continue;
      TORCH_CHECK(from + bytes <= to || to + bytes <= from, op, ": block_mapping[", i,
                  "] copies between partly overlapping blocks of src and dst");
      C10_CUDA_CHECK(cudaMemcpyAsync(to, from, bytes, kind, stream));
    }
    return;
  }
  // Distinct tensors: a run of pairs (s, d), (s + 1, d + 1), ... is one copy.
  for (int64_t i = 0; i < n;) {
    int64_t run = 1;
    while (i + run < n && m[2 * (i + run)] == m[2 * i] + run &&
           m[2 * (i + run) + 1] == m[2 * i + 1] + run) {
      ++run;
    }
    C10_CUDA_CHECK(cudaMemcpyAsync(d + m[2 * i + 1] * bytes, s + m[2 * i] * bytes, run * bytes,
                                   kind, stream));
    i += run;
  }
}

}  // namespace sagellm

TORCH_LIBRARY_IMPL(sagellm, CUDA, m) {
  m.impl("reshape_and_cache", &sagellm::reshape_and_cache_cuda);
  m.impl("copy_blocks", &sagellm::copy_blocks_cuda);
  m.impl("swap_blocks", &sagellm::swap_blocks_cuda);
}
