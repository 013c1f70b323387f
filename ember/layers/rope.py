"""Rotary position embeddings (rotate-half / NeoX layout, as in HF Llama weights).

Partial rotary (Phi-4-mini, `rotary_dim` < head_dim) rotates the first `rotary_dim` dimensions
of each head and passes the rest through, as transformers does.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


ROPE_TYPES = ("default", "linear", "llama3", "longrope")
"""rope_scaling types RotaryEmbedding implements (a missing type means 'default')."""


def rope_type(scaling: dict[str, Any]) -> str:
    """The rope_scaling type of an HF-style dict ('su', Phi-3's old name, is 'longrope')."""
    kind = str(scaling.get("rope_type") or scaling.get("type") or "default")
    return "longrope" if kind == "su" else kind


def _inv_freq(head_dim: int, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    kind = rope_type(scaling)
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    if kind == "longrope":
        # NOTE: the short factors only: transformers switches to `long_factor` once a sequence
        # outgrows original_max_position_embeddings; ArchConfig caps the context there.
        short = torch.tensor(scaling["short_factor"], dtype=torch.float64)
        return 1.0 / (short * theta ** exponents)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: "
                     f"{', '.join(ROPE_TYPES)})")


def _attention_factor(scaling: dict[str, Any]) -> float:
    """Scale of the cos/sin tables: LongRoPE's sqrt(1 + ln(factor) / ln(original context))
    unless the config gives `attention_factor`; 1 for every other type."""
    if rope_type(scaling) != "longrope":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = float(scaling.get("factor") or 1.0)
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(scaling["original_max_position_embeddings"]))


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q and k given absolute positions; cos/sin tables built once."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_position: int, theta: float,
                 scaling: dict[str, Any] | None = None, rotary_dim: int | None = None) -> None:
        """rotary_dim: dimensions of each head that rotate (default: all of head_dim)."""
        super().__init__()
        scaling = scaling or {}
        inv_freq = _inv_freq(rotary_dim or head_dim, theta, scaling)
        t = torch.arange(max_position, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq)  # (P, R/2)
        attention_factor = _attention_factor(scaling)
        self.register_buffer("cos", (freqs.cos() * attention_factor).float(), persistent=False)
        self.register_buffer("sin", (freqs.sin() * attention_factor).float(), persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for this step's positions, (T, 1, R/2) each (R: rotary dims); computed once
        per step."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    @staticmethod
    def rotate(q: torch.Tensor, k: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q (T, Hq, D) and k (T, Hk, D)."""
        cos, sin = cos_sin
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first 2 * cos.shape[-1] dimensions of x (..., D); the rest
    (partial rotary) passes through unchanged."""
    half = cos.shape[-1]
    x1 = x[..., :half].float()
    x2 = x[..., half:2 * half].float()
    parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if 2 * half < x.shape[-1]:
        parts.append(x[..., 2 * half:].float())
    return torch.cat(parts, dim=-1).to(x.dtype)
