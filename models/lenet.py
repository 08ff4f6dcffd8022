"""LeNet as the seed defines it (D2L 7.6)."""

from __future__ import annotations

import torch
from torch import nn

from models.init import init_cnn
from models.shapes import flat_features


class LeNet(nn.Module):
    """LeNet-5 with sigmoid activations and average pooling, as in D2L 7.6."""

    def __init__(
        self, *, num_classes: int = 10, in_channels: int = 1, input_size: int | tuple[int, int] = 28
    ):
        super().__init__()
        features = [
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=2),
            nn.Sigmoid(),
            nn.AvgPool2d(kernel_size=2, stride=2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.Sigmoid(),
            nn.AvgPool2d(kernel_size=2, stride=2),
            nn.Flatten(),
        ]
        flat = flat_features(features, in_channels, input_size)
        self.net = nn.Sequential(
            *features,
            nn.Linear(flat, 120),
            nn.Sigmoid(),
            nn.Linear(120, 84),
            nn.Sigmoid(),
            nn.Linear(84, num_classes),
        )
        self.net.apply(init_cnn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def lenet(
    *, num_classes: int = 10, in_channels: int = 1, input_size: int | tuple[int, int] = 28
) -> LeNet:
    """Build LeNet for `input_size`×`input_size` inputs."""
    return LeNet(num_classes=num_classes, in_channels=in_channels, input_size=input_size)
