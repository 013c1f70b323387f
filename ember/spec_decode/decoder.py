"""SpecDecoder: runs the proposer for the running requests after each step, picks each
request's draft length from its acceptance rate, and keeps the acceptance counters."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from ember.config import SpecConfig
from ember.spec_decode.draft import DraftModelProposer, draft_cost
from ember.spec_decode.ngram import NgramProposer
from ember.spec_decode.proposer import Proposer
from ember.spec_decode.step_cost import StepCostModel
from ember.spec_decode.suffix import SuffixProposer
from ember.types import ModelRunnerOutput, Request, SchedulerOutput

logger = logging.getLogger(__name__)

DRAFT_TOKEN_COST = 0.3
"""Prior cost of verifying one more draft token in a single-stream step, relative to a plain
decode step, until `StepCostModel` has measured it on this machine. Profiled (SmolLM2-135M
int4, AVX2 without VNNI, 1 thread, ~500-token context): +3.1 ms of decoder (int4 GEMM rows
are compute-bound on AVX2; attention is per-row FLOPs) and +0.4 ms of LM head per row on a
~11 ms step, i.e. ~0.3. The earlier 0.12 came from prefill-chunk timings that hid this."""
DEFAULT_MAX_BATCH = 4
"""Speculation stops for a step once this many requests run. Measured (same run): a step of
5 rows per sequence vs 1 row gains at most 3.4x at batch 1, 2.1x at batch 2 and ~1.5x from
batch 4 to 32; from batch 4 on, verification of 4 drafts loses unless acceptance exceeds ~0.85
(the batch is compute-bound). SpecConfig.disable_by_batch_size overrides it."""
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


_PROBE_EVERY = 8
"""A request that stopped drafting (it did not pay) drafts one token every this many steps,
so its acceptance estimate follows the text."""


def adaptive_length(acc: _Acceptance, cap: int, cost: float,
                    extra: Callable[[int], float] | None = None) -> int:
    """This step's draft length for a request with acceptance evidence `acc`, when one draft
    token costs `cost` of a plain decode step (plus `extra(k)` for verifying k): the length
    maximising expected tokens per unit of step cost (0 when no length pays; then one token
    every `_PROBE_EVERY` steps)."""
    k = best_draft_length(acc.rate(), cap, cost, min_len=0, extra=extra)
    acc.skipped = acc.skipped + 1 if k == 0 else 0
    return 1 if k == 0 and acc.skipped % _PROBE_EVERY == 0 else k


def create_proposer(config: SpecConfig) -> Proposer:
    if config.method == "ngram":
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    if config.method == "suffix":
        return SuffixProposer(config.prompt_lookup_min, config.prompt_lookup_max,
                              config.suffix_decoding_max_cached_requests)
    if config.method == "draft":  # NOTE: needs the target's model and KV geometry
        raise ValueError("the 'draft' proposer is built by the engine core "
                         "(ember.engine.draft_model.load_draft_proposer)")
    raise ValueError(f"unknown speculative method {config.method!r}")


class SpecDecoder:
    """The engine-side half of speculative decoding (the scheduler and runner do the rest)."""

    def __init__(self, config: SpecConfig, proposer: Proposer | None = None) -> None:
        config.validate()
        self.config = config
        self.proposer = proposer or create_proposer(config)
        self.stats = SpecStats(accepted_per_position=[0] * config.num_speculative_tokens)
        self._acceptance: dict[str, _Acceptance] = {}
        self.step_cost = StepCostModel(DRAFT_TOKEN_COST)
        """Measured cost of one draft token (single-stream steps), for the draft length."""
        self.draft_filter: Callable[[Request, list[int]], list[int]] | None = None
        """Cuts a constrained request's draft to what its grammar accepts (set by the engine
        core to `StructuredOutputManager.truncate_draft`); None: such requests not drafted."""

    @property
    def max_batch(self) -> int:
        """Requests running from which a step skips speculation."""
        return self.config.disable_by_batch_size or DEFAULT_MAX_BATCH

    def observe(self, so: SchedulerOutput, ro: ModelRunnerOutput,
                step_seconds: float | None = None) -> None:
        """Count each verified request's accepted drafts (update its acceptance estimate);
        `step_seconds` (the runner's time for this step) feeds the draft-cost model."""
        if step_seconds is not None and len(so.scheduled) == 1:
            item = so.scheduled[0]
            if item.num_new_tokens == 1 + len(item.spec_token_ids):  # decode/verify, no prefill
                self.step_cost.observe(item.num_new_tokens, step_seconds)
        for rid in so.finished_request_ids:
            self._acceptance.pop(rid, None)
        self.proposer.release(so.finished_request_ids)
        for item in so.scheduled:
            k = len(item.spec_token_ids)
            sampled = ro.sampled_token_ids.get(item.request.request_id)
            if not k or not sampled:
                continue
            accepted = len(sampled) - 1
            stats = self.stats
            stats.num_drafts += 1
            stats.num_draft_tokens += k
            stats.num_accepted_tokens += accepted
            for j in range(accepted):
                stats.accepted_per_position[j] += 1
            self._acceptance.setdefault(item.request.request_id, _Acceptance()).update(
                k, accepted)

    def propose(self, running: list[Request]) -> None:
        """Set `spec_token_ids` of every running request that has caught up with its tokens."""
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
        lengths = [self._draft_length(r, cap) for r in ready]
        for request, drafts in zip(ready, self.proposer.propose(ready, lengths)):
            if self.draft_filter is not None and drafts and _constrained(request):
                drafts = self.draft_filter(request, drafts)
            request.spec_token_ids = drafts

    def _draft_length(self, request: Request, cap: int) -> int:
        cap = min(cap, request.max_tokens - request.num_output_tokens - 1)
        if cap <= 0 or not self.config.adaptive:
            return max(cap, 0)
        acc = self._acceptance.setdefault(request.request_id, _Acceptance())
        return adaptive_length(acc, cap, self._proposal_cost(), self.step_cost.extra)

    def _proposal_cost(self) -> float:
        """What proposing one draft token costs, relative to a plain decode step."""
        if isinstance(self.proposer, DraftModelProposer):  # one draft-model step per token
            return draft_cost(self.proposer.step_seconds, self.step_cost.one_row_seconds)
        return 0.0  # n-gram / suffix lookups: a few dict probes

    def release(self, request_ids: set[str]) -> None:
        for rid in request_ids:
            self._acceptance.pop(rid, None)
        self.proposer.release(request_ids)


def _constrained(request: Request) -> bool:
    """True when the request's logits are masked or biased before sampling."""
    params = request.sampling_params
    return params.structured_outputs is not None or bool(params.logit_bias)
