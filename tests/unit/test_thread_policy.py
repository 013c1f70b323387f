"""KernelThreadPolicy: fixed front-end thread reservation and the timed auto mode."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest

from ember.engine.thread_policy import PROBE_EVERY, WARMUP_SAMPLES, KernelThreadPolicy


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def requests(*pending: int) -> dict[str, Any]:
    """Live requests with `pending` tokens left to compute each."""
    return {f"r{i}": SimpleNamespace(num_tokens=10 + p, num_computed_tokens=10)
            for i, p in enumerate(pending)}


def drive(policy: KernelThreadPolicy, kernels: SimpleNamespace, clock: FakeClock,
          cost_s: dict[int, float], steps: int, reqs: dict[str, Any]) -> Counter[int]:
    """Run `steps` steps whose cycle takes cost_s[threads]; count the thread counts used."""
    used: Counter[int] = Counter()
    for _ in range(steps):
        policy.before_step(reqs)
        used[kernels.num_threads] += 1
        clock.now += cost_s[kernels.num_threads]
    return used


def make(frontend_threads: int | None, full: int = 2) -> tuple[KernelThreadPolicy,
                                                                SimpleNamespace, FakeClock]:
    kernels = SimpleNamespace(num_threads=full)
    clock = FakeClock()
    policy = KernelThreadPolicy(kernels, frontend_threads, 4, clock=clock)  # type: ignore[arg-type]
    return policy, kernels, clock


def test_fixed_reservation_on_small_steps_only() -> None:
    policy, kernels, _ = make(1)
    policy.before_step(requests(1))
    assert kernels.num_threads == 1
    policy.before_step(requests(16))  # a 16-token prefill is not small
    assert kernels.num_threads == 2
    policy.before_step(requests(*[1] * 5))  # five decoding clients: not small
    assert kernels.num_threads == 2
    policy.restore()
    assert kernels.num_threads == 2


def test_fixed_zero_keeps_every_thread() -> None:
    policy, kernels, clock = make(0)
    assert drive(policy, kernels, clock, {2: 0.01}, 50, requests(1)) == Counter({2: 50})


@pytest.mark.parametrize(("cost", "winner"), [({2: 0.010, 1: 0.006}, 1),
                                              ({2: 0.006, 1: 0.010}, 2)])
def test_auto_keeps_the_faster_thread_count(cost: dict[int, float], winner: int) -> None:
    policy, kernels, clock = make(None)
    used = drive(policy, kernels, clock, cost, 320, requests(1))
    loser = 3 - winner
    assert policy.preferred(1) == winner
    # warm-up alternates, then only one step in PROBE_EVERY tries the slower count
    assert used[loser] <= WARMUP_SAMPLES + 1 + 320 // PROBE_EVERY
    assert used[winner] >= 320 - used[loser]


def test_auto_follows_a_change_in_load() -> None:
    policy, kernels, clock = make(None)
    drive(policy, kernels, clock, {2: 0.006, 1: 0.010}, 200, requests(1))
    assert policy.preferred(1) == 2
    # the machine gets busy: every thread now stalls at barriers
    drive(policy, kernels, clock, {2: 0.020, 1: 0.010}, 600, requests(1))
    assert policy.preferred(1) == 1
    used = drive(policy, kernels, clock, {2: 0.020, 1: 0.010}, 64, requests(1))
    assert used[1] >= 60


def test_auto_does_not_time_idle_gaps_or_large_steps() -> None:
    policy, kernels, clock = make(None)
    drive(policy, kernels, clock, {2: 0.006, 1: 0.010}, 100, requests(1))
    assert policy.preferred(1) == 2
    for _ in range(20):  # every step on 2 threads is followed by a long idle wait
        policy.before_step(requests(1))
        threads = kernels.num_threads
        clock.now += 0.006 if threads == 2 else 0.010
        if threads == 2:
            policy.idle()
            clock.now += 5.0
    assert policy.preferred(1) == 2
    # large steps run on every thread and do not count as small-step cycles
    assert drive(policy, kernels, clock, {2: 1.0, 1: 1.0}, 10, requests(64)) == Counter({2: 10})
    assert policy.preferred(1) == 2


def test_auto_with_one_kernel_thread_does_nothing() -> None:
    policy, kernels, clock = make(None, full=1)
    assert drive(policy, kernels, clock, {1: 0.01}, 20, requests(1)) == Counter({1: 20})


def test_cli_frontend_threads_values() -> None:
    from ember.cli.serve import _frontend_threads

    assert _frontend_threads("auto") is None
    assert _frontend_threads("0") == 0
    assert _frontend_threads("2") == 2
    import argparse

    for bad in ("-1", "two"):
        with pytest.raises(argparse.ArgumentTypeError, match="auto"):
            _frontend_threads(bad)


def test_shares_cores_marks_small_steps_on_every_thread() -> None:
    """The step hand-off applies to small steps that left no core to the front end."""
    policy, _, _ = make(0)
    policy.before_step(requests(1))
    assert policy.shares_cores
    policy.before_step(requests(16))  # a prefill is no small step
    assert not policy.shares_cores
    policy.before_step(requests(*[1] * 5))
    assert not policy.shares_cores
    policy, _, _ = make(1)  # a core is left free: nothing to hand over
    policy.before_step(requests(1))
    assert not policy.shares_cores
    policy, kernels, clock = make(None)  # auto: only the every-thread arm shares cores
    for _ in range(8):
        policy.before_step(requests(1))
        assert policy.shares_cores == (kernels.num_threads == 2)
        clock.now += 0.01
    policy, _, _ = make(0, full=1)
    policy.before_step(requests(1))
    assert not policy.shares_cores


def test_shares_cores_with_few_requests_whatever_their_tokens() -> None:
    """A prefill of one or a few requests runs on every thread in every mode."""
    for frontend_threads in (0, 1, None):
        policy, _, _ = make(frontend_threads)
        assert policy.shares_cores_with(requests(16))
        assert not policy.shares_cores_with(requests(*[1] * 5))
    policy, _, _ = make(0, full=1)
    assert not policy.shares_cores_with(requests(16))


def test_auto_is_not_thrown_off_by_rare_stalls() -> None:
    """Every thread is faster on average, but one cycle in 100 on every thread is a 100 ms
    stall (a preempted barrier). A running mean pulled up by one stall kept the slower count for
    hundreds of steps (the other count is only probed one step in PROBE_EVERY); clipping such
    cycles at twice the recent median keeps the faster count."""
    policy, kernels, clock = make(None)
    used: Counter[int] = Counter()
    full_cycles = 0
    for _ in range(4000):
        policy.before_step(requests(1))
        threads = kernels.num_threads
        used[threads] += 1
        if threads == 2:
            full_cycles += 1
            clock.now += 0.100 if full_cycles % 100 == 0 else 0.006
        else:
            clock.now += 0.008
    assert policy.preferred(1) == 2
    assert used[2] >= 0.9 * 4000, used
