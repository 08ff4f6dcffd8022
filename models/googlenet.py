"""GoogLeNet as the book builds it (D2L 8.4): a stem, nine Inception blocks, global pooling."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from models.init import init_cnn

#: Branch widths `(c1, (c2a, c2b), (c3a, c3b), c4)` of each Inception block, stage by stage.
InceptionWidths = tuple[int, tuple[int, int], tuple[int, int], int]
B3: tuple[InceptionWidths, ...] = ((64, (96, 128), (16, 32), 32), (128, (128, 192), (32, 96), 64))
B4: tuple[InceptionWidths, ...] = (
    (192, (96, 208), (16, 48), 64),
    (160, (112, 224), (24, 64), 64),
    (128, (128, 256), (24, 64), 64),
    (112, (144, 288), (32, 64), 64),
    (256, (160, 320), (32, 128), 128),
)
B5: tuple[InceptionWidths, ...] = (
    (256, (160, 320), (32, 128), 128),
    (384, (192, 384), (48, 128), 128),
)


class Inception(nn.Module):
    """Four parallel branches (1×1; 1×1 then 3×3; 1×1 then 5×5; 3×3 max-pool then 1×1),
    concatenated along the channels, as D2L's `Inception(c1, c2, c3, c4)`."""

    def __init__(
        self,
        c1: int,
        c2: tuple[int, int],
        c3: tuple[int, int],
        c4: int,
        *,
        in_channels: int,
    ) -> None:
        super().__init__()
        self.b1_1 = nn.Conv2d(in_channels, c1, kernel_size=1)
        self.b2_1 = nn.Conv2d(in_channels, c2[0], kernel_size=1)
        self.b2_2 = nn.Conv2d(c2[0], c2[1], kernel_size=3, padding=1)
        self.b3_1 = nn.Conv2d(in_channels, c3[0], kernel_size=1)
        self.b3_2 = nn.Conv2d(c3[0], c3[1], kernel_size=5, padding=2)
        self.b4_1 = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        self.b4_2 = nn.Conv2d(in_channels, c4, kernel_size=1)
        self.out_channels = c1 + c2[1] + c3[1] + c4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = F.relu(self.b1_1(x))
        b2 = F.relu(self.b2_2(F.relu(self.b2_1(x))))
        b3 = F.relu(self.b3_2(F.relu(self.b3_1(x))))
        b4 = F.relu(self.b4_2(self.b4_1(x)))
        return torch.cat((b1, b2, b3, b4), dim=1)


def _inceptions(widths: tuple[InceptionWidths, ...], in_channels: int) -> list[Inception]:
    blocks = []
    for c1, c2, c3, c4 in widths:
        blocks.append(Inception(c1, c2, c3, c4, in_channels=in_channels))
        in_channels = blocks[-1].out_channels
    return blocks


class GoogleNet(nn.Module):
    """The book's `GoogleNet`: modules b1-b5 and a linear head.

    Section 8.4 trains it after `apply_init(..., d2l.init_cnn)`: Xavier-uniform weights.
    """

    def __init__(self, *, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        b3 = _inceptions(B3, 192)
        b4 = _inceptions(B4, b3[-1].out_channels)
        b5 = _inceptions(B5, b4[-1].out_channels)
        self.net = nn.Sequential(
            self.b1(in_channels),
            self.b2(),
            nn.Sequential(*b3, nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            nn.Sequential(*b4, nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            nn.Sequential(*b5, nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten()),
            nn.Linear(b5[-1].out_channels, num_classes),
        )
        self.net.apply(init_cnn)

    @staticmethod
    def b1(in_channels: int) -> nn.Sequential:
        """The stem: a 64-channel 7×7 convolution and a max-pool, each halving the size."""
        return nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )

    @staticmethod
    def b2() -> nn.Sequential:
        """A 1×1 and a 3×3 convolution (192 channels), then a max-pool."""
        return nn.Sequential(
            nn.Conv2d(64, 64, kernel_size=1),
            nn.ReLU(),
            nn.Conv2d(64, 192, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def googlenet(
    *, num_classes: int = 10, in_channels: int = 1, input_size: int | tuple[int, int] = 96
) -> GoogleNet:
    """Build GoogLeNet; global pooling makes it take any input size."""
    del input_size  # no layer's size depends on it
    return GoogleNet(num_classes=num_classes, in_channels=in_channels)
