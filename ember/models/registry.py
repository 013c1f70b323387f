"""Architecture name -> model class. A new architecture is one file plus one line here."""

from __future__ import annotations

from ember.errors import ModelLoadError
from ember.models.base import CausalLM
from ember.models.bert import BertModel
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


_ENCODERS: dict[str, type[BertModel]] = {"bert": BertModel}
"""config.json model_type -> encoder (embedding) model class."""


def get_encoder_class(model_type: str, source: str) -> type[BertModel]:
    try:
        return _ENCODERS[model_type]
    except KeyError:
        raise ModelLoadError(f"{source}: encoder model_type {model_type!r} is not supported "
                             f"(known: {', '.join(sorted(_ENCODERS))})") from None


def is_encoder(model_type: object) -> bool:
    """Whether config.json's model_type names an encoder (embedding) architecture."""
    return model_type in _ENCODERS
