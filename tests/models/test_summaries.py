"""Shape summaries reproduce the book's `layer_summary` printouts and parameter counts."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from models import ShapeError, Summary, build_model, summarize
from tests.book_printouts import (
    ALEXNET_224,
    BN_LENET_28,
    BOOK_NUMBERS,
    DENSENET_96,
    GOOGLENET_96,
    NIN_224,
    REGNETX32_96,
)
from tests.seed_printouts import LENET_28, RESNET18_96, VGG11_224

SEED_CASES = [
    pytest.param("lenet", None, (1, 1, 28, 28), LENET_28, id="lenet-28"),
    pytest.param("vgg", "vgg11", (1, 1, 224, 224), VGG11_224, id="vgg11-224"),
    pytest.param("resnet18", None, (1, 1, 96, 96), RESNET18_96, id="resnet18-96"),
    pytest.param("alexnet", None, (1, 1, 224, 224), ALEXNET_224, id="alexnet-224"),
    pytest.param("nin", None, (1, 1, 224, 224), NIN_224, id="nin-224"),
    pytest.param("googlenet", None, (1, 1, 96, 96), GOOGLENET_96, id="googlenet-96"),
    pytest.param("bn_lenet", None, (1, 1, 28, 28), BN_LENET_28, id="bn_lenet-28"),
    pytest.param("densenet", None, (1, 1, 96, 96), DENSENET_96, id="densenet-96"),
    pytest.param("regnetx32", None, (1, 1, 96, 96), REGNETX32_96, id="regnetx32-96"),
]
#: The book's shape for each of the rest of chapter 8 (the issue's table).
BOOK_SIZES = {
    "alexnet": 224,
    "nin": 224,
    "googlenet": 96,
    "bn_lenet": 28,
    "densenet": 96,
    "regnetx32": 96,
}

# Parameter counts with one input channel and ten classes (the facts).
PARAM_CASES = [
    pytest.param("lenet", None, 28, 61_706, id="lenet-28"),
    pytest.param("vgg", "small", 224, 43_093_322, id="vgg-small-224"),
    pytest.param("vgg", "vgg11", 224, 128_806_154, id="vgg11-224"),
    pytest.param("resnet18", None, 96, 11_178_378, id="resnet18-96"),
    # the table: the book's code run at the book's shapes
    pytest.param("alexnet", None, 224, 46_764_746, id="alexnet-224"),
    pytest.param("nin", None, 224, 1_992_166, id="nin-224"),
    pytest.param("googlenet", None, 96, 5_977_530, id="googlenet-96"),
    pytest.param("bn_lenet", None, 28, 44_878, id="bn_lenet-28"),
    pytest.param("densenet", None, 96, 758_226, id="densenet-96"),
    pytest.param("regnetx32", None, 96, 179_290, id="regnetx32-96"),
]


@pytest.mark.parametrize(("name", "arch", "shape", "expected"), SEED_CASES)
def test_summary_text_reproduces_the_seed_printout(
    name: str, arch: str | None, shape: tuple[int, ...], expected: str
) -> None:
    summary = summarize(name, shape, arch=arch)
    assert summary.text == expected
    assert summary.text.splitlines()[0] == expected.splitlines()[0]


@pytest.mark.parametrize("name", list(BOOK_SIZES))
def test_each_top_level_layer_holds_the_parameters_it_holds_in_the_book(name: str) -> None:
    size = BOOK_SIZES[name]
    summary = summarize(name, (1, 1, size, size))
    book = BOOK_NUMBERS[name]
    assert [row.params for row in summary.layers] == book["rows"]
    assert summary.total_params == book["params"]


@pytest.mark.parametrize("name", list(BOOK_SIZES))
def test_the_state_dict_has_the_book_models_keys_and_shapes(name: str) -> None:
    # the same names and shapes in the same order: weights trained with the book's code load
    # into cnnserve's network, and a cnnserve checkpoint into the book's
    model = build_model(name, input_size=BOOK_SIZES[name], device="meta")
    lines = "\n".join(f"{k} {tuple(v.shape)}" for k, v in model.state_dict().items())
    assert len(model.state_dict()) == BOOK_NUMBERS[name]["tensors"]
    assert hashlib.sha256(lines.encode()).hexdigest() == BOOK_NUMBERS[name]["layout"], lines


def test_lenet_first_line_is_the_seed_line() -> None:
    line = summarize("lenet", (1, 1, 28, 28)).text.splitlines()[0]
    assert line == "Conv2d output shape:\t torch.Size([1, 6, 28, 28])"


@pytest.mark.parametrize(("name", "arch", "size", "params"), PARAM_CASES)
def test_parameter_count_from_the_summary(
    name: str, arch: str | None, size: int, params: int
) -> None:
    summary = summarize(name, (1, 1, size, size), arch=arch)
    assert summary.total_params == params
    # At depth 1 every parameter sits in exactly one top-level row.
    assert sum(row.params for row in summary.layers) == params


@pytest.mark.parametrize(("name", "arch", "size", "params"), PARAM_CASES)
def test_parameter_count_of_a_really_built_model(
    name: str, arch: str | None, size: int, params: int
) -> None:
    model = build_model(name, arch=arch, input_size=size)
    assert sum(p.numel() for p in model.parameters()) == params
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_lenet_rows_carry_params_and_multiply_adds() -> None:
    summary = summarize("lenet", (1, 1, 28, 28))
    by_type = [(row.type, row.params, row.macs) for row in summary.layers]
    assert by_type == [
        ("Conv2d", 156, 6 * 28 * 28 * 25),
        ("Sigmoid", 0, 0),
        ("AvgPool2d", 0, 0),
        ("Conv2d", 2_416, 16 * 10 * 10 * 6 * 25),
        ("Sigmoid", 0, 0),
        ("AvgPool2d", 0, 0),
        ("Flatten", 0, 0),
        ("Linear", 48_120, 400 * 120),
        ("Sigmoid", 0, 0),
        ("Linear", 10_164, 120 * 84),
        ("Sigmoid", 0, 0),
        ("Linear", 850, 84 * 10),
    ]
    assert summary.total_macs == 416_520
    assert summary.input_shape == (1, 1, 28, 28)
    assert summary.model == "lenet"
    assert [row.name for row in summary.layers] == [f"net.{i}" for i in range(12)]


def test_multiply_adds_scale_with_the_batch() -> None:
    one = summarize("lenet", (1, 1, 28, 28))
    four = summarize("lenet", (4, 1, 28, 28))
    assert four.total_macs == 4 * one.total_macs
    assert four.total_params == one.total_params
    assert four.layers[0].output_shape == (4, 6, 28, 28)


def _real_layer_shapes(model: nn.Module, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """What the seed's `layer_summary` loop sees when it runs the real network."""
    model.eval()
    x = torch.randn(*shape)
    net = model.net
    assert isinstance(net, nn.Sequential)
    shapes = []
    with torch.no_grad():
        for layer in net:
            x = layer(x)
            shapes.append(tuple(x.shape))
    return shapes


# VGG-11's real forward at 224 is heavy on two shared CPU cores; the small arch has the
# same layer structure and runs the real forward instead.
FORWARD_CASES = [
    pytest.param("lenet", None, (1, 1, 28, 28), id="lenet-28"),
    pytest.param("vgg", "small", (1, 1, 224, 224), id="vgg-small-224"),
    pytest.param("resnet18", None, (1, 1, 96, 96), id="resnet18-96"),
    pytest.param("vgg", [[1, 8], [2, 16]], (2, 1, 32, 32), id="vgg-custom-32"),
    pytest.param("resnet18", [[1, 64], [1, 128]], (2, 1, 64, 64), id="resnet10ish-64"),
    pytest.param("alexnet", None, (2, 1, 65, 65), id="alexnet-65"),
    pytest.param("nin", None, (2, 1, 67, 67), id="nin-67"),
    pytest.param("googlenet", None, (2, 1, 96, 96), id="googlenet-96"),
    pytest.param("bn_lenet", None, (2, 1, 28, 28), id="bn_lenet-28"),
    pytest.param("densenet", None, (2, 1, 96, 96), id="densenet-96"),
    pytest.param(
        "densenet", {"growth_rate": 8, "arch": [2, 3]}, (2, 1, 40, 33), id="densenet-small"
    ),
    pytest.param("regnetx32", None, (2, 1, 96, 96), id="regnetx32-96"),
    pytest.param(
        "regnetx32",
        {"stem_channels": 16, "arch": [[1, 16, 8, 0.5], [2, 48, 16, 1], [1, 64, 32, 2]]},
        (2, 1, 28, 28),
        id="anynet-three-stages",
    ),
]


@pytest.mark.parametrize(("name", "arch", "shape"), FORWARD_CASES)
def test_a_real_forward_pass_gives_the_summary_shapes(
    name: str, arch: object, shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    summary = summarize(name, shape, arch=arch)  # type: ignore[arg-type]
    model = build_model(name, arch=arch, input_size=shape[2:])  # type: ignore[arg-type]
    assert _real_layer_shapes(model, shape) == [row.output_shape for row in summary.layers]
    with torch.no_grad():
        logits = model(torch.randn(*shape))
    assert tuple(logits.shape) == summary.layers[-1].output_shape == (shape[0], 10)
    assert torch.isfinite(logits).all()


def _depth_types(summary: Summary) -> list[str]:
    return [row.type for row in summary.layers]


def test_resnet_depth_two_opens_the_stages_into_residual_blocks() -> None:
    shallow = summarize("resnet18", (1, 1, 96, 96))
    deep = summarize("resnet18", (1, 1, 96, 96), depth=2)
    assert _depth_types(deep) == [
        "Conv2d",
        "BatchNorm2d",
        "ReLU",
        "MaxPool2d",
        *["Residual"] * 8,
        "AdaptiveAvgPool2d",
        "Flatten",
        "Linear",
    ]
    residual_rows = [row for row in deep.layers if row.type == "Residual"]
    assert [row.name for row in residual_rows] == [
        f"net.b{stage}.{i}" for stage in range(2, 6) for i in range(2)
    ]
    assert [row.output_shape for row in residual_rows] == [
        (1, 64, 24, 24),
        (1, 64, 24, 24),
        (1, 128, 12, 12),
        (1, 128, 12, 12),
        (1, 256, 6, 6),
        (1, 256, 6, 6),
        (1, 512, 3, 3),
        (1, 512, 3, 3),
    ]
    assert deep.total_params == shallow.total_params == 11_178_378
    assert deep.total_macs == shallow.total_macs
    assert sum(row.params for row in deep.layers) == deep.total_params
    assert sum(row.macs for row in deep.layers) == deep.total_macs
    assert deep.layers[-1].output_shape == (1, 10)


def test_vgg_depth_two_opens_the_blocks() -> None:
    shallow = summarize("vgg", (1, 1, 224, 224), arch="vgg11")
    deep = summarize("vgg", (1, 1, 224, 224), arch="vgg11", depth=2)
    # Blocks (1,64),(1,128),(2,256),(2,512),(2,512): conv-relu pairs, then a max-pool each.
    block_types = []
    for num_convs in (1, 1, 2, 2, 2):
        block_types += ["Conv2d", "ReLU"] * num_convs + ["MaxPool2d"]
    assert _depth_types(deep)[: len(block_types)] == block_types
    assert _depth_types(deep)[len(block_types) :] == _depth_types(shallow)[5:]
    assert deep.layers[0].name == "net.0.0"
    assert deep.layers[0].output_shape == (1, 64, 224, 224)
    assert deep.total_params == shallow.total_params == 128_806_154
    assert deep.total_macs == shallow.total_macs
    assert sum(row.params for row in deep.layers) == deep.total_params


def test_lenet_has_nothing_to_open() -> None:
    assert summarize("lenet", (1, 1, 28, 28), depth=3) == summarize("lenet", (1, 1, 28, 28))


def test_depth_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="depth"):
        summarize("lenet", (1, 1, 28, 28), depth=0)


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 1, 0, 28), (1, 1, 28, 28, 1)])
def test_malformed_input_shape_is_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="input_shape"):
        summarize("lenet", shape)


def test_lenet_at_4x4_names_the_second_conv_and_says_the_input_is_too_small() -> None:
    with pytest.raises(ShapeError) as info:
        summarize("lenet", (1, 1, 4, 4))
    err = info.value
    # 4×4 → conv1 (pad 2) 4×4 → pool 2×2; conv2's 5×5 window cannot fit.
    assert (err.layer, err.layer_type) == ("net.3", "Conv2d")
    assert "5×5" in err.reason and "2×2" in err.reason
    assert "net.3" in str(err) and "Conv2d" in str(err) and "too small" in str(err)


def test_vgg_at_16x16_names_the_pool_that_runs_out_of_pixels() -> None:
    with pytest.raises(ShapeError) as info:
        summarize("vgg", (1, 1, 16, 16))
    err = info.value
    # 16 → 8 → 4 → 2 → 1 after four blocks; the fifth block's max-pool has nothing to pool.
    assert (err.layer, err.layer_type) == ("net.4.4", "MaxPool2d")
    assert "1×1" in err.reason
    assert "net.4.4" in str(err) and "MaxPool2d" in str(err) and "too small" in str(err)


@pytest.mark.parametrize(
    ("name", "size", "layer"),
    [("lenet", 28, "net.0"), ("vgg", 224, "net.0.0"), ("resnet18", 96, "net.b1.0")],
)
def test_three_channels_into_a_one_channel_model_names_the_first_conv(
    name: str, size: int, layer: str
) -> None:
    with pytest.raises(ShapeError) as info:
        summarize(name, (1, 3, size, size))
    err = info.value
    assert (err.layer, err.layer_type) == (layer, "Conv2d")
    assert "1 input channel" in err.reason and "3" in err.reason
    assert layer in str(err)


def test_a_three_channel_model_takes_three_channels() -> None:
    summary = summarize("lenet", (1, 3, 28, 28), in_channels=3)
    assert summary.layers[0].params == 6 * 3 * 25 + 6
    assert summary.layers[-1].output_shape == (1, 10)


def test_building_lenet_for_4x4_is_the_same_shape_error() -> None:
    with pytest.raises(ShapeError) as info:
        build_model("lenet", input_size=4)
    assert info.value.layer == "net.3"


@pytest.mark.parametrize(
    ("name", "size", "layer", "layer_type"),
    [
        # 64 → conv1 14 → pool 6 → conv2 6 → pool 2 → convs 2 → the last 3×3 pool cannot fit
        ("alexnet", 64, "net.12", "MaxPool2d"),
        ("nin", 66, "net.5", "MaxPool2d"),
        # 28 → b1 7 → three transitions 3, 1, and a 2×2 pool over a 1×1 input
        ("densenet", 28, "net.tran_blk3", "Sequential"),
    ],
)
def test_one_below_the_smallest_size_names_the_layer_that_runs_out(
    name: str, size: int, layer: str, layer_type: str
) -> None:
    with pytest.raises(ShapeError) as info:
        summarize(name, (1, 1, size, size))
    assert info.value.layer.startswith(layer)
    summarize(name, (1, 1, size + 1, size + 1))  # one pixel more fits


@pytest.mark.parametrize("name", ["googlenet", "regnetx32"])
def test_networks_of_strided_padded_layers_take_even_a_single_pixel(name: str) -> None:
    summary = summarize(name, (1, 1, 1, 1))
    assert summary.layers[-1].output_shape == (1, 10)


def test_densenet_depth_two_looks_through_the_dense_blocks_into_their_conv_blocks() -> None:
    # DenseBlock iterates its `net` instead of calling it, so that container never runs as a
    # whole: its conv blocks are the rows, and every parameter still sits in one row
    deep = summarize("densenet", (1, 1, 96, 96), depth=2)
    convs = [row for row in deep.layers if row.name.startswith("net.dense_blk1.")]
    assert [row.name for row in convs] == [f"net.dense_blk1.net.{i}" for i in range(4)]
    # each conv block adds the growth rate's 32 channels to all it is given
    assert [row.output_shape for row in convs] == [(1, 32, 24, 24)] * 4
    assert [row.params for row in convs] == [2 * c + 32 * (c * 9 + 1) for c in (64, 96, 128, 160)]
    assert sum(row.params for row in deep.layers) == deep.total_params == 758_226
    assert [row.name for row in deep.layers][-5:] == [f"net.last.{i}" for i in range(5)]
