"""Random paged KV caches for the attention kernel tests (test_kernels.py,
test_flash_attention.py)."""

from __future__ import annotations

import torch


def random_paged_cache(gen: torch.Generator, seq_lens: list[int], hk: int, dim: int, bs: int
                       ) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Random bf16 (the kernels' cache dtype) K and V caches (blocks, bs, hk, dim) and a block
    table per sequence: a shuffled (non-contiguous) set of blocks, block 0 left unused."""
    nblocks = sum((n + bs - 1) // bs for n in seq_lens) + 1
    k_cache = torch.randn(nblocks, bs, hk, dim, generator=gen).to(torch.bfloat16)
    v_cache = torch.randn(nblocks, bs, hk, dim, generator=gen).to(torch.bfloat16)
    perm = (torch.randperm(nblocks - 1, generator=gen) + 1).tolist()
    tables, at = [], 0
    for n in seq_lens:
        used = (n + bs - 1) // bs
        tables.append(perm[at:at + used])
        at += used
    return k_cache, v_cache, tables
