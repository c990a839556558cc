// CUDA entries of int8_linear and int4_linear. Checks are shared with the CPU entry
// (quant/int_linear_checks.h); the kernels are in int_linear_kernels.cuh.
//
// Paths:
//   fused (fp16 / bf16, M <= kFusedMaxM, int8 with K % 16 == 0; int4 always; the weight
//     16-byte aligned, which a fresh tensor always is): the weight-only
//     tensor-core kernel, weight read once, planned below (rows x K-split so every SM streams).
//   dequantize + cuBLAS (M > kFusedMaxM, fp32, int8 with K % 16 != 0, a misaligned view): the
//     weight is expanded
//     to a dense [N, K] scratch in input's dtype by a kernel, then at::mm into out (+ bias). At
//     prefill sizes the GEMM's FLOPs dominate the one extra weight pass.
// fp32 input runs only that second path (cuBLAS fp32: slow, for completeness and tests).
//
// Instantiations: {fp16, bf16} x {int8, int4} x NT in {1, 2, 4, 8} (tokens per CTA 8..64), each
// with its row-tile count MT = mt_for<NT, kInt4>() (kernels.cuh; kMaxRowTiles = 1 there gives
// back the one-tile kernel), the split-K reduction, and the dequantizers (16-byte units with
// 32-bit index math when rows are multiples of 16 bytes, else the general one) for
// {fp32, fp16, bf16} x {int8, int4}.
//
// zeros values are checked on the host only with sagellm.ops.set_cuda_index_checks(True) and
// never during graph capture; the kernels read them modulo 16 otherwise.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "common/index_checks.h"
#include "quant/cuda/int_linear_kernels.cuh"
#include "quant/int_linear_checks.h"

namespace sagellm {
namespace int_linear {
namespace {

// Tokens up to which the fused kernel runs (one pass over the weight per 64 tokens); beyond,
// dequantize + cuBLAS (tensor-core GEMM at full rate, weight read ~2.5x once).
// Estimate at M = 64 on 14336 x 4096 int4 (H200): dequantize ~35-40 us (29 MB in, 117 MB out)
// + a bf16 GEMM ~30 us, vs the fused kernel with 2 row tiles per warp (half the activation
// traffic of the 100-120 us one-tile kernel): ~55-65 us expected, so the fused path stays up
// to 64. Lower this (e.g. to 32) if the device benchmark shows the other path winning at 64.
constexpr int64_t kFusedMaxM = 64;
// A worker (one warp's K-range) should stream at least this many 64-byte chunks per row, or the
// split-K partial sums cost more than the parallelism gains. 2, not 4: with 4 row tiles per
// warp, N = 4096 at K = 4096 would otherwise leave half the SMs idle (64 CTAs).
constexpr int kMinChunksPerWorker = 2;

void check_cuda(const char* op, const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK(t.device().is_cuda(), op, ": ", name, " is on ", t.device(),
              "; this implementation needs CUDA tensors");
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " is on ", t.device(),
              " but input is on ", input.device());
}

bool capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

int nt_for(int64_t m) {
  if (m <= 8) return 1;
  if (m <= 16) return 2;
  if (m <= 32) return 4;
  return 8;
}

// ---- dequantize + cuBLAS ------------------------------------------------------------------

// dst [N, K] (OutT) = dequantized weight; one thread per kVec weight bytes (grid-stride), kVec
// = 4 when rows are whole 4-byte words (one load per thread, 4 or 8 outputs). The general
// path (rows not a multiple of 16 bytes, or more than 2^31 16-byte units).
template <typename OutT, bool kInt4, int kVec>
__global__ void dequantize_kernel(const uint8_t* __restrict__ q, const float* __restrict__ scales,
                                  const uint8_t* __restrict__ zeros, int64_t n, int64_t row_bytes,
                                  int64_t groups, int group_size, OutT* __restrict__ dst) {
  const int64_t units = n * row_bytes / kVec;
  for (int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; u < units;
       u += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = u * kVec;
    const int64_t r = i0 / row_bytes, j0 = i0 - r * row_bytes;
    uint8_t b[kVec];
    if constexpr (kVec == 4) {
      const uint32_t w = *reinterpret_cast<const uint32_t*>(q + i0);
#pragma unroll
      for (int v = 0; v < 4; ++v) b[v] = static_cast<uint8_t>(w >> (8 * v));
    } else {
      b[0] = q[i0];
    }
    if constexpr (kInt4) {
      // A 4-byte unit (8 values) never straddles a group (group sizes are multiples of 32).
      const int64_t gi = r * groups + (2 * j0) / group_size;
      const float s = scales[gi];
      const float z = zeros != nullptr ? static_cast<float>(zeros[gi] & 15) : 8.f;
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        dst[2 * (i0 + v)] = static_cast<OutT>((static_cast<float>(b[v] & 15) - z) * s);
        dst[2 * (i0 + v) + 1] = static_cast<OutT>((static_cast<float>(b[v] >> 4) - z) * s);
      }
    } else {
      const float s = scales[r];
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        dst[i0 + v] = static_cast<OutT>(static_cast<float>(static_cast<int8_t>(b[v])) * s);
      }
    }
  }
}

// The fast path: rows a multiple of 16 bytes, fewer than 2^31 16-byte units. One thread per
// 16-byte unit (32 int4 or 16 int8 values, never straddling an int4 group: groups are 32+
// values, multiples of 32), 32-bit row / column math, 16-byte stores. Same arithmetic as above,
// so both paths give the same bits.
template <typename OutT, bool kInt4>
__global__ void dequantize16_kernel(const uint8_t* __restrict__ q,
                                    const float* __restrict__ scales,
                                    const uint8_t* __restrict__ zeros, int units,
                                    int units_per_row, int groups, int group_shift,
                                    OutT* __restrict__ dst) {
  const int u = blockIdx.x * blockDim.x + threadIdx.x;
  if (u >= units) return;
  const int r = u / units_per_row, c = u - r * units_per_row;
  const uint4 w = __ldg(reinterpret_cast<const uint4*>(q) + u);
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  constexpr int kVals = kInt4 ? 32 : 16;
  alignas(16) OutT v[kVals];
  if constexpr (kInt4) {
    // Unit c holds k = 32c .. 32c + 31: group (32c) / group_size = c >> group_shift.
    const int gi = r * groups + (c >> group_shift);
    const float s = scales[gi];
    const float z = zeros != nullptr ? static_cast<float>(zeros[gi] & 15) : 8.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const uint32_t b = (words[i / 4] >> (8 * (i % 4))) & 0xFFu;
      v[2 * i] = static_cast<OutT>((static_cast<float>(b & 15) - z) * s);
      v[2 * i + 1] = static_cast<OutT>((static_cast<float>(b >> 4) - z) * s);
    }
  } else {
    const float s = scales[r];
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int8_t b = static_cast<int8_t>((words[i / 4] >> (8 * (i % 4))) & 0xFFu);
      v[i] = static_cast<OutT>(static_cast<float>(b) * s);
    }
  }
  // Output row r starts at r * K elements; K = 16 * units_per_row * (kInt4 ? 2 : 1).
  uint4* out = reinterpret_cast<uint4*>(dst + static_cast<int64_t>(u) * kVals);
  constexpr int kStores = kVals * static_cast<int>(sizeof(OutT)) / 16;
#pragma unroll
  for (int i = 0; i < kStores; ++i) out[i] = reinterpret_cast<const uint4*>(v)[i];
}

template <bool kInt4>
void dequantize_matmul(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                       const at::Tensor& scales, const uint8_t* zeros, int64_t group_size,
                       const std::optional<at::Tensor>& bias, int64_t k) {
  const int64_t n = weight.size(0), row_bytes = weight.size(1);
  at::Tensor w = at::empty({n, k}, input.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t total = n * row_bytes;
  if (total > 0) {
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((total / 4 + threads) / threads, 65535 * 8);
    const int64_t groups = kInt4 ? k / group_size : 0;
    // Vector loads need aligned rows: row_bytes a multiple of the width and the weight's start
    // aligned (a view at an odd offset of a buffer is not; it takes the byte loop).
    const auto base = reinterpret_cast<uintptr_t>(weight.data_ptr());
    const bool vec = row_bytes % 4 == 0 && base % 4 == 0;
    const bool vec16 = row_bytes % 16 == 0 && total / 16 < (int64_t{1} << 31) - threads &&
                       reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 == 0;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dequantize",
                                    [&] {
      const auto* qp = static_cast<const uint8_t*>(weight.data_ptr());
      const float* sp = scales.data_ptr<float>();
      scalar_t* wp = w.data_ptr<scalar_t>();
      const int gs = static_cast<int>(group_size);
      if (vec16) {
        const int units = static_cast<int>(total / 16);
        const int upr = static_cast<int>(row_bytes / 16);
        const int shift = !kInt4 ? 0 : group_size == 32 ? 0 : group_size == 64 ? 1 : 2;
        dequantize16_kernel<scalar_t, kInt4>
            <<<(units + threads - 1) / threads, threads, 0, stream>>>(
                qp, sp, zeros, units, upr, static_cast<int>(groups), shift, wp);
      } else if (vec) {
        dequantize_kernel<scalar_t, kInt4, 4>
            <<<blocks, threads, 0, stream>>>(qp, sp, zeros, n, row_bytes, groups, gs, wp);
      } else {
        dequantize_kernel<scalar_t, kInt4, 1>
            <<<blocks, threads, 0, stream>>>(qp, sp, zeros, n, row_bytes, groups, gs, wp);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    w.zero_();
  }
  at::mm_out(out, input, w.t());
  if (bias.has_value()) out.add_(*bias);
}

// ---- fused kernel -------------------------------------------------------------------------

struct Plan {
  int rw, kw, split_k, chunks_per_worker;
  int64_t row_blocks, smem;
};

// The kernel is bound by HBM bandwidth, so the grid should be ONE wave in which every SM holds
// at least one CTA: a second, partial wave would stream with only part of the SMs. rw (row
// tiles per CTA) is the smallest, from NT up (larger token tiles want rw >= NT so that rw warps
// share each activation load through L1), whose grid fits the resident CTA slots; a grid short
// of one CTA per SM splits K across CTAs (fp32 partial sums + a reduction kernel).
// rw starts at NT / MT (activation sharing through L1 across warps, where the MT tiles of one
// warp do not already share them).
Plan plan(int nt, int mt, int64_t n, int pieces, int sms, int slots) {
  Plan pl;
  pl.rw = kWarps;
  const int rows_per_warp = 16 * mt;
  for (int rw = std::max(1, nt / mt); rw <= kWarps; rw *= 2) {
    if ((n + rows_per_warp * rw - 1) / (rows_per_warp * rw) <= slots) {
      pl.rw = rw;
      break;
    }
  }
  pl.kw = kWarps / pl.rw;
  pl.row_blocks = (n + rows_per_warp * pl.rw - 1) / (rows_per_warp * pl.rw);
  const int chunks = (pieces + 3) / 4;
  pl.split_k = 1;
  if (pl.row_blocks < sms) {
    const int64_t want = (sms + pl.row_blocks - 1) / pl.row_blocks;
    const int64_t most = std::max<int64_t>(1, chunks / (pl.kw * kMinChunksPerWorker));
    pl.split_k = static_cast<int>(std::min<int64_t>({want, most, 64}));
  }
  const int workers = pl.split_k * pl.kw;
  pl.chunks_per_worker = (chunks + workers - 1) / workers;
  // Round to whole batches (of 2 chunks at most) so only a row's last worker has a ragged one.
  pl.chunks_per_worker = (pl.chunks_per_worker + 1) / 2 * 2;
  pl.smem = static_cast<int64_t>(pl.kw - 1) * pl.rw * nt * 4 * 32 * sizeof(float);
  return pl;
}

template <typename T, bool kInt4, int NT>
void run_nt(Params& p, int64_t m, const at::Tensor& input, cudaStream_t stream) {
  constexpr int MT = mt_for<NT, kInt4>();
  auto kernel = int_linear_kernel<T, kInt4, NT, MT>;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // Resident CTAs per SM at the largest shared memory any plan uses (kw = 8 / rw warps' sums);
  // asked once per instantiation (a decode step calls this per layer).
  static const int per_sm = [&] {
    const size_t max_smem =
        static_cast<size_t>(kWarps - std::max(1, NT / MT)) * NT * 4 * 32 * sizeof(float);
    int blocks = 0;
    C10_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, max_smem));
    return blocks;
  }();
  const Plan pl = plan(NT, MT, p.n, p.pieces, sms, std::max(1, per_sm) * sms);
  p.chunks_per_worker = pl.chunks_per_worker;
  p.rw = pl.rw;
  p.kw = pl.kw;
  at::Tensor partial;
  if (pl.split_k > 1) {
    partial = at::empty({pl.split_k, m, p.n}, input.options().dtype(at::kFloat));
    p.partial = partial.data_ptr<float>();
  }
  const int64_t tok_blocks = (m + 8 * NT - 1) / (8 * NT);
  TORCH_CHECK(tok_blocks <= 65535, "int_linear: M = ", m, " is too large for one launch");
  const dim3 grid(static_cast<unsigned>(pl.row_blocks), static_cast<unsigned>(pl.split_k),
                  static_cast<unsigned>(tok_blocks));
  kernel<<<grid, kThreads, pl.smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (pl.split_k > 1) {
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((m * p.n + threads - 1) / threads, 4 * sms);
    split_k_reduce_kernel<T><<<blocks, threads, 0, stream>>>(p.partial, pl.split_k, p.m, p.n,
                                                              p.bias, p.out, p.ld_out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, bool kInt4>
void run_fused(at::Tensor& out, const at::Tensor& input_arg, const at::Tensor& weight,
               const at::Tensor& scales, const uint8_t* zeros, int64_t group_size,
               const std::optional<at::Tensor>& bias, int64_t m, int64_t n) {
  // The kernel reads activation rows in 16-byte runs: rows must start 16-byte aligned.
  const bool aligned = input_arg.stride(1) == 1 && input_arg.stride(0) % 8 == 0 &&
                       reinterpret_cast<uintptr_t>(input_arg.data_ptr()) % 16 == 0;
  const at::Tensor input = aligned ? input_arg : input_arg.contiguous();
  const int64_t row_bytes = weight.size(1);
  TORCH_CHECK(row_bytes < (int64_t{1} << 31) && n < (int64_t{1} << 31) &&
                  m < (int64_t{1} << 31),
              kInt4 ? "int4_linear" : "int8_linear", ": shape too large for the CUDA kernel");
  Params p{};
  p.input = input.data_ptr();
  p.out = out.data_ptr();
  p.weight = static_cast<const uint8_t*>(weight.data_ptr());
  p.scales = scales.data_ptr<float>();
  p.zeros = zeros;
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.ld_in = input.stride(0);
  p.ld_out = out.stride(0);
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.row_bytes = static_cast<int>(row_bytes);
  p.pieces = static_cast<int>(row_bytes / 16);
  if (kInt4) {
    p.groups = static_cast<int>(2 * row_bytes / group_size);
    p.group_shift = group_size == 32 ? 0 : group_size == 64 ? 1 : 2;
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (nt_for(m)) {
    case 1:
      return run_nt<T, kInt4, 1>(p, m, input, stream);
    case 2:
      return run_nt<T, kInt4, 2>(p, m, input, stream);
    case 4:
      return run_nt<T, kInt4, 4>(p, m, input, stream);
    default:
      return run_nt<T, kInt4, 8>(p, m, input, stream);
  }
}

template <bool kInt4>
void dispatch(const char* op, at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
              const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
              int64_t group_size, const std::optional<at::Tensor>& bias, int64_t m, int64_t n,
              int64_t k) {
  const uint8_t* z = zeros.has_value() ? zeros->data_ptr<uint8_t>() : nullptr;
  // The fused kernel streams weight rows with 16-byte loads: rows must start 16-byte aligned.
  const bool fused = input.scalar_type() != at::kFloat && m <= kFusedMaxM &&
                     (kInt4 || k % 16 == 0) && weight.size(1) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 == 0;
  if (!fused) {
    dequantize_matmul<kInt4>(out, input, weight, scales, z, group_size, bias, k);
    return;
  }
  if (input.scalar_type() == at::kHalf) {
    run_fused<__half, kInt4>(out, input, weight, scales, z, group_size, bias, m, n);
  } else {
    run_fused<__nv_bfloat16, kInt4>(out, input, weight, scales, z, group_size, bias, m, n);
  }
}

}  // namespace
}  // namespace int_linear

void int8_linear_cuda(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                      const at::Tensor& scales, std::optional<at::Tensor> bias) {
  constexpr const char* op = "int8_linear";
  TORCH_CHECK(input.device().is_cuda(), op, ": input is on ", input.device(),
              "; this implementation needs CUDA tensors");
  int_linear::check_cuda(op, weight, "weight", input);
  int_linear::check_cuda(op, scales, "scales", input);
  int_linear::check_cuda(op, out, "out", input);
  if (bias.has_value()) int_linear::check_cuda(op, *bias, "bias", input);
  const checks::IntLinearDims d = checks::check_int8_linear(out, input, weight, scales, bias);
  if (d.m == 0 || d.n == 0) return;
  const c10::cuda::CUDAGuard guard(input.device());
  int_linear::dispatch<false>(op, out, input, weight, scales, std::nullopt, 0, bias, d.m, d.n,
                              d.k);
}

void int4_linear_cuda(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                      const at::Tensor& scales, std::optional<at::Tensor> zeros,
                      int64_t group_size, std::optional<at::Tensor> bias) {
  constexpr const char* op = "int4_linear";
  TORCH_CHECK(input.device().is_cuda(), op, ": input is on ", input.device(),
              "; this implementation needs CUDA tensors");
  int_linear::check_cuda(op, weight, "weight", input);
  int_linear::check_cuda(op, scales, "scales", input);
  int_linear::check_cuda(op, out, "out", input);
  if (zeros.has_value()) int_linear::check_cuda(op, *zeros, "zeros", input);
  if (bias.has_value()) int_linear::check_cuda(op, *bias, "bias", input);
  const checks::IntLinearDims d =
      checks::check_int4_linear(out, input, weight, scales, zeros, group_size, bias);
  const c10::cuda::CUDAGuard guard(input.device());
  if (zeros.has_value() && cuda_index_checks_enabled() && !int_linear::capturing()) {
    checks::check_int4_zero_values(zeros->cpu());
  }
  if (d.m == 0 || d.n == 0) return;
  int_linear::dispatch<true>(op, out, input, weight, scales, zeros, group_size, bias, d.m, d.n,
                             d.k);
}

}  // namespace sagellm

TORCH_LIBRARY_IMPL(sagellm, CUDA, m) {
  m.impl("int8_linear", &sagellm::int8_linear_cuda);
  m.impl("int4_linear", &sagellm::int4_linear_cuda);
}
