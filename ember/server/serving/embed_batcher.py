"""A micro-batcher for one embedding model: concurrent requests share forward passes.

Requests that arrive while a forward pass runs wait in a queue; the next step takes every
waiting request up to the embedder's token budget (`Embedder.max_num_batched_tokens`; a single
larger request goes alone) and runs them as ONE `Embedder.embed_ids` call (sorted by length and
packed without padding there), then hands each request its own rows. An idle batcher starts a
request at once: batching adds no latency, it only fills the steps that concurrency creates.
One forward runs at a time per model (in a worker thread, so the event loop keeps serving).

Each request is validated on its own before it joins a step (`Embedder.check`), so one bad
request is that request's 400 and never fails the others packed with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass

import torch

from ember.engine.embedder import Embedder

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    seqs: list[list[int]]
    future: asyncio.Future[torch.Tensor]

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.seqs)


@dataclass
class BatcherStats:
    """Counts since start (for tests, /stats and benchmarks)."""

    steps: int = 0
    """Forward steps (`embed_ids` calls)."""
    requests: int = 0
    """Requests answered (or failed) by those steps."""
    max_requests_per_step: int = 0


class EmbedBatcher:
    """Packs the concurrent requests of one embedder into shared steps (module docstring)."""

    def __init__(self, embedder: Embedder, max_step_tokens: int | None = None) -> None:
        self.embedder = embedder
        self.max_step_tokens = max_step_tokens or embedder.max_num_batched_tokens
        """A step takes more waiting requests while their tokens fit this budget."""
        self.stats = BatcherStats()
        self._pending: deque[_Job] = deque()
        self._worker: asyncio.Task[None] | None = None

    async def embed(self, seqs: list[list[int]], truncate: int | None = None) -> torch.Tensor:
        """(len(seqs), dim) float32 embeddings, in order; InvalidRequestError for a bad
        input (raised before the request joins a step)."""
        seqs = self.embedder.check(seqs, truncate)
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        self._pending.append(_Job(seqs, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())
        return await future

    def _take(self) -> list[_Job]:
        """The next step's requests: the oldest one, then more in arrival order while the
        step's tokens stay within the budget (cancelled requests are dropped)."""
        jobs: list[_Job] = []
        tokens = 0
        while self._pending:
            job = self._pending[0]
            if job.future.done():  # the client went away before its step
                self._pending.popleft()
                continue
            if jobs and tokens + job.tokens > self.max_step_tokens:
                break
            jobs.append(self._pending.popleft())
            tokens += job.tokens
        return jobs

    async def _work(self) -> None:
        while jobs := self._take():
            seqs = [s for job in jobs for s in job.seqs]
            try:
                out = await asyncio.to_thread(self.embedder.embed_ids, seqs)
            except asyncio.CancelledError:
                for job in jobs:
                    job.future.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - each request of the step gets it
                logger.exception("embedding step failed")
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            self.stats.steps += 1
            self.stats.requests += len(jobs)
            self.stats.max_requests_per_step = max(self.stats.max_requests_per_step, len(jobs))
            offset = 0
            for job in jobs:
                n = len(job.seqs)
                if not job.future.done():
                    job.future.set_result(out[offset:offset + n])  # (n, dim)
                offset += n

    async def close(self) -> None:
        """Stop the worker (waiting requests are cancelled)."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        for job in self._pending:
            job.future.cancel()
        self._pending.clear()
