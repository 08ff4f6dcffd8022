"""`/v1/models`: the zoo's networks, their default recipes and shape summaries."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from models import Arch, ArchError, get_model_entry, list_models, summarize
from service.access.auth import Allow
from service.api.problems import problem_responses
from service.errors import (
    BadRequestError,
    InputTooLargeError,
)
from workers.contracts import ArchOverride, min_job_input_size

router = APIRouter(prefix="/models", tags=["models"], dependencies=[Allow("read")])

#: Bounds on summary input shapes (N, C, H, W): summaries run on the meta device, but a shape
#: still costs hook calls and bookkeeping, so absurd ones are refused.
MAX_N, MAX_C, MAX_HW = 64, 16, 1024
MAX_DEPTH = 4
DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 128


class Recipe(BaseModel):
    """The book's training recipe for a model: what a job gets when it sets nothing."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"input_size": 28, "lr": 0.1, "epochs": 10, "batch_size": 128}]
        }
    )

    input_size: int = Field(description="Images are resized to this square side.")
    lr: float = Field(description="Learning rate of plain SGD.")
    epochs: int = Field(description="Passes over the training set.")
    batch_size: int = Field(description="Examples per SGD step.")


_LENET_INFO: dict[str, Any] = {
    "name": "lenet",
    "description": "LeNet-5 (D2L 7.6): two sigmoid conv layers with average pooling, "
    "then a 120-84-10 dense head.",
    "section": "7.6",
    "default_recipe": {"input_size": 28, "lr": 0.1, "epochs": 10, "batch_size": 128},
    "parameters": 61706,
    "min_input_size": 28,
    "default_arch": None,
    "archs": {},
    "arch_form": None,
}


class ModelInfo(BaseModel):
    """A registered network."""

    model_config = ConfigDict(json_schema_extra={"examples": [_LENET_INFO]})

    name: str = Field(description="The name jobs and summaries use.")
    description: str = Field(description="What the network is, after the book.")
    section: str = Field(description="The section of Dive into Deep Learning that defines it.")
    default_recipe: Recipe
    parameters: int = Field(description="Parameters at the default input size and arch.")
    min_input_size: int = Field(
        description="The smallest input_size a job trains it at (default arch): 28, "
        "Fashion-MNIST's own side, or the smallest side all its layers take where that is more."
    )
    default_arch: str | None = Field(description="The arch jobs train unless told otherwise.")
    archs: dict[str, list[list[int]] | dict[str, Any]] = Field(
        description="Named archs, as an override writes them: [[count, channels], ...] per "
        "stage (vgg, resnet18) or the book's constructor parameters (densenet, regnetx32)."
    )
    arch_form: str | None = Field(
        description="How an arch override is written for this model; null: it takes none."
    )


class ModelList(BaseModel):
    """Every registered network."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"models": [_LENET_INFO]}]})

    models: list[ModelInfo]


class LayerSummary(BaseModel):
    """One layer of a shape summary."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "net.0",
                    "type": "Conv2d",
                    "output_shape": [1, 6, 28, 28],
                    "params": 156,
                    "macs": 117600,
                }
            ]
        }
    )

    name: str = Field(description="The layer's path in the module tree.", examples=["net.0"])
    type: str = Field(description="The layer's class.", examples=["Conv2d"])
    output_shape: list[int] = Field(description="Its output shape.", examples=[[1, 6, 28, 28]])
    params: int = Field(description="Its parameters.", examples=[156])
    macs: int = Field(description="Its multiply-adds for this input.", examples=[117600])


class SummaryOut(BaseModel):
    """A network's layers and their output shapes for one input shape, as d2l prints them."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "lenet",
                    "input_shape": [1, 1, 28, 28],
                    "layers": [
                        {
                            "name": "net.0",
                            "type": "Conv2d",
                            "output_shape": [1, 6, 28, 28],
                            "params": 156,
                            "macs": 117600,
                        }
                    ],
                    "total_params": 61706,
                    "total_macs": 429128,
                    "text": "Conv2d output shape:\t torch.Size([1, 6, 28, 28])",
                }
            ]
        }
    )

    model: str
    input_shape: list[int]
    layers: list[LayerSummary]
    total_params: int
    total_macs: int
    text: str = Field(description="The rows in the seed's `layer_summary` printout form.")


class SummaryRequest(BaseModel):
    """A summary request; every field is optional."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"input_shape": [1, 1, 224, 224], "arch": "vgg11"},
                {"input_shape": [1, 1, 224, 224], "arch": [[1, 64], [1, 128], [2, 256]]},
                {"input_shape": [1, 1, 96, 96], "depth": 2},
                {"input_shape": [1, 1, 96, 96], "arch": {"growth_rate": 16, "arch": [2, 2]}},
            ]
        },
    )

    input_shape: list[int] | None = Field(
        None,
        min_length=4,
        max_length=4,
        description="(N, C, H, W); default (1, 1, S, S) with the model's default size S.",
    )
    arch: ArchOverride | None = Field(
        None,
        description="A named arch ('vgg11', 'small'), [[count, channels], ...] pairs (vgg, "
        "resnet18) or the book's parameters as an object (densenet, regnetx32).",
    )
    depth: int = Field(1, ge=1, le=MAX_DEPTH, description="How deep into the module tree.")


ModelName = Annotated[
    str, Path(description="A registered model name.", examples=["lenet", "alexnet", "densenet"])
]


@lru_cache(maxsize=16)
def _default_parameters(name: str) -> int:
    entry = get_model_entry(name)
    return summarize(name, (1, 1, entry.input_size, entry.input_size)).total_params


def _model_info(name: str) -> ModelInfo:
    entry = get_model_entry(name)
    return ModelInfo(
        name=entry.name,
        description=entry.description,
        section=entry.section,
        default_recipe=Recipe(
            input_size=entry.input_size,
            lr=entry.lr,
            epochs=DEFAULT_EPOCHS,
            batch_size=DEFAULT_BATCH_SIZE,
        ),
        parameters=_default_parameters(name),
        min_input_size=_min_input_size(name),
        default_arch=entry.default_arch,
        archs={k: entry.arch_json(v) for k, v in entry.archs.items()},
        arch_form=entry.arch_form,
    )


@lru_cache(maxsize=16)
def _min_input_size(name: str) -> int:
    smallest = min_job_input_size(name)
    assert smallest is not None, f"{name}'s default recipe fits no input size"
    return smallest


@lru_cache(maxsize=256)
def _summary(name: str, shape: tuple[int, ...], arch: str | Arch | None, depth: int) -> SummaryOut:
    s = summarize(name, shape, arch=arch, depth=depth, in_channels=shape[1])
    return SummaryOut(
        model=s.model,
        input_shape=list(s.input_shape),
        layers=[
            LayerSummary(
                name=r.name,
                type=r.type,
                output_shape=list(r.output_shape),
                params=r.params,
                macs=r.macs,
            )
            for r in s.layers
        ],
        total_params=s.total_params,
        total_macs=s.total_macs,
        text=s.text,
    )


def _check_shape(shape: tuple[int, ...]) -> None:
    if len(shape) != 4:
        raise BadRequestError(f"input_shape must be four sizes N,C,H,W; got {len(shape)}")
    if any(d < 1 for d in shape):
        raise BadRequestError(f"input_shape sizes must be positive; got {list(shape)}")
    n, c, h, w = shape
    if n > MAX_N or c > MAX_C or h > MAX_HW or w > MAX_HW:
        raise InputTooLargeError(
            f"input_shape {list(shape)} is beyond this API's bounds "
            f"(N ≤ {MAX_N}, C ≤ {MAX_C}, H and W ≤ {MAX_HW})"
        )


def _arch_value(name: str, arch: Any) -> str | Arch | None:
    """The arch in a hashable form (the summaries are cached by it)."""
    if arch is None or isinstance(arch, str):
        return arch
    if isinstance(arch, dict):
        return get_model_entry(name).resolve_arch(arch)
    return tuple((int(a), int(b)) for a, b in arch)


def summary_for(name: str, shape: tuple[int, ...] | None, arch: Any, depth: int) -> SummaryOut:
    """The summary of `name` for `shape` (default: the model's input), checked and cached."""
    entry = get_model_entry(name)
    if shape is None:
        shape = (1, 1, entry.input_size, entry.input_size)
    _check_shape(shape)
    return _summary(name, shape, _arch_value(name, arch), depth)


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.replace(" ", "").split(","))
    except ValueError:
        raise BadRequestError(
            f"input_shape must be four comma-separated integers like 1,1,28,28; got {text!r}"
        ) from None


def _parse_arch_query(text: str | None) -> str | list[Any] | dict[str, Any] | None:
    if text is None or text.strip()[:1] not in ("[", "{"):
        return text
    if text.strip().startswith("{"):
        try:
            params = json.loads(text)
        except ValueError:
            raise ArchError(f"arch is not a JSON object: {text!r}") from None
        if not isinstance(params, dict):
            raise ArchError(f"arch is not a JSON object: {text!r}")
        return params
    try:
        pairs = json.loads(text)
        arch = tuple((int(a), int(b)) for a, b in pairs)
    except (ValueError, TypeError):
        raise ArchError(
            f"arch must be a name or JSON [[count, channels], ...] pairs; got {text!r}"
        ) from None
    if not 1 <= len(arch) <= 8 or any(not (1 <= a <= 2048 and 1 <= b <= 2048) for a, b in arch):
        raise ArchError("arch takes 1 to 8 [count, channels] pairs, each between 1 and 2048")
    return [list(p) for p in arch]


_SUMMARY_ERRORS = problem_responses(
    404,
    422,
    s404="unknown model 'mobilenet'; known models: lenet, vgg, resnet18, alexnet, …",
    s422="layer net.2 (AvgPool2d) cannot take this input: Output size is too small; "
    "use a larger input",
)


@router.get(
    "",
    summary="List the models",
    description="Every registered network with its description, the book's default training "
    "recipe, its parameter count at the default input size, the smallest input size a job "
    "trains it at, its named archs and how an arch override is written.",
    response_model=ModelList,
)
def get_models() -> ModelList:
    return ModelList(models=[_model_info(name) for name in list_models()])


@router.get(
    "/{name}",
    summary="Describe one model",
    description="The network's description, default recipe, parameter count and named archs.",
    response_model=ModelInfo,
    responses=problem_responses(404, s404="unknown model 'mobilenet'; known models: lenet, …"),
)
def get_model(name: ModelName) -> ModelInfo:
    return _model_info(name)


@router.get(
    "/{name}/summary",
    summary="Summarise a model's layer shapes",
    description="One row per layer (output shape, parameters, multiply-adds) for an input "
    "shape, as the seed's `layer_summary` prints them; `text` is that printout. An input too "
    "small for the network is a 422 naming the layer that cannot take it. Bounds: N ≤ 64, "
    "C ≤ 16, H and W ≤ 1024.",
    response_model=SummaryOut,
    responses=_SUMMARY_ERRORS,
)
def get_summary(
    name: ModelName,
    input_shape: Annotated[
        str | None,
        Query(
            description="N,C,H,W; default 1,1,S,S with the model's default input size S.",
            examples=["1,1,28,28"],
            max_length=64,
        ),
    ] = None,
    arch: Annotated[
        str | None,
        Query(
            description="A named arch ('vgg11'), JSON pairs '[[1,64],[1,128]]' (vgg, "
            "resnet18) or a JSON object of the book's parameters (densenet, regnetx32: "
            'see GET /v1/models), e.g. \'{"growth_rate":16,"arch":[2,2]}\'.',
            examples=["vgg11"],
            max_length=512,
        ),
    ] = None,
    depth: Annotated[
        int, Query(ge=1, le=MAX_DEPTH, description="How deep into the module tree.")
    ] = 1,
) -> SummaryOut:
    shape = _parse_shape(input_shape) if input_shape is not None else None
    return summary_for(name, shape, _parse_arch_query(arch), depth)


@router.post(
    "/{name}/summary",
    summary="Summarise a model with an arch override",
    description="As the GET, with the shape and an `arch` (a name, [[count, channels], ...] "
    "pairs or an object of the book's parameters) in a JSON body.",
    response_model=SummaryOut,
    responses=_SUMMARY_ERRORS,
)
def post_summary(
    name: ModelName,
    request: Annotated[SummaryRequest, Body()] = SummaryRequest(),  # noqa: B008
) -> SummaryOut:
    shape = tuple(request.input_shape) if request.input_shape is not None else None
    return summary_for(name, shape, request.arch, request.depth)
