"""Classification: `POST /v1/checkpoints/{ref}/predict` with image files, base64 or pixels.

The checkpoint's manifest says how to preprocess (as training did);
`service.inference.images` decodes within the limits, `service.inference.batcher` batches
concurrent requests into one forward pass.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.access.auth import Allow, Caller, current_caller
from service.api.deps import get_inference
from service.api.problems import problem_responses
from service.api.routes.checkpoints import EXAMPLE_ID, RefPath, resolve_manifest
from service.errors import (
    BadRequestError,
    ProblemError,
)
from service.inference.batcher import InferenceService
from service.inference.images import (
    ALLOWED_MEDIA_TYPES,
    ImageInputError,
    InvertMode,
    PreprocessMode,
    declared_pixels,
    decode_image,
    pixels_to_array,
    scale_batch,
    to_native,
)
from workers.settings import Settings
from workers.store.checkpoints import Manifest

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/checkpoints", tags=["checkpoints"])


class TooManyImagesError(ProblemError):
    """More images in one predict call than the server takes."""

    status = 413
    slug = "too-many-images"
    title = "Too many images"


class UnsupportedBodyError(ProblemError):
    """A predict body that is neither multipart nor JSON."""

    status = 415
    slug = "unsupported-media-type"
    title = "Unsupported Media Type"


# --- schemas -------------------------------------------------------------------------------


class ClassScore(BaseModel):
    """A class and the probability the network gives it."""

    label: str = Field(description="The class name.", examples=["ankle boot"])
    class_id: int = Field(description="The class index (Fashion-MNIST label).", examples=[9])
    probability: float = Field(description="Softmax probability, 0..1.", examples=[0.97])


class Prediction(ClassScore):
    """The most likely class of one image, and the `top_k` most likely."""

    top_k: list[ClassScore] = Field(description="The top_k classes, most likely first.")
    input: list[list[int]] | None = Field(
        None,
        description="With return_input=true: the 28×28 grayscale image (0–255) the network saw "
        "after preprocessing, rows top to bottom.",
    )


class PredictResponse(BaseModel):
    """Predictions, one per image, in the order the images were sent."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "checkpoint": EXAMPLE_ID,
                    "model": "lenet",
                    "predictions": [
                        {
                            "label": "ankle boot",
                            "class_id": 9,
                            "probability": 0.97,
                            "top_k": [
                                {"label": "ankle boot", "class_id": 9, "probability": 0.97},
                                {"label": "sneaker", "class_id": 7, "probability": 0.02},
                            ],
                        }
                    ],
                }
            ]
        }
    )

    checkpoint: str = Field(description="The checkpoint id the ref resolved to.")
    model: str = Field(description="The model of that checkpoint.")
    predictions: list[Prediction]


class PredictJSON(BaseModel):
    """A JSON predict body: base64 images or raw 0–255 grayscale pixel arrays (one of them)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"images": ["iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAAAAABXZoBIAAAA..."]},
                {"pixels": [[0, 0, 12, 255], [0, 40, 200, 255], [0, 0, 0, 0], [0, 0, 0, 0]]},
            ]
        },
    )

    images: list[str] | None = Field(
        None,
        description="Base64 PNG/JPEG/WebP/BMP files (a `data:image/...;base64,` prefix is fine).",
    )
    pixels: list[list[list[float]]] | list[list[float]] | None = Field(
        None,
        description="One 2-D grayscale array (rows of 0–255 values, 0 = black) or a list of them.",
    )


# --- helpers -------------------------------------------------------------------------------


async def predict_manifest(ref: RefPath, request: Request) -> Manifest:
    """Like `resolved_manifest` (within the caller's checkpoints), but a ref the same tenant
    resolved within the last second is reused.

    The hot path takes settings and store from the inference service, and the caller and the
    service straight from the request (each sub-dependency costs FastAPI's resolution on every
    call), so no dependency of a predict call needs the thread pool.
    """
    return await manifest_for(await get_inference(request), await current_caller(request), ref)


async def manifest_for(inference: InferenceService, caller: Caller, ref: str) -> Manifest:
    """The manifest `ref` names among `caller`'s checkpoints, reused for a second."""
    key = f"{caller.within or ''}|{ref}"  # `lenet:best` is each tenant's own best
    manifest = inference.cached_manifest(key)
    if manifest is None:
        manifest = await run_in_threadpool(resolve_manifest, inference.store, ref, caller.within)
        inference.remember_manifest(key, manifest)
    return manifest


#: Uploads whose headers declare at most this many pixels in all are decoded on the event
#: loop: a 28×28 PNG decodes in microseconds, less than a hop to the thread pool costs.
INLINE_DECODE_PIXELS = 64 * 64


def _too_many(count: int | None, limit: int) -> TooManyImagesError:
    sent = f"{count} images" if count is not None else f"more than {limit} images"
    return TooManyImagesError(
        f"{sent} in one request; this server takes at most {limit}: "
        "split them over several requests",
        limit=limit,
    )


#: Multipart bodies up to this size are read whole and parsed in one pass by python-multipart's
#: parser, without Starlette's form (a spooled temporary file per part, a form object, an
#: await per chunk); bigger ones stream through Starlette's form parser.
INLINE_MULTIPART_BYTES = 256 * 1024

#: (field name, whether it is a file upload, content) of one multipart part.
Part = tuple[str, bool, bytes]


def _unreadable(reason: str) -> BadRequestError:
    return BadRequestError(
        f"the multipart body could not be read ({reason}); send the images as "
        "multipart/form-data file parts named 'files'"
    )


def multipart_parts(content_type: str, body: bytes, max_files: int) -> list[Part]:
    """The parts of a multipart body held in memory; more than `max_files` files is a 413."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise _unreadable("no boundary in the Content-Type")
    parts: list[Part] = []
    files = 0
    headers: dict[bytes, bytes] = {}
    name: list[bytes] = []
    value: list[bytes] = []
    data: list[bytes] = []

    def on_part_begin() -> None:
        headers.clear()
        data.clear()

    def on_header_field(chunk: bytes, start: int, end: int) -> None:
        name.append(chunk[start:end])

    def on_header_value(chunk: bytes, start: int, end: int) -> None:
        value.append(chunk[start:end])

    def on_header_end() -> None:
        headers[b"".join(name).lower()] = b"".join(value)
        name.clear()
        value.clear()

    def on_part_data(chunk: bytes, start: int, end: int) -> None:
        data.append(chunk[start:end])

    def on_part_end() -> None:
        nonlocal files
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        is_file = b"filename" in disposition
        files += is_file
        if files > max_files:
            raise _too_many(None, max_files)
        field = disposition.get(b"name", b"").decode("utf-8", "replace")
        parts.append((field, is_file, b"".join(data)))

    callbacks: Any = {
        "on_part_begin": on_part_begin,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
    }
    parser = MultipartParser(boundary, callbacks)
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise _unreadable(str(exc) or "malformed") from None
    return parts


async def _form_parts(request: Request, max_files: int) -> list[Part]:
    """The parts of a (large) multipart body, streamed through Starlette's form parser."""
    try:
        form = await request.form(max_files=max_files, max_fields=max_files + 16)
    except StarletteHTTPException as exc:
        if "Too many files" in str(exc.detail):
            raise _too_many(None, max_files) from None
        raise _unreadable(str(exc.detail)) from None
    try:
        parts: list[Part] = []
        for field, item in form.multi_items():
            if isinstance(item, UploadFile):
                parts.append((field, True, await item.read()))
            else:
                parts.append((field, False, item.encode()))
        return parts
    finally:
        await form.close()


async def _images_from_multipart(request: Request, settings: Settings) -> list[bytes]:
    limit = settings.max_images_per_request
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) <= INLINE_MULTIPART_BYTES:
        body = await request.body()  # within the body limit, as every body is
        parts = multipart_parts(request.headers.get("content-type", ""), body, limit)
    else:
        parts = await _form_parts(request, limit)
    return upload_blobs(parts)


def upload_blobs(parts: list[Part]) -> list[bytes]:
    """The image files of a multipart body's parts (each a file part named `files`)."""
    uploads = [(is_file, content) for field, is_file, content in parts if field == "files"]
    if not uploads:
        names = sorted({field for field, _, _ in parts})
        raise BadRequestError(
            "no images: send each image as a multipart file part named 'files'"
            + (f" (got fields {names})" if names else "")
        )
    for i, (is_file, _) in enumerate(uploads):
        if not is_file:
            raise ImageInputError(
                "the 'files' part is a text field, not a file upload; "
                "attach it as a file (curl -F 'files=@image.png')",
                index=i,
            )
    return [content for _, content in uploads]


def _b64(text: str, index: int) -> bytes:
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError(
            "not valid base64; send the file's bytes base64-encoded (RFC 4648)", index=index
        ) from None


def _arrays_from_json(body: bytes, settings: Settings) -> list[np.ndarray]:
    try:
        payload = PredictJSON.model_validate_json(body)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors, body=None) from None
    limit = settings.max_images_per_request
    if (payload.images is None) == (payload.pixels is None):
        raise BadRequestError(
            'send exactly one of "images" (base64 files) or "pixels" (0–255 arrays)'
        )
    if payload.images is not None:
        if not payload.images:
            raise BadRequestError('"images" is empty; send at least one base64 image')
        if len(payload.images) > limit:
            raise _too_many(len(payload.images), limit)
        return [
            decode_image(_b64(s, i), max_pixels=settings.max_image_pixels, index=i)
            for i, s in enumerate(payload.images)
        ]
    pixels: Any = payload.pixels
    if not pixels or not pixels[0] or any(not a for a in pixels[0] if isinstance(a, list)):
        raise BadRequestError('"pixels" is empty; send a 2-D array or a list of them')
    arrays = pixels if isinstance(pixels[0][0], list) else [pixels]
    if len(arrays) > limit:
        raise _too_many(len(arrays), limit)
    return [
        pixels_to_array(a, max_pixels=settings.max_image_pixels, index=i)
        for i, a in enumerate(arrays)
    ]


@dataclass(frozen=True)
class Preparation:
    """How a request's images become the model's input (its query parameters)."""

    manifest: Manifest
    invert: InvertMode = "auto"
    mode: PreprocessMode = "auto"

    def native(self, arrays: list[np.ndarray]) -> np.ndarray:
        """Decoded images as the 28×28 uint8 images the network sees (N×28×28)."""
        prep = self.manifest.preprocessing
        return np.stack([to_native(a, prep, self.invert, self.mode) for a in arrays])

    def model_input(self, native: np.ndarray) -> np.ndarray:
        """Those images as the model's N×1×28×28 float32 input."""
        return scale_batch(native, self.manifest.preprocessing)


def decode_files(blobs: list[bytes], settings: Settings) -> list[np.ndarray]:
    return [
        decode_image(b, max_pixels=settings.max_image_pixels, index=i) for i, b in enumerate(blobs)
    ]


def _prepare_files(blobs: list[bytes], settings: Settings, how: Preparation) -> np.ndarray:
    return how.native(decode_files(blobs, settings))


async def files_native(blobs: list[bytes], settings: Settings, how: Preparation) -> np.ndarray:
    """Uploaded image files as the 28×28 images the network sees (N×28×28 uint8)."""
    if len(blobs) > settings.max_images_per_request:
        raise _too_many(len(blobs), settings.max_images_per_request)
    declared = [declared_pixels(b) for b in blobs]
    if all(d is not None for d in declared) and sum(d or 0 for d in declared) <= (
        INLINE_DECODE_PIXELS
    ):
        return _prepare_files(blobs, settings, how)
    # decoding and resizing bigger images is CPU work: off the event loop
    return await run_in_threadpool(_prepare_files, blobs, settings, how)


def _prepare_json(body: bytes, settings: Settings, how: Preparation) -> np.ndarray:
    return how.native(_arrays_from_json(body, settings))


def _predictions(probs: np.ndarray, classes: list[str], top_k: int) -> list[dict[str, Any]]:
    """Each image's most likely class and its `top_k`, as `Prediction` JSON objects.

    Built as plain dicts: the route still declares `PredictResponse` (the docs, and the
    schemathesis run that checks every answer against it), but validating the server's own
    numbers again per request cost more than LeNet's share of the forward pass.
    """
    k = min(top_k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    out: list[dict[str, Any]] = []
    for row, best in zip(probs.tolist(), order.tolist(), strict=True):
        scores = [{"label": classes[c], "class_id": c, "probability": row[c]} for c in best]
        out.append({**scores[0], "top_k": scores})
    return out


# --- routes --------------------------------------------------------------------------------


PREDICT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "Images as multipart file parts named `files` (repeat the field for "
        "several), or JSON with base64 `images` or raw `pixels`.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": f"Image files ({ALLOWED_MEDIA_TYPES}).",
                        }
                    },
                }
            },
            "application/json": {
                "schema": PredictJSON.model_json_schema(),
                "examples": {
                    "pixels": {
                        "summary": "A 4×4 grayscale array",
                        "value": {
                            "pixels": [
                                [0, 0, 12, 255],
                                [0, 40, 200, 255],
                                [0, 0, 0, 0],
                                [0, 0, 0, 0],
                            ]
                        },
                    },
                    "images": {
                        "summary": "Base64-encoded PNG files",
                        "value": {"images": ["iVBORw0KGgoAAAANSUhEUgAAABwAAAAc..."]},
                    },
                },
            },
        },
    }
}


#: What `/docs` says is done to an upload, for predict and explain alike.
PREPROCESSING_DESCRIPTION = (
    "Preprocessing comes from the checkpoint's manifest and equals training's. An input "
    "larger than 28×28 is treated as a product photo (`preprocess=auto`) and goes through the "
    "conversion that made Fashion-MNIST from Zalando's catalogue photos (Xiao et al. 2017, "
    "§2): trim the margins within 5 % of the corner colour, subsample the longest edge to 28, "
    "sharpen, centre on a 28×28 canvas, negate (when the background is light; `invert` "
    "overrides), grayscale. A 28×28 (or smaller) input, or any input with `preprocess=none`: "
    "grayscale, inversion if its border is light (`invert=auto`; Fashion-MNIST is "
    "light-on-dark), pad to a square with black, scale to 28×28 (Lanczos, like the data set's "
    "own images). Then the network's bilinear resize to its input size. Formats: "
    f"{ALLOWED_MEDIA_TYPES}, recognised by content."
)

#: The most classes a prediction lists (Fashion-MNIST has ten).
MAX_TOP_K = 10
TopK = Annotated[
    int, Query(ge=1, le=MAX_TOP_K, description="How many classes to return per image.")
]
Invert = Annotated[
    InvertMode,
    Query(description="Invert intensities: auto (when the border is light), true, false."),
]
Preprocess = Annotated[
    PreprocessMode,
    Query(
        alias="preprocess",
        description="auto: inputs larger than 28×28 go through Fashion-MNIST's own conversion "
        "of product photos; none: pad to a square and resize, whatever the size.",
    ),
]


async def request_images(request: Request, settings: Settings, how: Preparation) -> np.ndarray:
    """The images of a predict-style body (multipart files or JSON) as the 28×28 images the
    network sees (N×28×28 uint8; `how.model_input` scales them)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await files_native(await _images_from_multipart(request, settings), settings, how)
    if content_type == "application/json" or content_type.endswith("+json"):
        body = await request.body()
        return await run_in_threadpool(_prepare_json, body, settings, how)
    raise UnsupportedBodyError(
        f"the body is {content_type or 'untyped'}; send multipart/form-data with image "
        'files in the \'files\' field, or application/json with "images" or "pixels"'
    )


@router.post(
    "/{ref}/predict",
    response_model=PredictResponse,
    response_model_exclude_none=True,
    summary="Classify images with a checkpoint",
    description="Top-k Fashion-MNIST classes with probabilities, one prediction per image in "
    f"the order sent. {PREPROCESSING_DESCRIPTION} Concurrent requests for one checkpoint are "
    "batched into one forward pass.",
    openapi_extra=PREDICT_BODY,
    dependencies=[Allow("predict")],
    responses=problem_responses(
        401,
        403,
        404,
        409,
        413,
        415,
        422,
        s413="the PNG is 20000×20000 = 400000000 pixels, more than the 16777216 this server "
        "decodes; downscale it first",
        s415="image 0: the content is a GIF image, not an image this server reads; "
        "send PNG, JPEG, WebP or BMP",
    ),
)
async def predict(
    request: Request,
    manifest: Annotated[Manifest, Depends(predict_manifest)],
    top_k: TopK = 1,
    invert: Invert = "auto",
    mode: Preprocess = "auto",
    return_input: Annotated[
        bool,
        Query(description="Also answer each image as the network saw it: 28×28 values 0–255."),
    ] = False,
) -> Response:
    inference = await get_inference(request)
    how = Preparation(manifest, invert, mode)
    native = await request_images(request, inference.settings, how)
    body = await predict_json(inference, how, native, top_k, return_input)
    return Response(body, media_type="application/json")


async def predict_json(
    inference: InferenceService, how: Preparation, native: np.ndarray, top_k: int, with_input: bool
) -> bytes:
    """The `PredictResponse` JSON of these images (as the network sees them)."""
    manifest = how.manifest
    loaded, probs = await inference.predict(manifest, how.model_input(native))
    predictions = _predictions(probs, loaded.manifest.classes, top_k)
    if with_input:
        for prediction, image in zip(predictions, native, strict=True):
            prediction["input"] = image.tolist()
    body = {"checkpoint": manifest.id, "model": manifest.model, "predictions": predictions}
    return json.dumps(body, separators=(",", ":")).encode()
