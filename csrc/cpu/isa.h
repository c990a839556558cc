// Run-time choice of the CPU instruction set. Every file in SAGELLM_CPU_KERNEL_SOURCES is compiled
// once per ISA into namespace sagellm::cpu::<isa>; the entry files (compiled without ISA flags)
// validate the tensors, then call the variant picked here.
//
// The choice is made once from CPUID and can be overridden with SAGELLM_CPU_ISA=scalar|avx2|avx512
// or set_active_isa(), so the AVX2 and scalar paths are testable on an AVX-512 host.
#pragma once

#include <string>
#include <vector>

namespace sagellm::cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

const char* isa_name(Isa isa);
// ISAs compiled into this build that the running CPU supports, best last.
std::vector<Isa> supported_isas();
Isa best_isa();
Isa active_isa();
// Throws std::invalid_argument for an unknown name or an ISA the CPU or build lacks.
void set_active_isa(const std::string& name);

}  // namespace sagellm::cpu

// Declare `decl` once in each ISA namespace that this build compiles.
#if defined(SAGELLM_HAVE_ISA_AVX512)
#define SAGELLM_DECLARE_PER_ISA(decl) \
  namespace scalar {                  \
  decl;                               \
  }                                   \
  namespace avx2 {                    \
  decl;                               \
  }                                   \
  namespace avx512 {                  \
  decl;                               \
  }
#define SAGELLM_CPU_DISPATCH(fn, ...)                     \
  do {                                                    \
    switch (::sagellm::cpu::active_isa()) {               \
      case ::sagellm::cpu::Isa::kAvx512:                  \
        ::sagellm::cpu::avx512::fn(__VA_ARGS__);          \
        break;                                            \
      case ::sagellm::cpu::Isa::kAvx2:                    \
        ::sagellm::cpu::avx2::fn(__VA_ARGS__);            \
        break;                                            \
      default:                                            \
        ::sagellm::cpu::scalar::fn(__VA_ARGS__);          \
    }                                                     \
  } while (0)
#else
#define SAGELLM_DECLARE_PER_ISA(decl) \
  namespace scalar {                  \
  decl;                               \
  }
#define SAGELLM_CPU_DISPATCH(fn, ...) ::sagellm::cpu::scalar::fn(__VA_ARGS__)
#endif
