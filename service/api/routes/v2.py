"""`/v2`: the Open Inference Protocol (KServe V2, as Triton and tritonclient speak it).

A V2 model is a registry model (`lenet`, `resnet18`, `densenet`, ...: its best checkpoint, like
`<model>:best`) or a job id (that job's best); a version is a checkpoint id, `best` or
`latest`. Inference takes one input: UINT8 or FP32 grayscale pixels (0–255, as Fashion-MNIST)
shaped `[N, 28, 28]` or `[N, 1, 28, 28]`, or BYTES `[N]` of encoded images, preprocessed as
`/v1/checkpoints/{ref}/predict` does; it answers FP32 `probabilities` `[N, 10]` and BYTES
`label` `[N]`. It runs on the same model cache, ONNX Runtime path and micro-batcher as `/v1`.
Errors are the protocol's `{"error": "..."}`.
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Path, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict

from models import list_models
from service.access.auth import Allow, Caller, CallerDep
from service.api.deps import InferenceDep
from service.api.problems import inference_error_responses
from service.api.routes.predict import Preparation, decode_files
from service.errors import ServiceUnavailableError
from service.inference.batcher import InferenceService
from service.inference.images import InvertMode, PreprocessMode, invert_where_light, scale_batch
from service.inference.v2_codec import (
    BINARY_MEDIA_TYPE,
    HEADER_LENGTH,
    InferRequest,
    ModelNotFoundError,
    OutputTensor,
    ProtocolError,
    RequestedOutput,
    Tensor,
    encode_response,
    parse_request,
)
from workers.store.checkpoints import (
    CHECKPOINT_ID_RE,
    JOB_ID_RE,
    CheckpointNotFoundError,
    CheckpointStore,
    Manifest,
    StoreUnavailableError,
)

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v2", tags=["v2"])

PIXEL_TYPES = ("UINT8", "FP32")
OUTPUTS = ("probabilities", "label")
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

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "cnnserve",
                    "version": "0.1.0",
                    "extensions": ["binary_tensor_data", "classification"],
                }
            ]
        }
    )

    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    """A model's versions, inputs and outputs; `parameters` names the checkpoint it serves."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "lenet",
                    "versions": ["best", "latest", "0123456789abcdef-e002"],
                    "platform": "cnnserve",
                    "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, 28, 28]}],
                    "outputs": [
                        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
                        {"name": "label", "datatype": "BYTES", "shape": [-1]},
                    ],
                    "parameters": {"checkpoint": "0123456789abcdef-e002", "model": "lenet"},
                }
            ]
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
                                    "name": {"type": "string", "enum": list(OUTPUTS)},
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


# --- resolving names -----------------------------------------------------------------------


def _kind(name: str) -> str:
    if name in list_models():
        return "model"
    if JOB_ID_RE.fullmatch(name):
        return "job"
    raise ModelNotFoundError(
        f"unknown model {name!r}: use a registry model ({', '.join(list_models())}) or the id of "
        "a training job (16 hex digits)"
    )


def _resolve(
    store: CheckpointStore, name: str, version: str | None, within: str | None
) -> Manifest:
    """The manifest a V2 model name and version name among `within`'s checkpoints (None:
    anyone's) (blocking: file reads)."""
    kind = _kind(name)
    v = version or "best"
    try:
        if v == "best":
            return store.manifest(store.resolve(f"{name}:best", within))
        if v == "latest":
            if kind == "job":
                return store.manifest(store.resolve(f"{name}:latest", within))
            newest = store.list(model=name, limit=1, within=within)
            if not newest:
                raise CheckpointNotFoundError(name, f"no checkpoint of model {name!r} exists")
            return store.manifest(newest[0].id)
        if not CHECKPOINT_ID_RE.fullmatch(v):
            raise ModelNotFoundError(
                f"unknown version {v!r} of {name!r}: use best, latest or a checkpoint id "
                "(<job>-eNNN) from the model's metadata"
            )
        manifest = store.manifest(store.resolve(v, within))
    except CheckpointNotFoundError as exc:
        raise ModelNotFoundError(
            f"model {name!r} has no checkpoint for version {v!r}: {exc}; train one with "
            "POST /v1/jobs"
        ) from None
    if (kind == "model" and manifest.model != name) or (kind == "job" and manifest.job_id != name):
        owner = f"a {manifest.model} checkpoint" if kind == "model" else f"job {manifest.job_id}'s"
        raise ModelNotFoundError(f"version {v!r} is {owner}, not a version of {name!r}")
    return manifest


async def model_manifest(
    inference: InferenceService, name: str, version: str | None, caller: Caller
) -> Manifest:
    """The checkpoint a request names (among the caller's), resolved at most once a second
    per tenant (as predict's refs)."""
    key = f"{caller.within or ''}|v2:{name}/{version or 'best'}"
    manifest = inference.cached_manifest(key)
    if manifest is None:
        manifest = await run_in_threadpool(_resolve, inference.store, name, version, caller.within)
        inference.remember_manifest(key, manifest)
    return manifest


def _versions(store: CheckpointStore, name: str, within: str | None) -> list[str]:
    if _kind(name) == "job":
        ids = [c.id for c in store.list(job_id=name, within=within)]
    else:
        ids = [c.id for c in store.list(model=name, limit=LISTED_VERSIONS, within=within)]
    return ["best", "latest", *ids]


def _metadata(
    store: CheckpointStore, name: str, version: str | None, within: str | None
) -> ModelMetadata:
    manifest = _resolve(store, name, version, within)
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


# --- inputs and outputs --------------------------------------------------------------------


def _pixels(tensor: Tensor, max_images: int) -> np.ndarray:
    """A pixel tensor as N×28×28 uint8 (values checked, shape checked)."""
    shape = tensor.shape
    if len(shape) == 4 and shape[1] == 1:
        shape = [shape[0], shape[2], shape[3]]
    if len(shape) != 3 or shape[1:] != [28, 28]:
        raise ProtocolError(
            f"input {tensor.name!r} has shape {tensor.shape}; send [N, 28, 28] or "
            "[N, 1, 28, 28] grayscale pixels (or BYTES [N] of encoded images)"
        )
    if not 1 <= shape[0] <= max_images:
        raise ProtocolError(
            f"input {tensor.name!r} holds {shape[0]} images; this server takes 1 to {max_images} "
            "per request"
        )
    data = tensor.data.reshape(shape)
    if data.dtype == np.uint8:  # binary UINT8: every value is a pixel already
        return np.ascontiguousarray(data)
    values = data.astype(np.float64, copy=False)
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > 255:
        raise ProtocolError(
            f"input {tensor.name!r}: {tensor.datatype} pixels must be 0 to 255 (0 = black, as "
            "Fashion-MNIST)"
        )
    return values.round().astype(np.uint8)


def _images(tensor: Tensor, inference: InferenceService, how: Preparation) -> np.ndarray:
    """BYTES images decoded and preprocessed exactly as `/v1` predict does."""
    arrays = decode_files(list(tensor.data.reshape(-1)), inference.settings)
    return how.model_input(how.native(arrays))


def _choice(params: dict[str, Any], name: str, allowed: tuple[str, ...]) -> Any:
    value = params.get(name, "auto")
    if value not in allowed:
        raise ProtocolError(f"parameter {name!r} must be one of {', '.join(allowed)}")
    return value


async def _batch(
    request: InferRequest, inference: InferenceService, manifest: Manifest
) -> np.ndarray:
    if len(request.inputs) != 1:
        names = ", ".join(repr(t.name) for t in request.inputs)
        raise ProtocolError(
            f"this model takes one input (pixels or encoded images); got {len(request.inputs)}: "
            f"{names}"
        )
    (tensor,) = request.inputs
    invert: InvertMode = _choice(request.parameters, "invert", ("auto", "true", "false"))
    mode: PreprocessMode = _choice(request.parameters, "preprocess", ("auto", "none"))
    limit = inference.settings.max_images_per_request
    if tensor.datatype in PIXEL_TYPES:
        native = invert_where_light(_pixels(tensor, limit), invert)
        return scale_batch(native, manifest.preprocessing)
    if tensor.datatype == "BYTES":
        if len(tensor.shape) != 1 or not 1 <= tensor.shape[0] <= limit:
            raise ProtocolError(
                f"input {tensor.name!r}: BYTES images come as shape [N] with N from 1 to "
                f"{limit}; got {tensor.shape}"
            )
        how = Preparation(manifest, invert, mode)
        return await run_in_threadpool(_images, tensor, inference, how)
    raise ProtocolError(
        f"input {tensor.name!r} is {tensor.datatype}; send UINT8 or FP32 pixels, or BYTES images"
    )


def _outputs(request: InferRequest, probs: np.ndarray, classes: list[str]) -> list[OutputTensor]:
    wanted = request.outputs or [RequestedOutput(name) for name in OUTPUTS]
    n = len(probs)
    out = []
    for want in wanted:
        if want.name not in OUTPUTS:
            raise ProtocolError(
                f"unknown output {want.name!r}; this model's outputs are {', '.join(OUTPUTS)}"
            )
        binary = want.binary or request.binary_output
        if want.classification is not None:
            k = min(want.classification, probs.shape[1])
            order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
            top = [f"{probs[i, c]:f}:{c}:{classes[c]}".encode() for i in range(n) for c in order[i]]
            out.append(OutputTensor(want.name, "BYTES", [n, k], top, binary))
        elif want.name == "probabilities":
            out.append(OutputTensor(want.name, "FP32", list(probs.shape), probs, binary))
        else:
            labels = [classes[c].encode() for c in probs.argmax(axis=1)]
            out.append(OutputTensor(want.name, "BYTES", [n], labels, binary))
    return out


# --- routes --------------------------------------------------------------------------------


def _server_version() -> str:
    try:
        return version("cnnserve")
    except PackageNotFoundError:
        return "0.0.0"


@router.get("", summary="Server metadata", dependencies=[Allow("read")])
async def server_metadata() -> ServerMetadata:
    """The server's name, version and the protocol extensions it supports."""
    return ServerMetadata(name="cnnserve", version=_server_version(), extensions=EXTENSIONS)


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
    return await run_in_threadpool(_metadata, inference.store, model, None, caller.within)


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
    return await run_in_threadpool(_metadata, inference.store, model, model_version, caller.within)


async def _ready(
    inference: InferenceService, model: str, version: str | None, caller: Caller
) -> Response:
    await model_manifest(inference, model, version, caller)  # 404: nothing has the name
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


async def infer_answer(
    inference: InferenceService,
    model: str,
    manifest: Manifest,
    body: bytes,
    header_length: str | None,
) -> tuple[bytes, dict[str, str]]:
    """The answer to an infer request's raw body for the checkpoint the model name resolved
    to (`model_manifest`): the response body and its headers.

    The route and `service.api.fastpath` both answer with this; every mistake in the request
    raises a `ProblemError` (the protocol's `{"error": ...}` under `/v2`)."""
    parsed = parse_request(body, header_length)
    batch = await _batch(parsed, inference, manifest)
    loaded, probs = await inference.predict(manifest, batch)
    outputs = _outputs(parsed, probs, loaded.manifest.classes)
    content, headers = encode_response(model, manifest.id, parsed.id, outputs)
    headers["Content-Type"] = BINARY_MEDIA_TYPE if headers else "application/json"
    return content, headers


async def _infer(
    request: Request,
    inference: InferenceService,
    model: str,
    version: str | None,
    caller: Caller,
) -> Response:
    manifest = await model_manifest(inference, model, version, caller)  # 404 before the body
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
