"""The GGUF container without PyTorch: header, metadata and memory-mapped tensor bytes.

`parse_gguf` walks the header with `struct` (NOTE: `gguf.GGUFReader` builds a numpy view per
array element, ~4 s for a 49k-token vocabulary; this walk takes ~0.15 s and yields the same
values, checked against GGUFReader in the tests). It imports numpy and the `gguf` package's type
table only, so the torch-free edge runtime (ember.edge) reads files with it too;
`ember.loading.gguf` adds the checks and dequantization of the main path.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

if TYPE_CHECKING:
    import torch

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


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

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Return the tensor's values as a dense torch tensor of `shape` (exact, via the
        format table); dtype default float32."""
        import torch  # NOTE: lazy: only the main path dequantizes (the edge runtime never)

        from ember.formats import format_for

        values = format_for(self.qtype).dequantize(self.raw, self.shape)
        return values.to(torch.float32 if dtype is None else dtype)


class _Cursor:
    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> object:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = int(self.take("<Q"))  # type: ignore[call-overload]
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> object:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = int(self.take("<I")), int(self.take("<Q"))  # type: ignore[call-overload]
            if etype in _NUMPY:
                arr: np.ndarray = np.frombuffer(self.buf, _NUMPY[etype], count, self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            return [self.value(etype) for _ in range(count)]
        if vtype not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {vtype}")
        return self.take(_SCALARS[vtype])


def parse_gguf(path: Path) -> tuple[dict[str, object], list[GGUFTensor]]:
    """Metadata dict and tensor entries (raw data memory-mapped read-only)."""
    # NOTE: copy-on-write mapping: writable views for torch without copying the file
    data = np.memmap(path, dtype=np.uint8, mode="c")
    cur = _Cursor(memoryview(data))  # type: ignore[arg-type]
    if bytes(data[:4]) != b"GGUF":
        raise ValueError("bad magic (not a GGUF file)")
    cur.pos = 4
    version = int(cur.take("<I"))  # type: ignore[call-overload]
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = int(cur.take("<Q")), int(cur.take("<Q"))  # type: ignore[call-overload]
    meta: dict[str, object] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors,
                               "GGUF.kv_count": n_kv}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(int(cur.take("<I")))  # type: ignore[call-overload]
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = int(cur.take("<I"))  # type: ignore[call-overload]
        dims = [int(cur.take("<Q")) for _ in range(n_dims)]  # type: ignore[call-overload]
        qtype = GGMLQuantizationType(int(cur.take("<I")))  # type: ignore[call-overload]
        infos.append((name, dims, qtype, int(cur.take("<Q"))))  # type: ignore[call-overload]
    align = int(meta.get("general.alignment", 32))  # type: ignore[call-overload]
    start = (cur.pos + align - 1) // align * align
    return meta, [_entry(data, start, *info) for info in infos]


def _entry(data: np.ndarray, start: int, name: str, dims: list[int],
           qtype: GGMLQuantizationType, offset: int) -> GGUFTensor:
    block, type_size = GGML_QUANT_SIZES[qtype]
    shape = tuple(reversed(dims))
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    row_bytes = shape[-1] // block * type_size
    raw = data[start + offset:start + offset + rows * row_bytes]
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        typed = raw.view(np.float32 if qtype == GGMLQuantizationType.F32 else np.float16)
        return GGUFTensor(name, qtype, shape, typed.reshape(shape))
    if qtype == GGMLQuantizationType.BF16:
        return GGUFTensor(name, qtype, shape, raw.view(np.uint16).reshape(shape))
    return GGUFTensor(name, qtype, shape, raw.reshape(*shape[:-1], row_bytes))
