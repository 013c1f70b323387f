"""The kernel path's plumbing on any CPU, with `FakeKernels` standing in for the library: the
plan puts a quantized plain-Llama model on the kernels, the model is built fused in the kernel
formats (weights packed exactly, Q8 head and embedding shared), the fused decoder receives its
layer stack, and the module path on the kernels generates what float math on the same rounded
weights generates."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from ember import SamplingParams
from ember.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from ember.engine.engine import LLMEngine
from ember.formats.blocks import Q4Blocks, Q8Blocks
from ember.kernels.ops import pack_q4, pack_q8
from ember.layers.linear import Linear
from ember.loading.loader import LoadedModel, runtime_from
from ember.plan import resolve_plan
from fake_kernels import FakeKernels, unpack_q4, unpack_q8
from tiny_llama import (ENGINE_PROMPTS, one_thread, run_to_completion,  # noqa: F401
                        tiny_loaded)

PROMPTS = ENGINE_PROMPTS
CONFIG = dict(cache=CacheConfig(block_size=4, num_blocks=64),
              scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16))


def test_fake_layouts_invert_the_packing():
    w = torch.randn(40, 96)
    w4 = Q4Blocks.quantize(w)
    assert torch.allclose(unpack_q4(*pack_q4(w4.q, w4.scale, w4.offset))[:40], w4.dequantize(),
                          atol=1e-6)
    w8 = Q8Blocks.quantize(w)
    assert torch.equal(unpack_q8(*pack_q8(w8.q, w8.d))[:40], w8.dequantize())


def _greedy(engine: LLMEngine) -> list[list[int]]:
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    return [list(o.token_ids) for o in run_to_completion(engine, PROMPTS, params)]


def _rounded(quantization: str) -> LoadedModel:
    """The reference tiny model with each weight replaced by its quantized format's values."""
    loaded = tiny_loaded()
    model = copy.deepcopy(loaded.model)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, Linear):
                w = module.weight.detach().clone()
                four = quantization == "int4" and name != "lm_head"
                rounded = (Q4Blocks.quantize(w) if four else Q8Blocks.quantize(w)).dequantize()
                if name == "lm_head":  # tied: untie, round only the head
                    module.weight = torch.nn.Parameter(rounded, requires_grad=False)
                else:
                    module.weight.copy_(rounded)
    loaded.model = model
    return loaded


@pytest.mark.parametrize("quantization, four", [("int4", 8), ("int8", 0)])
def test_quantized_model_on_the_kernels(quantization, four):
    kernels: Any = FakeKernels()
    config = EngineConfig(model=ModelConfig(model="tiny", quantization=quantization), **CONFIG)
    reference = tiny_loaded()
    plan = resolve_plan(config.model, reference.arch, type(reference.model), None, kernels)
    assert (plan.backend, plan.attention, plan.fused_decoder) == ("kernels", "kernels-paged", True)
    loaded = runtime_from(reference, plan)
    assert loaded.runtime_formats == {k: v for k, v in
                                      {"q4-g32": four, "q8-g32": 9 - four}.items() if v}
    embed, head = loaded.model.model.embed_tokens, loaded.model.lm_head
    assert embed.table is head  # the tied embedding reads the head's Q8 table
    ids = torch.tensor([0, 5, 256])
    table = Q8Blocks.quantize(reference.model.model.embed_tokens.weight).dequantize()
    assert torch.allclose(embed(ids), table[ids], atol=1e-6)
    engine = LLMEngine(config, loaded)
    decoder = engine.core.runner.decoder
    assert decoder is not None
    first, qkv = decoder.layers[0], loaded.model.model.layers[0].self_attn.qkv_proj
    assert (first.qkv.fmt, first.qkv.n, first.qkv.k) == (4 if four else 8, 4 * 16 + 2 * 32, 64)
    assert first.qkv.w == qkv.kernel_linear().w.data_ptr()
    assert first.k_cache == engine.core.runner.kv_caches[0][0].data_ptr()
    assert (decoder.shape.hidden, decoder.shape.inter, decoder.shape.hk) == (64, 128, 2)
    engine.core.runner.decoder = None  # the stand-in cannot run decode_layers
    got = _greedy(engine)
    assert {"rope_store_qkv", "paged_decode_attention", "q8_rows", "silu_mul"} <= set(
        kernels.calls)
    ref = _greedy(LLMEngine(EngineConfig(model=ModelConfig(model="tiny"), **CONFIG),
                            _rounded(quantization)))
    assert got == ref


def test_dense_model_on_the_kernels_keeps_torch_attention():
    kernels: Any = FakeKernels()
    config = EngineConfig(model=ModelConfig(model="tiny", quantization=None), **CONFIG)
    reference = tiny_loaded()
    plan = resolve_plan(config.model, reference.arch, type(reference.model), None, kernels)
    assert (plan.backend, plan.attention, plan.kv_dtype) == ("kernels", "torch", torch.float32)
    engine = LLMEngine(config, runtime_from(reference, plan))
    assert engine.core.runner.decoder is None
    got = _greedy(engine)
    assert set(kernels.calls) == {"rms_norm", "silu_mul"}
    assert got == _greedy(LLMEngine(EngineConfig(model=ModelConfig(model="tiny"), **CONFIG),
                                    tiny_loaded()))
