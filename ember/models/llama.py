"""Llama-family decoder (RMSNorm, RoPE, GQA, SwiGLU): forward math and weight names only.

ArchConfig flags generalise it to the families that differ from Llama only in small ways:
q/k/v biases (Qwen2), per-head q/k RMSNorm (Qwen3), sliding-window layers (Mistral, Phi-3),
partial rotary (Phi-4-mini). Those run the PyTorch attention; a plain Llama config
(`ArchConfig.kernel_compatible`) may also run Ember's attention kernels.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ember.attention.backend import paged_attention, qkv_attention
from ember.attention.metadata import AttentionMetadata
from ember.layers.activation import SiluAndMul
from ember.layers.linear import Linear
from ember.layers.norm import RMSNorm
from ember.layers.rope import RotaryEmbedding
from ember.loading.errors import ModelLoadError
from ember.models.arch import ArchConfig
from ember.models.base import CausalLM, KVCache, TensorTransform

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
    FUSIONS: ClassVar[dict[str, tuple[str, ...]]] = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}
    """Projections the runtime may merge into one matmul (see ember.loading.formats)."""

    def __init__(self, cfg: ArchConfig, dtype: torch.dtype, layer: int = 0) -> None:
        """layer: this layer's index (its sliding window comes from `cfg.layer_window`)."""
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.attn_scale
        self.window = cfg.layer_window(layer)
        self.plain = cfg.kernel_compatible
        """Plain Llama attention: the fused q/k/v path may hand it to the kernels."""
        q_size = cfg.num_heads * cfg.head_dim
        kv_size = cfg.num_kv_heads * cfg.head_dim
        self.split_sizes = [q_size, kv_size, kv_size]
        self.qkv_proj: nn.Module | None = None
        self.build_projections(cfg, dtype)
        self.o_proj = Linear(q_size, cfg.hidden_size, dtype=dtype)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def build_projections(self, cfg: ArchConfig, dtype: torch.dtype) -> None:
        """Separate q/k/v projections (HF Llama names); the runtime may fuse them."""
        bias = cfg.attention_bias
        self.q_proj = Linear(cfg.hidden_size, self.split_sizes[0], bias=bias, dtype=dtype)
        self.k_proj = Linear(cfg.hidden_size, self.split_sizes[1], bias=bias, dtype=dtype)
        self.v_proj = Linear(cfg.hidden_size, self.split_sizes[2], bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor, rope: RopeTables, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            qkv = self.qkv_proj(x)  # (T, (Hq + 2 Hkv) * D)
            if self.plain:
                out = qkv_attention(qkv, self.num_heads, self.num_kv_heads, self.head_dim,
                                    rope, kv_cache, meta, self.scale)
                return self.o_proj(out)  # (T, hidden)
            q, k, v = qkv.split(self.split_sizes, dim=-1)
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
    FUSIONS: ClassVar[dict[str, tuple[str, ...]]] = {"gate_up_proj": ("gate_proj", "up_proj")}

    def __init__(self, cfg: ArchConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_up_proj: nn.Module | None = None
        self.build_projections(cfg, dtype)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, dtype=dtype)
        self.act = SiluAndMul()

    def build_projections(self, cfg: ArchConfig, dtype: torch.dtype) -> None:
        """Separate gate/up projections (HF Llama names); the runtime may fuse them."""
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, dtype=dtype)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            return self.down_proj(self.act(self.gate_up_proj(x)))  # (T, 2I) -> (T, I)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, dtype: torch.dtype, layer: int = 0,
                 attention_cls: type[LlamaAttention] = LlamaAttention,
                 mlp_cls: type[LlamaMLP] = LlamaMLP) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = attention_cls(cfg, dtype, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp_cls(cfg, dtype)

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
    def __init__(self, cfg: ArchConfig, dtype: torch.dtype,
                 attention_cls: type[LlamaAttention] = LlamaAttention,
                 mlp_cls: type[LlamaMLP] = LlamaMLP) -> None:
        super().__init__()
        try:
            self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.max_position, cfg.rope_theta,
                                              cfg.rope_scaling, rotary_dim=cfg.rotary_dim)
        except ValueError as exc:  # an unsupported rope_scaling type
            raise ModelLoadError(f"{cfg.name or cfg.architecture}: {exc}") from None
        # NOTE: _weight skips the random init of a 28M-entry table that loading overwrites.
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size,
            _weight=torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype))
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, dtype, i, attention_cls, mlp_cls)
                                    for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


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

    def __init__(self, cfg: ArchConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaBody(cfg, dtype, self.attention_cls, self.mlp_cls)
        # NOTE: with tied embeddings the head shares the embedding matrix (one tensor in memory).
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # type: ignore[assignment]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta: AttentionMetadata) -> torch.Tensor:
        h = self.model.embed_tokens(input_ids)  # (T, hidden)
        rope = self.model.rotary_emb.cos_sin(positions)
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            h, residual = layer(h, residual, rope, kv_cache, meta)
        return self.model.norm(h, residual)[0]

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
