"""Architecture name -> model class. A new architecture is one file plus one line here."""

from __future__ import annotations

from torch import nn

from ember.loading.errors import ModelLoadError
from ember.models.llama import LlamaForCausalLM

_REGISTRY: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
}


def get_model_class(architecture: str, source: str) -> type[nn.Module]:
    try:
        return _REGISTRY[architecture]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ModelLoadError(
            f"{source}: architecture {architecture!r} is not supported (known: {known})") from None
