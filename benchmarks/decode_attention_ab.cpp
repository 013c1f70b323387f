// Decode attention at one depth on SmolLM2's geometry (9 query heads, 3 KV heads, head dim 64,
// 16-slot blocks in shuffled order, 30 layers), the kernel alone, no Python, several builds of
// the kernels in ONE process: each build's libember .so is dlopen'ed (RTLD_LOCAL) and the
// builds take turns, one full step (30 layers) each, `reps` times. On a noisy VM two processes
// of the same build differ by 10-20% (page placement, neighbours); turns inside one process on
// the same buffers cancel that, so 5% differences show. Prints min / p25 / median per build and
// the checksum of its last output (equal checksums: the same bits), one JSON line per build.
// Where a step's attention time goes (one build): cold (30 distinct caches, from memory at
// depth 4096) against hot (one layer's cache 30 times, from L3) and hot at depth 512 (L2;
// x 8: the compute cost at 4096); cold - compute = memory time not hidden behind compute.
// (This replaced longctx_decode_probe.cpp, the one-build probe of those three modes.)
// Driven by decode_attention_ab.sh (builds the .so of each git revision).
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <algorithm>
#include <random>
#include <vector>
#include <cstdint>
typedef void (*fn_t)(const float*, int64_t, const void*, const void*, const float*, const float*, int64_t,
                     const int64_t*, int64_t, const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t,
                     float, int64_t, float*, int);
int main(int argc, char** argv) {
  // args: threads dtype(bf16|int8) mode(cold|hot) reps depth lib1 lib2 ...
  if (argc < 7) { fprintf(stderr, "usage: %s threads bf16|int8 cold|hot reps depth lib.so...\n", argv[0]); return 2; }
  const int nth = atoi(argv[1]); const int dtype = strcmp(argv[2], "int8") == 0; const int hot = strcmp(argv[3], "hot") == 0, flush = strcmp(argv[3], "flush") == 0;
  const int reps = atoi(argv[4]); const int64_t CTX = atoi(argv[5]); const int nl = argc - 6;
  std::vector<fn_t> fns;
  for (int i = 0; i < nl; ++i) {
    void* h = dlopen(argv[6 + i], RTLD_NOW | RTLD_LOCAL);
    if (!h) { printf("%s\n", dlerror()); return 1; }
    fns.push_back((fn_t)dlsym(h, "paged_decode_attention"));
  }
  const int64_t HQ = 9, HK = 3, D = 64, BS = 16, L = 30;
  const int64_t nblk = (CTX + BS - 1) / BS + 1, S = nblk * BS;
  std::mt19937 rng(0);
  std::vector<int64_t> table(nblk - 1);
  for (int64_t i = 0; i < nblk - 1; ++i) table[i] = i + 1;
  std::shuffle(table.begin(), table.end(), rng);
  std::normal_distribution<float> nd;
  const size_t eb = dtype ? 1 : 2;
  std::vector<std::vector<char>> kb(L), vb(L);
  for (int l = 0; l < L; ++l) {
    kb[l].resize(S * HK * D * eb); vb[l].resize(S * HK * D * eb);
    for (size_t i = 0; i < kb[l].size(); ++i) { kb[l][i] = (char)(rng() & (dtype ? 0x7f : 0x3f)); vb[l][i] = (char)(rng() & (dtype ? 0x7f : 0x3f)); }
  }
  std::vector<float> scales(S * HK, 0.01f), q((HQ + 2 * HK) * D), out(HQ * D);
  for (auto& x : q) x = nd(rng);
  std::vector<int64_t> junk(flush ? (96u << 20) / sizeof(int64_t) : 0, 1);  // 96 MB > L3
  int64_t sink = 0;
  std::vector<std::vector<double>> t(nl);
  std::vector<double> cs(nl);
  for (int rep = 0; rep < reps; ++rep)
    for (int f = 0; f < nl; ++f) {
      int64_t lens[1] = {CTX};
      if (flush) {  // evict the caches from L3 (as a step's weights do) before the timed step
        for (size_t i = 0; i < junk.size(); i += 64 / sizeof(int64_t)) sink += junk[i];
      }
      timespec a0, a1;
      clock_gettime(CLOCK_MONOTONIC, &a0);
      for (int l = 0; l < L; ++l) {
        const int li = hot ? 0 : l;
        fns[f](q.data(), (int64_t)q.size(), kb[li].data(), vb[li].data(), scales.data(), scales.data(), dtype,
               table.data(), nblk - 1, lens, 1, HQ, HK, D, BS, 0.125f, 0, out.data(), nth);
      }
      clock_gettime(CLOCK_MONOTONIC, &a1);
      t[f].push_back((a1.tv_sec - a0.tv_sec) * 1e3 + (a1.tv_nsec - a0.tv_nsec) * 1e-6);
      double c = 0; for (int64_t i = 0; i < HQ * D; ++i) c += out[i] * (double)(i + 1); cs[f] = c;
    }
  for (int f = 0; f < nl; ++f) {
    std::vector<double> v = t[f]; std::sort(v.begin(), v.end());
    printf("{\"build\": \"%s\", \"threads\": %d, \"kv\": \"%s\", \"mode\": \"%s\", \"depth\": %ld, "
           "\"turns\": %d, \"min_ms\": %.3f, \"p25_ms\": %.3f, \"median_ms\": %.3f, \"checksum\": %.9g}\n",
           argv[6 + f], nth, argv[2], argv[3], static_cast<long>(CTX), reps, v[0], v[v.size() / 4],
           v[v.size() / 2], cs[f]);
  }
  if (sink == -1) fprintf(stderr, "!");  // keeps the flush reads
}
