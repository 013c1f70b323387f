"""The runtime's quantized weight forms, each in exactly one convention.

- `Q4Blocks`: 4-bit group-wise weights w = q * scale + offset, q in [0, 15] (GGUF Q4_1's
  convention). Every int4 source converts into it here: GGUF Q4_0 (offset = -8 d) and Q4_1
  (offset = m) exactly, Ember int4/int3 checkpoints (w = (q - zero) * scale per group of a
  multiple of 32 columns: offset = -zero * scale) and dense weights by round-to-nearest.
- `Q4KBlocks`: GGUF Q4_K's own fields (4-bit codes, 6-bit sub-block scale and min per 32
  columns, d and dmin per 256): w = (d * sc) * q - (dmin * m); `to_q4` is its exact Q4 form.
- `Q8Blocks`: 8-bit symmetric group-wise weights w = q * d, q in [-127, 127] (GGUF Q8_0's
  convention; group = the whole row for per-channel int8).
The layers that run them (ember.layers) take these forms and nothing else; the kernels' packed
layouts and PyTorch's int4pack scale/zero pairs are derived from them at one place each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ember.formats import dequant
from ember.formats.rtn import absmax_params, minmax_params, round_codes

GROUP = 32
"""Columns per group of the runtime int4 and Q8 formats."""
RowFn = Callable[[torch.Tensor], torch.Tensor]
"""A row permutation (e.g. llama.cpp's q/k unpermute), applied alike to every row-wise part."""


@dataclass(frozen=True)
class Q4Blocks:
    """4-bit group-wise weights: q uint8 (N, K) in [0, 15], scale / offset float32 (N, K/g),
    w = q * scale + offset."""

    q: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor

    @property
    def group_size(self) -> int:
        return self.q.shape[1] // self.scale.shape[1]

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        q = self.q.float().view(n, k // self.group_size, self.group_size)  # (N, groups, g)
        return (q * self.scale.unsqueeze(-1) + self.offset.unsqueeze(-1)).view(n, k)

    def permute_rows(self, fn: RowFn) -> "Q4Blocks":
        return Q4Blocks(fn(self.q), fn(self.scale), fn(self.offset))

    @classmethod
    def empty(cls, n: int, k: int, group_size: int = GROUP) -> "Q4Blocks":
        """Uninitialised room for an (N, K) weight, filled row block by row block."""
        return cls(torch.empty(n, k, dtype=torch.uint8),
                   torch.empty(n, k // group_size), torch.empty(n, k // group_size))

    def set_rows(self, rows: slice, part: "Q4Blocks") -> None:
        """Copy `part` into rows `rows` (same group size)."""
        if part.group_size != self.group_size:
            raise ValueError(f"int4 group size {part.group_size} != {self.group_size}")
        self.q[rows], self.scale[rows], self.offset[rows] = part.q, part.scale, part.offset

    @classmethod
    def cat(cls, parts: list["Q4Blocks"]) -> "Q4Blocks":
        """Row-wise concatenation (same group size)."""
        if len({p.group_size for p in parts}) != 1:
            raise ValueError("cannot concatenate int4 weights with different group sizes")
        return cls(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                   torch.cat([p.offset for p in parts]))

    @classmethod
    def quantize(cls, w: torch.Tensor, group_size: int = GROUP) -> "Q4Blocks":
        """Round-to-nearest asymmetric 4-bit quantization of a dense (N, K) weight."""
        n, k = w.shape
        groups = w.float().view(n, k // group_size, group_size)  # (N, groups, g)
        scale, zero = minmax_params(groups, 4)  # (N, groups) each
        q = round_codes(groups, scale.unsqueeze(-1), zero.unsqueeze(-1), 0, 15)
        return cls.from_codes(q.to(torch.uint8).view(n, k), scale, zero)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor,
                   zero: torch.Tensor) -> "Q4Blocks":
        """Codes with w = (q - zero) * scale per group (zero in code units)."""
        scale = scale.float()
        return cls(codes.to(torch.uint8), scale.contiguous(),
                   (-zero.float() * scale).contiguous())

    @classmethod
    def from_grouped(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int) -> "Q4Blocks":
        """Exact group-32 form of codes (N, K) in [0, 15] with w = (q - zero) * scale per group
        of `group_size` columns (a multiple of 32, e.g. an Ember int4 g128 / int3 g64 tensor):
        every 32-wide sub-block keeps its group's scale and zero."""
        n, k = codes.shape
        if group_size % GROUP or k % GROUP:
            raise ValueError(f"group size {group_size} / width {k} are not multiples of {GROUP}")
        rep = group_size // GROUP
        s = scales.float().repeat_interleave(rep, dim=1)[:, :k // GROUP]  # (N, K/32)
        z = zeros.float().repeat_interleave(rep, dim=1)[:, :k // GROUP]
        return cls.from_codes(codes, s, z)

    @classmethod
    def from_q4_0(cls, raw: np.ndarray, shape: tuple[int, ...]) -> "Q4Blocks":
        """Exact form of GGUF Q4_0 blocks (w = d (q - 8): offset -8 d)."""
        q, d = dequant.q4_0_parts(raw, shape)  # (N, groups, 32), (N, groups, 1)
        n, k = shape
        return cls(q.reshape(n, k), d.reshape(n, -1), (-8 * d).reshape(n, -1))

    @classmethod
    def from_q4_1(cls, raw: np.ndarray, shape: tuple[int, ...]) -> "Q4Blocks":
        """Exact form of GGUF Q4_1 blocks (w = d q + m)."""
        q, d, m = dequant.q4_1_parts(raw, shape)  # (N, groups, 32), (N, groups, 1) x 2
        n, k = shape
        return cls(q.reshape(n, k), d.reshape(n, -1), m.reshape(n, -1))

    def int4pack_scale_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) of PyTorch's int4pack convention w = (q - 8) * scale + zero."""
        return self.scale, self.offset + 8 * self.scale


SUPER = 256
"""Columns per d / dmin of `Q4KBlocks` (GGUF Q4_K's super-block)."""


@dataclass(frozen=True)
class Q4KBlocks:
    """GGUF Q4_K's fields: q uint8 (N, K) in [0, 15], sc / m uint8 (N, K/32) in [0, 63], d /
    dmin float32 (N, K/256); w = (d * sc) * q - (dmin * m) per 32 columns (every product is
    exact in float32: fp16 d times a 6-bit integer)."""

    q: torch.Tensor
    sc: torch.Tensor
    m: torch.Tensor
    d: torch.Tensor
    dmin: torch.Tensor

    @classmethod
    def from_q4_k(cls, raw: np.ndarray, shape: tuple[int, ...]) -> "Q4KBlocks":
        return cls(*dequant.q4_k_codes(raw, shape))

    def scale_offset(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per 32 columns: scale d * sc and offset -(dmin * m), float32 (N, K/32)."""
        per = SUPER // GROUP
        d, dmin = self.d.repeat_interleave(per, 1), self.dmin.repeat_interleave(per, 1)
        return d * self.sc.float(), -(dmin * self.m.float())

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        scale, offset = self.scale_offset()
        q = self.q.float().view(n, k // GROUP, GROUP)
        return (scale.unsqueeze(-1) * q + offset.unsqueeze(-1)).view(n, k)

    def to_q4(self) -> Q4Blocks:
        """The exact Q4 form (the per-32 products of the two scales)."""
        return Q4Blocks(self.q, *self.scale_offset())

    def permute_rows(self, fn: RowFn) -> "Q4KBlocks":
        return Q4KBlocks(fn(self.q), fn(self.sc), fn(self.m), fn(self.d), fn(self.dmin))

    @classmethod
    def empty(cls, n: int, k: int) -> "Q4KBlocks":
        if k % SUPER:
            raise ValueError(f"Q4_K rows need K % {SUPER} == 0, got {k}")
        u8 = torch.uint8
        return cls(torch.empty(n, k, dtype=u8), torch.empty(n, k // GROUP, dtype=u8),
                   torch.empty(n, k // GROUP, dtype=u8), torch.empty(n, k // SUPER),
                   torch.empty(n, k // SUPER))

    def set_rows(self, rows: slice, part: "Q4KBlocks") -> None:
        self.q[rows], self.sc[rows], self.m[rows] = part.q, part.sc, part.m
        self.d[rows], self.dmin[rows] = part.d, part.dmin


@dataclass(frozen=True)
class Q8Blocks:
    """8-bit symmetric group-wise weights: q int8 (N, K), d float32 (N, K/g), w = q * d."""

    q: torch.Tensor
    d: torch.Tensor

    @property
    def group_size(self) -> int:
        return self.q.shape[1] // self.d.shape[1]

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        g = self.group_size
        return (self.q.float().view(n, k // g, g) * self.d.unsqueeze(-1)).view(n, k)

    def permute_rows(self, fn: RowFn) -> "Q8Blocks":
        return Q8Blocks(fn(self.q), fn(self.d))

    @classmethod
    def empty(cls, n: int, k: int, group_size: int = GROUP) -> "Q8Blocks":
        return cls(torch.empty(n, k, dtype=torch.int8), torch.empty(n, k // group_size))

    def set_rows(self, rows: slice, part: "Q8Blocks") -> None:
        if part.group_size != self.group_size:
            raise ValueError(f"int8 group size {part.group_size} != {self.group_size}")
        self.q[rows], self.d[rows] = part.q, part.d

    @classmethod
    def quantize(cls, w: torch.Tensor, group_size: int = GROUP,
                 eps: float = 1e-30) -> "Q8Blocks":
        """Round-to-nearest symmetric 8-bit (127 levels a side) of a dense (N, K) weight;
        group_size = K gives one scale per row (per-channel)."""
        n, k = w.shape
        if k % group_size:
            raise ValueError(f"Q8 needs K % {group_size} == 0, got {k}")
        groups = w.float().view(n, k // group_size, group_size)  # (N, groups, g)
        d, zero = absmax_params(groups, 127, eps)  # (N, groups) each
        q = round_codes(groups, d.unsqueeze(-1), zero.unsqueeze(-1), -127, 127)
        return cls(q.to(torch.int8).view(n, k), d)

    @classmethod
    def from_q8_0(cls, raw: np.ndarray, shape: tuple[int, ...]) -> "Q8Blocks":
        """Exact form of GGUF Q8_0 blocks."""
        q, d = dequant.q8_0_blocks(raw, shape)  # (N, groups, 32), (N, groups, 1)
        n, k = shape
        return cls(q.reshape(n, k), d.reshape(n, -1))
