// e^x for x <= 0, as a plain expression the compiler vectorizes (std::exp is a call per value);
// shared by the softmax of decode_attention.cpp and the log-softmax of choose.cpp.
#pragma once

#include <cstdint>
#include <cmath>
#include <cstring>

namespace qkv {

// 2^n e^r with n = round(x log2 e) and |r| <= ln2 / 2, e^r by its Taylor series to r^7
// (relative error about 1e-7, as fp32's own rounding). Below -87 (e^-87 < 1e-37) it is 0; NaN
// stays NaN.
inline float exp_nonpositive(float x) {
  const float c = x < -87.0f ? -87.0f : x;
  const float n = std::floor(c * 1.44269504f + 0.5f);
  const float r = c - n * 0.693359375f + n * 2.12194440e-4f;  // ln 2 in two parts, exact first
  const float p =
      1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 +
                                                            r * (1.f / 720 + r * (1.f / 5040)))))));
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return x < -87.0f ? 0.f : p * two_n;
}

}  // namespace qkv
