"""Per-request output mailbox on the event loop: at most ONE pending output per request.

The engine thread makes one `RequestOutput` per step (cumulative values + the step's deltas).
A consumer that reads slower than the engine steps (a slow or stalled client) must not make
the server queue one cumulative copy per step: a new output that arrives while the previous
one is still unread is merged into it (deltas concatenated, cumulative values replaced by the
newer ones), so what a request holds is bounded by one snapshot plus its unread deltas.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from ember.types import RequestOutput

Item = RequestOutput | BaseException


def merge_outputs(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """`newer` with `older`'s unread deltas in front of its own (older is consumed)."""
    for old, new in zip(older.outputs, newer.outputs):
        old.delta_token_ids.extend(new.delta_token_ids)
        new.delta_token_ids = old.delta_token_ids
        new.delta_text = old.delta_text + new.delta_text
        if new.delta_logprobs is not None:
            if old.delta_logprobs is not None:
                old.delta_logprobs.extend(new.delta_logprobs)
                new.delta_logprobs = old.delta_logprobs
    return newer


class Mailbox:
    """Holds the unread output of one request (event-loop side; not thread-safe).

    Args:
        on_final: called once, when the final output (or an error) arrives: the engine is
            done with the request from then on, whether or not the client reads it.
    """

    def __init__(self, on_final: Callable[[], None] | None = None) -> None:
        self._item: Item | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._on_final = on_final
        self._ended = False
        self.pending_since: float | None = None
        """Monotonic time since which an output waits unread (None: nothing pending)."""

    @property
    def ended(self) -> bool:
        """True once the final output or an error arrived."""
        return self._ended

    def put(self, item: Item) -> None:
        """Deliver one output or error (call on the mailbox's event loop)."""
        if self._ended:
            return  # nothing follows a final output or an error
        pending = self._item
        if isinstance(item, BaseException) or pending is None \
                or isinstance(pending, BaseException):
            self._item = item
        else:
            self._item = merge_outputs(pending, item)
        if pending is None:
            self.pending_since = time.monotonic()
        if isinstance(item, BaseException) or item.finished:
            self._ended = True
            if self._on_final is not None:
                self._on_final()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> Item:
        """The pending output (merged), waiting for one if there is none."""
        while self._item is None:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item, self._item = self._item, None
        self.pending_since = None
        return item
