"""SpecDecoder: runs the proposer for the running requests after each step, picks each
request's draft length from its acceptance rate, and keeps the acceptance counters."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ember.config import SpecConfig
from ember.spec_decode.draft import DraftModelProposer, draft_cost
from ember.spec_decode.eagle import EagleProposer
from ember.spec_decode.ngram import NgramProposer
from ember.spec_decode.proposer import Proposer
from ember.spec_decode.step_cost import StepCostModel
from ember.spec_decode.suffix import SuffixProposer
from ember.types import ModelRunnerOutput, Request, SchedulerOutput

logger = logging.getLogger(__name__)

DRAFT_TOKEN_COST = 0.14
"""Prior cost of verifying one more draft token in a single-stream step, relative to a plain
decode step, until `StepCostModel` has timed this machine's steps (a few steps in). Measured
with the AVX2 few-row verify GEMM (`benchmarks/spec_verify_rows.py`, SmolLM2-135M int4,
2 threads, context 416): 16 rows cost 3.1 one-row steps, i.e. (3.1 - 1) / 15 per draft."""
DEFAULT_MAX_BATCH = 4
"""Speculation stops for a step once this many requests run. Measured (same run): a step of
5 rows per sequence vs 1 row gains at most 3.4x at batch 1, 2.1x at batch 2 and ~1.5x from
batch 4 to 32; from batch 4 on, verification of 4 drafts loses unless acceptance exceeds ~0.85
(the batch is compute-bound). On a Zen 3 (AVX2, no VNNI): 2.9x, 2.0x, 2.0x, 1.7x from 8 on.
Below it each request's drafts are priced by the measured cost of a row at that batch size
(`SpecDecoder._extra`), so a small batch drafts only what pays there (and sends no 1-token
probes: those are for a single stream); at and above it no request drafts. With the pricing
and no cap, 4 streams (3 copy-heavy) ran 1.21x against this cap's 1.09x but 5 streams 0.97x
against 1.02x (Zen 3, benchmarks/results/spec_decode/batch_cost_ab/): the cap stays.
SpecConfig.disable_by_batch_size overrides it."""
EAGLE_STEP_COST = 0.05
"""Prior cost of one `eagle` head step relative to a plain decode step, until both are timed."""
_DECAY = 0.95
"""Weight of the past in each request's acceptance estimate, per draft token tested."""
_STEP_DECAY = 0.5
"""... and per verification step, so a run of failed short drafts (open text after a copied
stretch) forgets the streak within a few steps, while a streak of long accepted drafts still
reaches the cap."""


@dataclass
class SpecStats:
    """Acceptance counters since start (Prometheus counters)."""

    num_drafts: int = 0
    """Verification steps that had drafts (request-steps)."""
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    """accepted_per_position[j]: drafts accepted at position j (0-based) of their step."""

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


@dataclass
class _Acceptance:
    """One request's decayed per-token acceptance evidence (geometric model: every accepted
    draft is a success; the first rejected one a failure; the drafts after it were never
    tested and count neither way)."""

    hits: float = 0.0
    trials: float = 0.0
    skipped: int = 0
    """Steps in a row without drafts because drafting did not pay."""

    def update(self, drafted: int, accepted: int) -> None:
        tested = accepted + (1 if accepted < drafted else 0)
        keep = _STEP_DECAY * _DECAY ** tested
        self.hits = keep * self.hits + accepted
        self.trials = keep * self.trials + tested

    def rate(self) -> float:
        # NOTE: the prior (half a hit in one trial, alpha 0.5) lets a new request draft ~2
        # tokens; a streak of accepted drafts then lengthens them towards the cap.
        return (self.hits + 0.5) / (self.trials + 1.0)


_MATCH_PRIOR = (0.6, 0.6, 0.6, 0.8, 0.9, 0.95, 0.95)
"""Prior per-token acceptance of a draft after a match of each length class (`match_class`),
replaced by what the drafts after matches of that length achieve, all requests together.
Rising with the match length: measured (SmolLM2-135M, greedy, the quote / edit / code / story /
explain prompts of benchmarks/spec_decode.py, 16-token cap) 0.64 after 2-3 matched tokens,
0.85 after 4-7, 0.96 after 8-15, 1.0 after 16-31 and 0.98 after 32+; a flat prior made each
class's first long copy run draft short until its own evidence came in ..."""
_MATCH_PRIOR_WEIGHT = 2.0
"""... worth this many tested tokens."""
_MATCH_DECAY = 0.99
"""Weight of the past in a match-length class's acceptance, per draft token tested."""


def match_class(length: int) -> int:
    """Match-length class: 1, 2-3, 4-7, 8-15, 16-31, 32+ tokens -> 1 .. 6 (0: no match)."""
    return min(length.bit_length(), 6)


@dataclass
class MatchAcceptance:
    """Per-token acceptance by match-length class, learned across all requests: a draft
    copied after a 2-token match is a guess; one continuing a copy run that has matched 30
    tokens is nearly always right (geometric model, decayed, with a prior)."""

    hits: list[float] = field(default_factory=lambda: [0.0] * 7)
    trials: list[float] = field(default_factory=lambda: [0.0] * 7)

    def rate(self, length: int) -> float:
        c = match_class(length)
        return ((self.hits[c] + _MATCH_PRIOR[c] * _MATCH_PRIOR_WEIGHT)
                / (self.trials[c] + _MATCH_PRIOR_WEIGHT))

    def update(self, length: int, drafted: int, accepted: int) -> None:
        c = match_class(length)
        tested = accepted + (1 if accepted < drafted else 0)
        keep = _MATCH_DECAY ** tested
        self.hits[c] = keep * self.hits[c] + accepted
        self.trials[c] = keep * self.trials[c] + tested


def best_draft_length(alpha: float, max_len: int, cost: float = DRAFT_TOKEN_COST,
                      min_len: int = 1, extra: Callable[[int], float] | None = None) -> int:
    """Draft length maximising expected tokens per unit of step cost.

    With per-token acceptance alpha, k drafts yield (1 - alpha^(k+1)) / (1 - alpha) tokens
    (Leviathan et al.) for a step costing 1 + cost * k. Never below `min_len`: 1 for n-gram
    drafts (free to propose; one verify row costs little), 0 for a draft model, whose own
    steps can cost more than they save. `extra(k)`, when given, is the measured extra cost of
    verifying k drafts (in place of the linear cost * k), plus cost * k.
    """
    def value(k: int) -> float:
        expected = k + 1.0 if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)
        return expected / (1.0 + cost * k + (extra(k) if extra is not None else 0.0))

    return max(range(min_len, max_len + 1), key=value)


_MAX_GAP_S = 0.05
"""A step period longer than the runner's time by more than this was idle (between requests
or waiting on a client): the runner's time stands in for it."""
_PROBE_EVERY = 8
"""A request that stopped drafting (it did not pay) drafts one token every this many steps,
so its acceptance estimate follows the text."""


def _with_probe(acc: _Acceptance, k: int, probe: bool) -> int:
    """The draft length k chosen for a request, or when none pays (k == 0) a 1-token probe
    every `_PROBE_EVERY` such steps in a row (if `probe`), so its acceptance estimate keeps
    following the text."""
    acc.skipped = acc.skipped + 1 if k == 0 else 0
    return 1 if probe and k == 0 and acc.skipped % _PROBE_EVERY == 0 else k


def adaptive_length(acc: _Acceptance, cap: int, cost: float,
                    extra: Callable[[int], float] | None = None, probe: bool = True) -> int:
    """This step's draft length for a request with acceptance evidence `acc`, when one draft
    token costs `cost` of a plain decode step (plus `extra(k)` for verifying k): the length
    maximising expected tokens per unit of step cost (0 when no length pays; then one token
    every `_PROBE_EVERY` steps, unless `probe` is False: in a batch a probe's row costs the
    whole batch)."""
    k = best_draft_length(acc.rate(), cap, cost, min_len=0, extra=extra)
    return _with_probe(acc, k, probe)


def match_draft_length(acc: _Acceptance, by_match: MatchAcceptance, match_length: int,
                       cap: int, extra: Callable[[int], float], probe: bool = True) -> int:
    """Draft length for a lookup proposal of `cap` tokens after a match of `match_length`:
    the length with the most expected tokens per unit of step cost (`extra(k)`: measured
    extra cost of verifying k drafts), the per-token acceptance being the geometric mean of
    this request's recent rate and the rate of drafts after matches of this length (all
    requests). 0 when no length pays (then, with `probe`, one token every `_PROBE_EVERY` such
    steps)."""
    alpha = (acc.rate() * by_match.rate(match_length)) ** 0.5
    k = best_draft_length(alpha, cap, 0.0, min_len=0, extra=extra)
    return _with_probe(acc, k, probe)


def create_proposer(config: SpecConfig) -> Proposer:
    if config.method == "ngram":
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    if config.method == "suffix":
        return SuffixProposer(config.prompt_lookup_min, config.prompt_lookup_max,
                              config.suffix_decoding_max_cached_requests)
    if config.method in ("draft", "eagle"):  # NOTE: needs the target's model (and KV geometry)
        raise ValueError(f"the {config.method!r} proposer is built by the engine core "
                         "(ember.engine.draft_model.load_draft_proposer)")
    raise ValueError(f"unknown speculative method {config.method!r}")


class SpecDecoder:
    """The engine-side half of speculative decoding (the scheduler and runner do the rest)."""

    def __init__(self, config: SpecConfig, proposer: Proposer | None = None) -> None:
        config.validate()
        self.config = config
        self.proposer = proposer or create_proposer(config)
        self.lookup: NgramProposer | SuffixProposer | None = (
            self.proposer if isinstance(self.proposer, (NgramProposer, SuffixProposer))
            else NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
            if isinstance(self.proposer, EagleProposer) else None)
        """The lookup proposer: the method's own, or with `eagle` a prompt lookup tried first
        (its drafts are free; the head drafts where it finds nothing that pays)."""
        self.stats = SpecStats(accepted_per_position=[0] * config.num_speculative_tokens)
        self._acceptance: dict[str, _Acceptance] = {}
        self._head_acceptance: dict[str, _Acceptance] = {}
        """With `eagle`: each request's acceptance of the head's drafts (apart from its
        lookup drafts', which follow the match length)."""
        self.match_acceptance = MatchAcceptance()
        """Acceptance by match length, shared by all requests (lookup proposers)."""
        self._match_length: dict[str, int] = {}
        """Match length of each request's drafts in flight (lookup proposers)."""
        self.step_cost = StepCostModel(DRAFT_TOKEN_COST)
        """Measured cost of one draft token (single-stream steps), for the draft length."""
        self.batch_cost: dict[int, StepCostModel] = {}
        """Requests in a step (2 .. max_batch - 1) -> the time by rows of such decode/verify
        steps (all their rows): what a draft token costs in a batch, measured (`_extra`)."""
        self._last_step: tuple[str, float] | None = None
        """(request id, time) of the last single-request decode/verify step observed."""
        self.draft_filter: Callable[[Request, list[int]], list[int]] | None = None
        """Cuts a constrained request's draft to what its grammar accepts (set by the engine
        core to `StructuredOutputManager.truncate_draft`); None: such requests not drafted."""

    @property
    def max_batch(self) -> int:
        """Requests running from which a step skips speculation."""
        return self.config.disable_by_batch_size or DEFAULT_MAX_BATCH

    def _time_step(self, so: SchedulerOutput, step_seconds: float | None) -> None:
        """Feed the step-cost models with decode/verify steps: single-request ones the
        single-stream curve, those of B requests `batch_cost[B]` (the runner's time).

        NOTE: a step's cost is the whole engine period (runner, sampler, scheduler, proposer,
        output handling), timed from the previous observed step of the same request when
        back to back; the per-step overhead outside the runner makes extra rows relatively
        cheaper, which the runner's time alone would not show. Not with a draft model: its
        steps (counted apart, per draft token) run inside that period."""
        now = time.perf_counter()
        last, self._last_step = self._last_step, None
        if step_seconds is None or not so.scheduled:
            return
        if len(so.scheduled) > 1:
            if len(so.scheduled) < self.max_batch and all(
                    i.num_new_tokens == 1 + len(i.spec_token_ids) for i in so.scheduled):
                model = self.batch_cost.setdefault(len(so.scheduled),
                                                   StepCostModel(DRAFT_TOKEN_COST))
                model.observe(sum(i.num_new_tokens for i in so.scheduled), step_seconds)
            return
        item = so.scheduled[0]
        if item.num_new_tokens != 1 + len(item.spec_token_ids):  # prefill in this step
            return
        rid = item.request.request_id
        self._last_step = (rid, now)
        period = (now - last[1] if last is not None and last[0] == rid
                  and not isinstance(self.proposer, (DraftModelProposer, EagleProposer))
                  else 0.0)
        seconds = period if step_seconds <= period < step_seconds + _MAX_GAP_S else step_seconds
        self.step_cost.observe(item.num_new_tokens, seconds)

    def observe(self, so: SchedulerOutput, ro: ModelRunnerOutput,
                step_seconds: float | None = None) -> None:
        """Count each verified request's accepted drafts (update its acceptance estimate);
        `step_seconds` (the runner's time for this step) feeds the draft-cost model."""
        self._time_step(so, step_seconds)
        self.release(so.finished_request_ids)
        if isinstance(self.proposer, EagleProposer):
            self.proposer.observe_hidden(ro.hidden_states, [sr.request for sr in so.scheduled])
        for item in so.scheduled:
            k = len(item.spec_token_ids)
            rid = item.request.request_id
            sampled = ro.sampled_token_ids.get(rid)
            length = self._match_length.pop(rid, 0)
            if not k or not sampled:
                continue
            accepted = len(sampled) - 1
            stats = self.stats
            stats.num_drafts += 1
            stats.num_draft_tokens += k
            stats.num_accepted_tokens += accepted
            for j in range(accepted):
                stats.accepted_per_position[j] += 1
            own = self._acceptance if length else self._model_acceptance
            own.setdefault(rid, _Acceptance()).update(k, accepted)
            if length:
                self.match_acceptance.update(length, k, accepted)

    def propose(self, running: list[Request]) -> None:
        """Set `spec_token_ids` of every running request that has caught up with its tokens."""
        if isinstance(self.proposer, SuffixProposer):  # every output enters its shared store
            self.proposer.track(running)
        if len(running) >= self.max_batch:
            for request in running:  # no stale drafts once the batch shrinks again
                request.spec_token_ids = []
            return
        # NOTE: constrained requests (grammar or logit_bias) are drafted only through
        # `draft_filter` (which cuts a draft to its grammar-valid prefix; the runner masks
        # each verify row at its position); without one they are not drafted.
        ready = [r for r in running if r.num_computed_tokens == r.num_tokens - 1
                 and not r.status.finished
                 and (self.draft_filter is not None or not _constrained(r))]
        if not ready:
            return
        cap = self.config.num_speculative_tokens
        extra, alone = self._extra(len(running)), len(running) == 1
        proposals = [[] for _ in ready] if self.lookup is None else self._lookup_drafts(
            ready, cap, self.lookup, extra, alone)
        if self.proposer is not self.lookup:  # a model: where the lookup has nothing
            rest = [i for i, drafts in enumerate(proposals) if not drafts]
            lengths = [self._draft_length(ready[i], cap, extra, alone) for i in rest]
            for i, drafts in zip(rest, self.proposer.propose([ready[i] for i in rest],
                                                             lengths)):
                proposals[i] = drafts
        for request, drafts in zip(ready, proposals):
            if self.draft_filter is not None and drafts and _constrained(request):
                drafts = self.draft_filter(request, drafts)
            request.spec_token_ids = drafts

    def _extra(self, batch: int) -> Callable[[int], float]:
        """What verifying k drafts of one request adds to a step of `batch` running requests,
        relative to what one sampled token costs in that step. Alone: the measured
        single-stream curve (`step_cost.extra`). In a batch: k times the measured time of one
        more row there against the step's time per request (`batch_cost[batch].row_cost`;
        past a few rows the GEMMs are compute-bound, so every row costs about the same while
        a sampled token's share of the step shrinks); until measured, the single-stream cost
        times the batch (a constant row time). Measured on a Zen 3 (AVX2, no VNNI): 0.18 of
        a step alone, 0.36 at 2 requests, 0.37 at 4, 0.5 at 8-32 (`spec_decode.py
        --crossover`), so drafts must be right more often the larger the batch."""
        if batch <= 1:
            return self.step_cost.extra
        model = self.batch_cost.get(batch)
        cost = (model.row_cost(batch) if model is not None else None) or min(
            self.step_cost.hi, self.step_cost.cost * batch)
        return lambda k: cost * k

    def _lookup_drafts(self, ready: list[Request], cap: int,
                       lookup: NgramProposer | SuffixProposer, extra: Callable[[int], float],
                       probe: bool = True) -> list[list[int]]:
        """Drafts of a lookup proposer: look up the longest useful draft first (free), then
        cut it to the length that pays, given how often drafts after a match of this length
        were accepted (all requests) and this request's own recent acceptance."""
        caps = [max(0, min(cap, r.max_tokens - r.num_output_tokens - 1)) for r in ready]
        out: list[list[int]] = []
        for request, m in zip(ready, lookup.match(ready, caps)):
            k = len(m.tokens)
            if k and self.config.adaptive:
                acc = self._acceptance.setdefault(request.request_id, _Acceptance())
                k = match_draft_length(acc, self.match_acceptance, m.length, k, extra, probe)
            if k:
                self._match_length[request.request_id] = m.length
            out.append(list(m.tokens[:k]))
        return out

    def _draft_length(self, request: Request, cap: int, extra: Callable[[int], float],
                      probe: bool = True) -> int:
        cap = min(cap, request.max_tokens - request.num_output_tokens - 1)
        if cap <= 0 or not self.config.adaptive:
            return max(cap, 0)
        acc = self._model_acceptance.setdefault(request.request_id, _Acceptance())
        return adaptive_length(acc, cap, self._proposal_cost(), extra, probe)

    @property
    def _model_acceptance(self) -> dict[str, _Acceptance]:
        """Where drafts not from a lookup match count (and `_draft_length` reads): the head's
        own table with `eagle` (its lookup drafts count in `_acceptance`), else `_acceptance`."""
        return (self._head_acceptance if isinstance(self.proposer, EagleProposer)
                else self._acceptance)

    def _proposal_cost(self) -> float:
        """What proposing one draft token costs, relative to a plain decode step."""
        if isinstance(self.proposer, DraftModelProposer):  # one draft-model step per token
            return draft_cost(self.proposer.step_seconds, self.step_cost.one_row_seconds)
        if isinstance(self.proposer, EagleProposer):  # one head step per token
            return draft_cost(self.proposer.step_seconds, self.step_cost.one_row_seconds,
                              prior=EAGLE_STEP_COST)
        return 0.0  # n-gram / suffix lookups: a few dict probes

    def release(self, request_ids: set[str]) -> None:
        for rid in request_ids:
            self._acceptance.pop(rid, None)
            self._head_acceptance.pop(rid, None)
            self._match_length.pop(rid, None)
        self.proposer.release(request_ids)
        if self.lookup is not None and self.lookup is not self.proposer:
            self.lookup.release(request_ids)


def _constrained(request: Request) -> bool:
    """True when the request's logits are masked or biased before sampling."""
    params = request.sampling_params
    return params.structured_outputs is not None or bool(params.logit_bias)
