"""RTN / GPTQ / AWQ on tiny layers and a tiny random Llama."""

from __future__ import annotations

import copy

import pytest
import torch

from ember.compress import dense
from ember.compress.calib import sample_windows
from ember.compress.gptq import gptq_quantize
from ember.compress.quantize import QuantSettings, quantize_model, rtn_quantize
from tiny_llama import TEXT, one_thread, tiny_loaded  # noqa: F401 (fixture)


def _correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated features and a few loud channels, like real activations."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen) / d ** 0.5
    x = torch.randn(n, d, generator=gen) @ (torch.eye(d) + 2 * mix)
    x[:, :3] *= 8
    return x  # (n, d)


def _output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float((x @ w.T - x @ w_hat.T).pow(2).mean())


@pytest.mark.parametrize("bits, group_size, symmetric, act_order", [
    (4, 32, False, False), (3, 32, True, False), (4, 128, True, True), (8, 0, True, False)])
def test_gptq_beats_rtn_on_layer_output(bits, group_size, symmetric, act_order) -> None:
    torch.manual_seed(0)
    w = torch.randn(96, 128) * 0.05
    x = _correlated_inputs(2048, 128)
    h = 2 * x.T @ x / x.shape[0]
    gs = group_size or 128
    rtn = rtn_quantize(w, bits, gs, symmetric)
    gptq = gptq_quantize(w, h, bits, gs, symmetric, act_order=act_order)
    assert gptq.qweight.shape == rtn.qweight.shape and gptq.scales.shape == rtn.scales.shape
    err_rtn = _output_error(x, w, rtn.dequantize())
    err_gptq = _output_error(x, w, gptq.dequantize())
    assert err_gptq < 0.8 * err_rtn


def test_rtn_error_shrinks_with_bits_and_groups() -> None:
    w = torch.randn(64, 256)
    errs = [float((rtn_quantize(w, b, g, False).dequantize() - w).pow(2).mean())
            for b, g in ((3, 128), (4, 128), (4, 32), (8, 256))]
    assert errs == sorted(errs, reverse=True)


def _logit_error(model, reference, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float((dense.logits(model, ids) - dense.logits(reference, ids)).pow(2).mean())


def test_awq_not_worse_than_rtn_on_activation_weighted_error() -> None:
    loaded = tiny_loaded()
    ids = sample_windows([loaded.tokenizer.encode(TEXT, add_special_tokens=False)], 8, 128)
    reference = copy.deepcopy(loaded.model)
    results = {}
    for method in ("rtn", "awq"):
        model = copy.deepcopy(reference)
        settings = QuantSettings(method=method, bits=3, group_size=32, awq_search_samples=4)
        quantized = quantize_model(model, settings, ids)
        assert len(quantized) == 14
        results[method] = _logit_error(model, reference, ids)
    assert results["awq"] <= results["rtn"]


def test_gptq_model_beats_rtn_model_on_logits() -> None:
    loaded = tiny_loaded()
    ids = sample_windows([loaded.tokenizer.encode(TEXT, add_special_tokens=False)], 8, 128)
    reference = copy.deepcopy(loaded.model)
    errors = {}
    for method in ("rtn", "gptq"):
        model = copy.deepcopy(reference)
        quantize_model(model, QuantSettings(method=method, bits=3, group_size=32), ids)
        errors[method] = _logit_error(model, reference, ids)
    assert errors["gptq"] < errors["rtn"]


def test_calibrated_methods_need_calibration() -> None:
    loaded = tiny_loaded()
    with pytest.raises(ValueError, match="--calib"):
        quantize_model(loaded.model, QuantSettings(method="gptq"), None)
    with pytest.raises(ValueError, match="--bits"):
        QuantSettings(bits=5).validate()


def test_awq_scaling_is_an_exact_reparametrisation() -> None:
    """Folding the searched scales into weights / norms leaves the float layer unchanged."""
    from ember.compress.awq import _scale_layer
    from ember.compress.sequential import LinearInputSink, capture

    loaded = tiny_loaded()
    ids = sample_windows([loaded.tokenizer.encode(TEXT, add_special_tokens=False)], 4, 64)
    model = loaded.model
    rope = dense.make_rope(model, dense.positions_for(ids.shape[1]))
    layer = model.model.layers[0]
    with torch.no_grad():
        h = dense.embed(model, ids)
        before = dense.block_forward(layer, h, rope)
        stats = LinearInputSink(hessian=False, absmean=True)
        capture(layer, h, rope, ["self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"], stats, 4)
        _scale_layer(layer, h, stats, rope, QuantSettings(method="awq", bits=3, group_size=32))
        after = dense.block_forward(layer, h, rope)
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4)
