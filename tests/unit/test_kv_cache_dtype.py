"""--kv-cache-dtype in the ExecutionPlan (no kernels called: a stand-in library object)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from ember.config import ConfigError, ModelConfig
from ember.models.arch import ArchConfig
from ember.models.llama import LlamaForCausalLM
from ember.plan import KERNELS_PAGED, resolve_plan
from ember.runner.model_runner import kv_cache_bytes_per_block

ARCH = ArchConfig(architecture="llama", vocab_size=257, hidden_size=256, intermediate_size=512,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, max_position=4096)
KERNELS: Any = SimpleNamespace(isa="avx2")


def plan_for(kv: str, quantization: str | None = "int4", kernels: Any = KERNELS,
             arch: ArchConfig = ARCH) -> Any:
    config = ModelConfig(quantization=quantization, kv_cache_dtype=kv)
    config.validate()
    return resolve_plan(config, arch, LlamaForCausalLM, None, kernels)


def test_auto_keeps_bf16_on_the_kernels():
    plan = plan_for("auto")
    assert plan.kv_dtype == torch.bfloat16 and plan.attention == KERNELS_PAGED
    assert "kv=bfloat16" in plan.describe()


def test_int8_runs_the_attention_kernels_and_fp32_the_torch_reference():
    plan = plan_for("int8")
    assert plan.kv_dtype == torch.int8 and plan.attention == KERNELS_PAGED
    assert plan.fused_decoder and "kv=int8" in plan.describe()
    ref = plan_for("fp32")
    assert ref.kv_dtype == torch.float32 and ref.attention == "torch"
    assert not ref.fused_decoder and ref.weights == "int4"  # same weights, PyTorch attention


def test_int8_without_the_attention_kernels_is_a_clear_error():
    with pytest.raises(ConfigError, match="attention kernels"):
        plan_for("int8", kernels=None)
    with pytest.raises(ConfigError, match="attention kernels"):
        plan_for("int8", quantization="int4", arch=dataclasses.replace(ARCH, qk_norm=True))
    with pytest.raises(ConfigError, match="head_dim"):
        plan_for("int8", arch=dataclasses.replace(ARCH, head_dim=16))
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        ModelConfig(kv_cache_dtype="fp8").validate()


def test_dense_weights_with_a_bf16_or_int8_cache_use_the_attention_kernels_unfused():
    for kv in ("bf16", "int8"):
        plan = plan_for(kv, quantization=None)
        assert plan.attention == KERNELS_PAGED and not plan.fused_decoder
    assert plan_for("auto", quantization=None).attention == "torch"  # the exact reference


def test_int8_blocks_take_about_half_the_bytes():
    bf16 = kv_cache_bytes_per_block(ARCH, 16, torch.bfloat16)
    int8 = kv_cache_bytes_per_block(ARCH, 16, torch.int8)
    assert int8 / bf16 == pytest.approx((64 + 4) / 128)


def test_sliding_windows_run_on_the_kernels_with_tiled_head_dims():
    windowed = dataclasses.replace(ARCH, sliding_window=128)
    assert windowed.layer_window(0) == 128 and windowed.kernel_compatible
    assert plan_for("auto", arch=windowed).attention == KERNELS_PAGED
    assert not dataclasses.replace(windowed, head_dim=16).kernel_compatible
