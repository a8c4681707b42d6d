// Attention for training on the CPU, forward and backward: softmax(q k^T / sqrt(Dh)), dropout
// on the weights, then the weights mix the values; one pass per (row, head).
//
// With dropout, PyTorch's fused CPU kernel falls back to its own math, and qkv's explicit route
// (qkv/attention.py) is ten operators, each a pass over (B, H, T, S) or over the heads: copies
// of the transposed heads for two batched products, masked_fill, a softmax that PyTorch runs
// slowly for rows under 16 keys (Multi30k's sentences), a cast, dropout's mask and its product,
// and their backward passes. Here a (row, head)'s queries, keys and values are read once into
// fp32 buffers and everything happens there. As in FlashAttention (Dao et al. 2022), the
// backward pass recomputes the weights from each query's log-sum-exp, and the dropout mask from
// its seed (dropout_bits.h), rather than storing them.
//
// Shapes: q (B, H, T, Dh), k and v (B, H, S, Dh), all fp32 or all bf16, any strides but a
// contiguous last dimension (split_heads' views of the projections); keep: bool (B, H, T, S) at
// any strides (a broadcast mask expanded), or empty: which keys each query may see; causal: also
// hide key s from query t where s > t. Dropout: element (b, h, t, s) of a (B, H, T, S) mask laid
// out as dropout_mask lays one out, kept where its draw is >= cut and then scaled by `scale`
// (cut 0: no dropout). A query that sees no key gets zeros, as in qkv's decoding kernel.
// Outputs: (B, T, H, Dh) contiguous, in q's dtype, returned as the (B, H, T, Dh) view: the heads
// side by side, as the output projection reads them.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "bf16.h"
#include "dropout_bits.h"
#include "fast_exp.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr float kNoKey = -std::numeric_limits<float>::infinity();

// A (B, H, N, Dh) tensor's data and strides, read or written one (row, head) at a time.
template <typename T>
struct Heads {
  const T* data;
  int64_t sb, sh, sn;
  explicit Heads(const torch::Tensor& x)
      : data(x.data_ptr<T>()), sb(x.stride(0)), sh(x.stride(1)), sn(x.stride(2)) {}
  const T* at(int64_t b, int64_t h) const { return data + b * sb + h * sh; }
};

// N rows of D values at p (rows `step` apart) into fp32 `out`, rows packed.
template <typename T>
void load(const T* p, int64_t step, int64_t N, int64_t D, float* out) {
  for (int64_t n = 0; n < N; ++n, p += step, out += D) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(p[d]);
  }
}

inline void store(const float* in, int64_t N, int64_t D, float* p, int64_t step) {
  for (int64_t n = 0; n < N; ++n, p += step, in += D) std::copy(in, in + D, p);
}

inline void store(const float* in, int64_t N, int64_t D, c10::BFloat16* out, int64_t step) {
  uint16_t* p = reinterpret_cast<uint16_t*>(out);
  for (int64_t n = 0; n < N; ++n, p += step, in += D) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) p[d] = qkv::bf16_bits(in[d]);
  }
}

// What every (row, head) shares.
struct Problem {
  int64_t B, H, T, S, D;
  float scale;          // 1 / sqrt(Dh)
  const bool* keep;     // nullptr: every key visible
  int64_t kb, kh, kt, ks;  // keep's strides
  bool causal;
  uint32_t cut;         // dropout: an element is kept where its draw >= cut
  float kept_scale;     // and then worth this
  uint64_t seed;
};

constexpr int64_t kLanes = 16;  // keys per vector register (fp32, AVX-512)
constexpr int64_t kRows = 4;    // queries at a time: four independent sums hide the FMA latency
constexpr int64_t kMaxD = 256;  // the head dimension, at most

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// out[r][s] = sum_d A[r][d] * Bt[d][s] for r < kRows, s < Sp: A kRows rows of D, Bt D rows of
// Sp, out kRows rows of Sp. Each (row, kLanes keys) sum stays in a vector register.
inline void rows_times(const float* A, int64_t D, const float* Bt, int64_t Sp, float* out) {
  for (int64_t s0 = 0; s0 < Sp; s0 += kLanes) {
    float acc[kRows][kLanes] = {};
    for (int64_t d = 0; d < D; ++d) {
      const float* bd = Bt + d * Sp + s0;
      for (int64_t r = 0; r < kRows; ++r) {
        const float a = A[r * D + d];
#pragma omp simd
        for (int64_t j = 0; j < kLanes; ++j) acc[r][j] += a * bd[j];
      }
    }
    for (int64_t r = 0; r < kRows; ++r) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) out[r * Sp + s0 + j] = acc[r][j];
    }
  }
}

// x (N rows of D) transposed into out (D rows of Np, zeros after N).
void transpose(const float* x, int64_t N, int64_t D, int64_t Np, float* out) {
  std::fill(out, out + D * Np, 0.f);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t d = 0; d < D; ++d) out[d * Np + n] = x[n * D + d];
}

// Query t's raw dot products w (Sp of them) made its scores: times 1/sqrt(Dh), -inf where hidden
// and from S on. Returns the largest.
float mask_scores(const Problem& p, int64_t b, int64_t h, int64_t t, int64_t Sp, float* w) {
  const int64_t visible = p.causal ? std::min(p.S, t + 1) : p.S;
  const float scale = p.scale;
#pragma omp simd
  for (int64_t s = 0; s < Sp; ++s) w[s] = s < visible ? w[s] * scale : kNoKey;
  if (p.keep != nullptr) {
    const bool* keep = p.keep + b * p.kb + h * p.kh + t * p.kt;
    const int64_t step = p.ks;
#pragma omp simd
    for (int64_t s = 0; s < visible; ++s) w[s] = keep[s * step] ? w[s] : kNoKey;
  }
  float largest = kNoKey;
#pragma omp simd reduction(max : largest)
  for (int64_t s = 0; s < Sp; ++s) largest = w[s] > largest ? w[s] : largest;
  return largest;
}

// Query t's dropout factors: kept_scale where its draw keeps key s, else 0 (and 0 from S to Sp).
void dropout_row(const Problem& p, int64_t b, int64_t h, int64_t t, int64_t Sp, float* f) {
  std::fill(f + p.S, f + Sp, 0.f);
  if (p.cut == 0) {
    std::fill(f, f + p.S, 1.f);
    return;
  }
  const uint64_t first = static_cast<uint64_t>(((b * p.H + h) * p.T + t) * p.S);
  const uint64_t seed = p.seed;
  const uint32_t cut = p.cut;
  const float on = p.kept_scale;
#pragma omp simd
  for (int64_t s = 0; s < p.S; ++s) f[s] = qkv::draw(seed, first + s) >= cut ? on : 0.f;
}

// Floats of scratch a (row, head) needs: forward_one's and backward_one's.
int64_t forward_floats(const Problem& p) {
  const int64_t Sp = round_up(p.S, kLanes), Tp = round_up(p.T, kRows);
  return (Tp + 2 * p.S + Sp) * p.D + 2 * kRows * Sp;
}

int64_t backward_floats(const Problem& p) {
  const int64_t Sp = round_up(p.S, kLanes), Tp = round_up(p.T, kRows);
  return (2 * Tp + p.T + 3 * p.S + 2 * Sp) * p.D + 3 * kRows * Sp;
}

// One (row, head)'s output and log-sum-exps. DC: the head dimension where known when compiling
// (the sums over it then stay in vector registers), else 0 and p.D.
template <int DC, typename T>
void forward_one(const Problem& p, int64_t b, int64_t h, const Heads<T>& q, const Heads<T>& k,
                 const Heads<T>& v, T* out, float* lse, float* buffer) {
  const int64_t D = DC > 0 ? DC : p.D, S = p.S, Sp = round_up(S, kLanes);
  const int64_t Tp = round_up(p.T, kRows);
  float* Q = buffer;  // Tp rows, zeros after T
  float* K = Q + Tp * D;
  float* V = K + S * D;
  float* Kt = V + S * D;
  float* W = Kt + Sp * D;  // kRows queries' weights
  float* F = W + kRows * Sp;
  load(q.at(b, h), q.sn, p.T, D, Q);
  std::fill(Q + p.T * D, Q + Tp * D, 0.f);
  load(k.at(b, h), k.sn, S, D, K);
  load(v.at(b, h), v.sn, S, D, V);
  transpose(K, S, D, Sp, Kt);
  float* row_lse = lse + (b * p.H + h) * p.T;
  for (int64_t t0 = 0; t0 < p.T; t0 += kRows) {
    const int64_t rows = std::min(kRows, p.T - t0);
    rows_times(Q + t0 * D, D, Kt, Sp, W);
    for (int64_t r = 0; r < kRows; ++r) {
      float* w = W + r * Sp;
      const float largest = r < rows ? mask_scores(p, b, h, t0 + r, Sp, w) : kNoKey;
      if (largest == kNoKey) {  // no key (or no query): zeros
        if (r < rows) row_lse[t0 + r] = kNoKey;
        std::fill(w, w + S, 0.f);
        continue;
      }
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t s = 0; s < Sp; ++s) {
        w[s] = qkv::exp_nonpositive(w[s] - largest);
        sum += w[s];
      }
      row_lse[t0 + r] = largest + std::log(sum);
      float* f = F + r * Sp;
      dropout_row(p, b, h, t0 + r, Sp, f);
      const float inv = 1.f / sum;
#pragma omp simd
      for (int64_t s = 0; s < Sp; ++s) w[s] *= inv * f[s];
    }
    float local[kRows * (DC > 0 ? DC : kMaxD)] = {};  // kRows rows of the weighted sums
    for (int64_t s = 0; s < S; ++s) {
      const float* vs = V + s * D;
      for (int64_t r = 0; r < kRows; ++r) {
        const float weight = W[r * Sp + s];
        float* acc = local + r * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] += weight * vs[d];
      }
    }
    const int64_t step = p.H * D;  // out is (B, T, H, Dh)
    store(local, rows, D, out + ((b * p.T + t0) * p.H + h) * D, step);
  }
}

// One (row, head)'s gradients of q, k and v.
template <int DC, typename T>
void backward_one(const Problem& p, int64_t b, int64_t h, const Heads<T>& go, const Heads<T>& q,
                  const Heads<T>& k, const Heads<T>& v, const float* lse, T* dq, T* dk, T* dv,
                  float* buffer) {
  const int64_t D = DC > 0 ? DC : p.D, S = p.S, T_ = p.T, Sp = round_up(S, kLanes);
  const int64_t Tp = round_up(T_, kRows);
  float* Q = buffer;     // Tp rows, zeros after T
  float* G = Q + Tp * D;  // the output's gradient, Tp rows
  float* dQ = G + Tp * D;
  float* K = dQ + T_ * D;
  float* dK = K + S * D;
  float* dV = dK + S * D;
  float* Kt = dV + S * D;  // the keys and the values transposed (Dh rows of Sp)
  float* Vt = Kt + Sp * D;
  float* W = Vt + Sp * D;  // kRows queries' scores, then weights
  float* F = W + kRows * Sp;  // dropout's factors, then the kept weights
  float* Gs = F + kRows * Sp;  // the weights' gradient, then the scores'
  load(q.at(b, h), q.sn, T_, D, Q);
  load(go.at(b, h), go.sn, T_, D, G);
  std::fill(Q + T_ * D, Q + Tp * D, 0.f);
  std::fill(G + T_ * D, G + Tp * D, 0.f);
  load(k.at(b, h), k.sn, S, D, K);
  transpose(K, S, D, Sp, Kt);
  load(v.at(b, h), v.sn, S, D, dV);  // dV as scratch for V, transposed next
  transpose(dV, S, D, Sp, Vt);
  std::fill(dK, dK + 2 * S * D, 0.f);  // dK and dV
  const float* row_lse = lse + (b * p.H + h) * T_;
  for (int64_t t0 = 0; t0 < T_; t0 += kRows) {
    const int64_t rows = std::min(kRows, T_ - t0);
    rows_times(Q + t0 * D, D, Kt, Sp, W);
    rows_times(G + t0 * D, D, Vt, Sp, Gs);  // dO_t . v_s
    for (int64_t r = 0; r < kRows; ++r) {
      float* w = W + r * Sp;
      float* f = F + r * Sp;
      float* g = Gs + r * Sp;
      if (r >= rows || row_lse[t0 + r] == kNoKey) {  // no query, or the output was zeros
        std::fill(f, f + S, 0.f);
        std::fill(g, g + S, 0.f);
        continue;
      }
      const float lse_t = row_lse[t0 + r];
      mask_scores(p, b, h, t0 + r, Sp, w);
      dropout_row(p, b, h, t0 + r, Sp, f);
      float dot_pg = 0.f;  // sum_s P_s dP_s, the softmax's backward term
#pragma omp simd reduction(+ : dot_pg)
      for (int64_t s = 0; s < Sp; ++s) {
        w[s] = qkv::exp_nonpositive(w[s] - lse_t);  // 0 where -inf
        g[s] *= f[s];  // through the dropout
        dot_pg += w[s] * g[s];
      }
      const float scale = p.scale;
#pragma omp simd
      for (int64_t s = 0; s < Sp; ++s) {
        f[s] *= w[s];                              // the kept weight
        g[s] = w[s] * (g[s] - dot_pg) * scale;  // the score's gradient, / sqrt(Dh)
      }
    }
    float local[kRows * (DC > 0 ? DC : kMaxD)] = {};  // kRows rows of dQ
    const float* qs = Q + t0 * D;
    const float* gs = G + t0 * D;
    for (int64_t s = 0; s < S; ++s) {
      float ds[kRows], kept[kRows];
      for (int64_t r = 0; r < kRows; ++r) ds[r] = Gs[r * Sp + s], kept[r] = F[r * Sp + s];
      const float* ks = K + s * D;
      float* dks = dK + s * D;
      float* dvs = dV + s * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        float sum_k = 0.f, sum_v = 0.f;
        for (int64_t r = 0; r < kRows; ++r) {
          local[r * D + d] += ds[r] * ks[d];
          sum_k += ds[r] * qs[r * D + d];
          sum_v += kept[r] * gs[r * D + d];
        }
        dks[d] += sum_k;
        dvs[d] += sum_v;
      }
    }
    std::copy(local, local + rows * D, dQ + t0 * D);
  }
  const int64_t step = p.H * D;  // the gradients are (B, N, H, Dh)
  store(dQ, T_, D, dq + (b * T_ * p.H + h) * D, step);
  store(dK, S, D, dk + (b * S * p.H + h) * D, step);
  store(dV, S, D, dv + (b * S * p.H + h) * D, step);
}

// Calls f(std::integral_constant<int, DC>) with DC the head dimension where it is 32 or 64,
// else 0.
template <typename F>
void by_head_dim(int64_t D, F&& f) {
  if (D == 32) {
    f(std::integral_constant<int, 32>{});
  } else if (D == 64) {
    f(std::integral_constant<int, 64>{});
  } else {
    f(std::integral_constant<int, 0>{});
  }
}

Problem problem(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                const torch::Tensor& keep, bool causal, int64_t cut, double scale, int64_t seed) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "train_attention: 4-d q, k, v");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "train_attention: q, k, v all fp32 or all bf16");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "train_attention: a contiguous last dimension");
  Problem p{};
  p.B = q.size(0), p.H = q.size(1), p.T = q.size(2), p.S = k.size(2), p.D = q.size(3);
  TORCH_CHECK(k.size(0) == p.B && v.size(0) == p.B && k.size(1) == p.H && v.size(1) == p.H &&
                  v.size(2) == p.S && k.size(3) == p.D && v.size(3) == p.D,
              "train_attention: k and v (B, H, S, Dh) for q (B, H, T, Dh)");
  TORCH_CHECK(cut >= 0 && cut < 65536, "train_attention: cut in [0, 65536)");
  TORCH_CHECK(p.D <= kMaxD, "train_attention: a head dimension of at most 256");
  p.scale = 1.f / std::sqrt(static_cast<float>(p.D));
  if (keep.numel() > 0) {
    TORCH_CHECK(keep.scalar_type() == at::kBool && keep.dim() == 4 && keep.size(0) == p.B &&
                    keep.size(1) == p.H && keep.size(2) == p.T && keep.size(3) == p.S,
                "train_attention: keep bool (B, H, T, S)");
    p.keep = keep.data_ptr<bool>();
    p.kb = keep.stride(0), p.kh = keep.stride(1), p.kt = keep.stride(2), p.ks = keep.stride(3);
  }
  p.causal = causal;
  p.cut = static_cast<uint32_t>(cut);
  p.kept_scale = static_cast<float>(scale);
  p.seed = static_cast<uint64_t>(seed);
  return p;
}

// (B, N, H, Dh) contiguous, returned as its (B, H, N, Dh) view.
torch::Tensor heads_like(const torch::Tensor& x, int64_t N) {
  return torch::empty({x.size(0), N, x.size(1), x.size(3)}, x.options()).transpose(1, 2);
}

}  // namespace

std::vector<torch::Tensor> train_attention_forward(const torch::Tensor& q, const torch::Tensor& k,
                                                   const torch::Tensor& v,
                                                   const torch::Tensor& keep, bool causal,
                                                   int64_t cut, double scale, int64_t seed) {
  const Problem p = problem(q, k, v, keep, causal, cut, scale, seed);
  auto out = heads_like(q, p.T);
  auto lse = torch::empty({p.B, p.H, p.T}, q.options().dtype(at::kFloat));
  qkv::by_dtype(q.scalar_type(), [&](auto type) {
    using scalar_t = decltype(type);
    const Heads<scalar_t> hq(q), hk(k), hv(v);
    scalar_t* o = out.data_ptr<scalar_t>();
    float* l = lse.data_ptr<float>();
    by_head_dim(p.D, [&](auto dc) {
      constexpr int DC = decltype(dc)::value;
      at::parallel_for(0, p.B * p.H, 4, [&](int64_t begin, int64_t end) {
        std::vector<float> buffer(forward_floats(p));
        for (int64_t i = begin; i < end; ++i)
          forward_one<DC>(p, i / p.H, i % p.H, hq, hk, hv, o, l, buffer.data());
      });
    });
  }, "train_attention_forward");
  return {out, lse};
}

std::vector<torch::Tensor> train_attention_backward(
    const torch::Tensor& grad_out, const torch::Tensor& q, const torch::Tensor& k,
    const torch::Tensor& v, const torch::Tensor& keep, bool causal, int64_t cut, double scale,
    int64_t seed, const torch::Tensor& lse) {
  const Problem p = problem(q, k, v, keep, causal, cut, scale, seed);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type() &&
                  grad_out.stride(3) == 1,
              "train_attention_backward: grad_out like q, a contiguous last dimension");
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == at::kFloat && lse.numel() == p.B * p.H * p.T,
              "train_attention_backward: the forward pass's lse");
  auto dq = heads_like(q, p.T), dk = heads_like(k, p.S), dv = heads_like(v, p.S);
  qkv::by_dtype(q.scalar_type(), [&](auto type) {
    using scalar_t = decltype(type);
    const Heads<scalar_t> hg(grad_out), hq(q), hk(k), hv(v);
    scalar_t* pq = dq.data_ptr<scalar_t>();
    scalar_t* pk = dk.data_ptr<scalar_t>();
    scalar_t* pv = dv.data_ptr<scalar_t>();
    const float* l = lse.data_ptr<float>();
    by_head_dim(p.D, [&](auto dc) {
      constexpr int DC = decltype(dc)::value;
      at::parallel_for(0, p.B * p.H, 4, [&](int64_t begin, int64_t end) {
        std::vector<float> buffer(backward_floats(p));
        for (int64_t i = begin; i < end; ++i)
          backward_one<DC>(p, i / p.H, i % p.H, hg, hq, hk, hv, l, pq, pk, pv, buffer.data());
      });
    });
  }, "train_attention_backward");
  return {dq, dk, dv};
}
