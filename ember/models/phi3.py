"""Phi-3 / Phi-3.5 / Phi-4-mini: a Llama-family decoder whose checkpoints store q/k/v as one
`qkv_proj` and gate/up as one `gate_up_proj` matrix.

The model builds them fused whatever the plan (the runtime fuses separate ones anyway), so HF
and llama.cpp tensors load as they are. Sliding windows (Phi-3-mini: 2047) and partial rotary
(Phi-4-mini: 0.75) come from ArchConfig; LongRoPE runs with its short factors (see
ArchConfig.from_hf_config).
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

from ember.errors import ModelLoadError
from ember.layers.factory import LayerFactory
from ember.models.arch import ArchConfig
from ember.models.llama import LLAMA_GGUF_LAYER, LlamaAttention, LlamaForCausalLM, LlamaMLP


class Phi3Attention(LlamaAttention):
    def build_projections(self, cfg: ArchConfig, ops: LayerFactory) -> bool:
        """One (Hq + 2 Hkv) * D-row projection, rows q, k, v (HF `qkv_proj`), always."""
        self.qkv_proj = ops.linear(cfg.hidden_size, sum(self.split_sizes), cfg.attention_bias)
        return True


class Phi3MLP(LlamaMLP):
    def build_projections(self, cfg: ArchConfig, ops: LayerFactory) -> bool:
        """One 2I-row projection, gate rows then up rows (HF `gate_up_proj`), always."""
        self.gate_up_proj = ops.linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        return True


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3 family (HF model_type and llama.cpp architecture 'phi3')."""

    attention_cls = Phi3Attention
    mlp_cls = Phi3MLP
    packed_modules = MappingProxyType({})  # the checkpoint stores them fused already
    kernel_decoder = False  # NOTE: not checked against the fused decoder kernel
    gguf_layer_names = MappingProxyType({
        **{k: v for k, v in LLAMA_GGUF_LAYER.items() if k not in ("attn_q", "attn_k", "attn_v")},
        "attn_qkv": "self_attn.qkv_proj",
        "ffn_up": "mlp.gate_up_proj",  # llama.cpp's phi3 ffn_up holds gate rows then up rows
    })
    gguf_permuted_qk = False

    @staticmethod
    def gguf_arch(cfg: ArchConfig, meta: dict[str, object],
                  tensor_names: set[str]) -> ArchConfig:
        """llama.cpp writes the rotary dimensions as rope.dimension_count (partial rotary), and
        LongRoPE as rope_factors tensors, which Ember does not read from GGUF."""
        if any(name.startswith("rope_factors") for name in tensor_names):
            raise ModelLoadError(f"{cfg.name or 'phi3'}: LongRoPE GGUF files (rope_factors_* "
                                 f"tensors) are not supported; use the HF safetensors model")
        key_length = meta.get("phi3.attention.key_length")
        head_dim = int(str(key_length)) if key_length else cfg.hidden_size // cfg.num_heads
        dims = meta.get("phi3.rope.dimension_count")
        rotary = int(str(dims)) if dims else head_dim
        cfg = dataclasses.replace(cfg, head_dim=head_dim, partial_rotary_factor=rotary / head_dim)
        return LlamaForCausalLM.gguf_arch(cfg, meta, tensor_names)
