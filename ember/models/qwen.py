"""Qwen2 / Qwen2.5 and Qwen3: Llama-family decoders run by ember.models.llama.

Qwen2 adds q/k/v biases (`ArchConfig.attention_bias`, on by default for model_type qwen2);
Qwen3 drops them and normalises each query and key head (RMSNorm over head_dim) before RoPE
(`ArchConfig.qk_norm`). Both use HF Llama's parameter names plus `self_attn.{q,k}_norm`.
llama.cpp keeps HF's q/k row order for both (NeoX RoPE), so GGUF rows are not unpermuted.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ember.models.arch import ArchConfig
from ember.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 / Qwen2.5 (HF model_type and llama.cpp architecture 'qwen2')."""

    gguf_permuted_qk = False
    kernel_decoder = False  # NOTE: not checked against the fused decoder kernel


class Qwen3ForCausalLM(Qwen2ForCausalLM):
    """Qwen3 dense models (model_type / llama.cpp architecture 'qwen3')."""

    @staticmethod
    def hf_arch(cfg: ArchConfig, hf_config: dict[str, Any]) -> ArchConfig:
        """Qwen3's config.json does not mention its q/k norms: the architecture implies them."""
        return dataclasses.replace(cfg, qk_norm=True)
