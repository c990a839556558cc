// torch.classes.sagellm.CustomAllReduce (comm/cuda/custom_all_reduce.h): the custom CUDA
// all-reduce's per-rank state, registered only in builds with CUDA kernels. A torch custom class
// rather than a pybind11 one: it needs no hook in module.cpp, and its methods take tensors.
#if defined(SAGELLM_WITH_CUDA)
#include <torch/custom_class.h>
#include <torch/library.h>

#include "comm/cuda/custom_all_reduce.h"

TORCH_LIBRARY_FRAGMENT(sagellm, m) {
  m.class_<sagellm::CustomAllReduce>("CustomAllReduce")
      .def(torch::init<int64_t, int64_t, int64_t>())
      .def("ipc_handle", &sagellm::CustomAllReduce::ipc_handle)
      .def("open", &sagellm::CustomAllReduce::open)
      .def("all_reduce", &sagellm::CustomAllReduce::all_reduce)
      .def("max_bytes", &sagellm::CustomAllReduce::max_bytes)
      .def("world", &sagellm::CustomAllReduce::world);
}
#endif
