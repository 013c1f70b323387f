// Prefill query tiles on AVX-512 BF16 dot products (vdpbf16ps), included by attention.h in the
// AVX-512 build only (EMBER_ATTN_BF16 set there).
//
// A full prefill tile (kQRows rows of one sequence) over a bfloat16 cache: its K and V key
// tiles are packed ONCE per layer and step (pack_kv_tile, all threads, before the items run)
// into the pair layouts vdpbf16ps multiplies directly, and every query tile of the sequence
// reuses them (a key tile serves up to chunk / kQRows query tiles):
//   K tile (D / 2, kKeys) words: word (p, j) = key j's dims 2p, 2p + 1 (bf16 pair)
//   V tile (kKeys / 2, D) words: word (p, d) = dim d of keys 2p, 2p + 1
// Scores S = Q K^T with the queries (already scaled) rounded to bf16; the probabilities of the
// online softmax rounded to bf16 for P V (the softmax sum adds the rounded values, so the
// weights a row applies sum to its denominator); accumulation, max and exp in float32. The
// softmax is lazy (kLazyMax): a row's reference maximum moves only when a score exceeds it by
// more than e^8, so most key tiles skip the horizontal max and the accumulator rescale. Keys
// outside the sequence's range are packed as zeros; keys outside a row's range get
// probability 0 (masks over the 64 keys of a tile).
// Only sequences with at least kPackMinRows rows in the step (prefill chunks) take this path.
// NOTE: it is not bit-identical to the decode rows (float32 dot products): batch invariance
// holds for sequences with fewer rows in a step (decodes, verification rows of up to
// kPackMinRows - 1 draft tokens) and for a prefill chunk's ragged last tile; a full prefill
// tile gives the same bits whatever the thread count, the split and the rows beside it.
#pragma once

namespace {

// r[i] word j <- r[j] word i (a 16 x 16 matrix of 32-bit words, rows in registers).
inline void transpose16x16_epi32(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {  // 2 x 2 blocks of words
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // 4 x 4 blocks (within each 128-bit lane)
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // every 128-bit lane now holds a transposed 4 x 4 block; two rounds of lane shuffles put
  // the blocks in place
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xDD);
  }
}

// Key tile `ti` of pack entry `e`, kv head kvh, packed into plan.kvpack (K then V).
inline void pack_kv_tile(const DecodeCtx& c, AttnPlan& plan, const PackSeq& e, int64_t kvh,
                         int64_t ti, const KvCache& kv) {
  alignas(64) static const uint32_t kZeroRow[128] = {};  // a key outside the entry
  const int64_t D = c.dim, W = D / 2, kb = (e.tile0 + ti) * kKeys;
  uint32_t* kt = plan.kvpack.data() + (e.off + kvh * e.ntiles + ti) * 2 * packed_tile_words(D);
  uint32_t* vt = kt + packed_tile_words(D);
  const int64_t* table = c.block_tables + e.row * c.max_blocks;
  const uint32_t* krow[kKeys];
  const uint16_t* vrow[kKeys];
  for (int64_t j = 0; j < kKeys; ++j) {
    const int64_t p = kb + j;
    if (p < e.kstart || p >= e.kend) {
      krow[j] = kZeroRow;
      vrow[j] = reinterpret_cast<const uint16_t*>(kZeroRow);
      continue;
    }
    const int64_t row = (table[p / c.block_size] * c.block_size + p % c.block_size) * c.hk + kvh;
    krow[j] = reinterpret_cast<const uint32_t*>(static_cast<const kv_t*>(kv.k) + row * D);
    vrow[j] = static_cast<const kv_t*>(kv.v) + row * D;
  }
  // K: 16 x 16 word blocks (16 keys x 16 pairs) transposed in registers; a tail of W % 16
  // pairs word by word
  const int64_t w16 = W / 16 * 16;
  for (int64_t j0 = 0; j0 < kKeys; j0 += 16)
    for (int64_t p0 = 0; p0 < w16; p0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(krow[j0 + i] + p0);
      transpose16x16_epi32(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(kt + (p0 + i) * kKeys + j0, r[i]);
    }
  for (int64_t p = w16; p < W; ++p)
    for (int64_t j = 0; j < kKeys; ++j) kt[p * kKeys + j] = krow[j][p];
  // V: dims d0..d0+31 of keys 2p and 2p + 1 interleaved into 32 words
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40,
                                      8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t p = 0; p < kKeys / 2; ++p)
    for (int64_t d = 0; d < D; d += 32) {
      const __m512i a = _mm512_loadu_si512(vrow[2 * p] + d);
      const __m512i b = _mm512_loadu_si512(vrow[2 * p + 1] + d);
      _mm512_storeu_si512(vt + p * D + d, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_storeu_si512(vt + p * D + d + 16, _mm512_permutex2var_epi16(a, hi, b));
    }
}

// C_r (64 floats at c + r * cs) = init_r + sum_{p < np} a_r[p] b[p] for R <= 6 rows: a_r a
// row of bf16 pairs (words, stride as), b[p] 64 pair words (stride bs). init_r: see Init
// (alpha used by kScale only). 24 accumulators, the four B vectors of a step shared by the
// rows.
template <int R>
inline void dot_bf16_rows(const uint32_t* a, int64_t as, const uint32_t* b, int64_t bs,
                          int64_t np, float* c, int64_t cs, Init init, const float* alpha) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = init_acc(c + r * cs + 16 * v, init, alpha + r);
  for (int64_t p = 0; p < np; ++p) {
    __m512bh bv[4];
    for (int v = 0; v < 4; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + p * bs + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * as + p]));
      for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], x, bv[v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(c + r * cs + 16 * v, acc[r][v]);
}

// dot_bf16_rows over M rows, six at a time.
inline void dot_bf16_all(int64_t M, const uint32_t* a, int64_t as, const uint32_t* b,
                         int64_t bs, int64_t np, float* c, int64_t cs, Init init,
                         const float* alpha) {
  int64_t m = 0;
  for (; m + 6 <= M; m += 6)
    dot_bf16_rows<6>(a + m * as, as, b, bs, np, c + m * cs, cs, init, alpha + m);
  const float* al = alpha + m;
  switch (M - m) {
    case 5: dot_bf16_rows<5>(a + m * as, as, b, bs, np, c + m * cs, cs, init, al); break;
    case 4: dot_bf16_rows<4>(a + m * as, as, b, bs, np, c + m * cs, cs, init, al); break;
    case 3: dot_bf16_rows<3>(a + m * as, as, b, bs, np, c + m * cs, cs, init, al); break;
    case 2: dot_bf16_rows<2>(a + m * as, as, b, bs, np, c + m * cs, cs, init, al); break;
    case 1: dot_bf16_rows<1>(a + m * as, as, b, bs, np, c + m * cs, cs, init, al); break;
    default: break;
  }
}

// exp(x - m) as 2^t, t = x log2(e) - m log2(e) (one FMA; mlog2e = m log2(e)), to the accuracy
// bf16 probabilities need: 2^n 2^f, 2^f by a degree-3 polynomial on |f| <= 1/2 (relative
// error 8e-5, against bf16's 4e-3 rounding; exp512's degree 6 is for float32 outputs).
// x = -inf (a key outside the row) gives NaN (t - round(t)), which the caller masks to 0;
// t far below -126 gives 0 (scalef underflows).
inline __m512 exp_for_bf16(__m512 x, __m512 mlog2e) {
  const __m512 t = _mm512_fmsub_ps(x, _mm512_set1_ps(1.44269504088896341f), mlog2e);
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.05508868f), f, _mm512_set1_ps(0.24260405f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69327624f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.99992894f));
  return _mm512_scalef_ps(p, n);
}

// One row's online-softmax step over a key tile's 64 scores s, keys [j0, j1) its own:
// alpha = exp(m_old - m_new), the probabilities (0 outside [j0, j1)) as bf16 pairs into pb.
// Full: every key of the tile is the row's (j0 = 0, j1 = 64; no masks).
template <bool Full>
inline void softmax_row_bf16(const float* s, int64_t j0, int64_t j1, float& m, float* lv,
                             float& alpha, uint32_t* pb) {
  const uint64_t hi_bits = j1 >= 64 ? ~0ull : (1ull << j1) - 1;
  const uint64_t mask = hi_bits & ~((1ull << j0) - 1);
  __m512 x[4];
  __m512 mxv = _mm512_set1_ps(m);
  for (int v = 0; v < 4; ++v) {
    const __mmask16 k = static_cast<__mmask16>(mask >> (16 * v));
    x[v] = Full ? _mm512_loadu_ps(s + 16 * v)
                : _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), k, _mm512_loadu_ps(s + 16 * v));
    mxv = _mm512_max_ps(mxv, x[v]);
  }
  // lazy maximum: m moves only when a score exceeds it by more than kLazyMax (the first
  // keys of a segment: m = -inf), so most tiles skip the horizontal max and the rescale
  if (_mm512_cmp_ps_mask(mxv, _mm512_set1_ps(m + kLazyMax), _CMP_GT_OQ)) {
    const float mx = _mm512_reduce_max_ps(mxv);
    alpha = expf(m - mx);  // 0 on the first keys (m = -inf)
    m = mx;
  } else {
    alpha = 1.0f;
  }
  const __m512 mlog2e = _mm512_set1_ps(m * 1.44269504088896341f);
  // the row's sum: 16 partial sums (lv) until its segment ends, of the ROUNDED probabilities
  // (so the weights a row applies sum to its denominator), added by vdpbf16ps against 1.0
  // pairs (exact products, float32 adds)
  const __m512bh ones = (__m512bh)_mm512_set1_epi32(0x3F803F80);
  __m512 sum = _mm512_loadu_ps(lv);
  if (alpha != 1.0f) sum = _mm512_mul_ps(sum, _mm512_set1_ps(alpha));
  for (int v = 0; v < 4; v += 2) {
    const __mmask16 k0 = static_cast<__mmask16>(mask >> (16 * v));
    const __mmask16 k1 = static_cast<__mmask16>(mask >> (16 * v + 16));
    __m512 e0 = exp_for_bf16(x[v], mlog2e), e1 = exp_for_bf16(x[v + 1], mlog2e);
    if (!Full) {
      e0 = _mm512_maskz_mov_ps(k0, e0);
      e1 = _mm512_maskz_mov_ps(k1, e1);
    }
    const __m512bh p = _mm512_cvtne2ps_pbh(e1, e0);  // keys 16v .. 16v + 31
    _mm512_storeu_si512(pb + 8 * v, (__m512i)p);
    sum = _mm512_dpbf16_ps(sum, p, ones);
  }
  _mm512_storeu_ps(lv, sum);
}

// attend_tile on bf16 dot products: the rows of full tile t (pack entry t.pack), kv head kvh.
template <int D>
void attend_tile_packed(const DecodeCtx& c, const AttnPlan& plan, const AttnTile& t,
                        int64_t kvh, int64_t window, const float* q, int64_t q_stride,
                        AttnScratch& sc, float* out, int64_t out_stride) {
  constexpr int64_t W = D / 2;  // words (bf16 pairs) of a query row
  const int64_t G = plan.group, M = t.nr * G;
  const PackSeq& e = plan.packs[static_cast<size_t>(t.pack)];
  uint32_t *qb = sc.qb.data(), *pb = sc.pb.data();
  float *s = sc.s.data(), *acc = sc.acc.data(), *alpha = sc.alpha.data(), *lv = sc.lv.data();
  const __m512 scale = _mm512_set1_ps(c.scale);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t r = t.r0 + m / G, h = kvh * G + m % G;
    const float* src = q + r * q_stride + h * D;
    for (int64_t v = 0; v < D; v += 32) {
      const __m512bh p = _mm512_cvtne2ps_pbh(_mm512_mul_ps(_mm512_loadu_ps(src + v + 16), scale),
                                             _mm512_mul_ps(_mm512_loadu_ps(src + v), scale));
      _mm512_storeu_si512(qb + m * W + v / 2, (__m512i)p);
    }
    sc.cl[m] = 0.0f;
    sc.cm[m] = -INFINITY;
    sc.hi[m] = c.lens[r];  // exclusive
    sc.lo[m] = first_key(c, r, window);
  }
  const uint32_t* base = plan.kvpack.data() + (e.off + kvh * e.ntiles) * 2 * packed_tile_words(D);
  for (int64_t a = t.k0; a < t.k1;) {
    const int64_t b = segment_end(a, t.k1);
    reset_state<D>(M, sc);
    for (int64_t m = 0; m < M; ++m) _mm512_storeu_ps(lv + 16 * m, _mm512_setzero_ps());
    for (int64_t kb = a / kKeys * kKeys; kb < b; kb += kKeys) {
      const int64_t n = std::min(kKeys, b - kb);
      const uint32_t* kt = base + (kb / kKeys - e.tile0) * 2 * packed_tile_words(D);
      const uint32_t* vt = kt + packed_tile_words(D);
      const int64_t np = (n + 1) / 2;  // key pairs holding a key of the tile
      // NOTE: six rows at a time through QK, softmax and PV: their scores, probabilities and
      // accumulators stay in L1 beside the K / V tiles (all M rows' at once spilled to L2)
      for (int64_t m0 = 0; m0 < M; m0 += 6) {
        const int64_t R = std::min<int64_t>(6, M - m0);
        dot_bf16_all(R, qb + m0 * W, W, kt, kKeys, W, s + m0 * kKeys, kKeys, Init::kZero,
                     alpha + m0);
        for (int64_t m = m0; m < m0 + R; ++m) {
          const int64_t j0 = std::max<int64_t>(0, std::max(sc.lo[m], a) - kb);
          const int64_t j1 = std::min<int64_t>(n, sc.hi[m] - kb);
          if (j0 >= j1) {
            alpha[m] = 1.0f;
            _mm512_storeu_si512(pb + m * (kKeys / 2), _mm512_setzero_si512());
            _mm512_storeu_si512(pb + m * (kKeys / 2) + 16, _mm512_setzero_si512());
            continue;
          }
          if (j0 == 0 && j1 == kKeys)
            softmax_row_bf16<true>(s + m * kKeys, j0, j1, sc.m[m], lv + 16 * m, alpha[m],
                                   pb + m * (kKeys / 2));
          else
            softmax_row_bf16<false>(s + m * kKeys, j0, j1, sc.m[m], lv + 16 * m, alpha[m],
                                    pb + m * (kKeys / 2));
        }
        // the accumulators are rescaled only when a row's maximum moved (kLazyMax)
        const Init init = std::all_of(alpha + m0, alpha + m0 + R, [](float x) { return x == 1.0f; })
                              ? Init::kKeep : Init::kScale;
        for (int64_t d0 = 0; d0 < D; d0 += 64)  // O (R, D) 64 dims at a time
          dot_bf16_all(R, pb + m0 * (kKeys / 2), kKeys / 2, vt + d0, D, np, acc + m0 * D + d0,
                       D, init, alpha + m0);
      }
    }
    for (int64_t m = 0; m < M; ++m) sc.l[m] = _mm512_reduce_add_ps(_mm512_loadu_ps(lv + 16 * m));
    end_segment<D>(c, plan, t, kvh, a, sc);
    a = b;
  }
  finish_rows<D>(plan, t, kvh, sc, out, out_stride);
}

}  // namespace
