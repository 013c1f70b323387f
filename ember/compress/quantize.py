"""Weight quantization: round-to-nearest (RTN) group-wise, and the model-level driver that
dispatches to RTN, GPTQ (`gptq.py`) or AWQ (`awq.py`).

Conventions (shared by every method so that comparisons are fair):
- groups run along the input dimension; the last group may be shorter;
- asymmetric: scale = (max - min) / (2^b - 1), zero = -min / scale (a float, like GGUF's Q4_1
  minimum), so w = (q - zero) * scale hits both ends of the group exactly;
- symmetric: scale = 2 * absmax / (2^b - 1), zero = 2^(b-1) (GPTQ's convention);
- scales and zeros are rounded to their storage dtype *before* codes are computed, so the codes
  are optimal for the values actually stored.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from ember.compress.dense import Model
from ember.formats.rtn import minmax_params, round_codes, symmetric_params
from ember.loading.ember_format import QuantizedTensor

logger = logging.getLogger(__name__)

class Progress(Protocol):
    """progress(stage, done, total, info="") callback (the CLI draws bars with it)."""

    def __call__(self, stage: str, done: int, total: int, info: str = "") -> None: ...

LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class QuantSettings:
    """What to quantize and how (recorded in ember.json)."""

    method: str = "rtn"
    """'rtn', 'gptq' or 'awq'."""
    bits: int = 4
    group_size: int = 128
    """Columns per group; 0 (or >= in_features) means one group per output row (per-channel)."""
    symmetric: bool = False
    scale_dtype: str = "float16"
    embeddings: str = "keep"
    """'keep' (dense, as loaded) or 'int8' (per-row RTN of the embedding / lm_head)."""
    num_samples: int = 32
    """Calibration windows (GPTQ / AWQ)."""
    seq_len: int = 512
    damp: float = 0.01
    """GPTQ: dampening, as a fraction of the mean Hessian diagonal."""
    act_order: bool = False
    """GPTQ: quantize columns in order of decreasing Hessian diagonal (static groups)."""
    block_size: int = 128
    """GPTQ: columns per lazy-update block."""
    awq_grid: int = 20
    """AWQ: points of the scaling-exponent grid in [0, 1)."""
    awq_search_samples: int = 4
    """AWQ: calibration windows used in the scale / clip search (statistics use all)."""
    awq_clip: bool = True
    """AWQ: also search a per-group clipping range."""
    seed: int = 0

    def validate(self) -> None:
        if self.method not in ("rtn", "gptq", "awq"):
            raise ValueError(f"--method must be rtn, gptq or awq, got {self.method!r}")
        if self.bits not in (8, 4, 3):
            raise ValueError(f"--bits must be 8, 4 or 3, got {self.bits}")
        if self.group_size < 0:
            raise ValueError(f"--group-size must be >= 0, got {self.group_size}")
        if self.scale_dtype not in ("float16", "float32"):
            raise ValueError(f"--scale-dtype must be float16 or float32, got {self.scale_dtype}")
        if self.embeddings not in ("keep", "int8"):
            raise ValueError(f"--embeddings must be keep or int8, got {self.embeddings!r}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"--damp must be in [0, 1), got {self.damp}")
        if self.num_samples < 1 or self.seq_len < 2:
            raise ValueError("--calib-samples must be >= 1 and --calib-len >= 2")

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("gptq", "awq")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.scale_dtype == "float16" else torch.float32

    def group_for(self, in_features: int) -> int:
        """Effective group size for a weight with `in_features` columns."""
        return in_features if self.group_size in (0, None) else min(self.group_size, in_features)

    def metadata(self) -> dict[str, object]:
        return asdict(self)


def pad_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) -> (out, G, group_size); a short last group is padded by repeating its last
    column (which leaves the group's min / max / absmax unchanged)."""
    out_f, in_f = w.shape
    pad = math.ceil(in_f / group_size) * group_size - in_f
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out_f, pad)], dim=1)
    return w.reshape(out_f, -1, group_size)  # (out, G, g)


def qparams(groups: torch.Tensor, bits: int, symmetric: bool,
            store_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of each group: groups (..., g) -> two (...) float32 tensors, already
    rounded to `store_dtype` (Ember's one RTN implementation, `ember.formats.rtn`)."""
    params = symmetric_params if symmetric else minmax_params
    return params(groups, bits, store_dtype)


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  bits: int) -> torch.Tensor:
    """Codes of w given broadcastable scale / zero: clamp(round(w / scale + zero), 0, 2^b-1)."""
    return round_codes(w, scale, zero, 0, 2 ** bits - 1)


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                 store_dtype: torch.dtype = torch.float16,
                 clip: torch.Tensor | None = None) -> QuantizedTensor:
    """Round-to-nearest group-wise quantization of w (out, in).

    `clip` (out, G), if given, clamps each group to [-clip, clip] first (AWQ's clipping).
    """
    w = w.detach().float()
    out_f, in_f = w.shape
    gs = min(group_size, in_f) if group_size > 0 else in_f
    groups = pad_groups(w, gs)  # (out, G, g)
    if clip is not None:
        groups = torch.maximum(torch.minimum(groups, clip.unsqueeze(-1)), -clip.unsqueeze(-1))
    scale, zero = qparams(groups, bits, symmetric, store_dtype)  # (out, G) each
    codes = quantize_with(groups, scale.unsqueeze(-1), zero.unsqueeze(-1), bits)
    codes = codes.reshape(out_f, -1)[:, :in_f].to(torch.uint8)  # (out, in)
    return QuantizedTensor.from_codes(codes, scale.to(store_dtype), zero.to(store_dtype), bits,
                                      gs, symmetric)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                  store_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """RTN quantize-dequantize of w (out, in) in float32 (for searches)."""
    out_f, in_f = w.shape
    gs = min(group_size, in_f) if group_size > 0 else in_f
    groups = pad_groups(w.float(), gs)  # (out, G, g)
    scale, zero = qparams(groups, bits, symmetric, store_dtype)
    scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
    deq = (quantize_with(groups, scale, zero, bits) - zero) * scale
    return deq.reshape(out_f, -1)[:, :in_f]  # (out, in)


def layer_linears(model: Model) -> list[tuple[str, Any]]:
    """(parameter name of the weight, Linear module) of every decoder-layer projection."""
    out = []
    for i, layer in enumerate(model.model.layers):
        for name in LINEAR_NAMES:
            out.append((f"model.layers.{i}.{name}.weight", layer.get_submodule(name)))
    return out


def set_weight(module: Any, qt: QuantizedTensor) -> None:
    """Replace a Linear's dense weight by the dequantized values (so later layers see them)."""
    with torch.no_grad():
        module.weight.copy_(qt.dequantize(module.weight.dtype))


def rtn_model(model: Model, settings: QuantSettings,
              progress: Progress | None = None) -> dict[str, QuantizedTensor]:
    """RTN every decoder-layer projection; returns parameter name -> QuantizedTensor."""
    linears = layer_linears(model)
    out: dict[str, QuantizedTensor] = {}
    for i, (name, module) in enumerate(linears):
        gs = settings.group_for(module.weight.shape[1])
        qt = rtn_quantize(module.weight, settings.bits, gs, settings.symmetric, settings.dtype)
        set_weight(module, qt)
        out[name] = qt
        if progress is not None:
            progress("rtn", i + 1, len(linears))
    return out


def quantize_embeddings(model: Model, settings: QuantSettings) -> dict[str, QuantizedTensor]:
    """Per-row int8 RTN of the embedding (and of an untied lm_head) when asked."""
    if settings.embeddings != "int8":
        return {}
    out = {}
    targets = [("model.embed_tokens.weight", model.model.embed_tokens)]
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        targets.append(("lm_head.weight", model.lm_head))
    for name, module in targets:
        qt = rtn_quantize(module.weight, 8, module.weight.shape[1], False, settings.dtype)
        set_weight(module, qt)
        out[name] = qt
    return out


def quantize_model(model: Model, settings: QuantSettings, calib_ids: torch.Tensor | None,
                   progress: Progress | None = None) -> dict[str, QuantizedTensor]:
    """Quantize a loaded model in place (weights become their dequantized values) and return the
    quantized tensors by parameter name."""
    settings.validate()
    if settings.needs_calibration and calib_ids is None:
        raise ValueError(f"--method {settings.method} needs calibration text (--calib FILES)")
    with torch.no_grad():
        if settings.method == "gptq":
            assert calib_ids is not None
            from ember.compress.gptq import gptq_model
            out = gptq_model(model, settings, calib_ids, progress)
        elif settings.method == "awq":
            assert calib_ids is not None
            from ember.compress.awq import awq_model
            out = awq_model(model, settings, calib_ids, progress)
        else:
            out = rtn_model(model, settings, progress)
        out.update(quantize_embeddings(model, settings))
    return out
