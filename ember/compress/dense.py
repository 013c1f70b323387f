"""A plain batched, full-causal forward of a Llama-family Ember model (no KV cache).

Calibration, training and teacher-forced evaluation need (B, T) batches with gradients or
per-layer hooks, which the paged engine forward does not offer. This forward reuses the model's
own modules (embedding, RMSNorm, Linear, RoPE, MLP), so only the attention call differs: SDPA
with a causal mask instead of the paged backend. Perplexity is always computed by the engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


Rope = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""rope(q, k) -> rotated (q, k), for q (B, T, Hq, D) and k (B, T, Hkv, D)."""
Model = Any
"""A Llama-family CausalLM: `.model.{embed_tokens, layers, norm, rotary_emb}` and `.lm_head`.
NOTE: duck-typed (Any) because the compression tools read and replace its submodules."""
Layer = Any
"""A decoder layer: `.input_layernorm`, `.self_attn.{q,k,v,o}_proj`, `.post_attention_layernorm`,
`.mlp.{gate,up,down}_proj`."""


def positions_for(seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """(T,) int64 positions 0..T-1."""
    return torch.arange(seq_len, dtype=torch.int64, device=device)


def make_rope(model: Model, positions: torch.Tensor) -> Rope:
    """RoPE for positions (T,) using the model's own rotary module and tables.

    NOTE: the model's tables are (T, 1, D/2) and broadcast over a leading batch dimension.
    """
    rotary = model.model.rotary_emb
    tables = rotary.cos_sin(positions)
    return lambda q, k: type(rotary).rotate(q, k, tables)


def attention_forward(attn: Any, x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Causal self-attention of a LlamaAttention module on x: (B, T, hidden) -> (B, T, hidden)."""
    b, t, _ = x.shape
    hq, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(b, t, hq, d)  # (B, T, Hq, D)
    k = attn.k_proj(x).view(b, t, hkv, d)  # (B, T, Hkv, D)
    v = attn.v_proj(x).view(b, t, hkv, d)  # (B, T, Hkv, D)
    q, k = rope(q, k)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, H, T, D)
        is_causal=True, scale=attn.scale, enable_gqa=True)  # (B, Hq, T, D)
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, hq * d))  # (B, T, Hq*D)


def block_forward(layer: Layer, h: torch.Tensor, rope: Rope) -> torch.Tensor:
    """One decoder layer: (B, T, hidden) -> (B, T, hidden)."""
    h = h + attention_forward(layer.self_attn, layer.input_layernorm(h), rope)
    return h + layer.mlp(layer.post_attention_layernorm(h))


def embed(model: Model, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) ids -> (B, T, hidden) embeddings."""
    return model.model.embed_tokens(input_ids)


def hidden_states(model: Model, input_ids: torch.Tensor,
                  layer_outputs: list[torch.Tensor] | None = None) -> torch.Tensor:
    """(B, T) ids -> (B, T, hidden) final (normed) hidden states; every layer's output
    (B, T, hidden) is appended to `layer_outputs` when given."""
    rope = make_rope(model, positions_for(input_ids.shape[1], input_ids.device))
    h = embed(model, input_ids)
    for layer in model.model.layers:
        h = block_forward(layer, h, rope)
        if layer_outputs is not None:
            layer_outputs.append(h)
    return model.model.norm(h)


def logits(model: Model, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) ids -> (B, T, vocab) float32 logits."""
    return model.lm_head(hidden_states(model, input_ids)).float()


def linear_modules(layer: Layer) -> dict[str, Any]:
    """The seven projection Linears of a decoder layer, by their name inside the layer."""
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    return {name: layer.get_submodule(name) for name in names}
