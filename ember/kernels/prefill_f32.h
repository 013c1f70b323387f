// Prefill query tiles on AVX2 float32 outer products, included by attention.h in the AVX2 build
// only (EMBER_ATTN_F32 set there).
//
// attend_tile's float tile converts its K/V key tile for every query tile of the chunk and sums
// each score across the lanes of a head dimension (v_hsum4): about half the FMA peak on Zen 3.
// Here a full prefill tile (kQRows rows of one sequence) reads K/V key tiles packed ONCE per
// layer and step (pack_kv_tile, all threads, before the items run; bf16 or int8 caches, int8
// dequantised as load_kv_tile does) and shared by every query tile of the sequence:
//   K tile (D, kKeys) floats: K transposed, row d = dim d of the 64 keys
//   V tile (kKeys, D) floats: row j = key j
// so S = Q K^T and O += P V are both small GEMMs on one register-blocked kernel (6 rows x 16
// columns, 12 accumulators: one broadcast per row and two loads per step, no horizontal sums).
// The online softmax is lazy (kLazyMax) as on AVX-512. Float32 throughout: a row equals the
// same row decoded to float32 rounding (another summation order), not bit for bit.
// Keys outside the sequence's range are packed as zeros; keys outside a row's range get
// probability 0 (lane masks over the 64 keys of a tile).
#pragma once

namespace {

// r[i] lane j <- r[j] lane i (an 8 x 8 float matrix, rows in registers).
inline void transpose8x8_ps(__m256* r) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// Key tile `ti` of pack entry `e`, kv head kvh, packed into plan.kvpack (K then V) as floats.
inline void pack_kv_tile(const DecodeCtx& c, AttnPlan& plan, const PackSeq& e, int64_t kvh,
                         int64_t ti, const KvCache& kv) {
  const int64_t D = c.dim, kb = (e.tile0 + ti) * kKeys;
  float* kt = reinterpret_cast<float*>(plan.kvpack.data()) +
              (e.off + kvh * e.ntiles + ti) * 2 * packed_tile_words(D);
  float* vt = kt + packed_tile_words(D);
  const int64_t* table = c.block_tables + e.row * c.max_blocks;
  int64_t rows[kKeys];  // key j's cache row (slot x Hk + kvh), -1 outside the entry
  for (int64_t j = 0; j < kKeys; ++j) {
    const int64_t p = kb + j;
    rows[j] = p < e.kstart || p >= e.kend
                  ? -1 : (table[p / c.block_size] * c.block_size + p % c.block_size) * c.hk + kvh;
  }
  // 8 floats of key row `row` from dim d (zeros outside the entry)
  const auto load8 = [&](const void* cache, const float* scale, int64_t row, int64_t d) {
    if (row < 0) return _mm256_setzero_ps();
    if (kv.dtype == 0) return load_bf16(static_cast<const kv_t*>(cache) + row * D + d);
    return _mm256_mul_ps(v_load_i8(static_cast<const int8_t*>(cache) + row * D + d),
                         _mm256_set1_ps(scale[row]));
  };
  for (int64_t j0 = 0; j0 < kKeys; j0 += 8)  // K: 8 keys x 8 dims transposed in registers
    for (int64_t d0 = 0; d0 < D; d0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = load8(kv.k, kv.k_scale, rows[j0 + i], d0);
      transpose8x8_ps(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(kt + (d0 + i) * kKeys + j0, r[i]);
    }
  for (int64_t j = 0; j < kKeys; ++j)
    for (int64_t d = 0; d < D; d += 8)
      _mm256_storeu_ps(vt + j * D + d, load8(kv.v, kv.v_scale, rows[j], d));
}

// C_r (16 floats at c + r * cs) = init_r + sum_{k < K} a_r[k] b_k for R <= 6 rows: a_r at
// a + r * as, b_k the 16 floats at b + k * bs; init_r: see Init (alpha by kScale only).
// 12 accumulators, the two B vectors of a step shared by the rows.
template <int R>
inline void gemm_rows16(const float* a, int64_t as, const float* b, int64_t bs, int64_t K,
                        float* c, int64_t cs, Init init, const float* alpha) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 2; ++v) acc[r][v] = init_acc(c + r * cs + 8 * v, init, alpha + r);
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * bs), b1 = _mm256_loadu_ps(b + k * bs + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_broadcast_ss(a + r * as + k);
      acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 2; ++v) _mm256_storeu_ps(c + r * cs + 8 * v, acc[r][v]);
}

// C (R x N) = init + A (R x K) B (K x N) for R <= 6 rows, N a multiple of 16 (strides as
// gemm_rows16).
inline void gemm_rows(int64_t R, const float* a, int64_t as, const float* b, int64_t bs,
                      int64_t K, int64_t N, float* c, int64_t cs, Init init, const float* alpha) {
  for (int64_t n0 = 0; n0 < N; n0 += 16) {
    switch (R) {
      case 6: gemm_rows16<6>(a, as, b + n0, bs, K, c + n0, cs, init, alpha); break;
      case 5: gemm_rows16<5>(a, as, b + n0, bs, K, c + n0, cs, init, alpha); break;
      case 4: gemm_rows16<4>(a, as, b + n0, bs, K, c + n0, cs, init, alpha); break;
      case 3: gemm_rows16<3>(a, as, b + n0, bs, K, c + n0, cs, init, alpha); break;
      case 2: gemm_rows16<2>(a, as, b + n0, bs, K, c + n0, cs, init, alpha); break;
      default: gemm_rows16<1>(a, as, b + n0, bs, K, c + n0, cs, init, alpha); break;
    }
  }
}

// One row's online-softmax step over a key tile's 64 scores s (probabilities written back in
// place, 0 outside the row's keys [j0, j1)): alpha = exp(m_old - m_new), the row's 8 partial
// sums lv updated. Full: every key of the tile is the row's (no masks).
template <bool Full>
inline void softmax_row_f32(float* s, int64_t j0, int64_t j1, float& m, float* lv,
                            float& alpha) {
  constexpr int kV = static_cast<int>(kKeys / 8);
  __m256 x[kV];
  __m256i keep[kV];
  __m256 mxv = _mm256_set1_ps(m);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i lo = _mm256_set1_epi32(static_cast<int>(j0) - 1);
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(j1));
  for (int v = 0; v < kV; ++v) {
    x[v] = _mm256_loadu_ps(s + 8 * v);
    if (!Full) {
      const __m256i j = _mm256_add_epi32(lane, _mm256_set1_epi32(8 * v));
      keep[v] = _mm256_and_si256(_mm256_cmpgt_epi32(j, lo), _mm256_cmpgt_epi32(hi, j));
      x[v] = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), x[v], _mm256_castsi256_ps(keep[v]));
    }
    mxv = _mm256_max_ps(mxv, x[v]);
  }
  // lazy maximum: m moves only when a score exceeds it by more than kLazyMax (the first keys
  // of a segment: m = -inf)
  const __m256 over = _mm256_cmp_ps(mxv, _mm256_set1_ps(m + kLazyMax), _CMP_GT_OQ);
  if (_mm256_movemask_ps(over)) {
    const float mx = v_hmax(mxv);
    alpha = expf(m - mx);  // 0 on the first keys (m = -inf)
    m = mx;
  } else {
    alpha = 1.0f;
  }
  const __m256 mv = _mm256_set1_ps(m);
  __m256 sum = _mm256_loadu_ps(lv);
  if (alpha != 1.0f) sum = _mm256_mul_ps(sum, _mm256_set1_ps(alpha));
  for (int v = 0; v < kV; ++v) {
    __m256 e = exp256(_mm256_sub_ps(x[v], mv));
    if (!Full) e = _mm256_and_ps(e, _mm256_castsi256_ps(keep[v]));  // exp256 clamps -inf
    _mm256_storeu_ps(s + 8 * v, e);
    sum = _mm256_add_ps(sum, e);
  }
  _mm256_storeu_ps(lv, sum);
}

// attend_tile on packed float32 K/V: the rows of full tile t (pack entry t.pack), kv head kvh.
template <int D>
void attend_tile_packed(const DecodeCtx& c, const AttnPlan& plan, const AttnTile& t,
                        int64_t kvh, int64_t window, const float* q, int64_t q_stride,
                        AttnScratch& sc, float* out, int64_t out_stride) {
  const int64_t G = plan.group, M = t.nr * G;
  const PackSeq& e = plan.packs[static_cast<size_t>(t.pack)];
  float *qf = sc.q.data(), *s = sc.s.data(), *acc = sc.acc.data(), *alpha = sc.alpha.data();
  float* lv = sc.lv.data();
  start_tile_rows<D>(c, plan, t, kvh, window, q, q_stride, sc);  // the float tile's setup
  const int64_t words = packed_tile_words(D);
  const float* base = reinterpret_cast<const float*>(plan.kvpack.data()) +
                      (e.off + kvh * e.ntiles) * 2 * words;
  for (int64_t a = t.k0; a < t.k1;) {
    const int64_t b = segment_end(a, t.k1);
    reset_state<D>(M, sc);
    for (int64_t m = 0; m < M; ++m) _mm256_storeu_ps(lv + 8 * m, _mm256_setzero_ps());
    for (int64_t kb = a / kKeys * kKeys; kb < b; kb += kKeys) {
      const int64_t n = std::min(kKeys, b - kb);
      const float* kt = base + (kb / kKeys - e.tile0) * 2 * words;
      const float* vt = kt + words;
      // NOTE: six rows at a time through QK, softmax and PV: their scores and accumulators
      // stay in L1 beside the K / V tiles
      for (int64_t m0 = 0; m0 < M; m0 += 6) {
        const int64_t R = std::min<int64_t>(6, M - m0);
        gemm_rows(R, qf + m0 * D, D, kt, kKeys, D, kKeys, s + m0 * kKeys, kKeys, Init::kZero,
                  alpha + m0);
        for (int64_t m = m0; m < m0 + R; ++m) {
          const int64_t j0 = std::max<int64_t>(0, std::max(sc.lo[m], a) - kb);
          const int64_t j1 = std::min<int64_t>(n, sc.hi[m] - kb);
          float* sm = s + m * kKeys;
          if (j0 >= j1) {
            alpha[m] = 1.0f;
            for (int64_t j = 0; j < kKeys; j += 8) _mm256_storeu_ps(sm + j, _mm256_setzero_ps());
            continue;
          }
          if (j0 == 0 && j1 == kKeys)
            softmax_row_f32<true>(sm, j0, j1, sc.m[m], lv + 8 * m, alpha[m]);
          else
            softmax_row_f32<false>(sm, j0, j1, sc.m[m], lv + 8 * m, alpha[m]);
        }
        // the accumulators are rescaled only when a row's maximum moved (kLazyMax)
        const Init init = std::all_of(alpha + m0, alpha + m0 + R, [](float x) { return x == 1.0f; })
                              ? Init::kKeep : Init::kScale;
        gemm_rows(R, s + m0 * kKeys, kKeys, vt, D, n, D, acc + m0 * D, D, init, alpha + m0);
      }
    }
    for (int64_t m = 0; m < M; ++m) sc.l[m] = hsum8(_mm256_loadu_ps(lv + 8 * m));
    end_segment<D>(c, plan, t, kvh, a, sc);
    a = b;
  }
  finish_rows<D>(plan, t, kvh, sc, out, out_stride);
}

}  // namespace
