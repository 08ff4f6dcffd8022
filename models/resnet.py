"""ResNet as the seed defines it (D2L 8.6): `Residual` blocks, b1, four stages, a linear head."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from models.errors import ArchError
from models.init import init_cnn

ResNetArch = tuple[tuple[int, int], ...]

#: ResNet-18's stages as `(num_residuals, num_channels)`.
RESNET18_ARCH: ResNetArch = ((2, 64), (2, 128), (2, 256), (2, 512))
RESNET_ARCHS: dict[str, ResNetArch] = {"resnet18": RESNET18_ARCH}


class Residual(nn.Module):
    """The residual block of D2L 8.6: two 3×3 convs with BN, optional 1×1 shortcut conv."""

    def __init__(
        self,
        num_channels: int,
        use_1x1conv: bool = False,
        strides: int = 1,
        *,
        in_channels: int | None = None,
    ) -> None:
        super().__init__()
        in_channels = num_channels if in_channels is None else in_channels
        self.conv1 = nn.Conv2d(in_channels, num_channels, kernel_size=3, padding=1, stride=strides)
        self.conv2 = nn.Conv2d(num_channels, num_channels, kernel_size=3, padding=1)
        self.conv3: nn.Conv2d | None = (
            nn.Conv2d(in_channels, num_channels, kernel_size=1, stride=strides)
            if use_1x1conv
            else None
        )
        self.bn1 = nn.BatchNorm2d(num_channels)
        self.bn2 = nn.BatchNorm2d(num_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ReLUs in place: batch norm's backward and the sum's need neither's output, so
        # overwriting it changes no number (tests/models/test_inplace.py) and saves memory
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        if self.conv3 is not None:
            x = self.conv3(x)
        return F.relu(y + x, inplace=True)


def check_resnet_arch(arch: ResNetArch) -> ResNetArch:
    """Validate a stage table of `(num_residuals, num_channels)` pairs."""
    if not 1 <= len(arch) <= 6:
        raise ArchError(f"a ResNet arch needs 1 to 6 stages, got {len(arch)}")
    for i, pair in enumerate(arch):
        if len(pair) != 2:
            raise ArchError(f"ResNet stage {i} must be (num_residuals, num_channels), got {pair}")
        num_residuals, num_channels = pair
        if not 1 <= num_residuals <= 8:
            raise ArchError(f"ResNet stage {i}: num_residuals must be 1-8, got {num_residuals}")
        if not 1 <= num_channels <= 2048:
            raise ArchError(f"ResNet stage {i}: num_channels must be 1-2048, got {num_channels}")
    return tuple((int(n), int(c)) for n, c in arch)


def _b1(in_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )


def _block(
    in_channels: int, num_residuals: int, num_channels: int, first_block: bool
) -> nn.Sequential:
    blk: list[nn.Module] = []
    for i in range(num_residuals):
        strides = 2 if i == 0 and not first_block else 1
        # torchvision's condition: the shortcut needs a 1×1 conv wherever the block changes the
        # channels or the stride (the seed's ResNet-18 changes them exactly at each stage's
        # first block after b2, so its layers are unchanged)
        use_1x1conv = strides != 1 or in_channels != num_channels
        blk.append(Residual(num_channels, use_1x1conv, strides=strides, in_channels=in_channels))
        in_channels = num_channels
    return nn.Sequential(*blk)


class ResNet(nn.Module):
    """ResNet from a stage table, as D2L's `ResNet(arch)`."""

    def __init__(
        self,
        arch: ResNetArch = RESNET18_ARCH,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        self.arch = check_resnet_arch(arch)
        self.net = nn.Sequential()
        self.net.add_module("b1", _b1(in_channels))
        channels = 64
        for i, (num_residuals, num_channels) in enumerate(self.arch):
            self.net.add_module(
                f"b{i + 2}", _block(channels, num_residuals, num_channels, first_block=(i == 0))
            )
            channels = num_channels
        self.net.add_module(
            "last",
            nn.Sequential(
                nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(channels, num_classes)
            ),
        )
        self.net.apply(init_cnn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def resnet18(
    *,
    arch: ResNetArch = RESNET18_ARCH,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int | tuple[int, int] = 96,
) -> ResNet:
    """Build ResNet-18 (or another depth via `arch`); global pooling makes it size-agnostic."""
    del input_size  # the adaptive pool takes any size the stem can take
    return ResNet(arch, num_classes=num_classes, in_channels=in_channels)
