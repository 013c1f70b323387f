"""The C heap's free pages back to the OS (glibc's `malloc_trim`), for the places that free
large blocks once (the weight arena's move, the engine's and the edge runtime's load): free()
alone keeps pages below the heap's top resident. No torch: the edge runtime uses it."""

from __future__ import annotations

import ctypes


def trim_heap() -> None:
    """malloc_trim(0); a no-op where the C library has none (not glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
