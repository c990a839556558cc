// Storage types shared by every ISA variant of the CPU kernels. Plain structs, no code: the
// conversions live in vec.h inside each ISA's namespace, so no inline function compiled with
// AVX-512 flags can be picked by the linker for the scalar path.
#pragma once

#include <cstdint>

namespace sagellm::cpu {

// Layout-compatible with c10::BFloat16 and c10::Half (one uint16_t of bits).
struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

}  // namespace sagellm::cpu
