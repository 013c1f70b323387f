"""Sampling defaults recommended by the model, as vLLM's `--generation-config auto` does.

Sources, read once when the engine is built:
- an HF-style (or Ember checkpoint) folder: `generation_config.json`, keys temperature, top_p,
  top_k, min_p, repetition_penalty (like vLLM, `do_sample` is ignored: the values are used as
  given);
- a GGUF file: llama.cpp's metadata keys `general.sampling.temp`, `.top_k`, `.top_p`,
  `.min_p` and `.penalty_repeat`;
- a model that ships none of these gets Ember's fallback (temperature 0.7, top_p 0.9,
  repetition_penalty 1.1).
They fill only the fields a request leaves out: explicit values (temperature 0 included) win.
"""

from __future__ import annotations

import json
import logging
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.types import InvalidRequestError, SamplingParams

logger = logging.getLogger(__name__)

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
"""The SamplingParams fields a model may give defaults for."""
GENERATION_CONFIG_FILE = "generation_config.json"
GGUF_SAMPLING_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}
"""llama.cpp's GGUF metadata names (gguf.Keys.General.SAMPLING_*) -> SamplingParams fields."""
FALLBACK: dict[str, float | int] = {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1}
"""Defaults of a model that recommends none."""
NEUTRAL_MODES = ("none", "vllm")
"""`generation_config` values that turn model defaults off (SamplingParams' own defaults)."""


@dataclass(frozen=True)
class GenerationDefaults:
    """Default sampling values of a model; None leaves SamplingParams' own default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    source: str = "none"
    """Where they came from: 'generation_config.json', 'GGUF metadata', 'fallback' (the model
    recommends none) or 'none' (turned off: SamplingParams' own defaults)."""

    def values(self) -> dict[str, float | int]:
        """The fields this object sets (not None), by SamplingParams name."""
        return {k: getattr(self, k) for k in SAMPLING_KEYS if getattr(self, k) is not None}

    def describe(self) -> str:
        """One line for startup logs, e.g. 'generation defaults (fallback): temperature=0.7'."""
        values = " ".join(f"{k}={v:g}" for k, v in self.values().items())
        return f"generation defaults ({self.source}): {values or 'SamplingParams defaults'}"

    def merge(self, explicit: Mapping[str, Any]) -> dict[str, Any]:
        """The sampling fields to use: explicit values that are not None win, then these
        defaults; fields neither sets are left out (SamplingParams' defaults apply)."""
        merged: dict[str, Any] = dict(self.values())
        merged.update({k: v for k, v in explicit.items() if k in SAMPLING_KEYS
                       and v is not None})
        return merged

    def sampling_params(self, **fields: Any) -> SamplingParams:
        """SamplingParams of `fields` with these defaults for the sampling fields left out or
        None (other fields pass through unchanged, None included)."""
        sampling = {k: fields.pop(k) for k in SAMPLING_KEYS if k in fields}
        return SamplingParams(**self.merge(sampling), **fields)


def _coerce(name: str, value: object) -> float | int | None:
    """A metadata value as the field's type, or None (with a warning) when unusable."""
    if (not isinstance(value, numbers.Real) or isinstance(value, bool)
            or (name == "top_k" and not float(value).is_integer())):
        logger.warning("ignoring generation default %s=%r (not a valid number)", name, value)
        return None
    coerced = int(float(value)) if name == "top_k" else float(value)
    try:
        SamplingParams(**{name: coerced})  # type: ignore[arg-type]
    except InvalidRequestError as exc:
        logger.warning("ignoring generation default: %s", exc)
        return None
    return coerced


def _make(values: Mapping[str, float | int], source: str) -> GenerationDefaults:
    def real(name: str) -> float | None:
        value = values.get(name)
        return None if value is None else float(value)

    top_k = values.get("top_k")
    return GenerationDefaults(temperature=real("temperature"), top_p=real("top_p"),
                              top_k=None if top_k is None else int(top_k), min_p=real("min_p"),
                              repetition_penalty=real("repetition_penalty"), source=source)


def _build(raw: Mapping[str, object], source: str) -> GenerationDefaults | None:
    """Defaults from {field: raw value}; None when no field is usable."""
    fields = {name: _coerce(name, value) for name, value in raw.items()
              if name in SAMPLING_KEYS and value is not None}
    usable = {name: value for name, value in fields.items() if value is not None}
    return _make(usable, source) if usable else None


def from_generation_config(folder: Path) -> GenerationDefaults | None:
    """Defaults from `folder/generation_config.json`; None when absent or without any of
    the sampling keys (an unreadable file is logged and treated as absent)."""
    path = folder / GENERATION_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        logger.warning("ignoring %s: %s", path, exc)
        return None
    if not isinstance(data, dict):
        logger.warning("ignoring %s: not a JSON object", path)
        return None
    return _build(data, GENERATION_CONFIG_FILE)


def from_gguf_metadata(metadata: Mapping[str, object]) -> GenerationDefaults | None:
    """Defaults from a GGUF file's `general.sampling.*` metadata; None when it has none."""
    raw = {name: metadata[key] for key, name in GGUF_SAMPLING_KEYS.items() if key in metadata}
    # NOTE: GGUF stores these as float32 (0.7 reads back as 0.699999988): keep 7 digits.
    raw = {name: float(f"{value:.7g}") if isinstance(value, float) else value
           for name, value in raw.items()}
    return _build(raw, "GGUF metadata")


def fallback_defaults() -> GenerationDefaults:
    """Ember's defaults for a model that recommends none."""
    return _make(FALLBACK, "fallback")


def resolve_generation_defaults(mode: str, kind: str, path: Path,
                                gguf_metadata: Mapping[str, object] | None
                                ) -> GenerationDefaults:
    """The defaults for `ModelConfig.generation_config` = `mode` and the loaded model.

    mode: 'auto' (the model's: GGUF metadata or its folder's generation_config.json, else the
    fallback), 'none' / 'vllm' (none: SamplingParams' neutral defaults), or a folder whose
    generation_config.json is used. kind / path: the model source ('gguf', 'hf', 'ember').
    """
    if mode in NEUTRAL_MODES:
        return GenerationDefaults(source="none")
    if mode != "auto":
        found = from_generation_config(Path(mode))
        return found or GenerationDefaults(source=str(Path(mode) / GENERATION_CONFIG_FILE))
    found = None
    if kind == "gguf":
        found = from_gguf_metadata(gguf_metadata) if gguf_metadata is not None else None
    elif path.is_dir():
        found = from_generation_config(path)
    return found or fallback_defaults()
