"""Layer-by-layer calibration: run calibration windows through the model one decoder layer at a
time, let a method inspect / rewrite that layer, then feed the rewritten layer's outputs on.

This is how GPTQ, AWQ, Wanda and SparseGPT see each layer's inputs *after* the earlier layers
were compressed, while holding only one layer's activations (N, T, hidden) in memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ember.compress.dense import (Layer, Model, Rope, block_forward, embed, linear_modules,
                                  make_rope, positions_for)
from ember.compress.quantize import Progress

LayerFn = Callable[[int, Layer, torch.Tensor, Rope], None]
"""process(layer_index, layer, inputs (N, T, hidden), rope)."""


class LinearInputSink:
    """Accumulates statistics of Linear inputs: Hessian X^T X, squared column norms, mean |x|."""

    def __init__(self, hessian: bool = True, norms: bool = False, absmean: bool = False) -> None:
        self.hessian, self.norms, self.absmean = hessian, norms, absmean
        self.xtx: dict[str, torch.Tensor] = {}
        self.sq: dict[str, torch.Tensor] = {}
        self.abs: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}

    def __call__(self, name: str, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).float()  # (N, in)
        self.count[name] = self.count.get(name, 0) + x2.shape[0]
        if self.hessian:
            self.xtx[name] = self.xtx.get(name, 0) + x2.T @ x2  # (in, in)
        if self.norms:
            self.sq[name] = self.sq.get(name, 0) + x2.pow(2).sum(0)  # (in,)
        if self.absmean:
            self.abs[name] = self.abs.get(name, 0) + x2.abs().sum(0)  # (in,)

    def hessian_of(self, name: str) -> torch.Tensor:
        """2 X^T X / N over the captured tokens (the H of GPTQ and SparseGPT)."""
        return 2.0 * self.xtx[name] / self.count[name]

    def col_norms(self, name: str) -> torch.Tensor:
        """||X_j||_2 per input column j (Wanda's activation statistic)."""
        return self.sq[name].sqrt()

    def mean_abs(self, name: str) -> torch.Tensor:
        """Mean |x_j| per input column j (AWQ's activation statistic)."""
        return self.abs[name] / self.count[name]


@torch.no_grad()
def capture(layer: Layer, inputs: torch.Tensor, rope: Rope, names: list[str],
            sink: Callable[[str, torch.Tensor], None], batch_size: int) -> None:
    """Run `layer` on inputs (N, T, hidden) in batches, passing the inputs of the Linears named
    `names` (e.g. 'mlp.down_proj') to `sink(name, x)`."""
    modules = linear_modules(layer)
    handles = []
    for name in names:
        def hook(_mod: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
            sink(name, args[0])
        handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        for i in range(0, inputs.shape[0], batch_size):
            block_forward(layer, inputs[i:i + batch_size], rope)
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def run_layer(layer: Layer, inputs: torch.Tensor, rope: Rope,
              batch_size: int) -> torch.Tensor:
    """(N, T, hidden) -> (N, T, hidden) through one layer, `batch_size` windows at a time."""
    outs = [block_forward(layer, inputs[i:i + batch_size], rope)
            for i in range(0, inputs.shape[0], batch_size)]
    return torch.cat(outs, dim=0)


@torch.no_grad()
def layerwise(model: Model, input_ids: torch.Tensor, process: LayerFn, batch_size: int = 4,
              progress: Progress | None = None, stage: str = "layers") -> torch.Tensor:
    """For each decoder layer: process(i, layer, inputs, rope), then inputs = layer(inputs)
    with the (possibly rewritten) layer. Returns the last layer's outputs (N, T, hidden)."""
    rope = make_rope(model, positions_for(input_ids.shape[1]))
    h = torch.cat([embed(model, input_ids[i:i + batch_size])
                   for i in range(0, input_ids.shape[0], batch_size)], dim=0)  # (N, T, hidden)
    layers = list(model.model.layers)
    for i, layer in enumerate(layers):
        process(i, layer, h, rope)
        h = run_layer(layer, h, rope, batch_size)
        if progress is not None:
            progress(stage, i + 1, len(layers))
    return h
