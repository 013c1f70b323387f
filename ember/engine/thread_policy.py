"""Kernel thread count per engine step when an HTTP front end shares the CPU.

Ember's fused decoder runs a whole step in one OpenMP parallel region with a barrier after
each stage. When the server's event loop (SSE encoding, socket writes) wakes up during a step
on a machine with as many kernel threads as cores, it preempts one kernel thread and every
other thread spins at the next barrier until the scheduler gives that core back: a 2.9 ms step
becomes ~8 ms. At one or a few clients the step is small (a few tokens), so leaving one core
to the front end costs little compute and removes the stall; large steps (many clients, long
prefills) keep every thread, where the front end's share is small against the step.
"""

from __future__ import annotations

from collections.abc import Mapping

from ember.kernels.ops import CpuKernels
from ember.types import Request


class KernelThreadPolicy:
    """Sets `kernels.num_threads` before each step from the work the scheduler holds.

    Args:
        kernels: the engine's CPU kernels (None: PyTorch backend, nothing to do).
        frontend_threads: threads left to the front end on small steps.
        small_step_tokens: a step with at most this many tokens to compute is small.
    """

    def __init__(self, kernels: CpuKernels | None, frontend_threads: int,
                 small_step_tokens: int) -> None:
        self._kernels = kernels
        self.full = kernels.num_threads if kernels is not None else 1
        self.few = max(1, self.full - frontend_threads)
        self._small = small_step_tokens

    def threads_for(self, requests: Mapping[str, Request]) -> int:
        """Threads for a step over `requests` (the scheduler's live requests)."""
        if self.few == self.full or len(requests) > self._small:
            return self.full
        pending = 0
        for request in requests.values():
            pending += request.num_tokens - request.num_computed_tokens
            if pending > self._small:
                return self.full
        return self.few

    def before_step(self, requests: Mapping[str, Request]) -> None:
        if self._kernels is not None and self.few != self.full:
            self._kernels.num_threads = self.threads_for(requests)

    def restore(self) -> None:
        """Back to the full thread count (when the engine stops serving)."""
        if self._kernels is not None:
            self._kernels.num_threads = self.full
