"""Quantized weight-only Linear formats for CPU inference.

- `Int8Linear`: int8 weights with one scale per output channel (symmetric).
- `Int4Linear`: 4-bit group-wise weights, w = (q - 8) * scale + zero per group, run by
  PyTorch's `_weight_int4pack_mm_for_cpu` for small batches (decode). That kernel slows down
  linearly with the number of rows, so steps with more than `dense_threshold` rows (prefill,
  large batches) use a dense copy of the dequantized weight when one is kept.

GGUF Q4_0 / Q4_1 blocks convert exactly: Q4_0 w = (q - 8) d -> scale d, zero 0; Q4_1
w = q d + m -> scale d, zero m + 8 d.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from ember.loading.gguf import GGUFTensor


class Int4Weights:
    """4-bit group-wise weights in plain form: q (out, in) uint8 in [0, 15], scale/zero
    (out, in / group) float32, w = (q - 8) * scale + zero."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        self.q, self.scale, self.zero = q, scale, zero
        self.group_size = q.shape[1] // scale.shape[1]

    def dequantize(self) -> torch.Tensor:
        g = self.group_size
        out_f, in_f = self.q.shape
        q = self.q.float().view(out_f, in_f // g, g)  # (out, groups, g)
        w = (q - 8) * self.scale.unsqueeze(-1) + self.zero.unsqueeze(-1)
        return w.view(out_f, in_f)

    @classmethod
    def cat(cls, parts: list["Int4Weights"]) -> "Int4Weights":
        """Row-wise concatenation (fused projections); group sizes must match."""
        if len({p.group_size for p in parts}) != 1:
            raise ValueError("cannot fuse int4 weights with different group sizes")
        return cls(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                   torch.cat([p.zero for p in parts]))

    def permute_rows(self, fn) -> "Int4Weights":
        return Int4Weights(fn(self.q), fn(self.scale), fn(self.zero))

    @classmethod
    def from_gguf(cls, tensor: GGUFTensor) -> "Int4Weights":
        """Exact conversion of Q4_0 / Q4_1 blocks (32 weights per block)."""
        rows, cols = tensor.shape
        raw = np.ascontiguousarray(tensor.raw).reshape(rows, cols // 32, -1)  # (out, blocks, B)
        d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # (out, blocks)
        if tensor.qtype == GGMLQuantizationType.Q4_1:
            m = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
            qs, zero = raw[..., 4:20], m + 8 * d
        elif tensor.qtype == GGMLQuantizationType.Q4_0:
            qs, zero = raw[..., 2:18], np.zeros_like(d)
        else:
            raise ValueError(f"{tensor.name}: {tensor.type_name} is not a Q4_0/Q4_1 tensor")
        # a block's 16 bytes hold elements 0..15 in the low nibbles, 16..31 in the high ones
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, cols)
        return cls(torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(zero))

    @classmethod
    def from_grouped(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int) -> "Int4Weights":
        """Exact group-32 form of codes (out, in) in [0, 15] with w = (q - zero) * scale per
        group of `group_size` (a multiple of 32; e.g. an Ember int4 g128 / int3 g64 tensor):
        every 32-wide sub-block keeps its group's scale, and zero' = (8 - zero) * scale."""
        out_f, in_f = codes.shape
        if group_size % 32 or in_f % 32:
            raise ValueError(f"group size {group_size} / width {in_f} are not multiples of 32")
        rep = group_size // 32
        s = scales.float().repeat_interleave(rep, dim=1)[:, :in_f // 32]  # (out, in / 32)
        z = zeros.float().repeat_interleave(rep, dim=1)[:, :in_f // 32]
        return cls(codes.to(torch.uint8), s.contiguous(), ((8 - z) * s).contiguous())

    @classmethod
    def quantize(cls, w: torch.Tensor, group_size: int = 32) -> "Int4Weights":
        """Round-to-nearest asymmetric 4-bit quantization of a dense (out, in) weight."""
        out_f, in_f = w.shape
        wg = w.float().view(out_f, in_f // group_size, group_size)  # (out, groups, g)
        lo, hi = wg.amin(-1), wg.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-10)
        q = torch.round((wg - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, 15)
        return cls(q.to(torch.uint8).view(out_f, in_f), scale, lo + 8 * scale)


class Int4Linear(nn.Module):
    """y = x @ W^T with 4-bit group-wise weights (activations bf16 inside the kernel)."""

    packed: torch.Tensor
    scales_zeros: torch.Tensor

    def __init__(self, weights: Int4Weights, keep_dense: bool, dense_threshold: int = 4,
                 act_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.out_features, self.in_features = weights.q.shape
        self.group_size = weights.group_size
        self.dense_threshold = dense_threshold
        self.act_dtype = act_dtype
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            weights.q.to(torch.int32), 1))
        # (groups, out, 2): the kernel's scale-and-zero layout
        sz = torch.stack([weights.scale.t(), weights.zero.t()], dim=-1)
        self.register_buffer("scales_zeros", sz.to(act_dtype).contiguous())
        self.dense: torch.Tensor | None = (weights.dequantize().to(act_dtype)
                                           if keep_dense else None)

    @property
    def format(self) -> str:
        return f"int4-g{self.group_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.act_dtype)  # (M, in)
        if self.dense is not None and x2.shape[0] > self.dense_threshold:
            y = F.linear(x2, self.dense)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size,
                                                          self.scales_zeros)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T with int8 weights and one scale per output channel."""

    qweight: torch.Tensor
    scale: torch.Tensor

    def __init__(self, w: torch.Tensor, act_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.out_features, self.in_features = w.shape
        self.act_dtype = act_dtype
        scale = (w.float().abs().amax(dim=1) / 127).clamp_min(1e-10)  # (out,)
        q = torch.round(w.float() / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(act_dtype))

    @property
    def format(self) -> str:
        return "int8"

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.float().unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.act_dtype)  # (M, in)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scale)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)
