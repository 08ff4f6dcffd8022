"""The inference pipeline, for every protocol: resolve, decode, preprocess, batch and forward,
encode (LitServe's stages around one model; KServe's data plane under thin endpoints).

- resolve a checkpoint ref to its manifest: `service.inference.resolve` (the service's
  `resolver`);
- decode a request's images within the limits: `service.inference.decode` (bodies, tensors)
  and `service.inference.images` (one image);
- preprocess them as training did: `workers.preprocessing.Transform`, through `Preparation`;
- batch concurrent requests and forward: `service.inference.batcher`, `.backends`, `.cache`;
- encode the probabilities: `service.inference.encode`, `service.inference.v2_codec`.

`/v1` predict and explain, `/v2` infer (`service.api.routes`) and the fast path
(`service.api.fastpath`) are codecs over the functions here: `predict_answer`, `infer_answer`,
`explain_images`. What a predict call may ask for is one declared model, `PredictQuery`, that
the route and the fast path both validate with.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from starlette.requests import Request

from service.inference.backends import LoadedModel
from service.inference.batcher import InferenceService
from service.inference.decode import (
    JSON_VALUES_PER_IMAGE,
    PIXEL_TYPES,
    body_kind,
    declared_files,
    decoded_files,
    encoded_images,
    json_inputs,
    multipart_files,
    pixel_tensor,
    too_many,
    unsupported_body,
    v2_input,
    v2_input_check,
)
from service.inference.encode import predict_body, predictions, v2_outputs
from service.inference.explain import attribute
from service.inference.images import ALLOWED_MEDIA_TYPES
from service.inference.v2_codec import (
    BINARY_MEDIA_TYPE,
    InferRequest,
    ProtocolError,
    encode_response,
    parse_request,
)
from workers.preprocessing import InvertMode, PreprocessMode, Transform
from workers.settings import Settings
from workers.store.checkpoints import Manifest

#: The most classes a prediction lists (Fashion-MNIST has ten).
MAX_TOP_K = 10
#: The values V2's `invert` and `preprocess` parameters take (as predict's query).
INVERT_MODES, PREPROCESS_MODES = get_args(InvertMode), get_args(PreprocessMode)
#: Uploads whose headers declare at most this many pixels in all, in at most this many bytes,
#: are decoded on the event loop: a 28×28 PNG decodes in microseconds, less than a hop to the
#: thread pool costs. The bytes count too: a PNG declaring 1×1 may carry compressed chunks.
INLINE_DECODE_PIXELS = 64 * 64
INLINE_DECODE_BYTES = 16 * 1024
#: V2 bodies up to this size are parsed on the event loop (a few images' JSON parses in less
#: than a hop to the thread pool costs); bigger ones in the pool.
INLINE_PARSE_BYTES = 32 * 1024

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


class PreprocessQuery(BaseModel):
    """How a request's images are preprocessed: the query of explain (and of predict)."""

    invert: InvertMode = Field(
        "auto", description="Invert intensities: auto (when the border is light), true, false."
    )
    preprocess: PreprocessMode = Field(
        "auto",
        description="auto: inputs larger than 28×28 go through Fashion-MNIST's own conversion "
        "of product photos; none: pad to a square and resize, whatever the size.",
    )


class PredictQuery(PreprocessQuery):
    """Every query parameter of predict: the route and the fast path read it with this."""

    top_k: int = Field(1, ge=1, le=MAX_TOP_K, description="How many classes to return per image.")
    return_input: bool = Field(
        False,
        description="Also answer each image as the network saw it: 28×28 values 0–255.",
    )


@dataclass(frozen=True)
class Preparation:
    """How a request's images become its checkpoint's input: the manifest's preprocessing,
    with the request's options (`PreprocessQuery`'s, or V2's parameters)."""

    manifest: Manifest
    invert: InvertMode = "auto"
    mode: PreprocessMode = "auto"

    @classmethod
    def of(cls, manifest: Manifest, query: PreprocessQuery) -> Preparation:
        return cls(manifest, query.invert, query.preprocess)

    @property
    def transform(self) -> Transform:
        return Transform(self.manifest.preprocessing)

    def native(self, arrays: Iterable[np.ndarray]) -> np.ndarray:
        """Decoded images as the 28×28 uint8 images the network sees (N×28×28), each dropped
        before the next is taken (`arrays` may decode them one at a time)."""
        transform = self.transform
        native = []
        for pixels in arrays:
            native.append(transform.native(pixels, self.invert, self.mode))
            del pixels  # not alive while the next image is decoded
        return np.stack(native)

    def native_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """28×28 grayscale pixels (N×28×28 uint8) as the images the network sees."""
        return self.transform.native_batch(pixels, self.invert)

    def model_input(self, native: np.ndarray) -> np.ndarray:
        """Those images as the model's N×1×28×28 float32 input."""
        return self.transform.scale(native)


# --- decode and preprocess: /v1 bodies ------------------------------------------------------


def decodes_inline(blobs: list[bytes], declared: list[int | None]) -> bool:
    """Whether these uploads are small enough to decode on the event loop: declared pixels
    and bytes both trivial (`INLINE_DECODE_PIXELS`, `INLINE_DECODE_BYTES`)."""
    return (
        all(d is not None for d in declared)
        and sum(d or 0 for d in declared) <= INLINE_DECODE_PIXELS
        and sum(len(b) for b in blobs) <= INLINE_DECODE_BYTES
    )


def _decoded_native(blobs: list[bytes], settings: Settings, how: Preparation) -> np.ndarray:
    return how.native(decoded_files(blobs, settings))


def _native_files(blobs: list[bytes], settings: Settings, how: Preparation) -> np.ndarray:
    """Encoded images as the 28×28 images the network sees, within the request's pixel budget
    (from their headers, before any is decoded), decoded one at a time."""
    declared_files(blobs, settings)
    return _decoded_native(blobs, settings, how)


def count_images(count: int, settings: Settings, explain: bool = False) -> None:
    """Refuse (413) more images than a predict call (or an explain call) takes, before any is
    decoded."""
    if count > settings.max_images_per_request:
        raise too_many(count, settings.max_images_per_request)
    if explain and count > settings.explain_max_images:
        raise too_many(count, settings.explain_max_images, "explains")


async def files_native(
    blobs: list[bytes], settings: Settings, how: Preparation, explain: bool = False
) -> np.ndarray:
    """Uploaded image files as the 28×28 images the network sees (N×28×28 uint8), counted and
    within the request's pixel budget before any is decoded."""
    count_images(len(blobs), settings, explain)
    if sum(len(b) for b in blobs) <= INLINE_DECODE_BYTES:
        # small uploads: their headers are read here (a JPEG's markers are walked in Python:
        # bounded by the bytes), and tiny images decoded too
        declared = declared_files(blobs, settings)
        if decodes_inline(blobs, declared):
            return _decoded_native(blobs, settings, how)
        return await run_in_threadpool(_decoded_native, blobs, settings, how)
    # reading headers, decoding and resizing bigger uploads is CPU work: off the event loop
    return await run_in_threadpool(_native_files, blobs, settings, how)


def _native_json(body: bytes, settings: Settings, how: Preparation, explain: bool) -> np.ndarray:
    inputs = json_inputs(body, settings)
    count_images(len(inputs), settings, explain)
    if inputs.pixels:
        return how.native(inputs.pixels)
    return _native_files(inputs.files, settings, how)


async def request_images(
    request: Request, settings: Settings, how: Preparation, explain: bool = False
) -> np.ndarray:
    """The images of a predict-style body (multipart files or JSON) as the 28×28 images the
    network sees (N×28×28 uint8; `how.model_input` scales them); `explain`: within explain's
    count too."""
    content_type = request.headers.get("content-type", "")
    kind = body_kind(content_type)
    if kind is None:
        raise unsupported_body(content_type)
    if kind == "multipart":
        blobs = await multipart_files(request, settings)
        return await files_native(blobs, settings, how, explain)
    body = await request.body()
    return await run_in_threadpool(_native_json, body, settings, how, explain)


# --- /v1 predict ------------------------------------------------------------------------------


async def predict_answer(
    inference: InferenceService, how: Preparation, native: np.ndarray, top_k: int, with_input: bool
) -> bytes:
    """The `PredictResponse` JSON of these images (as the network sees them)."""
    loaded, probs = await inference.predict(how.manifest, how.model_input(native))
    answers = predictions(probs, loaded.manifest.classes, top_k)
    if with_input:
        for answer, image in zip(answers, native, strict=True):
            answer["input"] = image.tolist()
    return predict_body(how.manifest, answers)


# --- /v2 infer --------------------------------------------------------------------------------


def _choice(params: dict[str, Any], name: str, allowed: tuple[str, ...]) -> Any:
    value = params.get(name, "auto")
    if value not in allowed:
        raise ProtocolError(f"parameter {name!r} must be one of {', '.join(allowed)}")
    return value


def _native_encoded(blobs: list[bytes], settings: Settings, how: Preparation) -> np.ndarray:
    return how.model_input(_native_files(blobs, settings, how))


async def _infer_batch(
    request: InferRequest, inference: InferenceService, manifest: Manifest
) -> np.ndarray:
    """A V2 request's input as the model's input, preprocessed exactly as `/v1` predict's."""
    tensor = v2_input(request.inputs)
    params = request.parameters
    invert = _choice(params, "invert", INVERT_MODES)
    how = Preparation(manifest, invert, _choice(params, "preprocess", PREPROCESS_MODES))
    limit = inference.settings.max_images_per_request
    if tensor.datatype in PIXEL_TYPES:
        return how.model_input(how.native_pixels(pixel_tensor(tensor, limit)))
    if tensor.datatype == "BYTES":
        blobs = encoded_images(tensor, limit)
        return await run_in_threadpool(_native_encoded, blobs, inference.settings, how)
    raise ProtocolError(
        f"input {tensor.name!r} is {tensor.datatype}; send UINT8 or FP32 pixels, or BYTES images"
    )


async def infer_answer(
    inference: InferenceService,
    model: str,
    manifest: Manifest,
    body: bytes,
    header_length: str | None,
) -> tuple[bytes, dict[str, str]]:
    """The answer to an infer request's raw body for the checkpoint the model name resolved
    to: the response body and its headers. Every mistake in the request raises a
    `ProblemError` (the protocol's `{"error": ...}` under `/v2`)."""
    check = v2_input_check(inference.settings.max_images_per_request)
    values = inference.settings.max_images_per_request * JSON_VALUES_PER_IMAGE
    if len(body) <= INLINE_PARSE_BYTES:
        parsed = parse_request(body, header_length, check, values)
    else:  # JSON parsing is CPU work: off the event loop
        parsed = await run_in_threadpool(parse_request, body, header_length, check, values)
    batch = await _infer_batch(parsed, inference, manifest)
    loaded, probs = await inference.predict(manifest, batch)
    outputs = v2_outputs(parsed, probs, loaded.manifest.classes)
    content, headers = encode_response(model, manifest.id, parsed.id, outputs)
    headers["Content-Type"] = BINARY_MEDIA_TYPE if headers else "application/json"
    return content, headers


# --- /v1 explain ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Explained:
    """Images explained: as the network saw them, its probabilities, the predicted classes and
    each input pixel's Integrated Gradients share of the predicted class's score."""

    loaded: LoadedModel
    batch: np.ndarray
    probs: np.ndarray
    targets: np.ndarray
    attributions: np.ndarray


async def explain_images(
    inference: InferenceService, how: Preparation, request: Request
) -> Explained:
    """Classify a predict-style body's images and attribute each prediction to its pixels,
    within the server's limits (images per call, time per call)."""
    settings = inference.settings
    started = time.monotonic()
    batch = how.model_input(await request_images(request, settings, how, explain=True))
    loaded, probs = await inference.predict(how.manifest, batch)
    targets = probs.argmax(axis=1)
    deadline = started + settings.explain_timeout_s
    attributions = await asyncio.get_running_loop().run_in_executor(
        inference.explainers,
        lambda: attribute(
            loaded.module, batch, targets, steps=settings.explain_steps, deadline=deadline
        ),
    )
    return Explained(loaded, batch, probs, targets, attributions)
