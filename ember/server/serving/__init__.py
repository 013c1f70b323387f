"""OpenAI semantics of the server: one class per endpoint group, on a shared ServingContext."""

from __future__ import annotations

from dataclasses import dataclass

from ember.server.serving.base import ServingContext
from ember.server.serving.chat import ChatServing
from ember.server.serving.completions import CompletionServing
from ember.server.serving.tokenize import TokenizeServing


@dataclass
class Servings:
    """The serving objects of a loaded model."""

    ctx: ServingContext
    completions: CompletionServing
    chat: ChatServing
    tokenize: TokenizeServing

    @classmethod
    def create(cls, ctx: ServingContext) -> Servings:
        return cls(ctx, CompletionServing(ctx), ChatServing(ctx), TokenizeServing(ctx))


__all__ = ["ServingContext", "Servings"]
