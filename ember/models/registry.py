"""Architecture name -> model class. A new architecture is one file plus one line here."""

from __future__ import annotations

from ember.loading.errors import ModelLoadError
from ember.models.base import CausalLM
from ember.models.llama import LlamaForCausalLM

_REGISTRY: dict[str, type[CausalLM]] = {
    "llama": LlamaForCausalLM,
}


def get_model_class(architecture: str, source: str) -> type[CausalLM]:
    try:
        return _REGISTRY[architecture]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ModelLoadError(
            f"{source}: architecture {architecture!r} is not supported (known: {known})") from None
