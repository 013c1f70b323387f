// Whole decode steps of a pre-norm decoder in one call: for B query rows, every layer's
// RMSNorm -> fused QKV -> [per-head q/k RMSNorm] -> RoPE + cache write -> paged attention -> O
// -> [RMSNorm] -> add + RMSNorm -> fused gate/up -> SiLU or tanh-GELU * up -> down -> [RMSNorm]
// -> add, in one OpenMP region (a barrier between stages) instead of a Python call per
// operation. The bracketed steps are optional per layer (null norms: off): Llama-style layers
// leave them off, Gemma 3 layers use them (with a RoPE table per layer: local and global
// bases). The math is the one of the models' module paths, which stay the reference; tests
// compare the two.

#include <tuple>

#include "kernels.h"

namespace {

struct LayerW {
  const float* in_norm;    // (H,)
  const float* post_norm;  // (H,)
  LinearW qkv, o, gate_up, down;
  void* k_cache;  // (S, Hk, D) bfloat16, or int8 with kv_dtype 1
  void* v_cache;
  float* k_scale;  // (S, Hk) float32 scales of int8 caches (else null)
  float* v_scale;
  int64_t kv_dtype;  // 0 bfloat16, 1 int8
  int64_t window;    // sliding window (keys a query sees, itself included); 0 = full
  // Optional (null: off; Llama leaves all off):
  const float* q_norm;          // (D,) RMSNorm of every query head before RoPE
  const float* k_norm;          // (D,) RMSNorm of every key head before RoPE
  const float* post_attn_norm;  // (H,) RMSNorm of the attention output before the residual add
  const float* post_ffn_norm;   // (H,) RMSNorm of the MLP output before the residual add
  int64_t rope_table;           // which of the step's cos/sin tables this layer rotates with
  int64_t kv_group;             // KV cache group: this layer's row of the step's slots / tables
};

// Activations of the gated MLP (Shape::activation).
constexpr int64_t kActSilu = 0, kActGeluTanh = 1;

struct Shape {
  int64_t hidden, inter, hq, hk, dim, block_size;
  float eps, scale;
  int64_t activation;  // kActSilu (Llama) or kActGeluTanh (Gemma's GeGLU)
};

// Bump together with ABI_VERSION in ember/kernels/abi.py on any change of these structs.
constexpr int64_t kAbiVersion = 4;

// out = gelu_tanh(g) * u, with gelu_tanh(x) = 0.5 x (1 + tanh(c (x + 0.044715 x^3)))
// = x * sigmoid(2 c (x + 0.044715 x^3)), c = sqrt(2 / pi). ISA-independent: built on
// exp_shifted (each ISA header's vector exp); the other loops auto-vectorise.
inline void gelu_tanh_mul_row(const float* g, const float* u, int64_t n, float* out) {
  for (int64_t j = 0; j < n; ++j)
    out[j] = -1.5957691216057308f * (g[j] + 0.044715f * g[j] * g[j] * g[j]);
  exp_shifted(out, n, 0.0f);  // out[j] = exp(out[j]), clamped: large |x| stays finite
  for (int64_t j = 0; j < n; ++j) out[j] = g[j] * u[j] / (1.0f + out[j]);
}

// x row += proj row, the proj row first RMSNormed in place by `norm` when given.
inline void add_output(float* x, float* proj, const float* norm, int64_t h, float eps) {
  if (norm != nullptr) rms_norm_row(proj, nullptr, norm, h, eps, proj);
  for (int64_t j = 0; j < h; ++j) x[j] += proj[j];
}


// A decode step's attention, shared by decode_layers and decode_layers_few: one DecodeCtx per
// KV cache group and, on the tiled kernels, one attention plan per distinct (KV cache group,
// window, cache dtype), shared by the layers with all three (lens are the step's, block
// tables the group's; the dtype decides whether prefill tiles run packed).
struct StepAttention {
  std::vector<DecodeCtx> ctxs;
  int64_t max_len;
  bool tiled;
  std::vector<std::pair<std::tuple<int64_t, int64_t, int64_t>, AttnPlan>> plans;
  std::vector<size_t> plan_of;

  StepAttention(const Shape& s, int64_t batch, const LayerW* layers, int64_t num_layers,
                const int64_t* block_tables, int64_t max_blocks, int64_t num_groups,
                const int64_t* lens, int nthreads)
      : max_len(*std::max_element(lens, lens + batch)),
        tiled(tiled_attention_supports(s.dim)),
        plan_of(static_cast<size_t>(num_layers)) {
    for (int64_t g = 0; g < num_groups; ++g)
      ctxs.push_back({block_tables + g * batch * max_blocks, max_blocks, lens, s.hq, s.hk,
                      s.dim, s.block_size, s.scale});
    for (int64_t l = 0; tiled && l < num_layers; ++l) {
      const LayerW& L = layers[l];
      const std::tuple<int64_t, int64_t, int64_t> key{L.kv_group, L.window, L.kv_dtype};
      size_t i = 0;
      while (i < plans.size() && plans[i].first != key) ++i;
      if (i == plans.size())
        plans.push_back({key, make_attn_plan(ctxs[static_cast<size_t>(L.kv_group)], batch,
                                             L.window, L.kv_dtype, nthreads)});
      plan_of[static_cast<size_t>(l)] = i;
    }
  }

  // Per thread: the untiled kernel's score rows, the tiled kernel's scratch.
  std::vector<float> scores_buffer(const Shape& s) const {
    return std::vector<float>(static_cast<size_t>(tiled ? 0 : max_len * (s.hq / s.hk)));
  }
  AttnScratch scratch(const Shape& s) const { return AttnScratch(tiled ? s.hq / s.hk : 0, s.dim); }

  // Layer l's attention of every row (inside the step's parallel region: every thread calls).
  void run(int64_t l, const LayerW& L, const Shape& s, int64_t batch, const float* qkv,
           int64_t qkv_np, AttnScratch& sc, float* scores, float* attn) {
    const DecodeCtx& ctx = ctxs[static_cast<size_t>(L.kv_group)];
    const int64_t hq = s.hq, dim = s.dim;
    if (tiled) {
      const KvCache kv{L.k_cache, L.v_cache, L.k_scale, L.v_scale, L.kv_dtype};
      AttnPlan& plan = plans[plan_of[static_cast<size_t>(l)]].second;
      attend_planned(ctx, plan, L.window, qkv, qkv_np, kv, sc, attn, hq * dim);
    } else {
#pragma omp for schedule(dynamic) collapse(2)
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t g = 0; g < s.hk; ++g)
          attend_kv_group(ctx, b, g, qkv + b * qkv_np, static_cast<const kv_t*>(L.k_cache),
                          static_cast<const kv_t*>(L.v_cache), scores, attn + b * hq * dim);
    }
  }
};
}  // namespace

extern "C" {

// The interface version (what = 0) and the sizes of the structs Python mirrors (1: LinearW,
// 2: LayerW, 3: Shape); -1 otherwise. Constants only: callable on any x86-64 CPU.
int64_t ember_abi(int what) {
  switch (what) {
    case 0: return kAbiVersion;
    case 1: return static_cast<int64_t>(sizeof(LinearW));
    case 2: return static_cast<int64_t>(sizeof(LayerW));
    case 3: return static_cast<int64_t>(sizeof(Shape));
    default: return -1;
  }
}

// x (B, H): token embeddings in; the residual stream after the last layer out (not normed).
// cos/sin (R, B, D/2): R tables (layer l uses table layers[l].rope_table); slots (G, B) and
// block_tables (G, B, max_blocks): one per KV cache group (layer l uses row
// layers[l].kv_group); lens (B,).
void decode_layers(float* x, int64_t batch, const LayerW* layers, int64_t num_layers,
                   const Shape* shape, const float* cos_t, const float* sin_t,
                   const int64_t* slots, const int64_t* block_tables, int64_t max_blocks,
                   int64_t num_groups, const int64_t* lens, int nthreads) {
  if (num_layers == 0) return;
  const Shape& s = *shape;
  const int64_t h = s.hidden, dim = s.dim, hq = s.hq;
  const int64_t qkv_np = padded((hq + 2 * s.hk) * dim), o_np = padded(h);
  const int64_t gu_np = padded(2 * s.inter), down_np = padded(h);
  std::vector<float> normed(static_cast<size_t>(batch * h));
  std::vector<float> qkv(static_cast<size_t>(batch * qkv_np));
  std::vector<float> attn(static_cast<size_t>(batch * hq * dim));
  std::vector<float> proj(static_cast<size_t>(batch * std::max(o_np, down_np)));
  std::vector<float> gu(static_cast<size_t>(batch * gu_np));
  std::vector<float> act(static_cast<size_t>(batch * s.inter));
  // Quantized inputs of the projections, one buffer per input width.
  QuantizedActs qa_h(batch, h), qa_attn(batch, hq * dim), qa_act(batch, s.inter);
  StepAttention step_attn(s, batch, layers, num_layers, block_tables, max_blocks, num_groups,
                           lens, nthreads);
  // NOTE: every stage is a worksharing loop (rows, tiles or heads) ending in the implicit
  // barrier the next stage needs; one parallel region for the whole step.
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> scores = step_attn.scores_buffer(s);
    AttnScratch sc = step_attn.scratch(s);
    for (int64_t l = 0; l < num_layers; ++l) {
      const LayerW& L = layers[l];
      const int64_t* lslots = slots + L.kv_group * batch;
#pragma omp for schedule(static)
      for (int64_t b = 0; b < batch; ++b) {
        if (l > 0)  // the previous layer's MLP output joins the residual stream
          add_output(x + b * h, proj.data() + b * down_np, layers[l - 1].post_ffn_norm, h, s.eps);
        rms_norm_row(x + b * h, nullptr, L.in_norm, h, s.eps, normed.data() + b * h);
        qa_h.quantize_row(normed.data() + b * h, b);
      }
      gemm_tiles(L.qkv, qa_h, batch, qkv.data());
#pragma omp for schedule(static)
      for (int64_t b = 0; b < batch; ++b) {
        float* row = qkv.data() + b * qkv_np;
        if (L.q_norm != nullptr)
          for (int64_t i = 0; i < hq; ++i)
            rms_norm_row(row + i * dim, nullptr, L.q_norm, dim, s.eps, row + i * dim);
        if (L.k_norm != nullptr)
          for (int64_t i = hq; i < hq + s.hk; ++i)
            rms_norm_row(row + i * dim, nullptr, L.k_norm, dim, s.eps, row + i * dim);
        const int64_t rope_off = (L.rope_table * batch + b) * dim / 2;
        if (L.kv_dtype == 1) {
          rope_store_row(row, cos_t + rope_off, sin_t + rope_off, hq, s.hk, dim, nullptr,
                         nullptr, 0);
          store_kv_i8(row, hq, s.hk, dim, static_cast<int8_t*>(L.k_cache),
                      static_cast<int8_t*>(L.v_cache), L.k_scale, L.v_scale, lslots[b]);
        } else {
          rope_store_row(row, cos_t + rope_off, sin_t + rope_off, hq, s.hk, dim,
                         static_cast<kv_t*>(L.k_cache), static_cast<kv_t*>(L.v_cache), lslots[b]);
        }
      }
      step_attn.run(l, L, s, batch, qkv.data(), qkv_np, sc, scores.data(), attn.data());
#pragma omp for schedule(static)
      for (int64_t b = 0; b < batch; ++b) qa_attn.quantize_row(attn.data() + b * hq * dim, b);
      gemm_tiles(L.o, qa_attn, batch, proj.data());
#pragma omp for schedule(static)
      for (int64_t b = 0; b < batch; ++b) {
        if (L.post_attn_norm != nullptr)
          rms_norm_row(proj.data() + b * o_np, nullptr, L.post_attn_norm, h, s.eps,
                       proj.data() + b * o_np);
        rms_norm_row(x + b * h, proj.data() + b * o_np, L.post_norm, h, s.eps,
                     normed.data() + b * h);
        qa_h.quantize_row(normed.data() + b * h, b);
      }
      gemm_tiles(L.gate_up, qa_h, batch, gu.data());
#pragma omp for schedule(static)
      for (int64_t b = 0; b < batch; ++b) {
        if (s.activation == kActGeluTanh)
          gelu_tanh_mul_row(gu.data() + b * gu_np, gu.data() + b * gu_np + s.inter, s.inter,
                            act.data() + b * s.inter);
        else
          silu_mul_row(gu.data() + b * gu_np, gu.data() + b * gu_np + s.inter, s.inter,
                       act.data() + b * s.inter);
        qa_act.quantize_row(act.data() + b * s.inter, b);
      }
      gemm_tiles(L.down, qa_act, batch, proj.data());
    }
#pragma omp for schedule(static)
    for (int64_t b = 0; b < batch; ++b)
      add_output(x + b * h, proj.data() + b * down_np, layers[num_layers - 1].post_ffn_norm, h,
                 s.eps);
  }
}

}  // extern "C"

#include "decode_few.h"  // decode_layers_few: the same steps for a few rows, fewer barriers
