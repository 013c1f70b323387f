"""The weight format table: one immutable entry per weight format Ember reads.

In the spirit of ggml's per-type traits: each `FormatSpec` gives a format's block geometry, its
exact reference dequantizer and how it runs at inference. Loading dispatches through this table
(`format_for(qtype).dequantize`), so adding a format means adding one entry here.

The block geometry is written out (as in ggml's `type_traits`) rather than read from the `gguf`
package; the tests check it against `gguf.GGML_QUANT_SIZES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ember.formats import dequant

Dequantizer = Callable[[np.ndarray, tuple[int, ...]], torch.Tensor]
"""(raw bytes or typed array, logical shape) -> float32 tensor of that shape."""

RUNS_DENSE = "dense (vectors); as a matrix: requantized to Q8 g32 when the model runs quantized"
RUNS_INT4_REPACK = "exact repack into Q4 g32 (kernel format)"
RUNS_Q8 = "exact repack into Q8 g32 (kernel format)"
RUNS_Q5 = ("exact repack into Q5 g32 (kernel format, the file's 22 bytes per 32 weights); Q8 g32 "
           "where a "
           "fused projection mixes it with another type")
RUNS_Q4K = ("exact repack into Q4K (kernel format: the file's 6-bit sub-block scales and mins, "
            "19 bytes per 32 weights, the file's 18); Q4 g32 where a fused projection mixes it "
            "with another 4-bit type")
RUNS_Q6 = ("exact repack into Q6 (kernel format: the file's codes, sub-scales and super-block d, "
           "6.56 bits a weight); Q8 g32 by round-to-nearest where a fused projection mixes it "
           "with another type (error reported at load)")
RUNS_DEQUANT = "requantized to Q8 g32 by round-to-nearest (error reported at load)"


@dataclass(frozen=True)
class FormatSpec:
    """One weight format.

    name: the format's name (GGUF type name for GGUF formats, e.g. "Q4_K").
    qtype: its GGUF type, or None for Ember's own formats.
    block_size: weights per block (1 for the dense types).
    type_size: bytes per block.
    dequantize: exact reference dequantizer, (raw, shape) -> float32 tensor of `shape`; `raw`
        is the uint8 (rows, row_bytes) block data, or a typed array for the dense types.
    runs: how the format runs at inference, for reports.
    """

    name: str
    qtype: T | None
    block_size: int
    type_size: int
    dequantize: Dequantizer
    runs: str
    head: str = "q8"
    """The kernel format a matrix of this type runs as the LM head: 'q6' (Q6_K, exact:
    ember.formats.q6) or 'q8' (Q8 g32: exact for Q8_0 / Q5_0, else requantized)."""

    @property
    def bits_per_weight(self) -> float:
        """Storage cost per weight, scales included."""
        return 8 * self.type_size / self.block_size


_SPECS = (
    FormatSpec("F32", T.F32, 1, 4, dequant.dequant_f32, RUNS_DENSE),
    FormatSpec("F16", T.F16, 1, 2, dequant.dequant_f16, RUNS_DENSE),
    FormatSpec("BF16", T.BF16, 1, 2, dequant.dequant_bf16, RUNS_DENSE),
    FormatSpec("Q8_0", T.Q8_0, 32, 34, dequant.dequant_q8_0, RUNS_Q8),
    FormatSpec("Q4_0", T.Q4_0, 32, 18, dequant.dequant_q4_0, RUNS_INT4_REPACK),
    FormatSpec("Q4_1", T.Q4_1, 32, 20, dequant.dequant_q4_1, RUNS_INT4_REPACK),
    FormatSpec("Q5_0", T.Q5_0, 32, 22, dequant.dequant_q5_0, RUNS_Q5),
    FormatSpec("Q5_1", T.Q5_1, 32, 24, dequant.dequant_q5_1, RUNS_DEQUANT),
    FormatSpec("Q2_K", T.Q2_K, 256, 84, dequant.dequant_q2_k, RUNS_DEQUANT),
    FormatSpec("Q3_K", T.Q3_K, 256, 110, dequant.dequant_q3_k, RUNS_DEQUANT),
    FormatSpec("Q4_K", T.Q4_K, 256, 144, dequant.dequant_q4_k, RUNS_Q4K),
    FormatSpec("Q5_K", T.Q5_K, 256, 176, dequant.dequant_q5_k, RUNS_DEQUANT),
    FormatSpec("Q6_K", T.Q6_K, 256, 210, dequant.dequant_q6_k, RUNS_Q6, head="q6"),
    FormatSpec("Q8_K", T.Q8_K, 256, 292, dequant.dequant_q8_k, RUNS_DEQUANT),
)

FORMATS: Mapping[str, FormatSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})
"""Every format by name (read-only)."""

_BY_QTYPE: Mapping[T, FormatSpec] = MappingProxyType(
    {spec.qtype: spec for spec in _SPECS if spec.qtype is not None})

SUPPORTED_GGUF_TYPES: frozenset[T] = frozenset(_BY_QTYPE)
"""GGUF tensor types Ember can load."""


def format_for(qtype: T) -> FormatSpec:
    """The table entry of a GGUF tensor type; KeyError naming the type if Ember lacks it."""
    spec = _BY_QTYPE.get(qtype)
    if spec is None:
        name = getattr(qtype, "name", str(qtype))
        supported = ", ".join(s.name for s in _SPECS if s.qtype is not None)
        raise KeyError(f"unsupported GGUF tensor type {name} (supported: {supported})")
    return spec
