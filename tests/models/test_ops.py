"""The seed's primitives (D2L 7.2–7.5) reproduce the seed's printed numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from models.ops import (
    conv_output_shape,
    corr2d,
    corr2d_multi_in,
    corr2d_multi_in_out,
    corr2d_multi_in_out_1x1,
    output_size,
    pool2d,
)

# The book's 7.4 inputs: two channels of 3×3 and a two-channel 2×2 kernel.
X_74 = torch.tensor(
    [
        [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0]],
        [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]],
    ]
)
K_74 = torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[1.0, 2.0], [3.0, 4.0]]])


def _edge_image() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.ones((6, 8))
    x[:, 2:6] = 0
    return x, torch.tensor([[1.0, -1.0]])


# --- 7.2 cross-correlation -------------------------------------------------------------------


def test_corr2d_on_the_book_example() -> None:
    x = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0]])
    k = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    assert torch.equal(corr2d(x, k), torch.tensor([[19.0, 25.0], [37.0, 43.0]]))


def test_edge_detection_marks_white_to_black_with_1_and_black_to_white_with_minus_1() -> None:
    x, k = _edge_image()
    y = corr2d(x, k)
    expected = torch.zeros((6, 7))
    expected[:, 1] = 1.0
    expected[:, 5] = -1.0
    assert torch.equal(y, expected)
    # The horizontal kernel sees no edge in the transposed image.
    assert torch.equal(corr2d(x.t(), k), torch.zeros((8, 5)))


def test_corr2d_output_size_is_n_minus_k_plus_1() -> None:
    y = corr2d(torch.rand(7, 9), torch.rand(3, 4))
    assert y.shape == (7 - 3 + 1, 9 - 4 + 1)


def test_corr2d_matches_torch_conv2d() -> None:
    torch.manual_seed(0)
    x, k = torch.randn(6, 7), torch.randn(3, 2)
    reference = F.conv2d(x[None, None], k[None, None])[0, 0]
    assert torch.allclose(corr2d(x, k), reference, atol=1e-5)


def test_learning_the_edge_kernel_with_the_seed_loop_lands_near_1_minus_1() -> None:
    torch.manual_seed(0)
    x, k = _edge_image()
    y = corr2d(x, k)
    conv2d = nn.Conv2d(1, 1, kernel_size=(1, 2), bias=False)
    x = x.reshape((1, 1, 6, 8))
    y = y.reshape((1, 1, 6, 7))
    lr = 3e-2
    losses = []
    for _ in range(10):
        y_hat = conv2d(x)
        loss = (y_hat - y) ** 2
        conv2d.zero_grad()
        loss.sum().backward()
        assert conv2d.weight.grad is not None
        conv2d.weight.data[:] -= lr * conv2d.weight.grad
        losses.append(float(loss.sum().detach()))
    learned = conv2d.weight.data.reshape((1, 2))
    assert torch.allclose(learned, torch.tensor([[1.0, -1.0]]), atol=0.1), learned
    # The seed printed losses 4.554 → 0.017 over epochs 2..10: it falls steadily.
    assert losses[-1] < losses[1] / 10
    assert losses[-1] < 0.1


# --- 7.3 padding and stride ------------------------------------------------------------------

# (kernel_size, padding per side, stride) → output for an 8×8 input, as the seed printed them.
SHAPE_TABLE = [
    pytest.param(3, 1, 1, (8, 8), id="k3-p1"),
    pytest.param((5, 3), (2, 1), 1, (8, 8), id="k5x3-p2x1"),
    pytest.param(3, 1, 2, (4, 4), id="k3-p1-s2"),
    pytest.param((3, 5), (0, 1), (3, 4), (2, 2), id="k3x5-p0x1-s3x4"),
]


def _comp_conv2d(conv2d: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The seed's `comp_conv2d`: add batch and channel dimensions, run, strip them."""
    y = conv2d(x.reshape((1, 1, *x.shape)))
    return y.reshape(y.shape[2:])


@pytest.mark.parametrize(("kernel", "padding", "stride", "expected"), SHAPE_TABLE)
def test_padding_and_stride_table_with_nn_conv2d(
    kernel: int | tuple[int, int],
    padding: int | tuple[int, int],
    stride: int | tuple[int, int],
    expected: tuple[int, int],
) -> None:
    conv2d = nn.Conv2d(1, 1, kernel_size=kernel, padding=padding, stride=stride)
    with torch.no_grad():
        assert _comp_conv2d(conv2d, torch.rand(size=(8, 8))).shape == torch.Size(expected)


@pytest.mark.parametrize(("kernel", "padding", "stride", "expected"), SHAPE_TABLE)
def test_padding_and_stride_table_with_the_arithmetic(
    kernel: int | tuple[int, int],
    padding: int | tuple[int, int],
    stride: int | tuple[int, int],
    expected: tuple[int, int],
) -> None:
    assert conv_output_shape((8, 8), kernel, padding, stride) == expected
    (kh, kw), (ph, pw), (sh, sw) = (
        (v, v) if isinstance(v, int) else v for v in (kernel, padding, stride)
    )
    # output_size takes the total padding p_h of ⌊(n − k + p + s)/s⌋, both sides together.
    assert (output_size(8, kh, 2 * ph, sh), output_size(8, kw, 2 * pw, sw)) == expected


def test_output_size_is_the_floor_formula() -> None:
    assert output_size(8, 3) == 6  # n − k + 1 without padding or stride
    assert output_size(8, 3, padding=2) == 8  # p = k − 1 keeps the size
    assert output_size(8, 3, padding=2, stride=2) == 4
    assert output_size(7, 3, padding=0, stride=2) == 3  # ⌊(7 − 3 + 0 + 2)/2⌋
    assert output_size(2, 5) == -2  # a window larger than the input: nothing fits


@pytest.mark.parametrize(
    ("n", "k", "p", "s"),
    [(8, 0, 0, 1), (8, 3, -1, 1), (8, 3, 0, 0), (-1, 3, 0, 1)],
)
def test_output_size_refuses_impossible_arguments(n: int, k: int, p: int, s: int) -> None:
    with pytest.raises(ValueError):
        output_size(n, k, p, s)


@pytest.mark.parametrize("size", [5, 8, 13, 28])
@pytest.mark.parametrize(("k", "p", "s"), [(1, 0, 1), (3, 1, 1), (5, 2, 2), (7, 3, 2), (3, 0, 3)])
def test_the_arithmetic_agrees_with_torch(size: int, k: int, p: int, s: int) -> None:
    conv = nn.Conv2d(1, 1, kernel_size=k, padding=p, stride=s)
    with torch.no_grad():
        shape = tuple(conv(torch.zeros(1, 1, size, size)).shape[2:])
    assert conv_output_shape((size, size), k, p, s) == shape


# --- 7.4 multiple input and output channels --------------------------------------------------


def test_corr2d_multi_in_sums_over_input_channels() -> None:
    assert torch.equal(corr2d_multi_in(X_74, K_74), torch.tensor([[56.0, 72.0], [104.0, 120.0]]))


def test_corr2d_multi_in_refuses_a_channel_mismatch() -> None:
    with pytest.raises(ValueError, match="channels"):
        corr2d_multi_in(X_74, K_74[:1])


def test_corr2d_multi_in_out_gives_the_seed_three_outputs() -> None:
    k = torch.stack((K_74, K_74 + 1, K_74 + 2), 0)
    assert k.shape == torch.Size([3, 2, 2, 2])
    expected = torch.tensor(
        [
            [[56.0, 72.0], [104.0, 120.0]],
            [[76.0, 100.0], [148.0, 172.0]],
            [[96.0, 128.0], [192.0, 224.0]],
        ]
    )
    assert torch.equal(corr2d_multi_in_out(X_74, k), expected)
    assert torch.allclose(F.conv2d(X_74[None], k)[0], expected)


def test_1x1_convolution_is_a_matrix_product() -> None:
    torch.manual_seed(0)
    x = torch.normal(0, 1, (3, 3, 3))
    k = torch.normal(0, 1, (2, 3, 1, 1))
    y1 = corr2d_multi_in_out_1x1(x, k)
    y2 = corr2d_multi_in_out(x, k)
    assert y1.shape == y2.shape == (2, 3, 3)
    assert float(torch.abs(y1 - y2).sum()) < 1e-6
    assert torch.allclose(y1, F.conv2d(x[None], k)[0], atol=1e-6)


# --- 7.5 pooling -----------------------------------------------------------------------------

X_75 = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0]])


def test_pool2d_max_on_the_seed_example() -> None:
    assert torch.equal(pool2d(X_75, (2, 2)), torch.tensor([[4.0, 5.0], [7.0, 8.0]]))


def test_pool2d_avg_on_the_seed_example() -> None:
    assert torch.equal(pool2d(X_75, (2, 2), "avg"), torch.tensor([[2.0, 3.0], [5.0, 6.0]]))


def test_pool2d_agrees_with_torch_pools_at_stride_1() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 6)
    assert torch.equal(pool2d(x, (2, 3)), nn.MaxPool2d((2, 3), stride=1)(x[None, None])[0, 0])
    assert torch.allclose(
        pool2d(x, (2, 3), "avg"), nn.AvgPool2d((2, 3), stride=1)(x[None, None])[0, 0]
    )


def test_pool2d_refuses_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="mode"):
        pool2d(X_75, (2, 2), "min")  # type: ignore[arg-type]


def _x_4x4() -> torch.Tensor:
    return torch.arange(16, dtype=torch.float32).reshape((1, 1, 4, 4))


@pytest.mark.parametrize(
    ("pool", "expected"),
    [
        pytest.param(nn.MaxPool2d(3), [[[[10.0]]]], id="k3"),
        pytest.param(
            nn.MaxPool2d(3, padding=1, stride=2), [[[[5.0, 7.0], [13.0, 15.0]]]], id="k3-p1-s2"
        ),
        pytest.param(
            nn.MaxPool2d((2, 3), stride=(2, 3), padding=(0, 1)),
            [[[[5.0, 7.0], [13.0, 15.0]]]],
            id="k2x3-s2x3-p0x1",
        ),
    ],
)
def test_every_maxpool2d_example_of_7_5(pool: nn.MaxPool2d, expected: list[object]) -> None:
    y = pool(_x_4x4())
    assert torch.equal(y, torch.tensor(expected))
    k, p, s = pool.kernel_size, pool.padding, pool.stride
    assert conv_output_shape((4, 4), k, p, s) == tuple(y.shape[2:])


def test_maxpool2d_pools_each_channel_separately() -> None:
    x = _x_4x4()
    x = torch.cat((x, x + 1), 1)
    assert x.shape == (1, 2, 4, 4)
    y = nn.MaxPool2d(3, padding=1, stride=2)(x)
    assert torch.equal(y, torch.tensor([[[[5.0, 7.0], [13.0, 15.0]], [[6.0, 8.0], [14.0, 16.0]]]]))
