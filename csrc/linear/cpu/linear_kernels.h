// Dense linear layer for small batches (decode): out = input @ weight^T + bias, on raw pointers.
// Declared once per ISA (cpu/isa.h); the entry file (linear_entry.cpp) validates the tensors and
// splits the weight rows over torch's thread pool.
#pragma once

#include <cstdint>

#include "cpu/isa.h"
#include "cpu/types.h"

namespace sagellm::cpu {

// out[m, n] = sum_k input[m, k] * weight[n, k] (+ bias[n]), accumulated in fp32 and rounded once
// to dtype. Element strides, not bytes.
struct DenseLinearParams {
  DType dtype;            // of input, weight, bias and out (one dtype for all four)
  const void* input;      // [m, k]: rows input_row_stride apart, k contiguous
  int64_t input_row_stride;
  const void* weight;     // [n, k] contiguous (the nn.Linear layout)
  const void* bias;       // [n] contiguous, or nullptr
  void* out;              // [m, n]: rows out_row_stride apart, n contiguous
  int64_t out_row_stride;
  int64_t m;
  int64_t n;
  int64_t k;
};

// Weight rows are handed out in units of kDenseLinearRowsPerUnit so every task but the last
// starts on a full register tile; the kernel computes output columns
// [unit_begin * kDenseLinearRowsPerUnit, min(unit_end * kDenseLinearRowsPerUnit, n)).
constexpr int64_t kDenseLinearRowsPerUnit = 4;

SAGELLM_DECLARE_PER_ISA(void dense_linear_kernel(const DenseLinearParams& p, int64_t unit_begin,
                                                 int64_t unit_end))

}  // namespace sagellm::cpu
