#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>
#include <vector>
#include <random>
static inline __m256 load_bf16(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
static inline void hsum4(__m256 a, __m256 b, __m256 c, __m256 d, float* out) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
}
inline void pin(__m256& v) { __asm__("" : "+x"(v)); }
template <int R>
__attribute__((noinline)) void qk_keys(const float* q, const uint16_t* k, const int64_t* rows, int64_t n, float* s) {
  constexpr int D = 64, NV = 8;
  for (int64_t j = 0; j < n; j += 4) {
    __m256 a[R][4];
    for (int r = 0; r < R; ++r) for (int i = 0; i < 4; ++i) a[r][i] = _mm256_setzero_ps();
    for (int v = 0; v < NV; ++v) {
      __m256 qv[R];
      for (int r = 0; r < R; ++r) qv[r] = _mm256_loadu_ps(q + r * D + v * 8);
      for (int i = 0; i < 4; ++i) {
        __m256 kv = load_bf16(k + rows[j + i] * D + v * 8); pin(kv);
        for (int r = 0; r < R; ++r) a[r][i] = _mm256_fmadd_ps(qv[r], kv, a[r][i]);
      }
    }
    for (int r = 0; r < R; ++r) hsum4(a[r][0], a[r][1], a[r][2], a[r][3], s + r * 4096 + j);
  }
}
// variant: keys along lanes (K tile transposed: kt[d][key] bf16), 8 keys per vector
template <int R>
__attribute__((noinline)) void qk_lanes(const float* q, const uint16_t* kt, int64_t n, float* s) {
  constexpr int D = 64;
  for (int64_t j = 0; j < n; j += 16) {
    __m256 a[R][2];
    for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
    for (int d = 0; d < D; ++d) {
      __m256 k0 = load_bf16(kt + (j / 16) * 16 * D + d * 16), k1 = load_bf16(kt + (j / 16) * 16 * D + d * 16 + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 qb = _mm256_broadcast_ss(q + r * D + d);
        a[r][0] = _mm256_fmadd_ps(qb, k0, a[r][0]);
        a[r][1] = _mm256_fmadd_ps(qb, k1, a[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) { _mm256_storeu_ps(s + r * 4096 + j, a[r][0]); _mm256_storeu_ps(s + r * 4096 + j + 8, a[r][1]); }
  }
}

template <int R>
__attribute__((noinline)) void qk_nohsum(const float* q, const uint16_t* k, const int64_t* rows, int64_t n, float* s) {
  constexpr int D = 64, NV = 8;
  for (int64_t j = 0; j < n; j += 4) {
    __m256 a[R][4];
    for (int r = 0; r < R; ++r) for (int i = 0; i < 4; ++i) a[r][i] = _mm256_setzero_ps();
    for (int v = 0; v < NV; ++v) {
      __m256 qv[R];
      for (int r = 0; r < R; ++r) qv[r] = _mm256_loadu_ps(q + r * D + v * 8);
      for (int i = 0; i < 4; ++i) {
        __m256 kv = load_bf16(k + rows[j + i] * D + v * 8); pin(kv);
        for (int r = 0; r < R; ++r) a[r][i] = _mm256_fmadd_ps(qv[r], kv, a[r][i]);
      }
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(s + r * 4096 + j, _mm256_add_ps(_mm256_add_ps(a[r][0], a[r][1]), _mm256_add_ps(a[r][2], a[r][3])));
  }
}
template <int R>
__attribute__((noinline)) void qk_noconv(const float* q, const float* k, const int64_t* rows, int64_t n, float* s) {
  constexpr int D = 64, NV = 8;
  for (int64_t j = 0; j < n; j += 4) {
    __m256 a[R][4];
    for (int r = 0; r < R; ++r) for (int i = 0; i < 4; ++i) a[r][i] = _mm256_setzero_ps();
    for (int v = 0; v < NV; ++v) {
      __m256 qv[R];
      for (int r = 0; r < R; ++r) qv[r] = _mm256_loadu_ps(q + r * D + v * 8);
      for (int i = 0; i < 4; ++i) {
        __m256 kv = _mm256_loadu_ps(k + rows[j + i] * D + v * 8); pin(kv);
        for (int r = 0; r < R; ++r) a[r][i] = _mm256_fmadd_ps(qv[r], kv, a[r][i]);
      }
    }
    for (int r = 0; r < R; ++r) hsum4(a[r][0], a[r][1], a[r][2], a[r][3], s + r * 4096 + j);
  }
}
double now();
double now() { timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
int main() {
  const int64_t N = 1024, D = 64, HK = 3;
  std::vector<uint16_t> k(N * HK * D); std::mt19937 g(1);
  for (auto& x : k) x = 0x3f80 + (g() % 64);
  std::vector<float> q(3 * D, 0.01f), s(3 * 4096 + 64);
  std::vector<int64_t> rows(N); for (int64_t j = 0; j < N; ++j) rows[j] = j;
  std::vector<float> kf(N * HK * D, 0.01f);
  std::vector<uint16_t> kt(N * D); for (auto& x : kt) x = 0x3f80 + (g() % 64);
  for (int rep = 0; rep < 3; ++rep) {
    double t0 = now();
    for (int it = 0; it < 200; ++it) qk_keys<3>(q.data(), k.data(), rows.data(), N, s.data());
    double t1 = now();
    for (int it = 0; it < 200; ++it) qk_lanes<3>(q.data(), kt.data(), N, s.data());
    double t2 = now();
    double t3 = now();
    for (int it = 0; it < 200; ++it) qk_nohsum<3>(q.data(), k.data(), rows.data(), N, s.data());
    double t4 = now();
    for (int it = 0; it < 200; ++it) qk_noconv<3>(q.data(), kf.data(), rows.data(), N, s.data());
    double t5 = now();
    printf("nohsum %.2f ns/key, noconv(f32 K) %.2f ns/key\n", (t4-t3)/(200.0*N)*1e9, (t5-t4)/(200.0*N)*1e9);
    double macs = 200.0 * N * D * 3;
    printf("keys: %.2f ns/key  %.1f GMAC/s | lanes: %.2f ns/key %.1f GMAC/s  (%f)\n", (t1 - t0) / (200.0 * N) * 1e9, macs / (t1 - t0) / 1e9,
           (t2 - t1) / (200.0 * N) * 1e9, macs / (t2 - t1) / 1e9, s[5] + s[4100]);
  }
}
