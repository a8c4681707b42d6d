// The small per-position steps between a decoding step's matrix products, each one pass over
// rows that are already in cache, for fp32 inference (qkv/layers.py and qkv/packed.py use them
// through qkv/native.py):
//   add_layer_norm: a post-LN layer's skip connection and layer norm, norm(x + y), where
//     PyTorch's ops took two calls and three passes (add; the norm's statistics; its output);
//   activate_: the feed-forward's activation in place after MKL's product: GELU (the erf form)
//     or SiLU, as plain expressions the compiler vectorizes (PyTorch's gelu_ goes through
//     oneDNN's eltwise primitive, whose fixed cost per call is most of a decoding step's).
// At decoding's shapes (32-160 rows of 256-1,024 values) each call's fixed cost outweighs its
// arithmetic, so one call instead of two, and no dispatch through ATen, is most of the gain
// (bench/pointwise_speed.py).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "fast_exp.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

namespace {

// Rows per parallel task: below this many values a second thread costs more than it saves.
constexpr int64_t kGrainValues = 1 << 15;

int64_t grain(int64_t width) { return std::max<int64_t>(1, kGrainValues / std::max<int64_t>(width, 1)); }

// erf by Abramowitz and Stegun's formula 7.1.26 (absolute error below 1.5e-7):
//   erf(a) = 1 - (a1 t + a2 t^2 + a3 t^3 + a4 t^4 + a5 t^5) e^{-a^2}, t = 1 / (1 + p a), a >= 0,
// and erf(-a) = -erf(a). PyTorch's vectorized erf uses the same formula, so the two agree to
// a few ulp.
inline float erf_as(float x) {
  const float a = std::fabs(x);
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  const float poly =
      t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f +
                                                                       t * 1.061405429f))));
  const float e = 1.0f - poly * qkv::exp_nonpositive(-a * a);
  return x < 0.0f ? -e : e;
}

inline float gelu(float x) { return 0.5f * x * (1.0f + erf_as(x * 0.70710678118654752f)); }

// x sigmoid(x), with e^{-|x|} so the exponential never overflows.
inline float silu(float x) {
  const float e = qkv::exp_nonpositive(-std::fabs(x));
  const float sigmoid = x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
  return x * sigmoid;
}

template <float (*F)(float)>
void apply(float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = F(x[i]);
}

}  // namespace

// x: fp32, contiguous, any shape. kind: "gelu" or "silu" (relu is one cheap pass in PyTorch).
void activate_(torch::Tensor& x, const std::string& kind) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "activate_: fp32, contiguous");
  TORCH_CHECK(kind == "gelu" || kind == "silu", "activate_: gelu or silu, not ", kind);
  float* data = x.data_ptr<float>();
  const bool is_gelu = kind == "gelu";
  at::parallel_for(0, x.numel(), kGrainValues, [&](int64_t begin, int64_t end) {
    if (is_gelu) {
      apply<gelu>(data + begin, end - begin);
    } else {
      apply<silu>(data + begin, end - begin);
    }
  });
}

// x, y: (..., D) alike, fp32, any strides; weight (D); bias (D) or empty. Returns norm(x + y),
// shaped as x: each row's mean and variance (the biased one, as LayerNorm's) of x + y, the row
// normalised, scaled by weight and shifted by bias. (The shapes are handled here, not in
// Python, where a reshape and a view cost a few microseconds a call.)
torch::Tensor add_layer_norm(const torch::Tensor& x_in, const torch::Tensor& y_in,
                             const torch::Tensor& weight, const torch::Tensor& bias, double eps) {
  TORCH_CHECK(x_in.dim() >= 1 && x_in.sizes() == y_in.sizes(), "add_layer_norm: x, y alike");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && y_in.scalar_type() == at::kFloat &&
                  weight.scalar_type() == at::kFloat,
              "add_layer_norm: fp32");
  const int64_t d = x_in.size(-1);
  // rows of contiguous values: views where the strides allow, else copies
  const auto x = x_in.reshape({-1, d}).contiguous();
  const auto y = y_in.reshape({-1, d}).contiguous();
  const int64_t n = x.size(0);
  TORCH_CHECK(weight.numel() == d && weight.is_contiguous(), "add_layer_norm: weight (D)");
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.numel() == d && bias.is_contiguous() &&
                            bias.scalar_type() == at::kFloat),
              "add_layer_norm: bias (D) or none");
  auto out = torch::empty(x_in.sizes(), x.options());
  const float* xs = x.data_ptr<float>();
  const float* ys = y.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  const float* b = has_bias ? bias.data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  const int64_t x_stride = x.stride(0), y_stride = y.stride(0);
  const float inv_d = 1.0f / static_cast<float>(d), epsilon = static_cast<float>(eps);
  at::parallel_for(0, n, grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xs + r * x_stride;
      const float* yr = ys + r * y_stride;
      float* orow = o + r * d;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < d; ++j) {
        orow[j] = xr[j] + yr[j];
        sum += orow[j];
      }
      const float mean = sum * inv_d;
      float squares = 0.0f;  // about the mean, not E[v^2] - mean^2, which cancels
#pragma omp simd reduction(+ : squares)
      for (int64_t j = 0; j < d; ++j) {
        const float c = orow[j] - mean;
        squares += c * c;
      }
      const float rstd = 1.0f / std::sqrt(squares * inv_d + epsilon);
      if (b != nullptr) {
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) orow[j] = (orow[j] - mean) * rstd * w[j] + b[j];
      } else {
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) orow[j] = (orow[j] - mean) * rstd * w[j];
      }
    }
  });
  return out;
}
