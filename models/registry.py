"""The model registry: list, get and build the zoo's networks by name."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from models.alexnet import alexnet
from models.bn_lenet import bn_lenet
from models.densenet import (
    DENSENET_ARCH_FORM,
    DENSENET_ARCHS,
    DenseNetArch,
    check_densenet_arch,
    densenet,
)
from models.errors import ArchError, DuplicateModelError, UnknownModelError
from models.googlenet import googlenet
from models.lenet import lenet
from models.nin import nin
from models.regnet import ANYNET_ARCH_FORM, REGNET_ARCHS, AnyNetArch, check_anynet_arch, regnetx32
from models.resnet import RESNET_ARCHS, resnet18
from models.vgg import VGG_ARCHS, vgg

#: Stages as `(count, channels)` pairs: VGG's `(num_convs, out_channels)`, ResNet's
#: `(num_residuals, num_channels)`.
Pairs = tuple[tuple[int, int], ...]
#: A resolved arch: stage pairs, or the parameters of the book's DenseNet or AnyNet (hashable,
#: so shape checks can be cached by it).
Arch = Pairs | DenseNetArch | AnyNetArch
#: An arch as JSON writes it (a job spec, a manifest, the API): pairs, or an object of the
#: book's constructor parameters.
ArchJSON = list[list[int]] | dict[str, Any]
#: What `build_model` and the summaries take: a name, a resolved arch, or its JSON form.
ArchInput = str | Arch | list[list[int]] | Mapping[str, Any] | None

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
    """A registered network: how to build it and the book's recipe for training it."""

    name: str
    description: str
    factory: Callable[..., nn.Module]
    input_size: int
    lr: float
    section: str
    archs: Mapping[str, Arch] = field(default_factory=dict)
    default_arch: str | None = None
    #: Turns an override that is not a name into this network's arch (an `ArchError` says
    #: what is wrong); None: `[count, channels]` pairs, checked when the network is built.
    parse_arch: Callable[[object], Arch] | None = None
    #: How an override is written, for the API's description of the model.
    arch_form: str | None = None

    def resolve_arch(self, arch: ArchInput) -> Arch | None:
        """The arch for a name, an arch in any of its forms, or None (the default)."""
        if not self.archs:
            if arch is not None:
                raise ArchError(
                    f"{self.name} has a fixed architecture and takes no arch (the book's "
                    "constructor takes only lr, a job field, and num_classes, which "
                    "Fashion-MNIST fixes at 10)"
                )
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
        if self.parse_arch is not None:
            return self.parse_arch(arch)
        if isinstance(arch, Mapping | DenseNetArch | AnyNetArch):
            raise ArchError(
                f"{self.name} arch must be a name or [count, channels] pairs ({self.arch_form}), "
                f"got {arch!r}"
            )
        try:
            return tuple((int(a), int(b)) for a, b in arch)
        except (TypeError, ValueError) as exc:
            raise ArchError(
                f"{self.name} arch must be a list of [count, channels] pairs, got {arch!r}"
            ) from exc

    def arch_json(self, arch: ArchInput) -> ArchJSON | None:
        """The resolved arch as a job spec, a manifest and the API write it (None: none)."""
        resolved = self.resolve_arch(arch)
        if resolved is None:
            return None
        if isinstance(resolved, DenseNetArch | AnyNetArch):
            return resolved.as_json()
        return [list(p) for p in resolved]


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
    arch: ArchInput = None,
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
        arch_form="[[num_convs, out_channels], ...], one pair per vgg_block",
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
        arch_form="[[num_residuals, num_channels], ...], one pair per stage",
    )
)

# The rest of the book's chapter 8, in the book's order, after the seed's three.
register_model(
    ModelEntry(
        name="alexnet",
        description="AlexNet (D2L 8.1): five convolutions (11×11 stride 4, 5×5, three 3×3) "
        "with ReLU and three max-pools, then a 4096-4096 head with dropout 0.5.",
        factory=alexnet,
        input_size=224,
        lr=0.01,
        section="8.1",
    )
)
register_model(
    ModelEntry(
        name="nin",
        description="Network in Network (D2L 8.3): four nin_blocks (a convolution and two 1×1 "
        "convolutions) with max-pools and dropout; global average pooling of the last block's "
        "one channel per class gives the scores, with no dense layer.",
        factory=nin,
        input_size=224,
        lr=0.05,
        section="8.3",
    )
)
register_model(
    ModelEntry(
        name="googlenet",
        description="GoogLeNet (D2L 8.4): a 7×7 stem, then nine Inception blocks (four "
        "parallel branches, concatenated) in three stages, global average pooling and a "
        "linear head.",
        factory=googlenet,
        input_size=96,
        lr=0.01,
        section="8.4",
    )
)
register_model(
    ModelEntry(
        name="bn_lenet",
        description="LeNet with batch normalization (D2L 8.5's BNLeNet): a BatchNorm after "
        "each convolution and hidden dense layer, before its sigmoid.",
        factory=bn_lenet,
        input_size=28,
        lr=0.1,
        section="8.5",
    )
)
register_model(
    ModelEntry(
        name="densenet",
        description="DenseNet (D2L 8.7): ResNet's stem, dense blocks of batch norm, ReLU and "
        "3×3 convolution whose outputs are concatenated, transition blocks halving channels "
        "and size between them, global average pooling and a linear head.",
        factory=densenet,
        input_size=96,
        lr=0.01,
        section="8.7",
        archs=DENSENET_ARCHS,
        default_arch="book",
        parse_arch=check_densenet_arch,
        arch_form=DENSENET_ARCH_FORM,
    )
)
register_model(
    ModelEntry(
        name="regnetx32",
        description="RegNetX-32 (D2L 8.8): AnyNet with a 3×3 stem and two stages of ResNeXt "
        "blocks (depths 4 and 6, widths 32 and 80, group width 16, no bottleneck), global "
        "average pooling and a linear head.",
        factory=regnetx32,
        input_size=96,
        lr=0.05,
        section="8.8",
        archs=REGNET_ARCHS,
        default_arch="regnetx32",
        parse_arch=check_anynet_arch,
        arch_form=ANYNET_ARCH_FORM,
    )
)
