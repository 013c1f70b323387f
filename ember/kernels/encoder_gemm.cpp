// Many-row GEMM for encoders (BERT embeddings: hundreds to thousands of tokens per call).
//
//   y (M, N) = epilogue( x (M, K) @ W^T ),  epilogue: * scales, + bias, [GELU], [+ residual]
//
// Weights: int8 in groups of 32 along K (w = q * sw, q in [-127, 127], one scale per output
// row and group), stored widened to int16 and packed in panels of 16 output columns:
// (N/16, K/2, 16, 2) int16, element [j][p][c][e] = q[16 j + c][2 p + e], so one 32-byte vector
// holds 8 columns x 2 consecutive k; scales (N/16, K/32, 16) float32, [j][g][c].
// Activations: quantized ONCE per call, per row, to 13-bit int16 (|q| <= 8191: near-exact).
// The dot product is AVX2's madd (int16 pairs -> int32, 16 MACs per instruction) in a
// register-tiled 3 x 16 micro-kernel: int32 sums per group (16 madds per accumulator), then
// one FMA per group into float accumulators; the float epilogue runs once per output.
// NOTE: per-row weight scales (no groups) cost 0.0035 of cosine similarity on
// all-MiniLM-L6-v2 (the 1536 -> 384 projections most); groups of 32 cost 0.0005.
// Needs K a multiple of 32 and N a multiple of 16.
// Built into every ISA's library: the AVX2 code under avx2 and avx512 builds (both compile
// with -mavx2 -mfma), plain C++ under EMBER_ISA_PORTABLE; the avx512-vnni build runs
// enc_i16_gemm (the int8 plan's default) on a 512-bit vpdpwssd tile instead (bitwise the same
// outputs, ~2.1x the AVX2 loop's MACs per CPU second on Zen 5).
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

#if !defined(EMBER_ISA_PORTABLE)
#include <immintrin.h>
#endif

#if !defined(EMBER_ISA_PORTABLE) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define EMBER_ENC_ZMM 1  // the avx512-vnni build: 512-bit GEMM tile and attention
#endif

// a * b + c, contracted to one FMA where the target has one (portable build)
#define EMBER_ENC_MADD(a, b, c) ((a) * (b) + (c))

namespace {

constexpr int64_t kEncNr = 16;   // output columns per panel
constexpr int64_t kEncMr = 3;    // activation rows per micro-kernel
constexpr int64_t kEncGroup = 32;  // k values per weight scale
constexpr int64_t kEncMc = 96;   // activation rows per task (a multiple of kEncMr)
constexpr int64_t kEncNc = 4;    // panels per task

constexpr float kEncQmax = 8191.0f;  // 32 * 8191 * 127 fits int32 with room to spare

// x row (k floats) -> q row (k int16, round to nearest even); returns the row's scale
// (x ~= q * scale).
inline float enc_quantize_row(const float* x, int64_t k, float qmax, int16_t* q) {
  float amax = 0.0f;
  int64_t j = 0;
#if !defined(EMBER_ISA_PORTABLE)
  __m256 m = _mm256_setzero_ps();
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (; j + 8 <= k; j += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)));
  float lanes[8];
  _mm256_storeu_ps(lanes, m);
  for (float v : lanes) amax = std::max(amax, v);
#endif
  for (; j < k; ++j) amax = std::max(amax, fabsf(x[j]));
  const float inv = amax > 0.0f ? qmax / amax : 0.0f;
  j = 0;
#if !defined(EMBER_ISA_PORTABLE)
  const __m256 vi = _mm256_set1_ps(inv);
  for (; j + 16 <= k; j += 16) {
    const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j), vi));
    const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j + 8), vi));
    // packs works per 128-bit lane: (lo0 hi0 lo1 hi1) -> restore lo, hi order
    const __m256i pk = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + j), pk);
  }
#endif
  for (; j < k; ++j) q[j] = static_cast<int16_t>(nearbyintf(x[j] * inv));
  return amax > 0.0f ? amax / qmax : 0.0f;
}

// Exact-erf GELU: erf by Eigen's rational approximation (|err| ~1e-7 on [-4, 4]).
inline float enc_gelu_scalar(float v) { return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); }

struct EncEpilogue {
  const float* sw;        // (N/16, K/32, 16) weight group scales
  const float* bias;      // (N,) or null
  const float* residual;  // (M, N) or null: added after the activation
  int act;                // 0 none, 1 GELU (erf)
  float* y;
  int64_t ldy;
};

#if defined(EMBER_ISA_PORTABLE)

template <int R>
inline void enc_micro(const int16_t* a, int64_t lda, const float* sa, const int16_t* b,
                      const float* ws, int64_t kp, int64_t m0, int64_t n0, const EncEpilogue& e) {
  float accf[R][kEncNr] = {};
  for (int64_t g = 0; g < kp / (kEncGroup / 2); ++g) {
    int32_t acc[R][kEncNr] = {};
    for (int64_t p = g * kEncGroup / 2; p < (g + 1) * kEncGroup / 2; ++p) {
      const int16_t* bp = b + p * 2 * kEncNr;
      for (int r = 0; r < R; ++r) {
        const int32_t a0 = a[r * lda + 2 * p], a1 = a[r * lda + 2 * p + 1];
        for (int c = 0; c < kEncNr; ++c) acc[r][c] += a0 * bp[2 * c] + a1 * bp[2 * c + 1];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < kEncNr; ++c)
        accf[r][c] = EMBER_ENC_MADD(static_cast<float>(acc[r][c]), ws[g * kEncNr + c], accf[r][c]);
  }
  for (int r = 0; r < R; ++r) {
    float* yr = e.y + (m0 + r) * e.ldy + n0;
    for (int c = 0; c < kEncNr; ++c) {
      float v = EMBER_ENC_MADD(accf[r][c], sa[r], e.bias ? e.bias[n0 + c] : 0.0f);
      if (e.act == 1) v = enc_gelu_scalar(v);
      if (e.residual) v += e.residual[(m0 + r) * e.ldy + n0 + c];
      yr[c] = v;
    }
  }
}

#else

// erf(x) ~ x P(x^2) / Q(x^2) on [-4, 4] (Eigen's coefficients), highest power first
constexpr float kErfP[7] = {-2.72614225801306e-10f, 2.77068142495902e-08f,
                            -2.10102402082508e-06f, -5.69250639462346e-05f,
                            -7.34990630326855e-04f, -2.95459980854025e-03f,
                            -1.60960333262415e-02f};
constexpr float kErfQ[5] = {-1.45660718464996e-05f, -2.13374055278905e-04f,
                            -1.68282697438203e-03f, -7.37332916720468e-03f,
                            -1.42647390514189e-02f};

inline __m256 enc_erf8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(4.0f)), _mm256_set1_ps(-4.0f));
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(kErfP[0]), q = _mm256_set1_ps(kErfQ[0]);
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(kErfP[i]));
  for (int i = 1; i < 5; ++i) q = _mm256_fmadd_ps(x2, q, _mm256_set1_ps(kErfQ[i]));
  return _mm256_div_ps(_mm256_mul_ps(x, p), q);
}

inline __m256 enc_gelu8(__m256 v) {
  const __m256 e = enc_erf8(_mm256_mul_ps(v, _mm256_set1_ps(0.70710678118654752f)));
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), v),
                       _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

inline __m256i enc_bcast_pair(const int16_t* p) {
  int32_t v;
  memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// R (<= 6) rows of a (int16, lda apart) against one packed panel b (kp pairs): 16 outputs per
// row, integer sums over the whole K in registers, then the float epilogue.
template <int R>
inline void enc_micro(const int16_t* a, int64_t lda, const float* sa, const int16_t* b,
                      const float* ws, int64_t kp, int64_t m0, int64_t n0, const EncEpilogue& e) {
  __m256 accf[R][2];
  for (int r = 0; r < R; ++r) accf[r][0] = accf[r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < kp / (kEncGroup / 2); ++g) {
    __m256i acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (int64_t p = g * kEncGroup / 2; p < (g + 1) * kEncGroup / 2; ++p) {
      const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + p * 32));
      const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + p * 32 + 16));
      for (int r = 0; r < R; ++r) {
        const __m256i av = enc_bcast_pair(a + r * lda + 2 * p);
        acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(av, b0));
        acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(av, b1));
      }
    }
    // lane l of vector h is column 8 h + l
    const __m256 w0 = _mm256_loadu_ps(ws + g * kEncNr), w1 = _mm256_loadu_ps(ws + g * kEncNr + 8);
    for (int r = 0; r < R; ++r) {
      accf[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][0]), w0, accf[r][0]);
      accf[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][1]), w1, accf[r][1]);
    }
  }
  __m256 bias[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  if (e.bias) bias[0] = _mm256_loadu_ps(e.bias + n0), bias[1] = _mm256_loadu_ps(e.bias + n0 + 8);
  for (int r = 0; r < R; ++r) {
    const __m256 s = _mm256_set1_ps(sa[r]);
    float* yr = e.y + (m0 + r) * e.ldy + n0;
    for (int h = 0; h < 2; ++h) {
      __m256 v = _mm256_fmadd_ps(accf[r][h], s, bias[h]);
      if (e.act == 1) v = enc_gelu8(v);
      if (e.residual) v = _mm256_add_ps(v, _mm256_loadu_ps(e.residual + (m0 + r) * e.ldy + n0 + 8 * h));
      _mm256_storeu_ps(yr + 8 * h, v);
    }
  }
}

#endif

inline void enc_rows(int64_t rows, const int16_t* a, int64_t lda, const float* sa,
                     const int16_t* b, const float* ws, int64_t kp, int64_t m0, int64_t n0,
                     const EncEpilogue& e) {
  switch (rows) {
    case 3: enc_micro<3>(a, lda, sa, b, ws, kp, m0, n0, e); break;
    case 2: enc_micro<2>(a, lda, sa, b, ws, kp, m0, n0, e); break;
    case 1: enc_micro<1>(a, lda, sa, b, ws, kp, m0, n0, e); break;
    default: break;
  }
}

}  // namespace

extern "C" {

// y (M, N) = [GELU](x (M, K) @ W^T + bias) [+ residual] for group-32 int8 weights packed as
// above (wp (N/16, K/2, 16, 2) int16, sw (N/16, K/32, 16)). bias (N,), residual (M, N): may
// be null; act: 0 none, 1 exact GELU. K a multiple of 32, N of 16. y must not alias x.
void enc_i8_gemm(const float* x, int64_t mrows, int64_t k, const int16_t* wp, const float* sw,
                 int64_t n, const float* bias, const float* residual, int act, float* y,
                 int nthreads) {
  const float qmax = kEncQmax;
  std::vector<int16_t> aq(static_cast<size_t>(mrows * k));
  std::vector<float> sa(static_cast<size_t>(mrows));
  const int64_t kp = k / 2, panels = n / kEncNr;
  const int64_t mtasks = (mrows + kEncMc - 1) / kEncMc, ntasks = (panels + kEncNc - 1) / kEncNc;
  const EncEpilogue e{sw, bias, residual, act, y, n};
#pragma omp parallel num_threads(nthreads)
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < mrows; ++i)
      sa[static_cast<size_t>(i)] = enc_quantize_row(x + i * k, k, qmax, aq.data() + i * k);
#pragma omp for schedule(static) collapse(2)
    for (int64_t mt = 0; mt < mtasks; ++mt)
      for (int64_t nt = 0; nt < ntasks; ++nt) {
        const int64_t m_end = std::min(mrows, (mt + 1) * kEncMc);
        const int64_t p_end = std::min(panels, (nt + 1) * kEncNc);
        for (int64_t j = nt * kEncNc; j < p_end; ++j) {
          const int16_t* b = wp + j * kp * 2 * kEncNr;
          const float* ws = sw + j * (k / kEncGroup) * kEncNr;
          for (int64_t m0 = mt * kEncMc; m0 < m_end; m0 += kEncMr)
            enc_rows(std::min(kEncMr, m_end - m0), aq.data() + m0 * k, k, sa.data() + m0, b,
                     ws, kp, m0, j * kEncNr, e);
        }
      }
  }
}

// out (T, N) = GELU(x) (exact erf form), elementwise, as the GEMM epilogue computes it.
void enc_gelu(const float* x, int64_t count, float* out) {
#if defined(EMBER_ISA_PORTABLE)
  for (int64_t i = 0; i < count; ++i) out[i] = enc_gelu_scalar(x[i]);
#else
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) _mm256_storeu_ps(out + i, enc_gelu8(_mm256_loadu_ps(x + i)));
  for (; i < count; ++i) out[i] = enc_gelu_scalar(x[i]);
#endif
}

}  // extern "C"

// ---------------------------------------------------------------------------------------------
// enc_i16_gemm: the same epilogue, with ONE scale per weight row (no groups) and the integer
// sum kept in int32 over the whole K, so the inner loop is only madd + add (no per-group
// float conversion) and the register tile grows to 6 x 16 (12 int32 accumulators).
// Weights: q in [-qmax_w, qmax_w] (the caller picks ~11 bits) packed as above,
// (N/16, K/2, 16, 2) int16; scales (N,) float32. Activations: per row, |q| <= qmax_a.
// The caller keeps qmax_a * qmax_w * K < 2^31 (no int32 overflow).
namespace {

constexpr int64_t kEnc16Mr = 6;   // activation rows per micro-kernel
constexpr int64_t kEnc16Mc = 96;  // activation rows per task (a multiple of kEnc16Mr)
constexpr int64_t kEnc16Nc = 4;   // panels per task

struct Enc16Epilogue {
  const float* sw;        // (N,) weight row scales
  const float* bias;      // (N,) or null
  const float* residual;  // (M, N) or null
  int act;
  float* y;
  int64_t ldy;
};

#if defined(EMBER_ISA_PORTABLE)

template <int R>
inline void enc16_micro(const int16_t* a, int64_t lda, const float* sa, const int16_t* b,
                        int64_t kp, int64_t m0, int64_t n0, const Enc16Epilogue& e) {
  int32_t acc[R][kEncNr] = {};
  for (int64_t p = 0; p < kp; ++p) {
    const int16_t* bp = b + p * 2 * kEncNr;
    for (int r = 0; r < R; ++r) {
      const int32_t a0 = a[r * lda + 2 * p], a1 = a[r * lda + 2 * p + 1];
      for (int c = 0; c < kEncNr; ++c) acc[r][c] += a0 * bp[2 * c] + a1 * bp[2 * c + 1];
    }
  }
  for (int r = 0; r < R; ++r) {
    float* yr = e.y + (m0 + r) * e.ldy + n0;
    for (int c = 0; c < kEncNr; ++c) {
      float v = EMBER_ENC_MADD(static_cast<float>(acc[r][c]), sa[r] * e.sw[n0 + c],
                               e.bias ? e.bias[n0 + c] : 0.0f);
      if (e.act == 1) v = enc_gelu_scalar(v);
      if (e.residual) v += e.residual[(m0 + r) * e.ldy + n0 + c];
      yr[c] = v;
    }
  }
}

#else

// The 6 x 16 integer loop in assembly: GCC spills 12 int32 accumulators of the intrinsics
// version to the stack. Registers: ymm0-11 the sums (row r: ymm 2r, 2r+1), ymm12-13 the
// panel's two vectors, ymm14 the broadcast pair, ymm15 the product. kp must be even (two
// k pairs per iteration).
#define EMBER_ENC16_ROW(A, R0, R1)                                    \
  "vpbroadcastd " A ", %%ymm14\n"                                     \
  "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n"                              \
  "vpaddd %%ymm15, %%ymm" #R0 ", %%ymm" #R0 "\n"                      \
  "vpmaddwd %%ymm13, %%ymm14, %%ymm15\n"                              \
  "vpaddd %%ymm15, %%ymm" #R1 ", %%ymm" #R1 "\n"
#define EMBER_ENC16_PAIR(OB, OA)                                      \
  "vmovdqu " #OB "(%[b]), %%ymm12\n"                                   \
  "vmovdqu " #OB "+32(%[b]), %%ymm13\n"                                \
  EMBER_ENC16_ROW(#OA "(%[a0])", 0, 1)                                \
  EMBER_ENC16_ROW(#OA "(%[a0],%[ld],1)", 2, 3)                        \
  EMBER_ENC16_ROW(#OA "(%[a0],%[ld],2)", 4, 5)                        \
  EMBER_ENC16_ROW(#OA "(%[a3])", 6, 7)                                \
  EMBER_ENC16_ROW(#OA "(%[a3],%[ld],1)", 8, 9)                        \
  EMBER_ENC16_ROW(#OA "(%[a3],%[ld],2)", 10, 11)

inline void enc16_loop6(const int16_t* a, int64_t lda, const int16_t* b, int64_t kp,
                        __m256i* acc) {
  const char* a0 = reinterpret_cast<const char*>(a);
  const char* a3 = a0 + 3 * lda * 2;
  const int64_t ld = lda * 2;
  int64_t n = kp / 2;
  __asm__ volatile(
      "vpxor %%ymm0, %%ymm0, %%ymm0\n" "vpxor %%ymm1, %%ymm1, %%ymm1\n"
      "vpxor %%ymm2, %%ymm2, %%ymm2\n" "vpxor %%ymm3, %%ymm3, %%ymm3\n"
      "vpxor %%ymm4, %%ymm4, %%ymm4\n" "vpxor %%ymm5, %%ymm5, %%ymm5\n"
      "vpxor %%ymm6, %%ymm6, %%ymm6\n" "vpxor %%ymm7, %%ymm7, %%ymm7\n"
      "vpxor %%ymm8, %%ymm8, %%ymm8\n" "vpxor %%ymm9, %%ymm9, %%ymm9\n"
      "vpxor %%ymm10, %%ymm10, %%ymm10\n" "vpxor %%ymm11, %%ymm11, %%ymm11\n"
      "1:\n"
      EMBER_ENC16_PAIR(0, 0)
      EMBER_ENC16_PAIR(64, 4)
      "addq $128, %[b]\n"
      "addq $8, %[a0]\n"
      "addq $8, %[a3]\n"
      "decq %[n]\n"
      "jnz 1b\n"
      "vmovdqu %%ymm0, (%[acc])\n" "vmovdqu %%ymm1, 32(%[acc])\n"
      "vmovdqu %%ymm2, 64(%[acc])\n" "vmovdqu %%ymm3, 96(%[acc])\n"
      "vmovdqu %%ymm4, 128(%[acc])\n" "vmovdqu %%ymm5, 160(%[acc])\n"
      "vmovdqu %%ymm6, 192(%[acc])\n" "vmovdqu %%ymm7, 224(%[acc])\n"
      "vmovdqu %%ymm8, 256(%[acc])\n" "vmovdqu %%ymm9, 288(%[acc])\n"
      "vmovdqu %%ymm10, 320(%[acc])\n" "vmovdqu %%ymm11, 352(%[acc])\n"
      : [b] "+r"(b), [a0] "+r"(a0), [a3] "+r"(a3), [n] "+r"(n)
      : [ld] "r"(ld), [acc] "r"(acc)
      : "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
        "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
}

template <int R>
inline void enc16_micro(const int16_t* a, int64_t lda, const float* sa, const int16_t* b,
                        int64_t kp, int64_t m0, int64_t n0, const Enc16Epilogue& e) {
  __m256i acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  if (R == 6 && kp % 2 == 0 && kp > 0) {
    enc16_loop6(a, lda, b, kp, &acc[0][0]);
    kp = 0;
  }
  for (int64_t p = 0; p < kp; ++p) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + p * 32));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + p * 32 + 16));
    for (int r = 0; r < R; ++r) {
      const __m256i av = enc_bcast_pair(a + r * lda + 2 * p);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(av, b0));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(av, b1));
    }
  }
  const __m256 w0 = _mm256_loadu_ps(e.sw + n0), w1 = _mm256_loadu_ps(e.sw + n0 + 8);
  __m256 bias[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  if (e.bias) bias[0] = _mm256_loadu_ps(e.bias + n0), bias[1] = _mm256_loadu_ps(e.bias + n0 + 8);
  for (int r = 0; r < R; ++r) {
    const __m256 s = _mm256_set1_ps(sa[r]);
    const __m256 sc[2] = {_mm256_mul_ps(s, w0), _mm256_mul_ps(s, w1)};
    float* yr = e.y + (m0 + r) * e.ldy + n0;
    for (int h = 0; h < 2; ++h) {
      __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][h]), sc[h], bias[h]);
      if (e.act == 1) v = enc_gelu8(v);
      if (e.residual) v = _mm256_add_ps(v, _mm256_loadu_ps(e.residual + (m0 + r) * e.ldy + n0 + 8 * h));
      _mm256_storeu_ps(yr + 8 * h, v);
    }
  }
}

#endif

inline void enc16_rows(int64_t rows, const int16_t* a, int64_t lda, const float* sa,
                       const int16_t* b, int64_t kp, int64_t m0, int64_t n0,
                       const Enc16Epilogue& e) {
  switch (rows) {
    case 6: enc16_micro<6>(a, lda, sa, b, kp, m0, n0, e); break;
    case 5: enc16_micro<5>(a, lda, sa, b, kp, m0, n0, e); break;
    case 4: enc16_micro<4>(a, lda, sa, b, kp, m0, n0, e); break;
    case 3: enc16_micro<3>(a, lda, sa, b, kp, m0, n0, e); break;
    case 2: enc16_micro<2>(a, lda, sa, b, kp, m0, n0, e); break;
    case 1: enc16_micro<1>(a, lda, sa, b, kp, m0, n0, e); break;
    default: break;
  }
}

#if defined(EMBER_ENC_ZMM)
// AVX-512 VNNI: one 64-byte panel row (16 columns x 2 k) is one zmm, and vpdpwssd does the
// madd and the int32 add in one instruction (32 MACs). The register tile is 6 rows x 4
// panels (64 columns: 24 int32 accumulators, 4 panel vectors, one broadcast pair). The sums
// are the same integers as the AVX2 loop's (int32, no saturation), and the epilogue runs the
// same float operations per output, so outputs are bitwise those of the AVX2 build.

static_assert(kEnc16Nc == 4, "a task's panels are one micro-kernel's (at most 4)");

inline __m512 enc_erf16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(4.0f)), _mm512_set1_ps(-4.0f));
  const __m512 x2 = _mm512_mul_ps(x, x);
  __m512 p = _mm512_set1_ps(kErfP[0]), q = _mm512_set1_ps(kErfQ[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(kErfP[i]));
  for (int i = 1; i < 5; ++i) q = _mm512_fmadd_ps(x2, q, _mm512_set1_ps(kErfQ[i]));
  return _mm512_div_ps(_mm512_mul_ps(x, p), q);
}

// enc_gelu8's operations on 16 lanes (same results lane for lane)
inline __m512 enc_gelu16(__m512 v) {
  const __m512 e = enc_erf16(_mm512_mul_ps(v, _mm512_set1_ps(0.70710678118654752f)));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v),
                       _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

// The full 6 x 4 tile's integer loop in assembly (GCC 12 copies and spills the 24
// accumulators of the intrinsics version on every step). Registers: zmm(4 r + c) the sums of
// row r and panel c, zmm24-27 the four panels' vectors, zmm28 the broadcast pair.
#define EMBER_ENC16Z_ROW(A, R0, R1, R2, R3)                          \
  "vpbroadcastd " A ", %%zmm28\n"                                    \
  "vpdpwssd %%zmm24, %%zmm28, %%zmm" #R0 "\n"                        \
  "vpdpwssd %%zmm25, %%zmm28, %%zmm" #R1 "\n"                        \
  "vpdpwssd %%zmm26, %%zmm28, %%zmm" #R2 "\n"                        \
  "vpdpwssd %%zmm27, %%zmm28, %%zmm" #R3 "\n"

inline void enc16z_loop64(const int16_t* a, int64_t lda, const int16_t* b, int64_t ps,
                          int64_t kp, __m512i* acc) {
  const char* a0 = reinterpret_cast<const char*>(a);
  const char* a3 = a0 + 3 * lda * 2;
  const char* bp = reinterpret_cast<const char*>(b);
  const char* b3 = bp + 3 * ps * 2;
  const int64_t ld = lda * 2, pb = ps * 2;
  int64_t n = kp;
  __asm__ volatile(
      "vpxord %%zmm0, %%zmm0, %%zmm0\n" "vmovdqa64 %%zmm0, %%zmm1\n"
      "vmovdqa64 %%zmm0, %%zmm2\n" "vmovdqa64 %%zmm0, %%zmm3\n"
      "vmovdqa64 %%zmm0, %%zmm4\n" "vmovdqa64 %%zmm0, %%zmm5\n"
      "vmovdqa64 %%zmm0, %%zmm6\n" "vmovdqa64 %%zmm0, %%zmm7\n"
      "vmovdqa64 %%zmm0, %%zmm8\n" "vmovdqa64 %%zmm0, %%zmm9\n"
      "vmovdqa64 %%zmm0, %%zmm10\n" "vmovdqa64 %%zmm0, %%zmm11\n"
      "vmovdqa64 %%zmm0, %%zmm12\n" "vmovdqa64 %%zmm0, %%zmm13\n"
      "vmovdqa64 %%zmm0, %%zmm14\n" "vmovdqa64 %%zmm0, %%zmm15\n"
      "vmovdqa64 %%zmm0, %%zmm16\n" "vmovdqa64 %%zmm0, %%zmm17\n"
      "vmovdqa64 %%zmm0, %%zmm18\n" "vmovdqa64 %%zmm0, %%zmm19\n"
      "vmovdqa64 %%zmm0, %%zmm20\n" "vmovdqa64 %%zmm0, %%zmm21\n"
      "vmovdqa64 %%zmm0, %%zmm22\n" "vmovdqa64 %%zmm0, %%zmm23\n"
      "1:\n"
      "vmovdqu64 (%[b]), %%zmm24\n"
      "vmovdqu64 (%[b],%[pb],1), %%zmm25\n"
      "vmovdqu64 (%[b],%[pb],2), %%zmm26\n"
      "vmovdqu64 (%[b3]), %%zmm27\n"
      EMBER_ENC16Z_ROW("(%[a0])", 0, 1, 2, 3)
      EMBER_ENC16Z_ROW("(%[a0],%[ld],1)", 4, 5, 6, 7)
      EMBER_ENC16Z_ROW("(%[a0],%[ld],2)", 8, 9, 10, 11)
      EMBER_ENC16Z_ROW("(%[a3])", 12, 13, 14, 15)
      EMBER_ENC16Z_ROW("(%[a3],%[ld],1)", 16, 17, 18, 19)
      EMBER_ENC16Z_ROW("(%[a3],%[ld],2)", 20, 21, 22, 23)
      "addq $64, %[b]\n"
      "addq $64, %[b3]\n"
      "addq $4, %[a0]\n"
      "addq $4, %[a3]\n"
      "decq %[n]\n"
      "jnz 1b\n"
      "vmovdqu64 %%zmm0, (%[acc])\n" "vmovdqu64 %%zmm1, 64(%[acc])\n"
      "vmovdqu64 %%zmm2, 128(%[acc])\n" "vmovdqu64 %%zmm3, 192(%[acc])\n"
      "vmovdqu64 %%zmm4, 256(%[acc])\n" "vmovdqu64 %%zmm5, 320(%[acc])\n"
      "vmovdqu64 %%zmm6, 384(%[acc])\n" "vmovdqu64 %%zmm7, 448(%[acc])\n"
      "vmovdqu64 %%zmm8, 512(%[acc])\n" "vmovdqu64 %%zmm9, 576(%[acc])\n"
      "vmovdqu64 %%zmm10, 640(%[acc])\n" "vmovdqu64 %%zmm11, 704(%[acc])\n"
      "vmovdqu64 %%zmm12, 768(%[acc])\n" "vmovdqu64 %%zmm13, 832(%[acc])\n"
      "vmovdqu64 %%zmm14, 896(%[acc])\n" "vmovdqu64 %%zmm15, 960(%[acc])\n"
      "vmovdqu64 %%zmm16, 1024(%[acc])\n" "vmovdqu64 %%zmm17, 1088(%[acc])\n"
      "vmovdqu64 %%zmm18, 1152(%[acc])\n" "vmovdqu64 %%zmm19, 1216(%[acc])\n"
      "vmovdqu64 %%zmm20, 1280(%[acc])\n" "vmovdqu64 %%zmm21, 1344(%[acc])\n"
      "vmovdqu64 %%zmm22, 1408(%[acc])\n" "vmovdqu64 %%zmm23, 1472(%[acc])\n"
      : [b] "+r"(bp), [b3] "+r"(b3), [a0] "+r"(a0), [a3] "+r"(a3), [n] "+r"(n)
      : [ld] "r"(ld), [pb] "r"(pb), [acc] "r"(acc)
      : "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
        "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18",
        "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26", "xmm27",
        "xmm28");
}

// R (<= 6) rows of a against P (<= 4) consecutive panels (b: the first, `ps` int16 apart).
template <int R, int P>
inline void enc16z_micro(const int16_t* a, int64_t lda, const float* sa, const int16_t* b,
                         int64_t ps, int64_t kp, int64_t m0, int64_t n0, const Enc16Epilogue& e) {
  __m512i acc[R][P];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < P; ++c) acc[r][c] = _mm512_setzero_si512();
  if (R == 6 && P == 4 && kp > 0) {
    enc16z_loop64(a, lda, b, ps, kp, &acc[0][0]);
    kp = 0;
  }
  for (int64_t p = 0; p < kp; ++p) {
    __m512i bv[P];
    for (int c = 0; c < P; ++c) bv[c] = _mm512_loadu_si512(b + c * ps + p * 32);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      memcpy(&pair, a + r * lda + 2 * p, 4);
      const __m512i av = _mm512_set1_epi32(pair);
      for (int c = 0; c < P; ++c) acc[r][c] = _mm512_dpwssd_epi32(acc[r][c], av, bv[c]);
    }
  }
  for (int c = 0; c < P; ++c) {
    const int64_t nc = n0 + 16 * c;
    const __m512 w = _mm512_loadu_ps(e.sw + nc);
    const __m512 bias = e.bias ? _mm512_loadu_ps(e.bias + nc) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      const __m512 sc = _mm512_mul_ps(_mm512_set1_ps(sa[r]), w);
      __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][c]), sc, bias);
      if (e.act == 1) v = enc_gelu16(v);
      if (e.residual) v = _mm512_add_ps(v, _mm512_loadu_ps(e.residual + (m0 + r) * e.ldy + nc));
      _mm512_storeu_ps(e.y + (m0 + r) * e.ldy + nc, v);
    }
  }
}

template <int P>
inline void enc16z_rows(int64_t rows, const int16_t* a, int64_t lda, const float* sa,
                        const int16_t* b, int64_t ps, int64_t kp, int64_t m0, int64_t n0,
                        const Enc16Epilogue& e) {
  switch (rows) {
    case 6: enc16z_micro<6, P>(a, lda, sa, b, ps, kp, m0, n0, e); break;
    case 5: enc16z_micro<5, P>(a, lda, sa, b, ps, kp, m0, n0, e); break;
    case 4: enc16z_micro<4, P>(a, lda, sa, b, ps, kp, m0, n0, e); break;
    case 3: enc16z_micro<3, P>(a, lda, sa, b, ps, kp, m0, n0, e); break;
    case 2: enc16z_micro<2, P>(a, lda, sa, b, ps, kp, m0, n0, e); break;
    case 1: enc16z_micro<1, P>(a, lda, sa, b, ps, kp, m0, n0, e); break;
    default: break;
  }
}

inline void enc16z_block(int64_t rows, int64_t panels, const int16_t* a, int64_t lda,
                         const float* sa, const int16_t* b, int64_t kp, int64_t m0, int64_t n0,
                         const Enc16Epilogue& e) {
  const int64_t ps = kp * 2 * kEncNr;
  switch (panels) {
    case 4: enc16z_rows<4>(rows, a, lda, sa, b, ps, kp, m0, n0, e); break;
    case 3: enc16z_rows<3>(rows, a, lda, sa, b, ps, kp, m0, n0, e); break;
    case 2: enc16z_rows<2>(rows, a, lda, sa, b, ps, kp, m0, n0, e); break;
    case 1: enc16z_rows<1>(rows, a, lda, sa, b, ps, kp, m0, n0, e); break;
    default: break;
  }
}
#endif

}  // namespace

extern "C" {

// y (M, N) = [GELU](x (M, K) @ W^T + bias) [+ residual] for per-row weights (wp (N/16, K/2,
// 16, 2) int16, sw (N,)), activations quantized per row to |q| <= qmax_a. K even, N a
// multiple of 16. y must not alias x.
void enc_i16_gemm(const float* x, int64_t mrows, int64_t k, const int16_t* wp, const float* sw,
                  int64_t n, const float* bias, const float* residual, int act, float qmax_a,
                  float* y, int nthreads) {
  std::vector<int16_t> aq(static_cast<size_t>(mrows * k));
  std::vector<float> sa(static_cast<size_t>(mrows));
  const int64_t kp = k / 2, panels = n / kEncNr;
  const int64_t mtasks = (mrows + kEnc16Mc - 1) / kEnc16Mc;
  const int64_t ntasks = (panels + kEnc16Nc - 1) / kEnc16Nc;
  const Enc16Epilogue e{sw, bias, residual, act, y, n};
#pragma omp parallel num_threads(nthreads)
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < mrows; ++i)
      sa[static_cast<size_t>(i)] = enc_quantize_row(x + i * k, k, qmax_a, aq.data() + i * k);
#if defined(EMBER_ENC_ZMM)
    // dynamic: a thread the OS preempts (2 busy cores) leaves its tiles to the other one
    // (quiet, it measured the same as static: 172 vs 177 ms per 16 passages, load 2.7)
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int64_t mt = 0; mt < mtasks; ++mt)
      for (int64_t nt = 0; nt < ntasks; ++nt) {
        const int64_t m_end = std::min(mrows, (mt + 1) * kEnc16Mc);
        const int64_t j = nt * kEnc16Nc, np = std::min(panels, j + kEnc16Nc) - j;
        for (int64_t m0 = mt * kEnc16Mc; m0 < m_end; m0 += kEnc16Mr)
          enc16z_block(std::min(kEnc16Mr, m_end - m0), np, aq.data() + m0 * k, k,
                       sa.data() + m0, wp + j * kp * 2 * kEncNr, kp, m0, j * kEncNr, e);
      }
#else
#pragma omp for schedule(static) collapse(2)
    for (int64_t mt = 0; mt < mtasks; ++mt)
      for (int64_t nt = 0; nt < ntasks; ++nt) {
        const int64_t m_end = std::min(mrows, (mt + 1) * kEnc16Mc);
        const int64_t p_end = std::min(panels, (nt + 1) * kEnc16Nc);
        for (int64_t j = nt * kEnc16Nc; j < p_end; ++j) {
          const int16_t* b = wp + j * kp * 2 * kEncNr;
          for (int64_t m0 = mt * kEnc16Mc; m0 < m_end; m0 += kEnc16Mr)
            enc16_rows(std::min(kEnc16Mr, m_end - m0), aq.data() + m0 * k, k, sa.data() + m0,
                       b, kp, m0, j * kEncNr, e);
        }
      }
#endif
  }
}

}  // extern "C"

// ---------------------------------------------------------------------------------------------
// enc_attention: bidirectional attention over a packed stream in ONE call (head_dim 32).
//   qkv (T, 3, H, 32) float32 rows, cu_seqlens (B + 1) int64 -> out (T, H, 32)
// Every (sequence, head) is one task (dynamic schedule: lengths differ). Per task: K is
// copied transposed (32 x L16, zero-padded to 16 keys), V contiguous (L x 32); for 4 query rows
// at a time the scores are 4 x 16-key FMA tiles, softmax in float (exp by a degree-6
// polynomial on 2^f, rel. err ~2e-7), then P V with the row sums divided out at the end.
// The avx512-vnni build runs 12 query rows x 32 keys per score tile and 12 rows x 32 dims in
// P V (att_block_z): ~2x the AVX2 code's speed at 100-256 tokens (1 thread, CPU time).
namespace {

constexpr int kAttD = 32;

#if !defined(EMBER_ISA_PORTABLE)
// exp(f) ~ 1 + f + f^2 P(f) on [-ln2/2, ln2/2] (Cephes' expf), highest power first
constexpr float kExpP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                            4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

inline __m256 att_exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  f = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), f);
  __m256 p = _mm256_set1_ps(kExpP[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExpP[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(f, f), _mm256_add_ps(f, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                       _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// K^T in tiles of 16 keys: tile j/16 holds (32 dims x 16 keys) contiguous, so one score tile
// reads 2 KB in order. NOTE: a plain (32 x L) transpose puts the 32 rows of a tile 4 L bytes
// apart: at L = 256 those 64 lines share 4 of L1's 64 sets and evict each other (measured
// slower than PyTorch's SDPA at 384 tokens before this layout).
inline int64_t att_kt(int64_t j, int d) { return (j >> 4) * (16 * kAttD) + d * 16 + (j & 15); }

#if defined(EMBER_ENC_ZMM)
// AVX-512: one 16-key tile is one zmm. Query rows go in blocks of 12; the block's scores are
// stored tile-major, sz[tile][row][16 keys] (12 x 16 floats per tile), so the P V loop reads
// the 12 rows' probabilities for one key at fixed offsets from one pointer.
constexpr int kAttRowsZ = 12;

inline __m512 att_exp16(__m512 x) {  // att_exp8's operations on 16 lanes
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 p = _mm512_set1_ps(kExpP[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExpP[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(f, f), _mm512_add_ps(f, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n),
                                                       _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// Scores of the block's 12 query rows (qb, 32 floats each) against T tiles from key j.
template <int T>
inline void att_scores_z(const float* qb, const float* kt, int64_t j, float scale, float* sz) {
  __m512 acc[kAttRowsZ][T];
  for (int r = 0; r < kAttRowsZ; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int d = 0; d < kAttD; ++d) {
    __m512 kv[T];
    for (int t = 0; t < T; ++t) kv[t] = _mm512_loadu_ps(kt + att_kt(j + 16 * t, d));
    for (int r = 0; r < kAttRowsZ; ++r) {
      const __m512 qv = _mm512_set1_ps(qb[r * kAttD + d]);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_fmadd_ps(qv, kv[t], acc[r][t]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < kAttRowsZ; ++r)
      _mm512_storeu_ps(sz + ((j >> 4) + t) * (kAttRowsZ * 16) + r * 16,
                       _mm512_mul_ps(acc[r][t], sc));
}

inline void att_block_z(const float* q, int64_t ld, int64_t len, const float* kt,
                        const float* vb, float* o, int64_t ldo, float* sz) {
  const int64_t l16 = (len + 15) / 16 * 16, tiles = l16 / 16;
  const float scale = 1.0f / sqrtf(static_cast<float>(kAttD));
  alignas(64) float qb[kAttRowsZ * kAttD];
  for (int64_t i0 = 0; i0 < len; i0 += kAttRowsZ) {
    const int rows = static_cast<int>(std::min<int64_t>(kAttRowsZ, len - i0));
    // rows past `rows` repeat the last row (computed, never stored)
    for (int r = 0; r < kAttRowsZ; ++r)
      memcpy(qb + r * kAttD, q + (i0 + std::min(r, rows - 1)) * ld, kAttD * sizeof(float));
    int64_t j = 0;
    for (; j + 32 <= l16; j += 32) att_scores_z<2>(qb, kt, j, scale, sz);
    if (j < l16) att_scores_z<1>(qb, kt, j, scale, sz);
    // softmax per row; keys past len (the last tile's padding) get probability 0
    const __mmask16 tail = static_cast<__mmask16>((1u << (len - (tiles - 1) * 16)) - 1u);
    float inv[kAttRowsZ];
    for (int r = 0; r < kAttRowsZ; ++r) {
      float* last = sz + (tiles - 1) * (kAttRowsZ * 16) + r * 16;
      _mm512_storeu_ps(last, _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), tail,
                                                _mm512_loadu_ps(last)));
      __m512 mv = _mm512_set1_ps(-INFINITY);
      for (int64_t t = 0; t < tiles; ++t)
        mv = _mm512_max_ps(mv, _mm512_loadu_ps(sz + t * (kAttRowsZ * 16) + r * 16));
      const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t t = 0; t < tiles; ++t) {
        float* s = sz + t * (kAttRowsZ * 16) + r * 16;
        const __m512 ev = att_exp16(_mm512_sub_ps(_mm512_loadu_ps(s), m));
        _mm512_storeu_ps(s, ev);
        sum = _mm512_add_ps(sum, ev);
      }
      inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
    }
    // P V: 12 rows x 32 dims (24 accumulators)
    __m512 a[kAttRowsZ][2];
    for (int u = 0; u < kAttRowsZ; ++u) a[u][0] = a[u][1] = _mm512_setzero_ps();
    for (int64_t jj = 0; jj < len; ++jj) {
      const __m512 v0 = _mm512_loadu_ps(vb + jj * kAttD), v1 = _mm512_loadu_ps(vb + jj * kAttD + 16);
      const float* p = sz + (jj >> 4) * (kAttRowsZ * 16) + (jj & 15);
      for (int u = 0; u < kAttRowsZ; ++u) {
        const __m512 w = _mm512_set1_ps(p[u * 16]);
        a[u][0] = _mm512_fmadd_ps(w, v0, a[u][0]);
        a[u][1] = _mm512_fmadd_ps(w, v1, a[u][1]);
      }
    }
    for (int u = 0; u < rows; ++u) {
      const __m512 iv = _mm512_set1_ps(inv[u]);
      _mm512_storeu_ps(o + (i0 + u) * ldo, _mm512_mul_ps(a[u][0], iv));
      _mm512_storeu_ps(o + (i0 + u) * ldo + 16, _mm512_mul_ps(a[u][1], iv));
    }
  }
}
#endif

// One (sequence, head): q/k/v rows `ld` floats apart, L tokens; o rows `ldo` apart.
void att_one(const float* q, const float* k, const float* v, int64_t ld, int64_t len,
             float* o, int64_t ldo, float* kt, float* vb, float* sb) {
  const int64_t l16 = (len + 15) / 16 * 16;
  const float scale = 1.0f / sqrtf(static_cast<float>(kAttD));
  for (int64_t j = 0; j < l16; ++j)
    for (int d = 0; d < kAttD; ++d) kt[att_kt(j, d)] = j < len ? k[j * ld + d] : 0.0f;
  for (int64_t j = 0; j < len; ++j) memcpy(vb + j * kAttD, v + j * ld, kAttD * sizeof(float));
#if defined(EMBER_ISA_PORTABLE)
  for (int64_t i = 0; i < len; ++i) {
    float* s = sb;
    float mx = -INFINITY;
    for (int64_t j = 0; j < len; ++j) {
      float acc = 0.0f;
      for (int d = 0; d < kAttD; ++d) acc = EMBER_ENC_MADD(q[i * ld + d], kt[att_kt(j, d)], acc);
      s[j] = acc * scale;
      mx = std::max(mx, s[j]);
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < len; ++j) sum += (s[j] = expf(s[j] - mx));
    float acc[kAttD] = {};
    for (int64_t j = 0; j < len; ++j)
      for (int d = 0; d < kAttD; ++d) acc[d] = EMBER_ENC_MADD(s[j], vb[j * kAttD + d], acc[d]);
    for (int d = 0; d < kAttD; ++d) o[i * ldo + d] = acc[d] / sum;
  }
#elif defined(EMBER_ENC_ZMM)
  att_block_z(q, ld, len, kt, vb, o, ldo, sb);
#else
  constexpr int kRows = 6;  // query rows per block: 6 x 16 score tiles (12 accumulators)
  for (int64_t i0 = 0; i0 < len; i0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, len - i0));
    // scores: rows x l16 (rows past `rows` repeat the last row, not stored)
    const float* qr[kRows];
    for (int r = 0; r < kRows; ++r) qr[r] = q + (i0 + std::min(r, rows - 1)) * ld;
    for (int64_t j = 0; j < l16; j += 16) {
      __m256 acc[kRows][2];
      for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
      for (int d = 0; d < kAttD; ++d) {
        const __m256 k0 = _mm256_loadu_ps(kt + att_kt(j, d));
        const __m256 k1 = _mm256_loadu_ps(kt + att_kt(j, d) + 8);
        for (int r = 0; r < kRows; ++r) {
          const __m256 qv = _mm256_broadcast_ss(qr[r] + d);
          acc[r][0] = _mm256_fmadd_ps(qv, k0, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(qv, k1, acc[r][1]);
        }
      }
      const __m256 sc = _mm256_set1_ps(scale);
      for (int r = 0; r < rows; ++r) {
        _mm256_storeu_ps(sb + r * l16 + j, _mm256_mul_ps(acc[r][0], sc));
        _mm256_storeu_ps(sb + r * l16 + j + 8, _mm256_mul_ps(acc[r][1], sc));
      }
    }
    float inv[kRows];
    for (int r = 0; r < rows; ++r) {
      float* s = sb + r * l16;
      for (int64_t j = len; j < l16; ++j) s[j] = -INFINITY;
      __m256 mv = _mm256_set1_ps(-INFINITY);
      for (int64_t j = 0; j < l16; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + j));
      float lanes[8];
      _mm256_storeu_ps(lanes, mv);
      float mx = lanes[0];
      for (float x : lanes) mx = std::max(mx, x);
      const __m256 m = _mm256_set1_ps(mx);
      __m256 sum = _mm256_setzero_ps();
      for (int64_t j = 0; j < l16; j += 8) {
        const __m256 ev = att_exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), m));
        _mm256_storeu_ps(s + j, ev);
        sum = _mm256_add_ps(sum, ev);
      }
      _mm256_storeu_ps(lanes, sum);
      float total = 0.0f;
      for (float x : lanes) total += x;
      inv[r] = 1.0f / total;
    }
    // P V: three rows at a time, 4 vectors of 8 dims each (12 accumulators)
    for (int r = 0; r < rows; r += 3) {
      const int n3 = std::min(3, rows - r);
      const float* pr[3];
      for (int u = 0; u < 3; ++u) pr[u] = sb + (r + std::min(u, n3 - 1)) * l16;
      __m256 a[3][4];
      for (int u = 0; u < 3; ++u)
        for (int c = 0; c < 4; ++c) a[u][c] = _mm256_setzero_ps();
      for (int64_t j = 0; j < len; ++j) {
        const __m256 v0 = _mm256_loadu_ps(vb + j * kAttD), v1 = _mm256_loadu_ps(vb + j * kAttD + 8);
        const __m256 v2 = _mm256_loadu_ps(vb + j * kAttD + 16), v3 = _mm256_loadu_ps(vb + j * kAttD + 24);
        for (int u = 0; u < 3; ++u) {
          const __m256 w = _mm256_broadcast_ss(pr[u] + j);
          a[u][0] = _mm256_fmadd_ps(w, v0, a[u][0]);
          a[u][1] = _mm256_fmadd_ps(w, v1, a[u][1]);
          a[u][2] = _mm256_fmadd_ps(w, v2, a[u][2]);
          a[u][3] = _mm256_fmadd_ps(w, v3, a[u][3]);
        }
      }
      for (int u = 0; u < n3; ++u) {
        const __m256 iv = _mm256_set1_ps(inv[r + u]);
        for (int c = 0; c < 4; ++c)
          _mm256_storeu_ps(o + (i0 + r + u) * ldo + 8 * c, _mm256_mul_ps(a[u][c], iv));
      }
    }
  }
#endif
}

}  // namespace

extern "C" {

// Returns 0, or -1 when head_dim is not 32 (the caller falls back).
int enc_attention(const float* qkv, const int64_t* cu, int64_t nseq, int heads, int head_dim,
                  float* out, int nthreads) {
  if (head_dim != kAttD) return -1;
  int64_t maxlen = 0;
  for (int64_t s = 0; s < nseq; ++s) maxlen = std::max(maxlen, cu[s + 1] - cu[s]);
  const int64_t l16 = (maxlen + 15) / 16 * 16;
  const int64_t hd = static_cast<int64_t>(heads) * kAttD, ld = 3 * hd;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> kt(static_cast<size_t>(kAttD * l16)), vb(static_cast<size_t>(l16 * kAttD)),
        sb(static_cast<size_t>(12 * l16));  // AVX2: 6 rows, AVX-512: 12
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < nseq * heads; ++task) {
      const int64_t s = task / heads, h = task % heads;
      const int64_t t0 = cu[s], len = cu[s + 1] - cu[s];
      if (len <= 0) continue;
      const float* base = qkv + t0 * ld + h * kAttD;
      att_one(base, base + hd, base + 2 * hd, ld, len, out + t0 * hd + h * kAttD, hd, kt.data(),
              vb.data(), sb.data());
    }
  }
  return 0;
}

}  // extern "C"

// ---------------------------------------------------------------------------------------------
// enc_u8_gemm: 8-bit activations x 8-bit weights with AVX2's vpmaddubsw (u8 x s8 -> pairwise
// s16 sums, 32 MACs per instruction), then vpmaddwd by ones into int32.
// Activations: per row, asymmetric u8 (x ~= (q - zp) * sa, zp in [0, 255]), quantized once per
// call. Weights: s8 codes, one scale per output row, chosen so every k pair obeys
// |q[2i]| + |q[2i+1]| <= 128 (the packer enforces it): a pair sum is then at most
// 255 * 128 = 32640 < 32767, so vpmaddubsw never saturates (provably, for any input).
// Packed (N/16, K/4, 16, 4) int8: element [j][p][c][e] = q[16 j + c][4 p + e] (one 32-byte
// vector = 8 columns x 4 k); colsum (N,) int32 = sum_k q[n][k] corrects the zero point:
//   y = sa * sw[n] * (sum_k q_a[k] q_w[n][k] - zp * colsum[n]) + bias, [GELU], [+ residual].
// K a multiple of 4, N of 16. The int32 sum is bounded by 255 * 64 * K (< 2^31 for K < 131k).
namespace {

constexpr int64_t kEnc8Mr = 4;   // activation rows per micro-kernel (8 int32 accumulators)
constexpr int64_t kEnc8Mc = 96;  // activation rows per task (a multiple of kEnc8Mr)
constexpr int64_t kEnc8Nc = 4;   // panels per task

struct Enc8Epilogue {
  const float* sw;        // (N,) weight row scales
  const int32_t* colsum;  // (N,) sum of each row's codes
  const float* bias;      // (N,) or null
  const float* residual;  // (M, N) or null
  int act;
  float* y;
  int64_t ldy;
};

// x row (k floats) -> u8 codes, zero point and scale (x ~= (q - zp) * scale). The range always
// holds 0 (so zp is exact in [0, 255]); an all-zero row gets scale 0 and codes 0.
inline float enc8_quantize_row(const float* x, int64_t k, uint8_t* q, int32_t* zp_out) {
  float lo = 0.0f, hi = 0.0f;
  for (int64_t j = 0; j < k; ++j) lo = std::min(lo, x[j]), hi = std::max(hi, x[j]);
  if (hi - lo <= 0.0f) {
    memset(q, 0, static_cast<size_t>(k));
    *zp_out = 0;
    return 0.0f;
  }
  const float scale = (hi - lo) / 255.0f, inv = 1.0f / scale;
  const int32_t zp = std::min(255, std::max(0, static_cast<int32_t>(nearbyintf(-lo * inv))));
  for (int64_t j = 0; j < k; ++j) {
    const int32_t v = static_cast<int32_t>(nearbyintf(x[j] * inv)) + zp;
    q[j] = static_cast<uint8_t>(std::min(255, std::max(0, v)));
  }
  *zp_out = zp;
  return scale;
}

inline float enc8_out(int32_t acc, int64_t n, float sa, int32_t zp, const Enc8Epilogue& e) {
  const int32_t s = acc - zp * e.colsum[n];
  return EMBER_ENC_MADD(static_cast<float>(s), sa * e.sw[n], e.bias ? e.bias[n] : 0.0f);
}

#if defined(EMBER_ISA_PORTABLE)

template <int R>
inline void enc8_micro(const uint8_t* a, int64_t lda, const float* sa, const int32_t* zp,
                       const int8_t* b, int64_t kq, int64_t m0, int64_t n0, const Enc8Epilogue& e) {
  int32_t acc[R][kEncNr] = {};
  for (int64_t p = 0; p < kq; ++p) {
    const int8_t* bp = b + p * 4 * kEncNr;
    for (int r = 0; r < R; ++r) {
      const uint8_t* ar = a + r * lda + 4 * p;
      for (int c = 0; c < kEncNr; ++c)
        acc[r][c] += ar[0] * bp[4 * c] + ar[1] * bp[4 * c + 1] + ar[2] * bp[4 * c + 2] +
                     ar[3] * bp[4 * c + 3];
    }
  }
  for (int r = 0; r < R; ++r) {
    float* yr = e.y + (m0 + r) * e.ldy + n0;
    for (int c = 0; c < kEncNr; ++c) {
      float v = enc8_out(acc[r][c], n0 + c, sa[r], zp[r], e);
      if (e.act == 1) v = enc_gelu_scalar(v);
      if (e.residual) v += e.residual[(m0 + r) * e.ldy + n0 + c];
      yr[c] = v;
    }
  }
}

#else

template <int R>
inline void enc8_micro(const uint8_t* a, int64_t lda, const float* sa, const int32_t* zp,
                       const int8_t* b, int64_t kq, int64_t m0, int64_t n0, const Enc8Epilogue& e) {
  __m256i acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t p = 0; p < kq; ++p) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + p * 64));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + p * 64 + 32));
    for (int r = 0; r < R; ++r) {
      int32_t quad;
      memcpy(&quad, a + r * lda + 4 * p, 4);
      const __m256i av = _mm256_set1_epi32(quad);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
      // vpdpbusd: the 4 products summed straight into int32 (same sums: no pair saturates)
      acc[r][0] = _mm256_dpbusd_epi32(acc[r][0], av, b0);
      acc[r][1] = _mm256_dpbusd_epi32(acc[r][1], av, b1);
#else
      // u8 x s8 pair sums in int16 (never saturate: see above), then pairs of those in int32
      acc[r][0] = _mm256_add_epi32(acc[r][0],
                                   _mm256_madd_epi16(_mm256_maddubs_epi16(av, b0), ones));
      acc[r][1] = _mm256_add_epi32(acc[r][1],
                                   _mm256_madd_epi16(_mm256_maddubs_epi16(av, b1), ones));
#endif
    }
  }
  const __m256 w0 = _mm256_loadu_ps(e.sw + n0), w1 = _mm256_loadu_ps(e.sw + n0 + 8);
  const __m256i cs0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e.colsum + n0));
  const __m256i cs1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e.colsum + n0 + 8));
  __m256 bias[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  if (e.bias) bias[0] = _mm256_loadu_ps(e.bias + n0), bias[1] = _mm256_loadu_ps(e.bias + n0 + 8);
  for (int r = 0; r < R; ++r) {
    const __m256 s = _mm256_set1_ps(sa[r]);
    const __m256i z = _mm256_set1_epi32(zp[r]);
    const __m256 sc[2] = {_mm256_mul_ps(s, w0), _mm256_mul_ps(s, w1)};
    const __m256i corr[2] = {_mm256_mullo_epi32(z, cs0), _mm256_mullo_epi32(z, cs1)};
    float* yr = e.y + (m0 + r) * e.ldy + n0;
    for (int h = 0; h < 2; ++h) {
      const __m256i sum = _mm256_sub_epi32(acc[r][h], corr[h]);
      __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), sc[h], bias[h]);
      if (e.act == 1) v = enc_gelu8(v);
      if (e.residual) v = _mm256_add_ps(v, _mm256_loadu_ps(e.residual + (m0 + r) * e.ldy + n0 + 8 * h));
      _mm256_storeu_ps(yr + 8 * h, v);
    }
  }
}

#endif

inline void enc8_rows(int64_t rows, const uint8_t* a, int64_t lda, const float* sa,
                      const int32_t* zp, const int8_t* b, int64_t kq, int64_t m0, int64_t n0,
                      const Enc8Epilogue& e) {
  switch (rows) {
    case 4: enc8_micro<4>(a, lda, sa, zp, b, kq, m0, n0, e); break;
    case 3: enc8_micro<3>(a, lda, sa, zp, b, kq, m0, n0, e); break;
    case 2: enc8_micro<2>(a, lda, sa, zp, b, kq, m0, n0, e); break;
    case 1: enc8_micro<1>(a, lda, sa, zp, b, kq, m0, n0, e); break;
    default: break;
  }
}

}  // namespace

extern "C" {

// The activation quantizer enc_u8_gemm runs (tests): x (M, K) -> q (M, K) u8, zp (M,), sa (M,).
void enc_u8_quantize(const float* x, int64_t mrows, int64_t k, uint8_t* q, int32_t* zp,
                     float* sa) {
  for (int64_t i = 0; i < mrows; ++i) sa[i] = enc8_quantize_row(x + i * k, k, q + i * k, zp + i);
}

// y (M, N) = [GELU](x (M, K) @ W^T + bias) [+ residual] for pair-bounded s8 weights (wp
// (N/16, K/4, 16, 4) int8, sw (N,), colsum (N,)); see above. y must not alias x.
void enc_u8_gemm(const float* x, int64_t mrows, int64_t k, const int8_t* wp, const float* sw,
                 const int32_t* colsum, int64_t n, const float* bias, const float* residual,
                 int act, float* y, int nthreads) {
  std::vector<uint8_t> aq(static_cast<size_t>(mrows * k));
  std::vector<float> sa(static_cast<size_t>(mrows));
  std::vector<int32_t> zp(static_cast<size_t>(mrows));
  const int64_t kq = k / 4, panels = n / kEncNr;
  const int64_t mtasks = (mrows + kEnc8Mc - 1) / kEnc8Mc;
  const int64_t ntasks = (panels + kEnc8Nc - 1) / kEnc8Nc;
  const Enc8Epilogue e{sw, colsum, bias, residual, act, y, n};
#pragma omp parallel num_threads(nthreads)
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < mrows; ++i)
      sa[static_cast<size_t>(i)] = enc8_quantize_row(x + i * k, k, aq.data() + i * k,
                                                     zp.data() + i);
#pragma omp for schedule(static) collapse(2)
    for (int64_t mt = 0; mt < mtasks; ++mt)
      for (int64_t nt = 0; nt < ntasks; ++nt) {
        const int64_t m_end = std::min(mrows, (mt + 1) * kEnc8Mc);
        const int64_t p_end = std::min(panels, (nt + 1) * kEnc8Nc);
        for (int64_t j = nt * kEnc8Nc; j < p_end; ++j) {
          const int8_t* b = wp + j * kq * 4 * kEncNr;
          for (int64_t m0 = mt * kEnc8Mc; m0 < m_end; m0 += kEnc8Mr)
            enc8_rows(std::min(kEnc8Mr, m_end - m0), aq.data() + m0 * k, k, sa.data() + m0,
                      zp.data() + m0, b, kq, m0, j * kEncNr, e);
        }
      }
  }
}

}  // extern "C"
