// KV-cache writes and block copies on the CPU. Pure data movement, so plain memcpy: one run of
// num_kv_heads * head_size elements per token for reshape_and_cache (one per head when the
// source rows are strided), one block per (cache, pair) for copy_blocks and swap_blocks. Bound by
// memory bandwidth: bytes moved = 2 x bytes copied. Block copies move bytes, so they serve every
// cache dtype alike: int8 / float8_e4m3fn caches and their fp32 scale tensors too.
//
// A quantized cache (int8 / float8_e4m3fn) is written row by row with the rule of
// common/kv_quant.h and torch_bindings.cpp, which the CUDA op follows bit for bit: per (token,
// head) row x in fp32, s = max|x| / QMAX and q = x / s by IEEE division, rounded half to even
// (int8, clamped to +-127) or converted by c10's round-to-nearest-even e4m3 conversion; a row
// whose max|x| is below FLT_MIN (zero or subnormal) stores s = 0 and q = 0.
//
// Index tensors (slot_mapping, block_mapping) are range-checked serially before any copy, so a
// bad index raises with its position and value and leaves the caches untouched. The checks are
// shared with the CUDA entry (kv_cache/cache_checks.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "kv_cache/cache_checks.h"
#include "ops.h"

namespace sagellm {
namespace {

// Below ~256 KiB of copying per task a thread wake-up costs more than it saves.
constexpr int64_t kMinBytesPerTask = 1 << 18;

int64_t grain_for(int64_t bytes_per_item) {
  return std::max<int64_t>(1, kMinBytesPerTask / std::max<int64_t>(1, bytes_per_item));
}

void check_cpu(const at::Tensor& t, const char* op, const std::string& name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(),
              "; this implementation needs CPU tensors");
}

// block_mapping int64 [n, 2] of (src, dst) block ids, on the CPU.
void check_block_mapping(const at::Tensor& block_mapping, const char* op, int64_t src_blocks,
                         int64_t dst_blocks) {
  check_cpu(block_mapping, op, "block_mapping");
  checks::check_block_mapping_layout(block_mapping, op);
  checks::check_block_mapping_values(block_mapping.data_ptr<int64_t>(), block_mapping.size(0),
                                     op, src_blocks, dst_blocks);
}

// Quantizes one row of n elements: dst[i] = x[i] / s, returns s. A row with max|x| below
// FLT_MIN (all zero or subnormal) stores s = 0, q = 0: its subnormal s and quotients would
// otherwise depend on the device's denormal mode (the CUDA build flushes them to zero).
template <typename T, typename Q>
float quantize_row(const T* x, Q* dst, int64_t n, float qmax) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::abs(static_cast<float>(x[i])));
  if (amax < std::numeric_limits<float>::min()) {
    std::memset(static_cast<void*>(dst), 0, n * sizeof(Q));
    return 0.0f;
  }
  const float s = amax / qmax;
  for (int64_t i = 0; i < n; ++i) {
    const float q = static_cast<float>(x[i]) / s;
    if constexpr (std::is_same_v<Q, int8_t>) {
      // |q| <= 127 up to one rounding of the division; the clamp absorbs that.
      // A NaN input stores 0, as __float2int_rn does on CUDA (casting NaN to int8 is undefined).
      const float r = std::nearbyint(q);
      dst[i] = static_cast<int8_t>(std::isnan(r) ? 0.0f : std::clamp(r, -127.0f, 127.0f));
    } else {
      dst[i] = Q(q);  // round to nearest even; a q just above 448 rounds (saturates) to 448
    }
  }
  return s;
}

// Every token's rows of key and value into the quantized caches and their scales.
template <typename T, typename Q>
void quantize_tokens(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                     at::Tensor& value_cache, at::Tensor& k_scales, at::Tensor& v_scales,
                     const int64_t* slots, float qmax) {
  const int64_t num_tokens = key.size(0);
  const int64_t heads = key.size(1), head_size = key.size(2);
  auto* kc = static_cast<Q*>(key_cache.data_ptr());
  auto* vc = static_cast<Q*>(value_cache.data_ptr());
  float* ks = k_scales.data_ptr<float>();
  float* vs = v_scales.data_ptr<float>();
  const T* k = static_cast<const T*>(key.data_ptr());
  const T* v = static_cast<const T*>(value.data_ptr());
  at::parallel_for(0, num_tokens, grain_for(4 * heads * head_size), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      if (slots[t] < 0) continue;
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t row = slots[t] * heads + h;  // index into [num_slots, heads]
        ks[row] = quantize_row(k + t * key.stride(0) + h * key.stride(1), kc + row * head_size,
                               head_size, qmax);
        vs[row] = quantize_row(v + t * value.stride(0) + h * value.stride(1),
                               vc + row * head_size, head_size, qmax);
      }
    }
  });
}

template <typename Q>
void quantize_dispatch(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                       at::Tensor& value_cache, at::Tensor& k_scales, at::Tensor& v_scales,
                       const int64_t* slots, float qmax) {
  switch (key.scalar_type()) {
    case at::kFloat:
      return quantize_tokens<float, Q>(key, value, key_cache, value_cache, k_scales, v_scales,
                                       slots, qmax);
    case at::kHalf:
      return quantize_tokens<c10::Half, Q>(key, value, key_cache, value_cache, k_scales,
                                           v_scales, slots, qmax);
    case at::kBFloat16:
      return quantize_tokens<c10::BFloat16, Q>(key, value, key_cache, value_cache, k_scales,
                                               v_scales, slots, qmax);
    default:
      TORCH_CHECK(false, "reshape_and_cache: key has dtype ", key.scalar_type(),
                  "; a quantized cache takes float32, float16 or bfloat16");
  }
}

}  // namespace

void reshape_and_cache_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                           at::Tensor& value_cache, const at::Tensor& slot_mapping,
                           const std::optional<at::Tensor>& k_scales,
                           const std::optional<at::Tensor>& v_scales) {
  const char* op = "reshape_and_cache";
  check_cpu(key, op, "key");
  check_cpu(value, op, "value");
  check_cpu(key_cache, op, "key_cache");
  check_cpu(value_cache, op, "value_cache");
  check_cpu(slot_mapping, op, "slot_mapping");
  checks::check_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping);
  const KVQuant quant = checks::check_cache_scales(key, key_cache, value_cache, k_scales, v_scales);

  const int64_t num_tokens = key.size(0);
  const int64_t heads = key.size(1), head_size = key.size(2);
  const int64_t num_slots = key_cache.size(0) * key_cache.size(1);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  checks::check_slot_values(slots, num_tokens, num_slots);
  if (num_tokens == 0 || heads * head_size == 0) return;
  if (quant != KVQuant::kNone) {
    // The scales are written (schema c!, d!); a handle copy shares their storage.
    at::Tensor ks = *k_scales, vs = *v_scales;
    const float qmax = kv_quant_max(quant);
    if (quant == KVQuant::kInt8) {
      quantize_dispatch<int8_t>(key, value, key_cache, value_cache, ks, vs, slots, qmax);
    } else {
      quantize_dispatch<c10::Float8_e4m3fn>(key, value, key_cache, value_cache, ks, vs, slots,
                                            qmax);
    }
    return;
  }

  const int64_t esize = key.element_size();
  const int64_t row_bytes = heads * head_size * esize;
  auto* kc = static_cast<char*>(key_cache.data_ptr());
  auto* vc = static_cast<char*>(value_cache.data_ptr());
  const auto* k = static_cast<const char*>(key.data_ptr());
  const auto* v = static_cast<const char*>(value.data_ptr());
  // Source rows of a token: one run when its heads are back to back, else one per head.
  auto copy_token = [&](char* dst, const char* src, int64_t head_stride) {
    if (heads == 1 || head_stride == head_size) {
      std::memcpy(dst, src, row_bytes);
    } else {
      for (int64_t h = 0; h < heads; ++h) {
        std::memcpy(dst + h * head_size * esize, src + h * head_stride * esize, head_size * esize);
      }
    }
  };
  at::parallel_for(0, num_tokens, grain_for(2 * row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (slots[t] < 0) continue;
      copy_token(kc + slots[t] * row_bytes, k + t * key.stride(0) * esize, key.stride(1));
      copy_token(vc + slots[t] * row_bytes, v + t * value.stride(0) * esize, value.stride(1));
    }
  });
}

void copy_blocks_cpu(const std::vector<at::Tensor>& key_caches,
                     const std::vector<at::Tensor>& value_caches,
                     const at::Tensor& block_mapping) {
  const char* op = "copy_blocks";
  const std::vector<at::Tensor> caches = checks::layer_caches(
      key_caches, value_caches,
      [&](const at::Tensor& t, const std::string& name) { check_cpu(t, op, name); });
  if (caches.empty()) {
    check_block_mapping(block_mapping, op, 0, 0);
    return;
  }
  const at::Tensor& ref = caches[0];
  const int64_t num_blocks = ref.size(0);
  check_block_mapping(block_mapping, op, num_blocks, num_blocks);
  const int64_t n = block_mapping.size(0);
  const int64_t bytes = checks::block_bytes(ref);
  if (n == 0 || bytes == 0) return;
  const int64_t* m = block_mapping.data_ptr<int64_t>();
  // Within one cache the pairs run in order, so a mapping whose dst is a later pair's src has
  // one defined result; the caches themselves are independent and run in parallel.
  at::parallel_for(0, static_cast<int64_t>(caches.size()), grain_for(2 * n * bytes),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t c = begin; c < end; ++c) {
                       auto* base = static_cast<char*>(caches[c].data_ptr());
                       for (int64_t i = 0; i < n; ++i) {
                         if (m[2 * i] == m[2 * i + 1]) continue;
                         std::memcpy(base + m[2 * i + 1] * bytes, base + m[2 * i] * bytes, bytes);
                       }
                     }
                   });
}

// Host<->host here; a CUDA implementation registered for the CUDA key takes the mixed-device
// cases (the dispatcher picks it when either cache is on the GPU) with cudaMemcpyAsync per block
// and the same checks.
void swap_blocks_cpu(const at::Tensor& src, at::Tensor& dst, const at::Tensor& block_mapping) {
  const char* op = "swap_blocks";
  check_cpu(src, op, "src");
  check_cpu(dst, op, "dst");
  checks::check_swap_caches(src, dst);
  check_block_mapping(block_mapping, op, src.size(0), dst.size(0));
  const int64_t n = block_mapping.size(0);
  const int64_t bytes = checks::block_bytes(src);
  if (n == 0 || bytes == 0) return;
  const int64_t* m = block_mapping.data_ptr<int64_t>();
  const auto* s = static_cast<const char*>(src.data_ptr());
  auto* d = static_cast<char*>(dst.data_ptr());
  if (src.is_alias_of(dst)) {
    // Same storage: in order, so chained pairs have one defined result.
    for (int64_t i = 0; i < n; ++i) {
      if (s + m[2 * i] * bytes != d + m[2 * i + 1] * bytes) {
        std::memmove(d + m[2 * i + 1] * bytes, s + m[2 * i] * bytes, bytes);
      }
    }
    return;
  }
  at::parallel_for(0, n, grain_for(2 * bytes), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::memcpy(d + m[2 * i + 1] * bytes, s + m[2 * i] * bytes, bytes);
    }
  });
}

}  // namespace sagellm

TORCH_LIBRARY_IMPL(sagellm, CPU, m) {
  m.impl("reshape_and_cache", &sagellm::reshape_and_cache_cpu);
  m.impl("copy_blocks", &sagellm::copy_blocks_cpu);
  m.impl("swap_blocks", &sagellm::swap_blocks_cpu);
}
