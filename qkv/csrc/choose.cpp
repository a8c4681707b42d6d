// What search does with a decoding step's scores (qkv/search.py): the log-softmax of the last
// position's logits, the best token of each row (greedy), and the best 2K extensions of each
// sentence's K beams (beam search).
//
// PyTorch's log_softmax makes three passes with a call per exp; its argmax and topk walk each row
// one score at a time. Beam search also added each beam's score to its V log-probabilities in
// a tensor of its own before the topk. Here each row is scanned in chunks of kChunk scores: a
// chunk's largest score, vectorized, says whether any of its scores can enter the best so far,
// and only such chunks are looked at one by one. A beam's score is added to the few scores that
// get that far. qkv/native.py compiles this file; tests/test_native.py compares every function
// with PyTorch's.
//
// Shapes: N rows of V scores, fp32, each row contiguous (rows `stride` apart).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "fast_exp.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kChunk = 64;
constexpr float kInf = std::numeric_limits<float>::infinity();

// Rows per thread: enough scores that a thread's share outweighs waking it.
int64_t grain(int64_t v) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(v, 1)); }

// The largest of x[0..n) and their sum, which is NaN where one of them is NaN (or where +inf
// meets -inf; then the caller takes the careful path, which is right either way).
inline float chunk_max(const float* x, int64_t n, float& sum) {
  float m = -kInf, s = 0.f;
#pragma omp simd reduction(max : m) reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    m = x[i] > m ? x[i] : m;
    s += x[i];
  }
  sum = s;
  return m;
}

// torch.argmax of one row: the first largest, NaN counting as largest.
int64_t argmax_row(const float* x, int64_t v) {
  float best = -kInf;
  int64_t best_chunk = -1;
  for (int64_t c = 0; c < v; c += kChunk) {
    float sum;
    const float m = chunk_max(x + c, std::min(kChunk, v - c), sum);
    if (std::isnan(sum)) {  // the careful path: one score at a time
      int64_t at = 0;
      for (int64_t i = 0; i < v; ++i) {
        if (std::isnan(x[i])) return i;
        if (x[i] > x[at]) at = i;
      }
      return at;
    }
    if (m > best) best = m, best_chunk = c;
  }
  if (best_chunk < 0) return 0;  // every score -inf: the first
  for (int64_t i = best_chunk;; ++i) {
    if (x[i] == best) return i;
  }
}

}  // namespace

// In place: each row of x becomes its log-softmax, x - max - log(sum(exp(x - max))).
void log_softmax_(torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1,
              "log_softmax_: (N, V) fp32 with contiguous rows");
  const int64_t n = x.size(0), v = x.size(1), stride = x.stride(0);
  float* base = x.data_ptr<float>();
  at::parallel_for(0, n, grain(v), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = base + r * stride;
      float m = -kInf;
#pragma omp simd reduction(max : m)
      for (int64_t i = 0; i < v; ++i) m = row[i] > m ? row[i] : m;
      float total = 0.f;
#pragma omp simd reduction(+ : total)
      for (int64_t i = 0; i < v; ++i) total += qkv::exp_nonpositive(row[i] - m);
      // a row of -inf, or with NaN or +inf, becomes NaN, as PyTorch's
      const float shift = m + std::log(total);
#pragma omp simd
      for (int64_t i = 0; i < v; ++i) row[i] -= shift;
    }
  });
}

// (N, V) -> (N,) long: each row's first largest score's position, as torch.argmax(x, -1).
torch::Tensor argmax_rows(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1 && x.size(1) > 0,
              "argmax_rows: (N, V > 0) fp32 with contiguous rows");
  const int64_t n = x.size(0), v = x.size(1), stride = x.stride(0);
  auto out = torch::empty({n}, x.options().dtype(at::kLong));
  const float* base = x.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, n, grain(v), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) o[r] = argmax_row(base + r * stride, v);
  });
  return out;
}

// Beam search's choice: log_probs (n * K, V), scores (n * K,) the beams' log-probabilities.
// Each sentence's `want` best of scores[j] + log_probs[j, t] over its K beams j and tokens t,
// best first (ties: the lower beam, then the lower token), as values (n, want) and positions
// j * V + t (n, want): torch.topk of (log_probs + scores[:, None]).view(n, K * V). Where fewer
// than `want` are above -inf, the rest are -inf at position 0. Empty tensors where a score is
// NaN (the caller then takes PyTorch's route, which ranks NaN first).
std::vector<torch::Tensor> beam_topk(const torch::Tensor& log_probs, const torch::Tensor& scores,
                                     int64_t k, int64_t want) {
  TORCH_CHECK(log_probs.dim() == 2 && log_probs.scalar_type() == at::kFloat &&
                  log_probs.stride(1) == 1,
              "beam_topk: log_probs (n * K, V) fp32 with contiguous rows");
  TORCH_CHECK(k > 0 && want > 0 && log_probs.size(0) % k == 0, "beam_topk: rows not n * K");
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == log_probs.size(0) &&
                  scores.scalar_type() == at::kFloat,
              "beam_topk: scores (n * K,) fp32");
  const int64_t n = log_probs.size(0) / k, v = log_probs.size(1), stride = log_probs.stride(0);
  auto values = torch::empty({n, want}, log_probs.options());
  auto positions = torch::empty({n, want}, log_probs.options().dtype(at::kLong));
  const float* base = log_probs.data_ptr<float>();
  const auto sc = scores.contiguous();
  const float* s_p = sc.data_ptr<float>();
  float* val_p = values.data_ptr<float>();
  int64_t* pos_p = positions.data_ptr<int64_t>();
  std::atomic<bool> saw_nan{false};
  at::parallel_for(0, n, std::max<int64_t>(1, grain(v) / k), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end && !saw_nan; ++i) {
      float* best = val_p + i * want;  // kept sorted, best first
      int64_t* at = pos_p + i * want;
      std::fill(best, best + want, -kInf);
      std::fill(at, at + want, int64_t{0});
      for (int64_t j = 0; j < k && !saw_nan; ++j) {
        const float s = s_p[i * k + j];
        if (std::isnan(s)) {
          saw_nan = true;
          break;
        }
        if (s == -kInf) continue;  // a beam not (yet) in use: all its extensions are -inf
        const float* row = base + (i * k + j) * stride;
        for (int64_t c = 0; c < v; c += kChunk) {
          const int64_t len = std::min(kChunk, v - c);
          float sum;
          const float m = chunk_max(row + c, len, sum);
          if (std::isnan(sum)) {
            for (int64_t t = c; t < c + len; ++t) saw_nan = saw_nan || std::isnan(row[t]);
            if (saw_nan) break;
          }
          // fl(x + s) <= fl(m + s) for x <= m: a chunk whose best cannot enter is skipped
          if (!(m + s > best[want - 1])) continue;
          for (int64_t t = c; t < c + len; ++t) {
            const float total = row[t] + s;
            if (!(total > best[want - 1])) continue;
            int64_t p = want - 1;  // insert after every score >= total (earlier ones win ties)
            while (p > 0 && best[p - 1] < total) {
              best[p] = best[p - 1];
              at[p] = at[p - 1];
              --p;
            }
            best[p] = total;
            at[p] = j * v + t;
          }
        }
      }
    }
  });
  if (saw_nan) return {torch::Tensor(), torch::Tensor()};
  return {values, positions};
}
