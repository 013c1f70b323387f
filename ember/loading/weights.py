"""Strict weight loading into a model built in its runtime form.

Checkpoint tensors are named as in HF checkpoints (q_proj, k_proj, ...). A model built with
fused projections holds one layer per fusion; `weight_targets` maps each checkpoint name to the
row block of the layer it fills (vLLM's stacked-params mapping, from the model's
`packed_modules`), the embedding's name also to a tied head, and every other parameter (norms)
to itself. `load_weights` then fills every target exactly once, with strict missing /
unexpected / shape checks, and finalizes each layer as soon as its last row block arrived (so
at most one layer holds its not yet packed form at a time).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ember.errors import ModelLoadError
from ember.formats.stored import StoredWeight
from ember.layers.linear import Loadable
from ember.models.base import CausalLM

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: rows `rows` of a loadable layer's weight or bias, or
    a plain parameter (layer None)."""

    shape: tuple[int, ...]
    layer: Loadable | None = None
    rows: slice = dataclasses.field(default_factory=lambda: slice(None))
    bias: bool = False
    param: nn.Parameter | None = None

    def load(self, value: StoredWeight) -> None:
        if self.layer is None:
            assert self.param is not None
            with torch.no_grad():
                self.param.copy_(value.dense())
        elif self.bias:
            self.layer.load_bias(self.rows, value)
        else:
            self.layer.load_weight(self.rows, value)


def _loadables(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(path, module) of the model's loadable layers and of every other module, without
    descending into a loadable layer (its parts load through it)."""
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        yield path, child
        if not isinstance(child, Loadable):
            yield from _loadables(child, f"{path}.")


def _layer_targets(model: CausalLM, path: str, layer: Loadable
                   ) -> Iterator[tuple[str, Target]]:
    parent, _, leaf = path.rpartition(".")
    sizes = layer.shard_sizes
    parts = model.packed_modules.get(leaf) if len(sizes) > 1 else None
    if parts is None:
        names = [path]
        sizes = (sum(sizes),)
    elif len(parts) != len(sizes):
        raise ValueError(f"{path}: {len(sizes)} row blocks but packed_modules names {parts}")
    else:
        names = [f"{parent}.{part}" if parent else part for part in parts]
    start = 0
    for name, size in zip(names, sizes):
        rows = slice(start, start + size)
        yield f"{name}.weight", Target((size, layer.in_features), layer, rows)
        if layer.has_bias:
            yield f"{name}.bias", Target((size,), layer, rows, bias=True)
        start += size


def weight_targets(model: CausalLM) -> dict[str, list[Target]]:
    """Checkpoint tensor name -> where it loads (a tied embedding also fills the head)."""
    targets: dict[str, list[Target]] = {}
    for path, module in _loadables(model):
        if isinstance(module, Loadable):
            for name, target in _layer_targets(model, path, module):
                targets[name] = [target]
            continue
        for pname, param in module.named_parameters(recurse=False):
            targets[f"{path}.{pname}"] = [Target(tuple(param.shape), param=param)]
    if model.config.tie_word_embeddings and HEAD in targets and EMBED in targets:
        targets[EMBED] += targets.pop(HEAD)
    return targets


def load_weights(model: CausalLM, tensors: Iterable[tuple[str, StoredWeight]], source: str,
                 ignore: set[str] | None = None) -> None:
    """Fill the model from named checkpoint tensors and finalize its layers.

    Raises ModelLoadError (one line, naming `source`) on an unexpected name, a shape mismatch,
    a duplicate, or any target left unfilled.
    """
    targets = weight_targets(model)
    pending = _pending_names(targets)
    ignore = ignore or set()
    filled: set[str] = set()
    unexpected: list[str] = []
    for name, value in tensors:
        found = targets.get(name)
        if found is None:
            if name not in ignore:
                unexpected.append(name)
            continue
        if name in filled:
            raise ModelLoadError(f"{source}: tensor {name} appears twice")
        if tuple(value.shape) != found[0].shape:
            raise ModelLoadError(f"{source}: tensor {name} has shape {tuple(value.shape)}, "
                                 f"expected {found[0].shape}")
        for target in found:
            target.load(value)
            _done(target, pending)
        filled.add(name)
    if unexpected:
        raise ModelLoadError(f"{source}: unexpected tensors: {_names(unexpected)}")
    missing = sorted(set(targets) - filled)
    if missing:
        raise ModelLoadError(f"{source}: missing tensors: {_names(missing)}")


def _pending_names(targets: dict[str, list[Target]]) -> dict[int, int]:
    """id(layer) -> how many of its targets are still to load."""
    pending: dict[int, int] = {}
    for found in targets.values():
        for target in found:
            if target.layer is not None:
                pending[id(target.layer)] = pending.get(id(target.layer), 0) + 1
    return pending


def _done(target: Target, pending: dict[int, int]) -> None:
    """Count a loaded target; finalize its layer once the last one arrived."""
    if target.layer is None:
        return
    key = id(target.layer)
    pending[key] -= 1
    if pending[key] == 0:
        target.layer.finalize()


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
