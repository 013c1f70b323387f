"""AsyncEngine: the asyncio front of `LLMEngine`, used by the HTTP server.

The engine step is CPU-bound torch code, so it runs in ONE dedicated thread that owns the
`LLMEngine` (torch releases the GIL inside kernels, so the event loop stays responsive). The
event loop talks to that thread only through a thread-safe command queue (add, abort, stop);
the thread hands each request's outputs to the request's own `Mailbox` (one pending output,
later ones merged into it) with one `loop.call_soon_threadsafe` per step. Requests that arrive
while others decode are added before the next step, so they join the running batch (continuous
batching). An abort is applied before the next step, so the request's KV blocks are free within
one engine step.

Supervision: a watchdog thread checks that no step runs past `step_deadline_s`. When a step
raises or hangs, every in-flight request ends with `EngineStepError` (a 500 `engine_error`),
and a fresh engine (same loaded weights, new KV cache and scheduler) takes over on a new thread
(a hung thread is abandoned: when its step returns it sees it is stale and exits).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from ember.config import EngineConfig
from ember.engine.engine import LLMEngine, Prompt, ProcessedPrompt
from ember.engine.generation_defaults import GenerationDefaults
from ember.engine.async_parts import (_MAX_RESTARTS_PER_MINUTE, EngineDeadError, EngineStats,
                                      EngineStepError, EngineUnavailableError, RequestObserver,
                                      RequestStream, _Abort, _Add, _Command, _deliver, _Stop,
                                      _Stream, _Tracked)
from ember.engine.mailbox import Item, Mailbox
from ember.engine.thread_policy import KernelThreadPolicy
from ember.loading.loader import ProgressFn
from ember.sampling.grammar_compiler import GrammarCompiler
from ember.spec_decode.decoder import SpecDecoder
from ember.tokenizer import Tokenizer
from ember.types import RequestOutput, SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["AsyncEngine", "EngineDeadError", "EngineStats", "EngineStepError",
           "EngineUnavailableError", "RequestObserver", "RequestStream"]


class AsyncEngine:
    """Runs an `LLMEngine` on a background thread and streams outputs to asyncio code.

    Args:
        engine: the engine; after `start()` only the engine thread touches it.
        observer: optional receiver of per-request latencies (called on the engine thread).

    Usage:
        engine = AsyncEngine(LLMEngine.from_config(config)); engine.start()
        stream = engine.add_request("id", "Hello", SamplingParams(max_tokens=8))
        try:
            async for out in stream: print(out.outputs[0].delta_text)
        finally:
            stream.close()
        await engine.shutdown(grace_s=30)
    """

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

    @classmethod
    def from_config(cls, config: EngineConfig, progress: ProgressFn | None = None,
                    observer: RequestObserver | None = None) -> AsyncEngine:
        """Load the model (blocking; call it in a worker thread from async code)."""
        return cls(LLMEngine.from_config(config, progress), observer)

    # ---- read-only views (safe from any thread) -------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        return self._engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self._engine.max_model_len

    @property
    def config(self) -> EngineConfig:
        return self._engine.config

    @property
    def generation_defaults(self) -> GenerationDefaults:
        """The model's default sampling values (for requests that leave them out)."""
        return self._engine.generation_defaults

    @property
    def grammar_compiler(self) -> GrammarCompiler:
        """Validates structured-output constraints (thread-safe)."""
        return self._engine.core.structured.compiler

    @property
    def vocab_size(self) -> int:
        return self._engine.loaded.arch.vocab_size

    @property
    def num_kv_tokens(self) -> int:
        """Tokens the whole KV cache holds (what one request can never exceed)."""
        return self._engine.core.layout.kv_tokens

    @property
    def is_running(self) -> bool:
        """True while the engine serves (or restarts after a failed step)."""
        if self._error is not None:
            return False
        if self._restarting:
            return True
        return self._thread is not None and self._thread.is_alive()

    @property
    def restarting(self) -> bool:
        """True while a fresh engine replaces one whose step failed or hung."""
        return self._restarting and self._error is None

    @property
    def accepting(self) -> bool:
        """True while new requests are taken (started, not draining, not failed); requests
        that arrive during a restart wait for the new engine."""
        return self._accepting and self.is_running

    @property
    def error(self) -> BaseException | None:
        """The exception that stopped the engine for good, if any."""
        return self._error

    @property
    def num_in_flight_seqs(self) -> int:
        """Sequences (n per request) handed in and not yet finished by the engine."""
        return self._in_flight_seqs

    def stats(self) -> EngineStats:
        """The latest snapshot (at most one step old)."""
        return dataclasses.replace(self._stats, num_restarts=len(self._restart_times_all))

    def set_observer(self, observer: RequestObserver | None) -> None:
        self._observer = observer

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread and its watchdog (once)."""
        if self._thread is not None:
            raise RuntimeError("AsyncEngine already started")
        self._thread = self._spawn(self._run, self._gen)
        self._watchdog = threading.Thread(target=self._watch, name="ember-watchdog",
                                          daemon=True)
        self._watchdog.start()

    def stop_accepting(self) -> None:
        """Refuse new requests from now on; running ones continue."""
        self._accepting = False

    async def shutdown(self, grace_s: float = 0.0) -> None:
        """Stop accepting, let in-flight requests finish for up to `grace_s` seconds, abort
        the rest, and stop the engine thread."""
        await self._drain_for_shutdown(grace_s)
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._commands.put(_Stop())
            await asyncio.to_thread(thread.join, self._deadline_s)
        if self._tracked:  # a hung or failed engine never answered the stop
            with self._lock:
                self._fail_tracked(EngineUnavailableError("the server is shutting down"))

    async def _drain_for_shutdown(self, grace_s: float) -> None:
        """Stop accepting, wait up to `grace_s` for in-flight sequences, then mark stopping."""
        self._accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self._in_flight_seqs > 0 and self.is_running and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self._in_flight_seqs > 0:
            logger.warning("shutdown: aborting %d unfinished sequences", self._in_flight_seqs)
        self._stopping = True

    # ---- requests -------------------------------------------------------------------------

    def process_prompt(self, prompt: Prompt, params: SamplingParams) -> ProcessedPrompt:
        """Tokenize and validate a prompt without queueing it (raises InvalidRequestError)."""
        return self._engine.process_prompt(prompt, params)

    def add_request(self, request_id: str, prompt: Prompt | ProcessedPrompt,
                    params: SamplingParams, priority: int = 0) -> RequestStream:
        """Queue a request; returns the stream of its outputs (call from the event loop).

        Raises:
            EngineUnavailableError: shutting down, not started, or the engine failed.
            InvalidRequestError: (while iterating) the engine refused the request.
        """
        if self._error is not None:
            raise EngineDeadError(f"the engine failed: {self._error}")
        if not self.accepting:
            raise EngineUnavailableError("the server is shutting down")
        if isinstance(prompt, ProcessedPrompt):
            prompt = prompt.token_ids
        self._in_flight_seqs += params.n
        stream = RequestStream(self, request_id, params.n)
        self._commands.put(_Add(request_id, prompt, params, priority, time.monotonic(),
                                _Stream(asyncio.get_running_loop(), stream.mailbox)))
        return stream

    async def generate(self, request_id: str, prompt: Prompt | ProcessedPrompt,
                       params: SamplingParams, priority: int = 0
                       ) -> AsyncIterator[RequestOutput]:
        """`add_request` as an async generator; leaving it early aborts the request."""
        stream = self.add_request(request_id, prompt, params, priority)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if unknown or finished); thread-safe, non-blocking."""
        self._commands.put(_Abort(request_id))

    # ---- engine thread --------------------------------------------------------------------

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
                    if not self._step(gen):
                        return  # stale: a new engine took over while this step hung
                self._publish_stats()
        except BaseException as exc:  # noqa: BLE001 - report any failure to every waiter
            self._step_started = None
            self._on_failure(gen, exc, hung=False)
            return
        self._threads.restore()
        logger.info("engine thread stopped")

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
            self._dispatch(pending)
        return True

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

    def _dispatch(self, items: list[tuple[_Stream, Item]]) -> None:
        """Hand outputs to their event loops: one thread-safe call per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Mailbox, Item]]] = {}
        for stream, item in items:
            by_loop.setdefault(stream.loop, []).append((stream.mailbox, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                logger.debug("dropping %d outputs for a closed event loop", len(batch))

    def _fail_tracked(self, exc: BaseException) -> None:
        """End every tracked request with `exc` (call with the lock held)."""
        pending: list[tuple[_Stream, Item]] = [(t.stream, exc) for t in self._tracked.values()]
        self._counters["failed"] += len(pending)
        self._tracked = {}
        self._dispatch(pending)

    # ---- supervision ----------------------------------------------------------------------

    def _watch(self, _gen: int = 0) -> None:
        """Watchdog thread: restart the engine when a step runs past the deadline."""
        period = min(0.25, self._deadline_s / 4)
        while not self._stopping and self._error is None:
            time.sleep(period)
            started, gen = self._step_started, self._gen
            if started is not None and time.monotonic() - started > self._deadline_s:
                self._on_failure(gen, TimeoutError(
                    f"an engine step ran past the {self._deadline_s:g} s step deadline"),
                    hung=True)

    def _on_failure(self, gen: int, exc: BaseException, hung: bool) -> None:
        """A step of generation `gen` raised or hung: fail its requests, start a new engine."""
        with self._lock:
            if gen != self._gen or self._stopping:
                return
            self._gen += 1
            self._step_started = None
            now = time.monotonic()
            self._restart_times_all.append(now)
            self._restart_times = [t for t in self._restart_times if now - t < 60] + [now]
            reason = f"{type(exc).__name__}: {exc}"
            fatal = len(self._restart_times) > _MAX_RESTARTS_PER_MINUTE
            if hung:
                logger.error("engine step hung (%s); restarting the engine", exc)
            else:
                logger.error("engine step failed; %s", "giving up (too many failures)" if fatal
                             else "restarting the engine", exc_info=exc)
            self._fail_tracked(EngineStepError(
                f"the engine failed while running this request ({reason}); "
                + ("it is down" if fatal else "it restarted, retry the request")))
            if fatal:
                self._error = exc
                self._fail_queued(EngineDeadError(f"the engine failed: {reason}"))
                return
            self._restarting = True
            new_gen = self._gen
        self._spawn(self._reboot, new_gen)

    def _reboot(self, gen: int) -> None:
        """New-engine thread: build a fresh engine on the loaded weights, then serve."""
        if self._install_fresh_engine(gen):
            self._run(gen)

    def _install_fresh_engine(self, gen: int) -> bool:
        """Build a fresh engine on the loaded weights and make it current for generation
        `gen`; False when the build failed (queued requests end with EngineDeadError) or a
        newer generation took over meanwhile."""
        try:
            engine = LLMEngine(self._engine.config, self._engine.loaded)
        except BaseException as exc:  # noqa: BLE001 - cannot recover from this
            logger.exception("engine restart failed")
            self._error = exc
            self._restarting = False
            self._fail_queued(EngineDeadError(f"the engine failed to restart: {exc}"))
            return False
        with self._lock:
            if gen != self._gen:
                return False
            self._engine = engine
            self._thread = threading.current_thread()
            self._restarting = False
        logger.warning("engine restarted (%d restarts so far)", len(self._restart_times_all))
        return True

    def _fail_queued(self, exc: BaseException) -> None:
        """End requests still waiting in the command queue (the engine is gone)."""
        try:
            while True:
                command = self._commands.get_nowait()
                if isinstance(command, _Add):
                    self._dispatch([(command.stream, exc)])
        except queue.Empty:
            pass

    def _publish_stats(self) -> None:
        sched = self._engine.core.scheduler.stats()
        self._stats = EngineStats(
            num_running=sched.num_running, num_waiting=sched.num_waiting,
            kv_cache_usage=sched.kv_cache_usage, kv_capacity_tokens=self.num_kv_tokens,
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
