"""Round-to-nearest quantization: the one implementation every quantized format uses.

The runtime formats (group-32 int4 and Q8 blocks, per-channel int8) and `ember quantize`
(`ember.compress.quantize`) all compute their group parameters with one of the functions below
and their codes with `round_codes`; nothing else in Ember rounds weights to a grid.

Conventions: groups run along the last dimension; w ~ (q - zero) * scale with
    asymmetric   scale = (max - min) / (2^b - 1), zero = -min / scale (a float, so both ends of
                 the group are hit exactly; codes in [0, 2^b - 1])
    symmetric    scale = 2 * absmax / (2^b - 1), zero = 2^(b-1) (GPTQ's; codes in [0, 2^b - 1])
    absmax       scale = absmax / levels, zero = 0 (GGUF Q8_0 / per-channel int8: codes in
                 [-levels, levels])
"""

from __future__ import annotations

import torch


def minmax_params(groups: torch.Tensor, bits: int, store_dtype: torch.dtype = torch.float32,
                  eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric scale and zero of each group: groups (..., g) -> two (...) float32 tensors,
    rounded to `store_dtype` (the codes are then optimal for the values actually stored)."""
    wmin, wmax = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((wmax - wmin) / (2 ** bits - 1)).clamp(min=eps)
    zero = -wmin / scale
    return _stored(scale, store_dtype), zero.to(store_dtype).float()


def symmetric_params(groups: torch.Tensor, bits: int, store_dtype: torch.dtype = torch.float32,
                     eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric scale and zero (2^(bits-1), stored explicitly) of each group (..., g)."""
    amax = groups.abs().amax(dim=-1)
    scale = (2 * amax / (2 ** bits - 1)).clamp(min=eps)
    zero = torch.full_like(scale, 2 ** (bits - 1))
    return _stored(scale, store_dtype), zero.to(store_dtype).float()


def absmax_params(groups: torch.Tensor, levels: int = 127,
                  eps: float = 1e-30) -> tuple[torch.Tensor, torch.Tensor]:
    """Restricted symmetric scale (absmax / levels) and zero 0 of each group (..., g)."""
    scale = (groups.abs().amax(dim=-1) / levels).clamp(min=eps)
    return scale, torch.zeros_like(scale)


def round_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int,
                qmax: int) -> torch.Tensor:
    """Codes of w given broadcastable scale / zero: clamp(round(w / scale + zero), qmin, qmax)
    (float32; callers cast to their code dtype)."""
    return torch.clamp(torch.round(w / scale + zero), qmin, qmax)


def _stored(scale: torch.Tensor, store_dtype: torch.dtype) -> torch.Tensor:
    """scale rounded to its storage dtype, kept positive."""
    return scale.to(store_dtype).float().clamp(min=torch.finfo(store_dtype).tiny)
