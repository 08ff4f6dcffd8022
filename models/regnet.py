"""AnyNet and RegNetX-32 as the book builds them (D2L 8.8), on 8.6's ResNeXt block."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from models.errors import ArchError

#: One AnyNet stage: `(depth, num_channels, groups, bot_mul)`, as the book's `stage` takes it;
#: `groups` is the width of each convolution group (the book's `bot_channels // groups` is
#: the number of groups).
Stage = tuple[int, int, int, int | float]


@dataclass(frozen=True)
class AnyNetArch:
    """The parameters of the book's `AnyNet(arch, stem_channels)`."""

    stem_channels: int
    arch: tuple[Stage, ...]

    def as_json(self) -> dict[str, Any]:
        """The form a job spec, a manifest and the API write it in."""
        return {"stem_channels": self.stem_channels, "arch": [list(s) for s in self.arch]}


#: The book's `RegNetX32`: stem 32, group width 16, no bottleneck, depths (4, 6), widths (32, 80).
REGNETX32 = AnyNetArch(stem_channels=32, arch=((4, 32, 16, 1), (6, 80, 16, 1)))
REGNET_ARCHS: dict[str, AnyNetArch] = {"regnetx32": REGNETX32}
#: How an arch override is written, for error messages and the API's model descriptions.
ANYNET_ARCH_FORM = (
    '{"stem_channels": 32, "arch": [[4, 32, 16, 1], [6, 80, 16, 1]]} '
    "(stages as [depth, num_channels, groups, bot_mul]; stem_channels may be left out)"
)
MAX_STAGES, MAX_DEPTH, MAX_CHANNELS = 6, 16, 2048


def _int(value: object, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArchError(f"AnyNet {what} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ArchError(f"AnyNet {what} must be {low}-{high}, got {value}")
    return value


def _stage(i: int, stage: object) -> Stage:
    if not isinstance(stage, list | tuple) or len(stage) != 4:
        raise ArchError(
            f"AnyNet stage {i} must be [depth, num_channels, groups, bot_mul], got {stage!r}"
        )
    depth = _int(stage[0], f"stage {i} depth", 1, MAX_DEPTH)
    channels = _int(stage[1], f"stage {i} num_channels", 1, MAX_CHANNELS)
    groups = _int(stage[2], f"stage {i} groups (the group width)", 1, MAX_CHANNELS)
    bot_mul = stage[3]
    if isinstance(bot_mul, bool) or not isinstance(bot_mul, int | float) or not 0 < bot_mul <= 4:
        raise ArchError(f"AnyNet stage {i} bot_mul must be a number in (0, 4], got {bot_mul!r}")
    bot_channels = round(channels * bot_mul)
    if not 1 <= groups <= bot_channels or bot_channels % (bot_channels // groups):
        raise ArchError(
            f"AnyNet stage {i}: its {bot_channels} bottleneck channels (num_channels × bot_mul) "
            f"do not split into groups {groups} wide; choose a group width that divides them"
        )
    return (depth, channels, groups, int(bot_mul) if float(bot_mul).is_integer() else bot_mul)


def check_anynet_arch(arch: object) -> AnyNetArch:
    """An `AnyNetArch` from itself or its JSON object form; an `ArchError` says what is wrong."""
    if isinstance(arch, AnyNetArch):
        fields: Mapping[str, Any] = arch.as_json()
    elif isinstance(arch, Mapping):
        fields = arch
    else:
        raise ArchError(f"an AnyNet arch is a name or an object: {ANYNET_ARCH_FORM}")
    unknown = sorted(set(fields) - {"stem_channels", "arch"})
    if unknown:
        raise ArchError(
            f"AnyNet arch has no {', '.join(map(repr, unknown))}; it takes stem_channels and arch"
        )
    stem = _int(fields.get("stem_channels", REGNETX32.stem_channels), "stem_channels", 1, 512)
    stages = fields.get("arch", REGNETX32.arch)
    if not isinstance(stages, list | tuple) or not 1 <= len(stages) <= MAX_STAGES:
        raise ArchError(f"AnyNet arch's arch must list 1 to {MAX_STAGES} stages, got {stages!r}")
    return AnyNetArch(stem_channels=stem, arch=tuple(_stage(i, s) for i, s in enumerate(stages)))


class ResNeXtBlock(nn.Module):
    """D2L 8.6's ResNeXt block: 1×1, grouped 3×3 and 1×1 convolutions with batch norm, and a
    shortcut (a 1×1 convolution with batch norm where `use_1x1conv`)."""

    def __init__(
        self,
        num_channels: int,
        groups: int,
        bot_mul: float,
        use_1x1conv: bool = False,
        strides: int = 1,
        *,
        in_channels: int | None = None,
    ) -> None:
        super().__init__()
        in_channels = num_channels if in_channels is None else in_channels
        bot_channels = round(num_channels * bot_mul)
        self.conv1 = nn.Conv2d(in_channels, bot_channels, kernel_size=1, stride=1)
        self.conv2 = nn.Conv2d(
            bot_channels,
            bot_channels,
            kernel_size=3,
            stride=strides,
            padding=1,
            groups=bot_channels // groups,
        )
        self.conv3 = nn.Conv2d(bot_channels, num_channels, kernel_size=1, stride=1)
        self.bn1 = nn.BatchNorm2d(bot_channels)
        self.bn2 = nn.BatchNorm2d(bot_channels)
        self.bn3 = nn.BatchNorm2d(num_channels)
        self.conv4: nn.Conv2d | None = None
        if use_1x1conv:
            self.conv4 = nn.Conv2d(in_channels, num_channels, kernel_size=1, stride=strides)
            self.bn4 = nn.BatchNorm2d(num_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        if self.conv4 is not None:
            x = self.bn4(self.conv4(x))
        return F.relu(y + x)


class AnyNet(nn.Module):
    """The book's `AnyNet`: a stem, stages of ResNeXt blocks (the first of each halves the
    size), and a head of global pooling and a linear layer.

    Initialisation as the book's code really does it: `init_cnn` is applied while the layers
    are lazy (a no-op) and section 8.8 trains without `apply_init`, so the layers keep
    PyTorch's default initialisation, as here.
    """

    def __init__(
        self, arch: AnyNetArch = REGNETX32, *, num_classes: int = 10, in_channels: int = 1
    ) -> None:
        super().__init__()
        self.arch = check_anynet_arch(arch)
        self.net = nn.Sequential(self.stem(in_channels, self.arch.stem_channels))
        channels = self.arch.stem_channels
        for i, (depth, num_channels, groups, bot_mul) in enumerate(self.arch.arch):
            self.net.add_module(
                f"stage{i + 1}", self.stage(depth, num_channels, groups, bot_mul, channels)
            )
            channels = num_channels
        self.net.add_module(
            "head",
            nn.Sequential(
                nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(channels, num_classes)
            ),
        )

    @staticmethod
    def stem(in_channels: int, num_channels: int) -> nn.Sequential:
        """A stride-2 3×3 convolution, batch norm and ReLU."""
        return nn.Sequential(
            nn.Conv2d(in_channels, num_channels, kernel_size=3, stride=2, padding=1),
            nn.BatchNorm2d(num_channels),
            nn.ReLU(),
        )

    @staticmethod
    def stage(
        depth: int, num_channels: int, groups: int, bot_mul: float, in_channels: int
    ) -> nn.Sequential:
        """`depth` ResNeXt blocks; the first halves height and width with a 1×1 shortcut."""
        blk = [
            ResNeXtBlock(
                num_channels, groups, bot_mul, use_1x1conv=True, strides=2, in_channels=in_channels
            )
        ]
        blk.extend(ResNeXtBlock(num_channels, groups, bot_mul) for _ in range(depth - 1))
        return nn.Sequential(*blk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def regnetx32(
    *,
    arch: AnyNetArch = REGNETX32,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int | tuple[int, int] = 96,
) -> AnyNet:
    """Build the book's RegNetX-32 (or another AnyNet via `arch`); it takes any input size."""
    del input_size  # no layer's size depends on it
    return AnyNet(arch, num_classes=num_classes, in_channels=in_channels)
