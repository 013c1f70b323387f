"""Linear layers behind one interface; the weight format is a property of the layer.

Only the dense format (float32 / bfloat16) exists so far; quantized formats (int8, int4
group-wise, GGUF blocks) plug in here as further `LinearFormat`s without touching models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x @ W^T (+ b). `weight` is (out_features, in_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False)
                     if bias else None)

    @property
    def format(self) -> str:
        return str(self.weight.dtype).removeprefix("torch.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class AddBias(nn.Module):
    """A runtime-format linear (quantized formats store no bias) followed by its bias:
    y = inner(x) + b. `format` is the inner layer's."""

    def __init__(self, inner: nn.Module, bias: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.bias = nn.Parameter(bias, requires_grad=False)

    @property
    def format(self) -> str:
        return str(getattr(self.inner, "format", "?"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return out + self.bias.to(out.dtype)
