// Peak vector throughput probe (AVX2 + FMA, OpenMP): float32 FMAs and int8 maddubs, 12
// independent chains per thread, best of 7. The ceiling for the compute-bound kernels (prefill
// attention: float32 FMAs; int4 / int8 GEMMs on AVX2 without VNNI: maddubs + adds), to set
// against longctx_attention_micro.py's prefill_chunk_gmac_s. Prints one JSON line.
//   g++ -O3 -mavx2 -mfma -fopenmp benchmarks/compute_peak.cpp -o /tmp/peak && flock /tmp/ember-bench.lock /tmp/peak 2
#include <immintrin.h>
#include <omp.h>
#include <cstdio>
#include <cstdlib>

static constexpr long kSteps = 25000000;  // x 12 chains: 300 M instructions per thread

__attribute__((noinline)) float fma_chains(long n) {
  __m256 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_ps(i * 0.001f);
  const __m256 x = _mm256_set1_ps(0.999f), y = _mm256_set1_ps(0.0001f);
  for (long i = 0; i < n; ++i)
    for (int j = 0; j < 12; ++j) a[j] = _mm256_fmadd_ps(a[j], x, y);
  __m256 s = a[0];
  for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, a[i]);
  return _mm256_cvtss_f32(s);
}

__attribute__((noinline)) int maddubs_chains(long n) {
  __m256i a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_epi8(static_cast<char>(i));
  const __m256i x = _mm256_set1_epi8(3);
  for (long i = 0; i < n; ++i)
    for (int j = 0; j < 12; ++j) a[j] = _mm256_maddubs_epi16(a[j], x);
  __m256i s = a[0];
  for (int i = 1; i < 12; ++i) s = _mm256_add_epi16(s, a[i]);
  return _mm256_cvtsi256_si32(s);
}

// Best of 7: instructions per second over all threads.
template <class F>
double best_rate(int threads, F body) {
  double best = 1e30;
  for (int rep = 0; rep < 7; ++rep) {
    const double t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads)
    body();
    const double s = omp_get_wtime() - t0;
    if (s < best) best = s;
  }
  return static_cast<double>(threads) * kSteps * 12 / best;
}

int main(int argc, char** argv) {
  const int th = argc > 1 ? atoi(argv[1]) : 2;
  volatile float fsink = 0;
  volatile int isink = 0;
  const double f = best_rate(th, [&] { fsink = fsink + fma_chains(kSteps); });
  const double m = best_rate(th, [&] { isink = isink + maddubs_chains(kSteps); });
  // an FMA on 8 floats is 8 multiply-adds; a maddubs 32 u8 x s8 products (16 pairs)
  printf("{\"threads\": %d, \"fma_ps_per_s\": %.4g, \"f32_gmac_s\": %.1f, "
         "\"maddubs_per_s\": %.4g, \"int8_gmac_s_maddubs_only\": %.1f}\n",
         th, f, f * 8 / 1e9, m, m * 32 / 1e9);
  return 0;
}
