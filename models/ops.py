"""The seed's primitives (D2L 7.2–7.5) as plain functions."""

from __future__ import annotations

from typing import Literal

import torch

PoolMode = Literal["max", "avg"]


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def output_size(n: int, kernel: int, padding: int = 0, stride: int = 1) -> int:
    """One side of a conv or pool output: ⌊(n − k + p + s)/s⌋, `padding` counting both sides.

    `padding` is the total padding p_h (both sides), as in D2L 7.3; a layer with `padding=1`
    pads 2 in total.
    """
    if kernel < 1 or stride < 1 or padding < 0 or n < 0:
        raise ValueError("kernel and stride must be ≥ 1, padding and size ≥ 0")
    return (n - kernel + padding + stride) // stride


def conv_output_shape(
    input_shape: tuple[int, int],
    kernel_size: int | tuple[int, int],
    padding: int | tuple[int, int] = 0,
    stride: int | tuple[int, int] = 1,
) -> tuple[int, int]:
    """Output height and width of a conv or pool whose `padding` is per side, as nn.Conv2d's."""
    (kh, kw), (ph, pw), (sh, sw) = _pair(kernel_size), _pair(padding), _pair(stride)
    h, w = input_shape
    return output_size(h, kh, 2 * ph, sh), output_size(w, kw, 2 * pw, sw)


def corr2d(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """2-D cross-correlation of one channel, as D2L's `corr2d`."""
    h, w = k.shape
    y = torch.zeros((x.shape[0] - h + 1, x.shape[1] - w + 1), dtype=torch.result_type(x, k))
    for i in range(y.shape[0]):
        for j in range(y.shape[1]):
            y[i, j] = (x[i : i + h, j : j + w] * k).sum()
    return y


def corr2d_multi_in(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Cross-correlation over input channels, summed: x is (c_i, h, w), k is (c_i, kh, kw)."""
    if x.shape[0] != k.shape[0]:
        raise ValueError(f"input has {x.shape[0]} channels but the kernel has {k.shape[0]}")
    return sum((corr2d(xc, kc) for xc, kc in zip(x, k, strict=True)), torch.zeros(()))


def corr2d_multi_in_out(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """One output channel per kernel: k is (c_o, c_i, kh, kw)."""
    return torch.stack([corr2d_multi_in(x, kc) for kc in k], 0)


def corr2d_multi_in_out_1x1(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The 1×1 convolution as a matrix product: (c_o, c_i) @ (c_i, h·w)."""
    c_i, h, w = x.shape
    c_o = k.shape[0]
    y = torch.matmul(k.reshape((c_o, c_i)), x.reshape((c_i, h * w)))
    return y.reshape((c_o, h, w))


def pool2d(x: torch.Tensor, pool_size: tuple[int, int], mode: PoolMode = "max") -> torch.Tensor:
    """Max or average pooling of one channel with stride 1, as D2L's `pool2d`."""
    p_h, p_w = pool_size
    y = torch.zeros((x.shape[0] - p_h + 1, x.shape[1] - p_w + 1), dtype=torch.float32)
    for i in range(y.shape[0]):
        for j in range(y.shape[1]):
            window = x[i : i + p_h, j : j + p_w]
            if mode == "max":
                y[i, j] = window.max()
            elif mode == "avg":
                y[i, j] = window.float().mean()
            else:
                raise ValueError(f"mode must be 'max' or 'avg', got {mode!r}")
    return y
