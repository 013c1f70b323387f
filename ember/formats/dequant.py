"""Exact reference dequantizers for GGUF weight formats, vectorized in torch.

Every function takes a tensor's bytes as stored in the file (`raw`: uint8 (rows, row_bytes) for
block types, or a typed / uint8 array for the dense types) and its logical shape (PyTorch
order, e.g. (out, in)), and returns a float32 tensor of that shape. Results are bit-identical
to ggml's reference dequantization (and to `gguf.quants.dequantize`): every fp16 scale is first
widened to float32 and the float32 operations run in ggml's order, e.g. Q4_K is
`(d * sc) * q - (dmin * m)` and Q6_K is `(d * sc) * (q - 32)`, with no fused multiply-adds.

Block layouts (ggml's `block_*` structs, little-endian, packed):
    Q8_0  (32 w, 34 B)   d fp16, qs int8[32]                        w = d * q
    Q4_0  (32 w, 18 B)   d fp16, qs[16] (low nibbles: w 0..15, high: w 16..31)
                                                                    w = d * (q - 8)
    Q4_1  (32 w, 20 B)   d fp16, m fp16, qs[16]                     w = d * q + m
    Q5_0  (32 w, 22 B)   d fp16, qh u32 (bit i: 5th bit of w i), qs[16]
                                                                    w = d * (q - 16)
    Q5_1  (32 w, 24 B)   d fp16, m fp16, qh u32, qs[16]             w = d * q + m
    Q2_K  (256 w, 84 B)  scales[16] (lo nibble scale, hi min, per 16 w), qs[64] (2 bits),
                         d fp16, dmin fp16                          w = d*sc * q - dmin*m
    Q3_K  (256 w, 110 B) hmask[32] (bit set: no -4 offset), qs[64] (2 bits), scales[12]
                         (16 x 6-bit, biased by 32), d fp16        w = d*sc * (q - 4*!h)
    Q4_K  (256 w, 144 B) d fp16, dmin fp16, scales[12] (8 x 6-bit scale + 8 x 6-bit min),
                         qs[128]                                    w = d*sc * q - dmin*m
    Q5_K  (256 w, 176 B) d, dmin, scales[12] as Q4_K, qh[32], qs[128]
                                                                    w = d*sc * q - dmin*m
    Q6_K  (256 w, 210 B) ql[128], qh[64], scales int8[16], d fp16   w = d*sc * (q - 32)
    Q8_K  (256 w, 292 B) d fp32, qs int8[256], bsums int16[16]      w = d * q
"""

from __future__ import annotations

import math

import numpy as np
import torch

QK = 32
"""Weights per block of the legacy types (Q4_0 ... Q8_0)."""
QK_K = 256
"""Weights per super-block of the K-quants."""


# --- helpers --------------------------------------------------------------------------------

def _rows(shape: tuple[int, ...]) -> int:
    return math.prod(shape[:-1])  # 1 for a 1-D tensor


def _flat(raw: np.ndarray, dtype: type[np.generic]) -> torch.Tensor:
    """The array's bytes as a flat torch tensor of numpy `dtype` (no copy when contiguous)."""
    return torch.from_numpy(np.ascontiguousarray(raw).reshape(-1).view(dtype))


def _blocks(raw: np.ndarray, shape: tuple[int, ...], block_size: int,
            type_size: int) -> torch.Tensor:
    """(rows, blocks, type_size) uint8 view of a block-quantized tensor of logical `shape`."""
    if not shape or shape[-1] % block_size:
        raise ValueError(f"row length of shape {shape} is not a multiple of {block_size}")
    rows, blocks = _rows(shape), shape[-1] // block_size
    flat = _flat(raw, np.uint8)
    if flat.numel() != rows * blocks * type_size:
        raise ValueError(f"{flat.numel()} bytes do not hold shape {shape} "
                         f"({rows} rows x {blocks} blocks x {type_size} bytes)")
    return flat.view(rows, blocks, type_size)


def _fp16_field(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """(rows, blocks, 1) float32 from the little-endian fp16 at byte `start` of each block."""
    return blocks[..., start:start + 2].contiguous().view(torch.float16).float()


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Split each byte of uint8 (..., n) into its 8 // bits fields, lowest bits first.

    Returns uint8 (..., 8 // bits, n): field k of byte j at [..., k, j].
    """
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8).view(-1, 1)  # (fields, 1)
    return (packed.unsqueeze(-2) >> shifts) & ((1 << bits) - 1)


def _qh_bits32(qh: torch.Tensor) -> torch.Tensor:
    """uint8 (rows, blocks, 4) little-endian u32 -> uint8 (rows, blocks, 32) of its bits 0..31."""
    bits = _unpack(qh, 1)  # (rows, blocks, 8, 4): bit k of byte j at [k, j]
    return bits.transpose(-1, -2).reshape(*qh.shape[:-1], 32)  # bit 8j + k


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins, float32 (r, B, 8).

    Bytes 0..3 hold scales 0..3 (low 6 bits) and the top 2 bits of scales 4..7; bytes 4..7 the
    same for the mins; bytes 8..11 the low 4 bits of scales 4..7 (low nibble) / mins 4..7.
    """
    s = scales.reshape(*scales.shape[:-1], 3, 4)  # (rows, blocks, 3, 4)
    sc_lo, mn_lo, hi = s[..., 0, :], s[..., 1, :], s[..., 2, :]  # each (rows, blocks, 4)
    sc = torch.cat([sc_lo & 0x3F, (hi & 0x0F) | ((sc_lo >> 2) & 0x30)], dim=-1)
    mn = torch.cat([mn_lo & 0x3F, (hi >> 4) | ((mn_lo >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()  # (rows, blocks, 8) each


# --- dense ----------------------------------------------------------------------------------

def dequant_f32(raw: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """F32: the values themselves (shares memory with `raw` when it is contiguous)."""
    return _flat(raw, np.float32).reshape(shape)


def dequant_f16(raw: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """F16: widened to float32 (exact)."""
    return _flat(raw, np.float16).float().reshape(shape)


def dequant_bf16(raw: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """BF16: the 16 bits become the high half of a float32 (exact)."""
    return _flat(raw, np.int16).view(torch.bfloat16).float().reshape(shape)


# --- legacy 32-weight blocks ----------------------------------------------------------------

def q8_0_blocks(raw: np.ndarray, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 blocks as q (rows, blocks, 32) int8 and d (rows, blocks, 1) float32."""
    b = _blocks(raw, shape, QK, 34)  # (rows, blocks, 34): d fp16 + 32 int8
    return b[..., 2:].contiguous().view(torch.int8), _fp16_field(b, 0)


def dequant_q8_0(raw: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """Q8_0: w = d * q."""
    q, d = q8_0_blocks(raw, shape)
    return (q.float() * d).reshape(shape)


def q4_0_parts(raw: np.ndarray, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 as codes uint8 (rows, blocks, 32) in [0, 15] and d float32 (rows, blocks, 1);
    w = d * (q - 8). The one decoder of Q4_0 blocks (dequantization and int4 forms use it)."""
    b = _blocks(raw, shape, QK, 18)  # (rows, blocks, 18)
    return _unpack(b[..., 2:], 4).reshape(*b.shape[:-1], QK), _fp16_field(b, 0)


def q4_1_parts(raw: np.ndarray, shape: tuple[int, ...]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 as codes uint8 (rows, blocks, 32) in [0, 15], d and m float32 (rows, blocks, 1);
    w = d * q + m. The one decoder of Q4_1 blocks (dequantization and int4 forms use it)."""
    b = _blocks(raw, shape, QK, 20)  # (rows, blocks, 20)
    return _unpack(b[..., 4:], 4).reshape(*b.shape[:-1], QK), _fp16_field(b, 0), \
        _fp16_field(b, 2)


def dequant_q4_0(raw: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """Q4_0: w = d * (q - 8)."""
    q, d = q4_0_parts(raw, shape)
    return ((q.float() - 8) * d).reshape(shape)


def dequant_q4_1(raw: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """Q4_1: w = d * q + m."""
    q, d, m = q4_1_parts(raw, shape)
    return (q.float() * d + m).reshape(shape)


def _q5(b: torch.Tensor, qh_at: int) -> torch.Tensor:
    """5-bit codes (rows, blocks, 32) float32 from the qh u32 at `qh_at` and the nibbles after."""
    low = _unpack(b[..., qh_at + 4:], 4).reshape(*b.shape[:-1], QK)  # (rows, blocks, 32)
    high = _qh_bits32(b[..., qh_at:qh_at + 4])  # (rows, blocks, 32)
    return (low | (high << 4)).float()


def q5_0_parts(raw: np.ndarray, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Q5_0 as signed codes int8 (rows, blocks, 32) in [-16, 15] and d (rows, blocks, 1)."""
    b = _blocks(raw, shape, QK, 22)  # (rows, blocks, 22)
    return (_q5(b, 2) - 16).to(torch.int8), _fp16_field(b, 0)


def dequant_q5_0(raw: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """Q5_0: w = d * (q - 16)."""
    q, d = q5_0_parts(raw, shape)
    return (q.float() * d).reshape(shape)


def dequant_q5_1(raw: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """Q5_1: w = d * q + m."""
    b = _blocks(raw, shape, QK, 24)  # (rows, blocks, 24)
    return (_q5(b, 4) * _fp16_field(b, 0) + _fp16_field(b, 2)).reshape(shape)


# --- K-quants (256-weight super-blocks) -----------------------------------------------------

def dequant_q2_k(raw: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """Q2_K: 16 sub-blocks of 16; w = (d * sc) * q - (dmin * m)."""
    b = _blocks(raw, shape, QK_K, 84)  # (rows, blocks, 84)
    r, nb = b.shape[:2]
    scales = b[..., :16]  # (rows, blocks, 16): low nibble scale, high nibble min
    d, dmin = _fp16_field(b, 80), _fp16_field(b, 82)  # (rows, blocks, 1)
    dl = (d * (scales & 0x0F).float()).unsqueeze(-1)  # (rows, blocks, 16, 1)
    ml = (dmin * (scales >> 4).float()).unsqueeze(-1)  # (rows, blocks, 16, 1)
    # two 32-byte halves, each holding 4 x 32 weights at bit offsets 0, 2, 4, 6
    q = _unpack(b[..., 16:80].reshape(r, nb, 2, 32), 2)  # (rows, blocks, 2, 4, 32)
    q = q.reshape(r, nb, 16, 16).float()  # (rows, blocks, sub-block, 16)
    return (dl * q - ml).reshape(shape)


def dequant_q3_k(raw: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """Q3_K: 16 sub-blocks of 16; w = (d * (sc - 32)) * (q - 4 * (1 - hbit))."""
    b = _blocks(raw, shape, QK_K, 110)  # (rows, blocks, 110)
    r, nb = b.shape[:2]
    scales = b[..., 96:108]  # (rows, blocks, 12)
    low = _unpack(scales[..., :8], 4).reshape(r, nb, 16)  # sc i < 8: byte i lo, else i-8 hi
    high = _unpack(scales[..., 8:], 2).reshape(r, nb, 16)  # sc 4k + j: bits 2k of byte 8 + j
    sc = (low | (high << 4)).float() - 32  # (rows, blocks, 16)
    dl = (_fp16_field(b, 108) * sc).unsqueeze(-1)  # (rows, blocks, 16, 1)
    ql = _unpack(b[..., 32:96].reshape(r, nb, 2, 32), 2)  # (rows, blocks, 2, 4, 32)
    hm = _unpack(b[..., :32], 1)  # (rows, blocks, 8, 32): bit k of hmask byte j at [k, j]
    # a set hmask bit means no offset; a clear one subtracts 4
    q = ql.reshape(r, nb, 16, 16).float() - ((hm ^ 1) << 2).reshape(r, nb, 16, 16).float()
    return (dl * q).reshape(shape)


def _k_sub_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: each 32-weight sub-block's scale d * sc and offset dmin * m, float32
    (rows, blocks, 8, 1) each."""
    sc, mn = _k_scale_min(b[..., 4:16])  # (rows, blocks, 8) each
    return (_fp16_field(b, 0) * sc).unsqueeze(-1), (_fp16_field(b, 2) * mn).unsqueeze(-1)


def _k_scaled(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q4_K / Q5_K: (d * sc) * q - (dmin * m) for q float32 (rows, blocks, 8, 32)."""
    ds, dm = _k_sub_scales(b)
    return ds * q - dm


def q4_k_parts(raw: np.ndarray, shape: tuple[int, ...]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K as 32-weight groups: codes uint8 (rows, blocks, 8, 32) in [0, 15], scale and
    offset float32 (rows, blocks, 8, 1), w = scale * q - offset."""
    b = _blocks(raw, shape, QK_K, 144)  # (rows, blocks, 144)
    r, nb = b.shape[:2]
    q = _unpack(b[..., 16:].reshape(r, nb, 4, 32), 4)  # (rows, blocks, 4, 2, 32)
    return (q.reshape(r, nb, 8, 32), *_k_sub_scales(b))


def q4_k_codes(raw: np.ndarray, shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """Q4_K's own fields per row: codes uint8 (rows, K) in [0, 15], sub-block scales and mins
    uint8 (rows, K/32) in [0, 63], d and dmin float32 (rows, K/256) (fp16 widened);
    w = (d * sc) * q - (dmin * m) per 32 columns, as `dequant_q4_k`."""
    b = _blocks(raw, shape, QK_K, 144)  # (rows, blocks, 144)
    r, nb = b.shape[:2]
    q = _unpack(b[..., 16:].reshape(r, nb, 4, 32), 4).reshape(r, nb * QK_K)
    sc, mn = _k_scale_min(b[..., 4:16])  # float32 (rows, blocks, 8) each
    return (q, sc.to(torch.uint8).reshape(r, nb * 8), mn.to(torch.uint8).reshape(r, nb * 8),
            _fp16_field(b, 0).reshape(r, nb), _fp16_field(b, 2).reshape(r, nb))


def dequant_q4_k(raw: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """Q4_K: 8 sub-blocks of 32; each 32-byte run of qs holds two (low, then high nibbles)."""
    q, ds, dm = q4_k_parts(raw, shape)
    return (ds * q.float() - dm).reshape(shape)


def dequant_q5_k(raw: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """Q5_K: Q4_K's nibbles plus a 5th bit: bit k of qh byte j for weight 32k + j."""
    b = _blocks(raw, shape, QK_K, 176)  # (rows, blocks, 176)
    r, nb = b.shape[:2]
    low = _unpack(b[..., 48:].reshape(r, nb, 4, 32), 4).reshape(r, nb, 8, 32)
    high = _unpack(b[..., 16:48], 1)  # (rows, blocks, 8, 32)
    return _k_scaled(b, (low | (high << 4)).float()).reshape(shape)


def dequant_q6_k(raw: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """Q6_K: 16 sub-blocks of 16; w = (d * sc) * (q - 32), q = 4 bits of ql | 2 bits of qh."""
    b = _blocks(raw, shape, QK_K, 210)  # (rows, blocks, 210)
    r, nb = b.shape[:2]
    sc = b[..., 192:208].contiguous().view(torch.int8).float()  # (rows, blocks, 16)
    ds = (_fp16_field(b, 208) * sc).unsqueeze(-1)  # (rows, blocks, 16, 1)
    # halves of 128 weights: ql 64 bytes (lo nibbles 0..63, hi 64..127), qh 32 bytes (4 x 2 bits)
    low = _unpack(b[..., :128].reshape(r, nb, 2, 64), 4).reshape(r, nb, 8, 32)
    high = _unpack(b[..., 128:192].reshape(r, nb, 2, 32), 2).reshape(r, nb, 8, 32)
    q = (low | (high << 4)).reshape(r, nb, 16, 16).float() - 32  # (rows, blocks, 16, 16)
    return (ds * q).reshape(shape)


def dequant_q8_k(raw: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """Q8_K: w = d * q with a float32 d (the block sums are not needed)."""
    b = _blocks(raw, shape, QK_K, 292)  # (rows, blocks, 292)
    d = b[..., :4].contiguous().view(torch.float32)  # (rows, blocks, 1)
    q = b[..., 4:260].contiguous().view(torch.int8).float()  # (rows, blocks, 256)
    return (d * q).reshape(shape)
