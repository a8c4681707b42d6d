// y = x W^T + b with W in 8 bits and x quantized row by row on the fly: int8 inference's
// product (qkv/packed.py), on AMX's int8 tiles or AVX-512 VNNI's u8 x s8 dot products.
//
// Why: PyTorch's dynamic int8 product (fbgemm's or oneDNN's) costs 40 us or more a call on the
// Xeon of bench/README.md whatever the size, where a decoding step's small products need under
// 10 us of arithmetic: a small model's int8 greedy step was slower than CTranslate2's (bench/
// int8_gemm.py measures both). This is the same arithmetic with little around it:
//   - each weight row was quantized once to int8, symmetric (qkv/packed.py: its largest |w| is
//     127), and laid out here for the dot product (int8_pack);
//   - each input row is quantized to u8 with its own scale and zero point, its range stretched
//     to take in 0 (PyTorch's dynamic product quantizes the whole input with one scale, to 7
//     bits), so one row's large values cost no other row precision;
//   - AMX's TDPBUSD adds a 16 x 16 tile of 64-input u8 x s8 dot products at a time, VNNI's
//     VPDPBUSD four products into each of 16 int32 sums, both exactly (no saturation); then
//     y = sx * sw * (sum - zero_x * sum_k w) + b.
// Built only where the compiler targets AVX-512 VNNI (and DQ; -march=native, qkv/native.py);
// int8_available() says whether it was, and qkv/packed.py uses PyTorch's product elsewhere.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VNNI__)
#define QKV_INT8 1
#include <immintrin.h>
#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define QKV_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace {
std::atomic<bool> amx_allowed{true};  // int8_allow_amx: tests run the VNNI path too
}  // namespace

bool int8_available() {
#ifdef QKV_INT8
  return true;
#else
  return false;
#endif
}

namespace {

// The layout: columns in blocks of 16 (one register of int32 sums), and within a block the
// inputs in groups of 4 (one dot product's worth): block-major, then group, then column, then
// the group's 4 values. It is also AMX's layout for the right-hand tile of its dot product
// (16 groups by 16 columns x 4 values). K pads to a multiple of 64 (one tile's depth) and N to
// one of 16, with zero weights.
constexpr int64_t kCols = 16;
constexpr int64_t kGroup = 4;
constexpr int64_t kBlockBytes = kCols * kGroup;  // one group of one block: 64 bytes
constexpr int64_t kDepth = 64;                   // inputs per AMX tile

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }
int64_t groups_of(int64_t k) { return round_up(k, kDepth) / kGroup; }

}  // namespace

// q (N, K) int8, a weight quantized by rows. Returns {the packed weight (int8), each padded
// column's sum of its weights (int32, N rounded up to 16)}.
std::vector<torch::Tensor> int8_pack(const torch::Tensor& q_in) {
  TORCH_CHECK(q_in.dim() == 2 && q_in.scalar_type() == at::kChar && q_in.device().is_cpu(),
              "int8_pack: the weight must be a 2-D int8 CPU tensor");
  const auto q = q_in.contiguous();
  const int64_t n = q.size(0), k = q.size(1);
  const int64_t groups = groups_of(k), blocks = round_up(n, kCols) / kCols;
  auto packed = torch::zeros({blocks * groups * kBlockBytes}, q.options());
  auto sums = torch::zeros({blocks * kCols}, q.options().dtype(at::kInt));
  const int8_t* from = q.data_ptr<int8_t>();
  int8_t* to = packed.data_ptr<int8_t>();
  int32_t* sum = sums.data_ptr<int32_t>();
  for (int64_t row = 0; row < n; ++row) {
    const int64_t block = row / kCols, col = row % kCols;
    for (int64_t i = 0; i < k; ++i) {
      const int8_t w = from[row * k + i];
      to[(block * groups + i / kGroup) * kBlockBytes + col * kGroup + i % kGroup] = w;
      sum[row] += w;
    }
  }
  return {packed, sums};
}

#ifdef QKV_INT8
namespace {

// A row of x quantized to u8: q = clamp(round(x / scale) + zero, 0, 255), its range [min, max]
// stretched to take in 0, so scale = (max - min) / 255 and zero = round(-min / scale).
// Writes k values (the padding after them was zeroed by the caller). A row with a NaN or an
// infinity gets scale NaN, so its outputs are NaN, as fp32's would not be finite either (8 bits
// cannot hold it, and a finite output would hide it).
void quantize_row(const float* x, int64_t k, uint8_t* q, float* scale_out, int32_t* zero_out) {
  constexpr int kNotFinite = 0x01 | 0x08 | 0x10 | 0x80;  // VFPCLASS: NaNs, +inf, -inf
  __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
  __mmask16 bad = 0;
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    lo = _mm512_min_ps(lo, v);
    hi = _mm512_max_ps(hi, v);
    bad |= _mm512_fpclass_ps_mask(v, kNotFinite);
  }
  if (i < k) {  // the tail's missing lanes read as 0, inside the range already
    const __m512 v = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << (k - i)) - 1), x + i);
    lo = _mm512_min_ps(lo, v);
    hi = _mm512_max_ps(hi, v);
    bad |= _mm512_fpclass_ps_mask(v, kNotFinite);
  }
  if (bad) {
    *scale_out = std::numeric_limits<float>::quiet_NaN();
    *zero_out = 0;
    return;  // q stays zeros
  }
  const float min = _mm512_reduce_min_ps(lo), max = _mm512_reduce_max_ps(hi);
  // volatile: the scale as written, so that 1 / scale below is not rewritten as 255 / (max -
  // min) (-funsafe-math-optimizations allows that), which rounds differently: the tests
  // compute these same steps
  volatile float written = (max - min) * (1.0f / 255.0f);
  float scale = written;
  if (!std::isfinite(scale)) scale = max * (1.0f / 255.0f) - min * (1.0f / 255.0f);  // near 2^128
  if (!(scale > 0.0f)) scale = 1.0f;  // all zeros
  const float inverse = 1.0f / scale;
  const int32_t zero =
      std::min(255, std::max(0, static_cast<int32_t>(std::nearbyint(-min * inverse))));
  const __m512 inv = _mm512_set1_ps(inverse);
  const __m512i z = _mm512_set1_epi32(zero), floor = _mm512_setzero_si512();
  for (i = 0; i < k; i += 16) {
    const int64_t left = k - i;
    const __mmask16 m = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    // round to nearest even (the default rounding mode), shift, clamp below at 0; the unsigned
    // narrowing saturates above at 255
    __m512i r = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv)), z);
    r = _mm512_max_epi32(r, floor);
    _mm_mask_storeu_epi8(q + i, m, _mm512_cvtusepi32_epi8(r));
  }
  *scale_out = scale;
  *zero_out = zero;
}

struct Product {
  const uint8_t* a;  // quantized x, rows of `lda` bytes (AMX: rows padded to 16 with zeros)
  int64_t lda, m;
  const float* row_scale;
  const int32_t* row_zero;
  const int8_t* w;  // packed weight
  int64_t groups;   // groups of 4 inputs
  const float* col_scale;
  const int32_t* col_sum;
  const float* bias;  // or nullptr
  float* y;
  int64_t ldy, n;
};

// y[row, c..c+16) from its 16 exact sums: sx * sw * (sum - zero_x * sum_k w) + b.
inline void finish(const Product& p, int64_t row, int64_t c, __m512i acc) {
  const __mmask16 m = p.n - c >= kCols ? 0xFFFF : static_cast<__mmask16>((1u << (p.n - c)) - 1);
  const __m512i sum = _mm512_loadu_si512(p.col_sum + c);  // padded to 16
  const __m512i exact =
      _mm512_sub_epi32(acc, _mm512_mullo_epi32(_mm512_set1_epi32(p.row_zero[row]), sum));
  const __m512 scale =
      _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p.col_scale + c), _mm512_set1_ps(p.row_scale[row]));
  const __m512 bias = p.bias ? _mm512_maskz_loadu_ps(m, p.bias + c) : _mm512_setzero_ps();
  _mm512_mask_storeu_ps(p.y + row * p.ldy + c, m,
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), scale, bias));
}

// AVX-512 VNNI. Rows [row, row + R) by the blocks [block, block + B) of 16 columns: R x B
// registers of sums, each group of 4 inputs read once from the weight and once per row from x.
template <int R, int B>
void vnni_tile(const Product& p, int64_t row, int64_t block) {
  __m512i acc[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) acc[r][b] = _mm512_setzero_si512();
  const int8_t* w = p.w + block * p.groups * kBlockBytes;
  const uint8_t* a = p.a + row * p.lda;
  for (int64_t g = 0; g < p.groups; ++g) {
    __m512i wv[B];
    for (int b = 0; b < B; ++b)
      wv[b] = _mm512_loadu_si512(w + (b * p.groups + g) * kBlockBytes);
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, a + r * p.lda + g * kGroup, sizeof(four));
      const __m512i av = _mm512_set1_epi32(four);
      for (int b = 0; b < B; ++b) acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], av, wv[b]);
    }
  }
  for (int b = 0; b < B; ++b) {
    const int64_t c = (block + b) * kCols;
    if (c >= p.n) break;
    for (int r = 0; r < R; ++r) finish(p, row + r, c, acc[r][b]);
  }
}

// Up to 6 rows by 4 blocks: 24 registers of sums, 4 of weights, 1 of x, of AVX-512's 32.
constexpr int kRows = 6, kBlocks = 4;
using Tile = void (*)(const Product&, int64_t, int64_t);

template <int R>
constexpr std::array<Tile, kBlocks> row_of_tiles() {
  return {&vnni_tile<R, 1>, &vnni_tile<R, 2>, &vnni_tile<R, 3>, &vnni_tile<R, 4>};
}
constexpr std::array<std::array<Tile, kBlocks>, kRows> kTiles = {
    row_of_tiles<1>(), row_of_tiles<2>(), row_of_tiles<3>(),
    row_of_tiles<4>(), row_of_tiles<5>(), row_of_tiles<6>()};

void vnni_columns(const Product& p, int64_t first_block, int64_t end_block) {
  for (int64_t block = first_block; block < end_block; block += kBlocks) {
    const int64_t width = std::min<int64_t>(kBlocks, end_block - block);
    for (int64_t row = 0; row < p.m; row += kRows) {
      const int64_t height = std::min<int64_t>(kRows, p.m - row);
      kTiles[height - 1][width - 1](p, row, block);
    }
  }
}

#ifdef QKV_AMX
// AMX: tiles of 16 rows by 64 inputs (x, u8) and 64 inputs by 16 columns (W, s8, the packed
// layout as it is); TDPBUSD adds a 16 x 16 tile of their exact int32 dot products, 16k
// multiply-adds in one instruction, where a VNNI one does 64.

// Linux hands a process AMX's tile registers only once asked (arch_prctl); once per process.
bool amx_granted() {
  static const bool granted = [] {
    constexpr int kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XTILEDATA
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return granted;
}

// The tile registers' shapes: all eight 16 rows of 64 bytes. Sums: tiles 0-3 (two row tiles
// by two column blocks); x: tiles 4, 5; W: tiles 6, 7.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes[16] = {};
  uint8_t rows[16] = {};
};

void amx_configure() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.bytes[t] = 64, config.rows[t] = 16;
  _tile_loadconfig(&config);
}

// Rows [row, row + 16 * (1 + TwoRows)) by blocks [block, block + 1 + TwoBlocks).
template <bool TwoRows, bool TwoBlocks>
void amx_tile(const Product& p, int64_t row, int64_t block) {
  _tile_zero(0);
  if (TwoBlocks) _tile_zero(1);
  if (TwoRows) _tile_zero(2);
  if (TwoRows && TwoBlocks) _tile_zero(3);
  const uint8_t* a = p.a + row * p.lda;
  const int8_t* w = p.w + block * p.groups * kBlockBytes;
  const int64_t next_block = p.groups * kBlockBytes;
  for (int64_t g = 0; g < p.groups; g += kDepth / kGroup) {
    _tile_loadd(4, a + g * kGroup, p.lda);
    _tile_loadd(6, w + g * kBlockBytes, kBlockBytes);
    if (TwoRows) _tile_loadd(5, a + 16 * p.lda + g * kGroup, p.lda);
    if (TwoBlocks) _tile_loadd(7, w + next_block + g * kBlockBytes, kBlockBytes);
    _tile_dpbusd(0, 4, 6);
    if (TwoBlocks) _tile_dpbusd(1, 4, 7);
    if (TwoRows) _tile_dpbusd(2, 5, 6);
    if (TwoRows && TwoBlocks) _tile_dpbusd(3, 5, 7);
  }
  alignas(64) int32_t sums[4][16 * 16];
  _tile_stored(0, sums[0], 64);
  if (TwoBlocks) _tile_stored(1, sums[1], 64);
  if (TwoRows) _tile_stored(2, sums[2], 64);
  if (TwoRows && TwoBlocks) _tile_stored(3, sums[3], 64);
  for (int t = 0; t < 4; ++t) {
    const int64_t first = row + (t / 2) * 16, c = (block + t % 2) * kCols;
    if ((t / 2 && !TwoRows) || (t % 2 && !TwoBlocks) || c >= p.n) continue;
    for (int64_t r = 0; r < 16 && first + r < p.m; ++r)
      finish(p, first + r, c, _mm512_load_si512(sums[t] + r * 16));
  }
}

// The tiles are configured on every call, on each thread, and released after it: oneDNN's
// kernels use the same registers on the same threads and configure them before use (where
// lazily, by reading the configuration back from the CPU, not from a cache of their own), so
// neither disturbs the other.
void amx_columns(const Product& p, int64_t first_block, int64_t end_block) {
  amx_configure();
  for (int64_t block = first_block; block < end_block; block += 2) {
    const bool two_blocks = block + 1 < end_block;
    for (int64_t row = 0; row < p.m; row += 32) {
      const bool two_rows = row + 16 < p.m;
      if (two_rows && two_blocks) amx_tile<true, true>(p, row, block);
      else if (two_rows) amx_tile<true, false>(p, row, block);
      else if (two_blocks) amx_tile<false, true>(p, row, block);
      else amx_tile<false, false>(p, row, block);
    }
  }
  _tile_release();
}
#endif

bool use_amx() {
#ifdef QKV_AMX
  return amx_allowed.load(std::memory_order_relaxed) && amx_granted();
#else
  return false;
#endif
}

}  // namespace
#endif

bool int8_allow_amx(bool allowed) { return amx_allowed.exchange(allowed); }

// x (..., K) fp32; packed and col_sum from int8_pack of an (n, K) weight; col_scale (n) fp32,
// each weight row's scale; bias (n) or empty. Returns (..., n) fp32, contiguous.
torch::Tensor int8_linear(const torch::Tensor& x_in, const torch::Tensor& packed,
                          const torch::Tensor& col_scale, const torch::Tensor& col_sum,
                          const torch::Tensor& bias, int64_t n) {
#ifdef QKV_INT8
  TORCH_CHECK(x_in.dim() >= 1 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "int8_linear: x must be fp32 on the CPU");
  const auto x = x_in.reshape({-1, x_in.size(-1)}).contiguous();
  const int64_t m = x.size(0), k = x.size(1);
  const int64_t groups = groups_of(k), blocks = round_up(n, kCols) / kCols;
  TORCH_CHECK(packed.numel() == blocks * groups * kBlockBytes && packed.is_contiguous() &&
                  col_sum.numel() == blocks * kCols && col_scale.numel() == n &&
                  col_scale.scalar_type() == at::kFloat && col_scale.is_contiguous(),
              "int8_linear: the packed weight does not fit x (", k, " inputs, ", n,
              " outputs)");
  TORCH_CHECK(bias.numel() == 0 || (bias.numel() == n && bias.is_contiguous() &&
                                    bias.scalar_type() == at::kFloat),
              "int8_linear: bias must be ", n, " contiguous fp32 values");
  auto sizes = x_in.sizes().vec();
  sizes.back() = n;
  auto y = torch::empty(sizes, x.options());
  if (m == 0 || n == 0) return y;

  const int64_t lda = groups * kGroup;
  const bool amx = use_amx();
  std::vector<uint8_t> a((amx ? round_up(m, 16) : m) * lda, 0);
  std::vector<float> row_scale(m);
  std::vector<int32_t> row_zero(m);
  const float* xs = x.data_ptr<float>();
  for (int64_t r = 0; r < m; ++r)
    quantize_row(xs + r * k, k, a.data() + r * lda, &row_scale[r], &row_zero[r]);

  const Product p{a.data(),
                  lda,
                  m,
                  row_scale.data(),
                  row_zero.data(),
                  packed.data_ptr<int8_t>(),
                  groups,
                  col_scale.data_ptr<float>(),
                  col_sum.data_ptr<int32_t>(),
                  bias.numel() ? bias.data_ptr<float>() : nullptr,
                  y.data_ptr<float>(),
                  n,
                  n};
  // Threads split the columns, kBlocks blocks at a time (each reads its part of W once, all of
  // x's few rows many times); a task does at least ~2^20 multiply-adds, so small products stay
  // on one thread.
  const int64_t chunks = (blocks + kBlocks - 1) / kBlocks;
  const int64_t grain = std::max<int64_t>(1, (1 << 20) / (m * lda * kBlocks * kCols));
  at::parallel_for(0, chunks, grain, [&](int64_t begin, int64_t end) {
    const int64_t first = begin * kBlocks, last = std::min(blocks, end * kBlocks);
#ifdef QKV_AMX
    if (amx) return amx_columns(p, first, last);
#endif
    vnni_columns(p, first, last);
  });
  return y;
#else
  TORCH_CHECK(false, "int8_linear: this build's CPU has no AVX-512 VNNI");
#endif
}
