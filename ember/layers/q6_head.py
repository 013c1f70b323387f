"""`Q6Linear`: a projection (the LM head) in the Q6 format (ember.formats.q6) on q6_head.cpp.

A GGUF Q6_K matrix arrives exactly; anything else is requantized by llama.cpp's Q6_K recipe
from its exact values (row block by row block, no dense copy of the whole matrix).
"""

from __future__ import annotations

from collections.abc import Sequence
from ctypes import c_int, c_int64, c_void_p
from typing import Any

import torch
from gguf import GGMLQuantizationType as T

from ember.formats.q6 import BLOCK, SUB, TILE, Q6Blocks, pack_q6, super_blocks
from ember.formats.stored import BlockWeight, StoredWeight
from ember.kernels.decoder import Q6, KernelLinear
from ember.kernels.ops import CpuKernels
from ember.layers.cpu_quant import _KernelLinear

_SIG: list[Any] = [c_void_p, c_int64, c_int64, c_void_p, c_void_p, c_int64, c_int64, c_void_p,
                   c_int]


def q6_gemm(kernels: CpuKernels, x: torch.Tensor, packed: torch.Tensor, d: torch.Tensor,
            sb: int) -> torch.Tensor:
    """x (M, K) float32 contiguous -> (M, Np) float32 with Q6 weights (pack_q6's layout)."""
    fn = kernels.lib.q6_gemm
    if fn.argtypes != _SIG:
        fn.argtypes, fn.restype = _SIG, None
    mrows, k = x.shape
    y = torch.empty(mrows, packed.shape[0] * TILE, dtype=torch.float32)
    fn(x.data_ptr(), mrows, k, packed.data_ptr(), d.data_ptr(), sb, y.shape[1], y.data_ptr(),
       kernels.num_threads)
    return y


_QSIG: list[Any] = [c_void_p, c_int64, c_int64, c_int64, c_void_p, c_void_p, c_void_p, c_int]


def q6_quantize(kernels: CpuKernels, w: torch.Tensor, sb: int | None = None) -> Q6Blocks:
    """`Q6Blocks.quantize` (the reference) in the kernel library: a 262k-row head in about a
    second instead of tens."""
    fn = kernels.lib.q6_quantize
    if fn.argtypes != _QSIG:
        fn.argtypes, fn.restype = _QSIG, None
    n, k = w.shape
    sb = super_blocks(k) if sb is None else sb
    w = w.float().contiguous()
    q = torch.empty(n, k, dtype=torch.int8)
    sc = torch.empty(n, k // SUB, dtype=torch.int8)
    d = torch.empty(n, k // (BLOCK * sb), dtype=torch.float32)
    fn(w.data_ptr(), n, k, sb, q.data_ptr(), sc.data_ptr(), d.data_ptr(), kernels.num_threads)
    return Q6Blocks(q, sc, d, sb)


class Q6Linear(_KernelLinear):
    """y = x @ W^T with Q6 weights (6.56 bits a weight: the head a decode step reads)."""

    packed: torch.Tensor
    d: torch.Tensor

    def __init__(self, in_features: int, out_features: int | Sequence[int],
                 kernels: CpuKernels, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, kernels, dtype)
        self.register_buffer("packed", torch.empty(0, dtype=torch.uint8))
        self.register_buffer("d", torch.empty(0))
        self.sb = 1
        self._parts: list[tuple[slice, Q6Blocks]] = []

    @classmethod
    def from_blocks(cls, blocks: Q6Blocks, kernels: CpuKernels) -> "Q6Linear":
        layer = cls(blocks.q.shape[1], blocks.q.shape[0], kernels)
        layer._parts = [(slice(0, blocks.q.shape[0]), blocks)]
        layer.finalize()
        return layer

    @property
    def format(self) -> str:
        return "q6-k"

    def load_weight(self, rows: slice, weight: StoredWeight) -> None:
        qtype, raw = getattr(weight, "qtype", None), getattr(weight, "raw", None)
        if qtype == T.Q6_K and raw is not None and getattr(weight, "transform", None) is None:
            part = Q6Blocks.from_q6_k(raw, weight.shape)
        else:
            part = q6_quantize(self.kernels, weight.dense())
        self._parts.append((rows, part))

    def finalize(self) -> None:
        assert self._parts, "Q6Linear finalized before its weights were loaded"
        parts = sorted(self._parts, key=lambda p: p[0].start or 0)
        if len({p.sb for _, p in parts}) != 1:  # mixed sources: one grid for all rows
            parts = [(r, q6_quantize(self.kernels, p.dequantize(), 1)) for r, p in parts]
        blocks = Q6Blocks(torch.cat([p.q for _, p in parts]), torch.cat([p.sc for _, p in parts]),
                          torch.cat([p.d for _, p in parts]), parts[0][1].sb)
        if blocks.q.shape != (self.out_features, self.in_features):
            raise ValueError(f"Q6 head rows {tuple(blocks.q.shape)} != "
                             f"{(self.out_features, self.in_features)}")
        self.packed, self.d = pack_q6(blocks)
        self.sb = blocks.sb
        self._parts = []

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return q6_gemm(self.kernels, x2, self.packed, self.d, self.sb)


class Q6LayerLinear(Q6Linear):
    """A decoder projection stored as GGUF Q6_K, run exactly in the Q6 layout (256-column
    super-blocks) by the fused decoder (kernels' q6_layers.h) and `q6x_gemm`: the file's 6.56
    bits a weight against Q8's 9. Loads only Q6_K parts (row-permuted ones too, exactly); the
    plan gives this format to nothing else."""

    def load_weight(self, rows: slice, weight: StoredWeight) -> None:
        if not isinstance(weight, BlockWeight) or weight.qtype != T.Q6_K or len(weight.shape) != 2:
            raise ValueError("the Q6 layer format holds only GGUF Q6_K matrices; this part is "
                             "not one")
        part = Q6Blocks.from_q6_k(weight.raw, weight.shape)
        if weight.transform is not None:
            fn = weight.transform
            part = Q6Blocks(fn(part.q), fn(part.sc), fn(part.d), part.sb)
        self._parts.append((rows, part))

    def finalize(self) -> None:
        super().finalize()
        if self.sb != 8:
            raise ValueError(f"Q6 layers need 256-column super-blocks, got {self.sb * BLOCK}")

    def kernel_linear(self) -> KernelLinear:
        return KernelLinear(Q6, self.out_features, self.in_features, self.packed, self.d)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return self.kernels.q6x_gemm(x2, self.packed, self.d)
