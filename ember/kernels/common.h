// ISA-independent pieces of Ember's CPU kernels: block geometry, the weight and decode-step
// descriptors, the bfloat16 KV element. kernels.h (AVX-512 VNNI) and isa_avx2.h (AVX2) build
// their vector code on these.
#pragma once
#include <stdint.h>
#include <string.h>

namespace {

constexpr int kBlock = 32;
constexpr int kTile = 16;
constexpr int kChunk = 8;  // activation rows sharing one unpacked weight block
constexpr int64_t kQ5BlockBytes = 352;  // Q5 tile block: 256 nibbles, 64 fifth bits, 16 fp16 d
constexpr int64_t kQ8hBlockBytes = 544;  // Q8h tile block: Q8's 512 code bytes, 16 fp16 d
constexpr int64_t kQ4kBlockBytes = 288;  // Q4K tile block: Q4's 256 nibbles, 16 u8 sc, 16 u8 m
constexpr int64_t kQ4kSuper = 8;  // Q4K blocks of 32 per d / dmin (GGUF Q4_K's 256 columns)

// A weight matrix in one of the kernel formats.
struct LinearW {
  int64_t fmt;  // 4 = Q4, 5 = Q5, 6 = Q4K, 7 = Q6 (q6_layers.h), 8 = Q8, 9 = Q8h (Q8 with float16 scales in its blocks)
  int64_t n, k;  // logical shape (out, in); outputs are padded to np = n rounded up to 16
  const uint8_t* w;
  const float* d;  // (unused for Q5: its scales are in w)
  const float* m;  // Q4 mins (unused for Q8)
};

// float16 bits -> float (exact; normals, subnormals, zeros, inf / nan).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, e = (h >> 10) & 0x1F,
                 m = h & 0x3FFu;
  uint32_t bits;
  if (e == 0) {
    if (m == 0) {
      bits = sign;
    } else {  // subnormal: m * 2^-24, exact in float
      const float f = static_cast<float>(m) * 5.9604644775390625e-8f;
      memcpy(&bits, &f, 4);
      bits |= sign;
    }
  } else if (e == 31) {
    bits = sign | 0x7F800000u | (m << 13);
  } else {
    bits = sign | ((e + 112) << 23) | (m << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

inline int64_t padded(int64_t n) { return (n + kTile - 1) / kTile * kTile; }

// KV caches hold bfloat16 (as uint16 bits): half the bytes long-context attention reads.
typedef uint16_t kv_t;

inline float bf16_to_float(kv_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

// Paged-cache geometry of one decode step.
struct DecodeCtx {
  const int64_t* block_tables;  // (B, max_blocks)
  int64_t max_blocks;
  const int64_t* lens;  // (B,)
  int64_t hq, hk, dim, block_size;
  float scale;
};

}  // namespace
