"""VGG as the seed defines it (D2L 8.2): `vgg_block`s from an `arch` table, a 4096-4096 head."""

from __future__ import annotations

import torch
from torch import nn

from models.errors import ArchError
from models.init import init_cnn
from models.shapes import flat_features

VGGArch = tuple[tuple[int, int], ...]

#: The seed's training arch: VGG-11's layout with fewer channels.
VGG_SMALL: VGGArch = ((1, 16), (1, 32), (2, 64), (2, 128), (2, 128))
#: VGG-11 as printed in the seed.
VGG_11: VGGArch = ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))

VGG_ARCHS: dict[str, VGGArch] = {"small": VGG_SMALL, "vgg11": VGG_11}


def vgg_block(num_convs: int, in_channels: int, out_channels: int) -> nn.Sequential:
    """`num_convs` 3×3 convolutions with ReLU, then a 2×2 max-pool, as D2L's `vgg_block`."""
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
        # in place: a convolution's backward needs its input, not its output, so overwriting
        # the output changes no number and saves one activation per layer
        layers.append(nn.ReLU(inplace=True))
        in_channels = out_channels
    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


def check_vgg_arch(arch: VGGArch) -> VGGArch:
    """Validate an arch table of `(num_convs, out_channels)` pairs."""
    if not 1 <= len(arch) <= 8:
        raise ArchError(f"a VGG arch needs 1 to 8 blocks, got {len(arch)}")
    for i, pair in enumerate(arch):
        if len(pair) != 2:
            raise ArchError(f"VGG arch block {i} must be (num_convs, out_channels), got {pair}")
        num_convs, out_channels = pair
        if not 1 <= num_convs <= 4:
            raise ArchError(f"VGG arch block {i}: num_convs must be 1-4, got {num_convs}")
        if not 1 <= out_channels <= 1024:
            raise ArchError(f"VGG arch block {i}: out_channels must be 1-1024, got {out_channels}")
    return tuple((int(n), int(c)) for n, c in arch)


class VGG(nn.Module):
    """VGG from `(num_convs, out_channels)` blocks, with the seed's dropout-0.5 dense head."""

    def __init__(
        self,
        arch: VGGArch = VGG_SMALL,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int | tuple[int, int] = 224,
    ) -> None:
        super().__init__()
        self.arch = check_vgg_arch(arch)
        blocks: list[nn.Module] = []
        channels = in_channels
        for num_convs, out_channels in self.arch:
            blocks.append(vgg_block(num_convs, channels, out_channels))
            channels = out_channels
        features = [*blocks, nn.Flatten()]
        flat = flat_features(features, in_channels, input_size)
        self.net = nn.Sequential(
            *features,
            nn.Linear(flat, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(4096, num_classes),
        )
        self.net.apply(init_cnn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def vgg(
    *,
    arch: VGGArch = VGG_SMALL,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int | tuple[int, int] = 224,
) -> VGG:
    """Build a VGG for `input_size`×`input_size` inputs."""
    return VGG(arch, num_classes=num_classes, in_channels=in_channels, input_size=input_size)
