"""The row-by-row repetition penalty (few rows, numpy) equals the batched torch path exactly."""

from __future__ import annotations

import pytest
import torch

from ember.sampling import sampler
from ember.types import SamplingBatchRow, SamplingParams


def _rows() -> list[SamplingBatchRow]:
    return [
        SamplingBatchRow("a", SamplingParams(repetition_penalty=1.1), [5, 7, 7, 9], [11, 5]),
        SamplingBatchRow("b", SamplingParams(repetition_penalty=1.0), [1, 2], [3]),  # no penalty
        SamplingBatchRow("c", SamplingParams(repetition_penalty=0.85, frequency_penalty=0.5),
                         [0, 99, 63], [63, 63, 2]),
        SamplingBatchRow("d", SamplingParams(repetition_penalty=1.3, min_tokens=4,
                                             max_tokens=8, stop_token_ids=[4]),
                         [100, -1, 10**6, 4], [], eos_token_id=3),  # ids outside the vocab
    ]


def test_numpy_rows_equal_the_batched_path(monkeypatch: pytest.MonkeyPatch):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 128, generator=gen) * 4  # positive and negative logits
    rows = _rows()
    fast = sampler.apply_penalties(logits, rows)
    monkeypatch.setattr(sampler, "_FEW_PENALTY_ROWS", 0)  # force the batched torch ops
    batched = sampler.apply_penalties(logits, rows)
    assert torch.equal(fast, batched)
    assert not torch.equal(fast, logits)  # the penalties did change something
    # Seen tokens moved towards zero (penalty > 1) or away from it (< 1); others untouched.
    assert fast[0, 7] == (logits[0, 7] / torch.tensor(1.1) if logits[0, 7] > 0
                          else logits[0, 7] * torch.tensor(1.1))
    assert fast[0, 8] == logits[0, 8] and torch.equal(fast[1], logits[1])
    assert torch.isinf(fast[3, 4]) and torch.isinf(fast[3, 3])  # min_tokens still applies
