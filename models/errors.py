"""Errors raised by the model zoo; the service maps them to HTTP problems."""

from __future__ import annotations


class ModelError(Exception):
    """Base class for model-zoo errors."""


class UnknownModelError(ModelError, LookupError):
    """A model name that is not in the registry."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        super().__init__(f"unknown model {name!r}; known models: {', '.join(known)}")


class DuplicateModelError(ModelError):
    """A second registration under a name that is already taken."""


class ArchError(ModelError, ValueError):
    """An architecture override the model cannot take."""


class ShapeError(ModelError, ValueError):
    """An input shape the network cannot take; names the layer and the reason."""

    def __init__(self, layer: str, layer_type: str, reason: str) -> None:
        self.layer = layer
        self.layer_type = layer_type
        self.reason = reason
        super().__init__(f"layer {layer} ({layer_type}) cannot take this input: {reason}")
