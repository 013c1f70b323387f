"""Per-step attention metadata, built by the model runner and passed explicitly to the model.

Token order in a step: all decode tokens first (one per request, query length 1), then the
prefill chunks one after another. Decodes are attended in one batched call; each prefill chunk
attends to its cached context plus itself causally.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ember.kernels.ops import CpuKernels


@dataclass
class PrefillChunk:
    """One request's chunk of more than one query token."""

    query_start: int
    """Index of the chunk's first token in the flattened step."""
    query_len: int
    context_len: int
    """Tokens already in the cache before this chunk (its first position)."""
    kv_slots: torch.Tensor | None
    """(context_len + query_len,) cache slots to read, or None when context_len == 0
    (then the chunk attends only to its own fresh keys)."""
    causal_mask: torch.Tensor | None
    """(query_len, context_len + query_len) bool, True = may attend; None when context_len == 0."""


@dataclass
class AttentionMetadata:
    """Everything attention needs for one step, shared by all layers."""

    num_tokens: int
    slot_mapping: torch.Tensor
    """(T,) int64: flat cache slot (block_id * block_size + offset) for each token's K/V."""
    num_decodes: int
    """The first num_decodes tokens are single-token queries, one per request."""
    decode_kv_slots: torch.Tensor | None
    """(B, L) int64: cache slots of each decode request's context, padded to L with slot 0
    (PyTorch reference path only)."""
    decode_kv_mask: torch.Tensor | None
    """(B, 1, 1, L) float additive mask: 0 for valid keys, -inf for padding (reference only)."""
    prefills: list[PrefillChunk]
    row_block_tables: torch.Tensor | None = None
    """(T, max_blocks) int64: each query row's block table (kernel path: every token, prefill
    or decode, attends to its cached context, itself included)."""
    row_lens: torch.Tensor | None = None
    """(T,) int64: context length of each query row, itself included (kernel path)."""
    kernels: CpuKernels | None = field(default=None, repr=False)
    """Ember's CPU kernels when the runner uses them; None = PyTorch reference path."""
