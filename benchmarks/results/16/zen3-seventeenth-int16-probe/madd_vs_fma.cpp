// Probe (seventeenth pass, Zen 3 VM, one thread): a 6 x 16 register block over K = 64 from L1,
// float32 FMAs vs int16 pairs (vpmaddwd + vpaddd), the two candidate inner loops of prefill
// attention. Build and run: g++ -O3 -march=native -o madd_vs_fma madd_vs_fma.cpp && ./madd_vs_fma
// (output.txt: two runs of three repeats). Ratio = f32 time / int16 time.
#include <immintrin.h>
#include <cstdio>
#include <cstdint>
#include <chrono>
#include <vector>
// f32: C(6x16) += A(6xK) B(Kx16); i16: C(6x16) int32 += A(6 x K/2 pairs) B(K/2 x 16 x 2)
__attribute__((noinline)) void f32k(const float* a, const float* b, int K, float* c) {
  __m256 acc[6][2];
  for (int r = 0; r < 6; ++r) for (int v = 0; v < 2; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int k = 0; k < K; ++k) {
    __m256 b0 = _mm256_loadu_ps(b + k * 16), b1 = _mm256_loadu_ps(b + k * 16 + 8);
    for (int r = 0; r < 6; ++r) { __m256 x = _mm256_broadcast_ss(a + r * K + k);
      acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]); acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]); }
  }
  for (int r = 0; r < 6; ++r) for (int v = 0; v < 2; ++v) _mm256_storeu_ps(c + r * 16 + 8 * v, acc[r][v]);
}
__attribute__((noinline)) void i16k(const int16_t* a, const int16_t* b, int K, int32_t* c) {
  __m256i acc[6][2];
  for (int r = 0; r < 6; ++r) for (int v = 0; v < 2; ++v) acc[r][v] = _mm256_setzero_si256();
  for (int k = 0; k < K / 2; ++k) {
    __m256i b0 = _mm256_loadu_si256((const __m256i*)(b + k * 32)), b1 = _mm256_loadu_si256((const __m256i*)(b + k * 32 + 16));
    for (int r = 0; r < 6; ++r) { __m256i x = _mm256_set1_epi32(*(const int32_t*)(a + r * K + 2 * k));
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(x, b0)); acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(x, b1)); }
  }
  for (int r = 0; r < 6; ++r) for (int v = 0; v < 2; ++v) _mm256_storeu_si256((__m256i*)(c + r * 16 + 8 * v), acc[r][v]);
}
int main() {
  const int K = 64;
  std::vector<float> a(6 * K, 0.5f), b(K * 16, 0.25f), c(96);
  std::vector<int16_t> ai(6 * K, 3), bi(K * 16, 2); std::vector<int32_t> ci(96);
  for (int rep = 0; rep < 3; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 2000000; ++i) { f32k(a.data(), b.data(), K, c.data()); asm volatile("" ::: "memory"); }
    auto t1 = std::chrono::steady_clock::now();
    for (int i = 0; i < 2000000; ++i) { i16k(ai.data(), bi.data(), K, ci.data()); asm volatile("" ::: "memory"); }
    auto t2 = std::chrono::steady_clock::now();
    double f = std::chrono::duration<double>(t1 - t0).count(), g = std::chrono::duration<double>(t2 - t1).count();
    double macs = 2e6 * 6 * 16 * K;
    printf("f32 %.1f GMAC/s  i16 %.1f GMAC/s  ratio %.2f\n", macs / f / 1e9, macs / g / 1e9, f / g);
  }
}
