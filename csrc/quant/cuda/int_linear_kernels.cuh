// Weight-only int8 / int4 GEMM for decode-sized M on tensor cores (sm_80+: mma.sync only).
//
// out [M, N] = input [M, K] @ W^T, W streamed from global memory once, dequantized in registers.
// The WEIGHT is the A operand of mma.m16n8k16 (16 rows x 16 k) and the activations the B
// operand (16 k x 8 tokens), so up to 8 tokens cost one n8 tile and M = 64 eight.
//
// Layout trick (no repacking): with g = lane / 4, t = lane % 4, lane (g, t) holds A rows g and
// g + 8 and B column (token) g, both at the four logical k slots {2t, 2t+1, 2t+8, 2t+9}. Which
// physical k a slot stands for only has to depend on t (the same on the A and the B side), so
// lane t of a row reads the t-th 16-byte "piece" of each 64-byte "chunk" of the row (16 int8 or
// 32 int4 values) and the matching 8-value runs of activations; any order of the values inside
// a lane's piece is fine as long as weight and activation pairs are formed in the same order.
//   int8: word w of a piece = 4 values -> pairs (k0,k1), (k2,k3): one mma k-step per word.
//   int4: word w = 8 nibbles -> pairs (k0,k4), (k1,k5), (k2,k6), (k3,k7) (mask + exponent
//         bias, no shifts across halves): two mma k-steps per word; the activation pairs are
//         permuted to match with byte_perm.
// Dequantization: int8 -> exact integers (fp16: 0x64 exponent bias; bf16: through fp32 with
// 2^23 bias), the per-row scale applied to the fp32 accumulator at the end. int4 -> exact
// (q - z) by exponent bias, times the group scale in bf16/fp16 (a piece never straddles a group:
// 32 values, group sizes 32/64/128), so the accumulator needs no per-group rescaling.
//
// Grid: x = row blocks of 16 * MT * rw rows, y = split_k K-ranges, z = blocks of 8 * NT tokens.
// A warp owns MT m16 row tiles (2 or 4: see mt_for) so that every loaded
// activation fragment is used MT times. A CTA is 8 warps: rw warps along rows x kw warps along
// K (kw K-ranges of the CTA's split reduced through shared memory, one row tile at a time).
// split_k > 1 writes fp32 partial sums to a workspace [split_k, M, N] that a second kernel
// reduces (plain stores, deterministic, no memset).
// Bound: weight bytes (N * K or N * K / 2, + scales) at M <= 16; per lane 2 * MT rows x U chunks
// of 16 bytes are in flight (double-buffered), 8-16 warps per SM.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace sagellm::int_linear {

constexpr int kWarps = 8;       // warps per CTA
constexpr int kThreads = 32 * kWarps;
// Row tiles (m16) per warp: each loaded activation fragment feeds MT tiles. 4 only for int8
// at M <= 8 (int4's dequantized fragments of 4 tiles spill at 128 registers); 2 elsewhere.
// kMaxRowTiles = 1 restores the one-tile-per-warp kernel (fallback if the multi-tile one
// misbehaves).
constexpr int kMaxRowTiles = 4;
// One token tile (M <= 8) keeps one row tile per warp: on the H200 the one-tile kernel streamed
// int4 weights faster there (1.47-1.87x F.linear at M = 1) than two tiles (1.33-1.56x), and four
// int8 tiles reached only 0.82-1.10x; from two token tiles on, two row tiles win (M = 64: int4
// 0.31 -> 0.48x).
template <int NT, bool kInt4>
constexpr int mt_for() {
  return (NT == 1 ? 1 : 2) < kMaxRowTiles ? (NT == 1 ? 1 : 2) : kMaxRowTiles;
}
// Chunks per lane per batch (double-buffered: two batches live). With MT = 1: 2 while the
// accumulators are few, 1 for 32+ tokens. With MT >= 2 a batch already has 2 * MT loads in
// flight per lane, and its registers are needed.
template <int NT, int MT>
constexpr int unroll_for() {
  return MT >= 2 ? 1 : (NT >= 4 ? 1 : 2);
}
// Resident CTAs asked of ptxas: 2 (<= 128 registers) while that does not spill; 32+ tokens
// with several row tiles need more (checked with -Xptxas -v).
template <int NT, int MT>
constexpr int min_blocks_for() {
  return (MT >= 2 && NT >= 4) ? 1 : 2;
}

struct Params {
  const void* input;      // [M, K] T, rows ld_in elements apart, 16-byte aligned rows
  void* out;              // [M, N] T, rows ld_out elements apart
  float* partial;         // [split_k, M, N] fp32 when split_k > 1, else null
  const uint8_t* weight;  // [N, row_bytes]
  const float* scales;    // int8 [N]; int4 [N, groups]
  const uint8_t* zeros;   // int4 [N, groups] or null (= 8)
  const void* bias;       // [N] T or null
  int64_t ld_in;
  int64_t ld_out;
  int m, n;
  int row_bytes;          // K (int8) or K / 2 (int4), a multiple of 16
  int pieces;             // row_bytes / 16
  int groups;             // int4: K / group_size
  int group_shift;        // int4: log2(group_size / 32): piece p lies in group p >> group_shift
  int chunks_per_worker;  // chunks (4 pieces) per (split, warp-along-K) worker
  int rw, kw;             // warps along rows and along K (rw * kw == kWarps)
};

template <typename T>
struct Ops;

template <>
struct Ops<__half> {
  static constexpr uint32_t kNibbleBias = 0x64006400u;  // 1024.0: 0x64.. | q = 1024 + q
  static __device__ __forceinline__ uint32_t sub(uint32_t a, uint32_t b) {
    __half2 r = __hsub2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  static __device__ __forceinline__ uint32_t mul(uint32_t a, uint32_t b) {
    __half2 r = __hmul2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  static __device__ __forceinline__ uint32_t splat(float s) {
    __half2 r = __float2half2_rn(s);
    return *reinterpret_cast<uint32_t*>(&r);
  }
  // 4 signed bytes -> (b0, b1), (b2, b3) exactly: 1024 + (b + 128) by exponent bias, - 1152.
  static __device__ __forceinline__ void int8x4(uint32_t w, uint32_t& lo, uint32_t& hi) {
    const uint32_t u = w ^ 0x80808080u;
    lo = sub(__byte_perm(u, 0x64646464u, 0x4140), 0x64806480u);
    hi = sub(__byte_perm(u, 0x64646464u, 0x4342), 0x64806480u);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ float load(const void* p, int64_t i) {
    return __half2float(static_cast<const __half*>(p)[i]);
  }
  static __device__ __forceinline__ void store(void* p, int64_t i, float v) {
    static_cast<__half*>(p)[i] = __float2half_rn(v);
  }
};

template <>
struct Ops<__nv_bfloat16> {
  static constexpr uint32_t kNibbleBias = 0x43004300u;  // 128.0: 0x43.. | q = 128 + q (q < 128)
  static __device__ __forceinline__ uint32_t sub(uint32_t a, uint32_t b) {
    __nv_bfloat162 r = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&a),
                               *reinterpret_cast<__nv_bfloat162*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  static __device__ __forceinline__ uint32_t mul(uint32_t a, uint32_t b) {
    __nv_bfloat162 r = __hmul2(*reinterpret_cast<__nv_bfloat162*>(&a),
                               *reinterpret_cast<__nv_bfloat162*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  static __device__ __forceinline__ uint32_t splat(float s) {
    __nv_bfloat162 r = __float2bfloat162_rn(s);
    return *reinterpret_cast<uint32_t*>(&r);
  }
  // bf16 has 8 significant bits, too few for 2^k + (b + 128): go through fp32 (2^23 + u, minus
  // 2^23 + 128), whose upper halves are the exact bf16 values of the small integers.
  static __device__ __forceinline__ void int8x4(uint32_t w, uint32_t& lo, uint32_t& hi) {
    const uint32_t u = w ^ 0x80808080u;
    const float f0 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7440)) - 8388736.f;
    const float f1 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7441)) - 8388736.f;
    const float f2 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7442)) - 8388736.f;
    const float f3 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7443)) - 8388736.f;
    lo = __byte_perm(__float_as_uint(f0), __float_as_uint(f1), 0x7632);
    hi = __byte_perm(__float_as_uint(f2), __float_as_uint(f3), 0x7632);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ float load(const void* p, int64_t i) {
    return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
  static __device__ __forceinline__ void store(void* p, int64_t i, float v) {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  }
};

// 16 weight bytes, streamed: read once, so kept out of L1; the L2 fetches the row ahead. (Not
// volatile, like the mma below: pure functions of their operands, free to be scheduled.)
__device__ __forceinline__ uint4 load_stream(const uint8_t* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// 8 activations (16 bytes), shared by every warp of the CTA on the same K-range: through L1.
__device__ __forceinline__ uint4 load_act(const void* p) {
  return __ldg(static_cast<const uint4*>(p));
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// One batch of U chunks of a lane's 2 * MT weight rows (+ their int4 group scale and zero).
// Row r of a lane is row0 + 16 * (r / 2) + g + 8 * (r % 2): tile r / 2, A rows g / g + 8.
// int4 scales are kept already rounded to T (what the multiply uses), two rows per register,
// and the zeros as nibbles of one register, so two live batches fit without spilling.
template <int U, int R>
struct Batch {
  uint4 q[R][U];
  uint32_t s[(R + 1) / 2][U];  // row r: 16-bit half r % 2 of s[r / 2]
  uint32_t z[U];               // row r: bits 4r .. 4r + 3 (R <= 8)
};

template <typename T, bool kInt4, int U, int R>
__device__ __forceinline__ void load_batch(Batch<U, R>& b, const Params& p, int c, int c_end,
                                           int t, const int (&rows)[R]) {
  static_assert(R <= 8, "zeros are packed as 8 nibbles");
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int piece = 4 * (c + u) + t;
    const bool ok = c + u < c_end && piece < p.pieces;
    const int64_t off = static_cast<int64_t>(piece) * 16;
    if constexpr (kInt4) b.z[u] = 0;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const bool ok_r = ok && rows[r] < p.n;
      b.q[r][u] = ok_r ? load_stream(p.weight + rows[r] * static_cast<int64_t>(p.row_bytes) + off)
                       : make_uint4(0, 0, 0, 0);
      if constexpr (kInt4) {
        // A piece outside the matrix gets scale 0, so its (0 - z) * 0 adds nothing.
        const int grp = piece >> p.group_shift;
        const int64_t i = static_cast<int64_t>(rows[r]) * p.groups + grp;
        const uint32_t sp = Ops<T>::splat(ok_r ? __ldg(p.scales + i) : 0.f);  // (s, s)
        if (r % 2 == 0) {
          b.s[r / 2][u] = sp & 0xFFFFu;
        } else {
          b.s[r / 2][u] |= sp & 0xFFFF0000u;
        }
        const uint32_t z = (ok_r && p.zeros != nullptr) ? (__ldg(p.zeros + i) & 15u) : 8u;
        b.z[u] |= z << (4 * r);
      }
    }
  }
}

// The 8 activations of token `tok` at k = 8 * sub-piece `sub` of `piece` (zeros past M / K).
template <bool kInt4>
__device__ __forceinline__ uint4 activations(const Params& p, int tok, int piece, bool ok,
                                             int sub) {
  if (!ok || tok >= p.m) return make_uint4(0, 0, 0, 0);
  constexpr int kPerPiece = kInt4 ? 32 : 16;  // k values per weight piece
  const int64_t k = static_cast<int64_t>(piece) * kPerPiece + 8 * sub;
  // Element size 2 for fp16 and bf16.
  return load_act(static_cast<const char*>(p.input) + (tok * p.ld_in + k) * 2);
}

// Each activation (B) fragment is loaded once per k-step and used by all MT row tiles: at
// MT = 1 the B traffic through L1 was several times the weight traffic.
template <typename T, bool kInt4, int NT, int MT, int U>
__device__ __forceinline__ void compute_batch(float (&acc)[MT][NT][4],
                                              const Batch<U, 2 * MT>& b, const Params& p, int c,
                                              int c_end, int t, int tok0) {
  using O = Ops<T>;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int piece = 4 * (c + u) + t;
    const bool ok = c + u < c_end && piece < p.pieces;
    if constexpr (kInt4) {
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        // Tile mt's A fragments for word w: a[0..3] = pairs (k0,k4), (k1,k5), (k2,k6), (k3,k7)
        // of row g, a[4..7] the same of row g + 8; exact (q - z) times the T-rounded scale.
        auto dequant = [&](int mt, uint32_t (&a)[8]) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int r = 2 * mt + h;
            const uint32_t mz = O::kNibbleBias | (((b.z[u] >> (4 * r)) & 15u) * 0x00010001u);
            const uint32_t sc = __byte_perm(b.s[mt][u], 0, h == 0 ? 0x1010 : 0x3232);
            const uint32_t wr = word(b.q[r][u], w);
#pragma unroll
            for (int s = 0; s < 4; ++s)
              a[4 * h + s] =
                  O::mul(O::sub(((wr >> (4 * s)) & 0x000F000Fu) | O::kNibbleBias, mz), sc);
          }
        };
        auto b_frag = [&](int j, uint32_t (&x)[4]) {
          const uint4 v = activations<true>(p, tok0 + 8 * j, piece, ok, w);
          x[0] = __byte_perm(v.x, v.z, 0x5410);  // (k0, k4)
          x[1] = __byte_perm(v.x, v.z, 0x7632);  // (k1, k5)
          x[2] = __byte_perm(v.y, v.w, 0x5410);  // (k2, k6)
          x[3] = __byte_perm(v.y, v.w, 0x7632);  // (k3, k7)
        };
        auto mma2 = [&](float (&d)[4], const uint32_t (&a)[8], const uint32_t (&x)[4]) {
          O::mma(d, a[0], a[4], a[1], a[5], x[0], x[1]);
          O::mma(d, a[2], a[6], a[3], a[7], x[2], x[3]);
        };
        // Keep the smaller operand set live across the other loop: few tokens -> hold the B
        // fragments of all NT tiles, dequantize one row tile at a time; else the reverse.
        if constexpr (NT * 4 <= MT * 8) {
          uint32_t x[NT][4];
#pragma unroll
          for (int j = 0; j < NT; ++j) b_frag(j, x[j]);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            uint32_t a[8];
            dequant(mt, a);
#pragma unroll
            for (int j = 0; j < NT; ++j) mma2(acc[mt][j], a, x[j]);
          }
        } else {
          uint32_t a[MT][8];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) dequant(mt, a[mt]);
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            uint32_t x[4];
            b_frag(j, x);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) mma2(acc[mt][j], a[mt], x);
          }
        }
      }
    } else {
#pragma unroll
      for (int sub = 0; sub < 2; ++sub) {
        // d[r][0..1]: word 2 * sub of row r -> (lo, hi); d[r][2..3]: word 2 * sub + 1.
        uint32_t d[2 * MT][4];
#pragma unroll
        for (int r = 0; r < 2 * MT; ++r) {
          O::int8x4(word(b.q[r][u], 2 * sub), d[r][0], d[r][1]);
          O::int8x4(word(b.q[r][u], 2 * sub + 1), d[r][2], d[r][3]);
        }
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const uint4 x = activations<false>(p, tok0 + 8 * j, piece, ok, sub);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            O::mma(acc[mt][j], d[2 * mt][0], d[2 * mt + 1][0], d[2 * mt][1], d[2 * mt + 1][1],
                   x.x, x.y);
            O::mma(acc[mt][j], d[2 * mt][2], d[2 * mt + 1][2], d[2 * mt][3], d[2 * mt + 1][3],
                   x.z, x.w);
          }
        }
      }
    }
  }
}

template <typename T, bool kInt4, int NT, int MT>
__global__ void __launch_bounds__(kThreads, min_blocks_for<NT, MT>())
    int_linear_kernel(const Params p) {
  extern __shared__ float reduce_smem[];  // [(kw - 1) * rw][NT * 4][32], reused per row tile
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wr = warp % p.rw, wk = warp / p.rw;
  const int row0 = (blockIdx.x * p.rw + wr) * 16 * MT;
  int rows[2 * MT];
#pragma unroll
  for (int r = 0; r < 2 * MT; ++r) rows[r] = row0 + 16 * (r / 2) + g + 8 * (r % 2);
  const int tok_base = blockIdx.z * 8 * NT;
  const int tok0 = tok_base + g;  // this lane's B column in n-tile 0

  const int chunks = (p.pieces + 3) / 4;
  const int worker = blockIdx.y * p.kw + wk;
  const int c_begin = min(chunks, worker * p.chunks_per_worker);
  const int c_end = min(chunks, c_begin + p.chunks_per_worker);

  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[mt][j][0] = acc[mt][j][1] = acc[mt][j][2] = acc[mt][j][3] = 0.f;

  constexpr int U = unroll_for<NT, MT>();
  Batch<U, 2 * MT> cur, next;
  load_batch<T, kInt4>(cur, p, c_begin, c_end, t, rows);
  for (int c = c_begin; c < c_end; c += U) {
    // Issue the next batch's loads before this batch's math, so HBM reads stay in flight.
    if (c + U < c_end) load_batch<T, kInt4>(next, p, c + U, c_end, t, rows);
    compute_batch<T, kInt4, NT, MT>(acc, cur, p, c, c_end, t, tok0);
    cur = next;
  }

  if (p.kw > 1) {
    // One row tile at a time, so the shared memory stays that of MT = 1; every warp takes part
    // in every barrier, warps along K leave only after the last one.
    float* mine = reduce_smem + ((wk - 1) * p.rw + wr) * (NT * 4 * 32);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if (mt > 0) __syncthreads();  // warp 0 of the row has read the previous tile
      if (wk > 0) {
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) mine[(j * 4 + e) * 32 + lane] = acc[mt][j][e];
      }
      __syncthreads();
      if (wk == 0) {
        for (int o = 1; o < p.kw; ++o) {
          const float* theirs = reduce_smem + ((o - 1) * p.rw + wr) * (NT * 4 * 32);
#pragma unroll
          for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][j][e] += theirs[(j * 4 + e) * 32 + lane];
        }
      }
    }
    if (wk > 0) return;
  }

  // acc[mt][j][2h + e] = C[row 16 mt + g + 8h][token tok_base + 8j + 2t + e].
  const bool add_bias = p.bias != nullptr && p.partial == nullptr;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + 16 * mt + g + 8 * h;
      if (row >= p.n) continue;
      const float scale = kInt4 ? 1.f : __ldg(p.scales + row);
      const float bias = add_bias ? Ops<T>::load(p.bias, row) : 0.f;
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int tok = tok_base + 8 * j + 2 * t + e;
          if (tok >= p.m) continue;
          const float v = acc[mt][j][2 * h + e] * scale;
          if (p.partial != nullptr) {
            p.partial[(static_cast<int64_t>(blockIdx.y) * p.m + tok) * p.n + row] = v;
          } else {
            Ops<T>::store(p.out, tok * p.ld_out + row, v + bias);
          }
        }
    }
}

// out[m, n] = sum over splits of partial[s, m, n] (+ bias[n]).
template <typename T>
__global__ void split_k_reduce_kernel(const float* __restrict__ partial, int splits, int m, int n,
                                      const void* bias, void* out, int64_t ld_out) {
  const int64_t total = static_cast<int64_t>(m) * n;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int k = 0; k < splits; ++k) s += partial[k * total + i];
    const int64_t tok = i / n, row = i - tok * n;
    if (bias != nullptr) s += Ops<T>::load(bias, row);
    Ops<T>::store(out, tok * ld_out + row, s);
  }
}

}  // namespace sagellm::int_linear
