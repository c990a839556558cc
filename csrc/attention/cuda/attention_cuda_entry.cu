// CUDA entry points of paged_attention_decode / paged_attention_prefill: the checks shared with
// the CPU entry (attention/attention_checks.h, same messages), the split-KV workspace of decode,
// and the launch on the current stream. Kernels: paged_decode.cu, paged_prefill.cu for caches in
// the query's dtype; paged_quant.cu (decode) and paged_quant_prefill.cu for int8 /
// float8_e4m3fn caches with their per-(token, head) scales.
//
// Nothing here reads device memory unless index checks are on (common/index_checks.h) and the
// stream is not being captured, so both ops can be recorded into CUDA graphs; the workspace
// comes from the caching allocator, which graph capture supports.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "attention/attention_checks.h"
#include "attention/cuda/attention_cuda.cuh"
#include "attention/cuda/paged_quant.cuh"
#include "common/index_checks.h"
#include "common/kv_quant.h"

namespace sagellm {
namespace {

// Every tensor of a call lives on the CUDA device of query.
struct OnDeviceOf {
  c10::Device device;
  void operator()(const at::Tensor& t, const char* name) const {
    TORCH_CHECK(t.device() == device, name, " must be on ", device, " (the device of query), got ",
                t.device());
  }
};

OnDeviceOf check_query_device(const at::Tensor& query) {
  TORCH_CHECK(query.is_cuda(), "query must be on a CUDA device, got ", query.device());
  return OnDeviceOf{query.device()};
}

// Index values are checked on the host only on request, and never inside graph capture (the
// copy to the host would synchronise the stream).
bool check_index_values() {
  return cuda_index_checks_enabled() && c10::cuda::currentStreamCaptureStatusMayInitCtx() ==
                                            c10::cuda::CaptureStatus::None;
}

at::Tensor host_copy(const at::Tensor& t) { return t.to(at::kCPU).contiguous(); }

// The decode kernels (and the quantized prefill) stream the caches with 16-byte copies.
void check_cache_alignment(const at::Tensor& key_cache, const at::Tensor& value_cache) {
  for (const at::Tensor* t : {&key_cache, &value_cache})
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0,
                t == &key_cache ? "key_cache" : "value_cache",
                " must start at a 16-byte aligned address on CUDA, got ", t->data_ptr());
}

// The scales of a quantized cache, validated by attention::check_kv_scales.
cuda::QuantKVParams quant_params(KVQuant quant, const std::optional<at::Tensor>& k_scales,
                                 const std::optional<at::Tensor>& v_scales) {
  cuda::QuantKVParams q{};
  q.kind = quant == KVQuant::kInt8 ? cuda::KVCacheQuant::kInt8 : cuda::KVCacheQuant::kFp8E4M3;
  q.k_scales = k_scales->data_ptr<float>();
  q.v_scales = v_scales->data_ptr<float>();
  return q;
}

cuda::AttnDType kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cuda::AttnDType::kF32;
    case at::kHalf:
      return cuda::AttnDType::kF16;
    default:
      return cuda::AttnDType::kBF16;  // the shared checks admit nothing else
  }
}

int32_t to_int32(int64_t v, const char* what) {
  TORCH_CHECK(v <= std::numeric_limits<int32_t>::max(), what, " is too large for the CUDA ",
              "kernels: ", v);
  return static_cast<int32_t>(v);
}

// The kernel params of a validated call; `table`, `lens` are the contiguous index tensors.
cuda::PagedAttentionCudaParams describe(const attention::AttentionDims& d, at::Tensor& out,
                                        const at::Tensor& query, const at::Tensor& key_cache,
                                        const at::Tensor& value_cache, const at::Tensor& table,
                                        const at::Tensor& lens, double scale, double soft_cap) {
  cuda::PagedAttentionCudaParams p{};
  p.dtype = kernel_dtype(query);
  p.head_size = d.head_size;
  p.num_heads = d.num_heads;
  p.num_kv_heads = d.num_kv_heads;
  p.block_size = d.block_size;
  p.num_seqs = to_int32(d.num_seqs, "the number of sequences");
  p.num_tokens = to_int32(query.size(0), "the number of query tokens");
  p.max_blocks_per_seq = to_int32(table.size(1), "block_tables.size(1)");
  p.query = query.data_ptr();
  p.q_stride_token = query.stride(0);
  p.q_stride_head = query.stride(1);
  p.out = out.data_ptr();
  p.out_stride_token = out.stride(0);
  p.out_stride_head = out.stride(1);
  p.key_cache = key_cache.data_ptr();
  p.value_cache = value_cache.data_ptr();
  p.num_blocks = d.num_blocks;
  p.block_tables = table.data_ptr<int32_t>();
  p.block_tables_stride = table.stride(0);
  p.seq_lens = lens.data_ptr<int32_t>();
  p.query_start_loc = nullptr;
  p.scale = static_cast<float>(scale);
  p.sliding_window = static_cast<int>(d.sliding_window);
  p.soft_cap = static_cast<float>(soft_cap);
  p.workspace = nullptr;
  p.workspace_floats = 0;
  return p;
}

}  // namespace

void paged_attention_decode_cuda(at::Tensor& out, const at::Tensor& query,
                                 const at::Tensor& key_cache, const at::Tensor& value_cache,
                                 const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                 double scale, int64_t sliding_window, double soft_cap,
                                 const std::optional<at::Tensor>& k_scales,
                                 const std::optional<at::Tensor>& v_scales) {
  const OnDeviceOf on_device = check_query_device(query);
  const c10::cuda::CUDAGuard guard(query.device());
  const attention::AttentionDims d =
      attention::check_attention_inputs(out, query, key_cache, value_cache, block_tables,
                                        seq_lens, scale, sliding_window, soft_cap, on_device);
  const KVQuant quant = attention::check_kv_scales("paged_attention_decode", query, key_cache,
                                                   value_cache, k_scales, v_scales);
  attention::check_decode_tokens(query, seq_lens);
  if (check_index_values()) {
    attention::check_seq_lens_and_blocks(host_copy(block_tables), host_copy(seq_lens),
                                         d.num_blocks, d.block_size, /*min_len=*/1);
  }
  if (d.num_seqs == 0) return;
  // Every decode sequence holds >= 1 token, so it needs >= 1 block (a shape, always checkable).
  TORCH_CHECK(block_tables.size(1) >= 1, "block_tables has no columns, but every decode ",
              "sequence needs at least one block");
  check_cache_alignment(key_cache, value_cache);

  const at::Tensor table = block_tables.contiguous();
  const at::Tensor lens = seq_lens.contiguous();
  cuda::PagedAttentionCudaParams p =
      describe(d, out, query, key_cache, value_cache, table, lens, scale, soft_cap);
  at::Tensor workspace;
  const int64_t floats = quant == KVQuant::kNone ? cuda::decode_workspace_floats(p)
                                                 : cuda::quant_decode_workspace_floats(p);
  if (floats > 0) {
    workspace = at::empty({floats}, query.options().dtype(at::kFloat));
    p.workspace = workspace.data_ptr<float>();
    p.workspace_floats = floats;
  }
  if (quant == KVQuant::kNone) {
    cuda::launch_paged_attention_decode(p, at::cuda::getCurrentCUDAStream());
  } else {
    cuda::launch_paged_attention_decode_quant(p, quant_params(quant, k_scales, v_scales),
                                              at::cuda::getCurrentCUDAStream());
  }
}

void paged_attention_prefill_cuda(at::Tensor& out, const at::Tensor& query,
                                  const at::Tensor& key_cache, const at::Tensor& value_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                  const at::Tensor& query_start_loc, double scale,
                                  int64_t sliding_window, double soft_cap,
                                  const std::optional<at::Tensor>& k_scales,
                                  const std::optional<at::Tensor>& v_scales) {
  const OnDeviceOf on_device = check_query_device(query);
  const c10::cuda::CUDAGuard guard(query.device());
  const attention::AttentionDims d =
      attention::check_attention_inputs(out, query, key_cache, value_cache, block_tables,
                                        seq_lens, scale, sliding_window, soft_cap, on_device);
  const KVQuant quant = attention::check_kv_scales("paged_attention_prefill", query, key_cache,
                                                   value_cache, k_scales, v_scales);
  attention::check_prefill_query_start_loc(query_start_loc, query, seq_lens, on_device);
  if (check_index_values()) {
    const at::Tensor lens = host_copy(seq_lens);
    attention::check_seq_lens_and_blocks(host_copy(block_tables), lens, d.num_blocks,
                                         d.block_size, /*min_len=*/0);
    attention::check_query_start_loc(host_copy(query_start_loc), lens, query.size(0));
  }
  if (d.num_seqs == 0 || query.size(0) == 0) return;

  const at::Tensor table = block_tables.contiguous();
  const at::Tensor lens = seq_lens.contiguous();
  const at::Tensor starts = query_start_loc.contiguous();
  cuda::PagedAttentionCudaParams p =
      describe(d, out, query, key_cache, value_cache, table, lens, scale, soft_cap);
  p.query_start_loc = starts.data_ptr<int32_t>();
  if (quant == KVQuant::kNone) {
    cuda::launch_paged_attention_prefill(p, at::cuda::getCurrentCUDAStream());
  } else {
    check_cache_alignment(key_cache, value_cache);
    cuda::launch_paged_attention_prefill_quant(p, quant_params(quant, k_scales, v_scales),
                                               at::cuda::getCurrentCUDAStream());
  }
}

}  // namespace sagellm

TORCH_LIBRARY_IMPL(sagellm, CUDA, m) {
  m.impl("paged_attention_decode", &sagellm::paged_attention_decode_cuda);
  m.impl("paged_attention_prefill", &sagellm::paged_attention_prefill_cuda);
}
