"""ModelRunner on a tiny random Llama (PyTorch path)."""

from __future__ import annotations

from ember import SamplingParams
from ember.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from ember.engine.engine import LLMEngine
from tiny_llama import ENGINE_PROMPTS, one_thread, run_to_completion, tiny_loaded  # noqa: F401


def _greedy(poison: bool) -> list[list[int]]:
    config = EngineConfig(model=ModelConfig(model="tiny"),
                          cache=CacheConfig(block_size=4, num_blocks=64),
                          scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16))
    engine = LLMEngine(config, tiny_loaded())
    if poison:  # what never-written torch.empty memory may hold
        for k_cache, v_cache in engine.core.runner.kv_caches:
            k_cache[1:].fill_(float("nan"))
            v_cache[1:].fill_(float("nan"))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    return [list(o.token_ids) for o in run_to_completion(engine, ENGINE_PROMPTS, params)]


def test_decode_never_reads_unwritten_cache_memory():
    """Decode attention reads whole blocks and masks the slots past each context: those slots
    must hold finite values even when the cache memory started as NaN."""
    assert _greedy(poison=True) == _greedy(poison=False)
