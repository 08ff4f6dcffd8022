"""DenseNet as the book builds it (D2L 8.7): dense blocks joined by transition blocks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.errors import ArchError


@dataclass(frozen=True)
class DenseNetArch:
    """The parameters of the book's `DenseNet(num_channels, growth_rate, arch)`."""

    #: Where the book's channel arithmetic for the transition blocks starts (its b1 has 64
    #: output channels whatever this says, as in the book's code).
    num_channels: int = 64
    #: Output channels of each convolution in a dense block.
    growth_rate: int = 32
    #: Convolutions per dense block.
    arch: tuple[int, ...] = (4, 4, 4, 4)

    def as_json(self) -> dict[str, Any]:
        """The form a job spec, a manifest and the API write it in."""
        return {
            "num_channels": self.num_channels,
            "growth_rate": self.growth_rate,
            "arch": list(self.arch),
        }


#: The book's DenseNet (its constructor's defaults).
DENSENET_BOOK = DenseNetArch()
DENSENET_ARCHS: dict[str, DenseNetArch] = {"book": DENSENET_BOOK}
#: How an arch override is written, for error messages and the API's model descriptions.
DENSENET_ARCH_FORM = (
    '{"num_channels": 64, "growth_rate": 32, "arch": [4, 4, 4, 4]} '
    "(any key may be left out: the book's value)"
)
_BOUNDS = {"num_channels": (1, 512), "growth_rate": (1, 128)}
MAX_BLOCKS, MAX_CONVS = 5, 24


def _int(value: object, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArchError(f"DenseNet {what} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ArchError(f"DenseNet {what} must be {low}-{high}, got {value}")
    return value


def check_densenet_arch(arch: object) -> DenseNetArch:
    """A `DenseNetArch` from itself or its JSON object form; an `ArchError` says what is wrong."""
    if isinstance(arch, DenseNetArch):
        fields: Mapping[str, Any] = arch.as_json()
    elif isinstance(arch, Mapping):
        fields = arch
    else:
        raise ArchError(f"a DenseNet arch is a name or an object: {DENSENET_ARCH_FORM}")
    unknown = sorted(set(fields) - {"num_channels", "growth_rate", "arch"})
    if unknown:
        raise ArchError(
            f"DenseNet arch has no {', '.join(map(repr, unknown))}; it takes num_channels, "
            "growth_rate and arch"
        )
    values = {k: _int(fields[k], k, *_BOUNDS[k]) for k in _BOUNDS if k in fields}
    blocks = fields.get("arch", DENSENET_BOOK.arch)
    if not isinstance(blocks, list | tuple) or not 1 <= len(blocks) <= MAX_BLOCKS:
        raise ArchError(
            f"DenseNet arch's arch must list 1 to {MAX_BLOCKS} dense blocks' convolution counts, "
            f"got {blocks!r}"
        )
    convs = tuple(
        _int(n, f"dense block {i} convolutions", 1, MAX_CONVS) for i, n in enumerate(blocks)
    )
    return DenseNetArch(arch=convs, **values)


def conv_block(num_channels: int, *, in_channels: int) -> nn.Sequential:
    """Batch norm, ReLU, 3×3 convolution: D2L's `conv_block` (ResNet's "pre-activation" order)."""
    return nn.Sequential(
        nn.BatchNorm2d(in_channels),
        nn.ReLU(),
        nn.Conv2d(in_channels, num_channels, kernel_size=3, padding=1),
    )


class DenseBlock(nn.Module):
    """`num_convs` conv blocks, each fed the concatenation of the block's input and every
    earlier conv block's output, as D2L's `DenseBlock(num_convs, num_channels)`."""

    def __init__(self, num_convs: int, num_channels: int, *, in_channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            *(
                conv_block(num_channels, in_channels=in_channels + i * num_channels)
                for i in range(num_convs)
            )
        )
        self.out_channels = in_channels + num_convs * num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.net:
            y = blk(x)
            # concatenate the input and output of each block along the channels
            x = torch.cat((x, y), dim=1)
        return x


def transition_block(num_channels: int, *, in_channels: int) -> nn.Sequential:
    """Batch norm, ReLU, a 1×1 convolution to `num_channels`, 2×2 average pooling."""
    return nn.Sequential(
        nn.BatchNorm2d(in_channels),
        nn.ReLU(),
        nn.Conv2d(in_channels, num_channels, kernel_size=1),
        nn.AvgPool2d(kernel_size=2, stride=2),
    )


class DenseNet(nn.Module):
    """The book's `DenseNet`: ResNet's stem, dense blocks with transition blocks between them
    halving channels and size, then batch norm, global pooling and a linear head.

    Initialisation as the book's code really does it: `init_cnn` is applied while the layers
    are lazy (a no-op) and section 8.7 trains without `apply_init`, so the layers keep
    PyTorch's default initialisation, as here.
    """

    def __init__(
        self, arch: DenseNetArch = DENSENET_BOOK, *, num_classes: int = 10, in_channels: int = 1
    ) -> None:
        super().__init__()
        self.arch = check_densenet_arch(arch)
        self.net = nn.Sequential(self.b1(in_channels))
        channels = 64  # b1's output
        num_channels = self.arch.num_channels
        last = len(self.arch.arch) - 1
        for i, num_convs in enumerate(self.arch.arch):
            block = DenseBlock(num_convs, self.arch.growth_rate, in_channels=channels)
            self.net.add_module(f"dense_blk{i + 1}", block)
            channels = block.out_channels
            # the book's count of the previous dense block's output channels
            num_channels += num_convs * self.arch.growth_rate
            if i != last:  # a transition block halves the channels between dense blocks
                num_channels //= 2
                self.net.add_module(
                    f"tran_blk{i + 1}", transition_block(num_channels, in_channels=channels)
                )
                channels = num_channels
        self.net.add_module(
            "last",
            nn.Sequential(
                nn.BatchNorm2d(channels),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                nn.Flatten(),
                nn.Linear(channels, num_classes),
            ),
        )

    @staticmethod
    def b1(in_channels: int) -> nn.Sequential:
        """ResNet's stem: a 64-channel 7×7 convolution, batch norm, ReLU, max-pool."""
        return nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def densenet(
    *,
    arch: DenseNetArch = DENSENET_BOOK,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int | tuple[int, int] = 96,
) -> DenseNet:
    """Build a DenseNet; global pooling makes it take any size its transitions can halve."""
    del input_size  # no layer's size depends on it
    return DenseNet(arch, num_classes=num_classes, in_channels=in_channels)
