"""Constrained decoding: JSON Schema / regex / choice / Lark grammar masks with llguidance.

Why llguidance (measured on SmolLM2's 49k vocabulary, `benchmarks/grammar_engines.py`):
compiling a typical JSON schema takes ~1.3 ms (its lexer is built lazily) against 12-23 ms for
xgrammar, which misses the 10 ms compile target; its per-token mask (~40-90 us) is slower than
xgrammar's (~5-10 us) but is < 1% of a CPU decode step. It also reads Lark grammars and regexes
directly (vLLM's `grammar` / `regex`), and its errors name the unsupported schema keyword.

Flow:
- `GrammarCompiler` (`grammar_compiler.py`) validates a spec's grammar synchronously (a bad
  schema is a 400 before anything is queued) and compiles it on a thread pool into a template
  matcher, LRU-cached by grammar text.
- `StructuredOutputManager.ready(request)` says whether a request's grammar finished compiling
  (the engine core keeps it out of the scheduler until then, without blocking the batch).
- `lazy_mask.sample_constrained` (the runner's entry) samples eligible rows validate-first:
  `free_rows` / `allows` check the unmasked token, `mask_rows` masks only the rows that need it.
- `StructuredOutputManager.apply(logits, rows)` adds `logit_bias` and masks each constrained row
  (one packed (C, V/32) int32 bitmask for the step, applied in place: `grammar_masks.py`).
  Each sequence (each of `n`) has its own matcher (a deep copy of the template). Right after a
  step is sampled, `prefetch` consumes the sampled tokens and fills the next masks on a worker
  thread, overlapped with the next forward pass, when a core is free for it (`overlap_pays`,
  `grammar_overlap.py`); else the masks are filled inside the step, while the kernel threads
  wait. Before masking, a matcher is brought level with the sequence's output tokens
  (`grammar_state.py`), so preemption and recompute (which keep the output tokens) need nothing
  special. When the grammar is complete the mask allows only EOS.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterable

import numpy as np
import torch

from ember.kernels.ops import CpuKernels
from ember.sampling.grammar_compiler import GrammarCompiler
from ember.sampling.grammar_masks import (MaskFiller, apply_bitmask, bitmask_words, eos_only,
                                          new_bitmask, unpack_bitmask)
from ember.sampling.grammar_overlap import OVERLAP_MIN_ROWS, StepTimings, overlap_pays
from ember.sampling.grammar_state import MatcherStore, SeqState
from ember.sampling.sampler import is_untruncated
from ember.tokenizer import Tokenizer
from ember.types import Request, SamplingBatchRow, StructuredOutputsParams

try:
    import llguidance
except ImportError:  # pragma: no cover - llguidance is a core dependency
    llguidance = None  # type: ignore[assignment]

__all__ = ["OVERLAP_MIN_ROWS", "StepTimings", "StructuredOutputManager", "overlap_pays",
           "unpack_bitmask"]

_MAX_FORCED = 16
"""Most grammar-forced tokens drafted at once (jump-forward)."""


def _add_bias(logits: torch.Tensor, rows: range, bias: dict[int, float]) -> None:
    """Add `bias` (token id -> value; ids beyond the vocabulary ignored) to `rows` of `logits`
    (N, V) in place."""
    ids = torch.tensor(list(bias.keys()), dtype=torch.long)
    keep = ids < logits.shape[1]
    values = torch.tensor(list(bias.values()), dtype=logits.dtype)[keep]
    for k in rows:
        logits[k, ids[keep]] += values


class StructuredOutputManager:
    """Per-sequence grammar state of the engine; masks the logits of each step.

    Owned by the EngineCore (compile gating) and called by the ModelRunner (masking); both run
    on the engine thread. The only other thread is the prefetch worker: after step t is
    sampled, `prefetch` hands the matchers' consume + next-mask fill to it, so that work
    overlaps step t+1's scheduling and forward pass (llguidance and the kernels both release
    the GIL); `apply` joins it before reading any matcher.
    """

    def __init__(self, tokenizer: Tokenizer, cache_size: int = 256,
                 overlap: bool | None = None, kernels: CpuKernels | None = None) -> None:
        self.compiler = GrammarCompiler(tokenizer, cache_size)
        self.eos_token_id = tokenizer.eos_token_id
        self.vocab_size = tokenizer.vocab_size
        self.overlap = overlap
        """Compute next-step masks on the worker thread (False: lazily, inside `apply`);
        None chooses per step (`overlaps`)."""
        self._spare_core = overlap_pays(kernels)
        self.matchers = MatcherStore(self.compiler)
        """Each sequence's grammar compile, then its matcher."""
        self._filler = MaskFiller()
        self.kernels = kernels
        """The CPU kernels (apply the bitmasks natively), or None: numpy."""
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None
        self._inflight: concurrent.futures.Future[None] | None = None
        self._vocab = self.vocab_size
        """Width of the logits (the last step's), which the bitmasks cover."""
        self._prefetched = new_bitmask(0, self.vocab_size)
        """(P, W) masks written by the last prefetch (rows named by `SeqState.mask_row`)."""
        self.jump_forward_enabled = True
        """Draft grammar-forced tokens (`jump_forward`); False: one model step per token."""
        self.timings = StepTimings()
        """Seconds spent per phase (for benchmarks; a few perf_counter calls per step)."""
        self.validate_first = True
        """Sample eligible rows from the unmasked logits and compute a mask only when the
        grammar rejects the token (`lazy_mask.py`); False: mask every constrained row first."""

    # ---- requests -----------------------------------------------------------------------

    def validate(self, spec: StructuredOutputsParams | None) -> None:
        """Raise InvalidRequestError when `spec` cannot be compiled (cheap when cached)."""
        if spec is not None:
            self.compiler.source(spec)

    def submit(self, request_id: str, spec: StructuredOutputsParams) -> bool:
        """Start compiling the grammar of a sequence; True when it is already compiled."""
        return self.matchers.submit(request_id, spec)

    def ready(self, request_id: str) -> bool:
        return self.matchers.ready(request_id)

    def pending_futures(self) -> list[concurrent.futures.Future[llguidance.LLMatcher]]:
        return self.matchers.pending_futures()

    def release(self, request_ids: Iterable[str]) -> None:
        # NOTE: no join: a running prefetch keeps its own references to the states.
        self.matchers.release(request_ids)

    def shutdown(self) -> None:
        self._join()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
        self.compiler.shutdown()

    # ---- masking ------------------------------------------------------------------------

    def apply(self, logits: torch.Tensor, rows: list[SamplingBatchRow]) -> torch.Tensor:
        """Add each row's logit_bias, then mask constrained rows to their grammar's allowed
        tokens. `logits` (N, V) is modified in place and returned."""
        self.add_bias(logits, rows)
        index = [i for i, row in enumerate(rows) if row.params.structured_outputs is not None]
        if index:
            self.mask_rows(logits, rows, index)
            self.timings.steps += 1
        return logits

    def add_bias(self, logits: torch.Tensor, rows: list[SamplingBatchRow]) -> None:
        """Add each row's logit_bias to `logits` (N, V) in place."""
        for i, row in enumerate(rows):
            if row.params.logit_bias:
                _add_bias(logits, range(i, i + 1), row.params.logit_bias)

    def mask_rows(self, logits: torch.Tensor, rows: list[SamplingBatchRow],
                  index: list[int]) -> None:
        """Mask the constrained rows `index` of `logits` (N, V) in place to their grammar's
        allowed tokens (no logit_bias)."""
        t0 = time.perf_counter()
        self._join()
        t1 = time.perf_counter()
        masks = self.masks([rows[i] for i in index], logits.shape[1])
        t2 = time.perf_counter()
        apply_bitmask(logits, masks, index, self.eos_token_id, self.kernels)
        t3 = time.perf_counter()
        self.timings.add(join=t1 - t0, mask=t2 - t1, apply=t3 - t2)

    # ---- validate-first (lazy masks, `lazy_mask.py`) --------------------------------------

    def free_rows(self, rows: list[SamplingBatchRow], index: list[int]) -> list[int]:
        """Those of the constrained rows `index` whose token can be checked against the
        grammar one at a time instead of by a mask: the matcher is live and forces no bytes.

        NOTE: llguidance's mask is stricter than `validate_tokens` when the grammar forces
        bytes (the mask then allows only the canonical tokenization of the forced bytes, e.g.
        '{"' but not '{'), and a stopped matcher allows only EOS: those rows take the mask,
        which is cheap there (one forced token: ~10 us against ~200-300 us for a free
        state). Elsewhere the two agree on every token (tests/unit/test_lazy_mask.py)."""
        t0 = time.perf_counter()
        self._join()
        t1 = time.perf_counter()
        free = []
        for i in index:
            state = self.matchers.of_row(rows[i])
            if not state.dead() and not state.matcher.compute_ff_bytes():
                free.append(i)
        self.timings.add(join=t1 - t0, validate=time.perf_counter() - t1)
        return free

    def allows(self, rows: list[SamplingBatchRow], index: list[int],
               tokens: list[int]) -> list[bool]:
        """Whether the grammar of each row in `index` (from `free_rows`) allows its sampled
        token: the prefetched mask's bit where there is one, else llguidance's single-token
        check (EOS: whether the grammar may end here). Matchers are not advanced."""
        t0 = time.perf_counter()
        result = []
        for i, token in zip(index, tokens):
            state = self.matchers.of_row(rows[i])
            if not 0 <= token < self.vocab_size:
                result.append(False)
            elif state.mask_row is not None and \
                    self._prefetched.shape[1] == bitmask_words(self._vocab):
                word = int(self._prefetched[state.mask_row, token // 32])
                result.append(bool((word >> (token % 32)) & 1))
            elif token == self.eos_token_id:
                result.append(state.matcher.is_accepting())
            else:
                result.append(state.matcher.validate_tokens([token]) == 1)
        self.timings.add(validate=time.perf_counter() - t0)
        self.timings.lazy_rows += len(index)
        self.timings.rejected += result.count(False)
        return result

    def masks(self, rows: list[SamplingBatchRow], vocab: int) -> np.ndarray:
        """(C, W) next-token bitmasks of constrained `rows`: the prefetched ones where still
        valid, the others filled now."""
        self._join()
        self._vocab = vocab
        masks = new_bitmask(len(rows), vocab)
        todo: list[tuple[llguidance.LLMatcher, int]] = []
        for j, row in enumerate(rows):
            state = self.matchers.of_row(row)
            if state.mask_row is not None and masks.shape[1] == self._prefetched.shape[1]:
                masks[j] = self._prefetched[state.mask_row]
                state.mask_row = None
            elif state.dead():
                eos_only(masks, j, self.eos_token_id)
            else:
                todo.append((state.matcher, j))
        if todo:
            self._filler.fill(todo, masks)
        return masks

    def overlaps(self, rows: int) -> bool:
        """Whether a step with `rows` constrained rows fills its next masks on the worker
        thread: as forced by `overlap`, else when a core is free of kernel threads or the
        batch is large enough (`OVERLAP_MIN_ROWS`) for the overlap to pay on a busy core."""
        if self.overlap is not None:
            return self.overlap
        return self._spare_core or rows >= OVERLAP_MIN_ROWS

    def prefetch(self, rows: list[SamplingBatchRow], tokens: list[list[int]]) -> None:
        """After sampling: consume each constrained row's new `tokens` and compute its next
        mask on the worker thread (joined by the next `apply`)."""
        if not self.overlaps(sum(r.params.structured_outputs is not None for r in rows)):
            return
        self._join()
        jobs: list[tuple[SeqState, list[int], bool]] = []
        for row, new in zip(rows, tokens):
            state = self.matchers.get(row.request_id)
            if state is None or row.params.structured_outputs is None or not new:
                continue
            if state.consumed != len(row.output_token_ids) or state.ahead:
                continue  # not in sync: the next apply catches up lazily
            state.mask_row = None
            lazy = self.validate_first and is_untruncated(row.params, self._vocab)
            jobs.append((state, list(new), lazy))
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
            state = self.matchers.state_of(request.request_id, spec, request.output_token_ids)
            if state.dead():
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
        state = self.matchers.state_of(request.request_id, spec, request.output_token_ids)
        if state.dead():
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
            if row.params.logit_bias:
                _add_bias(logits, range(start, start + 1 + len(draft)), row.params.logit_bias)
        picked = [(row, start, draft) for row, start, draft in zip(rows, starts, drafts)
                  if row.params.structured_outputs is not None]
        if not picked:
            return
        self._join()
        masks = new_bitmask(sum(1 + len(d) for _, _, d in picked), logits.shape[1])
        jobs: list[tuple[llguidance.LLMatcher, int, list[int]]] = []
        index: list[int] = []
        for row, start, draft in picked:
            state = self.matchers.of_row(row)
            state.mask_row = None
            if state.dead():
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
        apply_bitmask(logits, masks, index, self.eos_token_id, self.kernels)
        self.timings.steps += 1

    def _advance_and_fill(self, jobs: list[tuple[SeqState, list[int], bool]]) -> None:
        """Worker thread: consume the sampled tokens, then fill the next masks (not for rows
        that will be sampled validate-first from a free state: `free_rows`)."""
        start = time.perf_counter()
        fill: list[tuple[llguidance.LLMatcher, int]] = []
        finished: list[tuple[SeqState, int]] = []
        for k, (state, new, lazy) in enumerate(jobs):
            state.consume(new)
            state.ahead = new
            if state.dead():
                eos_only(self._prefetched, k, self.eos_token_id)
                finished.append((state, k))
            elif not (lazy and not state.matcher.compute_ff_bytes()):
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
