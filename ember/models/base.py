"""The interface every causal LM architecture implements (one file per architecture)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ember.attention.metadata import AttentionMetadata
from ember.models.arch import ArchConfig

KVCache = tuple[torch.Tensor, torch.Tensor]
"""(key cache, value cache) of one layer, each (num_blocks, block_size, H_kv, D)."""

TensorTransform = Callable[[torch.Tensor], torch.Tensor]


class CausalLM(nn.Module):
    """forward(input_ids, positions, kv_caches, attn_metadata) -> hidden states (T, hidden)."""

    config: ArchConfig

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta: AttentionMetadata) -> torch.Tensor:
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, vocab) float32 logits."""
        raise NotImplementedError

    @staticmethod
    def expected_unused(cfg: ArchConfig) -> set[str]:
        """Checkpoint tensor names that are known and deliberately not loaded."""
        return set()

    @staticmethod
    def map_gguf_name(name: str, cfg: ArchConfig) -> tuple[str, TensorTransform | None] | None:
        """GGUF tensor name -> (parameter name, transform) or None if unknown."""
        return None

    @staticmethod
    def gguf_arch(cfg: ArchConfig, meta: dict[str, object],
                  tensor_names: set[str]) -> ArchConfig:
        """The generic GGUF reading `cfg` completed with what this architecture implies but
        llama.cpp does not store (layer patterns, biases present as tensors, ...)."""
        return cfg

    @staticmethod
    def hf_arch(cfg: ArchConfig, hf_config: dict[str, Any]) -> ArchConfig:
        """The generic config.json reading `cfg` completed with what this architecture implies
        but its config does not say (Qwen3: q/k norms)."""
        return cfg
