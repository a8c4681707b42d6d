// What the training kernels share about their two dtypes: bf16 to and from fp32 on raw bits,
// branch-free, so the loops that call them vectorize (c10::BFloat16's rounding has a branch for
// NaN), and a dispatch on fp32 or bf16.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

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

// Calls f(x) with x a float or a c10::BFloat16: the kernel's body for `type`, which must be one
// of the two (`what` names the kernel in the error otherwise).
template <typename F>
void by_dtype(c10::ScalarType type, const F& f, const char* what) {
  TORCH_CHECK(type == c10::kFloat || type == c10::kBFloat16, what, ": fp32 or bf16");
  if (type == c10::kFloat) {
    f(float{});
  } else {
    f(c10::BFloat16{});
  }
}

}  // namespace qkv
