"""The registry, the networks' construction, and d2l's Xavier-uniform init."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models import (
    CLASSES,
    VGG_11,
    VGG_SMALL,
    ArchError,
    DuplicateModelError,
    ModelEntry,
    Residual,
    UnknownModelError,
    build_model,
    get_model_entry,
    lenet,
    list_models,
    register_model,
    summarize,
)


def test_the_zoo_lists_the_three_networks_of_the_seed() -> None:
    assert list_models() == ["lenet", "vgg", "resnet18"]


@pytest.mark.parametrize(
    ("name", "input_size", "lr", "section"),
    [("lenet", 28, 0.1, "7.6"), ("vgg", 224, 0.01, "8.2"), ("resnet18", 96, 0.01, "8.6")],
)
def test_entries_carry_the_seed_recipe(name: str, input_size: int, lr: float, section: str) -> None:
    entry = get_model_entry(name)
    assert (entry.name, entry.input_size, entry.lr, entry.section) == (
        name,
        input_size,
        lr,
        section,
    )
    assert entry.description


def test_vgg_default_arch_is_the_seed_training_arch_and_vgg11_is_named() -> None:
    entry = get_model_entry("vgg")
    assert entry.resolve_arch(None) == VGG_SMALL == ((1, 16), (1, 32), (2, 64), (2, 128), (2, 128))
    assert (
        entry.resolve_arch("vgg11") == VGG_11 == ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))
    )
    assert entry.resolve_arch([[1, 8], [2, 16]]) == ((1, 8), (2, 16))  # type: ignore[arg-type]


def test_classes_are_fashion_mnist_in_label_order() -> None:
    assert CLASSES == (
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


@pytest.mark.parametrize("call", [get_model_entry, build_model])
def test_unknown_model_lists_the_known_ones(call: object) -> None:
    with pytest.raises(UnknownModelError) as info:
        call("alexnet")  # type: ignore[operator]
    message = str(info.value)
    assert "alexnet" in message
    for known in ("lenet", "vgg", "resnet18"):
        assert known in message
    assert info.value.known == ["lenet", "vgg", "resnet18"]
    assert isinstance(info.value, LookupError)


def test_unknown_model_in_a_summary_is_the_same_error() -> None:
    with pytest.raises(UnknownModelError, match="known models: lenet, vgg, resnet18"):
        summarize("googlenet", (1, 1, 224, 224))


def test_duplicate_registration_is_refused_and_keeps_the_original() -> None:
    original = get_model_entry("lenet")
    impostor = ModelEntry(
        name="lenet",
        description="not LeNet",
        factory=lenet,
        input_size=32,
        lr=1.0,
        section="0.0",
    )
    with pytest.raises(DuplicateModelError, match="lenet"):
        register_model(impostor)
    assert get_model_entry("lenet") is original
    assert list_models() == ["lenet", "vgg", "resnet18"]


@pytest.mark.parametrize(
    ("name", "arch", "match"),
    [
        ("vgg", "vgg19", "named archs: small, vgg11"),
        ("vgg", (), "1 to 8 blocks"),
        ("vgg", ((0, 16),), "num_convs"),
        ("vgg", ((1, 0),), "out_channels"),
        ("vgg", ((1, 16, 3),), "pairs"),
        ("vgg", [[1, "wide"]], "pairs"),
        ("vgg", "((1, 16))", "unknown vgg arch"),
        ("lenet", ((1, 6),), "fixed architecture"),
        ("lenet", "small", "fixed architecture"),
        ("resnet18", "resnet50", "named archs: resnet18"),
        ("resnet18", ((0, 64),), "num_residuals"),
        ("resnet18", ((2, 64),) * 7, "1 to 6 stages"),
    ],
)
def test_bad_arch_is_refused(name: str, arch: object, match: str) -> None:
    with pytest.raises(ArchError, match=match):
        build_model(name, arch=arch, device="meta")  # type: ignore[arg-type]


def test_a_bad_arch_in_a_summary_is_an_arch_error_too() -> None:
    with pytest.raises(ArchError):
        summarize("vgg", (1, 1, 224, 224), arch=((5, 16),))


def test_other_resnet_depths_are_one_table_away() -> None:
    model = build_model("resnet18", arch=((1, 64), (1, 128), (1, 256), (1, 512)))
    residuals = [m for m in model.modules() if isinstance(m, Residual)]
    assert len(residuals) == 4
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 96, 96)).shape == (2, 10)


@pytest.mark.parametrize(
    "arch",
    [((2, 32), (2, 64)), ((1, 128), (1, 256)), ((2, 64), (2, 64)), ((1, 96),)],
    ids=["narrow-first-stage", "wide-first-stage", "no-downsampling", "one-stage"],
)
def test_a_resnet_stage_table_of_any_widths_builds_and_trains(
    arch: tuple[tuple[int, int], ...],
) -> None:
    # the first stage changing the stem's 64 channels needs a 1×1 shortcut, as torchvision's
    # BasicBlock has wherever channels or stride change
    model = build_model("resnet18", arch=arch).train()
    loss = model(torch.randn(4, 1, 64, 64)).logsumexp(dim=1).mean()
    loss.backward()
    assert summarize("resnet18", (1, 1, 64, 64), arch=arch).layers[-1].output_shape == (1, 10)
    for block in (m for m in model.modules() if isinstance(m, Residual)):
        changes = block.conv1.in_channels != block.conv1.out_channels or block.conv1.stride != (
            1,
            1,
        )
        assert (block.conv3 is not None) is changes


def test_the_seed_resnet18_keeps_its_shortcuts_where_the_book_puts_them() -> None:
    model = build_model("resnet18")
    shortcuts = [name for name, m in model.named_modules() if isinstance(m, Residual) and m.conv3]
    assert shortcuts == ["net.b3.0", "net.b4.0", "net.b5.0"]
    assert sum(p.numel() for p in model.parameters()) == 11_178_378


def test_build_on_meta_allocates_nothing() -> None:
    model = build_model("vgg", arch="vgg11", device="meta")
    assert all(p.is_meta for p in model.parameters())


def test_layers_have_explicit_sizes_so_a_state_dict_loads_without_a_forward() -> None:
    for name in list_models():
        model = build_model(name)
        assert not any(isinstance(m, nn.modules.lazy.LazyModuleMixin) for m in model.modules())
        again = build_model(name)
        again.load_state_dict(model.state_dict())
        for (key, a), b in zip(
            model.state_dict().items(), again.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), key


@pytest.mark.parametrize("num_classes", [2, 10, 37])
def test_num_classes_sets_the_head(num_classes: int) -> None:
    summary = summarize("resnet18", (1, 1, 96, 96), num_classes=num_classes)
    assert summary.layers[-1].output_shape == (1, num_classes)


def test_residual_blocks_keep_or_halve_shapes_as_in_the_seed() -> None:
    x = torch.randn(4, 3, 6, 6)
    assert Residual(3)(x).shape == (4, 3, 6, 6)
    assert Residual(6, use_1x1conv=True, strides=2, in_channels=3)(x).shape == (4, 6, 3, 3)


def _xavier_bound(weight: torch.Tensor) -> float:
    receptive = weight[0][0].numel() if weight.dim() > 2 else 1
    fan_in = weight.shape[1] * receptive
    fan_out = weight.shape[0] * receptive
    return math.sqrt(6.0 / (fan_in + fan_out))


@pytest.mark.parametrize(("name", "arch"), [("lenet", None), ("vgg", "small"), ("resnet18", None)])
def test_conv_and_linear_weights_are_xavier_uniform(name: str, arch: str | None) -> None:
    torch.manual_seed(0)
    model = build_model(name, arch=arch)
    checked = 0
    for module in model.modules():
        if type(module) not in (nn.Conv2d, nn.Linear):
            continue
        assert isinstance(module, nn.Conv2d | nn.Linear)
        weight = module.weight.detach()
        bound = _xavier_bound(weight)
        biggest = float(weight.abs().max())
        assert biggest <= bound + 1e-7, module
        # Even LeNet's smallest layer (150 weights) reaches 90 % of the bound with p > 1 − 1e-6.
        assert biggest >= 0.9 * bound, module
        if weight.numel() >= 10_000:
            # Uniform(−b, b) has standard deviation b/√3.
            assert float(weight.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)
            assert abs(float(weight.mean())) < 0.05 * bound
        checked += 1
    assert checked > 0


def test_lenet_last_layer_bound_is_the_textbook_number() -> None:
    torch.manual_seed(0)
    head = build_model("lenet").net[-1]  # type: ignore[index]
    assert isinstance(head, nn.Linear)
    bound = math.sqrt(6 / (84 + 10))
    biggest = float(head.weight.detach().abs().max())
    assert biggest == pytest.approx(bound, rel=0.05)
    assert biggest <= bound
