"""Errors raised while finding or loading a model."""


class ModelLoadError(RuntimeError):
    """A model file or directory cannot be used. The message is one line naming it."""


class ModelNotFoundError(ModelLoadError):
    """A model name or path does not resolve to anything local."""
