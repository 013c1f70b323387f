"""Gemma 3 text decoder: forward math and weight names only.

Differences from Llama: the embedding is scaled by sqrt(hidden); RMSNorms multiply by
(1 + w) and sit before AND after attention and the MLP; queries and keys get a per-head
RMSNorm before RoPE; the MLP is GeGLU (tanh GELU); attention scale is
query_pre_attn_scalar ** -0.5; layers alternate sliding-window attention (window 512, RoPE base
10k) with global attention (RoPE base 1M), five local layers to one global one.

On Ember's kernels (a quantized model, head_dim 64/128/256) the attention runs on the paged
attention kernels and every step's decoder layers on the fused decoder kernel: the model
describes its layers as a `LayerStack` with the extra norms ((1 + w) folded into the weights),
per-head q/k norms, tanh-GELU and a RoPE table per layer kind (local / global).
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
from ember.kernels.decoder import FusedDecoder, KernelLayer, LayerStack
from ember.layers.factory import LayerFactory
from ember.layers.linear import LinearBase, kernel_linears
from ember.layers.rope import RotaryEmbedding
from ember.models.arch import ArchConfig
from ember.models.base import CausalLM, KVCache, TensorTransform, kv_scales

RopeTables = tuple[torch.Tensor, torch.Tensor]
SLIDING_PATTERN = 6
"""Every 6th layer (5, 11, 17, ...) is global; llama.cpp's Gemma 3 files do not store this."""
LOCAL_ROPE_THETA = 10000.0


class GemmaRMSNorm(nn.Module):
    """y = x / rms(x) * (1 + w), in float32, cast back (HF's Gemma convention for `w`)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: one fused op (a third of the decode step's time was these norms' small ops)
        out = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (out * (1.0 + self.weight.float())).to(x.dtype)


class Gemma3Attention(nn.Module):
    q_proj: LinearBase
    k_proj: LinearBase
    v_proj: LinearBase
    qkv_proj: LinearBase

    def __init__(self, cfg: ArchConfig, layer: int, ops: LayerFactory) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.attn_scale
        self.window = cfg.layer_window(layer)
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.split_sizes = [q_size, kv_size, kv_size]
        self.fused = ops.fuses("qkv")
        q, k, v, o = (_weight_name(layer, f"self_attn.{p}_proj") for p in "qkvo")
        if self.fused:
            self.qkv_proj = ops.linear(cfg.hidden_size, self.split_sizes, names=(q, k, v))
        else:
            self.q_proj = ops.linear(cfg.hidden_size, q_size, names=(q,))
            self.k_proj = ops.linear(cfg.hidden_size, kv_size, names=(k,))
            self.v_proj = ops.linear(cfg.hidden_size, kv_size, names=(v,))
        self.o_proj = ops.linear(q_size, cfg.hidden_size, names=(o,))
        self.q_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.attention_kernels = ops.attention_kernels
        """Ember's paged attention kernels (the plan's attention backend), or None: PyTorch."""

    def forward(self, x: torch.Tensor, rope: RopeTables, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        if self.fused:
            q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = self.q_norm(q.reshape(t, self.num_heads, self.head_dim))  # (T, Hq, D)
        k = self.k_norm(k.reshape(t, self.num_kv_heads, self.head_dim))  # (T, Hk, D)
        if self.attention_kernels is not None:
            qkv = torch.cat([q.reshape(t, -1), k.reshape(t, -1), v], dim=-1)  # (T, (Hq+2Hk)D)
            out = kernel_qkv_attention(self.attention_kernels, qkv.float(), self.num_heads,
                                       self.num_kv_heads, self.head_dim, rope, kv_cache, meta,
                                       self.scale, self.window)
            return self.o_proj(out.to(x.dtype))  # (T, hidden)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)  # (T, Hk, D)
        q, k = RotaryEmbedding.rotate(q, k, rope)
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.window)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))  # (T, Hq*D)


class Gemma3MLP(nn.Module):
    gate_proj: LinearBase
    up_proj: LinearBase
    gate_up_proj: LinearBase

    def __init__(self, cfg: ArchConfig, layer: int, ops: LayerFactory) -> None:
        super().__init__()
        hidden, inter = cfg.hidden_size, cfg.intermediate_size
        self.fused = ops.fuses("gate_up")
        gate, up, down = (_weight_name(layer, f"mlp.{p}_proj") for p in ("gate", "up", "down"))
        if self.fused:
            self.gate_up_proj = ops.linear(hidden, [inter, inter], names=(gate, up))
        else:
            self.gate_proj = ops.linear(hidden, inter, names=(gate,))
            self.up_proj = ops.linear(hidden, inter, names=(up,))
        self.down_proj = ops.linear(inter, hidden, names=(down,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (T, I) each
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, layer: int, ops: LayerFactory) -> None:
        super().__init__()
        eps = cfg.rms_norm_eps
        self.is_sliding = cfg.layer_window(layer) is not None
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.self_attn = Gemma3Attention(cfg, layer, ops)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.mlp = Gemma3MLP(cfg, layer, ops)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)

    def forward(self, x: torch.Tensor, rope: RopeTables, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), rope, kv_cache, meta)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h)


class Gemma3Body(nn.Module):
    def __init__(self, cfg: ArchConfig, ops: LayerFactory, embed_tokens: nn.Module) -> None:
        super().__init__()
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.max_position, cfg.rope_theta,
                                          cfg.rope_scaling)
        # NOTE: local layers use their own base and no scaling (HF: rope_local_base_freq).
        self.rotary_emb_local = RotaryEmbedding(cfg.head_dim, cfg.max_position,
                                                cfg.rope_local_theta or LOCAL_ROPE_THETA)
        self.embed_tokens = embed_tokens
        self.layers = nn.ModuleList(Gemma3DecoderLayer(cfg, i, ops)
                                    for i in range(cfg.num_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.embed_scale = cfg.hidden_size ** 0.5


class Gemma3ForCausalLM(CausalLM):
    """Gemma 3 text model (GGUF `gemma3`, HF `gemma3_text`) with HF parameter names."""

    packed_modules: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

    def __init__(self, cfg: ArchConfig, layers: LayerFactory | torch.dtype | None = None
                 ) -> None:
        """layers: builds every layer in the ExecutionPlan's runtime form (default: the dense
        float32 unfused reference; a dtype: the reference in that dtype)."""
        super().__init__()
        ops = LayerFactory.of(layers)
        self.config = cfg
        embed, head = ops.embedding_and_head(cfg.vocab_size, cfg.hidden_size,
                                             cfg.tie_word_embeddings)
        self.model = Gemma3Body(cfg, ops, embed)
        self.lm_head = head

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta: AttentionMetadata) -> torch.Tensor:
        body = self.model
        h = body.embed_tokens(input_ids)  # (T, hidden)
        # NOTE: HF scales in the embedding's dtype (the scale rounded to it first).
        h = h * torch.tensor(body.embed_scale, dtype=h.dtype)
        rope_global = body.rotary_emb.cos_sin(positions)
        rope_local = body.rotary_emb_local.cos_sin(positions)
        for i, (layer, kv_cache) in enumerate(zip(body.layers, kv_caches)):
            h = layer(h, rope_local if layer.is_sliding else rope_global, kv_cache,
                      meta.for_layer(i))
        return body.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    # ---- Ember's kernels ----------------------------------------------------------------

    @classmethod
    def supports_kernel_attention(cls, cfg: ArchConfig) -> bool:
        """The tiled attention kernel runs Gemma's windows and head dims 64/128/256 (q/k norms
        and the scale are applied outside it)."""
        return (cfg.head_dim in (64, 128, 256) and cfg.rotary_dim == cfg.head_dim
                and not cfg.attention_bias)

    @classmethod
    def supports_kernel_decoder(cls, cfg: ArchConfig) -> bool:
        return cls.supports_kernel_attention(cfg)

    def kernel_layer_stack(self, kv_caches: list[KVCache], block_size: int
                           ) -> LayerStack | None:
        """The decoder layers as the fused kernel reads them (norm weights as 1 + w; RoPE table
        0 local, 1 global); None unless every projection is fused and in a kernel format."""
        cfg = self.config
        layers = []
        for i, (layer, kv) in enumerate(zip(self.model.layers, kv_caches)):
            assert isinstance(layer, Gemma3DecoderLayer)
            attn, mlp = layer.self_attn, layer.mlp
            if not (attn.fused and mlp.fused):
                return None
            projs = kernel_linears(attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if projs is None:
                return None
            layers.append(KernelLayer(
                _folded(layer.input_layernorm), _folded(layer.pre_feedforward_layernorm),
                *projs, kv[0], kv[1], *kv_scales(kv), cfg.layer_window(i),
                q_norm=_folded(attn.q_norm), k_norm=_folded(attn.k_norm),
                post_attn_norm=_folded(layer.post_attention_layernorm),
                post_ffn_norm=_folded(layer.post_feedforward_layernorm),
                rope_table=0 if layer.is_sliding else 1))
        return LayerStack(tuple(layers), cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                          cfg.num_kv_heads, cfg.head_dim, block_size, cfg.rms_norm_eps,
                          cfg.attn_scale, activation="gelu_tanh", rope_tables=2)

    def forward_fused(self, input_ids: torch.Tensor, positions: torch.Tensor,
                      meta: AttentionMetadata, decoder: FusedDecoder) -> torch.Tensor:
        """`forward` with every decoder layer in one kernel call (`kernel_layer_stack`)."""
        assert meta.row_block_tables is not None and meta.row_lens is not None
        body = self.model
        h = body.embed_tokens(input_ids)  # (T, hidden)
        x = (h * torch.tensor(body.embed_scale, dtype=h.dtype)).float().contiguous()
        local = body.rotary_emb_local.cos_sin(positions)  # (T, 1, D/2) each
        rope_global = body.rotary_emb.cos_sin(positions)
        cos = torch.stack([local[0], rope_global[0]])  # (2, T, 1, D/2): table 0 local, 1 global
        sin = torch.stack([local[1], rope_global[1]])
        decoder(x, cos, sin, *meta.kernel_tables(), meta.row_lens)
        return body.norm(x)

    # ---- weight names -------------------------------------------------------------------

    @staticmethod
    def expected_unused(cfg: ArchConfig) -> set[str]:
        return {"lm_head.weight"} if cfg.tie_word_embeddings else set()

    @staticmethod
    def gguf_arch(cfg: ArchConfig, meta: dict[str, object],
                  tensor_names: set[str]) -> ArchConfig:
        """llama.cpp's Gemma 3 conventions: 5 sliding layers then a global one, local RoPE
        base 10k, attention scale from head_dim (hidden / heads for the 27B model)."""
        pattern = tuple("full" if (i + 1) % SLIDING_PATTERN == 0 else "sliding"
                        for i in range(cfg.num_layers))
        scalar = (cfg.hidden_size // cfg.num_heads if cfg.num_layers == 62 else cfg.head_dim)
        scaling: dict[str, object] = {}
        kind = meta.get("gemma3.rope.scaling.type")
        if kind not in (None, "none"):
            scaling = {"rope_type": kind,
                       "factor": float(meta["gemma3.rope.scaling.factor"])}  # type: ignore[arg-type]
        return dataclasses.replace(
            cfg, layer_types=pattern if cfg.sliding_window else (), qk_norm=True,
            rope_local_theta=LOCAL_ROPE_THETA, query_pre_attn_scalar=float(scalar),
            rope_scaling=scaling)

    @staticmethod
    def map_gguf_name(name: str, cfg: ArchConfig) -> tuple[str, TensorTransform | None] | None:
        """NOTE: llama.cpp stores Gemma's norm weights as 1 + w; HF's `w` is restored here.
        Gemma's q/k rows are not permuted (llama.cpp runs it with NeoX-style RoPE)."""
        if name in _GGUF_GLOBAL:
            param = _GGUF_GLOBAL[name]
            return param, (_minus_one if param.endswith("norm.weight") else None)
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
        if m is None or m.group(2) not in _GGUF_LAYER:
            return None
        param = f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}.weight"
        return param, (_minus_one if "norm" in m.group(2) else None)


def _weight_name(layer: int, module: str) -> str:
    """The checkpoint (HF) name of a decoder layer's projection weight (picks its format
    under a 'native' plan)."""
    return f"model.layers.{layer}.{module}.weight"


def _folded(norm: GemmaRMSNorm) -> torch.Tensor:
    """Gemma's (1 + w) as a plain RMSNorm weight (float32, contiguous) for the kernels."""
    return (1.0 + norm.weight.detach().float()).contiguous()


def _minus_one(w: torch.Tensor) -> torch.Tensor:
    return w - 1


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
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}
