"""GGUF blocks -> the kernels' weight layouts with numpy (no PyTorch, no dense copy).

The same bytes as the main path's `ember.kernels.ops.pack_q4` / `pack_q8` over
`ember.formats.blocks` (tests compare them byte for byte), but taken straight from the file's
blocks: a GGUF Q4_0/Q4_1 block's 16 code bytes hold codes i (low nibble) and i + 16 (high
nibble), which is exactly how a packed Q4 vector pairs them, so Q4 packing is a byte shuffle;
Q8_0 codes become u = q + 128 (q ^ 0x80). Layouts (cpu_kernels.cpp), N padded to 16 rows:
    Q4: w (Np/16, K/32, 4, 64) uint8, d / m (Np/16, K/32, 16) float32 (w = q * d + m)
    Q8: w (Np/16, K/32, 8, 64) uint8, d (Np/16, K/32, 16) float32 (w = (u - 128) * d)
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

TILE, BLOCK = 16, 32
_BLOCK_BYTES = {T.Q4_0: 18, T.Q4_1: 20, T.Q8_0: 34}


@dataclass(frozen=True)
class PackedLinear:
    """One weight matrix in a kernel layout (kernels.h `LinearW`): fmt 4 (w, d, m), 8 (w, d) or
    9 (Q8h: w with the scales inside, d empty);
    logical (n, k)."""

    fmt: int
    n: int
    k: int
    w: np.ndarray
    d: np.ndarray
    m: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return self.w.nbytes + self.d.nbytes + (0 if self.m is None else self.m.nbytes)


def _pad_rows(a: np.ndarray) -> np.ndarray:
    """Pad dim 0 to a multiple of TILE with zeros."""
    extra = -a.shape[0] % TILE
    if extra == 0:
        return a
    return np.concatenate([a, np.zeros((extra, *a.shape[1:]), dtype=a.dtype)])


def _tile_scales(s: np.ndarray) -> np.ndarray:
    """(N, K/32) per-row block scales -> (Np/16, K/32, 16): lane l of tile t is row 16 t + l."""
    s = _pad_rows(s.astype(np.float32))
    return np.ascontiguousarray(s.reshape(-1, TILE, s.shape[1]).transpose(0, 2, 1))


def _interleave(codes: np.ndarray, vectors: int) -> np.ndarray:
    """(Np, K/32, 32 / ...) code bytes per block -> (Np/16, K/32, vectors, 64): vector j of a
    tile holds bytes 4 j .. 4 j + 3 of each of its 16 rows' block."""
    n, blocks = codes.shape[:2]
    per = codes.reshape(n // TILE, TILE, blocks, vectors, 4)  # (tiles, 16, blocks, v, 4)
    return np.ascontiguousarray(per.transpose(0, 2, 3, 1, 4)).reshape(
        n // TILE, blocks, vectors, TILE * 4)


def _fp16(b: np.ndarray, at: int) -> np.ndarray:
    """The float16 field at byte `at` of every block (N, blocks, bytes) as float32 (N, blocks)."""
    return np.ascontiguousarray(b[..., at:at + 2]).view(np.float16)[..., 0].astype(np.float32)


def _blocks(qtype: T, raw: np.ndarray, k: int) -> np.ndarray:
    """raw (N, row bytes) uint8 -> (N, K/32, block bytes)."""
    size = _BLOCK_BYTES[qtype]
    if raw.shape[1] != k // BLOCK * size:
        raise ValueError(f"{qtype.name} rows of {raw.shape[1]} bytes for K = {k}")
    return raw.reshape(raw.shape[0], k // BLOCK, size)


def pack_q4(qtype: T, raw: np.ndarray, k: int) -> PackedLinear:
    """Q4_0 / Q4_1 rows (N, row bytes) of a (N, K) matrix -> the kernels' Q4 layout, exactly
    (Q4_0: w = d (q - 8), so m = -8 d)."""
    b = _blocks(qtype, raw, k)  # (N, blocks, 18 | 20)
    d = _fp16(b, 0)
    if qtype == T.Q4_1:
        m, codes = _fp16(b, 2), b[..., 4:20]
    elif qtype == T.Q4_0:
        m, codes = -8 * d, b[..., 2:18]
    else:
        raise ValueError(f"{qtype.name} has no exact Q4 form")
    w = _interleave(_pad_rows(np.ascontiguousarray(codes)), 4)  # (tiles, blocks, 4, 64)
    return PackedLinear(4, raw.shape[0], k, w, _tile_scales(d), _tile_scales(m))


def pack_q8(qtype: T, raw: np.ndarray, k: int) -> PackedLinear:
    """Q8_0 rows (N, row bytes) of a (N, K) matrix -> the kernels' Q8 layout, exactly."""
    if qtype != T.Q8_0:
        raise ValueError(f"{qtype.name} has no exact Q8 form")
    b = _blocks(qtype, raw, k)  # (N, blocks, 34)
    u = np.bitwise_xor(b[..., 2:], np.uint8(0x80))  # int8 q -> q + 128 as uint8 (one copy)
    w = _interleave(_pad_rows(u), 8)  # (tiles, blocks, 8, 64)
    return PackedLinear(8, raw.shape[0], k, w, _tile_scales(_fp16(b, 0)))


def pack_q8h(qtype: T, raw: np.ndarray, k: int) -> PackedLinear:
    """Q8_0 rows (N, row bytes) -> the kernels' Q8h layout (fmt 9), exactly: per tile and block
    Q8's 512 code bytes, then the 16 rows' float16 scales as the file stores them (34 bytes per
    32 weights, the file's own; mirrors ember.kernels.ops.pack_q8h). `d` is empty."""
    if qtype != T.Q8_0:
        raise ValueError(f"{qtype.name} has no exact Q8h form")
    b = _blocks(qtype, raw, k)  # (N, blocks, 34)
    codes = _interleave(_pad_rows(np.bitwise_xor(b[..., 2:], np.uint8(0x80))), 8)
    bits = _pad_rows(np.ascontiguousarray(b[..., 0:2]).view(np.uint16)[..., 0])  # (Np, blocks)
    scales = np.ascontiguousarray(bits.reshape(-1, TILE, bits.shape[1]).transpose(0, 2, 1))
    tiles, blocks = codes.shape[:2]
    w = np.concatenate([codes.reshape(tiles, blocks, 512),
                        scales.view(np.uint8).reshape(tiles, blocks, 2 * TILE)], axis=2)
    return PackedLinear(9, raw.shape[0], k, w, np.empty(0, dtype=np.float32))


def pack_rows(qtype: T, parts: Sequence[np.ndarray], k: int) -> PackedLinear:
    """The row blocks `parts` (each (rows, row bytes) of one GGUF type) as one fused matrix."""
    raw = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return pack_q8(qtype, raw, k) if qtype == T.Q8_0 else pack_q4(qtype, raw, k)


def unpermute_rope_rows(raw: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k matrix in HF's rotate-half order: the inverse of llama.cpp's converter
    `permute` (interleaved pairs). Rows only move whole, so this works on quantized rows
    (mirrors ember.models.llama.unpermute_rope_rows)."""
    rows = raw.shape[0]
    order = np.arange(rows).reshape(n_heads, rows // n_heads // 2, 2).transpose(0, 2, 1)
    return raw[order.reshape(-1)]  # (H, 2, D/2) -> rows


def release_file_pages(*raws: np.ndarray) -> None:
    """Drop the resident pages of memory-mapped GGUF tensors already repacked, so load's peak
    RSS holds one layer's file bytes, not the whole file (they would be re-read from the page
    cache if touched again; nothing touches them). Arrays not backed by a mapping are skipped.
    NOTE: only whole pages inside each tensor are dropped."""
    for raw in raws:
        mm = getattr(raw, "_mmap", None)
        if not isinstance(mm, mmap.mmap) or not hasattr(mm, "madvise"):
            continue
        base = np.frombuffer(mm, dtype=np.uint8, count=1).ctypes.data
        start = raw.ctypes.data - base
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        last = (start + raw.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            mm.madvise(mmap.MADV_DONTNEED, first, last - first)
