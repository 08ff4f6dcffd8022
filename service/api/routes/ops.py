"""`/v1/ops`: the seed's primitives (D2L 7.2–7.5) on small inputs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from models import ops
from service.access.auth import Allow
from service.api.problems import problem_responses
from service.errors import (
    BadRequestError,
    InputTooLargeError,
)

router = APIRouter(prefix="/ops", tags=["ops"], dependencies=[Allow("read")])

#: The seed's loops run in Python, one window at a time: bound the work per request.
MAX_SIDE = 64
MAX_CHANNELS = 16
MAX_WINDOWS = 16_384  # output cells × input channels × output channels

Nested = list[Any]
PositiveInt = Annotated[int, Field(ge=1)]


class Corr2dRequest(BaseModel):
    """Input and kernel of a cross-correlation."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"X": [[0, 1, 2], [3, 4, 5], [6, 7, 8]], "K": [[0, 1], [2, 3]]},
                {
                    "X": [[[0, 1, 2], [3, 4, 5], [6, 7, 8]], [[1, 2, 3], [4, 5, 6], [7, 8, 9]]],
                    "K": [[[0, 1], [2, 3]], [[1, 2], [3, 4]]],
                },
            ]
        },
    )

    X: Nested = Field(description="The input: (h, w), or (c_i, h, w) for several channels.")
    K: Nested = Field(
        description="The kernel: (kh, kw) with a 2-D X; (c_i, kh, kw) sums over input "
        "channels; (c_o, c_i, kh, kw) gives one output channel per kernel."
    )


class Pool2dRequest(BaseModel):
    """Input, window and mode of a pooling."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"X": [[0, 1, 2], [3, 4, 5], [6, 7, 8]], "pool_size": 2, "mode": "max"}]
        },
    )

    X: Nested = Field(description="The input, (h, w).")
    pool_size: PositiveInt | Annotated[list[PositiveInt], Field(min_length=2, max_length=2)] = (
        Field(2, description="The window: one side, or [height, width].")
    )
    mode: Literal["max", "avg"] = Field("max", description="Maximum or average of each window.")


class TensorOut(BaseModel):
    """The result of a primitive."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"op": "corr2d", "shape": [2, 2], "Y": [[19.0, 25.0], [37.0, 43.0]]}]
        }
    )

    op: str = Field(description="The seed's function that computed it.")
    shape: list[int] = Field(description="The output's shape.")
    Y: Nested = Field(description="The output as nested lists.")


class OutputSizeOut(BaseModel):
    """One side of a convolution's or pooling's output."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "n": 8,
                    "kernel": 3,
                    "padding": 2,
                    "stride": 2,
                    "padding_convention": "total",
                    "total_padding": 2,
                    "output_size": 4,
                    "formula": "⌊(n − k + p + s) / s⌋ = ⌊(8 − 3 + 2 + 2) / 2⌋ = 4",
                }
            ]
        }
    )

    n: int
    kernel: int
    padding: int
    stride: int
    padding_convention: Literal["total", "per_side"]
    total_padding: int = Field(description="p in the formula: padding on both sides together.")
    output_size: int
    formula: str


def _tensor(value: Nested, name: str, dims: tuple[int, ...]) -> torch.Tensor:
    try:
        t = torch.tensor(value, dtype=torch.float64)
    except (ValueError, TypeError, RuntimeError):
        raise BadRequestError(
            f"{name} must be a rectangular nested list of numbers (no ragged rows)"
        ) from None
    if t.dim() not in dims:
        raise BadRequestError(
            f"{name} must have {' or '.join(str(d) for d in dims)} dimensions; got {t.dim()}"
        )
    if t.numel() == 0:
        raise BadRequestError(f"{name} must not be empty")
    if not torch.isfinite(t).all():
        raise BadRequestError(f"{name} must hold finite numbers")
    if t.dim() >= 2 and (t.shape[-1] > MAX_SIDE or t.shape[-2] > MAX_SIDE):
        raise InputTooLargeError(f"{name}'s sides must be at most {MAX_SIDE}; got {list(t.shape)}")
    if t.dim() >= 3 and any(d > MAX_CHANNELS for d in t.shape[:-2]):
        raise InputTooLargeError(
            f"{name} may have at most {MAX_CHANNELS} channels; got {list(t.shape)}"
        )
    return t


def _out(t: torch.Tensor) -> list[Any]:
    out: list[Any] = t.tolist()
    return out


@router.post(
    "/corr2d",
    summary="Cross-correlate an input with a kernel",
    description="The seed's `corr2d` (2-D X and K), `corr2d_multi_in` (X (c_i, h, w), "
    "K (c_i, kh, kw)) or `corr2d_multi_in_out` (K (c_o, c_i, kh, kw); a 1×1 kernel is computed "
    "as a matrix product, `corr2d_multi_in_out_1x1`). Sides ≤ 64, channels ≤ 16, and at most "
    f"{MAX_WINDOWS} windows (output cells × channels).",
    response_model=TensorOut,
    responses=problem_responses(422, s422="K has 2 channels but X has 3"),
)
def post_corr2d(body: Corr2dRequest) -> TensorOut:
    x = _tensor(body.X, "X", (2, 3))
    k = _tensor(body.K, "K", (2, 3, 4))
    if x.dim() == 2 and k.dim() != 2:
        raise BadRequestError("a 2-D X takes a 2-D K; give X channels (c_i, h, w) for a 3-D/4-D K")
    if x.dim() == 3 and k.dim() == 2:
        raise BadRequestError("a 3-D X takes K of shape (c_i, kh, kw) or (c_o, c_i, kh, kw)")
    c_i = x.shape[0] if x.dim() == 3 else 1
    if x.dim() == 3 and k.shape[-3] != c_i:
        raise BadRequestError(f"X has {c_i} input channels but K has {k.shape[-3]}")
    kh, kw = k.shape[-2], k.shape[-1]
    oh, ow = x.shape[-2] - kh + 1, x.shape[-1] - kw + 1
    if oh < 1 or ow < 1:
        raise BadRequestError(
            f"the kernel ({kh}×{kw}) is larger than the input ({x.shape[-2]}×{x.shape[-1]})"
        )
    c_o = k.shape[0] if k.dim() == 4 else 1
    if oh * ow * c_i * c_o > MAX_WINDOWS:
        raise InputTooLargeError(
            f"this needs {oh * ow * c_i * c_o} windows; the limit is {MAX_WINDOWS}"
        )
    if k.dim() == 2:
        op, y = "corr2d", ops.corr2d(x, k)
    elif k.dim() == 3:
        op, y = "corr2d_multi_in", ops.corr2d_multi_in(x, k)
    elif kh == 1 and kw == 1:
        op, y = "corr2d_multi_in_out_1x1", ops.corr2d_multi_in_out_1x1(x, k)
    else:
        op, y = "corr2d_multi_in_out", ops.corr2d_multi_in_out(x, k)
    return TensorOut(op=op, shape=list(y.shape), Y=_out(y))


@router.post(
    "/pool2d",
    summary="Pool an input with max or average",
    description="The seed's `pool2d`: a window of `pool_size` slides with stride 1 and takes "
    "the maximum or the average. X is 2-D with sides ≤ 64.",
    response_model=TensorOut,
    responses=problem_responses(422, s422="the window (4×4) is larger than X (3×3)"),
)
def post_pool2d(body: Pool2dRequest) -> TensorOut:
    x = _tensor(body.X, "X", (2,))
    ph, pw = (body.pool_size, body.pool_size) if isinstance(body.pool_size, int) else body.pool_size
    if ph > x.shape[0] or pw > x.shape[1]:
        raise BadRequestError(
            f"the window ({ph}×{pw}) is larger than X ({x.shape[0]}×{x.shape[1]})"
        )
    y = ops.pool2d(x, (ph, pw), body.mode)
    return TensorOut(op="pool2d", shape=list(y.shape), Y=_out(y))


@router.get(
    "/output-size",
    summary="Compute a convolution's output size",
    description="One side of a convolution's or pooling's output: ⌊(n − k + p + s)/s⌋ (D2L "
    "7.3), where p is the padding of both sides together. PyTorch's `nn.Conv2d(padding=1)` "
    "pads one row on each side, p = 2: pass `padding_convention=per_side` to give it that way.",
    response_model=OutputSizeOut,
    responses=problem_responses(422, s422="the kernel (9) is larger than the padded input (8)"),
)
def get_output_size(
    n: Annotated[int, Query(ge=1, le=1_000_000, description="Input size of the side.")],
    kernel: Annotated[int, Query(ge=1, le=1_000_000, description="Kernel size k.")],
    padding: Annotated[int, Query(ge=0, le=1_000_000, description="Padding (see convention).")] = 0,
    stride: Annotated[int, Query(ge=1, le=1_000_000, description="Stride s.")] = 1,
    padding_convention: Annotated[
        Literal["total", "per_side"],
        Query(description="`total`: p as in D2L (both sides); `per_side`: as nn.Conv2d's."),
    ] = "total",
) -> OutputSizeOut:
    p = padding if padding_convention == "total" else 2 * padding
    if kernel > n + p:
        raise BadRequestError(f"the kernel ({kernel}) is larger than the padded input ({n + p})")
    size = ops.output_size(n, kernel, p, stride)
    return OutputSizeOut(
        n=n,
        kernel=kernel,
        padding=padding,
        stride=stride,
        padding_convention=padding_convention,
        total_padding=p,
        output_size=size,
        formula=f"⌊(n − k + p + s) / s⌋ = ⌊({n} − {kernel} + {p} + {stride}) / {stride}⌋ = {size}",
    )
