"""KV cache groups: layers with the same attention kind share one block table per request.

In the spirit of vLLM's hybrid KV cache manager. A model whose layers all attend the same way
(SmolLM2: full attention everywhere; Mistral: one sliding window everywhere) has ONE group
holding every layer: one block table per request, one block = every layer's KV of
`block_size` tokens, exactly the layout Ember always had.

A model mixing kinds (Gemma 3: five sliding-window layers of window 512 per global layer) gets
several groups of EQUAL size `page_layers` (the smallest kind's layer count; a kind whose count
is not a multiple leaves part of its last group's page unused):

    Gemma 3 270M, 18 layers = 15 sliding + 3 full  ->  page_layers 3, groups
        g0 full    layers (5, 11, 17)
        g1 sliding layers (0, 1, 2)   g2 (3, 4, 6)   g3 (7, 8, 9)   g4 (10, 12, 13)   g5 (14, 15, 16)

NOTE: why one shared block pool rather than a pool per group. The runner allocates
`page_layers` K/V tensors of `num_blocks` blocks; layer l uses tensor `layer_slot[l]`. A block
id therefore names one page of `page_layers` layers' KV and belongs to exactly one group at a
time: every group draws from the same free list, so the split between full-attention blocks
(growing with the context) and window blocks (bounded by the window) follows the workload
instead of being fixed at startup. A per-group pool would have to guess that split (sized for
long contexts it starves many short requests, and the other way round). This is vLLM's choice
too (uniform page size across groups).

A sliding-window group frees the blocks that fell out of the window of every query still to
run (their table entries become the null block 0), so its cost per request is bounded by
about (window + chunk) / block_size blocks whatever the context; full groups keep everything.

Both attention paths run the groups: the module path gives each layer its group's
`AttentionMetadata` (`AttentionMetadata.for_layer`); the fused decoder kernel takes slots
(G, T) and block tables (G, T, max_blocks) and each `LayerW` names its group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class KVCacheGroup:
    """Layers that share one block table per request."""

    layers: tuple[int, ...]
    """Model layer indices, ascending."""
    window: int | None
    """Sliding window of these layers (keys a query sees, itself included); None = full
    attention (the group keeps every block)."""


@dataclass(frozen=True)
class KVCacheGroups:
    """The model's layers partitioned into KV cache groups (see the module docstring)."""

    groups: tuple[KVCacheGroup, ...]
    """Group 0 is a full-attention group whenever the model has one."""
    page_layers: int
    """Layers whose KV one block holds (the number of K/V tensor pairs the runner allocates)."""
    layer_group: tuple[int, ...]
    """Per model layer: its group index."""
    layer_slot: tuple[int, ...]
    """Per model layer: which of the `page_layers` K/V tensors it reads and writes."""

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def blocks_for_context(self, num_tokens: int, block_size: int, chunk: int) -> int:
        """Blocks one request of `num_tokens` tokens holds at most (all groups), computed in
        chunks of at most `chunk` tokens: a window group holds the blocks spanning
        [start - window + 1, start + chunk) of its current chunk."""
        full = -(-num_tokens // block_size)
        total = 0
        for group in self.groups:
            if group.window is None:
                total += full
            else:
                span = group.window - 1 + min(chunk, num_tokens)
                total += min(full, -(-span // block_size) + 1)
        return total

    def max_context(self, num_blocks: int, block_size: int, chunk: int, limit: int) -> int:
        """The longest context (<= limit) one request can reach with `num_blocks` usable
        blocks (the null block excluded)."""
        lo, hi = 0, limit
        while lo < hi:  # the largest n with blocks_for_context(n) <= num_blocks
            mid = (lo + hi + 1) // 2
            if self.blocks_for_context(mid, block_size, chunk) <= num_blocks:
                lo = mid
            else:
                hi = mid - 1
        return lo


def single_group(num_layers: int, window: int | None = None) -> KVCacheGroups:
    """Every layer in one group (the layout of a model with one attention kind)."""
    return KVCacheGroups((KVCacheGroup(tuple(range(num_layers)), window),), num_layers,
                         (0,) * num_layers, tuple(range(num_layers)))


def build_kv_groups(layer_windows: Sequence[int | None], trim: bool = True) -> KVCacheGroups:
    """Group layers by attention kind. layer_windows: per layer its sliding window or None.

    trim=False keeps every position of every layer (one full group: the pre-hybrid layout;
    the attention still masks each layer by its window)."""
    num_layers = len(layer_windows)
    kinds: dict[int | None, list[int]] = {}
    for layer, window in enumerate(layer_windows):
        kinds.setdefault(window, []).append(layer)
    if not trim or len(kinds) == 1:
        window = next(iter(kinds)) if trim and kinds else None
        return single_group(num_layers, window)
    page = min(len(layers) for layers in kinds.values())
    groups: list[KVCacheGroup] = []
    # full attention first (group 0), then windows ascending
    for window in sorted(kinds, key=lambda w: -1 if w is None else w):
        layers = kinds[window]
        groups += [KVCacheGroup(tuple(layers[i:i + page]), window)
                   for i in range(0, len(layers), page)]
    layer_group = [0] * num_layers
    layer_slot = [0] * num_layers
    for g, group in enumerate(groups):
        for slot, layer in enumerate(group.layers):
            layer_group[layer], layer_slot[layer] = g, slot
    return KVCacheGroups(tuple(groups), page, tuple(layer_group), tuple(layer_slot))

