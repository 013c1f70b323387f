"""Llama-family decoder (RMSNorm, RoPE, GQA, SwiGLU): forward math and weight names only.

ArchConfig flags generalise it to the families that differ from Llama only in small ways:
q/k/v biases (Qwen2), per-head q/k RMSNorm (Qwen3), sliding-window layers (Mistral, Phi-3),
partial rotary (Phi-4-mini). Layers come from the LayerFactory the ExecutionPlan built (their
format, fusion and backend decided there); a plain Llama config (`ArchConfig.kernel_compatible`)
may run Ember's attention kernels and describes its layer stack for the fused decoder kernel.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ember.attention.backend import kernel_qkv_attention, paged_attention
from ember.attention.metadata import AttentionMetadata
from ember.errors import ModelLoadError
from ember.kernels.decoder import FusedDecoder, KernelLayer, LayerStack
from ember.layers.factory import LayerFactory
from ember.layers.linear import LinearBase, kernel_linears
from ember.layers.rope import RotaryEmbedding
from ember.models.arch import ArchConfig
from ember.models.base import CausalLM, KVCache, TensorTransform, kv_scales

RopeTables = tuple[torch.Tensor, torch.Tensor]

_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LLAMA_GGUF_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
"""llama.cpp per-layer tensor names of llama-family models -> HF module paths."""


class LlamaAttention(nn.Module):
    q_proj: LinearBase
    k_proj: LinearBase
    v_proj: LinearBase
    qkv_proj: LinearBase
    """One (Hq + 2 Hkv) * D-row projection, rows q, k, v (when fused)."""

    def __init__(self, cfg: ArchConfig, ops: LayerFactory, layer: int = 0) -> None:
        """layer: this layer's index (its sliding window comes from `cfg.layer_window`)."""
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.attn_scale
        self.window = cfg.layer_window(layer)
        q_size = cfg.num_heads * cfg.head_dim
        kv_size = cfg.num_kv_heads * cfg.head_dim
        self.split_sizes = [q_size, kv_size, kv_size]
        self.fused = self.build_projections(cfg, ops)
        self.o_proj = ops.linear(q_size, cfg.hidden_size)
        self.q_norm = ops.rms_norm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = ops.rms_norm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.attention_kernels = ops.attention_kernels
        """Ember's paged attention kernels (the plan's attention backend), or None: PyTorch."""

    def build_projections(self, cfg: ArchConfig, ops: LayerFactory) -> bool:
        """q/k/v as one fused projection when the plan fuses them, else HF Llama's three;
        returns whether they are fused."""
        bias, hidden = cfg.attention_bias, cfg.hidden_size
        if ops.fuses("qkv"):
            self.qkv_proj = ops.linear(hidden, self.split_sizes, bias)
            return True
        self.q_proj = ops.linear(hidden, self.split_sizes[0], bias)
        self.k_proj = ops.linear(hidden, self.split_sizes[1], bias)
        self.v_proj = ops.linear(hidden, self.split_sizes[2], bias)
        return False

    def forward(self, x: torch.Tensor, rope: RopeTables, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        if self.fused:
            qkv = self.qkv_proj(x)  # (T, (Hq + 2 Hkv) * D)
            if self.attention_kernels is not None:
                out = kernel_qkv_attention(self.attention_kernels, qkv, self.num_heads,
                                           self.num_kv_heads, self.head_dim, rope, kv_cache,
                                           meta, self.scale, self.window)
                return self.o_proj(out)  # (T, hidden)
            q, k, v = qkv.split(self.split_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(t, self.num_heads, self.head_dim)  # (T, Hq, D)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # per head, before RoPE (Qwen3)
        q, k = RotaryEmbedding.rotate(q, k, rope)
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale,
                              self.window)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))  # (T, Hq*D)


class LlamaMLP(nn.Module):
    gate_proj: LinearBase
    up_proj: LinearBase
    gate_up_proj: LinearBase
    """One 2I-row projection, rows gate then up (when fused)."""

    def __init__(self, cfg: ArchConfig, ops: LayerFactory) -> None:
        super().__init__()
        self.fused = self.build_projections(cfg, ops)
        self.down_proj = ops.linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ops.silu_and_mul()

    def build_projections(self, cfg: ArchConfig, ops: LayerFactory) -> bool:
        """gate/up as one fused projection when the plan fuses them, else HF Llama's two;
        returns whether they are fused."""
        hidden, inter = cfg.hidden_size, cfg.intermediate_size
        if ops.fuses("gate_up"):
            self.gate_up_proj = ops.linear(hidden, [inter, inter])
            return True
        self.gate_proj = ops.linear(hidden, inter)
        self.up_proj = ops.linear(hidden, inter)
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.down_proj(self.act(self.gate_up_proj(x)))  # (T, 2I) -> (T, I)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, ops: LayerFactory, layer: int = 0,
                 attention_cls: type[LlamaAttention] = LlamaAttention,
                 mlp_cls: type[LlamaMLP] = LlamaMLP) -> None:
        super().__init__()
        self.input_layernorm = ops.rms_norm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = attention_cls(cfg, ops, layer)
        self.post_attention_layernorm = ops.rms_norm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp_cls(cfg, ops)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rope: RopeTables,
                kv_cache: KVCache, meta: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's output, residual stream before it); the next norm adds the two."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, rope, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaBody(nn.Module):
    def __init__(self, cfg: ArchConfig, ops: LayerFactory, embed_tokens: nn.Module,
                 attention_cls: type[LlamaAttention] = LlamaAttention,
                 mlp_cls: type[LlamaMLP] = LlamaMLP) -> None:
        super().__init__()
        try:
            self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.max_position, cfg.rope_theta,
                                              cfg.rope_scaling, rotary_dim=cfg.rotary_dim)
        except ValueError as exc:  # an unsupported rope_scaling type
            raise ModelLoadError(f"{cfg.name or cfg.architecture}: {exc}") from None
        self.embed_tokens = embed_tokens
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, ops, i, attention_cls, mlp_cls)
                                    for i in range(cfg.num_layers))
        self.norm = ops.rms_norm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(CausalLM):
    """Llama / SmolLM2 / Mistral-style decoder with HF parameter names.

    Subclasses for related families set the class attributes below (their layer modules and
    llama.cpp's tensor names); the forward math is shared.
    """

    attention_cls: ClassVar[type[LlamaAttention]] = LlamaAttention
    mlp_cls: ClassVar[type[LlamaMLP]] = LlamaMLP
    gguf_layer_names: ClassVar[Mapping[str, str]] = LLAMA_GGUF_LAYER
    """llama.cpp per-layer tensor name -> HF module path inside `model.layers.<i>`."""
    gguf_permuted_qk: ClassVar[bool] = True
    """llama.cpp permutes q/k rows for its interleaved RoPE (llama, mistral); NeoX-RoPE
    architectures (qwen2, qwen3, phi3) keep HF's row order."""

    packed_modules: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    kernel_decoder: ClassVar[bool] = True
    """The fused decoder kernel implements this class's layers (checked against the module
    path by the tests); subclasses not checked against it set False."""

    def __init__(self, cfg: ArchConfig, layers: LayerFactory | torch.dtype | None = None
                 ) -> None:
        """layers: builds every layer in the ExecutionPlan's runtime form (default: the dense
        float32 unfused reference; a dtype: the reference in that dtype)."""
        super().__init__()
        ops = LayerFactory.of(layers)
        self.config = cfg
        embed, head = ops.embedding_and_head(cfg.vocab_size, cfg.hidden_size,
                                             cfg.tie_word_embeddings)
        self.model = LlamaBody(cfg, ops, embed, self.attention_cls, self.mlp_cls)
        # NOTE: with tied embeddings the head shares the embedding's weights (one table).
        self.lm_head = head

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta: AttentionMetadata) -> torch.Tensor:
        h = self.model.embed_tokens(input_ids)  # (T, hidden)
        rope = self.model.rotary_emb.cos_sin(positions)
        residual: torch.Tensor | None = None
        for i, (layer, kv_cache) in enumerate(zip(self.model.layers, kv_caches)):
            h, residual = layer(h, residual, rope, kv_cache, meta.for_layer(i))
        return self.model.norm(h, residual)[0]

    # ---- the fused decoder kernel -------------------------------------------------------

    @classmethod
    def supports_kernel_attention(cls, cfg: ArchConfig) -> bool:
        return cfg.kernel_compatible

    @classmethod
    def supports_kernel_decoder(cls, cfg: ArchConfig) -> bool:
        return cls.kernel_decoder and cfg.kernel_compatible

    def kernel_layer_stack(self, kv_caches: list[KVCache], block_size: int
                           ) -> LayerStack | None:
        """The decoder layers as the fused kernel reads them; None unless every projection
        is fused and in a kernel format."""
        cfg = self.config
        layers = []
        body: LlamaBody = self.model
        for i, (layer, kv) in enumerate(zip(body.layers, kv_caches)):
            assert isinstance(layer, LlamaDecoderLayer)
            attn, mlp = layer.self_attn, layer.mlp
            if not (attn.fused and mlp.fused):
                return None
            projs = kernel_linears(attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if projs is None:
                return None
            norms = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
            layers.append(KernelLayer(*norms, *projs, kv[0], kv[1], *kv_scales(kv),
                                      cfg.layer_window(i)))
        return LayerStack(tuple(layers), cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                          cfg.num_kv_heads, cfg.head_dim, block_size, cfg.rms_norm_eps,
                          cfg.head_dim ** -0.5)

    def forward_fused(self, input_ids: torch.Tensor, positions: torch.Tensor,
                      meta: AttentionMetadata, decoder: FusedDecoder) -> torch.Tensor:
        """`forward` with every decoder layer in one kernel call (`kernel_layer_stack`)."""
        assert meta.row_block_tables is not None and meta.row_lens is not None
        body = self.model
        x = body.embed_tokens(input_ids).float().contiguous()  # (T, hidden)
        cos, sin = body.rotary_emb.cos_sin(positions)  # (T, 1, D/2) each
        decoder(x, cos, sin, *meta.kernel_tables(), meta.row_lens)
        return body.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    # ---- weight names -------------------------------------------------------------------

    @staticmethod
    def expected_unused(cfg: ArchConfig) -> set[str]:
        unused = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(cfg.num_layers)}
        if cfg.tie_word_embeddings:
            unused.add("lm_head.weight")
        return unused

    @classmethod
    def map_gguf_name(cls, name: str, cfg: ArchConfig) -> tuple[str, TensorTransform | None] | None:
        """NOTE: llama.cpp's converter permutes q/k rows (and biases) of llama-style models so
        its interleaved RoPE works; we undo the permutation to get HF's rotate-half layout back
        (one RoPE style for every source).
        """
        if name in _GGUF_GLOBAL:
            return _GGUF_GLOBAL[name], None
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
        if m is None or m.group(2) not in cls.gguf_layer_names:
            return None
        param = f"model.layers.{m.group(1)}.{cls.gguf_layer_names[m.group(2)]}.{m.group(3)}"
        if cls.gguf_permuted_qk and m.group(2) in ("attn_q", "attn_k"):
            heads = cfg.num_heads if m.group(2) == "attn_q" else cfg.num_kv_heads
            return param, lambda w: unpermute_rope_rows(w, heads)
        return param, None

    @staticmethod
    def gguf_arch(cfg: ArchConfig, meta: dict[str, object],
                  tensor_names: set[str]) -> ArchConfig:
        """Biases and q/k norms are implied by the tensors llama.cpp stores."""
        return dataclasses.replace(
            cfg, attention_bias=cfg.attention_bias or "blk.0.attn_q.bias" in tensor_names,
            qk_norm=cfg.qk_norm or "blk.0.attn_q_norm.weight" in tensor_names)


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's `permute` on q/k rows: interleaved pairs -> rotate-half halves."""
    rows = w.shape[0]
    # (H, D/2, 2, ...) -> (H, 2, D/2, ...)
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
            .transpose(1, 2).reshape(w.shape))
