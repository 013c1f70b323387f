"""How many torch threads the sampler uses: one (the caller's) for small batches.

The sampler is a handful of torch ops over (rows, vocab) logits (temperature, top-k/top-p,
softmax, cumsum, penalties). For one to a few rows each op is tens of microseconds, so torch's
OpenMP team only adds fork/join cost, and its workers spin after every op on the cores that
the kernels, the HTTP event loop and the clients need. Measured on the 2-core dev VM
(SmolLM2's 49,152-token vocabulary, temperature 0.7, top_p 0.9, repetition_penalty 1.1;
contended, load 3.7-7): one row 1.4-3.3 ms with one torch thread against 7-87 ms with two;
32 rows 141 ms against 395 ms. Large batches keep torch's thread count (its default), so
nothing changes where the work is big enough to split.

`torch.set_num_threads` sets the calling thread's OpenMP thread count only (libgomp keeps it
per thread), so switching it on the engine thread leaves every other thread alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

DEFAULT_SINGLE_THREAD_ROWS = 8
"""Batches with at most this many rows are sampled on one torch thread (0: never)."""


@contextmanager
def sampling_threads(rows: int, single_thread_rows: int) -> Iterator[int]:
    """Run the body with one torch thread when `rows <= single_thread_rows`; yields the
    thread count used. The previous count is restored on exit (also on an exception)."""
    before = torch.get_num_threads()
    if rows > single_thread_rows or before == 1:
        yield before
        return
    torch.set_num_threads(1)
    try:
        yield 1
    finally:
        torch.set_num_threads(before)
