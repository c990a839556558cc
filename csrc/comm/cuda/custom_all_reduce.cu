// The custom all-reduce's host side (kernels and their layout in custom_all_reduce.cuh), and the
// CUDA registration of the torch.distributed collectives (comm_ops.cpp), which on CUDA tensors
// go through NCCL.
#include "comm/cuda/custom_all_reduce.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstring>

#include "comm/comm_ops.h"
#include "comm/cuda/custom_all_reduce.cuh"

namespace sagellm {
namespace {

constexpr int64_t kSignalBytes = (sizeof(car::Signal) + 255) / 256 * 256;

template <typename T, int kWorld>
void launch(const car::Peers& peers, int rank, void* out, int64_t packs, bool one_shot,
            cudaStream_t stream) {
  // Enough CTAs to keep loads in flight, few enough that every CTA is resident at once (each
  // spins in the barriers) and within the Signal's per-CTA flag slots.
  const int64_t want = (packs + car::kThreads - 1) / car::kThreads;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, car::kMaxBlocks)));
  if (one_shot) {
    car::one_shot_kernel<T, kWorld>
        <<<blocks, car::kThreads, 0, stream>>>(peers, rank, static_cast<uint4*>(out), packs);
  } else {
    car::two_shot_kernel<T, kWorld>
        <<<blocks, car::kThreads, 0, stream>>>(peers, rank, static_cast<uint4*>(out), packs);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_world(int world, const car::Peers& peers, int rank, void* out, int64_t packs,
                  bool one_shot, cudaStream_t stream) {
  switch (world) {
    case 2: return launch<T, 2>(peers, rank, out, packs, one_shot, stream);
    case 4: return launch<T, 4>(peers, rank, out, packs, one_shot, stream);
    case 8: return launch<T, 8>(peers, rank, out, packs, one_shot, stream);
    default: TORCH_CHECK(false, "custom all_reduce: world = ", world, " is not 2, 4 or 8");
  }
}

}  // namespace

CustomAllReduce::CustomAllReduce(int64_t rank, int64_t world, int64_t max_bytes)
    : rank_(rank), world_(world), max_bytes_(max_bytes) {
  TORCH_CHECK(world == 2 || world == 4 || world == 8, "CustomAllReduce: world = ", world,
              " is not 2, 4 or 8");
  TORCH_CHECK(rank >= 0 && rank < world, "CustomAllReduce: rank = ", rank,
              " is out of range [0, ", world, ")");
  TORCH_CHECK(max_bytes > 0 && max_bytes % 16 == 0, "CustomAllReduce: max_bytes = ", max_bytes,
              " must be a positive multiple of 16");
  C10_CUDA_CHECK(cudaGetDevice(&device_));
  // One cudaMalloc per rank: an IPC handle maps a whole allocation, never a sub-block of the
  // caching allocator's.
  const size_t bytes = kSignalBytes + 2 * max_bytes;
  C10_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&buffer_), bytes));
  C10_CUDA_CHECK(cudaMemset(buffer_, 0, kSignalBytes));
  C10_CUDA_CHECK(cudaDeviceSynchronize());  // zeroed before any peer can map it
  mapped_.assign(world, nullptr);
  bases_.assign(world, nullptr);
  bases_[rank] = buffer_;
}

CustomAllReduce::~CustomAllReduce() {
  // Destructors must not throw: errors are ignored (the process may be tearing down CUDA).
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  cudaDeviceSynchronize();
  for (char* p : mapped_) {
    if (p != nullptr) cudaIpcCloseMemHandle(p);
  }
  if (buffer_ != nullptr) cudaFree(buffer_);
}

at::Tensor CustomAllReduce::ipc_handle() const {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  cudaIpcMemHandle_t handle;
  C10_CUDA_CHECK(cudaIpcGetMemHandle(&handle, buffer_));
  at::Tensor out = at::empty({static_cast<int64_t>(sizeof(handle))}, at::kByte);
  std::memcpy(out.data_ptr(), &handle, sizeof(handle));
  return out;
}

void CustomAllReduce::open(const at::Tensor& handles) {
  TORCH_CHECK(!opened_, "CustomAllReduce.open: already opened");
  TORCH_CHECK(handles.device().is_cpu() && handles.scalar_type() == at::kByte &&
                  handles.dim() == 2 && handles.size(0) == world_ &&
                  handles.size(1) == static_cast<int64_t>(sizeof(cudaIpcMemHandle_t)) &&
                  handles.is_contiguous(),
              "CustomAllReduce.open: handles must be a contiguous uint8 CPU tensor [", world_,
              ", ", sizeof(cudaIpcMemHandle_t), "], got ", handles.scalar_type(), " ",
              handles.sizes(), " on ", handles.device());
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  for (int64_t r = 0; r < world_; ++r) {
    if (r == rank_) continue;
    cudaIpcMemHandle_t h;
    std::memcpy(&h, handles.data_ptr<uint8_t>() + r * sizeof(h), sizeof(h));
    void* p = nullptr;
    C10_CUDA_CHECK(cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess));
    mapped_[r] = static_cast<char*>(p);
    bases_[r] = mapped_[r];
  }
  opened_ = true;
}

void CustomAllReduce::all_reduce(at::Tensor out, const at::Tensor& inp, bool one_shot) {
  TORCH_CHECK(opened_, "CustomAllReduce.all_reduce: call open() with every rank's handle first");
  TORCH_CHECK(inp.is_cuda() && inp.device().index() == device_, "custom all_reduce: inp is on ",
              inp.device(), "; expected cuda:", device_);
  TORCH_CHECK(out.device() == inp.device(), "custom all_reduce: out is on ", out.device(),
              " but inp is on ", inp.device());
  const auto dt = inp.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "custom all_reduce: inp has dtype ", dt, "; expected float32, float16 or bfloat16");
  TORCH_CHECK(out.scalar_type() == dt, "custom all_reduce: out has dtype ", out.scalar_type(),
              " but inp has ", dt);
  TORCH_CHECK(inp.is_contiguous() && out.is_contiguous(),
              "custom all_reduce: inp and out must be contiguous");
  TORCH_CHECK(out.numel() == inp.numel(), "custom all_reduce: out has ", out.numel(),
              " elements but inp has ", inp.numel());
  const int64_t bytes = inp.numel() * inp.element_size();
  TORCH_CHECK(bytes % 16 == 0 && bytes <= max_bytes_, "custom all_reduce: ", bytes,
              " bytes; expected a multiple of 16 up to max_bytes = ", max_bytes_);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0,
              "custom all_reduce: out must be 16-byte aligned");
  if (bytes == 0) return;
  const c10::cuda::CUDAGuard guard(inp.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  car::Peers peers{};
  for (int64_t r = 0; r < world_; ++r) {
    char* base = bases_[r];
    peers.signal[r] = reinterpret_cast<car::Signal*>(base);
    peers.data[r] = reinterpret_cast<const uint4*>(base + kSignalBytes);
    peers.tmp[r] = reinterpret_cast<uint4*>(base + kSignalBytes + max_bytes_);
  }
  // The input goes into this rank's mapped data region first (stream-ordered, so capturable);
  // the kernel's start barrier publishes it to the peers.
  C10_CUDA_CHECK(cudaMemcpyAsync(buffer_ + kSignalBytes, inp.data_ptr(), bytes,
                                 cudaMemcpyDeviceToDevice, stream));
  const int64_t packs = bytes / 16;
  const int rank = static_cast<int>(rank_);
  const int world = static_cast<int>(world_);
  switch (dt) {
    case at::kFloat:
      return launch_world<float>(world, peers, rank, out.data_ptr(), packs, one_shot, stream);
    case at::kHalf:
      return launch_world<__half>(world, peers, rank, out.data_ptr(), packs, one_shot, stream);
    default:
      return launch_world<__nv_bfloat16>(world, peers, rank, out.data_ptr(), packs, one_shot,
                                         stream);
  }
}

namespace {

// The torch.distributed collectives on CUDA tensors: the same entries as on the CPU (the process
// group picks NCCL by device), run with the tensor's device current.
void all_reduce_cuda(at::Tensor& tensor, const std::string& group_name) {
  const c10::cuda::OptionalCUDAGuard guard(tensor.device());
  all_reduce(tensor, group_name);
}

void all_gather_cuda(at::Tensor& out, const at::Tensor& input, const std::string& group_name) {
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  all_gather(out, input, group_name);
}

void broadcast_cuda(at::Tensor& tensor, int64_t src, const std::string& group_name) {
  const c10::cuda::OptionalCUDAGuard guard(tensor.device());
  broadcast(tensor, src, group_name);
}

}  // namespace
}  // namespace sagellm

TORCH_LIBRARY_IMPL(sagellm, CUDA, m) {
  m.impl("all_reduce", &sagellm::all_reduce_cuda);
  m.impl("all_gather", &sagellm::all_gather_cuda);
  m.impl("broadcast", &sagellm::broadcast_cuda);
}
