"""How many torch threads the sampler uses: one (the caller's) for small batches.

The sampler is a handful of torch ops over (rows, vocab) logits (temperature, top-k/top-p,
softmax, cumsum, penalties). For one to a few rows each op is tens of microseconds, so torch's
OpenMP team only adds fork/join cost, and its workers spin after every op on the cores that
the kernels, the HTTP event loop and the clients need. Measured on the 2-core dev VM
(SmolLM2's 49,152-token vocabulary, temperature 0.7, top_p 0.9, repetition_penalty 1.1;
contended, load 3.7-7): one row 1.4-3.3 ms with one torch thread against 7-87 ms with two;
32 rows 141 ms against 395 ms. Large batches keep torch's thread count (its default), so
nothing changes where the work is big enough to split.

The switch sets the calling thread's OpenMP thread count through torch's own OpenMP runtime
(`omp_set_num_threads`, kept per thread), which torch's `parallel_for` reads: other threads are
left alone. `torch.set_num_threads` would also change the value every thread created meanwhile
starts with (a global in ATen), so it is only the fallback when torch's OpenMP library cannot be
found (then a thread started during a sampler call may keep one thread).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

DEFAULT_SINGLE_THREAD_ROWS = 8
"""Batches with at most this many rows are sampled on one torch thread (0: never)."""


@functools.cache
def _omp_setter() -> Callable[[int], None] | None:
    """`omp_set_num_threads` of the OpenMP runtime torch runs on, or None."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    for name in ("libgomp.so.1", "libiomp5.so", "libomp.so"):
        try:
            lib = ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
        except OSError:
            continue
        getter, setter = lib.omp_get_max_threads, lib.omp_set_num_threads
        getter.restype, setter.argtypes = ctypes.c_int, [ctypes.c_int]
        if getter() == torch.get_num_threads():  # the runtime torch's threads come from
            return setter  # type: ignore[no-any-return]
    return None


def _set_threads(n: int) -> None:
    setter = _omp_setter()
    if setter is not None:
        setter(n)
    else:
        torch.set_num_threads(n)


@contextmanager
def sampling_threads(rows: int, single_thread_rows: int) -> Iterator[int]:
    """Run the body with one torch thread when `rows <= single_thread_rows`; yields the
    thread count used. The previous count is restored on exit (also on an exception)."""
    before = torch.get_num_threads()
    if rows > single_thread_rows or before == 1:
        yield before
        return
    _set_threads(1)
    try:
        yield 1
    finally:
        _set_threads(before)
