"""AWQ (Lin et al., 2023): activation-aware weight quantization, then RTN.

Per decoder layer, for each group of Linears that share an input (q/k/v after input_layernorm,
gate/up after post_attention_layernorm, down after up_proj) search a per-input-channel scale
s = mean|x|^alpha (alpha on a grid in [0, 1)) minimising the error of the block's output when
the weights are quantized as Q(W * s) and the input divided by s. The best s is folded into the
weights and into the preceding norm / up_proj rows (an exact re-parametrisation), then a
per-group clipping range is searched and the weights are RTN-quantized.

alpha = 0 is plain RTN, so the scale search never does worse than RTN on its own objective.
NOTE: o_proj gets no scale search under GQA (v_proj has fewer output channels than o_proj has
inputs; AutoAWQ skips it too) but does get the clipping search.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from ember.compress.dense import Layer, Model, Rope, attention_forward
from ember.compress.quantize import (LINEAR_NAMES, Progress, QuantSettings, fake_quantize,
                                     pad_groups, qparams, quantize_with, rtn_quantize,
                                     set_weight)
from ember.compress.sequential import LinearInputSink, capture, layerwise
from ember.loading.ember_format import QuantizedTensor

logger = logging.getLogger(__name__)


def search_scale(modules: list[Any], x_mean: torch.Tensor,
                 objective, settings: QuantSettings) -> torch.Tensor:
    """Best per-input-channel scale (in,) for `modules` (which all read the same input).

    `objective()` returns the output error with the modules' current (fake-quantized) weights.
    """
    originals = [m.weight.detach().clone() for m in modules]
    best_err, best_s = float("inf"), torch.ones_like(x_mean)
    for k in range(settings.awq_grid):
        alpha = k / settings.awq_grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        for m, w in zip(modules, originals):
            gs = settings.group_for(w.shape[1])
            m.weight.copy_(fake_quantize(w * s, settings.bits, gs, settings.symmetric,
                                         settings.dtype) / s)
        err = float(objective())
        if err < best_err:
            best_err, best_s = err, s.clone()
    for m, w in zip(modules, originals):
        m.weight.copy_(w)
    return best_s


def search_clip(w: torch.Tensor, x: torch.Tensor, settings: QuantSettings,
                n_grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """Per-group clipping value (out, G) minimising ||x W^T - x Q(clip(W))^T|| group by group.

    x: (n, in) sample of the Linear's inputs.
    """
    out_f, in_f = w.shape
    gs = settings.group_for(in_f)
    wg = pad_groups(w.float(), gs)  # (out, G, g)
    n_groups = wg.shape[1]
    xp = torch.zeros(x.shape[0], n_groups * gs)
    xp[:, :in_f] = x.float()  # padded columns contribute nothing
    xg = xp.view(x.shape[0], n_groups, gs)  # (n, G, g)
    org_max = wg.abs().amax(dim=-1)  # (out, G)
    best = org_max.clone()
    best_err = torch.full_like(org_max, float("inf"))
    for chunk in range(0, out_f, 256):  # NOTE: bounded (256, n, G) temporaries
        wc = wg[chunk:chunk + 256]
        ref = torch.einsum("ogk,ngk->ong", wc, xg)  # (o, n, G)
        for i in range(int(max_shrink * n_grid)):
            max_val = org_max[chunk:chunk + 256] * (1 - i / n_grid)  # (o, G)
            clipped = torch.maximum(torch.minimum(wc, max_val.unsqueeze(-1)),
                                    -max_val.unsqueeze(-1))
            s, z = qparams(clipped, settings.bits, settings.symmetric, settings.dtype)
            deq = (quantize_with(clipped, s.unsqueeze(-1), z.unsqueeze(-1), settings.bits)
                   - z.unsqueeze(-1)) * s.unsqueeze(-1)
            err = (torch.einsum("ogk,ngk->ong", deq, xg) - ref).pow(2).mean(dim=1)  # (o, G)
            better = err < best_err[chunk:chunk + 256]
            best_err[chunk:chunk + 256][better] = err[better]
            best[chunk:chunk + 256][better] = max_val[better]
    return best


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).float().pow(2).mean()


def _scale_layer(layer: Layer, x: torch.Tensor, stats: LinearInputSink,
                 rope: Rope, settings: QuantSettings) -> None:
    """Search and fold the three AWQ scales of one layer; x: (n, T, hidden) search inputs."""
    attn, mlp = layer.self_attn, layer.mlp
    # q / k / v: objective = attention output; fold 1/s into input_layernorm.
    x1 = layer.input_layernorm(x)
    ref = attention_forward(attn, x1, rope)
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    s = search_scale(qkv, stats.mean_abs("self_attn.q_proj"),
                     lambda: _mse(attention_forward(attn, x1, rope), ref), settings)
    for m in qkv:
        m.weight.mul_(s)
    layer.input_layernorm.weight.div_(s)
    # gate / up: objective = MLP output; fold into post_attention_layernorm.
    h1 = x + ref
    x2 = layer.post_attention_layernorm(h1)
    ref = mlp(x2)
    s = search_scale([mlp.gate_proj, mlp.up_proj], stats.mean_abs("mlp.gate_proj"),
                     lambda: _mse(mlp(x2), ref), settings)
    mlp.gate_proj.weight.mul_(s)
    mlp.up_proj.weight.mul_(s)
    layer.post_attention_layernorm.weight.div_(s)
    # down: objective = down_proj output; fold into up_proj's rows. NOTE: x2 is recomputed
    # with the rescaled norm (the gate / up weights now expect x2 / s).
    x2 = layer.post_attention_layernorm(h1)
    act = F.silu(mlp.gate_proj(x2)) * mlp.up_proj(x2)  # (n, T, inter)
    ref = mlp.down_proj(act)
    s = search_scale([mlp.down_proj], stats.mean_abs("mlp.down_proj"),
                     lambda: _mse(mlp.down_proj(act), ref), settings)
    mlp.down_proj.weight.mul_(s)
    mlp.up_proj.weight.div_(s.unsqueeze(1))


def _sample_rows(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Up to n random rows of x (N, in)."""
    if x.shape[0] <= n:
        return x
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx]


def awq_model(model: Model, settings: QuantSettings, calib_ids: torch.Tensor,
              progress: Progress | None = None) -> dict[str, QuantizedTensor]:
    """AWQ every decoder-layer projection, layer by layer on calibration windows (N, T)."""
    out: dict[str, QuantizedTensor] = {}

    def process(i: int, layer: Layer, inputs: torch.Tensor, rope: Rope) -> None:
        stats = LinearInputSink(hessian=False, absmean=True)
        capture(layer, inputs, rope, ["self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"],
                stats, batch_size=4)
        search = inputs[:settings.awq_search_samples]
        _scale_layer(layer, search, stats, rope, settings)
        samples: dict[str, list[torch.Tensor]] = {}
        capture(layer, search, rope, list(LINEAR_NAMES),
                lambda name, x: samples.setdefault(name, []).append(x.reshape(-1, x.shape[-1])),
                batch_size=4)
        for name in LINEAR_NAMES:
            module: Any = layer.get_submodule(name)
            gs = settings.group_for(module.weight.shape[1])
            clip = None
            # NOTE: like AWQ, q/k are not clipped (their error is amplified by softmax).
            if settings.awq_clip and name not in ("self_attn.q_proj", "self_attn.k_proj"):
                x = _sample_rows(torch.cat(samples[name]), 512, settings.seed + i)
                clip = search_clip(module.weight, x, settings)
            qt = rtn_quantize(module.weight, settings.bits, gs, settings.symmetric,
                              settings.dtype, clip)
            set_weight(module, qt)
            out[f"model.layers.{i}.{name}.weight"] = qt

    layerwise(model, calib_ids, process, progress=progress, stage="awq")
    return out
