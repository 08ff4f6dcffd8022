"""The model registry: list, get and build the zoo's networks by name."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from models.errors import ArchError, DuplicateModelError, UnknownModelError
from models.lenet import lenet
from models.resnet import RESNET_ARCHS, resnet18
from models.vgg import VGG_ARCHS, vgg

Arch = tuple[tuple[int, int], ...]

#: Fashion-MNIST's ten classes, in label order.
CLASSES: tuple[str, ...] = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)


@dataclass(frozen=True)
class ModelEntry:
    """A registered network: how to build it and the seed's recipe for training it."""

    name: str
    description: str
    factory: Callable[..., nn.Module]
    input_size: int
    lr: float
    section: str
    archs: Mapping[str, Arch] = field(default_factory=dict)
    default_arch: str | None = None

    def resolve_arch(self, arch: str | Arch | None) -> Arch | None:
        """The arch table for a name, a table or None (the default)."""
        if not self.archs:
            if arch is not None:
                raise ArchError(f"{self.name} has a fixed architecture and takes no arch")
            return None
        if arch is None:
            assert self.default_arch is not None
            return self.archs[self.default_arch]
        if isinstance(arch, str):
            if arch not in self.archs:
                raise ArchError(
                    f"unknown {self.name} arch {arch!r}; named archs: {', '.join(self.archs)}"
                )
            return self.archs[arch]
        try:
            return tuple((int(a), int(b)) for a, b in arch)
        except (TypeError, ValueError) as exc:
            raise ArchError(
                f"{self.name} arch must be a list of [count, channels] pairs, got {arch!r}"
            ) from exc


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(entry: ModelEntry) -> ModelEntry:
    """Add a network to the registry; a name can be registered once."""
    if entry.name in _REGISTRY:
        raise DuplicateModelError(f"a model named {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry
    return entry


def list_models() -> list[str]:
    """The registered model names, in registration order."""
    return list(_REGISTRY)


def get_model_entry(name: str) -> ModelEntry:
    """The registry entry for `name`; an unknown name lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(name, list_models()) from None


def build_model(
    name: str,
    *,
    arch: str | Arch | None = None,
    input_size: int | tuple[int, int] | None = None,
    num_classes: int = 10,
    in_channels: int = 1,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Build a freshly initialised network; `device="meta"` builds it without memory."""
    entry = get_model_entry(name)
    kwargs: dict[str, object] = {
        "num_classes": num_classes,
        "in_channels": in_channels,
        "input_size": entry.input_size if input_size is None else input_size,
    }
    resolved = entry.resolve_arch(arch)
    if resolved is not None:
        kwargs["arch"] = resolved
    with torch.device(device or "cpu"):
        return entry.factory(**kwargs)


register_model(
    ModelEntry(
        name="lenet",
        description="LeNet-5 (D2L 7.6): two sigmoid conv layers with average pooling, "
        "then a 120-84-10 dense head.",
        factory=lenet,
        input_size=28,
        lr=0.1,
        section="7.6",
    )
)
register_model(
    ModelEntry(
        name="vgg",
        description="VGG (D2L 8.2): vgg_block(num_convs, out_channels) stages from an arch "
        "table, then a 4096-4096 head with dropout 0.5.",
        factory=vgg,
        input_size=224,
        lr=0.01,
        section="8.2",
        archs=VGG_ARCHS,
        default_arch="small",
    )
)
register_model(
    ModelEntry(
        name="resnet18",
        description="ResNet-18 (D2L 8.6): a 7×7 stem, four stages of Residual blocks, "
        "global average pooling and a linear head.",
        factory=resnet18,
        input_size=96,
        lr=0.01,
        section="8.6",
        archs=RESNET_ARCHS,
        default_arch="resnet18",
    )
)
