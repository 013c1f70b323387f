"""Per-step attention metadata, built by the model runner and passed explicitly to the model.

Token order in a step: all decode tokens first (one per request, query length 1), then the
prefill chunks one after another. Decodes are attended in one batched call; each prefill chunk
attends to its cached context plus itself causally.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
    decode_lens: torch.Tensor | None = None
    """(B,) int64: context length of each decode request, itself included (reference path;
    sliding-window masks are derived from it)."""
    _window_masks: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    """Per-step cache of sliding-window decode masks, one per window size."""
    groups: list[AttentionMetadata] = field(default_factory=list, repr=False)
    """With several KV cache groups (ember/kv_cache/groups.py): the metadata of each group
    (slots and block tables differ per group; group 0 is this object); empty with one."""
    layer_group: tuple[int, ...] = ()
    """Per model layer: its KV cache group (with `groups`)."""
    group_slots: torch.Tensor | None = None
    """(G, T) int64: `slot_mapping` of every KV cache group, stacked (fused decoder with
    several groups; None otherwise)."""
    group_row_block_tables: torch.Tensor | None = None
    """(G, T, max_blocks) int64: `row_block_tables` of every KV cache group, stacked (with
    `group_slots`)."""

    def kernel_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused decoder's slots and row block tables: (G, T) and (G, T, max_blocks) with
        several KV cache groups, else (T,) and (T, max_blocks)."""
        if self.group_slots is not None and self.group_row_block_tables is not None:
            return self.group_slots, self.group_row_block_tables
        assert self.row_block_tables is not None
        return self.slot_mapping, self.row_block_tables

    def for_layer(self, layer: int) -> AttentionMetadata:
        """The metadata layer `layer` attends with: its KV cache group's."""
        return self.groups[self.layer_group[layer]] if self.groups else self

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """(B, 1, 1, L) additive mask of the decodes; with `window`, keys older than the last
        `window` positions are masked too (built once per step and window)."""
        assert self.decode_kv_mask is not None
        if window is None:
            return self.decode_kv_mask
        mask = self._window_masks.get(window)
        if mask is None:
            assert self.decode_lens is not None
            length = self.decode_kv_mask.shape[-1]
            old = torch.arange(length).unsqueeze(0) < (self.decode_lens - window).unsqueeze(1)
            mask = self.decode_kv_mask.masked_fill(old.view_as(self.decode_kv_mask),
                                                   float("-inf"))
            self._window_masks[window] = mask
        return mask


def chunk_mask(chunk: PrefillChunk, window: int | None) -> torch.Tensor | None:
    """Boolean (Tq, Tk) mask of a prefill chunk (True = may attend), or None when plain causal
    attention over its own keys is exact (fresh chunk, no window cutting into it)."""
    if window is None or (chunk.context_len == 0 and chunk.query_len <= window):
        return chunk.causal_mask
    q_pos = torch.arange(chunk.context_len, chunk.context_len + chunk.query_len).unsqueeze(1)
    k_pos = torch.arange(chunk.context_len + chunk.query_len).unsqueeze(0)
    if chunk.context_len == 0:
        k_pos = k_pos[:, :chunk.query_len]
    return (k_pos <= q_pos) & (k_pos > q_pos - window)  # (Tq, Tk)
