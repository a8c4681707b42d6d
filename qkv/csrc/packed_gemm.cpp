// y = x W^T + b on a weight packed once, for the linear layers of inference (qkv/packed.py).
//
// A plain matrix product re-lays W out into its kernel's blocked format on every call; with the
// few rows of a decoding step (one per sentence or beam) that copy costs as much as the
// arithmetic, and the weights come from far caches at every step. MKL's packed GEMM
// (cblas_sgemm_pack once, cblas_sgemm_compute on every call) keeps W in that format.
// PyTorch's x86 builds link MKL into libtorch_cpu and export these functions; the declarations
// are weak, so where a build lacks them `gemm_available()` is false and qkv/native.py says so.
//
// PyTorch's own op for it (torch.ops.mkl._mkl_linear) uses the packed copy only for the exact
// number of rows it was packed for and otherwise multiplies unpacked; decoding's rows change
// every time a sentence ends. tests/test_native.py checks this call against F.linear over
// rows, widths and depths.

#include <torch/extension.h>

#include <cstddef>
#include <cstring>

extern "C" {
// MKL's LP64 interface (32-bit integers). Enum values from its cblas header.
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                      const float* src, int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a,
                         int lda, const float* b, int ldb, float beta, float* c, int ldc)
    __attribute__((weak));
}

namespace {
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;
// The packed layout is MKL's own; the row count given to the packing is a hint for its
// blocking (results are the same for any number of rows). 160 rows, 32 sentences x 5 beams,
// did as well as 32 or 1024 at 1 to 672 rows on the machine bench/README.md names.
constexpr int kPackRows = 160;
}  // namespace

// out (m, n) = bias on every row, or left as it is (then the product writes it: beta 0).
static bool fill_bias(torch::Tensor& out, const torch::Tensor& bias, int64_t n) {
  if (bias.numel() == 0) return false;
  TORCH_CHECK(bias.numel() == n && bias.is_contiguous() && bias.scalar_type() == torch::kFloat32,
              "packed_linear: bias must be ", n, " contiguous fp32 values");
  const float* b = bias.data_ptr<float>();
  float* y = out.data_ptr<float>();
  const int64_t rows = n > 0 ? out.numel() / n : 0;  // out (..., n), contiguous
  for (int64_t i = 0; i < rows; ++i) std::memcpy(y + i * n, b, n * sizeof(float));
  return true;
}

bool gemm_available() {
  return cblas_sgemm_pack_get_size && cblas_sgemm_pack && cblas_sgemm_compute;
}

// w (N, K) fp32, the nn.Linear layout. Returns MKL's packed copy of W^T, a flat fp32 buffer.
torch::Tensor pack_weight(const torch::Tensor& w) {
  TORCH_CHECK(gemm_available(), "MKL's packed GEMM is not in this PyTorch build");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat32 && w.device().is_cpu(),
              "pack_weight: w must be a 2-D fp32 CPU tensor");
  auto wc = w.contiguous();
  const int n = wc.size(0), k = wc.size(1);
  const size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, kPackRows, n, k);
  auto packed = torch::empty({static_cast<int64_t>(bytes / sizeof(float) + 1)}, wc.options());
  cblas_sgemm_pack(kRowMajor, kBMatrix, kTrans, kPackRows, n, k, 1.0f, wc.data_ptr<float>(), k,
                   packed.data_ptr<float>());
  return packed;
}

// x (M, K) with a contiguous last dimension; packed from pack_weight of an (n, K) weight; bias
// (n) or empty. Returns (M, n), contiguous.
// x (..., K) fp32, any strides: its rows are made contiguous here where they are not (MKL
// reads rows of contiguous values, not overlapping ones). Returns (..., n). (The shapes are
// handled here rather than in Python, where a reshape and a view cost a few microseconds a
// call, at every layer of every decoding step.)
torch::Tensor packed_linear(const torch::Tensor& x_in, const torch::Tensor& packed,
                            const torch::Tensor& bias, int64_t n) {
  TORCH_CHECK(x_in.dim() >= 1 && x_in.scalar_type() == torch::kFloat32,
              "packed_linear: x must be fp32");
  auto x = x_in.reshape({-1, x_in.size(-1)});
  if (x.stride(1) != 1 || (x.size(0) > 1 && x.stride(0) < x.size(1))) x = x.contiguous();
  const int64_t m = x.size(0), k = x.size(1);
  auto sizes = x_in.sizes().vec();
  sizes.back() = n;
  auto y = torch::empty(sizes, x.options());
  const bool has_bias = fill_bias(y, bias, n);
  if (m == 0) return y;
  const int64_t lda = m == 1 ? k : x.stride(0);
  TORCH_CHECK(lda >= k, "packed_linear: x's rows overlap");
  cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, m, n, k, x.data_ptr<float>(), lda,
                      packed.data_ptr<float>(), n, has_bias ? 1.0f : 0.0f,
                      y.data_ptr<float>(), n);
  return y;
}
