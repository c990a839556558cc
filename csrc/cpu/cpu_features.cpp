#include "cpu/isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace sagellm::cpu {
namespace {

bool cpu_has(Isa isa) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::kScalar:
      return true;
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }
  return false;
#else
  return isa == Isa::kScalar;
#endif
}

bool compiled(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return true;
#if defined(SAGELLM_HAVE_ISA_AVX2)
    case Isa::kAvx2:
      return true;
#endif
#if defined(SAGELLM_HAVE_ISA_AVX512)
    case Isa::kAvx512:
      return true;
#endif
    default:
      return false;
  }
}

Isa parse(const std::string& name) {
  if (name == "scalar") return Isa::kScalar;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "avx512") return Isa::kAvx512;
  throw std::invalid_argument("unknown CPU ISA '" + name + "'; expected scalar, avx2 or avx512");
}

Isa initial_isa() {
  const char* env = std::getenv("SAGELLM_CPU_ISA");
  if (env != nullptr && *env != '\0') {
    Isa wanted = parse(env);
    if (compiled(wanted) && cpu_has(wanted)) return wanted;
    // An override the machine cannot run must not crash the process with SIGILL later.
    throw std::invalid_argument(std::string("SAGELLM_CPU_ISA=") + env +
                                " is not supported by this CPU or build");
  }
  return best_isa();
}

std::atomic<int>& active() {
  static std::atomic<int> isa{static_cast<int>(initial_isa())};
  return isa;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

std::vector<Isa> supported_isas() {
  std::vector<Isa> out;
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (compiled(isa) && cpu_has(isa)) out.push_back(isa);
  }
  return out;
}

Isa best_isa() { return supported_isas().back(); }

Isa active_isa() { return static_cast<Isa>(active().load(std::memory_order_relaxed)); }

void set_active_isa(const std::string& name) {
  Isa wanted = parse(name);
  if (!compiled(wanted) || !cpu_has(wanted)) {
    throw std::invalid_argument("CPU ISA '" + name + "' is not supported by this CPU or build");
  }
  active().store(static_cast<int>(wanted), std::memory_order_relaxed);
}

}  // namespace sagellm::cpu
