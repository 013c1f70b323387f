// Decode attention at depth 4096 on SmolLM2's geometry (9 query heads, 3 KV heads, head dim 64,
// 16-slot blocks in shuffled order, 30 layers), the kernel alone, no Python: where a decode
// step's attention time goes. Three modes, best of 40 (one thread: thread CPU time, so a
// contended machine inflates it less; more threads: wall time):
//   cold  30 distinct caches (~94 MB bf16), streamed from memory as in a real decode step
//   hot   one layer's cache (3 MB: L3) 30 times
//   L2x8  depth 512 (384 KB: L2) 30 times, x8: the kernel's compute cost at 4096
// cold - L2x8 = memory time not hidden behind compute. Prints one JSON line; the checksum of
// the last output is bit-exact across kernel changes that must not change results.
//
//   g++ -O3 -std=c++17 -fopenmp -fno-math-errno -march=native -DEMBER_ISA_AVX2 -Iember/kernels
//       benchmarks/longctx_decode_probe.cpp -o /tmp/longctx_probe && /tmp/longctx_probe 1 bf16
// (arguments: threads, bf16 | int8)
#include <stdlib.h>
#include <time.h>

#include <random>

#include "cpu_kernels.cpp"

int main(int argc, char** argv) {
  const int nth = argc > 1 ? atoi(argv[1]) : 1;
  const int dtype = argc > 2 && strcmp(argv[2], "int8") == 0 ? 1 : 0;
  const int64_t HQ = 9, HK = 3, D = 64, BS = 16, CTX = 4096, L = 30;
  const int64_t nblk = CTX / BS + 1, S = nblk * BS;
  std::mt19937 rng(0);
  std::vector<int64_t> table(nblk - 1);
  for (int64_t i = 0; i < nblk - 1; ++i) table[i] = i + 1;
  std::shuffle(table.begin(), table.end(), rng);
  std::normal_distribution<float> nd;
  std::vector<std::vector<uint16_t>> kb(L), vb(L);
  std::vector<std::vector<int8_t>> ki(L), vi(L);
  std::vector<float> scales(S * HK, 0.01f);
  const auto bf16 = [&]() {
    const float f = nd(rng);
    uint32_t b;
    memcpy(&b, &f, 4);
    return static_cast<uint16_t>(b >> 16);
  };
  for (int l = 0; l < L; ++l) {
    if (dtype == 0) {
      kb[l].resize(S * HK * D), vb[l].resize(S * HK * D);
      for (auto& x : kb[l]) x = bf16();
      for (auto& x : vb[l]) x = bf16();
    } else {
      ki[l].resize(S * HK * D), vi[l].resize(S * HK * D);
      for (auto& x : ki[l]) x = static_cast<int8_t>(rng() % 255 - 127);
      for (auto& x : vi[l]) x = static_cast<int8_t>(rng() % 255 - 127);
    }
  }
  std::vector<float> q((HQ + 2 * HK) * D), out(HQ * D);
  for (auto& x : q) x = nd(rng);
  const clockid_t clk = nth == 1 ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC;
  const char* names[3] = {"cold", "hot", "l2x8"};
  double ms_of[3];
  for (int mode = 0; mode < 3; ++mode) {
    int64_t lens[1] = {mode == 2 ? 512 : CTX};
    double best = 1e30;
    for (int rep = 0; rep < 40; ++rep) {
      timespec a0, a1;
      clock_gettime(clk, &a0);
      for (int l = 0; l < L; ++l) {
        const int li = mode == 0 ? l : 0;
        const void* k = dtype == 0 ? static_cast<const void*>(kb[li].data()) : ki[li].data();
        const void* v = dtype == 0 ? static_cast<const void*>(vb[li].data()) : vi[li].data();
        paged_decode_attention(q.data(), static_cast<int64_t>(q.size()), k, v, scales.data(),
                               scales.data(), dtype, table.data(), nblk - 1, lens, 1, HQ, HK, D,
                               BS, 0.125f, 0, out.data(), nth);
      }
      clock_gettime(clk, &a1);
      const double ms = (a1.tv_sec - a0.tv_sec) * 1e3 + (a1.tv_nsec - a0.tv_nsec) * 1e-6;
      best = std::min(best, mode == 2 ? ms * CTX / 512 : ms);
    }
    ms_of[mode] = best;
  }
  double cs = 0;
  for (int64_t i = 0; i < HQ * D; ++i) cs += out[i] * static_cast<double>(i + 1);
  double load[3] = {0, 0, 0};
  if (getloadavg(load, 3) < 0) load[0] = -1;
  const double kv_mb = (dtype == 0 ? 2.0 : 1.0) * 2 * CTX * HK * D * L / 1e6;
  printf("{\"kv\": \"%s\", \"threads\": %d, \"kv_mb\": %.1f", dtype ? "int8" : "bf16", nth, kv_mb);
  for (int m = 0; m < 3; ++m) printf(", \"%s_ms\": %.3f", names[m], ms_of[m]);
  printf(", \"cold_gb_s\": %.2f, \"checksum\": %.9g, \"loadavg\": %.2f}\n", kv_mb / ms_of[0], cs,
         load[0]);
  return 0;
}
