// The kernels of qkv's C++ files that other files call: bindings.cpp exposes them to Python,
// and decoder_step.cpp calls them directly, without Python between them.

#pragma once

#include <torch/extension.h>

#include <ATen/native/quantized/PackedParams.h>

#include <string>
#include <vector>

// decode_attention.cpp
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v, const torch::Tensor& keep,
                               const torch::Tensor& table);
// choose.cpp
void log_softmax_(torch::Tensor& x);
torch::Tensor argmax_rows(const torch::Tensor& x);
std::vector<torch::Tensor> beam_topk(const torch::Tensor& log_probs, const torch::Tensor& scores,
                                     int64_t k, int64_t want);
// dropout_mask.cpp
torch::Tensor dropout_mask(const torch::Tensor& like, int64_t cut, double scale, int64_t seed);
// dropout_fused.cpp
torch::Tensor relu_dropout(const torch::Tensor& x, int64_t cut, double scale, int64_t seed);
torch::Tensor relu_dropout_backward(const torch::Tensor& dy, const torch::Tensor& y, double scale);
torch::Tensor add_dropout(const torch::Tensor& x, const torch::Tensor& y, int64_t cut,
                          double scale, int64_t seed);
torch::Tensor add_dropout_backward(const torch::Tensor& dout, int64_t cut, double scale,
                                   int64_t seed, at::ScalarType dtype);
// layer_norm.cpp
std::vector<torch::Tensor> layer_norm_bf16(const torch::Tensor& x, const torch::Tensor& weight,
                                           const torch::Tensor& bias, double eps);
std::vector<torch::Tensor> layer_norm_bf16_backward(const torch::Tensor& dy, const torch::Tensor& x,
                                                    const torch::Tensor& mean,
                                                    const torch::Tensor& rstd,
                                                    const torch::Tensor& weight, bool has_bias);
// train_attention.cpp
std::vector<torch::Tensor> train_attention_forward(const torch::Tensor& q, const torch::Tensor& k,
                                                   const torch::Tensor& v,
                                                   const torch::Tensor& keep, bool causal,
                                                   int64_t cut, double scale, int64_t seed);
std::vector<torch::Tensor> train_attention_backward(
    const torch::Tensor& grad_out, const torch::Tensor& q, const torch::Tensor& k,
    const torch::Tensor& v, const torch::Tensor& keep, bool causal, int64_t cut, double scale,
    int64_t seed, const torch::Tensor& lse);
// cross_entropy.cpp
double smoothed_cross_entropy_rows(const torch::Tensor& scores, const torch::Tensor& target,
                                   double eps, const torch::Tensor& grad);
// pointwise.cpp
void activate_(torch::Tensor& x, const std::string& kind);
torch::Tensor add_layer_norm(const torch::Tensor& x, const torch::Tensor& y,
                             const torch::Tensor& weight, const torch::Tensor& bias, double eps);
// packed_gemm.cpp
bool gemm_available();
torch::Tensor pack_weight(const torch::Tensor& w);
torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& packed,
                            const torch::Tensor& bias, int64_t n);
// int8_gemm.cpp
bool int8_available();
bool int8_allow_amx(bool allowed);
std::vector<torch::Tensor> int8_pack(const torch::Tensor& q);
torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& packed,
                          const torch::Tensor& col_scale, const torch::Tensor& col_sum,
                          const torch::Tensor& bias, int64_t n);
// decoder_step.cpp
// One linear map of a decoder layer, as qkv/packed.py packed it.
struct LinearMap {
  // MKL's packed fp32, PyTorch's int8, F.linear, oneDNN's packed bf16, qkv's int8
  enum class Kind { kMkl, kInt8, kPlain, kBf16, kQkvInt8 };
  Kind kind;
  torch::Tensor weight;  // kMkl: pack_weight's buffer; kPlain: the (n, K) weight; kBf16:
                         // oneDNN's packed bf16 weight; kQkvInt8: int8_pack's weight
  torch::Tensor bias;    // (n), or empty: none (kInt8: inside its packed weight)
  int64_t n;             // outputs
  c10::intrusive_ptr<LinearPackedParamsBase> int8;  // kInt8: the prepacked int8 weight
  torch::Tensor scale, sums;  // kQkvInt8: the weight's rows' scales and int8_pack's sums
  // x (B, 1, K) fp32 -> (B, 1, n) fp32
  torch::Tensor operator()(const torch::Tensor& x) const;
  // kBf16: x (rows, K) bf16 -> (rows, n) bf16, with oneDNN's post-op `attr` ("none": none)
  torch::Tensor bf16(const torch::Tensor& x, std::string_view attr,
                     std::string_view algorithm) const;
};
// A decoder layer's weights for its C++ step, gathered once (qkv/packed.py).
struct DecoderLayerWeights {
  std::vector<LinearMap> linears;
  std::vector<torch::Tensor> norms;  // weight, bias (empty: none) of each skip connection's
  std::string activation;            // relu, gelu or silu
  bool norm_first;
  double eps;
  // oneDNN's post-op for the activation (qkv/packed.py's POST_OPS): bf16's first product
  std::string post_op, post_op_algorithm;
};
DecoderLayerWeights decoder_layer_weights(const std::vector<std::string>& kinds,
                                          const std::vector<torch::Tensor>& tensors,
                                          const std::vector<torch::Tensor>& biases,
                                          const std::vector<int64_t>& widths,
                                          const std::vector<pybind11::object>& int8s,
                                          const std::vector<torch::Tensor>& norms,
                                          const std::string& activation, bool norm_first,
                                          double eps, const std::string& post_op,
                                          const std::string& post_op_algorithm);
torch::Tensor decoder_layer_step(const DecoderLayerWeights& weights, const torch::Tensor& x,
                                 const std::vector<torch::Tensor>& self_attn,
                                 int64_t position, const std::vector<torch::Tensor>& cross_attn,
                                 int64_t group, bool pointwise, int64_t activate_max);
