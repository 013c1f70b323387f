"""Gemma 3 270M with the sliding-window KV cache trimmed (ember/kv_cache/groups.py): a prompt
past the 512-token window gives the same greedy tokens as the untrimmed cache (the layout
before KV cache groups), while the local layers hold only their window. The default int8 plan
runs the fused decoder, each layer reading its own group's block table."""

from __future__ import annotations

import pytest

from ember import LLM, SamplingParams
from ember.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from ember.loading.sources import PACKAGED_MODELS, packaged_path

GEMMA = next(m for m in PACKAGED_MODELS if m.name == "gemma-3-270m")


def _engine(path: str, trim: bool) -> LLM:
    config = EngineConfig(
        model=ModelConfig(model=path, generation_config="none", quantization="auto"),
        cache=CacheConfig(kv_cache_mb=32, trim_sliding_window=trim),
        scheduler=SchedulerConfig(max_num_batched_tokens=256))
    return LLM(config=config, show_progress=False)


def test_trimmed_window_cache_keeps_greedy_tokens(pride_text):
    path = packaged_path(GEMMA)
    if path is None:
        pytest.fail(f"Gemma 3 missing: {GEMMA.install_hint} (make setup does it)")
    trimmed = _engine(str(path), True)
    groups = trimmed.engine.core.layout.groups
    assert groups.num_groups == 6 and groups.page_layers == 3
    decoder = trimmed.engine.core.runner.decoder
    if trimmed.engine.core.plan.kernels is not None:  # the default plan where kernels run
        assert decoder is not None and decoder.stack.num_groups == 6
    ids = trimmed.get_tokenizer().encode(pride_text[40000:46000])[:600]  # past the window
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    got = trimmed.generate([ids], params, use_tqdm=False)[0].outputs[0].token_ids
    del trimmed
    want = _engine(str(path), False).generate([ids], params, use_tqdm=False)[0]
    assert list(got) == list(want.outputs[0].token_ids)
