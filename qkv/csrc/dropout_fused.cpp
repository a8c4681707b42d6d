// Dropout fused with what comes before or after it in training (qkv/dropout.py), one pass each
// way, the mask never stored:
//   relu_dropout: the feed-forward's hidden units, relu(x) * mask. Its backward needs only the
//     output: where y > 0 the unit was positive and kept, so dx = dy * scale there, else 0.
//   add_dropout: the skip connection, x + y * mask. Its backward makes the mask again from the
//     seed (dropout_bits.h).
// PyTorch's route took three passes forward (relu, the mask, the product; or the mask, the
// product, the sum) and two back, and in bf16 its elementwise kernels convert with AVX2.
// The masks are dropout_mask's for the same seed and shape, and each product is rounded to the
// activations' dtype as PyTorch's route rounds it, so the two routes give identical results
// (tests/test_layers.py).
//
// Inputs contiguous, fp32 or bf16 (y and dy: the dtype of the sublayer's output; x and the sum:
// fp32). cut: an element is kept where its draw is >= cut; scale: a kept element's factor.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "bf16.h"
#include "dropout_bits.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

using qkv::kBlock;

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

// x rounded to T: identity for fp32; to nearest even for bf16, branch-free (NaN stays NaN) so
// the loops vectorize.
template <typename T>
inline T round_to(float x);

template <>
inline float round_to<float>(float x) {
  return x;
}

template <>
inline c10::BFloat16 round_to<c10::BFloat16>(float x) {
  return c10::BFloat16(qkv::bf16_bits(x), c10::BFloat16::from_bits());
}

// f(start, count, mask) over n elements, a block of kBlock at a time, blocks across threads.
template <typename F>
void by_blocks(int64_t n, uint64_t seed, uint32_t cut, float scale, const F& f) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 64, [&](int64_t begin, int64_t end) {
    float m[kBlock];
    for (int64_t b = begin; b < end; ++b) {
      qkv::block_draws(seed, b, cut, static_cast<float>(scale), m);
      f(b * kBlock, std::min(kBlock, n - b * kBlock), m);
    }
  });
}

void check(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_contiguous() && x.device().is_cpu(), name, ": contiguous CPU tensors");
}

}  // namespace

// relu(x) * mask, in x's dtype.
torch::Tensor relu_dropout(const torch::Tensor& x, int64_t cut, double scale, int64_t seed) {
  check(x, "relu_dropout");
  auto y = torch::empty_like(x);
  qkv::by_dtype(x.scalar_type(), [&](auto type) {
    using T = decltype(type);
    const T* in = x.data_ptr<T>();
    T* out = y.data_ptr<T>();
    by_blocks(x.numel(), seed, cut, scale, [&](int64_t start, int64_t n, const float* m) {
      const T* __restrict a = in + start;  // local pointers, so the loop vectorizes
      T* __restrict o = out + start;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const float v = to_float(a[i]);
        o[i] = round_to<T>((v < 0.f ? 0.f : v) * m[i]);
      }
    });
  }, "relu_dropout");
  return y;
}

// relu_dropout's backward from its output y: dy * scale where y > 0, else dy * 0.
torch::Tensor relu_dropout_backward(const torch::Tensor& dy, const torch::Tensor& y, double scale) {
  check(dy, "relu_dropout_backward");
  check(y, "relu_dropout_backward");
  TORCH_CHECK(dy.scalar_type() == y.scalar_type() && dy.numel() == y.numel(),
              "relu_dropout_backward: dy like y");
  auto dx = torch::empty_like(y);
  qkv::by_dtype(y.scalar_type(), [&](auto type) {
    using T = decltype(type);
    const T* g = dy.data_ptr<T>();
    const T* out = y.data_ptr<T>();
    T* d = dx.data_ptr<T>();
    const float s = static_cast<float>(scale);
    at::parallel_for(0, y.numel(), 1 << 14, [=](int64_t begin, int64_t end) {
      // local copies of the pointers and the scale, so the loop vectorizes
      const T* __restrict gi = g + begin;
      const T* __restrict yi = out + begin;
      T* __restrict di = d + begin;
      const float kept = s;
#pragma omp simd
      for (int64_t i = 0; i < end - begin; ++i) {
        const float factor = to_float(yi[i]) > 0.f ? kept : 0.f;  // no branch around the load
        di[i] = round_to<T>(to_float(gi[i]) * factor);
      }
    });
  }, "relu_dropout_backward");
  return dx;
}

// x + round(y * mask), fp32; x fp32, y fp32 or bf16 (the product rounded to y's dtype).
torch::Tensor add_dropout(const torch::Tensor& x, const torch::Tensor& y, int64_t cut,
                          double scale, int64_t seed) {
  check(x, "add_dropout");
  check(y, "add_dropout");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.sizes() == y.sizes(),
              "add_dropout: x fp32, y of x's shape");
  auto out = torch::empty_like(x);
  qkv::by_dtype(y.scalar_type(), [&](auto type) {
    using T = decltype(type);
    const float* a = x.data_ptr<float>();
    const T* b = y.data_ptr<T>();
    float* o = out.data_ptr<float>();
    by_blocks(x.numel(), seed, cut, scale, [&](int64_t start, int64_t n, const float* m) {
      const float* __restrict xs = a + start;  // local pointers, so the loops vectorize
      const T* __restrict ys = b + start;
      float* __restrict os = o + start;
      float dropped[kBlock];  // rounded before the sum, as PyTorch's two ops round (no FMA)
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dropped[i] = to_float(round_to<T>(to_float(ys[i]) * m[i]));
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) os[i] = xs[i] + dropped[i];
    });
  }, "add_dropout");
  return out;
}

// add_dropout's backward for y: round(round(dout) * mask) in `dtype` (y's), the mask made again.
torch::Tensor add_dropout_backward(const torch::Tensor& dout, int64_t cut, double scale,
                                   int64_t seed, at::ScalarType dtype) {
  check(dout, "add_dropout_backward");
  TORCH_CHECK(dout.scalar_type() == at::kFloat, "add_dropout_backward: dout fp32");
  auto dy = torch::empty(dout.sizes(), dout.options().dtype(dtype));
  qkv::by_dtype(dtype, [&](auto type) {
    using T = decltype(type);
    const float* g = dout.data_ptr<float>();
    T* d = dy.data_ptr<T>();
    by_blocks(dout.numel(), seed, cut, scale, [&](int64_t start, int64_t n, const float* m) {
      const float* __restrict gs = g + start;  // local pointers, so the loop vectorizes
      T* __restrict ds = d + start;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) ds[i] = round_to<T>(to_float(round_to<T>(gs[i])) * m[i]);
    });
  }, "add_dropout_backward");
  return dy;
}
