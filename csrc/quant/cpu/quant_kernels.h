// gguf_linear on the CPU: out = input @ dequant(weight)^T (+ bias) with the weight kept in its
// GGUF block format. Declared once per ISA (cpu/isa.h); the entry file (quant_entry.cpp)
// validates the tensors, allocates the activation scratch, and splits the work over torch's
// thread pool.
//
// Two passes, both per ISA:
//  1. gguf_quantize_activations: each input row -> blocks of 32 int8 values with an fp32 scale
//     (d = max|x| / 127, q = round-to-nearest-even(x * 127 / max|x|)), plus per-block sums the
//     weight format's offset or min term needs. Both passes must run on the same ISA (the
//     layout of the scratch is the ISA's) with the same qtype and m.
//  2. gguf_linear_kernel: integer dot products of the weight's (sub-)blocks with those blocks,
//     scaled by the product of the two fp32 scales, accumulated in fp32.
#pragma once

#include <cstdint>

#include "cpu/isa.h"
#include "cpu/types.h"

namespace sagellm::cpu {

// Activation scratch of one call, for rows [0, m) and blocks [0, k / 32). q, d and corr hold
// each row's blocks in an order private to the ISA's kernels (row panels interleaved block by
// block, see quant_kernels.cpp); only their sizes are fixed here.
struct GgufActivations {
  int8_t* q;      // m * k quantized values
  float* d;       // m * k / 32 block scales; NaN where the block held a NaN or an infinity
  float* dsum;    // [m, k / 32] row-major: d * (sum of the block's q), for min-term formats
  int32_t* corr;  // m * k / 32 * 8: -offset * (sums of q over each 4 consecutive elements),
                  // the start value of the dot products of offset formats (gguf_act_layout.h)
};

// Bytes of activation scratch for m rows of k elements: room for every ISA's layout (the
// AVX-512 one rounds k up to 64 and keeps 16 scales and 16 corr lanes per 64 elements).
inline int64_t gguf_scratch_bytes(int64_t m, int64_t k) {
  const int64_t k64 = (k + 63) / 64 * 64;
  const int64_t dsum = (m * (k / 32) * 4 + 63) / 64 * 64;
  return 3 * m * k64 + dsum;
}

// The scratch at `base` (64-byte aligned, gguf_scratch_bytes(m, k) bytes) carved into arrays.
inline GgufActivations gguf_scratch_layout(void* base, int64_t m, int64_t k) {
  const int64_t k64 = (k + 63) / 64 * 64;
  auto* p = static_cast<uint8_t*>(base);
  GgufActivations a;
  a.q = reinterpret_cast<int8_t*>(p);
  a.d = reinterpret_cast<float*>(p + m * k64);
  a.corr = reinterpret_cast<int32_t*>(p + 2 * m * k64);
  a.dsum = reinterpret_cast<float*>(p + 3 * m * k64);
  return a;
}

struct GgufLinearParams {
  int qtype;           // gguf::Type
  DType dtype;         // of input, bias and out: kF32 or kBF16
  const void* input;   // [m, k]: rows input_row_stride elements apart, k contiguous
  int64_t input_row_stride;
  const uint8_t* weight;  // [n, row_bytes]: row i = the k / block_elems blocks of output i
  int64_t row_bytes;
  const void* bias;    // [n] or nullptr
  void* out;           // [m, n]: rows out_row_stride elements apart, n contiguous
  int64_t out_row_stride;
  int64_t m;
  int64_t n;
  int64_t k;
  GgufActivations act;
};

// Rows [row_begin, row_end) of the input -> p.act.
SAGELLM_DECLARE_PER_ISA(void gguf_quantize_activations(const GgufLinearParams& p,
                                                       int64_t row_begin, int64_t row_end))
// Output columns [n_begin, n_end) for all m rows; p.act must hold all m rows.
SAGELLM_DECLARE_PER_ISA(void gguf_linear_kernel(const GgufLinearParams& p, int64_t n_begin,
                                                int64_t n_end))

}  // namespace sagellm::cpu
