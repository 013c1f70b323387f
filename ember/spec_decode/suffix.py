"""Suffix proposer (SuffixDecoding-style, simplified): the longest match of the request's
context suffix, looked up in its own prompt + output and in a bounded store of the outputs of
recently finished requests (shared across requests), proposes the tokens that followed.

NOTE: the shared store is a flat token array (outputs separated by -1) searched with the same
vectorised n-gram scan as the `ngram` proposer, not a suffix tree: with at most
`max_cached_requests` outputs of at most `max_tokens_per_output` tokens the scan stays in the
sub-millisecond range and memory is bounded by construction.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from ember.spec_decode.ngram import NO_MATCH, Match, NgramProposer
from ember.types import Request

_SEP = -1
"""Separates stored outputs so no match spans two of them."""


def _corpus_lookup(corpus: np.ndarray, suffix: np.ndarray, min_n: int, max_n: int,
                   k: int) -> tuple[int, list[int]]:
    """(n, continuation) of the longest suffix n-gram found in `corpus`, (0, []) if none."""
    from numpy.lib.stride_tricks import sliding_window_view

    length = corpus.shape[0]
    for n in range(min(max_n, suffix.shape[0], length - 1), min_n - 1, -1):
        windows = sliding_window_view(corpus[:length - 1], n)  # (L - n, n)
        hits = np.flatnonzero((windows == suffix[-n:]).all(axis=1))
        for hit in hits[::-1]:  # most recent output first
            cont = corpus[hit + n:hit + n + k]
            stop = np.flatnonzero(cont == _SEP)
            cont = cont[:stop[0]] if stop.size else cont
            if cont.size:
                return n, cont.tolist()
    return 0, []


class SuffixProposer:
    """Longest-suffix lookup over the request's context and recent outputs of all requests.

    Args:
        min_n / max_n: shortest / longest suffix matched.
        max_cached_requests: finished outputs kept in the shared store (oldest dropped).
        max_tokens_per_output: tokens kept per stored output (its first ones).
    """

    def __init__(self, min_n: int, max_n: int, max_cached_requests: int,
                 max_tokens_per_output: int = 1024) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.max_tokens_per_output = max_tokens_per_output
        self._outputs: deque[list[int]] = deque(maxlen=max_cached_requests)
        self._corpus: np.ndarray | None = None
        self._live: dict[str, Request] = {}
        self._own = NgramProposer(min_n, max_n)
        """The requests' own contexts (incremental n-gram indexes)."""

    @property
    def num_cached_tokens(self) -> int:
        return sum(len(o) + 1 for o in self._outputs)

    def match(self, requests: list[Request], max_len: list[int]) -> list[Match]:
        """Each request's longest match: in its own context (continuing a copy run there
        first), else in the shared store when that matches more tokens."""
        corpus = self._corpus_array()
        out: list[Match] = []
        for request, k in zip(requests, max_len):
            self._live[request.request_id] = request
            if k <= 0:
                out.append(NO_MATCH)
                continue
            own = self._own.index(request).match(k)
            if corpus is None or own.length >= self.max_n:
                out.append(own)
                continue
            ctx = np.asarray(request.all_token_ids, dtype=np.int64)
            n, shared = _corpus_lookup(corpus, ctx, self.min_n, self.max_n, k)
            out.append(Match(n, -1, tuple(shared)) if n > own.length else own)
        return out

    def propose(self, requests: list[Request], max_len: list[int]) -> list[list[int]]:
        return [list(m.tokens) for m in self.match(requests, max_len)]

    def release(self, request_ids: set[str]) -> None:
        """Finished requests' outputs enter the shared store."""
        self._own.release(request_ids)
        for rid in request_ids:
            request = self._live.pop(rid, None)
            if request is not None and request.output_token_ids:
                self._outputs.append(request.output_token_ids[:self.max_tokens_per_output])
                self._corpus = None

    def _corpus_array(self) -> np.ndarray | None:
        if self._corpus is None and self._outputs:
            flat: list[int] = []
            for tokens in self._outputs:
                flat.extend(tokens)
                flat.append(_SEP)
            self._corpus = np.asarray(flat, dtype=np.int64)
        return self._corpus
