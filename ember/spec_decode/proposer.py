"""The proposer interface: given a request's context, guess its next tokens."""

from __future__ import annotations

from typing import Protocol

from ember.types import Request


class Proposer(Protocol):
    """Proposes draft tokens for running requests.

    `propose` is called once per step for every request that has caught up with its tokens
    (`num_computed_tokens == num_tokens - 1`); it returns at most `max_len[i]` tokens for
    `requests[i]` (possibly none). `release` forgets per-request state of finished requests.
    """

    def propose(self, requests: list[Request], max_len: list[int]) -> list[list[int]]: ...

    def release(self, request_ids: set[str]) -> None: ...
