"""Quantized weight-only Linear formats run by PyTorch's CPU ops (bfloat16 activations).

- `Int8Linear`: int8 weights with one scale per output channel (symmetric), run by
  `_weight_int8pack_mm`.
- `Int4Linear`: 4-bit group-32 weights (ember.formats.blocks.Q4Blocks: GGUF Q4_0 / Q4_1 and
  Ember int4 checkpoints arrive exactly, anything else is quantized round-to-nearest), run by
  `_weight_int4pack_mm_for_cpu` for small batches (decode). That kernel slows down linearly with
  the number of rows, so steps with more than `dense_threshold` rows (prefill, large batches)
  use a dense copy of the dequantized weight when one is kept.
Both are built empty and filled row block by row block (`load_weight`); `finalize` packs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ember.formats.blocks import GROUP, Q4Blocks, Q8Blocks
from ember.formats.stored import DenseWeight, StoredWeight
from ember.layers.linear import LinearBase


class Int4Linear(LinearBase):
    """y = x @ W^T with 4-bit group-32 weights (activations bf16 inside the kernel)."""

    packed: torch.Tensor
    scales_zeros: torch.Tensor

    def __init__(self, in_features: int, out_features: int | Sequence[int],
                 keep_dense: bool = True, dense_threshold: int = 4,
                 act_dtype: torch.dtype = torch.bfloat16,
                 dtype: torch.dtype | None = None) -> None:
        """dtype: dense source values are rounded to it before quantization (the model
        dtype); None keeps them as given."""
        super().__init__(in_features, out_features)
        self.group_size = GROUP
        self.keep_dense = keep_dense
        self.dense_threshold = dense_threshold
        self.act_dtype = act_dtype
        self.dtype = dtype
        self.register_buffer("packed", torch.empty(0, dtype=torch.int32))
        self.register_buffer("scales_zeros", torch.empty(0, dtype=act_dtype))
        self.dense: torch.Tensor | None = None
        self._loaded: Q4Blocks | None = None
        """Row blocks as they arrive, until `finalize` packs them."""

    @classmethod
    def from_blocks(cls, weights: Q4Blocks, keep_dense: bool = True, dense_threshold: int = 4,
                    act_dtype: torch.dtype = torch.bfloat16) -> "Int4Linear":
        out_f, in_f = weights.q.shape
        layer = cls(in_f, out_f, keep_dense, dense_threshold, act_dtype)
        layer._loaded = weights
        layer.finalize()
        return layer

    @property
    def format(self) -> str:
        return f"int4-g{self.group_size}"

    def load_weight(self, rows: slice, weight: StoredWeight) -> None:
        part = weight.q4()
        if part is None:
            dense = weight.dense()
            part = Q4Blocks.quantize(dense if self.dtype is None else dense.to(self.dtype))
        if self._loaded is None:
            self._loaded = Q4Blocks.empty(self.out_features, self.in_features)
        self._loaded.set_rows(rows, part)

    def finalize(self) -> None:
        weights = self._loaded
        assert weights is not None, "Int4Linear finalized before its weights were loaded"
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            weights.q.to(torch.int32), 1)
        scale, zero = weights.int4pack_scale_zero()  # w = (q - 8) * scale + zero
        # (groups, out, 2): the kernel's scale-and-zero layout
        self.scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(
            self.act_dtype).contiguous()
        self.dense = weights.dequantize().to(self.act_dtype) if self.keep_dense else None
        self._loaded = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.act_dtype)  # (M, in)
        if self.dense is not None and x2.shape[0] > self.dense_threshold:
            y = F.linear(x2, self.dense)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size,
                                                          self.scales_zeros)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


class Int8Linear(LinearBase):
    """y = x @ (q * scale)^T with int8 weights and one scale per output channel."""

    qweight: torch.Tensor
    scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int | Sequence[int],
                 act_dtype: torch.dtype = torch.bfloat16,
                 dtype: torch.dtype | None = None) -> None:
        """dtype: dense source values are rounded to it before quantization (the model
        dtype); None keeps them as given."""
        super().__init__(in_features, out_features)
        self.act_dtype = act_dtype
        self.dtype = dtype
        self.register_buffer("qweight", torch.empty(0, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(0, dtype=act_dtype))
        self._loaded: Q8Blocks | None = None
        """Per-channel blocks (group = the whole row) until `finalize`."""

    @classmethod
    def from_dense(cls, w: torch.Tensor, act_dtype: torch.dtype = torch.bfloat16
                   ) -> "Int8Linear":
        """Round-to-nearest per-channel int8 of a dense (out, in) weight."""
        layer = cls(w.shape[1], w.shape[0], act_dtype)
        layer.load_weight(slice(0, w.shape[0]), DenseWeight(w))
        layer.finalize()
        return layer

    @property
    def format(self) -> str:
        return "int8"

    def load_weight(self, rows: slice, weight: StoredWeight) -> None:
        dense = weight.dense()
        dense = dense if self.dtype is None else dense.to(self.dtype)
        part = Q8Blocks.quantize(dense, group_size=self.in_features, eps=1e-10)
        if self._loaded is None:
            self._loaded = Q8Blocks.empty(self.out_features, self.in_features,
                                          group_size=self.in_features)
        self._loaded.set_rows(rows, part)

    def finalize(self) -> None:
        weights = self._loaded
        assert weights is not None, "Int8Linear finalized before its weights were loaded"
        self.qweight = weights.q
        self.scale = weights.d[:, 0].to(self.act_dtype)  # (out,)
        self._loaded = None

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.float().unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.act_dtype)  # (M, in)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scale)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)
