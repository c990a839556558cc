// CUDA kernels over GGUF weight blocks kept as stored in the file (weight uint8 [N, row_bytes]),
// decoded in registers by quant/gguf_decode_parts.h (the decoders the CPU gguf_dequantize runs
// too). Templates over the format F, the blocks' guaranteed address alignment kAlign (4: 32-bit
// loads; 2: 16-bit loads) and, for the GEMV, the input rows kRows of one launch.
//
//   gemv_kernel     out [m, N] = x [m, K] @ dequant(W)^T (+ bias), m <= kRows <= 8. Bound by
//                   the weight bytes (N x row_bytes, read once per launch). CTA = kWarps warps;
//                   warp w owns weight rows kRowsPerWarp * (CTA * kWarps + w) + {0, 1}. The CTA
//                   stages x, converted to fp32, in shared memory one K tile at a time
//                   (kRows x tile <= kTileFloats), then each lane walks parts lane, lane + 32,
//                   ... of the tile (8 elements each, gguf_decode_parts.h), decodes them for its
//                   warp's rows (each x value read from shared memory serves both rows) and
//                   accumulates kRowsPerWarp x kRows fp32 sums; a shuffle reduction ends it.
//                   The dequantized weights are exactly gguf.quants' fp32 values; x is exact in
//                   fp32; the sums are fp32 FMAs, rounded once to out's dtype.
//   dequant_kernel  out [R, K] = dequant(W) in fp32 / fp16 / bf16: one CTA per row (grid-stride),
//                   one part per thread. Bound by the bytes written.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "quant/gguf_decode_parts.h"

namespace sagellm::gguf_cuda {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kRowsPerWarp = 2;
constexpr int kRowsPerCta = kWarps * kRowsPerWarp;
constexpr int kTileFloats = 8192;  // 32 KiB of staged activations per CTA
constexpr int kUnroll = 4;         // parts per lane with loads in flight together

enum class DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

__device__ __forceinline__ float load_float(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::kF32:
      return static_cast<const float*>(p)[i];
    case DType::kBF16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default:
      return __half2float(static_cast<const __half*>(p)[i]);
  }
}

__device__ __forceinline__ void store_float(void* p, int64_t i, float v, DType t) {
  switch (t) {
    case DType::kF32:
      static_cast<float*>(p)[i] = v;
      break;
    case DType::kBF16:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
      break;
    default:
      static_cast<__half*>(p)[i] = __float2half_rn(v);
      break;
  }
}

// Shared-memory slot of tile element e: odd 32-element groups have their two halves swapped.
// A quarter-warp of the 32-element formats reads two blocks (lanes 0-3: elements 0-15 of block
// 2i, lanes 4-7: 32-47 of block 2i+1); swapped, those land on different banks.
__device__ __forceinline__ int swizzle(int e) { return e ^ ((e & 32) >> 1); }

struct GemvArgs {
  const uint8_t* weight;  // [n, row_bytes]
  int64_t row_bytes;
  const void* input;  // [m, k], unit element stride
  int64_t input_stride;
  const void* bias;  // [n] or nullptr
  void* out;         // [m, n], unit element stride
  int64_t out_stride;
  int m, n, k;
  int tile;  // K elements staged per pass: a multiple of 256, or k
  DType dtype;
};

template <class F, int kAlign, int kRows>
__global__ void __launch_bounds__(kThreads) gemv_kernel(const GemvArgs a) {
  extern __shared__ float4 smem_f4[];
  float* xs = reinterpret_cast<float*>(smem_f4);  // [kRows][tile], swizzled
  const int lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * kWarps + (threadIdx.x >> 5)) * kRowsPerWarp;
  const bool any_row = row0 < a.n;
  const uint8_t* wrow[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    // A row past n decodes row 0 for nothing (its sums are never stored): no branch per part.
    const int64_t row = row0 + i < a.n ? row0 + i : 0;
    wrow[i] = a.weight + row * a.row_bytes;
  }
  float acc[kRowsPerWarp][kRows];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[i][r] = 0.0f;
  }

  for (int k0 = 0; k0 < a.k; k0 += a.tile) {
    const int len = min(a.tile, a.k - k0);
    __syncthreads();  // the previous tile is consumed
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      for (int e = threadIdx.x; e < len; e += kThreads) {
        xs[r * a.tile + swizzle(e)] =
            r < a.m ? load_float(a.input, r * a.input_stride + k0 + e, a.dtype) : 0.0f;
      }
    }
    __syncthreads();
    if (!any_row) continue;
    const int parts = len / 8;
    const uint8_t* wtile[kRowsPerWarp];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) wtile[i] = wrow[i] + (k0 / F::kElems) * F::kBytes;
    // Part q of the tile for this warp's rows: decode, then one read of x per input row.
    const auto part = [&](int q) {
      const int blk = q / F::kParts, p = q % F::kParts;
      float w[kRowsPerWarp][8];
      int e0 = 0, e1 = 0;
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        F::template decode<kAlign>(wtile[i] + blk * F::kBytes, p, w[i], e0, e1);
      }
      const int s0 = swizzle(blk * F::kElems + e0), s1 = swizzle(blk * F::kElems + e1);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float4 x0 = *reinterpret_cast<const float4*>(xs + r * a.tile + s0);
        const float4 x1 = *reinterpret_cast<const float4*>(xs + r * a.tile + s1);
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i) {
          float s = acc[i][r];
          s = fmaf(w[i][0], x0.x, s);
          s = fmaf(w[i][1], x0.y, s);
          s = fmaf(w[i][2], x0.z, s);
          s = fmaf(w[i][3], x0.w, s);
          s = fmaf(w[i][4], x1.x, s);
          s = fmaf(w[i][5], x1.y, s);
          s = fmaf(w[i][6], x1.z, s);
          s = fmaf(w[i][7], x1.w, s);
          acc[i][r] = s;
        }
      }
    };
    // kUnroll parts per lane without bounds checks in between, so their loads issue together.
    int q = lane;
    for (; q + 32 * (kUnroll - 1) < parts; q += 32 * kUnroll) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) part(q + 32 * u);
    }
    for (; q < parts; q += 32) part(q);
  }

  if (!any_row) return;
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float v = acc[i][r];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      acc[i][r] = v;
    }
  }
  // Lane (i * kRows + r) % 32 stores output (r, row0 + i): the stores spread over lanes.
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int n = row0 + i;
    if (n >= a.n) continue;
    const float b = a.bias != nullptr ? load_float(a.bias, n, a.dtype) : 0.0f;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r < a.m && lane == (i * kRows + r) % 32) {
        store_float(a.out, r * a.out_stride + n, acc[i][r] + b, a.dtype);
      }
    }
  }
}

struct DequantArgs {
  const uint8_t* weight;  // [rows, row_bytes]
  int64_t row_bytes;
  void* out;  // [rows, k], unit element stride
  int64_t out_stride;
  int64_t rows;
  int parts;  // k / 8
  DType dtype;
  bool vec;  // out's base and row stride allow 4-element vector stores
};

// Four consecutive values at out + i (i a multiple of 4).
__device__ __forceinline__ void store4(void* out, int64_t i, const float* v, DType t, bool vec) {
  if (vec) {
    switch (t) {
      case DType::kF32:
        *reinterpret_cast<float4*>(static_cast<float*>(out) + i) =
            make_float4(v[0], v[1], v[2], v[3]);
        return;
      case DType::kBF16: {
        const __nv_bfloat162 a = __floats2bfloat162_rn(v[0], v[1]);
        const __nv_bfloat162 b = __floats2bfloat162_rn(v[2], v[3]);
        uint2 u;
        u.x = *reinterpret_cast<const uint32_t*>(&a);
        u.y = *reinterpret_cast<const uint32_t*>(&b);
        *reinterpret_cast<uint2*>(static_cast<__nv_bfloat16*>(out) + i) = u;
        return;
      }
      default: {
        const __half2 a = __floats2half2_rn(v[0], v[1]);
        const __half2 b = __floats2half2_rn(v[2], v[3]);
        uint2 u;
        u.x = *reinterpret_cast<const uint32_t*>(&a);
        u.y = *reinterpret_cast<const uint32_t*>(&b);
        *reinterpret_cast<uint2*>(static_cast<__half*>(out) + i) = u;
        return;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) store_float(out, i + j, v[j], t);
}

template <class F, int kAlign>
__global__ void dequant_kernel(const DequantArgs a) {
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    const uint8_t* row = a.weight + r * a.row_bytes;
    const int64_t base = r * a.out_stride;
    for (int q = threadIdx.x; q < a.parts; q += blockDim.x) {
      const int blk = q / F::kParts, p = q % F::kParts;
      float w[8];
      int e0, e1;
      F::template decode<kAlign>(row + static_cast<int64_t>(blk) * F::kBytes, p, w, e0, e1);
      const int64_t o = base + static_cast<int64_t>(blk) * F::kElems;
      store4(a.out, o + e0, w, a.dtype, a.vec);
      store4(a.out, o + e1, w + 4, a.dtype, a.vec);
    }
  }
}

}  // namespace sagellm::gguf_cuda
