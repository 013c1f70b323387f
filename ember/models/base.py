"""The interface every causal LM architecture implements (one file per architecture)."""

from __future__ import annotations

from collections.abc import Callable

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
