"""Write Ember checkpoints (model.safetensors + ember.json + tokenizer.json).

The on-disk format, including the quantized tensor storage, is specified in
`ember.loading.ember_format`; reading lives in `ember.loading.ember_checkpoint` (the runtime only
reads, the compression tools only write).
"""

from __future__ import annotations

import datetime
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ember.loading.ember_checkpoint import arch_to_metadata, read_metadata
from ember.loading.ember_format import (CONFIG_FILE, FORMAT_NAME, FORMAT_VERSION,
                                        TOKENIZER_FILE, WEIGHTS_FILE, QuantizedTensor)
from ember.loading.loader import LoadedModel
from ember.models.arch import ArchConfig
from ember.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class Compression:
    """What was done to the weights (ember.json "compression")."""

    method: str
    settings: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)
    """Measured facts about the result (e.g. achieved sparsity, dropped layers)."""
    calibration: list[dict[str, str]] = field(default_factory=list)
    """Files used to calibrate / train, with their sha256."""


def tokenizer_metadata(tok: Tokenizer) -> dict[str, Any]:
    """Special ids, chat template and BOS/EOS policy of a tokenizer (ember.json "tokenizer")."""
    probe = "a"
    with_special = tok.encode(probe, add_special_tokens=True)
    backend_ids = tok.backend.encode(probe, add_special_tokens=True).ids
    # NOTE: Tokenizer adds BOS/EOS itself on top of the backend's post-processor; detect it.
    add_bos = (tok.bos_token_id is not None and len(with_special) > len(backend_ids)
               and with_special[0] == tok.bos_token_id and backend_ids[:1] != [tok.bos_token_id])
    add_eos = (tok.eos_token_id is not None and len(with_special) > len(backend_ids)
               and with_special[-1] == tok.eos_token_id)
    return {"file": TOKENIZER_FILE, "chat_template": tok.chat_template,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "eos_token_ids": sorted(tok.eos_token_ids), "pad_token_id": tok.pad_token_id,
            "unk_token_id": tok.unk_token_id, "add_bos_token": add_bos, "add_eos_token": add_eos}


def source_metadata(loaded: LoadedModel) -> dict[str, Any]:
    """Where the compressed model came from (and, for an Ember checkpoint, its history)."""
    src = loaded.source
    meta: dict[str, Any] = {"model": src.name, "path": str(src.path), "kind": src.kind,
                            "origin": src.origin}
    if src.kind == "ember":
        previous = read_metadata(src.path)
        meta["compression"] = previous.get("compression")
        meta["source"] = previous.get("source")
    return meta


def _dense_tensors(model: nn.Module, arch: ArchConfig, skip: set[str],
                   dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Parameters not quantized, as stored (tied lm_head written once, as the embedding)."""
    out = {}
    for name, param in model.named_parameters():  # tied parameters appear once
        if name in skip:
            continue
        value = param.detach()
        if dtype is not None and value.is_floating_point() and value.dim() >= 2:
            value = value.to(dtype)
        out[name] = value.contiguous().clone()
    return out


def save_checkpoint(out_dir: str | Path, loaded: LoadedModel, compression: Compression, *,
                    quantized: dict[str, QuantizedTensor] | None = None,
                    tensor_info: dict[str, dict[str, Any]] | None = None,
                    model: nn.Module | None = None, arch: ArchConfig | None = None,
                    dense_dtype: torch.dtype | None = None) -> Path:
    """Write OUT/ from a (compressed) model.

    Args:
        loaded: the source model as loaded (its tokenizer and provenance are reused).
        compression: method, settings, measured summary and calibration files.
        quantized: parameter name -> QuantizedTensor, stored in place of the dense parameter.
        tensor_info: extra ember.json fields per parameter (e.g. sparsity of a pruned weight).
        model / arch: a model with different shapes than `loaded` (structured pruning, distill).
        dense_dtype: cast dense matrices to this dtype (vectors stay as they are).
    """
    from safetensors.torch import save_file

    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    model = model if model is not None else loaded.model
    arch = arch if arch is not None else loaded.arch
    quantized = quantized or {}
    tensors: dict[str, torch.Tensor] = {}
    formats: dict[str, dict[str, Any]] = {}
    for name, value in _dense_tensors(model, arch, set(quantized), dense_dtype).items():
        tensors[name] = value
        formats[name] = {"format": str(value.dtype).removeprefix("torch."),
                         "shape": list(value.shape)}
    for name, qt in quantized.items():
        tensors.update(qt.storage(name))
        formats[name] = qt.metadata()
    for name, info in (tensor_info or {}).items():
        formats[name].update(info)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
    (out / TOKENIZER_FILE).write_text(loaded.tokenizer.backend.to_str(), encoding="utf-8")
    meta = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "architecture": arch_to_metadata(arch),
        "tensors": formats,
        "tokenizer": tokenizer_metadata(loaded.tokenizer),
        "compression": {"method": compression.method, "settings": compression.settings,
                        "summary": compression.summary},
        "calibration": compression.calibration,
        "source": source_metadata(loaded),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "ember_version": _version(),
    }
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    logger.info("wrote Ember checkpoint %s (%d tensors)", out, len(formats))
    return out


def _version() -> str:
    from ember import __version__
    return __version__


def checkpoint_bytes(folder: Path) -> int:
    """Bytes on disk of a checkpoint directory (all files)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
