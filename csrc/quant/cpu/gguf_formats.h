// GGUF (ggml) block-quantized weight formats, byte for byte as a .gguf file stores them.
//
// A weight row of K elements is K / kElems consecutive blocks; a block holds fp16 scale(s), then
// packed integers. The structs below document each layout (and pin it with static_asserts); the
// kernels read fields by byte offset with memcpy, because a row handed over from a file mapping
// need not be aligned for a uint16_t.
//
// Value of element i of a block (q: the unsigned packed integer; d, m: fp16 fields):
//   Q4_0  d * (q - 8)          q: 4 bits            Q4_1  d * q + m
//   Q5_0  d * (q - 16)         q: 4 + 1 bits        Q5_1  d * q + m
//   Q8_0  d * q                q: int8
//   Q4_K  d * sc[j] * q - dmin * mn[j]   256 elements = 8 sub-blocks j of 32, 6-bit sc and mn
//   Q5_K  as Q4_K with 5-bit q
//   Q6_K  d * sc[s] * (q - 32)           256 elements = 16 sub-blocks s of 16, int8 sc, 6-bit q
// Plain C++ (no torch, no intrinsics): shared by the ISA kernel files and the entry file.
#pragma once

#include <cstddef>
#include <cstdint>

namespace sagellm::cpu::gguf {

// ggml type ids (ggml.h `enum ggml_type`), the numbers a GGUF tensor header carries.
enum Type : int {
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
};

struct BlockQ4_0 {
  uint16_t d;
  uint8_t qs[16];  // element i < 16: low nibble of qs[i]; element 16 + i: high nibble
};
struct BlockQ4_1 {
  uint16_t d, m;
  uint8_t qs[16];
};
struct BlockQ5_0 {
  uint16_t d;
  uint8_t qh[4];  // bit i (little-endian uint32) = bit 4 of element i
  uint8_t qs[16];
};
struct BlockQ5_1 {
  uint16_t d, m;
  uint8_t qh[4];
  uint8_t qs[16];
};
struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[32];
};
// sc[j], mn[j] (6 bits each) packed into 12 bytes: for j < 4, sc = scales[j] & 63 and
// mn = scales[j + 4] & 63; for j >= 4, the low 4 bits come from scales[j + 4] (sc: low nibble,
// mn: high nibble) and the top 2 bits from bits 6-7 of scales[j - 4] (sc) and scales[j] (mn).
struct BlockQ4_K {
  uint16_t d, dmin;
  uint8_t scales[12];
  uint8_t qs[128];  // 32-byte chunk c: low nibbles = sub-block 2c, high nibbles = sub-block 2c+1
};
struct BlockQ5_K {
  uint16_t d, dmin;
  uint8_t scales[12];
  uint8_t qh[32];  // bit j of qh[l] = bit 4 of element l of sub-block j
  uint8_t qs[128];
};
// Sub-block g (0..7) of 32: h = g / 4, k = g % 4. Element l: low 4 bits from
// ql[64 h + 32 (k % 2) + l] (low nibble if k < 2, else high), top 2 bits from
// qh[32 h + l] >> (2 k). Its two halves of 16 use scales[2 g] and scales[2 g + 1].
struct BlockQ6_K {
  uint8_t ql[128];
  uint8_t qh[64];
  int8_t scales[16];
  uint16_t d;
};

static_assert(sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20);
static_assert(sizeof(BlockQ5_0) == 22 && sizeof(BlockQ5_1) == 24);
static_assert(sizeof(BlockQ8_0) == 34);
static_assert(sizeof(BlockQ4_K) == 144 && sizeof(BlockQ5_K) == 176 && sizeof(BlockQ6_K) == 210);
static_assert(offsetof(BlockQ6_K, d) == 208);

struct FormatInfo {
  const char* name;
  int block_elems;
  int block_bytes;
};

// The layout of a supported type, or nullptr for any other id.
inline const FormatInfo* format_info(int64_t type) {
  static constexpr FormatInfo kQ4_0Info{"Q4_0", 32, sizeof(BlockQ4_0)};
  static constexpr FormatInfo kQ4_1Info{"Q4_1", 32, sizeof(BlockQ4_1)};
  static constexpr FormatInfo kQ5_0Info{"Q5_0", 32, sizeof(BlockQ5_0)};
  static constexpr FormatInfo kQ5_1Info{"Q5_1", 32, sizeof(BlockQ5_1)};
  static constexpr FormatInfo kQ8_0Info{"Q8_0", 32, sizeof(BlockQ8_0)};
  static constexpr FormatInfo kQ4_KInfo{"Q4_K", 256, sizeof(BlockQ4_K)};
  static constexpr FormatInfo kQ5_KInfo{"Q5_K", 256, sizeof(BlockQ5_K)};
  static constexpr FormatInfo kQ6_KInfo{"Q6_K", 256, sizeof(BlockQ6_K)};
  switch (type) {
    case kQ4_0:
      return &kQ4_0Info;
    case kQ4_1:
      return &kQ4_1Info;
    case kQ5_0:
      return &kQ5_0Info;
    case kQ5_1:
      return &kQ5_1Info;
    case kQ8_0:
      return &kQ8_0Info;
    case kQ4_K:
      return &kQ4_KInfo;
    case kQ5_K:
      return &kQ5_KInfo;
    case kQ6_K:
      return &kQ6_KInfo;
    default:
      return nullptr;
  }
}

// Activations are quantized per row into blocks of this many elements (every format's block
// or sub-block is a multiple of it).
constexpr int kActBlock = 32;

}  // namespace sagellm::cpu::gguf
