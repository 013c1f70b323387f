"""Strict weight loading: every parameter filled once, nothing unexpected, shapes exact."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ember.loading.errors import ModelLoadError


def load_strict(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], source: str,
                ignore: set[str] | None = None) -> None:
    """Copy named tensors into the model's parameters.

    Raises ModelLoadError (one line, naming `source`) on an unexpected name, a shape
    mismatch, a duplicate, or any parameter left unfilled. A tensor on the meta device counts
    as filled after its shape check but copies nothing (a weight a runtime format will
    replace from the file's own blocks).
    """
    params = dict(model.named_parameters())  # tied parameters appear once
    ignore = ignore or set()
    filled: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in tensors:
        param = params.get(name)
        if param is None:
            if name not in ignore:
                unexpected.append(name)
            continue
        if name in filled:
            raise ModelLoadError(f"{source}: tensor {name} appears twice")
        if tuple(tensor.shape) != tuple(param.shape):
            raise ModelLoadError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(param.shape)}")
        if not tensor.is_meta:
            with torch.no_grad():
                param.copy_(tensor)
        filled.add(name)
    if unexpected:
        raise ModelLoadError(f"{source}: unexpected tensors: {_names(unexpected)}")
    missing = sorted(set(params) - filled)
    if missing:
        raise ModelLoadError(f"{source}: missing tensors: {_names(missing)}")


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
