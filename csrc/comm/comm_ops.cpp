// Collectives through torch.distributed's process groups (c10d), callable as torch ops:
// all_reduce (sum), all_gather (concatenation along dim 0) and broadcast, in place / into
// caller-provided outputs like every other sagellm op.
//
// A group is named by the string Python's torch.distributed gives it (`group.group_name`); c10d
// keeps a registry of them, so C++ resolves the same object torch.distributed uses and the
// collective goes through its backend: gloo for CPU tensors, NCCL for CUDA ones. No timeout is
// set here: the options leave it unset, so the backend applies the group's own timeout (the one
// given to init_process_group / new_group) and a peer that died or hangs raises instead of
// blocking forever.
//
// The same entry serves CPU and CUDA tensors (the process group picks the backend by device);
// comm/cuda/custom_all_reduce.cu attaches it to the CUDA key with a device guard.
#include "comm/comm_ops.h"

#include <torch/version.h>

#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/library.h>

#include <string>
#include <vector>

namespace sagellm {
namespace {

c10::intrusive_ptr<c10d::ProcessGroup> group_for(const char* op, const std::string& group_name) {
  TORCH_CHECK(!group_name.empty(), op,
              ": group_name is empty; pass a torch.distributed group's group_name");
  try {
    return c10d::resolve_process_group(group_name);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, op, ": group_name = '", group_name,
                "' names no torch.distributed process group in this process "
                "(was init_process_group called, and is this the group's group_name?)");
  }
}

void check_tensor(const char* op, const char* name, const at::Tensor& t) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kInt ||
                  dt == at::kLong,
              op, ": ", name, " has dtype ", dt,
              "; expected float32, float16, bfloat16, int32 or int64");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (got strides ",
              t.strides(), ")");
  TORCH_CHECK(t.device().is_cpu() || t.device().is_cuda(), op, ": ", name, " is on ", t.device(),
              "; expected a CPU or CUDA tensor");
}

}  // namespace

void all_reduce(at::Tensor& tensor, const std::string& group_name) {
  check_tensor("all_reduce", "tensor", tensor);
  auto group = group_for("all_reduce", group_name);
  if (tensor.numel() == 0) return;
  std::vector<at::Tensor> tensors{tensor};
  c10d::AllreduceOptions opts;
  opts.reduceOp = c10d::ReduceOp::SUM;
  group->allreduce(tensors, opts)->wait();
}

void all_gather(at::Tensor& out, const at::Tensor& input, const std::string& group_name) {
  check_tensor("all_gather", "input", input);
  check_tensor("all_gather", "out", out);
  TORCH_CHECK(out.scalar_type() == input.scalar_type(), "all_gather: out has dtype ",
              out.scalar_type(), " but input has ", input.scalar_type());
  TORCH_CHECK(out.device() == input.device(), "all_gather: out is on ", out.device(),
              " but input is on ", input.device());
  TORCH_CHECK(input.dim() >= 1, "all_gather: input must have at least one dimension");
  auto group = group_for("all_gather", group_name);
  const int64_t world = group->getSize();
  std::vector<int64_t> expected(input.sizes().begin(), input.sizes().end());
  expected[0] *= world;
  TORCH_CHECK(out.sizes() == at::IntArrayRef(expected), "all_gather: out has shape ", out.sizes(),
              "; expected ", at::IntArrayRef(expected), " (input ", input.sizes(), " from each of ",
              world, " ranks, stacked along dim 0)");
  if (input.numel() == 0) return;
  at::Tensor in = input;  // the c10d signature takes non-const references; nothing writes input
  c10d::AllgatherOptions opts;
  // torch 2.13 renamed _allgather_base to all_gather_single (the old name is deprecated there).
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 13)
  group->all_gather_single(out, in, opts)->wait();
#else
  group->_allgather_base(out, in, opts)->wait();
#endif
}

void broadcast(at::Tensor& tensor, int64_t src, const std::string& group_name) {
  check_tensor("broadcast", "tensor", tensor);
  auto group = group_for("broadcast", group_name);
  const int64_t world = group->getSize();
  TORCH_CHECK(src >= 0 && src < world, "broadcast: src = ", src, " is out of range [0, ", world,
              ") (a rank within the group)");
  if (tensor.numel() == 0) return;
  std::vector<at::Tensor> tensors{tensor};
  c10d::BroadcastOptions opts;
  opts.rootRank = src;
  group->broadcast(tensors, opts)->wait();
}

}  // namespace sagellm

TORCH_LIBRARY_IMPL(sagellm, CPU, m) {
  m.impl("all_reduce", &sagellm::all_reduce);
  m.impl("all_gather", &sagellm::all_gather);
  m.impl("broadcast", &sagellm::broadcast);
}
