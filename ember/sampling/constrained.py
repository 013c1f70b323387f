"""Constrained decoding: JSON Schema / regex / choice / Lark grammar masks with llguidance.

Why llguidance (measured on SmolLM2's 49k vocabulary, `benchmarks/grammar_engines.py`):
compiling a typical JSON schema takes ~1.3 ms (its lexer is built lazily) against 12-23 ms for
xgrammar, which misses the 10 ms compile target; its per-token mask (~40-90 us) is slower than
xgrammar's (~5-10 us) but is < 1% of a CPU decode step. It also reads Lark grammars and regexes
directly (vLLM's `grammar` / `regex`), and its errors name the unsupported schema keyword.

Flow:
- `GrammarCompiler.source(spec)` turns a `StructuredOutputsParams` into an llguidance grammar
  and validates it synchronously (~1 ms, cached), raising InvalidRequestError naming the
  problem, so a bad schema is a 400 before anything is queued.
- `GrammarCompiler.submit(source)` compiles on a thread pool (llguidance drops the GIL) into a
  template matcher; the result is kept in an LRU cache keyed by the grammar text.
- `StructuredOutputManager.ready(request)` says whether a request's grammar finished compiling
  (the engine core keeps it out of the scheduler until then, without blocking the batch).
- `StructuredOutputManager.apply(logits, rows)` adds `logit_bias` and masks each constrained row.
  Each sequence (each of `n`) has its own matcher (a deep copy of the template). It is advanced
  lazily: before masking, it consumes the output tokens it has not seen yet, so preemption and
  recompute (which keep the output tokens) need nothing special. When the grammar is complete
  the mask allows only EOS.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from ember.tokenizer import Tokenizer
from ember.types import InvalidRequestError, SamplingBatchRow, StructuredOutputsParams

logger = logging.getLogger(__name__)

try:
    import llguidance
    import llguidance.torch as llguidance_torch
except ImportError:  # pragma: no cover - llguidance is a core dependency
    llguidance = None  # type: ignore[assignment]

_PARALLEL_MASK_ROWS = 8
"""From this many constrained rows on, masks are computed on llguidance's thread pool."""


def _json_options(spec: StructuredOutputsParams) -> dict[str, object]:
    if spec.whitespace_flexible:
        return {"whitespace_flexible": True}
    # NOTE: compact, json.dumps-like separators: a small model otherwise may emit whitespace
    # until max_tokens (flexible whitespace is valid JSON forever).
    return {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_text(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar (a JSON string) for `spec`; not validated."""
    if llguidance is None:
        raise InvalidRequestError("structured outputs need the llguidance package",
                                  "structured_outputs")
    m = llguidance.LLMatcher
    if spec.json is not None or spec.json_object:
        schema: object = {"type": "object"} if spec.json_object else spec.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(f"the JSON schema is not valid JSON: {exc}",
                                          "structured_outputs.json") from exc
        if not isinstance(schema, dict):
            raise InvalidRequestError("the JSON schema must be a JSON object",
                                      "structured_outputs.json")
        return m.grammar_from_json_schema(schema, overrides=_json_options(spec))  # type: ignore
    if spec.regex is not None:
        return m.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        # NOTE: JSON string escapes are valid Lark string literals.
        return m.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
    assert spec.grammar is not None
    return m.grammar_from_lark(spec.grammar)


def _field_name(spec: StructuredOutputsParams) -> str:
    for name in ("json", "regex", "choice", "grammar"):
        if getattr(spec, name) is not None:
            return name
    return "json_object"


def spec_key(spec: StructuredOutputsParams) -> str:
    """A canonical text key of `spec` (equal specs share one compiled grammar)."""
    value = spec.json if spec.json is not None else (
        spec.regex if spec.regex is not None else spec.choice if spec.choice is not None
        else spec.grammar)
    return json.dumps([_field_name(spec), value, spec.whitespace_flexible], sort_keys=True)


class GrammarCompiler:
    """Validates grammars and compiles them off the step loop, with an LRU cache.

    Args:
        tokenizer: the model's tokenizer (its `backend` is handed to llguidance).
        cache_size: compiled grammars kept (least recently used are dropped).
        max_workers: compile threads.
    """

    def __init__(self, tokenizer: Tokenizer, cache_size: int = 256, max_workers: int = 2) -> None:
        if llguidance is None:
            raise RuntimeError("structured outputs need the llguidance package")
        self.eos_token_id = tokenizer.eos_token_id
        self.ll_tokenizer = llguidance.LLTokenizer(
            tokenizer.backend.to_str(), n_vocab=tokenizer.vocab_size,
            eos_token=tokenizer.eos_token_id)
        self.vocab_size = tokenizer.vocab_size
        self.cache_size = cache_size
        self._sources: OrderedDict[str, str] = OrderedDict()
        """spec_key -> validated grammar text."""
        self._compiled: OrderedDict[str, concurrent.futures.Future[llguidance.LLMatcher]] = \
            OrderedDict()
        """grammar text -> future of the template matcher."""
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers,
                                                           thread_name_prefix="ember-grammar")

    def source(self, spec: StructuredOutputsParams) -> str:
        """The validated grammar text of `spec`; InvalidRequestError names the problem (an
        unsupported schema keyword, a bad regex, a Lark syntax error)."""
        key = spec_key(spec)
        with self._lock:
            cached = self._sources.get(key)
            if cached is not None:
                self._sources.move_to_end(key)
                return cached
        try:
            text = grammar_text(spec)
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
                text, self.ll_tokenizer)
        except (ValueError, TypeError, RuntimeError) as exc:  # llguidance rejects the input
            is_error, messages, text = True, [str(exc)], ""
        if is_error:
            kind = {"json": "JSON schema", "json_object": "JSON schema", "regex": "regex",
                    "choice": "choice", "grammar": "grammar"}[_field_name(spec)]
            message = messages[0].strip() if messages else "invalid"
            raise InvalidRequestError(f"unsupported or invalid {kind}: {message}",
                                      f"structured_outputs.{_field_name(spec)}")
        with self._lock:
            self._sources[key] = text
            while len(self._sources) > self.cache_size:
                self._sources.popitem(last=False)
        return text

    def submit(self, text: str) -> concurrent.futures.Future[llguidance.LLMatcher]:
        """The (maybe still running) compilation of grammar `text` into a template matcher."""
        with self._lock:
            future = self._compiled.get(text)
            if future is not None:
                self._compiled.move_to_end(text)
                return future
            future = self._pool.submit(self._compile, text)
            self._compiled[text] = future
            while len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
            return future

    def _compile(self, text: str) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self.ll_tokenizer, text, log_level=0)
        if not matcher.is_error():
            # NOTE: the lexer is built lazily; one mask here moves that cost off the step loop.
            mask = llguidance_torch.allocate_token_bitmask(1, self.vocab_size)
            llguidance_torch.fill_next_token_bitmask(matcher, mask)
        return matcher

    def compile(self, spec: StructuredOutputsParams) -> llguidance.LLMatcher:
        """A fresh matcher for `spec`, compiling (or waiting for the compile) when needed."""
        return self.submit(self.source(spec)).result().deep_copy()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class _SeqState:
    """One sequence's matcher and how many of its output tokens it consumed."""

    matcher: llguidance.LLMatcher
    consumed: int = 0
    failed: bool = False


class StructuredOutputManager:
    """Per-sequence grammar state of the engine; masks the logits of each step.

    Owned by the EngineCore (compile gating) and called by the ModelRunner (masking); both run
    on the engine thread.
    """

    def __init__(self, tokenizer: Tokenizer, cache_size: int = 256) -> None:
        self.compiler = GrammarCompiler(tokenizer, cache_size)
        self.eos_token_id = tokenizer.eos_token_id
        self._pending: dict[str, concurrent.futures.Future[llguidance.LLMatcher]] = {}
        """Sequence id -> its grammar's compile, until the sequence gets its matcher."""
        self._states: dict[str, _SeqState] = {}
        self._executor: llguidance.LLExecutor | None = None

    # ---- requests -----------------------------------------------------------------------

    def validate(self, spec: StructuredOutputsParams | None) -> None:
        """Raise InvalidRequestError when `spec` cannot be compiled (cheap when cached)."""
        if spec is not None:
            self.compiler.source(spec)

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

    # ---- masking ------------------------------------------------------------------------

    def apply(self, logits: torch.Tensor, rows: list[SamplingBatchRow]) -> torch.Tensor:
        """Add each row's logit_bias, then mask constrained rows to their grammar's allowed
        tokens. `logits` (N, V) is modified in place and returned."""
        for i, row in enumerate(rows):
            bias = row.params.logit_bias
            if bias:
                ids = torch.tensor(list(bias.keys()), dtype=torch.long)
                keep = ids < logits.shape[1]
                logits[i, ids[keep]] += torch.tensor(list(bias.values()),
                                                     dtype=logits.dtype)[keep]
        constrained = [(i, self._state(row)) for i, row in enumerate(rows)
                       if row.params.structured_outputs is not None]
        if not constrained:
            return logits
        masks = llguidance_torch.allocate_token_bitmask(len(constrained), logits.shape[1])
        active: list[tuple[llguidance.LLMatcher, int]] = []
        for j, (_, state) in enumerate(constrained):
            if state.failed or state.matcher.is_error() or state.matcher.is_stopped():
                masks[j].zero_()  # only EOS below
            else:
                active.append((state.matcher, j))
        if len(active) >= _PARALLEL_MASK_ROWS:
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            llguidance_torch.fill_next_token_bitmask_par(self._executor, active, masks)
        else:
            for matcher, j in active:
                llguidance_torch.fill_next_token_bitmask(matcher, masks, j)
        bits = _unpack_bits(masks, logits.shape[1])  # (C, V) bool
        # NOTE: numpy on the logits' memory: one single-threaded pass per row, no (C, V)
        # temporaries through torch's thread pool (which costs ms on a busy CPU).
        target = logits.numpy() if logits.device.type == "cpu" and logits.is_contiguous() \
            else None
        for j, (i, _) in enumerate(constrained):
            allowed = bits[j]  # (V,)
            if not allowed.any() and self.eos_token_id is not None:
                allowed[self.eos_token_id] = True  # a finished or failed grammar: EOS only
            if target is not None:
                np.copyto(target[i], -np.inf, where=~allowed)
            else:
                logits[i].masked_fill_(torch.from_numpy(~allowed).to(logits.device),
                                       float("-inf"))
        return logits

    def _state(self, row: SamplingBatchRow) -> _SeqState:
        """The row's matcher, created on first use and advanced over its new output tokens."""
        state = self._states.get(row.request_id)
        if state is None:
            future = self._pending.pop(row.request_id, None)
            spec = row.params.structured_outputs
            assert spec is not None
            # NOTE: the engine core schedules a sequence only once its grammar compiled, so
            # this does not wait (a direct runner user may get a synchronous compile).
            template = future.result() if future is not None else \
                self.compiler.submit(self.compiler.source(spec)).result()
            state = _SeqState(template.deep_copy())
            self._states[row.request_id] = state
        new = row.output_token_ids[state.consumed:]
        if new and not state.failed:
            for token in new:
                if state.matcher.is_stopped():
                    break
                if not state.matcher.consume_token(token):
                    logger.warning("sequence %s: token %d rejected by its grammar: %s",
                                   row.request_id, token, state.matcher.get_error())
                    state.failed = True
                    break
        state.consumed = len(row.output_token_ids)
        return state


def _unpack_bits(masks: torch.Tensor, vocab_size: int) -> np.ndarray:
    """(B, ceil(V/32)) int32 llguidance bitmasks -> (B, V) numpy bool, True where allowed."""
    bits = np.unpackbits(masks.numpy().view(np.uint8), axis=1, bitorder="little")
    return bits[:, :vocab_size].astype(bool)  # (B, V)


def unpack_bitmask(masks: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, ceil(V/32)) int32 llguidance bitmasks -> (B, V) bool tensor, True where allowed."""
    return torch.from_numpy(_unpack_bits(masks, vocab_size))
