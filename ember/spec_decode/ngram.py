"""Prompt-lookup (n-gram) proposer: continue the request's context after the most recent
earlier occurrence of its last n tokens (n from `prompt_lookup_max` down to
`prompt_lookup_min`). Costs no model call; wins when the output copies the prompt."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ember.types import Request


def ngram_lookup(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """Up to `k` tokens following an earlier match of the longest suffix n-gram (the latest
    match with k tokens after it, else the earliest match).

    tokens: (L,) int64 context. A match must end before the suffix itself starts so that at
    least one continuation token exists. Returns [] when no n in [min_n, max_n] matches.
    """
    length = tokens.shape[0]
    if k <= 0:
        return []
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        pattern = tokens[length - n:]  # (n,)
        windows = sliding_window_view(tokens[:length - 1], n)  # (L - n, n): starts 0 .. L-n-1
        hits = np.flatnonzero((windows == pattern).all(axis=1))
        if hits.size:
            # NOTE: the latest match followed by k known tokens; in a repeating run the very
            # latest match overlaps the suffix and would leave only one token to propose.
            full = hits[hits + n + k <= length]
            start = int(full[-1] if full.size else hits[0]) + n  # first token after the match
            return tokens[start:start + k].tolist()
    return []


class NgramProposer:
    """Prompt lookup over the request's own prompt + output tokens."""

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max

    def propose(self, requests: list[Request], max_len: list[int]) -> list[list[int]]:
        return [ngram_lookup(np.asarray(r.all_token_ids, dtype=np.int64), self.min_n,
                             self.max_n, k) if k > 0 else []
                for r, k in zip(requests, max_len)]

    def release(self, request_ids: set[str]) -> None:
        """No per-request state."""
