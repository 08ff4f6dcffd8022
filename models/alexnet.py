"""AlexNet as the book builds it (D2L 8.1): five convolutions, three max-pools, a 4096-4096 head."""

from __future__ import annotations

import torch
from torch import nn

from models.shapes import flat_features


class AlexNet(nn.Module):
    """The book's streamlined AlexNet for one-channel inputs, with dropout 0.5 in its head.

    Initialisation as the book's code really does it: `AlexNet.__init__` applies `init_cnn`
    while its layers are still lazy (so it changes nothing) and section 8.1 trains without
    `apply_init`, so every layer keeps PyTorch's default initialisation, as here.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int | tuple[int, int] = 224,
    ) -> None:
        super().__init__()
        features = [
            nn.Conv2d(in_channels, 96, kernel_size=11, stride=4, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(96, 256, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(256, 384, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 384, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Flatten(),
        ]
        flat = flat_features(features, in_channels, input_size)
        self.net = nn.Sequential(
            *features,
            nn.Linear(flat, 4096),
            nn.ReLU(),
            nn.Dropout(p=0.5),
            nn.Linear(4096, 4096),
            nn.ReLU(),
            nn.Dropout(p=0.5),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def alexnet(
    *, num_classes: int = 10, in_channels: int = 1, input_size: int | tuple[int, int] = 224
) -> AlexNet:
    """Build AlexNet for `input_size`×`input_size` inputs (65 or more)."""
    return AlexNet(num_classes=num_classes, in_channels=in_channels, input_size=input_size)
