"""Open a model source (GGUF file, HF-style safetensors directory, Ember checkpoint) as a
`Checkpoint`: its architecture, tokenizer, own weight format, and its tensors under HF
parameter names as StoredWeights (GGUF quantized blocks and checkpoint codes stay packed until
a layer asks for dense values)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ember.errors import ModelLoadError
from ember.formats.repack import nearest_kernel_format
from ember.formats.table import format_for
from ember.formats.stored import BlockWeight, DenseWeight, StoredWeight
from ember.loading.gguf import GGUFFile, read_gguf
from ember.loading.sources import ModelSource
from ember.models.arch import ArchConfig
from ember.models.base import CausalLM
from ember.models.registry import get_model_class
from ember.tokenizer import Tokenizer

ProgressFn = Callable[[int, int], None]
"""progress(done, total) called while tensors load."""
Tensors = Callable[[torch.dtype, ProgressFn | None], Iterator[tuple[str, StoredWeight]]]
"""tensors(model dtype, progress) -> (HF parameter name, stored weight) pairs."""


@dataclass
class Checkpoint:
    """What the loader needs from one model source."""

    arch: ArchConfig
    model_cls: type[CausalLM]
    tokenizer: Tokenizer
    weight_types: dict[str, int]
    """Source tensor types and counts, e.g. {'Q4_1': 210, 'F32': 61} (for startup reports)."""
    source_format: str | None
    """The runtime format most of its matrices are stored in ('int4' / 'int8' / None)."""
    tensors: Tensors
    ignore: set[str] = field(default_factory=set)
    """Tensor names known and deliberately not loaded."""
    gguf: GGUFFile | None = None
    tensor_formats: dict[str, str] = field(default_factory=dict)
    """Per matrix (HF parameter name): the kernel format that holds its stored type exactly or
    nearest ('int4' / 'int8'; `formats.repack.nearest_kernel_format`); empty when the source
    has no per-tensor types (what the 'native' plan reads)."""


def open_source(source: ModelSource, cache_dir: Path) -> Checkpoint:
    """The checkpoint behind a resolved source."""
    if source.kind == "gguf":
        return _gguf(source, read_gguf(source.path), cache_dir)
    if source.kind == "ember":
        return _ember(source)
    return _hf_dir(source)


def _majority_format(formats: Iterable[str | None]) -> str | None:
    """The runtime format most of a source's matrices are stored in (None = dense)."""
    counts: dict[str | None, int] = {}
    for fmt in formats:
        counts[fmt] = counts.get(fmt, 0) + 1
    return max(counts, key=lambda k: counts[k]) if counts else None


def _gguf_format(gf: GGUFFile) -> str | None:
    """The runtime format of most layer matrices: 'int4' for 4-bit types (Q4_0/Q4_1/Q4_K:
    exact), 'int8' for 5..8-bit ones (Q8_0/Q5_0 exact, Q5_1/Q5_K/Q6_K requantized to Q8 g32),
    None for dense files. Gemma 3's Q4_K_M is mostly Q5_0, so it runs int8."""
    stored = {"Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4", "Q8_0": "int8", "Q5_0": "int8",
              "Q5_1": "int8", "Q5_K": "int8", "Q6_K": "int8"}
    return _majority_format(stored.get(t.type_name) for name, t in gf.tensors.items()
                            if name.startswith("blk.") and len(t.shape) == 2)


def _tokenizer_cache(path: Path, cache_dir: Path) -> Path:
    """Where the built tokenizer of GGUF file `path` is cached: keyed by the file (path, size,
    mtime) and by the code that builds it, so an edit to either rebuilds."""
    import ember.spm_tokenizer
    import ember.tokenizer

    stat = path.stat()
    h = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    for module in (ember.tokenizer, ember.spm_tokenizer):
        h.update(Path(str(module.__file__)).read_bytes())
    return cache_dir / "tokenizers" / f"{h.hexdigest()[:20]}.json"


def _gguf(source: ModelSource, gf: GGUFFile, cache_dir: Path) -> Checkpoint:
    where = str(source.path)
    arch = ArchConfig.from_gguf_metadata(gf.metadata, where)
    if "output.weight" in gf.tensors:
        arch = dataclasses.replace(arch, tie_word_embeddings=False)
    cls = get_model_class(arch.architecture, where)
    arch = cls.gguf_arch(arch, gf.metadata, set(gf.tensors))

    def tensors(dtype: torch.dtype, progress: ProgressFn | None
                ) -> Iterator[tuple[str, StoredWeight]]:
        total = len(gf.tensors)
        for i, (name, tensor) in enumerate(gf.tensors.items()):
            mapped = cls.map_gguf_name(name, arch)
            if mapped is None:
                yield name, DenseWeight(torch.empty(0))  # reported as unexpected
                continue
            yield mapped[0], BlockWeight(tensor.qtype, tensor.raw, tensor.shape, mapped[1])
            if progress is not None:
                progress(i + 1, total)

    tokenizer = Tokenizer.from_gguf_metadata(gf.metadata,
                                             _tokenizer_cache(source.path, cache_dir))
    return Checkpoint(arch, cls, tokenizer, gf.quant_summary(), _gguf_format(gf), tensors,
                      gguf=gf, tensor_formats=_gguf_tensor_formats(gf, cls, arch))


def head_names(arch: ArchConfig) -> frozenset[str]:
    """The parameter names the LM head is loaded from (the embedding's when tied)."""
    return frozenset({"lm_head.weight", "model.embed_tokens.weight"}
                     if arch.tie_word_embeddings else {"lm_head.weight"})


def _gguf_tensor_formats(gf: GGUFFile, cls: type[CausalLM], arch: ArchConfig
                         ) -> dict[str, str]:
    """HF parameter name -> nearest kernel format of every quantized matrix of the file."""
    formats: dict[str, str] = {}
    for name, tensor in gf.tensors.items():
        mapped = cls.map_gguf_name(name, arch)
        fmt = nearest_kernel_format(tensor.qtype) if len(tensor.shape) == 2 else None
        if mapped is not None and fmt is not None and mapped[0] in head_names(arch) \
                and format_for(tensor.qtype).head == "q6":
            fmt = "q6"  # NOTE: a Q6_K head runs exactly in its own kernel format
        if mapped is not None and fmt is not None:
            formats[mapped[0]] = fmt
    return formats


def _ember(source: ModelSource) -> Checkpoint:
    """An Ember checkpoint (written by `ember quantize / prune / distill`)."""
    from ember.loading.ember_checkpoint import open_checkpoint, stored_weights

    ckpt = open_checkpoint(source.path)
    stored = {"int3": "int4", "int4": "int4", "int8": "int8"}
    fmt = _majority_format(stored[e["format"]] for e in ckpt.metadata["tensors"].values()
                           if e.get("format") in stored)
    cls = get_model_class(ckpt.arch.architecture, str(source.path))
    return Checkpoint(ckpt.arch, cls, ckpt.tokenizer, ckpt.weight_types, fmt,
                      lambda dtype, progress: stored_weights(ckpt, dtype, progress))


def _hf_dir(source: ModelSource) -> Checkpoint:
    folder = source.path
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{folder / 'config.json'}: cannot read ({exc})") from exc
    arch = ArchConfig.from_hf_config(cfg, str(folder))
    cls = get_model_class(arch.architecture, str(folder))
    arch = cls.hf_arch(arch, cfg)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors files")
    if not (folder / "tokenizer.json").is_file():
        raise ModelLoadError(f"{folder}: no tokenizer.json")
    counts: dict[str, int] = {}

    def tensors(dtype: torch.dtype, progress: ProgressFn | None
                ) -> Iterator[tuple[str, StoredWeight]]:
        from safetensors import safe_open

        for i, path in enumerate(files):
            try:
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        t = f.get_tensor(name)
                        key = str(t.dtype).removeprefix("torch.")
                        counts[key] = counts.get(key, 0) + 1
                        yield name, DenseWeight(t)
            except ModelLoadError:
                raise
            except Exception as exc:
                raise ModelLoadError(f"{path}: cannot read safetensors ({exc})") from exc
            if progress is not None:
                progress(i + 1, len(files))

    return Checkpoint(arch, cls, Tokenizer.from_dir(Path(folder)), counts, None, tensors,
                      ignore=cls.expected_unused(arch))
