"""Shape arithmetic over layers, so networks get explicit sizes without a dummy forward pass."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from models.errors import ShapeError
from models.ops import conv_output_shape

Shape = tuple[int, ...]

_ELEMENTWISE = (nn.ReLU, nn.Sigmoid, nn.Dropout, nn.BatchNorm2d, nn.Identity)


def layer_output_shape(layer: nn.Module, shape: Shape, name: str) -> Shape:
    """The output shape (without batch) of one layer for a `(C, H, W)` or `(F,)` input."""
    kind = type(layer).__name__
    if isinstance(layer, nn.Sequential):
        for i, child in enumerate(layer):
            shape = layer_output_shape(child, shape, f"{name}.{i}")
        return shape
    if isinstance(layer, _ELEMENTWISE):
        return shape
    if isinstance(layer, nn.Flatten):
        size = 1
        for d in shape:
            size *= d
        return (size,)
    if isinstance(layer, nn.Linear):
        return (layer.out_features,)
    if len(shape) != 3:
        raise ShapeError(name, kind, f"expects a (C, H, W) input, got {shape}")
    c, h, w = shape
    if isinstance(layer, nn.Conv2d):
        if c != layer.in_channels:
            raise ShapeError(name, kind, f"expects {layer.in_channels} input channels, got {c}")
        k, p, s = layer.kernel_size, layer.padding, layer.stride
        out_c = layer.out_channels
    elif isinstance(layer, nn.MaxPool2d | nn.AvgPool2d):
        k, p, s = layer.kernel_size, layer.padding, layer.stride  # type: ignore[assignment]
        out_c = c
    else:
        raise ShapeError(name, kind, "has no shape rule")
    kh, kw = (k, k) if isinstance(k, int) else k
    ph, pw = (p, p) if isinstance(p, int) else p  # type: ignore[str-unpack]
    oh, ow = conv_output_shape((h, w), (kh, kw), (ph, pw), s)  # type: ignore[arg-type]
    if oh < 1 or ow < 1:
        raise ShapeError(
            name,
            kind,
            f"its {kh}×{kw} window (padding {ph}×{pw}) does not fit a {h}×{w} input "
            "(the input image is too small for this network)",
        )
    return (out_c, oh, ow)


def flat_features(
    layers: Sequence[nn.Module], in_channels: int, input_size: int | tuple[int, int]
) -> int:
    """How many features the flattened output of `layers` has for an input of `input_size`."""
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    shape: Shape = (in_channels, h, w)
    for i, layer in enumerate(layers):
        shape = layer_output_shape(layer, shape, f"net.{i}")
    if len(shape) != 1:
        raise ValueError(f"layers end in shape {shape}, not a flat vector")
    return shape[0]
