"""One checkpoint tensor as the loader hands it to a layer.

A layer asks for the form its runtime format needs: `dense()` (exact values), or the exact
quantized forms `q4()` / `q8()` where the storage has one (GGUF Q4_0/Q4_1/Q4_K -> Q4Blocks,
Q8_0/Q5_0 -> Q8Blocks, an Ember int4/int3 checkpoint -> Q4Blocks; see ember.formats.repack). A layer that can take a quantized form
never asks for `dense()`, so no dense copy is ever made of such tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ember.formats.blocks import Q4Blocks, Q4KBlocks, Q8Blocks
from ember.formats.repack import exact_q4, exact_q8
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

    def q4k(self) -> Q4KBlocks | None:
        """GGUF Q4_K's own fields (the Q4K kernel format), or None for any other storage."""
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

    def q4k(self) -> Q4KBlocks | None:
        return None


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
        blocks = exact_q4(self.qtype, self.raw, self.shape)  # Q4_0, Q4_1, Q4_K
        if blocks is None or self.transform is None:
            return blocks
        return blocks.permute_rows(self.transform)

    def q8(self) -> Q8Blocks | None:
        # NOTE: only untransformed tensors: a transformed one (q/k rows) re-quantizes from its
        # exact values, as it always has.
        if self.transform is not None:
            return None
        return exact_q8(self.qtype, self.raw, self.shape)  # Q8_0, Q5_0

    def q4k(self) -> Q4KBlocks | None:
        if self.qtype != T.Q4_K or len(self.shape) != 2:
            return None
        blocks = Q4KBlocks.from_q4_k(self.raw, self.shape)
        return blocks if self.transform is None else blocks.permute_rows(self.transform)
