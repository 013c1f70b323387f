// Q6 weights in the decoder's layers (fmt 7, LinearW d = the float32 super-block scales):
// GGUF Q6_K's codes exactly, in the Q6 head's layout (q6_head.cpp has it: 416 bytes per 16-row
// x 32-column block, d (tiles, K/256, 16)), with sb = 8 (Q6_K's 256-column super-block).
// One tile function per ISA, included by isa_avx2.h, isa_portable.h and kernels.h (AVX-512 VNNI:
// all 16 rows of a block in one vector, vpdpbusd dots) before their gemm dispatch. Unlike q6_gemm it needs no precomputed activation sums: the two 16-column
// sums of a block's int8 codes (the -32 offset term) are formed in the tile. The integer dot
// and float math are q6_head.cpp's, so outputs equal q6_gemm's bit for bit.
#pragma once

constexpr int64_t kQ6xBlockBytes = 416;
constexpr int64_t kQ6xSuper = 8;

#if defined(EMBER_ISA_PORTABLE)

// The block helpers below are shared with q6_head.cpp's tile (the head precomputes the
// activation half sums xh0 / xh1, the layers form them in the tile): one copy of the math.
// u[l][e]: the 6-bit codes of row l of a 416-byte block (in [0, 63]).
inline void q6_unpack(const uint8_t* wb, int32_t (&u)[16][32]) {
  for (int l = 0; l < 16; ++l)
    for (int j = 0; j < 8; ++j)
      for (int e = 0; e < 4; ++e) {
        const uint8_t lo = wb[(j % 4) * 64 + 4 * l + e];
        const uint8_t hi = wb[256 + (j / 4) * 64 + 4 * l + e];
        u[l][4 * j + e] = ((j < 4 ? lo & 0xF : lo >> 4) | (((hi >> (2 * (j % 4))) & 3) << 4));
      }
}

// acc[l] += (u . xq - 32 xh) * sc * dt[l] * dx for the 16 rows of one block and one activation row.
inline void q6_block_row(const int32_t (&u)[16][32], const int8_t* sc, const float* dt,
                         const int8_t* xq, int32_t xh0, int32_t xh1, float dx, float (&acc)[16]) {
  for (int l = 0; l < 16; ++l) {
    int32_t d0 = 0, d1 = 0;
    for (int e = 0; e < 16; ++e) d0 += u[l][e] * xq[e];
    for (int e = 16; e < 32; ++e) d1 += u[l][e] * xq[e];
    const int32_t isum = sc[l] * (d0 - 32 * xh0) + sc[16 + l] * (d1 - 32 * xh1);
    acc[l] += static_cast<float>(isum) * (dt[l] * dx);
  }
}

template <int C>
inline void q6x_tile(const uint8_t* w, const float* d, const QuantizedActs& a, int64_t m0,
                     float* y, int64_t n) {
  float acc[C][16] = {};
  for (int64_t b = 0; b < a.nb; ++b) {
    const uint8_t* wb = w + b * kQ6xBlockBytes;
    __builtin_prefetch(wb + 8 * kQ6xBlockBytes, 0, 3);
    __builtin_prefetch(wb + 8 * kQ6xBlockBytes + 128, 0, 3);
    __builtin_prefetch(wb + 8 * kQ6xBlockBytes + 256, 0, 3);
    __builtin_prefetch(wb + 8 * kQ6xBlockBytes + 384, 0, 3);
    const int8_t* sc = reinterpret_cast<const int8_t*>(wb + 384);
    const float* dt = d + (b / kQ6xSuper) * 16;
    int32_t u[16][32];
    q6_unpack(wb, u);
    for (int c = 0; c < C; ++c) {
      const int8_t* xq = a.qrow(m0 + c) + b * kBlock;
      int32_t xh0 = 0, xh1 = 0;
      for (int e = 0; e < 16; ++e) xh0 += xq[e];
      for (int e = 16; e < 32; ++e) xh1 += xq[e];
      q6_block_row(u, sc, dt, xq, xh0, xh1, a.d[static_cast<size_t>((m0 + c) * a.nb + b)], acc[c]);
    }
  }
  for (int c = 0; c < C; ++c)
    for (int l = 0; l < 16; ++l) y[(m0 + c) * n + l] = acc[c][l];
}

#elif defined(EMBER_ISA_AVX2)

// AVX2 block helpers shared with q6_head.cpp (see the portable ones above).
struct Q6Block {
  __m256i u[2][8];   // [half][j]: half 0 = rows 0..7, 1 = rows 8..15; u in [0, 63]
  __m256i sc[2][2];  // [h][half]: int32 sub-scales of half-block h, rows 8 half ..
};

__attribute__((always_inline)) inline void q6_unpack(const uint8_t* wb, Q6Block& blk) {
  const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x30);
  for (int hh = 0; hh < 2; ++hh) {
    const __m256i h0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 256 + hh * 32));
    const __m256i h1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 320 + hh * 32));
    const __m256i hi[8] = {
        _mm256_and_si256(_mm256_slli_epi16(h0, 4), m2), _mm256_and_si256(_mm256_slli_epi16(h0, 2), m2),
        _mm256_and_si256(h0, m2), _mm256_and_si256(_mm256_srli_epi16(h0, 2), m2),
        _mm256_and_si256(_mm256_slli_epi16(h1, 4), m2), _mm256_and_si256(_mm256_slli_epi16(h1, 2), m2),
        _mm256_and_si256(h1, m2), _mm256_and_si256(_mm256_srli_epi16(h1, 2), m2)};
    for (int c = 0; c < 4; ++c) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + c * 64 + hh * 32));
      blk.u[hh][c] = _mm256_or_si256(_mm256_and_si256(raw, m4), hi[c]);
      blk.u[hh][c + 4] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(raw, 4), m4), hi[c + 4]);
    }
  }
  const __m128i scb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 384));
  const __m128i scb2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 400));
  blk.sc[0][0] = _mm256_cvtepi8_epi32(scb);
  blk.sc[0][1] = _mm256_cvtepi8_epi32(_mm_srli_si128(scb, 8));
  blk.sc[1][0] = _mm256_cvtepi8_epi32(scb2);
  blk.sc[1][1] = _mm256_cvtepi8_epi32(_mm_srli_si128(scb2, 8));
}

// acc[hh] += (u . x - 32 xh) * sc * dw[hh] * ad for one block and one activation row xq.
__attribute__((always_inline)) inline void q6_block_row(const Q6Block& blk, const __m256 (&dw)[2],
                                                        const int8_t* xq, int32_t xh0, int32_t xh1,
                                                        __m256 ad, __m256 (&acc)[2]) {
  const __m256i ones = _mm256_set1_epi16(1);
  const auto& u = blk.u;
  __m256i xb[8];
  for (int j = 0; j < 8; ++j) {
    int32_t v;
    memcpy(&v, xq + 4 * j, 4);
    xb[j] = _mm256_set1_epi32(v);
  }
  const __m256i off0 = _mm256_set1_epi32(32 * xh0), off1 = _mm256_set1_epi32(32 * xh1);
  for (int hh = 0; hh < 2; ++hh) {
    // pairs of maddubs stay < 2^15: 2 * 2 * 63 * 127 = 32004
    const __m256i s0 = _mm256_add_epi16(_mm256_maddubs_epi16(u[hh][0], xb[0]),
                                        _mm256_maddubs_epi16(u[hh][1], xb[1]));
    const __m256i s1 = _mm256_add_epi16(_mm256_maddubs_epi16(u[hh][2], xb[2]),
                                        _mm256_maddubs_epi16(u[hh][3], xb[3]));
    const __m256i s2 = _mm256_add_epi16(_mm256_maddubs_epi16(u[hh][4], xb[4]),
                                        _mm256_maddubs_epi16(u[hh][5], xb[5]));
    const __m256i s3 = _mm256_add_epi16(_mm256_maddubs_epi16(u[hh][6], xb[6]),
                                        _mm256_maddubs_epi16(u[hh][7], xb[7]));
    const __m256i dot0 = _mm256_sub_epi32(
        _mm256_add_epi32(_mm256_madd_epi16(s0, ones), _mm256_madd_epi16(s1, ones)), off0);
    const __m256i dot1 = _mm256_sub_epi32(
        _mm256_add_epi32(_mm256_madd_epi16(s2, ones), _mm256_madd_epi16(s3, ones)), off1);
    const __m256i isum = _mm256_add_epi32(_mm256_mullo_epi32(dot0, blk.sc[0][hh]),
                                          _mm256_mullo_epi32(dot1, blk.sc[1][hh]));
    acc[hh] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw[hh], ad), acc[hh]);
  }
}

template <int C>
inline void q6x_tile(const uint8_t* w, const float* d, const QuantizedActs& a, int64_t m0,
                     float* y, int64_t n) {
  __m256 acc[C][2];
  for (int c = 0; c < C; ++c) acc[c][0] = acc[c][1] = _mm256_setzero_ps();
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t b = 0; b < a.nb; ++b) {
    const uint8_t* wb = w + b * kQ6xBlockBytes;
    for (int c = 0; c < 7; ++c)
      _mm_prefetch(reinterpret_cast<const char*>(wb + 8 * kQ6xBlockBytes + 64 * c), _MM_HINT_T0);
    Q6Block blk;
    q6_unpack(wb, blk);
    const float* dt = d + (b / kQ6xSuper) * 16;
    const __m256 dw[2] = {_mm256_loadu_ps(dt), _mm256_loadu_ps(dt + 8)};
    for (int c = 0; c < C; ++c) {
      const int8_t* xq = a.qrow(m0 + c) + b * kBlock;
      // the two 16-code sums: sad of the codes + 128 per 8 bytes, less 16 * 128 per half
      const __m256i sad = _mm256_sad_epu8(
          _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)), flip),
          _mm256_setzero_si256());
      const __m128i s_lo = _mm256_castsi256_si128(sad), s_hi = _mm256_extracti128_si256(sad, 1);
      const int32_t xh0 = _mm_cvtsi128_si32(s_lo) + _mm_extract_epi32(s_lo, 2) - 2048;
      const int32_t xh1 = _mm_cvtsi128_si32(s_hi) + _mm_extract_epi32(s_hi, 2) - 2048;
      q6_block_row(blk, dw, xq, xh0, xh1,
                   _mm256_set1_ps(a.d[static_cast<size_t>((m0 + c) * a.nb + b)]), acc[c]);
    }
  }
  for (int c = 0; c < C; ++c) {
    _mm256_storeu_ps(y + (m0 + c) * n, acc[c][0]);
    _mm256_storeu_ps(y + (m0 + c) * n + 8, acc[c][1]);
  }
}

#else

// AVX-512 VNNI block helpers shared with q6_head.cpp (see the portable ones above). Per output
// lane (row) the same integer dots and the same float ops in the same order as the AVX2 code
// (the -32 offset is the dot's starting value instead of a subtraction: integers, exact), so
// every ISA's outputs are equal bit for bit (tests/unit/test_q6_head.py).
struct Q6Block {
  __m512i u[8];   // [j]: lane l = row l, the 4 codes of columns 4j .. 4j + 3 (in [0, 63])
  __m512i sc[2];  // [h]: int32 sub-scales of half-block h (columns 16h .. 16h + 15), lane = row
};

__attribute__((always_inline)) inline void q6_unpack(const uint8_t* wb, Q6Block& blk) {
  const __m512i m4 = _mm512_set1_epi8(0x0F), m2 = _mm512_set1_epi8(0x30);
  const __m512i h0 = _mm512_loadu_si512(wb + 256), h1 = _mm512_loadu_si512(wb + 320);
  const __m512i hi[8] = {
      _mm512_and_si512(_mm512_slli_epi16(h0, 4), m2), _mm512_and_si512(_mm512_slli_epi16(h0, 2), m2),
      _mm512_and_si512(h0, m2), _mm512_and_si512(_mm512_srli_epi16(h0, 2), m2),
      _mm512_and_si512(_mm512_slli_epi16(h1, 4), m2), _mm512_and_si512(_mm512_slli_epi16(h1, 2), m2),
      _mm512_and_si512(h1, m2), _mm512_and_si512(_mm512_srli_epi16(h1, 2), m2)};
  for (int c = 0; c < 4; ++c) {
    const __m512i raw = _mm512_loadu_si512(wb + c * 64);
    blk.u[c] = _mm512_or_si512(_mm512_and_si512(raw, m4), hi[c]);
    blk.u[c + 4] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(raw, 4), m4), hi[c + 4]);
  }
  blk.sc[0] = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 384)));
  blk.sc[1] = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 400)));
}

// acc += (u . x - 32 xh) * sc * dw * ad for one block and one activation row xq.
__attribute__((always_inline)) inline void q6_block_row(const Q6Block& blk, __m512 dw,
                                                        const int8_t* xq, int32_t xh0, int32_t xh1,
                                                        __m512 ad, __m512& acc) {
  __m512i dot0 = _mm512_set1_epi32(-32 * xh0), dot1 = _mm512_set1_epi32(-32 * xh1);
  for (int j = 0; j < 4; ++j) {
    dot0 = _mm512_dpbusd_epi32(dot0, blk.u[j], bcast4(xq + 4 * j));
    dot1 = _mm512_dpbusd_epi32(dot1, blk.u[j + 4], bcast4(xq + 16 + 4 * j));
  }
  const __m512i isum = _mm512_add_epi32(_mm512_mullo_epi32(dot0, blk.sc[0]),
                                        _mm512_mullo_epi32(dot1, blk.sc[1]));
  acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw, ad), acc);
}

// The two 16-code sums of one activation block (the -32 offset term): sad of the codes + 128 per
// 8 bytes, less 16 * 128 per half.
__attribute__((always_inline)) inline void q6_half_sums(const int8_t* xq, int32_t& xh0,
                                                        int32_t& xh1) {
  const __m256i sad = _mm256_sad_epu8(
      _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)),
                       _mm256_set1_epi8(static_cast<char>(0x80))),
      _mm256_setzero_si256());
  const __m128i s_lo = _mm256_castsi256_si128(sad), s_hi = _mm256_extracti128_si256(sad, 1);
  xh0 = _mm_cvtsi128_si32(s_lo) + _mm_extract_epi32(s_lo, 2) - 2048;
  xh1 = _mm_cvtsi128_si32(s_hi) + _mm_extract_epi32(s_hi, 2) - 2048;
}

template <int C>
inline void q6x_tile(const uint8_t* w, const float* d, const QuantizedActs& a, int64_t m0,
                     float* y, int64_t n) {
  __m512 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t b = 0; b < a.nb; ++b) {
    const uint8_t* wb = w + b * kQ6xBlockBytes;
    for (int c = 0; c < 7; ++c)
      _mm_prefetch(reinterpret_cast<const char*>(wb + 8 * kQ6xBlockBytes + 64 * c), _MM_HINT_T0);
    Q6Block blk;
    q6_unpack(wb, blk);
    const __m512 dw = _mm512_loadu_ps(d + (b / kQ6xSuper) * 16);
    for (int c = 0; c < C; ++c) {
      const int8_t* xq = a.qrow(m0 + c) + b * kBlock;
      int32_t xh0, xh1;
      q6_half_sums(xq, xh0, xh1);
      q6_block_row(blk, dw, xq, xh0, xh1,
                   _mm512_set1_ps(a.d[static_cast<size_t>((m0 + c) * a.nb + b)]), acc[c]);
    }
  }
  for (int c = 0; c < C; ++c) _mm512_storeu_ps(y + (m0 + c) * n, acc[c]);
}

#endif
