"""`/v2`: the Open Inference Protocol (KServe V2, as Triton and tritonclient speak it).

A V2 model is a registry model (`lenet`, `resnet18`, `densenet`, ...: its best checkpoint, like
`<model>:best`) or a job id (that job's best); a version is a checkpoint id, `best` or
`latest`. Inference takes one input: UINT8 or FP32 grayscale pixels (0–255, as Fashion-MNIST)
shaped `[N, 28, 28]` or `[N, 1, 28, 28]`, or BYTES `[N]` of encoded images, preprocessed as
`/v1/checkpoints/{ref}/predict` does; it answers FP32 `probabilities` `[N, 10]` and BYTES
`label` `[N]`. A codec over the same pipeline as `/v1` (`service.inference.pipeline`: the one
resolver, model cache, ONNX Runtime path and micro-batcher). Errors are the protocol's
`{"error": "..."}`.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from service import server_version
from service.access.auth import Allow, Caller, CallerDep
from service.api.deps import InferenceDep
from service.api.problems import inference_error_responses
from service.api.schemas import EXAMPLE_ID, with_examples
from service.errors import ServiceUnavailableError
from service.inference.batcher import InferenceService
from service.inference.encode import V2_OUTPUTS
from service.inference.pipeline import infer_answer
from service.inference.resolve import model_kind
from service.inference.v2_codec import BINARY_MEDIA_TYPE, HEADER_LENGTH
from workers.store.checkpoints import CheckpointStore, StoreUnavailableError

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v2", tags=["v2"])

#: Checkpoint ids listed in a model's metadata beside `best` and `latest` (newest first).
LISTED_VERSIONS = 20
EXTENSIONS = ["binary_tensor_data", "classification"]

ModelName = Annotated[
    str,
    Path(
        description="A registry model (lenet, resnet18, densenet, ... as GET /v1/models lists "
        "them: its best checkpoint) or a job id "
        "(its best checkpoint).",
        examples=["lenet"],
        max_length=64,
    ),
]
ModelVersion = Annotated[
    str,
    Path(
        description="A checkpoint id of the model, `best` or `latest`.",
        examples=["best"],
        max_length=64,
    ),
]


# --- schemas (what /docs shows) ------------------------------------------------------------


class TensorMetadata(BaseModel):
    """A tensor a model takes or gives: its name, datatype and shape (-1: the batch)."""

    name: str
    datatype: str
    shape: list[int]


class ServerMetadata(BaseModel):
    """The server and the protocol extensions it supports."""

    model_config = with_examples({"name": "cnnserve", "version": "0.1.0", "extensions": EXTENSIONS})

    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    """A model's versions, inputs and outputs; `parameters` names the checkpoint it serves."""

    model_config = with_examples(
        {
            "name": "lenet",
            "versions": ["best", "latest", EXAMPLE_ID],
            "platform": "cnnserve",
            "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, 28, 28]}],
            "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
                {"name": "label", "datatype": "BYTES", "shape": [-1]},
            ],
            "parameters": {"checkpoint": EXAMPLE_ID, "model": "lenet"},
        }
    )

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any]


_TENSOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": ["UINT8", "FP32", "BYTES"]},
        "parameters": {"type": "object"},
        "data": {"type": "array", "description": "Flat or nested, row-major."},
    },
}
#: The infer request body: a JSON request, or a JSON header and binary tensors after it.
INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "An inference request (any content type: tritonclient sends none). With "
        "binary tensors, the header `Inference-Header-Content-Length` gives the JSON header's "
        "length and each binary input's `parameters.binary_data_size` its bytes after it.",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {
                            "type": "object",
                            "description": "binary_data_output (bool), invert (auto, true, "
                            "false), preprocess (auto, none).",
                        },
                        "inputs": {"type": "array", "items": _TENSOR_SCHEMA, "minItems": 1},
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string", "enum": list(V2_OUTPUTS)},
                                    "parameters": {
                                        "type": "object",
                                        "description": "binary_data (bool), classification "
                                        "(top k as 'score:index:label').",
                                    },
                                },
                            },
                        },
                    },
                },
                "examples": {
                    "pixels": {
                        "summary": "One 28×28 image as UINT8 pixels, top 2 classes",
                        "value": {
                            "inputs": [
                                {
                                    "name": "image",
                                    "shape": [1, 28, 28],
                                    "datatype": "UINT8",
                                    "data": [0] * 784,
                                }
                            ],
                            "outputs": [
                                {"name": "probabilities", "parameters": {"classification": 2}},
                                {"name": "label"},
                            ],
                        },
                    },
                    "png": {
                        "summary": "An encoded image (base64 in JSON)",
                        "value": {
                            "inputs": [
                                {
                                    "name": "image",
                                    "shape": [1],
                                    "datatype": "BYTES",
                                    "data": ["iVBORw0KGgoAAAANSUhEUgAAABwAAAAc..."],
                                }
                            ]
                        },
                    },
                },
            },
            BINARY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The outputs: JSON, or (binary outputs asked for) a JSON header of "
        "`Inference-Header-Content-Length` bytes and the binary tensors after it.",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["model_name", "outputs"],
                    "properties": {
                        "model_name": {"type": "string"},
                        "model_version": {"type": "string"},
                        "id": {"type": "string"},
                        "outputs": {"type": "array", "items": _TENSOR_SCHEMA},
                    },
                },
                "example": {
                    "model_name": "lenet",
                    "model_version": "0123456789abcdef-e002",
                    "outputs": [
                        {
                            "name": "probabilities",
                            "datatype": "BYTES",
                            "shape": [1, 2],
                            "data": ["0.970000:9:ankle boot", "0.020000:7:sneaker"],
                        },
                        {
                            "name": "label",
                            "datatype": "BYTES",
                            "shape": [1],
                            "data": ["ankle boot"],
                        },
                    ],
                },
            },
            BINARY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
        },
    },
    **inference_error_responses(
        400,
        401,
        403,
        404,
        413,
        415,
        429,
        s415="image 0: the content is a GIF image, not an image this server reads; send PNG, "
        "JPEG, WebP or BMP",
        s400="input 'image' has shape [1, 32, 32]; send [N, 28, 28] or [N, 1, 28, 28] "
        "grayscale pixels (or BYTES [N] of encoded images)",
        s404="unknown model 'mobilenet': use a registry model (lenet, vgg, resnet18, …) or the id "
        "of a training job (16 hex digits)",
    ),
}
_MODEL_RESPONSES = inference_error_responses(
    401,
    403,
    404,
    s404="model 'lenet' has no checkpoint for version 'best'; train one with POST /v1/jobs",
)


# --- metadata ------------------------------------------------------------------------------


def _versions(store: CheckpointStore, name: str, within: str | None) -> list[str]:
    if model_kind(name) == "job":
        ids = [c.id for c in store.list(job_id=name, within=within)]
    else:
        ids = [c.id for c in store.list(model=name, limit=LISTED_VERSIONS, within=within)]
    return ["best", "latest", *ids]


def _metadata(
    inference: InferenceService, name: str, version: str | None, within: str | None
) -> ModelMetadata:
    manifest = inference.resolver.resolve_model(name, version, within)
    store = inference.store
    return ModelMetadata(
        name=name,
        versions=_versions(store, name, within),
        platform="cnnserve",
        inputs=[TensorMetadata(name="image", datatype="UINT8", shape=[-1, 28, 28])],
        outputs=[
            TensorMetadata(
                name="probabilities", datatype="FP32", shape=[-1, len(manifest.classes)]
            ),
            TensorMetadata(name="label", datatype="BYTES", shape=[-1]),
        ],
        parameters={
            "checkpoint": manifest.id,
            "model": manifest.model,
            "classes": manifest.classes,
            "accepted_inputs": "UINT8 or FP32 [N,28,28] or [N,1,28,28] pixels (0-255), or "
            "BYTES [N] encoded PNG/JPEG/WebP/BMP images",
        },
    )


# --- routes --------------------------------------------------------------------------------


@router.get("", summary="Server metadata", dependencies=[Allow("read")])
async def server_metadata() -> ServerMetadata:
    """The server's name, version and the protocol extensions it supports."""
    return ServerMetadata(name="cnnserve", version=server_version(), extensions=EXTENSIONS)


_EMPTY_200: dict[int | str, dict[str, Any]] = {200: {"description": "Yes (an empty body)."}}


@router.get("/health/live", summary="Server live", response_class=Response, responses=_EMPTY_200)
async def server_live() -> Response:
    """200 while the server answers requests."""
    return Response(status_code=200)


@router.get(
    "/health/ready",
    summary="Server ready",
    response_class=Response,
    responses={**_EMPTY_200, **inference_error_responses(503)},
)
async def server_ready(inference: InferenceDep) -> Response:
    """200 when the checkpoint store can be read (inference needs nothing else)."""
    try:
        await run_in_threadpool(inference.store.check)
    except StoreUnavailableError as exc:
        raise ServiceUnavailableError(str(exc)) from None
    return Response(status_code=200)


_MODEL_DOC = (
    "The model's inputs and outputs (`-1`: the batch), its versions (`best`, `latest` and "
    "checkpoint ids, newest first) and, in `parameters`, the checkpoint the name resolves to."
)


@router.get(
    "/models/{model}",
    summary="Model metadata",
    description=_MODEL_DOC,
    dependencies=[Allow("read")],
    responses=_MODEL_RESPONSES,
)
async def model_metadata(
    model: ModelName, inference: InferenceDep, caller: CallerDep
) -> ModelMetadata:
    return await run_in_threadpool(_metadata, inference, model, None, caller.within)


@router.get(
    "/models/{model}/versions/{model_version}",
    summary="Model version metadata",
    description=_MODEL_DOC,
    dependencies=[Allow("read")],
    responses=_MODEL_RESPONSES,
)
async def model_version_metadata(
    model: ModelName, model_version: ModelVersion, inference: InferenceDep, caller: CallerDep
) -> ModelMetadata:
    return await run_in_threadpool(_metadata, inference, model, model_version, caller.within)


async def _ready(
    inference: InferenceService, model: str, version: str | None, caller: Caller
) -> Response:
    await inference.resolver.model_manifest(model, version, caller.within)  # 404: no such name
    return Response(status_code=200)


@router.get(
    "/models/{model}/ready",
    summary="Model ready",
    response_class=Response,
    responses={**_EMPTY_200, **_MODEL_RESPONSES},
    dependencies=[Allow("read")],
)
async def model_ready(model: ModelName, inference: InferenceDep, caller: CallerDep) -> Response:
    """200 when the name resolves to a checkpoint (it loads on the first inference)."""
    return await _ready(inference, model, None, caller)


@router.get(
    "/models/{model}/versions/{model_version}/ready",
    summary="Model version ready",
    response_class=Response,
    responses={**_EMPTY_200, **_MODEL_RESPONSES},
    dependencies=[Allow("read")],
)
async def model_version_ready(
    model: ModelName, model_version: ModelVersion, inference: InferenceDep, caller: CallerDep
) -> Response:
    """200 when the name and version resolve to a checkpoint."""
    return await _ready(inference, model, model_version, caller)


async def _infer(
    request: Request,
    inference: InferenceService,
    model: str,
    version: str | None,
    caller: Caller,
) -> Response:
    manifest = await inference.resolver.model_manifest(model, version, caller.within)  # 404 first
    body = await request.body()
    content, headers = await infer_answer(
        inference, model, manifest, body, request.headers.get(HEADER_LENGTH)
    )
    return Response(content, headers=headers)


@router.post(
    "/models/{model}/infer",
    summary="Infer",
    response_class=Response,
    openapi_extra=INFER_BODY,
    responses=_INFER_RESPONSES,
    dependencies=[Allow("predict")],
)
async def infer(
    model: ModelName, request: Request, inference: InferenceDep, caller: CallerDep
) -> Response:
    """Classify a batch with the model's best checkpoint (the caller's own, with keys)."""
    return await _infer(request, inference, model, None, caller)


@router.post(
    "/models/{model}/versions/{model_version}/infer",
    summary="Infer with a version",
    response_class=Response,
    openapi_extra=INFER_BODY,
    responses=_INFER_RESPONSES,
    dependencies=[Allow("predict")],
)
async def infer_version(
    model: ModelName,
    model_version: ModelVersion,
    request: Request,
    inference: InferenceDep,
    caller: CallerDep,
) -> Response:
    """Classify a batch with one version (checkpoint id, best or latest) of the model."""
    return await _infer(request, inference, model, model_version, caller)
