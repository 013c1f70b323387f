"""BatchService: runs the batches of `ember serve` in the background.

One worker runs batches one after another (FIFO) on the server's engine, through the same
`BatchExecutor` as `ember run-batch`, at priority `BATCH_PRIORITY` (interactive requests
default to 0; lower runs first under `--policy priority`) and with at most
`ServerConfig.batch_max_in_flight` requests in the engine, so interactive traffic keeps free
slots under either policy. Every state change is persisted; on startup the batches that were
active are queued again and resume from their result journals.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from ember.batch.executor import BATCH_URLS, BatchExecutor, batch_context
from ember.batch.format import is_failure
from ember.batch.journal import ResultJournal
from ember.batch.protocol import (ACTIVE_STATUSES, BatchError, BatchErrors, BatchObject,
                                  BatchRequestCounts, CreateBatchRequest)
from ember.batch.runner import RunStats, count_lines, run_batch
from ember.batch.store import BatchStore, FileStore
from ember.server.errors import APIError, bad_request
from ember.server.serving import Servings

if TYPE_CHECKING:
    from ember.server.state import AppState

logger = logging.getLogger(__name__)

BATCH_PRIORITY = 1000
"""Scheduler priority of batch requests (interactive requests default to 0)."""
COMPLETION_WINDOWS = {"24h": 24 * 3600}
_PERSIST_EVERY_S = 1.0


def _now() -> int:
    return int(time.time())


class BatchService:
    """The `/v1/files` + `/v1/batches` state of one server."""

    def __init__(self, root: Path, state: AppState) -> None:
        self.root = root
        self.files = FileStore(root)
        self.batches = BatchStore(root)
        self.state = state
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._cancels: dict[str, asyncio.Event] = {}
        self._worker: asyncio.Task[None] | None = None

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Queue the batches a previous server left active, and start the worker."""
        for batch in sorted(self.batches.list(), key=lambda b: b.id):
            if batch.status in ACTIVE_STATUSES:
                self._enqueue(batch.id, cancelled=batch.status == "cancelling")
        self._worker = asyncio.create_task(self._work())

    async def stop(self) -> None:
        """Stop the worker (the running batch stays active and resumes on the next start)."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None

    def _enqueue(self, batch_id: str, cancelled: bool = False) -> None:
        event = asyncio.Event()
        if cancelled:
            event.set()
        self._cancels[batch_id] = event
        self._queue.put_nowait(batch_id)

    # ---- API ------------------------------------------------------------------------------

    def create(self, req: CreateBatchRequest) -> BatchObject:
        if req.endpoint not in BATCH_URLS:
            raise bad_request(f"endpoint must be one of {', '.join(sorted(BATCH_URLS))}, got "
                              f"{req.endpoint!r}", "endpoint")
        window = COMPLETION_WINDOWS.get(req.completion_window)
        if window is None:
            raise bad_request("completion_window must be '24h'", "completion_window")
        try:
            file = self.files.get(req.input_file_id)
        except APIError as exc:
            exc.param = "input_file_id"
            raise
        if file.purpose != "batch":
            raise bad_request(f"file {file.id} has purpose {file.purpose!r}, not 'batch'",
                              "input_file_id")
        now = _now()
        batch = BatchObject(id=f"batch_{time.time_ns():016x}{uuid.uuid4().hex[:8]}",
                            endpoint=req.endpoint, input_file_id=req.input_file_id,
                            completion_window=req.completion_window, status="validating",
                            created_at=now, expires_at=now + window, metadata=req.metadata)
        self.batches.save(batch)
        self._enqueue(batch.id)
        return batch

    def cancel(self, batch_id: str) -> BatchObject:
        batch = self.batches.get(batch_id)
        if batch.status not in ACTIVE_STATUSES:
            raise APIError(409, f"batch {batch_id} is {batch.status}; only an active batch "
                                "can be cancelled", code="batch_not_active")
        if batch.status != "cancelling":
            batch.status, batch.cancelling_at = "cancelling", _now()
            self.batches.save(batch)
        event = self._cancels.get(batch_id)
        if event is not None:
            event.set()
        return batch

    # ---- worker ---------------------------------------------------------------------------

    async def _work(self) -> None:
        await self.state.loaded.wait()
        engine, embeddings = self.state.engine, self.state.embeddings
        if engine is None and embeddings is None:
            logger.error("batches are not run: the model did not load")
            return
        servings = None
        if engine is not None:
            servings = Servings.create(batch_context(engine, self.state.model_names,
                                                     self.state.metrics,
                                                     self.state.config.model.model))
        executor = BatchExecutor(servings, priority=BATCH_PRIORITY, embeddings=embeddings)
        server = self.state.config.server
        in_flight = server.batch_max_in_flight or max(
            1, self.state.config.scheduler.max_num_seqs // 2)
        while True:
            batch_id = await self._queue.get()
            try:
                await self._run(batch_id, executor, in_flight)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one bad batch must not stop the worker
                logger.exception("batch %s failed", batch_id)
                self._fail(batch_id, "internal_error", f"the batch failed: {exc}")

    async def _run(self, batch_id: str, executor: BatchExecutor, in_flight: int) -> None:
        batch = self.batches.get(batch_id)
        cancel = self._cancels.setdefault(batch_id, asyncio.Event())
        try:
            input_path = self.files.content_path(batch.input_file_id)
        except APIError:
            self._fail(batch_id, "invalid_input_file",
                       f"the input file {batch.input_file_id} no longer exists")
            return
        if batch.status == "validating":
            batch.status, batch.in_progress_at = "in_progress", _now()
        batch.request_counts.total = await asyncio.to_thread(count_lines, input_path)
        self.batches.save(batch)
        journal = ResultJournal.open(self.batches.results_path(batch_id))
        base_ok, base_failed = journal.num_ok, journal.num_failed
        last_save = [time.monotonic()]

        def progress(stats: RunStats) -> None:
            batch.request_counts = BatchRequestCounts(
                total=batch.request_counts.total, completed=base_ok + stats.completed,
                failed=base_failed + stats.failed)
            if time.monotonic() - last_save[0] >= _PERSIST_EVERY_S:
                last_save[0] = time.monotonic()
                self._save_progress(batch)

        try:
            if not cancel.is_set():
                await run_batch(input_path, journal, executor, max_in_flight=in_flight,
                                endpoint=batch.endpoint, progress=progress, cancel=cancel)
        finally:
            journal.close()
        await self._finalize(batch_id, cancelled=cancel.is_set())

    def _save_progress(self, batch: BatchObject) -> None:
        """Persist counts without overwriting a concurrent cancel."""
        stored = self.batches.get(batch.id)
        stored.request_counts = batch.request_counts
        self.batches.save(stored)

    async def _finalize(self, batch_id: str, cancelled: bool) -> None:
        """Split the journal into the output file (200s) and the error file (the rest)."""
        batch = self.batches.get(batch_id)
        if not cancelled:
            batch.status, batch.finalizing_at = "finalizing", _now()
            self.batches.save(batch)
        counts = await asyncio.to_thread(self._split, batch)
        batch.request_counts = counts
        if cancelled:
            batch.status, batch.cancelled_at = "cancelled", _now()
        else:
            batch.status, batch.completed_at = "completed", _now()
        self.batches.save(batch)
        self._cancels.pop(batch_id, None)

    def _split(self, batch: BatchObject) -> BatchRequestCounts:
        stem = batch.id.removeprefix("batch_")
        out_id, err_id = f"file-{stem}-output", f"file-{stem}-errors"
        out_path, err_path = self.files.path(out_id), self.files.path(err_id)
        ok = failed = 0
        with (open(self.batches.results_path(batch.id), "rb") as src,
              open(out_path, "wb") as out, open(err_path, "wb") as err):
            for raw in src:
                if is_failure(json.loads(raw)):
                    err.write(raw)
                    failed += 1
                else:
                    out.write(raw)
                    ok += 1
        total = max(batch.request_counts.total, ok + failed)
        if ok:
            self.files.register(out_id, f"{batch.id}_output.jsonl", "batch_output",
                                out_path.stat().st_size)
            batch.output_file_id = out_id
        else:
            out_path.unlink()
        if failed:
            self.files.register(err_id, f"{batch.id}_errors.jsonl", "batch_output",
                                err_path.stat().st_size)
            batch.error_file_id = err_id
        else:
            err_path.unlink()
        return BatchRequestCounts(total=total, completed=ok, failed=failed)

    def _fail(self, batch_id: str, code: str, message: str) -> None:
        batch = self.batches.get(batch_id)
        batch.status, batch.failed_at = "failed", _now()
        batch.errors = BatchErrors(data=[BatchError(code=code, message=message)])
        self.batches.save(batch)
        self._cancels.pop(batch_id, None)
