// AVX2 GEMM for a few activation rows (1..kFewRowsMax: decode steps, speculative verify steps,
// small batches): each weight block is unpacked ONCE per column group and applied to a group of
// R rows whose int16 partial sums stay in registers (the generic tiles of isa_avx2.h unpack a
// whole block into 16 vectors and then spill their per-row sums on AVX2's 16 registers; at one
// row they spill the unpacked weights too: q4_tile<1> holds 16 weight + 8 activation vectors,
// this kernel 4 + 2. One decode row: Q4 20-28% and Q8 ~3% less time per call than q4_tile<1> /
// q8_tile<1>, benchmarks/kernel_ab.py, thread CPU time; Q4K (Gemma 3's Q4_K layers) 15-30% at
// 1 row and 30-50% at 2-17 rows, weights in cache. Q5 here was no faster: it keeps the tiles).
// Integer dots and the float accumulation order per output are those of q4_tile / q8_tile, so
// the outputs are bit-identical to them (tests/unit/test_few_rows_gemm.py).
#pragma once
#include <immintrin.h>
#include <stdint.h>

#include "common.h"

namespace {

constexpr int64_t kFewRowsMax = 17;  // 16 draft tokens + the bonus row

// An empty asm that claims to change v: GCC may not move v's computation past it. Without it
// GCC hoists all 4R maddubs of a column step ahead of their adds and spills every product
// (~1.5x slower per row on Zen 3, measured in isolation).
inline void pin(__m256i& v) { __asm__("" : "+x"(v)); }

// R rows (m0 .. m0+R-1) of one 16-row tile of Q4-family weights (S: Q4Scales or Q4kScales,
// as q4_tile). Per column pair (c, c+4) the nibbles of both halves are unpacked once (4 vectors)
// and multiplied with every row's broadcast activations.
template <int R, class S>
inline void q4_tile_few(const uint8_t* w, S sc, const QuantizedActs& a, int64_t m0, float* y,
                        int64_t n) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const int8_t* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = a.qrow(m0 + r);
  for (int64_t b = 0; b < a.nb; ++b) {
    const uint8_t* wb = w + b * S::kBytes;
    for (int c = 0; c < S::kLines; ++c)
      _mm_prefetch(reinterpret_cast<const char*>(wb + 8 * S::kBytes + 64 * c), _MM_HINT_T0);
    __m256i s16[R][2];  // 16 products per int16 lane, as in q4_tile (<= 30480)
    for (int c = 0; c < 4; ++c) {
      const __m256i raw0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + c * 64));
      const __m256i raw1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + c * 64 + 32));
      __m256i lo0 = _mm256_and_si256(raw0, mask), lo1 = _mm256_and_si256(raw1, mask);
      __m256i hi0 = _mm256_and_si256(_mm256_srli_epi16(raw0, 4), mask);
      __m256i hi1 = _mm256_and_si256(_mm256_srli_epi16(raw1, 4), mask);
      pin(lo0), pin(lo1), pin(hi0), pin(hi1);
      for (int r = 0; r < R; ++r) {
        const int8_t* xq = xr[r] + b * kBlock;
        const __m256i xl = bcast4(xq + 4 * c), xh = bcast4(xq + 4 * (c + 4));
        const __m256i p0 =
            _mm256_add_epi16(_mm256_maddubs_epi16(lo0, xl), _mm256_maddubs_epi16(hi0, xh));
        const __m256i p1 =
            _mm256_add_epi16(_mm256_maddubs_epi16(lo1, xl), _mm256_maddubs_epi16(hi1, xh));
        s16[r][0] = c == 0 ? p0 : _mm256_add_epi16(s16[r][0], p0);
        s16[r][1] = c == 0 ? p1 : _mm256_add_epi16(s16[r][1], p1);
        pin(s16[r][0]), pin(s16[r][1]);
      }
    }
    __m256 dw[2], mw[2];
    sc.block(b, wb, dw, mw);
    for (int r = 0; r < R; ++r) {
      const size_t ab = static_cast<size_t>((m0 + r) * a.nb + b);
      const __m256 ad = _mm256_set1_ps(a.d[ab]), as = _mm256_set1_ps(a.s[ab]);
      for (int h = 0; h < 2; ++h) {
        const __m256i dot = _mm256_madd_epi16(s16[r][h], ones);
        acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(dw[h], ad), acc[r][h]);
        acc[r][h] = _mm256_fmadd_ps(mw[h], as, acc[r][h]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(y + (m0 + r) * n, acc[r][0]);
    _mm256_storeu_ps(y + (m0 + r) * n + 8, acc[r][1]);
  }
}

// R rows of one Q8 (H: Q8h, float16 scales in the block) tile: per column group the signed
// codes of both halves are loaded once and used by every row (llama.cpp's sign trick, as q8_tile).
template <int R, bool H>
inline void q8_tile_few(const uint8_t* w, const float* d, const QuantizedActs& a, int64_t m0,
                        float* y, int64_t n) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80)), ones = _mm256_set1_epi16(1);
  const int8_t* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = a.qrow(m0 + r);
  constexpr int64_t bytes = H ? kQ8hBlockBytes : 512;
  for (int64_t b = 0; b < a.nb; ++b) {
    const uint8_t* wb = w + b * bytes;
    for (int j = 0; j < (H ? 9 : 8); ++j)
      _mm_prefetch(reinterpret_cast<const char*>(wb + 8 * bytes + 64 * j), _MM_HINT_T0);
    __m256i dot[R][2];
    for (int j = 0; j < 8; ++j) {
      __m256i w0 = _mm256_xor_si256(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + j * 64)), flip);
      __m256i w1 = _mm256_xor_si256(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + j * 64 + 32)), flip);
      pin(w0), pin(w1);
      for (int r = 0; r < R; ++r) {
        const __m256i x = bcast4(xr[r] + b * kBlock + 4 * j), xa = _mm256_abs_epi8(x);
        const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(xa, _mm256_sign_epi8(w0, x)), ones);
        const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(xa, _mm256_sign_epi8(w1, x)), ones);
        dot[r][0] = j == 0 ? p0 : _mm256_add_epi32(dot[r][0], p0);
        dot[r][1] = j == 0 ? p1 : _mm256_add_epi32(dot[r][1], p1);
        pin(dot[r][0]), pin(dot[r][1]);
      }
    }
    __m256 dw[2];
    if (H) {
      dw[0] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 512)));
      dw[1] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 528)));
    } else {
      dw[0] = _mm256_loadu_ps(d + b * kTile);
      dw[1] = _mm256_loadu_ps(d + b * kTile + 8);
    }
    for (int r = 0; r < R; ++r) {
      const __m256 ad = _mm256_set1_ps(a.d[static_cast<size_t>((m0 + r) * a.nb + b)]);
      for (int h = 0; h < 2; ++h)
        acc[r][h] =
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r][h]), _mm256_mul_ps(dw[h], ad), acc[r][h]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(y + (m0 + r) * n, acc[r][0]);
    _mm256_storeu_ps(y + (m0 + r) * n + 8, acc[r][1]);
  }
}

template <int R>
inline void few_tile(const LinearW& lw, int64_t nb, const QuantizedActs& a, int64_t t, int64_t m0,
                     float* yt, int64_t np) {
  if (lw.fmt == 4)
    q4_tile_few<R>(lw.w + t * nb * 256, Q4Scales{lw.d + t * nb * kTile, lw.m + t * nb * kTile}, a,
                   m0, yt, np);
  else if (lw.fmt == 6)
    q4_tile_few<R>(lw.w + t * nb * kQ4kBlockBytes,
                   Q4kScales{lw.d + t * (nb / kQ4kSuper) * kTile,
                             lw.m + t * (nb / kQ4kSuper) * kTile},
                   a, m0, yt, np);
  else if (lw.fmt == 9)
    q8_tile_few<R, true>(lw.w + t * nb * kQ8hBlockBytes, nullptr, a, m0, yt, np);
  else
    q8_tile_few<R, false>(lw.w + t * nb * 512, lw.d + t * nb * kTile, a, m0, yt, np);
}

inline bool few_rows_supported(const LinearW& lw, int64_t mrows) {
  return mrows >= 1 && mrows <= kFewRowsMax &&
         (lw.fmt == 4 || lw.fmt == 6 || lw.fmt == 8 || lw.fmt == 9);
}

// y (M, np) = act @ W^T for 1 <= M <= kFewRowsMax rows, in row groups of 4 (a group of 5
// would spill: 3 + 2 instead). Worksharing only: call inside a parallel region.
inline void gemm_tiles_few(const LinearW& lw, const QuantizedActs& a, int64_t mrows, float* y) {
  const int64_t np = padded(lw.n), tiles = np / kTile, nb = a.nb;
#pragma omp for schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    float* yt = y + t * kTile;
    int64_t m0 = 0;
    for (; mrows - m0 >= 6 || mrows - m0 == 4; m0 += 4) few_tile<4>(lw, nb, a, t, m0, yt, np);
    if (mrows - m0 == 5) {
      few_tile<3>(lw, nb, a, t, m0, yt, np);
      m0 += 3;
    }
    if (mrows - m0 == 3) few_tile<3>(lw, nb, a, t, m0, yt, np);
    if (mrows - m0 == 2) few_tile<2>(lw, nb, a, t, m0, yt, np);
    if (mrows - m0 == 1) few_tile<1>(lw, nb, a, t, m0, yt, np);
  }
}

}  // namespace
