"""The Q6 head format: 6-bit codes in GGUF Q6_K's scale geometry (the kernel in q6_head.cpp).

`Q6Blocks`: w = d * sc * q with q int in [-32, 31], one int8 sub-scale `sc` per 16 columns and
one float32 `d` per super-block of `sb` * 32 columns, 6.5625 bits a weight with sb = 8 (the
kernel layout stores d as float32: +0.0625). GGUF Q6_K arrives exactly (sb = 8, its fp16 d
widened); any other matrix (the Q8_0 head of Gemma 3 270M, whose width 640 is no multiple of
256: sb = 4) by llama.cpp's Q6_K recipe (`quantize`): per 16 columns the code grid that keeps
the least squared error among a few scales, the sub-scales then rounded to int8 of the
super-block's d. `pack_q6` gives the kernel's row-interleaved layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ember.formats import dequant

SUB = 16
"""Columns per int8 sub-scale."""
BLOCK = 32
TILE = 16
BLOCK_BYTES = 416
"""Packed bytes of one tile (16 rows) x one block (32 columns): 256 low nibbles, 128 high
2-bit pairs, 32 sub-scales."""
_CANDIDATES = (-32.0, -31.5, -31.0, -32.5, -33.0, -30.5)
"""Code values the largest-magnitude weight of a 16-column group may take (llama.cpp's
make_qx_quants searches such a neighbourhood of -32)."""


def super_blocks(k: int) -> int:
    """Blocks of 32 per d for a width k: 8 (Q6_K's 256) where k allows, else 4, 2 or 1."""
    for sb in (8, 4, 2, 1):
        if k % (BLOCK * sb) == 0:
            return sb
    raise ValueError(f"Q6 needs K % {BLOCK} == 0, got {k}")


@dataclass(frozen=True)
class Q6Blocks:
    """q int8 (N, K) in [-32, 31], sc int8 (N, K/16), d float32 (N, K/(32 sb)); w = d sc q."""

    q: torch.Tensor
    sc: torch.Tensor
    d: torch.Tensor
    sb: int

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        scale = self.sc.float() * self.d.repeat_interleave(2 * self.sb, dim=1)  # (N, K/16)
        return (self.q.float().view(n, k // SUB, SUB) * scale.unsqueeze(-1)).view(n, k)

    @classmethod
    def from_q6_k(cls, raw: np.ndarray, shape: tuple[int, ...]) -> "Q6Blocks":
        """Exact form of GGUF Q6_K blocks (d fp16 per 256 columns, sc int8 per 16)."""
        q, sc, d = _q6_k_parts(raw, shape)
        n, k = shape
        return cls(q.reshape(n, k), sc.reshape(n, k // SUB), d.reshape(n, k // 256), 8)

    @classmethod
    def quantize(cls, w: torch.Tensor, sb: int | None = None, rows: int = 8192) -> "Q6Blocks":
        """llama.cpp's Q6_K recipe on a dense (N, K) weight, `rows` rows at a time."""
        n, k = w.shape
        sb = super_blocks(k) if sb is None else sb
        parts = [_quantize_rows(w[i:i + rows].float(), sb) for i in range(0, n, rows)]
        return cls(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                   torch.cat([p[2] for p in parts]), sb)


def _q6_k_parts(raw: np.ndarray, shape: tuple[int, ...]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q6_K's codes q - 32 (rows, blocks, 256) int8, sub-scales (rows, blocks, 16) int8 and d
    (rows, blocks) float32: the fields `dequant.dequant_q6_k` combines."""
    b = dequant._blocks(raw, shape, dequant.QK_K, 210)  # (rows, blocks, 210)
    r, nb = b.shape[:2]
    sc = b[..., 192:208].contiguous().view(torch.int8)
    d = dequant._fp16_field(b, 208).view(r, nb)
    low = dequant._unpack(b[..., :128].reshape(r, nb, 2, 64), 4).reshape(r, nb, 8, 32)
    high = dequant._unpack(b[..., 128:192].reshape(r, nb, 2, 32), 2).reshape(r, nb, 8, 32)
    q = ((low | (high << 4)).to(torch.int16) - 32).to(torch.int8).reshape(r, nb, 256)
    return q, sc, d


def _quantize_rows(w: torch.Tensor, sb: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, k = w.shape
    x = w.view(n, k // SUB, SUB)  # (N, groups, 16)
    idx = x.abs().argmax(dim=-1, keepdim=True)
    peak = x.gather(-1, idx)  # (N, groups, 1): the signed largest-magnitude value
    best_err = torch.full(peak.shape, float("inf"))
    best_scale = torch.zeros(peak.shape)
    safe = torch.where(peak == 0, torch.ones_like(peak), peak)
    for code in _CANDIDATES:
        q = (x * (code / safe)).round().clamp(-32, 31)
        # the least-squares scale for these codes, and its error
        qq = (q * q).sum(-1, keepdim=True).clamp_min(1e-30)
        s = (q * x).sum(-1, keepdim=True) / qq
        err = (x - s * q).square().sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, s, best_scale)
    scale = best_scale.view(n, k // (BLOCK * sb), 2 * sb)  # (N, supers, 16 sub-scales)
    amax = scale.abs().amax(-1, keepdim=True)
    d = amax / 127  # (N, supers, 1)
    sc = torch.where(d > 0, (scale / d.clamp_min(1e-30)).round(), torch.zeros_like(scale))
    sc = sc.clamp(-127, 127)
    step = (d * sc).view(n, k // SUB, 1)
    q = torch.where(step != 0, (x / torch.where(step == 0, torch.ones_like(step), step)).round(),
                    torch.zeros_like(x)).clamp(-32, 31)
    return (q.to(torch.int8).view(n, k), sc.to(torch.int8).view(n, k // SUB),
            d.view(n, k // (BLOCK * sb)).float())


def pack_q6(blocks: Q6Blocks) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel layout (q6_head.cpp): packed (Np/16, K/32, 416) uint8, d (Np/16, K/(32 sb),
    16) float32; N padded to 16 rows with zeros."""
    n, k = blocks.q.shape
    extra = -n % TILE
    u = (blocks.q.to(torch.int16) + 32).to(torch.uint8)
    sc, d = blocks.sc, blocks.d
    if extra:
        u = torch.cat([u, torch.full((extra, k), 32, dtype=torch.uint8)])
        sc = torch.cat([sc, sc.new_zeros(extra, sc.shape[1])])
        d = torch.cat([d, d.new_zeros(extra, d.shape[1])])
    tiles, nb = u.shape[0] // TILE, k // BLOCK
    # (tiles, blocks, 8 column groups j, 16 rows l, 4 columns e)
    g = u.view(tiles, TILE, nb, 8, 4).permute(0, 2, 3, 1, 4)
    low = (g[:, :, :4] & 0xF) | ((g[:, :, 4:] & 0xF) << 4)  # (tiles, nb, 4, 16, 4)
    hi = g >> 4  # (tiles, nb, 8, 16, 4) in [0, 3]
    high = hi[:, :, 0::4] | (hi[:, :, 1::4] << 2) | (hi[:, :, 2::4] << 4) | (hi[:, :, 3::4] << 6)
    scs = sc.view(tiles, TILE, nb, 2).permute(0, 2, 3, 1).view(torch.uint8)  # (tiles, nb, 2, 16)
    packed = torch.cat([low.reshape(tiles, nb, 256), high.reshape(tiles, nb, 128),
                        scs.reshape(tiles, nb, 32)], dim=2).contiguous()
    dt = d.view(tiles, TILE, -1).transpose(1, 2).contiguous()  # (tiles, supers, 16)
    return packed, dt
