"""The results file of a batch run: append-only, crash-safe, and the record of what is done.

Each result is one complete JSON line written with a single `os.write` on an O_APPEND file and
fsync'd (at most `fsync_interval_s` later; with `background_sync`, by a thread of its own, so
an engine stepping on the writer's thread never waits for the disk), so after a crash (SIGKILL
included) the file holds whole lines plus at most one torn tail. `ResultJournal.open` cuts the file back to its last
valid line and reads which inputs are done:

- `done_ids`: custom_ids that have their (first-occurrence) line;
- `duplicate_counts`: how many "duplicate custom_id" error lines each id has;
- `num_without_id`: error lines of inputs that had no usable custom_id.

The runner skips exactly those inputs, so a restarted run writes every line once. Duplicate
and id-less error lines are written in input order (they need no model), which is what makes
counting them enough.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ember.batch.format import DUPLICATE_CODE, is_failure

logger = logging.getLogger(__name__)


class JournalBusyError(RuntimeError):
    """Another process is writing the same results file."""


class ResultJournal:
    """An open results file. Use `ResultJournal.open(path)`; `close()` when done."""

    def __init__(self, path: Path, fd: int, fsync_interval_s: float) -> None:
        self.path = path
        self._fd = fd
        self._fsync_interval_s = fsync_interval_s
        self._last_fsync = time.monotonic()
        self._dirty = False
        self.done_ids: set[str] = set()
        self.duplicate_counts: Counter[str] = Counter()
        self.num_without_id = 0
        self.num_lines = 0
        self.num_ok = 0
        """Lines with a 200 response."""
        self.num_failed = 0
        self.num_truncated_bytes = 0
        self._syncer: threading.Thread | None = None
        self._closing = threading.Event()

    @classmethod
    def open(cls, path: str | Path, fsync_interval_s: float = 0.2,
             background_sync: bool = False) -> ResultJournal:
        """Open (or create) `path`, lock it against a second writer, drop a torn tail and
        load what is done. Raises JournalBusyError if another process holds it.

        background_sync: fsync every `fsync_interval_s` on a thread instead of in `append`
        (a SIGKILL loses nothing either way: written lines are in the page cache; fsync guards
        against a machine crash)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise JournalBusyError(f"{path}: another run is writing this file") from exc
        journal = cls(path, fd, fsync_interval_s)
        journal._recover()
        if background_sync:
            journal._syncer = threading.Thread(target=journal._sync_loop, daemon=True,
                                               name="ember-journal-fsync")
            journal._syncer.start()
        return journal

    def _sync_loop(self) -> None:
        while not self._closing.wait(self._fsync_interval_s):
            if self._dirty:
                self._dirty = False
                os.fsync(self._fd)

    def _recover(self) -> None:
        valid_end = 0
        with open(self.path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # torn tail: a write cut short
                try:
                    line = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    break
                if not isinstance(line, dict) or "custom_id" not in line:
                    break
                self._record(line)
                valid_end += len(raw)
        size = os.fstat(self._fd).st_size
        if size > valid_end:
            self.num_truncated_bytes = size - valid_end
            logger.warning("%s: dropping %d bytes after the last complete line", self.path,
                           size - valid_end)
            os.ftruncate(self._fd, valid_end)
            os.fsync(self._fd)

    def _record(self, line: dict[str, Any]) -> None:
        self.num_lines += 1
        if is_failure(line):
            self.num_failed += 1
        else:
            self.num_ok += 1
        custom_id = line.get("custom_id")
        error = line.get("error") or {}
        if custom_id is None:
            self.num_without_id += 1
        elif error.get("code") == DUPLICATE_CODE:
            self.duplicate_counts[custom_id] += 1
        else:
            self.done_ids.add(custom_id)

    def append(self, lines: list[dict[str, Any]]) -> None:
        """Write whole lines (one syscall) and record them; fsync at most every interval."""
        if not lines:
            return
        data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
        view = memoryview(data)
        while view:  # NOTE: a regular file takes it in one write unless the disk is full
            written = os.write(self._fd, view)
            view = view[written:]
        for line in lines:
            self._record(line)
        self._dirty = True
        if self._syncer is None and \
                time.monotonic() - self._last_fsync >= self._fsync_interval_s:
            self.sync()

    def sync(self) -> None:
        if self._dirty:
            os.fsync(self._fd)
            self._dirty = False
        self._last_fsync = time.monotonic()

    def close(self) -> None:
        if self._syncer is not None:
            self._closing.set()
            self._syncer.join()
            self._syncer = None
        if self._fd >= 0:
            self.sync()
            os.close(self._fd)  # also releases the lock
            self._fd = -1

    def __enter__(self) -> ResultJournal:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
