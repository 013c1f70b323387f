"""Unstructured / N:M pruning masks and quality ordering on tiny layers and models."""

from __future__ import annotations

import copy

import pytest
import torch

from ember.compress import dense
from ember.compress.calib import sample_windows
from ember.compress.prune import (PruneSettings, nm_mask, prune_model, sparse_info,
                                  sparsegpt_prune)
from tiny_llama import TEXT, one_thread, tiny_loaded  # noqa: F401 (fixture)


def _calib(loaded, n: int = 8) -> torch.Tensor:
    return sample_windows([loaded.tokenizer.encode(TEXT, add_special_tokens=False)], n, 128)


def _assert_two_four(weight: torch.Tensor) -> None:
    groups = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)  # (out, in/4)
    assert torch.all(groups <= 2)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_two_four_masks_are_valid(method: str) -> None:
    loaded = tiny_loaded()
    settings = PruneSettings(method=method, pattern="2:4")
    masks = prune_model(loaded.model, settings, _calib(loaded))
    params = dict(loaded.model.named_parameters())
    assert len(masks) == 14
    for name, mask in masks.items():
        groups = mask.reshape(mask.shape[0], -1, 4).sum(-1)
        assert torch.all(groups == 2), name  # exactly 2 of every 4 pruned
        assert torch.all(params[name][mask] == 0)
        _assert_two_four(params[name])


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_unstructured_sparsity_is_exact(method: str, sparsity: float) -> None:
    loaded = tiny_loaded()
    masks = prune_model(loaded.model, PruneSettings(method=method, sparsity=sparsity),
                        _calib(loaded))
    params = dict(loaded.model.named_parameters())
    for name, mask in masks.items():
        per_row = mask.sum(dim=1)
        assert torch.all(per_row == round(mask.shape[1] * sparsity)), name
        assert torch.all(params[name][mask] == 0)


def test_sparsegpt_layer_error_below_magnitude_and_wanda() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.05
    x = torch.randn(1024, 128) @ (torch.eye(128) + torch.randn(128, 128) / 8)
    x[:, :4] *= 6
    h = 2 * x.T @ x / x.shape[0]
    settings = PruneSettings(method="sparsegpt", sparsity=0.5)

    def err(w_hat: torch.Tensor) -> float:
        return float((x @ (w - w_hat).T).pow(2).mean())

    mag = w.masked_fill(w.abs() <= w.abs().median(dim=1, keepdim=True).values, 0)
    scores = w.abs() * x.norm(dim=0)
    wanda = w.masked_fill(scores <= scores.median(dim=1, keepdim=True).values, 0)
    pruned, mask = sparsegpt_prune(w, h, settings)
    assert torch.all(pruned[mask] == 0) and int(mask.sum()) == 64 * 64
    assert err(pruned) < err(wanda) < err(mag)


def test_wanda_and_sparsegpt_beat_magnitude_on_tiny_model() -> None:
    loaded = tiny_loaded()
    ids = _calib(loaded)
    reference = copy.deepcopy(loaded.model)
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = copy.deepcopy(reference)
        prune_model(model, PruneSettings(method=method, sparsity=0.5), ids)
        with torch.no_grad():
            errors[method] = float((dense.logits(model, ids)
                                    - dense.logits(reference, ids)).pow(2).mean())
    assert errors["sparsegpt"] < errors["magnitude"]
    assert errors["wanda"] < errors["magnitude"]


def test_nm_mask_and_sparse_bytes() -> None:
    scores = torch.arange(16.0).reshape(2, 8)
    mask = nm_mask(scores, 2, 4)
    assert mask.tolist()[0] == [True, True, False, False, True, True, False, False]
    info = sparse_info(mask, PruneSettings(pattern="2:4"), element_size=4)
    assert info["sparsity"] == 0.5 and info["pattern"] == "2:4"
    assert info["sparse_bytes"] == 8 * 4 + 2  # 8 kept fp32 values + 8 x 2-bit indices
    info = sparse_info(mask, PruneSettings(sparsity=0.5), element_size=4)
    assert info["sparse_bytes"] == 2 + 8 * 4  # 16-bit mask + values
    with pytest.raises(ValueError, match="divisible"):
        nm_mask(torch.rand(2, 6), 2, 4)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="--pattern"):
        PruneSettings(pattern="4:2").validate()
    with pytest.raises(ValueError, match="--sparsity"):
        PruneSettings(sparsity=1.5).validate()
    loaded = tiny_loaded()
    with pytest.raises(ValueError, match="--calib"):
        prune_model(loaded.model, PruneSettings(method="wanda"), None)
