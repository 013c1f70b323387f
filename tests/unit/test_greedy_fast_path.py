"""sampling/greedy.py: which rows count as plain greedy, and that its argmax is the sampler's
(first index on ties)."""

from __future__ import annotations

import torch

from ember.sampling.greedy import argmax_rows, is_plain_greedy
from ember.sampling.sampler import Sampler
from ember.types import SamplingBatchRow, SamplingParams


def test_argmax_rows_equals_the_samplers_greedy_tokens_ties_included():
    logits = torch.randn(5, 4099)
    logits[1, 7] = logits[1, 300] = logits[1].max() + 1  # a tie: the first index wins
    logits[3] = 0.0  # all equal
    rows = [SamplingBatchRow(request_id=str(i), params=SamplingParams(temperature=0),
                             prompt_token_ids=[1], output_token_ids=[], eos_token_id=None,
                             generator=None) for i in range(5)]
    assert argmax_rows(logits) == Sampler()(logits, rows).token_ids
    assert argmax_rows(logits)[1] == 7 and argmax_rows(logits)[3] == 0


def test_only_rows_the_sampler_leaves_alone_are_plain_greedy():
    assert is_plain_greedy(SamplingParams(temperature=0), 0)
    for params in (SamplingParams(temperature=0.7), SamplingParams(temperature=0, logprobs=2),
                   SamplingParams(temperature=0, repetition_penalty=1.1),
                   SamplingParams(temperature=0, frequency_penalty=0.5),
                   SamplingParams(temperature=0, presence_penalty=0.5),
                   SamplingParams(temperature=0, logit_bias={5: 3.0})):
        assert not is_plain_greedy(params, 10)
    assert not is_plain_greedy(SamplingParams(temperature=0, min_tokens=4), 3)
    assert is_plain_greedy(SamplingParams(temperature=0, min_tokens=4), 4)
