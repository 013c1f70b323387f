"""Trust checks for the cached kernel library before it is loaded into the process.

A shared library in the cache runs with the server's privileges, so it is loaded only when:
it and its folder belong to this user and are not group/world-writable, and its content hash
matches the one recorded when Ember built it (`<library>.sha256` beside it). Anything else is
rebuilt (one warning line).
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

_CHUNK = 1 << 20


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def record_hash(library: Path) -> None:
    """Write the library's content hash beside it (atomically)."""
    fd, tmp = tempfile.mkstemp(dir=library.parent, suffix=".sha256")
    with os.fdopen(fd, "w") as f:
        f.write(_digest(library) + "\n")
    os.replace(tmp, hash_path(library))


def _unsafe_owner_or_mode(path: Path) -> str | None:
    info = path.stat()
    if info.st_uid != os.getuid():
        return f"{path} belongs to uid {info.st_uid}, not this user ({os.getuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is group- or world-writable"
    return None


def untrusted_reason(library: Path) -> str | None:
    """None when the cached library may be loaded, else why not."""
    for path in (library.parent, library):
        reason = _unsafe_owner_or_mode(path)
        if reason is not None:
            return reason
    recorded = hash_path(library)
    if not recorded.exists():
        return f"no content hash recorded for {library.name}"
    if (reason := _unsafe_owner_or_mode(recorded)) is not None:
        return reason
    if recorded.read_text().strip() != _digest(library):
        return f"{library.name} does not match the content hash recorded at build"
    return None
