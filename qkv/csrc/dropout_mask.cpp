// Dropout's mask for training on the CPU (qkv/dropout.py): each element kept with probability
// 1 - cut / 65536 and then worth `scale`, else 0, written in the activations' dtype (fp32 or
// bf16) in one pass.
//
// PyTorch's route drew 64-bit integers with its Mersenne Twister (`random_`), compared their
// 16-bit pieces with the cut (`ge`), converted and scaled the result: four passes, the first a
// serial generator. Here the bits come from a counter-based generator (dropout_bits.h), so the
// mask does not depend on how the work was split. The seed is drawn from PyTorch's generator by
// the caller, so torch.manual_seed and a checkpoint's saved generator state reproduce the masks.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "dropout_bits.h"

namespace {

using qkv::kBlock;

template <typename T>
void fill(T* out, int64_t n, uint64_t seed, uint32_t cut, T on) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 64, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t start = b * kBlock;
      if (start + kBlock <= n) {
        qkv::block_draws(seed, b, cut, on, out + start);
      } else {  // the last, partial block: made whole, then the part needed copied
        T tail[kBlock];
        qkv::block_draws(seed, b, cut, on, tail);
        std::memcpy(out + start, tail, sizeof(T) * (n - start));
      }
    }
  });
}

}  // namespace

// A mask like `like` (its shape, fp32 or bf16): scale where kept, 0 where dropped (probability
// cut / 65536); the same for the same seed, whatever the thread count.
torch::Tensor dropout_mask(const torch::Tensor& like, int64_t cut, double scale, int64_t seed) {
  TORCH_CHECK(cut >= 0 && cut <= 65536, "dropout_mask: cut in [0, 65536]");
  TORCH_CHECK(like.scalar_type() == at::kFloat || like.scalar_type() == at::kBFloat16,
              "dropout_mask: fp32 or bf16");
  auto out = torch::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = out.numel();
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint32_t c = static_cast<uint32_t>(cut);
  if (out.scalar_type() == at::kFloat) {
    fill<float>(out.data_ptr<float>(), n, s, c, static_cast<float>(scale));
  } else {
    const at::BFloat16 on(static_cast<float>(scale));
    uint16_t bits;
    std::memcpy(&bits, &on, sizeof bits);
    fill<uint16_t>(reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), n, s, c, bits);
  }
  return out;
}
