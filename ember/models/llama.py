"""Llama-family decoder (RMSNorm, RoPE, GQA, SwiGLU): forward math and weight names only."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ember.attention.backend import paged_attention, qkv_attention
from ember.attention.metadata import AttentionMetadata
from ember.layers.activation import SiluAndMul
from ember.layers.linear import Linear
from ember.layers.norm import RMSNorm
from ember.layers.rope import RotaryEmbedding
from ember.models.arch import ArchConfig
from ember.models.base import CausalLM, KVCache, TensorTransform

RopeTables = tuple[torch.Tensor, torch.Tensor]


class LlamaAttention(nn.Module):
    FUSIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}
    """Projections the runtime may merge into one matmul (see ember.loading.formats)."""

    def __init__(self, cfg: ArchConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        q_size = cfg.num_heads * cfg.head_dim
        kv_size = cfg.num_kv_heads * cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, q_size, dtype=dtype)
        self.k_proj = Linear(cfg.hidden_size, kv_size, dtype=dtype)
        self.v_proj = Linear(cfg.hidden_size, kv_size, dtype=dtype)
        self.o_proj = Linear(q_size, cfg.hidden_size, dtype=dtype)
        self.qkv_proj: nn.Module | None = None
        self.split_sizes = [q_size, kv_size, kv_size]

    def forward(self, x: torch.Tensor, rope: RopeTables, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        if self.qkv_proj is not None:
            out = qkv_attention(self.qkv_proj(x), self.num_heads, self.num_kv_heads,
                                self.head_dim, rope, kv_cache, meta, self.scale)
            return self.o_proj(out)  # (T, H*D)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(t, self.num_heads, self.head_dim)  # (T, Hq, D)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        q, k = RotaryEmbedding.rotate(q, k, rope)
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))  # (T, H*D)


class LlamaMLP(nn.Module):
    FUSIONS = {"gate_up_proj": ("gate_proj", "up_proj")}

    def __init__(self, cfg: ArchConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, dtype=dtype)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, dtype=dtype)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, dtype=dtype)
        self.gate_up_proj: nn.Module | None = None
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            return self.down_proj(self.act(self.gate_up_proj(x)))  # (T, 2I) -> (T, I)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg, dtype)

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
    def __init__(self, cfg: ArchConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.max_position, cfg.rope_theta,
                                          cfg.rope_scaling)
        # NOTE: _weight skips the random init of a 28M-entry table that loading overwrites.
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size,
            _weight=torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype))
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, dtype)
                                    for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(CausalLM):
    """Llama / SmolLM2 / Mistral-style decoder with HF parameter names."""

    def __init__(self, cfg: ArchConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaBody(cfg, dtype)
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

    @staticmethod
    def map_gguf_name(name: str, cfg: ArchConfig) -> tuple[str, TensorTransform | None] | None:
        """NOTE: llama.cpp's converter permutes q/k rows so its interleaved RoPE works; we undo
        the permutation to get HF's rotate-half layout back (one RoPE style for every source).
        """
        if name in _GGUF_GLOBAL:
            return _GGUF_GLOBAL[name], None
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
        if m is None or m.group(2) not in _GGUF_LAYER:
            return None
        param = f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}.weight"
        if m.group(2) == "attn_q":
            return param, lambda w: unpermute_rope_rows(w, cfg.num_heads)
        if m.group(2) == "attn_k":
            return param, lambda w: unpermute_rope_rows(w, cfg.num_kv_heads)
        return param, None


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's `permute` on q/k rows: interleaved pairs -> rotate-half halves."""
    rows = w.shape[0]
    # (H, D/2, 2, ...) -> (H, 2, D/2, ...)
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
            .transpose(1, 2).reshape(w.shape))


_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
