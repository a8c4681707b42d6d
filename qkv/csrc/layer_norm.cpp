// Layer norm for bf16 training (qkv/layers.py, a pre-LN skip connection under autocast): the
// residual stream x stays fp32, and the norm's output goes to a linear layer that reads bf16.
// Autocast runs layer norm in fp32 and the linear layer then casts its output to bf16: two
// passes and a fp32 tensor between them, and in the backward pass a cast of the bf16 gradient
// back to fp32 before the norm's backward. Here the norm writes bf16 and its backward reads bf16:
// the same arithmetic (fp32 statistics, the output rounded to bf16 once, as the cast rounds it),
// one pass each way.
//
// x (rows, D) fp32 contiguous; weight and bias (D) fp32. Forward: y bf16, and each row's mean
// and 1/std (fp32) for the backward pass. Backward: dx fp32, dweight and dbias fp32.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "bf16.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace {

using qkv::bf16_bits;
using qkv::bf16_float;

constexpr int64_t kGrainRows = 16;

// One row: y = (x - mean) / std * w + b in bf16; returns {mean, 1/std}. (A function of its own,
// its pointers its arguments, so the loops vectorize inside at::parallel_for's threads.)
inline std::pair<float, float> norm_row(const float* __restrict x, const float* __restrict w,
                                        const float* __restrict b, int64_t D, float eps,
                                        uint16_t* __restrict y) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < D; ++d) sum += x[d];
  const float mu = sum / D;
  float sq = 0.f;
#pragma omp simd reduction(+ : sq)
  for (int64_t d = 0; d < D; ++d) sq += (x[d] - mu) * (x[d] - mu);
  const float inv = 1.f / std::sqrt(sq / D + eps);
  if (b != nullptr) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) y[d] = bf16_bits((x[d] - mu) * inv * w[d] + b[d]);
  } else {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) y[d] = bf16_bits((x[d] - mu) * inv * w[d]);
  }
  return {mu, inv};
}

// One row's backward: dx, and its terms of dweight and dbias added to dw and db. g: scratch.
inline void norm_row_backward(const float* __restrict x, const uint16_t* __restrict dy,
                              const float* __restrict w, float mu, float inv, int64_t D,
                              float* __restrict dx, float* __restrict dw, float* __restrict db,
                              float* __restrict g) {
  float sum_g = 0.f, sum_gx = 0.f;  // sums of w * dy and of w * dy * xhat
#pragma omp simd reduction(+ : sum_g, sum_gx)
  for (int64_t d = 0; d < D; ++d) {
    const float gd = bf16_float(dy[d]);
    const float xhat = (x[d] - mu) * inv;
    dw[d] += gd * xhat;
    db[d] += gd;
    g[d] = gd * w[d];
    sum_g += g[d];
    sum_gx += g[d] * xhat;
  }
  const float mean_g = sum_g / D, mean_gx = sum_gx / D;
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) dx[d] = inv * (g[d] - mean_g - (x[d] - mu) * inv * mean_gx);
}

}  // namespace

std::vector<torch::Tensor> layer_norm_bf16(const torch::Tensor& x, const torch::Tensor& weight,
                                           const torch::Tensor& bias, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1,
              "layer_norm_bf16: x fp32 contiguous");
  const int64_t D = x.size(-1), rows = x.numel() / std::max<int64_t>(D, 1);
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == D,
              "layer_norm_bf16: weight fp32 (D)");
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.scalar_type() == at::kFloat && bias.numel() == D),
              "layer_norm_bf16: bias fp32 (D) or empty");
  auto y = torch::empty(x.sizes(), x.options().dtype(at::kBFloat16));
  auto mean = torch::empty({rows}, x.options());
  auto rstd = torch::empty({rows}, x.options());
  const float* px = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  const float* b = has_bias ? bias.data_ptr<float>() : nullptr;
  uint16_t* py = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  float* pm = mean.data_ptr<float>();
  float* pr = rstd.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const auto [mu, inv] = norm_row(px + r * D, w, b, D, e, py + r * D);
      pm[r] = mu, pr[r] = inv;
    }
  });
  return {y, mean, rstd};
}

// dy (rows, D) bf16 -> {dx fp32, dweight, dbias (empty without a bias)}.
std::vector<torch::Tensor> layer_norm_bf16_backward(const torch::Tensor& dy, const torch::Tensor& x,
                                                    const torch::Tensor& mean,
                                                    const torch::Tensor& rstd,
                                                    const torch::Tensor& weight, bool has_bias) {
  TORCH_CHECK(dy.scalar_type() == at::kBFloat16 && dy.is_contiguous() && dy.numel() == x.numel(),
              "layer_norm_bf16_backward: dy bf16 contiguous, like x");
  const int64_t D = x.size(-1), rows = x.numel() / std::max<int64_t>(D, 1);
  auto dx = torch::empty_like(x);
  const float* px = x.data_ptr<float>();
  const uint16_t* pg = reinterpret_cast<const uint16_t*>(dy.data_ptr<at::BFloat16>());
  const float* pm = mean.data_ptr<float>();
  const float* pr = rstd.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* pdx = dx.data_ptr<float>();
  // Each task's sums of dy * xhat and dy over its rows, added up at the end in task order.
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
  std::vector<float> partial(static_cast<size_t>(tasks * 2 * D), 0.f);
  const int64_t per_task = (rows + tasks - 1) / tasks;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> g(D);
    for (int64_t task = begin; task < end; ++task) {
      float* dw = partial.data() + task * 2 * D;
      float* db = dw + D;
      const int64_t first = task * per_task, last = std::min(rows, first + per_task);
      for (int64_t r = first; r < last; ++r)
        norm_row_backward(px + r * D, pg + r * D, w, pm[r], pr[r], D, pdx + r * D, dw, db, g.data());
    }
  });
  auto dweight = torch::zeros({D}, x.options());
  auto dbias = has_bias ? torch::zeros({D}, x.options()) : torch::empty({0}, x.options());
  float* pdw = dweight.data_ptr<float>();
  float* pdb = has_bias ? dbias.data_ptr<float>() : nullptr;
  for (int64_t task = 0; task < tasks; ++task) {
    const float* dw = partial.data() + task * 2 * D;
    for (int64_t d = 0; d < D; ++d) {
      pdw[d] += dw[d];
      if (pdb != nullptr) pdb[d] += dw[D + d];
    }
  }
  return {dx, dweight, dbias};
}
