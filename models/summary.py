"""Shape summaries: one row per layer with output shape, parameters and multiply-adds."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from models.errors import ShapeError
from models.registry import Arch, build_model


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


def _rows_at_depth(net: nn.Module, depth: int) -> list[tuple[str, nn.Module]]:
    """Modules `depth` levels below `net` (or leaves above that), named from `net`."""
    rows: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module, level: int) -> None:
        children = list(module.named_children())
        if level == depth or not children:
            rows.append((prefix, module))
            return
        for child_name, child in children:
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
    tracked = _rows_at_depth(net, depth)
    tracked_ids = {id(m): n for n, m in tracked}
    names = {id(m): f"net.{n}" if n else "net" for n, m in net.named_modules()}
    shapes: dict[str, tuple[int, ...]] = {}
    order: list[str] = []
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
            if id(module) in tracked_ids:
                shapes[key] = tuple(out.shape)
                order.append(key)

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

    modules = dict(tracked)
    rows: list[LayerRow] = []
    for key in order:
        module = modules[key]
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
    arch: str | Arch | None = None,
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
