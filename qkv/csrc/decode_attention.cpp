// Attention while decoding: each row's few new queries against that row's cached keys and
// values, softmax(q k^T / sqrt(Dh)) v, in one pass per (row, head).
//
// PyTorch's fused CPU kernel (scaled_dot_product_attention) calls a small matrix product for
// every (row, head): with one query over a few dozen keys those calls, not the arithmetic, are
// most of its time. Here each (row, head) is three short loops the compiler vectorizes over the
// head dimension, with the scores kept in a buffer the size of one row.
// qkv/native.py compiles this file on first use and calls it from qkv/attention.py.
//
// Shapes: q (B, H, T, Dh), k and v (B, H, S, Dh), any strides but a contiguous last dimension
// (the KV cache's buffers are longer than S); keep (Bk, 1, 1, S) bool, Bk = B or 1, or empty:
// which keys each row may attend to (attention's mask). table (B, S) long, or empty: k and v
// are a KVCache's stored rows (P, H, S, Dh) and row b's key s is k[table[b, s], :, s] (beam
// search reorders the table, not the keys). Out: (B, H, T, Dh), contiguous, fp32.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "fast_exp.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using qkv::exp_nonpositive;  // fast_exp.h: e^x of a score minus the row's largest

// One (row, head): T queries, S keys. D > 0: the head dimension known when compiling, so the
// loops over it unroll and the query and the sum stay in vector registers; D == 0: `dh` at run
// time, in the caller's buffers.
// Where one (row, head)'s keys and values lie: at k + s * k_step (a row of its own), or, read
// through a table, at keys[s] (computed by the caller).
struct Keys {
  const float* k;
  const float* v;
  int64_t k_step, v_step;
  const float* const* keys;
  const float* const* values;
};

template <bool TABLE>
inline const float* key_at(const Keys& kv, int64_t s) {
  return TABLE ? kv.keys[s] : kv.k + s * kv.k_step;
}

template <bool TABLE>
inline const float* value_at(const Keys& kv, int64_t s) {
  return TABLE ? kv.values[s] : kv.v + s * kv.v_step;
}

template <int D, bool TABLE>
void attend(const float* q, int64_t T, int64_t q_step, const Keys& kv, int64_t S,
            const bool* keep, int64_t keep_step, int64_t dh, float scale, float* out, float* w,
            float* buffer) {
  const int64_t n = D > 0 ? D : dh;
  float local[2 * (D > 0 ? D : 1)];
  float* qs = D > 0 ? local : buffer;  // the query, scaled by 1 / sqrt(Dh)
  float* acc = D > 0 ? local + (D > 0 ? D : 1) : buffer + dh;
  for (int64_t t = 0; t < T; ++t, q += q_step, out += n) {
    for (int64_t d = 0; d < n; ++d) qs[d] = q[d] * scale;
    for (int64_t s = 0; s < S; ++s) {  // scores: q . k_s
      const float* ks = key_at<TABLE>(kv, s);
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < n; ++d) dot += qs[d] * ks[d];
      w[s] = dot;
    }
    if (keep != nullptr) {
      for (int64_t s = 0; s < S; ++s) {
        if (!keep[s * keep_step]) w[s] = -std::numeric_limits<float>::infinity();
      }
    }
    float largest = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : largest)
    for (int64_t s = 0; s < S; ++s) largest = w[s] > largest ? w[s] : largest;
    if (largest == -std::numeric_limits<float>::infinity()) {  // no key: zeros, as PyTorch's
      for (int64_t d = 0; d < n; ++d) out[d] = 0.f;
      continue;
    }
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t s = 0; s < S; ++s) {  // softmax's numerators
      w[s] = exp_nonpositive(w[s] - largest);
      total += w[s];
    }
    for (int64_t d = 0; d < n; ++d) acc[d] = 0.f;
    for (int64_t s = 0; s < S; ++s) {  // the weights mix the values
      const float* vs = value_at<TABLE>(kv, s);
      const float ws = w[s];
#pragma omp simd
      for (int64_t d = 0; d < n; ++d) acc[d] += ws * vs[d];
    }
    const float inv = 1.f / total;
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) out[d] = acc[d] * inv;
  }
}

}  // namespace

torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v, const torch::Tensor& keep,
                               const torch::Tensor& table) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v: (B, H, T or S, Dh)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                  v.scalar_type() == at::kFloat,
              "decode_attention takes fp32");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), dh = q.size(3), S = k.size(2);
  const bool indirect = table.numel() > 0;
  // Where the kernel does not take the inputs, an undefined tensor (None in Python), and the
  // caller runs PyTorch's: a mask that is not one row of keys per row (B or 1, 1, 1, S) bool,
  // values not contiguous along Dh, a table not (B, S) long. Checked here, not in Python, where
  // these checks cost a few microseconds at every layer of every step.
  if (keep.numel() > 0 &&
      (keep.scalar_type() != at::kBool || keep.dim() != 4 || keep.size(1) != 1 ||
       keep.size(2) != 1 || keep.size(3) != S || (keep.size(0) != B && keep.size(0) != 1))) {
    return {};
  }
  if (q.stride(3) != 1 || k.stride(3) != 1 || v.stride(3) != 1) return {};
  if (indirect && (table.scalar_type() != at::kLong || table.dim() != 2 || table.size(0) != B ||
                   table.size(1) != S)) {
    return {};
  }
  TORCH_CHECK(k.size(0) == v.size(0) && (indirect || k.size(0) == B) && k.size(1) == H &&
                  v.size(1) == H && v.size(2) == S && k.size(3) == dh && v.size(3) == dh,
              "q, k, v shapes disagree");
  const int64_t* table_p = nullptr;
  if (indirect) {
    const auto t = table.accessor<int64_t, 2>();
    for (int64_t b = 0; b < B; ++b) {  // B x S small integers: cheap beside the attention
      for (int64_t s = 0; s < S; ++s) {
        TORCH_CHECK(t[b][s] >= 0 && t[b][s] < k.size(0), "table: a stored row out of range");
      }
    }
    table_p = table.data_ptr<int64_t>();
  }
  const bool* keep_p = nullptr;
  int64_t keep_row = 0, keep_step = 0;
  if (keep.numel() > 0) {
    keep_p = keep.data_ptr<bool>();
    keep_row = keep.size(0) == 1 ? 0 : keep.stride(0);
    keep_step = keep.stride(3);
  }
  auto out = torch::empty({B, H, T, dh}, q.options().memory_format(at::MemoryFormat::Contiguous));
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
  // strides read once: Tensor::stride is a call, too slow for the loops below
  const int64_t q0 = q.stride(0), q1 = q.stride(1), q2 = q.stride(2);
  const int64_t k0 = k.stride(0), k1 = k.stride(1), k2 = k.stride(2);
  const int64_t v0 = v.stride(0), v1 = v.stride(1), v2 = v.stride(2);
  const int64_t t0 = indirect ? table.stride(0) : 0, t1 = indirect ? table.stride(1) : 0;
  at::parallel_for(0, B * H, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> w(S), buffer(2 * dh);
    std::vector<const float*> keys(indirect ? S : 0), values(indirect ? S : 0);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H;
      Keys kv{kp + b * k0 + h * k1, vp + b * v0 + h * v1, k2, v2, keys.data(), values.data()};
      if (indirect) {  // each position names its stored row
        for (int64_t s = 0; s < S; ++s) {
          const int64_t row = table_p[b * t0 + s * t1];
          keys[s] = kp + row * k0 + h * k1 + s * k2;
          values[s] = vp + row * v0 + h * v1 + s * v2;
        }
      }
      const bool* keep_i = keep_p == nullptr ? nullptr : keep_p + b * keep_row;
      const auto args = std::make_tuple(qp + b * q0 + h * q1, T, q2, kv, S, keep_i, keep_step,
                                        dh, scale, op + i * T * dh, w.data(), buffer.data());
      switch (dh * 2 + indirect) {  // the head dimension unrolled where common
        case 64: std::apply(attend<32, false>, args); break;
        case 65: std::apply(attend<32, true>, args); break;
        case 128: std::apply(attend<64, false>, args); break;
        case 129: std::apply(attend<64, true>, args); break;
        case 256: std::apply(attend<128, false>, args); break;
        case 257: std::apply(attend<128, true>, args); break;
        default:
          if (indirect) {
            std::apply(attend<0, true>, args);
          } else {
            std::apply(attend<0, false>, args);
          }
      }
    }
  });
  return out;
}
