"""Weight initialisation as the seed's `d2l.init_cnn`."""

from __future__ import annotations

from torch import nn


def init_cnn(module: nn.Module) -> None:
    """Xavier-uniform init on every Conv2d and Linear weight, as `d2l.init_cnn`."""
    if type(module) in (nn.Linear, nn.Conv2d):
        nn.init.xavier_uniform_(module.weight)  # type: ignore[arg-type]
