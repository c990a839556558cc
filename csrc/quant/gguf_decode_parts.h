// GGUF blocks (quant/cpu/gguf_formats.h) decoded eight elements at a time, on the host and on a
// CUDA device: one definition that the CUDA kernels (gguf_linear, gguf_dequantize) and the CPU
// gguf_dequantize all run, so the CPU tests check the arithmetic the GPU does.
//
// A block of kElems elements is kParts = kElems / 8 parts. decode(block, p, w, e0, e1) gives the
// fp32 values of part p in two runs of four consecutive elements, each run under one scale:
// w[0..3] = elements e0..e0+3 and w[4..7] = e1..e1+3 of the block. A part reads one 4-byte word
// of packed quants (plus its block's scales), so the runs follow the packing:
//   Q4_0 Q4_1 Q5_0 Q5_1 (4 parts): qs bytes 4p..4p+3; low nibbles e0 = 4p, high e1 = 16 + 4p.
//   Q8_0 (4 parts): the int8 quants 4p.. (e0 = 4p) and 16 + 4p.. (e1), like the nibble types.
//   Q4_K Q5_K (32 parts): 32-byte chunk c = p / 8 of qs, bytes l0 = 4 (p % 8)..: low nibbles are
//     sub-block 2c (e0 = 64c + l0), high nibbles sub-block 2c + 1 (e1 = e0 + 32).
//   Q6_K (32 parts): half h = p / 16, kk = p / 8 % 2, ql bytes 64h + 32kk + l0..: low nibbles are
//     sub-block 4h + kk (e0 = 128h + 32kk + l0), high nibbles sub-block 4h + kk + 2 (e1 = e0 + 64).
//
// Values are bit for bit those of the gguf package's dequantizer (gguf.quants): same fp32
// operations in the same order (scale * q, then + min), never fused into an FMA (the CUDA build
// uses --use_fast_math, which would contract them: __fmul_rn / __fadd_rn are never contracted).
// Small integers become floats exactly without a conversion instruction (the device's I2F runs at
// a quarter of the FMA rate): the float with bits 0x4B000000 | v is 2^23 + v for v < 2^23.
//
// Loads: kAlign is the alignment of the block's address the caller guarantees: 4 reads every
// 4-byte field with one 32-bit load, 2 with two 16-bit loads. The types whose block size is 2 mod
// 4 (Q4_0, Q5_0, Q8_0, Q6_K) only ever get 2, since their blocks alternate alignment in a row;
// every field offset used with kAlign = 4 is a multiple of 4.
#pragma once

#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "quant/cpu/gguf_formats.h"

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define SAGELLM_GGUF_HD __host__ __device__ __forceinline__
#define SAGELLM_GGUF_UNROLL _Pragma("unroll")
#else
#define SAGELLM_GGUF_HD inline
#define SAGELLM_GGUF_UNROLL _Pragma("GCC unroll 4")
#endif

namespace sagellm::gguf_parts {

using cpu::gguf::kQ4_0;
using cpu::gguf::kQ4_1;
using cpu::gguf::kQ4_K;
using cpu::gguf::kQ5_0;
using cpu::gguf::kQ5_1;
using cpu::gguf::kQ5_K;
using cpu::gguf::kQ6_K;
using cpu::gguf::kQ8_0;

SAGELLM_GGUF_HD uint32_t ld8(const uint8_t* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

SAGELLM_GGUF_HD uint32_t ld16(const uint8_t* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(reinterpret_cast<const unsigned short*>(p));
#else
  uint16_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
#endif
}

template <int kAlign>
SAGELLM_GGUF_HD uint32_t ld32(const uint8_t* p) {
#if defined(__CUDA_ARCH__)
  if constexpr (kAlign >= 4) {
    return __ldg(reinterpret_cast<const unsigned int*>(p));
  } else {
    return ld16(p) | (ld16(p + 2) << 16);
  }
#else
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
#endif
}

SAGELLM_GGUF_HD float half_at(const uint8_t* p) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(static_cast<unsigned short>(ld16(p))));
#else
  return static_cast<float>(c10::Half(static_cast<uint16_t>(ld16(p)), c10::Half::from_bits()));
#endif
}

SAGELLM_GGUF_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

SAGELLM_GGUF_HD float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

SAGELLM_GGUF_HD float add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// v < 2^23 as an exact float.
SAGELLM_GGUF_HD float int_value(uint32_t v) {
  return bits_to_float(0x4B000000u | v) - 8388608.0f;
}

// Byte j of v, minus kOffset, as an exact float.
template <int kOffset>
SAGELLM_GGUF_HD float byte_value(uint32_t v, int j) {
#if defined(__CUDA_ARCH__)
  // One PRMT: result bytes = (byte j of v, 0, 0, 0x4B), the zeros and 0x4B from the constant.
  const uint32_t bits = __byte_perm(v, 0x4B000000u, 0x7440u | static_cast<uint32_t>(j));
#else
  const uint32_t bits = 0x4B000000u | ((v >> (8 * j)) & 0xFFu);
#endif
  return bits_to_float(bits) - (8388608.0f + kOffset);
}

// Bits 0..3 of x moved to bit 4 of bytes 0..3 (the fifth bit of four Q5 quants).
SAGELLM_GGUF_HD uint32_t bit4_of_bytes(uint32_t x) {
  return ((x & 1u) << 4) | ((x & 2u) << 11) | ((x & 4u) << 18) | ((x & 8u) << 25);
}

// The eight values of one part: scale * (byte - kOffset) (+ min when kMin) for the four bytes of
// lo (elements e0..) and of hi (e1..), each run with its own scale and min.
template <int kOffset, bool kMin>
SAGELLM_GGUF_HD void scale_bytes(uint32_t lo, uint32_t hi, float s0, float m0, float s1, float m1,
                                 float (&w)[8]) {
  SAGELLM_GGUF_UNROLL
  for (int j = 0; j < 4; ++j) {
    const float a = mul(s0, byte_value<kOffset>(lo, j));
    const float b = mul(s1, byte_value<kOffset>(hi, j));
    w[j] = kMin ? add(a, m0) : a;
    w[4 + j] = kMin ? add(b, m1) : b;
  }
}

// Q4_0, Q4_1, Q5_0, Q5_1: d (fp16), [m (fp16)], [qh (4 bytes)], qs (16 bytes).
template <int kType>
struct Small {
  static constexpr bool kFive = kType == kQ5_0 || kType == kQ5_1;
  static constexpr bool kMin = kType == kQ4_1 || kType == kQ5_1;
  static constexpr int kOffset = kMin ? 0 : (kFive ? 16 : 8);
  static constexpr int kHead = kMin ? 4 : 2;
  static constexpr int kQs = kHead + (kFive ? 4 : 0);
  static constexpr int kElems = 32, kBytes = kQs + 16, kParts = 4;

  template <int kAlign>
  static SAGELLM_GGUF_HD void decode(const uint8_t* b, int p, float (&w)[8], int& e0, int& e1) {
    const float d = half_at(b);
    const float m = kMin ? half_at(b + 2) : 0.0f;
    const uint32_t qs = ld32<kAlign>(b + kQs + 4 * p);
    uint32_t lo = qs & 0x0F0F0F0Fu;
    uint32_t hi = (qs >> 4) & 0x0F0F0F0Fu;
    if constexpr (kFive) {
      const uint32_t qh = ld32<kAlign>(b + kHead);
      lo |= bit4_of_bytes(qh >> (4 * p));
      hi |= bit4_of_bytes(qh >> (16 + 4 * p));
    }
    scale_bytes<kOffset, kMin>(lo, hi, d, m, d, m, w);
    e0 = 4 * p;
    e1 = 16 + 4 * p;
  }
};

// Q8_0: d (fp16), 32 int8 quants. The bytes are made unsigned (x ^ 0x80 = x + 128) so that
// byte_value can read them, with 128 as the offset.
struct Q8_0 {
  static constexpr int kElems = 32, kBytes = 34, kParts = 4;

  template <int kAlign>
  static SAGELLM_GGUF_HD void decode(const uint8_t* b, int p, float (&w)[8], int& e0, int& e1) {
    const float d = half_at(b);
    const uint32_t lo = ld32<kAlign>(b + 2 + 4 * p) ^ 0x80808080u;
    const uint32_t hi = ld32<kAlign>(b + 18 + 4 * p) ^ 0x80808080u;
    scale_bytes<128, false>(lo, hi, d, 0.0f, d, 0.0f, w);
    e0 = 4 * p;
    e1 = 16 + 4 * p;
  }
};

// The 6-bit sc and mn of sub-blocks 2c and 2c + 1, from the 12 scale bytes at s (see
// BlockQ4_K). Unpacked four at a time: sc[0..3], sc[4..7], mn[0..3], mn[4..7] one byte each.
template <int kAlign>
SAGELLM_GGUF_HD void kquant_scale_min(const uint8_t* s, int c, uint32_t (&sc)[2],
                                      uint32_t (&mn)[2]) {
  const uint32_t u0 = ld32<kAlign>(s), u1 = ld32<kAlign>(s + 4), u2 = ld32<kAlign>(s + 8);
  const bool high = c >= 2;  // sub-blocks 4..7
  const uint32_t scw =
      high ? (u2 & 0x0F0F0F0Fu) | ((u0 >> 2) & 0x30303030u) : u0 & 0x3F3F3F3Fu;
  const uint32_t mnw =
      high ? ((u2 >> 4) & 0x0F0F0F0Fu) | ((u1 >> 2) & 0x30303030u) : u1 & 0x3F3F3F3Fu;
  const int shift = 16 * (c & 1);  // byte (2c) % 4
  sc[0] = (scw >> shift) & 0xFFu;
  sc[1] = (scw >> (shift + 8)) & 0xFFu;
  mn[0] = (mnw >> shift) & 0xFFu;
  mn[1] = (mnw >> (shift + 8)) & 0xFFu;
}

// Q4_K, Q5_K: d, dmin (fp16), 12 scale bytes, [qh (32 bytes)], qs (128 bytes). Sub-block j:
// value = (d * sc[j]) * q - dmin * mn[j].
template <bool kFive>
struct KQuant {
  static constexpr int kQs = kFive ? 48 : 16;
  static constexpr int kElems = 256, kBytes = kFive ? 176 : 144, kParts = 32;

  template <int kAlign>
  static SAGELLM_GGUF_HD void decode(const uint8_t* b, int p, float (&w)[8], int& e0, int& e1) {
    const int c = p >> 3, l0 = 4 * (p & 7);
    const float d = half_at(b), dmin = half_at(b + 2);
    uint32_t sc[2], mn[2];
    kquant_scale_min<kAlign>(b + 4, c, sc, mn);
    const uint32_t qs = ld32<kAlign>(b + kQs + 32 * c + l0);
    uint32_t lo = qs & 0x0F0F0F0Fu;
    uint32_t hi = (qs >> 4) & 0x0F0F0F0Fu;
    if constexpr (kFive) {
      // Bit j of qh[l] is bit 4 of element l of sub-block j.
      const uint32_t qh = ld32<kAlign>(b + 16 + l0);
      lo |= ((qh >> (2 * c)) & 0x01010101u) << 4;
      hi |= ((qh >> (2 * c + 1)) & 0x01010101u) << 4;
    }
    // d * sc and dmin * mn are exact (11 x 6 significant bits); the negated min is added.
    scale_bytes<0, true>(lo, hi, d * int_value(sc[0]), -(dmin * int_value(mn[0])),
                         d * int_value(sc[1]), -(dmin * int_value(mn[1])), w);
    e0 = 64 * c + l0;
    e1 = e0 + 32;
  }
};

// Q6_K: ql (128 bytes), qh (64 bytes), 16 int8 scales, d (fp16). Sub-block g, half s of 16:
// value = (d * scales[2g + s]) * (q - 32).
struct Q6_K {
  static constexpr int kElems = 256, kBytes = 210, kParts = 32;

  template <int kAlign>
  static SAGELLM_GGUF_HD void decode(const uint8_t* b, int p, float (&w)[8], int& e0, int& e1) {
    const int h = p >> 4, kk = (p >> 3) & 1, l0 = 4 * (p & 7);
    const float d = half_at(b + 208);
    const uint32_t ql = ld32<kAlign>(b + 64 * h + 32 * kk + l0);
    const uint32_t qh = ld32<kAlign>(b + 128 + 32 * h + l0);
    const uint32_t lo = (ql & 0x0F0F0F0Fu) | (((qh >> (2 * kk)) & 0x03030303u) << 4);
    const uint32_t hi = ((ql >> 4) & 0x0F0F0F0Fu) | (((qh >> (2 * kk + 4)) & 0x03030303u) << 4);
    const int g0 = 4 * h + kk, half = l0 >> 4;
    // int8 scales; d * scale is exact (11 x 8 significant bits).
    const float s0 = int_value(ld8(b + 192 + 2 * g0 + half) ^ 0x80u) - 128.0f;
    const float s1 = int_value(ld8(b + 192 + 2 * (g0 + 2) + half) ^ 0x80u) - 128.0f;
    scale_bytes<32, false>(lo, hi, d * s0, 0.0f, d * s1, 0.0f, w);
    e0 = 128 * h + 32 * kk + l0;
    e1 = e0 + 64;
  }
};

using Q4_0 = Small<kQ4_0>;
using Q4_1 = Small<kQ4_1>;
using Q5_0 = Small<kQ5_0>;
using Q5_1 = Small<kQ5_1>;
using Q4_K = KQuant<false>;
using Q5_K = KQuant<true>;

// Calls f(Format{}) with the decoder struct of qtype (one of the eight gguf_formats.h types;
// the callers have checked it); returns false for any other id.
template <class F>
bool visit_format(int64_t qtype, F&& f) {
  switch (qtype) {
    case kQ4_0:
      f(Q4_0{});
      return true;
    case kQ4_1:
      f(Q4_1{});
      return true;
    case kQ5_0:
      f(Q5_0{});
      return true;
    case kQ5_1:
      f(Q5_1{});
      return true;
    case kQ8_0:
      f(Q8_0{});
      return true;
    case kQ4_K:
      f(Q4_K{});
      return true;
    case kQ5_K:
      f(Q5_K{});
      return true;
    case kQ6_K:
      f(Q6_K{});
      return true;
    default:
      return false;
  }
}

}  // namespace sagellm::gguf_parts
