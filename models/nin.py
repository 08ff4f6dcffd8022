"""Network in Network as the book builds it (D2L 8.3): `nin_block`s, no dense layers."""

from __future__ import annotations

import torch
from torch import nn

from models.init import init_cnn


def nin_block(
    out_channels: int, kernel_size: int, strides: int, padding: int, *, in_channels: int
) -> nn.Sequential:
    """One convolution and two 1×1 convolutions, each followed by a ReLU, as D2L's `nin_block`."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, strides, padding),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, kernel_size=1),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, kernel_size=1),
        nn.ReLU(),
    )


class NiN(nn.Module):
    """AlexNet's convolution shapes as NiN blocks; the last block has one channel per class and
    global average pooling turns it into the class scores.

    Section 8.3 trains it after `apply_init(..., d2l.init_cnn)`: Xavier-uniform weights.
    """

    def __init__(self, *, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nin_block(96, kernel_size=11, strides=4, padding=0, in_channels=in_channels),
            nn.MaxPool2d(3, stride=2),
            nin_block(256, kernel_size=5, strides=1, padding=2, in_channels=96),
            nn.MaxPool2d(3, stride=2),
            nin_block(384, kernel_size=3, strides=1, padding=1, in_channels=256),
            nn.MaxPool2d(3, stride=2),
            nn.Dropout(0.5),
            nin_block(num_classes, kernel_size=3, strides=1, padding=1, in_channels=384),
            nn.AdaptiveAvgPool2d((1, 1)),
            nn.Flatten(),
        )
        self.net.apply(init_cnn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def nin(
    *, num_classes: int = 10, in_channels: int = 1, input_size: int | tuple[int, int] = 224
) -> NiN:
    """Build NiN; global pooling makes it take any size of 67 or more."""
    del input_size  # no layer's size depends on it
    return NiN(num_classes=num_classes, in_channels=in_channels)
