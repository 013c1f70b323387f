"""The sampler runs on one torch thread for small batches (ember/sampling/threads.py)."""

from __future__ import annotations

import threading

import pytest
import torch

from ember import SamplingParams
from ember.config import CacheConfig, EngineConfig, EnvSettings, ModelConfig, SchedulerConfig
from ember.engine.engine import LLMEngine
from ember.sampling.threads import _omp_setter, sampling_threads
from tiny_llama import ENGINE_PROMPTS, one_thread, run_to_completion, tiny_loaded  # noqa: F401


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_small_batch_runs_on_one_thread_and_restores(two_threads):
    with sampling_threads(rows=1, single_thread_rows=8) as used:
        assert used == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError):
        with sampling_threads(rows=8, single_thread_rows=8):
            raise RuntimeError("sampler failed")
    assert torch.get_num_threads() == 2  # restored after an exception too


def test_other_threads_keep_their_count(two_threads):
    """Only the calling thread switches: a thread started meanwhile keeps torch's count."""
    if _omp_setter() is None:
        pytest.skip("torch is not built on an OpenMP runtime Ember can reach (fallback path)")
    seen: list[int] = []
    with sampling_threads(rows=1, single_thread_rows=8):
        other = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        other.start()
        other.join()
        assert torch.get_num_threads() == 1
    assert seen == [2]


def test_large_batch_and_off_keep_the_thread_count(two_threads):
    with sampling_threads(rows=9, single_thread_rows=8) as used:
        assert used == 2 and torch.get_num_threads() == 2
    with sampling_threads(rows=1, single_thread_rows=0) as used:
        assert used == 2 and torch.get_num_threads() == 2


def _sampler_threads(rows_limit: int | None, prompts: list[list[int]]) -> tuple[set[int], list]:
    """Threads the engine's sampler ran on, and the sampled tokens (seeded sampling)."""
    config = EngineConfig(model=ModelConfig(model="tiny"),
                          cache=CacheConfig(block_size=4, num_blocks=64),
                          scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64),
                          env=EnvSettings(sample_single_thread_rows=rows_limit))
    engine = LLMEngine(config, tiny_loaded())
    runner = engine.core.runner
    seen: set[int] = set()
    inner = runner.sampler.__call__

    def recording(logits, rows):
        seen.add(torch.get_num_threads())
        return inner(logits, rows)

    runner.sampler = recording  # type: ignore[assignment]
    params = SamplingParams(max_tokens=4, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    outs = run_to_completion(engine, prompts, params)
    return seen, [list(o.token_ids) for o in outs]


def test_engine_samples_small_steps_on_one_thread(two_threads):
    torch.set_num_threads(2)  # the tiny_llama fixture set 1; the engine thread had 2 before
    seen, tokens = _sampler_threads(None, ENGINE_PROMPTS)  # 3 rows <= the default 8
    assert seen == {1}
    assert torch.get_num_threads() == 2
    seen_off, tokens_off = _sampler_threads(0, ENGINE_PROMPTS)
    assert seen_off == {2}
    assert tokens == tokens_off  # seeded rows: the same tokens on either thread count
