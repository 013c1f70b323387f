"""The engine on Ember's CPU kernels (tiny random Llama): the fused decode step equals the
module path, and the kernel path equals the PyTorch reference path."""

from __future__ import annotations

import pytest
import torch

from ember import SamplingParams
from ember.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from ember.engine.engine import LLMEngine
from ember.kernels.build import missing_cpu_features
from ember.kernels.decoder import FusedDecoder
from ember.kernels.ops import CpuKernels
from ember.loading.loader import runtime_from
from ember.plan import resolve_plan
from tiny_llama import ENGINE_PROMPTS, run_to_completion, tiny_loaded

pytestmark = pytest.mark.skipif(bool(missing_cpu_features()),
                                reason=f"CPU lacks {missing_cpu_features()}")

PROMPTS = ENGINE_PROMPTS


@pytest.fixture(scope="module")
def kernels(load_kernels) -> CpuKernels:
    return load_kernels(None)  # the shared cache: built once per source hash


def run(quantization: str | None, kernels: CpuKernels | None, fused: bool = True
        ) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy tokens and their logprobs for PROMPTS, all in one batch (mixed steps + decodes)."""
    config = EngineConfig(model=ModelConfig(model="tiny", quantization=quantization),
                          cache=CacheConfig(block_size=4, num_blocks=64),
                          scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16))
    loaded = tiny_loaded()
    plan = resolve_plan(config.model, loaded.arch, type(loaded.model), None, kernels)
    engine = LLMEngine(config, runtime_from(loaded, plan))
    decoder = engine.core.runner.decoder
    if kernels is not None and quantization is not None:
        assert isinstance(decoder, FusedDecoder)
    if not fused:
        engine.core.runner.decoder = None
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0)
    outs = run_to_completion(engine, PROMPTS, params)
    return ([list(o.token_ids) for o in outs],
            [[lp.logprob for lp in o.logprobs] for o in outs])  # type: ignore[union-attr]


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_fused_decode_step_equals_module_path(kernels, quantization):
    fused_tokens, fused_lp = run(quantization, kernels, fused=True)
    module_tokens, module_lp = run(quantization, kernels, fused=False)
    assert fused_tokens == module_tokens
    torch.testing.assert_close(torch.tensor(fused_lp), torch.tensor(module_lp), atol=1e-4,
                               rtol=1e-4)


def test_kernel_path_equals_reference_path_in_fp32(kernels):
    """Dense fp32 weights: the kernels run the norms and SiLU; attention and the float32 KV
    cache stay the PyTorch reference (bf16 caches are for quantized models only)."""
    got_tokens, got_lp = run(None, kernels)
    ref_tokens, ref_lp = run(None, None)
    assert got_tokens == ref_tokens
    torch.testing.assert_close(torch.tensor(got_lp), torch.tensor(ref_lp), atol=1e-4, rtol=1e-4)
