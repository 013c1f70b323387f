// Q6 weights (6-bit codes, Q6_K's scale geometry) for large matrices read once per decode step:
// the LM head. One entry point, q6_gemm; the activation quantization is the other kernels'
// (kernels.h QuantizedActs), so a Q6 head sees the same int8 activations as a Q8 head.
//
// Format (N padded to 16 rows, K a multiple of 32 * sb):
//   w = d[row][super] * sc[row][k / 16] * q,  q int in [-32, 31], stored as u = q + 32 (6 bits),
//   sc int8 (one per 16 columns), d float32 (one per `sb` blocks of 32 columns: sb = 8 is
//   GGUF Q6_K's 256-column super-block, exactly).
//   packed (N/16, K/32, 416) uint8 per tile t and block b:
//     [0, 256):   low nibbles, Q4's interleaving: byte [c][4 l + e] (c < 4) =
//                 lo(u[16t+l][32b + 4c + e]) | lo(u[16t+l][32b + 16 + 4c + e]) << 4
//     [256, 384): high 2 bits: byte [p][4 l + e] (p < 2), bits 2i..2i+1 = hi(u[16t+l][32b + 4j + e])
//                 with j = 4p + i (column group j of 4 columns)
//     [384, 416): sub-scales int8: [h][l] = sc[16t+l][2b + h]
//   d (N/16, K/(32 sb), 16) float32: [t][s][l] = d[16t+l][s].
// One tile per ISA (AVX-512 VNNI, AVX2, plain C++ for EMBER_ISA_PORTABLE) on q6_layers.h's block
// helpers; all three give the same outputs bit for bit.

#include "kernels.h"

namespace {

constexpr int64_t kQ6BlockBytes = 416;

// Per activation row and 16-column half block: the sum of its int8 codes (the -32 offset term).
std::vector<int32_t> half_sums(const QuantizedActs& a, int64_t mrows) {
  const int64_t halves = a.nb * 2;
  std::vector<int32_t> xs(static_cast<size_t>(mrows * halves));
  for (int64_t i = 0; i < mrows; ++i) {
    const int8_t* q = a.qrow(i);
    for (int64_t h = 0; h < halves; ++h) {
      int32_t s = 0;
      for (int e = 0; e < 16; ++e) s += q[h * 16 + e];
      xs[static_cast<size_t>(i * halves + h)] = s;
    }
  }
  return xs;
}

#if defined(EMBER_ISA_PORTABLE)

template <int C>
void q6_tile(const uint8_t* w, const float* d, int64_t sb, const QuantizedActs& a,
             const int32_t* xs, int64_t m0, float* y, int64_t n) {
  float acc[C][16] = {};
  for (int64_t b = 0; b < a.nb; ++b) {
    const uint8_t* wb = w + b * kQ6BlockBytes;
    const int8_t* sc = reinterpret_cast<const int8_t*>(wb + 384);
    const float* dt = d + (b / sb) * 16;
    int32_t u[16][32];
    q6_unpack(wb, u);
    for (int c = 0; c < C; ++c) {
      const int8_t* xq = a.qrow(m0 + c) + b * kBlock;
      const int32_t* xh = xs + (m0 + c) * a.nb * 2 + 2 * b;
      q6_block_row(u, sc, dt, xq, xh[0], xh[1], a.d[static_cast<size_t>((m0 + c) * a.nb + b)],
                   acc[c]);
    }
  }
  for (int c = 0; c < C; ++c)
    for (int l = 0; l < 16; ++l) y[(m0 + c) * n + l] = acc[c][l];
}

#else

// Block b of a tile's row of blocks `w`, unpacked (the vector ISAs' Q6Block). NOTE: decode
// streams the head once from DRAM: the bytes ~5 blocks ahead are prefetched.
inline void q6_stream_block(const uint8_t* w, int64_t b, Q6Block& blk) {
  const uint8_t* wb = w + b * kQ6BlockBytes;
  for (int c = 0; c < 7; ++c)
    _mm_prefetch(reinterpret_cast<const char*>(wb + 2048 + 64 * c), _MM_HINT_T0);
  q6_unpack(wb, blk);
}

#endif

#if defined(EMBER_ISA_AVX2)

template <int C>
void q6_tile(const uint8_t* w, const float* d, int64_t sb, const QuantizedActs& a,
             const int32_t* xs, int64_t m0, float* y, int64_t n) {
  __m256 acc[C][2];
  for (int c = 0; c < C; ++c) acc[c][0] = acc[c][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < a.nb; ++b) {
    Q6Block blk;
    q6_stream_block(w, b, blk);
    const float* dt = d + (b / sb) * 16;
    const __m256 dw[2] = {_mm256_loadu_ps(dt), _mm256_loadu_ps(dt + 8)};
    for (int c = 0; c < C; ++c) {
      const int32_t* xh = xs + (m0 + c) * a.nb * 2 + 2 * b;
      q6_block_row(blk, dw, a.qrow(m0 + c) + b * kBlock, xh[0], xh[1],
                   _mm256_set1_ps(a.d[static_cast<size_t>((m0 + c) * a.nb + b)]), acc[c]);
    }
  }
  for (int c = 0; c < C; ++c) {
    _mm256_storeu_ps(y + (m0 + c) * n, acc[c][0]);
    _mm256_storeu_ps(y + (m0 + c) * n + 8, acc[c][1]);
  }
}

#elif !defined(EMBER_ISA_PORTABLE)

template <int C>
void q6_tile(const uint8_t* w, const float* d, int64_t sb, const QuantizedActs& a,
             const int32_t* xs, int64_t m0, float* y, int64_t n) {
  __m512 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t b = 0; b < a.nb; ++b) {
    Q6Block blk;
    q6_stream_block(w, b, blk);
    const __m512 dw = _mm512_loadu_ps(d + (b / sb) * 16);
    for (int c = 0; c < C; ++c) {
      const int32_t* xh = xs + (m0 + c) * a.nb * 2 + 2 * b;
      q6_block_row(blk, dw, a.qrow(m0 + c) + b * kBlock, xh[0], xh[1],
                   _mm512_set1_ps(a.d[static_cast<size_t>((m0 + c) * a.nb + b)]), acc[c]);
    }
  }
  for (int c = 0; c < C; ++c) _mm512_storeu_ps(y + (m0 + c) * n, acc[c]);
}

#endif

}  // namespace

extern "C" {

// y (M, Np) = x (M, K) @ W^T for Q6 weights (format above); sb: blocks of 32 per d.
void q6_gemm(const float* x, int64_t mrows, int64_t k, const uint8_t* packed, const float* d,
             int64_t sb, int64_t np, float* y, int nthreads) {
  const QuantizedActs a(x, mrows, k);
  const std::vector<int32_t> xs = half_sums(a, mrows);
  const int64_t tiles = np / kTile, nb = a.nb, nsb = nb / sb;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    const uint8_t* w = packed + t * nb * kQ6BlockBytes;
    const float* dt = d + t * nsb * kTile;
    float* yt = y + t * kTile;
    int64_t m0 = 0;
    for (; m0 + kChunk <= mrows; m0 += kChunk) q6_tile<kChunk>(w, dt, sb, a, xs.data(), m0, yt, np);
    switch (mrows - m0) {
      case 7: q6_tile<7>(w, dt, sb, a, xs.data(), m0, yt, np); break;
      case 6: q6_tile<6>(w, dt, sb, a, xs.data(), m0, yt, np); break;
      case 5: q6_tile<5>(w, dt, sb, a, xs.data(), m0, yt, np); break;
      case 4: q6_tile<4>(w, dt, sb, a, xs.data(), m0, yt, np); break;
      case 3: q6_tile<3>(w, dt, sb, a, xs.data(), m0, yt, np); break;
      case 2: q6_tile<2>(w, dt, sb, a, xs.data(), m0, yt, np); break;
      case 1: q6_tile<1>(w, dt, sb, a, xs.data(), m0, yt, np); break;
      default: break;
    }
  }
}

// Q6 codes of a dense (N, K) float32 weight by llama.cpp's Q6_K recipe, the reference being
// ember.formats.q6._quantize_rows: per 16 columns the codes (round, clamp to [-32, 31]) of the
// candidate scale peak / c (peak: the signed largest-magnitude value, c from kCandidates) with
// the least squared error after the least-squares rescale; then per super-block of sb * 32
// columns d = max |scale| / 127, sc = round(scale / d), q = round(w / (d sc)).
// q (N, K) int8, sc (N, K/16) int8, d (N, K/(32 sb)) float32.
void q6_quantize(const float* w, int64_t n, int64_t k, int64_t sb, int8_t* q, int8_t* sc,
                 float* d, int nthreads) {
  static const float kCandidates[] = {-32.0f, -31.5f, -31.0f, -32.5f, -33.0f, -30.5f};
  const int64_t groups = k / 16, per_super = 2 * sb, supers = groups / per_super;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t r = 0; r < n; ++r) {
    const float* row = w + r * k;
    std::vector<float> scale(static_cast<size_t>(groups));
    for (int64_t g = 0; g < groups; ++g) {
      const float* x = row + g * 16;
      float peak = 0.0f;
      for (int e = 0; e < 16; ++e)
        if (fabsf(x[e]) > fabsf(peak)) peak = x[e];
      const float safe = peak == 0.0f ? 1.0f : peak;
      float best_err = INFINITY, best = 0.0f;
      for (float c : kCandidates) {
        const float is = c / safe;
        float qx = 0.0f, qq = 0.0f, qv[16];
        for (int e = 0; e < 16; ++e) {
          qv[e] = std::min(31.0f, std::max(-32.0f, nearbyintf(x[e] * is)));
          qx += qv[e] * x[e];
          qq += qv[e] * qv[e];
        }
        const float s = qx / std::max(qq, 1e-30f);
        float err = 0.0f;
        for (int e = 0; e < 16; ++e) err += (x[e] - s * qv[e]) * (x[e] - s * qv[e]);
        if (err < best_err) {
          best_err = err;
          best = s;
        }
      }
      scale[static_cast<size_t>(g)] = best;
    }
    for (int64_t s = 0; s < supers; ++s) {
      float amax = 0.0f;
      for (int64_t g = s * per_super; g < (s + 1) * per_super; ++g)
        amax = std::max(amax, fabsf(scale[static_cast<size_t>(g)]));
      const float ds = amax / 127.0f;
      d[r * supers + s] = ds;
      for (int64_t g = s * per_super; g < (s + 1) * per_super; ++g) {
        const float c = ds > 0.0f ? std::min(127.0f, std::max(-127.0f,
                                    nearbyintf(scale[static_cast<size_t>(g)] / ds))) : 0.0f;
        sc[r * groups + g] = static_cast<int8_t>(c);
        const float step = ds * c;
        for (int e = 0; e < 16; ++e) {
          const float v = step != 0.0f ? nearbyintf(row[g * 16 + e] / step) : 0.0f;
          q[r * k + g * 16 + e] = static_cast<int8_t>(std::min(31.0f, std::max(-32.0f, v)));
        }
      }
    }
  }
}

}  // extern "C"
