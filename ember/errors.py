"""Errors shared across Ember's layers (kept here so low layers need not import `loading`)."""


class ModelLoadError(RuntimeError):
    """A model file or directory cannot be used. The message is one line naming it."""


class ModelNotFoundError(ModelLoadError):
    """A model name or path does not resolve to anything local."""
