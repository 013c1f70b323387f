"""Perplexity through the engine itself (prompt logprobs over paged, chunked prefill).

Protocol (DESIGN.md): the model's tokenizer, non-overlapping windows of 512 tokens, the first
8192 tokens of the text; each window starts with BOS when the tokenizer adds one and scores its
tokens 2..N given the preceding ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ember.types import SamplingParams

if TYPE_CHECKING:
    from ember.engine.llm import LLM


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    num_scored_tokens: int
    num_windows: int


def windows_of(token_ids: list[int], window: int, max_tokens: int) -> list[list[int]]:
    """Non-overlapping windows of the first max_tokens ids; a final window of < 2 is dropped."""
    ids = token_ids[:max_tokens]
    return [ids[i:i + window] for i in range(0, len(ids), window) if len(ids[i:i + window]) > 1]


def perplexity(llm: "LLM", text: str, window: int = 512, max_tokens: int = 8192
               ) -> PerplexityResult:
    """Perplexity of `text` under the LLM's model, computed by the engine's own forward."""
    tok = llm.get_tokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    bos = tok.bos_prefix
    # NOTE: with BOS each window is BOS + (window - 1) text tokens (Gemma's perplexity triples
    # without it); the windows still cover the first max_tokens text tokens.
    chunks = [bos + c for c in windows_of(ids, window - len(bos), max_tokens)]
    if not chunks:
        raise ValueError("text is too short to score (needs at least 2 tokens)")
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outputs = llm.generate(chunks, params, use_tqdm=False)
    total, count = 0.0, 0
    for out in outputs:
        assert out.prompt_logprobs is not None
        for lp in out.prompt_logprobs[1:]:
            assert lp is not None
            total -= lp.logprob
            count += 1
    mean = total / count
    return PerplexityResult(math.exp(mean), mean, count, len(chunks))
