"""Shape summaries: one row per layer with output shape, parameters and multiply-adds."""

from __future__ import annotations

import math
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from models.errors import ShapeError
from models.registry import Arch, ArchInput, build_model, get_model_entry


@dataclass(frozen=True)
class LayerRow:
    """One layer of a summary."""

    name: str
    type: str
    output_shape: tuple[int, ...]
    params: int
    macs: int


@dataclass(frozen=True)
class Summary:
    """A network's layers for one input shape, and the totals."""

    model: str
    input_shape: tuple[int, ...]
    layers: list[LayerRow] = field(default_factory=list)
    total_params: int = 0
    total_macs: int = 0
    #: The BatchNorm layer that sees the fewest values per channel for one example, and how
    #: many (its output's spatial size); None without BatchNorm. Training needs more than one
    #: value per channel in a batch, so a batch of one example cannot train where this is 1.
    sparsest_norm: tuple[str, int] | None = None

    @property
    def text(self) -> str:
        """The rows as D2L's `layer_summary` prints them."""
        return "\n".join(
            f"{row.type} output shape:\t {torch.Size(row.output_shape)}" for row in self.layers
        )


def _leaf_macs(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return out.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    return 0


def _rows_at_depth(net: nn.Module, depth: int, ran: Container[str]) -> list[tuple[str, nn.Module]]:
    """Modules `depth` levels below `net` (or leaves above that), named from `net`.

    A container the forward pass never called as a whole (DenseNet's `DenseBlock` iterates
    its `net` rather than calling it) is looked through: its children are the rows.
    """
    rows: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module, level: int) -> None:
        children = list(module.named_children())
        if (level >= depth or not children) and prefix in ran:
            rows.append((prefix, module))
            return
        for child_name, child in children:  # a leaf that never ran has none: no row
            walk(f"{prefix}.{child_name}", child, level + 1)

    for name, child in net.named_children():
        walk(f"net.{name}", child, 1)
    return rows


def summarize_module(
    model: nn.Module, name: str, input_shape: Sequence[int], *, depth: int = 1
) -> Summary:
    """Summarise a built model (ideally on the meta device) for `input_shape` (N, C, H, W)."""
    if depth < 1:
        raise ValueError("depth must be at least 1")
    net: nn.Module = model.net  # type: ignore[assignment]
    model.eval()
    names = {id(m): f"net.{n}" if n else "net" for n, m in net.named_modules()}
    #: Every module's output shape and when it finished, at its first call.
    shapes: dict[str, tuple[int, ...]] = {}
    finished: dict[str, int] = {}
    leaf_macs: dict[str, int] = {}
    norms: list[tuple[str, int]] = []
    stack: list[nn.Module] = []

    def pre_hook(module: nn.Module, args: Any) -> None:
        stack.append(module)
        if isinstance(module, nn.Conv2d) and args and isinstance(args[0], torch.Tensor):
            got = args[0].shape[1] if args[0].dim() == 4 else None
            if got != module.in_channels:
                raise ShapeError(
                    names[id(module)],
                    "Conv2d",
                    f"expects {module.in_channels} input channel(s), got {got}",
                )

    def post_hook(module: nn.Module, args: Any, out: Any) -> None:
        stack.pop()
        key = names[id(module)]
        if isinstance(out, torch.Tensor):
            leaf_macs[key] = leaf_macs.get(key, 0) + _leaf_macs(module, out)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                norms.append((key, math.prod(out.shape[2:])))
            if key not in finished:
                shapes[key] = tuple(out.shape)
                finished[key] = len(finished)

    handles = []
    for module in net.modules():
        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(post_hook))
    device = next(model.parameters()).device
    x = torch.zeros(tuple(input_shape), device=device)
    try:
        with torch.no_grad():
            net(x)
    except RuntimeError as exc:
        failing = stack[-1] if stack else net
        reason = str(exc).strip().splitlines()[0]
        raise ShapeError(names[id(failing)], type(failing).__name__, reason) from exc
    finally:
        for h in handles:
            h.remove()

    tracked = sorted(_rows_at_depth(net, depth, finished), key=lambda row: finished[row[0]])
    rows: list[LayerRow] = []
    for key, module in tracked:
        macs = sum(v for k, v in leaf_macs.items() if k == key or k.startswith(key + "."))
        params = sum(p.numel() for p in module.parameters())
        rows.append(LayerRow(key, type(module).__name__, shapes[key], params, macs))
    return Summary(
        model=name,
        input_shape=tuple(input_shape),
        layers=rows,
        total_params=sum(p.numel() for p in model.parameters()),
        total_macs=sum(leaf_macs.values()),
        sparsest_norm=min(norms, key=lambda n: n[1]) if norms else None,
    )


def summarize(
    name: str,
    input_shape: Sequence[int],
    *,
    arch: ArchInput = None,
    depth: int = 1,
    num_classes: int = 10,
    in_channels: int = 1,
) -> Summary:
    """Summarise a registered model for `input_shape` (N, C, H, W) without allocating weights."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 4 or any(d < 1 for d in shape):
        raise ValueError(f"input_shape must be four positive sizes (N, C, H, W), got {shape}")
    model = build_model(
        name,
        arch=arch,
        input_size=(shape[2], shape[3]),
        num_classes=num_classes,
        in_channels=in_channels,
        device="meta",
    )
    return summarize_module(model, name, shape, depth=depth)


#: The largest square side `min_input_size` looks at.
MAX_SIDE = 1024


def min_input_size(name: str, arch: ArchInput = None, *, at_least: int = 1) -> int | None:
    """The smallest square side from `at_least` up that `name` (with `arch`) takes, or None
    if even 1024 is too small.

    Every convolution's and pool's output grows with its input, so whether a side fits is
    monotone in it, and a bisection over meta-device builds finds the edge.
    """
    return _min_side(name, get_model_entry(name).resolve_arch(arch), at_least)


@lru_cache(maxsize=256)
def _min_side(name: str, arch: Arch | None, at_least: int) -> int | None:
    def fits(side: int) -> bool:
        try:
            summarize(name, (1, 1, side, side), arch=arch)
        except ShapeError:
            return False
        return True

    if fits(at_least):
        return at_least
    if not fits(MAX_SIDE):
        return None
    too_small, big_enough = at_least, MAX_SIDE
    while big_enough - too_small > 1:
        mid = (too_small + big_enough) // 2
        if fits(mid):
            big_enough = mid
        else:
            too_small = mid
    return big_enough
