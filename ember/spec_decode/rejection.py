"""Lossless verification of draft tokens (Leviathan et al. 2023, Chen et al. 2023).

For each request the target model scored k draft tokens in one step, giving k + 1 rows of
logits: row j is the distribution of the token after the last known token and drafts[:j]. With
target distribution p_j and draft distribution q_j, draft x_j is accepted with probability
min(1, p_j(x_j) / q_j(x_j)); at the first rejection a token is drawn from the residual
norm(max(0, p_j - q_j)); if all k are accepted a bonus token is drawn from p_k. The emitted
tokens are then distributed exactly as sampling from p one token at a time.

Ember's proposers are deterministic (q_j is one-hot at x_j), so the rule becomes: accept x_j
with probability p_j(x_j); on rejection sample from p_j with x_j removed, renormalised. Greedy
rows accept x_j iff it is the argmax and emit the argmax at the first mismatch: the same tokens
as decoding without speculation.

p_j is exactly what `ember.sampling` would sample from: penalties (with drafts[:j] counted as
generated tokens), min_tokens, temperature, top-k, top-p and min-p, through the sampler's own
functions, so there is one definition of the target distribution.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ember.sampling.logprobs import compute_token_logprobs
from ember.sampling.sampler import (Sampler, apply_penalties, argmax_tokens, inverse_cdf_sample,
                                    is_greedy, random_row_probs)
from ember.types import SamplingBatchRow, TokenLogprobs


@dataclass
class SpecRow:
    """One request to verify: its sampling row (history without drafts) and its drafts."""

    row: SamplingBatchRow
    draft_token_ids: list[int]

    @property
    def num_rows(self) -> int:
        """Logits rows this request owns: one per draft plus the bonus row."""
        return len(self.draft_token_ids) + 1


@dataclass
class VerifyOutput:
    """Per request: the emitted tokens (accepted drafts + one sampled token)."""

    token_ids: list[list[int]]
    logprobs: list[list[TokenLogprobs] | None]
    """None for requests whose `params.logprobs` is None."""

    def num_accepted(self, i: int) -> int:
        return len(self.token_ids[i]) - 1


class RejectionSampler:
    """Verifies drafts of a batch of requests against the target's logits.

    Args:
        sampler: supplies the random numbers (per-request generators, else its default one).
    """

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    def __call__(self, logits: torch.Tensor, requests: list[SpecRow]) -> VerifyOutput:
        """logits: (N, V) raw target logits, N = sum of `num_rows`, request by request."""
        total = sum(r.num_rows for r in requests)
        if logits.dim() != 2 or logits.shape[0] != total:
            raise ValueError(f"logits of shape {tuple(logits.shape)} for {total} rows")
        rows = _expand_rows(requests)
        processed = apply_penalties(logits, rows)  # (N, V)
        starts = _row_starts(requests)
        emitted: list[list[int]] = [[] for _ in requests]
        greedy = [i for i, r in enumerate(requests) if is_greedy(r.row.params)]
        random = [i for i, r in enumerate(requests) if not is_greedy(r.row.params)]
        if greedy:
            self._verify_greedy(processed, requests, starts, greedy, emitted)
        if random:
            self._verify_random(processed, rows, requests, starts, random, emitted)
        return VerifyOutput(emitted, _logprobs(logits, requests, starts, emitted))

    @staticmethod
    def _verify_greedy(processed: torch.Tensor, requests: list[SpecRow], starts: list[int],
                       which: list[int], emitted: list[list[int]]) -> None:
        idx = torch.cat([torch.arange(starts[i], starts[i] + requests[i].num_rows)
                         for i in which])
        best = argmax_tokens(processed[idx])  # flat over the selected rows
        for i, tokens in zip(which, accept_greedy([requests[i].draft_token_ids for i in which],
                                                  best)):
            emitted[i] = tokens

    def _verify_random(self, processed: torch.Tensor, rows: list[SamplingBatchRow],
                       requests: list[SpecRow], starts: list[int], which: list[int],
                       emitted: list[list[int]]) -> None:
        idx_list = [j for i in which for j in range(starts[i], starts[i] + requests[i].num_rows)]
        probs = random_row_probs(processed[torch.tensor(idx_list)],
                                 [rows[j] for j in idx_list])  # (M, V)
        # NOTE: k + 1 uniforms per request, all from its own generator when seeded: k accept
        # tests and one draw for the final (residual or bonus) token.
        uniform = self.sampler.uniform(
            probs, [requests[i].row.generator for i in which
                    for _ in range(requests[i].num_rows)]).squeeze(1)  # (M,)
        finals: list[torch.Tensor] = []
        final_u: list[torch.Tensor] = []
        offset = 0
        for i in which:
            drafts = requests[i].draft_token_ids
            k = len(drafts)
            p = probs[offset:offset + k + 1]  # (k + 1, V)
            u = uniform[offset:offset + k + 1]  # (k + 1,)
            offset += k + 1
            n = k
            if k:
                draft_t = torch.tensor(drafts, dtype=torch.long)
                accept_p = p[torch.arange(k), draft_t]  # (k,) p_j(x_j)
                rejected = (u[:k] >= accept_p).nonzero()
                if rejected.numel():
                    n = int(rejected[0, 0])
            dist = p[n]
            if n < k:  # residual: p_n without the rejected draft (q is one-hot)
                dist = dist.clone()
                dist[drafts[n]] = 0.0
            emitted[i] = drafts[:n]
            finals.append(dist)
            final_u.append(u[k:k + 1])
        tokens = inverse_cdf_sample(torch.stack(finals), torch.stack(final_u)).tolist()
        for i, tok in zip(which, tokens):
            emitted[i] = emitted[i] + [tok]


def accept_greedy(drafts: list[list[int]], picks: list[int]) -> list[list[int]]:
    """Greedy verification from each row's argmax (`picks`: 1 + len(drafts[i]) per request,
    request by request): the drafts up to the first that differs from its row's argmax,
    then that row's argmax (the bonus token when all were accepted)."""
    out: list[list[int]] = []
    offset = 0
    for d in drafts:
        n = 0
        while n < len(d) and picks[offset + n] == d[n]:
            n += 1
        out.append(d[:n] + [picks[offset + n]])
        offset += len(d) + 1
    return out


def _expand_rows(requests: list[SpecRow]) -> list[SamplingBatchRow]:
    """One sampling row per logits row; row j counts drafts[:j] as generated tokens."""
    rows: list[SamplingBatchRow] = []
    for req in requests:
        base = req.row
        rows.append(base)
        for j in range(1, req.num_rows):
            rows.append(dataclasses.replace(
                base, output_token_ids=base.output_token_ids + req.draft_token_ids[:j]))
    return rows


def _row_starts(requests: list[SpecRow]) -> list[int]:
    starts, offset = [], 0
    for req in requests:
        starts.append(offset)
        offset += req.num_rows
    return starts


def _logprobs(logits: torch.Tensor, requests: list[SpecRow], starts: list[int],
              emitted: list[list[int]]) -> list[list[TokenLogprobs] | None]:
    """Logprobs of the raw logits for each emitted token (requests that asked for them)."""
    out: list[list[TokenLogprobs] | None] = [None] * len(requests)
    wanted = [i for i, r in enumerate(requests) if r.row.params.logprobs is not None]
    if not wanted:
        return out
    idx = [starts[i] + j for i in wanted for j in range(len(emitted[i]))]
    tokens = [t for i in wanted for t in emitted[i]]
    tops = [requests[i].row.params.logprobs or 0 for i in wanted for _ in emitted[i]]
    values = compute_token_logprobs(logits[torch.tensor(idx)], tokens, tops)
    offset = 0
    for i in wanted:
        out[i] = values[offset:offset + len(emitted[i])]
        offset += len(emitted[i])
    return out
