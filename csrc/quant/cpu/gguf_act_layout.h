// Where the quantized activations live in the scratch (GgufActivations), per ISA: the contract
// between gguf_act_kernels.cpp, which writes them, and quant_kernels.cpp, which reads them.
// Included only by ISA kernel files.
//
// Input rows are grouped into panels: full panels of kMaxRows rows, then one panel for each
// size in the binary expansion of the remainder, largest first (m = 13 with kMaxRows = 8:
// panels of 8, 4, 1). The GEMM kernels process one panel per pass over a weight row, so a panel
// stores its rows interleaved unit by unit: all R rows' activations for the weight unit being
// unpacked are adjacent, reached from one pointer with constant offsets.
//   AVX-512 (unit = 64 elements = two blocks of 32; k padded to a multiple of 64 with zeros):
//     unit u of row p0 + i:  q     a.q    + ((p0 * U + u * R + i) * 64)   64 int8
//                            d     a.d    + ((p0 * U + u * R + i) * 16)   [d0 x 8, d1 x 8]
//                            corr  a.corr + ((p0 * U + u * R + i) * 16)   8 lanes per block
//     with U = ceil(k / 64); for split_halves types the halves of the two blocks are swapped
//     (q: [b0 0-15, b1 0-15, b0 16-31, b1 16-31], d and corr lanes alike).
//   AVX2 and scalar (unit = one block of 32; the scalar path has kMaxRows = 1, i.e. row-major):
//     block s of row p0 + i: q a.q + (p0 * nsub + s * R + i) * 32, d a.d + (p0 * nsub + s * R + i),
//                            corr a.corr + (p0 * nsub + s * R + i) * 8.
//   dsum, for every ISA: block s of row p0 + i at a.dsum + p0 * nsub + s * R + i (the min terms
//   of a weight row are summed for all R rows of a panel at once).
#pragma once

#include <cstdint>

#include "cpu/vec.h"
#include "quant/cpu/gguf_formats.h"
#include "quant/cpu/quant_kernels.h"

namespace sagellm::cpu::SAGELLM_ISA::act_layout {

// Activation rows one unpacked weight unit is used for: 8 accumulators + temporaries fit
// AVX-512's 32 vector registers, 4 fit AVX2's 16.
constexpr int kMaxRows = SAGELLM_ISA_LEVEL == 2 ? 8 : SAGELLM_ISA_LEVEL == 1 ? 4 : 1;
// Activation blocks per unit, and copies of each block's scale (one per dot-product lane on
// AVX-512, where a unit's 16 lanes are multiplied by [d0 x 8, d1 x 8] in one instruction).
constexpr int kUnitBlocks = SAGELLM_ISA_LEVEL == 2 ? 2 : 1;
constexpr int kScaleCopies = SAGELLM_ISA_LEVEL == 2 ? 8 : 1;

struct Panel {
  int64_t first;  // p0
  int rows;       // R
};

inline Panel panel_of(int64_t m, int64_t r) {
  const int64_t full = m / kMaxRows * kMaxRows;
  if (r < full) return {r / kMaxRows * kMaxRows, kMaxRows};
  int64_t p0 = full;
  for (int size = kMaxRows / 2; size > 1; size /= 2) {
    if ((m - full) & size) {
      if (r < p0 + size) return {p0, size};
      p0 += size;
    }
  }
  return {p0, 1};
}

inline int64_t units(int64_t k) { return (k / gguf::kActBlock + kUnitBlocks - 1) / kUnitBlocks; }

// Whether the AVX-512 kernel reads this type's units with the halves of its two blocks swapped:
// [block 0 elements 0-15, block 1 elements 0-15, block 0 16-31, block 1 16-31]. Q4_0, Q4_1,
// Q5_0 and Q5_1 store a block's elements 0-15 in the low nibbles and 16-31 in the high ones, so
// their two blocks' 16 bytes, loaded side by side, unpack into exactly that order with 256-bit
// operations and no lane shuffle; the inputs are stored to match.
inline bool split_halves(int qtype) {
  return SAGELLM_ISA_LEVEL == 2 && (qtype == gguf::kQ4_0 || qtype == gguf::kQ4_1 ||
                                    qtype == gguf::kQ5_0 || qtype == gguf::kQ5_1);
}

// Block s (of 32) of row r, by halves of 16 elements (4 dot-product lanes each).
struct Slot {
  int8_t* q[2];      // 16 values each
  int32_t* corr[2];  // 4 lanes each
  float* d[2];       // kHalfCopies copies of the block's scale each (AVX2, scalar: d[0] == d[1])
  float* dsum;       // 1 value
};
constexpr int kHalfCopies = SAGELLM_ISA_LEVEL == 2 ? 4 : 1;

inline Slot slot(const GgufActivations& a, int64_t m, int64_t k, int qtype, int64_t r, int64_t s) {
  const Panel pan = panel_of(m, r);
  const int64_t i = r - pan.first;
  const int64_t u = s / kUnitBlocks, h = s % kUnitBlocks;
  const int64_t idx = pan.first * units(k) + u * pan.rows + i;  // unit of this row
  int8_t* q = a.q + idx * 32 * kUnitBlocks;
  int32_t* c = a.corr + idx * 8 * kUnitBlocks;
  float* d = a.d + idx * kUnitBlocks * kScaleCopies;
  float* dsum = a.dsum + pan.first * (k / gguf::kActBlock) + s * pan.rows + i;
  if (split_halves(qtype)) {
    return {{q + 16 * h, q + 32 + 16 * h}, {c + 4 * h, c + 8 + 4 * h}, {d + 4 * h, d + 8 + 4 * h},
            dsum};
  }
  q += 32 * h;
  c += 8 * h;
  d += kScaleCopies * h;
  return {{q, q + 16}, {c, c + 4}, {d, d + kHalfCopies * (kUnitBlocks - 1)}, dsum};
}

// Whether the SIMD kernels subtract the offsets of Q4_0, Q5_0 and (AVX-512) Q8_0 through corr
// rather than the min term. corr costs no instruction (it is the dot product's start value) but
// 4 bytes per input element, which at m > 8 push a panel's inputs out of L1; the min term costs
// an fma per block (and, for a panel, a store). Measured on the dev machine (Zen 4, one core,
// Q8_0 1536 x 768 at m = 1): 45 us with corr, 55 us with the min term.
inline bool offsets_by_corr(int64_t m) { return m <= 8; }

// The offset the corr sums carry for `qtype` on this ISA's GEMM kernels (0: corr unused).
// Q6_K always uses it: its offset (32) applies per 16 elements under two different scales,
// which a per-block min term cannot express.
inline int corr_offset(int qtype, int64_t m) {
  if (SAGELLM_ISA_LEVEL == 0) return 0;  // the scalar kernel subtracts offsets while decoding
  if (qtype == gguf::kQ6_K) return 32;
  if (!offsets_by_corr(m)) return 0;
  switch (qtype) {
    case gguf::kQ4_0:
      return 8;
    case gguf::kQ5_0:
      return 16;
    case gguf::kQ8_0:
      return SAGELLM_ISA_LEVEL == 2 ? 128 : 0;  // AVX2 multiplies Q8_0 as |w| x sign(a, w)
    default:
      return 0;
  }
}

}  // namespace sagellm::cpu::SAGELLM_ISA::act_layout
