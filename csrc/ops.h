// The C++ entry points behind the schemas in torch_bindings.cpp, one per op and device.
// Each validates its arguments with TORCH_CHECK (naming the argument and the value it got),
// then dispatches to a kernel. Shapes and layouts are documented with the schemas.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <vector>

namespace sagellm {

// ---- attention -------------------------------------------------------------------------------
void paged_attention_decode_cpu(at::Tensor& out, const at::Tensor& query,
                                const at::Tensor& key_cache, const at::Tensor& value_cache,
                                const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                double scale, int64_t sliding_window, double soft_cap,
                                const std::optional<at::Tensor>& k_scales,
                                const std::optional<at::Tensor>& v_scales);
void paged_attention_prefill_cpu(at::Tensor& out, const at::Tensor& query,
                                 const at::Tensor& key_cache, const at::Tensor& value_cache,
                                 const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                 const at::Tensor& query_start_loc, double scale,
                                 int64_t sliding_window, double soft_cap,
                                 const std::optional<at::Tensor>& k_scales,
                                 const std::optional<at::Tensor>& v_scales);

// ---- KV cache --------------------------------------------------------------------------------
void reshape_and_cache_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                           at::Tensor& value_cache, const at::Tensor& slot_mapping,
                           const std::optional<at::Tensor>& k_scales,
                           const std::optional<at::Tensor>& v_scales);
void copy_blocks_cpu(const std::vector<at::Tensor>& key_caches,
                     const std::vector<at::Tensor>& value_caches,
                     const at::Tensor& block_mapping);
void swap_blocks_cpu(const at::Tensor& src, at::Tensor& dst, const at::Tensor& block_mapping);

// ---- fused small ops -------------------------------------------------------------------------
void rms_norm_cpu(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                  double epsilon);
void fused_add_rms_norm_cpu(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight,
                            double epsilon);
void rotary_embedding_cpu(const at::Tensor& positions, at::Tensor& query,
                          std::optional<at::Tensor> key, int64_t head_size,
                          const at::Tensor& cos_sin_cache, bool is_neox);
void silu_and_mul_cpu(at::Tensor& out, const at::Tensor& input);
void gelu_and_mul_cpu(at::Tensor& out, const at::Tensor& input, c10::string_view approximate);

// ---- linear ----------------------------------------------------------------------------------
void dense_linear_cpu(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                      std::optional<at::Tensor> bias);

// ---- quant -----------------------------------------------------------------------------------
void gguf_linear_cpu(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                     int64_t qtype, std::optional<at::Tensor> bias);

}  // namespace sagellm
