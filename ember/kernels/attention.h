// Flash-style paged attention, one implementation for every ISA: it is written on the vector
// primitives each ISA header supplies (vfloat, kVecW, v_load / v_fma / v_hsum4 / load_bf16 /
// v_load_i8, exp_shifted), so the AVX2 and AVX-512 builds share this code.
//
// Query rows: the T rows of a step, row i attending to keys [0, lens[i]) of the paged cache
// through its block table (itself included: its key is written first). Consecutive rows that
// extend one sequence (lens[i] == lens[i-1] + 1 over the same blocks: a prefill chunk, or the
// verification rows of speculative tokens) form query tiles of up to kQRows rows, so every
// K/V row read serves kQRows x G query vectors (G = query heads per KV head). Work items are
// (tile, kv head, key range): a tile whose context is long while the step has few tiles (one
// long decode) is split over several key ranges (split-K) so every thread streams part of
// the context; each range keeps an online softmax (running max m, sum l, unnormalised
// accumulator) and a final log-sum-exp reduction merges the ranges. No score matrix larger
// than one tile (kQRows x G x kKeys) exists.
//
// Batch invariance: a row's keys are cut into segments at fixed key positions (multiples of
// kSegFirst up to kSegKeys, then of kSegKeys) whatever the step looks like; each segment runs
// its own online softmax over key tiles at multiples of kKeys, and the segments' states are
// folded in key order by one function (fold_state), whether one item ran them all or split-K
// items ran them apart. So a row's output is bit-identical alone (a decode) or inside a float32
// tile (verification rows, a prefill chunk of fewer than kPackMinRows rows), whatever the
// split and the thread count.
// Exception (packed tiles): the full tiles of a sequence with >= kPackMinRows rows in the step
// run on K/V tiles packed once per layer and step: bf16 dot products on AVX-512 with a bf16
// cache (prefill_bf16.h), float32 outer products on AVX2 with either cache (prefill_f32.h).
// They are invariant across splits, thread counts and the rows beside them, but equal to the
// same rows decoded only to bf16 accuracy (AVX-512) or to float32 rounding (AVX2: the same
// products, summed in another order) (test_prefill_chunk_rows_versus_decoded_rows). int8
// caches: invariant across splits and thread counts, but a decode row applies the scales
// differently from a tile.
//
// KV caches: bfloat16 (S, Hk, D), or int8 (S, Hk, D) with a float32 scale per slot and head
// (S, Hk): value = q * scale. A sliding window w > 0 limits row i to keys (lens[i]-1-w, ...]:
// the kernel then never reads older blocks.
#pragma once
#include <math.h>
#include <stdint.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "common.h"

// Full prefill tiles run on packed K/V tiles: over a bf16 cache on AVX-512 BF16 dot products
// (prefill_bf16.h), over either cache on AVX2 float32 outer products (prefill_f32.h); the
// portable build keeps the float32 tile for every tile.
#if !defined(EMBER_ISA_AVX2) && !defined(EMBER_ISA_PORTABLE) && defined(__AVX512BF16__)
#define EMBER_ATTN_BF16 1
#else
#define EMBER_ATTN_BF16 0
#endif
#if defined(EMBER_ISA_AVX2)
#define EMBER_ATTN_F32 1
#else
#define EMBER_ATTN_F32 0
#endif
#define EMBER_ATTN_PACKED (EMBER_ATTN_BF16 || EMBER_ATTN_F32)

namespace {

constexpr int64_t kQRows = 16;    // query rows (tokens) per tile
constexpr int64_t kKeys = 64;     // keys per inner tile (converted to float once)
constexpr int64_t kSegKeys = 512;  // keys per segment from key kSegKeys on (see above)
// NOTE: the first kSegKeys keys in two segments of 256: a lone decode at 257-512 keys is two
// split-K items (both threads) instead of one, and at 513-767 three of 256 / 256 / <256
// instead of 512 / <256. Attention alone, 30 layers, K/V evicted first (Zen 3, 2 threads,
// decode_attention_ab.sh --mode flush): depth 416 1.90 -> 1.68 ms, 640 2.18 -> 1.76, 1024
// and 4096 unchanged (2.58 / 9.93 -> 2.60 / 9.98); segments of 128, 128, 256 before key 512
// gained at 256 keys (1.36 -> 1.21) but lost at 1024-4096 (+2-4%); uniform 256 or 128 lost
// 9-31% there.
constexpr int64_t kSegFirst = 256;  // keys per segment before key kSegKeys
static_assert(kSegFirst % kKeys == 0 && kSegKeys % kSegFirst == 0);
constexpr int64_t kSegHead = kSegKeys / kSegFirst;  // segments before key kSegKeys

// The segment of key `key`, and the first key of segment i: kSegFirst keys each up to key
// kSegKeys, then kSegKeys keys each.
inline int64_t seg_index(int64_t key) {
  return key < kSegKeys ? key / kSegFirst : kSegHead + (key - kSegKeys) / kSegKeys;
}
inline int64_t seg_start(int64_t i) {
  return i < kSegHead ? i * kSegFirst : kSegKeys + (i - kSegHead) * kSegKeys;
}
// NOTE: packed tiles (prefill_bf16.h, prefill_f32.h) only for a sequence with this many rows in
// the step (a prefill chunk): fewer rows (decodes, speculative verification rows) keep the
// float32 tile and stay bit-identical to their rows decoded alone.
constexpr int64_t kPackMinRows = 64;

// A paged KV cache of one layer, bf16 (dtype 0) or int8 with per-slot-and-head scales (1).
struct KvCache {
  const void* k;
  const void* v;
  const float* k_scale;  // (S, Hk) for int8, else null
  const float* v_scale;
  int64_t dtype;
};

struct AttnTile {
  int64_t r0, nr;  // query rows [r0, r0 + nr)
  int64_t k0, k1;  // keys [k0, k1) this item covers
  int64_t part;    // -1: writes the output; else the slot of the tile's first segment
  int64_t seg0;    // the tile's first segment (seg_index of its first key)
  int64_t pack = -1;  // a full prefill tile: its sequence's pack entry (packed tiles)
};

// Consecutive full tiles of one sequence share their K/V key tiles, packed once per layer:
// keys [kstart, kend) of the table of row `row`, tiles tile0 .. tile0 + ntiles of kKeys keys
// (keys outside the range packed as zeros), per kv head, at tile offset off of the buffer.
struct PackSeq {
  int64_t row, kstart, kend, tile0, ntiles, off;
};

struct AttnMerge {  // the segments of one split tile, folded in order after the items ran
  int64_t r0, nr, part0, nsplit;
};

// The work of one step's attention, built once (it only depends on lens / block tables /
// window) and shared by every layer with that window.
struct AttnPlan {
  std::vector<AttnTile> tiles;
  std::vector<AttnMerge> merges;
  // (tile, kv head) work items, largest first; kv head -1: every head (a decode row reads
  // each slot's K/V rows of all heads, one contiguous stretch, in one item)
  std::vector<std::pair<int64_t, int64_t>> items;
  std::vector<float> partial;  // (segments, Hk, kQRows * G, D + 2): acc, m, l
  std::vector<PackSeq> packs;
  std::vector<std::array<int64_t, 3>> pack_items;  // (entry, kv head, key tile)
  std::vector<uint32_t> kvpack;  // (tiles, K / V, packed_tile_words(D)) packed K / V tiles
  int64_t group = 1, part_stride = 0;
};

inline bool same_sequence(const DecodeCtx& c, int64_t i) {
  if (c.lens[i] != c.lens[i - 1] + 1) return false;
  const int64_t used = (c.lens[i - 1] + c.block_size - 1) / c.block_size;
  return memcmp(c.block_tables + i * c.max_blocks, c.block_tables + (i - 1) * c.max_blocks,
                static_cast<size_t>(used) * sizeof(int64_t)) == 0;
}

// The lowest key row `i` may read: 0, or the first key of its window.
inline int64_t first_key(const DecodeCtx& c, int64_t i, int64_t window) {
  return window > 0 ? std::max<int64_t>(0, c.lens[i] - window) : 0;
}

// The words of one packed K or V tile: D x kKeys / 2 bf16 pairs (AVX-512) or D x kKeys floats
// (AVX2).
inline int64_t packed_tile_words(int64_t dim) {
  return EMBER_ATTN_BF16 ? dim * kKeys / 2 : dim * kKeys;
}

// Whether full prefill tiles over a cache of this dtype run packed. AVX-512 packs bf16 caches
// only (its tiles multiply bf16 pairs); AVX2 packs either cache as floats (int8 dequantised
// as load_kv_tile does).
inline bool packs_cache(int64_t kv_dtype) {
  return EMBER_ATTN_PACKED && (EMBER_ATTN_F32 || kv_dtype == 0);
}

// The pack entries of the full tiles (runs of kQRows rows) of sequences with at least
// kPackMinRows rows in the step (one entry per sequence) and their key tiles to pack; returns
// each run's entry (-1: none). None where the cache's dtype is not packed.
inline std::vector<int64_t> make_packs(const DecodeCtx& c,
                                       const std::vector<std::pair<int64_t, int64_t>>& runs,
                                       int64_t window, int64_t kv_dtype, AttnPlan& plan) {
  std::vector<int64_t> pack_of(runs.size(), -1);
  if (!packs_cache(kv_dtype)) return pack_of;
  for (size_t ri = 0; ri < runs.size();) {
    // runs ri .. rj - 1: consecutive rows of one sequence
    size_t rj = ri + 1;
    while (rj < runs.size() && runs[rj - 1].first + runs[rj - 1].second == runs[rj].first &&
           same_sequence(c, runs[rj].first))
      ++rj;
    const int64_t rows = runs[rj - 1].first + runs[rj - 1].second - runs[ri].first;
    for (size_t r = ri; rows >= kPackMinRows && r < rj && runs[r].second == kQRows; ++r) {
      const auto [r0, nr] = runs[r];
      if (r == ri) plan.packs.push_back({0, first_key(c, r0, window), 0, 0, 0, 0});
      PackSeq& e = plan.packs.back();
      e.row = r0 + nr - 1;  // its table covers every key of the entry
      e.kend = c.lens[r0 + nr - 1];
      pack_of[r] = static_cast<int64_t>(plan.packs.size()) - 1;
    }
    ri = rj;
  }
  int64_t off = 0;
  for (size_t i = 0; i < plan.packs.size(); ++i) {
    PackSeq& e = plan.packs[i];
    e.tile0 = e.kstart / kKeys;
    e.ntiles = (e.kend + kKeys - 1) / kKeys - e.tile0;
    e.off = off;
    off += e.ntiles * c.hk;
    for (int64_t h = 0; h < c.hk; ++h)
      for (int64_t t = 0; t < e.ntiles; ++t)
        plan.pack_items.push_back({static_cast<int64_t>(i), h, t});
  }
  plan.kvpack.resize(static_cast<size_t>(off * 2 * packed_tile_words(c.dim)));  // K and V
  return pack_of;
}

inline AttnPlan make_attn_plan(const DecodeCtx& c, int64_t rows, int64_t window, int64_t kv_dtype,
                               int nthreads) {
  AttnPlan plan;
  plan.group = c.hq / c.hk;
  std::vector<std::pair<int64_t, int64_t>> runs;  // (r0, nr) query tiles
  for (int64_t i = 0; i < rows; ++i) {
    if (i > 0 && runs.back().second < kQRows && runs.back().first + runs.back().second == i &&
        same_sequence(c, i))
      ++runs.back().second;
    else
      runs.push_back({i, 1});
  }
  const std::vector<int64_t> pack_of = make_packs(c, runs, window, kv_dtype, plan);
  const bool all_heads = c.hk <= kQRows;  // the scratch holds kQRows x G rows
  int64_t items = 0;
  for (const auto& run : runs) items += run.second == 1 && all_heads ? 1 : c.hk;
  const int64_t want = 4 * static_cast<int64_t>(nthreads);
  int64_t parts = 0;
  for (size_t ri = 0; ri < runs.size(); ++ri) {
    const auto [r0, nr] = runs[ri];
    const int64_t pk = pack_of[ri];
    const int64_t k0 = first_key(c, r0, window), k1 = c.lens[r0 + nr - 1];
    const int64_t s0 = seg_index(k0), nseg = seg_index(k1 - 1) + 1 - s0;
    // NOTE: few items (one long decode): one item per segment (split-K). The split only
    // changes who runs a segment, never the segments or their fold order (batch-invariant).
    if (items >= want || nseg <= 1) {
      plan.tiles.push_back({r0, nr, k0, k1, -1, s0, pk});
      continue;
    }
    for (int64_t g = 0; g < nseg; ++g)
      plan.tiles.push_back({r0, nr, std::max(k0, seg_start(s0 + g)),
                            std::min(k1, seg_start(s0 + g + 1)), parts, s0, pk});
    plan.merges.push_back({r0, nr, parts, nseg});
    parts += nseg;
  }
  // NOTE: largest items first (the tiles are in row order; later prefill rows see more keys)
  // NOTE: a decode row's tile is one item over every head, even alone in a short step (one
  // item, one thread): one item per head let both threads work but read each slot's rows
  // per head; with K/V in L3 that was 11-18% faster at depths 128-512, but from memory (a
  // real step: its weights evict L3) it measured -10% to +8% over two runs
  // (decode_attention_ab.sh --mode flush), so the reads in address order stay.
  for (int64_t i = static_cast<int64_t>(plan.tiles.size()) - 1; i >= 0; --i) {
    if (plan.tiles[static_cast<size_t>(i)].nr == 1 && all_heads) {
      plan.items.push_back({i, -1});
      continue;
    }
    for (int64_t h = 0; h < c.hk; ++h) plan.items.push_back({i, h});
  }
  plan.part_stride = kQRows * plan.group * (c.dim + 2);
  plan.partial.resize(static_cast<size_t>(parts * c.hk * plan.part_stride));
  return plan;
}

// Per-thread scratch of the tile kernel.
struct AttnScratch {
  std::vector<float> q, s, kf, vf, acc, m, l, alpha, cacc, cm, cl, ks, vs, lv;
  std::vector<int64_t> lo, hi;
  std::vector<uint32_t> qb, pb;  // bf16 tiles: the queries and probabilities as bf16 pairs
  AttnScratch(int64_t group, int64_t dim) {
    const size_t rows = static_cast<size_t>(kQRows * group);
    if (EMBER_ATTN_BF16) {
      qb.resize(rows * dim / 2);
      pb.resize(rows * kKeys / 2);
    }
    if (EMBER_ATTN_PACKED) lv.resize(rows * 16);  // each row's softmax sum as partial sums
    q.resize(rows * dim);
    cacc.resize(rows * dim);  // the carry: segments folded so far (fold_state)
    cm.resize(rows);
    cl.resize(rows);
    ks.resize(static_cast<size_t>(kKeys));  // int8 tiles: the keys' / values' scales
    vs.resize(static_cast<size_t>(kKeys));
    s.resize(rows * kKeys);
    kf.resize(static_cast<size_t>(kKeys * dim));
    vf.resize(static_cast<size_t>(kKeys * dim));
    acc.resize(rows * dim);
    m.resize(rows);
    l.resize(rows);
    alpha.resize(rows);
    lo.resize(rows);
    hi.resize(rows);
  }
};

// The cache slots of keys p, p + 1, ... of one sequence (block table `table`), without a
// division per key: next() returns key p's slot and steps to p + 1. Only keys inside the
// table may be asked for (a key past the end is never read: callers stop first).
struct PagedCursor {
  const int64_t* table;
  int64_t bs, blk, off;
  PagedCursor(const int64_t* t, int64_t block_size, int64_t p)
      : table(t), bs(block_size), blk(p / block_size), off(p % block_size) {}
  int64_t next() {
    const int64_t slot = table[blk] * bs + off;
    if (++off == bs) off = 0, ++blk;
    return slot;
  }
};

// Keys [kb, kb + n) of kv head kvh as float rows (kKeys, D), rows >= n and keys below kstart
// zero; the next tile's rows are prefetched. int8: dequantised (value x scale; the scales
// also in ks / vs). NOTE: attend_decode folds int8 scales into scores and probabilities
// instead, so int8 rows are not bit-invariant between the two paths (bf16 rows are).
template <int D>
inline void load_kv_tile(const DecodeCtx& c, const int64_t* table, const KvCache& kv,
                         int64_t kvh, int64_t kb, int64_t n, int64_t kstart, int64_t kend,
                         float* kf, float* vf, float* ks, float* vs) {
  const int64_t bs = c.block_size, hk = c.hk;
  const int64_t jstart = std::max<int64_t>(0, kstart - kb);
  PagedCursor cur(table, bs, kb + jstart), cn(table, bs, kb + jstart + kKeys);
  for (int64_t j = 0; j < kKeys; ++j) {
    float* kr = kf + j * D;
    float* vr = vf + j * D;
    if (j >= n || kb + j < kstart) {
      ks[j] = vs[j] = 0.0f;
      for (int v = 0; v < D; v += kVecW) v_store(kr + v, v_zero()), v_store(vr + v, v_zero());
      continue;
    }
    const int64_t p = kb + j;
    const int64_t row = cur.next() * hk + kvh;
    const int64_t pn = p + kKeys;  // the same key of the next tile
    if (pn < kend) {
      const int64_t rn = cn.next() * hk + kvh;
      const size_t elem = kv.dtype == 0 ? 2 : 1;
      for (size_t off = 0; off < D * elem; off += 64) {
        v_prefetch(static_cast<const char*>(kv.k) + rn * D * elem + off);
        v_prefetch(static_cast<const char*>(kv.v) + rn * D * elem + off);
      }
    }
    if (kv.dtype == 0) {
      const kv_t* ks = static_cast<const kv_t*>(kv.k) + row * D;
      const kv_t* vs = static_cast<const kv_t*>(kv.v) + row * D;
      for (int v = 0; v < D; v += kVecW) {
        v_store(kr + v, load_bf16(ks + v));
        v_store(vr + v, load_bf16(vs + v));
      }
    } else {
      const int8_t* kp = static_cast<const int8_t*>(kv.k) + row * D;
      const int8_t* vp = static_cast<const int8_t*>(kv.v) + row * D;
      ks[j] = kv.k_scale[row];
      vs[j] = kv.v_scale[row];
      const vfloat sk = v_set1(ks[j]), sv = v_set1(vs[j]);
      for (int v = 0; v < D; v += kVecW) {
        v_store(kr + v, v_mul(v_load_i8(kp + v), sk));
        v_store(vr + v, v_mul(v_load_i8(vp + v), sv));
      }
    }
  }
}

// acc (D) += sum_{j in [j0, j1)} p[j] vf[j], eight vectors of accumulators in registers.
template <int D>
inline void pv_row(const float* p, const float* vf, int64_t j0, int64_t j1, float* acc) {
  constexpr int NV = D / kVecW, C = NV < 8 ? NV : 8;
  for (int c0 = 0; c0 < NV; c0 += C) {
    vfloat a[C];
    for (int v = 0; v < C; ++v) a[v] = v_load(acc + (c0 + v) * kVecW);
    for (int64_t j = j0; j < j1; ++j) {
      const vfloat w = v_set1(p[j]);
      for (int v = 0; v < C; ++v) a[v] = v_fma(w, v_load(vf + j * D + (c0 + v) * kVecW), a[v]);
    }
    for (int v = 0; v < C; ++v) v_store(acc + (c0 + v) * kVecW, a[v]);
  }
}

// The largest of x[0..n).
inline float max_of(const float* x, int64_t n, float mx) {
  int64_t j = 0;
  if (n >= kVecW) {
    vfloat a = v_load(x);
    for (j = kVecW; j + kVecW <= n; j += kVecW) a = v_max(a, v_load(x + j));
    mx = std::max(mx, v_hmax(a));
  }
  for (; j < n; ++j) mx = std::max(mx, x[j]);
  return mx;
}

// x[j] *= by[j] for j in [j0, n).
inline void scale_by(float* __restrict x, const float* __restrict by, int64_t j0, int64_t n) {
  for (int64_t j = j0; j < n; ++j) x[j] *= by[j];
}

// carry (acc, m, l) <- carry (+) a segment's state (sacc, sm, sl): the one way two softmax
// states are combined, always in key order, in the item (unsplit) and in merge_parts (split)
// alike, so both give the same bits. Empty states (l = 0) are skipped; into an empty carry
// the segment is copied.
inline void fold_state(float* cacc, float& cm, float& cl, const float* sacc, float sm, float sl,
                       int64_t D) {
  if (sl == 0.0f) return;
  if (cl == 0.0f) {
    memcpy(cacc, sacc, static_cast<size_t>(D) * sizeof(float));
    cm = sm;
    cl = sl;
    return;
  }
  const float mx = std::max(cm, sm);
  const float a = expf(cm - mx), b = expf(sm - mx);
  const vfloat va = v_set1(a), vb = v_set1(b);
  for (int64_t j = 0; j < D; j += kVecW)
    v_store(cacc + j, v_fma(v_load(sacc + j), vb, v_mul(v_load(cacc + j), va)));
  cl = std::fma(sl, b, cl * a);
  cm = mx;
}

// dst (D) = acc / l (0 when the row saw no key).
inline void normalise_row(const float* acc, float l, int64_t D, float* dst) {
  const vfloat inv = v_set1(l > 0.0f ? 1.0f / l : 0.0f);
  for (int64_t j = 0; j < D; j += kVecW) v_store(dst + j, v_mul(v_load(acc + j), inv));
}

// A finished segment [a, ...) of item t (its M = nr x G rows' acc, m, l in sc): folded into
// the item's carry, or (split tiles) stored in the segment's slot of the partial buffer.
// Its rows start at row0 of the scratch.
template <int D>
inline void end_segment(const DecodeCtx& c, const AttnPlan& plan, const AttnTile& t,
                        int64_t kvh, int64_t a, AttnScratch& sc, int64_t row0 = 0) {
  const int64_t M = t.nr * plan.group;
  const float* acc = sc.acc.data() + row0 * D;
  for (int64_t m = 0; m < M; ++m) {
    if (t.part < 0) {
      const int64_t x = row0 + m;
      fold_state(sc.cacc.data() + x * D, sc.cm[x], sc.cl[x], acc + m * D, sc.m[x], sc.l[x], D);
      continue;
    }
    const int64_t slot = t.part + seg_index(a) - t.seg0;
    float* dst = const_cast<float*>(plan.partial.data()) +
                 (slot * c.hk + kvh) * plan.part_stride + m * (D + 2);
    memcpy(dst, acc + m * D, D * sizeof(float));
    dst[D] = sc.m[row0 + m];
    dst[D + 1] = sc.l[row0 + m];
  }
}

// The M = nr x G rows of a finished unsplit item: the carry normalised into `out`.
template <int D>
inline void finish_rows(const AttnPlan& plan, const AttnTile& t, int64_t kvh,
                        const AttnScratch& sc, float* out, int64_t out_stride,
                        int64_t row0 = 0) {
  if (t.part >= 0) return;  // split: merge_parts folds the segments
  const int64_t G = plan.group, M = t.nr * G;
  for (int64_t m = 0; m < M; ++m) {
    const int64_t r = t.r0 + m / G, h = kvh * G + m % G, x = row0 + m;
    normalise_row(sc.cacc.data() + x * D, sc.cl[x], D, out + r * out_stride + h * D);
  }
}

// Start of a segment: every row's state empty.
template <int D>
inline void reset_state(int64_t M, AttnScratch& sc) {
  for (int64_t m = 0; m < M; ++m) {
    for (int v = 0; v < D; v += kVecW) v_store(sc.acc.data() + m * D + v, v_zero());
    sc.m[m] = -INFINITY;
    sc.l[m] = 0.0f;
  }
}

// The end of the segment that starts at key a (< k1).
inline int64_t segment_end(int64_t a, int64_t k1) {
  return std::min(k1, seg_start(seg_index(a) + 1));
}

// ---- decode rows (a tile of one query row): K/V read straight from the cache ------------
// A decode row's G query heads share each K/V row, but G (3 for SmolLM2) is too few to
// amortise converting a whole tile to float in scratch (as attend_tile does for prefill):
// here each K/V vector is converted in registers, used by every query head of the group and
// dropped. int8 caches: the key scale multiplies the score, the value scale the probability.

// Where K/V rows come from: the bf16 or int8 cache (row index rows[j]), or a float tile in
// scratch (row j).
enum KvSrc { kBf16 = 0, kInt8 = 1, kFloatTile = 2 };

template <int KS>
inline vfloat load_kv(const void* base, int64_t off) {
  if constexpr (KS == kInt8) return v_load_i8(static_cast<const int8_t*>(base) + off);
  else if constexpr (KS == kBf16) return load_bf16(static_cast<const kv_t*>(base) + off);
  else return v_load(static_cast<const float*>(base) + off);
}

// s[r * kKeys + j + i] = q_r . k_(j+i) for keys j..j+3 (cache rows rows[j..j+3]), R <= 3 rows.
template <int D, int R, int KS>
inline void qk4_direct(const float* q, const void* k, const int64_t* rows, float* s) {
  constexpr int NV = D / kVecW;
  vfloat a[R][4];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) a[r][i] = v_zero();
  // NOTE: the R query vectors of a step stay in registers and each key's vector is converted,
  // used by the R rows and dropped: 12 accumulators + 3 q + 1 k fit AVX2's 16 registers,
  // where four converted keys at once (17 live) spilled one accumulator to the stack (a
  // store/load in its FMA chain: ~20% of the QK time). Same FMA chains, same bits.
  for (int v = 0; v < NV; ++v) {
    vfloat qv[R];
    for (int r = 0; r < R; ++r) qv[r] = v_reg(v_load(q + r * D + v * kVecW));
    for (int i = 0; i < 4; ++i) {
      const vfloat kv = v_reg(load_kv<KS>(k, rows[i] * D + v * kVecW));
      for (int r = 0; r < R; ++r) a[r][i] = v_fma(qv[r], kv, a[r][i]);
    }
  }
  for (int r = 0; r < R; ++r) v_hsum4(a[r][0], a[r][1], a[r][2], a[r][3], s + r * kKeys);
}

// acc_r (D) = alpha_r acc_r + sum_{j < n} p_r[j] v_j for R <= 3 rows (rows: null for a float
// tile); accumulators in registers, C vectors of D at a time (R x C + R + 1 <= 16 registers on
// AVX2), so every V vector is loaded (and converted) once for the R rows.
template <int D, int R, int KS>
inline void pv_direct(const float* p, const void* vc, const int64_t* rows, int64_t n,
                      const float* alpha, float* acc) {
  // NOTE: AVX-512 (kVecW 16) has 32 registers: 8 vectors of D per pass for R = 2, 3 (one
  // pass over V for D = 128, two for 256, where 4 took two and four)
  constexpr int C0 = kVecW == 16 ? (R == 1 ? 16 : 8) : (R == 1 ? 8 : 4);
  constexpr int NV = D / kVecW, C = NV < C0 ? NV : C0;
  for (int c0 = 0; c0 < NV; c0 += C) {
    vfloat a[R][C];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < C; ++v)
        a[r][v] = v_mul(v_load(acc + r * D + (c0 + v) * kVecW), v_set1(alpha[r]));
    for (int64_t j = 0; j < n; ++j) {
      vfloat w[R];
      for (int r = 0; r < R; ++r) w[r] = v_set1(p[r * kKeys + j]);
      for (int v = 0; v < C; ++v) {
        const vfloat x = v_reg(load_kv<KS>(vc, (KS == kFloatTile ? j : rows[j]) * D + (c0 + v) * kVecW));
        for (int r = 0; r < R; ++r) a[r][v] = v_fma(w[r], x, a[r][v]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < C; ++v) v_store(acc + r * D + (c0 + v) * kVecW, a[r][v]);
  }
}

// acc_m (D) = alpha_m acc_m + sum_{j < n} p_m[j] vf_j for the M rows of a tile: the same
// per-element arithmetic as pv_direct on a float tile (so the same bits), with the loops
// swapped: one chunk of 32 dims of V (64 keys, 8 KB) is reused by every row while it sits in
// L1, instead of each row triple streaming the whole 16 KB tile.
template <int R, int C>
inline void pv_chunk(const float* p, const float* vc, int64_t D, int64_t n, const float* alpha,
                     float* acc) {
  vfloat a[R][C];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < C; ++v) a[r][v] = v_mul(v_load(acc + r * D + v * kVecW), v_set1(alpha[r]));
  for (int64_t j = 0; j < n; ++j) {
    vfloat w[R];
    for (int r = 0; r < R; ++r) w[r] = v_set1(p[r * kKeys + j]);
    for (int v = 0; v < C; ++v) {
      const vfloat x = v_reg(v_load(vc + j * D + v * kVecW));
      for (int r = 0; r < R; ++r) a[r][v] = v_fma(w[r], x, a[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < C; ++v) v_store(acc + r * D + v * kVecW, a[r][v]);
}

template <int D>
inline void pv_tile(const float* p, const float* vf, int64_t n, int64_t M, const float* alpha,
                    float* acc) {
  constexpr int NV = D / kVecW, C = NV < 4 ? NV : 4;
  for (int c0 = 0; c0 < NV; c0 += C) {
    const int64_t off = c0 * kVecW;
    int64_t m = 0;
    for (; m + 3 <= M; m += 3)
      pv_chunk<3, C>(p + m * kKeys, vf + off, D, n, alpha + m, acc + m * D + off);
    if (M - m == 2) pv_chunk<2, C>(p + m * kKeys, vf + off, D, n, alpha + m, acc + m * D + off);
    if (M - m == 1) pv_chunk<1, C>(p + m * kKeys, vf + off, D, n, alpha + m, acc + m * D + off);
  }
}

// The M = nr x G rows of tile t, kv head kvh, at the start of an item: each row's query
// head scaled into sc.q (float32), its carry empty, its key range [lo, hi) in sc.
template <int D>
inline void start_tile_rows(const DecodeCtx& c, const AttnPlan& plan, const AttnTile& t,
                            int64_t kvh, int64_t window, const float* q, int64_t q_stride,
                            AttnScratch& sc) {
  const int64_t G = plan.group, M = t.nr * G;
  float* qf = sc.q.data();
  for (int64_t m = 0; m < M; ++m) {
    const int64_t r = t.r0 + m / G, h = kvh * G + m % G;
    const float* src = q + r * q_stride + h * D;
    for (int v = 0; v < D; v += kVecW)
      v_store(qf + m * D + v, v_mul(v_load(src + v), v_set1(c.scale)));
    sc.cl[m] = 0.0f;
    sc.cm[m] = -INFINITY;
    sc.hi[m] = c.lens[r];  // exclusive
    sc.lo[m] = first_key(c, r, window);
  }
}

// One work item: the rows of tile t, the G query heads of kv head kvh, keys [t.k0, t.k1) in
// segments, each over key tiles at multiples of kKeys (rows masked to their own keys).
// q: row i's query heads at q + i * q_stride; out: row i's heads at out + i * out_stride.
template <int D>
void attend_tile(const DecodeCtx& c, const AttnPlan& plan, const AttnTile& t, int64_t kvh,
                 int64_t window, const float* q, int64_t q_stride, const KvCache& kv,
                 AttnScratch& sc, float* out, int64_t out_stride) {
  const int64_t G = plan.group, M = t.nr * G;
  const int64_t* table = c.block_tables + (t.r0 + t.nr - 1) * c.max_blocks;  // covers all rows
  float *qf = sc.q.data(), *s = sc.s.data(), *acc = sc.acc.data();
  start_tile_rows<D>(c, plan, t, kvh, window, q, q_stride, sc);
  float *ks = sc.ks.data(), *vs = sc.vs.data(), *alpha = sc.alpha.data();
  for (int64_t a = t.k0; a < t.k1;) {
    const int64_t b = segment_end(a, t.k1);
    reset_state<D>(M, sc);
    for (int64_t kb = a / kKeys * kKeys; kb < b; kb += kKeys) {
      const int64_t n = std::min(kKeys, b - kb);
      load_kv_tile<D>(c, table, kv, kvh, kb, n, a, t.k1, sc.kf.data(), sc.vf.data(), ks, vs);
      // NOTE: three query rows x four keys per pass (12 accumulators), each (row, key) summed
      // in the order of the decode rows (lanes over D, then v_hsum4): the same bits, fewer loads.
      static constexpr int64_t kIdx[4] = {0, 1, 2, 3};
      const int64_t n4 = (n + 3) / 4 * 4;
      for (int64_t j = 0; j < n4; j += 4) {
        const float* kj = sc.kf.data() + j * D;
        int64_t m = 0;
        for (; m + 3 <= M; m += 3) qk4_direct<D, 3, kFloatTile>(qf + m * D, kj, kIdx, s + m * kKeys + j);
        if (M - m == 2) qk4_direct<D, 2, kFloatTile>(qf + m * D, kj, kIdx, s + m * kKeys + j);
        if (M - m == 1) qk4_direct<D, 1, kFloatTile>(qf + m * D, kj, kIdx, s + m * kKeys + j);
      }
      int64_t m = 0;
      // NOTE: probabilities outside a row's keys are zeroed so the rows can share PV passes
      for (m = 0; m < M; ++m) {
        const int64_t j0 = std::max<int64_t>(0, std::max(sc.lo[m], a) - kb);
        const int64_t j1 = std::min<int64_t>(n, sc.hi[m] - kb);
        float* sm = s + m * kKeys;
        if (j0 >= j1) {
          alpha[m] = 1.0f;
          for (int64_t j = 0; j < n; ++j) sm[j] = 0.0f;
          continue;
        }
        const float mx = max_of(sm + j0, j1 - j0, sc.m[m]);
        alpha[m] = expf(sc.m[m] - mx);  // 0 on the first keys (m = -inf)
        sc.l[m] = std::fma(sc.l[m], alpha[m], exp_shifted(sm + j0, j1 - j0, mx));
        sc.m[m] = mx;
        for (int64_t j = 0; j < j0; ++j) sm[j] = 0.0f;
        for (int64_t j = j1; j < n; ++j) sm[j] = 0.0f;
      }
      pv_tile<D>(s, sc.vf.data(), n, M, alpha, acc);
    }
    end_segment<D>(c, plan, t, kvh, a, sc);
    a = b;
  }
  finish_rows<D>(plan, t, kvh, sc, out, out_stride);
}

// The cache slots a decode key tile [kb, kb + n) needs (keys before j0 and the padding up to
// n4 repeat key j0's slot: their scores are ignored), and for the prefetches the slots of the
// same keys one tile on; keys at or past `end` take the slot of key end - 1 (in cache
// already: a harmless prefetch, no branch per head).
inline void decode_tile_slots(const int64_t* table, int64_t bs, int64_t kb, int64_t j0,
                              int64_t n, int64_t n4, int64_t end, int64_t* slot, int64_t* next) {
  PagedCursor cur(table, bs, kb + j0);
  for (int64_t j = j0; j < n; ++j) slot[j] = cur.next();
  for (int64_t j = 0; j < j0; ++j) slot[j] = slot[j0];
  for (int64_t j = n; j < n4; ++j) slot[j] = slot[j0];
  const int64_t last = table[(end - 1) / bs] * bs + (end - 1) % bs;
  const int64_t p0 = kb + kKeys, stop = std::min(kKeys, std::max<int64_t>(0, end - p0));
  PagedCursor cn(table, bs, p0);
  int64_t j = 0;
  for (; j < stop; ++j) next[j] = cn.next();
  for (; j < n4; ++j) next[j] = last;
}

// Every cache line of `bytes` from `at` in K and in V into L2 (prefetcht1).
inline void prefetch_kv_l2(const char* kc, const char* vc, size_t at, size_t bytes) {
  for (size_t off = 0; off < bytes; off += 64) {
    __builtin_prefetch(kc + at + off, 0, 2);
    __builtin_prefetch(vc + at + off, 0, 2);
  }
}

// A decode row (a tile of one row), kv heads [h0, h1): the same segments, key tiles and
// arithmetic per query head as attend_tile (so its output is bit-identical to the row's
// inside a tile), K/V read straight from the cache. The heads run one after the other on each
// key tile, so an item over all heads reads each slot's K/V rows of every head (contiguous)
// while they are in cache. Head kvh's G rows sit at scratch rows (kvh - h0) G.
// NOTE: the cache slots of a tile's keys (and of the tile after it, for the prefetches)
// are found once per tile; every head then walks flat arrays: no per-key branches. Keys past
// the item's end prefetch the item's last key again (already in cache) instead of branching.
template <int D, int KS>
void attend_decode(const DecodeCtx& c, const AttnPlan& plan, const AttnTile& t, int64_t h0,
                   int64_t h1, const float* q, int64_t q_stride, const KvCache& kv,
                   AttnScratch& sc, float* out, int64_t out_stride) {
  const int64_t G = plan.group, M = (h1 - h0) * G, bs = c.block_size, hk = c.hk;
  const int64_t* table = c.block_tables + t.r0 * c.max_blocks;
  float *qf = sc.q.data(), *s = sc.s.data(), *acc = sc.acc.data(), *alpha = sc.alpha.data();
  // slot[j]: key kb + j's cache slot; next[j]: the same key one tile on (clamped)
  int64_t slot[kKeys + 4], next[kKeys + 4], rows[kKeys + 4];
  for (int64_t m = 0; m < M; ++m) {
    const float* src = q + t.r0 * q_stride + (h0 * G + m) * D;
    for (int v = 0; v < D; v += kVecW) v_store(qf + m * D + v, v_mul(v_load(src + v), v_set1(c.scale)));
    sc.cl[m] = 0.0f;
    sc.cm[m] = -INFINITY;
  }
  constexpr size_t row_bytes = KS == kInt8 ? D : 2 * D;
  const char* kc = static_cast<const char*>(kv.k);
  const char* vc = static_cast<const char*>(kv.v);
  // Heads h0..h1 of a slot are one contiguous stretch of the cache: `span` bytes.
  const size_t span = static_cast<size_t>(h1 - h0) * row_bytes;
  // NOTE: the item's first two key tiles into L2 at once: the prefetches below run one
  // tile ahead, so without this every item (a 512-key segment of a split decode: 2 of its 8
  // tiles) starts on demand misses. The second tile is requested again by the first tile's
  // shares below; the first tile alone measured the same at depth 4096 and 2-3% slower
  // for short decodes with the cache evicted (decode_attention_ab.sh --mode flush).
  {
    const int64_t e = std::min(t.k1, t.k0 / kKeys * kKeys + 2 * kKeys);
    PagedCursor pc(table, bs, t.k0);
    for (int64_t p = t.k0; p < e; ++p)
      prefetch_kv_l2(kc, vc, static_cast<size_t>(pc.next() * hk + h0) * row_bytes, span);
  }
  for (int64_t a = t.k0; a < t.k1;) {
    const int64_t b = segment_end(a, t.k1);
    reset_state<D>(M, sc);
    for (int64_t kb = a / kKeys * kKeys; kb < b; kb += kKeys) {
      const int64_t n = std::min(kKeys, b - kb), j0 = std::max<int64_t>(0, a - kb);
      const int64_t n4 = (n + 3) / 4 * 4;
      decode_tile_slots(table, bs, kb, j0, n, n4, t.k1, slot, next);
      for (int64_t kvh = h0; kvh < h1; ++kvh) {
        const int64_t r0 = (kvh - h0) * G;
        for (int64_t j = 0; j < n4; ++j) rows[j] = slot[j] * hk + kvh;
        // NOTE: prefetch the K/V rows of the head-tile processed next (head kvh + 1 of this
        // key tile, or the first head of the next tile), a few keys per QK step: one
        // head-tile ahead (8 KB int8 / 16 KB bf16) keeps it in L1, where one burst of the
        // whole next tile of all heads (24 / 48 KB) evicted the current one and stalled on
        // the miss buffers. And into L2 (prefetcht1) the next tile's K/V, so the L1
        // prefetch hits L2 instead of waiting on memory: each head of this tile fetches its
        // share of the next tile's keys, a key's rows of all heads h0..h1 at once (one
        // contiguous span, so whole lines in address order). Per-head rows of the tile two
        // ahead instead left more of a cold decode waiting on memory (depth 4096, 2 threads,
        // Zen 3: 9.4 -> 8.0 ms, benchmarks/decode_attention_ab.sh).
        const int64_t* pf = kvh + 1 < h1 ? slot : next;
        const int64_t pf_head = kvh + 1 < h1 ? kvh + 1 : h0;
        const int64_t share = (n4 + h1 - h0 - 1) / (h1 - h0), f0 = (kvh - h0) * share;
        for (int64_t j = 0; j < n4; j += 4) {
          for (int64_t i = j; i < j + 4; ++i) {
            const size_t l1 = static_cast<size_t>(pf[i] * hk + pf_head) * row_bytes;
            for (size_t off = 0; off < row_bytes; off += 64) {
              v_prefetch(kc + l1 + off);
              v_prefetch(vc + l1 + off);
            }
          }
          const int64_t f1 = std::min(n4, f0 + (j + 4) * share / n4);
          for (int64_t f = f0 + j * share / n4; f < f1; ++f)
            prefetch_kv_l2(kc, vc, static_cast<size_t>(next[f] * hk + h0) * row_bytes, span);
          int64_t m = r0;
          for (; m + 3 <= r0 + G; m += 3)
            qk4_direct<D, 3, KS>(qf + m * D, kv.k, rows + j, s + m * kKeys + j);
          if (r0 + G - m == 2) qk4_direct<D, 2, KS>(qf + m * D, kv.k, rows + j, s + m * kKeys + j);
          if (r0 + G - m == 1) qk4_direct<D, 1, KS>(qf + m * D, kv.k, rows + j, s + m * kKeys + j);
        }
        // NOTE: int8: the head's key / value scales gathered once (sc.ks / sc.vs) for its G
        // rows, which then scale their scores in vectors (the same products as per key).
        if constexpr (KS == kInt8)
          for (int64_t j = j0; j < n; ++j)
            sc.ks[j] = kv.k_scale[rows[j]], sc.vs[j] = kv.v_scale[rows[j]];
        for (int64_t m = r0; m < r0 + G; ++m) {
          float* sm = s + m * kKeys;
          if constexpr (KS == kInt8) scale_by(sm, sc.ks.data(), j0, n);
          const float mx = max_of(sm + j0, n - j0, sc.m[m]);
          alpha[m] = expf(sc.m[m] - mx);  // 0 on the first keys (m = -inf)
          sc.l[m] = std::fma(sc.l[m], alpha[m], exp_shifted(sm + j0, n - j0, mx));
          sc.m[m] = mx;
          if constexpr (KS == kInt8) scale_by(sm, sc.vs.data(), j0, n);
          for (int64_t j = 0; j < j0; ++j) sm[j] = 0.0f;
        }
        int64_t m = r0;
        for (; m + 3 <= r0 + G; m += 3)
          pv_direct<D, 3, KS>(s + m * kKeys, kv.v, rows, n, alpha + m, acc + m * D);
        if (r0 + G - m == 2) pv_direct<D, 2, KS>(s + m * kKeys, kv.v, rows, n, alpha + m, acc + m * D);
        if (r0 + G - m == 1) pv_direct<D, 1, KS>(s + m * kKeys, kv.v, rows, n, alpha + m, acc + m * D);
      }
    }
    for (int64_t kvh = h0; kvh < h1; ++kvh) end_segment<D>(c, plan, t, kvh, a, sc, (kvh - h0) * G);
    a = b;
  }
  for (int64_t kvh = h0; kvh < h1; ++kvh)
    finish_rows<D>(plan, t, kvh, sc, out, out_stride, (kvh - h0) * G);
}

// The segments of one split (tile, kv head) folded in key order (fold_state, as an unsplit
// item folds them) and normalised.
inline void merge_parts(const DecodeCtx& c, const AttnPlan& plan, const AttnMerge& g,
                        int64_t kvh, float* out, int64_t out_stride) {
  const int64_t G = plan.group, D = c.dim;
  for (int64_t m = 0; m < g.nr * G; ++m) {
    const int64_t r = g.r0 + m / G, h = kvh * G + m % G;
    float* dst = out + r * out_stride + h * D;
    for (int64_t j = 0; j < D; ++j) dst[j] = 0.0f;
    float cm = -INFINITY, cl = 0.0f;
    for (int64_t s = 0; s < g.nsplit; ++s) {
      const float* p =
          plan.partial.data() + ((g.part0 + s) * c.hk + kvh) * plan.part_stride + m * (D + 2);
      fold_state(dst, cm, cl, p, p[D], p[D + 1], D);
    }
    normalise_row(dst, cl, D, dst);
  }
}

// The k and v heads of one rotated qkv row (after the Hq query heads) into int8 caches at
// `slot`: per head q = round(x * 127 / amax), scale = amax / 127 (symmetric, per token and head).
inline void store_kv_i8(const float* r, int64_t hq, int64_t hk, int64_t dim, int8_t* k_cache,
                        int8_t* v_cache, float* k_scale, float* v_scale, int64_t slot) {
  for (int64_t which = 0; which < 2; ++which) {
    int8_t* cache = which == 0 ? k_cache : v_cache;
    float* scales = which == 0 ? k_scale : v_scale;
    for (int64_t h = 0; h < hk; ++h) {
      const float* x = r + (hq + which * hk + h) * dim;
      float amax = 0.0f;
      for (int64_t j = 0; j < dim; ++j) amax = std::max(amax, fabsf(x[j]));
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      int8_t* dst = cache + (slot * hk + h) * dim;
      for (int64_t j = 0; j < dim; ++j) dst[j] = static_cast<int8_t>(lrintf(x[j] * inv));
      scales[slot * hk + h] = amax / 127.0f;
    }
  }
}

// Head dims the tiled kernel is compiled for (others take the per-row kernels).
inline bool tiled_attention_supports(int64_t dim) {
  return dim == 64 || dim == 128 || dim == 256;
}

// The value a C row starts from in the packed tiles' dot products: zero, itself, or itself
// times alpha_r.
enum class Init { kZero, kKeep, kScale };

// One accumulator vector of a C row that starts at p: zero, p's value, or p's value x alpha
// (alpha read by kScale only). Both packed kernels (prefill_bf16.h, prefill_f32.h) start
// from it, each in its build's vector width.
inline vfloat init_acc(const float* p, Init init, const float* alpha) {
  if (init == Init::kZero) return v_zero();
  const vfloat x = v_load(p);
  return init == Init::kScale ? v_mul(x, v_set1(*alpha)) : x;
}

// A row's running maximum m is only a reference point (its accumulators and sum are scaled
// by exp(-m)): any m at or below the true maximum works while exp(score - m) stays far from
// float32's range. The packed tiles raise it only when a score exceeds it by more than this
// (probabilities up to e^8 ~ 3000), so most key tiles skip the horizontal max and the
// accumulator rescale.
constexpr float kLazyMax = 8.0f;

}  // namespace
#if EMBER_ATTN_BF16
#include "prefill_bf16.h"  // pack_kv_tile, attend_tile_packed: bf16 dot products
#elif EMBER_ATTN_F32
#include "prefill_f32.h"  // pack_kv_tile, attend_tile_packed: float32 outer products
#endif
namespace {

#if EMBER_ATTN_PACKED
// Every key tile of every pack entry of the plan (worksharing: all threads call).
inline void pack_plan(const DecodeCtx& c, AttnPlan& plan, const KvCache& kv) {
  const int64_t n = static_cast<int64_t>(plan.pack_items.size());
#pragma omp for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const auto& [e, kvh, ti] = plan.pack_items[static_cast<size_t>(i)];
    pack_kv_tile(c, plan, plan.packs[static_cast<size_t>(e)], kvh, ti, kv);
  }
}
#endif

inline void attend_decode_dispatch(const DecodeCtx& c, const AttnPlan& plan, const AttnTile& t,
                                   int64_t h0, int64_t h1, const float* q, int64_t q_stride,
                                   const KvCache& kv, AttnScratch& sc, float* out,
                                   int64_t out_stride) {
  const bool i8 = kv.dtype != 0;
  switch (c.dim * 2 + (i8 ? 1 : 0)) {
    case 128: attend_decode<64, kBf16>(c, plan, t, h0, h1, q, q_stride, kv, sc, out, out_stride); break;
    case 129: attend_decode<64, kInt8>(c, plan, t, h0, h1, q, q_stride, kv, sc, out, out_stride); break;
    case 256: attend_decode<128, kBf16>(c, plan, t, h0, h1, q, q_stride, kv, sc, out, out_stride); break;
    case 257: attend_decode<128, kInt8>(c, plan, t, h0, h1, q, q_stride, kv, sc, out, out_stride); break;
    case 512: attend_decode<256, kBf16>(c, plan, t, h0, h1, q, q_stride, kv, sc, out, out_stride); break;
    default: attend_decode<256, kInt8>(c, plan, t, h0, h1, q, q_stride, kv, sc, out, out_stride); break;
  }
}

// Attention of every row of `plan` (built by make_attn_plan on the same c / window).
// Worksharing only: every thread of the team calls it with its own scratch.
inline void attend_planned(const DecodeCtx& c, AttnPlan& plan, int64_t window, const float* q,
                           int64_t q_stride, const KvCache& kv, AttnScratch& sc, float* out,
                           int64_t out_stride) {
  const int64_t items = static_cast<int64_t>(plan.items.size());
  const bool packed = !plan.packs.empty();  // make_packs: only where packs_cache(kv.dtype)
#if EMBER_ATTN_PACKED
  if (packed) pack_plan(c, plan, kv);  // ends on the worksharing loop's barrier
#endif
#pragma omp for schedule(dynamic, 1)
  for (int64_t i = 0; i < items; ++i) {
    const auto [ti, kvh] = plan.items[static_cast<size_t>(i)];
    const AttnTile& t = plan.tiles[static_cast<size_t>(ti)];
    if (t.nr == 1) {  // a decode row: K/V straight from the cache
      attend_decode_dispatch(c, plan, t, kvh < 0 ? 0 : kvh, kvh < 0 ? c.hk : kvh + 1, q,
                             q_stride, kv, sc, out, out_stride);
      continue;
    }
#if EMBER_ATTN_PACKED
    if (packed && t.pack >= 0) {  // a full prefill tile on packed K/V
      switch (c.dim) {
        case 64: attend_tile_packed<64>(c, plan, t, kvh, window, q, q_stride, sc, out, out_stride); break;
        case 128: attend_tile_packed<128>(c, plan, t, kvh, window, q, q_stride, sc, out, out_stride); break;
        default: attend_tile_packed<256>(c, plan, t, kvh, window, q, q_stride, sc, out, out_stride); break;
      }
      continue;
    }
#endif
    switch (c.dim) {
      case 64: attend_tile<64>(c, plan, t, kvh, window, q, q_stride, kv, sc, out, out_stride); break;
      case 128: attend_tile<128>(c, plan, t, kvh, window, q, q_stride, kv, sc, out, out_stride); break;
      default: attend_tile<256>(c, plan, t, kvh, window, q, q_stride, kv, sc, out, out_stride); break;
    }
  }
  if (plan.merges.empty()) return;
  const int64_t merges = static_cast<int64_t>(plan.merges.size()) * c.hk;
#pragma omp for schedule(static)
  for (int64_t i = 0; i < merges; ++i)
    merge_parts(c, plan, plan.merges[static_cast<size_t>(i / c.hk)], i % c.hk, out, out_stride);
}

}  // namespace
