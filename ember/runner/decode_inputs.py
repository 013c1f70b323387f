"""Inputs of a decode-only step on the kernel path, without per-token torch ops.

A step whose every request computes one token (plain decoding, no drafts) on Ember's attention
kernels with one KV cache group needs only: each row's token id, position, cache slot, block
table and context length. `ModelRunner._prepare`'s general path builds these with a dozen
small torch ops per step (arange, repeat_interleave, cat, index_select, a tensor per table);
at one client each costs microseconds that add up to ~0.2-0.5 ms per token on the 2-core
dev VM, a fixed cost next to a ~6 ms decode step. This builds the same values (same dtypes,
shapes and numbers; a test compares them) with numpy into the runner's persistent buffers.
"""

from __future__ import annotations

import numpy as np
import torch

from ember.types import ScheduledRequest


def is_plain_decode(order: list[ScheduledRequest]) -> bool:
    """Whether every scheduled request computes exactly one token without drafts."""
    return all(sr.num_new_tokens == 1 and not sr.spec_token_ids for sr in order)


def decode_rows(order: list[ScheduledRequest], block_size: int, input_ids: torch.Tensor,
                positions: torch.Tensor, slots: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill input_ids, positions and slots (persistent int64 buffers, first T entries) for T
    one-token rows; returns the row block tables (T, max_blocks) int64, padded with the null
    block 0, and the context lengths (T,) int64 (each row's position + 1)."""
    t = len(order)
    ids_np, pos_np, slots_np = input_ids.numpy(), positions.numpy(), slots.numpy()
    width = max(len(sr.block_ids) for sr in order)
    tables = np.zeros((t, width), dtype=np.int64)  # (T, max_blocks)
    for i, sr in enumerate(order):
        start = sr.start
        table = sr.block_ids
        ids_np[i] = sr.request.all_token_ids[start]
        pos_np[i] = start
        slots_np[i] = table[start // block_size] * block_size + start % block_size
        tables[i, :len(table)] = table
    lens = pos_np[:t] + 1  # (T,) a copy: each row's context, itself included
    return torch.from_numpy(tables), torch.from_numpy(lens)


def padded_group_tables(order: list[ScheduledRequest], num_groups: int) -> np.ndarray:
    """Every request's block table in every KV cache group, (G, R, max_blocks), padded with the
    null block 0 (group 0: `block_ids`; the others: `group_block_ids`)."""
    per_request = [[sr.block_ids, *sr.group_block_ids] for sr in order]
    width = max(len(table) for tables in per_request for table in tables)
    padded = np.zeros((num_groups, len(order), width), dtype=np.int64)
    for r, tables in enumerate(per_request):
        for g, table in enumerate(tables):
            padded[g, r, :len(table)] = table
    return padded


def group_slots(padded: np.ndarray, rows: np.ndarray, positions: np.ndarray, block_size: int
                ) -> np.ndarray:
    """The KV slots (G, T) of T tokens in every KV cache group: token t of request rows[t] at
    positions[t], through the padded group tables (G, R, max_blocks) (no per-token Python)."""
    # NOTE: the fancy index yields a (T, G)-ordered buffer; the kernels take (G, T) contiguous
    return np.ascontiguousarray(
        padded[:, rows, positions // block_size] * block_size + positions % block_size)


def group_decode_tables(order: list[ScheduledRequest], block_size: int, num_groups: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """With several KV cache groups (sliding-window layers trimmed): the fused decoder's slots
    (G, T) and row block tables (G, T, max_blocks) of T one-token rows (ModelRunner.
    _group_kernel_tables' values without its per-step repeat of rows)."""
    padded = padded_group_tables(order, num_groups)  # (G, T, max_blocks): one row per token
    positions = np.fromiter((sr.start for sr in order), dtype=np.int64, count=len(order))
    slots = group_slots(padded, np.arange(len(order)), positions, block_size)
    return torch.from_numpy(slots), torch.from_numpy(padded)
