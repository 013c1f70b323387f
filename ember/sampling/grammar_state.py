"""Per-sequence grammar matchers for constrained decoding (llguidance).

`MatcherStore` owns each sequence's compile (until it finishes) and then its matcher: a deep
copy of the compiled template, created on first use and brought level with the sequence's output
tokens every time it is read (a prefetched token the scheduler did not keep is rolled back,
tokens it has not seen are consumed), so preemption and recompute need nothing special. How the
matchers mask each step: `ember.sampling.constrained`.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from ember.sampling.grammar_compiler import GrammarCompiler
from ember.types import SamplingBatchRow, StructuredOutputsParams

logger = logging.getLogger(__name__)

try:
    import llguidance
except ImportError:  # pragma: no cover - llguidance is a core dependency
    llguidance = None  # type: ignore[assignment]


@dataclass
class SeqState:
    """One sequence's matcher and how many of its output tokens it consumed."""

    matcher: llguidance.LLMatcher
    consumed: int = 0
    """Output tokens consumed, including `ahead` (consumed by a prefetch, not yet confirmed)."""
    failed: bool = False
    ahead: list[int] = field(default_factory=list)
    """Tokens the last prefetch consumed (the step's sampled tokens), checked at the next
    step against the output tokens the scheduler kept."""
    mask_row: int | None = None
    """Row of the prefetched bitmask that holds this sequence's next mask, or None."""

    def dead(self) -> bool:
        """Whether the grammar allows only EOS from here (failed, errored or stopped)."""
        return self.failed or self.matcher.is_error() or self.matcher.is_stopped()

    def consume(self, tokens: list[int]) -> None:
        for token in tokens:
            self.consumed += 1
            if self.failed or self.matcher.is_stopped():
                continue
            if not self.matcher.consume_token(token):
                logger.warning("token %d rejected by its grammar: %s", token,
                               self.matcher.get_error())
                self.failed = True

    def rollback(self, n: int) -> None:
        self.mask_row = None
        self.consumed -= n
        if not self.failed and not self.matcher.rollback(n):
            self.failed = True
            logger.warning("grammar rollback failed: %s", self.matcher.get_error())

    def catch_up(self, out: list[int]) -> None:
        """Bring the matcher level with the output tokens `out`: roll back a prefetch the
        scheduler did not keep, consume the tokens it has not seen."""
        if self.ahead:
            n = len(self.ahead)
            if self.consumed > len(out) or out[self.consumed - n:self.consumed] != self.ahead:
                self.rollback(n)
            self.ahead = []
        if self.consumed < len(out):
            self.mask_row = None
            self.consume(out[self.consumed:])


class MatcherStore:
    """Sequence id -> its grammar's compile, then its matcher (`SeqState`)."""

    def __init__(self, compiler: GrammarCompiler) -> None:
        self.compiler = compiler
        self._pending: dict[str, concurrent.futures.Future[llguidance.LLMatcher]] = {}
        """Sequence id -> its grammar's compile, until the sequence gets its matcher."""
        self._states: dict[str, SeqState] = {}

    def submit(self, request_id: str, spec: StructuredOutputsParams) -> bool:
        """Start compiling the grammar of a sequence; True when it is already compiled."""
        future = self.compiler.submit(self.compiler.source(spec))
        self._pending[request_id] = future
        return future.done()

    def ready(self, request_id: str) -> bool:
        future = self._pending.get(request_id)
        return future is None or future.done()

    def pending_futures(self) -> list[concurrent.futures.Future[llguidance.LLMatcher]]:
        return [f for f in self._pending.values() if not f.done()]

    def release(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            self._states.pop(rid, None)
            self._pending.pop(rid, None)

    def get(self, request_id: str) -> SeqState | None:
        """The sequence's matcher as it is (not created, not caught up)."""
        return self._states.get(request_id)

    def of_row(self, row: SamplingBatchRow) -> SeqState:
        spec = row.params.structured_outputs
        assert spec is not None
        return self.state_of(row.request_id, spec, row.output_token_ids)

    def state_of(self, request_id: str, spec: StructuredOutputsParams,
                 out: list[int]) -> SeqState:
        """The sequence's matcher, created on first use and brought level with its output
        tokens `out` (a prefetch the scheduler did not keep is rolled back)."""
        state = self._states.get(request_id)
        if state is None:
            future = self._pending.pop(request_id, None)
            # NOTE: the engine core schedules a sequence only once its grammar compiled, so
            # this does not wait (a direct runner user may get a synchronous compile).
            template = future.result() if future is not None else \
                self.compiler.submit(self.compiler.source(spec)).result()
            state = SeqState(template.deep_copy())
            self._states[request_id] = state
        state.catch_up(out)
        return state
