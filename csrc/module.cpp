// The Python module sagellm._C. Importing it runs the static TORCH_LIBRARY registrations
// (torch.ops.sagellm.*); the pybind11 part exposes what the build contains, the CPU ISA switch,
// and the stateful native classes.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "common/index_checks.h"
#include "cpu/isa.h"
#include "kv_cache/block_allocator.h"

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
  std::vector<std::string> isas;
#if defined(SAGELLM_HAVE_ISA_SCALAR)
  isas.push_back("scalar");
#endif
#if defined(SAGELLM_HAVE_ISA_AVX2)
  isas.push_back("avx2");
#endif
#if defined(SAGELLM_HAVE_ISA_AVX512)
  isas.push_back("avx512");
#endif
  info["cpu_isas_compiled"] = isas;
  std::vector<std::string> supported;
  for (auto isa : sagellm::cpu::supported_isas()) supported.push_back(sagellm::cpu::isa_name(isa));
  info["cpu_isas_supported"] = supported;
#if defined(SAGELLM_WITH_CUDA)
  info["cuda"] = true;
  std::string arches = SAGELLM_CUDA_ARCHES;
  info["cuda_arches"] = arches;
#else
  info["cuda"] = false;
  info["cuda_arches"] = std::string();
#endif
  info["ascend"] = false;
  info["torch_version"] = std::string(SAGELLM_TORCH_VERSION);
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sageLLM native kernels (torch.ops.sagellm) and native classes";
  m.def("build_info", &build_info, "What this build of sagellm._C contains.");
  m.def(
      "cpu_isa", [] { return std::string(sagellm::cpu::isa_name(sagellm::cpu::active_isa())); },
      "The CPU instruction set the kernels use now: scalar, avx2 or avx512.");
  m.def("set_cpu_isa", &sagellm::cpu::set_active_isa, py::arg("name"),
        "Force the CPU kernels onto one ISA (for tests and comparisons); raises ValueError if "
        "the CPU or this build lacks it.");
  m.def("cuda_index_checks", &sagellm::cuda_index_checks_enabled,
        "Whether CUDA ops check index values (block ids, slots, positions) on the host.");
  m.def("set_cuda_index_checks", &sagellm::set_cuda_index_checks, py::arg("on"),
        "Turn the host-side index-value checks of CUDA ops on or off (costs a sync per call).");
  sagellm::bind_block_allocator(m);
}
