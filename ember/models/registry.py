"""Architecture name -> model class. A new architecture is one file plus one line here."""

from __future__ import annotations

from ember.errors import ModelLoadError
from ember.models.base import CausalLM
from ember.models.gemma3 import Gemma3ForCausalLM
from ember.models.llama import LlamaForCausalLM
from ember.models.phi3 import Phi3ForCausalLM
from ember.models.qwen import Qwen2ForCausalLM, Qwen3ForCausalLM

_REGISTRY: dict[str, type[CausalLM]] = {
    "gemma3": Gemma3ForCausalLM,
    "gemma3_text": Gemma3ForCausalLM,
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,  # Llama with a sliding window (ArchConfig.sliding_window)
    "phi3": Phi3ForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
}


def get_model_class(architecture: str, source: str) -> type[CausalLM]:
    try:
        return _REGISTRY[architecture]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ModelLoadError(
            f"{source}: architecture {architecture!r} is not supported (known: {known})") from None
