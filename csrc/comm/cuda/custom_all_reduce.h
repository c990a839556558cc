// CustomAllReduce: one rank's state for the custom CUDA all-reduce (custom_all_reduce.cuh),
// exposed to Python as torch.classes.sagellm.CustomAllReduce (comm/custom_all_reduce_bindings.cpp).
//
// Set-up, driven by sagellm/distributed/custom_ar.py:
//   ar = CustomAllReduce(rank, world, max_bytes)   # cudaMalloc of [Signal | data | tmp] on the
//                                                  # current device, Signal zeroed
//   handles = all_gather_object(ar.ipc_handle())   # uint8 [64] each (cudaIpcMemHandle_t)
//   ar.open(torch.stack(handles))                  # peers' buffers mapped here
//   ar.all_reduce(out, inp, one_shot)              # any number of times, graph-capturable
// Plain C++ (no CUDA headers), so the bindings compile as an ordinary module file.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/custom_class.h>

#include <cstdint>
#include <vector>

namespace sagellm {

class CustomAllReduce : public torch::CustomClassHolder {
 public:
  CustomAllReduce(int64_t rank, int64_t world, int64_t max_bytes);
  ~CustomAllReduce() override;
  CustomAllReduce(const CustomAllReduce&) = delete;
  CustomAllReduce& operator=(const CustomAllReduce&) = delete;

  // uint8 CPU [64]: the IPC handle of this rank's buffer.
  at::Tensor ipc_handle() const;
  // handles: uint8 CPU [world, 64], row r from rank r (this rank's own row is not opened).
  void open(const at::Tensor& handles);
  // out = sum over ranks of inp; inp, out: contiguous CUDA tensors on this rank's device, same
  // dtype (fp32 / fp16 / bf16) and size, bytes a multiple of 16 and at most max_bytes (every rank
  // calls it with the same size and one_shot). out may be inp.
  void all_reduce(at::Tensor out, const at::Tensor& inp, bool one_shot);
  int64_t max_bytes() const { return max_bytes_; }
  int64_t world() const { return world_; }

 private:
  int64_t rank_, world_, max_bytes_;
  int device_;
  char* buffer_ = nullptr;        // this rank's [Signal | data | tmp]
  std::vector<char*> mapped_;     // peers' buffers as mapped here (nullptr for this rank)
  std::vector<char*> bases_;      // every rank's buffer base as seen here
  bool opened_ = false;
};

}  // namespace sagellm
