"""The engine-thread side of `AsyncEngine`: the command loop, steps, and output dispatch.

`EngineLoop` holds the state both sides share and everything that runs on the engine thread:
commands from the event loop (add, abort, stop) applied before each step, one engine step,
per-request accounting, and the hand-off of each step's outputs to the requests' mailboxes
(one `loop.call_soon_threadsafe` per event loop per step). After a small step that used every
core it waits for the front end to take the outputs (`StepHandoff`), so SSE work does not run
during the next step's parallel region. Supervision (deadline, restart) is in `supervisor.py`;
the public asyncio API in `async_engine.py`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

from ember.engine.async_parts import (EngineStats, EngineUnavailableError, RequestObserver,
                                      _Abort, _Add, _Command, _deliver, _Stream, _Tracked)
from ember.engine.engine import LLMEngine
from ember.engine.handoff import StepHandoff
from ember.engine.mailbox import Item, Mailbox, merge_outputs
from ember.engine.thread_policy import KernelThreadPolicy
from ember.spec_decode.decoder import SpecDecoder
from ember.types import RequestOutput

logger = logging.getLogger(__name__)


class EngineLoop:
    """State of an `AsyncEngine` and its engine-thread loop (see `AsyncEngine`)."""

    def __init__(self, engine: LLMEngine, observer: RequestObserver | None = None) -> None:
        self._engine = engine
        self._observer = observer
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._stopping = False
        self._error: BaseException | None = None
        self._stats = EngineStats()
        self._in_flight_seqs = 0
        """Sequences of requests handed in and not yet finished (event-loop side)."""
        guards = engine.config.server.guards
        self._deadline_s = guards.step_deadline_s
        self._fault_hook = guards.fault_hook
        self._threads = KernelThreadPolicy(engine.core.kernels, guards.frontend_threads,
                                           guards.small_step_tokens)
        self._handoff = StepHandoff(guards.step_handoff_timeout_s)
        self._handoff_on = guards.step_handoff_timeout_s > 0
        self._stream_interval_s = guards.stream_interval_s
        self._held: dict[int, tuple[_Stream, RequestOutput]] = {}
        """Outputs held back by stream_interval_s (engine thread): id(mailbox) -> merged."""
        self._last_release = 0.0
        self._added_on: set[asyncio.AbstractEventLoop] = set()
        """Event loops of requests added since the last step (engine thread)."""
        # Supervision: `_lock` guards the generation switch and everything a stale thread
        # must not touch (tracked requests, dispatch); the step itself runs without it.
        self._lock = threading.Lock()
        self._gen = 0
        self._restarting = False
        self._restart_times: list[float] = []
        self._restart_times_all: list[float] = []
        self._step_started: float | None = None
        self._watchdog: threading.Thread | None = None
        # Engine-thread state (never touched from the event loop).
        self._tracked: dict[str, _Tracked] = {}
        self._counters: Counter[str] = Counter()
        self._finish_reasons: Counter[str] = Counter()

    def _on_failure(self, gen: int, exc: BaseException, hung: bool) -> None:
        raise NotImplementedError  # supervisor.py

    @staticmethod
    def _spawn(target: Callable[[int], None], gen: int) -> threading.Thread:
        thread = threading.Thread(target=target, args=(gen,), name=f"ember-engine-{gen}",
                                  daemon=True)
        thread.start()
        return thread

    def _run(self, gen: int) -> None:
        logger.info("engine thread started")
        try:
            while self._handle_commands(gen, block=self._idle()):
                if self._engine.has_unfinished_requests():
                    self._settle_new_requests()
                    if not self._step(gen):
                        return  # stale: a new engine took over while this step hung
                    # NOTE: only here, on the engine's own thread (an inline engine steps on
                    # the loop it would wait for).
                    self._handoff.wait()
                self._publish_stats()
        except BaseException as exc:  # noqa: BLE001 - report any failure to every waiter
            self._step_started = None
            self._on_failure(gen, exc, hung=False)
            return
        self._threads.restore()
        logger.info("engine thread stopped")

    def _settle_new_requests(self) -> None:
        """With few requests, let the loops that just added some finish that work (response
        headers, stream set-up) before the step: it would preempt the prefill (TTFT)."""
        loops, self._added_on = self._added_on, set()
        if not (self._handoff_on and loops and self._threads.shares_cores_with(
                self._engine.core.scheduler.requests)):
            return
        for loop in loops:
            self._handoff.watch(loop, ())
        self._handoff.wait()

    def _idle(self) -> bool:
        """True when the engine has nothing to step (it waits for a command)."""
        if self._engine.has_unfinished_requests():
            return False
        self._threads.idle()  # the wait is no step cycle: not timed
        return True

    def _handle_commands(self, gen: int, block: bool) -> bool:
        """Apply queued commands (waiting for one when `block`); False after a stop."""
        try:
            command = self._commands.get() if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        pending: list[tuple[_Stream, Item]] = []
        keep_running = True
        with self._lock:
            if gen != self._gen:
                self._commands.put(command)  # for the engine that replaced this one
                return False
            while True:
                if isinstance(command, _Add):
                    self._apply_add(command, pending)
                elif isinstance(command, _Abort):
                    self._apply_abort([command.request_id], pending)
                else:
                    self._apply_abort(list(self._tracked), pending)
                    keep_running = False
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
            self._dispatch(pending)
        if not keep_running:
            self._publish_stats()
        return keep_running

    def _apply_add(self, cmd: _Add, pending: list[tuple[_Stream, Item]]) -> None:
        try:
            self._engine.add_request(cmd.request_id, cmd.prompt, cmd.params, cmd.priority,
                                     arrival_time=cmd.arrival)
        except Exception as exc:  # noqa: BLE001 - delivered to the caller, not fatal
            pending.append((cmd.stream, exc))
            return
        self._tracked[cmd.request_id] = _Tracked(cmd.stream, cmd.arrival)
        self._added_on.add(cmd.stream.loop)
        self._counters["added"] += 1

    def _apply_abort(self, request_ids: list[str], pending: list[tuple[_Stream, Item]]) -> None:
        live = [rid for rid in request_ids if rid in self._tracked]
        if not live:
            return
        now = time.monotonic()
        for final in self._engine.abort_request(live):
            tracked = self._tracked.pop(final.request_id, None)
            if tracked is not None:
                self._counters["aborted"] += 1
                self._finish(tracked, final, now)
                pending.append((tracked.stream, final))
        for rid in live:  # requests the engine no longer knew (should not happen)
            if (tracked := self._tracked.pop(rid, None)) is not None:
                self._counters["failed"] += 1
                pending.append((tracked.stream, EngineUnavailableError("request aborted")))

    def _step(self, gen: int) -> bool:
        """One engine step and its outputs; False when this thread turned out stale."""
        step_start = time.monotonic()
        self._threads.before_step(self._engine.core.scheduler.requests)
        self._step_started = step_start
        if self._fault_hook is not None:
            self._fault_hook(self._counters["steps"])
        outputs = self._engine.step()
        now = time.monotonic()
        with self._lock:
            if gen != self._gen:
                return False
            self._step_started = None
            self._counters["steps"] += 1
            pending: list[tuple[_Stream, Item]] = []
            for out in outputs:
                tracked = self._tracked.get(out.request_id)
                if tracked is None:
                    continue
                self._account(tracked, out, step_start, now)
                if out.finished:
                    del self._tracked[out.request_id]
                    self._finish(tracked, out, now)
                pending.append((tracked.stream, out))
            for rid, tracked in self._tracked.items():
                if tracked.queue_time is None:
                    scheduled = self._engine.first_scheduled_time(rid)
                    if scheduled is not None:
                        tracked.queue_time = max(0.0, scheduled - tracked.arrival)
            if self._hold(pending, now):
                return True
            self._last_release = now
            self._dispatch(pending, handoff=self._handoff_on and self._threads.shares_cores)
        return True

    def _hold(self, pending: list[tuple[_Stream, Item]], now: float) -> bool:
        """Keep this step's outputs back (True) when they are all plain stream updates (no
        first token, no final output) and stream_interval_s has not passed since the last
        release; the next release merges them in front of newer ones (`_dispatch`)."""
        if now - self._last_release >= self._stream_interval_s or any(
                not isinstance(item, RequestOutput) or item.finished
                or any(len(c.token_ids) == len(c.delta_token_ids) for c in item.outputs)
                for _, item in pending):
            return False
        for stream, item in pending:
            assert isinstance(item, RequestOutput)
            key = id(stream.mailbox)
            held = self._held.get(key)
            self._held[key] = (stream, item if held is None else merge_outputs(held[1], item))
        return True

    def _with_held(self, stream: _Stream, item: Item) -> tuple[_Stream, Item]:
        """`item` with the request's held-back output merged in front (an error replaces it)."""
        held = self._held.pop(id(stream.mailbox), None)
        if held is None or not isinstance(item, RequestOutput):
            return stream, item
        return stream, merge_outputs(held[1], item)

    def _account(self, tracked: _Tracked, out: RequestOutput, step_start: float,
                 now: float) -> None:
        """Token counters and latency observations for one step output."""
        num_new = sum(len(c.delta_token_ids) for c in out.outputs)
        if num_new == 0:
            return
        self._counters["generation_tokens"] += num_new
        if tracked.last_token_time is None:
            self._counters["prompt_tokens"] += len(out.prompt_token_ids)
            if tracked.queue_time is None:
                tracked.queue_time = max(0.0, step_start - tracked.arrival)
            if self._observer is not None:
                self._observer.on_first_token(now - tracked.arrival, tracked.queue_time)
        elif self._observer is not None:
            self._observer.on_inter_token(now - tracked.last_token_time)
        tracked.last_token_time = now

    def _finish(self, tracked: _Tracked, out: RequestOutput, now: float) -> None:
        reasons = [c.finish_reason or "abort" for c in out.outputs]
        self._counters["finished"] += 1
        self._finish_reasons.update(reasons)
        if self._observer is not None:
            self._observer.on_finished(now - tracked.arrival, reasons)

    def _dispatch(self, items: list[tuple[_Stream, Item]], handoff: bool = False) -> None:
        """Hand outputs to their event loops: one thread-safe call per loop; with `handoff`,
        the engine's next `_handoff.wait()` waits for the loops to take them."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Mailbox, Item]]] = {}
        for stream, item in [self._with_held(stream, item) for stream, item in items]:
            by_loop.setdefault(stream.loop, []).append((stream.mailbox, item))
        for loop, batch in by_loop.items():
            try:
                if not handoff:
                    loop.call_soon_threadsafe(_deliver, batch)
                elif not self._handoff.watch(loop, [box for box, _ in batch],
                                             functools.partial(_deliver, batch)):
                    raise RuntimeError("closed")
            except RuntimeError:  # the loop is closed: nobody is listening any more
                logger.debug("dropping %d outputs for a closed event loop", len(batch))

    def _fail_tracked(self, exc: BaseException) -> None:
        """End every tracked request with `exc` (call with the lock held)."""
        pending: list[tuple[_Stream, Item]] = [(t.stream, exc) for t in self._tracked.values()]
        self._counters["failed"] += len(pending)
        self._tracked = {}
        self._dispatch(pending)

    def _publish_stats(self) -> None:
        sched = self._engine.core.scheduler.stats()
        self._stats = EngineStats(
            num_running=sched.num_running, num_waiting=sched.num_waiting,
            kv_cache_usage=sched.kv_cache_usage,
            kv_capacity_tokens=self._engine.core.layout.kv_tokens,
            prefix_cache_queries=sched.prefix_cache_queries,
            prefix_cache_hits=sched.prefix_cache_hits, num_preemptions=sched.num_preemptions,
            prompt_tokens=self._counters["prompt_tokens"],
            generation_tokens=self._counters["generation_tokens"],
            num_aborted=self._counters["aborted"],
            finished_by_reason=MappingProxyType(dict(self._finish_reasons)),
            num_steps=self._counters["steps"], num_added=self._counters["added"],
            num_finished=self._counters["finished"], num_failed=self._counters["failed"],
            **_spec_stats(self._engine.core.spec))


def _spec_stats(spec: SpecDecoder | None) -> dict[str, Any]:
    """EngineStats fields of speculative decoding (empty when it is off)."""
    if spec is None:
        return {}
    stats = spec.stats
    return {"spec_num_draft_tokens": stats.num_draft_tokens,
            "spec_num_accepted_tokens": stats.num_accepted_tokens,
            "spec_accepted_per_position": tuple(stats.accepted_per_position)}
