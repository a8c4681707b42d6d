// The label-smoothed cross-entropy of a chunk of scores and its gradient, in one kernel, for the
// fused output layer and loss of training (qkv/loss.py, LinearCrossEntropy).
//
// For each row of scores s (V of them) and its right token t, with lse = log sum_j e^{s_j}:
//   loss = lse - (1 - eps) s_t - eps / V sum_j s_j    (-sum_j q_j log p_j, q the smoothed target)
//   grad_j = e^{s_j - lse} - eps / V, and grad_t -= 1 - eps    (p - q)
// PyTorch's ops took six passes over each chunk for this (log_softmax's three, a sum, exp_,
// sub_), each a call; here a row is read twice (its largest; the sum of exponentials and of the
// scores) and the gradient written once, while the row is in cache. Scores and gradient are
// fp32 or bf16 (autocast's matmuls); the arithmetic is fp32, as autocast runs the softmax.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "fast_exp.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// bf16 <-> fp32 by their bits (bf16 is fp32's top half), plain expressions that vectorize:
// widening is exact, narrowing rounds to nearest even.
inline float widen(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}
inline uint16_t narrow(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}
inline float widen(float x) { return x; }
template <typename G>
inline G narrow_to(float x);
template <>
inline float narrow_to<float>(float x) { return x; }
template <>
inline uint16_t narrow_to<uint16_t>(float x) { return narrow(x); }

// S, G: float, or uint16_t for bf16's bits.
template <typename S, typename G>
void rows(const S* scores, int64_t stride, const int64_t* target, int64_t n, int64_t v, float eps,
          G* grad, int64_t g_stride, double* losses) {
  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
    // locals, not the closure's references: an fp32 store could alias those, which kept the
    // gradient's loop from vectorizing
    const float smooth = eps / static_cast<float>(v);
    std::vector<float> buffer(v);
    float* row = buffer.data();
    for (int64_t r = begin; r < end; ++r) {
      const S* s = scores + r * stride;
      float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < v; ++j) {
        row[j] = widen(s[j]);
        m = row[j] > m ? row[j] : m;
      }
      float total = 0.f, sum = 0.f;
#pragma omp simd reduction(+ : total, sum)
      for (int64_t j = 0; j < v; ++j) {
        total += qkv::exp_nonpositive(row[j] - m);
        sum += row[j];
      }
      const float lse = m + std::log(total);
      const int64_t t = target[r];
      losses[r] = static_cast<double>(lse) - (1.0 - eps) * row[t] - smooth * static_cast<double>(sum);
      if (grad == nullptr) continue;
      G* __restrict g = grad + r * g_stride;
      const float* __restrict in = row;
#pragma omp simd
      for (int64_t j = 0; j < v; ++j) {
        const float p = qkv::exp_nonpositive(in[j] - lse);
        g[j] = narrow_to<G>(p - smooth);
      }
      g[t] = narrow_to<G>(qkv::exp_nonpositive(in[t] - lse) - smooth - (1.f - eps));
    }
  });
}

template <typename S>
void dispatch_grad(const S* s, int64_t s_stride, const torch::Tensor& target, int64_t n, int64_t v,
                   float eps, const torch::Tensor& grad, double* losses) {
  const int64_t* t = target.data_ptr<int64_t>();
  if (!grad.defined() || grad.numel() == 0) {
    rows<S, float>(s, s_stride, t, n, v, eps, nullptr, 0, losses);
  } else if (grad.scalar_type() == at::kFloat) {
    rows<S, float>(s, s_stride, t, n, v, eps, grad.data_ptr<float>(), grad.stride(0), losses);
  } else {
    auto* g = reinterpret_cast<uint16_t*>(grad.data_ptr<at::BFloat16>());
    rows<S, uint16_t>(s, s_stride, t, n, v, eps, g, grad.stride(0), losses);
  }
}

}  // namespace

// scores (N, V) fp32 or bf16, rows contiguous; target (N,) long; grad (N, V) fp32 or bf16 or
// empty (no gradient), which may be `scores` itself. Returns the chunk's summed loss (fp64, the
// rows added in order, so the same whatever the thread count).
double smoothed_cross_entropy_rows(const torch::Tensor& scores, const torch::Tensor& target,
                                   double eps, const torch::Tensor& grad) {
  TORCH_CHECK(scores.dim() == 2 && scores.stride(1) == 1 &&
                  (scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kBFloat16),
              "scores: (N, V) fp32 or bf16 with contiguous rows");
  const int64_t n = scores.size(0), v = scores.size(1);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == n && target.scalar_type() == at::kLong &&
                  target.is_contiguous(),
              "target: (N,) long");
  const int64_t* t = target.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) TORCH_CHECK(t[r] >= 0 && t[r] < v, "target out of range");
  if (grad.defined() && grad.numel() > 0) {
    TORCH_CHECK(grad.dim() == 2 && grad.size(0) == n && grad.size(1) == v && grad.stride(1) == 1 &&
                    (grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kBFloat16),
                "grad: (N, V) fp32 or bf16 with contiguous rows");
  }
  std::vector<double> losses(n);
  const float e = static_cast<float>(eps);
  if (scores.scalar_type() == at::kFloat) {
    dispatch_grad(scores.data_ptr<float>(), scores.stride(0), target, n, v, e, grad, losses.data());
  } else {
    const auto* s = reinterpret_cast<const uint16_t*>(scores.data_ptr<at::BFloat16>());
    dispatch_grad(s, scores.stride(0), target, n, v, e, grad, losses.data());
  }
  double total = 0.0;
  for (double x : losses) total += x;
  return total;
}
