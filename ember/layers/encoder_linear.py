"""Projections of encoder models (BERT) that take many tokens per call.

`RowInt16Linear` (the int8 plan's default) runs on Ember's per-row GEMM `enc_i16_gemm`
(ember.kernels.encoder_ops): 11-bit weight codes with one scale per output row, activations
quantized once per call per row (11-13 bits), int32 sums over the whole K. `RowInt8Linear`
runs the grouped `enc_i8_gemm` (int8 weights, one scale per row and group of 32). Both fuse
bias, GELU and the residual add into the GEMM's epilogue (`forward(x, residual=...,
gelu=...)`). `project` gives every LinearBase that call shape, so a
model writes its block once for dense and quantized plans.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ember.formats.stored import StoredWeight
from ember.kernels.encoder_ops import (encoder_gemm, encoder_gemm_i16, pack_rows_i8,
                                       pack_rows_i16, supports_shape, supports_shape_i16)
from ember.kernels.ops import CpuKernels
from ember.layers.factory import LayerFactory
from ember.layers.linear import Linear, LinearBase

FORMAT = "i8-row"
FORMAT_I16 = "i11-row"


class RowInt8Linear(LinearBase):
    """y = [GELU](x @ W^T + b) [+ residual] with int8 per-row weights (see module doc)."""

    packed: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int | Sequence[int], bias: bool,
                 kernels: CpuKernels) -> None:
        super().__init__(in_features, out_features)
        if not supports_shape(in_features, self.out_features):
            raise ValueError(f"RowInt8Linear needs in_features even and out_features % 16 == 0, "
                             f"got {in_features} -> {self.out_features}")
        self.kernels = kernels
        self.register_buffer("packed", torch.empty(0, dtype=torch.int16))
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("bias", torch.zeros(self.out_features) if bias else None)
        self._staged: torch.Tensor | None = torch.empty(self.out_features, in_features)

    @property
    def format(self) -> str:
        return FORMAT

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    def load_weight(self, rows: slice, weight: StoredWeight) -> None:
        assert self._staged is not None, "RowInt8Linear loaded after finalize"
        self._staged[rows].copy_(weight.dense())

    def load_bias(self, rows: slice, weight: StoredWeight) -> None:
        if self.bias is None:
            raise ValueError("this RowInt8Linear has no bias")
        self.bias[rows].copy_(weight.dense())

    def finalize(self) -> None:
        assert self._staged is not None, "RowInt8Linear finalized twice"
        self.packed, self.scale = pack_rows_i8(self._staged)
        self._staged = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                gelu: bool = False) -> torch.Tensor:
        shape = x.shape
        res = None if residual is None else residual.reshape(-1, self.out_features)
        y = encoder_gemm(self.kernels, x.reshape(-1, self.in_features), self.packed, self.scale,
                         self.bias, res, gelu)  # (M, out)
        return y.reshape(*shape[:-1], self.out_features)


class RowInt16Linear(RowInt8Linear):
    """y = [GELU](x @ W^T + b) [+ residual] on `enc_i16_gemm`: 11-bit weight codes with one
    scale per output row, activations quantized per row (13 bits, fewer where K is long: the
    int32 sum over the whole K must not overflow), no per-group float work in the inner loop.
    Faster than the grouped int8 GEMM on AVX2 and closer to fp32 (see encoder_ops); on
    AVX-512 VNNI a 512-bit vpdpwssd tile with bitwise the same outputs."""

    @property
    def format(self) -> str:
        return FORMAT_I16

    def finalize(self) -> None:
        assert self._staged is not None, "RowInt16Linear finalized twice"
        self.packed, self.scale = pack_rows_i16(self._staged)
        self._staged = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                gelu: bool = False) -> torch.Tensor:
        shape = x.shape
        res = None if residual is None else residual.reshape(-1, self.out_features)
        y = encoder_gemm_i16(self.kernels, x.reshape(-1, self.in_features), self.packed,
                             self.scale, self.bias, res, gelu)  # (M, out)
        return y.reshape(*shape[:-1], self.out_features)


def encoder_linear(layers: LayerFactory, in_features: int, out_features: int | Sequence[int],
                   bias: bool = True) -> LinearBase:
    """An encoder projection in the plan's form: `RowInt16Linear` for an int8 plan on the
    kernels (`RowInt8Linear` where only the grouped kernel fits the shape), else the
    factory's layer."""
    n = out_features if isinstance(out_features, int) else sum(out_features)
    if layers.weights == "int8" and layers.kernels is not None:
        if supports_shape_i16(in_features, n):
            return RowInt16Linear(in_features, out_features, bias, layers.kernels)
        if supports_shape(in_features, n):
            return RowInt8Linear(in_features, out_features, bias, layers.kernels)
    return layers.linear(in_features, out_features, bias)


def project(layer: LinearBase, x: torch.Tensor, residual: torch.Tensor | None = None,
            gelu: bool = False) -> torch.Tensor:
    """[GELU](layer(x)) [+ residual], fused into the GEMM where the layer can."""
    if isinstance(layer, RowInt8Linear):  # RowInt16Linear too
        return layer(x, residual, gelu)
    if isinstance(layer, Linear) and residual is not None and not gelu:
        # NOTE: residual + bias as addmm's beta term: one pass instead of bias copy + add
        base = residual if layer.bias is None else residual + layer.bias
        return torch.addmm(base, x, layer.weight.t())
    y = layer(x)
    if gelu:
        y = F.gelu(y)  # exact (erf) GELU, as BERT
    return y if residual is None else y.add_(residual)
