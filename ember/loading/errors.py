"""Errors raised while finding or loading a model (defined in `ember.errors`)."""

from ember.errors import ModelLoadError, ModelNotFoundError

__all__ = ["ModelLoadError", "ModelNotFoundError"]
