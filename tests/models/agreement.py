"""Teacher-forced comparison of two engines on the same tokens (shared by model tests)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from ember import SamplingParams

_scored: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Engine -> {token ids: its prompt logprobs}: the reference engine scores a text once per
session however many engines are compared with it (its forward is deterministic)."""


@dataclass(frozen=True)
class Agreement:
    top1: float
    """Fraction of positions where both engines' most likely next token is the same."""
    nll_ref: float
    nll_other: float

    @property
    def nll_rel_diff(self) -> float:
        return abs(self.nll_other - self.nll_ref) / self.nll_ref


def teacher_forced_agreement(ref_llm, other_llm, ids: list[int]) -> Agreement:
    """Score `ids` with both engines' prompt logprobs (the engines' own forward; the
    reference's computed once per session for the same `ids`)."""
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)
    scored = _scored.setdefault(ref_llm, {})
    key = tuple(ids)
    if key not in scored:
        scored[key] = ref_llm.generate([ids], params, use_tqdm=False)[0].prompt_logprobs[1:]
    ref = scored[key]
    got = other_llm.generate([ids], params, use_tqdm=False)[0].prompt_logprobs[1:]
    top1 = sum(a.top[0][0] == b.top[0][0] for a, b in zip(ref, got)) / len(ref)
    return Agreement(top1, -sum(a.logprob for a in ref) / len(ref),
                     -sum(b.logprob for b in got) / len(got))


def first_split(got: list[int], ref) -> tuple[int, float] | None:
    """Where greedy tokens `got` first leave the reference output `ref` (logprobs=2): (index,
    the reference's own margin between its top token and `got`'s token there); None if equal."""
    for i, (a, b) in enumerate(zip(got, ref.token_ids)):
        if a != b:
            top = dict(ref.logprobs[i].top)
            assert a in top, f"token {i}: {a} is not among the reference's top 2 {top}"
            return i, top[b] - top[a]
    return None
