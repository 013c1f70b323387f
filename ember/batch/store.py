"""The on-disk store behind `/v1/files` and `/v1/batches`.

Layout under the root (ServerConfig.batch_dir):
  files/<file_id>            the bytes
  files/<file_id>.json       its FileObject
  batches/<batch_id>.json    its BatchObject (rewritten atomically on each change)
  batches/<batch_id>.results.jsonl   the run's ResultJournal (what makes a restart resume)
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from pydantic import BaseModel

from ember.batch.protocol import BatchObject, FileObject
from ember.server.errors import APIError


def write_json_atomic(path: Path, model: BaseModel) -> None:
    """Replace `path` with the model's JSON (never a half-written file)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        f.write(model.model_dump_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _not_found(kind: str, ident: str) -> APIError:
    return APIError(404, f"no {kind} with id {ident!r}", param=f"{kind}_id", code="not_found")


class FileStore:
    """Uploaded and generated files."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "files"
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, file_id: str) -> Path:
        if "/" in file_id or file_id.startswith("."):
            raise _not_found("file", file_id)
        return self.dir / file_id

    async def create(self, chunks: AsyncIterator[bytes], filename: str, purpose: str,
                     file_id: str | None = None) -> FileObject:
        """Store a file from its chunks (streamed to disk)."""
        file_id = file_id or f"file-{uuid.uuid4().hex}"
        path = self.path(file_id)
        tmp = path.with_name(f".{file_id}.tmp")
        size = 0
        with open(tmp, "wb") as f:
            async for chunk in chunks:
                f.write(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return self.register(file_id, filename, purpose, size)

    def register(self, file_id: str, filename: str, purpose: str, size: int) -> FileObject:
        """Write the FileObject of bytes already at `path(file_id)`."""
        obj = FileObject(id=file_id, bytes=size, created_at=int(time.time()),
                         filename=filename, purpose=purpose)
        write_json_atomic(self.path(file_id).with_name(f"{file_id}.json"), obj)
        return obj

    def get(self, file_id: str) -> FileObject:
        meta = self.path(file_id).with_name(f"{file_id}.json")
        try:
            return FileObject.model_validate_json(meta.read_bytes())
        except FileNotFoundError:
            raise _not_found("file", file_id) from None

    def content_path(self, file_id: str) -> Path:
        self.get(file_id)
        return self.path(file_id)

    def list(self, purpose: str | None = None) -> list[FileObject]:
        files = [FileObject.model_validate_json(p.read_bytes())
                 for p in self.dir.glob("file-*.json")]
        files = [f for f in files if purpose is None or f.purpose == purpose]
        return sorted(files, key=lambda f: (f.created_at, f.id), reverse=True)

    def delete(self, file_id: str) -> None:
        self.get(file_id)
        for path in (self.path(file_id).with_name(f"{file_id}.json"), self.path(file_id)):
            path.unlink(missing_ok=True)


class BatchStore:
    """Batch objects and their result journals."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "batches"
        self.dir.mkdir(parents=True, exist_ok=True)

    def _meta(self, batch_id: str) -> Path:
        if "/" in batch_id or batch_id.startswith("."):
            raise _not_found("batch", batch_id)
        return self.dir / f"{batch_id}.json"

    def results_path(self, batch_id: str) -> Path:
        return self.dir / f"{batch_id}.results.jsonl"

    def save(self, batch: BatchObject) -> None:
        write_json_atomic(self._meta(batch.id), batch)

    def get(self, batch_id: str) -> BatchObject:
        try:
            return BatchObject.model_validate_json(self._meta(batch_id).read_bytes())
        except FileNotFoundError:
            raise _not_found("batch", batch_id) from None

    def list(self) -> list[BatchObject]:
        batches = [BatchObject.model_validate_json(p.read_bytes())
                   for p in self.dir.glob("batch_*.json")]
        return sorted(batches, key=lambda b: (b.created_at, b.id), reverse=True)
