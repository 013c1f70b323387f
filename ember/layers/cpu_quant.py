"""Weight formats run by Ember's own CPU kernels (ember.kernels): group-32 Q4 / Q8 blocks.

- `Q4Linear`: 4-bit asymmetric weights (GGUF Q4_0 / Q4_1 convert exactly), any number of rows.
- `Q8Linear`: 8-bit symmetric weights, group 32 (GGUF Q8_0 re-quantizes to the same values).
- `Q8Embedding`: token lookup from a Q8 table, shared with a tied `Q8Linear` head.
Activations are float32 at the boundary; the kernels quantize them to int8 per 32-element block.
"""

from __future__ import annotations

import torch
from torch import nn

from ember.kernels.ops import CpuKernels, pack_q4, pack_q8, q8_blocks
from ember.layers.quant import Int4Weights


class _KernelLinear(nn.Module):
    """Shared shape handling: float32 (M, in) rows in, (M, out) rows back in x's dtype."""

    out_features: int
    in_features: int

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """(M, in) float32 contiguous -> (M, out padded to 16) float32."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._matmul(x.reshape(-1, self.in_features).float().contiguous())
        if y.shape[1] != self.out_features:
            y = y[:, :self.out_features]
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


class Q4Linear(_KernelLinear):
    """y = x @ W^T with 4-bit group-32 weights in the kernels' row-interleaved layout."""

    packed: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor

    def __init__(self, weights: Int4Weights, kernels: CpuKernels) -> None:
        super().__init__()
        self.out_features, self.in_features = weights.q.shape
        self.kernels = kernels
        packed, d, m = pack_q4(weights.q, weights.scale, weights.zero)
        self.register_buffer("packed", packed)
        self.register_buffer("d", d)
        self.register_buffer("m", m)

    @property
    def format(self) -> str:
        return "q4-g32"

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return self.kernels.q4_gemm(x2, self.packed, self.d, self.m)


class Q8Linear(_KernelLinear):
    """y = x @ W^T with 8-bit symmetric group-32 weights."""

    q: torch.Tensor
    d: torch.Tensor

    def __init__(self, q: torch.Tensor, d: torch.Tensor, kernels: CpuKernels) -> None:
        """q (out, in) int8 and d (out, in / 32): group-32 blocks, w = q * d (exact from GGUF
        Q8_0, or `from_dense`)."""
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.kernels = kernels
        packed, scales = pack_q8(q, d)
        self.register_buffer("q", packed)
        self.register_buffer("d", scales)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, kernels: CpuKernels) -> "Q8Linear":
        """Round-to-nearest symmetric group-32 blocks of a dense (out, in) weight."""
        return cls(*q8_blocks(weight), kernels)

    @property
    def format(self) -> str:
        return "q8-g32"

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return self.kernels.q8_gemm(x2, self.q, self.d)


class Q8Embedding(nn.Module):
    """Token embedding read from a Q8 table (rows dequantized on lookup)."""

    def __init__(self, table: Q8Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.table = table
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    @property
    def format(self) -> str:
        return "q8-g32"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).to(torch.int64).contiguous()
        rows = self.table.kernels.q8_rows(self.table.q, self.table.d, flat)  # (T, hidden)
        return rows.to(self.dtype).view(*ids.shape, self.embedding_dim)
