// Dropout's random draws, shared by dropout_mask.cpp (a mask tensor) and train_attention.cpp
// (a mask made where it is used and made again for the backward pass, never stored).
//
// SplitMix64 (Steele, Lea and Flood 2014, the generator of Java's SplittableRandom) used as a
// counter-based generator: the 64-bit word at position w is mix(seed + (w + 1) * golden gamma),
// a function of the seed and the position alone, so any thread can make any part of a mask.
// Element e of a mask takes 16 bits of one word: blocks of kBlock elements, element
// lane * kWords + j of a block the lane-th 16 bits of the block's word j (so dropout_mask's
// stores are contiguous and its loops vectorize). It is kept where those bits are >= the cut.

#pragma once

#include <cstdint>

namespace qkv {

constexpr int64_t kWords = 64;
constexpr int64_t kBlock = 4 * kWords;  // mask elements per block
constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ull;

inline uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The 64-bit word at position w.
inline uint64_t word(uint64_t seed, uint64_t w) { return mix(seed + (w + 1) * kGamma); }

// The 16-bit draw of mask element e, as dropout_mask lays the draws out.
inline uint32_t draw(uint64_t seed, uint64_t e) {
  static_assert(kWords == 64 && kBlock == 256, "the shifts below");
  const uint64_t w = ((e >> 8) << 6) | (e & 63);  // block e / 256, word j = e % 64
  const uint64_t lane = (e >> 6) & 3;             // (e % 256) / 64
  return static_cast<uint32_t>(word(seed, w) >> (16 * lane)) & 0xFFFFu;
}

// Block b's kBlock mask elements: out[lane * kWords + j] = `on` where the lane-th 16 bits of
// word b * kWords + j are >= cut, else 0 (T float, or uint16_t for bf16's bits).
template <typename T>
inline void block_draws(uint64_t seed, int64_t b, uint32_t cut, T on, T* out) {
  uint64_t words[kWords];
  const uint64_t first = static_cast<uint64_t>(b) * kWords;
#pragma omp simd
  for (int64_t j = 0; j < kWords; ++j) words[j] = word(seed, first + j);
  for (int lane = 0; lane < 4; ++lane) {
    T* o = out + lane * kWords;
#pragma omp simd
    for (int64_t j = 0; j < kWords; ++j) {
      const uint32_t bits = static_cast<uint32_t>(words[j] >> (16 * lane)) & 0xFFFFu;
      o[j] = bits >= cut ? on : T(0);
    }
  }
}

}  // namespace qkv
