"""Validate-first sampling of constrained rows (llama.cpp's sampler does the same): sample from
the unmasked logits, ask the grammar whether that one token is allowed (~1-3 us with
llguidance), and compute the row's full mask (~200-300 us on SmolLM2's 49k vocabulary) only
when it is rejected, then resample that row from the masked logits.

Exactness, per row (A: the tokens the grammar allows, p: the row's distribution before masking):
- greedy: if the unmasked argmax is in A it is the masked argmax (ties: both take the first
  index); else the row is masked and takes the masked argmax. Identical tokens.
- temperature sampling (no top-k / top-p / min-p): a token x in A comes out with probability
  p(x) + (1 - p(A)) * p(x) / p(A) = p(x) / p(A), the masked distribution, provided the resample
  after a rejection draws a fresh uniform number (it does: one more draw from the row's own
  generator, or the default one).
- penalties, min_tokens and logit_bias change each token's logit from that token's own value
  and the row's history, and keep -inf at -inf, so they commute with the mask: they are applied
  before the check as before and the argument above holds for the penalised p.
- top-k, top-p and min-p truncate by rank or by the largest probability, which differ between
  the unmasked and the masked distribution: such random rows take the mask first (as before).

Seeds: a seeded sampled row draws one or two numbers per step from its own generator depending
only on its own logits and grammar state, so a seed still gives the same tokens, alone or in any
batch; they may differ from the mask-first path's tokens (which draws one number from the masked
distribution). The choice per row and step is made the same way whether or not the mask was
prefetched (a prefetched mask's bit answers the check), so batching does not change it; in a
step where other requests verify drafts (jump-forward, speculation) the undrafted rows still
sample here (`ModelRunner._sample_rows`), not in the rejection sampler.

Rows whose grammar forces bytes, whose matcher is stopped, or that asked for logprobs (which are
of the masked distribution) still get their mask; see `StructuredOutputManager.free_rows`.
"""

from __future__ import annotations

import torch

from ember.sampling.constrained import StructuredOutputManager
from ember.sampling.sampler import Sampler, SamplerOutput, is_untruncated, row_logprobs
from ember.types import SamplingBatchRow, SamplingParams


def validate_first_exact(params: SamplingParams, vocab: int) -> bool:
    """Whether validate-first sampling draws from this row's masked distribution exactly:
    greedy rows always, random rows when no top-k, top-p or min-p truncates them."""
    return is_untruncated(params, vocab)


def sample_constrained(manager: StructuredOutputManager, sampler: Sampler,
                       logits: torch.Tensor, rows: list[SamplingBatchRow]) -> SamplerOutput:
    """One token per row of `logits` (N, V) with logit_bias and grammar masks, validate-first
    where exact (`validate_first_exact`) and enabled (`manager.validate_first`), the mask
    first elsewhere. `logits` is modified in place (bias, masks of the rows that need them);
    logprobs are of the biased, masked logits, as with the mask first."""
    manager.add_bias(logits, rows)
    constrained = [i for i, r in enumerate(rows) if r.params.structured_outputs is not None]
    if not constrained:
        return sampler(logits, rows)
    vocab = logits.shape[1]
    lazy: list[int] = []
    if manager.validate_first:
        lazy = manager.free_rows(rows, [i for i in constrained
                                        if validate_first_exact(rows[i].params, vocab)])
    lazy_set = set(lazy)
    eager = [i for i in constrained if i not in lazy_set]
    if eager:
        manager.mask_rows(logits, rows, eager)
    tokens = sampler.sample_tokens(logits, rows)
    if lazy:
        allowed = manager.allows(rows, lazy, [tokens[i] for i in lazy])
        rejected = [i for i, ok in zip(lazy, allowed) if not ok]
        # NOTE: rows that asked for logprobs get their mask too (logprobs of the masked
        # distribution); their token was already chosen validate-first.
        masked = sorted(rejected + [i for i, ok in zip(lazy, allowed)
                                    if ok and rows[i].params.logprobs is not None])
        if masked:
            manager.mask_rows(logits, rows, masked)
        if rejected:
            index = torch.tensor(rejected, dtype=torch.long, device=logits.device)
            again = sampler.sample_tokens(logits[index], [rows[i] for i in rejected])  # (R, V)
            for i, token in zip(rejected, again):
                tokens[i] = token
    manager.timings.steps += 1
    return SamplerOutput(token_ids=tokens, logprobs=row_logprobs(logits, rows, tokens))
