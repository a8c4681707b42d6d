// One decoder layer's decoding step for inference on the CPU (fp32 activations; fp32, int8 or
// bf16 weights), its kernels called in turn from C++:
// masked self-attention over the KV cache, cross-attention to the encoder's keys and values,
// the feed-forward network, each inside its skip connection and layer norm (qkv/decoder.py's
// DecoderLayer, the same arithmetic in the same order).
//
// Why: at a decoding step's sizes (one new token for each of 32 sentences, say) each of these
// kernels takes a few microseconds to tens of them, and the Python around them (module calls,
// views, the cache's bookkeeping, the checks of which kernel applies) cost about as much
// again: 0.4-1.2 ms per step of a small model's greedy decode (bench/README.md). Here a layer
// is one call from Python. The kernels are the ones the Python route calls (MKL's packed
// product, qkv's or PyTorch's int8 product, oneDNN's bf16 product, or plain F.linear, as
// qkv/packed.py packed each linear map; the attention kernel; add-and-norm and the activation
// where qkv/native.py uses them, else PyTorch's ops), so both routes compute the same numbers;
// tests/test_native.py checks they decode alike. qkv/packed.py's PackedDecoderLayer calls this
// where it applies and runs the Python route everywhere else.
//
// Shapes: B rows (sentences, or sentences x beams), D d_model, H heads, Dh = D / H.

#include <torch/extension.h>

#include <ATen/native/quantized/PackedParams.h>
#include <torch/csrc/jit/python/pybind_utils.h>

#include "kernels.h"

#include <cstring>

namespace {

// A tensor's numel() == 0 stands for "none" in the arguments (Python passes empty tensors).
c10::optional<torch::Tensor> given(const torch::Tensor& t) {
  if (t.numel() == 0) return c10::nullopt;
  return t;
}

}  // namespace

// oneDNN's packed product with a post-op, PyTorch's torch.ops.mkldnn._linear_pointwise (through
// the dispatcher: its C++ declaration is not among the headers PyTorch installs).
torch::Tensor LinearMap::bf16(const torch::Tensor& x, std::string_view attr,
                              std::string_view algorithm) const {
  using Scalars = c10::List<std::optional<c10::Scalar>>;
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<torch::Tensor(const torch::Tensor&, const torch::Tensor&,
                               const std::optional<torch::Tensor>&, std::string_view, Scalars,
                               std::optional<std::string_view>)>();
  return op.call(x, weight, given(bias), attr, Scalars(), algorithm);
}

// y = x W^T + b for x (B, 1, K), as qkv/packed.py computes it for this map.
torch::Tensor LinearMap::operator()(const torch::Tensor& x) const {
  switch (kind) {
    case Kind::kMkl:
      return packed_linear(x, weight, bias, n);
    case Kind::kInt8:  // the bias is inside; 7-bit activations, as qkv/packed.py asks
      return int8->apply_dynamic(x.view({-1, x.size(-1)}), /*reduce_range=*/true)
          .view({x.size(0), x.size(1), n});
    case Kind::kPlain:
      return at::linear(x, weight, given(bias));
    case Kind::kQkvInt8:
      return int8_linear(x, weight, scale, sums, bias, n);
    case Kind::kBf16:  // bf16 in, fp32 out: everything around the product stays fp32
      return bf16(x.reshape({-1, x.size(-1)}).to(at::kBFloat16), "none", "")
          .to(at::kFloat)
          .view({x.size(0), x.size(1), n});
  }
  TORCH_CHECK(false, "LinearMap: unknown kind");
}

// kinds[i]: "mkl" (tensors[i] packed by pack_weight), "int8" (int8s[i], a prepacked int8
// weight, torch.ops.quantized.linear_prepack's), "plain" (tensors[i] the (n, K) weight), "bf16"
// (tensors[i] oneDNN's packed bf16 weight, torch.ops.mkldnn._reorder_linear_weight's),
// "qkv_int8" (tensors[i] int8_pack's weight, int8s[i] [its rows' scales, int8_pack's sums]).
DecoderLayerWeights decoder_layer_weights(const std::vector<std::string>& kinds,
                                          const std::vector<torch::Tensor>& tensors,
                                          const std::vector<torch::Tensor>& biases,
                                          const std::vector<int64_t>& widths,
                                          const std::vector<py::object>& int8s,
                                          const std::vector<torch::Tensor>& norms,
                                          const std::string& activation, bool norm_first,
                                          double eps, const std::string& post_op,
                                          const std::string& post_op_algorithm) {
  const size_t count = kinds.size();
  TORCH_CHECK((count == 4 || count == 6) && tensors.size() == count && biases.size() == count &&
                  widths.size() == count && int8s.size() == count && norms.size() == count,
              "decoder_layer_weights: 4 or 6 linear maps, and a norm's weight and bias for "
              "each pair");
  TORCH_CHECK(activation == "relu" || activation == "gelu" || activation == "silu",
              "decoder_layer_weights: relu, gelu or silu, not ", activation);
  DecoderLayerWeights w{{}, norms, activation, norm_first, eps, post_op, post_op_algorithm};
  for (size_t i = 0; i < count; ++i) {
    LinearMap map{LinearMap::Kind::kPlain, tensors[i], biases[i], widths[i], {}, {}, {}};
    if (kinds[i] == "mkl") {
      map.kind = LinearMap::Kind::kMkl;
    } else if (kinds[i] == "int8") {
      map.kind = LinearMap::Kind::kInt8;
      const auto object = py::cast<torch::jit::Object>(int8s[i]);
      map.int8 = c10::IValue(object._ivalue()).toCustomClass<LinearPackedParamsBase>();
    } else if (kinds[i] == "bf16") {
      map.kind = LinearMap::Kind::kBf16;
    } else if (kinds[i] == "qkv_int8") {
      map.kind = LinearMap::Kind::kQkvInt8;
      const auto extra = py::cast<std::vector<torch::Tensor>>(int8s[i]);
      TORCH_CHECK(extra.size() == 2, "decoder_layer_weights: qkv_int8 takes [scale, sums]");
      map.scale = extra[0];
      map.sums = extra[1];
    } else {
      TORCH_CHECK(kinds[i] == "plain",
                  "decoder_layer_weights: mkl, int8, plain, bf16 or qkv_int8, not ", kinds[i]);
    }
    w.linears.push_back(std::move(map));
  }
  return w;
}

namespace {

struct Norm {
  const torch::Tensor& weight;
  const torch::Tensor& bias;  // numel() == 0: none
};

// The skip connection with layer norm around a sublayer's output y (qkv/layers.py's Residual).
// post-LN: norm(x + y), by the add-and-norm kernel where `pointwise`, else PyTorch's two ops.
// pre-LN: x + y (the norm came before the sublayer, `pre_norm`).
torch::Tensor residual(const torch::Tensor& x, const torch::Tensor& y, const Norm& norm,
                       bool norm_first, double eps, bool pointwise) {
  if (norm_first) return x + y;
  if (pointwise) return add_layer_norm(x, y, norm.weight, norm.bias, eps);
  return at::layer_norm(x + y, {x.size(-1)}, norm.weight, given(norm.bias), eps);
}

// What a sublayer reads: x itself (post-LN) or norm(x) (pre-LN), by PyTorch's layer norm.
torch::Tensor pre_norm(const torch::Tensor& x, const Norm& norm, bool norm_first, double eps) {
  if (!norm_first) return x;
  return at::layer_norm(x, {x.size(-1)}, norm.weight, given(norm.bias), eps);
}

// The feed-forward's activation in place: by qkv's kernel where `in_cpp`, else PyTorch's (the
// same function as F.relu, F.gelu, F.silu).
void activate(torch::Tensor& h, const std::string& kind, bool in_cpp) {
  if (kind == "relu") {
    h.relu_();
  } else if (in_cpp) {
    activate_(h, kind);
  } else if (kind == "gelu") {
    at::gelu_(h);
  } else {
    at::silu_(h);
  }
}

}  // namespace

// x (B, 1, D) fp32, contiguous: the layer's input for one new position per row. Returns the
// layer's output (B, 1, D).
//
// weights: the layer's, from decoder_layer_weights: its linear maps in the order
//   self-attention's stacked q/k/v, its output, [cross-attention's query, its output,] the
//   feed-forward's first and second; and the weight and bias of each skip connection's layer
//   norm, in the same order: self-attention's, [cross-attention's,] the feed-forward's.
// self_attn: the KV cache's storage of keys and of values (P, H, capacity, Dh), its table of
//   stored rows (B, capacity) long or empty, and the mask of keys each row may attend to
//   (B or 1, 1, 1, position + 1) bool or empty. This step's keys and values are written at
//   `position` of each row's own stored row (the cache has claimed it, KVCache.room).
// cross_attn: the encoder's keys and values (n, H, S, Dh), one row per `group` rows of x (a
//   sentence's beams), and the memory mask (n, 1, 1, S) bool or empty; or no tensors at all
//   (a decoder-only layer).
// pointwise: add-and-norm and the activation by qkv's kernels (qkv/native.py's choice), the
//   activation only after MKL's or an int8 product and on at most activate_max values, as in
//   Python.
torch::Tensor decoder_layer_step(const DecoderLayerWeights& weights, const torch::Tensor& x,
                                 const std::vector<torch::Tensor>& self_attn,
                                 int64_t position, const std::vector<torch::Tensor>& cross_attn,
                                 int64_t group, bool pointwise, int64_t activate_max) {
  const bool cross = !cross_attn.empty();
  const auto& linears = weights.linears;
  TORCH_CHECK(linears.size() == (cross ? 6u : 4u) && self_attn.size() == 4 &&
                  (!cross || cross_attn.size() == 3),
              "decoder_layer_step: arguments of the wrong count");
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1 && x.is_contiguous() &&
                  x.scalar_type() == at::kFloat,
              "decoder_layer_step: x must be (B, 1, D) fp32, contiguous");
  const torch::Tensor &k_store = self_attn[0], &v_store = self_attn[1];
  const int64_t B = x.size(0), D = x.size(2), H = k_store.size(1), dh = k_store.size(3);
  TORCH_CHECK(H * dh == D && v_store.sizes() == k_store.sizes() && k_store.size(0) >= B &&
                  position < k_store.size(2) && k_store.stride(3) == 1 &&
                  v_store.stride(3) == 1,
              "decoder_layer_step: the KV cache's storage does not fit x");
  const bool norm_first = weights.norm_first;
  const double eps = weights.eps;
  auto norm = [&](size_t i) { return Norm{weights.norms[2 * i], weights.norms[2 * i + 1]}; };
  size_t next = 0;  // the next linear map, in their order

  // Masked self-attention: one matmul gives each row's query, key and value.
  const auto qkv = linears[next++](pre_norm(x, norm(0), norm_first, eps)).contiguous();
  {  // this position's keys and values into each row's own stored row
    const float* from = qkv.data_ptr<float>();
    float* ks = k_store.data_ptr<float>();
    float* vs = v_store.data_ptr<float>();
    const int64_t k0 = k_store.stride(0), k1 = k_store.stride(1), k2 = k_store.stride(2);
    const int64_t v0 = v_store.stride(0), v1 = v_store.stride(1), v2 = v_store.stride(2);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        const float* row = from + b * 3 * D + h * dh;
        std::memcpy(ks + b * k0 + h * k1 + position * k2, row + D, dh * sizeof(float));
        std::memcpy(vs + b * v0 + h * v1 + position * v2, row + 2 * D, dh * sizeof(float));
      }
    }
  }
  const int64_t S = position + 1;
  const auto q = qkv.as_strided({B, H, 1, dh}, {3 * D, dh, dh, 1});
  const auto& table = self_attn[2];
  auto mixed = decode_attention(q, k_store.slice(2, 0, S), v_store.slice(2, 0, S), self_attn[3],
                                table.numel() > 0 ? table.slice(1, 0, S) : table);
  TORCH_CHECK(mixed.defined(), "decoder_layer_step: the attention kernel declined its inputs");
  // (B, H, 1, Dh) contiguous is the heads concatenated, (B, 1, D)
  auto h = residual(x, linears[next++](mixed.view({B, 1, D})), norm(0), norm_first, eps,
                    pointwise);

  if (cross) {  // cross-attention: each row's query against its sentence's encoder output
    const torch::Tensor &k = cross_attn[0], &v = cross_attn[1];
    TORCH_CHECK(group >= 1 && B % group == 0 && k.size(0) * group == B,
                "decoder_layer_step: cross-attention rows do not fit x");
    const int64_t n = B / group;
    const auto cq = linears[next++](pre_norm(h, norm(1), norm_first, eps)).contiguous();
    // a sentence's `group` beams become `group` queries of its one row of keys
    const auto grouped = cq.as_strided({n, H, group, dh}, {group * D, dh, D, 1});
    auto out = decode_attention(grouped, k, v, cross_attn[2], torch::Tensor());
    TORCH_CHECK(out.defined(), "decoder_layer_step: the attention kernel declined its inputs");
    if (group > 1) out = out.permute({0, 2, 1, 3}).contiguous();  // (n, group, H, Dh)
    h = residual(h, linears[next++](out.view({B, 1, D})), norm(1), norm_first, eps, pointwise);
  }

  // The feed-forward network, position by position.
  const size_t ff = cross ? 2 : 1;
  const auto &first = linears[next], &second = linears[next + 1];
  using Kind = LinearMap::Kind;
  const auto in = pre_norm(h, norm(ff), norm_first, eps);
  if (first.kind == Kind::kBf16 && second.kind == Kind::kBf16) {
    // as PackedFeedForward in bf16: the activation inside oneDNN's first product, its bf16
    // output straight into the second
    const auto hidden = first.bf16(in.view({B, D}).to(at::kBFloat16), weights.post_op,
                                   weights.post_op_algorithm);
    const auto y = second.bf16(hidden, "none", "").to(at::kFloat).view({B, 1, second.n});
    return residual(h, y, norm(ff), norm_first, eps, pointwise);
  }
  auto hidden = first(in);
  // as qkv/packed.py's PackedFeedForward: in place by qkv's kernel after MKL's products or an
  // int8 one; F.relu's, F.gelu's or F.silu's function after plain ones
  const bool packed = (first.kind == Kind::kMkl && second.kind == Kind::kMkl) ||
                      first.kind == Kind::kInt8 || first.kind == Kind::kQkvInt8;
  const bool in_cpp = pointwise && packed && hidden.numel() <= activate_max;
  activate(hidden, weights.activation, in_cpp);
  return residual(h, second(hidden), norm(ff), norm_first, eps, pointwise);
}
