"""Weights that every decode step streams from DRAM, moved into one huge-page arena.

A decode step reads each layer's projections once, in order. Kept in separate allocations of
4 KB pages (the allocator's default; the machine's transparent huge pages are usually
`madvise` only), every 4 KB of weights costs a TLB miss and the hardware prefetcher stops at
every page boundary. `relocate` copies the tensors into one anonymous mapping advised
MADV_HUGEPAGE (2 MB pages where the kernel has them), in the order given, and points each
tensor at its copy (`Tensor.set_`): the same tensor objects, values, shapes and strides, so
whoever holds them (modules, the fused decoder's C structs built afterwards) reads the same
numbers from the new place, and the old storage is freed. Nothing numeric changes.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence

import torch

from ember.kernels.heap import trim_heap

HUGE_PAGE = 2 << 20
"""The huge page size the arena's start is aligned to (x86-64 and most ARM kernels)."""
ALIGN = 64
"""Each tensor's start in the arena (a cache line; the kernels' vector loads are unaligned)."""


def _movable(t: torch.Tensor) -> bool:
    """A contiguous tensor that owns its whole storage (so relocating it frees that storage)."""
    return (t.numel() > 0 and t.is_contiguous() and t.device.type == "cpu"
            and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def relocate(tensors: Sequence[torch.Tensor]) -> int:
    """Move the movable tensors among `tensors` (contiguous, owning their storage; repeats and
    others are left where they are) into one MADV_HUGEPAGE arena, in order. Returns the bytes
    moved (0 where the platform has no MADV_HUGEPAGE: nothing moves). The arena lives as long
    as any tensor in it (their storages hold the mapping)."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    seen: set[int] = set()
    todo: list[torch.Tensor] = []
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen and _movable(t):
            seen.add(ptr)
            todo.append(t)
    if advice is None or not todo:
        return 0
    offsets, size = [], 0
    for t in todo:
        offsets.append(size)
        size += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    region = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE)  # shared: no THP
    whole = torch.frombuffer(region, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE  # the arena begins on a huge page boundary
    region.madvise(advice, start, size)  # start: a multiple of the page size
    arena = whole[start:start + size]
    storage = arena.untyped_storage()
    for t, off in zip(todo, offsets):
        nbytes = t.numel() * t.element_size()
        old = t.untyped_storage().data_ptr()
        # an inference tensor (made under inference_mode) is only changed in that mode
        with torch.inference_mode() if t.is_inference() else torch.no_grad():
            arena[off:off + nbytes].copy_(t.reshape(-1).view(torch.uint8))
            t.set_(storage, (start + off) // t.element_size(), t.shape, t.stride())
            # NOTE: a view (e.g. a reshape of a packed tensor) keeps its base alive after
            # set_, and with it the old storage (the weights twice: +78 MB RSS on SmolLM2);
            # its bases move too.
            base = t._base
            while base is not None and base.untyped_storage().data_ptr() == old \
                    and base.storage_offset() == 0:
                base.set_(storage, (start + off) // base.element_size(), base.shape,
                          base.stride())
                base = base._base
    # the old weights were heap blocks below the top, which free() alone keeps resident
    # (~80 MB RSS on SmolLM2)
    trim_heap()
    return size
