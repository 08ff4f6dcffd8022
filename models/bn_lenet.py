"""LeNet with batch normalization as the book builds it (D2L 8.5's `BNLeNet`)."""

from __future__ import annotations

import torch
from torch import nn

from models.init import init_cnn
from models.shapes import flat_features


class BNLeNet(nn.Module):
    """LeNet-5 with a BatchNorm after every convolution and hidden dense layer, before its
    sigmoid; unlike 7.6's LeNet the first convolution has no padding (the book's code).

    Section 8.5 trains it after `apply_init(..., d2l.init_cnn)`: Xavier-uniform weights.
    """

    def __init__(
        self, *, num_classes: int = 10, in_channels: int = 1, input_size: int | tuple[int, int] = 28
    ) -> None:
        super().__init__()
        features = [
            nn.Conv2d(in_channels, 6, kernel_size=5),
            nn.BatchNorm2d(6),
            nn.Sigmoid(),
            nn.AvgPool2d(kernel_size=2, stride=2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.BatchNorm2d(16),
            nn.Sigmoid(),
            nn.AvgPool2d(kernel_size=2, stride=2),
            nn.Flatten(),
        ]
        flat = flat_features(features, in_channels, input_size)
        self.net = nn.Sequential(
            *features,
            nn.Linear(flat, 120),
            nn.BatchNorm1d(120),
            nn.Sigmoid(),
            nn.Linear(120, 84),
            nn.BatchNorm1d(84),
            nn.Sigmoid(),
            nn.Linear(84, num_classes),
        )
        self.net.apply(init_cnn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def bn_lenet(
    *, num_classes: int = 10, in_channels: int = 1, input_size: int | tuple[int, int] = 28
) -> BNLeNet:
    """Build the batch-normalized LeNet for `input_size`×`input_size` inputs."""
    return BNLeNet(num_classes=num_classes, in_channels=in_channels, input_size=input_size)
