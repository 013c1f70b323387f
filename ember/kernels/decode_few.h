// decode_layers for a few query rows (one client decoding: batch 1): the same math as
// decoder.cpp's decode_layers, bit for bit, with fewer barriers and no thread idling while
// another normalises a row.
//
// decode_layers runs each row stage (residual add + RMSNorm + activation quantization, the
// attention output's quantization, GeGLU / SwiGLU + quantization) as a worksharing loop over
// rows: with one row one thread works and the others wait, and every stage ends in a barrier
// (10 per layer). Here every thread runs the row stages itself, on its own copy of the residual
// stream and its own quantized activations (a few KB: a 640-wide row is normalised in about a
// microsecond), so the only barriers left are the ones the data needs: after each projection
// (its output tiles come from every thread), after RoPE / the KV cache write and after
// attention (6 per layer). RoPE and the q / k norms are spread over (row, head) items instead
// of rows. Every thread computes the same values with the same code in the same order, so the
// copies stay identical and the output equals decode_layers' bit for bit (tests/unit/
// test_decode_few.py). Meant for batch <= kFewDecodeRows (ember/kernels/decoder.py picks it);
// correct for any batch.
#pragma once

namespace {

// Per (row, item) of the RoPE stage: items 0..hq-1 rotate one query head (after its q norm);
// item hq normalises and rotates every key head and writes the row's K / V to the cache.
inline void rope_item(const LayerW& L, const Shape& s, float* row, const float* cos_r,
                      const float* sin_r, int64_t item, int64_t slot) {
  const int64_t dim = s.dim, hq = s.hq, hk = s.hk;
  if (item < hq) {
    float* head = row + item * dim;
    if (L.q_norm != nullptr) rms_norm_row(head, nullptr, L.q_norm, dim, s.eps, head);
    rope_store_row(head, cos_r, sin_r, 1, 0, dim, nullptr, nullptr, 0);
    return;
  }
  if (L.k_norm != nullptr)
    for (int64_t i = hq; i < hq + hk; ++i)
      rms_norm_row(row + i * dim, nullptr, L.k_norm, dim, s.eps, row + i * dim);
  // the key heads start at row + hq * dim, the value heads hk * dim after them
  if (L.kv_dtype == 1) {
    rope_store_row(row + hq * dim, cos_r, sin_r, 0, hk, dim, nullptr, nullptr, 0);
    store_kv_i8(row, hq, hk, dim, static_cast<int8_t*>(L.k_cache),
                static_cast<int8_t*>(L.v_cache), L.k_scale, L.v_scale, slot);
  } else {
    rope_store_row(row + hq * dim, cos_r, sin_r, 0, hk, dim, static_cast<kv_t*>(L.k_cache),
                   static_cast<kv_t*>(L.v_cache), slot);
  }
}

}  // namespace

extern "C" {

// Arguments and result: decode_layers' (decoder.cpp).
void decode_layers_few(float* x, int64_t batch, const LayerW* layers, int64_t num_layers,
                       const Shape* shape, const float* cos_t, const float* sin_t,
                       const int64_t* slots, const int64_t* block_tables, int64_t max_blocks,
                       int64_t num_groups, const int64_t* lens, int nthreads) {
  if (num_layers == 0) return;
  const Shape& s = *shape;
  const int64_t h = s.hidden, dim = s.dim, hq = s.hq, inter = s.inter;
  const int64_t qkv_np = padded((hq + 2 * s.hk) * dim), o_np = padded(h);
  const int64_t gu_np = padded(2 * inter), down_np = padded(h);
  // Shared: the projections' outputs (each thread writes its tiles) and attention's.
  std::vector<float> qkv(static_cast<size_t>(batch * qkv_np));
  std::vector<float> attn(static_cast<size_t>(batch * hq * dim));
  std::vector<float> o_out(static_cast<size_t>(batch * o_np));
  std::vector<float> gu(static_cast<size_t>(batch * gu_np));
  std::vector<float> down_out(static_cast<size_t>(batch * down_np));
  StepAttention step_attn(s, batch, layers, num_layers, block_tables, max_blocks, num_groups,
                           lens, nthreads);
  const int64_t rope_items = batch * (hq + 1);
#pragma omp parallel num_threads(nthreads)
  {
    // Private: this thread's copy of the residual stream and of every projection's input.
    std::vector<float> xp(x, x + batch * h), normed(static_cast<size_t>(batch * h));
    std::vector<float> tmp(static_cast<size_t>(h)), act(static_cast<size_t>(inter));
    QuantizedActs qa_h(batch, h), qa_attn(batch, hq * dim), qa_act(batch, inter);
    std::vector<float> scores = step_attn.scores_buffer(s);
    AttnScratch sc = step_attn.scratch(s);
    // xp row += proj row, RMSNormed first (into tmp: proj is shared) when norm is given.
    auto add_out = [&](float* xr, const float* proj, const float* norm) {
      const float* add = proj;
      if (norm != nullptr) {
        rms_norm_row(const_cast<float*>(proj), nullptr, norm, h, s.eps, tmp.data());
        add = tmp.data();
      }
      for (int64_t j = 0; j < h; ++j) xr[j] += add[j];
    };
    for (int64_t l = 0; l < num_layers; ++l) {
      const LayerW& L = layers[l];
      const int64_t* lslots = slots + L.kv_group * batch;
      for (int64_t b = 0; b < batch; ++b) {
        if (l > 0)  // the previous layer's MLP output joins the residual stream
          add_out(xp.data() + b * h, down_out.data() + b * down_np, layers[l - 1].post_ffn_norm);
        rms_norm_row(xp.data() + b * h, nullptr, L.in_norm, h, s.eps, normed.data() + b * h);
        qa_h.quantize_row(normed.data() + b * h, b);
      }
      gemm_tiles(L.qkv, qa_h, batch, qkv.data());
#pragma omp for schedule(static)
      for (int64_t i = 0; i < rope_items; ++i) {
        const int64_t b = i / (hq + 1);
        const int64_t rope_off = (L.rope_table * batch + b) * dim / 2;
        rope_item(L, s, qkv.data() + b * qkv_np, cos_t + rope_off, sin_t + rope_off,
                  i % (hq + 1), lslots[b]);
      }
      step_attn.run(l, L, s, batch, qkv.data(), qkv_np, sc, scores.data(), attn.data());
      for (int64_t b = 0; b < batch; ++b) qa_attn.quantize_row(attn.data() + b * hq * dim, b);
      gemm_tiles(L.o, qa_attn, batch, o_out.data());
      for (int64_t b = 0; b < batch; ++b) {
        const float* o_row = o_out.data() + b * o_np;
        if (L.post_attn_norm != nullptr) {
          rms_norm_row(const_cast<float*>(o_row), nullptr, L.post_attn_norm, h, s.eps,
                       tmp.data());
          o_row = tmp.data();
        }
        rms_norm_row(xp.data() + b * h, o_row, L.post_norm, h, s.eps, normed.data() + b * h);
        qa_h.quantize_row(normed.data() + b * h, b);
      }
      gemm_tiles(L.gate_up, qa_h, batch, gu.data());
      for (int64_t b = 0; b < batch; ++b) {
        const float* g = gu.data() + b * gu_np;
        if (s.activation == kActGeluTanh)
          gelu_tanh_mul_row(g, g + inter, inter, act.data());
        else
          silu_mul_row(g, g + inter, inter, act.data());
        qa_act.quantize_row(act.data(), b);
      }
      gemm_tiles(L.down, qa_act, batch, down_out.data());
    }
    for (int64_t b = 0; b < batch; ++b)
      add_out(xp.data() + b * h, down_out.data() + b * down_np,
              layers[num_layers - 1].post_ffn_norm);
#pragma omp master
    std::copy(xp.begin(), xp.end(), x);
  }
}

}  // extern "C"
