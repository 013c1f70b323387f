// AVX2 + FMA versions of kernels.h's building blocks (same names, signatures and weight
// layouts), for CPUs without AVX-512 VNNI: Zen 2/3, Haswell..Alder Lake laptops.
//
// The one real difference is the int8 dot product. VNNI's dpbusd (u8 x s8, four products into
// an int32 lane) becomes maddubs (u8 x s8, pairs into int16) + madd (pairs into int32):
//   Q4: weights are nibbles (<= 15) and activations |x| <= 127; a 16-bit lane of maddubs
//       holds 2 products, so the 8 maddubs of a block add 16 products per lane
//       (<= 16 * 15 * 127 = 30480 < 32767) before one madd per block widens them.
//   Q8: weights are q + 128 in [1, 255]; u8 x s8 pairs could overflow int16, so the sign trick
//       of llama.cpp is used instead: |x| (u8) x (q * sign(x)) (s8), pairs <= 2 * 127 * 127.
// A tile of 16 rows is two 8-lane halves (rows 0..7 and 8..15 of the 64-byte vectors). The
// float math (activation scales, FMAs per block) is the AVX-512 kernel's, lane for lane, so
// both ISAs produce the same outputs up to float summation order.
#pragma once
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "common.h"

namespace {


inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}

inline int32_t hsum8i(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Activations (M, K) quantized once per call: qx (M, K) int8, dx (M, K/32) scales,
// sx (M, K/32) = dx * sum(qx) (the Q4 min term), si (M, K/32) = 128 * sum(qx) (unused here:
// the Q8 kernel below works on signed weights).
struct QuantizedActs {
  int64_t nb = 0;
  std::vector<int8_t> q;
  std::vector<float> d, s;
  std::vector<int32_t> si;
  QuantizedActs(int64_t mrows, int64_t k)
      : nb(k / kBlock), q(static_cast<size_t>(mrows * k)), d(static_cast<size_t>(mrows * nb)),
        s(static_cast<size_t>(mrows * nb)), si(static_cast<size_t>(mrows * nb)) {}
  QuantizedActs(const float* x, int64_t mrows, int64_t k) : QuantizedActs(mrows, k) {
    for (int64_t i = 0; i < mrows; ++i) quantize_row(x + i * k, i);
  }
  void quantize_row(const float* x, int64_t i) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = i * nb; b < (i + 1) * nb; ++b) {
      const float* xb = x + (b - i * nb) * kBlock;
      __m256 a[4], m = _mm256_setzero_ps();
      for (int v = 0; v < 4; ++v) {
        a[v] = _mm256_loadu_ps(xb + 8 * v);
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, a[v]));
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 0x55));
      const float amax = _mm_cvtss_f32(m4);
      const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
      __m256i qi[4], sum = _mm256_setzero_si256();
      for (int v = 0; v < 4; ++v) {
        qi[v] = _mm256_cvtps_epi32(_mm256_mul_ps(a[v], _mm256_set1_ps(id)));
        sum = _mm256_add_epi32(sum, qi[v]);
      }
      // int32 -> int8 with saturation; packs work per 128-bit lane, so restore the order
      const __m256i p16a = _mm256_packs_epi32(qi[0], qi[1]), p16b = _mm256_packs_epi32(qi[2], qi[3]);
      const __m256i p8 = _mm256_packs_epi16(p16a, p16b);
      const __m256i ordered = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(&q[static_cast<size_t>(b * kBlock)]), ordered);
      const int32_t total = hsum8i(sum);
      d[static_cast<size_t>(b)] = amax / 127.0f;
      s[static_cast<size_t>(b)] = amax / 127.0f * static_cast<float>(total);
      si[static_cast<size_t>(b)] = 128 * total;
    }
  }
  const int8_t* qrow(int64_t i) const { return q.data() + i * nb * kBlock; }
};

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// The nibbles of one 32-byte vector of a Q4 / Q4K / Q5 block (vector c, half h at
// wb + 64 c + 32 h): lo = column group c, hi = column group c + 4 of rows 8h .. 8h + 7, codes
// in [0, 15] as bytes. Shared by the row tiles and avx2_prefill.h's unpack.
inline void q4_unpack(const uint8_t* p, __m256i& lo, __m256i& hi) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  lo = _mm256_and_si256(raw, mask);
  hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
}

// Half h (rows 8h .. 8h + 7) of a Q5 block (layout: q5_tile) as codes u in [0, 31]: out[j] =
// column group j, the nibble (q4_unpack) with its fifth bit from the block's bit plane.
inline void q5_unpack_half(const uint8_t* wb, int h, __m256i out[8]) {
  const __m256i bit4 = _mm256_set1_epi8(0x10);
  const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 256 + h * 32));
  const __m256i hs[8] = {
      _mm256_slli_epi16(hi, 4), _mm256_slli_epi16(hi, 3), _mm256_slli_epi16(hi, 2),
      _mm256_slli_epi16(hi, 1), hi, _mm256_srli_epi16(hi, 1), _mm256_srli_epi16(hi, 2),
      _mm256_srli_epi16(hi, 3)};
  for (int c = 0; c < 4; ++c) {
    q4_unpack(wb + c * 64 + h * 32, out[c], out[c + 4]);
    out[c] = _mm256_or_si256(out[c], _mm256_and_si256(hs[c], bit4));
    out[c + 4] = _mm256_or_si256(out[c + 4], _mm256_and_si256(hs[c + 4], bit4));
  }
}

// Per-block float scales of the Q4-family tiles (q4_tile's S), as two 8-row halves: the
// block's scale dw and min / offset mw. kBytes: a block's bytes; kLines: its 64-byte lines.
struct Q4Scales {  // Q4: stored per block, (tiles, K/32, 16) float32 each
  static constexpr int64_t kBytes = 256;
  static constexpr int kLines = 4;
  const float *d, *m;
  void block(int64_t b, const uint8_t*, __m256 dw[2], __m256 mw[2]) const {
    dw[0] = _mm256_loadu_ps(d + b * kTile), dw[1] = _mm256_loadu_ps(d + b * kTile + 8);
    mw[0] = _mm256_loadu_ps(m + b * kTile), mw[1] = _mm256_loadu_ps(m + b * kTile + 8);
  }
};

// Q4K (GGUF Q4_K's codes: w = d sc u - dmin m, u in [0, 15]): a block is the Q4 tile's 256
// nibble bytes, then the 16 rows' 6-bit sub-block scales sc and mins m as bytes (288 bytes a
// 16 x 32 block against Q4's 384); d and -dmin are float32 (tiles, K/256, 16). d sc and
// -dmin m are exact in float32 (11-bit x 6-bit), so with the Q4 kernel's math on them the
// outputs are the Q4 repack's bit for bit.
struct Q4kScales {
  static constexpr int64_t kBytes = kQ4kBlockBytes;
  static constexpr int kLines = 5;
  const float *d, *nm;
  void block(int64_t b, const uint8_t* wb, __m256 dw[2], __m256 mw[2]) const {
    const float *ds = d + (b / kQ4kSuper) * kTile, *ms = nm + (b / kQ4kSuper) * kTile;
    const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 256));
    const __m128i mn = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 272));
    dw[0] = _mm256_mul_ps(_mm256_loadu_ps(ds), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sc)));
    dw[1] = _mm256_mul_ps(_mm256_loadu_ps(ds + 8),
                          _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(sc, 8))));
    mw[0] = _mm256_mul_ps(_mm256_loadu_ps(ms), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(mn)));
    mw[1] = _mm256_mul_ps(_mm256_loadu_ps(ms + 8),
                          _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(mn, 8))));
  }
};

// One 16-row tile of Q4-family weights (Q4, Q4K: the same nibble bytes, S's scales) against
// C (<= kChunk) activation rows starting at m0. S is a template parameter: each format's
// tile compiles to its own straight-line code.
template <int C, class S>
inline void q4_tile(const uint8_t* w, S sc, const QuantizedActs& a, int64_t m0, float* y,
                    int64_t n) {
  __m256 acc[C][2];
  for (int c = 0; c < C; ++c) acc[c][0] = acc[c][1] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < a.nb; ++b) {
    const uint8_t* wb = w + b * S::kBytes;
    for (int c = 0; c < S::kLines; ++c)
      _mm_prefetch(reinterpret_cast<const char*>(wb + 8 * S::kBytes + 64 * c), _MM_HINT_T0);
    __m256i wv[2][8];  // [half][j]: half 0 = rows 0..7, 1 = rows 8..15
    for (int c = 0; c < 4; ++c)
      for (int h = 0; h < 2; ++h) q4_unpack(wb + c * 64 + h * 32, wv[h][c], wv[h][c + 4]);
    __m256 dw[2], mw[2];
    sc.block(b, wb, dw, mw);
    for (int c = 0; c < C; ++c) {
      const int8_t* xq = a.qrow(m0 + c) + b * kBlock;
      __m256i xb[8];
      for (int j = 0; j < 8; ++j) xb[j] = bcast4(xq + 4 * j);
      const size_t ab = static_cast<size_t>((m0 + c) * a.nb + b);
      const __m256 ad = _mm256_set1_ps(a.d[ab]), as = _mm256_set1_ps(a.s[ab]);
      for (int h = 0; h < 2; ++h) {
        __m256i s16 = _mm256_maddubs_epi16(wv[h][0], xb[0]);
        for (int j = 1; j < 8; ++j) s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(wv[h][j], xb[j]));
        const __m256i dot = _mm256_madd_epi16(s16, ones);
        acc[c][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(dw[h], ad), acc[c][h]);
        acc[c][h] = _mm256_fmadd_ps(mw[h], as, acc[c][h]);
      }
    }
  }
  for (int c = 0; c < C; ++c) {
    _mm256_storeu_ps(y + (m0 + c) * n, acc[c][0]);
    _mm256_storeu_ps(y + (m0 + c) * n + 8, acc[c][1]);
  }
}

// H (Q8h): the block's 16 scales are float16 after its 512 code bytes (d unused).
template <int C, bool H = false>
inline void q8_tile(const uint8_t* w, const float* d, const QuantizedActs& a, int64_t m0,
                    float* y, int64_t n) {
  __m256 acc[C][2];
  for (int c = 0; c < C; ++c) acc[c][0] = acc[c][1] = _mm256_setzero_ps();
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80)), ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < a.nb; ++b) {
    constexpr int64_t bytes = H ? kQ8hBlockBytes : 512;
    const uint8_t* wb = w + b * bytes;
    for (int j = 0; j < (H ? 9 : 8); ++j)
      _mm_prefetch(reinterpret_cast<const char*>(wb + 8 * bytes + 64 * j), _MM_HINT_T0);
    __m256i wv[2][8];  // signed weights q = u - 128
    for (int j = 0; j < 8; ++j)
      for (int h = 0; h < 2; ++h)
        wv[h][j] = _mm256_xor_si256(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + j * 64 + h * 32)), flip);
    __m256 dw[2];
    if (H) {
      dw[0] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 512)));
      dw[1] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 528)));
    } else {
      dw[0] = _mm256_loadu_ps(d + b * kTile);
      dw[1] = _mm256_loadu_ps(d + b * kTile + 8);
    }
    for (int c = 0; c < C; ++c) {
      const int8_t* xq = a.qrow(m0 + c) + b * kBlock;
      const size_t ab = static_cast<size_t>((m0 + c) * a.nb + b);
      const __m256 ad = _mm256_set1_ps(a.d[ab]);
      __m256i dot[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
      for (int j = 0; j < 8; ++j) {
        const __m256i x = bcast4(xq + 4 * j), xa = _mm256_abs_epi8(x);
        for (int h = 0; h < 2; ++h) {
          const __m256i p = _mm256_maddubs_epi16(xa, _mm256_sign_epi8(wv[h][j], x));
          dot[h] = _mm256_add_epi32(dot[h], _mm256_madd_epi16(p, ones));
        }
      }
      for (int h = 0; h < 2; ++h)
        acc[c][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[h]), _mm256_mul_ps(dw[h], ad), acc[c][h]);
    }
  }
  for (int c = 0; c < C; ++c) {
    _mm256_storeu_ps(y + (m0 + c) * n, acc[c][0]);
    _mm256_storeu_ps(y + (m0 + c) * n + 8, acc[c][1]);
  }
}


// One 16-row tile of Q5 weights (w = d (u - 16), u in [0, 31]: GGUF Q5_0's codes) against C
// (<= kChunk) activation rows. A block is 352 bytes, GGUF Q5_0's 22 per 32 weights: the Q4
// tile's 256 nibble bytes (vector c: low nibble = column group c, high nibble = c + 4), a
// 64-byte plane of fifth bits (byte of row r, lane byte i: bit j = fifth bit of weight
// (r, 4 j + i)) and the 16 rows' scales d as float16. maddubs pairs are <= 2 * 31 * 127, so
// four add in int16 (31496 < 32767) before each madd; the -16 offset is subtracted in int32
// (16 * sum(qx) = si / 8), so the dot equals the Q8 kernel's on the same codes exactly.
template <int C>
inline void q5_tile(const uint8_t* w, const QuantizedActs& a, int64_t m0, float* y,
                    int64_t n) {
  __m256 acc[C][2];
  for (int c = 0; c < C; ++c) acc[c][0] = acc[c][1] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < a.nb; ++b) {
    const uint8_t* wb = w + b * kQ5BlockBytes;
    for (int c = 0; c < 6; ++c) _mm_prefetch(reinterpret_cast<const char*>(wb + 2816 + 64 * c),
                                             _MM_HINT_T0);
    __m256i wv[2][8];
    for (int h = 0; h < 2; ++h) q5_unpack_half(wb, h, wv[h]);
    const __m256 dw[2] = {
        _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 320))),
        _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 336)))};
    for (int c = 0; c < C; ++c) {
      const int8_t* xq = a.qrow(m0 + c) + b * kBlock;
      __m256i xb[8];
      for (int j = 0; j < 8; ++j) xb[j] = bcast4(xq + 4 * j);
      const size_t ab = static_cast<size_t>((m0 + c) * a.nb + b);
      const __m256 ad = _mm256_set1_ps(a.d[ab]);
      const __m256i off = _mm256_set1_epi32(a.si[ab] / 8);
      for (int h = 0; h < 2; ++h) {
        __m256i lo = _mm256_maddubs_epi16(wv[h][0], xb[0]);
        __m256i up = _mm256_maddubs_epi16(wv[h][4], xb[4]);
        for (int j = 1; j < 4; ++j) {
          lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(wv[h][j], xb[j]));
          up = _mm256_add_epi16(up, _mm256_maddubs_epi16(wv[h][j + 4], xb[j + 4]));
        }
        const __m256i dot = _mm256_sub_epi32(
            _mm256_add_epi32(_mm256_madd_epi16(lo, ones), _mm256_madd_epi16(up, ones)), off);
        acc[c][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(dw[h], ad), acc[c][h]);
      }
    }
  }
  for (int c = 0; c < C; ++c) {
    _mm256_storeu_ps(y + (m0 + c) * n, acc[c][0]);
    _mm256_storeu_ps(y + (m0 + c) * n + 8, acc[c][1]);
  }
}

#include "q6_layers.h"  // q6x_tile: Q6 layers (GGUF Q6_K exact)
}  // namespace
#include "gemm_rows.h"  // tile_rows, gemm_row_tiles: the row tiles above, all formats
#include "few_rows_avx2.h"
#include "avx2_prefill.h"
namespace {

// y (M, np) = act @ W^T over the tiles of W. Worksharing only: call inside a parallel region.
// Decode and verify rows take few_rows_avx2.h's kernel, prefill chunks avx2_prefill.h's where
// each header's allow-list has the format (few_rows_supported / many_rows_supported); every
// other call, and every other format, the row tiles (gemm_rows.h). All bit-identical.
inline void gemm_tiles(const LinearW& lw, const QuantizedActs& a, int64_t mrows, float* y) {
  if (few_rows_supported(lw, mrows)) return gemm_tiles_few(lw, a, mrows, y);
  if (many_rows_supported(lw, mrows)) return gemm_tiles_many(lw, a, mrows, y);
  gemm_row_tiles(lw, a, mrows, y);
}

inline void rms_norm_row(float* x, const float* residual, const float* w, int64_t h, float eps,
                         float* out) {
  __m256 ss = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= h; j += 8) {
    __m256 v = _mm256_loadu_ps(x + j);
    if (residual) {
      v = _mm256_add_ps(v, _mm256_loadu_ps(residual + j));
      _mm256_storeu_ps(x + j, v);
    }
    ss = _mm256_fmadd_ps(v, v, ss);
  }
  float s = hsum8(ss);
  for (; j < h; ++j) {
    if (residual) x[j] += residual[j];
    s += x[j] * x[j];
  }
  const float inv = 1.0f / sqrtf(s / static_cast<float>(h) + eps);
  for (j = 0; j < h; ++j) out[j] = x[j] * inv * w[j];
}

// exp(x) for 8 floats: the AVX-512 kernel's polynomial; 2^n built in the exponent bits.
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.0f));
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  // n in [-126, 127] after the clamp: 2^n is a normal float with exponent bits n + 127
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline void silu_mul_row(const float* g, const float* u, int64_t inter, float* out) {
  int64_t j = 0;
  for (; j + 8 <= inter; j += 8) {
    const __m256 gv = _mm256_loadu_ps(g + j);
    const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv));
    const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
    _mm256_storeu_ps(out + j, _mm256_mul_ps(s, _mm256_loadu_ps(u + j)));
  }
  for (; j < inter; ++j) out[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
}


inline __m256 load_bf16(const kv_t* p) {  // 8 bf16 -> 8 floats
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}


inline void store_bf16(kv_t* dst, const float* src, int64_t n) {  // round to nearest even
  for (int64_t j = 0; j < n; ++j) {
    uint32_t bits;
    memcpy(&bits, src + j, 4);
    dst[j] = static_cast<kv_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
  }
}

inline void rope_store_row(float* r, const float* c, const float* s, int64_t hq, int64_t hk,
                           int64_t dim, kv_t* k_cache, kv_t* v_cache, int64_t slot) {
  const int64_t half = dim / 2, kv_row = hk * dim;
  for (int64_t h = 0; h < hq + hk; ++h) {
    float* x = r + h * dim;
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

inline float exp_shifted(float* scores, int64_t len, float mx) {
  int64_t i = 0;
  __m256 dsum = _mm256_setzero_ps();
  for (; i + 8 <= len; i += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(scores + i), _mm256_set1_ps(mx)));
    _mm256_storeu_ps(scores + i, e);
    dsum = _mm256_add_ps(dsum, e);
  }
  float denom = hsum8(dsum);
  for (; i < len; ++i) {
    scores[i] = expf(scores[i] - mx);
    denom += scores[i];
  }
  return denom;
}


inline float dot_bf16(const float* q, const kv_t* kv, int64_t dim) {
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= dim; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), load_bf16(kv + j), acc);
  float s = hsum8(acc);
  for (; j < dim; ++j) s += q[j] * bf16_to_float(kv[j]);
  return s;
}

// Attention of every query head of kv group `kvh` of request b over its context, one query
// head after another: the K/V rows of the group stay in L1/L2 between heads for short
// contexts. q: the request's query heads (D floats each); scores: scratch of hq/hk * lens[b].
inline void attend_kv_group(const DecodeCtx& c, int64_t b, int64_t kvh, const float* q,
                            const kv_t* k_cache, const kv_t* v_cache, float* scores,
                            float* out) {
  const int64_t group = c.hq / c.hk, dim = c.dim, len = c.lens[b], bs = c.block_size;
  const int64_t* table = c.block_tables + b * c.max_blocks;
  for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
    const float* qh = q + h * dim;
    float* oh = out + h * dim;
    float mx = -INFINITY;
    for (int64_t p = 0; p < len; ++p) {
      const kv_t* kr = k_cache + ((table[p / bs] * bs + p % bs) * c.hk + kvh) * dim;
      scores[p] = dot_bf16(qh, kr, dim) * c.scale;
      mx = std::max(mx, scores[p]);
    }
    const float inv = 1.0f / exp_shifted(scores, len, mx);
    for (int64_t j = 0; j < dim; ++j) oh[j] = 0.0f;
    for (int64_t p = 0; p < len; ++p) {
      const kv_t* vr = v_cache + ((table[p / bs] * bs + p % bs) * c.hk + kvh) * dim;
      const __m256 wv = _mm256_set1_ps(scores[p]);
      int64_t j = 0;
      for (; j + 8 <= dim; j += 8)
        _mm256_storeu_ps(oh + j, _mm256_fmadd_ps(wv, load_bf16(vr + j), _mm256_loadu_ps(oh + j)));
      for (; j < dim; ++j) oh[j] += scores[p] * bf16_to_float(vr[j]);
    }
    for (int64_t j = 0; j < dim; ++j) oh[j] *= inv;
  }
}

// ---- vector primitives of the ISA-independent attention (attention.h) ----------------------
typedef __m256 vfloat;
constexpr int kVecW = 8;
inline vfloat v_load(const float* p) { return _mm256_loadu_ps(p); }
inline void v_store(float* p, vfloat v) { _mm256_storeu_ps(p, v); }
inline vfloat v_set1(float x) { return _mm256_set1_ps(x); }
inline vfloat v_zero() { return _mm256_setzero_ps(); }
inline vfloat v_fma(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
inline vfloat v_mul(vfloat a, vfloat b) { return _mm256_mul_ps(a, b); }
inline vfloat v_load_i8(const int8_t* p) {  // 8 int8 -> 8 floats
  int64_t raw;
  memcpy(&raw, p, 8);
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(raw)));
}
inline vfloat v_max(vfloat a, vfloat b) { return _mm256_max_ps(a, b); }
inline vfloat v_reg(vfloat v) { return v; }  // (isa_portable.h: kept in a register)
inline float v_hmax(vfloat a) {  // the largest lane
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 0x55)));
}
inline void v_prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
// out[0..3] = the horizontal sums of a, b, c, d.
inline void v_hsum4(vfloat a, vfloat b, vfloat c, vfloat d, float* out) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
}


// ---- grammar masks (cpu_kernels.cpp apply_token_bitmask) ------------------------------------
// x (V) set to -inf where the bit of token t (bit t % 32 of words[t / 32]) is clear. A word
// with every bit set (most of a free-text position) is skipped, one with none is 4 stores.
inline void bitmask_row(float* x, const int32_t* words, int64_t vocab) {
  const __m256 ninf = _mm256_set1_ps(-INFINITY);
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const int64_t full = vocab / 32;
  for (int64_t w = 0; w < full; ++w) {
    const uint32_t m = static_cast<uint32_t>(words[w]);
    if (m == 0xFFFFFFFFu) continue;
    float* p = x + 32 * w;
    for (int j = 0; j < 4; ++j) {
      const __m256i bits = _mm256_and_si256(_mm256_set1_epi32(static_cast<int32_t>(m >> (8 * j))),
                                            lane_bit);
      const __m256 off = _mm256_castsi256_ps(_mm256_cmpeq_epi32(bits, _mm256_setzero_si256()));
      _mm256_storeu_ps(p + 8 * j, _mm256_blendv_ps(_mm256_loadu_ps(p + 8 * j), ninf, off));
    }
  }
  for (int64_t t = 32 * full; t < vocab; ++t)
    if (!((static_cast<uint32_t>(words[t / 32]) >> (t % 32)) & 1u)) x[t] = -INFINITY;
}

}  // namespace
