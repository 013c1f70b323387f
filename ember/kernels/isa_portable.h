// Portable versions of kernels.h's building blocks (same names, signatures and weight layouts):
// plain C++ loops, no intrinsics, written so the compiler vectorises them for the host it is
// built on (build.py compiles this flavour with -march=native on x86-64, -mcpu=native on ARM:
// AVX2 / NEON / SVE code from the same source). Chosen on CPUs none of the hand-written ISAs
// runs on (ARM, x86 without AVX2), or forced with EMBER_CPU_ISA=portable.
//
// Integer dot products, the one hot loop, run on GCC/Clang generic vectors of 16 int16 lanes
// in the packed byte order (no deinterleaving): a 32-byte half of a weight vector is 8 rows x
// 2 byte pairs, each nibble / byte position a column of int16 lanes multiplied by one
// broadcast activation pair, and a lane's two pairs summed into the row's int32 at the end of
// a block (see q4_tile / q8_tile below; bounds there). On x86 that is vpmullw / vpaddw, on
// NEON mul / mla .8h: one product per int16 lane where AVX2's maddubs makes two per lane
// (u8 x s8 pairs), so the portable dot has twice AVX2's multiplies per block: the floor
// without byte dot-product instructions (NEON's sdot / usdot would be the next step on ARM).
// The float math after the integer dot (activation scales, two FMAs per block and lane) is
// the AVX2 / AVX-512 kernels', lane for lane; the sums of norms, softmax and attention keep
// the AVX2 kernels' order (8 partial sums), so with the compiler's FMA contraction the
// portable build on an x86 host gives the AVX2 build's logits (tests/unit/test_kernels.py,
// the SmolLM2 greedy test of tests/models/test_portable_kernels.py).
// `vfloat` of attention.h's shared flash attention is a GCC/Clang generic vector of 8 floats
// (vector_size: the compiler lowers it to whatever the target has; no intrinsics).
#pragma once
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "common.h"

// A value pinned to a vector register (an empty asm naming it): the compiler can neither
// fold it into another instruction nor reorder the arithmetic across it. The constraint names
// a vector register: "x" on x86, "w" on AArch64; elsewhere no pin.
// NOTE: on AArch64 "w" is one 16-byte NEON register: GCC 12 accepts the 32-byte int16 vectors
// of the dot loops (a register pair) but not 32-byte float vectors ("impossible constraint"),
// so float vectors are pinned on x86 only (EMBER_PIN_FLOAT; checked with
// aarch64-linux-gnu-g++-12 -mcpu=neoverse-n1).
#if defined(__x86_64__) || defined(__i386__)
#define EMBER_PIN(v) __asm__("" : "+x"(v))
#define EMBER_PIN_FLOAT 1
#elif defined(__aarch64__)
#define EMBER_PIN(v) __asm__("" : "+w"(v))
#define EMBER_PIN_FLOAT 0
#else
#define EMBER_PIN(v) ((void)0)
#define EMBER_PIN_FLOAT 0
#endif

#if defined(__has_builtin)
#if __has_builtin(__builtin_assoc_barrier)
#define EMBER_ASSOC_BARRIER(x) __builtin_assoc_barrier(x)
#endif
#endif
#ifndef EMBER_ASSOC_BARRIER
#define EMBER_ASSOC_BARRIER(x) (x)
#endif

// a * b rounded on its own, never contracted into an FMA with a later add (the vector
// kernels' separate multiply). NOTE: pinned rather than behind __builtin_assoc_barrier, which
// GCC 12 lowers for 8-float vectors into ~9 lane shuffles (extract, valignd, unpck, insert)
// per product: a quarter of the portable Q4 GEMM's time went to them.
template <class V, class B>
inline V mul_no_contract(V a, B b) {  // b: a vector like a, or a scalar (every lane)
  V p = a * b;
#if EMBER_PIN_FLOAT
  EMBER_PIN(p);
  return p;
#else
  return EMBER_ASSOC_BARRIER(p);
#endif
}

// attention.h prefetches with the x86 spelling; here it is the compiler's generic builtin.
#ifndef _MM_HINT_T0
#define _MM_HINT_T0 3
#define _mm_prefetch(p, hint) __builtin_prefetch((p), 0, (hint))
#endif

// a * b + c: contracted to one FMA where the target has one (-ffp-contract=fast), never a
// libm call on targets without.
#define EMBER_MADD(a, b, c) ((a) * (b) + (c))

namespace {

// Activations (M, K) quantized once per call: qx (M, K) int8, dx (M, K/32) scales,
// sx (M, K/32) = dx * sum(qx) (the Q4 min term), si (M, K/32) = 128 * sum(qx) (unused here);
// q16: qx widened to int16 once, each 4 consecutive values in pair order (x0, x2, x1, x3):
// the int32 at 2 p of a group is the activation pair the dot loops broadcast (pair_pattern).
typedef float vqf8 __attribute__((vector_size(32)));  // QuantizedActs' 8-value steps
typedef int32_t vqi8 __attribute__((vector_size(32)));
typedef int16_t vqh8 __attribute__((vector_size(16)));
typedef int8_t vqb8 __attribute__((vector_size(8)));

struct QuantizedActs {
  int64_t nb = 0;
  std::vector<int8_t> q;
  std::vector<int16_t> q16;
  std::vector<float> d, s;
  std::vector<int32_t> si;
  QuantizedActs(int64_t mrows, int64_t k)
      : nb(k / kBlock), q(static_cast<size_t>(mrows * k)), q16(static_cast<size_t>(mrows * k)),
        d(static_cast<size_t>(mrows * nb)), s(static_cast<size_t>(mrows * nb)),
        si(static_cast<size_t>(mrows * nb)) {}
  QuantizedActs(const float* x, int64_t mrows, int64_t k) : QuantizedActs(mrows, k) {
    for (int64_t i = 0; i < mrows; ++i) quantize_row(x + i * k, i);
  }
  void quantize_row(const float* __restrict x, int64_t i) {
    for (int64_t b = i * nb; b < (i + 1) * nb; ++b) {
      const float* __restrict xb = x + (b - i * nb) * kBlock;
      float amax = 0.0f;
#pragma omp simd reduction(max : amax)
      for (int j = 0; j < kBlock; ++j) amax = std::max(amax, fabsf(xb[j]));
      const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
      int8_t* __restrict qb = &q[static_cast<size_t>(b * kBlock)];
      int16_t* __restrict qw = &q16[static_cast<size_t>(b * kBlock)];
      // round to nearest even, as the vector kernels' float -> int conversion; the clamp, the
      // conversions and the stores on generic vectors, 8 values at a time (NOTE: a plain loop
      // doing all of it stayed scalar, ~6x slower: GCC 12 did not vectorise it)
      float r[kBlock];
#pragma omp simd
      for (int j = 0; j < kBlock; ++j) r[j] = rintf(xb[j] * id);
      vqi8 tot = vqi8{};
      for (int c = 0; c < kBlock / 8; ++c) {
        vqf8 v;
        memcpy(&v, r + 8 * c, sizeof(v));
        v = v < -128.0f ? -128.0f : v;
        v = v > 127.0f ? 127.0f : v;
        const vqi8 iv = __builtin_convertvector(v, vqi8);
        tot += iv;
        const vqh8 h = __builtin_convertvector(iv, vqh8);
        const vqb8 q8 = __builtin_convertvector(h, vqb8);
        memcpy(qb + 8 * c, &q8, sizeof(q8));
        // pair order (see pair_pattern)
        const vqh8 hp = __builtin_shufflevector(h, h, 0, 2, 1, 3, 4, 6, 5, 7);
        memcpy(qw + 8 * c, &hp, sizeof(hp));
      }
      const int32_t total = ((tot[0] + tot[4]) + (tot[2] + tot[6])) + ((tot[1] + tot[5]) + (tot[3] + tot[7]));
      d[static_cast<size_t>(b)] = amax / 127.0f;
      s[static_cast<size_t>(b)] = amax / 127.0f * static_cast<float>(total);
      si[static_cast<size_t>(b)] = 128 * total;
    }
  }
  const int8_t* qrow(int64_t i) const { return q.data() + i * nb * kBlock; }
  const int16_t* qrow16(int64_t i) const { return q16.data() + i * nb * kBlock; }
};

// ---- integer dot products on generic vectors (GCC / Clang vector_size) --------------------
// A 32-byte half of a weight vector ([8 rows][4 bytes], cpu_kernels.cpp) read as 16 uint16
// lanes is lane = (row, pair q): the bytes e = 2q (low byte) and e = 2q + 1 (high byte) of
// that row. Each weight "column" (one byte position, one nibble for Q4) is then 16 int16 lanes
// that multiply one activation pair pattern (x[k], x[k + 2]) broadcast as an int32; a lane's
// two pairs are summed into the row's int32 at the end (pair_sum). No deinterleaving, no
// horizontal sums: shifts, masks, int16 multiply-adds (AVX2 vpmullw / NEON mul.8h).
typedef int16_t vi16 __attribute__((vector_size(32)));
typedef uint16_t vu16 __attribute__((vector_size(32)));
typedef int32_t vi32 __attribute__((vector_size(32)));

inline vu16 load_u16x16(const uint8_t* p) {
  vu16 v;
  memcpy(&v, p, sizeof(v));
  return v;
}

// The activation pair (x[4g + j], x[4g + j + 2]) of group g (j = 0, 1) broadcast to 8 int32
// lanes, seen as 16 int16 lanes (q16's pair order makes it one aligned int32).
// NOTE: on 16-byte-vector targets (NEON) GCC 12 builds a 32-byte splat through general
// registers and the stack; two 16-byte splats copied in lower to one ld1r there. On x86 the
// 32-byte splat is one vpbroadcastd (the two-copy form would go through the stack instead).
inline vi16 pair_pattern(const int16_t* x16, int g, int j) {
  int32_t v;
  memcpy(&v, x16 + 4 * g + 2 * j, 4);
#if defined(__aarch64__) || defined(__ARM_NEON)
  typedef int32_t vi32x4 __attribute__((vector_size(16)));
  const vi32x4 half = vi32x4{} + v;
  vi16 p;
  memcpy(&p, &half, 16);
  memcpy(reinterpret_cast<char*>(&p) + 16, &half, 16);
  return p;
#else
  return reinterpret_cast<vi16>(vi32{} + v);
#endif
}

// int16 lanes (row, q) -> the 8 rows' int32 sums lane(row, 0) + lane(row, 1), exact.
inline vi32 pair_sum(vi16 s) {
  const vi32 a = reinterpret_cast<vi32>(s);
  return ((a << 16) >> 16) + (a >> 16);
}

// Per-block float scales of the Q4-family tiles (q4_tile's S): the block's 16 scales and mins
// (scales / mins: pointers to them, formed in the scratch bd / bm where they are computed).
// kBytes: a block's bytes; kLines: its 128-byte prefetch lines.
struct Q4Scales {  // Q4: stored per block, (tiles, K/32, 16) float32 each
  static constexpr int64_t kBytes = 256;
  static constexpr int kLines = 2;
  const float* __restrict d;
  const float* __restrict m;
  const float* scales(int64_t b, const uint8_t*, float*) const { return d + b * kTile; }
  const float* mins(int64_t b, const uint8_t*, float*) const { return m + b * kTile; }
};

// Q4K (layout: isa_avx2.h Q4kScales): the block's scale d sc and offset -dmin m, exact in
// float32, so q4_tile's math gives the Q4 repack's outputs.
struct Q4kScales {
  static constexpr int64_t kBytes = kQ4kBlockBytes;
  static constexpr int kLines = 3;
  const float* __restrict d;
  const float* __restrict nm;
  const float* scales(int64_t b, const uint8_t* wb, float* bd) const {
    const float* __restrict ds = d + (b / kQ4kSuper) * kTile;
    for (int l = 0; l < kTile; ++l) bd[l] = ds[l] * static_cast<float>(wb[256 + l]);
    return bd;
  }
  const float* mins(int64_t b, const uint8_t* wb, float* bm) const {
    const float* __restrict ms = nm + (b / kQ4kSuper) * kTile;
    for (int l = 0; l < kTile; ++l) bm[l] = ms[l] * static_cast<float>(wb[272 + l]);
    return bm;
  }
};

// One 16-row tile of Q4-family weights (Q4, Q4K: the same nibble bytes, S's scales) against
// C (<= kChunk) activation rows starting at m0; S is a template parameter (each format's tile
// is its own straight-line code).
// Per block and half h (rows 8h..8h+7): 4 vectors c x 4 columns (low/high byte x low/high
// nibble: k = 4c + 2q, 4c + 2q + 1, 16 + 4c + 2q, 17 + 4c + 2q), unpacked once and shared by
// the C rows. A lane sums 16 products: 16 * 15 * 128 = 30720 < 32767 fits int16.
// The float math per block and lane is the AVX2 kernel's (same FMAs): bit-identical outputs.
template <int C, class S>
inline void q4_tile(const uint8_t* __restrict w, S sc, const QuantizedActs& a, int64_t m0,
                    float* __restrict y, int64_t n) {
  float acc[C][kTile];
  for (int c = 0; c < C; ++c)
    for (int l = 0; l < kTile; ++l) acc[c][l] = 0.0f;
  for (int64_t b = 0; b < a.nb; ++b) {
    const uint8_t* __restrict wb = w + b * S::kBytes;
    for (int i = 0; i < S::kLines; ++i) __builtin_prefetch(wb + 8 * S::kBytes + 128 * i, 0, 3);
    vi16 wc[2][4][4];  // [half][vector c][column]
    for (int h = 0; h < 2; ++h)
      for (int c = 0; c < 4; ++c) {
        const vu16 raw = load_u16x16(wb + 64 * c + 32 * h);
        wc[h][c][0] = reinterpret_cast<vi16>(raw & 15);
        wc[h][c][1] = reinterpret_cast<vi16>((raw >> 8) & 15);
        wc[h][c][2] = reinterpret_cast<vi16>((raw >> 4) & 15);
        wc[h][c][3] = reinterpret_cast<vi16>(raw >> 12);
      }
    float bd[kTile], bm[kTile];
    const float* __restrict db = sc.scales(b, wb, bd);
    const float* __restrict mb = sc.mins(b, wb, bm);
    for (int r = 0; r < C; ++r) {
      const int16_t* __restrict x16 = a.qrow16(m0 + r) + b * kBlock;
      int32_t dot[kTile];
      for (int h = 0; h < 2; ++h) {
        vi16 s = vi16{};
        for (int c = 0; c < 4; ++c)
          s += wc[h][c][0] * pair_pattern(x16, c, 0) + wc[h][c][1] * pair_pattern(x16, c, 1) +
               wc[h][c][2] * pair_pattern(x16, 4 + c, 0) +
               wc[h][c][3] * pair_pattern(x16, 4 + c, 1);
        const vi32 s32 = pair_sum(s);
        memcpy(dot + 8 * h, &s32, sizeof(s32));
      }
      const size_t ab = static_cast<size_t>((m0 + r) * a.nb + b);
      const float ad = a.d[ab], as = a.s[ab];
      float* __restrict ac = acc[r];
#pragma omp simd
      for (int l = 0; l < kTile; ++l)
        ac[l] = EMBER_MADD(mb[l], as, EMBER_MADD(static_cast<float>(dot[l]), db[l] * ad, ac[l]));
    }
  }
  for (int c = 0; c < C; ++c)
    for (int l = 0; l < kTile; ++l) y[(m0 + c) * n + l] = acc[c][l];
}

// Q8: per block and half, 8 vectors j x 2 columns (low / high byte: k = 4j + 2q, 4j + 2q + 1)
// of signed weights q = u - 128 (the xor flips the offset into the sign: u ^ 0x80 = q as
// int8); a vector's two products per lane (2 * 127 * 128 = 32512) fit int16, then pair_sum
// widens them into the row's int32 sum.
// H (Q8h): the block's 16 scales are float16 after its 512 code bytes (d unused).
template <int C, bool H = false>
inline void q8_tile(const uint8_t* __restrict w, const float* __restrict d,
                    const QuantizedActs& a, int64_t m0, float* __restrict y, int64_t n) {
  float acc[C][kTile];
  for (int c = 0; c < C; ++c)
    for (int l = 0; l < kTile; ++l) acc[c][l] = 0.0f;
  for (int64_t b = 0; b < a.nb; ++b) {
    const uint8_t* __restrict wb = w + b * (H ? kQ8hBlockBytes : 512);
    for (int j = 0; j < 4; ++j) __builtin_prefetch(wb + 8 * (H ? kQ8hBlockBytes : 512) + 128 * j, 0, 3);
    vi16 wq[2][8][2];  // [half][vector j][column]
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 8; ++j) {
        const vi16 s = reinterpret_cast<vi16>(load_u16x16(wb + 64 * j + 32 * h) ^ 0x8080);
        wq[h][j][0] = (s << 8) >> 8;  // low byte, sign-extended
        wq[h][j][1] = s >> 8;         // high byte
      }
    float dh[kTile];
    if (H)
      for (int l = 0; l < kTile; ++l) {
        uint16_t v;
        memcpy(&v, wb + 512 + 2 * l, 2);
        dh[l] = half_to_float(v);
      }
    const float* __restrict db = H ? dh : d + b * kTile;
    for (int r = 0; r < C; ++r) {
      const int16_t* __restrict x16 = a.qrow16(m0 + r) + b * kBlock;
      int32_t dot[kTile];
      for (int h = 0; h < 2; ++h) {
        vi32 s32 = vi32{};
        for (int j = 0; j < 8; ++j)
          s32 += pair_sum(wq[h][j][0] * pair_pattern(x16, j, 0) +
                          wq[h][j][1] * pair_pattern(x16, j, 1));
        memcpy(dot + 8 * h, &s32, sizeof(s32));
      }
      const size_t ab = static_cast<size_t>((m0 + r) * a.nb + b);
      const float ad = a.d[ab];
      float* __restrict ac = acc[r];
#pragma omp simd
      for (int l = 0; l < kTile; ++l)
        ac[l] = EMBER_MADD(static_cast<float>(dot[l]), db[l] * ad, ac[l]);
    }
  }
  for (int c = 0; c < C; ++c)
    for (int l = 0; l < kTile; ++l) y[(m0 + c) * n + l] = acc[c][l];
}

// Q5 (w = d (u - 16), u in [0, 31]; layout: isa_avx2.h q5_tile): the codes are unpacked to
// signed int16 per block and dotted in int32 with plain loops (exact: the Q8 kernel's dot on
// the same codes), then the Q8 kernel's float math.
template <int C>
inline void q5_tile(const uint8_t* __restrict w, const QuantizedActs& a, int64_t m0,
                    float* __restrict y, int64_t n) {
  float acc[C][kTile];
  for (int c = 0; c < C; ++c)
    for (int l = 0; l < kTile; ++l) acc[c][l] = 0.0f;
  for (int64_t b = 0; b < a.nb; ++b) {
    const uint8_t* __restrict wb = w + b * kQ5BlockBytes;
    __builtin_prefetch(wb + 2816, 0, 3);
    __builtin_prefetch(wb + 2816 + 128, 0, 3);
    __builtin_prefetch(wb + 2816 + 256, 0, 3);
    int16_t wq[kTile][kBlock];  // [row][column]
    for (int l = 0; l < kTile; ++l)
      for (int i = 0; i < 4; ++i) {
        const uint8_t hb = wb[256 + 4 * l + i];
        for (int c = 0; c < 4; ++c) {
          const uint8_t raw = wb[64 * c + 4 * l + i];
          wq[l][4 * c + i] = static_cast<int16_t>(((raw & 15) | (((hb >> c) & 1) << 4)) - 16);
          wq[l][4 * (c + 4) + i] =
              static_cast<int16_t>(((raw >> 4) | (((hb >> (c + 4)) & 1) << 4)) - 16);
        }
      }
    float db[kTile];
    for (int l = 0; l < kTile; ++l) {
      uint16_t h;
      memcpy(&h, wb + 320 + 2 * l, 2);
      db[l] = half_to_float(h);
    }
    for (int r = 0; r < C; ++r) {
      const int8_t* __restrict xq = a.qrow(m0 + r) + b * kBlock;
      int32_t dot[kTile];
      for (int l = 0; l < kTile; ++l) {
        int32_t s = 0;
#pragma omp simd reduction(+ : s)
        for (int k = 0; k < kBlock; ++k) s += static_cast<int32_t>(wq[l][k]) * xq[k];
        dot[l] = s;
      }
      const size_t ab = static_cast<size_t>((m0 + r) * a.nb + b);
      const float ad = a.d[ab];
      float* __restrict ac = acc[r];
#pragma omp simd
      for (int l = 0; l < kTile; ++l)
        ac[l] = EMBER_MADD(static_cast<float>(dot[l]), db[l] * ad, ac[l]);
    }
  }
  for (int c = 0; c < C; ++c)
    for (int l = 0; l < kTile; ++l) y[(m0 + c) * n + l] = acc[c][l];
}

#include "q6_layers.h"  // q6x_tile: Q6 layers (GGUF Q6_K exact)
}  // namespace
#include "gemm_rows.h"  // tile_rows, gemm_row_tiles: the row tiles above, all formats
#include "portable_prefill.h"
namespace {

// y (M, np) = act @ W^T over the tiles of W. Worksharing only: call inside a parallel region.
// Prefill chunks take portable_prefill.h's kernel where its allow-list (many_rows_supported)
// has the format; every other call, and every other format, the row tiles (gemm_rows.h,
// bit-identical).
inline void gemm_tiles(const LinearW& lw, const QuantizedActs& a, int64_t mrows, float* y) {
  if (many_rows_supported(lw, mrows)) return gemm_tiles_many_portable(lw, a, mrows, y);
  gemm_row_tiles(lw, a, mrows, y);
}

// The sum of 8 partial sums in the AVX2 kernels' order (hsum8 of isa_avx2.h), so both
// builds round alike: ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7)).
inline float sum8(const float* v) {
  return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

inline void rms_norm_row(float* __restrict x, const float* __restrict residual,
                         const float* __restrict w, int64_t h, float eps,
                         float* __restrict out) {
  float ss[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};  // 8 partial sums, as AVX2
  int64_t j = 0;
  for (; j + 8 <= h; j += 8)
    for (int i = 0; i < 8; ++i) {
      float v = x[j + i];
      if (residual) {
        v += residual[j + i];
        x[j + i] = v;
      }
      ss[i] = v * v + ss[i];
    }
  float s = sum8(ss);
  for (; j < h; ++j) {
    if (residual) x[j] += residual[j];
    s += x[j] * x[j];
  }
  const float inv = 1.0f / sqrtf(s / static_cast<float>(h) + eps);
#pragma omp simd
  for (j = 0; j < h; ++j) out[j] = x[j] * inv * w[j];
}

// exp(x): the vector kernels' polynomial (2^n * 2^f, |f| <= 1/2, degree 6, relative error
// ~2e-7), 2^n built in the exponent bits; inlined into simd loops it vectorises.
// NOTE: the loops calling it (SiLU, softmax) vectorise only without trapping math: build.py
// builds the portable flavour with -fno-trapping-math, else GCC 12 keeps the clamps as
// branches ("control flow in loop") and the whole loop scalar. Values are unchanged.
inline float exp_approx(float x) {
  x = x < 88.0f ? x : 88.0f;
  x = x > -87.0f ? x : -87.0f;
  const float t = x * 1.44269504088896341f;
  const float n = rintf(t);
  const float f = t - n;
  float p = 1.535336188319500e-4f;
  p = EMBER_MADD(p, f, 1.339887440266574e-3f);
  p = EMBER_MADD(p, f, 9.618437357674640e-3f);
  p = EMBER_MADD(p, f, 5.550332471162809e-2f);
  p = EMBER_MADD(p, f, 2.402264791363012e-1f);
  p = EMBER_MADD(p, f, 6.931472028550421e-1f);
  p = EMBER_MADD(p, f, 1.0f);
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;  // n in [-126, 127]
  float scale;
  memcpy(&scale, &e, 4);
  return p * scale;
}

inline void silu_mul_row(const float* __restrict g, const float* __restrict u, int64_t inter,
                         float* __restrict out) {
  const int64_t body = inter / 8 * 8;  // NOTE: the AVX2 kernel's split: polynomial, libm tail
#pragma omp simd
  for (int64_t j = 0; j < body; ++j) out[j] = g[j] / (1.0f + exp_approx(0.0f - g[j])) * u[j];
  for (int64_t j = body; j < inter; ++j) out[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
}

inline void store_bf16(kv_t* __restrict dst, const float* __restrict src, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {  // round to nearest even
    uint32_t bits;
    memcpy(&bits, src + j, 4);
    dst[j] = static_cast<kv_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
  }
}

inline void rope_store_row(float* r, const float* c, const float* s, int64_t hq, int64_t hk,
                           int64_t dim, kv_t* k_cache, kv_t* v_cache, int64_t slot) {
  const int64_t half = dim / 2, kv_row = hk * dim;
  for (int64_t h = 0; h < hq + hk; ++h) {
    float* __restrict x = r + h * dim;
#pragma omp simd
    for (int64_t j = 0; j < half; ++j) {
      const float a = x[j], b = x[j + half];
      x[j] = a * c[j] - b * s[j];
      x[j + half] = b * c[j] + a * s[j];
    }
  }
  if (k_cache == nullptr) return;  // an int8 cache: the caller quantizes (attention.h)
  store_bf16(k_cache + slot * kv_row, r + hq * dim, kv_row);
  store_bf16(v_cache + slot * kv_row, r + (hq + hk) * dim, kv_row);
}

// scores[i] = exp(scores[i] - mx) in place; returns their sum (the softmax denominator).
// NOTE: 8 partial sums and a libm tail, in the AVX2 kernel's order.
inline float exp_shifted(float* __restrict scores, int64_t len, float mx) {
  float part[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  int64_t i = 0;
  for (; i + 8 <= len; i += 8)
    for (int l = 0; l < 8; ++l) {
      const float e = exp_approx(scores[i + l] - mx);
      scores[i + l] = e;
      part[l] += e;
    }
  float denom = sum8(part);
  for (; i < len; ++i) {
    scores[i] = expf(scores[i] - mx);
    denom += scores[i];
  }
  return denom;
}

inline float dot_bf16(const float* __restrict q, const kv_t* __restrict kv, int64_t dim) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < dim; ++j) s += q[j] * bf16_to_float(kv[j]);
  return s;
}

// Attention of every query head of kv group `kvh` of request b, head after head (the head
// dims the tiled kernel of attention.h does not cover). scores: hq/hk * lens[b] floats.
inline void attend_kv_group(const DecodeCtx& c, int64_t b, int64_t kvh, const float* q,
                            const kv_t* k_cache, const kv_t* v_cache, float* scores,
                            float* out) {
  const int64_t group = c.hq / c.hk, dim = c.dim, len = c.lens[b], bs = c.block_size;
  const int64_t* table = c.block_tables + b * c.max_blocks;
  for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
    const float* qh = q + h * dim;
    float* __restrict oh = out + h * dim;
    float mx = -INFINITY;
    for (int64_t p = 0; p < len; ++p) {
      const kv_t* kr = k_cache + ((table[p / bs] * bs + p % bs) * c.hk + kvh) * dim;
      scores[p] = dot_bf16(qh, kr, dim) * c.scale;
      mx = std::max(mx, scores[p]);
    }
    const float inv = 1.0f / exp_shifted(scores, len, mx);
    for (int64_t j = 0; j < dim; ++j) oh[j] = 0.0f;
    for (int64_t p = 0; p < len; ++p) {
      const kv_t* __restrict vr = v_cache + ((table[p / bs] * bs + p % bs) * c.hk + kvh) * dim;
      const float wp = scores[p];
#pragma omp simd
      for (int64_t j = 0; j < dim; ++j) oh[j] += wp * bf16_to_float(vr[j]);
    }
    for (int64_t j = 0; j < dim; ++j) oh[j] *= inv;
  }
}

// ---- vector primitives of the ISA-independent attention (attention.h) ----------------------
// Generic vectors (GCC / Clang vector_size): element-wise operators, lowered per target.
constexpr int kVecW = 8;
typedef float vfloat __attribute__((vector_size(kVecW * 4)));
typedef int32_t vint32 __attribute__((vector_size(kVecW * 4)));
typedef uint32_t vuint32 __attribute__((vector_size(kVecW * 4)));
typedef uint16_t vuint16 __attribute__((vector_size(kVecW * 2)));
typedef int8_t vint8 __attribute__((vector_size(kVecW)));

inline vfloat v_load(const float* p) {
  vfloat v;
  memcpy(&v, p, sizeof(v));
  return v;
}
inline void v_store(float* p, vfloat v) { memcpy(p, &v, sizeof(v)); }
inline vfloat v_set1(float x) { return vfloat{x, x, x, x, x, x, x, x}; }  // kVecW lanes
static_assert(kVecW == 8, "v_set1, load_bf16 and v_hsum4 spell out 8 lanes");
inline vfloat v_zero() { return vfloat{}; }
// NOTE: one vector expression, contracted to an FMA by -ffp-contract=fast where the target
// has one (the AVX2 kernels' fmadd rounds once). A loop over the lanes calling
// __builtin_fmaf gave the same instruction but kept the callers' arrays of vfloat
// accumulators (qk4_direct, pv_chunk) in memory, a load and a store per FMA (the flash
// attention ran 2-3x slower than AVX2's); spelling the 8 lanes out scalarised it.
inline vfloat v_fma(vfloat a, vfloat b, vfloat c) { return a * b + c; }
// NOTE: a product never contracted (mul_no_contract), so `v_fma(x, y, v_mul(a, b))` (fold_state)
// fuses x * y as the vector kernels do, never a * b.
inline vfloat v_mul(vfloat a, vfloat b) { return mul_no_contract(a, b); }
// NOTE: both widenings go through 16-bit lanes: GCC 12 scalarises a direct 8-bit -> 32-bit
// convertvector and splits 16 -> 32 into two halves; these forms lower to unpack / pmovsx
// (x86) and zip / sxtl (NEON).
typedef uint16_t vuint16x2 __attribute__((vector_size(kVecW * 4)));
typedef int16_t vint16 __attribute__((vector_size(kVecW * 2)));
inline vfloat load_bf16(const kv_t* p) {  // kVecW bf16 -> floats: each one's bits, shifted up
  vuint16 h;
  memcpy(&h, p, sizeof(h));
  // (0, h0, 0, h1, ...) as 16-bit lanes: little-endian, the float bits h << 16
  const vuint16x2 w =
      __builtin_shufflevector(vuint16{}, h, 0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  return (vfloat)w;  // NOTE: a cast between vectors of one size keeps the bits
}
inline vfloat v_load_i8(const int8_t* p) {  // kVecW int8 -> floats
  vint8 b;
  memcpy(&b, p, sizeof(b));
  const vint16 w = __builtin_convertvector(b, vint16);
  return __builtin_convertvector(__builtin_convertvector(w, vint32), vfloat);
}
inline vfloat v_max(vfloat a, vfloat b) { return a > b ? a : b; }
// A loaded vector kept in a register (the hand-written ISAs: the value itself). NOTE: GCC 12
// folds every use of a loaded q / K / V vector into its FMA as a memory operand, so the QK
// step of 3 rows x 4 keys read each q vector 4 times and the PV step each V vector once per
// row (24 loads for 12 FMAs where the AVX2 build has 7): the tile attention ran 1.7x slower
// than AVX2's, from the same source. Pinned, a vector is loaded once and reused.
inline vfloat v_reg(vfloat v) {
#if EMBER_PIN_FLOAT
  EMBER_PIN(v);
#endif
  return v;
}
inline float v_hmax(vfloat a) {  // the largest lane
  float m = a[0];
  for (int i = 1; i < kVecW; ++i) m = a[i] > m ? a[i] : m;
  return m;
}
inline void v_prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }
// out[0..3] = the horizontal sums of a, b, c, d, in the AVX2 kernel's (hadd) order:
// ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7)).
// Written as whole-vector shuffles and adds (the AVX2 kernel's hadd, hadd, add halves): 12
// vector instructions where lane-by-lane sums were ~60 scalar ones, in the qk inner loop.
inline vfloat v_hadd(vfloat a, vfloat b) {  // (a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, ..., b6+b7)
  return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
         __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}
inline void v_hsum4(vfloat a, vfloat b, vfloat c, vfloat d, float* out) {
  typedef float vfloat4 __attribute__((vector_size(16)));
  const vfloat t = v_hadd(v_hadd(a, b), v_hadd(c, d));
  const vfloat4 s = __builtin_shufflevector(t, t, 0, 1, 2, 3) + __builtin_shufflevector(t, t, 4, 5, 6, 7);
  memcpy(out, &s, sizeof(s));
}


// ---- grammar masks (cpu_kernels.cpp apply_token_bitmask) ------------------------------------
// x (V) set to -inf where the bit of token t (bit t % 32 of words[t / 32]) is clear; the
// select over a word's 32 lanes vectorises to blends.
inline void bitmask_row(float* x, const int32_t* words, int64_t vocab) {
  const int64_t full = vocab / 32;
  for (int64_t w = 0; w < full; ++w) {
    const uint32_t m = static_cast<uint32_t>(words[w]);
    if (m == 0xFFFFFFFFu) continue;
    float* p = x + 32 * w;
    for (int b = 0; b < 32; ++b) p[b] = ((m >> b) & 1u) ? p[b] : -INFINITY;
  }
  for (int64_t t = 32 * full; t < vocab; ++t)
    if (!((static_cast<uint32_t>(words[t / 32]) >> (t % 32)) & 1u)) x[t] = -INFINITY;
}

}  // namespace
