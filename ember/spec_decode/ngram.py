"""Prompt-lookup (n-gram) proposer: continue the request's context after the most recent
earlier occurrence of its last n tokens (n from `prompt_lookup_max` down to
`prompt_lookup_min`). Costs no model call; wins when the output copies the prompt."""

from __future__ import annotations

from bisect import bisect_right

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


class NgramIndex:
    """Incremental n-gram index of one append-only token sequence: `lookup` gives what
    `ngram_lookup` gives, in O(max_n) dict probes instead of a scan of the whole context.

    For every n in [min_n, max_n] it maps each n-gram to the ascending positions of the token
    that followed it (an n-gram enters once its next token exists, so the context's own
    suffix never matches itself). `extend` indexes only the tokens appended since the last
    call; a context that is not an extension of the indexed one is re-indexed from scratch.
    """

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self._next: dict[tuple[int, ...], list[int]] = {}

    def extend(self, tokens: list[int]) -> None:
        """Index `tokens` (the whole context; normally the indexed one plus new tokens)."""
        old = len(self.tokens)
        if len(tokens) < old or (old and tokens[old - 1] != self.tokens[-1]) \
                or tokens[:1] != self.tokens[:1]:
            self.tokens, self._next, old = [], {}, 0
        self.tokens.extend(tokens[old:])
        seq, table = self.tokens, self._next
        for nxt in range(max(old, 1), len(seq)):  # the n-grams ending just before nxt
            for n in range(self.min_n, min(self.max_n, nxt) + 1):
                table.setdefault(tuple(seq[nxt - n:nxt]), []).append(nxt)

    def lookup(self, k: int) -> tuple[int, list[int]]:
        """(n, up to k tokens) after an earlier occurrence of the longest suffix n-gram: the
        latest occurrence followed by k known tokens, else the earliest; (0, []) if none."""
        seq, length = self.tokens, len(self.tokens)
        if k <= 0:
            return 0, []
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            starts = self._next.get(tuple(seq[length - n:]))
            if starts:
                i = bisect_right(starts, length - k) - 1  # latest start with k tokens after
                start = starts[i] if i >= 0 else starts[0]
                return n, seq[start:start + k]
        return 0, []


class NgramProposer:
    """Prompt lookup over the request's own prompt + output tokens (one incremental
    `NgramIndex` per running request, dropped by `release`)."""

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max
        self._index: dict[str, NgramIndex] = {}

    def index(self, request: Request) -> NgramIndex:
        """The request's index, brought up to date with its tokens."""
        index = self._index.get(request.request_id)
        if index is None:
            index = self._index[request.request_id] = NgramIndex(self.min_n, self.max_n)
        index.extend(request.all_token_ids)
        return index

    def propose(self, requests: list[Request], max_len: list[int]) -> list[list[int]]:
        return [self.index(r).lookup(k)[1] if k > 0 else [] for r, k in zip(requests, max_len)]

    def release(self, request_ids: set[str]) -> None:
        for rid in request_ids:
            self._index.pop(rid, None)
