"""Step hand-off: the front end's per-token work runs between engine steps, not during one.

Ember's fused decoder runs a step in one OpenMP parallel region with a barrier after each
stage. When a small step (one to a few streams) uses every core, the event loop's work for the
previous step's outputs (RequestStream -> SSE JSON -> socket write) wakes up during the next
step, preempts one kernel thread, and every other thread spins at the next barrier until that
core comes back: one stream ran at 40 tok/s this way against 100 with a core left free.

`StepHandoff` serialises the two instead, as `ember run-batch` does by stepping on the loop
(`inline_engine.py`) but keeping the step on its supervised thread: after such a step the
engine thread hands the outputs to the loop(s) and waits until each loop has let the readers
take them (their mailboxes are empty) and has nothing ready to run any more (the SSE writes are
done; at most `SETTLE_HOPS` further iterations on a loop that stays busy), at most `timeout_s`.
A reader that does not take its output (a stalled client) does not hold the engine up: the
loop acknowledges after `MAX_HOPS` iterations whatever the mailboxes hold.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence

from ember.engine.mailbox import Mailbox

logger = logging.getLogger(__name__)

SETTLE_HOPS = 3
"""Most loop iterations run after the readers took their outputs (SSE encoding, the send
task); the loop acknowledges earlier as soon as it has nothing ready (`_loop_idle`)."""
MAX_HOPS = 12
"""Loop iterations after which the loop acknowledges whatever the mailboxes hold."""


class StepHandoff:
    """One engine thread's wait for its event loops after a step (engine-thread owned).

    Args:
        timeout_s: the longest the engine waits for the loops (a busy loop, e.g. one
            answering a large request, does not stall decoding for longer than this).
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._pending = 0
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.waits = 0
        """Waits done (for tests and profiles)."""
        self.timeouts = 0
        """Waits that ran into `timeout_s`."""

    def watch(self, loop: asyncio.AbstractEventLoop, boxes: Sequence[Mailbox],
              deliver: Callable[[], None] | None = None) -> bool:
        """Ask `loop` to run `deliver` (put the outputs in `boxes`), then acknowledge once
        its readers took them: one wake-up of the loop (call from the engine thread).
        False when the loop is closed (nothing delivered, nobody to wait for)."""
        with self._lock:
            if self._pending == 0:
                self._done.clear()
            self._pending += 1
        try:
            loop.call_soon_threadsafe(self._start, deliver, boxes)
        except RuntimeError:  # the loop is closed
            self._ack()
            return False
        return True

    def _start(self, deliver: Callable[[], None] | None, boxes: Sequence[Mailbox]) -> None:
        if deliver is not None:
            deliver()
        self._check(boxes, 0, -1)

    def wait(self) -> None:
        """Block until every watched loop acknowledged, at most `timeout_s`."""
        with self._lock:
            if self._pending == 0:
                return
        self.waits += 1
        if not self._done.wait(self.timeout_s):
            self.timeouts += 1
            with self._lock:
                self._pending = 0  # late acknowledgements are ignored (see _ack)

    def _check(self, boxes: Sequence[Mailbox], hops: int, taken_at: int) -> None:
        """Runs on the loop, once per iteration, until the readers took their outputs."""
        loop = asyncio.get_running_loop()
        if taken_at < 0 and all(box.pending_since is None for box in boxes):
            taken_at = hops
        if (taken_at >= 0 and (hops - taken_at >= SETTLE_HOPS or _loop_idle(loop))
                or hops >= MAX_HOPS):
            self._ack()
            return
        loop.call_soon(self._check, boxes, hops + 1, taken_at)

    def _ack(self) -> None:
        with self._lock:
            if self._pending == 0:
                return
            self._pending -= 1
            if self._pending == 0:
                self._done.set()


def _loop_idle(loop: asyncio.AbstractEventLoop) -> bool:
    """True when `loop` has no callback ready to run (the readers' writes are done): the
    engine may step again at once instead of after SETTLE_HOPS more iterations.

    NOTE: reads the ready queue of CPython's asyncio loops (`_ready`, as inline_engine.py's
    `_settle` does); a loop without one is never idle here (SETTLE_HOPS applies).
    """
    ready = getattr(loop, "_ready", None)
    return ready is not None and not ready
