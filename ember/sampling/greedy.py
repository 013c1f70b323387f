"""The greedy fast path: rows that only take the argmax skip the sampler's machinery.

A plain greedy row (temperature ~0, no penalties, logit_bias, grammar, logprobs or pending
min_tokens) gets exactly `Sampler`'s token: the index of its largest logit, the first on ties.
At one client the sampler's generic path (per-row SamplingBatchRow objects, penalty and
grammar checks, the torch thread switch, torch's max over the vocabulary) costs ~0.1-0.3 ms
per token, a fixed cost next to a ~6 ms decode step; numpy's argmax over one row is a few µs.
"""

from __future__ import annotations

import numpy as np
import torch

from ember.sampling.sampler import argmax_tokens, is_greedy
from ember.types import SamplingParams


def is_plain_greedy(params: SamplingParams, num_output_tokens: int) -> bool:
    """Whether the sampler would return this row's argmax untouched (see module doc)."""
    return (is_greedy(params) and params.logprobs is None
            and params.repetition_penalty == 1.0 and params.frequency_penalty == 0.0
            and params.presence_penalty == 0.0 and not params.logit_bias
            and params.structured_outputs is None and num_output_tokens >= params.min_tokens)


def argmax_rows(logits: torch.Tensor) -> list[int]:
    """Index of each row's largest logit of (N, V) float32 CPU logits, the first on ties (as
    `sampler._argmax`; NaN counts as the largest, as in torch's max)."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32:
        return argmax_tokens(logits)
    values = logits.detach().numpy()  # (N, V), a view
    return [int(i) for i in np.argmax(values, axis=1)]
