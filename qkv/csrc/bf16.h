// bf16 to and from fp32 on raw bits, branch-free, so the loops that call them vectorize
// (c10::BFloat16's rounding has a branch for NaN). Shared by the training kernels.
#pragma once

#include <cstdint>
#include <cstring>

namespace qkv {

// x rounded to bf16's bits: to nearest, ties to even, as c10::BFloat16 rounds; NaN stays NaN.
inline uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
}

inline float bf16_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

}  // namespace qkv
