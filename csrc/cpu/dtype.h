// The torch dtype -> kernel dtype mapping shared by the CPU entry files (module side only: it
// includes ATen, so ISA kernel files must not include it).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "cpu/types.h"

namespace sagellm::cpu {

// The kernel dtype of `t`; a RuntimeError naming `op` and the argument for any other dtype.
inline DType kernel_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kF32;
    case at::kHalf:
      return DType::kF16;
    case at::kBFloat16:
      return DType::kBF16;
    default:
      TORCH_CHECK(false, op, ": ", name, " has dtype ", t.scalar_type(),
                  "; expected float32, float16 or bfloat16");
  }
}

}  // namespace sagellm::cpu
