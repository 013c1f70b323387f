// Portable weight GEMMs for several activation rows (M >= kPortableManyFrom: prefill chunks,
// batched decode, verify rows), the plain-C++ counterpart of avx2_prefill.h, included by
// isa_portable.h before its gemm_tiles, which hands the calls many_rows_supported allows
// (Q4 (4), Q5 (5), Q8 (8), Q8h (9)) to gemm_tiles_many_portable; one or two rows and other
// formats keep isa_portable.h's tiles.
//
// Per tile of 16 outputs and per K segment of kPortSegBlocks blocks:
//   1. the segment's weights are unpacked once into a scratch of ready-to-multiply int16 lane
//      vectors (isa_portable.h's layout: lane (row, q), column p multiplies the activation pair
//      broadcast from the int32 at q16 + 2 p) and float scales, reused by all M rows;
//   2. a register-blocked kernel runs R activation rows x 16 outputs: 2 R int16 (Q4 / Q5) or
//      int32 (Q8) block sums, the two weight vectors of a column and one broadcast activation;
//      the 2 R float accumulators stay in generic 8-float vectors across the segment and the
//      per-block float update runs on them (an earlier form kept them in arrays: stack loads
//      and stores per block, ~6-8% of the kernel's time).
// The integer block dot products are exact (the bounds of isa_portable.h's tiles: Q4 16 x 15 x
// 127, Q5 16 x 16 x 127 per int16 lane; Q8 two products per lane, widened at once) and the float
// update per block and lane is the one of isa_portable.h's tiles, in the same order; a segment's
// accumulators are stored to y and reloaded (exact), so the outputs are bit-identical to the
// small-M path.
#pragma once

namespace {

constexpr int64_t kPortPrefetch = 8;  // blocks ahead that unpack_segment_portable prefetches
constexpr int64_t kPortSegBlocks = 8;  // K blocks (of 32) per segment: 8 KB of unpacked weights
// NOTE: from 3 rows (batched decode, verify rows, prefill chunks): measured per call (gate_up
// 3072 x 576, 1 thread) the unpacked-segment kernel beats the tiles at every M >= 3 (M = 3:
// 100 vs 113 us, 8: 218 vs 273, 12: 312 vs 414) and ties at M = 2.
constexpr int64_t kPortableManyFrom = 3;

// The calls gemm_tiles_many_portable has a kernel for: an allow-list of formats
// (unpack_segment_portable's); any other format keeps isa_portable.h's tiles.
inline bool many_rows_supported(const LinearW& lw, int64_t mrows) {
  return mrows >= kPortableManyFrom && (lw.fmt == 4 || lw.fmt == 5 || lw.fmt == 8 || lw.fmt == 9);
}

struct PortableScratch {
  vi16 w[kPortSegBlocks][16][2];  // [block][column p][half h: rows 8h .. 8h + 7]
  float d[kPortSegBlocks][kTile];
  float m[kPortSegBlocks][kTile];
};

// Fills s with blocks b0 .. b0 + nbk of tile t. fmt: 4 Q4, 5 Q5, 8 Q8, 9 Q8h.
inline void unpack_segment_portable(const LinearW& lw, int64_t nb, int64_t t, int64_t b0,
                                    int64_t nbk, PortableScratch& s) {
  const int64_t bytes = lw.fmt == 4 ? 256 : lw.fmt == 5 ? kQ5BlockBytes
                       : lw.fmt == 9 ? kQ8hBlockBytes : 512;
  for (int64_t i = 0; i < nbk; ++i) {
    const int64_t blk = t * nb + b0 + i;
    const uint8_t* wb = lw.w + blk * bytes;
    // the weights stream from memory when they outgrow the caches (the LM head): prefetch
    // the block kPortPrefetch ahead (the tiles' prefetch distance), every 64-byte line of it
    const uint8_t* ahead = wb + kPortPrefetch * bytes;
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(ahead + off, 0, 3);
    vi16(*out)[2] = s.w[i];
    if (lw.fmt == 4) {  // q4_tile's unpack: column (g, j) of pair_pattern is p = 2 g + j
      for (int h = 0; h < 2; ++h)
        for (int c = 0; c < 4; ++c) {
          const vu16 raw = load_u16x16(wb + 64 * c + 32 * h);
          out[2 * c][h] = reinterpret_cast<vi16>(raw & 15);
          out[2 * c + 1][h] = reinterpret_cast<vi16>((raw >> 8) & 15);
          out[2 * (4 + c)][h] = reinterpret_cast<vi16>((raw >> 4) & 15);
          out[2 * (4 + c) + 1][h] = reinterpret_cast<vi16>(raw >> 12);
        }
      memcpy(s.d[i], lw.d + blk * kTile, kTile * sizeof(float));
      memcpy(s.m[i], lw.m + blk * kTile, kTile * sizeof(float));
    } else if (lw.fmt == 5) {  // q5_tile's codes w[row][k] in [-16, 15], then the lane layout
      int16_t wq[kTile][kBlock];
      for (int l = 0; l < kTile; ++l)
        for (int e = 0; e < 4; ++e) {
          const uint8_t hb = wb[256 + 4 * l + e];
          for (int c = 0; c < 4; ++c) {
            const uint8_t raw = wb[64 * c + 4 * l + e];
            wq[l][4 * c + e] = static_cast<int16_t>(((raw & 15) | (((hb >> c) & 1) << 4)) - 16);
            wq[l][4 * (c + 4) + e] =
                static_cast<int16_t>(((raw >> 4) | (((hb >> (c + 4)) & 1) << 4)) - 16);
          }
        }
      // lane (row, q) of column p = (g, j): w[row][4 g + j + 2 q] (pair order 0, 2, 1, 3)
      for (int p = 0; p < 16; ++p)
        for (int h = 0; h < 2; ++h) {
          int16_t lanes[16];
          for (int r = 0; r < 8; ++r)
            for (int q = 0; q < 2; ++q) lanes[2 * r + q] = wq[8 * h + r][4 * (p >> 1) + (p & 1) + 2 * q];
          memcpy(&out[p][h], lanes, sizeof(lanes));
        }
      for (int l = 0; l < kTile; ++l) {
        uint16_t hv;
        memcpy(&hv, wb + 320 + 2 * l, 2);
        s.d[i][l] = half_to_float(hv);
      }
    } else {  // Q8 / Q8h: q8_tile's signed codes q = u - 128
      const bool h16 = lw.fmt == 9;
      for (int h = 0; h < 2; ++h)
        for (int j = 0; j < 8; ++j) {
          const vi16 v = reinterpret_cast<vi16>(load_u16x16(wb + 64 * j + 32 * h) ^ 0x8080);
          out[2 * j][h] = (v << 8) >> 8;  // low byte, sign-extended
          out[2 * j + 1][h] = v >> 8;     // high byte
        }
      if (h16) {
        for (int l = 0; l < kTile; ++l) {
          uint16_t hv;
          memcpy(&hv, wb + 512 + 2 * l, 2);
          s.d[i][l] = half_to_float(hv);
        }
      } else {
        memcpy(s.d[i], lw.d + blk * kTile, kTile * sizeof(float));
      }
    }
  }
}

// NOTE: each block sum is pinned to its register after every step (EMBER_PIN): GCC 12
// otherwise reassociates a row's 16 integer adds into a tree, hoists all 64 activation
// broadcasts and products of a block (R = 4) and spills them to the stack (the Q4 kernel ran
// slower than the tile path). The weight vectors of a column are pinned too: else every row's
// multiply re-reads them from the scratch (a memory operand): Q4 M=64 1570 -> 1346 us.

// The activation pair of column p (pair_pattern(x16, p / 2, p % 2)).
inline vi16 pair_at(const int16_t* x16, int p) { return pair_pattern(x16, p >> 1, p & 1); }

// R rows (m0 ..) x 16 outputs over the segment's nbk blocks (absolute blocks b0 ..), adding to
// y (first segment: starting from zero). F: 4 Q4 (with the min term), 5 Q5, 8 Q8 / Q8h.
typedef float vf8p __attribute__((vector_size(32)));  // 8 floats: half a tile's outputs

inline vf8p load_vf8(const float* p) {
  vf8p v;
  memcpy(&v, p, sizeof(v));
  return v;
}

template <int F, int R>
inline void pmany_kernel(const PortableScratch& s, const QuantizedActs& a, int64_t m0,
                         int64_t b0, int64_t nbk, float* __restrict y, int64_t n, bool first) {
  vf8p acc[R][2];
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h)
      acc[r][h] = first ? vf8p{} : load_vf8(y + (m0 + r) * n + 8 * h);
  const int16_t* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = a.qrow16(m0 + r) + b0 * kBlock;
  for (int64_t i = 0; i < nbk; ++i) {
    const vi16(*W)[2] = s.w[i];
    vi32 dot[R][2];
    if constexpr (F == 8) {
      for (int r = 0; r < R; ++r) dot[r][0] = dot[r][1] = vi32{};
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        vi16 w00 = W[2 * j][0], w01 = W[2 * j][1];
        vi16 w10 = W[2 * j + 1][0], w11 = W[2 * j + 1][1];
        EMBER_PIN(w00);
        EMBER_PIN(w01);
        EMBER_PIN(w10);
        EMBER_PIN(w11);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const int16_t* x16 = xr[r] + i * kBlock;
          const vi16 x0 = pair_at(x16, 2 * j), x1 = pair_at(x16, 2 * j + 1);
          dot[r][0] += pair_sum(w00 * x0 + w10 * x1);
          dot[r][1] += pair_sum(w01 * x0 + w11 * x1);
          EMBER_PIN(dot[r][0]);
          EMBER_PIN(dot[r][1]);
        }
      }
    } else {
      vi16 sm[R][2];
      for (int r = 0; r < R; ++r) sm[r][0] = sm[r][1] = vi16{};
#pragma GCC unroll 16
      for (int p = 0; p < 16; ++p) {
        vi16 w0 = W[p][0], w1 = W[p][1];
        EMBER_PIN(w0);
        EMBER_PIN(w1);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const vi16 x = pair_at(xr[r] + i * kBlock, p);
          sm[r][0] += w0 * x;
          sm[r][1] += w1 * x;
          EMBER_PIN(sm[r][0]);
          EMBER_PIN(sm[r][1]);
        }
      }
      for (int r = 0; r < R; ++r)
        for (int h = 0; h < 2; ++h) dot[r][h] = pair_sum(sm[r][h]);
    }
    const vf8p db[2] = {load_vf8(s.d[i]), load_vf8(s.d[i] + 8)};
    for (int r = 0; r < R; ++r) {
      const size_t ab = static_cast<size_t>((m0 + r) * a.nb + b0 + i);
      const float ad = a.d[ab];
      for (int h = 0; h < 2; ++h) {
        // lane for lane the tiles' EMBER_MADD(float(dot), d * ad, acc) (+ m * s for Q4)
        const vf8p t = mul_no_contract(db[h], ad);
        acc[r][h] = __builtin_convertvector(dot[r][h], vf8p) * t + acc[r][h];
        if constexpr (F == 4) acc[r][h] = load_vf8(s.m[i] + 8 * h) * a.s[ab] + acc[r][h];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) memcpy(y + (m0 + r) * n + 8 * h, &acc[r][h], sizeof(vf8p));
}

// Rows mbegin .. mrows - 1 of one tile's segment: blocks of R rows, then the remainder.
template <int F, int R>
inline void pmany_rows(const PortableScratch& s, const QuantizedActs& a, int64_t mbegin,
                       int64_t mrows, int64_t b0, int64_t nbk, float* yt, int64_t np,
                       bool first) {
  int64_t m0 = mbegin;
  for (; m0 + R <= mrows; m0 += R) pmany_kernel<F, R>(s, a, m0, b0, nbk, yt, np, first);
  switch (mrows - m0) {
    case 3: pmany_kernel<F, 3 < R ? 3 : 1>(s, a, m0, b0, nbk, yt, np, first); break;
    case 2: pmany_kernel<F, 2 < R ? 2 : 1>(s, a, m0, b0, nbk, yt, np, first); break;
    case 1: pmany_kernel<F, 1>(s, a, m0, b0, nbk, yt, np, first); break;
    default: break;
  }
}

// y (M, np) = act @ W^T for M >= kPortableManyFrom (any M works), formats 4 / 5 / 8 / 9.
// Worksharing only: call inside a parallel region, as gemm_tiles.
// NOTE: the rows run in groups whose int16 activations (2 bytes a value, twice AVX2's int8)
// stay in L2 (kPortGroupBytes): every tile reads all of a group's rows, and 512 prefill rows
// of K = 576 (590 KB) would stream from L3 once per tile. Each group is a worksharing loop over
// the tiles without its barrier (groups write disjoint rows of y), then one barrier.
constexpr int64_t kPortGroupBytes = 192 * 1024;

inline void gemm_tiles_many_portable(const LinearW& lw, const QuantizedActs& a, int64_t mrows,
                                     float* y) {
  const int64_t np = padded(lw.n), tiles = np / kTile, nb = a.nb;
  const int64_t group = std::max<int64_t>(16, kPortGroupBytes / (2 * nb * kBlock) / 4 * 4);
  PortableScratch s;
  for (int64_t g0 = 0; g0 < mrows; g0 += group) {
    const int64_t gm = std::min(group, mrows - g0);
#pragma omp for schedule(static) nowait
    for (int64_t t = 0; t < tiles; ++t) {
      float* yt = y + t * kTile;  // the kernels index rows absolutely (m0 from g0)
      for (int64_t b0 = 0; b0 < nb; b0 += kPortSegBlocks) {
        const int64_t nbk = std::min<int64_t>(kPortSegBlocks, nb - b0);
        unpack_segment_portable(lw, nb, t, b0, nbk, s);
        const bool first = b0 == 0;
        if (lw.fmt == 4) pmany_rows<4, 4>(s, a, g0, g0 + gm, b0, nbk, yt, np, first);
        else if (lw.fmt == 5) pmany_rows<5, 4>(s, a, g0, g0 + gm, b0, nbk, yt, np, first);
        else pmany_rows<8, 2>(s, a, g0, g0 + gm, b0, nbk, yt, np, first);
      }
    }
  }
#pragma omp barrier
}

}  // namespace
