"""Read GGUF files: metadata, tensors and their quantization types.

The `gguf` library supplies the type enum and block sizes; dequantization dispatches through
Ember's format table (`ember.formats`). NOTE: the header is parsed here
with `struct` because `gguf.GGUFReader` builds a numpy view per array element, ~4 s for a
49k-token vocabulary (most of a cold start); this walk takes ~0.15 s and yields the same values
(checked against GGUFReader in the tests).

Raw quantized blocks stay reachable (`GGUFTensor.raw`, memory-mapped) so runtime weight formats
(e.g. int4 packing of Q4_0/Q4_1) can be built from them without a dequantize round trip.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ember.formats import SUPPORTED_GGUF_TYPES
from ember.loading.errors import ModelLoadError
from ember.loading.gguf_header import GGUFTensor, _Cursor, _entry, parse_gguf

__all__ = ["GGUFFile", "GGUFTensor", "SUPPORTED_TYPES", "_Cursor", "_entry", "parse_gguf",
           "read_gguf"]

logger = logging.getLogger(__name__)

SUPPORTED_TYPES = SUPPORTED_GGUF_TYPES
"""GGUF tensor types `read_gguf` accepts (the format table's)."""


@dataclass
class GGUFFile:
    """Metadata and tensors of one GGUF file."""

    path: Path
    metadata: dict[str, object]
    tensors: dict[str, GGUFTensor]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def quant_summary(self) -> dict[str, int]:
        """Count of tensors per quantization type (for startup reports)."""
        return _type_counts(self.tensors)


def read_gguf(path: str | Path) -> GGUFFile:
    """Open a GGUF file; raise ModelLoadError with one line naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    try:
        metadata, entries = parse_gguf(path)
    except Exception as exc:  # struct / value errors on truncated or foreign files
        raise ModelLoadError(f"{path}: not a readable GGUF file ({exc})") from exc
    tensors: dict[str, GGUFTensor] = {}
    for e in entries:
        if e.qtype not in SUPPORTED_TYPES:
            raise ModelLoadError(f"{path}: tensor {e.name} has unsupported type {e.qtype.name}")
        tensors[e.name] = GGUFTensor(e.name, e.qtype, e.shape, e.raw)
    logger.info("read %s: %d tensors %s", path, len(tensors), _type_counts(tensors))
    return GGUFFile(path=path, metadata=metadata, tensors=tensors)


def _type_counts(tensors: dict[str, GGUFTensor]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for tensor in tensors.values():
        counts[tensor.type_name] = counts.get(tensor.type_name, 0) + 1
    return counts
