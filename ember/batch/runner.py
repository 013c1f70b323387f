"""Streams an OpenAI Batch input file through a `BatchExecutor` into a `ResultJournal`.

Memory is bounded by `max_in_flight` requests plus the set of custom_ids (needed to refuse
duplicates and to skip what a previous run finished); the input is read line by line. Keep
`max_in_flight` above the engine's max_num_seqs so the scheduler always has work queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ember.batch.executor import BatchExecutor
from ember.batch.format import (DUPLICATE_CODE, BatchLine, LineError, error_line, parse_line,
                                response_line)
from ember.batch.journal import ResultJournal

logger = logging.getLogger(__name__)


@dataclass
class RunStats:
    """Counts of one run (this process only; `skipped` were done by an earlier run)."""

    lines: int = 0
    skipped: int = 0
    completed: int = 0
    """Lines answered with status 200."""
    failed: int = 0
    """Error lines and non-200 responses."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0
    cancelled: bool = False


ProgressFn = Callable[[RunStats], None]
"""Called after each line is done or skipped (on the event loop; keep it cheap)."""


def count_lines(path: str | Path) -> int:
    """Non-blank lines of a file, read in 1 MiB chunks (for a progress total)."""
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


class _Skipper:
    """Decides which input lines an earlier run already answered (see `ResultJournal`)."""

    def __init__(self, journal: ResultJournal) -> None:
        self.journal = journal
        self.seen: set[str] = set()
        self.duplicates_seen: Counter[str] = Counter()
        self.without_id_seen = 0

    def classify(self, item: BatchLine | LineError) -> tuple[bool, BatchLine | LineError]:
        """(already done?, the item; a repeated custom_id becomes a duplicate error)."""
        custom_id = item.custom_id
        if custom_id is None:
            self.without_id_seen += 1
            return self.without_id_seen <= self.journal.num_without_id, item
        if custom_id in self.seen:
            self.duplicates_seen[custom_id] += 1
            dup = LineError(item.line_no, custom_id, DUPLICATE_CODE,
                            f"line {item.line_no}: custom_id {custom_id!r} already appeared on "
                            "an earlier line (custom_ids must be unique)")
            return (self.duplicates_seen[custom_id]
                    <= self.journal.duplicate_counts[custom_id]), dup
        self.seen.add(custom_id)
        return custom_id in self.journal.done_ids, item


def has_pending_lines(input_path: str | Path, journal: ResultJournal,
                      served_urls: frozenset[str], endpoint: str | None = None) -> bool:
    """Whether any line of the input is not in the journal yet (a finished job needs no
    model: a rerun returns at once)."""
    skipper = _Skipper(journal)
    with open(input_path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if raw.strip() and not skipper.classify(
                    parse_line(line_no, raw, served_urls, endpoint))[0]:
                return True
    return False


async def run_batch(input_path: str | Path, journal: ResultJournal, executor: BatchExecutor,
                    *, max_in_flight: int = 128, endpoint: str | None = None,
                    progress: ProgressFn | None = None,
                    cancel: asyncio.Event | None = None) -> RunStats:
    """Answer every line of `input_path` not yet in `journal`; returns this run's counts.

    Args:
        endpoint: if set, lines must use this url (server batches).
        cancel: when set, stop reading, abort in-flight requests and return (`cancelled`).
    """
    stats = RunStats()
    start = time.monotonic()
    skipper = _Skipper(journal)
    slots = asyncio.Semaphore(max_in_flight)
    tasks: set[asyncio.Task[None]] = set()
    served = executor.served_urls

    def report() -> None:
        stats.elapsed_s = time.monotonic() - start
        if progress is not None:
            progress(stats)

    async def answer(line: BatchLine) -> None:
        try:
            result = await executor.execute(line)
            journal.append([response_line(line.custom_id, result.status_code,
                                          result.request_id, result.body)])
            if result.status_code == 200:
                stats.completed += 1
                usage = result.body.get("usage") or {}
                stats.prompt_tokens += int(usage.get("prompt_tokens") or 0)
                stats.completion_tokens += result.completion_tokens
            else:
                stats.failed += 1
            report()
        finally:
            slots.release()

    try:
        with open(input_path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if cancel is not None and cancel.is_set():
                    stats.cancelled = True
                    break
                if not raw.strip():
                    continue
                stats.lines += 1
                done, item = skipper.classify(parse_line(line_no, raw, served, endpoint))
                if done:
                    stats.skipped += 1
                    if stats.skipped % 1024 == 0:
                        report()
                        await asyncio.sleep(0)
                    continue
                if isinstance(item, LineError):
                    journal.append([error_line(item)])
                    stats.failed += 1
                    report()
                    continue
                if not await _acquire(slots, cancel):
                    stats.cancelled = True
                    break
                task = asyncio.create_task(answer(item))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        if stats.cancelled:
            for task in list(tasks):
                task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=stats.cancelled)
    finally:
        for task in list(tasks):
            task.cancel()
        journal.sync()
    report()
    return stats


async def _acquire(slots: asyncio.Semaphore, cancel: asyncio.Event | None) -> bool:
    """Take an in-flight slot; False (no slot held) once `cancel` is set."""
    if cancel is None:
        await slots.acquire()
        return True
    acquire = asyncio.ensure_future(slots.acquire())
    waiter = asyncio.ensure_future(cancel.wait())
    await asyncio.wait({acquire, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if not acquire.done():
        acquire.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await acquire
    taken = acquire.done() and not acquire.cancelled()
    if taken and cancel.is_set():
        slots.release()
        return False
    return taken
