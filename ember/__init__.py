"""Ember: a Python inference stack for trained models."""

from typing import TYPE_CHECKING, Any

from ember.engine.inputs import TextPrompt, TokensPrompt
from ember.types import CompletionOutput, RequestOutput, SamplingParams

if TYPE_CHECKING:
    from ember.engine.llm import LLM

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "TextPrompt",
           "TokensPrompt"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # NOTE: LLM is imported lazily so `import ember.types` stays light (no torch model code).
    if name == "LLM":
        from ember.engine.llm import LLM
        return LLM
    raise AttributeError(f"module 'ember' has no attribute {name!r}")
