"""Structured pruning: drop whole decoder layers, FFN channels or attention heads, shrinking the
matrices for real (the ArchConfig sizes change; sizes stay uniform across layers).

- drop_layers: importance of a layer = mean angular distance arccos(cos(h_in, h_out)) / pi
  between its input and output hidden states on calibration data (Gromov et al., 2024); the
  N layers that change the residual stream least are removed.
- keep_ffn: importance of intermediate channel j = ||a_j||_2 (its activation silu(gate)*up over
  calibration tokens) * ||W_down[:, j]||_2; each layer keeps its top round(f * I) channels.
- keep_heads: importance of query head h = ||o_in[:, h]||_2 * ||W_o[:, h]||_F; each KV group
  keeps its top round(f * G) query heads (KV heads are kept, so GQA stays uniform).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
from torch import nn

from ember.compress.dense import Layer, Model, Rope, embed, make_rope, positions_for
from ember.compress.quantize import Progress
from ember.compress.sequential import LinearInputSink, capture, layerwise, run_layer
from ember.layers.linear import Linear
from ember.models.arch import ArchConfig

logger = logging.getLogger(__name__)


@torch.no_grad()
def layer_distances(model: Model, calib_ids: torch.Tensor, batch_size: int = 4,
                    progress: Progress | None = None) -> list[float]:
    """Mean angular distance (in [0, 1]) between each layer's input and output."""
    rope = make_rope(model, positions_for(calib_ids.shape[1]))
    h = torch.cat([embed(model, calib_ids[i:i + batch_size])
                   for i in range(0, calib_ids.shape[0], batch_size)])  # (N, T, hidden)
    distances = []
    layers = list(model.model.layers)
    for i, layer in enumerate(layers):
        out = run_layer(layer, h, rope, batch_size)
        cos = torch.nn.functional.cosine_similarity(h.float(), out.float(), dim=-1)  # (N, T)
        distances.append(float(torch.arccos(cos.clamp(-1, 1)).mean() / math.pi))
        h = out
        if progress is not None:
            progress("layer importance", i + 1, len(layers))
    return distances


def drop_layers(model: Model, arch: ArchConfig, calib_ids: torch.Tensor, count: int,
                progress: Progress | None = None) -> tuple[ArchConfig, dict[str, object]]:
    """Remove the `count` least important layers in place; returns the new arch and a summary."""
    if not 0 < count < arch.num_layers:
        raise ValueError(f"--drop-layers must be in [1, {arch.num_layers - 1}], got {count}")
    distances = layer_distances(model, calib_ids, progress=progress)
    order = sorted(range(arch.num_layers), key=lambda i: distances[i])
    dropped = sorted(order[:count])
    kept = [i for i in range(arch.num_layers) if i not in dropped]
    model.model.layers = nn.ModuleList(model.model.layers[i] for i in kept)
    new_arch = dataclasses.replace(arch, num_layers=len(kept))
    logger.info("dropping layers %s", dropped)
    return new_arch, {"dropped_layers": dropped,
                      "layer_distances": [round(d, 5) for d in distances]}


def _new_linear(weight: torch.Tensor) -> Linear:
    """A Linear holding `weight` (out, in)."""
    lin = Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


def _kept_count(total: int, fraction: float, multiple: int) -> int:
    """round(total * fraction), rounded to `multiple` when that is still >= 1 multiple."""
    k = round(total * fraction)
    if multiple > 1 and k >= multiple:
        k = round(k / multiple) * multiple
    return max(1, min(total, k))


def keep_ffn(model: Model, arch: ArchConfig, calib_ids: torch.Tensor, fraction: float,
             progress: Progress | None = None) -> tuple[ArchConfig, dict[str, object]]:
    """Keep the most important `fraction` of FFN channels in every layer (in place)."""
    if not 0 < fraction < 1:
        raise ValueError(f"--ffn-keep must be in (0, 1), got {fraction}")
    keep = _kept_count(arch.intermediate_size, fraction, 8)

    def process(i: int, layer: Layer, inputs: torch.Tensor, rope: Rope) -> None:
        sink = LinearInputSink(hessian=False, norms=True)
        capture(layer, inputs, rope, ["mlp.down_proj"], sink, batch_size=4)
        mlp = layer.mlp
        score = sink.col_norms("mlp.down_proj") * mlp.down_proj.weight.float().norm(dim=0)
        idx = torch.topk(score, keep).indices.sort().values
        mlp.gate_proj = _new_linear(mlp.gate_proj.weight[idx])
        mlp.up_proj = _new_linear(mlp.up_proj.weight[idx])
        mlp.down_proj = _new_linear(mlp.down_proj.weight[:, idx])

    layerwise(model, calib_ids, process, progress=progress, stage="ffn channels")
    return dataclasses.replace(arch, intermediate_size=keep), {"intermediate_size": keep}


def keep_heads(model: Model, arch: ArchConfig, calib_ids: torch.Tensor, fraction: float,
               progress: Progress | None = None) -> tuple[ArchConfig, dict[str, object]]:
    """Keep the most important `fraction` of query heads of every KV group (in place)."""
    if not 0 < fraction < 1:
        raise ValueError(f"--heads-keep must be in (0, 1), got {fraction}")
    group = arch.num_heads // arch.num_kv_heads
    per_group = _kept_count(group, fraction, 1)
    if per_group == group:
        raise ValueError(f"--heads-keep {fraction} keeps all {group} query heads per KV head")
    d = arch.head_dim
    kept_heads: list[list[int]] = []

    def process(i: int, layer: Layer, inputs: torch.Tensor, rope: Rope) -> None:
        sink = LinearInputSink(hessian=False, norms=True)
        capture(layer, inputs, rope, ["self_attn.o_proj"], sink, batch_size=4)
        attn = layer.self_attn
        act = sink.sq["self_attn.o_proj"].view(arch.num_heads, d).sum(-1).sqrt()  # (Hq,)
        wnorm = (attn.o_proj.weight.float().view(-1, arch.num_heads, d)  # (hidden, Hq, D)
                 .pow(2).sum((0, 2)).sqrt())  # (Hq,)
        score = (act * wnorm).view(arch.num_kv_heads, group)  # (Hkv, G)
        top = torch.topk(score, per_group, dim=1).indices.sort(dim=1).values
        heads = (top + torch.arange(arch.num_kv_heads).unsqueeze(1) * group).flatten()
        rows = (heads.unsqueeze(1) * d + torch.arange(d)).flatten()  # kept q rows / o cols
        attn.q_proj = _new_linear(attn.q_proj.weight[rows])
        attn.o_proj = _new_linear(attn.o_proj.weight[:, rows])
        attn.num_heads = len(heads)
        kept_heads.append(heads.tolist())

    layerwise(model, calib_ids, process, progress=progress, stage="attention heads")
    new_arch = dataclasses.replace(arch, num_heads=per_group * arch.num_kv_heads)
    return new_arch, {"num_heads": new_arch.num_heads, "kept_heads": kept_heads}
