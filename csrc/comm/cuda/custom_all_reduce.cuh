// Custom all-reduce kernels over peer buffers opened with CUDA IPC (see custom_all_reduce.cu).
//
// Every rank owns one device buffer, mapped into every peer: [Signal | data | tmp]. Before a
// launch the caller's input is copied into its own `data` region (stream-ordered), then:
//   one-shot  each CTA sums its grid-stride share of 16-byte packs over all ranks' `data` and
//             writes the result: world reads per element, one launch; for small messages.
//   two-shot  rank r sums chunk r (1/world of the packs) over all ranks into its own `tmp`
//             (reduce-scatter), then every rank copies every chunk from its owner's `tmp`
//             (all-gather): 2 reads per element; for larger messages (less traffic per rank).
// Both are bound by peer-to-peer bandwidth and, for small messages, by barrier latency.
//
// Barriers: per CTA, over the ranks. Flags are monotonically increasing per-CTA launch counters
// kept in the rank's own device memory (Signal::launches), so nothing is reset between launches
// and a captured CUDA graph can replay the kernel any number of times. A CTA writes the new
// counter value into slot [cta][rank] of every peer's flag array (a system-scope release) and
// waits until its own slots [cta][peer] reach that value (acquire). CTA b on every rank works on
// the same element indices (same grid, same partition), so a per-CTA barrier orders exactly the
// accesses that conflict: start (peers' data are written), mid (peers' tmp chunks are written),
// end (peers no longer read my data/tmp, so the next launch may overwrite them).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace sagellm {
namespace car {

constexpr int kMaxRanks = 8;
constexpr int kMaxBlocks = 64;
constexpr int kThreads = 512;

// Lives at the start of every rank's IPC buffer; 128-byte aligned rows keep flags of different
// CTAs in different cache lines.
struct Signal {
  alignas(128) uint32_t start[kMaxBlocks][kMaxRanks];
  alignas(128) uint32_t mid[kMaxBlocks][kMaxRanks];
  alignas(128) uint32_t end[kMaxBlocks][kMaxRanks];
  alignas(128) uint32_t launches[kMaxBlocks];  // read and written by this rank only
};

// Kernel parameters, passed by value (no device copy, capturable).
struct Peers {
  Signal* signal[kMaxRanks];  // every rank's Signal (mine included), as mapped here
  const uint4* data[kMaxRanks];
  uint4* tmp[kMaxRanks];
};

__device__ __forceinline__ void store_release(uint32_t* addr, uint32_t v) {
#if __CUDA_ARCH__ >= 700
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(addr), "r"(v) : "memory");
#else
  __threadfence_system();
  *reinterpret_cast<volatile uint32_t*>(addr) = v;
#endif
}

__device__ __forceinline__ uint32_t load_acquire(const uint32_t* addr) {
  uint32_t v;
#if __CUDA_ARCH__ >= 700
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(addr) : "memory");
#else
  v = *reinterpret_cast<const volatile uint32_t*>(addr);
  __threadfence_system();
#endif
  return v;
}

// All CTAs' threads reach here; thread p < world signals rank p and waits for rank p's signal.
template <int kWorld>
__device__ __forceinline__ void barrier(uint32_t (Signal::*flags)[kMaxBlocks][kMaxRanks],
                                        const Peers& peers, int rank, uint32_t flag) {
  __syncthreads();  // this CTA's prior accesses happen before the release below
  const int p = threadIdx.x;
  if (p < kWorld) {
    store_release(&(peers.signal[p]->*flags)[blockIdx.x][rank], flag);
    const uint32_t* mine = &(peers.signal[rank]->*flags)[blockIdx.x][p];
    while (load_acquire(mine) < flag) {
    }
  }
  __syncthreads();
}

template <typename T>
struct Pack;  // 16 bytes of T, summed in fp32
template <>
struct Pack<float> {
  static constexpr int kN = 4;
  __device__ static void add(float (&acc)[8], const uint4& v) {
    const float* f = reinterpret_cast<const float*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i] += f[i];
  }
  __device__ static uint4 round(const float (&acc)[8]) {
    uint4 out;
    float* f = reinterpret_cast<float*>(&out);
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = acc[i];
    return out;
  }
};
template <>
struct Pack<__half> {
  static constexpr int kN = 8;
  __device__ static void add(float (&acc)[8], const uint4& v) {
    const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h[i]);
      acc[2 * i] += f.x;
      acc[2 * i + 1] += f.y;
    }
  }
  __device__ static uint4 round(const float (&acc)[8]) {
    uint4 out;
    __half2* h = reinterpret_cast<__half2*>(&out);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(acc[2 * i], acc[2 * i + 1]);
    return out;
  }
};
template <>
struct Pack<__nv_bfloat16> {
  static constexpr int kN = 8;
  __device__ static void add(float (&acc)[8], const uint4& v) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      acc[2 * i] += f.x;
      acc[2 * i + 1] += f.y;
    }
  }
  __device__ static uint4 round(const float (&acc)[8]) {
    uint4 out;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
    return out;
  }
};

// The sum over ranks of pack i, in rank order (every rank adds in the same order, so all ranks
// get bit-identical results).
template <typename T, int kWorld>
__device__ __forceinline__ uint4 sum_pack(const Peers& peers, int64_t i) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int r = 0; r < kWorld; ++r) Pack<T>::add(acc, peers.data[r][i]);
  return Pack<T>::round(acc);
}

__device__ __forceinline__ uint32_t next_flag(const Peers& peers, int rank) {
  __shared__ uint32_t flag;
  if (threadIdx.x == 0) {
    flag = peers.signal[rank]->launches[blockIdx.x] + 1;
    peers.signal[rank]->launches[blockIdx.x] = flag;
  }
  __syncthreads();
  return flag;
}

template <typename T, int kWorld>
__global__ void __launch_bounds__(kThreads)
    one_shot_kernel(Peers peers, int rank, uint4* __restrict__ out, int64_t packs) {
  const uint32_t flag = next_flag(peers, rank);
  barrier<kWorld>(&Signal::start, peers, rank, flag);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < packs;
       i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = sum_pack<T, kWorld>(peers, i);
  }
  barrier<kWorld>(&Signal::end, peers, rank, flag);
}

template <typename T, int kWorld>
__global__ void __launch_bounds__(kThreads)
    two_shot_kernel(Peers peers, int rank, uint4* __restrict__ out, int64_t packs) {
  const uint32_t flag = next_flag(peers, rank);
  const int64_t chunk = (packs + kWorld - 1) / kWorld;
  barrier<kWorld>(&Signal::start, peers, rank, flag);
  // Reduce-scatter: my chunk, over every rank's data, into my tmp.
  {
    const int64_t lo = rank * chunk;
    const int64_t n = max(int64_t(0), min(packs, lo + chunk) - lo);
    for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < n;
         j += int64_t(gridDim.x) * blockDim.x) {
      peers.tmp[rank][j] = sum_pack<T, kWorld>(peers, lo + j);
    }
  }
  barrier<kWorld>(&Signal::mid, peers, rank, flag);
  // All-gather: chunk r from rank r's tmp (same chunk-local index -> same CTA as wrote it).
#pragma unroll
  for (int r = 0; r < kWorld; ++r) {
    const int64_t lo = r * chunk;
    const int64_t n = max(int64_t(0), min(packs, lo + chunk) - lo);
    for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < n;
         j += int64_t(gridDim.x) * blockDim.x) {
      out[lo + j] = peers.tmp[r][j];
    }
  }
  barrier<kWorld>(&Signal::end, peers, rank, flag);
}

}  // namespace car
}  // namespace sagellm
