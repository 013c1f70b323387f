"""Read Ember checkpoints (format in `ember.loading.ember_format`): metadata, tensors, tokenizer.

`open_checkpoint` reads everything strictly checked; `stored_weights` hands each tensor to the
loader as a StoredWeight: quantized tensors keep their codes (the int4 runtime format takes
<= 4-bit ones exactly) and dequantize only for layers that ask for dense values.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tokenizers
import torch

from ember.loading.ember_format import (CONFIG_FILE, DENSE_DTYPES, FORMAT_NAME, FORMAT_VERSION,
                                        QUANT_BITS, TOKENIZER_FILE, WEIGHTS_FILE, QuantizedTensor)
from ember.errors import ModelLoadError
from ember.formats.blocks import GROUP, Q4Blocks, Q4KBlocks, Q8Blocks
from ember.formats.stored import DenseWeight, StoredWeight
from ember.models.arch import ArchConfig
from ember.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

StoredTensor = torch.Tensor | QuantizedTensor


@dataclass
class EmberCheckpoint:
    """An opened checkpoint: what ember.json says about it and its stored tensors."""

    arch: ArchConfig
    tokenizer: Tokenizer
    metadata: dict[str, Any]
    weight_types: dict[str, int]
    """Stored tensor formats and counts, e.g. {'int4': 210, 'float32': 61}."""
    tensors: dict[str, StoredTensor] = field(default_factory=dict)
    """Parameter name -> the tensor as stored (quantized ones keep their codes)."""


def is_ember_checkpoint(path: Path) -> bool:
    """A directory with an ember.json."""
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def read_metadata(folder: Path) -> dict[str, Any]:
    """ember.json of `folder`, checked for format name and version."""
    path = folder / CONFIG_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ModelLoadError(f"{path}: not an Ember checkpoint (format != {FORMAT_NAME!r})")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelLoadError(f"{path}: format_version {version!r} is not supported "
                             f"(this Ember reads {FORMAT_VERSION})")
    for key in ("architecture", "tensors", "tokenizer"):
        if not isinstance(meta.get(key), dict):
            raise ModelLoadError(f"{path}: missing or invalid {key!r}")
    return meta


def arch_from_metadata(meta: dict[str, Any], source: str) -> ArchConfig:
    """ArchConfig from ember.json's "architecture" (every field written by the saver)."""
    fields = {f.name for f in dataclasses.fields(ArchConfig)}
    values = {k: v for k, v in meta["architecture"].items() if k in fields}
    try:
        return ArchConfig(**values)
    except TypeError as exc:
        raise ModelLoadError(f"{source}: invalid architecture in {CONFIG_FILE} ({exc})") from exc


def arch_to_metadata(arch: ArchConfig) -> dict[str, Any]:
    """Every ArchConfig field, JSON-ready."""
    return dataclasses.asdict(arch)


def read_tensors(folder: Path, meta: dict[str, Any]) -> dict[str, StoredTensor]:
    """Parameter name -> stored tensor (dense Tensor or QuantizedTensor), strictly checked
    against ember.json: every listed tensor present with its format's dtype and shape, and no
    safetensors entry left over."""
    from safetensors.torch import load_file

    path = folder / WEIGHTS_FILE
    try:
        raw = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for bad files
        raise ModelLoadError(f"{path}: cannot read safetensors ({exc})") from exc
    out: dict[str, StoredTensor] = {}
    for name, entry in meta["tensors"].items():
        try:
            out[name] = _stored_tensor(name, entry, raw)
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelLoadError(f"{path}: {exc}") from exc
    if raw:
        names = sorted(raw)
        more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
        raise ModelLoadError(f"{path}: tensors not described in {CONFIG_FILE}: "
                             f"{', '.join(names[:5])}{more}")
    return out


def _stored_tensor(name: str, entry: dict[str, Any], raw: dict[str, torch.Tensor]
                   ) -> StoredTensor:
    """Pop the entries of one parameter from `raw` and check them against its metadata."""
    fmt = entry.get("format")
    shape = tuple(int(d) for d in entry.get("shape", ()))
    if fmt in DENSE_DTYPES:
        if name not in raw:
            raise ValueError(f"tensor {name} is missing")
        tensor = raw.pop(name)
        if tensor.dtype != DENSE_DTYPES[fmt] or tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {name} is {tensor.dtype} {tuple(tensor.shape)}, ember.json "
                             f"says {fmt} {shape}")
        return tensor
    if fmt in QUANT_BITS:
        parts = {p: f"{name}.{p}" for p in ("qweight", "scales", "zeros")}
        missing = [key for key in parts.values() if key not in raw]
        if missing:
            raise ValueError(f"quantized tensor {name} lacks {', '.join(missing)}")
        if len(shape) != 2 or int(entry.get("bits", -1)) != QUANT_BITS[fmt]:
            raise ValueError(f"tensor {name}: bad shape/bits for format {fmt}")
        qt = QuantizedTensor(raw.pop(parts["qweight"]), raw.pop(parts["scales"]),
                             raw.pop(parts["zeros"]), QUANT_BITS[fmt], int(entry["group_size"]),
                             (shape[0], shape[1]), bool(entry.get("symmetric", False)))
        qt.validate(name)
        return qt
    raise ValueError(f"tensor {name} has unknown format {fmt!r}")


def tokenizer_from_metadata(folder: Path, meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer: tokenizer.json plus the special ids and chat template in ember.json."""
    info = meta["tokenizer"]
    path = folder / str(info.get("file", TOKENIZER_FILE))
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise ModelLoadError(f"{path}: cannot read tokenizer ({exc})") from exc

    def opt(key: str) -> int | None:
        value = info.get(key)
        return None if value is None else int(value)

    return Tokenizer(
        backend,
        bos_token_id=opt("bos_token_id"), eos_token_id=opt("eos_token_id"),
        pad_token_id=opt("pad_token_id"), unk_token_id=opt("unk_token_id"),
        extra_eos_token_ids=[int(i) for i in info.get("eos_token_ids") or []],
        chat_template=info.get("chat_template"),
        add_bos_token=bool(info.get("add_bos_token", False)),
        add_eos_token=bool(info.get("add_eos_token", False)))


@dataclass(frozen=True)
class GroupedWeight:
    """A checkpoint's quantized tensor as a StoredWeight: dense values in the model dtype, and
    its exact int4 form when it has <= 4 bits in groups of a multiple of 32 columns."""

    tensor: QuantizedTensor
    dtype: torch.dtype
    """The dtype dense values are produced in (the model's)."""

    @property
    def shape(self) -> tuple[int, ...]:
        return self.tensor.shape

    def dense(self) -> torch.Tensor:
        return self.tensor.dequantize(self.dtype)

    def q4(self) -> Q4Blocks | None:
        qt = self.tensor
        if qt.bits > 4 or qt.group_size % GROUP or qt.shape[1] % GROUP:
            return None
        return Q4Blocks.from_grouped(qt.codes(), qt.scales, qt.zeros, qt.group_size)

    def q8(self) -> Q8Blocks | None:
        return None

    def q4k(self) -> Q4KBlocks | None:
        return None


def open_checkpoint(folder: Path) -> EmberCheckpoint:
    """Read an Ember checkpoint's metadata, architecture, tokenizer and stored tensors, all
    strictly checked against ember.json."""
    where = str(folder)
    meta = read_metadata(folder)
    arch = arch_from_metadata(meta, where)
    stored = read_tensors(folder, meta)
    counts: dict[str, int] = {}
    for name in stored:
        fmt = meta["tensors"][name]["format"]
        counts[fmt] = counts.get(fmt, 0) + 1
    tokenizer = tokenizer_from_metadata(folder, meta)
    logger.info("read Ember checkpoint %s (%s)", where, counts)
    return EmberCheckpoint(arch, tokenizer, meta, counts, stored)


def stored_weights(ckpt: EmberCheckpoint, dtype: torch.dtype,
                   progress: Callable[[int, int], None] | None = None
                   ) -> Iterator[tuple[str, StoredWeight]]:
    """(parameter name, stored weight) of every tensor; quantized ones dequantize to `dtype`
    when a layer asks for dense values."""
    for i, (name, value) in enumerate(ckpt.tensors.items()):
        if isinstance(value, QuantizedTensor):
            yield name, GroupedWeight(value, dtype)
        else:
            yield name, DenseWeight(value)
        if progress is not None:
            progress(i + 1, len(ckpt.tensors))
