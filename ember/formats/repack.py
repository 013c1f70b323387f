"""GGUF blocks -> the two kernel weight formats, exactly where the math allows.

The CPU kernels run two group-32 formats (ember.formats.blocks, their one definition):
    Q4 (`Q4Blocks`): w = q * scale + offset, q in [0, 15]     (GGUF Q4_1's convention)
    Q8 (`Q8Blocks`): w = q * d, q in [-127, 127]              (GGUF Q8_0's convention)
Per GGUF type (the format table's `runs` says the same for reports):
    Q4_0, Q4_1, Q4_K  -> Q4, exact (Q4_K's 32-weight sub-blocks carry their own d*sc, dmin*m)
    Q8_0, Q5_0        -> Q8, exact (Q5_0's 5-bit codes minus 16 fit int8 with the same d)
    everything else   -> Q8 by round-to-nearest of the exact dequantized values: Q6_K has two
                         scales per 32 weights and Q5_1/Q5_K/Q2_K an offset that Q8 lacks, so
                         no exact repack exists; `requant_error` reports the cost.
No dense copy of an exactly repacked tensor is ever made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ember.formats import dequant
from ember.formats.blocks import GROUP, Q4Blocks, Q8Blocks
from ember.formats.table import format_for

__all__ = ["GROUP", "KernelBlocks", "Q4Blocks", "Q8Blocks", "exact_q4", "exact_q8", "is_exact",
           "DECODE_FORMATS", "head_requant_error", "native_format", "nearest_kernel_format", "requant_error", "to_kernel_blocks"]

KernelBlocks = Q4Blocks | Q8Blocks



def _matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) != 2:
        raise ValueError(f"kernel formats hold matrices, got shape {shape}")
    return shape[0], shape[1]


def _q4_legacy(raw: np.ndarray, shape: tuple[int, ...], with_min: bool) -> Q4Blocks:
    _matrix(shape)
    return Q4Blocks.from_q4_1(raw, shape) if with_min else Q4Blocks.from_q4_0(raw, shape)


def _q4_k(raw: np.ndarray, shape: tuple[int, ...]) -> Q4Blocks:
    n, k = _matrix(shape)
    q, ds, dm = dequant.q4_k_parts(raw, shape)  # (N, blocks, 8, 32), (N, blocks, 8, 1) x 2
    return Q4Blocks(q.reshape(n, k), ds.reshape(n, k // GROUP), -dm.reshape(n, k // GROUP))


def _q8_0(raw: np.ndarray, shape: tuple[int, ...]) -> Q8Blocks:
    _matrix(shape)
    return Q8Blocks.from_q8_0(raw, shape)


def _q5_0(raw: np.ndarray, shape: tuple[int, ...]) -> Q8Blocks:
    n, k = _matrix(shape)
    q, d = dequant.q5_0_parts(raw, shape)  # (N, groups, 32), (N, groups, 1)
    return Q8Blocks(q.reshape(n, k), d.reshape(n, k // GROUP))


Repacker = Callable[[np.ndarray, tuple[int, ...]], KernelBlocks]
_EXACT: Mapping[T, Repacker] = MappingProxyType({
    T.Q4_0: lambda raw, shape: _q4_legacy(raw, shape, with_min=False),
    T.Q4_1: lambda raw, shape: _q4_legacy(raw, shape, with_min=True),
    T.Q4_K: _q4_k,
    T.Q8_0: _q8_0,
    T.Q5_0: _q5_0,
})



def exact_q4(qtype: T, raw: np.ndarray, shape: tuple[int, ...]) -> Q4Blocks | None:
    """The exact Q4 form of a GGUF matrix (Q4_0, Q4_1, Q4_K), else None."""
    blocks = _EXACT[qtype](raw, shape) if qtype in _EXACT and len(shape) == 2 else None
    return blocks if isinstance(blocks, Q4Blocks) else None


def exact_q8(qtype: T, raw: np.ndarray, shape: tuple[int, ...]) -> Q8Blocks | None:
    """The exact Q8 form of a GGUF matrix (Q8_0, Q5_0), else None."""
    blocks = _EXACT[qtype](raw, shape) if qtype in _EXACT and len(shape) == 2 else None
    return blocks if isinstance(blocks, Q8Blocks) else None


def requantized(tensors: Iterable[tuple[str, T, np.ndarray, tuple[int, ...]]], weights: str,
                measure: bool = False) -> str | None:
    """One line naming the layer matrices of a GGUF that the kernel format `weights` ('int4'
    -> Q4 g32, 'int8' -> Q8 g32, 'native' / 'native-q4q8' -> each type's `native_format`) cannot hold
    exactly, per type with their count and, with `measure`, the largest relative RMS error of
    the round-to-nearest; None when all are exact. Matrices outside the layers (embedding,
    head) are Q8 in every format."""
    counts: dict[tuple[str, str], int] = {}
    worst: dict[tuple[str, str], float] = {}
    for name, qtype, raw, shape in tensors:
        if not name.startswith("blk.") or len(shape) != 2:
            continue
        fmt = (native_format(qtype, weights == "native") or "int8") \
            if weights in ("native", "native-q4q8") else weights
        exact = exact_q4 if fmt in ("int4", "int4k") else exact_q8
        if fmt == "int6" or exact(qtype, raw, shape) is not None:
            # NOTE: 'int6' is given to Q6_K only, which it holds exactly (a Q6_K part fused
            # with another type runs Q8 by round-to-nearest: not counted here)
            continue
        key = (qtype.name, "q4-g32" if fmt in ("int4", "int4k") else "q8-g32")
        counts[key] = counts.get(key, 0) + 1
        if measure:
            values = format_for(qtype).dequantize(raw, shape)
            quantize = Q4Blocks.quantize if fmt == "int4" else Q8Blocks.quantize
            err = _relative_error(quantize(values), values)
            worst[key] = max(worst.get(key, 0.0), err)
    if not counts:
        return None
    parts = [f"{n} x{c} to {kind}" + (f" (max rel. error {worst[n, kind]:.2%})"
                                      if (n, kind) in worst else "")
             for (n, kind), c in sorted(counts.items())]
    return f"requantized by round-to-nearest: {', '.join(parts)}"


_INT4_TYPES = frozenset({T.Q4_0, T.Q4_1, T.Q4_K})
_DENSE_TYPES = frozenset({T.F32, T.F16, T.BF16})


def nearest_kernel_format(qtype: T) -> str | None:
    """The kernel format that holds a quantized GGUF type exactly or nearest: 'int4' (Q4 g32:
    Q4_0, Q4_1 exactly), 'int4k' (Q4K: Q4_K exactly, its own 6-bit scales; 'int4' off the
    kernels), 'int5' (Q5 g32: Q5_0 exactly), 'int6' (Q6: Q6_K exactly) or 'int8' (Q8 g32: Q8_0
    exactly;
    Q5_1, Q6_K, the other K-quants by round-to-nearest, a finer grid than Q4); None for dense
    types."""
    if qtype in _DENSE_TYPES:
        return None
    if qtype == T.Q6_K:
        return "int6"  # NOTE: its own exact kernel format (the Q6 layout); 'int8' off the kernels
    if qtype == T.Q4_K:
        return "int4k"  # NOTE: its own exact kernel format (Q4K: the file's 6-bit scales)
    if qtype == T.Q5_0:
        return "int5"  # NOTE: its own exact kernel format (Q5 g32); 'int8' off the kernels
    return "int4" if qtype in _INT4_TYPES else "int8"


DECODE_FORMATS: Mapping[str, str] = MappingProxyType({"int4k": "int4", "int6": "int8"})
"""The layer formats the 'native-q4q8' plan runs in place of the exact Q4K / Q6 layouts (the
formats before them, kept for the A/B): Q4_K's Q4K -> Q4 g32 (exact as well: d sc and dmin m
in float32, 24 bytes per 32 weights against 19), Q6_K's Q6 -> Q8 g32 (round-to-nearest, the
error reported at load). The 'native' plans keep the exact layouts: measured no slower to
decode on AVX2 (README, "Layer formats of the native plan: the A/B")."""


def native_format(qtype: T, exact_layouts: bool) -> str | None:
    """The kernel format a native plan runs a GGUF type in: `nearest_kernel_format`, with
    `DECODE_FORMATS` applied unless `exact_layouts` (False: 'native-q4q8')."""
    fmt = nearest_kernel_format(qtype)
    return fmt if exact_layouts or fmt is None else DECODE_FORMATS.get(fmt, fmt)


def is_exact(qtype: T) -> bool:
    """Whether tensors of this type can reach a kernel format without rounding (Q6_K: the Q6
    layout, which native plans give it; 'native-q4q8' and int8 plans round it to Q8)."""
    return qtype in _EXACT or qtype == T.Q6_K


def to_kernel_blocks(qtype: T, raw: np.ndarray, shape: tuple[int, ...]) -> KernelBlocks:
    """The kernel-format blocks of a GGUF matrix: exact where `is_exact`, else Q8 by
    round-to-nearest of its exact dequantized values."""
    repack = _EXACT.get(qtype)
    if repack is not None:
        return repack(raw, shape)
    return Q8Blocks.quantize(format_for(qtype).dequantize(raw, shape))


def requant_error(qtype: T, raw: np.ndarray, shape: tuple[int, ...],
                  blocks: KernelBlocks) -> float:
    """Relative RMS error ||W' - W|| / ||W|| of `blocks` against the file's exact values."""
    return _relative_error(blocks, format_for(qtype).dequantize(raw, shape))


def _relative_error(blocks: KernelBlocks, exact: torch.Tensor) -> float:
    return float((blocks.dequantize() - exact).norm() / exact.norm().clamp_min(1e-30))


def head_requant_error(qtype: T, raw: np.ndarray, shape: tuple[int, ...],
                       rows: int = 16384) -> float:
    """Relative RMS error of the opt-in Q4 head: a GGUF matrix's exact values against their
    round-to-nearest Q4 g32 blocks (measured `rows` rows at a time: a 262k-row head)."""
    n = shape[0]
    err2 = ref2 = 0.0
    for start in range(0, n, rows):
        part = raw[start:start + rows]
        exact = format_for(qtype).dequantize(part, (part.shape[0], *shape[1:]))
        err2 += float((Q4Blocks.quantize(exact).dequantize() - exact).square().sum())
        ref2 += float(exact.square().sum())
    return (err2 / max(ref2, 1e-30)) ** 0.5
