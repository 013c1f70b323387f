"""Bounded work per request: limits checked before a request reaches the engine.

Every limit answers 400 naming the field and the bound, so one client cannot make the server
queue work it can never finish (a request that can never be admitted), flood the event loop
with a response bomb (n x max_tokens x top logprobs), slow every step (huge stop lists) or
recompute prompts at length (prompt logprobs). Limits come from `ServingGuards`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ember.config import EngineConfig, ServingGuards
from ember.engine.engine import ProcessedPrompt
from ember.server.errors import bad_request
from ember.types import SamplingParams


def check_text(text: str, param: str) -> None:
    """400 when `text` is not valid Unicode (a lone surrogate such as "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request(f"{param} is not valid Unicode: a lone surrogate at character "
                          f"{exc.start}", param) from None


@dataclass(frozen=True)
class RequestGuards:
    """The per-request limits of one server."""

    limits: ServingGuards
    vocab_size: int
    max_seqs_ever: int
    """max_num_seqs + max_queued_requests: more sequences are never admitted."""
    kv_tokens: int
    """Tokens the whole KV cache holds: one sequence can never need more."""

    @classmethod
    def create(cls, config: EngineConfig, vocab_size: int, kv_tokens: int) -> RequestGuards:
        return cls(config.server.guards, vocab_size,
                   config.scheduler.max_num_seqs + config.server.max_queued_requests,
                   kv_tokens)

    def check_params(self, params: SamplingParams, num_prompts: int) -> None:
        """Limits known before tokenizing (cheap; run them first)."""
        lim = self.limits
        ids = params.stop_token_ids or []
        if len(ids) > lim.max_stop_token_ids:
            raise bad_request(f"stop_token_ids has {len(ids)} ids; at most "
                              f"{lim.max_stop_token_ids} are allowed", "stop_token_ids")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise bad_request(f"stop_token_ids: {bad} is not a token id of this model "
                              f"(0..{self.vocab_size - 1})", "stop_token_ids")
        stops = params.stop or []
        if len(stops) > lim.max_stop_strings:
            raise bad_request(f"at most {lim.max_stop_strings} stop strings are allowed, got "
                              f"{len(stops)}", "stop")
        for stop in stops:
            if len(stop) > lim.max_stop_string_chars:
                raise bad_request(f"a stop string may have at most {lim.max_stop_string_chars}"
                                  f" characters, got {len(stop)}", "stop")
            check_text(stop, "stop")
        seqs = params.n * num_prompts
        if seqs > self.max_seqs_ever:
            raise bad_request(
                f"this request needs {seqs} sequences (n x prompts) but the server runs at most "
                f"{self.max_seqs_ever} at once (--max-num-seqs + --max-queued-requests), so it "
                f"could never be admitted", "n")

    def check_prompts(self, params: SamplingParams, prompts: Sequence[ProcessedPrompt]) -> None:
        """Limits that need the token counts (after tokenizing)."""
        lim, n = self.limits, params.n
        for p in prompts:
            need = len(p.token_ids) + p.max_tokens
            if need > self.kv_tokens:
                raise bad_request(
                    f"prompt ({len(p.token_ids)} tokens) + max_tokens ({p.max_tokens}) needs "
                    f"{need} tokens of KV cache but the whole cache holds {self.kv_tokens}; "
                    f"lower max_tokens", "max_tokens")
        if params.logprobs is not None:
            items = sum(p.max_tokens for p in prompts) * n * (1 + params.logprobs)
            if items > lim.max_response_items:
                raise bad_request(
                    f"n x max_tokens x (1 + top logprobs) = {items} exceeds this server's limit "
                    f"of {lim.max_response_items} per request; lower n, max_tokens or "
                    f"(top_)logprobs", "logprobs")
        if params.prompt_logprobs is not None:
            items = sum(len(p.token_ids) for p in prompts) * n * (1 + params.prompt_logprobs)
            if items > lim.max_prompt_logprob_items:
                raise bad_request(
                    f"prompt tokens x n x (1 + logprobs) = {items} exceeds this server's limit "
                    f"of {lim.max_prompt_logprob_items} for prompt logprobs (echo); lower n, "
                    f"the prompt length or logprobs", "echo")
