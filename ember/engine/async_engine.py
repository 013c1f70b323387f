"""AsyncEngine: the asyncio front of `LLMEngine`, used by the HTTP server.

The engine step is CPU-bound torch code, so it runs in ONE dedicated thread that owns the
`LLMEngine` (torch releases the GIL inside kernels, so the event loop stays responsive). The
event loop talks to that thread only through a thread-safe command queue (add, abort, stop);
the thread hands each request's outputs to the request's own `asyncio.Queue` with one
`loop.call_soon_threadsafe` per step. Requests that arrive while others decode are added before
the next step, so they join the running batch (continuous batching). An abort is applied before
the next step, so the request's KV blocks are free within one engine step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from ember.config import EngineConfig
from ember.engine.engine import LLMEngine, Prompt, ProcessedPrompt
from ember.engine.generation_defaults import GenerationDefaults
from ember.loading.loader import ProgressFn
from ember.sampling.constrained import GrammarCompiler
from ember.tokenizer import Tokenizer
from ember.types import RequestOutput, SamplingParams

logger = logging.getLogger(__name__)


class EngineUnavailableError(RuntimeError):
    """The engine does not take new requests (shutting down, or it failed)."""


class EngineDeadError(EngineUnavailableError):
    """The engine thread failed; no request can complete."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine, published by the engine thread after each iteration."""

    num_running: int = 0
    """Sequences (completions) being computed."""
    num_waiting: int = 0
    """Sequences queued in the scheduler (including preempted ones)."""
    kv_cache_usage: float = 0.0
    """Fraction of usable KV blocks held by requests."""
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    """Prompt tokens of requests whose prefill completed (total)."""
    generation_tokens: int = 0
    """Generated tokens (total)."""
    num_aborted: int = 0
    """Requests aborted (client gone, or shutdown) (total)."""
    finished_by_reason: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    """Finished completions by finish reason ('stop', 'length', 'abort') (total)."""
    num_steps: int = 0


class RequestObserver(Protocol):
    """Receives per-request latencies from the engine thread (e.g. Prometheus histograms).

    Methods are called on the engine thread and must be cheap and thread-safe.
    """

    def on_first_token(self, ttft_s: float, queue_s: float) -> None: ...

    def on_inter_token(self, seconds: float) -> None: ...

    def on_finished(self, e2e_s: float, finish_reasons: list[str]) -> None: ...


@dataclass
class _Stream:
    """Where the outputs of one request go: a queue owned by an event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]


@dataclass
class _Add:
    request_id: str
    prompt: Prompt
    params: SamplingParams
    priority: int
    arrival: float
    stream: _Stream


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Stop:
    pass


_Command = _Add | _Abort | _Stop


@dataclass
class _Tracked:
    """Engine-thread bookkeeping of one live request."""

    stream: _Stream
    arrival: float
    queue_time: float | None = None
    last_token_time: float | None = None


def _deliver(batch: list[tuple[asyncio.Queue[RequestOutput | BaseException],
                               RequestOutput | BaseException]]) -> None:
    """Runs on the event loop: put each item on its request's queue."""
    for q, item in batch:
        q.put_nowait(item)


class RequestStream:
    """Async iterator over the `RequestOutput`s of one request (created by `add_request`).

    Each output carries cumulative values and the step's deltas. Iteration ends after the
    finished output. `close()` aborts the request if it has not finished (idempotent); always
    call it (e.g. in `finally`), so a client that goes away frees its KV blocks.
    """

    def __init__(self, engine: AsyncEngine, request_id: str, stream: _Stream,
                 num_seqs: int) -> None:
        self.request_id = request_id
        self._engine = engine
        self._stream = stream
        self._num_seqs = num_seqs
        self._done = False
        self._released = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._stream.queue.get()
        if isinstance(item, BaseException):
            self._done = True
            self._release()
            raise item
        if item.finished:
            self._done = True
            self._release()
        return item

    @property
    def finished(self) -> bool:
        return self._done

    def close(self) -> None:
        """Abort the request unless it already finished."""
        if not self._done:
            self._done = True
            self._engine.abort(self.request_id)
        self._release()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._engine._in_flight_seqs -= self._num_seqs


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
        self._error: BaseException | None = None
        self._stats = EngineStats()
        self._in_flight_seqs = 0
        """Sequences of requests handed in and not yet finished (event-loop side)."""
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
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    @property
    def accepting(self) -> bool:
        """True while new requests are taken (started, not draining, not failed)."""
        return self._accepting and self.is_running

    @property
    def error(self) -> BaseException | None:
        """The exception that stopped the engine thread, if any."""
        return self._error

    @property
    def num_in_flight_seqs(self) -> int:
        """Sequences (n per request) handed in and not yet finished."""
        return self._in_flight_seqs

    def stats(self) -> EngineStats:
        """The latest snapshot (at most one step old)."""
        return self._stats

    def set_observer(self, observer: RequestObserver | None) -> None:
        self._observer = observer

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread (once)."""
        if self._thread is not None:
            raise RuntimeError("AsyncEngine already started")
        self._thread = threading.Thread(target=self._run, name="ember-engine", daemon=True)
        self._thread.start()

    def stop_accepting(self) -> None:
        """Refuse new requests from now on; running ones continue."""
        self._accepting = False

    async def shutdown(self, grace_s: float = 0.0) -> None:
        """Stop accepting, let in-flight requests finish for up to `grace_s` seconds, abort
        the rest, and stop the engine thread."""
        self._accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self._in_flight_seqs > 0 and self.is_running and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self._in_flight_seqs > 0:
            logger.warning("shutdown: aborting %d unfinished sequences", self._in_flight_seqs)
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._commands.put(_Stop())
            await asyncio.to_thread(thread.join)

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
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._in_flight_seqs += params.n
        self._commands.put(_Add(request_id, prompt, params, priority, time.monotonic(), stream))
        return RequestStream(self, request_id, stream, params.n)

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

    def _run(self) -> None:
        logger.info("engine thread started")
        try:
            while self._handle_commands(block=not self._engine.has_unfinished_requests()):
                if self._engine.has_unfinished_requests():
                    self._step()
                self._publish_stats()
        except BaseException as exc:  # noqa: BLE001 - report any failure to every waiter
            logger.exception("engine thread failed")
            self._error = exc
            self._fail_all(EngineDeadError(f"the engine failed: {type(exc).__name__}: {exc}"))
        logger.info("engine thread stopped")

    def _handle_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting for one when `block`); False after a stop."""
        try:
            command = self._commands.get() if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        pending: list[tuple[_Stream, RequestOutput | BaseException]] = []
        keep_running = True
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

    def _apply_add(self, cmd: _Add,
                   pending: list[tuple[_Stream, RequestOutput | BaseException]]) -> None:
        try:
            self._engine.add_request(cmd.request_id, cmd.prompt, cmd.params, cmd.priority,
                                     arrival_time=cmd.arrival)
        except Exception as exc:  # noqa: BLE001 - delivered to the caller, not fatal
            pending.append((cmd.stream, exc))
            return
        self._tracked[cmd.request_id] = _Tracked(cmd.stream, cmd.arrival)

    def _apply_abort(self, request_ids: list[str],
                     pending: list[tuple[_Stream, RequestOutput | BaseException]]) -> None:
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
                pending.append((tracked.stream, EngineUnavailableError("request aborted")))

    def _step(self) -> None:
        step_start = time.monotonic()
        outputs = self._engine.step()
        now = time.monotonic()
        self._counters["steps"] += 1
        pending: list[tuple[_Stream, RequestOutput | BaseException]] = []
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
        self._finish_reasons.update(reasons)
        if self._observer is not None:
            self._observer.on_finished(now - tracked.arrival, reasons)

    def _dispatch(self, items: list[tuple[_Stream, RequestOutput | BaseException]]) -> None:
        """Hand outputs to their event loops: one thread-safe call per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, item in items:
            by_loop.setdefault(stream.loop, []).append((stream.queue, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                logger.debug("dropping %d outputs for a closed event loop", len(batch))

    def _fail_all(self, exc: BaseException) -> None:
        pending = [(t.stream, exc) for t in self._tracked.values()]
        self._tracked.clear()
        try:
            self._dispatch(pending)  # type: ignore[arg-type]
            while True:  # requests submitted after the failure
                command = self._commands.get_nowait()
                if isinstance(command, _Add):
                    self._dispatch([(command.stream, exc)])
        except queue.Empty:
            pass

    def _publish_stats(self) -> None:
        sched = self._engine.core.scheduler.stats()
        self._stats = EngineStats(
            num_running=sched.num_running, num_waiting=sched.num_waiting,
            kv_cache_usage=sched.kv_cache_usage,
            prefix_cache_queries=sched.prefix_cache_queries,
            prefix_cache_hits=sched.prefix_cache_hits, num_preemptions=sched.num_preemptions,
            prompt_tokens=self._counters["prompt_tokens"],
            generation_tokens=self._counters["generation_tokens"],
            num_aborted=self._counters["aborted"],
            finished_by_reason=MappingProxyType(dict(self._finish_reasons)),
            num_steps=self._counters["steps"])
