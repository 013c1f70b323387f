// Peak read bandwidth probe (AVX2, OpenMP): g++ -O2 -mavx2 -fopenmp benchmarks/read_bandwidth.cpp -o /tmp/bw && flock /tmp/ember-bench.lock /tmp/bw 512 2
// Compare with ember.bench.offline.measure_bandwidth_gbs(2) (torch.sum), the bound the long-context bench uses.
#include <immintrin.h>
#include <omp.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
int main(int argc, char** argv) {
  const size_t mb = argc > 1 ? atoi(argv[1]) : 512; const int th = argc > 2 ? atoi(argv[2]) : 2;
  const size_t n = mb << 20; float* buf = (float*)aligned_alloc(64, n); memset(buf, 1, n);
  double best = 1e9; float sink = 0;
  for (int rep = 0; rep < 7; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    float tot = 0;
#pragma omp parallel num_threads(th) reduction(+:tot)
    {
      const size_t nf = n / 4, per = nf / th, b = omp_get_thread_num() * per, e = b + per;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (size_t i = b; i < e; i += 32) {
        a0 = _mm256_add_ps(a0, _mm256_load_ps(buf + i)); a1 = _mm256_add_ps(a1, _mm256_load_ps(buf + i + 8));
        a2 = _mm256_add_ps(a2, _mm256_load_ps(buf + i + 16)); a3 = _mm256_add_ps(a3, _mm256_load_ps(buf + i + 24));
      }
      float o[8]; _mm256_storeu_ps(o, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
      for (float x : o) tot += x;
    }
    sink += tot;
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (s < best) best = s;
  }
  printf("{\"mb\": %zu, \"threads\": %d, \"read_gbs\": %.2f, \"sink\": %g}\n", mb, th, n / best / 1e9, (double)sink);
}
