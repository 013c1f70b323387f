"""Token selection for the edge runtime in numpy: greedy, temperature, top-k, top-p, min-p and
the repetition penalty (the main path's Sampler semantics; its random streams differ, so only
greedy output is comparable token for token)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ember.types import InvalidRequestError, SamplingParams

_UNSUPPORTED = (("n", 1), ("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                ("logprobs", None), ("prompt_logprobs", None), ("structured_outputs", None),
                ("logit_bias", None))
"""SamplingParams fields the edge runtime does not implement, with their neutral values."""


def check_supported(params: SamplingParams) -> None:
    """InvalidRequestError naming the first field the edge runtime cannot honour."""
    for name, neutral in _UNSUPPORTED:
        if getattr(params, name) != neutral:
            raise InvalidRequestError(f"{name}={getattr(params, name)!r} is not supported by "
                                      "the edge runtime (use ember.LLM)", name)


class EdgeSampler:
    """Picks each next token of one sequence (its own random stream, seeded by params.seed)."""

    def __init__(self, params: SamplingParams) -> None:
        check_supported(params)
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int],
                 blocked: Sequence[int] = ()) -> int:
        """The next token from logits (V,) float32; history: prompt + generated ids;
        blocked: ids that may not come yet (EOS / stop ids before min_tokens)."""
        p = self.params
        if blocked:
            logits = logits.copy()
            logits[np.asarray(list(blocked), dtype=np.int64)] = -np.inf
        if p.repetition_penalty != 1.0 and history:
            logits = logits.copy()
            seen = np.unique(np.asarray(history, dtype=np.int64))
            vals = logits[seen]
            logits[seen] = np.where(vals > 0, vals / p.repetition_penalty,
                                    vals * p.repetition_penalty)
        if p.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / p.temperature
        if p.top_k > 0 and p.top_k < z.shape[0]:
            kth = np.partition(z, -p.top_k)[-p.top_k]
            z = np.where(z < kth, -np.inf, z)
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if p.top_p < 1:  # top-k, then top-p, then min-p: the main sampler's order
            order = np.argsort(-probs, kind="stable")
            sorted_p = probs[order]
            # a token stays when the mass ranked above it is < top_p (the first always)
            drop = (np.cumsum(sorted_p) - sorted_p) >= p.top_p
            probs[order[drop]] = 0.0
            probs /= probs.sum()
        if p.min_p > 0:
            probs = np.where(probs < p.min_p * probs.max(), 0.0, probs)
        probs /= probs.sum()
        return int(self.rng.choice(probs.shape[0], p=probs))
