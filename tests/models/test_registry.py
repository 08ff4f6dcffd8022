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
    DenseBlock,
    DuplicateModelError,
    Inception,
    ModelEntry,
    Residual,
    ResNeXtBlock,
    ShapeError,
    UnknownModelError,
    build_model,
    get_model_entry,
    lenet,
    list_models,
    min_input_size,
    register_model,
    summarize,
)

#: Every network in registration order: the seed's three first, then the rest of chapter 8.
ZOO = [
    "lenet",
    "vgg",
    "resnet18",
    "alexnet",
    "nin",
    "googlenet",
    "bn_lenet",
    "densenet",
    "regnetx32",
]


def test_the_zoo_lists_the_seed_networks_first_then_the_rest_of_chapter_8() -> None:
    assert list_models() == ZOO


@pytest.mark.parametrize(
    ("name", "input_size", "lr", "section"),
    [
        ("lenet", 28, 0.1, "7.6"),
        ("vgg", 224, 0.01, "8.2"),
        ("resnet18", 96, 0.01, "8.6"),
        # the book's recipes (the table): lr and the resize of each section
        ("alexnet", 224, 0.01, "8.1"),
        ("nin", 224, 0.05, "8.3"),
        ("googlenet", 96, 0.01, "8.4"),
        ("bn_lenet", 28, 0.1, "8.5"),
        ("densenet", 96, 0.01, "8.7"),
        ("regnetx32", 96, 0.05, "8.8"),
    ],
)
def test_entries_carry_the_book_recipe(name: str, input_size: int, lr: float, section: str) -> None:
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
        call("mobilenet")  # type: ignore[operator]
    message = str(info.value)
    assert "mobilenet" in message
    for known in ZOO:
        assert known in message
    assert info.value.known == ZOO
    assert isinstance(info.value, LookupError)


def test_unknown_model_in_a_summary_is_the_same_error() -> None:
    with pytest.raises(UnknownModelError, match="known models: lenet, vgg, resnet18, alexnet"):
        summarize("googlenet-v3", (1, 1, 224, 224))


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
    assert list_models() == ZOO


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
        ("vgg", {"num_convs": 1}, "a name or \\[count, channels\\] pairs"),
        # the book's AlexNet, NiN, GoogLeNet and BNLeNet take only lr and num_classes
        ("alexnet", [[1, 64]], "fixed architecture"),
        ("nin", {"blocks": 3}, "fixed architecture"),
        ("googlenet", "small", "fixed architecture"),
        ("bn_lenet", [[1, 6]], "fixed architecture"),
        ("densenet", "densenet121", "named archs: book"),
        ("densenet", [[4, 32]], "a name or an object"),
        ("densenet", {"growth": 32}, "has no 'growth'; it takes num_channels, growth_rate"),
        ("densenet", {"growth_rate": 0}, "growth_rate must be 1-128"),
        ("densenet", {"growth_rate": 8.5}, "growth_rate must be an integer"),
        ("densenet", {"growth_rate": True}, "growth_rate must be an integer"),
        ("densenet", {"arch": []}, "1 to 5 dense blocks"),
        ("densenet", {"arch": [4, 0]}, "dense block 1 convolutions must be 1-24"),
        ("densenet", {"arch": "4444"}, "1 to 5 dense blocks"),
        ("regnetx32", "regnetx64", "named archs: regnetx32"),
        ("regnetx32", [[4, 32, 16, 1]], "a name or an object"),
        ("regnetx32", {"stem": 32}, "has no 'stem'; it takes stem_channels and arch"),
        ("regnetx32", {"arch": [[4, 32, 16]]}, "stage 0 must be \\[depth, num_channels"),
        ("regnetx32", {"arch": [[4, 32, 16, 1], [0, 80, 16, 1]]}, "stage 1 depth must be 1-16"),
        ("regnetx32", {"arch": [[4, 32, 16, 0]]}, "bot_mul must be a number in \\(0, 4\\]"),
        ("regnetx32", {"arch": [[4, 50, 16, 1]]}, "50 bottleneck channels .* groups 16 wide"),
        ("regnetx32", {"arch": [[4, 8, 16, 1]]}, "8 bottleneck channels .* groups 16 wide"),
        ("regnetx32", {"stem_channels": 0}, "stem_channels must be 1-512"),
        ("regnetx32", {"arch": [[1, 16, 16, 1]] * 7}, "1 to 6 stages"),
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


#: Networks the book trains after `apply_init(..., d2l.init_cnn)`: Xavier-uniform weights.
XAVIER = [
    ("lenet", None),
    ("vgg", "small"),
    ("resnet18", None),
    ("nin", None),
    ("googlenet", None),
    ("bn_lenet", None),
]
#: Networks whose book code applies `init_cnn` only while its layers are lazy (a no-op) and
#: trains without `apply_init`: PyTorch's default initialisation.
PYTORCH_DEFAULT = ["alexnet", "densenet", "regnetx32"]


@pytest.mark.parametrize(("name", "arch"), XAVIER)
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


@pytest.mark.parametrize("name", PYTORCH_DEFAULT)
def test_networks_the_book_leaves_uninitialised_keep_pytorch_defaults(name: str) -> None:
    # PyTorch's default for Conv2d and Linear: Kaiming-uniform with a = √5, i.e. weights in
    # ±1/√fan_in, well above Xavier's bound for these layers
    torch.manual_seed(0)
    model = build_model(name, input_size=96 if name != "alexnet" else 224)
    checked, telling = 0, 0
    for module in model.modules():
        if not isinstance(module, nn.Conv2d | nn.Linear) or module.weight.numel() < 4_000:
            continue
        weight = module.weight.detach()
        bound = 1 / math.sqrt(weight[0].numel())
        assert float(weight.abs().max()) <= bound + 1e-7, module
        assert float(weight.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05), module
        # layers where Xavier's spread differs enough for this test to tell them apart
        telling += abs(_xavier_bound(weight) / bound - 1) > 0.2
        checked += 1
    assert checked > 0 and telling > 0


@pytest.mark.parametrize(
    ("name", "arch", "smallest"),
    [
        ("lenet", None, 12),
        ("vgg", None, 32),  # five 2×2 max-pools
        ("vgg", [[1, 8], [1, 8]], 4),
        ("resnet18", None, 1),
        ("alexnet", None, 65),  # the numbers
        ("nin", None, 67),
        ("googlenet", None, 1),
        ("bn_lenet", None, 16),
        ("densenet", None, 29),  # three transitions after a stem that divides by four
        ("densenet", {"arch": [4, 4]}, 5),
        ("regnetx32", None, 1),
    ],
)
def test_the_smallest_input_each_network_takes(name: str, arch: object, smallest: int) -> None:
    assert min_input_size(name, arch) == smallest  # type: ignore[arg-type]
    summarize(name, (1, 1, smallest, smallest), arch=arch)  # type: ignore[arg-type]
    if smallest > 1:
        with pytest.raises(ShapeError):
            summarize(name, (1, 1, smallest - 1, smallest - 1), arch=arch)  # type: ignore[arg-type]
    assert min_input_size(name, arch, at_least=28) == max(28, smallest)  # type: ignore[arg-type]


def test_a_network_no_size_fits_has_no_smallest_input() -> None:
    deep_vgg = [[1, 4]] * 8  # halves eight times, but its arch is still valid
    assert min_input_size("vgg", deep_vgg) == 256
    assert min_input_size("densenet", {"arch": [1] * 5}) == 61


@pytest.mark.parametrize(
    ("name", "arch", "as_json"),
    [
        ("vgg", "vgg11", [[1, 64], [1, 128], [2, 256], [2, 512], [2, 512]]),
        ("densenet", None, {"num_channels": 64, "growth_rate": 32, "arch": [4, 4, 4, 4]}),
        (
            "densenet",
            {"growth_rate": 12},
            {"num_channels": 64, "growth_rate": 12, "arch": [4, 4, 4, 4]},
        ),
        (
            "regnetx32",
            "regnetx32",
            {"stem_channels": 32, "arch": [[4, 32, 16, 1], [6, 80, 16, 1]]},
        ),
        (
            "regnetx32",
            {"arch": [[2, 48, 16, 0.5]]},
            {"stem_channels": 32, "arch": [[2, 48, 16, 0.5]]},
        ),
        (
            "regnetx32",
            {"arch": [[2, 48, 16, 1.0]]},
            {"stem_channels": 32, "arch": [[2, 48, 16, 1]]},
        ),
        ("alexnet", None, None),
    ],
)
def test_an_arch_resolves_to_one_json_form_that_resolves_to_itself(
    name: str, arch: object, as_json: object
) -> None:
    entry = get_model_entry(name)
    assert entry.arch_json(arch) == as_json  # type: ignore[arg-type]
    if as_json is not None:
        assert entry.resolve_arch(as_json) == entry.resolve_arch(arch)  # type: ignore[arg-type]
        assert entry.arch_json(as_json) == as_json  # type: ignore[arg-type]
        hash(entry.resolve_arch(arch))  # type: ignore[arg-type]  # shape checks cache by it


def test_densenet_takes_the_book_parameters() -> None:
    model = build_model("densenet", arch={"growth_rate": 8, "arch": [2, 3]})
    blocks = [m for m in model.modules() if isinstance(m, DenseBlock)]
    assert [b.out_channels for b in blocks] == [64 + 2 * 8, 40 + 3 * 8]
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 40, 40)).shape == (2, 10)


def test_densenet_num_channels_sets_the_transitions_as_the_book_code_does() -> None:
    # the book's b1 has 64 channels whatever num_channels says; num_channels only starts the
    # arithmetic of the transition blocks' widths: (32 + 4 × 32) // 2 = 80 after block one
    summary = summarize("densenet", (1, 1, 96, 96), arch={"num_channels": 32})
    assert [row.output_shape[1] for row in summary.layers[:4]] == [64, 192, 80, 208]


def test_anynet_stages_follow_the_arch_and_the_first_block_of_each_halves_the_size() -> None:
    arch = {"stem_channels": 16, "arch": [[1, 16, 8, 0.5], [2, 48, 16, 1], [1, 64, 32, 2]]}
    summary = summarize("regnetx32", (1, 1, 64, 64), arch=arch)
    assert [row.output_shape for row in summary.layers] == [
        (1, 16, 32, 32),
        (1, 16, 16, 16),
        (1, 48, 8, 8),
        (1, 64, 4, 4),
        (1, 10),
    ]
    model = build_model("regnetx32", arch=arch)
    blocks = [m for m in model.modules() if isinstance(m, ResNeXtBlock)]
    # groups is the group width: 8 bottleneck channels / 8 = 1 group, 48 / 16 = 3, 128 / 32 = 4
    assert [b.conv2.groups for b in blocks] == [1, 3, 3, 4]
    assert [b.conv2.out_channels for b in blocks] == [8, 48, 48, 128]
    assert [b.conv4 is not None for b in blocks] == [True, True, False, True]


def test_inception_concatenates_its_four_branches() -> None:
    block = Inception(64, (96, 128), (16, 32), 32, in_channels=192)
    assert block(torch.zeros(2, 192, 12, 12)).shape == (2, 64 + 128 + 32 + 32, 12, 12)
