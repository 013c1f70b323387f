"""When the grammar work of a step overlaps the forward pass, and what it costs per phase.

After step t is sampled, `StructuredOutputManager.prefetch` may hand the matchers' consume and
next-mask fill to a worker thread, overlapped with step t+1's forward pass; `overlap_pays` and
`OVERLAP_MIN_ROWS` say when that pays. `StepTimings` adds up the seconds of each phase (for
benchmarks/structured.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ember.kernels.ops import CpuKernels

OVERLAP_MIN_ROWS = 8
"""Constrained rows from which the mask worker runs even without a spare core.

NOTE: measured with benchmarks/structured.py on 2 cores and 2 kernel threads (SmolLM2 int4,
native mask apply): batch 1 overhead 0.5% in-step vs 4.1% overlapped (a ~6 ms step; the
worker preempts a kernel thread); batch 32 8.7% in-step vs 2.3% overlapped (a ~73 ms step in
which ~3 ms of consume + fill run beside the kernels instead of after them)."""


def overlap_pays(kernels: CpuKernels | None) -> bool:
    """Whether filling masks on the worker thread during the forward pass pays: only when this
    process has a core the kernel threads do not use.

    NOTE: measured with benchmarks/structured.py on 2 cores and 2 kernel threads (SmolLM2,
    batch 1): the worker's ~300-400 us per step preempts a kernel thread and stalls the whole
    step (16% overhead overlapped vs 11.5% in-step before the native mask apply); in-step, the
    fill (~80 us per row, llguidance's pool from 8 rows) runs while the kernels are idle."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    threads = kernels.num_threads if kernels is not None else torch.get_num_threads()
    return cores > threads


@dataclass
class StepTimings:
    """Cumulative seconds per phase of the grammar work (engine thread unless noted)."""

    join: float = 0.0
    """Waiting for the prefetch worker before sampling."""
    mask: float = 0.0
    """Filling the masks the prefetch did not provide."""
    apply: float = 0.0
    """Unpacking the bitmask onto the logits."""
    prefetch: float = 0.0
    """Worker thread: consuming sampled tokens and filling next masks (overlapped)."""
    steps: int = 0
    """Steps that masked constrained rows (verify steps included)."""
    forced_tokens: int = 0
    """Tokens drafted by jump-forward."""
    validate: float = 0.0
    """Validate-first: finding the rows that can skip the mask and checking their tokens."""
    lazy_rows: int = 0
    """Row-steps sampled validate-first (without a mask unless rejected)."""
    rejected: int = 0
    """Of `lazy_rows`, those whose unmasked token the grammar rejected (masked, resampled)."""

    def add(self, **seconds: float) -> None:
        for name, value in seconds.items():
            setattr(self, name, getattr(self, name) + value)

    def in_step(self) -> float:
        """Seconds of grammar work on the engine thread (not the worker's prefetch)."""
        return self.join + self.mask + self.apply + self.validate

    def reset(self) -> None:
        self.join = self.mask = self.apply = self.prefetch = self.validate = 0.0
        self.steps = self.forced_tokens = self.lazy_rows = self.rejected = 0
