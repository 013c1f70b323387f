"""GPTQ (Frantar et al., 2022): quantize one column at a time and spread its error over the
columns not yet quantized, weighted by the inverse Hessian H = 2 X^T X of the layer's inputs.

Columns are processed in blocks with lazy updates (as in the reference implementation). Group
scales / zeros are computed when a group's first column is reached, from the already updated
weights; with act-order the columns run in order of decreasing H diagonal and the groups are
fixed up front from the original weights ("static groups"), so the stored layout keeps groups
contiguous along `in` and needs no permutation index.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from ember.compress.dense import Layer, Model, Rope
from ember.compress.quantize import (LINEAR_NAMES, Progress, QuantSettings, pad_groups, qparams,
                                     quantize_with, set_weight)
from ember.compress.sequential import LinearInputSink, capture, layerwise
from ember.loading.ember_format import QuantizedTensor

logger = logging.getLogger(__name__)


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, in float64 for stability."""
    h = h.double()
    h = h + damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    for extra in (0.0, 1e-6, 1e-4, 1e-2):
        try:
            lower = torch.linalg.cholesky(h + extra * torch.mean(torch.diag(h)) *
                                          torch.eye(h.shape[0], dtype=h.dtype))
            hinv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(hinv, upper=True).float()
        except torch.linalg.LinAlgError:
            logger.debug("Hessian not positive definite; adding more dampening")
    raise ValueError("GPTQ: Hessian is not positive definite even with dampening")


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int,
                  symmetric: bool, damp: float = 0.01, block_size: int = 128,
                  act_order: bool = False,
                  store_dtype: torch.dtype = torch.float16) -> QuantizedTensor:
    """GPTQ-quantize one weight w (out, in) given its input Hessian h (in, in)."""
    weight = w.detach().float().clone()
    out_f, in_f = weight.shape
    gs = min(group_size, in_f) if group_size > 0 else in_f
    n_groups = math.ceil(in_f / gs)
    h = h.clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    weight[:, dead] = 0.0
    scales = torch.zeros(out_f, n_groups)
    zeros = torch.zeros(out_f, n_groups)
    perm = torch.arange(in_f)
    if act_order:
        static_s, static_z = qparams(pad_groups(weight, gs), bits, symmetric, store_dtype)
        scales, zeros = static_s, static_z
        perm = torch.argsort(torch.diag(h), descending=True)
        weight, h = weight[:, perm], h[perm][:, perm]
    hinv = _inverse_hessian_factor(h, damp)
    codes = torch.zeros(out_f, in_f)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        block = weight[:, i1:i2].clone()
        err = torch.zeros_like(block)
        hinv_block = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // gs
            if not act_order and col % gs == 0:
                # (out, <=gs): this block's updated columns, then later (lazily updated) ones
                span = torch.cat([block[:, i:i + gs], weight[:, i2:i1 + i + gs]], dim=1)
                s, z = qparams(span.unsqueeze(1), bits, symmetric, store_dtype)  # (out, 1)
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            q = quantize_with(block[:, i], scales[:, g], zeros[:, g], bits)  # (out,)
            codes[:, col] = q
            e = (block[:, i] - (q - zeros[:, g]) * scales[:, g]) / hinv_block[i, i]
            block[:, i:] -= e.unsqueeze(1) @ hinv_block[i, i:].unsqueeze(0)  # (out, rest)
            err[:, i] = e
        weight[:, i2:] -= err @ hinv[i1:i2, i2:]
    return QuantizedTensor.from_codes(codes.to(torch.uint8), scales.to(store_dtype),
                                      zeros.to(store_dtype), bits, gs, symmetric)


def gptq_model(model: Model, settings: QuantSettings, calib_ids: torch.Tensor,
               progress: Progress | None = None) -> dict[str, QuantizedTensor]:
    """GPTQ every decoder-layer projection, layer by layer on calibration windows (N, T)."""
    out: dict[str, QuantizedTensor] = {}

    def process(i: int, layer: Layer, inputs: torch.Tensor, rope: Rope) -> None:
        sink = LinearInputSink(hessian=True)
        capture(layer, inputs, rope, list(LINEAR_NAMES), sink, batch_size=4)
        for name in LINEAR_NAMES:
            module: Any = layer.get_submodule(name)
            qt = gptq_quantize(module.weight, sink.hessian_of(name), settings.bits,
                               settings.group_for(module.weight.shape[1]), settings.symmetric,
                               settings.damp, settings.block_size, settings.act_order,
                               settings.dtype)
            set_weight(module, qt)
            out[f"model.layers.{i}.{name}.weight"] = qt

    layerwise(model, calib_ids, process, progress=progress, stage="gptq")
    return out
