// Collectives through torch.distributed process groups (see comm_ops.cpp). One entry per op
// serves CPU (gloo) and CUDA (NCCL) tensors; the schemas are documented where they are declared.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace sagellm {

void all_reduce(at::Tensor& tensor, const std::string& group_name);
void all_gather(at::Tensor& out, const at::Tensor& input, const std::string& group_name);
void broadcast(at::Tensor& tensor, int64_t src, const std::string& group_name);

}  // namespace sagellm
