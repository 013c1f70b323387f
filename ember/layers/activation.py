"""Gated activations."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from ember.kernels.ops import CpuKernels


class SiluAndMul(nn.Module):
    """(T, 2I) [gate | up] -> (T, I) silu(gate) * up."""

    def __init__(self, kernels: CpuKernels | None = None) -> None:
        """kernels: Ember's CPU kernels when the ExecutionPlan runs on them (float32 (T, 2I)
        inputs then use them); None: PyTorch."""
        super().__init__()
        self.kernels = kernels

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None and gate_up.dtype == torch.float32 and gate_up.dim() == 2:
            return self.kernels.silu_mul(gate_up.contiguous())
        gate, up = gate_up.chunk(2, dim=-1)  # (T, I) each
        return F.silu(gate) * up
