"""n > 1 with prompt logprobs (echo + logprobs in the API) computes the prompt once: the n
copies share it through the prefix cache, and the prompt logprobs are those of one pass."""

from __future__ import annotations

import torch

from ember import SamplingParams
from ember.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from ember.engine.engine import LLMEngine
from ember.loading.loader import runtime_from
from ember.plan import resolve_plan
from tiny_llama import one_thread, tiny_loaded  # noqa: F401 - autouse fixture

BLOCK = 4
PROMPT = [7, 30, 99, 3, 250, 11, 12, 13, 14, 200, 201, 5, 6, 17, 18, 19, 40, 41, 42, 43, 9, 8]


def make_engine() -> LLMEngine:
    config = EngineConfig(model=ModelConfig(model="tiny"),
                          cache=CacheConfig(block_size=BLOCK, num_blocks=128),
                          scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256))
    loaded = tiny_loaded()
    plan = resolve_plan(config.model, loaded.arch, type(loaded.model), None, None)
    return LLMEngine(config, runtime_from(loaded, plan))


def run_counting(engine: LLMEngine, params: SamplingParams) -> tuple[object, int]:
    """The final output of one request and the tokens the scheduler sent to the model."""
    scheduler = engine.core.scheduler
    original = scheduler.schedule
    computed = 0

    def counting_schedule():  # type: ignore[no-untyped-def]
        nonlocal computed
        out = original()
        computed += out.num_scheduled_tokens
        return out

    scheduler.schedule = counting_schedule  # type: ignore[method-assign]
    engine.add_request("r", PROMPT, params)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final = out
    return final, computed


def test_prompt_logprobs_with_n_copies_compute_the_prompt_once():
    n, max_tokens = 4, 3
    one = make_engine()
    single, single_tokens = run_counting(one, SamplingParams(
        n=1, max_tokens=max_tokens, temperature=0, ignore_eos=True, prompt_logprobs=2))
    assert single_tokens == len(PROMPT) + max_tokens - 1
    many = make_engine()
    shared, tokens = run_counting(many, SamplingParams(
        n=n, max_tokens=max_tokens, temperature=0, ignore_eos=True, prompt_logprobs=2))
    # The first copy computes the prompt; each other copy only its last partial block (at
    # most one block: at least one token is always computed for logits) and its decodes.
    last_partial = len(PROMPT) - (len(PROMPT) - 1) // BLOCK * BLOCK
    assert tokens == len(PROMPT) + (n - 1) * last_partial + n * (max_tokens - 1)
    assert tokens < n * len(PROMPT)
    # Same prompt logprobs as a single copy (one pass), and greedy copies agree.
    assert shared.prompt_logprobs is not None and single.prompt_logprobs is not None
    assert len(shared.prompt_logprobs) == len(PROMPT)
    for a, b in zip(shared.prompt_logprobs[1:], single.prompt_logprobs[1:]):
        assert a.token_id == b.token_id and a.rank == b.rank
        torch.testing.assert_close(torch.tensor(a.logprob), torch.tensor(b.logprob))
    assert all(c.token_ids == single.outputs[0].token_ids for c in shared.outputs)
