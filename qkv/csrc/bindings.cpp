// The Python module of qkv's C++ kernels (qkv/native.py builds and loads it).

#include <torch/extension.h>

torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v, const torch::Tensor& keep,
                               const torch::Tensor& table);
void log_softmax_(torch::Tensor& x);
torch::Tensor argmax_rows(const torch::Tensor& x);
std::vector<torch::Tensor> beam_topk(const torch::Tensor& log_probs, const torch::Tensor& scores,
                                     int64_t k, int64_t want);
torch::Tensor dropout_mask(const torch::Tensor& like, int64_t cut, double scale, int64_t seed);
double smoothed_cross_entropy_rows(const torch::Tensor& scores, const torch::Tensor& target,
                                   double eps, const torch::Tensor& grad);
void activate_(torch::Tensor& x, const std::string& kind);
torch::Tensor add_layer_norm(const torch::Tensor& x, const torch::Tensor& y,
                             const torch::Tensor& weight, const torch::Tensor& bias, double eps);
bool gemm_available();
torch::Tensor pack_weight(const torch::Tensor& w);
torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& packed,
                            const torch::Tensor& bias, int64_t n);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention,
        "softmax(q k^T / sqrt(Dh)) v for a few queries per row (decode_attention.cpp)");
  m.def("log_softmax_", &log_softmax_, "each row's log-softmax, in place (choose.cpp)");
  m.def("argmax_rows", &argmax_rows, "each row's first largest score's position (choose.cpp)");
  m.def("beam_topk", &beam_topk, "each sentence's best extensions of its K beams (choose.cpp)");
  m.def("dropout_mask", &dropout_mask, "dropout's scaled mask, counter-based (dropout_mask.cpp)");
  m.def("smoothed_cross_entropy_rows", &smoothed_cross_entropy_rows,
        "a chunk's label-smoothed cross-entropy and its gradient (cross_entropy.cpp)");
  m.def("activate_", &activate_, "GELU or SiLU in place (pointwise.cpp)");
  m.def("add_layer_norm", &add_layer_norm, "norm(x + y), a post-LN skip connection (pointwise.cpp)");
  m.def("gemm_available", &gemm_available, "whether MKL's packed GEMM is linked (packed_gemm.cpp)");
  m.def("pack_weight", &pack_weight, "an (N, K) weight packed for packed_linear");
  m.def("packed_linear", &packed_linear, "x W^T + b on a packed weight (packed_gemm.cpp)");
}
