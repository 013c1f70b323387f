"""RMSNorm, optionally fused with the residual add."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ember.kernels.ops import CpuKernels


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in float32 (weight kept in float32) and cast back.

    With `residual`, x + residual is normalised and also returned (the new residual stream):
    `h, residual = norm(x, residual)`.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6,
                 kernels: CpuKernels | None = None) -> None:
        """kernels: Ember's CPU kernels when the ExecutionPlan runs on them (float32 (T, H)
        inputs then use them); None: PyTorch."""
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps
        self.kernels = kernels

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if (self.kernels is not None and x.dtype == torch.float32 and x.dim() == 2
                and x.is_contiguous()):
            # NOTE: the kernel adds the residual into x in place; x is this layer's own output.
            out = self.kernels.rms_norm(x, residual, self.weight, self.eps)
            return out if residual is None else (out, x)
        if residual is not None:
            x = x + residual
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x32).to(dtype)
