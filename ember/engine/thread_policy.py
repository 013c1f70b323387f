"""Kernel thread count per engine step when an HTTP front end shares the CPU.

Ember's fused decoder runs a whole step in one OpenMP parallel region with a barrier after
each stage. When the server's event loop (SSE encoding, socket writes) or a client process
wakes up during a step on a machine with as many kernel threads as cores, it preempts one
kernel thread and every other thread spins at the next barrier until that core comes back.
Leaving one core to the front end on small steps (one to a few clients) removes the stall but
halves the compute of a step that needed every core.

Which one is faster depends on the machine, not on the model: measured on the 2-core dev VM,
a quiet machine ran one streamed client at 86 tok/s with every thread against 78 tok/s with
one left free, and a contended one (load 2.6) at 51 against 115 tok/s. So the default
(`frontend_threads=None`, "auto") measures: on small steps it times the engine's whole step
cycle (step start to the next step start, which includes the front end's interference) with
both thread counts, keeps the faster one (by the mean of recent cycles, rare stalls clipped),
and re-tries the other one step in `probe_every` so that it follows changes in load. A fixed
`frontend_threads` (0, 1, ...) turns this off.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ember.kernels.ops import CpuKernels
from ember.types import Request

PROBE_EVERY = 32
"""Auto mode: one small step in this many runs on the thread count not currently preferred."""
WARMUP_SAMPLES = 4
"""Auto mode: cycles timed per thread count (alternating) before either is preferred."""
WINDOW = 16
"""Auto mode: the most recent cycle times kept per thread count."""
STALL_CLIP = 2.0
"""Auto mode: a cycle counts at most this many times its count's recent median. A rare stall
(the front end preempting a kernel thread at a barrier) cost up to 20x a cycle; in a running
mean one such cycle made the faster count look slower for hundreds of steps, since the
count not preferred is only timed one step in PROBE_EVERY. Frequent slowness still moves the
median, and with it the mean."""


@dataclass
class _Arm:
    """Recent step cycle times (s) with one thread count, per small-step size."""

    threads: int
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    mean_s: float = 0.0
    """Mean recent cycle time, each clipped at STALL_CLIP times the recent median (kept up to
    date by `add`: the policy compares both arms every small step)."""

    def add(self, seconds: float) -> None:
        self.recent.append(seconds)
        cap = STALL_CLIP * statistics.median(self.recent)
        self.mean_s = sum(min(s, cap) for s in self.recent) / len(self.recent)

    @property
    def samples(self) -> int:
        return len(self.recent)


class KernelThreadPolicy:
    """Sets `kernels.num_threads` before each step from the work the scheduler holds.

    Args:
        kernels: the engine's CPU kernels (None: PyTorch backend, nothing to do).
        frontend_threads: threads left to the front end on small steps; None: auto (time
            both every thread and one fewer on small steps, keep the faster).
        small_step_tokens: a step with at most this many tokens to compute is small.
        probe_every: auto mode: one small step in this many tries the other thread count.
        clock: monotonic clock in seconds (tests pass a fake one).
    """

    def __init__(self, kernels: CpuKernels | None, frontend_threads: int | None,
                 small_step_tokens: int, probe_every: int = PROBE_EVERY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._kernels = kernels
        self.full = kernels.num_threads if kernels is not None else 1
        self.auto = frontend_threads is None and self.full > 1
        self.few = max(1, self.full - (1 if frontend_threads is None else frontend_threads))
        self._small = small_step_tokens
        self._probe_every = max(2, probe_every)
        self._clock = clock
        # Auto mode: per small-step size (tokens), [every thread, one fewer].
        self._arms: dict[int, tuple[_Arm, _Arm]] = {}
        self._timing: tuple[_Arm, float] | None = None  # arm of the running cycle, its start
        self._small_steps = 0
        self._small_tokens_seen = False
        self.shares_cores = False
        """True when the last step was small and ran on every kernel thread (no core left to
        the front end: the engine hands its outputs over between steps, see handoff.py)."""

    def small_step_tokens(self, requests: Mapping[str, Request]) -> int | None:
        """Tokens the next step computes when it is small, else None."""
        if len(requests) > self._small:
            return None
        pending = 0
        for request in requests.values():
            pending += request.num_tokens - request.num_computed_tokens
            if pending > self._small:
                return None
        return pending

    def threads_for(self, requests: Mapping[str, Request]) -> int:
        """Threads for a step over `requests` (the scheduler's live requests); in auto mode
        also starts timing the cycle of that step."""
        if self.few == self.full:
            return self.full
        tokens = self.small_step_tokens(requests)
        self._small_tokens_seen = tokens is not None
        now = self._clock()
        if self._timing is not None:  # the previous step's cycle ends here
            arm, start = self._timing
            arm.add(now - start)
            self._timing = None
        if tokens is None:
            return self.full
        if not self.auto:
            return self.few
        arm = self._pick(tokens)
        self._timing = (arm, now)
        return arm.threads

    def _pick(self, tokens: int) -> _Arm:
        """The arm for the next small step of `tokens` tokens (auto mode)."""
        arms = self._arms.get(tokens)
        if arms is None:
            arms = self._arms[tokens] = (_Arm(self.full), _Arm(self.few))
        full, few = arms
        self._small_steps += 1
        if full.samples < WARMUP_SAMPLES or few.samples < WARMUP_SAMPLES:
            return full if full.samples <= few.samples else few
        best, other = (full, few) if full.mean_s <= few.mean_s else (few, full)
        return other if self._small_steps % self._probe_every == 0 else best

    def preferred(self, tokens: int = 1) -> int:
        """The thread count auto mode currently prefers for small steps of `tokens` tokens
        (the fixed count outside auto mode or before enough timings)."""
        arms = self._arms.get(tokens)
        if not self.auto or arms is None or min(a.samples for a in arms) < WARMUP_SAMPLES:
            return self.few
        return min(arms, key=lambda a: a.mean_s).threads

    def idle(self) -> None:
        """The engine waits for work: the running cycle is not a step cycle (not timed)."""
        self._timing = None

    def shares_cores_with(self, requests: Mapping[str, Request]) -> bool:
        """True when a step over few `requests` (at most small_step_tokens of them) may run on
        every kernel thread (a prefill always does) on a machine with more than one."""
        return self._kernels is not None and self.full > 1 and len(requests) <= self._small

    def before_step(self, requests: Mapping[str, Request]) -> None:
        if self._kernels is None or self.full == 1:
            return
        if self.few != self.full:
            threads = self._kernels.num_threads = self.threads_for(requests)
            self.shares_cores = threads == self.full and self._small_tokens_seen
        else:
            self.shares_cores = self.small_step_tokens(requests) is not None

    def restore(self) -> None:
        """Back to the full thread count (when the engine stops serving)."""
        self._timing = None
        if self._kernels is not None:
            self._kernels.num_threads = self.full
