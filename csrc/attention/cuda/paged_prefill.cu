// launch_paged_attention_prefill: picks the kernel and tile shape for the params the entry file
// validated, sizes the grid from host-known shapes (see prefill_sched.cuh) and launches.
//
// Compiled kernels:
//   bf16 / fp16: the tensor-core kernel (prefill_tc.cuh) for head sizes 64, 80, 96, 128, 256,
//     when the device is sm_80+ with enough shared memory and every pointer and stride is
//     16-byte aligned (cp.async and the 16-byte stores need it); otherwise the SIMT kernel.
//   fp32: the SIMT kernel (prefill_simt.cuh) for the same head sizes.
//   Head size 128 also has two alternative tensor-core tile shapes, picked only through
//   SAGELLM_PREFILL_TILE128 (see launch_tc), so a device run can measure them side by side.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "attention/cuda/attention_cuda.cuh"
#include "attention/cuda/prefill_sched.cuh"
#include "attention/cuda/prefill_simt.cuh"
#include "attention/cuda/prefill_tc.cuh"

namespace sagellm::cuda {
namespace {

using prefill::PrefillSched;

// Tile shapes of the tensor-core kernel per head size: MI 16-row blocks per warp, WARPS warps,
// BN keys per tile. 128 x 64 tiles with 32 rows per warp (FlashAttention-2's choice for these
// sizes) halve the shared-memory reads per mma against 16 rows per warp; at head size 256 the
// O accumulator alone takes 128 registers per 16 rows, so a warp keeps 16 rows and the key tile
// shrinks to 32.
template <int D>
struct TcConfig {
  static constexpr int kMI = 2, kWarps = 4, kKeys = 64;
};
template <>
struct TcConfig<256> {
  static constexpr int kMI = 1, kWarps = 4, kKeys = 32;
};

template <int D>
using TcShapeOf = prefill::TcShape<D, TcConfig<D>::kMI, TcConfig<D>::kWarps, TcConfig<D>::kKeys>;

int tc_smem_bytes(int head_size) {
  switch (head_size) {
    case 64:
      return TcShapeOf<64>::kSmemBytes;
    case 80:
      return TcShapeOf<80>::kSmemBytes;
    case 96:
      return TcShapeOf<96>::kSmemBytes;
    case 128:
      return TcShapeOf<128>::kSmemBytes;
    case 256:
      return TcShapeOf<256>::kSmemBytes;
  }
  return std::numeric_limits<int>::max();
}

int simt_smem_bytes(int head_size) {
  switch (head_size) {
    case 64:
      return prefill::SimtShape::smem_bytes<64>();
    case 80:
      return prefill::SimtShape::smem_bytes<80>();
    case 96:
      return prefill::SimtShape::smem_bytes<96>();
    case 128:
      return prefill::SimtShape::smem_bytes<128>();
    case 256:
      return prefill::SimtShape::smem_bytes<256>();
  }
  return std::numeric_limits<int>::max();
}

struct DeviceInfo {
  int major;
  int smem_optin;  // bytes of shared memory one block may opt into
};

DeviceInfo current_device_info() {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  DeviceInfo info{};
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return info;
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// cp.async and the epilogue's stores move 16 bytes (8 elements) at a time.
bool tc_layout_ok(const PagedAttentionCudaParams& p) {
  return aligned16(p.query) && aligned16(p.out) && aligned16(p.key_cache) &&
         aligned16(p.value_cache) && p.q_stride_token % 8 == 0 && p.q_stride_head % 8 == 0 &&
         p.out_stride_token % 8 == 0 && p.out_stride_head % 8 == 0;
}

int64_t checked_blocks(const PrefillSched& s) {
  const int64_t blocks = prefill::sched_blocks(s);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "paged_attention_prefill: ", blocks, " thread blocks exceed the CUDA grid limit");
  return blocks;
}

template <typename T, int D, int MI, int WARPS, int BN>
void launch_tc_shape(const PagedAttentionCudaParams& p, cudaStream_t stream) {
  using Shape = prefill::TcShape<D, MI, WARPS, BN>;
  const PrefillSched s = prefill::make_sched(p, Shape::kRows);
  const int64_t blocks = checked_blocks(s);
  auto* kernel = prefill::paged_prefill_tc_kernel<T, D, MI, WARPS, BN>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      Shape::kSmemBytes));
  kernel<<<static_cast<unsigned>(blocks), Shape::kThreads, Shape::kSmemBytes, stream>>>(p, s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D>
void launch_tc(const PagedAttentionCudaParams& p, cudaStream_t stream) {
  if constexpr (D == 128) {
    // Tile-shape override for measuring alternatives on a device (MIxWARPSxBN; tools/device/
    // prefill_selftest.py times each): 1x8x64 keeps 16 rows per warp (170 registers, no
    // spill), 2x4x32 halves the key tile. Both hold no more shared memory than the default.
    if (const char* tile = std::getenv("SAGELLM_PREFILL_TILE128")) {
      if (std::strcmp(tile, "1x8x64") == 0) return launch_tc_shape<T, 128, 1, 8, 64>(p, stream);
      if (std::strcmp(tile, "2x4x32") == 0) return launch_tc_shape<T, 128, 2, 4, 32>(p, stream);
      TORCH_CHECK(std::strcmp(tile, "2x4x64") == 0,
                  "SAGELLM_PREFILL_TILE128 must be 2x4x64, 1x8x64 or 2x4x32, got ", tile);
    }
  }
  using Cfg = TcConfig<D>;
  launch_tc_shape<T, D, Cfg::kMI, Cfg::kWarps, Cfg::kKeys>(p, stream);
}

template <typename T, int D>
void launch_simt(const PagedAttentionCudaParams& p, cudaStream_t stream) {
  using Shape = prefill::SimtShape;
  constexpr int kSmem = Shape::smem_bytes<D>();
  const PrefillSched s = prefill::make_sched(p, Shape::kRows);
  const int64_t blocks = checked_blocks(s);
  auto* kernel = prefill::paged_prefill_simt_kernel<T, D>;
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  kernel<<<static_cast<unsigned>(blocks), Shape::kThreads, kSmem, stream>>>(p, s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, template <typename, int> class Launch>
void by_head_size(const PagedAttentionCudaParams& p, cudaStream_t stream) {
  switch (p.head_size) {
    case 64:
      return Launch<T, 64>::run(p, stream);
    case 80:
      return Launch<T, 80>::run(p, stream);
    case 96:
      return Launch<T, 96>::run(p, stream);
    case 128:
      return Launch<T, 128>::run(p, stream);
    case 256:
      return Launch<T, 256>::run(p, stream);
  }
  TORCH_CHECK(false, "paged_attention_prefill: head_size ", p.head_size,
              " has no CUDA kernel; supported: 64, 80, 96, 128, 256");
}

template <typename T, int D>
struct TcLaunch {
  static void run(const PagedAttentionCudaParams& p, cudaStream_t s) { launch_tc<T, D>(p, s); }
};
template <typename T, int D>
struct SimtLaunch {
  static void run(const PagedAttentionCudaParams& p, cudaStream_t s) { launch_simt<T, D>(p, s); }
};

template <typename T>
void launch_typed(const PagedAttentionCudaParams& p, cudaStream_t stream) {
  const DeviceInfo dev = current_device_info();
  if constexpr (!std::is_same_v<T, float>) {
    if (dev.major >= 8 && tc_smem_bytes(p.head_size) <= dev.smem_optin && tc_layout_ok(p))
      return by_head_size<T, TcLaunch>(p, stream);
  }
  TORCH_CHECK(simt_smem_bytes(p.head_size) <= dev.smem_optin, "paged_attention_prefill: head_size ",
              p.head_size, " needs ", simt_smem_bytes(p.head_size),
              " bytes of shared memory per block, the device allows ", dev.smem_optin);
  by_head_size<T, SimtLaunch>(p, stream);
}

}  // namespace

void launch_paged_attention_prefill(const PagedAttentionCudaParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0 || p.num_seqs == 0) return;  // no query rows: nothing to write
  switch (p.dtype) {
    case AttnDType::kBF16:
      return launch_typed<__nv_bfloat16>(p, stream);
    case AttnDType::kF16:
      return launch_typed<__half>(p, stream);
    case AttnDType::kF32:
      return launch_typed<float>(p, stream);
  }
  TORCH_CHECK(false, "paged_attention_prefill: unknown dtype code ", static_cast<int>(p.dtype));
}

}  // namespace sagellm::cuda
