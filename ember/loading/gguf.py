"""Read GGUF files with the `gguf` library: metadata, tensors and their quantization types.

Raw quantized blocks stay reachable (`GGUFTensor.raw`, memory-mapped) so runtime weight formats
(e.g. int4 packing of Q4_0/Q4_1) can be built from them without a dequantize round trip.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf import quants as gguf_quants

from ember.loading.errors import ModelLoadError

logger = logging.getLogger(__name__)

SUPPORTED_TYPES = frozenset({
    GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q6_K,
    GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q8_K,
    GGMLQuantizationType.Q2_K, GGMLQuantizationType.Q3_K,
})


@dataclass
class GGUFTensor:
    """One tensor of a GGUF file.

    `shape` is in PyTorch order (rows, cols): GGUF stores dims innermost first, so a GGUF
    [576, 1536] tensor is a (1536, 576) matrix here. `raw` is the file's bytes for it
    (memory-mapped, uint8 (rows, bytes_per_row) for block types, typed array otherwise).
    """

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    raw: np.ndarray

    @property
    def type_name(self) -> str:
        return self.qtype.name

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Return the tensor's values as a dense torch tensor of `shape`."""
        if self.qtype == GGMLQuantizationType.F32:
            values = np.asarray(self.raw, dtype=np.float32)
        elif self.qtype == GGMLQuantizationType.F16:
            values = np.asarray(self.raw, dtype=np.float16)
        elif self.qtype == GGMLQuantizationType.BF16:
            bits = np.ascontiguousarray(self.raw).view(np.int16)
            return torch.from_numpy(bits.copy()).view(torch.bfloat16).reshape(self.shape).to(dtype)
        else:
            values = gguf_quants.dequantize(self.raw, self.qtype)
        if not values.flags.writeable:
            values = values.copy()  # the file is mapped read-only; torch wants writable memory
        return torch.from_numpy(np.ascontiguousarray(values)).reshape(self.shape).to(dtype)


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
        reader = GGUFReader(path, "r")
    except Exception as exc:  # the gguf library raises ValueError/struct errors on bad files
        raise ModelLoadError(f"{path}: not a readable GGUF file ({exc})") from exc
    metadata: dict[str, object] = {}
    for key, field in reader.fields.items():
        try:
            metadata[key] = field.contents()
        except Exception as exc:
            raise ModelLoadError(f"{path}: bad metadata field {key!r} ({exc})") from exc
    tensors: dict[str, GGUFTensor] = {}
    for t in reader.tensors:
        if t.tensor_type not in SUPPORTED_TYPES:
            raise ModelLoadError(
                f"{path}: tensor {t.name} has unsupported type {t.tensor_type.name}")
        # NOTE: GGUF lists dims innermost first; reverse to (rows, cols).
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        tensors[t.name] = GGUFTensor(t.name, t.tensor_type, shape, t.data)
    logger.info("read %s: %d tensors %s", path, len(tensors), _type_counts(tensors))
    return GGUFFile(path=path, metadata=metadata, tensors=tensors)


def _type_counts(tensors: dict[str, GGUFTensor]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for tensor in tensors.values():
        counts[tensor.type_name] = counts.get(tensor.type_name, 0) + 1
    return counts
