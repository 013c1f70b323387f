"""Draft-model proposer: a smaller Ember model that shares the target's vocabulary (e.g.
`ember prune --drop-layers` of the target, or a student from `ember distill`) guesses the next
tokens greedily.

It runs on the engine's own machinery: a `ModelRunner` (fused decoder, paged attention) with a
KV cache and block table of its own per request. Each `propose` call is a few batched draft
steps across every ready request: first a catch-up step (the tokens the target emitted since
the last call: the accepted drafts and the bonus token, or the whole prompt the first time,
chunked to the token budget), then one row per request per further draft token.

Rollback on rejection needs no bookkeeping beyond the token ids whose KV the draft cache holds
(`_DraftState.ids`): the next call keeps their common prefix with the request's context and
overwrites the slots past it; attention never reads past a row's own position.

NOTE: drafts are the draft model's argmax (its distribution q is one-hot), so the target's
accept/resample rule (`rejection.py`) stays exact for sampled requests as well.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ember.errors import ModelLoadError
from ember.types import Request, SamplingParams, ScheduledRequest, SchedulerOutput

if TYPE_CHECKING:
    from ember.loading.loader import LoadedModel
    from ember.runner.model_runner import ModelRunner

_GREEDY = SamplingParams(temperature=0.0, max_tokens=1 << 30, ignore_eos=True)
"""How the draft picks its tokens: the argmax of its raw logits."""
_DECAY = 0.9
"""Weight of the past in the measured seconds per draft step."""


class DraftModelError(ModelLoadError):
    """The draft model cannot serve this target (one line naming the model and the problem)."""


@dataclass
class _DraftState:
    """One target request's state in the draft model."""

    request: Request
    """The draft's view of the request: the target's context plus the drafts being made."""
    blocks: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    """Token ids whose KV the draft cache holds, at positions 0 .. len - 1."""
    verified: int = 0
    """Length of the target's context at the previous call: `ids` agrees with it up to here
    (a request's context only grows), so only the tail past it is compared."""
    last_used: int = 0


class DraftModelProposer:
    """Greedy drafts from a smaller model, batched across requests, with its own KV cache.

    Args:
        loaded: the draft model in its runtime form.
        runner: the draft's own ModelRunner over `loaded` (built by the engine, which owns
            runners: ember.engine.draft_model.load_draft_proposer).
        target_vocab_size: the target's vocabulary size (must match the draft's).
        block_size / num_blocks: the draft's KV cache geometry (block 0 is the null block).
        max_num_batched_tokens: most tokens one draft step computes (catch-up chunks; >= 2, the
            same budget as `runner`).
    """

    def __init__(self, loaded: LoadedModel, runner: ModelRunner, target_vocab_size: int,
                 block_size: int, num_blocks: int, max_num_batched_tokens: int) -> None:
        if loaded.arch.vocab_size != target_vocab_size:
            raise DraftModelError(
                f"draft model {loaded.source.path}: vocabulary of {loaded.arch.vocab_size} "
                f"tokens, the target has {target_vocab_size}; a draft must share the target's "
                f"tokenizer")
        self.loaded = loaded
        self.block_size = block_size
        self.budget = max_num_batched_tokens
        self.runner = runner
        self._free = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first
        self._states: dict[str, _DraftState] = {}
        self._calls = 0
        self.step_seconds: float | None = None
        """Measured seconds of one single-request draft step (EWMA), None before any."""
        self.num_steps = 0
        """Draft model steps run since start (for reports)."""

    # ---- Proposer ---------------------------------------------------------------------------

    def propose(self, requests: list[Request], max_len: list[int]) -> list[list[int]]:
        self._calls += 1
        out: list[list[int]] = [[] for _ in requests]
        live: list[tuple[int, _DraftState, int]] = []  # (index, state, wanted drafts)
        asking = {r.request_id for r in requests}
        for i, (request, k) in enumerate(zip(requests, max_len)):
            if k <= 0:
                continue
            state = self._state_for(request)
            if self._reserve(state, request.num_tokens + k, asking):
                live.append((i, state, k))
        if not live:
            return out
        t0 = time.perf_counter()
        steps = self._catch_up([s for _, s, _ in live])
        for i, state, _ in live:
            out[i].append(state.request.all_token_ids[-1])
        rounds = max(k for _, _, k in live)
        for j in range(1, rounds):
            batch = [(i, s) for i, s, k in live if k > j]
            sampled = self._run([ScheduledRequest(s.request, s.request.num_tokens - 1, 1,
                                                  s.blocks) for _, s in batch])
            steps += 1
            for i, state in batch:
                state.ids.append(state.request.all_token_ids[-1])  # its KV is now computed
                token = sampled[state.request.request_id]
                state.request.all_token_ids.append(token)
                out[i].append(token)
        if len(live) == 1:  # single stream: the cost per draft step, for the draft length
            seconds = (time.perf_counter() - t0) / max(steps, 1)
            self.step_seconds = seconds if self.step_seconds is None else (
                _DECAY * self.step_seconds + (1 - _DECAY) * seconds)
        return out

    def release(self, request_ids: set[str]) -> None:
        for rid in request_ids:
            state = self._states.pop(rid, None)
            if state is not None:
                self._free.extend(reversed(state.blocks))

    # ---- internals --------------------------------------------------------------------------

    def _state_for(self, request: Request) -> _DraftState:
        """The draft's state of `request`, its context set to the target's (KV kept for the
        common prefix: the rollback of rejected drafts)."""
        state = self._states.get(request.request_id)
        ctx = list(request.all_token_ids)
        if state is None:
            state = _DraftState(Request(request.request_id, request.prompt_token_ids, _GREEDY,
                                        all_token_ids=ctx))
            self._states[request.request_id] = state
        else:
            state.request.all_token_ids = ctx
            keep = min(len(state.ids), len(ctx) - 1)  # at least the last token is recomputed
            ids = state.ids
            n = min(state.verified, keep)
            while n < keep and ids[n] == ctx[n]:
                n += 1
            del ids[n:]
        state.verified = len(ctx)
        state.last_used = self._calls
        return state

    def _reserve(self, state: _DraftState, num_tokens: int, keep: set[str]) -> bool:
        """Blocks for `num_tokens` positions; evicts idle requests' draft KV when short (they
        prefill again later). False when even that is not enough (no draft this step)."""
        need = -(-num_tokens // self.block_size) - len(state.blocks)
        if need > len(self._free):
            idle = sorted((s for rid, s in self._states.items() if rid not in keep),
                          key=lambda s: s.last_used)
            for victim in idle:
                self._free.extend(reversed(victim.blocks))
                victim.blocks, victim.ids = [], []
                if need <= len(self._free):
                    break
        if need > len(self._free):
            return False
        for _ in range(max(need, 0)):
            state.blocks.append(self._free.pop())
        return True

    def _catch_up(self, states: list[_DraftState]) -> int:
        """Compute each request's context not yet in the draft cache (chunked to the budget)
        and append the first draft token to its context; returns the steps run."""
        steps = 0
        pending = list(states)
        while pending:
            batch: list[ScheduledRequest] = []
            used = 0
            for state in pending:
                start = len(state.ids)
                n = min(state.request.num_tokens - start, self.budget - used)
                if n <= 0:
                    break
                batch.append(ScheduledRequest(state.request, start, n, state.blocks))
                used += n
            sampled = self._run(batch)
            steps += 1
            still: list[_DraftState] = []
            for sr in batch:
                state = self._states[sr.request.request_id]
                state.ids.extend(sr.request.all_token_ids[sr.start:sr.end])
                if sr.samples:
                    state.request.all_token_ids.append(sampled[sr.request.request_id])
                else:
                    still.append(state)
            pending = still + pending[len(batch):]  # the batch is a prefix of `pending`
        return steps

    def _run(self, batch: list[ScheduledRequest]) -> dict[str, int]:
        """One draft step; the argmax token of every request whose step reached its end."""
        self.num_steps += 1
        out = self.runner.execute(SchedulerOutput(batch, sum(sr.num_new_tokens for sr in batch)))
        return {rid: tokens[0] for rid, tokens in out.sampled_token_ids.items()}


def draft_cost(step_seconds: float | None, one_row_seconds: float | None,
               prior: float = 0.3) -> float:
    """Cost of one draft-model step relative to a one-row target step (`prior` until both
    are measured)."""
    if step_seconds is None or not one_row_seconds:
        return prior
    return step_seconds / one_row_seconds


__all__ = ["DraftModelError", "DraftModelProposer", "draft_cost"]
