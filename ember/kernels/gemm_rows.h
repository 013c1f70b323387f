// The row-tile GEMM every ISA shares: the format dispatch over one tile's activation rows and
// the loop over tiles and row chunks. Included by kernels.h / isa_avx2.h / isa_portable.h after
// their tiles (q4_tile with Q4Scales / Q4kScales, q5_tile, q6x_tile, q8_tile: same names and
// signatures in each ISA). The format branch runs once per tile and row chunk, outside the
// block loops; each tile is a template instance of its own.
#pragma once

namespace {

// Rows m0 .. m0 + C - 1 of output tile t (16 rows of W) in lw's format.
template <int C>
inline void tile_rows(const LinearW& lw, const QuantizedActs& a, int64_t t, int64_t m0, float* yt,
                      int64_t np) {
  const int64_t nb = a.nb;
  if (lw.fmt == 4)
    q4_tile<C>(lw.w + t * nb * 256, Q4Scales{lw.d + t * nb * kTile, lw.m + t * nb * kTile}, a, m0,
               yt, np);
  else if (lw.fmt == 5)
    q5_tile<C>(lw.w + t * nb * kQ5BlockBytes, a, m0, yt, np);
  else if (lw.fmt == 7)
    q6x_tile<C>(lw.w + t * nb * kQ6xBlockBytes, lw.d + t * (nb / kQ6xSuper) * kTile, a, m0, yt,
                np);
  else if (lw.fmt == 6)
    q4_tile<C>(lw.w + t * nb * kQ4kBlockBytes,
               Q4kScales{lw.d + t * (nb / kQ4kSuper) * kTile, lw.m + t * (nb / kQ4kSuper) * kTile},
               a, m0, yt, np);
  else if (lw.fmt == 9)
    q8_tile<C, true>(lw.w + t * nb * kQ8hBlockBytes, nullptr, a, m0, yt, np);
  else
    q8_tile<C>(lw.w + t * nb * 512, lw.d + t * nb * kTile, a, m0, yt, np);
}

// y (M, np) = act @ W^T by row tiles: per tile of W, chunks of kChunk rows, then the rest.
// Worksharing only: call inside a parallel region (every thread of the team must call it).
inline void gemm_row_tiles(const LinearW& lw, const QuantizedActs& a, int64_t mrows, float* y) {
  const int64_t np = padded(lw.n), tiles = np / kTile;
#pragma omp for schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    float* yt = y + t * kTile;
    int64_t m0 = 0;
    for (; m0 + kChunk <= mrows; m0 += kChunk) tile_rows<kChunk>(lw, a, t, m0, yt, np);
    switch (mrows - m0) {
      case 7: tile_rows<7>(lw, a, t, m0, yt, np); break;
      case 6: tile_rows<6>(lw, a, t, m0, yt, np); break;
      case 5: tile_rows<5>(lw, a, t, m0, yt, np); break;
      case 4: tile_rows<4>(lw, a, t, m0, yt, np); break;
      case 3: tile_rows<3>(lw, a, t, m0, yt, np); break;
      case 2: tile_rows<2>(lw, a, t, m0, yt, np); break;
      case 1: tile_rows<1>(lw, a, t, m0, yt, np); break;
      default: break;
    }
  }
}

}  // namespace
