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
- `StructuredOutputManager.apply(logits, rows)` adds `logit_bias` and masks each constrained row
  (one packed (C, V/32) int32 bitmask for the step, applied in place: `grammar_masks.py`).
  Each sequence (each of `n`) has its own matcher (a deep copy of the template). Right after a
  step is sampled, `prefetch` consumes the sampled tokens and fills the next masks on a worker
  thread, overlapped with the next forward pass. Before masking, a matcher is brought level with
  the sequence's output tokens (a prefetched token the scheduler did not keep is rolled back,
  tokens it has not seen are consumed), so preemption and recompute (which keep the output
  tokens) need nothing special. When the grammar is complete the mask allows only EOS.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
from collections import OrderedDict
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from ember.sampling.grammar_masks import (MaskFiller, apply_bitmask, bitmask_words, eos_only,
                                          new_bitmask, unpack_bits)
from ember.tokenizer import Tokenizer
from ember.types import (InvalidRequestError, Request, SamplingBatchRow,
                         StructuredOutputsParams)

logger = logging.getLogger(__name__)

try:
    import llguidance
    import llguidance.torch as llguidance_torch
except ImportError:  # pragma: no cover - llguidance is a core dependency
    llguidance = None  # type: ignore[assignment]



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


_MAX_FORCED = 16
"""Most grammar-forced tokens drafted at once (jump-forward)."""


@dataclass
class _SeqState:
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


class StructuredOutputManager:
    """Per-sequence grammar state of the engine; masks the logits of each step.

    Owned by the EngineCore (compile gating) and called by the ModelRunner (masking); both run
    on the engine thread. The only other thread is the prefetch worker: after step t is
    sampled, `prefetch` hands the matchers' consume + next-mask fill to it, so that work
    overlaps step t+1's scheduling and forward pass (llguidance and the kernels both release
    the GIL); `apply` joins it before reading any matcher.
    """

    def __init__(self, tokenizer: Tokenizer, cache_size: int = 256,
                 overlap: bool = True) -> None:
        self.compiler = GrammarCompiler(tokenizer, cache_size)
        self.eos_token_id = tokenizer.eos_token_id
        self.vocab_size = tokenizer.vocab_size
        self.overlap = overlap
        """Compute next-step masks on the worker thread (False: lazily, inside `apply`)."""
        self._pending: dict[str, concurrent.futures.Future[llguidance.LLMatcher]] = {}
        """Sequence id -> its grammar's compile, until the sequence gets its matcher."""
        self._states: dict[str, _SeqState] = {}
        self._filler = MaskFiller()
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None
        self._inflight: concurrent.futures.Future[None] | None = None
        self._vocab = self.vocab_size
        """Width of the logits (the last step's), which the bitmasks cover."""
        self._prefetched = new_bitmask(0, self.vocab_size)
        """(P, W) masks written by the last prefetch (rows named by `_SeqState.mask_row`)."""
        self.jump_forward_enabled = True
        """Draft grammar-forced tokens (`jump_forward`); False: one model step per token."""
        self.timings = StepTimings()
        """Seconds spent per phase (for benchmarks; a few perf_counter calls per step)."""

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
        # NOTE: no join: a running prefetch keeps its own references to the states.
        for rid in request_ids:
            self._states.pop(rid, None)
            self._pending.pop(rid, None)

    def shutdown(self) -> None:
        self._join()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
        self.compiler.shutdown()

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
        index = [i for i, row in enumerate(rows) if row.params.structured_outputs is not None]
        if not index:
            return logits
        t0 = time.perf_counter()
        self._join()
        t1 = time.perf_counter()
        masks = self.masks([rows[i] for i in index], logits.shape[1])
        t2 = time.perf_counter()
        apply_bitmask(logits, masks, index, self.eos_token_id)
        t3 = time.perf_counter()
        self.timings.add(join=t1 - t0, mask=t2 - t1, apply=t3 - t2)
        return logits

    def masks(self, rows: list[SamplingBatchRow], vocab: int) -> np.ndarray:
        """(C, W) next-token bitmasks of constrained `rows`: the prefetched ones where still
        valid, the others filled now."""
        self._join()
        self._vocab = vocab
        masks = new_bitmask(len(rows), vocab)
        todo: list[tuple[llguidance.LLMatcher, int]] = []
        for j, row in enumerate(rows):
            state = self._state(row)
            if state.mask_row is not None and masks.shape[1] == self._prefetched.shape[1]:
                masks[j] = self._prefetched[state.mask_row]
                state.mask_row = None
            elif self._dead(state):
                eos_only(masks, j, self.eos_token_id)
            else:
                todo.append((state.matcher, j))
        if todo:
            self._filler.fill(todo, masks)
        return masks

    def prefetch(self, rows: list[SamplingBatchRow], tokens: list[list[int]]) -> None:
        """After sampling: consume each constrained row's new `tokens` and compute its next
        mask on the worker thread (joined by the next `apply`)."""
        if not self.overlap:
            return
        self._join()
        jobs: list[tuple[_SeqState, list[int]]] = []
        for row, new in zip(rows, tokens):
            state = self._states.get(row.request_id)
            if state is None or row.params.structured_outputs is None or not new:
                continue
            if state.consumed != len(row.output_token_ids) or state.ahead:
                continue  # not in sync: the next apply catches up lazily
            state.mask_row = None
            jobs.append((state, list(new)))
        if not jobs:
            return
        if self._prefetched.shape[0] < len(jobs) or \
                self._prefetched.shape[1] != bitmask_words(self._vocab):
            self._prefetched = new_bitmask(max(len(jobs), 2 * self._prefetched.shape[0]),
                                           self._vocab)
        if self._worker is None:
            self._worker = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="ember-grammar-masks")
        self._inflight = self._worker.submit(self._advance_and_fill, jobs)

    # ---- jump-forward and speculative decoding ------------------------------------------

    def jump_forward(self, running: Iterable[Request]) -> int:
        """Jump-forward: give each constrained request that is caught up and has no drafts
        the tokens its grammar forces next (llguidance `compute_ff_tokens`) as draft tokens.
        The scheduler feeds them to the next step like speculative drafts and the runner
        verifies them with per-position masks, so a forced run costs one model step instead
        of one per token and the output is what token-by-token decoding would give. Returns
        the number of tokens drafted."""
        if not self.jump_forward_enabled:
            return 0
        drafted = 0
        for request in running:
            spec = request.sampling_params.structured_outputs
            if spec is None or request.spec_token_ids or request.status.finished \
                    or request.num_computed_tokens != request.num_tokens - 1:
                continue
            self._join()
            state = self._state_of(request.request_id, spec, request.output_token_ids)
            if self._dead(state):
                continue
            forced = state.matcher.compute_ff_tokens()[:_MAX_FORCED]
            if forced:
                request.spec_token_ids = forced
                drafted += len(forced)
        self.timings.forced_tokens += drafted
        return drafted


    def truncate_draft(self, request: Request, draft: list[int]) -> list[int]:
        """The longest prefix of `draft` that the request's grammar accepts after its output
        tokens (the matcher is not advanced). Unconstrained requests keep their draft."""
        spec = request.sampling_params.structured_outputs
        if spec is None or not draft:
            return draft
        self._join()
        state = self._state_of(request.request_id, spec, request.output_token_ids)
        if self._dead(state):
            return []
        return draft[:state.matcher.validate_tokens(draft)]

    def apply_verify(self, logits: torch.Tensor, rows: list[SamplingBatchRow],
                     drafts: list[list[int]]) -> None:
        """A verify step: row r owns 1 + len(drafts[r]) consecutive rows of `logits` (N, V);
        each gets the row's logit_bias and the grammar mask at its position (the mask after
        the output and the draft tokens before it). Drafts must be grammar-valid
        (`truncate_draft`). Modifies `logits` in place."""
        starts, total = [], 0
        for draft in drafts:
            starts.append(total)
            total += 1 + len(draft)
        for row, start, draft in zip(rows, starts, drafts):
            bias = row.params.logit_bias
            if bias:
                ids = torch.tensor(list(bias.keys()), dtype=torch.long)
                keep = ids < logits.shape[1]
                values = torch.tensor(list(bias.values()), dtype=logits.dtype)[keep]
                for k in range(start, start + 1 + len(draft)):
                    logits[k, ids[keep]] += values
        picked = [(row, start, draft) for row, start, draft in zip(rows, starts, drafts)
                  if row.params.structured_outputs is not None]
        if not picked:
            return
        self._join()
        masks = new_bitmask(sum(1 + len(d) for _, _, d in picked), logits.shape[1])
        jobs: list[tuple[llguidance.LLMatcher, int, list[int]]] = []
        index: list[int] = []
        for row, start, draft in picked:
            state = self._state(row)
            state.mask_row = None
            if self._dead(state):
                for k in range(1 + len(draft)):
                    eos_only(masks, len(index) + k, self.eos_token_id)
            else:
                jobs.append((state.matcher, len(index), list(draft)))
            index.extend(range(start, start + 1 + len(draft)))
        # NOTE: llguidance's draft fill refuses empty drafts: those rows take the plain fill.
        drafted = [job for job in jobs if job[2]]
        if drafted:
            self._filler.fill_with_drafts(drafted, masks)
        plain = [(matcher, row) for matcher, row, draft in jobs if not draft]
        if plain:
            self._filler.fill(plain, masks)
        apply_bitmask(logits, masks, index, self.eos_token_id)
        self.timings.steps += 1

    def _advance_and_fill(self, jobs: list[tuple[_SeqState, list[int]]]) -> None:
        """Worker thread: consume the sampled tokens, then fill the next masks."""
        start = time.perf_counter()
        fill: list[tuple[llguidance.LLMatcher, int]] = []
        finished: list[tuple[_SeqState, int]] = []
        for k, (state, new) in enumerate(jobs):
            self._consume(state, new)
            state.ahead = new
            if self._dead(state):
                eos_only(self._prefetched, k, self.eos_token_id)
                finished.append((state, k))
            else:
                fill.append((state.matcher, k))
        if fill:
            self._filler.fill(fill, self._prefetched)
        for state, k in [(jobs[k][0], k) for _, k in fill] + finished:
            state.mask_row = k
        self.timings.add(prefetch=time.perf_counter() - start)

    def _join(self) -> None:
        if self._inflight is not None:
            self._inflight.result()
            self._inflight = None

    def _dead(self, state: _SeqState) -> bool:
        return state.failed or state.matcher.is_error() or state.matcher.is_stopped()

    def _consume(self, state: _SeqState, tokens: list[int]) -> None:
        for token in tokens:
            state.consumed += 1
            if state.failed or state.matcher.is_stopped():
                continue
            if not state.matcher.consume_token(token):
                logger.warning("token %d rejected by its grammar: %s", token,
                               state.matcher.get_error())
                state.failed = True

    def _state(self, row: SamplingBatchRow) -> _SeqState:
        spec = row.params.structured_outputs
        assert spec is not None
        return self._state_of(row.request_id, spec, row.output_token_ids)

    def _state_of(self, request_id: str, spec: StructuredOutputsParams,
                  out: list[int]) -> _SeqState:
        """The sequence's matcher, created on first use and brought level with its output
        tokens `out` (a prefetch the scheduler did not keep is rolled back)."""
        state = self._states.get(request_id)
        if state is None:
            future = self._pending.pop(request_id, None)
            # NOTE: the engine core schedules a sequence only once its grammar compiled, so
            # this does not wait (a direct runner user may get a synchronous compile).
            template = future.result() if future is not None else \
                self.compiler.submit(self.compiler.source(spec)).result()
            state = _SeqState(template.deep_copy())
            self._states[request_id] = state
        if state.ahead:
            n = len(state.ahead)
            if state.consumed > len(out) or out[state.consumed - n:state.consumed] != state.ahead:
                self._rollback(state, n)
            state.ahead = []
        if state.consumed < len(out):
            state.mask_row = None
            self._consume(state, out[state.consumed:])
        return state

    def _rollback(self, state: _SeqState, n: int) -> None:
        state.mask_row = None
        state.consumed -= n
        if not state.failed and not state.matcher.rollback(n):
            state.failed = True
            logger.warning("grammar rollback failed: %s", state.matcher.get_error())


@dataclass
class StepTimings:
    """Cumulative seconds per phase of the grammar work (engine thread unless noted)."""

    join: float = 0.0
    """Waiting for the prefetch worker before sampling."""
    mask: float = 0.0
    """Filling the masks the prefetch did not provide."""
    apply: float = 0.0
    """Unpacking the bitmask onto the logits."""
    prefetch: float = 0.0
    """Worker thread: consuming sampled tokens and filling next masks (overlapped)."""
    steps: int = 0
    """Steps that masked constrained rows (verify steps included)."""
    forced_tokens: int = 0
    """Tokens drafted by jump-forward."""

    def add(self, **seconds: float) -> None:
        for name, value in seconds.items():
            setattr(self, name, getattr(self, name) + value)
        if "apply" in seconds:
            self.steps += 1

    def reset(self) -> None:
        self.join = self.mask = self.apply = self.prefetch = 0.0
        self.steps = self.forced_tokens = 0


def unpack_bitmask(masks: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, ceil(V/32)) int32 llguidance bitmasks -> (B, V) bool tensor, True where allowed."""
    return torch.from_numpy(unpack_bits(masks.numpy(), vocab_size).copy())
