"""The interface every causal LM architecture implements (one file per architecture)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ember.attention.metadata import AttentionMetadata
from ember.formats.stored import TensorTransform
from ember.models.arch import ArchConfig

if TYPE_CHECKING:
    from ember.kernels.decoder import FusedDecoder, LayerStack

KVCache = tuple[torch.Tensor, ...]


def kv_scales(kv: KVCache) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The (K, V) scale tensors of an int8 cache (K, V, K scales, V scales); (None, None) else."""
    return (kv[2], kv[3]) if len(kv) == 4 else (None, None)
"""One layer's cache: (k, v), or (k, v, k_scale, v_scale) for an int8 cache."""
"""(key cache, value cache) of one layer, each (num_blocks, block_size, H_kv, D)."""

__all__ = ["CausalLM", "KVCache", "TensorTransform", "kv_scales"]


class CausalLM(nn.Module):
    """forward(input_ids, positions, kv_caches, attn_metadata) -> hidden states (T, hidden).

    Built by `cls(arch, layers)` with the ExecutionPlan's LayerFactory (ember.layers.factory):
    fused projections where the plan fuses them, every layer in its runtime format.
    """

    config: ArchConfig
    packed_modules: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    """Fused module name -> the checkpoint modules whose rows it stacks, in order (vLLM's
    packed_modules_mapping): the loader fills a fused layer's row blocks from them."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta: AttentionMetadata) -> torch.Tensor:
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, vocab) float32 logits."""
        raise NotImplementedError

    # ---- Ember's kernels: what this architecture lets them run ------------------------------

    @classmethod
    def supports_kernel_attention(cls, cfg: ArchConfig) -> bool:
        """Whether Ember's paged attention kernels implement this model's attention."""
        return False

    @classmethod
    def supports_kernel_decoder(cls, cfg: ArchConfig) -> bool:
        """Whether the fused decoder kernel implements this model's layer stack."""
        return False

    def kernel_layer_stack(self, kv_caches: list[KVCache], block_size: int
                           ) -> LayerStack | None:
        """The layer stack described for the fused decoder kernel (None: not implemented)."""
        return None

    def forward_fused(self, input_ids: torch.Tensor, positions: torch.Tensor,
                      meta: AttentionMetadata, decoder: FusedDecoder) -> torch.Tensor:
        """`forward` with the decoder layers run by `decoder` (see kernel_layer_stack)."""
        raise NotImplementedError(f"{type(self).__name__} has no fused decoder path")

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
