// Paged attention decode over a quantized (int8 / float8_e4m3fn) KV cache, fp16 / bf16 queries.
//
// Layout: key_cache / value_cache [num_blocks, block_size, num_kv_heads, head_size], one byte per
// element (128 B per row at d = 128); k_scales / v_scales fp32 [num_blocks, block_size,
// num_kv_heads]. The structure is paged_decode.cu's tensor-core kernel with a dequantizing step:
//
// Grid (num_seqs * num_kv_heads * head_tiles, num_parts), 128 threads = 4 warps; a CTA owns one
// KV head of one sequence, up to 8 query heads of its GQA group and one partition of the keys.
// Each warp takes 16-key tiles in turn and streams them through a private cp.async ring of raw
// tiles (16-byte copies of the quantized rows plus one 4-byte copy per key and scale), so the
// cache is read from HBM once, 1 byte per element. The MMA fragments come straight from the raw
// tiles: ldmatrix on bytes moves each lane 4 stored values (2 b16 elements), which are widened
// to fp16 in registers (exact: every int8 and e4m3 value is an fp16 value; paged_quant.cuh):
//   S^T = Kq Q^T     ldmatrix of K rows gives a lane 4 consecutive dims of one key; the QK
//                    reduction runs over a permutation of the dims (lane t's 4 dims stand for
//                    MMA columns 2t, 2t + 1, 2t + 8, 2t + 9), matched by the query fragments;
//   O^T += Vq^T P'^T  ldmatrix.trans of V rows gives a lane dims 2g, 2g + 1 of keys 2t, 2t + 1;
//                    one byte permute makes them the A fragments of output rows g and g + 8,
//                    so m-tile i holds dims 16i + 2g (row g) and 16i + 2g + 1 (row g + 8).
// Then s = S * k_scale[key] * 2^-e[head] * scale, P' = P * v_scale[key] / u with u the tile's
// largest v_scale, and O is kept in units of the latest u (rescaled like the softmax max), so
// neither scale is applied per element. Queries enter the MMA in fp16: each head's row is
// multiplied by a power of two 2^e that brings its largest element into [2^14, 2^15), exact for
// bf16 / fp16 inputs except for elements below ~2^-24 of the row's largest.
// Raw rows are padded to head_size + 16 bytes so the 8 rows of an ldmatrix fall in 8 bank groups.
// Bound: memory. Bytes per call = (2 * head_size + 8) * visible keys * num_kv_heads (+ queries,
// outputs). Per 16-key tile a warp moves 2 x 16 x head_size bytes through shared memory twice
// (cp.async in, ldmatrix out), as the 16-bit kernel does per byte, and widens each value with
// ~1.3 ALU ops (int8) or a quarter of a cvt.f16x2.e4m3x2 (fp8, sm_89+).
//
// Split-KV is planned on the host from max_blocks_per_seq as in paged_decode.cu (partials in the
// workspace, a reduce kernel merges them).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>

#include "attention/cuda/attention_cuda.cuh"
#include "attention/cuda/paged_quant.cuh"

namespace sagellm::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTileKeys = 16;
constexpr int kCtaKeys = kWarps * kTileKeys;
constexpr int kMaxRows = 8;
constexpr int64_t kMinPartKeys = 256;
constexpr int64_t kMaxPartKeys = 2048;
constexpr int64_t kMaxContext = int64_t{1} << 30;
constexpr int kMaxGridY = 65535;
constexpr int kReduceThreads = 64;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Shared memory per warp: `stages` raw tiles, each K rows, V rows (pitch head_size + 16 bytes),
// then 16 k_scales and 16 v_scales.
constexpr int raw_pitch(int d) { return d + 16; }
constexpr int stage_bytes(int d) { return 2 * kTileKeys * raw_pitch(d) + 2 * kTileKeys * 4; }
size_t ring_smem(int d, int stages) {
  return size_t{kWarps} * static_cast<size_t>(stages) * stage_bytes(d);
}
size_t merge_smem(int d) { return size_t{kWarps} * kMaxRows * d * 4; }

struct QDecodePlan {
  int group;
  int head_tiles;
  int part_keys;
  int num_parts;
  int max_ctx;
  int stages;
  size_t smem;
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

QDecodePlan plan(const PagedAttentionCudaParams& p) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  QDecodePlan pl{};
  pl.group = p.num_heads / p.num_kv_heads;
  pl.head_tiles = static_cast<int>(ceil_div(pl.group, kMaxRows));
  pl.max_ctx = static_cast<int>(
      std::min<int64_t>(int64_t{p.max_blocks_per_seq} * p.block_size, kMaxContext));
  // Raw tiles are small (4.6 KB per stage at d = 128): three stages keep two tiles per warp in
  // flight at ~57 KB per CTA, three CTAs per H100/H200 SM.
  const size_t limit = prop->sharedMemPerBlockOptin;
  pl.stages = ring_smem(p.head_size, 3) <= limit ? 3 : 2;
  pl.smem = std::max(ring_smem(p.head_size, pl.stages), merge_smem(p.head_size));
  TORCH_CHECK(pl.smem <= limit, "paged_attention_decode: head_size ", p.head_size, " needs ",
              pl.smem, " bytes of shared memory per block over a quantized cache; this GPU ",
              "allows ", limit);

  const int64_t span = std::max<int64_t>(
      1, std::min<int64_t>(pl.max_ctx, int64_t{p.sliding_window} + kTileKeys - 1));
  int64_t part = round_up(span, kCtaKeys);
  const int64_t ctas = int64_t{p.num_seqs} * p.num_kv_heads * pl.head_tiles;
  const int64_t per_sm = std::clamp<int64_t>(
      prop->sharedMemPerMultiprocessor / (pl.smem + prop->reservedSharedMemPerBlock), 1, 4);
  const int64_t resident = per_sm * prop->multiProcessorCount;
  if (span > kMinPartKeys && 2 * ctas < 3 * resident) {
    const int64_t want = ceil_div(4 * resident, ctas);
    part = std::clamp(round_up(ceil_div(span, want), kCtaKeys), kMinPartKeys, kMaxPartKeys);
    part = std::min(part, round_up(span, kCtaKeys));
  }
  part = std::max(part, round_up(ceil_div(span, kMaxGridY), kCtaKeys));
  pl.part_keys = static_cast<int>(part);
  pl.num_parts = static_cast<int>(ceil_div(span, part));
  return pl;
}

int64_t workspace_floats(const PagedAttentionCudaParams& p, const QDecodePlan& pl) {
  if (pl.num_parts <= 1) return 0;
  return int64_t{p.num_seqs} * p.num_heads * pl.num_parts * (p.head_size + 2);
}

struct QDecodeArgs {
  PagedAttentionCudaParams p;
  QuantKVParams q;
  int group;
  int head_tiles;
  int part_keys;
  int num_parts;
  int max_ctx;
  int stages;
  float score_scale;  // no soft cap: scale * log2e; soft cap: scale / soft_cap
  float cap_log2;     // soft_cap * log2e; 0 when off
};

// ---- device helpers ---------------------------------------------------------------------------

struct SeqSpan {
  int len;
  int lo;    // first visible key
  int base;  // lo rounded down to 16: partitions and tiles start here
  int parts;
};

__device__ __forceinline__ SeqSpan seq_span(const QDecodeArgs& a, int seq) {
  SeqSpan s;
  s.len = min(__ldg(a.p.seq_lens + seq), a.max_ctx);
  s.lo = s.len > a.p.sliding_window ? s.len - a.p.sliding_window : 0;
  s.base = s.lo & ~(kTileKeys - 1);
  s.parts = s.len > s.base ? (s.len - s.base + a.part_keys - 1) / a.part_keys : 0;
  return s;
}

__device__ __forceinline__ float score_of(const QDecodeArgs& a, float dot) {
  return a.cap_log2 > 0.f ? a.cap_log2 * tanhf(dot * a.score_scale) : dot * a.score_scale;
}

__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  return u;
}

__device__ __forceinline__ void mma_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 4 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(row)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(row)));
}
__device__ __forceinline__ uint32_t transpose_8x8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

__device__ __forceinline__ int64_t part_row(const QDecodeArgs& a, int seq, int head, int part) {
  return (int64_t{seq} * a.p.num_heads + head) * a.num_parts + part;
}

// Merges the warps' (max, sum, acc) rows and writes `out` (the sequence's only partition) or
// one partial slot of the workspace. wo: [kWarps][kMaxRows][D] accumulators (true units).
template <typename T, int D>
__device__ void finish_partition(const float* wo, const float (*wm)[kMaxRows],
                                 const float (*wl)[kMaxRows], int rows, const QDecodeArgs& a,
                                 int seq, int head0, int part, bool direct) {
  __shared__ float weight[kWarps][kMaxRows];
  __shared__ float row_ml[kMaxRows][2];
  if (threadIdx.x < rows) {
    const int r = threadIdx.x;
    float m = kNegInf;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, wm[w][r]);
    const float mu = m == kNegInf ? 0.f : m;
    float e[kWarps];
    float l = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      e[w] = exp2f(wm[w][r] - mu);
      l += wl[w][r] * e[w];
    }
    const float norm = direct ? (l > 0.f ? 1.f / l : 0.f) : 1.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) weight[w][r] = e[w] * norm;
    row_ml[r][0] = m;
    row_ml[r][1] = l;
  }
  __syncthreads();
  const PagedAttentionCudaParams& p = a.p;
  for (int idx = threadIdx.x; idx < rows * D; idx += kThreads) {
    const int r = idx / D;
    const int d = idx - r * D;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += wo[(w * kMaxRows + r) * D + d] * weight[w][r];
    if (direct) {
      T* out = static_cast<T*>(p.out) + int64_t{seq} * p.out_stride_token +
               int64_t{head0 + r} * p.out_stride_head;
      out[d] = from_f32<T>(v);
    } else {
      p.workspace[part_row(a, seq, head0 + r, part) * D + d] = v;
    }
  }
  if (!direct && threadIdx.x < rows) {
    const int r = threadIdx.x;
    const int64_t total = int64_t{p.num_seqs} * p.num_heads * a.num_parts;
    float* ml = p.workspace + total * D + part_row(a, seq, head0 + r, part) * 2;
    ml[0] = row_ml[r][0];
    ml[1] = row_ml[r][1];
  }
}

// ---- the kernel -------------------------------------------------------------------------------

template <typename T, int D, KVCacheQuant Q, bool kAligned>
__global__ void __launch_bounds__(kThreads) qdecode_kernel(const QDecodeArgs a) {
  constexpr int KS = D / 16;  // 16-dim segments: k-steps of QK, m-tiles of PV
  constexpr int kPitch = raw_pitch(D);
  constexpr int kChunks = D / 16;  // 16-byte chunks per raw row
  constexpr int kTileChunks = kTileKeys * kChunks;
  constexpr int kChunkIters = (kTileChunks + 31) / 32;
  constexpr int kStage = stage_bytes(D);
  constexpr int kScaleOff = 2 * kTileKeys * kPitch;  // byte offset of the scales in a stage
  static_assert(D % 16 == 0, "unsupported head size");

  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float warp_m[kWarps][kMaxRows];
  __shared__ float warp_l[kWarps][kMaxRows];

  const PagedAttentionCudaParams& p = a.p;
  const int per_seq = p.num_kv_heads * a.head_tiles;
  const int seq = blockIdx.x / per_seq;
  const int rest = blockIdx.x - seq * per_seq;
  const int kv_head = rest / a.head_tiles;
  const int head_tile = rest - kv_head * a.head_tiles;
  const int part = blockIdx.y;
  const SeqSpan span = seq_span(a, seq);
  const int key_begin = span.base + part * a.part_keys;
  if (key_begin >= span.len) return;
  const int key_end = min(key_begin + a.part_keys, span.len);
  const int g0 = a.group * head_tile / a.head_tiles;
  const int rows = a.group * (head_tile + 1) / a.head_tiles - g0;
  const int head0 = kv_head * a.group + g0;

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;

  // Q^T as the B operand: column n = head g; MMA rows 2t, 2t+1 / 2t+8, 2t+9 of k-step ks are
  // dims 16ks + 4t + {0, 1} / {2, 3} (the permutation the K fragments use). fp16 after a
  // power-of-two scale per head; qinv0 / qinv1 undo it for heads 2t, 2t+1.
  uint32_t qf[KS][2];
  float qinv0, qinv1;
  {
    const T* qp = static_cast<const T*>(p.query) + int64_t{seq} * p.q_stride_token +
                  int64_t{head0 + g} * p.q_stride_head;
    const bool real = g < rows;
    float qv[KS][4];
    float amax = 0.f;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      const int d = ks * 16 + 4 * t;
#pragma unroll
      for (int j = 0; j < 4; ++j) qv[ks][j] = real ? to_f32(qp[d + j]) : 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) amax = fmaxf(amax, fabsf(qv[ks][j]));
    }
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
    // amax < 2^e with e from its exponent bits; 2^(15 - e) brings it into [2^14, 2^15). The
    // clamp keeps both 2^k and 2^-k normal floats (a row of zeros or denormals gets 2^60).
    const int e = ((__float_as_int(amax) >> 23) & 0xff) - 126;
    const int k = max(-100, min(60, 15 - e));
    const float qs = __int_as_float((k + 127) << 23);
    const float qinv = __int_as_float((127 - k) << 23);
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      qf[ks][0] = pack_half2(qv[ks][0] * qs, qv[ks][1] * qs);
      qf[ks][1] = pack_half2(qv[ks][2] * qs, qv[ks][3] * qs);
    }
    qinv0 = __shfl_sync(0xffffffffu, qinv, 8 * t);
    qinv1 = __shfl_sync(0xffffffffu, qinv, 8 * t + 4);
  }

  unsigned char* const ring = smem + warp * a.stages * kStage;
  const auto* kc = static_cast<const unsigned char*>(p.key_cache);
  const auto* vc = static_cast<const unsigned char*>(p.value_cache);
  const int64_t token_stride = int64_t{p.num_kv_heads} * D;  // bytes
  const int64_t head_off = int64_t{kv_head} * D;
  const int32_t* table = p.block_tables + int64_t{seq} * p.block_tables_stride;
  const int bs = p.block_size;

  const int ntiles = (key_end - key_begin + kTileKeys - 1) / kTileKeys;
  const int my_tiles = warp < ntiles ? (ntiles - warp + kWarps - 1) / kWarps : 0;
  auto tile_key = [&](int n) { return key_begin + kTileKeys * (warp + kWarps * n); };
  auto tile_block = [&](int n) {
    return kAligned && n < my_tiles ? __ldg(table + tile_key(n) / bs) : 0;
  };
  // The cache slot of `key` (valid keys only); `block` is the tile's block when aligned.
  auto slot_of = [&](int key, int block) -> int64_t {
    if constexpr (kAligned) {
      return int64_t{block} * bs + key % bs;
    } else {
      const int b = key / bs;
      return int64_t{__ldg(table + b)} * bs + (key - b * bs);
    }
  };
  auto load_tile = [&](int n, int stage, int block) {
    unsigned char* st = ring + stage * kStage;
    const int key0 = tile_key(n);
#pragma unroll
    for (int i = 0; i < kChunkIters; ++i) {
      const int c = i * 32 + lane;
      if (kTileChunks % 32 == 0 || c < kTileChunks) {
        const int r = c / kChunks;
        const int col = c - r * kChunks;
        const int key = key0 + r;
        const bool valid = key >= span.lo && key < key_end;
        const int64_t off = valid ? slot_of(key, block) * token_stride + head_off + col * 16 : 0;
        cp_async_16(st + r * kPitch + col * 16, kc + off, valid);
        cp_async_16(st + (kTileKeys + r) * kPitch + col * 16, vc + off, valid);
      }
    }
    // Lane l copies the k_scale (l < 16) or v_scale of key l % 16; zero outside the visible keys.
    const int key = key0 + lane % kTileKeys;
    const bool valid = key >= span.lo && key < key_end;
    const int64_t idx = valid ? slot_of(key, block) * p.num_kv_heads + kv_head : 0;
    cp_async_4(st + kScaleOff + lane * 4, (lane < kTileKeys ? a.q.k_scales : a.q.v_scales) + idx,
               valid);
  };
  // O^T fragments in units of u: m-tile i, rows g / g + 8 = dims 16i + 2g / 16i + 2g + 1,
  // columns = heads 2t, 2t+1.
  float o[KS][4];
#pragma unroll
  for (int mt = 0; mt < KS; ++mt) o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.f;
  float m0 = kNegInf, m1 = kNegInf;
  float l0 = 0.f, l1 = 0.f;
  float u = 0.f;  // the unit of o: the last tile's largest v_scale (0 before any)

  auto compute_tile = [&](int n, int stage) {
    const unsigned char* st = ring + stage * kStage;
    const float* sc = reinterpret_cast<const float*>(st + kScaleOff);
    // ldmatrix row addresses: lanes 0-15 rows (keys) 0-15 of segment s, lanes 16-31 of s + 1.
    const unsigned char* k_rows = st + (lane % 16) * kPitch + (lane / 16) * 16;
    const unsigned char* v_rows = k_rows + kTileKeys * kPitch;
    // Two accumulator chains (even / odd segments) halve the dependent-MMA latency.
    float sa[4] = {0.f, 0.f, 0.f, 0.f};
    float sb[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int seg = 0; seg < KS; seg += 2) {
      // r[0] / r[1]: keys g / g + 8, dims 16 seg + 4t .. + 3; r[2], r[3]: segment seg + 1.
      uint32_t r[4];
      if (seg + 1 < KS)
        ldmatrix_x4(r, k_rows + seg * 16);
      else
        ldmatrix_x2(r, k_rows + seg * 16);
      uint32_t kf[4];  // A fragment: {key g, key g + 8} x {cols 2t.., cols 2t+8..}
      kvq::to_half4<Q>(r[0], kf[0], kf[2]);
      kvq::to_half4<Q>(r[1], kf[1], kf[3]);
      mma_f16(sa, kf, qf[seg][0], qf[seg][1]);
      if (seg + 1 < KS) {
        kvq::to_half4<Q>(r[2], kf[0], kf[2]);
        kvq::to_half4<Q>(r[3], kf[1], kf[3]);
        mma_f16(sb, kf, qf[seg + 1][0], qf[seg + 1][1]);
      }
    }
    // s[0], s[1]: key g, heads 2t, 2t+1; s[2], s[3]: key g + 8.
    const int key_a = tile_key(n) + g;
    const int key_b = key_a + 8;
    const bool va = key_a >= span.lo && key_a < key_end;
    const bool vb = key_b >= span.lo && key_b < key_end;
    const float ksa = sc[g], ksb = sc[g + 8];
    const float vsa = sc[kTileKeys + g], vsb = sc[kTileKeys + g + 8];
    float s[4];
    s[0] = va ? score_of(a, (sa[0] + sb[0]) * (ksa * qinv0)) : kNegInf;
    s[1] = va ? score_of(a, (sa[1] + sb[1]) * (ksa * qinv1)) : kNegInf;
    s[2] = vb ? score_of(a, (sa[2] + sb[2]) * (ksb * qinv0)) : kNegInf;
    s[3] = vb ? score_of(a, (sa[3] + sb[3]) * (ksb * qinv1)) : kNegInf;

    float mx0 = fmaxf(s[0], s[2]);
    float mx1 = fmaxf(s[1], s[3]);
    float vmax = fmaxf(vsa, vsb);  // invalid keys' scales are zero-filled
#pragma unroll
    for (int off = 4; off < 32; off *= 2) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
      vmax = fmaxf(vmax, __shfl_xor_sync(0xffffffffu, vmax, off));
    }
    const float mn0 = fmaxf(m0, mx0);
    const float mn1 = fmaxf(m1, mx1);
    const float mu0 = mn0 == kNegInf ? 0.f : mn0;
    const float mu1 = mn1 == kNegInf ? 0.f : mn1;
    const float alpha0 = exp2f(m0 - mu0);
    const float alpha1 = exp2f(m1 - mu1);
    m0 = mn0;
    m1 = mn1;
    const float p0 = exp2f(s[0] - mu0);
    const float p1 = exp2f(s[1] - mu1);
    const float p2 = exp2f(s[2] - mu0);
    const float p3 = exp2f(s[3] - mu1);
    l0 = l0 * alpha0 + p0 + p2;
    l1 = l1 * alpha1 + p1 + p3;
    // O moves to the unit of this tile (a tile of all-zero V rows keeps the old one: it adds
    // nothing); P' = P * v_scale / u stays in [0, 1], where fp16 holds it well.
    const bool rescale = vmax > 0.f;
    const float inv_u = rescale ? 1.f / vmax : 0.f;
    const float ratio = rescale ? u * inv_u : 1.f;
    u = rescale ? vmax : u;
    const float fa = vsa * inv_u;
    const float fb = vsb * inv_u;
    const uint32_t pb0 = transpose_8x8(pack_half2(p0 * fa, p1 * fa));
    const uint32_t pb1 = transpose_8x8(pack_half2(p2 * fb, p3 * fb));
    const float c0 = alpha0 * ratio;
    const float c1 = alpha1 * ratio;
#pragma unroll
    for (int mt = 0; mt < KS; ++mt) {
      o[mt][0] *= c0;
      o[mt][1] *= c1;
      o[mt][2] *= c0;
      o[mt][3] *= c1;
    }
#pragma unroll
    for (int seg = 0; seg < KS; seg += 2) {
      // r[0] / r[1]: bytes (key 2t, dim 2g), (2t, 2g+1), (2t+1, 2g), (2t+1, 2g+1) of keys 0-7 /
      // 8-15 in segment seg; r[2], r[3]: segment seg + 1. The permute pairs the two keys of
      // each dim: {dim 2g: keys 2t, 2t+1} -> output row g, {dim 2g+1} -> row g + 8.
      uint32_t r[4];
      if (seg + 1 < KS)
        ldmatrix_x4_trans(r, v_rows + seg * 16);
      else
        ldmatrix_x2_trans(r, v_rows + seg * 16);
      uint32_t vf[4];  // A fragment: {row g, row g + 8} x {keys 2t.., keys 2t+8..}
      kvq::to_half4<Q>(__byte_perm(r[0], 0, 0x3120), vf[0], vf[1]);
      kvq::to_half4<Q>(__byte_perm(r[1], 0, 0x3120), vf[2], vf[3]);
      mma_f16(o[seg], vf, pb0, pb1);
      if (seg + 1 < KS) {
        kvq::to_half4<Q>(__byte_perm(r[2], 0, 0x3120), vf[0], vf[1]);
        kvq::to_half4<Q>(__byte_perm(r[3], 0, 0x3120), vf[2], vf[3]);
        mma_f16(o[seg + 1], vf, pb0, pb1);
      }
    }
  };

  // The ring: raw tile n in stage n % stages, `stages - 1` tiles in flight while one is used;
  // one commit group per tile (empty past the end) keeps wait_group's count exact.
  const int stages = a.stages;
  int block = tile_block(0);
  for (int n = 0; n < stages - 1; ++n) {
    const int next = tile_block(n + 1);
    if (n < my_tiles) load_tile(n, n, block);
    cp_async_commit();
    block = next;
  }
  for (int n = 0; n < my_tiles; ++n) {
    const int fill = n + stages - 1;
    const int next = tile_block(fill + 1);
    if (fill < my_tiles) load_tile(fill, fill % stages, block);
    cp_async_commit();
    block = next;
    if (stages == 3)
      cp_async_wait<2>();
    else
      cp_async_wait<1>();
    __syncwarp();  // every lane's copies of tile n have landed
    compute_tile(n, n % stages);
    __syncwarp();  // every lane is done reading the stage the next fill overwrites
  }
  cp_async_wait<0>();

#pragma unroll
  for (int off = 4; off < 32; off *= 2) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }
  __syncthreads();  // all rings drained: the merge buffer reuses their shared memory
  float* wo = reinterpret_cast<float*>(smem);
  float* mine = wo + warp * kMaxRows * D;
#pragma unroll
  for (int mt = 0; mt < KS; ++mt) {
    const int d = mt * 16 + 2 * g;
    mine[(2 * t) * D + d] = o[mt][0] * u;
    mine[(2 * t + 1) * D + d] = o[mt][1] * u;
    mine[(2 * t) * D + d + 1] = o[mt][2] * u;
    mine[(2 * t + 1) * D + d + 1] = o[mt][3] * u;
  }
  if (g == 0) {
    warp_m[warp][2 * t] = m0;
    warp_m[warp][2 * t + 1] = m1;
    warp_l[warp][2 * t] = l0;
    warp_l[warp][2 * t + 1] = l1;
  }
  __syncthreads();
  finish_partition<T, D>(wo, warp_m, warp_l, rows, a, seq, head0, part, span.parts == 1);
}

// Grid (num_seqs, num_heads): merges the partitions of sequences that have more than one.
template <typename T, int D>
__global__ void __launch_bounds__(kReduceThreads) qdecode_reduce_kernel(const QDecodeArgs a) {
  constexpr int NI = (D + kReduceThreads - 1) / kReduceThreads;
  const PagedAttentionCudaParams& p = a.p;
  const int seq = blockIdx.x;
  const int head = blockIdx.y;
  const int parts = seq_span(a, seq).parts;
  if (parts <= 1) return;
  const int64_t first = part_row(a, seq, head, 0);
  const int64_t total = int64_t{p.num_seqs} * p.num_heads * a.num_parts;
  const float* acc = p.workspace + first * D;
  const float* ml = p.workspace + total * D + first * 2;

  float m = kNegInf;
  for (int i = 0; i < parts; ++i) m = fmaxf(m, ml[2 * i]);
  const float mu = m == kNegInf ? 0.f : m;
  float l = 0.f;
  float o[NI];
#pragma unroll
  for (int j = 0; j < NI; ++j) o[j] = 0.f;
  for (int i = 0; i < parts; ++i) {
    const float w = exp2f(ml[2 * i] - mu);
    l += ml[2 * i + 1] * w;
#pragma unroll
    for (int j = 0; j < NI; ++j) {
      const int d = threadIdx.x + j * kReduceThreads;
      if (d < D) o[j] += w * acc[int64_t{i} * D + d];
    }
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;
  T* out = static_cast<T*>(p.out) + int64_t{seq} * p.out_stride_token +
           int64_t{head} * p.out_stride_head;
#pragma unroll
  for (int j = 0; j < NI; ++j) {
    const int d = threadIdx.x + j * kReduceThreads;
    if (d < D) out[d] = from_f32<T>(o[j] * inv);
  }
}

// ---- launch -----------------------------------------------------------------------------------

// Raises a kernel's dynamic shared-memory limit once per device and size, so later launches
// (graph capture included) make no driver call for it.
template <auto kKernel>
void allow_dynamic_smem(size_t bytes) {
  constexpr int kMaxDevices = 64;
  static std::atomic<size_t> allowed[kMaxDevices];
  const int device = c10::cuda::current_device();
  if (device < kMaxDevices && allowed[device].load(std::memory_order_relaxed) >= bytes) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  if (device < kMaxDevices) allowed[device].store(bytes, std::memory_order_relaxed);
}

template <typename T, int D, KVCacheQuant Q, bool kAligned>
void launch_kernel(const QDecodeArgs& a, const QDecodePlan& pl, const dim3 grid,
                   cudaStream_t stream) {
  allow_dynamic_smem<qdecode_kernel<T, D, Q, kAligned>>(pl.smem);
  qdecode_kernel<T, D, Q, kAligned><<<grid, kThreads, pl.smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Instantiations: {bf16, fp16} x 5 head sizes x {int8, e4m3} x {aligned, any} block size, and
// the reduce for {bf16, fp16} x 5 head sizes.
template <typename T, int D>
void launch_for(const QDecodeArgs& a, const QDecodePlan& pl, cudaStream_t stream) {
  const dim3 grid(a.p.num_seqs * a.p.num_kv_heads * pl.head_tiles, pl.num_parts);
  const bool aligned = a.p.block_size % kTileKeys == 0;
  if (a.q.kind == KVCacheQuant::kInt8) {
    if (aligned)
      launch_kernel<T, D, KVCacheQuant::kInt8, true>(a, pl, grid, stream);
    else
      launch_kernel<T, D, KVCacheQuant::kInt8, false>(a, pl, grid, stream);
  } else {
    if (aligned)
      launch_kernel<T, D, KVCacheQuant::kFp8E4M3, true>(a, pl, grid, stream);
    else
      launch_kernel<T, D, KVCacheQuant::kFp8E4M3, false>(a, pl, grid, stream);
  }
  if (pl.num_parts > 1) {
    qdecode_reduce_kernel<T, D>
        <<<dim3(a.p.num_seqs, a.p.num_heads), kReduceThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void launch_typed(const QDecodeArgs& a, const QDecodePlan& pl, cudaStream_t stream) {
  switch (a.p.head_size) {
    case 64:
      return launch_for<T, 64>(a, pl, stream);
    case 80:
      return launch_for<T, 80>(a, pl, stream);
    case 96:
      return launch_for<T, 96>(a, pl, stream);
    case 128:
      return launch_for<T, 128>(a, pl, stream);
    case 256:
      return launch_for<T, 256>(a, pl, stream);
  }
  TORCH_CHECK(false, "paged_attention_decode: head_size ", a.p.head_size,
              " has no CUDA kernel for a quantized cache");
}

}  // namespace

int64_t quant_decode_workspace_floats(const PagedAttentionCudaParams& p) {
  if (p.num_seqs == 0 || p.dtype == AttnDType::kF32) return 0;  // fp32: the SIMT kernel
  return workspace_floats(p, plan(p));
}

void launch_paged_attention_decode_quant(const PagedAttentionCudaParams& p,
                                         const QuantKVParams& q, cudaStream_t stream) {
  if (p.num_seqs == 0) return;
  // fp32 queries keep fp32 accuracy through the SIMT kernel (one query token per sequence).
  if (p.dtype == AttnDType::kF32) return launch_paged_attention_prefill_quant(p, q, stream);
  TORCH_CHECK(p.max_blocks_per_seq >= 1 && p.block_size >= 1,
              "paged_attention_decode: the block table has no room for any key");
  TORCH_CHECK(p.num_kv_heads >= 1 && p.num_heads % p.num_kv_heads == 0 && p.num_heads <= 65535,
              "paged_attention_decode: unsupported head counts ", p.num_heads, " / ",
              p.num_kv_heads);
  const QDecodePlan pl = plan(p);
  TORCH_CHECK(int64_t{p.num_seqs} * p.num_kv_heads * pl.head_tiles <=
                  std::numeric_limits<int32_t>::max(),
              "paged_attention_decode: too many sequences x KV heads for one grid: ", p.num_seqs,
              " x ", p.num_kv_heads);
  const int64_t need = workspace_floats(p, pl);
  TORCH_CHECK(need == 0 || (p.workspace != nullptr && p.workspace_floats >= need),
              "paged_attention_decode: workspace of ", p.workspace_floats, " floats, need ", need);
  QDecodeArgs a{};
  a.p = p;
  a.q = q;
  a.group = pl.group;
  a.head_tiles = pl.head_tiles;
  a.part_keys = pl.part_keys;
  a.num_parts = pl.num_parts;
  a.max_ctx = pl.max_ctx;
  a.stages = pl.stages;
  if (p.soft_cap > 0.f) {
    a.score_scale = p.scale / p.soft_cap;
    a.cap_log2 = p.soft_cap * kLog2e;
  } else {
    a.score_scale = p.scale * kLog2e;
    a.cap_log2 = 0.f;
  }
  if (p.dtype == AttnDType::kF16) return launch_typed<__half>(a, pl, stream);
  return launch_typed<__nv_bfloat16>(a, pl, stream);
}

}  // namespace sagellm::cuda
