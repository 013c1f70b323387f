"""The pieces the AsyncEngine hands around: its errors, stats snapshot, observer protocol, the
commands the event loop sends to the engine thread, and `RequestStream` (one request's outputs).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

from ember.engine.engine import Prompt
from ember.engine.mailbox import Item, Mailbox
from ember.types import RequestOutput, SamplingParams

if TYPE_CHECKING:
    from ember.engine.async_engine import AsyncEngine


class EngineUnavailableError(RuntimeError):
    """The engine does not take new requests (shutting down, or it failed)."""


class EngineDeadError(EngineUnavailableError):
    """The engine thread failed; no request can complete."""


class EngineStepError(RuntimeError):
    """The engine failed (or hung) while this request ran; the engine restarts by itself."""


_MAX_RESTARTS_PER_MINUTE = 5
"""More engine failures than this within a minute: the engine is declared dead."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine, published by the engine thread after each iteration."""

    num_running: int = 0
    """Sequences (completions) being computed."""
    num_waiting: int = 0
    """Sequences queued in the scheduler (including preempted ones)."""
    kv_cache_usage: float = 0.0
    """Fraction of usable KV blocks held by requests."""
    kv_capacity_tokens: int = 0
    """Tokens the KV cache holds (its blocks x block size)."""
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
    num_added: int = 0
    """Requests the engine took (total); at rest it equals num_finished + num_failed."""
    num_finished: int = 0
    """Requests that finished, aborted ones included (total)."""
    num_failed: int = 0
    """Requests ended by an engine failure (total)."""
    num_restarts: int = 0
    """Engine restarts after a failed or hung step (total)."""
    spec_num_draft_tokens: int = 0
    """Draft tokens verified by speculative decoding (total)."""
    spec_num_accepted_tokens: int = 0
    """Draft tokens accepted (total)."""
    spec_accepted_per_position: tuple[int, ...] = ()
    """Accepted drafts by position in their step (totals)."""


class RequestObserver(Protocol):
    """Receives per-request latencies from the engine thread (e.g. Prometheus histograms).

    Methods are called on the engine thread and must be cheap and thread-safe.
    """

    def on_first_token(self, ttft_s: float, queue_s: float) -> None: ...

    def on_inter_token(self, seconds: float) -> None: ...

    def on_finished(self, e2e_s: float, finish_reasons: list[str]) -> None: ...


@dataclass
class _Stream:
    """Where the outputs of one request go: a mailbox owned by an event loop."""

    loop: asyncio.AbstractEventLoop
    mailbox: Mailbox


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


def _deliver(batch: list[tuple[Mailbox, Item]]) -> None:
    """Runs on the event loop: put each item in its request's mailbox."""
    for box, item in batch:
        box.put(item)


class RequestStream:
    """Async iterator over the `RequestOutput`s of one request (created by `add_request`).

    Each output carries cumulative values and the step's deltas. Iteration ends after the
    finished output. `close()` aborts the request if it has not finished (idempotent); always
    call it (e.g. in `finally`), so a client that goes away frees its KV blocks.
    """

    def __init__(self, engine: AsyncEngine, request_id: str, num_seqs: int) -> None:
        self.request_id = request_id
        self._engine = engine
        self._num_seqs = num_seqs
        self._done = False
        self._released = False
        self.mailbox = Mailbox(on_final=self._release)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self.mailbox.get()
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
        """Stop counting the sequences as in flight (the engine is done with them)."""
        if not self._released:
            self._released = True
            self._engine._in_flight_seqs -= self._num_seqs
