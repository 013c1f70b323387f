"""Teacher-forced comparison of two engines on the same tokens (shared by model tests)."""

from __future__ import annotations

from dataclasses import dataclass

from ember import SamplingParams


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
    """Score `ids` with both engines' prompt logprobs (the engines' own forward)."""
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)
    ref = ref_llm.generate([ids], params, use_tqdm=False)[0].prompt_logprobs[1:]
    got = other_llm.generate([ids], params, use_tqdm=False)[0].prompt_logprobs[1:]
    top1 = sum(a.top[0][0] == b.top[0][0] for a, b in zip(ref, got)) / len(ref)
    return Agreement(top1, -sum(a.logprob for a in ref) / len(ref),
                     -sum(b.logprob for b in got) / len(got))
