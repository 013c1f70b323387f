"""Packed grammar bitmasks: filling them with llguidance and applying them to logits.

One bitmask row is ceil(V / 32) int32 words, bit `t % 32` of word `t // 32` set when token t
is allowed (llguidance's layout). A step's masks are one (C, W) array for its C constrained
rows; they are applied in place by the kernels' `apply_token_bitmask` (one pass over the packed
words: a word with every bit set is skipped, ~5 us for a 49k row) when the plan runs the CPU
kernels, else with one vectorised numpy pass (unpack + copyto, ~240 us for a 49k row).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from ember.kernels.ops import CpuKernels

try:
    import llguidance
    import llguidance.numpy as llguidance_numpy
except ImportError:  # pragma: no cover - llguidance is a core dependency
    llguidance = None  # type: ignore[assignment]

PARALLEL_MASK_ROWS = 8
"""From this many rows on, masks are filled on llguidance's own thread pool."""


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def new_bitmask(rows: int, vocab_size: int) -> np.ndarray:
    """(rows, W) int32, every token allowed."""
    return np.full((rows, bitmask_words(vocab_size)), -1, dtype=np.int32)


class MaskFiller:
    """Fills bitmask rows from matchers: sequentially for a few rows, else in parallel on an
    llguidance executor (its native threads; the GIL is released while they run)."""

    def __init__(self, num_threads: int | None = None) -> None:
        # NOTE: at most the cores we have: more threads only fight the decode kernels.
        self.num_threads = num_threads or max(1, min(4, os.cpu_count() or 1))
        self._executor: llguidance.LLExecutor | None = None

    def fill(self, jobs: Sequence[tuple[llguidance.LLMatcher, int]], masks: np.ndarray) -> None:
        """Write the next-token mask of each (matcher, row) into `masks` (C, W)."""
        if len(jobs) >= PARALLEL_MASK_ROWS and self.num_threads > 1:
            if self._executor is None:
                self._executor = llguidance.LLExecutor(self.num_threads)
            llguidance_numpy.fill_next_token_bitmask_par(self._executor, list(jobs), masks)
            return
        for matcher, row in jobs:
            llguidance_numpy.fill_next_token_bitmask(matcher, masks, row)

    def fill_with_drafts(self, jobs: Sequence[tuple[llguidance.LLMatcher, int, list[int]]],
                         masks: np.ndarray) -> None:
        """Masks at row k and, for each draft token i that the grammar accepts, at row k+1+i
        (the matchers are left where they were)."""
        if self._executor is None:
            self._executor = llguidance.LLExecutor(self.num_threads)
        llguidance_numpy.fill_next_token_bitmask_par_with_draft_tokens(
            self._executor, list(jobs), masks)


def eos_only(masks: np.ndarray, row: int, eos_token_id: int | None) -> None:
    """Make bitmask `row` allow only EOS (a finished or failed grammar)."""
    masks[row] = 0
    if eos_token_id is not None:
        masks[row, eos_token_id // 32] = np.int32(np.uint32(1 << (eos_token_id % 32)).view(
            np.int32))


def apply_bitmask(logits: torch.Tensor, masks: np.ndarray, rows: Sequence[int],
                  eos_token_id: int | None, kernels: CpuKernels | None = None) -> None:
    """Set to -inf, in place, the logits of `rows` (C indices into `logits` (N, V)) whose bit
    is clear in `masks` (C, W). A row whose mask allows nothing gets EOS only. With `kernels`
    and float32 CPU logits this is one native pass; else numpy / torch."""
    if kernels is not None and logits.device.type == "cpu" and logits.dtype == torch.float32 \
            and logits.stride(1) == 1 and masks.dtype == np.int32 and masks.flags.c_contiguous:
        kernels.apply_token_bitmask(logits, torch.from_numpy(masks), list(rows), eos_token_id)
        return
    vocab = logits.shape[1]
    empty = ~masks.any(axis=1)  # (C,)
    for r in np.flatnonzero(empty).tolist():
        eos_only(masks, r, eos_token_id)
    # (C, V) bool, True where the token is NOT allowed; unpacking the complement avoids a
    # second (C, V) negation pass.
    banned = np.unpackbits((~masks).view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    banned = banned.view(np.bool_)
    if logits.device.type == "cpu" and logits.is_contiguous() and logits.dtype == torch.float32:
        target = logits.numpy()  # (N, V), shares memory
        if len(rows) == target.shape[0] and list(rows) == list(range(len(rows))):
            np.copyto(target, -np.inf, where=banned)
        else:
            for j, i in enumerate(rows):
                np.copyto(target[i], -np.inf, where=banned[j])
        return
    index = torch.as_tensor(list(rows), dtype=torch.long, device=logits.device)
    sub = logits.index_select(0, index)
    sub.masked_fill_(torch.from_numpy(banned).to(logits.device), float("-inf"))
    logits.index_copy_(0, index, sub)


def unpack_bits(masks: np.ndarray, vocab_size: int) -> np.ndarray:
    """(B, W) int32 bitmasks -> (B, V) numpy bool, True where allowed."""
    bits = np.unpackbits(masks.view(np.uint8), axis=1, bitorder="little")
    return bits[:, :vocab_size].view(np.bool_)  # (B, V)


def unpack_bitmask(masks: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, ceil(V/32)) int32 llguidance bitmasks -> (B, V) bool tensor, True where allowed."""
    return torch.from_numpy(unpack_bits(masks.numpy(), vocab_size).copy())
