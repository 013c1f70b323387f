// Ember CPU kernels: one operation per call (ctypes entry points). Building blocks and weight
// layouts live in kernels.h; whole decode steps in decoder.cpp.
//
// Weight formats (group 32; N padded to a multiple of 16 rows, K a multiple of 32):
//   Q4: w = q * d + m, q in [0, 15] (asymmetric). Rows are interleaved in tiles of 16 so that one
//     64-byte vector holds 4 consecutive weights of each of 16 rows: packed (N/16, K/32, 4, 64)
//     uint8, byte [t][b][c][4 l + e] = q[16 t + l][32 b + 4 c + e] | q[..][32 b + 16 + 4 c + e] << 4.
//     d, m: (N/16, K/32, 16) float32, [t][b][l] for row 16 t + l.
//   Q8: w = q * d, q int8 in [-127, 127] (symmetric), stored as u = q + 128 in the same
//     interleaving: (N/16, K/32, 8, 64) uint8, byte [t][b][j][4 l + e] = u[16 t + l][32 b + 4 j + e];
//     d: (N/16, K/32, 16) float32.
// Activations are quantized per 32-element block to int8 (x = qx * dx, as llama.cpp's Q8_1).
// A block's dot product for 16 rows is then 8 VNNI instructions on int32 lanes (lane = row),
// one conversion and two FMAs: no horizontal sums in the inner loop.

#include "kernels.h"

namespace {

// y (M, Np) = x (M, K) @ W^T for one weight matrix lw in any kernel format (Np = lw.n padded
// to 16): the activations quantized once, then gemm_tiles on nthreads threads.
void run_gemm(const LinearW& lw, const float* x, int64_t mrows, float* y, int nthreads) {
  const QuantizedActs a(x, mrows, lw.k);
#pragma omp parallel num_threads(nthreads)
  gemm_tiles(lw, a, mrows, y);
}

}  // namespace

extern "C" {

int ember_kernels_version() { return 3; }

// y (M, Np) = x (M, K) @ W^T for the matrix *lw (abi.py LinearW): every format, one entry.
void linear_gemm(const LinearW* lw, const float* x, int64_t mrows, float* y, int nthreads) {
  run_gemm(*lw, x, mrows, y, nthreads);
}

// The same per format (the ctypes side's and the edge runtime's calls; np = N padded to 16):
// Q4 (d, m per block), Q8 (d), Q5 and Q8h (packed (Np/16, K/32, 352 / 544), scales inside:
// float16 after the codes), Q4K (packed (Np/16, K/32, 288); d and -dmin (Np/16, K/256, 16)
// float32), Q6 layers (q6_layers.h: the Q6 head's layout with 256-column super-blocks).
void q4_gemm(const float* x, int64_t mrows, int64_t k, const uint8_t* packed, const float* d,
             const float* m, int64_t np, float* y, int nthreads) {
  run_gemm({4, np, k, packed, d, m}, x, mrows, y, nthreads);
}
void q8_gemm(const float* x, int64_t mrows, int64_t k, const uint8_t* q, const float* d,
             int64_t np, float* y, int nthreads) {
  run_gemm({8, np, k, q, d, nullptr}, x, mrows, y, nthreads);
}
void q5_gemm(const float* x, int64_t mrows, int64_t k, const uint8_t* packed, int64_t np,
             float* y, int nthreads) {
  run_gemm({5, np, k, packed, nullptr, nullptr}, x, mrows, y, nthreads);
}
void q8h_gemm(const float* x, int64_t mrows, int64_t k, const uint8_t* packed, int64_t np,
              float* y, int nthreads) {
  run_gemm({9, np, k, packed, nullptr, nullptr}, x, mrows, y, nthreads);
}
void q4k_gemm(const float* x, int64_t mrows, int64_t k, const uint8_t* packed, const float* d,
              const float* nm, int64_t np, float* y, int nthreads) {
  run_gemm({6, np, k, packed, d, nm}, x, mrows, y, nthreads);
}
void q6x_gemm(const float* x, int64_t mrows, int64_t k, const uint8_t* packed, const float* d,
              int64_t np, float* y, int nthreads) {
  run_gemm({7, np, k, packed, d, nullptr}, x, mrows, y, nthreads);
}

// Rows `ids` (T,) of Q8h weights dequantized into out (T, K) float32 (embedding lookup).
void q8h_rows(const uint8_t* q, int64_t k, const int64_t* ids, int64_t t, float* out) {
  const int64_t nb = k / kBlock;
  for (int64_t i = 0; i < t; ++i) {
    const int64_t tile = ids[i] / kTile, l = ids[i] % kTile;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* wb = q + (tile * nb + b) * kQ8hBlockBytes;
      uint16_t h;
      memcpy(&h, wb + 512 + 2 * l, 2);
      const float scale = half_to_float(h);
      for (int64_t j = 0; j < 8; ++j)
        for (int64_t e = 0; e < 4; ++e)
          out[i * k + b * kBlock + 4 * j + e] =
              static_cast<float>(static_cast<int>(wb[j * 64 + 4 * l + e]) - 128) * scale;
    }
  }
}

// Rows `ids` (T,) of Q8 weights dequantized into out (T, K) float32 (embedding lookup).
void q8_rows(const uint8_t* q, const float* d, int64_t k, const int64_t* ids, int64_t t,
             float* out) {
  const int64_t nb = k / kBlock;
  for (int64_t i = 0; i < t; ++i) {
    const int64_t tile = ids[i] / kTile, l = ids[i] % kTile;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* wb = q + (tile * nb + b) * 512;
      const float scale = d[(tile * nb + b) * kTile + l];
      for (int64_t j = 0; j < 8; ++j)
        for (int64_t e = 0; e < 4; ++e)
          out[i * k + b * kBlock + 4 * j + e] =
              static_cast<float>(static_cast<int>(wb[j * 64 + 4 * l + e]) - 128) * scale;
    }
  }
}

// out (T, H) = x * rsqrt(mean(x^2) + eps) * w per row; with `residual` (T, H), x += residual
// first (in place) so x carries the new residual stream.
void rms_norm(float* x, const float* residual, const float* w, int64_t t, int64_t h, float eps,
              float* out) {
  for (int64_t i = 0; i < t; ++i)
    rms_norm_row(x + i * h, residual ? residual + i * h : nullptr, w, h, eps, out + i * h);
}

// out (T, I) = silu(gu[:, :I]) * gu[:, I:] for gu (T, 2I).
void silu_mul(const float* gu, int64_t t, int64_t inter, float* out) {
  for (int64_t i = 0; i < t; ++i)
    silu_mul_row(gu + i * 2 * inter, gu + i * 2 * inter + inter, inter, out + i * inter);
}

// RoPE (cos/sin (T, D/2)) in place on the q and k heads of qkv (T, (Hq + 2 Hk) * D), then the
// k and v heads stored at `slots` (T,) of k_cache/v_cache (S, Hk, D) bfloat16.
void rope_store_qkv(float* qkv, const float* cos_t, const float* sin_t, int64_t t, int64_t hq,
                    int64_t hk, int64_t dim, kv_t* k_cache, kv_t* v_cache,
                    const int64_t* slots) {
  const int64_t row = (hq + 2 * hk) * dim;
  for (int64_t i = 0; i < t; ++i)
    rope_store_row(qkv + i * row, cos_t + i * dim / 2, sin_t + i * dim / 2, hq, hk, dim, k_cache,
                   v_cache, slots[i]);
}

// rope_store_qkv for int8 caches (S, Hk, D) with float32 scales (S, Hk) per token and head.
void rope_store_qkv_i8(float* qkv, const float* cos_t, const float* sin_t, int64_t t,
                       int64_t hq, int64_t hk, int64_t dim, int8_t* k_cache, int8_t* v_cache,
                       float* k_scale, float* v_scale, const int64_t* slots) {
  const int64_t row = (hq + 2 * hk) * dim;
  for (int64_t i = 0; i < t; ++i) {
    float* r = qkv + i * row;
    rope_store_row(r, cos_t + i * dim / 2, sin_t + i * dim / 2, hq, hk, dim, nullptr, nullptr,
                   0);
    store_kv_i8(r, hq, hk, dim, k_cache, v_cache, k_scale, v_scale, slots[i]);
  }
}

// Attention of `batch` query rows against their paged contexts. q (B, Hq, D) with q_stride
// floats between rows; caches (num_blocks * block_size, Hk, D) bfloat16; block_tables
// (B, max_blocks); lens (B,): row i attends to keys [0, lens[i]) (a sliding window > 0 keeps
// the last `window` of them). out (B, Hq, D). Rows of one sequence (prefill chunks) are tiled,
// long contexts split across threads (attention.h).
// kv_dtype 1: int8 caches with float32 scales k_scale / v_scale (S, Hk) (head dims 64, 128,
// 256 only); 0: bfloat16 (scales unused).
void paged_decode_attention(const float* q, int64_t q_stride, const void* k_cache,
                            const void* v_cache, const float* k_scale, const float* v_scale,
                            int64_t kv_dtype, const int64_t* block_tables, int64_t max_blocks,
                            const int64_t* lens, int64_t batch, int64_t hq, int64_t hk,
                            int64_t dim, int64_t block_size, float scale, int64_t window,
                            float* out, int nthreads) {
  const DecodeCtx c{block_tables, max_blocks, lens, hq, hk, dim, block_size, scale};
  if (tiled_attention_supports(dim)) {
    AttnPlan plan = make_attn_plan(c, batch, window, kv_dtype, nthreads);
    const KvCache kv{k_cache, v_cache, k_scale, v_scale, kv_dtype};
#pragma omp parallel num_threads(nthreads)
    {
      AttnScratch sc(hq / hk, dim);
      attend_planned(c, plan, window, q, q_stride, kv, sc, out, hq * dim);
    }
    return;
  }
  const int64_t max_len = *std::max_element(lens, lens + batch);
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> scores(static_cast<size_t>(max_len * (hq / hk)));
#pragma omp for schedule(dynamic) collapse(2)
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t g = 0; g < hk; ++g)
        attend_kv_group(c, b, g, q + b * q_stride, static_cast<const kv_t*>(k_cache),
                        static_cast<const kv_t*>(v_cache), scores.data(), out + b * hq * dim);
  }
}


// One step of an `eagle` draft head (ember/spec_decode/eagle.py) for T rows in one call, so a
// draft token costs four GEMMs and no Python between them:
//   z = fc(x) with x (T, 2D) = [h ; e];  g, u = gate_up(rmsnorm(z) * norm);
//   feat (T, D) = z + down(silu(g) * u);  best (T,) = argmax of out(feat) over its `vocab` rows.
// w: fc (D x 2D), gate_up (2F x D), down (D x F), out (V x D) in any kernel format (D and F
// multiples of 32, V <= padded out rows); eps: the norm's epsilon.
void draft_head_step(const LinearW* w, const float* norm, float eps, const float* x, int64_t t,
                     int64_t vocab, float* feat, int64_t* best, int nthreads) {
  const LinearW &fc = w[0], &gate_up = w[1], &down = w[2], &out = w[3];
  const int64_t dim = fc.n, ffn = down.k, gu_cols = padded(gate_up.n), out_cols = padded(out.n);
  std::vector<float> z(static_cast<size_t>(t * dim)), normed(z.size()),
      gu(static_cast<size_t>(t * gu_cols)), act(static_cast<size_t>(t * ffn)),
      logits(static_cast<size_t>(t * out_cols));
  run_gemm(fc, x, t, z.data(), nthreads);
  for (int64_t i = 0; i < t; ++i)
    rms_norm_row(z.data() + i * dim, nullptr, norm, dim, eps, normed.data() + i * dim);
  run_gemm(gate_up, normed.data(), t, gu.data(), nthreads);
  for (int64_t i = 0; i < t; ++i)
    silu_mul_row(gu.data() + i * gu_cols, gu.data() + i * gu_cols + ffn, ffn,
                 act.data() + i * ffn);
  run_gemm(down, act.data(), t, feat, nthreads);
  for (int64_t j = 0; j < t * dim; ++j) feat[j] += z[static_cast<size_t>(j)];
  run_gemm(out, feat, t, logits.data(), nthreads);
  for (int64_t i = 0; i < t; ++i) {
    const float* row = logits.data() + i * out_cols;
    best[i] = std::max_element(row, row + vocab) - row;
  }
}

// `steps` chained head steps for T rows in one call (draft_head_step each): step s + 1's input
// is [feat of step s ; embed row of the token step s drafted], embed (V, D) being the head's
// vocabulary rows of the target's input embeddings (float32). The first step's input is
// [h ; e] (h, e: (T, D)), or with e null [h ; embed row first[i]] for row i. best (T, steps)
// gets each step's argmax row of the head's vocabulary.
void draft_head_chain(const LinearW* w, const float* norm, float eps, const float* h,
                      const float* e, const int64_t* first, int64_t t, int64_t vocab,
                      const float* embed, int64_t steps, int64_t* best, int nthreads) {
  const int64_t dim = w[0].n;
  std::vector<float> x(static_cast<size_t>(t * 2 * dim)), feat(static_cast<size_t>(t * dim));
  std::vector<int64_t> row_best(static_cast<size_t>(t));
  for (int64_t i = 0; i < t; ++i) {
    std::copy_n(h + i * dim, dim, x.data() + i * 2 * dim);
    std::copy_n(e != nullptr ? e + i * dim : embed + first[i] * dim, dim,
                x.data() + i * 2 * dim + dim);
  }
  for (int64_t s = 0; s < steps; ++s) {
    draft_head_step(w, norm, eps, x.data(), t, vocab, feat.data(), row_best.data(), nthreads);
    for (int64_t i = 0; i < t; ++i) {
      const int64_t b = row_best[static_cast<size_t>(i)];
      best[i * steps + s] = b;
      float* xi = x.data() + i * 2 * dim;
      std::copy_n(feat.data() + i * dim, dim, xi);
      std::copy_n(embed + b * dim, dim, xi + dim);
    }
  }
}

// Grammar masks, in place: logits row rows[i] (row_stride floats apart, V = vocab floats) keeps
// the tokens whose bit is set in masks row i ((n, words) int32, bit t % 32 of word t / 32:
// llguidance's layout), the others become -inf. A mask row with no bit set allows only `eos`
// (when 0 <= eos < vocab; else the whole row is -inf). masks is not modified.
void apply_token_bitmask(float* logits, int64_t row_stride, const int64_t* rows, int64_t n,
                         const int32_t* masks, int64_t words, int64_t vocab, int64_t eos) {
  for (int64_t i = 0; i < n; ++i) {
    float* x = logits + rows[i] * row_stride;
    const int32_t* m = masks + i * words;
    if (std::any_of(m, m + words, [](int32_t w) { return w != 0; })) {
      bitmask_row(x, m, vocab);
      continue;
    }
    const float kept = (eos >= 0 && eos < vocab) ? x[eos] : -INFINITY;
    std::fill(x, x + vocab, -INFINITY);
    if (eos >= 0 && eos < vocab) x[eos] = kept;
  }
}

}  // extern "C"
