"""One checkpoint tensor as the loader hands it to a layer.

A layer asks for the form its runtime format needs: `dense()` (exact values), or the exact
quantized forms `q4()` / `q8()` where the storage has one (GGUF Q4_0/Q4_1 -> Q4Blocks, Q8_0 ->
Q8Blocks, an Ember int4/int3 checkpoint -> Q4Blocks). A layer that can take a quantized form
never asks for `dense()`, so no dense copy is ever made of such tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ember.formats.blocks import Q4Blocks, Q8Blocks
from ember.formats.table import format_for

TensorTransform = Callable[[torch.Tensor], torch.Tensor]


class StoredWeight(Protocol):
    """A checkpoint tensor: its shape, exact values on demand, exact quantized forms."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def dense(self) -> torch.Tensor:
        """The exact values (the stored dtype, or float32 for block formats)."""
        ...

    def q4(self) -> Q4Blocks | None:
        """The exact group-32 int4 form, or None when the storage has none."""
        ...

    def q8(self) -> Q8Blocks | None:
        """The exact group-32 Q8 form, or None when the storage has none."""
        ...


@dataclass(frozen=True)
class DenseWeight:
    """A dense tensor (safetensors, an Ember checkpoint's dense entries, a model in memory)."""

    tensor: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    def dense(self) -> torch.Tensor:
        return self.tensor

    def q4(self) -> Q4Blocks | None:
        return None

    def q8(self) -> Q8Blocks | None:
        return None


_Q4_FORMS: Mapping[T, Callable[[np.ndarray, tuple[int, ...]], Q4Blocks]] = MappingProxyType({
    T.Q4_0: Q4Blocks.from_q4_0, T.Q4_1: Q4Blocks.from_q4_1})
"""GGUF types whose blocks are an exact Q4Blocks form."""


@dataclass(frozen=True)
class BlockWeight:
    """A tensor stored in a format of the table (GGUF), with the model's row transform (e.g.
    llama.cpp's q/k row permutation, applied alike to every form; None: as stored)."""

    qtype: T
    raw: np.ndarray
    shape: tuple[int, ...]
    transform: TensorTransform | None = None

    def dense(self) -> torch.Tensor:
        value = format_for(self.qtype).dequantize(self.raw, self.shape)
        return value if self.transform is None else self.transform(value)

    def q4(self) -> Q4Blocks | None:
        form = _Q4_FORMS.get(self.qtype)
        if form is None or len(self.shape) != 2:
            return None
        blocks = form(self.raw, self.shape)
        return blocks if self.transform is None else blocks.permute_rows(self.transform)

    def q8(self) -> Q8Blocks | None:
        # NOTE: only untransformed tensors: a transformed one (q/k rows) re-quantizes from its
        # exact values, as it always has.
        if self.qtype != T.Q8_0 or self.transform is not None or len(self.shape) != 2:
            return None
        return Q8Blocks.from_q8_0(self.raw, self.shape)
