// The Python module of qkv's C++ kernels (qkv/native.py builds and loads it).

#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention,
        "softmax(q k^T / sqrt(Dh)) v for a few queries per row (decode_attention.cpp)");
  m.def("log_softmax_", &log_softmax_, "each row's log-softmax, in place (choose.cpp)");
  m.def("argmax_rows", &argmax_rows, "each row's first largest score's position (choose.cpp)");
  m.def("beam_topk", &beam_topk, "each sentence's best extensions of its K beams (choose.cpp)");
  m.def("dropout_mask", &dropout_mask, "dropout's scaled mask, counter-based (dropout_mask.cpp)");
  m.def("relu_dropout", &relu_dropout, "relu(x) * dropout's mask (dropout_fused.cpp)");
  m.def("relu_dropout_backward", &relu_dropout_backward, "relu_dropout's backward, from its output");
  m.def("add_dropout", &add_dropout, "x + y * dropout's mask (dropout_fused.cpp)");
  m.def("add_dropout_backward", &add_dropout_backward, "add_dropout's gradient for y");
  m.def("layer_norm_bf16", &layer_norm_bf16,
        "layer norm of fp32 rows to bf16, with each row's mean and 1/std (layer_norm.cpp)");
  m.def("layer_norm_bf16_backward", &layer_norm_bf16_backward,
        "layer_norm_bf16's gradients of x, the weight and the bias (layer_norm.cpp)");
  m.def("train_attention_forward", &train_attention_forward,
        "attention with dropout for training: the output and each query's log-sum-exp "
        "(train_attention.cpp)");
  m.def("train_attention_backward", &train_attention_backward,
        "train_attention_forward's gradients of q, k and v (train_attention.cpp)");
  m.def("smoothed_cross_entropy_rows", &smoothed_cross_entropy_rows,
        "a chunk's label-smoothed cross-entropy and its gradient (cross_entropy.cpp)");
  m.def("activate_", &activate_, "GELU or SiLU in place (pointwise.cpp)");
  m.def("add_layer_norm", &add_layer_norm, "norm(x + y), a post-LN skip connection (pointwise.cpp)");
  m.def("gemm_available", &gemm_available, "whether MKL's packed GEMM is linked (packed_gemm.cpp)");
  m.def("pack_weight", &pack_weight, "an (N, K) weight packed for packed_linear");
  m.def("packed_linear", &packed_linear, "x W^T + b on a packed weight (packed_gemm.cpp)");
  m.def("int8_available", &int8_available, "whether int8_linear was built (int8_gemm.cpp)");
  m.def("int8_allow_amx", &int8_allow_amx,
        "whether int8_linear may use AMX where it can (tests turn it off); returns the last");
  m.def("int8_pack", &int8_pack, "an (N, K) int8 weight laid out for int8_linear");
  m.def("int8_linear", &int8_linear, "x W^T + b, W int8, x quantized by rows (int8_gemm.cpp)");
  py::class_<DecoderLayerWeights>(m, "DecoderLayerWeights");
  m.def("decoder_layer_weights", &decoder_layer_weights,
        "a decoder layer's weights, gathered once for its C++ step (decoder_step.cpp)");
  // Python objects are converted before the call, so the step lets other threads run
  m.def("decoder_layer_step", &decoder_layer_step,
        "one decoder layer's decoding step, its kernels called in turn (decoder_step.cpp)",
        py::call_guard<py::gil_scoped_release>());
}
