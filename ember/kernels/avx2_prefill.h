// AVX2 weight GEMMs for many activation rows (prefill chunks: M >= kManyRowsFrom), included by
// isa_avx2.h before its gemm_tiles, which hands the calls many_rows_supported allows (Q4, Q5,
// Q8, Q8h) to gemm_tiles_many; decode (M = 1), verify rows (M < kManyRowsFrom) and every other
// format (Q4K, Q6, any new one) keep isa_avx2.h's tiles.
//
// Why a second kernel: isa_avx2.h's tiles keep 8 rows x 2 halves of float accumulators plus a
// block's 16 unpacked weight vectors live at once: ~40 ymm values for 16 registers, so the
// compiler spills them to the stack every block, and every 8 rows unpack the weights again.
// Here, per tile of 16 output rows and per K segment of kSegBlocks blocks:
//   1. the segment's weights are unpacked once into an L1 scratch of ready-to-multiply byte
//      vectors (Q4 / Q5 codes as u8, Q8 / Q8h as s8) and float scales, reused by all M rows;
//   2. a register-blocked microkernel runs R activation rows x 16 outputs (2 ymm halves):
//      R x 2 float accumulators + R x 2 int16 / int32 block sums + the two weight vectors and
//      the broadcast activation fit the 16 ymm registers (R = 3 for Q4; 2 for Q5, and for
//      Q8 / Q8h, whose sign trick needs two more registers).
// The integer block dot products are exact and the float updates per block are the ones of
// isa_avx2.h's tiles in the same order (acc = fma(float(dot), dw * ad, acc) [+ fma(m, s, acc)
// for Q4]; a segment's accumulators are stored to y and reloaded, exactly), so the outputs are
// bit-identical to gemm_tiles' small-M path: greedy tokens cannot change.
#pragma once

namespace {

constexpr int64_t kSegBlocks = 16;  // K blocks (of 32) per segment: 8 KB of unpacked weights
constexpr int64_t kManyRowsFrom = 16;  // prefill chunks

// The calls gemm_tiles_many has a kernel for: an allow-list of formats (unpack_segment's), so a
// format added later takes the tiles until it gets its own case here.
inline bool many_rows_supported(const LinearW& lw, int64_t mrows) {
  return mrows >= kManyRowsFrom && (lw.fmt == 4 || lw.fmt == 5 || lw.fmt == 8 || lw.fmt == 9);
}

// Unpacked weights of one tile's K segment: per block 16 vectors [j][h] (j = column group of 4
// k values, h = rows 0..7 / 8..15), the 16 rows' scales d and (Q4) mins m as floats.
struct ManyScratch {
  alignas(32) uint8_t w[kSegBlocks * 16 * 32];
  alignas(32) float d[kSegBlocks * kTile];
  alignas(32) float m[kSegBlocks * kTile];
};

// Fills s with blocks b0 .. b0 + nbk of tile t. fmt: 4 Q4, 5 Q5, 8 Q8, 9 Q8h.
inline void unpack_segment(const LinearW& lw, int64_t nb, int64_t t, int64_t b0, int64_t nbk,
                           ManyScratch& s) {
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t i = 0; i < nbk; ++i) {
    const int64_t blk = t * nb + b0 + i;
    __m256i* out = reinterpret_cast<__m256i*>(s.w + i * 512);
    float* d = s.d + i * kTile;
    if (lw.fmt == 4) {
      const uint8_t* wb = lw.w + blk * 256;
      for (int c = 0; c < 4; ++c)
        for (int h = 0; h < 2; ++h) {
          __m256i lo, hi;
          q4_unpack(wb + c * 64 + h * 32, lo, hi);
          _mm256_store_si256(out + 2 * c + h, lo);
          _mm256_store_si256(out + 2 * (c + 4) + h, hi);
        }
      memcpy(d, lw.d + blk * kTile, kTile * sizeof(float));
      memcpy(s.m + i * kTile, lw.m + blk * kTile, kTile * sizeof(float));
    } else if (lw.fmt == 5) {
      const uint8_t* wb = lw.w + blk * kQ5BlockBytes;
      for (int h = 0; h < 2; ++h) {
        __m256i v[8];  // column groups j of half h (q5_tile's codes)
        q5_unpack_half(wb, h, v);
        for (int j = 0; j < 8; ++j) _mm256_store_si256(out + 2 * j + h, v[j]);
      }
      _mm256_store_ps(d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 320))));
      _mm256_store_ps(d + 8, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 336))));
    } else {  // Q8 / Q8h: signed codes q = u - 128
      const bool h16 = lw.fmt == 9;
      const uint8_t* wb = lw.w + blk * (h16 ? kQ8hBlockBytes : 512);
      for (int j = 0; j < 8; ++j)
        for (int h = 0; h < 2; ++h)
          _mm256_store_si256(out + 2 * j + h, _mm256_xor_si256(_mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(wb + j * 64 + h * 32)), flip));
      if (h16) {
        _mm256_store_ps(d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 512))));
        _mm256_store_ps(d + 8, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 528))));
      } else {
        memcpy(d, lw.d + blk * kTile, kTile * sizeof(float));
      }
    }
  }
}

// R rows (m0 ..) x 16 outputs over the segment's nbk blocks (absolute blocks b0 ..), adding to
// y (first segment: starting from zero). F: 4 Q4, 5 Q5, 8 Q8 / Q8h (unpacked alike).
template <int F, int R>
inline void many_kernel(const ManyScratch& s, const QuantizedActs& a, int64_t m0, int64_t b0,
                        int64_t nbk, float* y, int64_t n, bool first) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h)
      acc[r][h] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(y + (m0 + r) * n + 8 * h);
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = a.qrow(m0 + r) + b0 * kBlock;
  for (int64_t i = 0; i < nbk; ++i) {
    const __m256i* W = reinterpret_cast<const __m256i*>(s.w + i * 512);
    __m256i sum[R][2];  // Q4 / Q5: int16 block sums (Q5: of 4 groups); Q8: int32
    __m256i part[F == 5 ? R : 1][2];  // Q5: int32 sums of groups 0..3
    for (int j = 0; j < 8; ++j) {
      const __m256i w0 = _mm256_load_si256(W + 2 * j), w1 = _mm256_load_si256(W + 2 * j + 1);
      for (int r = 0; r < R; ++r) {
        const __m256i x = bcast4(xr[r] + i * kBlock + 4 * j);
        if constexpr (F == 8) {
          const __m256i xa = _mm256_abs_epi8(x);
          const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(xa, _mm256_sign_epi8(w0, x)), ones);
          const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(xa, _mm256_sign_epi8(w1, x)), ones);
          sum[r][0] = j ? _mm256_add_epi32(sum[r][0], p0) : p0;
          sum[r][1] = j ? _mm256_add_epi32(sum[r][1], p1) : p1;
          __asm__("" : "+x"(sum[r][0]), "+x"(sum[r][1]));
        } else {
          const __m256i p0 = _mm256_maddubs_epi16(w0, x), p1 = _mm256_maddubs_epi16(w1, x);
          const bool start = F == 5 ? (j % 4 == 0) : (j == 0);
          sum[r][0] = start ? p0 : _mm256_add_epi16(sum[r][0], p0);
          sum[r][1] = start ? p1 : _mm256_add_epi16(sum[r][1], p1);
          // keep each sum in its register between steps (GCC otherwise hoists all 16 products
          // of a row ahead of the adds and spills them)
          __asm__("" : "+x"(sum[r][0]), "+x"(sum[r][1]));
          if constexpr (F == 5) {
            if (j == 3) {
              part[r][0] = _mm256_madd_epi16(sum[r][0], ones);
              part[r][1] = _mm256_madd_epi16(sum[r][1], ones);
            }
          }
        }
      }
    }
    const float* dp = s.d + i * kTile;
    const __m256 dw[2] = {_mm256_load_ps(dp), _mm256_load_ps(dp + 8)};
    for (int r = 0; r < R; ++r) {
      const size_t ab = static_cast<size_t>((m0 + r) * a.nb + b0 + i);
      const __m256 ad = _mm256_set1_ps(a.d[ab]);
      for (int h = 0; h < 2; ++h) {
        __m256i dot;
        if constexpr (F == 8) {
          dot = sum[r][h];
        } else if constexpr (F == 5) {
          dot = _mm256_sub_epi32(_mm256_add_epi32(part[r][h], _mm256_madd_epi16(sum[r][h], ones)),
                                 _mm256_set1_epi32(a.si[ab] / 8));
        } else {
          dot = _mm256_madd_epi16(sum[r][h], ones);
        }
        acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(dw[h], ad), acc[r][h]);
        if constexpr (F == 4)
          acc[r][h] = _mm256_fmadd_ps(_mm256_load_ps(s.m + i * kTile + 8 * h),
                                      _mm256_set1_ps(a.s[ab]), acc[r][h]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(y + (m0 + r) * n + 8 * h, acc[r][h]);
}

// All mrows rows of one tile's segment: blocks of R rows, then the remainder.
template <int F, int R>
inline void many_rows(const ManyScratch& s, const QuantizedActs& a, int64_t mrows, int64_t b0,
                      int64_t nbk, float* yt, int64_t np, bool first) {
  int64_t m0 = 0;
  for (; m0 + R <= mrows; m0 += R) many_kernel<F, R>(s, a, m0, b0, nbk, yt, np, first);
  if constexpr (R > 1) {
    if (mrows - m0 == 2) many_kernel<F, 2 < R ? 2 : 1>(s, a, m0, b0, nbk, yt, np, first);
    else if (mrows - m0 == 1) many_kernel<F, 1>(s, a, m0, b0, nbk, yt, np, first);
  }
}

// y (M, np) = act @ W^T for M >= kManyRowsFrom (any M works). Worksharing only: call inside a
// parallel region, as gemm_tiles.
inline void gemm_tiles_many(const LinearW& lw, const QuantizedActs& a, int64_t mrows, float* y) {
  const int64_t np = padded(lw.n), tiles = np / kTile, nb = a.nb;
  ManyScratch* s = static_cast<ManyScratch*>(aligned_alloc(32, sizeof(ManyScratch)));
#pragma omp for schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    float* yt = y + t * kTile;
    for (int64_t b0 = 0; b0 < nb; b0 += kSegBlocks) {
      const int64_t nbk = std::min<int64_t>(kSegBlocks, nb - b0);
      unpack_segment(lw, nb, t, b0, nbk, *s);
      const bool first = b0 == 0;
      if (lw.fmt == 4) many_rows<4, 3>(*s, a, mrows, b0, nbk, yt, np, first);
      else if (lw.fmt == 5) many_rows<5, 2>(*s, a, mrows, b0, nbk, yt, np, first);
      else many_rows<8, 2>(*s, a, mrows, b0, nbk, yt, np, first);
    }
  }
  free(s);
}

}  // namespace
