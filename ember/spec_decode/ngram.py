"""Prompt-lookup (n-gram) proposer: continue the request's context after an earlier occurrence
of its suffix. Costs no model call; wins when the output copies the prompt (or itself).

Matching (what a copy task needs):
- the longest n-gram suffix (n from `prompt_lookup_max` down to `prompt_lookup_min`) finds the
  candidate occurrences; among the most recent `MAX_CANDIDATES` of them the one whose match
  extends furthest backwards (up to `MAX_EXTEND` tokens) wins, ties to the most recent: a copy
  run continues from the place it is copying, not from a recent repeat of its last 4 tokens;
- the draft copies with overlap (LZ77-style): a match inside a repeating run proposes the run's
  continuation at full length instead of stopping at the end of the context;
- a verified copy run is continued without searching: when every token appended since the last
  proposal equals the source's continuation (the accepted drafts and the bonus token), the next
  draft starts where the source left off and the match length grows by those tokens.
- a long copy run broken by one token (an edit: the model wrote a token the source does not
  have) is re-anchored at once instead of waiting for a fresh n-gram match (which needs
  `prompt_lookup_min` tokens past the edit): when the new token is found a few tokens further
  in the source the model skipped those (continue after it), else it replaced the source token
  (continue after that one). Such a guess has match length 1, so its acceptance is learned
  apart from the n-gram matches (`MatchAcceptance`, class 1); an n-gram match of
  `REANCHOR_BELOW` tokens or more found by the search wins over it.

The match length (`Match.length`) is what the draft-length policy uses as confidence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ember.types import Request

MAX_CANDIDATES = 8
"""Most recent occurrences of the suffix n-gram whose backward match length is measured."""
MAX_EXTEND = 64
"""Longest backward match measured when searching (a continued run may grow past it)."""
REANCHOR_MIN_RUN = 8
"""Tokens a copy run must have matched (before the edit) to be re-anchored after one."""
REANCHOR_SKIP = 4
"""Source tokens looked ahead for the edited token (the model skipped up to this many - 1)."""
REANCHOR_BELOW = 4
"""A searched n-gram match shorter than this gives way to a re-anchored copy run."""


@dataclass(frozen=True)
class Match:
    """A proposal: `tokens` copied from position `source` of the context, whose `length`
    tokens before `source` equal the context's last `length` tokens (0 / [] when none)."""

    length: int = 0
    source: int = -1
    tokens: tuple[int, ...] = ()


NO_MATCH = Match()


def overlap_copy(seq: list[int], source: int, k: int) -> list[int]:
    """k tokens continuing `seq` from `source` (< len(seq)) as an overlapping copy: token j is
    (seq + drafts)[source + j], so a match in a repeating run repeats the run."""
    out = seq[source:source + k]
    length = len(seq)
    while len(out) < k:  # source + len(out) >= length: copy from the drafts themselves
        out.append(out[source + len(out) - length])
    return out


def backward_match(seq: list[int], source: int, end: int, limit: int) -> int:
    """How many tokens before `source` equal those before `end` (at most `limit`)."""
    m = 0
    while m < limit and m < source and seq[source - 1 - m] == seq[end - 1 - m]:
        m += 1
    return m


def best_source(seq: list[int], sources: list[int], n: int) -> tuple[int, int]:
    """(match length, source) among the most recent `MAX_CANDIDATES` of `sources` (positions
    following an occurrence of the last n tokens; ascending): the longest backward match,
    ties to the most recent."""
    best_len, best_src = 0, -1
    for src in reversed(sources[-MAX_CANDIDATES:]):
        m = n + backward_match(seq, src - n, len(seq) - n, max(MAX_EXTEND - n, 0))
        if m > best_len:
            best_len, best_src = m, src
    return best_len, best_src


def ngram_lookup(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """Reference full scan (what `NgramIndex.match` proposes when no copy run is being
    continued): up to `k` tokens after the best earlier occurrence of the longest suffix
    n-gram, n in [min_n, max_n]; [] when none matches.

    tokens: (L,) int context. An occurrence must end before the last token so at least one
    continuation token exists.
    """
    from numpy.lib.stride_tricks import sliding_window_view

    seq = [int(t) for t in tokens]
    length = len(seq)
    if k <= 0:
        return []
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        windows = sliding_window_view(tokens[:length - 1], n)  # (L - n, n): starts 0 .. L-n-1
        hits = np.flatnonzero((windows == tokens[length - n:]).all(axis=1))
        if hits.size:
            _, src = best_source(seq, [int(h) + n for h in hits], n)
            return overlap_copy(seq, src, k)
    return []


class NgramIndex:
    """Incremental n-gram index of one append-only token sequence.

    For every n in [min_n, max_n] it maps each n-gram to the ascending positions of the token
    that followed it (an n-gram enters once its next token exists, so the context's own
    suffix never matches itself). `extend` indexes only the tokens appended since the last
    call; a context that is not an extension of the indexed one is re-indexed from scratch.
    """

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self._next: dict[tuple[int, ...], list[int]] = {}
        self._run: tuple[int, Match] | None = None
        """(context length when proposed, the match proposed): the copy run to continue."""

    def extend(self, tokens: list[int]) -> None:
        """Index `tokens` (the whole context; normally the indexed one plus new tokens)."""
        old = len(self.tokens)
        if len(tokens) < old or (old and tokens[old - 1] != self.tokens[-1]) \
                or tokens[:1] != self.tokens[:1]:
            self.tokens, self._next, self._run, old = [], {}, None, 0
        self.tokens.extend(tokens[old:])
        seq, table = self.tokens, self._next
        for nxt in range(max(old, 1), len(seq)):  # the n-grams ending just before nxt
            for n in range(self.min_n, min(self.max_n, nxt) + 1):
                table.setdefault(tuple(seq[nxt - n:nxt]), []).append(nxt)

    def _continued(self) -> tuple[int, int]:
        """(match length, source) of the previous proposal's copy run when every token
        appended since equals its source's continuation, else (0, -1)."""
        if self._run is None:
            return 0, -1
        then, prev = self._run
        seq, grown = self.tokens, len(self.tokens) - then
        if grown <= 0 or overlap_copy(seq[:then], prev.source, grown) != seq[then:]:
            return 0, -1
        return prev.length + grown, prev.source + grown

    def _reanchored(self) -> int:
        """Source position to continue from when the previous proposal's copy run (at least
        `REANCHOR_MIN_RUN` tokens matched) broke at the last token appended since: after that
        token's next occurrence within `REANCHOR_SKIP` source tokens (the model skipped the
        ones before it), else after the source token it replaced; -1 when not such a break."""
        if self._run is None:
            return -1
        then, prev = self._run
        seq, grown = self.tokens, len(self.tokens) - then
        if grown <= 0 or prev.source < 0:
            return -1
        expect = overlap_copy(seq[:then], prev.source, grown)
        if expect[:-1] != seq[then:-1] or expect[-1] == seq[-1] \
                or prev.length + grown - 1 < REANCHOR_MIN_RUN:
            return -1
        edited = prev.source + grown - 1  # the source token the model did not copy
        for skip in range(1, REANCHOR_SKIP + 1):
            if edited + skip < then and seq[edited + skip] == seq[-1]:
                return edited + skip + 1
        return edited + 1 if edited + 1 < then else -1

    def match(self, k: int, continue_run: bool = True) -> Match:
        """Up to k tokens continuing the context (see the module docstring); NO_MATCH if
        nothing matches or k <= 0. Remembers the proposal to continue it next time
        (`continue_run=False` searches regardless, as `ngram_lookup` does)."""
        seq, length = self.tokens, len(self.tokens)
        if k <= 0:
            return NO_MATCH
        found, src = self._continued() if continue_run else (0, -1)
        if not found:
            for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
                sources = self._next.get(tuple(seq[length - n:]))
                if sources:
                    found, src = best_source(seq, sources, n)
                    break
            if continue_run and found < REANCHOR_BELOW:
                anchor = self._reanchored()
                if anchor >= 0:
                    found, src = 1, anchor
        if not found:
            self._run = None
            return NO_MATCH
        result = Match(found, src, tuple(overlap_copy(seq, src, k)))
        self._run = (length, result)
        return result

    def lookup(self, k: int) -> tuple[int, list[int]]:
        """(match length, up to k tokens): `match(k)` as a pair."""
        m = self.match(k)
        return m.length, list(m.tokens)


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

    def match(self, requests: list[Request], max_len: list[int]) -> list[Match]:
        """Each request's best match with up to max_len[i] tokens (the length policy cuts)."""
        return [self.index(r).match(k) if k > 0 else NO_MATCH
                for r, k in zip(requests, max_len)]

    def propose(self, requests: list[Request], max_len: list[int]) -> list[list[int]]:
        return [list(m.tokens) for m in self.match(requests, max_len)]

    def release(self, request_ids: set[str]) -> None:
        for rid in request_ids:
            self._index.pop(rid, None)

