"""Gemma 3 on the fused decoder kernel (tiny random model, no real weights): the fused step
(extra norms, per-head q/k norms, tanh-GELU, local/global RoPE tables, sliding windows) equals
the module path on the same kernels, and the kernel path stays close to the dense reference."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from ember import SamplingParams
from ember.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from ember.engine.engine import LLMEngine
from ember.kernels.build import missing_cpu_features
from ember.kernels.decoder import FusedDecoder
from ember.kernels.ops import CpuKernels
from ember.loading.loader import LoadedModel, runtime_from
from ember.loading.sources import ModelSource
from ember.models.arch import ArchConfig
from ember.models.gemma3 import Gemma3ForCausalLM
from ember.plan import resolve_plan
from tiny_llama import ENGINE_PROMPTS, one_thread, run_to_completion, tiny_tokenizer  # noqa: F401

pytestmark = pytest.mark.skipif(bool(missing_cpu_features()),
                                reason=f"CPU lacks {missing_cpu_features()}")

ARCH = ArchConfig(
    architecture="gemma3", vocab_size=257, hidden_size=64, intermediate_size=128, num_layers=3,
    num_heads=2, num_kv_heads=1, head_dim=64, max_position=1024, rms_norm_eps=1e-6,
    rope_theta=1e6, name="tiny-gemma", qk_norm=True, sliding_window=8,
    layer_types=("sliding", "sliding", "full"), rope_local_theta=10000.0,
    query_pre_attn_scalar=48.0)
"""Two local layers (window 8, shorter than the 23-token prompt) and one global layer; a query
scale other than head_dim ** -0.5."""


MIXED = {
    **{f"model.layers.{i}.self_attn.o_proj.weight": "int4" for i in range(3)},
    **{f"model.layers.{i}.mlp.down_proj.weight": "int4" if i % 2 else "int8" for i in range(3)},
    "model.layers.0.self_attn.q_proj.weight": "int4",  # k/v int8: the fused qkv runs int8
    **{f"model.layers.{i}.self_attn.{p}_proj.weight": "int4"
       for i in (1, 2) for p in "qkv"},
}
"""Per-tensor formats of a 'native' plan, as a Q4_K_M GGUF mixes them (matrices not named run
the plan's default, int8)."""


def tiny_gemma(seed: int = 0) -> LoadedModel:
    model = Gemma3ForCausalLM(ARCH, torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # norms (1 + w) around 1 with w != 0: a dropped or unfolded norm changes the output
            scale = 0.3 if name.endswith("norm.weight") else 0.1
            param.copy_(scale * torch.randn(param.shape, generator=gen))
    model.eval()
    source = ModelSource("tiny-gemma", Path("/nonexistent/tiny-gemma"), "hf", "test")
    return LoadedModel(model, ARCH, tiny_tokenizer(), source, torch.float32, {"float32": 1})


@pytest.fixture(scope="module")
def kernels() -> CpuKernels:
    k = CpuKernels.load(None, num_threads=2)  # the shared cache: built once per source hash
    assert k is not None
    return k


_RUNS: dict[tuple[str | None, bool, bool], tuple[list[list[int]], torch.Tensor]] = {}


def run(quantization: str | None, kernels: CpuKernels | None, fused: bool = True
        ) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tokens and their logprobs for the prompts, in one batch of mixed steps (each
    configuration runs once per session)."""
    key = (quantization, kernels is not None, fused)
    if key not in _RUNS:
        _RUNS[key] = _run(quantization, kernels, fused)
    return _RUNS[key]


def _run(quantization: str | None, kernels: CpuKernels | None, fused: bool
         ) -> tuple[list[list[int]], torch.Tensor]:
    config = EngineConfig(model=ModelConfig(model="tiny", quantization=quantization),
                          cache=CacheConfig(block_size=4, num_blocks=64),
                          scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16))
    loaded = tiny_gemma()
    native = quantization is not None and quantization.startswith("native")
    plan = resolve_plan(config.model, loaded.arch, type(loaded.model),
                        "int8" if native else None, kernels, MIXED if native else None)
    engine = LLMEngine(config, runtime_from(loaded, plan))
    runner = engine.core.runner
    if kernels is not None and quantization is not None:
        assert plan.fused_decoder and isinstance(runner.decoder, FusedDecoder)
        assert runner.decoder.stack.rope_tables == 2
    if not fused:
        runner.decoder = None
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=0)
    outs = run_to_completion(engine, ENGINE_PROMPTS, params)
    return ([list(o.token_ids) for o in outs],
            torch.tensor([[lp.logprob for lp in o.logprobs] for o in outs]))


@pytest.mark.parametrize("quantization", ["int8", "int4", "native", "native-q4head"])
def test_fused_gemma_equals_module_path(kernels, quantization):
    fused_tokens, fused_lp = run(quantization, kernels, fused=True)
    module_tokens, module_lp = run(quantization, kernels, fused=False)
    assert fused_tokens == module_tokens
    assert len({t for seq in fused_tokens for t in seq}) > 3  # not one repeated token
    if not quantization.startswith("native"):
        torch.testing.assert_close(fused_lp, module_lp, atol=1e-4, rtol=1e-4)
        return
    # NOTE: on these mixed plans the two paths part by up to ~0.013 nats on the longest
    # prompt from one position on (an int8 activation rounding flipped by the last bit of a
    # float32 norm, then kept in the KV cache); the short prompts agree to float32 noise.
    diff = (fused_lp - module_lp).abs()
    assert diff[:2].max().item() < 1e-4 and diff.max().item() < 0.03


def test_fused_gemma_close_to_dense_reference(kernels):
    """int8 weights and bfloat16 KV on the fused kernel vs the dense float32 PyTorch model:
    the same greedy tokens on this model, logprobs within quantization noise."""
    fused_tokens, fused_lp = run("int8", kernels)
    ref_tokens, ref_lp = run(None, None)
    assert fused_tokens == ref_tokens
    assert (fused_lp - ref_lp).abs().max().item() < 0.1


def test_extra_norms_matter(kernels):
    """The tests above can fail: without the post-MLP norms the fused stack is far from both
    the module path and the dense reference."""
    config = EngineConfig(model=ModelConfig(model="tiny", quantization="int8"),
                          cache=CacheConfig(block_size=4, num_blocks=64),
                          scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16))
    loaded = tiny_gemma()
    plan = resolve_plan(config.model, loaded.arch, type(loaded.model), None, kernels)
    engine = LLMEngine(config, runtime_from(loaded, plan))
    runner = engine.core.runner
    assert runner.decoder is not None
    stack = runner.decoder.stack
    layers = tuple(dataclasses.replace(layer, post_ffn_norm=None) for layer in stack.layers)
    runner.decoder = FusedDecoder(dataclasses.replace(stack, layers=layers), kernels)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=0)
    outs = run_to_completion(engine, ENGINE_PROMPTS, params)
    broken = torch.tensor([[lp.logprob for lp in o.logprobs] for o in outs])
    _, good = run("int8", kernels)
    _, ref = run(None, None)
    assert (broken - good).abs().max().item() > 0.2
    assert (broken - ref).abs().max().item() > 0.2


def test_native_plan_runs_each_matrix_in_its_format(kernels):
    """A 'native' plan builds each projection in its matrix's format (a fused one int4 only
    when all its parts are) and the fused decoder reads mixed int4/int8 layers (their
    equality with the module path: test_fused_gemma_equals_module_path)."""
    from ember.layers.factory import format_table

    loaded = tiny_gemma()
    config = ModelConfig(model="tiny", quantization="native")
    plan = resolve_plan(config, loaded.arch, type(loaded.model), "int8", kernels, MIXED)
    assert plan.weights == "int8" and plan.head == "q8" and "native(int4 x" in plan.describe()
    table = format_table(runtime_from(loaded, plan).model)
    assert table["self_attn.o_proj"] == {"q4-g32": 3}
    assert table["mlp.down_proj"] == {"q8-g32": 2, "q4-g32": 1}
    assert table["self_attn.qkv_proj"] == {"q8-g32": 1, "q4-g32": 2}
    assert table["mlp.gate_up_proj"] == {"q8-g32": 3} and table["lm_head"] == {"q8-g32": 1}
    _, lp = run("native", kernels)
    _, int8_lp = run("int8", kernels)
    assert (lp - int8_lp).abs().max().item() > 1e-3  # the int4 matrices do run int4


def test_q4_head_is_opt_in_and_needs_the_kernels(kernels):
    """'auto' keeps one format (the file's majority) and the exact Q8 head; the 4-bit head
    only comes with 'native-q4head', whose logits move off the Q8 head's (lossy), and never
    without the kernels."""
    from ember.config import ConfigError
    from ember.layers.cpu_quant import Q4Linear, Q8Linear

    loaded = tiny_gemma()
    auto = resolve_plan(ModelConfig(model="tiny", quantization="auto"), loaded.arch,
                        type(loaded.model), "int8", kernels, MIXED)
    assert auto.weights == "int8" and not auto.tensor_formats and auto.head == "q8"
    assert isinstance(runtime_from(loaded, auto).model.lm_head, Q8Linear)
    q4 = resolve_plan(ModelConfig(model="tiny", quantization="native-q4head"), loaded.arch,
                      type(loaded.model), "int8", kernels, MIXED)
    assert isinstance(runtime_from(loaded, q4).model.lm_head, Q4Linear)
    _, lp = run("native-q4head", kernels)
    _, exact_head = run("native", kernels)
    assert (lp - exact_head).abs().max().item() > 1e-3
    with pytest.raises(ConfigError, match="4-bit LM head"):
        resolve_plan(ModelConfig(model="tiny", quantization="native-q4head"), loaded.arch,
                     type(loaded.model), "int8", None, MIXED)
