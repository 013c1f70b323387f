// Building blocks of Ember's CPU kernels, shared by cpu_kernels.cpp (one op per call) and
// decoder.cpp (whole decode steps). Formats and layouts: see cpu_kernels.cpp.
// This file holds the AVX-512 VNNI + BF16 versions; built with EMBER_ISA_AVX2 (build.py's
// "avx2" ISA), isa_avx2.h supplies the same names for AVX2 + FMA CPUs instead; built with
// EMBER_ISA_PORTABLE, isa_portable.h (plain C++ the compiler vectorises: ARM, older x86).
#pragma once
#if defined(EMBER_ISA_AVX2)
#include "isa_avx2.h"
#elif defined(EMBER_ISA_PORTABLE)
#include "isa_portable.h"
#else
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "common.h"

namespace {

// Activations (M, K) quantized once per call: qx (M, K) int8, dx (M, K/32) scales,
// sx (M, K/32) = dx * sum(qx) (the Q4 min term), si (M, K/32) = 128 * sum(qx) (the Q8 offset).
struct QuantizedActs {
  int64_t nb = 0;
  std::vector<int8_t> q;
  std::vector<float> d, s;
  std::vector<int32_t> si;
  // Room for mrows rows of k values; fill with quantize_row (any thread, one row each).
  QuantizedActs(int64_t mrows, int64_t k)
      : nb(k / kBlock), q(static_cast<size_t>(mrows * k)), d(static_cast<size_t>(mrows * nb)),
        s(static_cast<size_t>(mrows * nb)), si(static_cast<size_t>(mrows * nb)) {}
  QuantizedActs(const float* x, int64_t mrows, int64_t k) : QuantizedActs(mrows, k) {
    for (int64_t i = 0; i < mrows; ++i) quantize_row(x + i * k, i);
  }
  void quantize_row(const float* x, int64_t i) {
    for (int64_t b = i * nb; b < (i + 1) * nb; ++b) {
      const float* xb = x + (b - i * nb) * kBlock;
      const __m512 a0 = _mm512_loadu_ps(xb), a1 = _mm512_loadu_ps(xb + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a0), _mm512_abs_ps(a1)));
      const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(a0, _mm512_set1_ps(id)));
      const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(a1, _mm512_set1_ps(id)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(&q[static_cast<size_t>(b * kBlock)]),
                       _mm512_cvtsepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(&q[static_cast<size_t>(b * kBlock + 16)]),
                       _mm512_cvtsepi32_epi8(q1));
      const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
      d[static_cast<size_t>(b)] = amax / 127.0f;
      s[static_cast<size_t>(b)] = amax / 127.0f * static_cast<float>(sum);
      si[static_cast<size_t>(b)] = 128 * sum;
    }
  }
  const int8_t* qrow(int64_t i) const { return q.data() + i * nb * kBlock; }
};

inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// init + sum over the 8 vectors of one block (lane = weight row): two independent VNNI chains
// (the instruction's latency is several cycles; integer sums are exact in any order).
inline __m512i dot8(const __m512i* wv, const int8_t* xq, __m512i init) {
  __m512i d0 = init, d1 = _mm512_setzero_si512();
  for (int j = 0; j < 8; j += 2) {
    d0 = _mm512_dpbusd_epi32(d0, wv[j], bcast4(xq + 4 * j));
    d1 = _mm512_dpbusd_epi32(d1, wv[j + 1], bcast4(xq + 4 * j + 4));
  }
  return _mm512_add_epi32(d0, d1);
}

// Per-block float scales of the Q4-family tiles (q4_tile's S): the block's 16 scales dw and
// mins / offsets mw. kBytes: a block's bytes; kLines: its 64-byte lines.
struct Q4Scales {  // Q4: stored per block, (tiles, K/32, 16) float32 each
  static constexpr int64_t kBytes = 256;
  static constexpr int kLines = 4;
  const float *d, *m;
  void block(int64_t b, const uint8_t*, __m512& dw, __m512& mw) const {
    dw = _mm512_loadu_ps(d + b * kTile), mw = _mm512_loadu_ps(m + b * kTile);
  }
};

// Q4K (layout: isa_avx2.h Q4kScales): the block's exact float32 scale d sc and offset -dmin m.
struct Q4kScales {
  static constexpr int64_t kBytes = kQ4kBlockBytes;
  static constexpr int kLines = 5;
  const float *d, *nm;
  void block(int64_t b, const uint8_t* wb, __m512& dw, __m512& mw) const {
    const float *ds = d + (b / kQ4kSuper) * kTile, *ms = nm + (b / kQ4kSuper) * kTile;
    dw = _mm512_mul_ps(_mm512_loadu_ps(ds), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
             _mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 256)))));
    mw = _mm512_mul_ps(_mm512_loadu_ps(ms), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
             _mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 272)))));
  }
};

// One 16-row tile of Q4-family weights (Q4, Q4K: the same nibble bytes, S's scales) against C
// (<= kChunk) activation rows starting at m0; S is a template parameter (each format's tile is
// its own straight-line code).
template <int C, class S>
inline void q4_tile(const uint8_t* w, S sc, const QuantizedActs& a, int64_t m0, float* y,
                    int64_t n) {
  __m512 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
  const __m512i mask = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < a.nb; ++b) {
    const uint8_t* wb = w + b * S::kBytes;
    // NOTE: software prefetch a few KB ahead: decode streams every weight once from DRAM.
    for (int c = 0; c < S::kLines; ++c)
      _mm_prefetch(reinterpret_cast<const char*>(wb + 8 * S::kBytes + 64 * c), _MM_HINT_T0);
    __m512i wv[8];
    for (int c = 0; c < 4; ++c) {
      const __m512i raw = _mm512_loadu_si512(wb + c * 64);
      wv[c] = _mm512_and_si512(raw, mask);
      wv[c + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), mask);
    }
    __m512 dw, mw;
    sc.block(b, wb, dw, mw);
    for (int c = 0; c < C; ++c) {
      const int8_t* xq = a.qrow(m0 + c) + b * kBlock;
      const __m512i dot = dot8(wv, xq, _mm512_setzero_si512());
      const size_t ab = static_cast<size_t>((m0 + c) * a.nb + b);
      acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                               _mm512_mul_ps(dw, _mm512_set1_ps(a.d[ab])), acc[c]);
      acc[c] = _mm512_fmadd_ps(mw, _mm512_set1_ps(a.s[ab]), acc[c]);
    }
  }
  for (int c = 0; c < C; ++c) _mm512_storeu_ps(y + (m0 + c) * n, acc[c]);
}

// H (Q8h): the block's 16 scales are float16 after its 512 code bytes (d unused).
template <int C, bool H = false>
inline void q8_tile(const uint8_t* w, const float* d, const QuantizedActs& a, int64_t m0,
                    float* y, int64_t n) {
  __m512 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t b = 0; b < a.nb; ++b) {
    constexpr int64_t bytes = H ? kQ8hBlockBytes : 512;
    const uint8_t* wb = w + b * bytes;
    for (int j = 0; j < (H ? 9 : 8); ++j)
      _mm_prefetch(reinterpret_cast<const char*>(wb + 8 * bytes + 64 * j), _MM_HINT_T0);
    __m512i wv[8];
    for (int j = 0; j < 8; ++j) wv[j] = _mm512_loadu_si512(wb + j * 64);
    const __m512 dw = H ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 512)))
                        : _mm512_loadu_ps(d + b * kTile);
    for (int c = 0; c < C; ++c) {
      const int8_t* xq = a.qrow(m0 + c) + b * kBlock;
      const size_t ab = static_cast<size_t>((m0 + c) * a.nb + b);
      const __m512i dot = dot8(wv, xq, _mm512_set1_epi32(-a.si[ab]));
      acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                               _mm512_mul_ps(dw, _mm512_set1_ps(a.d[ab])), acc[c]);
    }
  }
  for (int c = 0; c < C; ++c) _mm512_storeu_ps(y + (m0 + c) * n, acc[c]);
}


// One 16-row tile of Q5 weights (w = d (u - 16), u in [0, 31]): 352 bytes a block, the Q4
// tile's nibbles, a 64-byte plane of fifth bits and 16 float16 scales (isa_avx2.h q5_tile
// has the layout); the
// -16 offset enters the int32 dot as -16 * sum(qx) = -si / 8 (the Q8 kernel's dot, exactly).
template <int C>
inline void q5_tile(const uint8_t* w, const QuantizedActs& a, int64_t m0, float* y,
                    int64_t n) {
  __m512 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
  const __m512i mask = _mm512_set1_epi8(0x0F), bit4 = _mm512_set1_epi8(0x10);
  for (int64_t b = 0; b < a.nb; ++b) {
    const uint8_t* wb = w + b * kQ5BlockBytes;
    for (int c = 0; c < 6; ++c) _mm_prefetch(reinterpret_cast<const char*>(wb + 2816 + 64 * c),
                                             _MM_HINT_T0);
    const __m512i hi = _mm512_loadu_si512(wb + 256);
    const __m512i hs[8] = {
        _mm512_slli_epi16(hi, 4), _mm512_slli_epi16(hi, 3), _mm512_slli_epi16(hi, 2),
        _mm512_slli_epi16(hi, 1), hi, _mm512_srli_epi16(hi, 1), _mm512_srli_epi16(hi, 2),
        _mm512_srli_epi16(hi, 3)};
    __m512i wv[8];
    for (int c = 0; c < 4; ++c) {
      const __m512i raw = _mm512_loadu_si512(wb + c * 64);
      wv[c] = _mm512_or_si512(_mm512_and_si512(raw, mask), _mm512_and_si512(hs[c], bit4));
      wv[c + 4] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(raw, 4), mask),
                                  _mm512_and_si512(hs[c + 4], bit4));
    }
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 320)));
    for (int c = 0; c < C; ++c) {
      const int8_t* xq = a.qrow(m0 + c) + b * kBlock;
      const size_t ab = static_cast<size_t>((m0 + c) * a.nb + b);
      const __m512i dot = dot8(wv, xq, _mm512_set1_epi32(-(a.si[ab] / 8)));
      acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                               _mm512_mul_ps(dw, _mm512_set1_ps(a.d[ab])), acc[c]);
    }
  }
  for (int c = 0; c < C; ++c) _mm512_storeu_ps(y + (m0 + c) * n, acc[c]);
}

#include "q6_layers.h"  // q6x_tile: Q6 layers (GGUF Q6_K exact)

}  // namespace
#include "gemm_rows.h"  // tile_rows, gemm_row_tiles: the row tiles above, all formats
namespace {

// y (M, np) = act @ W^T over the tiles of W. Worksharing only: call inside a parallel region
// (every thread of the team must call it) or wrap with `omp parallel`.
inline void gemm_tiles(const LinearW& lw, const QuantizedActs& a, int64_t mrows, float* y) {
  gemm_row_tiles(lw, a, mrows, y);
}

// out row = x row * rsqrt(mean(x^2) + eps) * w for one row of h floats; with `residual`,
// x += residual first (in place).
inline void rms_norm_row(float* x, const float* residual, const float* w, int64_t h, float eps,
                         float* out) {
  __m512 ss = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= h; j += 16) {
    __m512 v = _mm512_loadu_ps(x + j);
    if (residual) {
      v = _mm512_add_ps(v, _mm512_loadu_ps(residual + j));
      _mm512_storeu_ps(x + j, v);
    }
    ss = _mm512_fmadd_ps(v, v, ss);
  }
  float s = _mm512_reduce_add_ps(ss);
  for (; j < h; ++j) {
    if (residual) x[j] += residual[j];
    s += x[j] * x[j];
  }
  const float inv = 1.0f / sqrtf(s / static_cast<float>(h) + eps);
  for (j = 0; j < h; ++j) out[j] = x[j] * inv * w[j];
}

// exp(x) for 16 floats: 2^(x log2 e) = 2^n * 2^f with n = round(x log2 e), |f| <= 1/2, 2^f by
// a degree-6 polynomial (relative error ~2e-7); inputs clamped to avoid inf/denormal edges.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline void silu_mul_row(const float* g, const float* u, int64_t inter, float* out) {
  int64_t j = 0;
  for (; j + 16 <= inter; j += 16) {
    const __m512 gv = _mm512_loadu_ps(g + j);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    const __m512 s = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    _mm512_storeu_ps(out + j, _mm512_mul_ps(s, _mm512_loadu_ps(u + j)));
  }
  for (; j < inter; ++j) out[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
}


// 16 bf16 -> 16 floats (a float's top 16 bits are the bf16's): one word permute with a zero mask
// puts word j at the top of lane j. NOTE: vpermw from a 256-bit load, not vpmovzxwd + vpslld:
// one vector op instead of two per 16 dims, the same bits (decode attention's K and V
// conversions: ~8% of its compute, longctx_decode_probe).
inline __m512 load_bf16(const kv_t* p) {
  const __m512i idx = _mm512_set_epi16(15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0, 8, 0,
                                       7, 0, 6, 0, 5, 0, 4, 0, 3, 0, 2, 0, 1, 0, 0, 0);
  const __m512i x = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, idx, x));
}


inline void store_bf16(kv_t* dst, const float* src, int64_t n) {  // round to nearest even
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j),
                        reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(src + j))));
  for (; j < n; ++j) {
    uint32_t bits;
    memcpy(&bits, src + j, 4);
    dst[j] = static_cast<kv_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
  }
}

// Rotate-half RoPE in place on the Hq + Hk leading heads of one qkv row, then copy its k and v
// heads into the caches at `slot`.
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

// scores[i] = exp(scores[i] - mx) in place; returns their sum (the softmax denominator).
inline float exp_shifted(float* scores, int64_t len, float mx) {
  int64_t i = 0;
  __m512 dsum = _mm512_setzero_ps();
  for (; i + 16 <= len; i += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(scores + i), _mm512_set1_ps(mx)));
    _mm512_storeu_ps(scores + i, e);
    dsum = _mm512_add_ps(dsum, e);
  }
  float denom = _mm512_reduce_add_ps(dsum);
  for (; i < len; ++i) {
    scores[i] = expf(scores[i] - mx);
    denom += scores[i];
  }
  return denom;
}


// Attention of query head h of request b (q: D floats) over its context; `scores` is scratch
// of at least lens[b] floats. out: D floats. Softmax in float32.
inline void attend_head(const DecodeCtx& c, int64_t b, int64_t h, const float* q,
                        const kv_t* k_cache, const kv_t* v_cache, float* scores, float* out) {
  const int64_t len = c.lens[b], kvh = h / (c.hq / c.hk), dim = c.dim, bs = c.block_size;
  const int64_t* table = c.block_tables + b * c.max_blocks;
  float mx = -INFINITY;
  for (int64_t p = 0; p < len; ++p) {
    const kv_t* kv = k_cache + ((table[p / bs] * bs + p % bs) * c.hk + kvh) * dim;
    __m512 acc = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= dim; j += 16)
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + j), load_bf16(kv + j), acc);
    float s = _mm512_reduce_add_ps(acc);
    for (; j < dim; ++j) s += q[j] * bf16_to_float(kv[j]);
    s *= c.scale;
    scores[p] = s;
    mx = std::max(mx, s);
  }
  const float denom = exp_shifted(scores, len, mx);
  for (int64_t j = 0; j < dim; ++j) out[j] = 0.0f;
  for (int64_t p = 0; p < len; ++p) {
    const kv_t* vv = v_cache + ((table[p / bs] * bs + p % bs) * c.hk + kvh) * dim;
    const float w = scores[p];
    int64_t j = 0;
    for (; j + 16 <= dim; j += 16)
      _mm512_storeu_ps(out + j, _mm512_fmadd_ps(_mm512_set1_ps(w), load_bf16(vv + j),
                                                _mm512_loadu_ps(out + j)));
    for (; j < dim; ++j) out[j] += w * bf16_to_float(vv[j]);
  }
  const float inv = 1.0f / denom;
  for (int64_t j = 0; j < dim; ++j) out[j] *= inv;
}

// [sum(v0), sum(v1), sum(v2), sum(v3)]: four horizontal sums sharing the shuffles.
inline __m128 reduce4(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
  const __m512 a = _mm512_add_ps(_mm512_unpacklo_ps(v0, v1), _mm512_unpackhi_ps(v0, v1));
  const __m512 b = _mm512_add_ps(_mm512_unpacklo_ps(v2, v3), _mm512_unpackhi_ps(v2, v3));
  // per 128-bit lane: [v0, v1, v2, v3] partial sums
  const __m512 c = _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xEE));
  const __m512 d = _mm512_add_ps(c, _mm512_shuffle_f32x4(c, c, 0x4E));
  const __m512 e = _mm512_add_ps(d, _mm512_shuffle_f32x4(d, d, 0xB1));
  return _mm512_castps512_ps128(e);
}

// Attention of the G query heads sharing kv head `kvh` (q: G rows of NV * 16 floats, q_stride
// apart) of request b; scores: scratch of G * lens[b] floats; out: G rows, out_stride apart.
// K and V rows are loaded once for the group; scores come four positions at a time.
template <int G, int NV>
inline void attend_group(const DecodeCtx& c, int64_t b, int64_t kvh, const float* q,
                         int64_t q_stride, const kv_t* k_cache, const kv_t* v_cache,
                         float* scores, float* out, int64_t out_stride) {
  constexpr int64_t dim = NV * 16;
  const int64_t len = c.lens[b], bs = c.block_size, hk = c.hk;
  const int64_t* table = c.block_tables + b * c.max_blocks;
  auto row = [&](const kv_t* cache, int64_t p) {
    return cache + ((table[p / bs] * bs + p % bs) * hk + kvh) * dim;
  };
  __m512 qv[G][NV];
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < NV; ++v) qv[g][v] = _mm512_loadu_ps(q + g * q_stride + v * 16);
  int64_t p = 0;
  for (; p + 4 <= len; p += 4) {
    const kv_t* kr[4] = {row(k_cache, p), row(k_cache, p + 1), row(k_cache, p + 2),
                         row(k_cache, p + 3)};
    __m512 part[G][4];
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < 4; ++i) part[g][i] = _mm512_setzero_ps();
    for (int v = 0; v < NV; ++v)
      for (int i = 0; i < 4; ++i) {
        const __m512 kvec = load_bf16(kr[i] + v * 16);
        for (int g = 0; g < G; ++g) part[g][i] = _mm512_fmadd_ps(qv[g][v], kvec, part[g][i]);
      }
    for (int g = 0; g < G; ++g)
      _mm_storeu_ps(scores + g * len + p, _mm_mul_ps(reduce4(part[g][0], part[g][1], part[g][2],
                                                            part[g][3]),
                                                    _mm_set1_ps(c.scale)));
  }
  for (; p < len; ++p) {
    const kv_t* kr = row(k_cache, p);
    for (int g = 0; g < G; ++g) {
      __m512 acc = _mm512_setzero_ps();
      for (int v = 0; v < NV; ++v) acc = _mm512_fmadd_ps(qv[g][v], load_bf16(kr + v * 16), acc);
      scores[g * len + p] = _mm512_reduce_add_ps(acc) * c.scale;
    }
  }
  float inv[G];
  for (int g = 0; g < G; ++g) {
    float* sg = scores + g * len;
    float mx = -INFINITY;
    for (int64_t i = 0; i < len; ++i) mx = std::max(mx, sg[i]);
    inv[g] = 1.0f / exp_shifted(sg, len, mx);
  }
  __m512 acc[G][NV];
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < NV; ++v) acc[g][v] = _mm512_setzero_ps();
  for (int64_t i = 0; i < len; ++i) {
    const kv_t* vr = row(v_cache, i);
    for (int v = 0; v < NV; ++v) {
      const __m512 vvec = load_bf16(vr + v * 16);
      for (int g = 0; g < G; ++g)
        acc[g][v] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g * len + i]), vvec, acc[g][v]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < NV; ++v)
      _mm512_storeu_ps(out + g * out_stride + v * 16, _mm512_mul_ps(acc[g][v], _mm512_set1_ps(inv[g])));
}

// Attention of every query head of kv group `kvh` of request b: the grouped kernel for the
// common shapes (head_dim 64 or 128, 1-4 query heads per kv head), else head by head.
// q: the request's query heads (D floats each); scores: scratch of hq/hk * lens[b] floats.
inline void attend_kv_group(const DecodeCtx& c, int64_t b, int64_t kvh, const float* q,
                            const kv_t* k_cache, const kv_t* v_cache, float* scores,
                            float* out) {
  const int64_t group = c.hq / c.hk, h0 = kvh * group, d = c.dim;
  const float* qg = q + h0 * d;
  float* og = out + h0 * d;
#define EMBER_ATTEND(G, NV) \
  attend_group<G, NV>(c, b, kvh, qg, d, k_cache, v_cache, scores, og, d); return
  if (d == 64) {
    switch (group) {
      case 1: EMBER_ATTEND(1, 4); case 2: EMBER_ATTEND(2, 4);
      case 3: EMBER_ATTEND(3, 4); case 4: EMBER_ATTEND(4, 4);
      default: break;
    }
  } else if (d == 128) {
    switch (group) {
      case 1: EMBER_ATTEND(1, 8); case 2: EMBER_ATTEND(2, 8);
      default: break;
    }
  }
#undef EMBER_ATTEND
  for (int64_t h = h0; h < h0 + group; ++h)
    attend_head(c, b, h, q + h * d, k_cache, v_cache, scores, out + h * d);
}

// ---- vector primitives of the ISA-independent attention (attention.h) ----------------------
typedef __m512 vfloat;
constexpr int kVecW = 16;
inline vfloat v_load(const float* p) { return _mm512_loadu_ps(p); }
inline void v_store(float* p, vfloat v) { _mm512_storeu_ps(p, v); }
inline vfloat v_set1(float x) { return _mm512_set1_ps(x); }
inline vfloat v_zero() { return _mm512_setzero_ps(); }
inline vfloat v_fma(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }
inline vfloat v_mul(vfloat a, vfloat b) { return _mm512_mul_ps(a, b); }
inline vfloat v_load_i8(const int8_t* p) {  // 16 int8 -> 16 floats
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline vfloat v_max(vfloat a, vfloat b) { return _mm512_max_ps(a, b); }
inline vfloat v_reg(vfloat v) { return v; }  // (isa_portable.h: kept in a register)
inline float v_hmax(vfloat a) { return _mm512_reduce_max_ps(a); }  // the largest lane
inline void v_prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
inline void v_hsum4(vfloat a, vfloat b, vfloat c, vfloat d, float* out) {
  _mm_storeu_ps(out, reduce4(a, b, c, d));
}


// ---- grammar masks (cpu_kernels.cpp apply_token_bitmask) ------------------------------------
// x (V) set to -inf where the bit of token t (bit t % 32 of words[t / 32]) is clear.
inline void bitmask_row(float* x, const int32_t* words, int64_t vocab) {
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  const int64_t full = vocab / 32;
  for (int64_t w = 0; w < full; ++w) {
    const uint32_t m = static_cast<uint32_t>(words[w]);
    if (m == 0xFFFFFFFFu) continue;
    _mm512_mask_storeu_ps(x + 32 * w, static_cast<__mmask16>(~m & 0xFFFFu), ninf);
    _mm512_mask_storeu_ps(x + 32 * w + 16, static_cast<__mmask16>(~m >> 16), ninf);
  }
  for (int64_t t = 32 * full; t < vocab; ++t)
    if (!((static_cast<uint32_t>(words[t / 32]) >> (t % 32)) & 1u)) x[t] = -INFINITY;
}

}  // namespace
#endif  // EMBER_ISA_AVX2 / EMBER_ISA_PORTABLE

#include "attention.h"
