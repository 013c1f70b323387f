"""Plain data objects that cross the boundaries between engine parts.

No logic lives here beyond trivial derived properties and field validation of user input.
Owners: the scheduler creates and mutates `Request`; the runner reads `SchedulerOutput` and
returns `ModelRunnerOutput`; the engine turns per-step `EngineCoreOutput`s into user-facing
`RequestOutput`s.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class InvalidRequestError(ValueError):
    """A user-supplied value is invalid. `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class StructuredOutputsParams:
    """Constrain a completion to a grammar: set exactly one field (vLLM's names).

    Compiled and enforced by `ember.sampling.constrained`.
    """

    json: dict[str, Any] | str | None = None
    """A JSON Schema (a dict, or its JSON text); the output is one JSON value valid against it."""
    json_object: bool = False
    """Any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
    regex: str | None = None
    """The output matches this regular expression (Rust `regex` syntax, anchored)."""
    choice: list[str] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """A Lark grammar (llguidance's dialect: `start` is the top rule)."""
    whitespace_flexible: bool = False
    """JSON: allow any whitespace between tokens (False: compact `, ` / `: ` separators,
    which keeps small models from looping on whitespace)."""

    def __post_init__(self) -> None:
        chosen = [name for name in ("json", "regex", "choice", "grammar")
                  if getattr(self, name) is not None] + (["json_object"] if self.json_object else [])
        if len(chosen) != 1:
            raise InvalidRequestError(
                "structured_outputs must set exactly one of json, json_object, regex, choice, "
                f"grammar (got {', '.join(chosen) or 'none'})", "structured_outputs")
        if self.choice is not None and (not self.choice or any(
                not isinstance(c, str) or not c for c in self.choice)):
            raise InvalidRequestError("structured_outputs.choice must be a non-empty list of "
                                      "non-empty strings", "structured_outputs.choice")


MIN_REPETITION_PENALTY = 1e-6
"""Smallest accepted repetition_penalty (logits up to ~1e4 stay finite in float32 when divided)."""


@dataclass
class SamplingParams:
    """How to sample one completion. Field names follow the OpenAI / vLLM conventions."""

    n: int = 1
    """Number of completions for the prompt (each becomes its own engine request)."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 disables."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p * max probability; in [0, 1]."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated; in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted per occurrence from the logit of generated tokens; in [-2, 2]."""
    repetition_penalty: float = 1.0
    """CTRL-style penalty (>0) on tokens in the prompt or output: logit/p if >0 else logit*p."""
    seed: int | None = None
    """Per-request random seed: the same seed gives the same text, batched or alone."""
    max_tokens: int | None = 16
    """Maximum new tokens; None means up to the context length."""
    min_tokens: int = 0
    """EOS and stop token ids are suppressed until this many tokens were generated."""
    stop: list[str] = field(default_factory=list)
    """Stop strings; the matched text is not returned."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra token ids that end generation (the token is not returned as text)."""
    ignore_eos: bool = False
    """Keep generating past EOS."""
    logprobs: int | None = None
    """Return the sampled token's logprob plus the top-N alternatives (0 = only the sampled)."""
    prompt_logprobs: int | None = None
    """Return logprobs of each prompt token plus the top-N alternatives."""
    skip_special_tokens: bool = True
    """Drop special tokens from the returned text."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string in the output text."""
    structured_outputs: StructuredOutputsParams | None = None
    """Constrain the output to a JSON Schema / regex / choice / grammar (see constrained.py)."""
    logit_bias: dict[int, float] | None = None
    """Added to the logits of these token ids before sampling; values in [-100, 100]."""
    cache_salt: str | None = None
    """Prefix-cache namespace: KV blocks are shared only between requests with the same salt
    (the server sets one per API key, so one key cannot probe another's prompts)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first invalid field."""

        def bad(name: str, rule: str) -> InvalidRequestError:
            return InvalidRequestError(f"{name} must be {rule}, got {getattr(self, name)!r}", name)

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "an integer >= 1")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, "a finite number")
        if self.temperature < 0:
            raise bad("temperature", ">= 0")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", "-1, 0 (disabled) or a positive integer")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "in [0, 1]")
        if not -2 <= self.presence_penalty <= 2:
            raise bad("presence_penalty", "in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            raise bad("frequency_penalty", "in [-2, 2]")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty:
            # NOTE: a smaller penalty rounds to float32 0 (or divides logits past float32's
            # range): the sampler then divided by zero, turning logits into inf.
            raise bad("repetition_penalty", f">= {MIN_REPETITION_PENALTY:g}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int)
                                            or self.max_tokens < 1):
            raise bad("max_tokens", "an integer >= 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"<= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= 20):
                raise bad(name, "an integer in [0, 20]")
        if self.seed is not None and (not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise bad("seed", "an integer in [0, 2^63)")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "a list of non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "a list of non-negative integers")
        if self.logit_bias is not None and any(
                not isinstance(t, int) or t < 0 or not isinstance(b, (int, float))
                or not -100 <= b <= 100 for t, b in self.logit_bias.items()):
            raise bad("logit_bias", "a map of token ids to numbers in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)

    @property
    def finish_reason(self) -> str | None:
        """OpenAI finish_reason string, or None while unfinished."""
        return self.value if self.finished else None


@dataclass
class Request:
    """One sequence inside the engine. Created by the engine, mutated only by the scheduler.

    Invariant: `num_computed_tokens` tokens of `all_token_ids` have their KV in the cache; each
    step the scheduler lets it catch up with `num_tokens` (prompt, then generated tokens).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    arrival_time: float = 0.0
    priority: int = 0
    max_tokens: int = 16
    """Resolved max new tokens (sampling_params.max_tokens capped by the context length)."""
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1
    """Prompt tokens served from the prefix cache at first schedule (-1 before)."""
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended the request."""
    first_scheduled_time: float | None = None
    spec_token_ids: list[int] = field(default_factory=list)
    """Draft tokens proposed for the next step (not part of `all_token_ids`; the scheduler
    may schedule them after the last known token for the target to verify)."""

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)


@dataclass
class ScheduledRequest:
    """One request's share of a step: compute `num_new_tokens` tokens starting at `start`."""

    request: Request
    """Read-only for the runner."""
    start: int
    """num_computed_tokens before this step (position of the first scheduled token)."""
    num_new_tokens: int
    block_ids: list[int]
    """The request's whole block table (KV slots for positions 0 .. start+num_new_tokens-1);
    with several KV cache groups, group 0's (ember/kv_cache/groups.py)."""
    spec_token_ids: list[int] = field(default_factory=list)
    """Draft tokens scheduled after the last known token (counted in `num_new_tokens`)."""
    group_block_ids: list[list[int]] = field(default_factory=list)
    """The block tables of KV cache groups 1.. (empty with one group); a sliding-window
    group holds block 0 where its blocks fell out of the window."""

    @property
    def token_ids(self) -> list[int]:
        ids = self.request.all_token_ids[self.start:self.start + self.num_new_tokens]
        return ids + self.spec_token_ids if self.spec_token_ids else ids

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the known tokens, so a new token is sampled."""
        return self.end == self.request.num_tokens + len(self.spec_token_ids)


@dataclass
class SchedulerOutput:
    """What the scheduler decided for one step."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_scheduled_tokens: int = 0
    finished_request_ids: set[str] = field(default_factory=set)
    """Requests finished or aborted since the previous step (runner frees per-request state)."""
    preempted_request_ids: set[str] = field(default_factory=set)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class TokenLogprobs:
    """Logprob of one chosen token plus the top-N alternatives at that position."""

    token_id: int
    logprob: float
    rank: int
    """1-based rank of the chosen token in the distribution."""
    top: list[tuple[int, float]] = field(default_factory=list)
    """(token_id, logprob) pairs, most likely first."""


@dataclass
class ModelRunnerOutput:
    """Per-step result of the model runner + sampler, keyed by request id."""

    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    """New tokens for each request that sampled this step (one each without speculation;
    with drafts: the accepted drafts plus one sampled token)."""
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprobs | None]] = field(default_factory=dict)
    """Logprobs of prompt tokens computed this step, in order (None for the first token)."""
    hidden_states: dict[str, Any] = field(default_factory=dict)
    """With `ModelRunner.keep_hidden` (the `eagle` proposer): each sampling request's final
    hidden row (torch (D,) float32) that produced its last sampled token."""


@dataclass
class EngineCoreOutput:
    """Per-step delta of one request, produced by Scheduler.update()."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    new_prompt_logprobs: list[TokenLogprobs | None] | None = None
    finish_status: RequestStatus | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_status is not None


@dataclass
class CompletionOutput:
    """One completion of a prompt, as the user sees it."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    """'stop', 'length', 'abort' or None while running."""
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprobs] | None = None
    delta_text: str = ""
    """Text added by the latest step (for streaming)."""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[TokenLogprobs] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """User-facing result for one prompt (all its completions)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class SamplingBatchRow:
    """Sampler input for one row of logits (the runner builds these)."""

    request_id: str
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_id: int | None = None
    generator: "torch.Generator | None" = None
    """Set when params.seed is given: all randomness of this row comes from it."""
