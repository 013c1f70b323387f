"""Runtime formats on a tiny random model: fusion is exact, int8/int4 stay close."""

from __future__ import annotations

import copy

import pytest
import torch

from ember.formats.blocks import Q4Blocks
from ember.layers.factory import FUSIONS
from ember.layers.linear import Linear
from ember.layers.quant import Int8Linear
from ember.loading.loader import runtime_from
from ember.models.base import CausalLM
from ember.plan import ExecutionPlan
from tiny_llama import forward_logits, tiny_loaded, tiny_model


IDS = [3, 17, 42, 99, 200, 5, 77, 8, 150, 9, 11, 64]


def _runtime(quantization: str | None) -> tuple[CausalLM, dict[str, int]]:
    """The tiny model built again, fused, in a float32 plan with the weight format
    `quantization` on PyTorch's ops, from the reference weights."""
    plan = ExecutionPlan(weights=quantization, fusions=FUSIONS)
    loaded = runtime_from(tiny_loaded(), plan)
    return loaded.model, loaded.runtime_formats


def test_fusion_is_exact():
    model = tiny_model()
    ref = forward_logits(model, IDS)
    fused, counts = _runtime(None)
    layer = fused.model.layers[0]
    assert layer.self_attn.qkv_proj is not None and not hasattr(layer.self_attn, "q_proj")
    assert layer.mlp.gate_up_proj is not None and not hasattr(layer.mlp, "up_proj")
    assert counts == {"float32": 2 * 4 + 1}  # qkv, o, gate_up, down per layer + head
    torch.testing.assert_close(forward_logits(fused, IDS), ref, atol=1e-5, rtol=1e-5)


def _rounded_reference(model: CausalLM, quantization: str) -> CausalLM:
    """The same model with each weight replaced by what its quantized format represents."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in ref.named_modules():
            if isinstance(module, Linear):
                w = module.weight.detach().clone()
                if quantization == "int4" and name != "lm_head":
                    rounded = Q4Blocks.quantize(w).dequantize()
                else:
                    rounded = Int8Linear.from_dense(w).dequantize()
                if name == "lm_head":  # tied to the embedding: untie, round only the head
                    module.weight = torch.nn.Parameter(rounded, requires_grad=False)
                else:
                    module.weight.copy_(rounded)
    return ref


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_kernels_compute_their_rounded_weights(quantization):
    """The int8/int4 kernels (bf16 activations) match fp32 math on the rounded weights."""
    model = tiny_model()
    ref = forward_logits(_rounded_reference(model, quantization), IDS)
    q, _ = _runtime(quantization)
    got = forward_logits(q, IDS)
    assert got.dtype == torch.float32
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 0.03


def test_int4_rtn_error_within_half_step_and_cat():
    w = torch.randn(48, 64)
    q = Q4Blocks.quantize(w, group_size=32)
    step = q.scale.repeat_interleave(32, dim=1)  # (out, in)
    assert bool(((q.dequantize() - w).abs() <= step / 2 + 1e-6).all())
    a, b = Q4Blocks.quantize(w[:16]), Q4Blocks.quantize(w[16:])
    torch.testing.assert_close(Q4Blocks.cat([a, b]).dequantize(), q.dequantize())
