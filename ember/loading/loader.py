"""Build a ready model (weights + tokenizer + architecture) from a ModelConfig."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from ember.config import EnvSettings, ModelConfig
from ember.loading.errors import ModelLoadError
from ember.loading.gguf import GGUFFile, read_gguf
from ember.loading.sources import ModelSource, resolve_model
from ember.layers.linear import Linear
from ember.layers.quant import Int4Weights
from ember.loading.weights import load_strict
from ember.models.arch import ArchConfig
from ember.models.base import CausalLM
from ember.models.registry import get_model_class
from ember.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
"""progress(done, total) called while tensors load."""


@dataclass
class LoadedModel:
    """A model ready for the runner."""

    model: CausalLM
    arch: ArchConfig
    tokenizer: Tokenizer
    source: ModelSource
    dtype: torch.dtype
    weight_types: dict[str, int]
    """Source tensor types and counts, e.g. {'Q4_1': 210, 'F32': 61} (for startup reports)."""
    gguf: GGUFFile | None = None
    """The GGUF file (raw quantized blocks stay reachable for runtime weight formats)."""
    runtime_formats: dict[str, int] = dataclasses.field(default_factory=dict)
    """Linear formats after the engine's `apply_weight_format` (empty before)."""
    quantization: str | None = None
    """The runtime weight format to apply (ModelConfig.quantization with 'auto' resolved)."""
    int4_weights: dict[str, Int4Weights] = dataclasses.field(default_factory=dict)
    """Exact group-32 forms of weights a checkpoint stores with <= 4 bits (parameter name ->
    weights), for the int4 runtime format to use instead of re-quantizing."""


def load_model(config: ModelConfig, env: EnvSettings,
               progress: ProgressFn | None = None, use_kernels: bool = False) -> LoadedModel:
    """use_kernels: Ember's CPU kernels will run the model (quantized formats then keep
    float32 activations; PyTorch's int4/int8 ops need bfloat16)."""
    source = resolve_model(config.model, env.model_dirs, env.cache_path)
    gf = read_gguf(source.path) if source.kind == "gguf" else None
    quantization = config.quantization
    if quantization == "auto":
        quantization = (_source_format(gf) if gf is not None
                        else _checkpoint_format(source.path) if source.kind == "ember" else None)
    quantized = quantization is not None
    dtype = (torch.bfloat16 if config.dtype == "bfloat16" or (quantized and not use_kernels)
             else torch.float32)
    if gf is not None:
        loaded = _load_gguf(source, gf, dtype, progress, env.cache_path,
                            defer_q4=quantization == "int4")
    elif source.kind == "ember":
        loaded = _load_ember(source, dtype, progress)
    else:
        loaded = _load_hf_dir(source, dtype, progress)
    loaded.quantization = quantization
    if config.chat_template is not None:
        loaded.tokenizer = _with_template_file(loaded.tokenizer, Path(config.chat_template))
    return loaded


def _with_template_file(tokenizer: Tokenizer, path: Path) -> Tokenizer:
    """The tokenizer with the chat template of `path` (one-line error naming the file)."""
    try:
        return tokenizer.with_chat_template(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot use as a chat template ({exc})") from exc


def _majority_format(formats: Iterable[str | None]) -> str | None:
    """The runtime format most of a source's matrices are stored in (None = dense)."""
    counts: dict[str | None, int] = {}
    for fmt in formats:
        counts[fmt] = counts.get(fmt, 0) + 1
    return max(counts, key=lambda k: counts[k]) if counts else None


def _checkpoint_format(folder: Path) -> str | None:
    """'int4' / 'int8' when an Ember checkpoint stores its matrices mostly in <= 4 / 8 bits."""
    from ember.loading.ember_checkpoint import read_metadata

    stored = {"int3": "int4", "int4": "int4", "int8": "int8"}
    return _majority_format(stored[e["format"]]
                            for e in read_metadata(folder)["tensors"].values()
                            if e.get("format") in stored)


def _source_format(gf: GGUFFile) -> str | None:
    """'int4' / 'int8' when most layer matrices of the GGUF are Q4_0/Q4_1 / Q8_0, else None."""
    stored = {"Q4_0": "int4", "Q4_1": "int4", "Q8_0": "int8"}
    return _majority_format(stored.get(t.type_name) for name, t in gf.tensors.items()
                            if name.startswith("blk.") and len(t.shape) == 2)


def _load_ember(source: ModelSource, dtype: torch.dtype,
                progress: ProgressFn | None) -> LoadedModel:
    """An Ember checkpoint (written by `ember quantize / prune / distill`)."""
    from ember.loading import ember_checkpoint

    ckpt = ember_checkpoint.load(source.path, dtype,
                                 lambda arch: _build(arch, dtype, str(source.path)), progress)
    exact = {name: Int4Weights.from_grouped(qt.codes(), qt.scales, qt.zeros, qt.group_size)
             for name, qt in ckpt.quantized.items()
             if qt.bits <= 4 and qt.group_size % 32 == 0 and qt.shape[1] % 32 == 0}
    return LoadedModel(ckpt.model, ckpt.arch, ckpt.tokenizer, source, dtype, ckpt.weight_types,
                       int4_weights=exact)


def _build(arch: ArchConfig, dtype: torch.dtype, source: str) -> CausalLM:
    cls = get_model_class(arch.architecture, source)
    model = cls(arch, dtype)
    model.eval()
    return model


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


def _load_gguf(source: ModelSource, gf: GGUFFile, dtype: torch.dtype,
               progress: ProgressFn | None, cache_dir: Path,
               defer_q4: bool = False) -> LoadedModel:
    """defer_q4: leave Linear weights stored as Q4_0/Q4_1 unset (their shapes are checked):
    the int4 runtime format converts them from the file's blocks, never from dense values."""
    where = str(source.path)
    arch = ArchConfig.from_gguf_metadata(gf.metadata, where)
    if "output.weight" in gf.tensors:
        arch = dataclasses.replace(arch, tie_word_embeddings=False)
    arch = get_model_class(arch.architecture, where).gguf_arch(arch, gf.metadata,
                                                               set(gf.tensors))
    model = _build(arch, dtype, where)
    map_name = model.map_gguf_name
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Linear)}

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        total = len(gf.tensors)
        for i, (name, tensor) in enumerate(gf.tensors.items()):
            mapped = map_name(name, arch)
            if mapped is None:
                yield name, torch.empty(0)  # reported as unexpected by load_strict
                continue
            param_name, transform = mapped
            if defer_q4 and tensor.type_name in ("Q4_0", "Q4_1") \
                    and param_name in linear_weights:
                yield param_name, torch.empty(tensor.shape, device="meta")
                continue
            value = tensor.dequantize(torch.float32)
            if transform is not None:
                value = transform(value)
            yield param_name, value
            if progress is not None:
                progress(i + 1, total)

    load_strict(model, tensors(), where)
    tokenizer = Tokenizer.from_gguf_metadata(gf.metadata, _tokenizer_cache(source.path,
                                                                          cache_dir))
    return LoadedModel(model, arch, tokenizer, source, dtype, gf.quant_summary(), gf)


def _load_hf_dir(source: ModelSource, dtype: torch.dtype,
                 progress: ProgressFn | None) -> LoadedModel:
    from safetensors import safe_open

    folder = source.path
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{folder / 'config.json'}: cannot read ({exc})") from exc
    arch = ArchConfig.from_hf_config(cfg, str(folder))
    arch = get_model_class(arch.architecture, str(folder)).hf_arch(arch, cfg)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors files")
    model = _build(arch, dtype, str(folder))
    counts: dict[str, int] = {}

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for i, path in enumerate(files):
            try:
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        t = f.get_tensor(name)
                        key = str(t.dtype).removeprefix("torch.")
                        counts[key] = counts.get(key, 0) + 1
                        yield name, t
            except ModelLoadError:
                raise
            except Exception as exc:
                raise ModelLoadError(f"{path}: cannot read safetensors ({exc})") from exc
            if progress is not None:
                progress(i + 1, len(files))

    ignore = model.expected_unused(arch)
    load_strict(model, tensors(), str(folder), ignore=ignore)
    if not (folder / "tokenizer.json").is_file():
        raise ModelLoadError(f"{folder}: no tokenizer.json")
    tokenizer = Tokenizer.from_dir(Path(folder))
    return LoadedModel(model, arch, tokenizer, source, dtype, counts, None)
